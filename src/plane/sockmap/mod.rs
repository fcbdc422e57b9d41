//! The sockmap plane: both sockets of a connection in a BPF SOCKHASH whose `sk_skb` programs
//! redirect one socket's stream into the other (`kernel`), a per-connection state machine
//! that keeps exact books and passes FINs on (`spliced`, `direction`, `books`) and never
//! holds stalled bytes for ever (`stall`), and the start-up probe (`selftest`, `wake`).
//!
//! This file holds the plane's shared state: the kernel objects, the index the counters scan
//! uses to wake quiet connections, and the fallback counts.
//!
//! Invariant: a connection's cookies are in `watched` exactly while it is on this plane
//! (`enter` adds them, `stop` removes them), so a scan never wakes a closed connection's
//! successor.

mod books;
mod direction;
mod kernel;
mod selftest;
mod spliced;
mod stall;
mod wake;

pub use kernel::Kernel;
pub use spliced::{Fallback, Fallbacks, Spliced, Tuning};

/// How many fallback reasons the stats line counts.
pub const FALLBACKS: usize = Fallback::ALL.len();

use super::Handover;
use crate::{debug, error, info};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The counters are scanned this often for quiet connections that became active.
const SCAN: Duration = Duration::from_millis(50);

pub struct Plane {
    pub kernel: Kernel,
    tuning: Tuning,
    /// Socket cookie -> (connection token, counter value last seen), for the scan.
    watched: HashMap<u64, (u64, u64)>,
    /// `None` when the kernel cannot batch-read the counters (then every direction polls).
    next_scan: Option<Instant>,
    /// Connections or directions left in userspace, by `Fallback` reason.
    pub fallbacks: Fallbacks,
}

impl Plane {
    /// Loads the programs with maps for `max_sockets` sockets and runs the self-test.
    pub fn load(max_sockets: u32, tuning: Tuning) -> Result<Plane, String> {
        let mut kernel = Kernel::load(max_sockets).map_err(|e| e.to_string())?;
        kernel
            .self_test()
            .map_err(|e| format!("self-test failed: {e}"))?;
        if kernel.wakeup == wake::Wakeup::HookedOnly {
            error!("sockmap: this kernel wakes a redirect target whose send buffer was full only if it joined the hook map (Linux 5.10): a direction runs in the kernel only towards such a socket");
        }
        let next_scan = match kernel.counters(&mut Vec::new()) {
            Ok(()) => Some(Instant::now() + SCAN),
            Err(_) => {
                debug!(
                    "BPF_MAP_LOOKUP_BATCH unsupported: every spliced connection polls its counters"
                );
                None
            }
        };
        Ok(Plane {
            kernel,
            tuning,
            watched: HashMap::new(),
            next_scan,
            fallbacks: [0; FALLBACKS],
        })
    }

    /// Starts a connection on this plane, or says why it cannot be (the caller puts it on
    /// the copy plane).
    pub fn enter(&mut self, h: &Handover) -> Option<Box<Spliced>> {
        let scanned = self.next_scan.is_some();
        let fds = (h.client, h.upstream);
        match Spliced::start(h.id, &self.kernel, fds, h.rx_base, &self.tuning, scanned) {
            Ok(s) => {
                for cookie in s.cookies() {
                    self.watched.insert(cookie, (h.token, 0));
                }
                Some(Box::new(s))
            }
            Err((why, reason)) => {
                self.fallbacks[why as usize] += 1;
                info!(
                    "#{} {}: sockmap unavailable for this connection ({reason}); using copy",
                    h.id, h.what
                );
                None
            }
        }
    }

    /// The userspace buffer size, for connections that fall back to copy.
    pub fn tuning_buffer(&self) -> usize {
        self.tuning.buffer
    }

    /// Counts what a connection's last step left in its `fallbacks`.
    pub fn count_fallback(&mut self, s: &mut Spliced) {
        for (total, n) in self.fallbacks.iter_mut().zip(&mut s.fallbacks) {
            *total += std::mem::take(n);
        }
    }

    /// Takes a connection off the plane, just before its sockets are closed.
    pub fn stop(&mut self, s: &mut Spliced) {
        for cookie in s.cookies() {
            self.watched.remove(&cookie);
        }
        s.stop(&self.kernel);
    }

    pub fn next_tick(&self) -> Option<Instant> {
        self.next_scan
    }

    /// Reads every counter in a few syscalls and adds to `wake` the tokens of connections
    /// whose counters moved since the last scan: quiet directions keep no timer of their own.
    pub fn tick(&mut self, now: Instant, wake: &mut Vec<u64>) {
        if !self.next_scan.is_some_and(|t| now >= t) {
            return;
        }
        self.next_scan = Some(now + SCAN);
        let mut counters = Vec::with_capacity(self.watched.len());
        if self.kernel.counters(&mut counters).is_err() {
            return;
        }
        for (cookie, value) in counters {
            if let Some((token, last)) = self.watched.get_mut(&cookie) {
                if *last != value {
                    *last = value;
                    wake.push(*token);
                }
            }
        }
    }
}
