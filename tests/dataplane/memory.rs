//! Memory stays bounded behind receivers that never read or read slowly: `CONNS` stalled
//! connections per case, each sender offering `OFFERED` bytes; the sender's lead over its
//! receiver stays under the path's capacity, kernel memory and ksocks' RSS stay bounded, and
//! afterwards every byte arrives exactly (the bound and its measurement: `bound`). The tests
//! hold the machine lock exclusively.

mod bound;

use crate::common::*;
use crate::{close_line, env_u64, exclusive, with_log, KIB, KSOCKS_PORT, MIB};
use bound::*;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flow {
    /// The server sends, the client receives.
    Download,
    /// The client sends, the server receives.
    Upload,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reader {
    Never,
    Slow,
}

/// Bytes per connection, indexed by the connection's index.
type Counters = Arc<Vec<AtomicU64>>;

/// Total and largest per-connection lead of the senders over the receivers: bytes written
/// and not yet read, i.e. in the path. Senders are read first, so a lead is never inflated.
fn leads(sent: &Counters, recvd: &Counters) -> (u64, u64, u64) {
    let s: Vec<u64> = sent.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let r: Vec<u64> = recvd.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let max = s
        .iter()
        .zip(&r)
        .map(|(s, r)| s.saturating_sub(*r))
        .max()
        .unwrap_or(0);
    (s.iter().sum(), r.iter().sum(), max)
}

/// Which connection a stream belongs to: the client end knows (`Some(i)`) and sends it as the
/// first 8 bytes; the server end reads them (`None`) — REDIRECT hides the client's address.
fn ident(s: &mut TcpStream, idx: Option<u64>) -> u64 {
    match idx {
        Some(i) => {
            s.write_all(&i.to_le_bytes())
                .expect("client: connection index");
            i
        }
        None => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).expect("server: connection index");
            u64::from_le_bytes(b)
        }
    }
}

fn bulk_seed(i: u64) -> u64 {
    0xDA7A_0000 + i
}

/// The sending end: writes `OFFERED` bytes (counted in `sent` as the kernel accepts them),
/// half-closes, then expects the receiver's FIN without data.
fn bulk_send(mut s: TcpStream, idx: Option<u64>, sent: Counters) -> (u64, Digest) {
    set_buf(&s, libc::SO_SNDBUF, END_BUF as usize);
    // The receiver holds still for WINDOW, then needs a few seconds for all connections.
    s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let i = ident(&mut s, idx);
    let mut p = Pattern::new(bulk_seed(i));
    let mut h = StreamHash::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = OFFERED;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..k]);
        let mut off = 0;
        while off < k {
            match s.write(&buf[off..k]) {
                Ok(n) => {
                    off += n;
                    sent[i as usize].fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("sender: after {} bytes: {e}", OFFERED - left + off as u64),
            }
        }
        h.update(&buf[..k]);
        left -= k as u64;
    }
    s.shutdown(Shutdown::Write)
        .expect("sender: shutdown(SHUT_WR)");
    expect_eof(&mut s, "sender: after its FIN");
    (i, h.digest())
}

/// The receiving end: holds still (`Never`) or reads at `SLOW_RATE` (`Slow`) until `go`, then
/// reads everything at full speed up to EOF, verifying every byte; half-closes when done so
/// the connection ends normally. Returns what it received.
fn bulk_receive(
    mut s: TcpStream,
    idx: Option<u64>,
    reader: Reader,
    go: mpsc::Receiver<()>,
    recvd: Counters,
) -> (u64, Digest) {
    set_buf(&s, libc::SO_RCVBUF, END_BUF as usize);
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    if idx.is_some() {
        ident(&mut s, idx); // the client tells the sending server which stream to send
    }
    let mut buf = vec![0u8; 64 * 1024];
    let i;
    let mut v;
    match reader {
        Reader::Never => {
            go.recv_timeout(Duration::from_secs(60))
                .expect("receiver: no go within 60 s");
            i = idx.unwrap_or_else(|| ident(&mut s, None));
            v = Verifier::new(bulk_seed(i));
        }
        Reader::Slow => {
            i = idx.unwrap_or_else(|| ident(&mut s, None));
            v = Verifier::new(bulk_seed(i));
            let t0 = Instant::now();
            let mut small = vec![0u8; 16 * 1024];
            while go.try_recv().is_err() {
                assert!(t0.elapsed() < Duration::from_secs(60), "receiver: no go");
                let n = read_some(&mut s, &mut small)
                    .unwrap_or_else(|e| panic!("slow receiver: after {} bytes: {e}", v.len()));
                assert!(n > 0, "slow receiver: EOF after {} bytes", v.len());
                v.update(&small[..n]);
                recvd[i as usize].fetch_add(n as u64, Ordering::Relaxed);
                let due = Duration::from_secs_f64(v.len() as f64 / SLOW_RATE);
                if let Some(wait) = due.checked_sub(t0.elapsed()) {
                    thread::sleep(wait);
                }
            }
        }
    }
    loop {
        let n = read_some(&mut s, &mut buf)
            .unwrap_or_else(|e| panic!("receiver: after {} bytes: {e}", v.len()));
        if n == 0 {
            break;
        }
        v.update(&buf[..n]);
        recvd[i as usize].fetch_add(n as u64, Ordering::Relaxed);
        assert!(v.len() <= OFFERED, "receiver: more bytes than were sent");
    }
    s.shutdown(Shutdown::Write)
        .expect("receiver: shutdown(SHUT_WR)");
    (i, v.digest())
}

/// Memory and senders stay bounded while `CONNS` receivers hold still or read slowly;
/// afterwards every byte arrives exactly and every connection ends `done`. See
/// `path_capacity` for the bounds and `MemSample` for the measurement.
pub(crate) fn bounded_memory(plane: &str, flow: Flow, reader: Reader) {
    let _machine = exclusive();
    if !require_root() {
        return;
    }
    let name = format!("{plane}-{flow:?}-{reader:?}").to_lowercase();
    let topo = Topology::new(Inbound::Redirect, KSOCKS_PORT);
    pin_tcp_buffers(&topo);
    let inflight = env_u64("KSOCKS_TEST_INFLIGHT_MAX").unwrap_or(INFLIGHT_MAX);
    let inflight_s = inflight.to_string();
    // -vv (the harness adds one -v): the debug lines show when a sockmap source is paused.
    let mut args = vec!["--dataplane", plane, "--inflight-max", &inflight_s, "-v"];
    if plane == "sockmap" {
        args.extend(["--sndbuf", "0"]);
    }
    let ks = Ksocks::serve(&topo, &args);
    let capacity = path_capacity(plane);
    let mem_bound = capacity + MEM_SLACK;
    with_log(&ks, &name, || {
        let counters = || -> Counters { Arc::new((0..CONNS).map(|_| AtomicU64::new(0)).collect()) };
        let (sent, recvd) = (counters(), counters());
        let l = topo.server_listener(Family::V4, 5001);
        let dst = topo.server_addr(Family::V4, 5001);
        let rss0 = ks.rss_kib();
        let base = mem_baseline();
        let acceptor = thread::spawn(move || {
            (0..CONNS)
                .map(|i| {
                    accept_timeout(&l, Duration::from_secs(10))
                        .unwrap_or_else(|e| panic!("server: accept #{i}: {e}"))
                })
                .collect::<Vec<_>>()
        });
        let clients: Vec<TcpStream> = (0..CONNS)
            .map(|_| topo.client_connect(dst).expect("client connect"))
            .collect();
        let servers = join(acceptor);
        let locals: Vec<SocketAddr> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
        let t0 = Instant::now();
        // A sender and a receiver thread per end; the accept order need not match the connect
        // order, so the client end sends its index first and the streams are paired by it.
        let mut gos = Vec::new();
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for (i, (c, s)) in clients.into_iter().zip(servers).enumerate() {
            let (go_tx, go_rx) = mpsc::channel();
            gos.push(go_tx);
            let ((snd, snd_idx), (rcv, rcv_idx)) = match flow {
                Flow::Download => ((s, None), (c, Some(i as u64))),
                Flow::Upload => ((c, Some(i as u64)), (s, None)),
            };
            let sent = sent.clone();
            let recvd = recvd.clone();
            senders.push(thread::spawn(move || bulk_send(snd, snd_idx, sent)));
            receivers.push(thread::spawn(move || {
                bulk_receive(rcv, rcv_idx, reader, go_rx, recvd)
            }));
        }
        let window = match reader {
            Reader::Never => WINDOW,
            Reader::Slow => SLOW_WINDOW,
        };
        let (mut samples, mut rss_peak, mut lead_peak) = (Vec::new(), 0, 0);
        while t0.elapsed() < window {
            thread::sleep(Duration::from_millis(50));
            samples.push((t0.elapsed(), meminfo()));
            rss_peak = rss_peak.max(ks.rss_kib());
            lead_peak = lead_peak.max(leads(&sent, &recvd).2);
        }
        let drop_kib = median(
            samples
                .iter()
                .filter(|(t, _)| *t >= window / 2)
                .map(|(_, m)| taken(&base, m))
                .collect(),
        );
        let drop_peak = samples
            .iter()
            .map(|(_, m)| taken(&base, m))
            .max()
            .unwrap_or(0);
        let tail: Vec<MemSample> = samples.iter().rev().take(7).map(|(_, m)| *m).collect();
        let held = median_sample(&tail);
        let (sent_w, recvd_w, _) = leads(&sent, &recvd);
        // -vv: `#N: upstream -> client: BYTES bytes in flight, pausing the source`.
        let paused_at: Vec<u64> = ks
            .log()
            .lines()
            .filter(|l| l.ends_with("bytes in flight, pausing the source"))
            .filter_map(|l| l.rsplit(": ").next()?.split(' ').next()?.parse().ok())
            .collect();
        let mib = |b: u64| b as f64 / MIB as f64;
        eprintln!(
            "memory {name}: {CONNS} connections, --inflight-max {inflight}: in {window:?} the \
             senders wrote {:.1} MiB, the receivers read {:.1} MiB (per connection {:.1} / \
             {:.1}; largest lead of a sender {:.1} MiB); kernel memory taken: median {:.1} MiB, \
             peak {:.1} MiB; ksocks RSS {rss0} -> peak {rss_peak} KiB; {} sockmap pauses, \
             in flight when paused: max {:.1} MiB",
            mib(sent_w),
            mib(recvd_w),
            mib(sent_w / CONNS),
            mib(recvd_w / CONNS),
            mib(lead_peak),
            drop_kib as f64 / 1024.0,
            drop_peak as f64 / 1024.0,
            paused_at.len(),
            mib(paused_at.iter().copied().max().unwrap_or(0)),
        );
        for g in &gos {
            g.send(()).expect("receiver gone");
        }
        let mut sent_d: HashMap<u64, Digest> = senders.into_iter().map(join).collect();
        for r in receivers {
            let (i, rd) = join(r);
            let sd = sent_d
                .remove(&i)
                .unwrap_or_else(|| panic!("stream #{i} received twice or never sent"));
            sd.assert_received(
                &rd,
                &format!("receiver #{i}: the whole stream after the stall"),
            );
        }
        // The 8-byte connection index goes up in both cases.
        let (up, down) = match flow {
            Flow::Download => (8, OFFERED),
            Flow::Upload => (8 + OFFERED, 0),
        };
        for local in locals {
            let line = close_line(&ks, local, up, down, "done");
            assert!(line.contains(&format!("plane={plane}")), "{line}");
        }
        ks.assert_idle();
        let released = taken(&mem_baseline(), &held);
        let per_conn = drop_kib.min(released) / CONNS as i64;
        eprintln!(
            "memory {name}: released after the drain {:.1} MiB; held per connection {:.1} MiB \
             (bound {} MiB, path capacity {} MiB); drain took {:?}",
            released as f64 / 1024.0,
            per_conn as f64 / 1024.0,
            mem_bound / MIB,
            capacity / MIB,
            t0.elapsed() - window,
        );
        assert!(
            per_conn.max(0) as u64 * KIB < mem_bound,
            "{name}: each stalled connection held {per_conn} KiB of kernel memory (all {CONNS}: \
             taken during the window {drop_kib} KiB, released after the drain {released} KiB), \
             bound {} KiB per connection",
            mem_bound / KIB
        );
        assert!(
            lead_peak < capacity,
            "{name}: a sender got {lead_peak} bytes ahead of its receiver, but the socket \
             buffers and the in-flight budget of one path hold at most {capacity}: the \
             budget was not kept (in flight when ksocks paused a source: up to {} bytes, \
             --inflight-max {inflight})",
            paused_at.iter().copied().max().unwrap_or(0)
        );
        assert!(
            rss_peak < rss0 + RSS_GROWTH_KIB,
            "{name}: ksocks RSS grew from {rss0} to {rss_peak} KiB"
        );
        if reader == Reader::Slow {
            // At 3 MB/s for 4 s each reader gets ~12 MB; far less means the path stalls them.
            assert!(
                recvd_w > CONNS * 4 * MIB,
                "{name}: the slow readers only got {recvd_w} bytes"
            );
        }
    });
}

macro_rules! memory_tests {
    ($plane:ident: $($case:ident $flow:ident $reader:ident),+) => {
        mod $plane {
            $(
                /// Bounded memory behind a stalled or slow receiver, then an exact stream.
                #[test]
                fn $case() {
                    crate::bounded_memory(
                        stringify!($plane),
                        crate::Flow::$flow,
                        crate::Reader::$reader,
                    );
                }
            )+
        }
    };
}

memory_tests!(sockmap:
    never_read_download Download Never,
    never_read_upload Upload Never,
    slow_read_download Download Slow,
    slow_read_upload Upload Slow);
memory_tests!(splice:
    never_read_download Download Never,
    never_read_upload Upload Never,
    slow_read_download Download Slow,
    slow_read_upload Upload Slow);
memory_tests!(copy:
    never_read_download Download Never,
    slow_read_download Download Slow);
