//! The tcsplice plane: after the handshake, a connection's two TCP legs are translated into
//! each other packet by packet by bpf/tcsplice.bpf.c at tc ingress, and the router's two
//! sockets stay frozen in `TCP_REPAIR` mode (docs/TCSPLICE.md). `kernel` loads and attaches
//! the program, `devices` picks the interfaces, `handoff` does the socket steps, `relay`
//! runs one connection, `selftest` probes the kernel at start, `map` is the entry format.
//!
//! This file holds the plane's shared state: the kernel objects, the segment size both legs
//! are held to, the conntrack socket, the scan that reads every entry in a few syscalls, and
//! the fallback counts.
//!
//! Invariant: a connection's keys are in `watched` exactly while its entries are in the map
//! (`enter` adds them, `Relay::stop` removes them), so a scan never wakes a closed
//! connection's successor.

mod devices;
mod handoff;
pub mod kernel;
pub mod map;
mod relay;
mod selftest;
mod spliced;

pub use handoff::Fallback;
pub use relay::Relay;

use crate::end::End;
use crate::sock::Pair;
use crate::sys::netlink::Netlink;
use crate::{debug, error, info};
use map::{Flow, FlowKey, Seen, KEY_SIZE};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

/// The entries of spliced flows are read this often.
const SCAN: Duration = Duration::from_millis(250);

/// One installed entry: its connection's token and what the last scan read.
struct Watch {
    token: u64,
    seen: Seen,
    v6: bool,
}

pub struct Plane {
    pub kernel: kernel::Kernel,
    /// MSS (IPv4, IPv6) both legs of every connection are held to.
    pub mss: [u16; 2],
    /// ctnetlink: the original tuple of a redirected connection, and deleting the conntrack
    /// entries of spliced flows (`None`: no conntrack).
    ct: Option<Netlink>,
    watched: HashMap<[u8; KEY_SIZE], Watch>,
    next_scan: Instant,
    /// Whether the kernel reads the map in batches (Linux >= 5.6).
    batch: bool,
    /// Connections left in userspace, by `Fallback` reason.
    pub fallbacks: [u64; Fallback::ALL.len()],
}

impl Plane {
    /// Picks the devices (`names`, or the default), loads the program with room for
    /// `max_conns` connections, attaches it and runs the self-test. The error is one line.
    pub fn load(names: &[String], max_conns: usize) -> Result<Plane, String> {
        let mut nl = Netlink::open(libc::NETLINK_ROUTE).map_err(|e| format!("rtnetlink: {e}"))?;
        let links = nl.links().map_err(|e| format!("listing interfaces: {e}"))?;
        let devices = devices::choose(names, &links, &devices::gro_list)?;
        let stale = kernel::Kernel::remove_stale(&mut nl, &links);
        if stale > 0 {
            info!("tcsplice: removed {stale} clsact filter(s) a previous ksocks left attached");
        }
        let entries = u32::try_from(max_conns.saturating_mul(2)).unwrap_or(u32::MAX);
        let mut kernel = kernel::Kernel::load(entries).map_err(|e| e.to_string())?;
        let mut how = Vec::new();
        for d in &devices {
            let via = kernel
                .attach(&mut nl, d.index)
                .map_err(|e| format!("attaching to {}: {e}", d.name))?;
            how.push(format!("{} ({via})", d.name));
        }
        selftest::run(&kernel).map_err(|e| format!("self-test failed: {e}"))?;
        let mss = devices::mss(&devices);
        error!(
            "tcsplice on {}; MSS {} (IPv4) / {} (IPv6)",
            how.join(", "),
            mss[0],
            mss[1]
        );
        let ct = Netlink::open(libc::NETLINK_NETFILTER)
            .inspect_err(|e| info!("tcsplice: no ctnetlink ({e}): conntrack entries of spliced flows are left to expire"))
            .ok();
        let batch = kernel.scan(&mut Vec::new()).is_ok();
        if !batch {
            debug!("BPF_MAP_LOOKUP_BATCH unsupported: spliced flows are read one by one");
        }
        Ok(Plane {
            kernel,
            mss,
            ct,
            watched: HashMap::new(),
            next_scan: Instant::now() + SCAN,
            batch,
            fallbacks: [0; Fallback::ALL.len()],
        })
    }

    /// Starts connection `id` (event loop token `token`) on this plane.
    pub fn enter(&mut self, id: u64, token: u64) -> Box<Relay> {
        Box::new(Relay::start(id, token, Instant::now()))
    }

    /// Advances connection `r` (see `Relay::step`); entries it installed join the scan.
    pub fn step(&mut self, r: &mut Relay, pair: &mut Pair, now: Instant) -> Option<End> {
        let end = r.step(self, pair, now);
        for k in r.new_keys().into_iter().flatten() {
            if let Some(key) = k.encode() {
                let (seen, v6, token) = (Seen::default(), k.src.is_ipv6(), r.token);
                self.watched.insert(key, Watch { token, seen, v6 });
            }
        }
        end
    }

    /// Holds a listener's or an upstream socket's segment size to the plane's MSS, so that
    /// no spliced segment exceeds what either peer or device takes.
    pub fn hold_mss(&self, fd: BorrowedFd, addr: &SocketAddr) -> std::io::Result<()> {
        crate::sys::repair::set_maxseg(fd, self.mss[usize::from(addr.is_ipv6())])
    }

    /// Counts and logs the fallback a connection's last step decided.
    pub fn count(&mut self, id: u64, r: &mut Relay) {
        if let Some((why, detail)) = r.fallback.take() {
            self.fallbacks[why as usize] += 1;
            info!("#{id} tcsplice: not spliced: {} ({detail})", why.name());
        }
    }

    /// Fresh reads of both entries of a connection.
    pub fn fresh(&self, keys: &[FlowKey; 2]) -> Option<[Seen; 2]> {
        let mut out = [Seen::default(); 2];
        for (k, o) in keys.iter().zip(out.iter_mut()) {
            *o = self.kernel.read(&k.encode()?, k.src.is_ipv6()).ok()?.seen;
        }
        Some(out)
    }

    /// What the last scan read of a connection's entries.
    pub fn scanned(&self, keys: &[FlowKey; 2]) -> Option<[Seen; 2]> {
        let get = |k: &FlowKey| Some(self.watched.get(&k.encode()?)?.seen);
        Some([get(&keys[0])?, get(&keys[1])?])
    }

    /// A connection was just spliced: what its entries hold now is the scan's baseline.
    fn spliced(&mut self, keys: &[FlowKey; 2], seen: [Seen; 2]) {
        for (k, s) in keys.iter().zip(seen) {
            if let Some(w) = k.encode().and_then(|key| self.watched.get_mut(&key)) {
                w.seen = s;
            }
        }
    }

    /// Takes a connection off the plane, just before its sockets are closed.
    pub fn stop(&mut self, id: u64, r: &mut Relay, end: End, fds: (BorrowedFd, BorrowedFd)) {
        if let Some(keys) = r.keys() {
            for k in keys {
                if let Some(key) = k.encode() {
                    self.watched.remove(&key);
                }
            }
        }
        if let Some(why) = r.stop(self, end, fds) {
            r.fallback = Some(why);
        }
        self.count(id, r);
    }

    /// Deletes the conntrack entry whose original direction is `src -> dst`.
    fn ct_delete(&mut self, src: SocketAddr, dst: SocketAddr) {
        if let Some(ct) = &mut self.ct {
            match ct.ct_delete(src, dst) {
                Err(e) if e.raw_os_error() != Some(libc::ENOENT) => {
                    debug!("tcsplice: conntrack delete {src} -> {dst}: {e}")
                }
                _ => {}
            }
        }
    }

    pub fn next_tick(&self) -> Option<Instant> {
        (!self.watched.is_empty()).then_some(self.next_scan)
    }

    /// Reads every entry (batched where the kernel can) and adds to `wake` the tokens of
    /// spliced connections whose entries changed since the last scan.
    pub fn tick(&mut self, now: Instant, wake: &mut Vec<u64>) {
        if now < self.next_scan || self.watched.is_empty() {
            return;
        }
        self.next_scan = now + SCAN;
        let mut read = Vec::with_capacity(self.watched.len());
        if self.batch && self.kernel.scan(&mut read).is_err() {
            read.clear();
        }
        // Each connection has two entries: its token may be pushed twice, deduplicated below
        // (a `contains` per entry would be quadratic in the spliced flows).
        let start = wake.len();
        let mut update = |flow: Flow, w: &mut Watch| {
            if flow.seen != w.seen {
                w.seen = flow.seen;
                if flow.state == map::State::Splice {
                    wake.push(w.token);
                }
            }
        };
        if self.batch {
            for (key, value) in &read {
                if let Some(w) = self.watched.get_mut(key) {
                    update(Flow::decode(value, w.v6), w);
                }
            }
        } else {
            let kernel = &self.kernel;
            for (key, w) in self.watched.iter_mut() {
                if let Ok(flow) = kernel.read(key, w.v6) {
                    update(flow, w);
                }
            }
        }
        let mut tokens = wake.split_off(start);
        tokens.sort_unstable();
        tokens.dedup();
        wake.extend(tokens);
    }

    /// Entries in the `flows` map.
    pub fn entries(&self) -> usize {
        self.kernel.entries()
    }
}

impl Drop for Plane {
    /// Says what the program dropped of spliced flows, by reason (`errors` map), if anything.
    fn drop(&mut self) {
        const WHY: [&str; kernel::ERRORS as usize] = [
            "no_route",
            "frag_needed",
            "fragment",
            "short",
            "syn",
            "redirect",
            "options",
            "rst_window",
        ];
        let errors = self.kernel.errors();
        if errors.iter().any(|&n| n > 0) {
            let each: Vec<String> = WHY
                .iter()
                .zip(errors)
                .filter(|(_, n)| *n > 0)
                .map(|(w, n)| format!("{w}={n}"))
                .collect();
            info!("tcsplice: packets the program dropped: {}", each.join(" "));
        }
    }
}
