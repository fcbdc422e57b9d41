//! The single-threaded readiness loop: accept until `WouldBlock`, dispatch each epoll event by
//! its token — to connection setup (`setup`), the connection's relay on the data plane
//! (`plane`) or the UDP module (`udp`) — run timers (deadlines, relay polls, the plane's tick,
//! the sweep, UDP expiry), and shut down cleanly on SIGINT/SIGTERM. It knows no plane by name.
//!
//! Invariants: at most `--max-conns` connections are open (at the limit the listeners are taken
//! out of epoll and new connections wait in the kernel backlog); nothing blocks; every timer is
//! a deadline checked after each wakeup, so one slow connection never delays another.

use crate::accept::{Acceptor, Listener};
use crate::cli::{Config, ListenerKind};
use crate::conn::Conn;
use crate::conns::{Conns, Entry, Stage};
use crate::end::{End, Side};
use crate::loops::{self, UpPorts};
use crate::plane::{Handover, Plane};
use crate::resolve::{Answer, Resolver};
use crate::setup::{self, Setup, Step};
use crate::sock::{Pair, Sock};
use crate::socks5::{Dest, Rep};
use crate::stats::Stats;
use crate::sys::{self, epoll, socket};
use crate::target::Target;
use crate::token::Token;
use crate::udp::{self, Udp};
use crate::{debug, error, info};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

/// Accepts per listener wakeup, so a connection storm cannot starve established traffic.
const ACCEPT_BURST: usize = 64;
/// Setup deadlines, idle timeouts and idle pipes are checked this often.
const SWEEP: Duration = Duration::from_millis(250);
/// A relay that moved nothing for this long frees its buffers or pipes.
const RELAY_IDLE: Duration = Duration::from_secs(1);

/// The context setup works in: everything of `$s` (the `Server`) but its connections, so a
/// connection can be borrowed from `$s.conns` at the same time.
macro_rules! setup_ctx {
    ($s:ident) => {
        setup_ctx!($s, $s.resolver.as_ref(), $s.target.as_mut())
    };
    ($s:ident, $resolver:expr, $target:expr) => {
        setup::Ctx {
            cfg: &$s.cfg,
            resolver: $resolver,
            reserve: &mut $s.acceptor.reserve,
            up_ports: &mut $s.up_ports,
            target: $target,
            plane: &$s.plane,
            starved: None,
        }
    };
}

pub struct Server {
    ep: epoll::Epoll,
    signals: OwnedFd,
    acceptor: Acceptor,
    conns: Conns,
    cfg: Config,
    plane: Plane,
    stats: Stats,
    next_id: u64,
    /// Relay timers: (when, connection token). Stale entries are skipped (`Relay::due`).
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    next_sweep: Instant,
    stop: bool,
    /// Runs only when a SOCKS5 listener may ask for names, or the upstream proxy has one.
    resolver: Option<Resolver>,
    up_ports: UpPorts,
    /// The upstream proxy's address; `None` for `direct`.
    target: Option<Target>,
    udp: Udp,
}

/// What the UDP module borrows from `$s` (the `Server`) for one call.
macro_rules! udp_ctx {
    ($s:ident) => {
        udp::Ctx::new(&$s.ep, $s.resolver.as_ref(), $s.target.as_mut())
    };
}

impl Server {
    pub fn new(cfg: Config, listeners: Vec<Listener>, plane: Plane, udp: Udp) -> io::Result<Self> {
        let ep = epoll::Epoll::new(256)?;
        let signals = sys::signalfd(&[libc::SIGINT, libc::SIGTERM, libc::SIGUSR1])?;
        ep.add(signals.as_fd(), Token::Signal.encode(), epoll::IN)?;
        let names = cfg.upstream.server().is_some_and(Target::is_name);
        let socks = listeners.iter().any(|l| l.kind == ListenerKind::Socks);
        let resolver = match socks || names {
            true => {
                let r = Resolver::start()?;
                ep.add(r.fd(), Token::Resolver.encode(), epoll::IN)?;
                Some(r)
            }
            false => None,
        };
        let target = cfg
            .upstream
            .server()
            .map(|s| Target::new(s.clone(), resolver.as_ref()));
        let mut server = Server {
            ep,
            signals,
            acceptor: Acceptor::new(listeners),
            conns: Conns::default(),
            cfg,
            plane,
            stats: Stats::default(),
            next_id: 1,
            timers: BinaryHeap::new(),
            next_sweep: Instant::now() + SWEEP,
            stop: false,
            resolver,
            up_ports: UpPorts::default(),
            target,
            udp,
        };
        server.acceptor.set_listening(&server.ep, true)?;
        server.udp.start(&server.ep)?;
        Ok(server)
    }

    /// Runs until SIGINT or SIGTERM; then closes listeners and connections.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Vec::new();
        while !self.stop {
            let timeout = self.timeout_ms();
            self.ep.wait(&mut events, timeout)?;
            for ev in events.iter() {
                match Token::decode(ev.token) {
                    Some(Token::Signal) => self.on_signal()?,
                    Some(Token::Resolver) => self.on_resolved(),
                    Some(Token::Listener(li)) => self.on_accept(li),
                    Some(Token::Conn { gen, idx, side }) => {
                        self.on_conn_event(gen, idx, side, ev.events)
                    }
                    Some(Token::Udp(_)) => self.udp.event(udp_ctx!(self), ev.token, ev.events),
                    Some(Token::UpstreamName) | None => {}
                }
            }
            self.run_timers();
        }
        self.acceptor.listeners.clear();
        for idx in self.conns.indices() {
            self.finish(idx, End::Shutdown);
        }
        self.udp.shutdown();
        Ok(())
    }

    /// Milliseconds until the next deadline: a relay timer, the plane's tick, the sweep, or
    /// the end of an accept back-off.
    fn timeout_ms(&self) -> i32 {
        let mut next = self.next_sweep;
        if let Some(Reverse((t, _))) = self.timers.peek() {
            next = next.min(*t);
        }
        let udp = self.udp.deadline();
        for t in [self.acceptor.backoff_until, self.plane.next_tick(), udp]
            .into_iter()
            .flatten()
        {
            next = next.min(t);
        }
        let wait = next.saturating_duration_since(Instant::now());
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
        let open = self.conns.figures(&self.plane);
        let line = self.stats.line(open, &self.plane);
        crate::log::write(format_args!("{line}{}", self.udp.stats()));
    }

    fn on_accept(&mut self, li: usize) {
        for _ in 0..ACCEPT_BURST {
            if self.conns.open() >= self.cfg.max_conns {
                let _ = self.acceptor.set_listening(&self.ep, false);
                return;
            }
            match self.acceptor.accept(&self.ep, li, self.conns.open()) {
                Some((fd, peer)) => self.start(li, fd, peer),
                None => return,
            }
        }
    }

    /// Takes a freshly accepted connection: SOCKS clients start their handshake, redirected
    /// ones go straight to routing.
    fn start(&mut self, li: usize, client: OwnedFd, client_addr: SocketAddr) {
        let id = self.next_id;
        self.next_id += 1;
        self.stats.total += 1;
        let Some(l) = self.acceptor.listeners.get(li) else {
            return;
        };
        let kind = l.kind;
        let dest = match kind {
            ListenerKind::Redirect => socket::original_dst(client.as_fd(), l.addr.is_ipv6()),
            ListenerKind::Tproxy => socket::local_addr(client.as_fd()),
            // A SOCKS client names its destination in the request.
            ListenerKind::Socks => Ok(SocketAddr::from(([0, 0, 0, 0], 0))),
        };
        let dest = match (kind, dest) {
            (ListenerKind::Socks, _) => Dest::Domain("?".into(), 0),
            (_, Ok(d)) => Dest::Ip(d),
            (_, Err(e)) => {
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
        let conn = Conn::new(id, kind, Sock::new(client), client_addr, dest);
        let deadline = conn.started + self.cfg.handshake_timeout;
        let (setup, step) = Setup::start(kind, deadline);
        let idx = self.conns.insert(Entry {
            conn,
            stage: Stage::Setup(setup),
        });
        self.setup_step(idx, step);
    }

    /// Acts on what setup said: routing (after the loop checks), the data plane, an end, or
    /// waiting.
    fn setup_step(&mut self, idx: usize, step: Step) {
        let step = match step {
            Step::Route => self.route(idx),
            step => step,
        };
        match step {
            Step::Wait | Step::Route => self.settle(idx, None),
            Step::End(end) => self.finish(idx, end),
            Step::Ready => self.enter_plane(idx),
            Step::Associate => self.associate(idx),
        }
    }

    /// A SOCKS5 client asked for UDP ASSOCIATE: its connection leaves for the UDP module.
    fn associate(&mut self, idx: usize) {
        if let Some(entry) = self.conns.remove(idx) {
            let _ = self.ep.delete(entry.conn.client.fd());
            self.udp.adopt(udp_ctx!(self), entry);
        }
        let room = self.conns.open() < self.cfg.max_conns && !self.stop;
        self.acceptor.resume(&self.ep, room);
    }

    /// The destination is known: refuse loops, then resolve or connect.
    fn route(&mut self, idx: usize) -> Step {
        let own = match self.conns.get_mut(idx) {
            Some(e) => e.conn.client_addr,
            None => return Step::Wait,
        };
        let parent = loops::own_upstream(
            &self.up_ports,
            own,
            self.conns
                .iter()
                .filter_map(|e| Some((e.conn.id, e.conn.up_port, e.stage.upstream()?.fd()))),
        );
        let token = self.conns.token(idx, Side::Client);
        let Some(Entry { conn, stage }) = self.conns.get_mut(idx) else {
            return Step::Wait;
        };
        if let Dest::Ip(dest) = conn.dest {
            let listeners = &self.acceptor.listeners;
            if loops::to_listener(listeners, conn.inbound, &dest, conn.client.fd()) {
                error!(
                    "#{} {}: redirect loop (destination is a ksocks listener), refusing",
                    conn.id,
                    conn.route()
                );
                return Step::End(setup::refuse(conn, End::Loop, Rep::NotAllowed));
            }
        }
        if let Some(parent) = parent {
            error!(
                "#{} {}: proxy loop (the client is the upstream connection of #{parent}; exempt ksocks' own traffic from the redirect with --mark or --user), refusing",
                conn.id, conn.route()
            );
            return Step::End(setup::refuse(conn, End::Loop, Rep::NotAllowed));
        }
        let Stage::Setup(setup) = stage else {
            return Step::Wait;
        };
        let mut ctx = setup_ctx!(self);
        let step = setup.route(conn, &mut ctx, token);
        let starved = ctx.starved.take();
        self.starved(starved);
        step
    }

    /// Setup ran out of descriptors: pause accepting.
    fn starved(&mut self, e: Option<io::Error>) {
        if let Some(e) = e {
            self.acceptor.starve(&self.ep, &e, self.conns.open());
        }
    }

    /// Answers from the resolver thread.
    fn on_resolved(&mut self) {
        let Some(resolver) = &self.resolver else {
            return;
        };
        for answer in resolver.answers() {
            match Token::decode(answer.0) {
                Some(Token::UpstreamName) => {
                    let Some(target) = self.target.as_mut() else {
                        continue;
                    };
                    for token in target.answered(answer.1) {
                        self.on_upstream_resolved(token);
                    }
                }
                Some(Token::Conn { gen, idx, .. }) => self.on_name_resolved(gen, idx, answer),
                _ => self.udp.resolved(udp_ctx!(self), answer),
            }
        }
    }

    /// A SOCKS5 request's name was resolved (direct upstream): connect.
    fn on_name_resolved(&mut self, gen: u32, idx: usize, answer: Answer) {
        let Some(Entry {
            conn,
            stage: Stage::Setup(setup),
        }) = self.conns.live(gen, idx)
        else {
            return;
        };
        if setup.phase != setup::Phase::Resolving {
            return;
        }
        let mut ctx = setup_ctx!(self, None, None);
        let step = setup.resolved(conn, &mut ctx, answer);
        let starved = ctx.starved.take();
        self.starved(starved);
        self.setup_step(idx, step);
    }

    /// The upstream proxy's name was looked up: route the connection `token` that waited.
    fn on_upstream_resolved(&mut self, token: u64) {
        let Some(Token::Conn { gen, idx, .. }) = Token::decode(token) else {
            return self.udp.upstream_resolved(udp_ctx!(self), token);
        };
        match self.conns.live(gen, idx) {
            Some(Entry {
                stage: Stage::Setup(setup),
                ..
            }) if setup.phase == setup::Phase::Resolving => self.setup_step(idx, Step::Route),
            _ => {}
        }
    }

    fn on_conn_event(&mut self, gen: u32, idx: usize, side: Side, events: u32) {
        let Some(Entry { conn, stage }) = self.conns.live(gen, idx) else {
            return; // the connection was closed earlier in this batch
        };
        match stage {
            Stage::Setup(setup) => {
                let mut ctx = setup_ctx!(self);
                let step = setup.on_event(conn, &mut ctx, side, events);
                let starved = ctx.starved.take();
                self.starved(starved);
                self.setup_step(idx, step);
            }
            Stage::Relay { upstream, relay } => {
                let mut pair = Pair {
                    client: &mut conn.client,
                    upstream,
                };
                let end = relay.on_event(&mut self.plane, conn.id, &mut pair, side, events);
                self.settle(idx, end);
            }
        }
    }

    /// Handshakes are over and every early byte is out: enter the data plane and let the
    /// relay move what already arrived.
    fn enter_plane(&mut self, idx: usize) {
        let token = self.conns.token(idx, Side::Client);
        let Some(Entry { conn, stage }) = self.conns.get_mut(idx) else {
            return;
        };
        let Stage::Setup(setup) = stage else {
            return;
        };
        let rx_base = setup.read;
        let Some(mut upstream) = setup.upstream.take() else {
            error!(
                "#{} {}: internal error: no upstream socket after setup",
                conn.id,
                conn.route()
            );
            return self.finish(idx, End::Error);
        };
        let mut relay = self.plane.enter(&Handover {
            id: conn.id,
            token,
            client: conn.client.fd(),
            upstream: upstream.fd(),
            rx_base,
            what: &conn.route(),
        });
        let mut pair = Pair {
            client: &mut conn.client,
            upstream: &mut upstream,
        };
        let end = relay.step(&mut self.plane, conn.id, &mut pair, Instant::now());
        conn.last_active = Instant::now();
        *stage = Stage::Relay { upstream, relay };
        self.settle(idx, end);
    }

    /// After an event or timer: finish the connection if it ended, else update epoll and
    /// queue the relay's next timer.
    fn settle(&mut self, idx: usize, end: Option<End>) {
        let (ct, ut) = (
            self.conns.token(idx, Side::Client),
            self.conns.token(idx, Side::Upstream),
        );
        let Some(Entry { conn, stage }) = self.conns.get_mut(idx) else {
            return;
        };
        let done = matches!(stage, Stage::Relay { relay, .. } if relay.finished());
        if let Some(end) = end.or(done.then_some(End::Done)) {
            return self.finish(idx, end);
        }
        let ((cm, um), upstream) = match stage {
            Stage::Setup(s) => (s.masks(), s.upstream.as_mut()),
            Stage::Relay { upstream, relay } => {
                if let Some(t) = relay.next_timer() {
                    self.timers.push(Reverse((t, ct)));
                }
                (relay.masks(), Some(upstream))
            }
        };
        let mut res = conn.client.watch(&self.ep, ct, cm);
        if let (Ok(()), Some(up)) = (&res, upstream) {
            res = up.watch(&self.ep, ut, um);
        }
        if let Err(e) = res {
            error!("#{} {}: epoll: {e}", conn.id, conn.route());
            self.finish(idx, End::Error);
        }
    }

    /// Closes a connection, logs its close line, frees its slot and resumes accepting.
    fn finish(&mut self, idx: usize, end: End) {
        let Some(Entry { conn, mut stage }) = self.conns.remove(idx) else {
            return;
        };
        let (mut up, mut down) = (conn.pre[0], conn.pre[1]);
        let plane = match &mut stage {
            Stage::Setup(_) => "none",
            Stage::Relay { relay, upstream } => {
                let (u, d) = relay.bytes(&self.plane);
                (up, down) = (up + u, down + d);
                relay.stop(&mut self.plane, &conn, end, upstream);
                relay.name()
            }
        };
        self.stats.closed_up += up;
        self.stats.closed_down += down;
        let upstream = stage.upstream();
        if upstream.is_some() {
            self.up_ports.remove(conn.up_port);
        }
        let reset = end.resets() || end == End::Loop;
        if reset && !conn.replied {
            let _ = socket::set_linger_zero(conn.client.fd());
        }
        if let (true, Some(u)) = (reset, upstream) {
            let _ = socket::set_linger_zero(u.fd());
        }
        let secs = conn.started.elapsed().as_secs_f64();
        info!(
            "#{} {} closed: up={up} down={down} time={secs:.3}s plane={plane} end={end}",
            conn.id,
            conn.route()
        );
        drop(stage);
        drop(conn);
        let room = self.conns.open() < self.cfg.max_conns && !self.stop;
        self.acceptor.resume(&self.ep, room);
    }

    fn run_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((t, token))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            self.step_relay(token, Some(t), now);
        }
        let room = self.conns.open() < self.cfg.max_conns;
        self.acceptor.tick(&self.ep, now, room);
        if now >= self.next_sweep {
            self.next_sweep = now + SWEEP;
            self.sweep(now);
        }
        self.udp.expire(now);
        let mut wake = Vec::new();
        self.plane.tick(now, &mut wake);
        for token in wake {
            self.step_relay(token, None, now);
        }
    }

    /// Steps the relay of connection `token`: for its timer at `timer` (skipped if stale), or
    /// woken by the plane's tick.
    fn step_relay(&mut self, token: u64, timer: Option<Instant>, now: Instant) {
        let Some(Token::Conn { gen, idx, .. }) = Token::decode(token) else {
            return;
        };
        let Some(Entry {
            conn,
            stage: Stage::Relay { upstream, relay },
        }) = self.conns.live(gen, idx)
        else {
            return;
        };
        if timer.is_some_and(|t| !relay.due(t)) {
            return; // a stale entry: the poll was rescheduled
        }
        let mut pair = Pair {
            client: &mut conn.client,
            upstream,
        };
        let end = relay.step(&mut self.plane, conn.id, &mut pair, now);
        self.settle(idx, end);
    }

    /// Setup deadlines, idle timeouts and idle relays.
    fn sweep(&mut self, now: Instant) {
        let idle = self.cfg.idle_timeout;
        for idx in self.conns.indices() {
            let Some(Entry { conn, stage }) = self.conns.get_mut(idx) else {
                continue;
            };
            let end = match stage {
                Stage::Setup(s) if now >= s.deadline => {
                    if let (Some(t), Some(addr)) = (self.target.as_mut(), s.connecting_to()) {
                        t.connect_failed(addr, self.resolver.as_ref());
                    }
                    Some(s.timed_out(conn))
                }
                Stage::Setup(_) => None,
                Stage::Relay { relay, .. } => {
                    let (u, d) = relay.bytes(&self.plane);
                    if u + d != conn.seen_bytes {
                        conn.seen_bytes = u + d;
                        conn.last_active = now;
                    }
                    let quiet = now.duration_since(conn.last_active);
                    if quiet >= RELAY_IDLE {
                        relay.idle();
                    }
                    match idle {
                        Some(limit) if quiet >= limit => {
                            debug!(
                                "#{} {}: idle for {}s, closing",
                                conn.id,
                                conn.route(),
                                limit.as_secs()
                            );
                            Some(End::Idle)
                        }
                        _ => None,
                    }
                }
            };
            if let Some(end) = end {
                self.finish(idx, end);
            }
        }
    }
}
