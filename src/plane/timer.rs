//! A relay's queued timer: the event loop's timer heap keeps stale entries (a relay that
//! wants an earlier deadline queues another and leaves the old one), so each relay records the
//! one entry that is current and ignores the others when they come due.

use std::time::Instant;

/// The timer a relay has queued in the event loop's heap. The heap keeps stale entries, so an
/// entry is current only while it is the one recorded here.
#[derive(Debug, Default)]
pub struct Queued(Option<Instant>);

impl Queued {
    /// Whether the heap's entry at `t` is the current one; if so it is used up.
    pub fn due(&mut self, t: Instant) -> bool {
        let current = self.0 == Some(t);
        if current {
            self.0 = None;
        }
        current
    }

    /// `want` if it has to be queued (nothing as early is queued), recorded as queued.
    pub fn offer(&mut self, want: Instant) -> Option<Instant> {
        match self.0 {
            Some(s) if s <= want => None,
            _ => {
                self.0 = Some(want);
                Some(want)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn only_the_current_entry_is_due() {
        let t0 = Instant::now();
        let (t1, t2) = (t0 + Duration::from_millis(1), t0 + Duration::from_millis(2));
        let mut q = Queued::default();
        assert_eq!(q.offer(t2), Some(t2));
        assert_eq!(q.offer(t2), None, "as early is queued already");
        assert_eq!(q.offer(t1), Some(t1), "earlier: queued again");
        assert!(!q.due(t2), "the stale entry");
        assert!(q.due(t1));
        assert!(!q.due(t1), "used up");
        assert_eq!(q.offer(t2), Some(t2), "nothing queued any more");
    }
}
