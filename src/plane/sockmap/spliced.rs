//! One connection on the sockmap plane: both sockets in the BPF sockmap, bytes moved by the
//! `sk_skb` programs, userspace only watching for the end and keeping the books (`books`),
//! one state machine per direction (`direction`).
//!
//! This file decides when a direction's source joins the hook map. Where the kernel wakes
//! every redirect target when its send buffer frees (`Wakeup::Always`), each direction joins
//! as soon as its source is drained. Where it wakes only sockets that joined the hook map
//! once (`Wakeup::HookedOnly`, Linux 5.10), a direction may run in the kernel only towards
//! such a socket: the two sockets join together, when both directions are drained; and if
//! dst can never join (its own direction ended in userspace: its FIN came first, or the
//! kernel refused it), src -> dst stays in userspace for good (`Fallback::NoWakeup`).
//!
//! Invariant: with `Wakeup::HookedOnly`, a direction is in the kernel only while `armed[dst]`
//! (dst joined the hook map once, so it carries the psock's write-space callback), apart from
//! the instant between the two insertions of a joint hook, after which dst is kicked.

use super::books::{Bases, SendTotal};
use super::direction::{hook_and_kick, Ctx, Dir, Next, State};
use super::kernel::Kernel;
use super::wake::Wakeup;
use crate::debug;
use crate::end::{broken_end, reset_of, End, Side};
use crate::plane::timer::Queued;
use crate::sock::Pair;
use crate::sys::{epoll, socket};
use std::io;
use std::os::fd::BorrowedFd;
use std::time::Instant;

/// Why a connection or one direction stayed in userspace, for the stats line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// `E2BIG`: the maps are full.
    MapFull,
    /// `EOPNOTSUPP`: the socket is no longer ESTABLISHED (its FIN arrived first), or MPTCP.
    Unsupported,
    /// Anything else.
    Error,
    /// The destination never joined the hook map and the kernel would not wake it on write
    /// space (`Wakeup::HookedOnly`): the direction towards it stays in userspace.
    NoWakeup,
}

/// Counts by `Fallback`.
pub type Fallbacks = [u64; Fallback::ALL.len()];

impl Fallback {
    pub const ALL: [Fallback; 4] = [
        Fallback::MapFull,
        Fallback::Unsupported,
        Fallback::Error,
        Fallback::NoWakeup,
    ];

    pub fn of(e: &io::Error) -> Fallback {
        match e.raw_os_error() {
            Some(libc::E2BIG) => Fallback::MapFull,
            Some(libc::EOPNOTSUPP) => Fallback::Unsupported,
            _ => Fallback::Error,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Fallback::MapFull => "map_full",
            Fallback::Unsupported => "unsupported",
            Fallback::Error => "error",
            Fallback::NoWakeup => "no_wakeup",
        }
    }
}

/// Settings of the plane, from the command line.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// Userspace buffer per direction (`--buffer-size`).
    pub buffer: usize,
    /// Bytes one direction may have in dst's psock queue before src is paused.
    pub inflight_max: u64,
    /// `SO_SNDBUF` of both sockets, 0 for the kernel's autotuning (`--sndbuf`).
    pub sndbuf: usize,
}

pub struct Spliced {
    id: u64,
    cookies: [u64; 2],
    /// [client -> upstream, upstream -> client]; direction `d`'s source is socket `d`.
    dirs: [Dir; 2],
    /// Socket `i` (client, upstream) joined the hook map once: it carries the psock's
    /// write-space callback for good (`wake`).
    armed: [bool; 2],
    wakeup: Wakeup,
    inflight_max: u64,
    /// The poll the event loop has queued for this connection.
    scheduled: Queued,
    /// Directions the kernel refused, not yet counted in the plane's stats.
    pub fallbacks: Fallbacks,
    stopped: bool,
    /// The plane scans the counters map for activity, so a quiet direction needs no timer of
    /// its own.
    scanned: bool,
}

/// Sides in direction order: index 0 is client -> upstream.
fn src_of(dir: usize) -> Side {
    if dir == 0 {
        Side::Client
    } else {
        Side::Upstream
    }
}

impl Spliced {
    /// Pairs the two sockets in the redirect map; the directions start in userspace and move
    /// to the kernel once each source is drained. `Err` is the reason this connection falls
    /// back to the copy plane.
    /// `rx_base` is what a handshake read from [client, upstream] before the plane started;
    /// `scanned` says whether the plane's counters scan will wake quiet directions.
    pub fn start(
        id: u64,
        kernel: &Kernel,
        (client, upstream): (BorrowedFd, BorrowedFd),
        rx_base: [u64; 2],
        tuning: &Tuning,
        scanned: bool,
    ) -> Result<Spliced, (Fallback, String)> {
        let Tuning {
            buffer,
            inflight_max,
            sndbuf,
        } = *tuning;
        let cookie = |fd| {
            socket::socket_cookie(fd).map_err(|e| (Fallback::Error, format!("SO_COOKIE: {e}")))
        };
        let cookies = [cookie(client)?, cookie(upstream)?];
        if sndbuf > 0 {
            // The psock worker that sends redirected bytes retries a full socket one jiffy
            // later (4 ms at HZ=250, net/core/skmsg.c sk_psock_backlog, Linux >= 6.1), not
            // when space frees: a larger send buffer makes those stalls rarer. FORCE
            // (CAP_NET_ADMIN) may exceed net.core.wmem_max; without the capability the plain
            // option caps at it.
            let size = sndbuf.min(i32::MAX as usize) as i32;
            for fd in [client, upstream] {
                if socket::set_int_opt(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, size).is_err() {
                    let _ = socket::set_int_opt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, size);
                }
            }
        }
        // The base must be exact: too low and a FIN would be passed on before the bytes it
        // follows, too high and it would never be. Bytes ksocks wrote (a SOCKS reply, an
        // address header) may still be in flight, so their ACK can land between the reads.
        let base = |dst| SendTotal::exact(id, dst).map_err(|why| (Fallback::Error, why));
        let sent = [base(upstream)?, base(client)?];
        kernel
            .pair(client, cookies[0], upstream, cookies[1])
            .map_err(|e| (Fallback::of(&e), format!("sockmap insert: {e}")))?;
        let dir = |sent, received| Dir::new(buffer, Bases { sent, received });
        Ok(Spliced {
            id,
            cookies,
            dirs: [dir(sent[0], rx_base[0]), dir(sent[1], rx_base[1])],
            armed: [false; 2],
            wakeup: kernel.wakeup,
            inflight_max,
            scheduled: Queued::default(),
            fallbacks: [0; Fallback::ALL.len()],
            stopped: false,
            scanned,
        })
    }

    pub fn cookies(&self) -> [u64; 2] {
        self.cookies
    }

    /// Bytes moved (client -> upstream, upstream -> client): userspace's and the kernel's.
    pub fn bytes(&self, kernel: &Kernel) -> (u64, u64) {
        let kern = |i: usize| match self.stopped {
            true => 0,
            false => kernel.forwarded(self.cookies[i]),
        };
        (
            self.dirs[0].flow.written + kern(0),
            self.dirs[1].flow.written + kern(1),
        )
    }

    pub fn finished(&self) -> bool {
        self.dirs.iter().all(|d| d.flow.shut)
    }

    /// Epoll masks (client, upstream): a hooked source is watched for RDHUP only (EPOLLIN stays
    /// set for ever on hooked sockets, KERNEL-NOTES s.3); userspace directions as usual.
    pub fn masks(&self) -> (u32, u32) {
        let mut m = [0u32; 2];
        for (i, d) in self.dirs.iter().enumerate() {
            let (src, dst) = (i, 1 - i);
            match d.state {
                State::Kernel | State::Paused if !d.fin && !d.flow.shut => m[src] |= epoll::RDHUP,
                State::User | State::UserOnly => {
                    if d.flow.wants_read() {
                        m[src] |= epoll::IN;
                    }
                    if d.flow.wants_write() {
                        m[dst] |= epoll::OUT;
                    }
                }
                _ => {}
            }
        }
        (m[0], m[1])
    }

    /// Takes both sockets out of the maps; called once, just before they are closed.
    pub fn stop(&mut self, kernel: &Kernel) {
        for d in 0..2 {
            let kern = kernel.forwarded(self.cookies[d]);
            if kern > 0 && !self.armed[1 - d] {
                let (from, to) = (src_of(d).name(), src_of(d).other().name());
                debug!(
                    "#{}: {from} -> {to}: the kernel moved {kern} bytes into a socket that never joined the hook map",
                    self.id
                );
            }
        }
        for c in self.cookies {
            let _ = kernel.unhook(c);
        }
        kernel.unpair(self.cookies[0], self.cookies[1]);
        self.stopped = true;
    }

    /// Whether the queued poll at `t` is the current one (the heap keeps stale entries).
    pub fn due(&mut self, t: Instant) -> bool {
        self.scheduled.due(t)
    }

    /// The next poll to queue, if it is earlier than the one already queued.
    pub fn next_timer(&mut self) -> Option<Instant> {
        let want = self.dirs.iter().filter_map(|d| d.next_poll).min()?;
        self.scheduled.offer(want)
    }

    /// Readiness on one socket of the connection.
    pub fn on_event(
        &mut self,
        kernel: &Kernel,
        id: u64,
        pair: &mut Pair,
        side: Side,
        events: u32,
    ) -> Option<End> {
        if events & epoll::ERR != 0 {
            if let Ok(Some(e)) = socket::take_error(pair.sock(side).fd()) {
                debug!("#{id}: {} socket: {e}", side.name());
                return Some(reset_of(side));
            }
        }
        if events & epoll::HUP != 0 {
            pair.sock(side).hup = true;
        }
        let d = &mut self.dirs[side as usize];
        if events & epoll::RDHUP != 0 && matches!(d.state, State::Kernel | State::Paused) {
            d.fin = true;
        }
        // Userspace directions move on readability of their source or writability of their dest.
        self.step(kernel, id, pair, Instant::now())
    }

    /// Advances both directions as far as they can go now (an event, a poll, or the start).
    pub fn step(&mut self, kernel: &Kernel, id: u64, pair: &mut Pair, now: Instant) -> Option<End> {
        let (c, u) = pair.fds();
        for d in 0..2 {
            let fds = if d == 0 { (c, u) } else { (u, c) };
            if let Err(end) = self.advance(kernel, id, d, fds, now) {
                return Some(end);
            }
        }
        None
    }

    fn advance(
        &mut self,
        kernel: &Kernel,
        id: u64,
        d: usize,
        (src, dst): (BorrowedFd, BorrowedFd),
        now: Instant,
    ) -> Result<(), End> {
        self.dirs[d].next_poll = None;
        if self.dirs[d].flow.shut {
            return Ok(());
        }
        let c = Ctx {
            id,
            kernel,
            cookie: self.cookies[d],
            side: src_of(d),
            inflight_max: self.inflight_max,
            scanned: self.scanned,
        };
        loop {
            let dir = &mut self.dirs[d];
            if let State::User | State::UserOnly = dir.state {
                dir.flow.pump(src, dst).map_err(|b| {
                    let (from, to) = (c.side.name(), c.side.other().name());
                    debug!("#{id}: {from} -> {to}: {b:?}");
                    broken_end(c.side, b)
                })?;
                if dir.state == State::User && dir.idle() {
                    self.hook_drained(&c, d, (src, dst), now);
                }
                return Ok(());
            }
            if dir.kernel_step(&c, (src, dst), &mut self.fallbacks, now)? == Next::Done {
                return Ok(());
            }
        }
    }

    /// Direction `d`'s source is drained and holds nothing: hands it to the kernel if the
    /// kernel will wake dst's sender (see the header), with dst's own source when that is the
    /// way; or leaves it in userspace for now or for good.
    fn hook_drained(
        &mut self,
        c: &Ctx,
        d: usize,
        (src, dst): (BorrowedFd, BorrowedFd),
        now: Instant,
    ) {
        let (id, back) = (c.id, 1 - d); // `back`: the direction whose source is dst
        let (from, to) = (c.side.name(), c.side.other().name());
        if self.wakeup == Wakeup::HookedOnly && !self.armed[back] {
            let other = &self.dirs[back];
            if other.state == State::User && other.idle() {
                return self.hook_both(c, d, (src, dst), now);
            }
            if other.state == State::User && !other.flow.eof {
                return; // dst's direction still copies: it may join later, and src with it
            }
            debug!("#{id}: {from} -> {to}: the {to} socket cannot join the hook map any more and this kernel would not wake it when its send buffer frees; finishing in userspace");
            self.dirs[d].state = State::UserOnly;
            self.fallbacks[Fallback::NoWakeup as usize] += 1;
            return;
        }
        match hook_and_kick(c.kernel, src, c.cookie) {
            Ok(()) => {
                self.armed[d] = true;
                self.dirs[d].enter_kernel(now);
            }
            Err(e) => self.refused(c.id, d, e),
        }
    }

    /// Both sources into the hook map at once, src first. Between the two insertions src's
    /// bytes may reach dst's psock before dst carries the psock's write-space callback; the
    /// kick that follows dst's insertion (`hook_and_kick`) runs a worker that stopped then.
    fn hook_both(&mut self, c: &Ctx, d: usize, (src, dst): (BorrowedFd, BorrowedFd), now: Instant) {
        let back = 1 - d;
        if let Err(e) = hook_and_kick(c.kernel, src, c.cookie) {
            return self.refused(c.id, d, e);
        }
        self.armed[d] = true;
        match hook_and_kick(c.kernel, dst, self.cookies[back]) {
            Ok(()) => {
                self.armed[back] = true;
                self.dirs[d].enter_kernel(now);
                self.dirs[back].enter_kernel(now);
            }
            Err(e) => {
                // dst cannot get the callback: src leaves the hook map again, and its bytes
                // already in dst's psock queue go first (or, if that stalls, `stall` resets).
                let _ = c.kernel.unhook(c.cookie);
                self.dirs[d].unhooking(false, now);
                self.refused(c.id, back, e);
            }
        }
    }

    /// The kernel refused direction `d`'s source: that direction stays in userspace.
    fn refused(&mut self, id: u64, d: usize, e: io::Error) {
        let (from, to) = (src_of(d).name(), src_of(d).other().name());
        debug!("#{id}: {from} -> {to}: kernel refused the socket ({e}); finishing in userspace");
        self.dirs[d].state = State::UserOnly;
        self.fallbacks[Fallback::of(&e) as usize] += 1;
    }
}
