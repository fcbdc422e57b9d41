//! The single-threaded readiness loop: accept until `WouldBlock`, dispatch epoll events to
//! connections, run timers (connect and idle timeouts, sockmap accounting polls), back off when
//! out of descriptors, and shut down cleanly on SIGINT/SIGTERM.
//!
//! Invariants: at most `--max-conns` connections are open (at the limit the listeners are taken
//! out of epoll and new connections wait in the kernel backlog); nothing blocks; every timer is a
//! deadline checked after each wakeup, so one slow connection never delays another.

use crate::cli::{Config, ListenerKind};
use crate::conn::{connect_end, reset_of, Conn, End, Phase, PlaneKind, Side, Sock};
use crate::handshake::{server_reply, Credential, Outcome, SocksClient, SocksServer, MAX_INPUT};
use crate::offload::Offload;
use crate::relay::Flow;
use crate::resolve::Resolver;
use crate::shadowsocks;
use crate::sockmap::{self, Fallback, Spliced};
use crate::socks5::{self, Dest, Rep};
use crate::sys::{self, epoll, socket};
use crate::upstream::Upstream;
use crate::{debug, error, info};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

const SIGNAL_TOKEN: u64 = u64::MAX;
const RESOLVER_TOKEN: u64 = u64::MAX - 1;
const LISTENER_FLAG: u64 = 1 << 63;
/// Accepts per listener wakeup, so a connection storm cannot starve established traffic.
const ACCEPT_BURST: usize = 64;
/// How long to stop accepting after EMFILE/ENFILE.
const FD_BACKOFF: Duration = Duration::from_millis(100);
/// Descriptor starvation: how often a continuing episode is reported, and how long accepts
/// must go without running out before a new episode is logged as new.
const STARVE_REPORT: Duration = Duration::from_secs(30);
const STARVE_QUIET: Duration = Duration::from_secs(5);
/// Connect and idle timeouts, and idle pipes, are checked this often.
const SWEEP: Duration = Duration::from_millis(250);
/// The sockmap counters are scanned this often for quiet connections that became active.
const SCAN: Duration = Duration::from_millis(50);
/// A splice pipe unused this long is closed (two descriptors and a few pages saved).
const PIPE_IDLE: Duration = Duration::from_secs(1);
/// Pipe capacity for the splice plane: the kernel's default of 16 pages.
pub const PIPE_BYTES: usize = 16 * 4096;

pub struct Listener {
    pub fd: OwnedFd,
    pub kind: ListenerKind,
    pub addr: SocketAddr,
}

/// Binds one listener: `IPV6_V6ONLY` for IPv6 addresses, `IP_TRANSPARENT` for TPROXY.
pub fn bind_listener(kind: ListenerKind, addr: SocketAddr) -> io::Result<Listener> {
    let fd = socket::tcp_socket(&addr)?;
    let s = fd.as_fd();
    socket::set_int_opt(s, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if addr.is_ipv6() {
        socket::set_int_opt(s, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    if kind == ListenerKind::Tproxy {
        match addr {
            SocketAddr::V4(_) => socket::set_int_opt(s, libc::SOL_IP, libc::IP_TRANSPARENT, 1)?,
            SocketAddr::V6(_) => socket::set_int_opt(s, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1)?,
        }
    }
    socket::bind(s, &addr)?;
    socket::listen(s, libc::SOMAXCONN)?;
    let addr = socket::local_addr(s)?;
    Ok(Listener { fd, kind, addr })
}

/// The data plane new connections enter after connecting.
pub enum Plane {
    Copy,
    Splice,
    Sockmap(Offload),
}

#[derive(Default)]
struct Stats {
    total: u64,
    /// Connections or directions left in userspace, by `Fallback` reason.
    fallbacks: [u64; 3],
    /// Bytes of closed connections (up, down); open ones are added when printing.
    closed_up: u64,
    closed_down: u64,
}

struct Slot {
    gen: u32,
    conn: Option<Conn>,
}

pub struct Server {
    ep: epoll::Epoll,
    listeners: Vec<Listener>,
    signals: OwnedFd,
    slots: Vec<Slot>,
    free: Vec<usize>,
    open: usize,
    cfg: Config,
    plane: Plane,
    stats: Stats,
    listening: bool,
    backoff_until: Option<Instant>,
    /// Set while descriptors run out; one episode is logged once, however many pauses it has.
    starving: Option<Starving>,
    next_id: u64,
    /// Sockmap accounting polls: (when, connection token).
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    next_sweep: Instant,
    stop: bool,
    /// Runs only when a SOCKS5 listener may ask for names.
    resolver: Option<Resolver>,
    /// A descriptor held back (/dev/null) so that an accepted connection can always get its
    /// upstream socket: when socket() says EMFILE, this one is closed and the call retried,
    /// and accepting stops until it can be opened again. `None` while it is spent.
    reserve: Option<OwnedFd>,
    /// How many live connections have their upstream socket bound to each local port: a client
    /// whose port is counted here may be our own upstream connection redirected back to us.
    /// 128 KiB of zeroed pages, only those of ports in use become resident.
    up_ports: Vec<u16>,
    /// Sockmap: socket cookie -> (connection token, counter value last seen), for the scan.
    watched: HashMap<u64, (u64, u64)>,
    /// `None` when the kernel cannot batch-read the counters (then every direction polls).
    next_scan: Option<Instant>,
}

/// Generations wrap at 31 bits so a connection token never has `LISTENER_FLAG` set.
const GEN_MASK: u32 = 0x7fff_ffff;

fn conn_token(gen: u32, idx: usize, side: Side) -> u64 {
    ((gen & GEN_MASK) as u64) << 32 | (idx as u64) << 1 | side as u64
}

fn split_token(token: u64) -> (u32, usize, Side) {
    let side = if token & 1 == 0 {
        Side::Client
    } else {
        Side::Upstream
    };
    (
        (token >> 32) as u32,
        ((token & 0xffff_ffff) >> 1) as usize,
        side,
    )
}

/// One episode of descriptor starvation: when it was last reported, its last pause, and the
/// pauses since the report.
struct Starving {
    reported: Instant,
    last: Instant,
    pauses: u64,
}

fn open_reserve() -> Option<OwnedFd> {
    std::fs::File::open("/dev/null").ok().map(OwnedFd::from)
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

impl Server {
    pub fn new(cfg: Config, listeners: Vec<Listener>, plane: Plane) -> io::Result<Server> {
        let ep = epoll::Epoll::new(256)?;
        let signals = sys::signalfd(&[libc::SIGINT, libc::SIGTERM, libc::SIGUSR1])?;
        ep.add(signals.as_fd(), SIGNAL_TOKEN, epoll::IN)?;
        let mut server = Server {
            ep,
            listeners,
            signals,
            slots: Vec::new(),
            free: Vec::new(),
            open: 0,
            cfg,
            plane,
            stats: Stats::default(),
            listening: false,
            backoff_until: None,
            starving: None,
            next_id: 1,
            timers: BinaryHeap::new(),
            next_sweep: Instant::now() + SWEEP,
            stop: false,
            resolver: None,
            reserve: open_reserve(),
            up_ports: vec![0; 1 << 16],
            watched: HashMap::new(),
            next_scan: None,
        };
        if let Plane::Sockmap(off) = &server.plane {
            if off.counters(&mut Vec::new()).is_ok() {
                server.next_scan = Some(Instant::now() + SCAN);
            } else {
                debug!(
                    "BPF_MAP_LOOKUP_BATCH unsupported: every spliced connection polls its counters"
                );
            }
        }
        if server
            .listeners
            .iter()
            .any(|l| l.kind == ListenerKind::Socks)
        {
            let r = Resolver::start()?;
            server.ep.add(r.fd(), RESOLVER_TOKEN, epoll::IN)?;
            server.resolver = Some(r);
        }
        server.set_listening(true)?;
        Ok(server)
    }

    fn set_listening(&mut self, on: bool) -> io::Result<()> {
        if self.listening == on {
            return Ok(());
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if on {
                self.ep
                    .add(l.fd.as_fd(), LISTENER_FLAG | i as u64, epoll::IN)?;
            } else {
                self.ep.delete(l.fd.as_fd())?;
            }
        }
        self.listening = on;
        Ok(())
    }

    /// Runs until SIGINT or SIGTERM; then closes listeners and connections.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Vec::new();
        while !self.stop {
            let timeout = self.timeout_ms();
            self.ep.wait(&mut events, timeout)?;
            for ev in events.iter() {
                match ev.token {
                    SIGNAL_TOKEN => self.on_signal()?,
                    RESOLVER_TOKEN => self.on_resolved(),
                    t if t & LISTENER_FLAG != 0 => self.on_accept((t & !LISTENER_FLAG) as usize),
                    t => self.on_conn_event(t, ev.events),
                }
            }
            self.run_timers();
        }
        self.listeners.clear();
        for idx in 0..self.slots.len() {
            if self.slots[idx].conn.is_some() {
                self.finish(idx, End::Shutdown);
            }
        }
        Ok(())
    }

    /// Milliseconds until the next deadline: a sockmap poll, the sweep, or the end of an
    /// accept back-off.
    fn timeout_ms(&self) -> i32 {
        let now = Instant::now();
        let mut next = self.next_sweep;
        if let Some(Reverse((t, _))) = self.timers.peek() {
            next = next.min(*t);
        }
        for t in [self.backoff_until, self.next_scan].into_iter().flatten() {
            next = next.min(t);
        }
        let wait = next.saturating_duration_since(now);
        // Round up so a 0.3 ms deadline does not become a busy 0 ms wait.
        (wait.as_micros().div_ceil(1000)).min(1000) as i32
    }

    fn on_signal(&mut self) -> io::Result<()> {
        while let Some(sig) = sys::read_signal(self.signals.as_fd())? {
            match sig as libc::c_int {
                libc::SIGUSR1 => self.print_stats(),
                _ => self.stop = true,
            }
        }
        Ok(())
    }

    fn print_stats(&self) {
        let (mut copy, mut splice, mut kernel) = (0, 0, 0);
        let (mut up, mut down) = (self.stats.closed_up, self.stats.closed_down);
        let off = self.offload();
        for conn in self.slots.iter().filter_map(|s| s.conn.as_ref()) {
            match conn.plane() {
                PlaneKind::Copy => copy += 1,
                PlaneKind::Splice => splice += 1,
                PlaneKind::Sockmap => kernel += 1,
                PlaneKind::Connecting => {}
            }
            let (u, d) = conn.bytes(off);
            up += u;
            down += d;
        }
        let map_entries = off.map_or(0, |o| o.entries());
        let reasons: String = Fallback::ALL
            .iter()
            .map(|f| {
                format!(
                    " fallback_{}={}",
                    f.name(),
                    self.stats.fallbacks[*f as usize]
                )
            })
            .collect();
        crate::log::write(format_args!(
            "stats open={} total={} copy={copy} splice={splice} sockmap={kernel} fallbacks={}{reasons} bytes_up={up} bytes_down={down} map_entries={map_entries}",
            self.open, self.stats.total, self.stats.fallbacks.iter().sum::<u64>()
        ));
    }

    fn offload(&self) -> Option<&Offload> {
        match &self.plane {
            Plane::Sockmap(o) => Some(o),
            _ => None,
        }
    }

    fn on_accept(&mut self, li: usize) {
        for _ in 0..ACCEPT_BURST {
            if self.open >= self.cfg.max_conns {
                let _ = self.set_listening(false);
                return;
            }
            let res = socket::accept(self.listeners[li].fd.as_fd());
            match res {
                Ok((fd, peer)) => {
                    self.end_starving();
                    self.start(li, fd, peer);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if is_fd_exhaustion(&e) => {
                    self.starve(&e);
                    return;
                }
                // The client gave up before we accepted it; try the next one.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO)
                    ) => {}
                Err(e) => {
                    error!("accept on {}: {e}", self.listeners[li].addr);
                    return;
                }
            }
        }
    }

    /// Out of descriptors: stop accepting for a moment instead of spinning on EMFILE. The
    /// first pause of an episode is logged; later ones only as a count every `STARVE_REPORT`.
    fn starve(&mut self, e: &io::Error) {
        let now = Instant::now();
        match &mut self.starving {
            None => {
                error!(
                    "out of file descriptors ({e}); pausing accepts, {} connections open",
                    self.open
                );
                self.starving = Some(Starving {
                    reported: now,
                    last: now,
                    pauses: 0,
                });
            }
            Some(s) => {
                s.last = now;
                s.pauses += 1;
                if now - s.reported >= STARVE_REPORT {
                    error!(
                        "still out of file descriptors: {} more pauses, {} connections open",
                        s.pauses, self.open
                    );
                    s.reported = now;
                    s.pauses = 0;
                }
            }
        }
        let _ = self.set_listening(false);
        self.backoff_until = Some(now + FD_BACKOFF);
    }

    /// An accept succeeded: the episode is over once none has failed for `STARVE_QUIET`.
    fn end_starving(&mut self) {
        if let Some(s) = &self.starving {
            if s.last.elapsed() >= STARVE_QUIET {
                info!("file descriptors available again; accepting");
                self.starving = None;
            }
        }
    }

    /// Takes a freshly accepted connection: SOCKS clients start their handshake, redirected
    /// ones go straight to the upstream connect.
    fn start(&mut self, li: usize, client: OwnedFd, client_addr: SocketAddr) {
        let id = self.next_id;
        self.next_id += 1;
        self.stats.total += 1;
        let l = &self.listeners[li];
        let kind = l.kind;
        let dest = match kind {
            ListenerKind::Redirect => socket::original_dst(client.as_fd(), l.addr.is_ipv6()),
            ListenerKind::Tproxy => socket::local_addr(client.as_fd()),
            ListenerKind::Socks => Ok(SocketAddr::from(([0, 0, 0, 0], 0))), // replaced by the request
        };
        let dest = match dest {
            Ok(d) => d,
            Err(e) => {
                error!(
                    "#{id} {client_addr} -> ?: no original destination ({e}); was it redirected?"
                );
                info!(
                    "#{id} {client_addr} -> ? closed: up=0 down=0 time=0.000s plane=none end={}",
                    End::NoDestination
                );
                return;
            }
        };
        let now = Instant::now();
        let conn = Conn {
            id,
            inbound: kind,
            client: Sock::new(client),
            upstream: None,
            client_addr,
            // A SOCKS client names its destination in the request.
            dest: if kind == ListenerKind::Socks {
                Dest::Domain("?".into(), 0)
            } else {
                Dest::Ip(dest)
            },
            phase: Phase::Socks,
            deadline: Some(now + self.cfg.handshake_timeout),
            hs: None,
            pre: [0, 0],
            replied: false,
            started: now,
            last_active: now,
            seen_bytes: 0,
            up_port: 0,
        };
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot { gen: 0, conn: None });
                self.slots.len() - 1
            }
        };
        self.slots[idx].conn = Some(conn);
        self.open += 1;
        let end = if kind == ListenerKind::Socks {
            self.conn(idx).hs().server = Some(SocksServer::default());
            None
        } else {
            self.route(idx)
        };
        self.settle(idx, end);
    }

    /// The destination is known: refuse loops, resolve names, connect to the destination or
    /// to the upstream proxy.
    fn route(&mut self, idx: usize) -> Option<End> {
        let conn = self.slots[idx]
            .conn
            .as_ref()
            .expect("slot holds a connection");
        if let Dest::Ip(dest) = conn.dest {
            if self.is_loop(conn.inbound, &dest, conn.client.fd()) {
                error!(
                    "#{} {} -> {dest}: redirect loop (destination is a ksocks listener), refusing",
                    conn.id, conn.client_addr
                );
                return Some(self.refuse(idx, End::Loop, Rep::NotAllowed));
            }
        }
        if let Some(parent) = self.own_upstream(conn) {
            error!(
                "#{} {} -> {}: proxy loop (the client is the upstream connection of #{parent}; exempt ksocks' own traffic from the redirect with --mark or --user), refusing",
                conn.id, conn.client_addr, conn.dest
            );
            return Some(self.refuse(idx, End::Loop, Rep::NotAllowed));
        }
        let target = match (&self.cfg.upstream, &conn.dest) {
            (Upstream::Direct, Dest::Ip(addr)) => *addr,
            (Upstream::Direct, Dest::Domain(name, port)) => {
                let resolver = self
                    .resolver
                    .as_ref()
                    .expect("a resolver runs when --socks is used");
                resolver.lookup(
                    conn_token(self.slots[idx].gen, idx, Side::Client),
                    name,
                    *port,
                );
                let timeout = self.cfg.connect_timeout;
                let conn = self.conn(idx);
                conn.phase = Phase::Resolving;
                conn.deadline = Some(Instant::now() + timeout);
                return None;
            }
            (Upstream::Socks5 { addr, .. } | Upstream::Shadowsocks { addr }, _) => *addr,
        };
        self.connect(idx, target)
    }

    /// A refusal before the data plane: SOCKS clients get `rep` first and a FIN, the others
    /// the end's usual close.
    fn refuse(&mut self, idx: usize, end: End, rep: Rep) -> End {
        let conn = self.conn(idx);
        if conn.inbound == ListenerKind::Socks {
            // A reply of at most 22 bytes to a socket that has sent nothing yet fits its
            // send buffer; if it did not, the client would just see the close.
            let _ = socket::send(conn.client.fd(), &server_reply(rep, None));
            conn.replied = true;
        }
        end
    }

    /// Creates the upstream socket and starts connecting to `target`.
    fn connect(&mut self, idx: usize, target: SocketAddr) -> Option<End> {
        let mark = self.cfg.mark;
        let attempt = |reserve: &mut Option<OwnedFd>| -> io::Result<(OwnedFd, bool)> {
            let fd = match socket::tcp_socket(&target) {
                Err(e) if is_fd_exhaustion(&e) && reserve.is_some() => {
                    *reserve = None; // its slot is ours now
                    socket::tcp_socket(&target)?
                }
                other => other?,
            };
            if let Some(mark) = mark {
                socket::set_int_opt(
                    fd.as_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_MARK,
                    mark as libc::c_int,
                )?;
            }
            let connected = socket::connect(fd.as_fd(), &target)?;
            Ok((fd, connected))
        };
        let res = attempt(&mut self.reserve);
        if self.reserve.is_none() {
            // Spent: accept nothing more until a descriptor frees up (see `finish`).
            let e = io::Error::from_raw_os_error(libc::EMFILE);
            self.starve(&e);
        }
        match res {
            Ok((fd, connected)) => {
                let timeout = self.cfg.connect_timeout;
                // The port is bound by connect(); a connection redirected back to us from it
                // is accepted only after this returns to the loop.
                let port = socket::local_addr(fd.as_fd()).map_or(0, |a| a.port());
                self.up_ports[port as usize] += 1;
                let conn = self.conn(idx);
                conn.up_port = port;
                conn.upstream = Some(Sock::new(fd));
                conn.phase = Phase::Connecting;
                conn.deadline = Some(Instant::now() + timeout);
                if connected {
                    self.connected(idx)
                } else {
                    None
                }
            }
            Err(e) => {
                let conn = self.conn(idx);
                error!(
                    "#{} {} -> {}: connect {target}: {e}",
                    conn.id, conn.client_addr, conn.dest
                );
                if is_fd_exhaustion(&e) {
                    self.starve(&e);
                    return Some(self.refuse(idx, End::Error, Rep::GeneralFailure));
                }
                let rep = socks5::rep_from_errno(e.raw_os_error().unwrap_or(0));
                Some(self.refuse(idx, connect_end(&e), rep))
            }
        }
    }

    /// A destination that is one of our own listeners would make the proxy connect to itself
    /// for ever. With no NAT, SO_ORIGINAL_DST returns the accepted socket's own address; for
    /// TPROXY that is always the case, so only the listener addresses count there.
    fn is_loop(
        &self,
        kind: ListenerKind,
        dest: &SocketAddr,
        client: std::os::fd::BorrowedFd,
    ) -> bool {
        if kind == ListenerKind::Redirect && socket::local_addr(client).ok().as_ref() == Some(dest)
        {
            return true;
        }
        self.listeners.iter().any(|l| {
            l.addr == *dest
                || (l.addr.ip().is_unspecified()
                    && l.addr.port() == dest.port()
                    && l.addr.is_ipv4() == dest.is_ipv4()
                    && socket::is_local_ip(dest.ip()))
        })
    }

    /// The id of the connection whose upstream socket is `conn`'s client: a firewall rule
    /// (an OUTPUT redirect on the router itself, without the `--mark`/`--user` exemption)
    /// sent ksocks' own connection back to it, and each hop would open the next.
    fn own_upstream(&self, conn: &Conn) -> Option<u64> {
        let port = conn.client_addr.port();
        if self.up_ports[port as usize] == 0 {
            return None;
        }
        // Rare (a client port that one of ours also uses): find which, by full address.
        self.slots
            .iter()
            .filter_map(|s| s.conn.as_ref())
            .filter(|c| c.up_port == port)
            .find(|c| {
                c.upstream
                    .as_ref()
                    .and_then(|u| socket::local_addr(u.fd()).ok())
                    == Some(conn.client_addr)
            })
            .map(|c| c.id)
    }

    fn conn(&mut self, idx: usize) -> &mut Conn {
        self.slots[idx]
            .conn
            .as_mut()
            .expect("slot holds a connection")
    }

    /// The TCP connect finished: start the upstream proxy's handshake, if any.
    fn connected(&mut self, idx: usize) -> Option<End> {
        let upstream = self.cfg.upstream.clone();
        let timeout = self.cfg.connect_timeout;
        let conn = self.conn(idx);
        conn.deadline = Some(Instant::now() + timeout);
        match upstream {
            Upstream::Direct => self.tunnel_open(idx),
            Upstream::Shadowsocks { .. } => {
                let header = shadowsocks::emit_header(&conn.dest);
                conn.hs().output[1].extend_from_slice(&header);
                self.tunnel_open(idx)
            }
            Upstream::Socks5 { auth, .. } => {
                let dest = conn.dest.clone();
                let hs = conn.hs();
                hs.client = Some(SocksClient::new(dest, auth, &mut hs.output[1]));
                conn.phase = Phase::Proxy;
                self.flush_handshake(idx)
            }
        }
    }

    /// The path to the destination is open: answer a SOCKS client, queue the payload that came
    /// early, and write all of it before the data plane starts.
    fn tunnel_open(&mut self, idx: usize) -> Option<End> {
        let conn = self.conn(idx);
        if conn.inbound == ListenerKind::Socks {
            let bind = socket::local_addr(conn.up().fd()).ok();
            conn.hs().output[0].extend_from_slice(&server_reply(Rep::Succeeded, bind));
        }
        if let Some(hs) = conn.hs.as_deref_mut() {
            let [to_up, to_client] = std::mem::take(&mut hs.input);
            conn.pre = [to_up.len() as u64, to_client.len() as u64];
            hs.output[1].extend_from_slice(&to_up);
            hs.output[0].extend_from_slice(&to_client);
        }
        conn.phase = Phase::Flushing;
        self.flush_handshake(idx)
    }

    /// Writes pending handshake output; in `Flushing`, enters the data plane once all is out.
    fn flush_handshake(&mut self, idx: usize) -> Option<End> {
        let conn = self.conn(idx);
        if let Some(hs) = conn.hs.as_deref_mut() {
            for side in [Side::Client, Side::Upstream] {
                let out = &mut hs.output[side as usize];
                if out.is_empty() {
                    continue;
                }
                let fd = match side {
                    Side::Client => conn.client.fd(),
                    Side::Upstream => conn
                        .upstream
                        .as_ref()
                        .expect("flushing needs an upstream")
                        .fd(),
                };
                match socket::send(fd, out) {
                    Ok(n) => {
                        out.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Some(reset_of(side)),
                }
            }
        }
        let done = conn
            .hs
            .as_ref()
            .map_or(true, |hs| hs.output.iter().all(Vec::is_empty));
        if done && matches!(conn.phase, Phase::Flushing) {
            return self.enter_plane(idx);
        }
        None
    }

    /// Handshakes are over and every early byte is out: enter the data plane.
    fn enter_plane(&mut self, idx: usize) -> Option<End> {
        let buffer = self.cfg.buffer_size;
        let inflight = self.cfg.inflight_max;
        let sndbuf = self.cfg.sndbuf;
        let token = conn_token(self.slots[idx].gen, idx, Side::Client);
        let conn = self.slots[idx]
            .conn
            .as_mut()
            .expect("slot holds a connection");
        let rx_base = conn.hs.take().map_or([0, 0], |hs| hs.read);
        conn.deadline = None;
        let phase = match &self.plane {
            Plane::Copy => Phase::Relay([Flow::copy(buffer), Flow::copy(buffer)]),
            Plane::Splice => Phase::Relay([Flow::splice(PIPE_BYTES), Flow::splice(PIPE_BYTES)]),
            Plane::Sockmap(off) => {
                match Spliced::start(
                    off,
                    conn.client.fd(),
                    conn.up().fd(),
                    buffer,
                    inflight,
                    rx_base,
                    sndbuf,
                ) {
                    Ok(mut s) => {
                        s.scanned = self.next_scan.is_some();
                        for cookie in s.cookies() {
                            self.watched.insert(cookie, (token, 0));
                        }
                        Phase::Sockmap(Box::new(s))
                    }
                    Err((why, reason)) => {
                        self.stats.fallbacks[why as usize] += 1;
                        info!("#{} {} -> {}: sockmap unavailable for this connection ({reason}); using copy", conn.id, conn.client_addr, conn.dest);
                        Phase::Relay([Flow::copy(buffer), Flow::copy(buffer)])
                    }
                }
            }
        };
        conn.phase = phase;
        conn.last_active = Instant::now();
        if let Phase::Sockmap(_) = conn.phase {
            // Forward what already arrived and hand drained sources to the kernel.
            return self.sockmap_step(idx, None);
        }
        None
    }

    /// Runs the sockmap state machine for an event (`Some((side, events))`) or a poll, and
    /// queues its next poll.
    fn sockmap_step(&mut self, idx: usize, event: Option<(Side, u32)>) -> Option<End> {
        let token = conn_token(self.slots[idx].gen, idx, Side::Client);
        let Plane::Sockmap(off) = &self.plane else {
            unreachable!("sockmap connections need the sockmap plane")
        };
        let conn = self.slots[idx]
            .conn
            .as_mut()
            .expect("slot holds a connection");
        let now = Instant::now();
        let res = match event {
            Some((side, events)) => sockmap::on_event(conn, off, side, events),
            None => sockmap::poll(conn, off, now),
        };
        if let Phase::Sockmap(s) = &mut conn.phase {
            if let Some(why) = s.fallback.take() {
                self.stats.fallbacks[why as usize] += 1;
            }
        }
        if res.is_none() {
            if let Phase::Sockmap(s) = &mut conn.phase {
                if let Some(t) = s.next_poll() {
                    self.timers.push(Reverse((t, token)));
                }
            }
        }
        res
    }

    fn on_conn_event(&mut self, token: u64, events: u32) {
        let (gen, idx, side) = split_token(token);
        match self.slots.get(idx) {
            Some(slot) if slot.gen == gen && slot.conn.is_some() => {}
            _ => return, // the connection was closed earlier in this batch
        }
        let end = match &mut self.conn(idx).phase {
            Phase::Relay(_) => self.conn(idx).relay_event(side, events),
            Phase::Sockmap(_) => self.sockmap_step(idx, Some((side, events))),
            Phase::Connecting if side == Side::Upstream => self.on_connecting(idx, events),
            _ => self.on_handshake_event(idx, side, events),
        };
        self.settle(idx, end);
    }

    /// Readiness before the data plane: the SOCKS request, the upstream proxy's replies, or
    /// room to write handshake output.
    fn on_handshake_event(&mut self, idx: usize, side: Side, events: u32) -> Option<End> {
        let users = std::mem::take(&mut self.cfg.socks_auth);
        let end = self.handshake_step(idx, side, events, &users);
        self.cfg.socks_auth = users;
        end
    }

    fn handshake_step(
        &mut self,
        idx: usize,
        side: Side,
        events: u32,
        users: &[Credential],
    ) -> Option<End> {
        if events & epoll::ERR != 0 {
            return Some(reset_of(side));
        }
        if events & epoll::OUT != 0 {
            if let Some(end) = self.flush_handshake(idx) {
                return Some(end);
            }
        }
        let conn = self.conn(idx);
        let reading = matches!(
            (&conn.phase, side),
            (Phase::Socks, Side::Client) | (Phase::Proxy, Side::Upstream)
        );
        if events & (epoll::IN | epoll::HUP) == 0 || !reading {
            return None;
        }
        let (id, client_addr) = (conn.id, conn.client_addr);
        let fd = match side {
            Side::Client => conn.client.fd.as_fd(),
            Side::Upstream => conn
                .upstream
                .as_ref()
                .expect("proxy phase has an upstream")
                .fd
                .as_fd(),
        };
        let hs = conn
            .hs
            .as_deref_mut()
            .expect("a handshake phase has handshake state");
        let input = &mut hs.input[side as usize];
        let mut chunk = [0u8; MAX_INPUT];
        let room = MAX_INPUT - input.len().min(MAX_INPUT);
        let n = match socket::recv(fd, &mut chunk[..room.max(1)]) {
            Ok(0) => {
                info!(
                    "#{id} {client_addr} -> {}: {} closed during the handshake",
                    conn.dest,
                    side.name()
                );
                return Some(End::Error);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(_) => return Some(reset_of(side)),
        };
        input.extend_from_slice(&chunk[..n]);
        hs.read[side as usize] += n as u64;
        let (input, output) = (&mut hs.input[side as usize], &mut hs.output[side as usize]);
        let outcome = match side {
            Side::Client => hs
                .server
                .as_mut()
                .expect("SOCKS phase has a server")
                .feed(input, output, users),
            Side::Upstream => hs
                .client
                .as_mut()
                .expect("proxy phase has a client")
                .feed(input, output),
        };
        match outcome {
            Outcome::More => self.flush_handshake(idx),
            Outcome::Fail { why, rep } => {
                let _ = self.flush_handshake(idx);
                let conn = self.conn(idx);
                error!("#{id} {client_addr} -> {}: {why}", conn.dest);
                if side == Side::Upstream {
                    // An upstream refusal is passed on: its REP to a SOCKS client, a reset to
                    // the others.
                    return Some(self.refuse(idx, End::Error, rep.unwrap_or(Rep::GeneralFailure)));
                }
                conn.replied = true; // the client got our reply (if any) and a FIN
                Some(End::Error)
            }
            Outcome::Done(dest) => match side {
                Side::Client => {
                    let conn = self.conn(idx);
                    conn.dest = dest;
                    let hs = conn.hs();
                    hs.server = None;
                    if let Some(end) = self.flush_handshake(idx) {
                        return Some(end);
                    }
                    self.route(idx)
                }
                Side::Upstream => {
                    self.conn(idx).hs().client = None;
                    self.tunnel_open(idx)
                }
            },
        }
    }

    fn on_connecting(&mut self, idx: usize, events: u32) -> Option<End> {
        let conn = self.conn(idx);
        match socket::take_error(conn.up().fd()) {
            Ok(None) if events & (epoll::ERR | epoll::HUP) == 0 => self.connected(idx),
            Ok(None) => Some(End::Error),
            Ok(Some(e)) | Err(e) => {
                error!(
                    "#{} {} -> {}: connect: {e}",
                    conn.id, conn.client_addr, conn.dest
                );
                let rep = socks5::rep_from_errno(e.raw_os_error().unwrap_or(0));
                Some(self.refuse(idx, connect_end(&e), rep))
            }
        }
    }

    /// Answers from the resolver thread.
    fn on_resolved(&mut self) {
        let Some(resolver) = &self.resolver else {
            return;
        };
        for (token, answer) in resolver.answers() {
            let (gen, idx, _) = split_token(token);
            let live = matches!(self.slots.get(idx), Some(s) if s.gen == gen && matches!(s.conn.as_ref().map(|c| &c.phase), Some(Phase::Resolving)));
            if !live {
                continue;
            }
            let end = match answer {
                Ok(addrs) => self.connect(idx, addrs[0]),
                Err(why) => {
                    let conn = self.conn(idx);
                    error!(
                        "#{} {} -> {}: cannot resolve: {why}",
                        conn.id, conn.client_addr, conn.dest
                    );
                    Some(self.refuse(idx, End::Unreachable, Rep::HostUnreachable))
                }
            };
            self.settle(idx, end);
        }
    }

    /// After an event or timer: finish the connection if it ended, else update epoll.
    fn settle(&mut self, idx: usize, end: Option<End>) {
        if let Some(end) = end {
            self.finish(idx, end);
        } else if self.conn(idx).finished() {
            self.finish(idx, End::Done);
        } else {
            self.rewatch(idx);
        }
    }

    /// Brings both sockets' epoll masks in line with what the connection waits for.
    fn rewatch(&mut self, idx: usize) {
        let gen = self.slots[idx].gen;
        let conn = self.slots[idx]
            .conn
            .as_mut()
            .expect("slot holds a connection");
        let out = |side: Side| match &conn.hs {
            Some(hs) if !hs.output[side as usize].is_empty() => epoll::OUT,
            _ => 0,
        };
        let (cm, um) = match &conn.phase {
            Phase::Socks => (epoll::IN | out(Side::Client), 0),
            Phase::Resolving => (0, 0),
            Phase::Connecting => (0, epoll::OUT),
            Phase::Proxy => (0, epoll::IN | out(Side::Upstream)),
            Phase::Flushing => (out(Side::Client), out(Side::Upstream)),
            Phase::Relay(_) => conn.relay_masks(),
            Phase::Sockmap(s) => s.masks(),
        };
        let mut res = conn
            .client
            .watch(&self.ep, conn_token(gen, idx, Side::Client), cm);
        if let (Ok(()), Some(up)) = (&res, conn.upstream.as_mut()) {
            res = up.watch(&self.ep, conn_token(gen, idx, Side::Upstream), um);
        }
        if let Err(e) = res {
            error!(
                "#{} {} -> {}: epoll: {e}",
                conn.id, conn.client_addr, conn.dest
            );
            self.finish(idx, End::Error);
        }
    }

    /// Closes a connection, logs its close line, frees its slot and resumes accepting.
    fn finish(&mut self, idx: usize, end: End) {
        let slot = &mut self.slots[idx];
        let Some(mut conn) = slot.conn.take() else {
            return;
        };
        slot.gen = slot.gen.wrapping_add(1) & GEN_MASK;
        self.free.push(idx);
        self.open -= 1;
        if conn.upstream.is_some() {
            self.up_ports[conn.up_port as usize] -= 1;
        }
        let off = match &self.plane {
            Plane::Sockmap(o) => Some(o),
            _ => None,
        };
        let (up, down) = conn.bytes(off);
        self.stats.closed_up += up;
        self.stats.closed_down += down;
        let plane = conn.plane();
        if let (Phase::Sockmap(s), Some(off)) = (&mut conn.phase, off) {
            for cookie in s.cookies() {
                self.watched.remove(&cookie);
            }
            s.stop(off);
        }
        if end.resets() && !conn.replied {
            let _ = socket::set_linger_zero(conn.client.fd());
        }
        if let (true, Some(up)) = (end.resets() || end == End::Loop, &conn.upstream) {
            let _ = socket::set_linger_zero(up.fd());
        }
        if end == End::Loop && !conn.replied {
            let _ = socket::set_linger_zero(conn.client.fd());
        }
        let secs = conn.started.elapsed().as_secs_f64();
        info!(
            "#{} {} -> {} closed: up={up} down={down} time={secs:.3}s plane={plane} end={end}",
            conn.id, conn.client_addr, conn.dest
        );
        drop(conn);
        if self.reserve.is_none() {
            self.reserve = open_reserve();
        }
        if !self.listening
            && self.reserve.is_some()
            && self.backoff_until.is_none()
            && self.open < self.cfg.max_conns
            && !self.stop
        {
            let _ = self.set_listening(true);
        }
    }

    fn run_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((t, token))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let (gen, idx, _) = split_token(token);
            let live = matches!(self.slots.get(idx), Some(s) if s.gen == gen && s.conn.is_some());
            if !live {
                continue;
            }
            let conn = self.slots[idx]
                .conn
                .as_mut()
                .expect("slot holds a connection");
            let Phase::Sockmap(s) = &mut conn.phase else {
                continue;
            };
            if !s.due(t) {
                continue; // a stale entry: the poll was rescheduled
            }
            let res = self.sockmap_step(idx, None);
            self.settle(idx, res);
        }
        if let Some(t) = self.backoff_until {
            if now >= t {
                self.backoff_until = None;
                if self.reserve.is_none() {
                    self.reserve = open_reserve();
                }
                if self.open < self.cfg.max_conns && self.reserve.is_some() {
                    let _ = self.set_listening(true);
                }
            }
        }
        if now >= self.next_sweep {
            self.next_sweep = now + SWEEP;
            self.sweep(now);
        }
        if self.next_scan.is_some_and(|t| now >= t) {
            self.next_scan = Some(now + SCAN);
            self.scan();
        }
    }

    /// Reads every sockmap counter in a few syscalls and polls the connections whose counters
    /// moved since the last scan: quiet directions keep no timer of their own.
    fn scan(&mut self) {
        let Plane::Sockmap(off) = &self.plane else {
            return;
        };
        let mut counters = Vec::with_capacity(self.watched.len());
        if off.counters(&mut counters).is_err() {
            return;
        }
        let mut woken = Vec::new();
        for (cookie, value) in counters {
            if let Some((token, last)) = self.watched.get_mut(&cookie) {
                if *last != value {
                    *last = value;
                    woken.push(*token);
                }
            }
        }
        for token in woken {
            let (gen, idx, _) = split_token(token);
            let live = matches!(self.slots.get(idx), Some(s) if s.gen == gen && matches!(s.conn.as_ref().map(|c| &c.phase), Some(Phase::Sockmap(_))));
            if live {
                let end = self.sockmap_step(idx, None);
                self.settle(idx, end);
            }
        }
    }

    /// Handshake and connect timeouts, idle timeouts and idle pipes.
    fn sweep(&mut self, now: Instant) {
        let idle = self.cfg.idle_timeout;
        for idx in 0..self.slots.len() {
            let off = match &self.plane {
                Plane::Sockmap(o) => Some(o),
                _ => None,
            };
            let Some(conn) = self.slots[idx].conn.as_mut() else {
                continue;
            };
            let mut end = None;
            if conn.deadline.is_some_and(|d| now >= d) {
                let what = match conn.phase {
                    Phase::Socks => "SOCKS5 handshake",
                    Phase::Resolving => "name lookup",
                    Phase::Connecting => "connect",
                    _ => "upstream handshake",
                };
                error!(
                    "#{} {} -> {}: {what}: timed out",
                    conn.id, conn.client_addr, conn.dest
                );
                end = Some(End::Timeout);
            }
            if let Phase::Relay(flows) = &mut conn.phase {
                if now.duration_since(conn.last_active) >= PIPE_IDLE {
                    flows.iter_mut().for_each(Flow::release);
                }
            }
            if let (Some(limit), None, None) = (idle, end, conn.deadline) {
                if let Phase::Sockmap(_) = conn.phase {
                    let (u, d) = conn.bytes(off);
                    if u + d != conn.seen_bytes {
                        conn.seen_bytes = u + d;
                        conn.last_active = now;
                    }
                }
                if now.duration_since(conn.last_active) >= limit {
                    debug!(
                        "#{} {} -> {}: idle for {}s, closing",
                        conn.id,
                        conn.client_addr,
                        conn.dest,
                        limit.as_secs()
                    );
                    end = Some(End::Idle);
                }
            }
            if let Some(end) = end {
                // A SOCKS client that has not finished its request expects no CONNECT reply.
                let requested = !matches!(conn.phase, Phase::Socks);
                let end = match end {
                    End::Timeout if requested => self.refuse(idx, end, Rep::TtlExpired),
                    e => e,
                };
                self.finish(idx, end);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens round-trip and keep sides and generations apart.
    #[test]
    fn token_round_trip() {
        for (gen, idx, side) in [
            (0, 0, Side::Client),
            (7, 12345, Side::Upstream),
            (GEN_MASK, (1 << 31) - 1, Side::Client),
        ] {
            let t = conn_token(gen, idx, side);
            assert_eq!(t & LISTENER_FLAG, 0);
            assert_ne!(t, SIGNAL_TOKEN);
            assert_eq!(split_token(t), (gen, idx, side));
        }
    }
}
