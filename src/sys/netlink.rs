//! A minimal netlink client: rtnetlink for a clsact qdisc and `bpf` filters (the tc attach of
//! kernels before 6.6, which have no tcx), and ctnetlink to delete one conntrack entry by
//! its original tuple. Message layouts from Linux 6.18 include/uapi/linux/{netlink,rtnetlink,
//! pkt_sched,pkt_cls}.h and netfilter/{nfnetlink,nfnetlink_conntrack}.h.
//!
//! Invariant: every request carries NLM_F_ACK and is answered before the next is sent; a
//! conntrack delete always carries a tuple (without one the kernel flushes the whole table,
//! net/netfilter/nf_conntrack_netlink.c:1641-1653).

use super::{owned, syscall};
use std::io;
use std::mem::size_of;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;
// rtnetlink.h
const RTM_GETLINK: u16 = 18;
const IFLA_MTU: u16 = 4;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const RTM_NEWQDISC: u16 = 36;
const RTM_NEWTFILTER: u16 = 44;
const RTM_DELTFILTER: u16 = 45;
const RTM_GETTFILTER: u16 = 46;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
// pkt_sched.h: the clsact qdisc and its ingress/egress hooks
const TC_H_CLSACT: u32 = 0xFFFF_FFF1;
const TC_H_MIN_INGRESS: u32 = 0xFFF2;
const TC_H_MIN_EGRESS: u32 = 0xFFF3;
// pkt_cls.h
const TCA_BPF_FD: u16 = 6;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_FLAGS: u16 = 8;
const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;
const ETH_P_ALL: u16 = 3;
// nfnetlink.h / nfnetlink_conntrack.h
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NFNETLINK_V0: u8 = 0;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

/// A netlink message being built: header, fixed part, attributes (nested ones by
/// [`Msg::nest`]/[`Msg::end`]). Integers in native order, as netlink wants.
pub struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    pub fn new(kind: u16, flags: u16, seq: u32, fixed: &[u8]) -> Msg {
        let mut buf = Vec::with_capacity(128);
        buf.extend(0u32.to_ne_bytes()); // length, set by finish()
        buf.extend(kind.to_ne_bytes());
        buf.extend((flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend(seq.to_ne_bytes());
        buf.extend(0u32.to_ne_bytes()); // port id: the kernel
        buf.extend(fixed);
        Msg {
            buf,
            nests: Vec::new(),
        }
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    pub fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Msg {
        self.buf.extend(((4 + data.len()) as u16).to_ne_bytes());
        self.buf.extend(kind.to_ne_bytes());
        self.buf.extend(data);
        self.pad();
        self
    }

    pub fn nest(&mut self, kind: u16) -> &mut Msg {
        self.nests.push(self.buf.len());
        self.buf.extend(0u16.to_ne_bytes());
        self.buf.extend((kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    /// Closes the innermost open nest (nothing when none is open).
    pub fn end(&mut self) -> &mut Msg {
        if let Some(at) = self.nests.pop() {
            let len = (self.buf.len() - at) as u16;
            self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    /// The message bytes, with every nest still open closed.
    pub fn finish(&mut self) -> Vec<u8> {
        while !self.nests.is_empty() {
            self.end();
        }
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        std::mem::take(&mut self.buf)
    }
}

/// `struct tcmsg`: family, ifindex, handle, parent, info.
fn tcmsg(ifindex: u32, handle: u32, parent: u32, info: u32) -> [u8; 20] {
    let mut m = [0u8; 20];
    m[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    m[8..12].copy_from_slice(&handle.to_ne_bytes());
    m[12..16].copy_from_slice(&parent.to_ne_bytes());
    m[16..20].copy_from_slice(&info.to_ne_bytes());
    m
}

/// `tcm_info` of a filter: priority in the high half, protocol (network order) in the low.
fn filter_info(prio: u16) -> u32 {
    u32::from(prio) << 16 | u32::from(ETH_P_ALL.to_be())
}

fn hook(ingress: bool) -> u32 {
    (TC_H_CLSACT & 0xFFFF_0000)
        | if ingress {
            TC_H_MIN_INGRESS
        } else {
            TC_H_MIN_EGRESS
        }
}

/// An open netlink socket of one protocol.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

/// One `bpf` filter found by [`Netlink::bpf_filters`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub prio: u16,
    pub handle: u32,
    pub name: String,
}

/// One network interface, from [`Netlink::links`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `ARPHRD_*` (1: Ethernet).
    pub kind: u16,
    pub up: bool,
    pub mtu: u32,
    /// The bridge or bond it is enslaved to, if any.
    pub master: Option<u32>,
}

/// The native-order u32 at `at` (0 past the end).
fn ne32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |w| u32::from_ne_bytes([w[0], w[1], w[2], w[3]]))
}

/// The attributes of one message part, as (type without flags, payload).
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((u16::from_ne_bytes([b[2], b[3]]) & 0x3fff, &b[4..len]));
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    out
}

impl Netlink {
    /// `NETLINK_ROUTE` or `NETLINK_NETFILTER`.
    pub fn open(protocol: libc::c_int) -> io::Result<Netlink> {
        let ty = libc::SOCK_RAW | libc::SOCK_CLOEXEC;
        // SAFETY: plain integer arguments.
        let fd = unsafe { syscall!(socket(libc::AF_NETLINK, ty, protocol))? };
        Ok(Netlink {
            fd: owned(fd),
            seq: 1,
        })
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: `msg` is a readable buffer of its length; the socket is unconnected to
        // anyone but the kernel (port 0 by default).
        let n = unsafe { syscall!(send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0))? };
        match n as usize == msg.len() {
            true => Ok(()),
            false => Err(io::Error::other("short netlink send")),
        }
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is a writable buffer of its length.
        let n = unsafe {
            syscall!(recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0
            ))?
        };
        Ok(n as usize)
    }

    /// Sends `msg` and collects the answer: the payloads of every reply message up to the
    /// ack (or NLMSG_DONE for a dump); a negative NLMSG_ERROR becomes that errno.
    fn talk(&mut self, mut msg: Msg) -> io::Result<Vec<(u16, Vec<u8>)>> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let mut bytes = msg.finish();
        bytes[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.send(&bytes)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 32 * 1024];
        for _ in 0..10_000 {
            let n = self.recv(&mut buf)?;
            let mut b = &buf[..n];
            while b.len() >= 16 {
                let len = ne32(b, 0) as usize;
                let kind = u16::from_ne_bytes([b[4], b[5]]);
                let rseq = ne32(b, 8);
                if len < 16 || len > b.len() {
                    return Err(io::Error::other("malformed netlink reply"));
                }
                let payload = &b[16..len];
                b = &b[((len + 3) & !3).min(b.len())..];
                if rseq != seq {
                    continue; // a stale answer
                }
                match kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR if payload.len() >= 4 => {
                        let code = ne32(payload, 0) as i32;
                        return match code {
                            0 => Ok(out),
                            e => Err(io::Error::from_raw_os_error(-e)),
                        };
                    }
                    _ => out.push((kind, payload.to_vec())),
                }
            }
        }
        Err(io::Error::other("netlink answer never ended"))
    }

    /// Every interface of the network namespace (`RTM_GETLINK` dump).
    pub fn links(&mut self) -> io::Result<Vec<Link>> {
        let m = Msg::new(RTM_GETLINK, NLM_F_DUMP, 0, &[0u8; 16]);
        let mut out = Vec::new();
        for (_, p) in self.talk(m)? {
            if p.len() < 16 {
                continue;
            }
            let mut link = Link {
                index: ne32(&p, 4),
                name: String::new(),
                kind: u16::from_ne_bytes([p[2], p[3]]),
                up: ne32(&p, 8) & libc::IFF_UP as u32 != 0,
                mtu: 0,
                master: None,
            };
            for (t, v) in attrs(&p[16..]) {
                match t {
                    IFLA_IFNAME => {
                        let name = v.split(|&c| c == 0).next().unwrap_or(&[]);
                        link.name = String::from_utf8_lossy(name).into_owned();
                    }
                    IFLA_MTU => link.mtu = ne32(v, 0),
                    IFLA_MASTER => link.master = Some(ne32(v, 0)),
                    _ => {}
                }
            }
            out.push(link);
        }
        Ok(out)
    }

    /// Adds a clsact qdisc to `ifindex`; `EEXIST` when it is already there.
    pub fn add_clsact(&mut self, ifindex: u32) -> io::Result<()> {
        let fixed = tcmsg(ifindex, TC_H_CLSACT & 0xFFFF_0000, TC_H_CLSACT, 0);
        let flags = NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        let mut m = Msg::new(RTM_NEWQDISC, flags, 0, &fixed);
        m.attr(TCA_KIND, b"clsact\0");
        self.talk(m).map(drop)
    }

    /// Attaches SCHED_CLS program `prog` as a direct-action `bpf` filter at clsact ingress
    /// (or egress) of `ifindex`, priority `prio`, handle `handle`, named `name` so that a
    /// later start can find and remove it ([`Netlink::bpf_filters`]).
    pub fn add_bpf_filter(
        &mut self,
        ifindex: u32,
        ingress: bool,
        prio: u16,
        handle: u32,
        prog: BorrowedFd,
        name: &str,
    ) -> io::Result<()> {
        let fixed = tcmsg(ifindex, handle, hook(ingress), filter_info(prio));
        let flags = NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        let mut m = Msg::new(RTM_NEWTFILTER, flags, 0, &fixed);
        let mut cname = name.as_bytes().to_vec();
        cname.push(0);
        m.attr(TCA_KIND, b"bpf\0")
            .nest(TCA_OPTIONS)
            .attr(TCA_BPF_FD, &(prog.as_raw_fd() as u32).to_ne_bytes())
            .attr(TCA_BPF_NAME, &cname)
            .attr(TCA_BPF_FLAGS, &TCA_BPF_FLAG_ACT_DIRECT.to_ne_bytes())
            .end();
        self.talk(m).map(drop)
    }

    /// Removes the filter `prio`/`handle` from clsact ingress (egress) of `ifindex`.
    pub fn del_bpf_filter(
        &mut self,
        ifindex: u32,
        ingress: bool,
        prio: u16,
        handle: u32,
    ) -> io::Result<()> {
        let fixed = tcmsg(ifindex, handle, hook(ingress), filter_info(prio));
        let mut m = Msg::new(RTM_DELTFILTER, NLM_F_ACK, 0, &fixed);
        m.attr(TCA_KIND, b"bpf\0");
        self.talk(m).map(drop)
    }

    /// The `bpf` filters at clsact ingress (egress) of `ifindex`, with their names.
    /// `EINVAL`/`ENOENT` when the device has no clsact qdisc.
    pub fn bpf_filters(&mut self, ifindex: u32, ingress: bool) -> io::Result<Vec<Filter>> {
        let fixed = tcmsg(ifindex, 0, hook(ingress), 0);
        let m = Msg::new(RTM_GETTFILTER, NLM_F_DUMP, 0, &fixed);
        let mut out = Vec::new();
        for (_, p) in self.talk(m)? {
            if p.len() < 20 {
                continue;
            }
            let handle = ne32(&p, 8);
            let info = ne32(&p, 16);
            let a = attrs(&p[20..]);
            let is_bpf = a
                .iter()
                .any(|(t, v)| *t == TCA_KIND && v.starts_with(b"bpf\0"));
            if !is_bpf || handle == 0 {
                continue; // the per-priority chain entry, or another classifier
            }
            let name = a
                .iter()
                .filter(|(t, _)| *t == TCA_OPTIONS)
                .flat_map(|(_, v)| attrs(v))
                .find(|(t, _)| *t == TCA_BPF_NAME)
                .map(|(_, v)| {
                    String::from_utf8_lossy(v.split(|&c| c == 0).next().unwrap_or(&[])).into_owned()
                })
                .unwrap_or_default();
            out.push(Filter {
                prio: (info >> 16) as u16,
                handle,
                name,
            });
        }
        Ok(out)
    }

    /// The original direction (source, destination) of the TCP conntrack entry whose reply
    /// direction is `src -> dst`: for a REDIRECT-ed connection, the client's own address and
    /// port (NAT may have remapped the port it shows the proxy's socket) and the destination
    /// it asked for. `ENOENT` when there is none.
    pub fn ct_original(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> io::Result<(SocketAddr, SocketAddr)> {
        let m = ct_request(IPCTNL_MSG_CT_GET, CTA_TUPLE_REPLY, src, dst)?;
        for (_, p) in self.talk(m)? {
            let orig = attrs(p.get(4..).unwrap_or(&[]))
                .into_iter()
                .find(|(t, _)| *t == CTA_TUPLE_ORIG)
                .map(|(_, v)| v.to_vec());
            if let Some(tuple) = orig.as_deref().and_then(parse_tuple) {
                return Ok(tuple);
            }
        }
        Err(io::ErrorKind::NotFound.into())
    }

    /// Deletes the TCP conntrack entry whose original direction is `src -> dst` (as the
    /// first packet of the connection was seen). `ENOENT` when there is none.
    pub fn ct_delete(&mut self, src: SocketAddr, dst: SocketAddr) -> io::Result<()> {
        let m = ct_request(IPCTNL_MSG_CT_DELETE, CTA_TUPLE_ORIG, src, dst)?;
        self.talk(m).map(drop)
    }
}

/// A ctnetlink request carrying one TCP tuple `src -> dst` as attribute `which`.
fn ct_request(kind: u16, which: u16, src: SocketAddr, dst: SocketAddr) -> io::Result<Msg> {
    let (family, sa, da) = match (src.ip(), dst.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => (libc::AF_INET as u8, CTA_IP_V4_SRC, CTA_IP_V4_DST),
        (IpAddr::V6(_), IpAddr::V6(_)) => (libc::AF_INET6 as u8, CTA_IP_V6_SRC, CTA_IP_V6_DST),
        _ => return Err(io::ErrorKind::InvalidInput.into()),
    };
    let ip = |a: IpAddr| match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let fixed = [family, NFNETLINK_V0, 0, 0];
    let kind = NFNL_SUBSYS_CTNETLINK << 8 | kind;
    let mut m = Msg::new(kind, NLM_F_ACK, 0, &fixed);
    m.nest(which)
        .nest(CTA_TUPLE_IP)
        .attr(sa, &ip(src.ip()))
        .attr(da, &ip(dst.ip()))
        .end()
        .nest(CTA_TUPLE_PROTO)
        .attr(CTA_PROTO_NUM, &[libc::IPPROTO_TCP as u8])
        .attr(CTA_PROTO_SRC_PORT, &src.port().to_be_bytes())
        .attr(CTA_PROTO_DST_PORT, &dst.port().to_be_bytes())
        .end()
        .end();
    Ok(m)
}

/// A `CTA_TUPLE_*` nest's TCP (source, destination).
fn parse_tuple(nest: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    let (mut ips, mut ports) = ([None, None], [None, None]);
    for (t, v) in attrs(nest) {
        match t {
            CTA_TUPLE_IP => {
                for (t, a) in attrs(v) {
                    let ip: Option<IpAddr> = match a.len() {
                        4 => <[u8; 4]>::try_from(a).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(a).ok().map(IpAddr::from),
                        _ => None,
                    };
                    match t {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => ips[0] = ip,
                        CTA_IP_V4_DST | CTA_IP_V6_DST => ips[1] = ip,
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (t, p) in attrs(v) {
                    let port = (p.len() == 2).then(|| u16::from_be_bytes([p[0], p[1]]));
                    match t {
                        CTA_PROTO_SRC_PORT => ports[0] = port,
                        CTA_PROTO_DST_PORT => ports[1] = port,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((
        SocketAddr::new(ips[0]?, ports[0]?),
        SocketAddr::new(ips[1]?, ports[1]?),
    ))
}

const _: () = assert!(size_of::<libc::nlmsghdr>() == 16);

#[cfg(test)]
#[path = "netlink_tests.rs"]
mod tests;
