//! The backstop against bytes the kernel holds for a destination and never sends: a
//! direction whose psock queue has bytes (`queued > 0`) while the destination's send queue is
//! empty (`SIOCOUTQ == 0`) and nothing enters it is stalled — the psock worker stopped and
//! nothing runs it again (the 5.10 stall, `wake`). Its destination's write space is kicked
//! every `KICK_EVERY`; if the bytes still do not move within `RESET_AFTER`, the connection is
//! reset with a loud line instead of being held for ever.
//!
//! Invariant: only an empty send queue counts. A slow or stopped reader leaves bytes in the
//! destination's send queue (its window is closed), so backpressure is never taken for a
//! stall, however long it lasts; and a worker that runs empties the psock queue into the send
//! queue within a jiffy or two, far below `KICK_EVERY`.

use std::time::{Duration, Instant};

/// The first kick, and the time between kicks.
pub const KICK_EVERY: Duration = Duration::from_millis(50);
/// A stall this long is given up: the connection is reset.
pub const RESET_AFTER: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Stall {
    /// When the current stall began.
    since: Option<Instant>,
    last_entered: u64,
    next_kick: Option<Instant>,
    kicks: u32,
}

/// What one poll of the books calls for.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Moving, or waiting on the destination's reader, or not stalled for long yet.
    Fine,
    /// Stalled this long: kick the destination's write space (the nth time in this stall).
    Kick(Duration, u32),
    /// Stalled this long, kicks notwithstanding: reset the connection.
    Reset(Duration),
}

impl Stall {
    /// One poll: `queued` bytes in the psock queue, `outq` in dst's send queue, `entered`
    /// ever entered it.
    pub fn observe(&mut self, queued: u64, outq: u64, entered: u64, now: Instant) -> Verdict {
        let moved = entered != self.last_entered;
        self.last_entered = entered;
        if queued == 0 || outq > 0 || moved {
            self.since = None;
            self.next_kick = None;
            self.kicks = 0;
            return Verdict::Fine;
        }
        let held = now.saturating_duration_since(*self.since.get_or_insert(now));
        if held >= RESET_AFTER {
            return Verdict::Reset(held);
        }
        if held >= KICK_EVERY && self.next_kick.map_or(true, |t| now >= t) {
            self.next_kick = Some(now + KICK_EVERY);
            self.kicks += 1;
            return Verdict::Kick(held, self.kicks);
        }
        Verdict::Fine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    /// Bytes held while the send queue is empty: kicked every KICK_EVERY, reset at RESET_AFTER.
    #[test]
    fn held_bytes_are_kicked_then_reset() {
        let (t0, mut s) = (Instant::now(), Stall::default());
        let mut kicks = 0;
        for ms in (0..=RESET_AFTER.as_millis() as u64 + 100).step_by(2) {
            match s.observe(100, 0, 7, at(t0, ms)) {
                Verdict::Fine => {}
                Verdict::Kick(held, nth) => {
                    assert!(held >= KICK_EVERY);
                    kicks += 1;
                    assert_eq!(nth, kicks);
                }
                Verdict::Reset(held) => {
                    assert!(held >= RESET_AFTER && ms >= RESET_AFTER.as_millis() as u64);
                    // The first poll saw `entered` change; held from 2 ms: kicks at 52, 102, ...
                    // 9,952 ms, the reset at 10,002 ms.
                    assert_eq!((kicks, ms), (199, RESET_AFTER.as_millis() as u64 + 2));
                    return;
                }
            }
        }
        panic!("never reset");
    }

    /// Progress, a non-empty send queue (a slow reader) or an empty psock queue: no stall.
    #[test]
    fn backpressure_and_progress_are_not_stalls() {
        let (t0, mut s) = (Instant::now(), Stall::default());
        for ms in 0..20_000u64 {
            let t = at(t0, ms);
            assert_eq!(s.observe(1 << 20, 4096, 5, t), Verdict::Fine, "slow reader");
        }
        let mut s = Stall::default();
        for ms in 0..20_000u64 {
            assert_eq!(
                s.observe(0, 0, 5, at(t0, ms)),
                Verdict::Fine,
                "nothing held"
            );
        }
        let mut s = Stall::default();
        for ms in 0..20_000u64 {
            // Moves every 40 ms: below the first kick, never reset.
            let v = s.observe(100, 0, ms / 40, at(t0, ms));
            assert_eq!(v, Verdict::Fine, "moving at {ms} ms");
        }
    }

    /// Movement ends a stall; the next one starts from zero.
    #[test]
    fn movement_restarts_the_clock() {
        let (t0, mut s) = (Instant::now(), Stall::default());
        assert_eq!(s.observe(100, 0, 1, t0), Verdict::Fine); // `entered` changed
        assert_eq!(s.observe(100, 0, 1, t0 + MS), Verdict::Fine); // held from here
        assert!(matches!(
            s.observe(100, 0, 1, at(t0, 60)),
            Verdict::Kick(..)
        ));
        assert_eq!(s.observe(100, 0, 2, at(t0, 61)), Verdict::Fine);
        assert_eq!(s.observe(100, 0, 2, at(t0, 62)), Verdict::Fine);
        let late = at(t0, 62) + RESET_AFTER - MS;
        assert!(matches!(s.observe(100, 0, 2, late), Verdict::Kick(..)));
        assert!(matches!(
            s.observe(100, 0, 2, at(t0, 62) + RESET_AFTER),
            Verdict::Reset(_)
        ));
    }
}
