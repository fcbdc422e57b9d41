//! The seeded plan of a soak: a small generator (splitmix64), the connection kinds, and each
//! connection's kind, family, sizes and delays, all derived from the seed alone so that
//! `KSOCKS_SOAK_SEED` replays a run; the stream numbers of a connection.

use crate::common::*;
use std::time::Duration;

/// splitmix64: a small seeded generator; the plan of a soak depends on its seed only.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// 1..=max, uniform in log(size).
    pub(super) fn log_uniform(&mut self, max: u64) -> u64 {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        (((max as f64 + 1.0).ln() * u).exp().floor() as u64).clamp(1, max)
    }
}

/// Stream seed `k` of connection `id` in the soak seeded `base`.
pub(super) fn stream_seed(base: u64, id: u64, k: u64) -> u64 {
    Rng(base ^ id.wrapping_mul(0xA24B_AED4_963E_E407) ^ k.wrapping_mul(0x9FB2_1C65_1E98_DF25))
        .next()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Kind {
    /// Client uploads and half-closes; the server replies after that FIN.
    UploadReply,
    /// The server sends a banner first; the client sends its id; the server sends a download.
    Banner,
    /// Lockstep small messages, the first written the instant connect returns.
    PingPong,
    /// Both send bulk at the same time.
    Bidirectional,
    /// Like UploadReply, the reply delayed by up to 1 s after the client's FIN.
    HalfCloseDelay,
    /// The server answers and closes fully while the client has not closed.
    ServerClosesFirst,
    /// The client resets (SO_LINGER 0) in the middle of its upload.
    ClientReset,
    /// One byte each way.
    Tiny,
}

const KINDS: [Kind; 8] = [
    Kind::UploadReply,
    Kind::Banner,
    Kind::PingPong,
    Kind::Bidirectional,
    Kind::HalfCloseDelay,
    Kind::ServerClosesFirst,
    Kind::ClientReset,
    Kind::Tiny,
];

/// Server ports: most kinds start with the client's 8-byte connection id on MAIN; a banner
/// connection starts with the server speaking, a tiny one carries no id.
pub(super) const MAIN_PORT: u16 = 5001;
pub(super) const BANNER_PORT: u16 = 5002;
pub(super) const TINY_PORT: u16 = 5003;

#[derive(Clone, Debug)]
pub(super) struct Plan {
    pub(super) id: u64,
    pub(super) kind: Kind,
    pub(super) fam: Family,
    /// Client -> server bulk bytes (after the id).
    pub(super) up: u64,
    /// Server -> client bulk bytes.
    pub(super) down: u64,
    /// Ping-pong rounds: (ping bytes, pong bytes).
    pub(super) rounds: Vec<(u64, u64)>,
    pub(super) delay: Duration,
    /// ClientReset: bytes sent before the reset.
    pub(super) reset_after: u64,
}

impl Plan {
    pub(super) fn random(id: u64, rng: &mut Rng, max: u64) -> Plan {
        let kind = KINDS[rng.below(KINDS.len() as u64) as usize];
        let fam = if rng.below(2) == 0 {
            Family::V4
        } else {
            Family::V6
        };
        let up = rng.log_uniform(max);
        let down = rng.log_uniform(max);
        let rounds = (0..1 + rng.below(20))
            .map(|_| (rng.log_uniform(4096), rng.log_uniform(4096)))
            .collect();
        let delay = Duration::from_millis(rng.below(1000));
        let reset_after = rng.log_uniform(up);
        Plan {
            id,
            kind,
            fam,
            up,
            down,
            rounds,
            delay,
            reset_after,
        }
    }

    pub(super) fn port(&self) -> u16 {
        match self.kind {
            Kind::Banner => BANNER_PORT,
            Kind::Tiny => TINY_PORT,
            _ => MAIN_PORT,
        }
    }

    pub(super) fn describe(&self) -> String {
        format!(
            "#{} {:?} {:?} up={} down={}",
            self.id, self.kind, self.fam, self.up, self.down
        )
    }
}

/// Streams of a connection, for the ledger.
pub(super) const S_UP: u64 = 0;
pub(super) const S_DOWN: u64 = 1;
pub(super) const S_BANNER: u64 = 2;
/// Ping r is 3 + 2r, pong r is 4 + 2r.
pub(super) const S_PING: u64 = 3;
