//! What the UDP tests check: the echo check shared by every route (every datagram byte for byte,
//! from the right source) and the parser of ksocks' `#u<n> ... closed: plane=udp` lines.
//!
//! Invariants: every echo waits at most 5 s; a wrong byte or source panics, a missing answer
//! counts as lost; waiting for close lines is bounded by the caller's duration.

use super::*;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

/// What an echo run saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EchoResult {
    pub sent: u64,
    pub received: u64,
    /// Sent, never answered within the wait.
    pub lost: u64,
    pub bytes: u64,
}

/// Sends `count` datagrams of seeded random sizes from `min` to `max` (the first few exactly
/// `min` and `max`) spread over the transports, one in flight per transport, each thread its
/// own transport; every answer must be byte for byte what was sent, from `server`. Panics on
/// a wrong byte or source; returns the counts (a datagram unanswered within 5 s is lost: a
/// generous wait, as the tests running beside it load the same 2 cores).
pub fn echo_check(
    transports: Vec<Box<dyn Dgram>>,
    server: SocketAddr,
    count: usize,
    (min, max): (usize, usize),
) -> EchoResult {
    let per = count.div_ceil(transports.len());
    let handles: Vec<_> = transports
        .into_iter()
        .enumerate()
        .map(|(k, mut t)| {
            thread::spawn(move || {
                let mut r = EchoResult::default();
                let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ (k as u64 + 1);
                let mut next = move || {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed
                };
                let mut buf = vec![0u8; 65536];
                for i in 0..per {
                    let len = match (k, i) {
                        (0, 0) => min,
                        (_, 0) | (_, 1) => max,
                        _ => min + (next() % (max - min + 1) as u64) as usize,
                    };
                    let mut payload = vec![0u8; len];
                    let tag = ((k as u64) << 32 | i as u64).to_be_bytes();
                    Pattern::new(next()).fill(&mut payload);
                    let n = tag.len().min(len);
                    payload[..n].copy_from_slice(&tag[..n]);
                    t.send(&payload).expect("send");
                    r.sent += 1;
                    let deadline = Instant::now() + Duration::from_secs(5);
                    let got = loop {
                        match t.recv(&mut buf) {
                            Ok((from, n)) if buf[..n] == payload[..] => {
                                assert_eq!(from, server, "echo {k}/{i} came from {from}");
                                break true;
                            }
                            // An earlier datagram's late answer: not this one.
                            Ok((_, n)) if n >= 8 && buf[..8] != tag && len >= 8 => {}
                            Ok((_, n)) => {
                                panic!("echo {k}/{i}: {n} bytes back for {len} sent, not the same")
                            }
                            Err(_) if Instant::now() >= deadline => break false,
                            Err(_) => continue,
                        }
                        if Instant::now() >= deadline {
                            break false;
                        }
                    };
                    match got {
                        true => {
                            r.received += 1;
                            r.bytes += len as u64;
                        }
                        false => r.lost += 1,
                    }
                }
                r
            })
        })
        .collect();
    let mut total = EchoResult::default();
    for h in handles {
        let r = join(h);
        total.sent += r.sent;
        total.received += r.received;
        total.lost += r.lost;
        total.bytes += r.bytes;
    }
    total
}

// ---------------------------------------------------------------------------------------------
// ksocks' UDP close lines

/// One `#u<n> CLIENT -> DEST closed: plane=udp ...` line.
#[derive(Debug, Clone)]
pub struct UdpClose {
    pub line: String,
    pub client: String,
    pub dest: String,
    pub fields: HashMap<String, String>,
}

impl UdpClose {
    pub fn get(&self, k: &str) -> &str {
        self.fields
            .get(k)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no {k}= in {}", self.line))
    }
    pub fn num(&self, k: &str) -> u64 {
        self.get(k)
            .parse()
            .unwrap_or_else(|_| panic!("{k} in {}", self.line))
    }
}

/// Every UDP close line in `log`.
pub fn udp_closes(log: &str) -> Vec<UdpClose> {
    log.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("ksocks: #u")?;
            let (head, tail) = rest.split_once(" closed: plane=udp ")?;
            let mut words = head.split(' ');
            let (_, client, _, dest) = (words.next()?, words.next()?, words.next()?, words.next()?);
            let fields = tail
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Some(UdpClose {
                line: l.to_string(),
                client: client.to_string(),
                dest: dest.to_string(),
                fields,
            })
        })
        .collect()
}

/// Waits (≤ `t`) until `ks` logged at least `n` UDP close lines matching `f`; returns them all.
pub fn wait_udp_closes(
    ks: &Ksocks,
    n: usize,
    t: Duration,
    f: impl Fn(&UdpClose) -> bool,
) -> Vec<UdpClose> {
    let mut got = Vec::new();
    wait_until(t, || {
        got = udp_closes(&ks.log()).into_iter().filter(|c| f(c)).collect();
        got.len() >= n
    });
    assert!(
        got.len() >= n,
        "{} of {n} UDP close lines; log:\n{}",
        got.len(),
        ks.log_tail(30)
    );
    got
}
