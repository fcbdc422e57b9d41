//! One proxied connection: client socket, upstream socket, and where it is in its life:
//! connect -> relay (copy, splice or sockmap) -> close.
//!
//! Invariant: a connection is freed only when both directions are finished (each saw end of
//! stream and passed it on), or at once when either side resets or fails — then the other side
//! is reset too, so no peer waits on a half-dead connection and no socket lingers in CLOSE_WAIT.

use crate::cli::ListenerKind;
use crate::handshake::{SocksClient, SocksServer};
use crate::relay::{Broken, Flow};
use crate::sockmap::Spliced;
use crate::socks5::Dest;
use crate::sys::{epoll, socket};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client = 0,
    Upstream = 1,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }

    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }
}

/// Why a connection ended; printed as `end=...` in the close line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Both directions finished normally.
    Done,
    ClientReset,
    UpstreamReset,
    Refused,
    Unreachable,
    Timeout,
    Idle,
    Loop,
    NoDestination,
    Shutdown,
    Error,
}

impl End {
    /// Whether the surviving sockets are reset (`SO_LINGER` 0) rather than closed with a FIN.
    pub fn resets(self) -> bool {
        matches!(
            self,
            End::ClientReset | End::UpstreamReset | End::Refused | End::Error
        )
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            End::Done => "done",
            End::ClientReset => "client-reset",
            End::UpstreamReset => "upstream-reset",
            End::Refused => "refused",
            End::Unreachable => "unreachable",
            End::Timeout => "timeout",
            End::Idle => "idle",
            End::Loop => "loop",
            End::NoDestination => "no-destination",
            End::Shutdown => "shutdown",
            End::Error => "error",
        })
    }
}

/// Classifies a failed non-blocking connect.
pub fn connect_end(err: &io::Error) -> End {
    match err.raw_os_error() {
        Some(libc::ECONNREFUSED) => End::Refused,
        Some(libc::ETIMEDOUT) => End::Timeout,
        Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EHOSTDOWN | libc::ENETDOWN) => {
            End::Unreachable
        }
        _ => End::Error,
    }
}

/// A socket and what epoll currently watches on it.
pub struct Sock {
    pub fd: OwnedFd,
    /// Mask registered with epoll; `None` when not registered.
    registered: Option<u32>,
    /// EPOLLHUP was seen: both directions of this socket are shut, it will never report
    /// anything new, and keeping it registered would make level-triggered epoll spin.
    pub hup: bool,
}

impl Sock {
    pub fn new(fd: OwnedFd) -> Sock {
        Sock {
            fd,
            registered: None,
            hup: false,
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Brings the epoll registration in line with `mask`. A socket stays registered with an
    /// empty mask so that errors (EPOLLERR) are still reported, unless it has hung up.
    pub fn watch(&mut self, ep: &epoll::Epoll, token: u64, mask: u32) -> io::Result<()> {
        match self.registered {
            Some(_) if self.hup && mask == 0 => {
                ep.delete(self.fd())?;
                self.registered = None;
            }
            Some(current) if current != mask => {
                ep.modify(self.fd(), token, mask)?;
                self.registered = Some(mask);
            }
            None if !(self.hup && mask == 0) => {
                ep.add(self.fd(), token, mask)?;
                self.registered = Some(mask);
            }
            _ => {}
        }
        Ok(())
    }
}

pub enum Phase {
    /// SOCKS5 server handshake with the client (`--socks`).
    Socks,
    /// Waiting for the resolver (a SOCKS5 request for a domain name, direct upstream).
    Resolving,
    /// Waiting for the upstream connect to finish.
    Connecting,
    /// SOCKS5 handshake with the upstream proxy (`--upstream socks5://`).
    Proxy,
    /// Writing the last handshake bytes (the SOCKS reply, early payload) before the data plane.
    Flushing,
    /// Userspace data plane: both directions as `Flow`s ([up, down]).
    Relay([Flow; 2]),
    /// Kernel data plane.
    Sockmap(Box<Spliced>),
}

/// Handshake state, dropped when the data plane starts.
#[derive(Default)]
pub struct Handshake {
    pub server: Option<SocksServer>,
    pub client: Option<SocksClient>,
    /// Bytes read from [client, upstream] and not yet consumed.
    pub input: [Vec<u8>; 2],
    /// Bytes to write to [client, upstream].
    pub output: [Vec<u8>; 2],
    /// Bytes read from [client, upstream] during the handshake, protocol and early payload.
    pub read: [u64; 2],
}

pub struct Conn {
    pub id: u64,
    pub inbound: ListenerKind,
    pub client: Sock,
    /// `None` until the destination is known (SOCKS5 handshake, name lookup).
    pub upstream: Option<Sock>,
    pub client_addr: SocketAddr,
    /// Where the client wants to go; a name until resolved, "?" before a SOCKS request.
    pub dest: Dest,
    pub phase: Phase,
    /// Handshake, resolve and connect deadline.
    pub deadline: Option<Instant>,
    pub hs: Option<Box<Handshake>>,
    /// Payload bytes forwarded during the handshake [up, down], counted in the close line.
    pub pre: [u64; 2],
    /// A SOCKS5 failure reply was sent: close with a FIN so the client can read it.
    pub replied: bool,
    pub started: Instant,
    pub last_active: Instant,
    /// Byte totals last seen, to notice activity for the idle timeout.
    pub seen_bytes: u64,
    /// The upstream socket's local port once connecting (0 before), for the proxy-loop check.
    pub up_port: u16,
}

/// The plane a connection is on, for stats and the close line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlaneKind {
    Connecting,
    Copy,
    Splice,
    Sockmap,
}

impl fmt::Display for PlaneKind {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            PlaneKind::Connecting => "none",
            PlaneKind::Copy => "copy",
            PlaneKind::Splice => "splice",
            PlaneKind::Sockmap => "sockmap",
        })
    }
}

impl Conn {
    /// The socket of `side`; the upstream one exists in every phase that has events for it.
    pub fn sock(&mut self, side: Side) -> &mut Sock {
        match side {
            Side::Client => &mut self.client,
            Side::Upstream => self
                .upstream
                .as_mut()
                .expect("upstream socket exists once connecting"),
        }
    }

    pub fn up(&self) -> &Sock {
        self.upstream
            .as_ref()
            .expect("upstream socket exists once connecting")
    }

    pub fn hs(&mut self) -> &mut Handshake {
        self.hs.get_or_insert_with(Default::default)
    }

    /// Bytes moved (client -> upstream, upstream -> client).
    pub fn bytes(&self, off: Option<&crate::offload::Offload>) -> (u64, u64) {
        let (up, down) = match &self.phase {
            Phase::Relay([up, down]) => (up.written, down.written),
            Phase::Sockmap(s) => s.bytes(off),
            _ => (0, 0),
        };
        (up + self.pre[0], down + self.pre[1])
    }

    pub fn plane(&self) -> PlaneKind {
        match &self.phase {
            Phase::Relay([up, _]) if up.is_splice() => PlaneKind::Splice,
            Phase::Relay(_) => PlaneKind::Copy,
            Phase::Sockmap(_) => PlaneKind::Sockmap,
            _ => PlaneKind::Connecting,
        }
    }

    /// Whether both directions are finished.
    pub fn finished(&self) -> bool {
        match &self.phase {
            Phase::Relay([up, down]) => up.shut && down.shut,
            Phase::Sockmap(s) => s.finished(),
            _ => false,
        }
    }

    /// Handles readiness of one side on the userspace planes. Returns an end when the
    /// connection must be torn down.
    pub fn relay_event(&mut self, side: Side, events: u32) -> Option<End> {
        if events & epoll::HUP != 0 {
            self.sock(side).hup = true;
        }
        let Phase::Relay(flows) = &mut self.phase else {
            return None;
        };
        let (c, u) = (
            self.client.fd(),
            self.upstream
                .as_ref()
                .expect("relaying needs an upstream")
                .fd(),
        );
        if events & epoll::ERR != 0 {
            let fd = if side == Side::Client { c } else { u };
            if let Ok(Some(_)) = socket::take_error(fd) {
                return Some(reset_of(side));
            }
        }
        let [up, down] = flows;
        // Readable (or hung up: read returns what is left, then 0) -> pump out of this side;
        // writable -> pump into it. Both flows are cheap to try when they cannot move.
        let (from_side, to_side) = match side {
            Side::Client => (&mut *up, &mut *down),
            Side::Upstream => (&mut *down, &mut *up),
        };
        let (src, dst) = match side {
            Side::Client => (c, u),
            Side::Upstream => (u, c),
        };
        let mut progress = false;
        if events & (epoll::IN | epoll::HUP | epoll::ERR) != 0 {
            match from_side.pump(src, dst) {
                Ok(p) => progress |= p,
                Err(b) => return Some(broken_end(side, b)),
            }
        }
        if events & epoll::OUT != 0 {
            match to_side.pump(dst, src) {
                Ok(p) => progress |= p,
                Err(b) => return Some(broken_end(side.other(), b)),
            }
        }
        if progress {
            self.last_active = Instant::now();
        }
        None
    }

    /// The epoll masks the userspace planes need now: (client, upstream).
    pub fn relay_masks(&self) -> (u32, u32) {
        let Phase::Relay([up, down]) = &self.phase else {
            return (0, 0);
        };
        let mask = |reads: &Flow, writes: &Flow| {
            (if reads.wants_read() { epoll::IN } else { 0 })
                | (if writes.wants_write() { epoll::OUT } else { 0 })
        };
        (mask(up, down), mask(down, up))
    }
}

pub fn reset_of(side: Side) -> End {
    match side {
        Side::Client => End::ClientReset,
        Side::Upstream => End::UpstreamReset,
    }
}

/// Maps a broken flow whose source is `src_side` to the end it causes.
pub fn broken_end(src_side: Side, broken: Broken) -> End {
    match broken {
        Broken::Src(_) => reset_of(src_side),
        Broken::Dst(_) => reset_of(src_side.other()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn tcp_pair() -> (OwnedFd, OwnedFd) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a.into(), b.into())
    }

    fn relay_conn(client: OwnedFd, upstream: OwnedFd) -> Conn {
        let now = Instant::now();
        Conn {
            id: 1,
            inbound: ListenerKind::Redirect,
            client: Sock::new(client),
            upstream: Some(Sock::new(upstream)),
            client_addr: "127.0.0.1:1".parse().unwrap(),
            dest: Dest::Ip("127.0.0.1:2".parse().unwrap()),
            phase: Phase::Relay([Flow::copy(1024), Flow::copy(1024)]),
            deadline: None,
            hs: None,
            pre: [0, 0],
            replied: false,
            started: now,
            last_active: now,
            seen_bytes: 0,
            up_port: 0,
        }
    }

    /// A fresh relay reads both sides and writes neither; after a client FIN is passed on the
    /// client is no longer read, and the connection is finished only when both directions are.
    #[test]
    fn relay_transitions() {
        let (peer_c, client) = tcp_pair();
        let (upstream, peer_u) = tcp_pair();
        let mut conn = relay_conn(client, upstream);
        assert_eq!(conn.relay_masks(), (epoll::IN, epoll::IN));
        assert_eq!(conn.plane(), PlaneKind::Copy);
        socket::send(peer_c.as_fd(), b"hello").unwrap();
        socket::shutdown_write(peer_c.as_fd()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(conn.relay_event(Side::Client, epoll::IN), None);
        assert_eq!(
            conn.relay_masks(),
            (0, epoll::IN),
            "client EOF passed on: only upstream is read"
        );
        assert!(!conn.finished());
        let mut buf = [0u8; 16];
        assert_eq!(socket::recv(peer_u.as_fd(), &mut buf).unwrap(), 5);
        socket::shutdown_write(peer_u.as_fd()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(conn.relay_event(Side::Upstream, epoll::IN), None);
        assert!(conn.finished());
        assert_eq!(conn.bytes(None), (5, 0));
    }

    /// A reset from the upstream is reported as such, so the client gets a reset too.
    #[test]
    fn relay_reports_upstream_reset() {
        let (_peer_c, client) = tcp_pair();
        let (upstream, peer_u) = tcp_pair();
        let mut conn = relay_conn(client, upstream);
        socket::set_linger_zero(peer_u.as_fd()).unwrap();
        drop(peer_u);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(
            conn.relay_event(Side::Upstream, epoll::IN | epoll::ERR),
            Some(End::UpstreamReset)
        );
    }

    /// Registration follows the mask, and a hung-up socket with nothing to wait for leaves
    /// epoll (level-triggered EPOLLHUP would otherwise spin the loop).
    #[test]
    fn watch_registers_and_leaves_on_hup() {
        let ep = epoll::Epoll::new(8).unwrap();
        let (a, _b) = tcp_pair();
        let mut s = Sock::new(a);
        s.watch(&ep, 1, 0).unwrap();
        assert_eq!(
            s.registered,
            Some(0),
            "registered with no interest still reports errors"
        );
        s.watch(&ep, 1, epoll::IN).unwrap();
        assert_eq!(s.registered, Some(epoll::IN));
        s.hup = true;
        s.watch(&ep, 1, 0).unwrap();
        assert_eq!(s.registered, None);
        s.watch(&ep, 1, epoll::OUT).unwrap();
        assert_eq!(s.registered, Some(epoll::OUT));
    }

    /// Connect failures map to the documented ends.
    #[test]
    fn connect_errors_are_classified() {
        let end = |e| connect_end(&io::Error::from_raw_os_error(e));
        assert_eq!(end(libc::ECONNREFUSED), End::Refused);
        assert_eq!(end(libc::EHOSTUNREACH), End::Unreachable);
        assert_eq!(end(libc::ENETUNREACH), End::Unreachable);
        assert_eq!(end(libc::ETIMEDOUT), End::Timeout);
        assert_eq!(end(libc::EACCES), End::Error);
    }

    /// Only abnormal ends reset the surviving side.
    #[test]
    fn which_ends_reset() {
        assert!(End::ClientReset.resets() && End::UpstreamReset.resets() && End::Refused.resets());
        assert!(!End::Done.resets() && !End::Timeout.resets() && !End::Idle.resets());
    }

    /// A broken flow blames the right side: a read failure is the source's reset, a write
    /// failure the destination's.
    #[test]
    fn broken_flow_blames_the_right_side() {
        let e = || io::Error::from_raw_os_error(libc::ECONNRESET);
        assert_eq!(broken_end(Side::Client, Broken::Src(e())), End::ClientReset);
        assert_eq!(
            broken_end(Side::Client, Broken::Dst(e())),
            End::UpstreamReset
        );
        assert_eq!(
            broken_end(Side::Upstream, Broken::Src(e())),
            End::UpstreamReset
        );
        assert_eq!(
            broken_end(Side::Upstream, Broken::Dst(e())),
            End::ClientReset
        );
    }
}
