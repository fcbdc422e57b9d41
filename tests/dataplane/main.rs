//! Data-plane integration tests (issue 3, items 7 d, 7 f and 8): memory stays bounded behind a
//! receiver that never reads or reads slowly, a seeded randomized soak of every connection
//! pattern with every byte checked, `--user` privilege dropping with the kernel planes still in
//! use, and exact byte counts in the close line of sockmap connections.
//!
//! Everything runs in the harness' namespaces (client -> router with ksocks -> server), for the
//! planes sockmap and splice, and copy where it is cheap. After every test ksocks holds no
//! connection, no socket beyond its listeners and no BPF map entry.
//!
//! The memory tests measure the whole machine (`/proc/meminfo`), so they hold an exclusive lock:
//! no other test of this crate runs while one of them measures (`--test-threads=8` is fine).
//! Concurrent work elsewhere on the machine is filtered as described at `MemSample`.
//!
//! Run as root:
//! `cargo test --release --test dataplane -- --test-threads=8 --nocapture` (figures print with
//! `--nocapture`). Long soak by hand, e.g.
//! `KSOCKS_SOAK=5000 KSOCKS_SOAK_MAX_MIB=256 cargo test --release --test dataplane soak::sockmap -- --nocapture`;
//! replay a soak with `KSOCKS_SOAK_SEED=<seed printed by the failing run>`.
//! `KSOCKS_TEST_INFLIGHT_MAX=BYTES` overrides the budget of the memory tests, e.g. 4294967296
//! to show that they fail against a proxy without backpressure.
//!
//! Layout: this file holds the harness every part shares (the machine lock, `with_log`,
//! `serve_one`, `close_line`) and the close-line test of sockmap connections; `memory` the
//! bounded-memory tests (`memory/bound.rs`: the bound and its measurement), `soak` the
//! randomized soak (`soak/plan.rs`: the seeded plan, `soak/peers.rs`: both ends of a
//! connection), `user` the `--user` tests.

#[path = "../common/mod.rs"]
mod common;
mod memory;
mod soak;
mod user;

use common::*;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

// The generated test modules call their drivers by crate path (`crate::soak(..)`).
use memory::{bounded_memory, Flow, Reader};
use soak::soak;
use user::user_nobody;

/// Not 12345: benchmark scripts on shared machines kill `ksocks -r 0.0.0.0:12345` by name.
const KSOCKS_PORT: u16 = 12399;
const MIB: u64 = 1024 * 1024;
const KIB: u64 = 1024;

/// Memory tests take this for writing, all other tests for reading.
static MACHINE: RwLock<()> = RwLock::new(());

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    MACHINE.write().unwrap_or_else(|e| e.into_inner())
}

fn shared() -> RwLockReadGuard<'static, ()> {
    MACHINE.read().unwrap_or_else(|e| e.into_inner())
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a number")),
    )
}

/// On a panic in `f`, prints ksocks' log tail and saves the whole log under target/tmp.
fn with_log<T>(ks: &Ksocks, name: &str, f: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(e) => {
            let path = format!(
                "{}/ksocks-dataplane-{name}.log",
                env!("CARGO_TARGET_TMPDIR")
            );
            let saved = match std::fs::write(&path, ks.log()) {
                Ok(()) => format!("full log: {path}"),
                Err(e) => format!("could not save the log to {path}: {e}"),
            };
            eprintln!(
                "--- ksocks log ({name}), last 40 lines ---\n{}\n--- {saved}",
                ks.log_tail(40)
            );
            std::panic::resume_unwind(e)
        }
    }
}

/// Spawns the server side: accepts one connection (≤ 10 s) and runs `f` on it.
fn serve_one<T: Send + 'static>(
    l: TcpListener,
    f: impl FnOnce(TcpStream) -> T + Send + 'static,
) -> JoinHandle<T> {
    thread::spawn(move || {
        let s = accept_timeout(&l, Duration::from_secs(10)).expect("server accept");
        f(s)
    })
}

/// Waits for the close line of the connection from `client` with these counts and end.
fn close_line(ks: &Ksocks, client: SocketAddr, up: u64, down: u64, end: &str) -> String {
    let c = format!(" {client} -> ");
    let (u, d, e) = (
        format!("up={up} "),
        format!("down={down} "),
        format!("end={end}"),
    );
    ks.wait_close_line(&[&c, &u, &d, &e], Duration::from_secs(10))
        .unwrap_or_else(|| {
            panic!(
                "no close line for{c}with {u}{d}{e}; log:\n{}",
                ks.log_tail(20)
            )
        })
}

// ---------------------------------------------------------------------------------------------
// Close line bytes of sockmap connections

/// The bytes of a sockmap connection are moved by the kernel and counted by BPF; the `-v` close
/// line and the stats still report them exactly, for an upload-then-reply, a simultaneous
/// bidirectional transfer and a ping-pong with a banner, IPv4 and IPv6.
#[test]
fn close_line_bytes_sockmap() {
    let _machine = shared();
    if !require_root() {
        return;
    }
    let topo = Topology::new(Inbound::Redirect, KSOCKS_PORT);
    let ks = Ksocks::serve(&topo, &["--dataplane", "sockmap"]);
    with_log(&ks, "close-line-sockmap", || {
        let (mut sum_up, mut sum_down) = (0, 0);
        for fam in [Family::V4, Family::V6] {
            // Upload, FIN, reply.
            let (up, down) = (5 * MIB + 12_345, 3 * MIB + 777);
            let srv = serve_one(topo.server_listener(fam, 5001), move |mut s| {
                expect_stream(&mut s, 50, up, "server: upload");
                send_pattern(&mut s, 51, down, 64 * 1024).expect("server: reply");
            });
            let mut c = topo.client_connect(topo.server_addr(fam, 5001)).unwrap();
            send_all_and_shutdown(&mut c, 50, up);
            expect_stream(&mut c, 51, down, "client: reply");
            join(srv);
            let local = c.local_addr().unwrap();
            drop(c);
            let line = close_line(&ks, local, up, down, "done");
            assert!(line.contains("plane=sockmap"), "{line}");
            sum_up += up;
            sum_down += down;

            // Both ways at once.
            let (up, down) = (7 * MIB + 1, 9 * MIB + 3);
            let srv = serve_one(topo.server_listener(fam, 5002), move |s| {
                let mut w = s.try_clone().unwrap();
                let t = thread::spawn(move || send_all_and_shutdown(&mut w, 53, down));
                let mut r = s;
                expect_stream(&mut r, 52, up, "server: bidirectional");
                join(t);
            });
            let c = topo.client_connect(topo.server_addr(fam, 5002)).unwrap();
            let mut w = c.try_clone().unwrap();
            let t = thread::spawn(move || send_all_and_shutdown(&mut w, 52, up));
            let mut r = c;
            expect_stream(&mut r, 53, down, "client: bidirectional");
            join(t);
            join(srv);
            let local = r.local_addr().unwrap();
            drop(r);
            close_line(&ks, local, up, down, "done");
            sum_up += up;
            sum_down += down;

            // Banner, then 50 rounds of 100 bytes each way.
            let srv = serve_one(topo.server_listener(fam, 5003), move |mut s| {
                s.set_nodelay(true).unwrap();
                send_pattern(&mut s, 54, 999, 999).expect("server: banner");
                for i in 0..50 {
                    let d = recv_exact_verify(&mut s, 100 + i, 100).expect("server: ping");
                    Digest::of_pattern(100 + i, 100).assert_received(&d, "server: ping");
                    send_pattern(&mut s, 200 + i, 100, 100).expect("server: pong");
                }
                expect_eof(&mut s, "server: end");
            });
            let mut c = topo.client_connect(topo.server_addr(fam, 5003)).unwrap();
            c.set_nodelay(true).unwrap();
            let d = recv_exact_verify(&mut c, 54, 999).expect("client: banner");
            Digest::of_pattern(54, 999).assert_received(&d, "client: banner");
            for i in 0..50 {
                send_pattern(&mut c, 100 + i, 100, 100).expect("client: ping");
                let d = recv_exact_verify(&mut c, 200 + i, 100).expect("client: pong");
                Digest::of_pattern(200 + i, 100).assert_received(&d, "client: pong");
            }
            c.shutdown(Shutdown::Write).unwrap();
            expect_eof(&mut c, "client: end");
            join(srv);
            let local = c.local_addr().unwrap();
            drop(c);
            close_line(&ks, local, 5000, 999 + 5000, "done");
            sum_up += 5000;
            sum_down += 5999;
        }
        ks.assert_idle();
        let st = ks.stats();
        assert_eq!(
            st.get("bytes_up"),
            sum_up,
            "stats bytes_up: {:?}",
            st.fields
        );
        assert_eq!(
            st.get("bytes_down"),
            sum_down,
            "stats bytes_down: {:?}",
            st.fields
        );
        eprintln!(
            "close lines: {}",
            ks.log()
                .lines()
                .filter(|l| l.contains(" closed: "))
                .collect::<Vec<_>>()
                .join("\n")
        );
    });
}
