//! One UDP association's state, the value the association table holds, and its key: where
//! datagrams come from and go, the sockets on both sides, counters each way, what waits for
//! the upstream, and why it ended. Its last activity is the table's (`Table::last`, which
//! orders the idle sweep).
//!
//! Invariant: an association owns every socket it uses (its upstream socket, the SOCKS5
//! control connections, the SOCKS relay socket), so they close exactly when its entry is
//! dropped: ending an association cannot leak one, and the kernel forgets their epoll
//! registrations with them.

use super::dns::Dns;
use crate::handshake::SocksClient;
use crate::socks5::{AddrRef, Dest};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::time::Instant;

/// The key of the association table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    /// A TPROXY client's address:port (canonical: IPv4 never as v4-mapped).
    Client(SocketAddr),
    /// A SOCKS5 UDP ASSOCIATE, numbered by the server.
    Socks(u64),
}

/// Why an association ended, for its log line and the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Nothing either way for `--udp-timeout`.
    Idle,
    /// The table was full and this was the least recently active entry.
    Evicted,
    /// A DNS exchange got all its answers.
    Answered,
    /// An ICMP error (ECONNREFUSED, EHOSTUNREACH, ...) from the upstream or the client.
    Icmp(i32),
    /// The SOCKS5 TCP control connection (ours or the upstream's) closed.
    ControlClosed,
    /// The upstream SOCKS5 server refused or failed the UDP ASSOCIATE.
    Upstream,
    /// The upstream SOCKS5 server did not answer within `--connect-timeout`.
    Timeout,
    /// A socket call failed otherwise.
    Error(i32),
    /// ksocks is exiting.
    Shutdown,
}

/// The end reasons in the stats line's order, with the words `End` prints.
pub const END_WORDS: [&str; 8] = [
    "idle", "evicted", "answered", "icmp", "control", "upstream", "timeout", "error",
];

impl End {
    /// Index into [`END_WORDS`] for the counters (`Shutdown` is not counted).
    pub fn index(self) -> Option<usize> {
        Some(match self {
            End::Idle => 0,
            End::Evicted => 1,
            End::Answered => 2,
            End::Icmp(_) => 3,
            End::ControlClosed => 4,
            End::Upstream => 5,
            End::Timeout => 6,
            End::Error(_) => 7,
            End::Shutdown => return None,
        })
    }
}

/// Printed as `end=...` in the association's close line, in the words of the TCP close line.
impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            End::Idle => "idle",
            End::Evicted => "evicted",
            End::Answered => "answered",
            End::Icmp(libc::ECONNREFUSED) => "refused",
            End::Icmp(
                libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN | libc::ENETDOWN,
            ) => "unreachable",
            End::Icmp(_) => "icmp",
            End::ControlClosed => "control-closed",
            End::Upstream => "upstream",
            End::Timeout => "timeout",
            End::Error(_) => "error",
            End::Shutdown => "shutdown",
        })
    }
}

/// Datagrams and bytes one way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub datagrams: u64,
    pub bytes: u64,
    /// Datagrams that could not be relayed (bad header, too big, socket full, ...).
    pub dropped: u64,
}

impl Counters {
    pub fn add(&mut self, bytes: usize) {
        self.datagrams += 1;
        self.bytes += bytes as u64;
    }
}

/// A SOCKS5 UDP ASSOCIATE's client side.
pub struct SocksIn {
    /// The client's TCP control connection: the association ends when it closes.
    pub control: OwnedFd,
    /// Our UDP socket facing the client (BND of the reply), connected to the client once its
    /// port is known, so that the kernel turns strangers away.
    pub relay: OwnedFd,
}

/// Where an association's datagrams come from.
pub enum Inbound {
    /// A TPROXY client (the association's `client`): replies leave through the reply socket
    /// of their source.
    Tproxy,
    /// A SOCKS5 UDP ASSOCIATE; `client` is the control connection's IP, with port 0 until the
    /// request or the first datagram names it.
    Socks(Box<SocksIn>),
}

/// The client side of our UDP ASSOCIATE to a `socks5://` upstream, while it runs.
pub struct Handshake {
    pub client: SocksClient,
    pub input: Vec<u8>,
    pub output: Vec<u8>,
    /// The TCP connect finished.
    pub connected: bool,
}

/// Our TCP control connection to a `socks5://` upstream.
pub struct Socks5Up {
    pub control: OwnedFd,
    /// The server's address (of its TCP port; a wildcard BND means this address).
    pub server: SocketAddr,
    /// `Some` until the server's reply named its relay; datagrams wait meanwhile.
    pub handshake: Option<Box<Handshake>>,
}

/// Where an association's datagrams go.
pub enum Route {
    /// `upstream` is unconnected: `sendto` each destination, `recvfrom` tells the source.
    Direct,
    /// `upstream` is connected to the SOCKS5 server's UDP relay (BND of UDP ASSOCIATE), which
    /// lives as long as the control connection.
    Socks5(Box<Socks5Up>),
    /// `upstream` is connected to the shadowsocks server's UDP port.
    Shadowsocks,
    /// A `socks5://` (or else `ss://`) route whose server's name is being looked up.
    Resolving { socks5: bool },
}

impl Route {
    pub fn name(&self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Socks5(_) | Route::Resolving { socks5: true } => "socks5",
            Route::Shadowsocks | Route::Resolving { socks5: false } => "ss",
        }
    }
}

/// A name a SOCKS client sent to, resolved for the direct route (one per association).
#[derive(Debug)]
pub struct Name {
    pub name: Box<str>,
    /// `None` while the lookup runs.
    pub ip: Option<IpAddr>,
}

/// Datagrams waiting for the upstream (a SOCKS5 handshake, a name lookup): at most
/// [`PENDING_DATAGRAMS`] in one buffer allocated once, when the first one arrives, with room
/// for at least [`PENDING_MIN`] bytes or that first datagram, and never grown; each stored as
/// a SOCKS5 UDP datagram (RFC 1928 §7) behind its 2-byte length. The UDP module bounds the
/// sum of these buffers (`PENDING_TOTAL`) and frees each once its upstream is ready.
pub struct Pending {
    bytes: Vec<u8>,
    cap: usize,
    count: usize,
}

pub const PENDING_DATAGRAMS: usize = 4;
pub const PENDING_MIN: usize = 8192;

impl Pending {
    /// A buffer sized for `first` (a datagram of that many bytes) and what may follow.
    pub fn for_first(first: usize) -> Pending {
        let cap = (first + 2).max(PENDING_MIN);
        Pending {
            bytes: Vec::with_capacity(cap),
            cap,
            count: 0,
        }
    }

    /// The bytes it holds allocated.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Keeps a copy of `datagram`; false (nothing kept) when full.
    pub fn push(&mut self, datagram: &[u8]) -> bool {
        let fits = self.bytes.len() + 2 + datagram.len() <= self.cap && datagram.len() <= 0xffff;
        if self.count >= PENDING_DATAGRAMS || !fits {
            return false;
        }
        self.bytes
            .extend_from_slice(&(datagram.len() as u16).to_be_bytes());
        self.bytes.extend_from_slice(datagram);
        self.count += 1;
        true
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The datagrams in arrival order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let mut rest = &self.bytes[..];
        std::iter::from_fn(move || {
            let (len, tail) = rest.split_first_chunk::<2>()?;
            let (datagram, tail) = tail.split_at(usize::from(u16::from_be_bytes(*len)));
            rest = tail;
            Some(datagram)
        })
    }
}

/// One association's state: the value of the association table.
pub struct Assoc {
    /// Its number in log lines (`#u17`).
    pub serial: u64,
    /// The client's UDP address (a SOCKS client's port is 0 until known).
    pub client: SocketAddr,
    pub inbound: Inbound,
    pub route: Route,
    /// The upstream UDP socket; direct associations of SOCKS clients get theirs with the
    /// first datagram, whose family it takes.
    pub upstream: Option<OwnedFd>,
    /// The upstream socket's local port, counted in the loop check while it lives (0: none).
    pub up_port: u16,
    /// The upstream socket is IPv4 (a direct socket reaches that family only).
    pub up_v4: bool,
    /// The first destination ("?" until a SOCKS client sends).
    pub dest: Dest,
    /// Datagrams to other destinations than `dest` (full cone).
    pub others: u64,
    /// `dest` is known.
    pub seen: bool,
    pub up: Counters,
    pub down: Counters,
    pub started: Instant,
    pub dns: Dns,
    pub pending: Option<Box<Pending>>,
    pub name: Option<Box<Name>>,
}

impl Assoc {
    pub fn new(serial: u64, client: SocketAddr, inbound: Inbound, route: Route) -> Assoc {
        Assoc {
            serial,
            client,
            inbound,
            route,
            upstream: None,
            up_port: 0,
            up_v4: false,
            dest: Dest::Domain("?".into(), 0),
            others: 0,
            seen: false,
            up: Counters::default(),
            down: Counters::default(),
            started: Instant::now(),
            dns: Dns::default(),
            pending: None,
            name: None,
        }
    }

    /// The upstream cannot take datagrams yet (its address is looked up, or a `socks5://`
    /// handshake runs).
    pub fn waiting(&self) -> bool {
        match &self.route {
            Route::Socks5(s) => s.handshake.is_some(),
            Route::Resolving { .. } => true,
            Route::Direct | Route::Shadowsocks => false,
        }
    }

    /// Notes a datagram to `to`: the first destination, or one more to another (full cone).
    pub fn note_dest(&mut self, to: AddrRef) {
        if !self.seen {
            self.seen = true;
            self.dest = to.to_dest();
            // A SOCKS association lives as long as its control connection, whatever it
            // carries; a TPROXY client's DNS port is used once.
            if let Inbound::Tproxy = self.inbound {
                self.dns = Dns::new(self.dest_port());
            }
        } else if !same(&self.dest, to) {
            self.others += 1;
        }
    }

    fn dest_port(&self) -> u16 {
        match &self.dest {
            Dest::Ip(a) => a.port(),
            Dest::Domain(_, p) => *p,
        }
    }
}

/// Whether `addr` names `dest`, without allocating.
pub fn same(dest: &Dest, addr: AddrRef) -> bool {
    match (dest, addr) {
        (Dest::Ip(a), AddrRef::Ip(b)) => *a == b,
        (Dest::Domain(n, p), AddrRef::Domain(m, q)) => n == m && *p == q,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// End reasons print as the single words the close line's `end=` carries, and each
    /// counted one has its stats word.
    #[test]
    fn end_words() {
        let words = [
            (End::Idle, "idle"),
            (End::Evicted, "evicted"),
            (End::Answered, "answered"),
            (End::Icmp(libc::ECONNREFUSED), "refused"),
            (End::Icmp(libc::EHOSTUNREACH), "unreachable"),
            (End::Icmp(libc::ENETUNREACH), "unreachable"),
            (End::Icmp(libc::EMSGSIZE), "icmp"),
            (End::ControlClosed, "control-closed"),
            (End::Upstream, "upstream"),
            (End::Timeout, "timeout"),
            (End::Error(libc::ENOBUFS), "error"),
            (End::Shutdown, "shutdown"),
        ];
        for (end, word) in words {
            assert_eq!(end.to_string(), word);
            if let Some(i) = end.index() {
                assert!(word.starts_with(END_WORDS[i]) || i == 3, "{word}");
            }
        }
        assert_eq!(End::Shutdown.index(), None);
    }

    /// Counters add one datagram and its bytes per call.
    #[test]
    fn counters() {
        let mut c = Counters::default();
        c.add(100);
        c.add(0);
        assert_eq!((c.datagrams, c.bytes, c.dropped), (2, 100, 0));
    }

    /// The pending buffer keeps at most 4 datagrams and what its first sized it for (at least
    /// 8 KiB), in order, and never grows.
    #[test]
    fn pending_bounds() {
        let mut p = Pending::for_first(3);
        assert_eq!(p.capacity(), PENDING_MIN);
        let cap = p.bytes.capacity();
        assert!(p.push(b"one") && p.push(b"") && p.push(&[7; 3000]));
        assert!(!p.push(&[8; 6000]), "over 8 KiB");
        assert!(p.push(b"four"));
        assert!(!p.push(b"five"), "over 4 datagrams");
        let got: Vec<&[u8]> = p.iter().collect();
        assert_eq!(got, [&b"one"[..], b"", &[7; 3000], b"four"]);
        assert_eq!((p.len(), p.bytes.capacity()), (4, cap));
        let mut big = Pending::for_first(65535);
        assert_eq!(big.capacity(), 65537);
        assert!(big.push(&[1; 65535]) && !big.push(b"x") && big.len() == 1);
    }

    /// The first destination is kept; later ones to elsewhere count as others.
    #[test]
    fn destinations() {
        let client = "198.18.1.2:4000".parse().unwrap();
        let mut a = Assoc::new(1, client, Inbound::Tproxy, Route::Direct);
        let dns: SocketAddr = "198.19.1.2:53".parse().unwrap();
        a.note_dest(AddrRef::Ip(dns));
        a.up.add(10);
        a.note_dest(AddrRef::Ip(dns));
        a.note_dest(AddrRef::Domain("a.test", 53));
        assert_eq!((a.dest.clone(), a.others), (Dest::Ip(dns), 1));
    }
}
