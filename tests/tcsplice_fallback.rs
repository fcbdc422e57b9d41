//! Why a connection stays on the splice plane under `--dataplane tcsplice` (README "Data
//! planes", docs/TCSPLICE.md "Fallback reasons"), each reason provoked for real in the
//! namespaces: a peer that advertises a smaller MSS (`mss`), timestamps or ECN on one leg only
//! (`options`), a SOCKS5 client of one family asking for a destination of the other
//! (`family`), a client on the router itself and a server whose packets never cross a
//! `--splice-dev` (`local`). Each connection says hello both ways and pauses, as one about to be
//! handed off, then moves a bulk both ways; each test checks every byte (hash), that the close
//! line says `plane=splice` with exact counts, that the log says `not spliced: <reason>` for
//! that connection, that the stats line counts `fallback_<reason>` and no other fallback, and
//! that nothing is left behind.
//!
//! Not here: `busy` and `early` (tests/tcsplice_load.rs: a sender that never pauses, FINs and
//! resets around the handoff). `map_full` cannot happen by design: the `flows` map has room for
//! 2 x `--max-conns` entries, a connection puts in two and deletes them before its slot is
//! freed, and ksocks accepts nothing at `--max-conns`; `map_has_room_at_max_conns` checks that
//! bound instead (with the map sized to `--max-conns` entries only, its second connection
//! logs `not spliced: map_full`). `error` has no trigger from outside ksocks: start-up's
//! self-test refuses to run without `TCP_REPAIR`, `--user` keeps CAP_NET_ADMIN, the map
//! operations fail only if something else deletes ksocks' entries behind its back or the
//! kernel runs out of memory, and a frozen socket cannot receive data in the handoff's
//! microseconds, as BLOCK drops every segment that carries payload or a FIN.
//! Run as root: `cargo test --features test-hooks --test tcsplice_fallback`.

mod common;

use common::peers::{remove_intercept_rule, socks_connect, Target};
use common::splice::*;
use common::*;
use ksocks::sys::repair;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::thread;
use std::time::Duration;

const SERVER_PORT: u16 = 5001;
const SOCKS_PORT: u16 = 1080;
const MIB: u64 = 1024 * 1024;
/// Each side's hello, before the pause.
const HELLO: u64 = 100;
/// After the hellos: a quiet moment, when a connection that can be spliced is.
const PAUSE: Duration = Duration::from_millis(200);
/// The MSS a peer advertises in `mss_smaller_than_the_devices_allow` (the devices: 1500).
const SMALL_MSS: u16 = 1000;

/// ksocks on tcsplice with SOCKS5 listeners on every router address, port SOCKS_PORT, besides
/// the transparent ones.
fn with_socks() -> Option<Spl> {
    let (v4, v6) = (
        format!("0.0.0.0:{SOCKS_PORT}"),
        format!("[::]:{SOCKS_PORT}"),
    );
    Spl::start(Inbound::Redirect, Family::V4, &["-s", &v4, "-s", &v6], &[])
}

/// A SOCKS5 CONNECT to `dst` through ksocks at `proxy`, from namespace `ns`.
fn socks_client(ns: &str, proxy: SocketAddr, dst: SocketAddr) -> TcpStream {
    let mut c = Topology::in_ns(ns, move || {
        TcpStream::connect_timeout(&proxy, Duration::from_secs(5))
    })
    .join()
    .unwrap()
    .unwrap_or_else(|e| panic!("connect to ksocks at {proxy}: {e}"));
    with_timeouts(&c, IO_TIMEOUT);
    let r = socks_connect(&mut c, &Target::Ip(dst), None, &[], false)
        .unwrap_or_else(|e| panic!("SOCKS5 handshake with {proxy}: {e}"));
    assert_eq!(r.rep, 0, "SOCKS5 reply to CONNECT {dst}: {r:?}");
    c
}

/// Lines of the log saying a connection was not spliced.
fn not_spliced(s: &Spl) -> usize {
    s.ks.log().matches(" tcsplice: not spliced: ").count()
}

/// One connection's life, from its client stream `c` and the server's listener `l`: a hello
/// each way (seeds `seed`, `seed + 1`), a pause, then `up` and `down` bytes both ways at once
/// (`seed + 2`, `seed + 3`) and both FINs. Every byte is checked.
fn exchange(s: &Spl, l: &TcpListener, c: TcpStream, seed: u64, up: u64, down: u64) {
    let before = not_spliced(s);
    let mut sv = accept_timeout(l, Duration::from_secs(10)).expect("server: accept");
    let mut c = c;
    with_timeouts(&c, IO_TIMEOUT);
    send_pattern(&mut c, seed, HELLO, HELLO as usize).expect("client: hello");
    let d = recv_exact_verify(&mut sv, seed, HELLO).expect("server: hello");
    Digest::of_pattern(seed, HELLO).assert_received(&d, "server: hello");
    send_pattern(&mut sv, seed + 1, HELLO, HELLO as usize).expect("server: hello");
    let d = recv_exact_verify(&mut c, seed + 1, HELLO).expect("client: hello");
    Digest::of_pattern(seed + 1, HELLO).assert_received(&d, "client: hello");
    thread::sleep(PAUSE);
    // Most reasons are found when the entries would go in (2 ms after entry); `local` for an
    // unseen peer only once three probes went unanswered for 1.5 s: the connection lives on
    // until its fallback is logged (or, were it spliced instead, 8 s).
    wait_until(Duration::from_secs(8), || not_spliced(s) > before);
    let (mut cw, mut sw) = (c.try_clone().unwrap(), sv.try_clone().unwrap());
    let tx = [
        thread::spawn(move || send_all_and_shutdown(&mut cw, seed + 2, up)),
        thread::spawn(move || send_all_and_shutdown(&mut sw, seed + 3, down)),
    ];
    let rx = thread::spawn(move || expect_stream(&mut sv, seed + 2, up, "server: upload"));
    expect_stream(&mut c, seed + 3, down, "client: download");
    join(rx);
    for t in tx {
        join(t);
    }
}

/// The connection that moved `up` and `down` bytes after its hellos ended exact on the splice
/// plane, with `not spliced: <reason> (...<detail>...)` logged for it, and the stats line
/// counts `count` fallbacks, all of them `fallback_<reason>`.
fn assert_fell_back(s: &Spl, (up, down): (u64, u64), reason: &str, detail: &str, count: u64) {
    let line = s.ks.expect_close_line(HELLO + up, HELLO + down, "done");
    assert!(line.contains(" plane=splice "), "not on splice: {line}");
    let id = line.split_whitespace().nth(1).unwrap_or("?");
    let log = s.ks.log();
    let prefix = format!("ksocks: {id} tcsplice: not spliced: ");
    let why = log.lines().find_map(|l| l.strip_prefix(&prefix));
    let why = why.unwrap_or_else(|| panic!("{id}: no `not spliced` line; log:\n{log}"));
    eprintln!("{id}: not spliced: {why}");
    assert!(
        why.starts_with(&format!("{reason} (")) && why.contains(detail),
        "{id}: not spliced: {why}; expected {reason} ({detail})"
    );
    let st = s.ks.stats();
    let (n, all) = (st.get(&format!("fallback_{reason}")), st.get("fallbacks"));
    assert_eq!((n, all), (count, count), "stats: {:?}", st.fields);
}

/// A peer that advertises a smaller MSS than the devices allow (1460, 1440): first the client
/// (`TCP_MAXSEG` on its socket before connect), then the server (on its listener). The MSS
/// `tcpi_snd_mss` reports is the advertised one minus 12 bytes of timestamps.
#[test]
fn mss_smaller_than_the_devices_allow() {
    for fam in [Family::V4, Family::V6] {
        let Some(s) = Spl::start(Inbound::Redirect, fam, &[], &[]) else {
            return;
        };
        let l = s.topo.server_listener(fam, SERVER_PORT);
        let (dst, ip) = (s.dst(SERVER_PORT), s.topo.client_ip(fam));
        let c = s
            .topo
            .in_client(move || {
                let sock = socket2_bound(SocketAddr::new(ip, 0))?;
                repair::set_maxseg(sock.as_fd(), SMALL_MSS)?;
                sock.connect(dst)
            })
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("client connect to {dst}: {e}"));
        exchange(&s, &l, c, 10, MIB, 2 * MIB);
        let small = format!("client {}, ", SMALL_MSS - 12);
        assert_fell_back(&s, (MIB, 2 * MIB), "mss", &small, 1);

        let l = s.topo.server_listener(fam, SERVER_PORT + 1);
        repair::set_maxseg(l.as_fd(), SMALL_MSS).unwrap();
        let c = s.topo.client_connect(s.dst(SERVER_PORT + 1)).unwrap();
        exchange(&s, &l, c, 20, 2 * MIB, MIB);
        let small = format!("upstream {}, ", SMALL_MSS - 12);
        assert_fell_back(&s, (2 * MIB, MIB), "mss", &small, 2);
        s.assert_clean();
    }
}

/// Writes `value` to /proc/sys/net/ipv4/`name` in the client's namespace.
fn client_sysctl(s: &Spl, name: &str, value: &'static str) {
    let path = format!("/proc/sys/net/ipv4/{name}");
    s.topo
        .in_client(move || std::fs::write(&path, value).map_err(|e| format!("{path}: {e}")))
        .join()
        .unwrap()
        .unwrap();
}

/// Options on one leg only: a client with TCP timestamps off (the router's upstream
/// connection has them), then over IPv6 a client asking for ECN (the router's listener accepts
/// it, the router's own connect does not ask: `tcp_ecn` 2, the default); then timestamps on
/// neither leg.
#[test]
fn options_on_one_leg_only() {
    let Some(s) = Spl::start(Inbound::Redirect, Family::V4, &[], &[]) else {
        return;
    };
    let l = s.topo.server_listener(Family::V4, SERVER_PORT);
    client_sysctl(&s, "tcp_timestamps", "0");
    let c = s.topo.client_connect(s.dst(SERVER_PORT)).unwrap();
    client_sysctl(&s, "tcp_timestamps", "1");
    exchange(&s, &l, c, 30, MIB, 2 * MIB);
    let ts = "timestamps on one leg only";
    assert_fell_back(&s, (MIB, 2 * MIB), "options", ts, 1);

    let l = s.topo.server_listener(Family::V6, SERVER_PORT);
    client_sysctl(&s, "tcp_ecn", "1");
    let dst = s.topo.server_addr(Family::V6, SERVER_PORT);
    let c = s.topo.client_connect(dst).unwrap();
    client_sysctl(&s, "tcp_ecn", "2");
    exchange(&s, &l, c, 40, 2 * MIB, MIB);
    let ecn = "ECN on one leg only";
    assert_fell_back(&s, (2 * MIB, MIB), "options", ecn, 2);

    // Timestamps on neither leg: a frozen socket could not refuse a late segment (PAWS).
    let l = s.topo.server_listener(Family::V4, SERVER_PORT + 1);
    let server_ts = |v: &'static str| {
        let path = "/proc/sys/net/ipv4/tcp_timestamps";
        Topology::in_ns(&s.topo.server, move || std::fs::write(path, v))
            .join()
            .unwrap()
            .unwrap();
    };
    server_ts("0");
    client_sysctl(&s, "tcp_timestamps", "0");
    let c = s.topo.client_connect(s.dst(SERVER_PORT + 1)).unwrap();
    client_sysctl(&s, "tcp_timestamps", "1");
    exchange(&s, &l, c, 50, MIB, MIB); // (ksocks connects upstream after the accept)
    server_ts("1");
    assert_fell_back(&s, (MIB, MIB), "options", "no timestamps", 3);
    s.assert_clean();
}

/// Legs of different families, through ksocks' SOCKS5 server: an IPv4 client asking for the
/// server's IPv6 address, then an IPv6 client asking for its IPv4 address.
#[test]
fn family_differs_between_legs() {
    let Some(s) = with_socks() else {
        return;
    };
    remove_intercept_rule(&s.topo); // the clients talk to the router itself
    let ls = [Family::V4, Family::V6].map(|f| s.topo.server_listener(f, SERVER_PORT));
    for (i, (from, to)) in [(Family::V4, Family::V6), (Family::V6, Family::V4)]
        .into_iter()
        .enumerate()
    {
        let proxy = SocketAddr::new(s.topo.router_ip(from), SOCKS_PORT);
        let dst = s.topo.server_addr(to, SERVER_PORT);
        let c = socks_client(&s.topo.client, proxy, dst);
        let (up, down) = (MIB + i as u64, 2 * MIB - i as u64);
        exchange(&s, &ls[to as usize], c, 50 + 10 * i as u64, up, down);
        let detail = format!(" and {dst}"); // `<client> and <server>`
        assert_fell_back(&s, (up, down), "family", &detail, i as u64 + 1);
    }
    s.assert_clean();
}

/// A client on the router itself, over loopback: ksocks' SOCKS5 listener at 127.0.0.1 asked
/// for the server's IPv4 address, then at ::1 for its IPv6 address.
#[test]
fn local_client_on_the_router() {
    let Some(s) = with_socks() else {
        return;
    };
    let ls = [Family::V4, Family::V6].map(|f| s.topo.server_listener(f, SERVER_PORT));
    for (i, (lo, fam)) in [("127.0.0.1", Family::V4), ("::1", Family::V6)]
        .into_iter()
        .enumerate()
    {
        let proxy = SocketAddr::new(lo.parse().unwrap(), SOCKS_PORT);
        let dst = s.topo.server_addr(fam, SERVER_PORT);
        let c = socks_client(&s.topo.router, proxy, dst);
        let (up, down) = (MIB + i as u64, 2 * MIB - i as u64);
        exchange(&s, &ls[fam as usize], c, 70 + 10 * i as u64, up, down);
        let detail = format!("{lo} is on this host");
        assert_fell_back(&s, (up, down), "local", &detail, i as u64 + 1);
    }
    s.assert_clean();
}

/// `--splice-dev rc` only: the server's packets arrive at rs, where no program sees them, so
/// its timestamp clock is never learnt; three probes later the connection stays in userspace.
#[test]
fn local_peer_not_behind_a_splice_dev() {
    for fam in [Family::V4, Family::V6] {
        let Some(s) = Spl::start(Inbound::Redirect, fam, &["--splice-dev", "rc"], &[]) else {
            return;
        };
        assert_eq!(s.attachments(), (1, 0), "tcx on rc only");
        let l = s.topo.server_listener(fam, SERVER_PORT);
        let c = s.topo.client_connect(s.dst(SERVER_PORT)).unwrap();
        exchange(&s, &l, c, 90, 2 * MIB, 2 * MIB);
        let detail = "no packet of the upstream peer reached the program";
        assert_fell_back(&s, (2 * MIB, 2 * MIB), "local", detail, 1);
        s.assert_clean();
    }
}

/// `map_full` cannot happen (see the header): at `--max-conns 2` two spliced connections fill
/// the map (4 entries of 4) and a third waits unaccepted; once the first is over, its entries
/// are gone and the third is spliced too. Every byte exact, no fallback at all.
#[test]
fn map_has_room_at_max_conns() {
    let Some(s) = Spl::start(Inbound::Redirect, Family::V4, &["--max-conns", "2"], &[]) else {
        return;
    };
    let l = s.topo.server_listener(Family::V4, SERVER_PORT);
    let (mut c1, mut s1) = s.spliced(&l, SERVER_PORT, 0, 100);
    let (c2, s2) = s.spliced(&l, SERVER_PORT, 0, 110);
    // The kernel completes the third one's handshake and queues its hello; ksocks waits.
    let mut c3 = s.topo.client_connect(s.dst(SERVER_PORT)).unwrap();
    send_pattern(&mut c3, 120, HELLO, HELLO as usize).expect("client 3: hello");
    thread::sleep(PAUSE);
    let st = s.ks.stats();
    let got = ["total", "open", "tcsplice", "map_entries"].map(|k| st.get(k));
    assert_eq!(got, [2, 2, 2, 4], "total, open, tcsplice, map_entries");
    // The first ends with both FINs (nothing more), spliced.
    c1.shutdown(std::net::Shutdown::Write).unwrap();
    s1.shutdown(std::net::Shutdown::Write).unwrap();
    expect_eof(&mut c1, "client 1");
    expect_eof(&mut s1, "server 1");
    drop((c1, s1));
    let line = s.ks.expect_close_line(HELLO, HELLO, "done");
    assert!(line.contains(" plane=tcsplice "), "{line}");
    // Now the third: accepted, its hello answered, spliced.
    let mut s3 = accept_timeout(&l, Duration::from_secs(10)).expect("server 3: accept");
    let d = recv_exact_verify(&mut s3, 120, HELLO).expect("server 3: hello");
    Digest::of_pattern(120, HELLO).assert_received(&d, "server 3: hello");
    send_pattern(&mut s3, 121, HELLO, HELLO as usize).expect("server 3: hello");
    let d = recv_exact_verify(&mut c3, 121, HELLO).expect("client 3: hello");
    Digest::of_pattern(121, HELLO).assert_received(&d, "client 3: hello");
    let both = wait_until(Duration::from_secs(3), || s.ks.stats().get("tcsplice") == 2);
    assert!(
        both,
        "the third was not spliced; log:\n{}",
        s.ks.log_tail(20)
    );
    let mut hs = Vec::new();
    for (mut c, mut sv, seed) in [(c2, s2, 112), (c3, s3, 122)] {
        let (mut cw, mut sw) = (c.try_clone().unwrap(), sv.try_clone().unwrap());
        hs.push(thread::spawn(move || {
            send_all_and_shutdown(&mut cw, seed, 4 * MIB);
        }));
        hs.push(thread::spawn(move || {
            send_all_and_shutdown(&mut sw, seed + 1, MIB);
        }));
        hs.push(thread::spawn(move || {
            expect_stream(&mut sv, seed, 4 * MIB, "server: upload");
            expect_stream(&mut c, seed + 1, MIB, "client: download");
        }));
    }
    hs.into_iter().for_each(join);
    let want = (HELLO + 4 * MIB, HELLO + MIB);
    let all = wait_until(Duration::from_secs(5), || {
        close_lines(&s.ks.log()).len() == 3
    });
    let lines = close_lines(&s.ks.log());
    assert!(all, "{lines:?}");
    for (_, up, down, plane, end) in &lines[1..] {
        assert_eq!(
            (*up, *down, &plane[..], &end[..]),
            (want.0, want.1, "tcsplice", "done")
        );
    }
    let st = s.ks.stats();
    let got = (st.get("fallback_map_full"), st.get("fallbacks"));
    assert_eq!(got, (0, 0), "stats: {:?}", st.fields);
    s.assert_clean();
}
