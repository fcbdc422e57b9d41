//! The socket side of a handoff, one call per step of docs/TCSPLICE.md: whether a
//! connection's two legs can be spliced at all, whether they are quiet, holding busy peers
//! back, freezing the router's sockets with `TCP_REPAIR` and reading them, thawing them
//! again when a handoff is abandoned, and resetting the peers of a spliced flow that must end
//! without its own FINs.
//!
//! Invariant: a socket leaves this module either untouched, or frozen (repair mode, its
//! numbers read), or thawed exactly as it was found (repair off without a probe, its window
//! clamp, send buffer and repair window restored); nothing here sends payload.

use super::map::{Frozen, Seen};
use crate::sys::netlink::Netlink;
use crate::sys::repair::{self, Leave, RepairWindow};
use crate::sys::socket;
use std::io;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;

// include/net/tcp_states.h
const TCP_ESTABLISHED: u8 = 1;
const TCP_FIN_WAIT2: u8 = 5;
const TCP_CLOSE_WAIT: u8 = 8;

/// Why a connection stays in userspace, counted in the stats line as `fallback_<name>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// No quiet moment came in the bounded wait (e.g. a reader that stalls).
    Busy,
    /// Options the rewrite cannot translate: timestamps or ECN on one leg only.
    Options,
    /// The two legs are of different address families.
    Family,
    /// A leg's segment size differs from the one both were held to.
    Mss,
    /// A peer on the router itself, or whose packets the program never saw.
    Local,
    /// The `flows` map is full.
    MapFull,
    /// The kernel refused a step (`TCP_REPAIR`, a map update...).
    Error,
    /// The connection ended before a handoff could happen.
    Early,
}

impl Fallback {
    pub const ALL: [Fallback; 8] = [
        Fallback::Busy,
        Fallback::Options,
        Fallback::Family,
        Fallback::Mss,
        Fallback::Local,
        Fallback::MapFull,
        Fallback::Error,
        Fallback::Early,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fallback::Busy => "busy",
            Fallback::Options => "options",
            Fallback::Family => "family",
            Fallback::Mss => "mss",
            Fallback::Local => "local",
            Fallback::MapFull => "map_full",
            Fallback::Error => "error",
            Fallback::Early => "early",
        }
    }
}

/// A fallback with what a log line says about it.
pub type Refusal = (Fallback, String);

/// The addresses of a connection's two legs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Legs {
    /// The client, and where its packets are addressed: the original destination for
    /// REDIRECT (before NAT), the socket's own address for TPROXY and SOCKS.
    pub client: SocketAddr,
    pub client_dst: SocketAddr,
    /// The upstream socket's own address and its peer (the server or upstream proxy).
    pub local: SocketAddr,
    pub server: SocketAddr,
    /// Timestamps negotiated on both legs (they must agree).
    pub timestamps: bool,
}

/// A refused step; a socket that is no longer connected means the connection is ending.
pub(super) fn error(what: &str, e: io::Error) -> Refusal {
    match e.raw_os_error() {
        Some(libc::ENOTCONN) => (Fallback::Early, "closed before the handoff".into()),
        _ => (Fallback::Error, format!("{what}: {e}")),
    }
}

/// Whether client socket `a` and upstream socket `b` can be spliced, with `mss` the
/// (IPv4, IPv6) segment size both legs were held to; `ct` answers conntrack questions.
pub fn check(
    a: BorrowedFd,
    b: BorrowedFd,
    mss: [u16; 2],
    ct: Option<&mut Netlink>,
) -> Result<Legs, Refusal> {
    let peer = socket::peer_addr(a).map_err(|e| error("client address", e))?;
    let own = socket::local_addr(a).map_err(|e| error("client socket address", e))?;
    // The addresses the client's packets carry at tc ingress, before any NAT: conntrack's
    // original direction (REDIRECT rewrites the destination, and when the redirected
    // tuple clashes with another connection's, the client's port too). TPROXY and SOCKS
    // have no NAT; without conntrack the socket's own view is all there is.
    let (client, client_dst) = match ct.map(|nl| nl.ct_original(own, peer)) {
        Some(Ok(t)) => t,
        _ => (peer, socket::original_dst(a, own.is_ipv6()).unwrap_or(own)),
    };
    let local = socket::local_addr(b).map_err(|e| error("upstream address", e))?;
    let server = socket::peer_addr(b).map_err(|e| error("upstream peer", e))?;
    if client.is_ipv6() != server.is_ipv6() || client_dst.is_ipv6() != client.is_ipv6() {
        return Err((Fallback::Family, format!("{client} and {server}")));
    }
    // A peer on this host other than over loopback shows as one whose packets the program
    // never sees (the connection then stays in userspace, counted `local`).
    for peer in [client, server] {
        if peer.ip().is_loopback() {
            return Err((Fallback::Local, format!("{} is on this host", peer.ip())));
        }
    }
    let (oa, ob) = (
        repair::options(a).map_err(|e| error("TCP_INFO", e))?,
        repair::options(b).map_err(|e| error("TCP_INFO", e))?,
    );
    for (bit, what) in [
        (repair::TCPI_OPT_TIMESTAMPS, "timestamps"),
        (repair::TCPI_OPT_ECN, "ECN"),
    ] {
        if (oa.options & bit) != (ob.options & bit) {
            return Err((Fallback::Options, format!("{what} on one leg only")));
        }
    }
    // Without timestamps, `freeze`'s guard against a late segment (PAWS) is absent: a
    // segment that reached a frozen socket after the last check would be ACKed and believed,
    // and the other peer would never get those bytes. Such a connection stays in userspace.
    let timestamps = oa.options & repair::TCPI_OPT_TIMESTAMPS != 0;
    if !timestamps {
        let why = "no timestamps (a late segment's ACK could not be refused)";
        return Err((Fallback::Options, why.into()));
    }
    let want = u32::from(mss[usize::from(client.is_ipv6())]) - if timestamps { 12 } else { 0 };
    if oa.snd_mss != want || ob.snd_mss != want {
        let (x, y) = (oa.snd_mss, ob.snd_mss);
        return Err((
            Fallback::Mss,
            format!("client {x}, upstream {y}, held to {want}"),
        ));
    }
    Ok(Legs {
        client,
        client_dst,
        local,
        server,
        timestamps,
    })
}

/// Nothing to read, nothing unacknowledged, and in a state a splice can take over: the
/// socket holds no byte of the stream. `fin_read`: the relay has read its peer's FIN (and
/// passed it on), so CLOSE_WAIT is expected; otherwise it must not have arrived unread
/// (ESTABLISHED, or FIN_WAIT2 after our own FIN was acknowledged).
pub fn quiet(fd: BorrowedFd, fin_read: bool) -> io::Result<bool> {
    let state = repair::options(fd)?.state;
    let open = match fin_read {
        true => state == TCP_CLOSE_WAIT,
        false => matches!(state, TCP_ESTABLISHED | TCP_FIN_WAIT2),
    };
    Ok(open && repair::inq(fd)? == 0 && socket::outq(fd)? == 0)
}

/// Whether the peer of a connect()ed socket has surely left SYN_RECV: it acknowledged data
/// (a request socket only ever acknowledges the SYN) or sent some. Until then nothing but
/// data may go to it: when the handshake's last ACK was lost, the peer is a request socket
/// that answers a probe (an old sequence number) with an ACK carrying a TSval it never
/// records, the socket echoes that value from then on, and since Linux 6.15 a request socket
/// rejects every segment whose TSecr lies outside its SYN-ACKs' TSvals (tcp_check_req,
/// TcpExtTSEcrRejected): the upstream leg stalls until a SYN-ACK is retransmitted, a second
/// or more later (seen in the soak's captures through 1% loss).
pub fn synchronized(fd: BorrowedFd) -> bool {
    socket::tcp_bytes(fd).is_ok_and(|t| t.received > 0 || t.acked > 1)
}

/// Whether all a socket lacks to be quiet is its peer's ACK of what it sent (a delayed ACK,
/// up to 40 ms or more): then [`ask_ack`] gets it now.
pub fn awaits_ack(fd: BorrowedFd) -> bool {
    let established = repair::options(fd).is_ok_and(|o| o.state == TCP_ESTABLISHED);
    established && repair::inq(fd).is_ok_and(|n| n == 0) && socket::outq(fd).is_ok_and(|n| n > 0)
}

/// Asks the peer of an ESTABLISHED socket for an ACK now: leaving repair mode sends a window
/// probe (an old sequence number), which the peer answers at once with its current ACK.
pub fn ask_ack(fd: BorrowedFd) -> io::Result<()> {
    let reuse = reuse_of(fd);
    repair::repair_on(fd)?;
    let probed = repair::repair_off(fd, Leave::Probe);
    restore_reuse(fd, reuse);
    probed
}

/// `SO_REUSEADDR` as the socket has it outside repair mode. Entering repair mode sets the
/// kernel's `sk_reuse` to SK_FORCE_REUSE and leaving it sets 0 (net/ipv4/tcp.c), which would
/// make an accepted socket — later lingering in TIME_WAIT — block ksocks' listener port from
/// being bound again after a restart; so every way out of repair mode puts it back.
fn reuse_of(fd: BorrowedFd) -> libc::c_int {
    socket::get_int_opt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR).map_or(0, |v| v.min(1))
}

fn restore_reuse(fd: BorrowedFd, reuse: libc::c_int) {
    let _ = socket::set_int_opt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, reuse);
}

/// What [`thaw`] puts back on a socket [`freeze`] froze.
#[derive(Clone, Copy, Debug)]
pub struct Thaw {
    window: RepairWindow,
    reuse: libc::c_int,
    /// The socket's TS clock ticks in microseconds (`TCPI_OPT_USEC_TS`).
    usec: bool,
}

/// How far [`freeze`] sets a frozen socket's timestamp clock back: half the TSval space,
/// so every segment the socket still sends fails its peer's PAWS check (RFC 7323 5.3).
const AGE: u32 = 1 << 30;

/// Asks a quiet socket's peer for an ACK, so the program sees its timestamp clock: a window
/// probe now (leaving repair mode sends one, in ESTABLISHED only), or else a keepalive probe
/// in a second (which works half-closed too); [`freeze`] turns keepalive off again.
pub fn probe(fd: BorrowedFd) -> io::Result<()> {
    if repair::options(fd)?.state == TCP_ESTABLISHED {
        return ask_ack(fd);
    }
    socket::set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 1)?;
    socket::set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1)?;
    socket::set_int_opt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)
}

/// What [`hold`] changed on one socket, to put back.
#[derive(Clone, Copy, Debug)]
pub struct Held {
    clamp: u32,
    sndbuf: libc::c_int,
}

/// Holds a busy peer back: the smallest receive window (`TCP_WINDOW_CLAMP`) and send buffer
/// the kernel allows, so the peers send little more and what the router holds drains.
pub fn hold(fd: BorrowedFd) -> io::Result<Held> {
    let held = Held {
        clamp: repair::window_clamp(fd)?,
        sndbuf: socket::get_int_opt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF)?,
    };
    repair::set_window_clamp(fd, 1)?; // raised to the kernel's minimum
    socket::set_int_opt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, 1)?;
    Ok(held)
}

/// Undoes [`hold`] (the kernel reports the send buffer doubled; halve it back).
pub fn unhold(fd: BorrowedFd, h: Held) {
    let _ = repair::set_window_clamp(fd, h.clamp);
    let _ = socket::set_int_opt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, h.sndbuf / 2);
}

/// Turns off the keepalive [`probe`] may have turned on.
pub fn no_keepalive(fd: BorrowedFd) {
    let _ = socket::set_int_opt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 0);
}

/// Freezes a quiet socket: no keepalive and no delayed ACK left (so no timer of theirs fires
/// later), then repair mode, and reads its numbers and its repair window. Then its TS clock
/// goes back by [`AGE`]: a socket in repair mode still runs TCP's receive path and ACKs what
/// reaches it, and a segment that passed the program before BLOCK can reach it after the
/// handoff's last check (delayed between tc ingress and TCP: a preempted CPU, seen under
/// qemu in the kernel matrix; a zero receive window does not stop it, as the header
/// prediction fast path accepts in-sequence data without looking at the window,
/// tcp_input.c tcp_rcv_established). Its peer must not believe that ACK — it would never
/// send those bytes again and the other peer would never get them — and PAWS makes sure it
/// does not, while the peer still answers the segment with its own ACK (the handoff's
/// window probes rely on that). Without timestamps on the connection this guard is absent.
pub fn freeze(fd: BorrowedFd) -> io::Result<(Frozen, Thaw)> {
    socket::set_int_opt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 0)?;
    repair::quickack(fd)?;
    let reuse = reuse_of(fd);
    repair::repair_on(fd)?;
    let read = || -> io::Result<(Frozen, Thaw)> {
        let (snd_nxt, rcv_nxt) = repair::queue_seqs(fd)?;
        let o = repair::options(fd)?;
        let frozen = Frozen {
            local: socket::local_addr(fd)?,
            peer: socket::peer_addr(fd)?,
            snd_nxt,
            rcv_nxt,
            ts_now: repair::ts_clock(fd)?,
            snd_wscale: o.snd_wscale,
            rcv_wscale: o.rcv_wscale,
            timestamps: o.options & repair::TCPI_OPT_TIMESTAMPS != 0,
        };
        let window = repair::repair_window(fd)?;
        repair::set_ts_clock(fd, frozen.ts_now.wrapping_sub(AGE))?;
        let usec = o.options & repair::TCPI_OPT_USEC_TS != 0;
        Ok((
            frozen,
            Thaw {
                window,
                reuse,
                usec,
            },
        ))
    };
    read().inspect_err(|_| {
        let _ = repair::repair_off(fd, Leave::Quiet);
        restore_reuse(fd, reuse);
    })
}

/// Makes a frozen socket's peer speak: leaving repair mode sends a window probe, which the
/// peer answers with an ACK carrying its window — through the splice, to the other peer,
/// which so learns at once the window it now talks to. Then back into repair mode.
pub fn kick(fd: BorrowedFd) -> io::Result<()> {
    repair::repair_off(fd, Leave::Probe)?;
    repair::repair_on(fd)
}

/// The safety net of a spliced socket: a zero receive window, so a stray segment that
/// still reaches it is dropped instead of acknowledged.
pub fn close_window(fd: BorrowedFd, rcv_nxt: u32) -> io::Result<()> {
    let w = repair::repair_window(fd)?;
    let snd_wl1 = match (w.snd_wl1.wrapping_sub(rcv_nxt) as i32) > 0 {
        true => rcv_nxt,
        false => w.snd_wl1,
    };
    let zero = RepairWindow {
        rcv_wnd: 0,
        rcv_wup: rcv_nxt,
        snd_wl1,
        ..w
    };
    repair::set_repair_window(fd, &zero)
}

/// Undoes [`freeze`]: the TS clock forward again (by 2 ms more than it went back, as a tick
/// may have passed between reading and setting it, and a clock that went back would fail
/// PAWS), the repair window as it was read, then out of repair mode without a probe,
/// `SO_REUSEADDR` as it was.
pub fn thaw(fd: BorrowedFd, t: &Thaw) {
    if let Ok(now) = repair::ts_clock(fd) {
        let margin = if t.usec { 2000 } else { 2 };
        let _ = repair::set_ts_clock(fd, now.wrapping_add(AGE + margin));
    }
    let _ = repair::set_repair_window(fd, &t.window);
    let _ = repair::repair_off(fd, Leave::Quiet);
    restore_reuse(fd, t.reuse);
}

/// Ends one leg of a spliced flow for its peer: the frozen socket leaves the connection
/// table silently, then a RST goes to `peer` from `local` at the numbers the program last
/// saw the peer use (`seen` of the entry keyed by the peer's packets).
pub fn reset(
    frozen: BorrowedFd,
    local: SocketAddr,
    peer: SocketAddr,
    seen: &Seen,
) -> io::Result<()> {
    socket::disconnect(frozen)?;
    repair::send_reset(local, peer, seen.ack_last, seen.seq_hi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpListener, TcpStream};
    use std::os::fd::AsFd;

    /// Asking for an ACK, and freezing then thawing, leave an accepted socket's
    /// SO_REUSEADDR as it was (the kernel clears it on the way out of repair mode, which kept
    /// a restarted ksocks from binding its port while such a socket sat in TIME_WAIT).
    #[test]
    fn leaving_repair_keeps_reuseaddr() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap(); // std sets SO_REUSEADDR
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        assert_eq!(reuse_of(s.as_fd()), 1);
        match ask_ack(s.as_fd()) {
            Err(e)
                if e.raw_os_error() == Some(libc::EPERM)
                    && std::env::var("CI").as_deref() != Ok("true") =>
            {
                return eprintln!("skipped: TCP_REPAIR needs CAP_NET_ADMIN");
            }
            other => other.unwrap(),
        }
        assert_eq!(reuse_of(s.as_fd()), 1, "after a probe");
        let (f, t) = freeze(s.as_fd()).unwrap();
        // Frozen, the TS clock is AGE behind; thawed, it is back and never behind.
        let behind = f.ts_now.wrapping_sub(repair::ts_clock(s.as_fd()).unwrap());
        assert!((AGE - 1000..=AGE + 1).contains(&behind), "{behind}");
        thaw(s.as_fd(), &t);
        let ahead = repair::ts_clock(s.as_fd()).unwrap().wrapping_sub(f.ts_now);
        assert!(ahead < 1000, "{ahead}");
        assert_eq!(reuse_of(s.as_fd()), 1, "after freeze and thaw");
        assert!(!repair::in_repair(s.as_fd()).unwrap());
    }
}
