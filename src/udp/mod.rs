//! The UDP module, beside the TCP planes: datagrams diverted by TPROXY (`--udp-tproxy`) and
//! SOCKS5 UDP ASSOCIATE (`--socks`), relayed direct, through a SOCKS5 server's UDP relay, or
//! to a shadowsocks server without encryption. docs/UDP.md has the design.
//!
//! The event loop drives it through a small interface: [`Udp::event`] for readiness of its
//! sockets (one token kind, `Token::Udp`, whose bits only this module reads), [`Udp::adopt`]
//! for a SOCKS5 control connection whose client asked for UDP ASSOCIATE, [`Udp::resolved`]
//! and [`Udp::upstream_resolved`] for name lookups (a SOCKS client's; the upstream proxy's,
//! through the loop's `Target`), [`Udp::deadline`]/[`Udp::expire`] for idle and handshake
//! timers, [`Udp::stats`] for the stats line, [`Udp::shutdown`] at exit. Each call that may
//! open sockets borrows what it needs of the loop in a [`Ctx`].
//!
//! - [`relay`]: the per-datagram paths; [`control`]: opening associations, the SOCKS client's
//!   control connection, name lookups; [`socks_up`]: our UDP ASSOCIATE to a `socks5://` proxy;
//! - [`wire`]: the SOCKS5 and shadowsocks datagram headers; [`dns`]: ending DNS exchanges
//!   early; [`table`]: the bounded table with idle expiry; [`assoc`]: its values;
//!   [`counters`]: the stats; the socket calls live in `sys::udp`.
//!
//! Invariants: nothing on the per-datagram path allocates (one receive buffer for everything;
//! headers are written in place in front of the payload); at most `--udp-max` associations
//! and as many reply sockets exist; every datagram is relayed or dropped and counted, never
//! queued beyond the small pending buffers (bounded in sum) of associations whose upstream
//! is not ready yet; an association's sockets close with
//! it, so an error the kernel keeps raising (EPOLLERR) can never spin the loop.

pub mod assoc;
mod control;
pub mod counters;
pub mod dns;
mod relay;
mod socks_up;
pub mod table;
pub mod wire;

use crate::cli::Config;
use crate::loops::UpPorts;
use crate::resolve::Resolver;
use crate::sys::{self, epoll, socket, udp};
use crate::target::Target;
use crate::token::Token;
use crate::upstream::Upstream;
use crate::{error, info};
use assoc::{Assoc, End, Key};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};
use table::{Id, Table};
use wire::HEADROOM;

/// Datagrams handled per readiness event of one socket, so a flood on one socket cannot
/// starve the others (level-triggered: the rest is read next round).
const BURST: usize = 64;
/// TPROXY listeners' receive buffer: about 40 full-size (64 KiB) datagrams, or thousands of
/// small ones (the default 208 KiB holds two large ones).
const LISTEN_RCVBUF: usize = 4 << 20;
/// `warn_once` kinds: no reply socket, no upstream socket, a proxy loop.
const W_REPLY: u8 = 1;
const W_OPEN: u8 = 2;
const W_LOOP: u8 = 4;
/// What all associations' pending buffers may hold together (datagrams waiting for a
/// `socks5://` handshake or a name): 16 full-size datagrams, or thousands of small ones.
const PENDING_TOTAL: usize = 1 << 20;

/// What a UDP token names: the low 56 bits are a listener index or an association [`Id`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sock {
    Listener(usize),
    /// The association's upstream UDP socket.
    Up(Id),
    /// Our TCP control connection to a `socks5://` upstream.
    UpControl(Id),
    /// The SOCKS client's TCP control connection.
    Control(Id),
    /// The UDP socket facing a SOCKS client.
    Relay(Id),
    /// A name lookup for the association (the resolver's answer carries the token).
    Name(Id),
    /// The association waits for the upstream proxy's name (the loop's `Target` queue).
    Target(Id),
}

/// What the UDP module borrows from the event loop for one call.
pub struct Ctx<'a> {
    pub ep: &'a epoll::Epoll,
    /// The resolver thread, when one runs (a SOCKS client's names, the upstream's name).
    pub resolver: Option<&'a Resolver>,
    /// The upstream proxy's address, `None` for direct.
    pub target: Option<&'a mut Target>,
}

impl<'a> Ctx<'a> {
    pub fn new(
        ep: &'a epoll::Epoll,
        resolver: Option<&'a Resolver>,
        target: Option<&'a mut Target>,
    ) -> Ctx<'a> {
        Ctx {
            ep,
            resolver,
            target,
        }
    }
}

const SUB_SHIFT: u32 = 56;

impl Sock {
    fn token(self) -> u64 {
        let (sub, low) = match self {
            Sock::Listener(i) => (1, i as u64),
            Sock::Up(id) => (2, id.to_u64()),
            Sock::UpControl(id) => (3, id.to_u64()),
            Sock::Control(id) => (4, id.to_u64()),
            Sock::Relay(id) => (5, id.to_u64()),
            Sock::Name(id) => (6, id.to_u64()),
            Sock::Target(id) => (7, id.to_u64()),
        };
        Token::Udp(sub << SUB_SHIFT | (low & ((1 << SUB_SHIFT) - 1))).encode()
    }

    /// The socket a loop token names, if it is a UDP one.
    fn from_token(token: u64) -> Option<Sock> {
        match Token::decode(token) {
            Some(Token::Udp(low)) => Sock::decode(low),
            _ => None,
        }
    }

    fn decode(v: u64) -> Option<Sock> {
        let low = v & ((1 << SUB_SHIFT) - 1);
        let id = Id::from_u64(low);
        Some(match v >> SUB_SHIFT {
            1 => Sock::Listener(low as usize),
            2 => Sock::Up(id),
            3 => Sock::UpControl(id),
            4 => Sock::Control(id),
            5 => Sock::Relay(id),
            6 => Sock::Name(id),
            7 => Sock::Target(id),
            _ => return None,
        })
    }
}

/// A `--udp-tproxy` socket.
struct Listener {
    fd: OwnedFd,
    addr: SocketAddr,
    /// The kernel's drop count last seen (`SO_RXQ_OVFL` is a running total).
    kernel_drops: u32,
}

/// What every association needs to know of the configuration.
struct Settings {
    upstream: Upstream,
    mark: Option<u32>,
    connect_timeout: Duration,
}

pub struct Udp {
    listeners: Vec<Listener>,
    assocs: Table<Key, Assoc>,
    /// Reply sockets, bound transparently to a server's address:port and shared by every
    /// TPROXY client it answers.
    replies: Table<SocketAddr, OwnedFd>,
    /// `HEADROOM` bytes for a header, then room for the largest datagram.
    buf: Box<[u8]>,
    set: Settings,
    count: counters::Counters,
    next_serial: u64,
    /// `socks5://` handshakes' deadlines in start order (all have the same timeout).
    handshakes: VecDeque<(Instant, Id)>,
    /// Local ports of upstream sockets, to recognise our own datagrams diverted back to us.
    ports: UpPorts,
    /// One error line per kind of failure; later ones are only counted.
    warned: u8,
    /// Bytes allocated by pending buffers, at most `PENDING_TOTAL`.
    pending_bytes: usize,
}

/// Binds one `--udp-tproxy` socket: transparent, original destinations and kernel drop counts
/// with each datagram, a large receive buffer.
fn listen(addr: SocketAddr) -> io::Result<Listener> {
    let fd = udp::socket(&addr)?;
    let s = fd.as_fd();
    socket::set_int_opt(s, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    udp::set_transparent(s, addr.is_ipv6())?;
    udp::set_recv_orig_dst(s, addr.is_ipv6())?;
    udp::set_rxq_ovfl(s)?;
    udp::set_rcvbuf(s, LISTEN_RCVBUF)?;
    socket::bind(s, &addr)?;
    let addr = socket::local_addr(s)?;
    Ok(Listener {
        fd,
        addr,
        kernel_drops: 0,
    })
}

impl Udp {
    /// Binds the `--udp-tproxy` listeners (at start-up, before privileges are dropped).
    pub fn bind(cfg: &Config) -> Result<Udp, String> {
        let mut listeners = Vec::new();
        for &addr in &cfg.udp_listeners {
            let l =
                listen(addr).map_err(|e| format!("cannot listen (udp-tproxy) on {addr}: {e}"))?;
            listeners.push(l);
        }
        Ok(Udp {
            listeners,
            assocs: Table::new(cfg.udp_max, cfg.udp_timeout),
            replies: Table::new(cfg.udp_max, cfg.udp_timeout),
            buf: vec![0; HEADROOM + udp::MAX_DATAGRAM].into_boxed_slice(),
            set: Settings {
                upstream: cfg.upstream.clone(),
                mark: cfg.mark,
                connect_timeout: cfg.connect_timeout,
            },
            count: counters::Counters::default(),
            next_serial: 1,
            handshakes: VecDeque::new(),
            ports: UpPorts::default(),
            warned: 0,
            pending_bytes: 0,
        })
    }

    /// The listeners' addresses, for the start-up lines.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.listeners.iter().map(|l| l.addr)
    }

    /// Capabilities needed after start-up, kept by `--user` (`sys::cap`): replies to TPROXY
    /// clients leave from sockets bound transparently to the servers' addresses and ports,
    /// made as servers answer (IP_TRANSPARENT wants CAP_NET_RAW or CAP_NET_ADMIN, and so does
    /// SO_MARK; a port below 1024, DNS's 53 say, wants CAP_NET_BIND_SERVICE).
    pub fn capabilities(&self) -> &'static [u32] {
        match self.listeners.is_empty() {
            true => &[],
            false => &[sys::cap::NET_RAW, sys::cap::NET_BIND_SERVICE],
        }
    }

    /// Registers the listeners with the loop's epoll.
    pub fn start(&self, ep: &epoll::Epoll) -> io::Result<()> {
        for (i, l) in self.listeners.iter().enumerate() {
            ep.add(l.fd.as_fd(), Sock::Listener(i).token(), epoll::IN)?;
        }
        Ok(())
    }

    /// Readiness of one of this module's sockets (`token`: a `Token::Udp`).
    pub fn event(&mut self, mut cx: Ctx, token: u64, events: u32) {
        let now = Instant::now();
        match Sock::from_token(token) {
            Some(Sock::Listener(i)) => self.on_listener(&mut cx, i, now),
            Some(Sock::Up(id)) => self.on_upstream(id, events, now),
            Some(Sock::Relay(id)) => self.on_relay(&mut cx, id, events, now),
            Some(Sock::Control(id)) => self.on_control(id),
            Some(Sock::UpControl(id)) => self.on_up_control(&mut cx, id, events, now),
            Some(Sock::Name(_) | Sock::Target(_)) | None => {}
        }
    }

    /// When the next association or reply socket expires, or a handshake times out.
    pub fn deadline(&self) -> Option<Instant> {
        [
            self.assocs.deadline(),
            self.replies.deadline(),
            self.handshakes.front().map(|h| h.0),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Ends what is idle or timed out at `now`.
    pub fn expire(&mut self, now: Instant) {
        while let Some((_, a)) = self.assocs.pop_expired(now) {
            self.finish(a, End::Idle);
        }
        while self.replies.pop_expired(now).is_some() {}
        while let Some(&(t, id)) = self.handshakes.front() {
            if t > now {
                break;
            }
            self.handshakes.pop_front();
            if let Some((_, a)) = self.assocs.get(id).filter(|(_, a)| a.waiting()) {
                error!(
                    "#u{} {} -> {}: upstream UDP ASSOCIATE: timed out",
                    a.serial, a.client, a.dest
                );
                self.end(id, End::Timeout);
            }
        }
    }

    /// The UDP fields of the stats line.
    pub fn stats(&self) -> counters::Line<'_> {
        counters::Line {
            counters: &self.count,
            live: self.assocs.len(),
            peak: self.assocs.stats().peak,
            reply_sockets: self.replies.len(),
        }
    }

    /// Ends every association (ksocks is exiting).
    pub fn shutdown(&mut self) {
        let ids: Vec<Id> = self.assocs.iter().map(|(id, ..)| id).collect();
        for id in ids {
            self.end(id, End::Shutdown);
        }
    }

    /// Ends association `id` (if it still exists).
    fn end(&mut self, id: Id, why: End) {
        if let Some((_, a)) = self.assocs.remove(id) {
            self.finish(a, why);
        }
    }

    /// Counts and logs an association's end; its sockets close as it is dropped here.
    fn finish(&mut self, a: Assoc, why: End) {
        self.count.ended(why);
        if let Some(p) = &a.pending {
            self.pending_bytes -= p.capacity();
        }
        if a.up_port != 0 {
            self.ports.remove(a.up_port);
        }
        let inbound = match a.inbound {
            assoc::Inbound::Tproxy => "tproxy",
            assoc::Inbound::Socks(_) => "socks",
        };
        info!(
            "#u{} {} -> {} closed: plane=udp in={inbound} via={} up_dgrams={} up={} down_dgrams={} down={} drops_up={} drops_down={} others={} time={:.3}s end={why}",
            a.serial,
            a.client,
            a.dest,
            a.route.name(),
            a.up.datagrams,
            a.up.bytes,
            a.down.datagrams,
            a.down.bytes,
            a.up.dropped,
            a.down.dropped,
            a.others,
            a.started.elapsed().as_secs_f64(),
        );
    }

    /// Adds an association, ending (and logging) the least recently active one when the
    /// table is full. `None` when the key exists already (the caller found nothing: cannot
    /// happen, but is not worth a panic).
    fn insert(&mut self, key: Key, a: Assoc, now: Instant) -> Option<Id> {
        let ins = self.assocs.insert(key, a, now).ok()?;
        self.count.created += 1;
        if let Some((_, old)) = ins.evicted {
            self.finish(old, End::Evicted);
        }
        Some(ins.id)
    }

    /// Logs the first failure of a kind (a bit of `warned`) as an error line; later ones are
    /// only counted, so a flood cannot flood the log.
    fn warn_once(&mut self, kind: u8, what: std::fmt::Arguments) {
        if self.warned & kind == 0 {
            self.warned |= kind;
            error!("{what} (further ones are only counted in the stats line)");
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod token_tests {
    use super::*;

    /// Every UDP token round-trips through the loop's token and back.
    #[test]
    fn tokens() {
        let id = Id::from_u64((5 << 32) | 77);
        let all = [
            Sock::Listener(3),
            Sock::Up(id),
            Sock::UpControl(id),
            Sock::Control(id),
            Sock::Relay(id),
            Sock::Name(id),
            Sock::Target(id),
        ];
        for s in all {
            let Some(Token::Udp(low)) = Token::decode(s.token()) else {
                panic!("{s:?}: not a UDP token");
            };
            assert_eq!(Sock::decode(low), Some(s));
        }
        assert_eq!(Sock::decode(0), None);
    }
}
