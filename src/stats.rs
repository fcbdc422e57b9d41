//! Counters for the `SIGUSR1` stats line: connections accepted, bytes of closed connections,
//! and the line itself, which adds the open connections' figures and the plane's own.
//!
//! Invariant: a connection's bytes are counted once, while open from its relay, after close
//! from `closed_up`/`closed_down`.

use crate::plane::{Plane, NAMES};

#[derive(Default)]
pub struct Stats {
    pub total: u64,
    /// Bytes of closed connections (up, down).
    pub closed_up: u64,
    pub closed_down: u64,
}

/// What the stats line needs to know of one open connection.
pub struct Open {
    /// Its relay's name, `None` while in setup.
    pub plane: Option<&'static str>,
    pub up: u64,
    pub down: u64,
}

impl Stats {
    /// `stats open=.. total=.. copy=.. splice=.. sockmap=.. fallbacks=.. fallback_<why>=..
    /// bytes_up=.. bytes_down=.. map_entries=..`.
    pub fn line(&self, open: impl Iterator<Item = Open>, plane: &Plane) -> String {
        let (mut count, mut per_plane) = (0, [0u64; NAMES.len()]);
        let (mut up, mut down) = (self.closed_up, self.closed_down);
        for o in open {
            count += 1;
            if let Some(i) = o.plane.and_then(|p| NAMES.iter().position(|n| *n == p)) {
                per_plane[i] += 1;
            }
            up += o.up;
            down += o.down;
        }
        let planes: String = NAMES
            .iter()
            .zip(per_plane)
            .map(|(n, c)| format!(" {n}={c}"))
            .collect();
        let fallbacks = plane.fallbacks();
        let reasons: String = fallbacks
            .iter()
            .map(|(why, c)| format!(" fallback_{why}={c}"))
            .collect();
        let sum: u64 = fallbacks.iter().map(|(_, c)| c).sum();
        format!(
            "stats open={count} total={}{planes} fallbacks={sum}{reasons} bytes_up={up} bytes_down={down} map_entries={}",
            self.total,
            plane.map_entries()
        )
    }
}
