//! The data-plane interface: the plane chosen at start (`Plane`, with whatever kernel state it
//! holds) and one connection's relay on it (`Relay`). The event loop only calls these; every
//! plane name is matched here and nowhere else, so a new plane is one new module plus one arm
//! per method below.
//!
//! Why two enums rather than a trait object: the planes are known at compile time and few;
//! a connection's relay needs its plane's shared state (the sockmap's maps and counters
//! scan), which an enum pair hands over without `Rc`/`RefCell` or a `Box<dyn>` per
//! connection; and a reader sees every plane's answer to each question side by side.
//!
//! Fallbacks go through the same interface: `Plane::enter` hands back a copy relay when the
//! kernel refuses a connection, a sockmap relay finishes a direction in userspace when the
//! kernel refuses it later, and a splice flow turns into a copy when splice(2) refuses.
//!
//! Invariant: a `Relay::Sockmap` (`Relay::Tcsplice`) is made only by `Plane::Sockmap`
//! (`Plane::Tcsplice`), so its plane state is always there; were it not, the connection is
//! reset with a log line, never a panic.

pub mod flow;
pub mod sockmap;
pub mod tcsplice;
pub mod timer;
pub mod user;

use crate::cli::{Config, Dataplane};
use crate::conn::Conn;
use crate::end::{End, Side};
use crate::error;
use crate::sock::{Pair, Sock};
use crate::sys::cap;
use std::fmt::Display;
use std::io;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::time::Instant;

/// Pipe capacity for the splice plane: the kernel's default of 16 pages.
pub const PIPE_BYTES: usize = 16 * 4096;
/// Every relay name, in the stats line's order.
pub const NAMES: [&str; 4] = ["copy", "splice", "sockmap", "tcsplice"];
/// Every fallback reason, in the stats line's order (`fallback_<reason>=`).
pub const FALLBACKS: [&str; 10] = [
    "map_full",
    "unsupported",
    "error",
    "no_wakeup",
    "busy",
    "options",
    "family",
    "mss",
    "local",
    "early",
];

/// A connection handed to its plane once setup is done.
pub struct Handover<'a> {
    pub id: u64,
    /// Its event loop token, for the plane's tick to wake it.
    pub token: u64,
    pub client: BorrowedFd<'a>,
    pub upstream: BorrowedFd<'a>,
    /// Bytes the handshakes read from [client, upstream].
    pub rx_base: [u64; 2],
    /// `client -> destination`, for log lines.
    pub what: &'a dyn Display,
}

/// The data plane new connections enter after their handshakes.
pub enum Plane {
    Copy { buffer: usize },
    Splice,
    Sockmap(Box<sockmap::Plane>),
    Tcsplice(Box<tcsplice::Plane>),
}

/// One connection's relay.
pub enum Relay {
    /// Copy or splice: both directions in userspace.
    User(user::Relay),
    Sockmap(Box<sockmap::Spliced>),
    Tcsplice(Box<tcsplice::Relay>),
}

impl Plane {
    /// Picks the data plane. An explicit `sockmap` is loaded and self-tested, and fails
    /// start-up with the reason when it cannot run.
    pub fn choose(cfg: &Config) -> Result<Plane, String> {
        let buffer = cfg.buffer_size;
        Ok(match cfg.dataplane {
            Dataplane::Copy => Plane::Copy { buffer },
            Dataplane::Splice => Plane::Splice,
            Dataplane::Sockmap => {
                let max_sockets = u32::try_from(cfg.max_conns * 2).unwrap_or(u32::MAX);
                let tuning = sockmap::Tuning {
                    buffer,
                    inflight_max: cfg.inflight_max,
                    sndbuf: cfg.sndbuf,
                };
                Plane::Sockmap(Box::new(
                    sockmap::Plane::load(max_sockets, tuning)
                        .map_err(|why| format!("sockmap data plane unavailable: {why}"))?,
                ))
            }
            Dataplane::Tcsplice => Plane::Tcsplice(Box::new(
                tcsplice::Plane::load(&cfg.splice_devs, cfg.max_conns)
                    .map_err(|why| format!("tcsplice data plane unavailable: {why}"))?,
            )),
            // Measured (README, bench/): on this kind of machine splice moved bulk data faster
            // than sockmap at the same latency and whole-system CPU, with exact backpressure
            // of its own; sockmap's one advantage was near-zero CPU in the proxy process. So
            // `auto` is splice, and sockmap is there for whoever wants the kernel to do all
            // of it. splice(2) exists on every kernel a router runs; a socket it refuses is
            // copied.
            Dataplane::Auto => Plane::Splice,
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Plane::Copy { .. } => "copy",
            Plane::Splice => "splice",
            Plane::Sockmap(_) => "sockmap",
            Plane::Tcsplice(_) => "tcsplice",
        }
    }

    /// Sets what the plane needs on a listening socket before connections arrive (tcsplice:
    /// the segment size both legs are held to).
    pub fn prepare_listener(&self, fd: BorrowedFd, addr: &SocketAddr) -> io::Result<()> {
        match self {
            Plane::Tcsplice(p) => p.hold_mss(fd, addr),
            Plane::Copy { .. } | Plane::Splice | Plane::Sockmap(_) => Ok(()),
        }
    }

    /// Sets what the plane needs on an upstream socket before it connects to `target`.
    pub fn prepare_upstream(&self, fd: BorrowedFd, target: &SocketAddr) -> io::Result<()> {
        match self {
            Plane::Tcsplice(p) => p.hold_mss(fd, target),
            Plane::Copy { .. } | Plane::Splice | Plane::Sockmap(_) => Ok(()),
        }
    }

    /// Starts a connection on this plane. Never fails: a connection the kernel refuses is
    /// copied.
    pub fn enter(&mut self, h: &Handover) -> Relay {
        match self {
            Plane::Copy { buffer } => Relay::User(user::Relay::copy(*buffer)),
            Plane::Splice => Relay::User(user::Relay::splice(PIPE_BYTES)),
            Plane::Sockmap(p) => match p.enter(h) {
                Some(s) => Relay::Sockmap(s),
                None => Relay::User(user::Relay::copy(p.tuning_buffer())),
            },
            Plane::Tcsplice(p) => Relay::Tcsplice(p.enter(h.id, h.token)),
        }
    }

    /// Capabilities the plane needs after start-up, kept by `--user` (`sys::cap`).
    pub fn capabilities(&self) -> &'static [u32] {
        match self {
            Plane::Copy { .. } | Plane::Splice | Plane::Sockmap(_) => &[],
            // TCP_REPAIR, IP_TRANSPARENT, ctnetlink and tc filters on the way out.
            Plane::Tcsplice(_) => &[cap::NET_ADMIN],
        }
    }

    /// When the plane next wants `tick`.
    pub fn next_tick(&self) -> Option<Instant> {
        match self {
            Plane::Sockmap(p) => p.next_tick(),
            Plane::Tcsplice(p) => p.next_tick(),
            Plane::Copy { .. } | Plane::Splice => None,
        }
    }

    /// The plane's periodic work; adds the tokens of connections to step to `wake`.
    pub fn tick(&mut self, now: Instant, wake: &mut Vec<u64>) {
        match self {
            Plane::Sockmap(p) => p.tick(now, wake),
            Plane::Tcsplice(p) => p.tick(now, wake),
            Plane::Copy { .. } | Plane::Splice => {}
        }
    }

    /// (reason, count) of connections or directions left in userspace, for the stats line:
    /// every reason of `FALLBACKS`, those of other planes at 0.
    pub fn fallbacks(&self) -> [(&'static str, u64); FALLBACKS.len()] {
        let mut out = FALLBACKS.map(|name| (name, 0));
        let mut add = |name: &str, n: u64| {
            if let Some(o) = out.iter_mut().find(|(r, _)| *r == name) {
                o.1 += n;
            }
        };
        match self {
            Plane::Sockmap(p) => {
                for f in sockmap::Fallback::ALL {
                    add(f.name(), p.fallbacks[f as usize]);
                }
            }
            Plane::Tcsplice(p) => {
                for f in tcsplice::Fallback::ALL {
                    add(f.name(), p.fallbacks[f as usize]);
                }
            }
            Plane::Copy { .. } | Plane::Splice => {}
        }
        out
    }

    /// Entries in the plane's BPF maps (0 without any).
    pub fn map_entries(&self) -> usize {
        match self {
            Plane::Sockmap(p) => p.kernel.entries(),
            Plane::Tcsplice(p) => p.entries(),
            Plane::Copy { .. } | Plane::Splice => 0,
        }
    }
}

/// The tcsplice state behind a tcsplice relay, or the error end of a broken invariant.
fn tcsplice_of(plane: &mut Plane, id: u64) -> Result<&mut tcsplice::Plane, End> {
    match plane {
        Plane::Tcsplice(p) => Ok(p),
        _ => {
            error!("#{id}: internal error: a tcsplice connection without the tcsplice plane; resetting it");
            Err(End::Error)
        }
    }
}

/// The sockmap state behind a sockmap relay, or the error end of a broken invariant.
fn sockmap_of(plane: &mut Plane, id: u64) -> Result<&mut sockmap::Plane, End> {
    match plane {
        Plane::Sockmap(p) => Ok(p),
        _ => {
            error!("#{id}: internal error: a sockmap connection without the sockmap plane; resetting it");
            Err(End::Error)
        }
    }
}

impl Relay {
    /// The plane this connection is on now, for the close line and stats.
    pub fn name(&self) -> &'static str {
        match self {
            Relay::User(r) => r.name(),
            Relay::Sockmap(_) => "sockmap",
            Relay::Tcsplice(r) => r.name(),
        }
    }

    /// Readiness of one side's socket.
    pub fn on_event(
        &mut self,
        plane: &mut Plane,
        id: u64,
        pair: &mut Pair,
        side: Side,
        events: u32,
    ) -> Option<End> {
        match self {
            Relay::User(r) => r.on_event(pair, side, events),
            Relay::Sockmap(s) => {
                let p = match sockmap_of(plane, id) {
                    Ok(p) => p,
                    Err(end) => return Some(end),
                };
                let end = s.on_event(&p.kernel, id, pair, side, events);
                p.count_fallback(s);
                end
            }
            Relay::Tcsplice(r) => r.on_event(pair, side, events),
        }
    }

    /// Advances without an event: right after `enter`, when a timer this relay asked for is
    /// due, or when the plane's tick woke it.
    pub fn step(
        &mut self,
        plane: &mut Plane,
        id: u64,
        pair: &mut Pair,
        now: Instant,
    ) -> Option<End> {
        match self {
            Relay::User(_) => None,
            Relay::Sockmap(s) => {
                let p = match sockmap_of(plane, id) {
                    Ok(p) => p,
                    Err(end) => return Some(end),
                };
                let end = s.step(&p.kernel, id, pair, now);
                p.count_fallback(s);
                end
            }
            Relay::Tcsplice(r) => {
                let p = match tcsplice_of(plane, id) {
                    Ok(p) => p,
                    Err(end) => return Some(end),
                };
                let end = p.step(r, pair, now);
                p.count(id, r);
                end
            }
        }
    }

    /// Epoll interest (client, upstream).
    pub fn masks(&self) -> (u32, u32) {
        match self {
            Relay::User(r) => r.masks(),
            Relay::Sockmap(s) => s.masks(),
            Relay::Tcsplice(r) => r.masks(),
        }
    }

    /// Bytes moved on the plane (client -> upstream, upstream -> client).
    pub fn bytes(&self, plane: &Plane) -> (u64, u64) {
        match (self, plane) {
            (Relay::User(r), _) => r.bytes(),
            (Relay::Sockmap(s), Plane::Sockmap(p)) => s.bytes(&p.kernel),
            (Relay::Sockmap(_), _) => (0, 0),
            (Relay::Tcsplice(r), _) => r.bytes(),
        }
    }

    /// Both directions passed their end of stream on.
    pub fn finished(&self) -> bool {
        match self {
            Relay::User(r) => r.finished(),
            Relay::Sockmap(s) => s.finished(),
            Relay::Tcsplice(r) => r.finished(),
        }
    }

    /// Leaves the plane; called once, just before the sockets of `conn` are closed, with how
    /// it ended.
    pub fn stop(&mut self, plane: &mut Plane, conn: &Conn, end: End, upstream: &Sock) {
        match (self, plane) {
            (Relay::Sockmap(s), Plane::Sockmap(p)) => p.stop(s),
            (Relay::Tcsplice(r), Plane::Tcsplice(p)) => {
                p.stop(conn.id, r, end, (conn.client.fd(), upstream.fd()))
            }
            _ => {}
        }
    }

    /// The connection has been idle a while: free what only moving bytes need.
    pub fn idle(&mut self) {
        match self {
            Relay::User(r) => r.release(),
            Relay::Tcsplice(r) => r.idle(),
            Relay::Sockmap(_) => {}
        }
    }

    /// A timer to queue, if the relay wants one earlier than the one it has queued.
    pub fn next_timer(&mut self) -> Option<Instant> {
        match self {
            Relay::Sockmap(s) => s.next_timer(),
            Relay::Tcsplice(r) => r.next_timer(),
            Relay::User(_) => None,
        }
    }

    /// Whether the queued timer at `t` is the current one (the queue keeps stale entries).
    pub fn due(&mut self, t: Instant) -> bool {
        match self {
            Relay::Sockmap(s) => s.due(t),
            Relay::Tcsplice(r) => r.due(t),
            Relay::User(_) => false,
        }
    }
}
