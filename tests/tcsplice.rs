//! The tcsplice plane beyond the shared cases (tests/transparent.rs and tests/proxy/ run
//! those on it too): what ksocks refuses to start with, that it detaches from tc on exit and
//! removes a crashed run's filters, the clsact path of kernels before 6.6, a stalled reader's
//! memory, and a client port reused while its first flow is spliced. After each test nothing
//! of its flows is left (`Spl::assert_clean`). Run as root: `cargo test --test tcsplice`.

mod common;

use common::frame::{inject, mac_of, Seg, ACK, RST};
use common::splice::*;
use common::*;
use ksocks::plane::tcsplice::kernel::Kernel;
use ksocks::sys::netlink::Netlink;
use ksocks::sys::repair;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const SERVER_PORT: u16 = 5001;
const MIB: u64 = 1024 * 1024;

/// ksocks exits at once, with one line saying why, when the plane cannot run on a device.
#[test]
fn refuses_devices_it_cannot_use() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(Inbound::Redirect, KSOCKS_PORT);
    let run = |extra: &[&str]| {
        let mut args = topo.listen_args();
        args.extend(
            ["--dataplane", "tcsplice"]
                .iter()
                .chain(extra)
                .map(|a| a.to_string()),
        );
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        match Ksocks::try_start(&topo, &argv) {
            Ok(_) => panic!("ksocks {argv:?} started"),
            Err(e) => e,
        }
    };
    for (extra, why) in [
        (
            &["--splice-dev", "nope0"][..],
            "--splice-dev nope0: no such interface",
        ),
        (&["--splice-dev", "lo"][..], "lo: not an Ethernet device"),
    ] {
        let err = run(extra);
        assert!(
            err.contains(&format!("error: tcsplice data plane unavailable: {why}")),
            "{extra:?}: {err}"
        );
    }
    sh(&topo.router, "ethtool -K rs rx-gro-list on");
    let err = run(&[]);
    assert!(err.contains("ethtool -K rs rx-gro-list off"), "{err}");
}

/// A tcx attachment per device while ksocks runs and none after SIGTERM; the same with
/// clsact filters (the path of kernels before 6.6, forced by a test hook), and a filter a
/// killed ksocks left behind is removed by the next start.
#[test]
fn detaches_on_exit_and_cleans_up_after_a_crash() {
    let Some(mut s) = Spl::start(Inbound::Redirect, Family::V4, &[], &[]) else {
        return;
    };
    assert_eq!(s.attachments(), (2, 0), "tcx on rc and rs");
    assert!(matches!(s.ks.stop(), Some(st) if st.success()));
    assert_eq!(s.attachments(), (0, 0), "tcx links closed at exit");
    if cfg!(not(feature = "test-hooks")) {
        return eprintln!("clsact part skipped: needs --features test-hooks (scripts/test)");
    }

    // A filter with our name and a program of ours, as a killed ksocks would leave it.
    let stale = s
        .topo
        .in_router(|| {
            let k = Kernel::load(4).unwrap();
            let mut nl = Netlink::open(libc::NETLINK_ROUTE).unwrap();
            // SAFETY: a NUL-terminated literal.
            let rc = unsafe { libc::if_nametoindex(c"rc".as_ptr()) };
            nl.add_clsact(rc).unwrap();
            nl.add_bpf_filter(rc, true, 0xC5, 1, k.prog.as_fd(), "ksocks_tcsplice")
                .unwrap();
        })
        .join();
    assert!(stale.is_ok());
    assert_eq!(s.attachments(), (0, 1));
    let env = [("KSOCKS_TEST_CLSACT", "1")];
    s.ks = Ksocks::start_env(&s.topo, &args(&s.topo), &env);
    assert!(
        s.ks.log().contains("removed 1 clsact filter"),
        "{}",
        s.ks.log()
    );
    assert!(
        s.ks.log().contains("rc (clsact), rs (clsact)"),
        "{}",
        s.ks.log()
    );
    assert_eq!(s.attachments(), (0, 2));
    // A whole transfer through the clsact filters, spliced.
    let l = s.topo.server_listener(s.fam, SERVER_PORT);
    let (mut c, mut srv) = s.spliced(&l, SERVER_PORT, 0, 10);
    let rx = thread::spawn(move || {
        expect_stream(&mut srv, 20, 32 * MIB, "server: upload");
        send_pattern(&mut srv, 21, 8 * MIB, 65536).expect("server: reply");
    });
    send_all_and_shutdown(&mut c, 20, 32 * MIB);
    expect_stream(&mut c, 21, 8 * MIB, "client: reply");
    join(rx);
    drop(c);
    let line =
        s.ks.expect_close_line(32 * MIB + 100, 8 * MIB + 100, "done");
    assert!(line.contains(" plane=tcsplice "), "{line}");
    s.assert_clean();
    assert!(matches!(s.ks.stop(), Some(st) if st.success()));
    assert_eq!(s.attachments(), (0, 0), "filters deleted at exit");
}

fn args(topo: &Topology) -> Vec<&'static str> {
    let mut a: Vec<&'static str> = topo
        .listen_args()
        .into_iter()
        .map(|s| &*Box::leak(s.into_boxed_str()))
        .collect();
    a.extend(["--dataplane", "tcsplice"]);
    a
}

/// A client segment that passed the program before a handoff but reaches the frozen socket
/// after it (delayed between tc ingress and TCP by a preempted CPU: the kernel matrix saw
/// it under qemu, 1 connection in ~1,000 hung) is acknowledged by that socket, which still
/// runs TCP's receive path. The client must not take that ACK, or it never sends those bytes
/// again and the server never gets them. A test hook sends the client's segments to the
/// frozen socket for 300 ms after the handoff; the whole upload must still arrive, spliced.
#[test]
fn late_segment_to_a_frozen_socket_is_not_believed() {
    if cfg!(not(feature = "test-hooks")) {
        return eprintln!("skipped: needs --features test-hooks (scripts/test)");
    }
    for fam in [Family::V4, Family::V6] {
        let env = [("KSOCKS_TEST_LATE_MS", "300")];
        let Some(s) = Spl::start(Inbound::Redirect, fam, &[], &env) else {
            return;
        };
        let l = s.topo.server_listener(fam, SERVER_PORT);
        let (mut c, mut srv) = s.spliced(&l, SERVER_PORT, 0, 90);
        let rx = thread::spawn(move || expect_stream(&mut srv, 91, 4 * MIB, "server: upload"));
        send_all_and_shutdown(&mut c, 91, 4 * MIB);
        join(rx);
        expect_stream(&mut c, 92, 0, "client: the server's FIN");
        drop(c);
        let line = s.ks.expect_close_line(4 * MIB + 100, 100, "done");
        assert!(line.contains(" plane=tcsplice "), "{line}");
        s.assert_clean();
    }
}

/// A spliced flow whose reader stops for 3 s, then reads slowly: the server is held back by
/// the client's own window (it writes about what the client's buffers hold), and the router
/// holds nothing for it — its frozen sockets queue no byte — nor does ksocks grow.
#[test]
fn stalled_reader_costs_the_router_nothing() {
    for fam in [Family::V4, Family::V6] {
        let Some(s) = Spl::start(Inbound::Redirect, fam, &[], &[]) else {
            return;
        };
        let l = s.topo.server_listener(fam, SERVER_PORT);
        let (mut c, mut srv) = s.spliced(&l, SERVER_PORT, 0, 30);
        set_buf(&c, libc::SO_RCVBUF, 256 * 1024);
        let written = Arc::new(AtomicU64::new(0));
        let w = written.clone();
        let tx = thread::spawn(move || {
            srv.set_write_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let mut p = Pattern::new(31);
            let mut buf = vec![0u8; 64 * 1024];
            while w.load(Ordering::Relaxed) < 200 * MIB {
                p.fill(&mut buf);
                if srv.write_all(&buf).is_err() {
                    break;
                }
                w.fetch_add(buf.len() as u64, Ordering::Relaxed);
            }
        });
        let rss0 = s.ks.rss_kib();
        thread::sleep(Duration::from_secs(3)); // stalled
        let stalled = written.load(Ordering::Relaxed);
        let router = router_socket_bytes(&s);
        eprintln!("{fam:?}: stalled 3 s: server wrote {stalled} B, router sockets hold {router} B");
        assert!(
            router < 64 * 1024,
            "the router holds {router} B for a stalled reader"
        );
        assert!(
            stalled < 16 * MIB,
            "server wrote {stalled} B to a stalled reader"
        );
        // Slowly, at ~4 MB/s, for 2 s: every byte exact.
        let mut v = Verifier::new(31);
        let mut buf = vec![0u8; 16 * 1024];
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(2) {
            let n = read_some(&mut c, &mut buf).expect("client: slow read");
            v.update(&buf[..n]);
            let due = Duration::from_secs_f64(v.len() as f64 / 4e6);
            thread::sleep(due.saturating_sub(t0.elapsed()));
        }
        assert_eq!(v.digest().first_diff, None, "client read wrong bytes");
        let (sent, router) = (written.load(Ordering::Relaxed), router_socket_bytes(&s));
        let rss = s.ks.rss_kib();
        eprintln!("{fam:?}: slow reader read {} B, server wrote {sent} B, router holds {router} B, ksocks RSS {rss0} -> {rss} KiB", v.len());
        assert!(
            router < 64 * 1024 && sent < v.len() + 16 * MIB,
            "not held by the reader"
        );
        assert!(rss < rss0 + 1024, "ksocks grew from {rss0} to {rss} KiB");
        c.shutdown(Shutdown::Both).unwrap();
        set_linger_zero(&c);
        drop(c);
        join(tx);
        s.ks.expect_end(&["client-reset"]);
        s.assert_clean();
    }
}

/// Bytes queued in the router's TCP sockets (receive + send queues, `ss -tn`).
fn router_socket_bytes(s: &Spl) -> u64 {
    let out = sh(&s.topo.router, "ss -tnH");
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(f.get(1)?.parse::<u64>().ok()? + f.get(2)?.parse::<u64>().ok()?)
        })
        .sum()
}

/// While a flow from client port P is spliced, a second connection from the same port P (to
/// another server port) is a flow of its own: both carry their own bytes, both end exact.
/// TPROXY: with REDIRECT both would map to the same redirected tuple (client:P <-> the
/// listener), a clash netfilter resolves by not redirecting the second one at all, whatever
/// the data plane.
#[test]
fn reused_client_port_is_another_flow() {
    for fam in [Family::V4, Family::V6] {
        let Some(s) = Spl::start(Inbound::Tproxy, fam, &[], &[]) else {
            return;
        };
        let (l1, l2) = (
            s.topo.server_listener(fam, SERVER_PORT),
            s.topo.server_listener(fam, SERVER_PORT + 1),
        );
        let (c1, s1) = s.spliced(&l1, SERVER_PORT, 0, 40);
        let port = c1.local_addr().unwrap().port();
        let (c2, s2) = s.spliced(&l2, SERVER_PORT + 1, port, 50);
        assert_eq!(c2.local_addr().unwrap().port(), port);
        let mut hs = Vec::new();
        for (mut c, mut sv, seed) in [(c1, s1, 60), (c2, s2, 70)] {
            let (mut cw, mut sw) = (c.try_clone().unwrap(), sv.try_clone().unwrap());
            hs.push(thread::spawn(move || {
                send_all_and_shutdown(&mut cw, seed, 8 * MIB)
            }));
            hs.push(thread::spawn(move || {
                send_all_and_shutdown(&mut sw, seed + 1, 4 * MIB)
            }));
            hs.push(thread::spawn(move || {
                expect_stream(&mut sv, seed, 8 * MIB, "server");
                expect_stream(&mut c, seed + 1, 4 * MIB, "client");
                Digest::of_pattern(0, 0)
            }));
        }
        for h in hs {
            join(h);
        }
        let lines = close_lines(&s.ks.log());
        let ok = wait_until(Duration::from_secs(5), || {
            close_lines(&s.ks.log())
                .iter()
                .filter(|l| l.0 == port)
                .count()
                == 2
        });
        assert!(ok, "{lines:?}");
        for (p, up, down, plane, end) in close_lines(&s.ks.log()) {
            assert_eq!(
                (p, up, down, plane.as_str(), end.as_str()),
                (port, 8 * MIB + 100, 4 * MIB + 100, "tcsplice", "done")
            );
        }
        s.assert_clean();
    }
}

/// REDIRECT after a clash: a first connection from client port P ends in userspace (its
/// conntrack entry stays, TIME_WAIT); a second one from P to another port then clashes on
/// the redirected tuple, and netfilter remaps its source port — ksocks' socket sees the
/// client at another port than its packets carry. The flow is keyed by conntrack's original
/// tuple, so it is still spliced, exact, and its reset and cleanup reach the real port.
#[test]
fn redirect_with_a_remapped_client_port() {
    let Some(s) = Spl::start(Inbound::Redirect, Family::V4, &[], &[]) else {
        return;
    };
    let (l1, l2) = (
        s.topo.server_listener(Family::V4, SERVER_PORT),
        s.topo.server_listener(Family::V4, SERVER_PORT + 1),
    );
    let (dst, ip) = (s.dst(SERVER_PORT), s.topo.client_ip(Family::V4));
    let first = s
        .topo
        .in_client(move || socket2_bound(SocketAddr::new(ip, 0))?.connect(dst))
        .join()
        .unwrap()
        .unwrap();
    let port = first.local_addr().unwrap().port();
    let mut sv = accept_timeout(&l1, Duration::from_secs(5)).unwrap();
    drop(first); // over before any handoff
    expect_eof(&mut sv, "server: first connection");
    drop(sv);
    s.ks.expect_end(&["done"]);
    let (mut c, mut sv) = s.spliced(&l2, SERVER_PORT + 1, port, 80);
    assert_eq!(c.local_addr().unwrap().port(), port);
    let tx = thread::spawn(move || {
        expect_stream(&mut sv, 81, 4 * MIB, "server");
        send_all_and_shutdown(&mut sv, 82, MIB);
    });
    send_all_and_shutdown(&mut c, 81, 4 * MIB);
    expect_stream(&mut c, 82, MIB, "client");
    join(tx);
    drop(c);
    let line = s.ks.expect_close_line(4 * MIB + 100, MIB + 100, "done");
    assert!(line.contains(" plane=tcsplice "), "{line}");
    let seen = close_lines(&s.ks.log()).last().map(|l| l.0);
    eprintln!("client port {port}, as ksocks' socket saw it: {seen:?}");
    assert_ne!(seen, Some(port), "no clash: the case was not reached");
    s.assert_clean();
}

/// `--user nobody` keeps exactly CAP_NET_ADMIN, which is all the plane needs after start:
/// a flow is spliced, exact, cleaned up; SIGTERM resets a live spliced flow's peers and
/// detaches everything (clsact filters deleted as nobody too, with the test hook).
#[test]
fn runs_as_nobody_with_only_net_admin() {
    for env in [&[][..], &[("KSOCKS_TEST_CLSACT", "1")][..]] {
        let Some(mut s) = Spl::start(Inbound::Redirect, Family::V4, &["--user", "nobody"], env)
        else {
            return;
        };
        let status = std::fs::read_to_string(format!("/proc/{}/status", s.ks.pid())).unwrap();
        let cap = |k: &str| {
            let v = status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap()
                .trim();
            u64::from_str_radix(v, 16).unwrap()
        };
        assert_eq!(
            (cap("CapEff:"), cap("CapPrm:")),
            (1 << 12, 1 << 12),
            "only CAP_NET_ADMIN"
        );
        let l = s.topo.server_listener(Family::V4, SERVER_PORT);
        let (mut c, sv) = s.spliced(&l, SERVER_PORT, 0, 90);
        let rx = thread::spawn(move || {
            let mut sv = sv;
            let d = recv_exact_verify(&mut sv, 91, 8 * MIB).expect("server: upload");
            Digest::of_pattern(91, 8 * MIB).assert_received(&d, "server: upload");
            sv
        });
        send_pattern(&mut c, 91, 8 * MIB, 65536).expect("client: upload");
        let mut sv = join(rx);
        // Stopped with the flow live: both peers hear a reset (from nobody's ksocks).
        assert!(matches!(s.ks.stop(), Some(st) if st.success()));
        expect_eof(&mut c, "client after SIGTERM");
        expect_eof(&mut sv, "server after SIGTERM");
        assert!(s.ks.log().contains("end=shutdown"), "{}", s.ks.log());
        assert_eq!(s.attachments(), (0, 0), "{env:?}: detached");
        let left = sh(
            &s.topo.router,
            "ss -tanH | grep -v -e '^LISTEN' -e '^TIME-WAIT' || true",
        );
        assert!(left.trim().is_empty(), "router sockets left:\n{left}");
    }
}

/// A RST forged on the client's link with a spliced flow's addresses and ports but a sequence
/// number 2^31 away from the client's is dropped by the program (counted `rst_window` in the
/// exit line) and the flow goes on, exact both ways; the same forged RST at the client's own
/// next sequence number then ends it (so the forged packets do reach the program): the server
/// sees the reset, the flow ends `client-reset`.
#[test]
fn blind_reset_does_not_end_a_spliced_flow() {
    for fam in [Family::V4, Family::V6] {
        let Some(mut s) = Spl::start(Inbound::Redirect, fam, &[], &[]) else {
            return;
        };
        let l = s.topo.server_listener(fam, SERVER_PORT);
        let (mut c, mut srv) = s.spliced(&l, SERVER_PORT, 0, 110);
        let macs = (mac_of(&s.topo.router, "rc"), mac_of(&s.topo.client, "c0"));
        let forge = |c: &TcpStream, off: u32| {
            // The client's next sequence number and acknowledgement (its queues are empty).
            let fd = c.as_fd();
            repair::repair_on(fd).unwrap();
            let (snd, rcv) = repair::queue_seqs(fd).unwrap();
            repair::repair_off(fd, repair::Leave::Quiet).unwrap();
            let mut seg = Seg::new(c.local_addr().unwrap(), c.peer_addr().unwrap());
            (seg.seq, seg.ack, seg.flags, seg.win) = (snd.wrapping_add(off), rcv, RST | ACK, 0);
            inject(&s.topo.client, "c0", seg.frame(macs.0, macs.1));
        };
        forge(&c, 1 << 31);
        thread::sleep(Duration::from_millis(300)); // a believed RST would end it by now
        let rx = thread::spawn(move || {
            let d = recv_exact_verify(&mut srv, 111, MIB).expect("server: read");
            Digest::of_pattern(111, MIB).assert_received(&d, "server");
            send_pattern(&mut srv, 112, MIB, 64 * 1024).expect("server: send");
            srv
        });
        send_pattern(&mut c, 111, MIB, 64 * 1024).expect("client: send after the blind RST");
        let d = recv_exact_verify(&mut c, 112, MIB).expect("client: read");
        Digest::of_pattern(112, MIB).assert_received(&d, "client");
        let mut srv = rx.join().unwrap();
        assert_eq!(s.ks.stats().get("open"), 1, "the flow lives");

        forge(&c, 0);
        let mut buf = [0u8; 16];
        let err = srv
            .read(&mut buf)
            .expect_err("the server's read after the RST");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        let line = s.ks.expect_end(&["client-reset"]);
        assert!(line.contains(" plane=tcsplice "), "{line}");
        set_linger_zero(&c);
        drop(c);
        s.assert_clean();
        s.ks.stop();
        let log = s.ks.log();
        assert!(
            log.contains("packets the program dropped: rst_window=1\n"),
            "{log}"
        );
    }
}
