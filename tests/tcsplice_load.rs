//! The tcsplice handoff under load and loss: a soak through a server namespace that drops 1%
//! of packets at random (retransmissions and SACK blocks cross the splice), and handoffs that
//! meet a sender that never pauses, a server that speaks first, a client's FIN or reset
//! right around the handoff. Every byte is checked; every connection ends spliced or with
//! its fallback logged, its close line exact, and nothing of it left behind.
//!
//! `KSOCKS_SOAK=N` sets the soak's connection count (default 400, what CI runs; run >= 10,000
//! by hand: `KSOCKS_SOAK=10000 cargo test --release --test tcsplice_load soak -- --nocapture`).

mod common;

use common::cases::serve_one as serve;
use common::splice::*;
use common::*;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const SERVER_PORT: u16 = 5001;
const MIB: u64 = 1024 * 1024;

/// Drops `pct`% of the server's TCP packets each way, counted.
fn lossy_server(topo: &Topology, pct: u32) {
    let rules = format!(
        "table inet loss {{\n chain in {{\n  type filter hook input priority 0; policy accept;\n  meta l4proto tcp numgen random mod 100 < {pct} counter drop\n }}\n chain out {{\n  type filter hook output priority 0; policy accept;\n  meta l4proto tcp numgen random mod 100 < {pct} counter drop\n }}\n}}\n"
    );
    let cmd = format!("nft -f - <<'EOF'\n{rules}EOF");
    sh(&topo.server, &cmd);
}

fn dropped(topo: &Topology) -> u64 {
    sh(&topo.server, "nft list table inet loss")
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "packets")
        .filter_map(|w| w[1].parse::<u64>().ok())
        .sum()
}

/// Sizes of soak connection `i`: (upload, download).
fn sizes(i: u64) -> (u64, u64) {
    (1 + i * 7919 % 200_000, 1 + i * 104_729 % 600_000)
}

/// Checks the close lines: one per connection, each `end=done` with exactly the bytes one of
/// the connections moved, and on tcsplice or with its fallback logged. Returns (spliced,
/// fallback reasons).
fn books(ks: &Ksocks, want: &mut Vec<(u64, u64)>) -> (usize, Vec<String>) {
    let n = want.len();
    let all = wait_until(Duration::from_secs(30), || {
        close_lines(&ks.log()).len() >= n
    });
    let lines = close_lines(&ks.log());
    let path = format!("{}/ksocks-tcsplice-load.log", env!("CARGO_TARGET_TMPDIR"));
    let _ = std::fs::write(&path, ks.log()); // the last run's log, for a failure
    assert!(all, "{} close lines for {n} connections", lines.len());
    let mut got: Vec<(u64, u64)> = lines.iter().map(|l| (l.1, l.2)).collect();
    for l in &lines {
        assert_eq!(l.4, "done", "{l:?}");
    }
    got.sort_unstable();
    want.sort_unstable();
    assert!(
        got == *want,
        "close lines' bytes differ from what the connections moved"
    );
    ks.assert_plane_or_logged("tcsplice")
}

/// N connections (KSOCKS_SOAK, default 400), 16 at a time, alternately IPv4 and IPv6, through
/// 1% loss: a hello each way, a 200 ms pause (the handoff), then both ways at once and FINs.
/// The client's and the server's pause between the hellos and the bulk: the handoff's window.
const PAUSE: Duration = Duration::from_millis(200);

#[test]
fn soak_with_loss() {
    let n: u64 = std::env::var("KSOCKS_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    // KSOCKS_SOAK_DEBUG=1: ksocks at -vv, its log saved if the soak fails.
    let debug = std::env::var("KSOCKS_SOAK_DEBUG").is_ok();
    let args: &[&str] = if debug {
        &["--max-conns", "4096", "-v"]
    } else {
        &["--max-conns", "4096"]
    };
    let Some(s) = Spl::start(Inbound::Redirect, Family::V4, args, &[]) else {
        return;
    };
    raise_nofile();
    lossy_server(&s.topo, 1);
    let t0 = Instant::now();
    let listeners = [Family::V4, Family::V6].map(|f| s.topo.server_listener(f, SERVER_PORT));
    let servers: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            serve_many(l, n as usize / 2, |_, mut sv| {
                let mut id = [0u8; 8];
                std::io::Read::read_exact(&mut sv, &mut id).expect("server: id");
                let i = u64::from_le_bytes(id);
                let (up, down) = sizes(i);
                let d = recv_exact_verify(&mut sv, 3 * i, 100).expect("server: hello");
                Digest::of_pattern(3 * i, 100).assert_received(&d, "server: hello");
                send_pattern(&mut sv, 3 * i + 1, 100, 100).expect("server: hello");
                let mut w = sv.try_clone().unwrap();
                let tx = thread::spawn(move || send_all_and_shutdown(&mut w, 3 * i + 2, down));
                expect_stream(&mut sv, 3 * i + 3, up, "server: upload");
                join(tx);
            })
        })
        .collect();
    let next = Arc::new(AtomicUsize::new(0));
    let want = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (next, want, topo_c) = (next.clone(), want.clone(), s.topo.client.clone());
            let dsts = [Family::V4, Family::V6].map(|f| s.topo.server_addr(f, SERVER_PORT));
            thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as u64;
                if i >= n {
                    return;
                }
                let dst = dsts[(i % 2) as usize];
                let mut c = Topology::in_ns(&topo_c, move || {
                    TcpStream::connect_timeout(&dst, Duration::from_secs(10))
                })
                .join()
                .unwrap()
                .unwrap_or_else(|e| panic!("#{i}: connect: {e}"));
                with_timeouts(&c, IO_TIMEOUT);
                let (up, down) = sizes(i);
                std::io::Write::write_all(&mut c, &i.to_le_bytes()).unwrap();
                send_pattern(&mut c, 3 * i, 100, 100).expect("client: hello");
                let d = recv_exact_verify(&mut c, 3 * i + 1, 100).expect("client: hello");
                Digest::of_pattern(3 * i + 1, 100).assert_received(&d, "client: hello");
                thread::sleep(PAUSE);
                let mut w = c.try_clone().unwrap();
                let tx = thread::spawn(move || send_all_and_shutdown(&mut w, 3 * i + 3, up));
                expect_stream(&mut c, 3 * i + 2, down, "client: download");
                join(tx);
                want.lock().unwrap().push((108 + up, 100 + down));
            })
        })
        .collect();
    workers.into_iter().for_each(join);
    servers.into_iter().for_each(join);
    let (spliced, fell_back) = books(&s.ks, &mut want.lock().unwrap());
    let lost = dropped(&s.topo);
    let mut reasons: Vec<(String, usize)> = Vec::new();
    for r in fell_back {
        match reasons.iter_mut().find(|(x, _)| *x == r) {
            Some((_, c)) => *c += 1,
            None => reasons.push((r, 1)),
        }
    }
    eprintln!(
        "soak: {n} connections through 1% loss in {:.1} s, 0 failures, {spliced} spliced, not: {reasons:?}; {lost} packets dropped by the loss rule",
        t0.elapsed().as_secs_f64()
    );
    // At -v (KSOCKS_SOAK_DEBUG) the fallbacks other than `early` are logged with a detail.
    let log = s.ks.log();
    let odd = log
        .lines()
        .filter(|l| l.contains("tcsplice: not spliced:") && !l.contains(": early"));
    for l in odd.take(10) {
        eprintln!("soak: {l}");
    }
    assert!(lost > 0, "the loss rule dropped nothing");
    // How many find their quiet moment in the pause depends on the machine's load (with a
    // 50 ms pause: 72% of 10,000 on a quiet machine, 49% on a loaded one, 13% at a load
    // average of 10 on 2 cores); a tenth is the floor: the soak is about exactness, and a
    // soak whose connections all stayed in userspace would not test the splice.
    assert!(
        spliced as u64 * 10 >= n,
        "only {spliced} of {n} connections spliced"
    );
    s.assert_clean();
}

/// How one handoff-under-load case's connections ended: checked exact by the caller; here,
/// each on tcsplice or with its fallback logged, and nothing left.
fn finish(s: &Spl, what: &str) {
    let (spliced, fell_back) = s.ks.assert_plane_or_logged("tcsplice");
    eprintln!("{what}: {spliced} spliced, not: {fell_back:?}");
    s.assert_clean();
}

/// The client uploads 64 MiB from its first byte and never pauses; the server answers 1 MiB
/// after the client's FIN. Exact; spliced once a quiet moment came, or fallen back (busy).
#[test]
fn upload_from_the_first_byte() {
    for fam in [Family::V4, Family::V6] {
        let Some(s) = Spl::start(Inbound::Redirect, fam, &[], &[]) else {
            return;
        };
        let srv = serve(s.topo.server_listener(fam, SERVER_PORT), |mut sv| {
            expect_stream(&mut sv, 1, 64 * MIB, "server: upload");
            send_pattern(&mut sv, 2, MIB, 65536).expect("server: reply");
        });
        let mut c = s.topo.client_connect(s.dst(SERVER_PORT)).unwrap();
        send_all_and_shutdown(&mut c, 1, 64 * MIB);
        expect_stream(&mut c, 2, MIB, "client: reply");
        join(srv);
        drop(c);
        s.ks.expect_close_line(64 * MIB, MIB, "done");
        finish(&s, "upload from the first byte");
    }
}

/// The server sends 64 MiB the moment it accepts; the client then answers 1 MiB.
#[test]
fn server_speaks_first_in_bulk() {
    for fam in [Family::V4, Family::V6] {
        let Some(s) = Spl::start(Inbound::Redirect, fam, &[], &[]) else {
            return;
        };
        let srv = serve(s.topo.server_listener(fam, SERVER_PORT), |mut sv| {
            send_pattern(&mut sv, 3, 64 * MIB, 256 * 1024).expect("server: bulk");
            expect_stream(&mut sv, 4, MIB, "server: answer");
        });
        let mut c = s.topo.client_connect(s.dst(SERVER_PORT)).unwrap();
        let d = recv_exact_verify(&mut c, 3, 64 * MIB).expect("client: bulk");
        Digest::of_pattern(3, 64 * MIB).assert_received(&d, "client: bulk");
        send_all_and_shutdown(&mut c, 4, MIB);
        join(srv);
        drop(c);
        s.ks.expect_close_line(MIB, 64 * MIB, "done");
        finish(&s, "server speaks first");
    }
}

/// 40 connections whose client sends its FIN 0 to 20 ms after a hello exchange, i.e. around
/// the handoff, with 5000 bytes before it; the server then answers 3000 bytes and its FIN.
#[test]
fn fin_during_the_handoff() {
    let Some(s) = Spl::start(Inbound::Redirect, Family::V4, &[], &[]) else {
        return;
    };
    let l = s.topo.server_listener(Family::V4, SERVER_PORT);
    let srv = serve_many(l, 40, |_, mut sv| {
        let d = recv_exact_verify(&mut sv, 5, 1000).expect("server: hello");
        Digest::of_pattern(5, 1000).assert_received(&d, "server: hello");
        send_pattern(&mut sv, 6, 1000, 1000).expect("server: hello");
        expect_stream(&mut sv, 7, 5000, "server: last bytes and FIN");
        send_all_and_shutdown(&mut sv, 8, 3000);
    });
    let clients: Vec<_> = (0..40u64)
        .map(|i| {
            let c = s.topo.client_connect(s.dst(SERVER_PORT)).unwrap();
            thread::spawn(move || {
                let mut c = c;
                send_pattern(&mut c, 5, 1000, 1000).expect("client: hello");
                let d = recv_exact_verify(&mut c, 6, 1000).expect("client: hello");
                Digest::of_pattern(6, 1000).assert_received(&d, "client: hello");
                thread::sleep(Duration::from_micros(500 * i));
                send_all_and_shutdown(&mut c, 7, 5000);
                expect_stream(&mut c, 8, 3000, "client: answer");
            })
        })
        .collect();
    clients.into_iter().for_each(join);
    join(srv);
    let mut want = vec![(6000, 4000); 40];
    books(&s.ks, &mut want);
    finish(&s, "FIN during the handoff");
}

/// 40 connections whose client resets 0 to 20 ms after a hello exchange: the server sees the
/// reset (never a hang), ksocks logs `end=client-reset`, nothing is left.
#[test]
fn reset_during_the_handoff() {
    let Some(s) = Spl::start(Inbound::Redirect, Family::V4, &[], &[]) else {
        return;
    };
    let l = s.topo.server_listener(Family::V4, SERVER_PORT);
    let srv = serve_many(l, 40, |_, mut sv| {
        let d = recv_exact_verify(&mut sv, 9, 1000).expect("server: hello");
        Digest::of_pattern(9, 1000).assert_received(&d, "server: hello");
        send_pattern(&mut sv, 10, 1000, 1000).expect("server: hello");
        sv.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 1];
        match read_some(&mut sv, &mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("server: expected the client's reset, got {other:?}"),
        }
    });
    let clients: Vec<_> = (0..40u64)
        .map(|i| {
            let c = s.topo.client_connect(s.dst(SERVER_PORT)).unwrap();
            thread::spawn(move || {
                let mut c = c;
                send_pattern(&mut c, 9, 1000, 1000).expect("client: hello");
                let d = recv_exact_verify(&mut c, 10, 1000).expect("client: hello");
                Digest::of_pattern(10, 1000).assert_received(&d, "client: hello");
                thread::sleep(Duration::from_micros(500 * i));
                set_linger_zero(&c);
                c.shutdown(Shutdown::Read).ok();
            })
        })
        .collect();
    clients.into_iter().for_each(join);
    join(srv);
    let all = wait_until(Duration::from_secs(10), || {
        close_lines(&s.ks.log()).len() >= 40
    });
    let lines = close_lines(&s.ks.log());
    assert!(all, "{} close lines", lines.len());
    for l in &lines {
        assert!(
            (l.1, l.2, l.4.as_str()) == (1000, 1000, "client-reset"),
            "{l:?}"
        );
    }
    finish(&s, "reset during the handoff");
}
