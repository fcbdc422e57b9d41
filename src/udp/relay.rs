//! The per-datagram paths: a TPROXY listener's datagrams to their association's upstream, a
//! SOCKS client's datagrams from its relay socket to the upstream, and the upstream's
//! datagrams back to the client (through a reply socket bound to their source for TPROXY, on
//! the relay socket with a SOCKS5 header for SOCKS clients); ICMP errors on those sockets.
//!
//! Invariants: a datagram is received once into the shared buffer at `HEADROOM` and sent from
//! there, its header written in place in front of it or stripped by sending from further on;
//! nothing here allocates; a send that fails drops the datagram and counts it, except a hard
//! ICMP error, which ends the association (and so closes the socket that reported it).

use super::assoc::{Assoc, End, Inbound, Pending, Route};
use super::counters::Drops;
use super::table::{Id, Table};
use super::wire::{self, Format, HEADROOM};
use super::{control, Ctx, Sock, Udp, BURST, PENDING_TOTAL, W_REPLY};
use crate::socks5::{AddrRef, Dest};
use crate::sys::{epoll, socket, udp};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

/// What one failed send means.
enum Failed {
    /// Counted under this reason; the association goes on.
    Drop(fn(&mut Drops) -> &mut u64),
    /// A hard ICMP error: the association ends.
    Icmp(i32),
}

/// Errors that mean the peer cannot be reached at all (ICMP port/host/network unreachable,
/// parameter problem), as opposed to a full buffer, a too-big datagram or a TTL expiring.
pub(super) fn is_hard(errno: i32) -> bool {
    matches!(
        errno,
        libc::ECONNREFUSED
            | libc::EHOSTUNREACH
            | libc::ENETUNREACH
            | libc::EHOSTDOWN
            | libc::ENETDOWN
            | libc::EPROTO
    )
}

fn failure(e: &io::Error) -> Failed {
    match e.raw_os_error() {
        Some(libc::EAGAIN | libc::ENOBUFS) => Failed::Drop(|d| &mut d.full),
        Some(libc::EMSGSIZE) => Failed::Drop(|d| &mut d.too_big),
        Some(libc::EAFNOSUPPORT) => Failed::Drop(|d| &mut d.route),
        Some(n) if is_hard(n) => Failed::Icmp(n),
        _ => Failed::Drop(|d| &mut d.error),
    }
}

/// The hard ICMP error waiting on `fd`, if any, after clearing everything the kernel keeps
/// raising EPOLLERR for: the error queue of a socket with `IP_RECVERR` (`queued`, which also
/// tells soft errors apart: a TTL that expired, a path MTU) and the pending `SO_ERROR`.
pub(super) fn hard_error(fd: BorrowedFd, queued: bool) -> Option<i32> {
    let mut hard = None;
    for _ in 0..BURST {
        let Ok(Some(e)) = udp::recv_error(fd).map(|e| e.filter(|_| queued)) else {
            break;
        };
        // Origin 2/3 (SO_EE_ORIGIN_ICMP/ICMP6), RFC 792 type 11 and RFC 4443 type 3: time
        // exceeded, a routing problem on the way rather than a refusal.
        let expired = matches!((e.origin, e.icmp_type), (2, 11) | (3, 3));
        if hard.is_none() && !expired && is_hard(e.errno) {
            hard = Some(e.errno);
        }
    }
    if let Ok(Some(e)) = socket::take_error(fd) {
        let errno = e.raw_os_error().unwrap_or(0);
        if !queued && is_hard(errno) {
            hard.get_or_insert(errno);
        }
    }
    hard
}

/// Keeps a SOCKS5 datagram for when the upstream is ready, or counts it dropped. `budget` is
/// what all pending buffers hold; a new one is made only while it stays under
/// `PENDING_TOTAL`.
fn park(a: &mut Assoc, datagram: &[u8], drops: &mut Drops, budget: &mut usize) {
    if a.pending.is_none() {
        let p = Pending::for_first(datagram.len());
        if *budget + p.capacity() <= PENDING_TOTAL {
            *budget += p.capacity();
            a.pending = Some(Box::new(p));
        }
    }
    if !a.pending.as_mut().is_some_and(|p| p.push(datagram)) {
        drops.pending += 1;
        a.up.dropped += 1;
    }
}

/// The reply socket for datagrams from `src` (created on demand, bound transparently to it).
fn reply_socket(
    replies: &mut Table<SocketAddr, OwnedFd>,
    src: SocketAddr,
    mark: Option<u32>,
    now: Instant,
) -> io::Result<BorrowedFd<'_>> {
    let id = match replies.find(&src) {
        Some(id) => id,
        None => {
            let fd = udp::bind_transparent(&src)?;
            control::set_mark(fd.as_fd(), mark)?;
            let ins = replies
                .insert(src, fd, now)
                .map_err(|_| io::ErrorKind::AlreadyExists)?;
            ins.id
        }
    };
    let fd: &OwnedFd = replies.touch(id, now).ok_or(io::ErrorKind::NotFound)?;
    Ok(fd.as_fd())
}

impl Udp {
    /// Datagrams on TPROXY listener `i`.
    pub(super) fn on_listener(&mut self, cx: &mut Ctx, i: usize, now: Instant) {
        for _ in 0..BURST {
            let Some(l) = self.listeners.get_mut(i) else {
                return;
            };
            let r = match udp::recv_orig_dst(l.fd.as_fd(), &mut self.buf[HEADROOM..]) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.count.drops.error += 1;
                    return;
                }
            };
            if let Some(total) = r.kernel_drops {
                self.count.drops.kernel += u64::from(total.wrapping_sub(l.kernel_drops));
                l.kernel_drops = total;
            }
            let end = HEADROOM + r.len;
            let Some(dest) = r.orig_dst.filter(|_| end <= self.buf.len()) else {
                match r.orig_dst {
                    None => self.count.drops.no_dest += 1,
                    Some(_) => self.count.drops.truncated += 1,
                }
                continue;
            };
            if self.to_listener(&dest) {
                self.count.drops.r#loop += 1;
                continue;
            }
            let key = super::assoc::Key::Client(r.from);
            let id = match self.assocs.find(&key) {
                Some(id) => id,
                None => match self.open_tproxy(cx, r.from, dest, now) {
                    Some(id) => id,
                    None => continue,
                },
            };
            self.assocs.touch(id, now);
            self.forward_ip(id, dest, HEADROOM, end);
        }
    }

    /// Whether `dest` is one of our own UDP listeners (a rule that diverts ksocks to itself).
    fn to_listener(&self, dest: &SocketAddr) -> bool {
        self.listeners.iter().any(|l| {
            l.addr == *dest
                || (l.addr.port() == dest.port()
                    && l.addr.ip().is_unspecified()
                    && l.addr.is_ipv4() == dest.is_ipv4()
                    && socket::is_local_ip(dest.ip()))
        })
    }

    /// Sends a TPROXY client's payload (`buf[at..end]`, room for a header before `at`) to
    /// `dest` along its association's route.
    fn forward_ip(&mut self, id: Id, dest: SocketAddr, at: usize, end: usize) {
        let Some(a) = self.assocs.get_mut(id) else {
            return;
        };
        let format = match &a.route {
            Route::Socks5(_) => Some(Format::Socks5),
            Route::Shadowsocks => Some(Format::Shadowsocks),
            Route::Direct | Route::Resolving { .. } => None,
        };
        let to = Dest::Ip(dest);
        if a.waiting() {
            if !a.seen {
                a.note_dest(AddrRef::Ip(dest)); // for the close line, should it end waiting
            }
            if let Ok(start) = Format::Socks5.prepend(&mut self.buf, at, &to) {
                park(
                    a,
                    &self.buf[start..end],
                    &mut self.count.drops,
                    &mut self.pending_bytes,
                );
            }
            return;
        }
        let Some(up) = a.upstream.as_ref() else {
            self.count.drops.route += 1;
            a.up.dropped += 1;
            return;
        };
        let sent = match format {
            None => udp::send_to(up.as_fd(), &self.buf[at..end], &dest),
            Some(f) => match f.prepend(&mut self.buf, at, &to) {
                Ok(start) => socket::send(up.as_fd(), &self.buf[start..end]),
                Err(_) => Err(io::Error::from_raw_os_error(libc::EMSGSIZE)),
            },
        };
        a.note_dest(AddrRef::Ip(dest));
        self.settle_up(id, dest.port(), at, end, sent);
    }

    /// Sends a SOCKS5 UDP datagram (`buf[start..end]`: a client's, or one that waited) along
    /// its association's route: as is to a SOCKS5 relay, without RSV and FRAG to a
    /// shadowsocks server, its payload alone to the destination (direct; a name is looked up
    /// first, once per association).
    pub(super) fn forward_socks(&mut self, cx: &mut Ctx, id: Id, start: usize, end: usize) {
        let Some(a) = self.assocs.get_mut(id) else {
            return;
        };
        if a.waiting() {
            return park(
                a,
                &self.buf[start..end],
                &mut self.count.drops,
                &mut self.pending_bytes,
            );
        }
        let d = match Format::Socks5.parse(&self.buf[start..end]) {
            Ok(d) => d,
            Err(e) => {
                match e {
                    wire::Error::Fragment(_) => self.count.drops.fragment += 1,
                    _ => self.count.drops.header += 1,
                }
                a.up.dropped += 1;
                return;
            }
        };
        let at = start + d.header_len;
        let port = match d.addr {
            AddrRef::Ip(ip) => ip.port(),
            AddrRef::Domain(_, port) => port,
        };
        a.note_dest(d.addr);
        let sent = match (&a.route, d.addr) {
            (Route::Socks5(_) | Route::Shadowsocks | Route::Resolving { .. }, _) => {
                let from = match a.route {
                    Route::Shadowsocks => start + wire::SOCKS5_FIXED_LEN,
                    _ => start,
                };
                match a.upstream.as_ref() {
                    Some(up) => socket::send(up.as_fd(), &self.buf[from..end]),
                    None => Err(io::Error::from_raw_os_error(libc::ENOTCONN)),
                }
            }
            (Route::Direct, AddrRef::Ip(to)) => self.direct_send(cx.ep, id, to, at, end),
            (Route::Direct, AddrRef::Domain(name, port)) => {
                let token = Sock::Name(id).token();
                match control::lookup(a, name, port, cx.resolver, token) {
                    Some(Ok(ip)) => self.direct_send(cx.ep, id, SocketAddr::new(ip, port), at, end),
                    Some(Err(())) => {
                        self.count.drops.route += 1;
                        a.up.dropped += 1;
                        return;
                    }
                    None => {
                        let budget = &mut self.pending_bytes;
                        return park(a, &self.buf[start..end], &mut self.count.drops, budget);
                    }
                }
            }
        };
        self.settle_up(id, port, at, end, sent);
    }

    /// `sendto` on a direct association's socket, made with its first datagram (SOCKS
    /// clients) in that datagram's family.
    fn direct_send(
        &mut self,
        ep: &epoll::Epoll,
        id: Id,
        to: SocketAddr,
        at: usize,
        end: usize,
    ) -> io::Result<usize> {
        let a = self.assocs.get_mut(id).ok_or(io::ErrorKind::NotFound)?;
        if a.upstream.is_none() {
            let (fd, port) = control::open_direct(&to, self.set.mark)?;
            ep.add(fd.as_fd(), Sock::Up(id).token(), epoll::IN)?;
            self.ports.add(port);
            (a.upstream, a.up_port, a.up_v4) = (Some(fd), port, to.is_ipv4());
        } else if a.up_v4 != to.is_ipv4() {
            // The other family than the first destination's: this socket cannot reach it.
            return Err(io::Error::from_raw_os_error(libc::EAFNOSUPPORT));
        }
        let up = a.upstream.as_ref().ok_or(io::ErrorKind::NotFound)?;
        udp::send_to(up.as_fd(), &self.buf[at..end], &to)
    }

    /// Accounts for a datagram sent upstream (payload `buf[at..end]`) or not.
    fn settle_up(&mut self, id: Id, port: u16, at: usize, end: usize, sent: io::Result<usize>) {
        let Some(a) = self.assocs.get_mut(id) else {
            return;
        };
        let payload = &self.buf[at..end];
        let e = match sent {
            Ok(_) => {
                a.up.add(payload.len());
                a.dns.query(port, payload);
                return self.count.up(payload.len());
            }
            Err(e) => e,
        };
        a.up.dropped += 1;
        let queued = matches!(a.route, Route::Direct);
        let hard = match (failure(&e), a.upstream.as_ref()) {
            // A refusal of an earlier datagram, reported by this send (and then dropped).
            (Failed::Icmp(n), Some(up)) if queued => hard_error(up.as_fd(), true).or(Some(n)),
            (Failed::Icmp(n), _) => Some(n),
            (Failed::Drop(reason), _) => {
                *reason(&mut self.count.drops) += 1;
                None
            }
        };
        if let Some(errno) = hard {
            self.count.drops.error += 1;
            self.end(id, End::Icmp(errno));
        }
    }

    /// Datagrams (or an ICMP error) on association `id`'s upstream socket.
    pub(super) fn on_upstream(&mut self, id: Id, events: u32, now: Instant) {
        let queued = |a: &Assoc| matches!(a.route, Route::Direct);
        if events & epoll::ERR != 0 {
            let Some((_, a)) = self.assocs.get(id) else {
                return;
            };
            let hard = a
                .upstream
                .as_ref()
                .and_then(|u| hard_error(u.as_fd(), queued(a)));
            if let Some(errno) = hard {
                return self.end(id, End::Icmp(errno));
            }
        }
        for _ in 0..BURST {
            let Some(a) = self.assocs.get_mut(id) else {
                return;
            };
            let Some(up) = a.upstream.as_ref() else {
                return;
            };
            let (len, from) = match udp::recv_from(up.as_fd(), &mut self.buf[HEADROOM..]) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(0);
                    let hard = match queued(a) {
                        true => hard_error(up.as_fd(), true),
                        false => is_hard(errno).then_some(errno),
                    };
                    match hard {
                        Some(errno) => return self.end(id, End::Icmp(errno)),
                        None => continue,
                    }
                }
            };
            let end = HEADROOM + len;
            if end > self.buf.len() {
                self.count.drops.truncated += 1;
                a.down.dropped += 1;
                continue;
            }
            let format = match a.route {
                Route::Socks5(_) => Some(Format::Socks5),
                Route::Shadowsocks => Some(Format::Shadowsocks),
                Route::Direct | Route::Resolving { .. } => None,
            };
            // The source (an IP address, or none for a name, which only SOCKS clients can
            // take) and the payload.
            let (src, port, at) = match format.map(|f| f.parse(&self.buf[HEADROOM..end])) {
                None => (Some(from), from.port(), HEADROOM),
                Some(Ok(d)) => match d.addr {
                    AddrRef::Ip(ip) => (Some(ip), ip.port(), HEADROOM + d.header_len),
                    AddrRef::Domain(_, port) => (None, port, HEADROOM + d.header_len),
                },
                Some(Err(e)) => {
                    match e {
                        wire::Error::Fragment(_) => self.count.drops.fragment += 1,
                        _ => self.count.drops.header += 1,
                    }
                    a.down.dropped += 1;
                    continue;
                }
            };
            self.assocs.touch(id, now);
            if let Some(why) = self.deliver(id, src, from, port, at, end, now) {
                return self.end(id, why);
            }
        }
    }

    /// Sends a datagram from upstream (payload `buf[at..end]`, from `src`, received on the
    /// upstream socket from `from`) to its client; `Some` when the association ends.
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &mut self,
        id: Id,
        src: Option<SocketAddr>,
        from: SocketAddr,
        port: u16,
        at: usize,
        end: usize,
        now: Instant,
    ) -> Option<End> {
        let a = self.assocs.get_mut(id)?;
        let client = a.client;
        let sent = match &a.inbound {
            Inbound::Tproxy => {
                let Some(src) = src else {
                    self.count.drops.header += 1;
                    a.down.dropped += 1;
                    return None;
                };
                match reply_socket(&mut self.replies, src, self.set.mark, now) {
                    Ok(fd) => udp::send_to(fd, &self.buf[at..end], &client),
                    Err(e) => {
                        self.count.drops.reply += 1;
                        a.down.dropped += 1;
                        let serial = a.serial;
                        self.warn_once(
                            W_REPLY,
                            format_args!(
                                "#u{serial} {client}: no reply socket for {src} ({e}: replies from a foreign address need CAP_NET_RAW or CAP_NET_ADMIN (IP_TRANSPARENT), below port 1024 CAP_NET_BIND_SERVICE too, and a port not taken by a local service without SO_REUSEADDR)"
                            ),
                        );
                        return None;
                    }
                }
            }
            Inbound::Socks(s) => {
                if client.port() == 0 {
                    // Nothing from the client yet: nowhere to send it.
                    self.count.drops.stranger += 1;
                    a.down.dropped += 1;
                    return None;
                }
                let start = match &a.route {
                    Route::Socks5(_) => Ok(HEADROOM),
                    Route::Shadowsocks => {
                        let start = HEADROOM - wire::SOCKS5_FIXED_LEN;
                        self.buf[start..HEADROOM].fill(0);
                        Ok(start)
                    }
                    Route::Direct => Format::Socks5.prepend(&mut self.buf, HEADROOM, &from.into()),
                    Route::Resolving { .. } => Err(wire::Error::NoRoom), // nothing came from it
                };
                match start {
                    Ok(start) => udp::send_to(s.relay.as_fd(), &self.buf[start..end], &client),
                    Err(_) => Err(io::Error::from_raw_os_error(libc::EMSGSIZE)),
                }
            }
        };
        let payload = &self.buf[at..end];
        match sent {
            Ok(_) => {
                a.down.add(payload.len());
                self.count.down(payload.len());
                a.dns.answer(port, payload).then_some(End::Answered)
            }
            Err(e) => {
                a.down.dropped += 1;
                match failure(&e) {
                    Failed::Drop(reason) => {
                        *reason(&mut self.count.drops) += 1;
                        None
                    }
                    Failed::Icmp(errno) => {
                        self.count.drops.error += 1;
                        Some(End::Icmp(errno))
                    }
                }
            }
        }
    }

    /// Datagrams (or an ICMP error from the client) on a SOCKS client's relay socket.
    pub(super) fn on_relay(&mut self, cx: &mut Ctx, id: Id, events: u32, now: Instant) {
        if events & epoll::ERR != 0 {
            let hard = match self.assocs.get(id) {
                Some((
                    _,
                    Assoc {
                        inbound: Inbound::Socks(s),
                        ..
                    },
                )) => hard_error(s.relay.as_fd(), false),
                _ => None,
            };
            if let Some(errno) = hard {
                return self.end(id, End::Icmp(errno));
            }
        }
        for _ in 0..BURST {
            let Some(a) = self.assocs.get_mut(id) else {
                return;
            };
            let Inbound::Socks(s) = &a.inbound else {
                return;
            };
            let (len, from) = match udp::recv_from(s.relay.as_fd(), &mut self.buf[HEADROOM..]) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => match e.raw_os_error().filter(|n| is_hard(*n)) {
                    Some(errno) => return self.end(id, End::Icmp(errno)),
                    None => continue,
                },
            };
            // Only the client: its control connection's IP, and its port once known (then
            // the socket is connected and the kernel turns others away).
            if a.client.port() == 0 && from.ip() == a.client.ip() {
                a.client = from;
                let _ = socket::connect(s.relay.as_fd(), &from);
            } else if from != a.client {
                self.count.drops.stranger += 1;
                continue;
            }
            let end = HEADROOM + len;
            if end > self.buf.len() {
                self.count.drops.truncated += 1;
                a.up.dropped += 1;
                continue;
            }
            self.assocs.touch(id, now);
            self.forward_socks(cx, id, HEADROOM, end);
        }
    }

    /// Sends what waited for the upstream (a handshake done, a name resolved), in order, and
    /// frees the buffer it waited in.
    pub(super) fn flush_pending(&mut self, cx: &mut Ctx, id: Id) {
        let Some(pending) = self.assocs.get_mut(id).and_then(|a| a.pending.take()) else {
            return;
        };
        self.pending_bytes -= pending.capacity();
        for datagram in pending.iter() {
            let end = HEADROOM + datagram.len();
            self.buf[HEADROOM..end].copy_from_slice(datagram);
            self.forward_socks(cx, id, HEADROOM, end);
        }
    }

    /// Drops what waited (counted `route`): the name it waited for did not resolve.
    pub(super) fn drop_pending(&mut self, id: Id) {
        if let Some(p) = self.assocs.get_mut(id).and_then(|a| {
            let p = a.pending.take()?;
            a.up.dropped += p.len() as u64;
            Some(p)
        }) {
            self.count.drops.route += p.len() as u64;
            self.pending_bytes -= p.capacity();
        }
    }
}
