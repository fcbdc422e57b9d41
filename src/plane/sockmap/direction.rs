//! One direction (src -> dst) of a connection on the sockmap plane: its state and the step
//! that reads the kernel's books (`books`) while the kernel moves or moved its bytes.
//!
//! States:
//! - `User`: src is not hooked; userspace copies src -> dst through a small buffer (data that
//!   arrived before insertion, a kick, a paused source, or a socket the kernel refused).
//! - `Kernel`: src is in the hook map; the verdict program redirects its bytes to dst.
//! - `Paused`: src was taken out of the hook map because more than `--inflight-max` bytes
//!   wait in dst's psock queue; src's receive queue fills and TCP flow control holds the
//!   sender. Once the queue is below half the budget, src is hooked again and kicked.
//! - `Unhooking`: src was taken out of the hook map for userspace to finish (bytes stranded,
//!   or the kernel refused re-insertion); waiting until the bytes the kernel already took
//!   from src have all entered dst's send queue, because only then may userspace write to
//!   dst without reordering.
//! - `UserOnly`: like `User`, for good (the kernel refused src, e.g. its FIN already arrived,
//!   or dst can never get the kernel's write-space wakeup, `wake`): the per-direction
//!   fallback to the copy plane.
//!
//! With `pending` = received - userspace-read - `kern` (bytes in src's receive queue nobody has
//! processed yet) and `queued` = userspace-written + `kern` - `entered` (bytes still in dst's
//! psock queue, which has no backpressure of its own): a FIN is passed on only when
//! `pending == 0 && queued == 0`; `entered` above its maximum means the kernel duplicated
//! bytes, which is reported loudly and the connection reset; `queued` bytes that stop moving
//! while dst's send queue is empty are a stall (`stall`): kicked, then reset, never held.

use super::books::{self, Bases, BooksError};
use super::kernel::Kernel;
use super::spliced::{Fallback, Fallbacks};
use super::stall::{Stall, Verdict};
use super::wake::kick_write_space;
use crate::debug;
use crate::end::{reset_of, End, Side};
use crate::plane::flow::Flow;
use crate::sys::socket;
use std::io;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    User,
    Kernel,
    Paused,
    Unhooking,
    UserOnly,
}

/// Polls of an active direction happen at least this often...
const POLL_MIN: Duration = Duration::from_millis(1);
/// ...and of a slowly moving one at most this rarely: a source's rate can jump at any time,
/// and everything it sends between two polls may queue behind a slow reader.
const POLL_MAX: Duration = Duration::from_millis(5);
/// While bytes wait in dst's psock queue (dst is slower than src, the case the budget is
/// for) a direction polls at least this often, moving or not.
const POLL_QUEUED: Duration = Duration::from_millis(2);
/// A direction idle for this long stops polling when the event loop scans the counters.
const QUIET_AFTER: Duration = Duration::from_millis(4);
/// A direction whose pending bytes have not moved for this many polls is stranded (the kernel
/// only looks at its receive queue when a new packet arrives, KERNEL-NOTES s.3): kick it.
const STUCK_POLLS: u8 = 2;

pub struct Dir {
    pub state: State,
    /// The userspace path, also the byte counts of what userspace read and wrote.
    pub flow: Flow,
    /// The counters at pairing.
    bases: Bases,
    /// src's FIN was seen (EPOLLRDHUP) while the kernel was moving its bytes.
    pub fin: bool,
    /// The kernel refused src; once in userspace it stays there.
    refused: bool,
    /// Last poll's `kern` and `pending`, to see progress.
    last_kern: u64,
    last_pending: u64,
    last_poll: Instant,
    stuck: u8,
    stall: Stall,
    interval: Duration,
    pub next_poll: Option<Instant>,
}

/// What a direction's step needs to know of its connection.
pub struct Ctx<'a> {
    pub id: u64,
    pub kernel: &'a Kernel,
    /// src's socket cookie.
    pub cookie: u64,
    /// src's side.
    pub side: Side,
    pub inflight_max: u64,
    /// The plane's counters scan wakes quiet directions: they need no timer.
    pub scanned: bool,
}

/// After a step in the kernel states: done for now, or go on in the state it moved to.
#[derive(PartialEq, Eq)]
pub enum Next {
    Done,
    Again,
}

/// Hands src to the kernel and kicks it twice. Its stream parser looks at the receive queue
/// at once: bytes that arrived between the last userspace read (or the pause) and the
/// insertion would otherwise wait for the next packet, which may never come (KERNEL-NOTES
/// s.3). Setting `SO_RCVLOWAT` calls `tcp_data_ready()` (net/ipv4/tcp.c, `tcp_set_rcvlowat`,
/// Linux >= 4.19), which runs the psock's data-ready hook; on older kernels the stranded-bytes
/// check below still catches them. 1 is the default low-water mark, so nothing else changes.
/// And src, from now on carrying the psock's write-space callback, has its psock worker run
/// once (`wake`): it may have stopped on a full buffer before it had the callback.
pub fn hook_and_kick(kernel: &Kernel, src: BorrowedFd, cookie: u64) -> io::Result<()> {
    kernel.hook(src, cookie)?;
    let _ = socket::set_int_opt(src, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1);
    kick_write_space(src);
    Ok(())
}

impl Dir {
    pub fn new(buffer: usize, bases: Bases) -> Dir {
        Dir {
            state: State::User,
            flow: Flow::copy(buffer),
            bases,
            fin: false,
            refused: false,
            last_kern: 0,
            last_pending: 0,
            last_poll: Instant::now(),
            stuck: 0,
            stall: Stall::default(),
            interval: POLL_MIN,
            next_poll: None,
        }
    }

    /// Drained to EAGAIN with nothing held and src not finished: ready for the kernel
    /// (reading part of an skb and then inserting duplicates it, KERNEL-NOTES s.3).
    pub fn idle(&self) -> bool {
        self.flow.pending() == 0 && self.flow.drained && !self.flow.eof
    }

    pub fn enter_kernel(&mut self, now: Instant) {
        self.state = State::Kernel;
        self.last_poll = now;
        self.stuck = 0;
        self.interval = POLL_MIN;
        self.next_poll = Some(now + POLL_MIN);
    }

    /// src left the hook map (or never took a byte there): userspace takes over once the
    /// kernel's queue towards dst is empty; `refused`: and keeps it.
    pub fn unhooking(&mut self, refused: bool, now: Instant) {
        self.state = State::Unhooking;
        self.refused |= refused;
        self.interval = POLL_MIN;
        self.next_poll = Some(now + POLL_MIN);
    }

    /// Waits for dst to drain: polls from 1 ms, backing off to 20 ms.
    fn backoff(&mut self, now: Instant) {
        self.next_poll = Some(now + self.interval);
        self.interval = (self.interval * 2).min(Duration::from_millis(20));
    }

    /// A step in `Kernel`, `Paused` or `Unhooking`: reads the books and acts on them.
    pub fn kernel_step(
        &mut self,
        c: &Ctx,
        (src, dst): (BorrowedFd, BorrowedFd),
        fallbacks: &mut Fallbacks,
        now: Instant,
    ) -> Result<Next, End> {
        let id = c.id;
        let (from, to) = (c.side.name(), c.side.other().name());
        let b = match books::read(id, (from, to), c.kernel, (src, dst), c.cookie, self.bases) {
            Ok(b) => b,
            Err(BooksError::Io(e)) => {
                debug!("#{id}: {from} -> {to}: reading the counters: {e}");
                return Err(match e.kind() {
                    io::ErrorKind::ConnectionReset => reset_of(c.side),
                    _ => End::Error,
                });
            }
            Err(BooksError::Broken(why)) => {
                crate::error!(
                    "#{id}: kernel byte accounting broken ({from} -> {to}: {why}); resetting"
                );
                return Err(End::Error);
            }
        };
        let given = self.flow.written + b.kern;
        if b.entered > given || self.flow.read + b.kern > b.received {
            crate::error!(
                "#{id}: kernel byte accounting broken ({from} -> {to}: received {} read {} redirected {} entered {} of {}); resetting",
                b.received, self.flow.read, b.kern, b.entered, given
            );
            return Err(End::Error);
        }
        let pending = b.received - self.flow.read - b.kern;
        let queued = given - b.entered;
        let fin = self.fin || b.src_fin;
        match self.stall.observe(queued, b.outq, b.entered, now) {
            Verdict::Fine => {}
            Verdict::Kick(held, nth) => {
                if nth == 1 {
                    debug!("#{id}: {from} -> {to}: {queued} bytes held in the kernel for {} ms while the {to} socket's send queue is empty; waking its sender", held.as_millis());
                }
                kick_write_space(dst);
            }
            Verdict::Reset(held) => {
                crate::error!(
                    "#{id}: {from} -> {to}: {queued} bytes held in the kernel never reached the {to} socket (its send queue empty for {:.1} s, kicks did not help); resetting",
                    held.as_secs_f64()
                );
                return Err(End::Error);
            }
        }
        let inflight_max = c.inflight_max;
        match self.state {
            State::Unhooking if queued > 0 => {
                self.backoff(now);
                return Ok(Next::Done);
            }
            State::Unhooking => {
                // dst's psock queue is empty: userspace may write to dst without reordering.
                self.state = if self.refused {
                    State::UserOnly
                } else {
                    State::User
                };
                return Ok(Next::Again);
            }
            State::Paused if queued > inflight_max / 2 => {
                self.backoff(now);
                return Ok(Next::Done);
            }
            State::Paused if pending > inflight_max / 2 => {
                // What src's receive buffer gathered meanwhile would land in dst's queue at
                // once on re-insertion (the buffer grew to line rate while the kernel drained
                // it): move that backlog in userspace at dst's pace instead, then re-insert.
                debug!("#{id}: {from} -> {to}: {pending} bytes waiting in the source, draining them in userspace");
                self.state = State::Unhooking;
                return Ok(Next::Again);
            }
            State::Paused => match hook_and_kick(c.kernel, src, c.cookie) {
                Ok(()) => {
                    debug!("#{id}: {from} -> {to}: {queued} bytes in flight, resuming the source");
                    self.enter_kernel(now);
                    return Ok(Next::Done);
                }
                Err(e) => {
                    // Usually EOPNOTSUPP: src's FIN arrived while it was paused. Finish this
                    // direction in userspace, once the kernel's queue has drained.
                    debug!("#{id}: {from} -> {to}: cannot resume the source ({e}); finishing in userspace");
                    self.unhooking(true, now);
                    fallbacks[Fallback::of(&e) as usize] += 1;
                    return Ok(Next::Again);
                }
            },
            _ => {}
        }
        // State::Kernel.
        if fin && pending == 0 && queued == 0 {
            self.flow.shut = true;
            if let Err(e) = socket::shutdown_write(dst) {
                if e.raw_os_error() != Some(libc::ENOTCONN) {
                    return Err(reset_of(c.side.other()));
                }
            }
            return Ok(Next::Done);
        }
        let moved = b.kern != self.last_kern;
        self.stuck = if pending > 0 && !moved && pending == self.last_pending {
            self.stuck + 1
        } else {
            0
        };
        let rate_interval = if moved {
            // Poll often enough that the source cannot overfill half the budget.
            let dt = now.duration_since(self.last_poll).as_secs_f64().max(1e-4);
            let rate = b.kern.saturating_sub(self.last_kern) as f64 / dt;
            Duration::from_secs_f64(
                (inflight_max as f64 / 2.0 / rate).clamp(1e-3, POLL_MAX.as_secs_f64()),
            )
        } else {
            (self.interval * 2).min(POLL_MAX)
        };
        let rate_interval = if queued > 0 {
            rate_interval.min(POLL_QUEUED)
        } else {
            rate_interval
        };
        self.last_kern = b.kern;
        self.last_pending = pending;
        self.last_poll = now;
        if self.stuck == STUCK_POLLS {
            let _ = socket::set_int_opt(src, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1);
        }
        if self.stuck > STUCK_POLLS + 2 {
            // The kick did not help (an old kernel): let userspace read the stranded bytes.
            debug!("#{id}: {from} -> {to}: {pending} bytes stranded, reading them in userspace");
            let _ = c.kernel.unhook(c.cookie);
            self.unhooking(false, now);
            return Ok(Next::Again);
        }
        if queued > inflight_max {
            debug!("#{id}: {from} -> {to}: {queued} bytes in flight, pausing the source");
            let _ = c.kernel.unhook(c.cookie);
            self.state = State::Paused;
            self.interval = POLL_MIN;
            self.next_poll = Some(now + POLL_MIN);
            return Ok(Next::Done);
        }
        self.interval = if pending > 0 || fin {
            POLL_MIN
        } else {
            rate_interval
        };
        // Quiet (nothing moved for a while, nothing pending or queued): no timer, the
        // counters scan wakes the connection when bytes move again. Stranded bytes can only
        // appear at insertion, which the polls since then have ruled out.
        let quiet = !moved && pending == 0 && queued == 0 && !fin && self.interval >= QUIET_AFTER;
        self.next_poll = if quiet && c.scanned {
            None
        } else {
            Some(now + self.interval)
        };
        Ok(Next::Done)
    }
}
