//! The randomized soak: seeded connections of every `Kind`, 1 byte to 8 MiB (by default),
//! IPv4 and IPv6, through REDIRECT or TPROXY, on each plane; every stream checked against its
//! sender's digest, every close line matched with exact counts and end, ksocks idle afterwards.
//! The plan lives in `plan`, the two ends of a connection in `peers`.

mod peers;
mod plan;

use crate::common::*;
use crate::{env_u64, shared, with_log, KSOCKS_PORT, MIB};
use peers::{soak_client, soak_server};
use plan::*;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// What each end saw of every stream: sender and receiver digests by (connection, stream).
#[derive(Default)]
struct Ledger {
    sent: HashMap<(u64, u64), Digest>,
    received: HashMap<(u64, u64), Digest>,
}

struct Soak {
    base: u64,
    plans: Vec<Plan>,
    ledger: Mutex<Ledger>,
    failures: Mutex<Vec<String>>,
    banner_ctr: AtomicU64,
    done: AtomicUsize,
    bytes: AtomicU64,
}

impl Soak {
    fn fail(&self, what: String) {
        eprintln!("soak failure: {what}");
        self.failures.lock().unwrap().push(what);
    }
    fn sent(&self, id: u64, k: u64, d: Digest) {
        self.ledger.lock().unwrap().sent.insert((id, k), d);
    }
    fn received(&self, id: u64, k: u64, d: Digest) {
        self.bytes.fetch_add(d.len, Ordering::Relaxed);
        self.ledger.lock().unwrap().received.insert((id, k), d);
    }
}

/// What ksocks must log for a connection: (up, down, end); up/down None when unknown.
type Expect = (Option<u64>, Option<u64>, &'static str);

/// A finished connection: plan id, client address, destination, what its close line must say.
type Outcome = (u64, SocketAddr, SocketAddr, Expect);

/// One `-v` close line: `#id CLIENT -> DEST closed: up=N down=M time=.. plane=.. end=..`.
struct CloseLine {
    client: String,
    dest: String,
    up: u64,
    down: u64,
    end: String,
    used: bool,
}

fn close_lines(log: &str) -> Vec<CloseLine> {
    log.lines()
        .filter(|l| l.contains(" closed: "))
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let field = |k: &str| w.iter().find_map(|x| x.strip_prefix(k));
            let num = |k: &str| field(k).and_then(|v| v.parse().ok());
            Some(CloseLine {
                client: w.get(2)?.to_string(),
                dest: w.get(4)?.to_string(),
                up: num("up=")?,
                down: num("down=")?,
                end: field("end=")?.to_string(),
                used: false,
            })
        })
        .collect()
}

/// Assigns every finished connection its close line and returns the connections left without
/// one. By client address first; then, for connections whose source port the router's NAT
/// remapped (a new connection from a port whose previous conntrack entry still exists gets a
/// fresh source port so the redirected tuples stay unique), by destination, counts and end.
fn match_close_lines(
    lines: &mut [CloseLine],
    outcomes: &[Outcome],
) -> Vec<(u64, SocketAddr, Expect)> {
    let fits = |l: &CloseLine, e: &Expect| {
        !l.used
            && e.0.map_or(true, |x| x == l.up)
            && e.1.map_or(true, |x| x == l.down)
            && l.end == e.2
    };
    let mut left = Vec::new();
    for (id, local, dst, e) in outcomes {
        let (c, d) = (local.to_string(), dst.to_string());
        match lines
            .iter_mut()
            .find(|l| l.client == c && l.dest == d && fits(l, e))
        {
            Some(l) => l.used = true,
            None => left.push((*id, *local, *dst, *e)),
        }
    }
    let mut missing = Vec::new();
    for (id, local, dst, e) in left {
        let ip = match local {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        };
        let d = dst.to_string();
        match lines
            .iter_mut()
            .find(|l| l.client.starts_with(&format!("{ip}:")) && l.dest == d && fits(l, &e))
        {
            Some(l) => l.used = true,
            None => missing.push((id, local, e)),
        }
    }
    missing
}

/// The soak: `KSOCKS_SOAK` connections (default 400), sizes log-uniform 1 B ..
/// `KSOCKS_SOAK_MAX_MIB` MiB (default 8), `KSOCKS_SOAK_CONC` at a time (default 48), IPv4 and
/// IPv6 through REDIRECT or TPROXY, all kinds of `Kind`. Zero failures: every stream's receiver
/// digest equals its sender's, every reset reaches the server, every close line has the exact byte
/// counts and end; afterwards ksocks is idle.
pub(crate) fn soak(plane: &str, kind: Inbound) {
    let _machine = shared();
    if !require_root() {
        return;
    }
    raise_nofile();
    let n = env_u64("KSOCKS_SOAK").unwrap_or(400) as usize;
    let max = env_u64("KSOCKS_SOAK_MAX_MIB").unwrap_or(8) * MIB;
    let conc = env_u64("KSOCKS_SOAK_CONC").unwrap_or(48).clamp(1, 512) as usize;
    let base = env_u64("KSOCKS_SOAK_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        Rng(t.as_nanos() as u64 ^ std::process::id() as u64).next()
    });
    eprintln!(
        "soak {plane} {kind:?}: seed {base} (replay: KSOCKS_SOAK_SEED={base} KSOCKS_SOAK={n} \
         KSOCKS_SOAK_MAX_MIB={}), {n} connections, {conc} at a time",
        max / MIB
    );
    let mut rng = Rng(base);
    let plans: Vec<Plan> = (0..n as u64)
        .map(|id| Plan::random(id, &mut rng, max))
        .collect();
    let topo = Topology::new(kind, KSOCKS_PORT);
    let ks = Ksocks::serve(&topo, &["--dataplane", plane]);
    let name = format!("soak-{plane}-{kind:?}");
    with_log(&ks, &name, || {
        let soak = Arc::new(Soak {
            base,
            plans,
            ledger: Mutex::new(Ledger::default()),
            failures: Mutex::new(Vec::new()),
            banner_ctr: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let handlers: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let mut acceptors = Vec::new();
        for fam in [Family::V4, Family::V6] {
            for port in [MAIN_PORT, BANNER_PORT, TINY_PORT] {
                let l = topo.server_listener(fam, port);
                let (soak, stop, handlers) = (soak.clone(), stop.clone(), handlers.clone());
                acceptors.push(thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match accept_timeout(&l, Duration::from_millis(100)) {
                            Ok(s) => {
                                let soak = soak.clone();
                                let h = thread::spawn(move || {
                                    if let Err(e) = soak_server(&soak, s, port) {
                                        soak.fail(e);
                                    }
                                });
                                handlers.lock().unwrap().push(h);
                            }
                            Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                            Err(e) => soak.fail(format!("server: accept on {port}: {e}")),
                        }
                    }
                }));
            }
        }
        let next = Arc::new(AtomicUsize::new(0));
        let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
        let t0 = Instant::now();
        let workers: Vec<JoinHandle<()>> = (0..conc)
            .map(|_| {
                let (soak, next, outcomes) = (soak.clone(), next.clone(), outcomes.clone());
                let dsts: Vec<(Family, u16, SocketAddr)> = [Family::V4, Family::V6]
                    .into_iter()
                    .flat_map(|f| {
                        [MAIN_PORT, BANNER_PORT, TINY_PORT].map(|p| (f, p, topo.server_addr(f, p)))
                    })
                    .collect();
                Topology::in_ns(&topo.client, move || loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(p) = soak.plans.get(i) else { break };
                    let dst = dsts
                        .iter()
                        .find(|d| d.0 == p.fam && d.1 == p.port())
                        .unwrap()
                        .2;
                    match soak_client(&soak, dst, p) {
                        Ok((local, e)) => outcomes.lock().unwrap().push((p.id, local, dst, e)),
                        Err(e) => soak.fail(format!("{} (client): {e}", p.describe())),
                    }
                    soak.done.fetch_add(1, Ordering::Relaxed);
                })
            })
            .collect();
        // Progress for long runs.
        let mut last = Instant::now();
        while soak.done.load(Ordering::Relaxed) < n && workers.iter().any(|w| !w.is_finished()) {
            thread::sleep(Duration::from_millis(50));
            if last.elapsed() >= Duration::from_secs(30) {
                last = Instant::now();
                eprintln!(
                    "soak {plane}: {}/{n} connections, {:.2} GB verified, {} failures, {:?}",
                    soak.done.load(Ordering::Relaxed),
                    soak.bytes.load(Ordering::Relaxed) as f64 / 1e9,
                    soak.failures.lock().unwrap().len(),
                    t0.elapsed()
                );
            }
        }
        for w in workers {
            if w.join().is_err() {
                soak.fail("a client worker panicked".into());
            }
        }
        // Server handlers end by themselves within their I/O timeouts.
        let hs: Vec<JoinHandle<()>> = std::mem::take(&mut *handlers.lock().unwrap());
        for h in hs {
            if h.join().is_err() {
                soak.fail("a server handler panicked".into());
            }
        }
        stop.store(true, Ordering::Relaxed);
        for a in acceptors {
            let _ = a.join();
        }
        let hs: Vec<JoinHandle<()>> = std::mem::take(&mut *handlers.lock().unwrap());
        for h in hs {
            let _ = h.join();
        }
        let wall = t0.elapsed();

        // Every stream: the receiver saw exactly what the sender sent.
        {
            let ledger = soak.ledger.lock().unwrap();
            for (key, r) in &ledger.received {
                match ledger.sent.get(key) {
                    Some(s) if s.len == r.len && s.hash == r.hash => {}
                    other => soak.fail(format!(
                        "#{} stream {}: sent {other:?}, received {r:?}",
                        key.0, key.1
                    )),
                }
            }
        }
        // Every close line: exact counts and the right end.
        let outcomes = outcomes.lock().unwrap().clone();
        let closed_ok = wait_until(Duration::from_secs(10), || {
            ks.log().matches(" closed: ").count() >= outcomes.len()
        });
        if !closed_ok {
            soak.fail(format!(
                "only {} close lines for {} connections",
                ks.log().matches(" closed: ").count(),
                outcomes.len()
            ));
        }
        let mut lines = close_lines(&ks.log());
        for (id, local, (up, down, end)) in match_close_lines(&mut lines, &outcomes) {
            soak.fail(format!(
                "{} from {local}: no close line with up={up:?} down={down:?} end={end}",
                soak.plans[id as usize].describe(),
            ));
        }
        let remapped = outcomes
            .iter()
            .filter(|o| !lines.iter().any(|l| l.client == o.1.to_string()))
            .count();
        let st = ks.stats();
        let mut per_kind: HashMap<Kind, usize> = HashMap::new();
        for p in &soak.plans {
            *per_kind.entry(p.kind).or_default() += 1;
        }
        let failures = soak.failures.lock().unwrap().clone();
        eprintln!(
            "soak {plane}: seed {base}: {n} connections ({} IPv6) in {wall:?}, {:.3} GB verified \
             (ksocks bytes_up={} bytes_down={}), {} failures; {remapped} client ports remapped by NAT; fallbacks={} (map_full={} \
             unsupported={} error={}); per kind {per_kind:?}",
            soak.plans.iter().filter(|p| p.fam == Family::V6).count(),
            soak.bytes.load(Ordering::Relaxed) as f64 / 1e9,
            st.get("bytes_up"),
            st.get("bytes_down"),
            failures.len(),
            st.fields.get("fallbacks").copied().unwrap_or(0),
            st.fields.get("fallback_map_full").copied().unwrap_or(0),
            st.fields.get("fallback_unsupported").copied().unwrap_or(0),
            st.fields.get("fallback_error").copied().unwrap_or(0),
        );
        assert!(
            failures.is_empty(),
            "soak {plane} (KSOCKS_SOAK_SEED={base}): {} failures, first:\n{}",
            failures.len(),
            failures[..failures.len().min(20)].join("\n")
        );
        assert_eq!(st.get("total"), n as u64, "connections ksocks accepted");
        ks.assert_idle();
    });
}

/// The randomized soak on the sockmap plane.
#[test]
fn sockmap() {
    crate::soak("sockmap", crate::Inbound::Redirect);
}
/// The same through TPROXY: the sockets the kernel plane splices are transparent ones.
#[test]
fn sockmap_tproxy() {
    crate::soak("sockmap", crate::Inbound::Tproxy);
}
/// The randomized soak on the splice plane.
#[test]
fn splice() {
    crate::soak("splice", crate::Inbound::Redirect);
}
/// The randomized soak on the copy plane.
#[test]
fn copy() {
    crate::soak("copy", crate::Inbound::Redirect);
}
