//! Which interfaces the tcsplice program watches (`--splice-dev`, or by default every
//! Ethernet interface that is up and not enslaved to a bridge or bond), what each must offer,
//! and the segment size both legs of a spliced connection are held to.
//!
//! Invariant: a device is accepted only if the program can work on it — an Ethernet header
//! (the program rewrites MACs and `bpf_redirect_neigh` refuses L3 devices) and fraglist GRO
//! off (it would lose the rewrite on all but the first segment, docs/TCSPLICE.md) — and the
//! MSS is small enough for the smallest MTU among them, so a spliced segment fits every one.

use crate::sys::ethtool;
use crate::sys::netlink::Link;

/// `ARPHRD_ETHER`: also bridges, VLANs, veth and Wi-Fi.
const ARPHRD_ETHER: u16 = 1;

/// One interface the program is attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
}

/// The devices to attach to: those `names` (all must qualify), or when `names` is empty
/// every Ethernet interface that is up and has no master (a bridge port's packets reach the
/// bridge's own ingress, where the bridge is watched). `gro_list` answers whether
/// `rx-gro-list` is on (ethtool; `None` when the kernel does not know it).
pub fn choose(
    names: &[String],
    links: &[Link],
    gro_list: &dyn Fn(&str) -> Result<Option<bool>, String>,
) -> Result<Vec<Device>, String> {
    let picked: Vec<&Link> = match names.is_empty() {
        true => links
            .iter()
            .filter(|l| l.kind == ARPHRD_ETHER && l.up && l.master.is_none())
            .collect(),
        false => names
            .iter()
            .map(|n| {
                links
                    .iter()
                    .find(|l| &l.name == n)
                    .ok_or_else(|| format!("--splice-dev {n}: no such interface"))
            })
            .collect::<Result<_, _>>()?,
    };
    if picked.is_empty() {
        return Err("no Ethernet interface is up: name one with --splice-dev".into());
    }
    let mut out = Vec::new();
    for l in picked {
        if l.kind != ARPHRD_ETHER {
            return Err(format!(
                "{}: not an Ethernet device (type {}); tcsplice needs one (PPP, WireGuard and other L3 devices are not supported)",
                l.name, l.kind
            ));
        }
        // GRO runs where a packet enters: on a bridge's (or bond's) ports, and on a bond
        // that is itself a bridge port, not on the bridge the program watches.
        for d in std::iter::once(l).chain(ports(links, l.index)) {
            if gro_list(&d.name)? == Some(true) {
                return Err(format!(
                    "{}: rx-gro-list is on, which would lose the rewrite of merged segments; turn it off with: ethtool -K {} rx-gro-list off",
                    d.name, d.name
                ));
            }
        }
        if out.iter().all(|d: &Device| d.index != l.index) {
            out.push(Device {
                name: l.name.clone(),
                index: l.index,
                mtu: l.mtu,
            });
        }
    }
    Ok(out)
}

/// The links enslaved to `master`, and theirs in turn (a bond under a bridge), two levels.
fn ports(links: &[Link], master: u32) -> impl Iterator<Item = &Link> {
    let below = move |m: u32| links.iter().filter(move |l| l.master == Some(m));
    below(master).flat_map(move |p| std::iter::once(p).chain(below(p.index)))
}

/// `rx-gro-list` of `dev` through ethtool, the error naming the device.
pub fn gro_list(dev: &str) -> Result<Option<bool>, String> {
    ethtool::feature(dev, "rx-gro-list").map_err(|e| format!("{dev}: ethtool: {e}"))
}

/// The MSS (IPv4, IPv6) for the smallest MTU of `devices`: MTU minus the IP and TCP headers.
pub fn mss(devices: &[Device]) -> [u16; 2] {
    let mtu = devices.iter().map(|d| d.mtu).min().unwrap_or(1500).max(576);
    let clamp = |v: u32| v.min(u32::from(u16::MAX)) as u16;
    [clamp(mtu - 40), clamp(mtu - 60)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, kind: u16, up: bool, mtu: u32, master: Option<u32>) -> Link {
        Link {
            index,
            name: name.into(),
            kind,
            up,
            mtu,
            master,
        }
    }

    fn links() -> Vec<Link> {
        vec![
            link(1, "lo", 772, true, 65536, None),
            link(2, "eth0", 1, true, 1500, Some(4)),
            link(3, "wan", 1, true, 1492, None),
            link(4, "br-lan", 1, true, 1500, None),
            link(5, "wg0", 65534, true, 1420, None),
            link(6, "eth9", 1, false, 1500, None),
        ]
    }

    /// The default is every Ethernet interface that is up and has no master; named ones are
    /// checked; the MSS follows the smallest MTU.
    #[test]
    fn default_and_named_devices() {
        let off = |_: &str| Ok(Some(false));
        let names = |d: Vec<Device>| d.into_iter().map(|d| d.name).collect::<Vec<_>>();
        assert_eq!(
            names(choose(&[], &links(), &off).unwrap()),
            ["wan", "br-lan"]
        );
        let d = choose(&["wan".into(), "eth0".into()], &links(), &off).unwrap();
        assert_eq!(mss(&d), [1452, 1432]);
        let err = choose(&["wg0".into()], &links(), &off).unwrap_err();
        assert!(err.contains("not an Ethernet device"), "{err}");
        let err = choose(&["nope".into()], &links(), &off).unwrap_err();
        assert!(err.contains("no such interface"), "{err}");
        let on = |d: &str| Ok(Some(d == "wan"));
        let err = choose(&[], &links(), &on).unwrap_err();
        assert!(err.contains("ethtool -K wan rx-gro-list off"), "{err}");
        assert!(choose(&[], &links()[..1], &off).is_err(), "only loopback");
        // A bridge port's GRO is the one that merges the bridge's packets.
        let on = |d: &str| Ok(Some(d == "eth0"));
        let err = choose(&[], &links(), &on).unwrap_err();
        assert!(err.contains("ethtool -K eth0 rx-gro-list off"), "{err}");
        let mut bonded = links();
        bonded.push(link(7, "lan1", 1, true, 1500, Some(2)));
        let on = |d: &str| Ok(Some(d == "lan1"));
        let err = choose(&["br-lan".into()], &bonded, &on).unwrap_err();
        assert!(err.contains("ethtool -K lan1 rx-gro-list off"), "{err}");
    }
}
