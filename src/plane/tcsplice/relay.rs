//! One connection on the tcsplice plane. It starts in userspace (the splice plane's relay)
//! with both `flows` entries in OBSERVE, so the program learns each peer's timestamp clock;
//! at the first quiet moment it is handed to the program — BLOCK, freeze, SPLICE
//! (docs/TCSPLICE.md). Peers that never pause are held back first (the smallest window and
//! send buffer), for a bounded time. Once spliced, the relay watches the entries the plane's
//! scan reads: a RST, or FINs both ways acknowledged, ends it.
//!
//! Invariant: at every return the connection is in exactly one consistent state — entries in
//! OBSERVE (or BLOCK) with both sockets live and the userspace relay owning the bytes, or
//! entries in SPLICE with both sockets frozen and the program owning them; a handoff that
//! fails half way is undone to the first state before anything else runs.

use super::handoff::{self, Fallback, Held, Legs, Refusal};
use super::map::{Flow, FlowKey, Frozen, Seen, State};
use super::Plane;
use crate::end::{End, Side};
use crate::plane::timer::Queued;
use crate::plane::user;
use crate::sock::Pair;
use crate::sys::epoll;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

/// See `Relay::start`. Measured: with 0 (entries at once), 0.32x direct's connections/s
/// against 0.56x for the splice plane (bench/run --quick, wrk with `Connection: close`).
const ENTER_DELAY: Duration = Duration::from_millis(2);
const POLL_FIRST: Duration = Duration::from_millis(1);
const POLL_MAX: Duration = Duration::from_millis(16);
/// A silent peer is asked for an ACK at most this often, and this many times.
const PROBE_EVERY: Duration = Duration::from_millis(50);
const PROBES: u8 = 3;
/// A peer that answered none of them by this long after the last is not seen by the program.
const PROBE_WAIT: Duration = Duration::from_millis(1500);
/// Ready but not quiet for this long: hold the peers back.
const BUSY_WAIT: Duration = Duration::from_millis(100);
/// How long the peers may be held back before the connection stays in userspace.
const HOLD_MAX: Duration = Duration::from_secs(3);

pub(super) enum Phase {
    /// Just entered, in userspace; no entries before `at`.
    Fresh { at: Instant },
    /// In userspace, entries in OBSERVE, polling for a quiet moment.
    Observe {
        busy_since: Option<Instant>,
        poll: Duration,
        active: Instant,
        /// When a silent peer was last asked for an ACK (its timestamp clock), and how
        /// many times.
        probed: Option<Instant>,
        probes: u8,
    },
    /// Busy: the peers are held back (smallest window and send buffer) until a quiet
    /// moment comes.
    Hold { held: [Held; 2], until: Instant },
    /// Handed to the program; the router's sockets are frozen.
    Spliced {
        frozen: [Frozen; 2],
        /// Each FIN [client's, upstream peer's] that passed before the splice.
        fin_before: [bool; 2],
    },
    /// Stays in userspace.
    User,
}

pub struct Relay {
    /// The connection's number, for logs, and its event-loop token.
    pub(super) id: u64,
    pub token: u64,
    pub(super) user: user::Relay,
    pub(super) phase: Phase,
    /// `None` when the connection was refused at entry.
    pub(super) legs: Option<Legs>,
    /// Whether its entries are in the map, and whether the plane has yet to learn of them.
    pub(super) installed: bool,
    new_keys: bool,
    /// What the program saw last of [the client's packets, the upstream peer's packets].
    pub seen: [Seen; 2],
    pub(super) want: Option<Instant>,
    scheduled: Queued,
    /// A fallback decided and not yet counted by the plane.
    pub fallback: Option<Refusal>,
    /// Whether a fallback was ever decided (the close counts `early` otherwise).
    pub(super) fell_back: bool,
    /// What the handoff was waiting for at the last step (the detail of an `early` close).
    pub(super) waiting: &'static str,
    /// Test hook `late`: until when the client's entry is back in OBSERVE.
    #[cfg(feature = "test-hooks")]
    pub(super) late_until: Option<Instant>,
}

/// The two keys of a connection: [the client's packets, the upstream peer's packets].
pub fn keys(l: &Legs) -> [FlowKey; 2] {
    [
        FlowKey {
            src: l.client,
            dst: l.client_dst,
        },
        FlowKey {
            src: l.server,
            dst: l.local,
        },
    ]
}

impl Relay {
    /// Starts a connection in userspace; `ENTER_DELAY` later (most short connections are over
    /// by then, at the cost of a timer) it installs its entries and looks for a quiet moment.
    pub fn start(id: u64, token: u64, now: Instant) -> Relay {
        Relay {
            id,
            token,
            user: user::Relay::splice(crate::plane::PIPE_BYTES),
            phase: Phase::Fresh {
                at: now + ENTER_DELAY,
            },
            legs: None,
            installed: false,
            new_keys: false,
            seen: [Seen::default(); 2],
            want: None,
            scheduled: Queued::default(),
            fallback: None,
            fell_back: false,
            waiting: "its entries (2 ms after entry)",
            #[cfg(feature = "test-hooks")]
            late_until: None,
        }
    }

    /// Checks that the connection can be spliced and puts its OBSERVE entries in the map.
    fn install(&mut self, p: &mut Plane, pair: &Pair, now: Instant) {
        let (a, b) = pair.fds();
        let legs = match handoff::check(a, b, p.mss, p.ct.as_mut()) {
            Ok(l) => l,
            Err(why) => return self.fall_back(why),
        };
        for (i, k) in keys(&legs).iter().enumerate() {
            let Some(key) = k.encode() else {
                return self.fall_back((Fallback::Family, format!("{} -> {}", k.src, k.dst)));
            };
            if let Err(e) = p.kernel.insert(&key, &Flow::observe(k)) {
                if i == 1 {
                    let _ = keys(&legs)[0].encode().map(|k| p.kernel.delete(&k));
                }
                let why = match e.raw_os_error() {
                    Some(libc::E2BIG) => (Fallback::MapFull, "flows map full".into()),
                    _ => (Fallback::Error, format!("flows map: {e}")),
                };
                return self.fall_back(why);
            }
        }
        (self.installed, self.new_keys, self.legs) = (true, true, Some(legs));
        self.phase = Phase::Observe {
            busy_since: None,
            poll: POLL_FIRST,
            active: now,
            probed: None,
            probes: 0,
        };
    }

    /// The keys of entries installed since the last call, for the plane's scan.
    pub fn new_keys(&mut self) -> Option<[FlowKey; 2]> {
        match std::mem::take(&mut self.new_keys) {
            true => self.keys(),
            false => None,
        }
    }

    /// The connection's keys, once its entries are installed.
    pub fn keys(&self) -> Option<[FlowKey; 2]> {
        self.legs.as_ref().filter(|_| self.installed).map(keys)
    }

    pub fn is_spliced(&self) -> bool {
        matches!(self.phase, Phase::Spliced { .. })
    }

    fn fall_back(&mut self, why: Refusal) {
        self.phase = Phase::User;
        self.fallback = Some(why);
        self.fell_back = true;
        self.want = None;
    }

    pub fn name(&self) -> &'static str {
        match self.phase {
            Phase::Spliced { .. } => "tcsplice",
            _ => self.user.name(),
        }
    }

    /// Bytes moved (client -> upstream, upstream -> client): the userspace relay's, plus
    /// the program's once spliced.
    pub fn bytes(&self) -> (u64, u64) {
        let (up, down) = self.user.bytes();
        match &self.phase {
            Phase::Spliced { frozen: [a, b], .. } => (
                up + self.seen[0].moved(a.rcv_nxt),
                down + self.seen[1].moved(b.rcv_nxt),
            ),
            _ => (up, down),
        }
    }

    pub fn masks(&self) -> (u32, u32) {
        match self.phase {
            Phase::Spliced { .. } => (0, 0),
            _ => self.user.masks(),
        }
    }

    /// A spliced connection ends by its entries, so the userspace half never finishes it.
    pub fn finished(&self) -> bool {
        !self.is_spliced() && self.user.finished()
    }

    pub fn idle(&mut self) {
        self.user.release();
    }

    pub fn on_event(&mut self, pair: &mut Pair, side: Side, events: u32) -> Option<End> {
        if self.is_spliced() {
            // A frozen socket hears nothing; a hang-up (a stray RST) must not spin epoll.
            if events & epoll::HUP != 0 {
                pair.sock(side).hup = true;
            }
            return None;
        }
        let end = self.user.on_event(pair, side, events);
        if let Phase::Observe { poll, active, .. } = &mut self.phase {
            let now = Instant::now();
            (*poll, *active) = (POLL_FIRST, now);
            self.want.get_or_insert(now + POLL_FIRST);
        }
        end
    }

    /// Advances the handoff (on its timer), or checks how a spliced flow is doing.
    pub fn step(&mut self, p: &mut Plane, pair: &mut Pair, now: Instant) -> Option<End> {
        match self.phase {
            Phase::Fresh { .. } if self.user.finished() => None,
            Phase::Fresh { at } if now < at => {
                self.want = Some(at);
                None
            }
            Phase::Fresh { .. } => {
                self.install(p, pair, now);
                self.step(p, pair, now)
            }
            Phase::Observe { .. } => self.observe(p, pair, now),
            Phase::Hold { .. } => self.holding(p, pair, now),
            Phase::Spliced { .. } => self.watch(p, now),
            Phase::User => None,
        }
    }

    /// Reads both entries; `None` (and a fallback) when they cannot be read.
    pub(super) fn read_seen(&mut self, p: &mut Plane) -> Option<[Seen; 2]> {
        let ks = self.keys()?;
        let mut out = [Seen::default(); 2];
        for (k, o) in ks.iter().zip(out.iter_mut()) {
            match k.encode().map(|key| p.kernel.read(&key, k.src.is_ipv6())) {
                Some(Ok(f)) => *o = f.seen,
                Some(Err(e)) => {
                    self.abandon(p, None, None, (Fallback::Error, format!("flows map: {e}")));
                    return None;
                }
                None => return None,
            }
        }
        Some(out)
    }

    /// Whether both sockets hold no byte of the stream and are in a state a splice can
    /// take over, and the userspace relay holds nothing either.
    pub(super) fn quiet(&self, pair: &Pair) -> bool {
        let (a, b) = pair.fds();
        let [ea, eb] = self.user.eof();
        self.user.settled()
            && !self.user.finished()
            && matches!(
                (handoff::quiet(a, ea), handoff::quiet(b, eb)),
                (Ok(true), Ok(true))
            )
    }

    fn observe(&mut self, p: &mut Plane, pair: &mut Pair, now: Instant) -> Option<End> {
        if self.user.finished() {
            return None;
        }
        let seen = self.read_seen(p)?;
        let quiet = self.quiet(pair);
        let synchronized = handoff::synchronized(pair.fds().1);
        let Phase::Observe {
            busy_since,
            poll,
            active,
            probed,
            probes,
        } = &mut self.phase
        else {
            return None;
        };
        // No probe, hold or splice before the upstream peer surely has the connection (see
        // handoff::synchronized); data from either side settles it, so after a while without
        // any the next event wakes the connection rather than a timer.
        if !synchronized {
            self.waiting = "the upstream peer to acknowledge data";
            *busy_since = None;
            if now.duration_since(*active) < PROBE_WAIT {
                self.want = Some(now + *poll);
                *poll = (*poll * 2).min(POLL_MAX);
            }
            return None;
        }
        // Each peer must have been seen by the program since the entries went in: its
        // timestamp clock is needed. A peer that stays silent once the relay has nothing to
        // move (its bytes may all have come before the entries did) is asked for an ACK, at
        // most every PROBE_EVERY.
        let unseen = seen.map(|s| s.packets == 0);
        if unseen.contains(&true) {
            self.waiting = match unseen {
                [true, true] => "a packet of both peers in the program",
                [true, false] => "a packet of the client in the program",
                _ => "a packet of the upstream peer in the program",
            };
            *busy_since = None;
            // Unanswered: a keepalive probe (half-closed sockets) goes out a second late.
            if *probes == PROBES && probed.is_some_and(|t| now.duration_since(t) >= PROBE_WAIT) {
                let who = if unseen[0] { "client" } else { "upstream peer" };
                let why = format!("no packet of the {who} reached the program: not behind a --splice-dev, or on this host");
                self.abandon(p, Some(pair.fds()), None, (Fallback::Local, why));
                return None;
            }
            let due = probed.map_or(true, |t| now.duration_since(t) >= PROBE_EVERY);
            if self.user.settled() && due && *probes < PROBES {
                (*probed, *probes) = (Some(now), *probes + 1);
                let (a, b) = pair.fds();
                for (fd, _) in [a, b].into_iter().zip(unseen).filter(|(_, u)| *u) {
                    let _ = handoff::probe(fd);
                }
            }
            let last = probed.map_or(*active, |t| t.max(*active));
            if now.duration_since(last) < PROBE_WAIT + POLL_MAX {
                self.want = Some(now + *poll);
                *poll = (*poll * 2).min(POLL_MAX);
            }
            return None;
        }
        if probed.take().is_some() {
            let (a, b) = pair.fds();
            handoff::no_keepalive(a);
            handoff::no_keepalive(b);
        }
        if quiet {
            return self.block(p, pair, now);
        }
        self.waiting = "a quiet moment";
        let since = *busy_since.get_or_insert(now);
        if now.duration_since(since) < BUSY_WAIT {
            // Settled, but a peer has yet to ACK what it got: ask it now rather than wait
            // for its delayed ACK (which a request/response client may never send alone).
            if self.user.settled() {
                let (a, b) = pair.fds();
                for fd in [a, b].into_iter().filter(|fd| handoff::awaits_ack(*fd)) {
                    let _ = handoff::ask_ack(fd);
                }
            }
            self.want = Some(now + *poll);
            *poll = (*poll * 2).min(POLL_MAX);
            return None;
        }
        let (a, b) = pair.fds();
        match (handoff::hold(a), handoff::hold(b)) {
            (Ok(ha), Ok(hb)) => {
                crate::debug!(
                    "#{} tcsplice: busy for {BUSY_WAIT:?}, holding the peers back",
                    self.id
                );
                self.phase = Phase::Hold {
                    held: [ha, hb],
                    until: now + HOLD_MAX,
                };
                self.want = Some(now + POLL_FIRST);
            }
            (ha, hb) => {
                let mut e = String::new();
                for (fd, h) in [(a, ha), (b, hb)] {
                    match h {
                        Ok(h) => handoff::unhold(fd, h),
                        Err(err) => e = err.to_string(),
                    }
                }
                self.abandon(
                    p,
                    None,
                    None,
                    (Fallback::Error, format!("window clamp: {e}")),
                );
            }
        }
        None
    }

    /// Busy peers held back: waits (bounded) for a quiet moment.
    fn holding(&mut self, p: &mut Plane, pair: &mut Pair, now: Instant) -> Option<End> {
        let Phase::Hold { held, until } = self.phase else {
            return None;
        };
        if self.quiet(pair) {
            return self.block(p, pair, now);
        }
        self.waiting = "a quiet moment, the peers held back";
        if now >= until || self.user.finished() {
            let why = format!("no quiet moment in {HOLD_MAX:?} with the peers held back");
            self.abandon(p, Some(pair.fds()), Some(held), (Fallback::Busy, why));
            return None;
        }
        self.want = Some(now + POLL_FIRST);
        None
    }

    /// At a quiet moment: blocks the flow and, if nothing arrived meanwhile, splices it;
    /// otherwise unblocks at once (whatever BLOCK dropped in those microseconds is
    /// retransmitted by its sender) and waits for the next quiet moment.
    fn block(&mut self, p: &mut Plane, pair: &mut Pair, now: Instant) -> Option<End> {
        let held = match self.phase {
            Phase::Hold { held, .. } => Some(held),
            _ => None,
        };
        for k in self.keys().into_iter().flatten() {
            if let Err(e) = p.kernel.set_state(&k, State::Block) {
                let why = (Fallback::Error, format!("BLOCK: {e}"));
                self.abandon(p, Some(pair.fds()), held, why);
                return None;
            }
        }
        if self.quiet(pair) {
            let end = self.splice(p, pair, held);
            if self.is_spliced() || matches!(self.phase, Phase::User) {
                return end;
            }
        }
        for k in self.keys().into_iter().flatten() {
            let _ = p.kernel.set_state(&k, State::Observe);
        }
        self.waiting = "a quiet moment (one ended in BLOCK)";
        self.want = Some(now + POLL_FIRST);
        None
    }

    /// Gives up on the handoff for good: entries back to OBSERVE (they stay until the
    /// close, harmless), the peers no longer held, the connection relayed in userspace.
    pub(super) fn abandon(
        &mut self,
        p: &mut Plane,
        fds: Option<(BorrowedFd, BorrowedFd)>,
        held: Option<[Held; 2]>,
        why: Refusal,
    ) {
        for k in self.keys().into_iter().flatten() {
            let _ = p.kernel.set_state(&k, State::Observe);
        }
        if let Some((a, b)) = fds {
            handoff::no_keepalive(a);
            handoff::no_keepalive(b);
            if let Some([ha, hb]) = held {
                handoff::unhold(a, ha);
                handoff::unhold(b, hb);
            }
        }
        self.fall_back(why);
    }

    /// Whether the queued timer at `t` is the current one (the heap keeps stale entries).
    pub fn due(&mut self, t: Instant) -> bool {
        self.scheduled.due(t)
    }

    /// The next timer to queue, if it is earlier than the one already queued. A wish that is
    /// not queued now stays, to be offered again.
    pub fn next_timer(&mut self) -> Option<Instant> {
        let queued = self.scheduled.offer(self.want?);
        if queued.is_some() {
            self.want = None;
        }
        queued
    }
}
