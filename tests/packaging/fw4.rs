//! The firewall rules the OpenWrt init script generates, in a router namespace: the harness's
//! topology without its own intercept rule, a fw4-shaped table (packaging/openwrt/test/
//! fw4-skeleton.nft: input and forward policy drop) into which the init script's include is
//! loaded the way fw4 loads it, ksocks started with the exact command line recorded for procd,
//! and a SOCKS5 upstream (a second ksocks) in the server namespace on its own address.
//!
//! Checked, for REDIRECT and TPROXY, IPv4 and IPv6: connections to the server go through
//! ksocks and the upstream (close lines in both, every byte verified, the server sees the
//! upstream as the peer); connections to the bypass set do not (the server or the router
//! sees the client itself, and ksocks logs nothing): the upstream server's own address, a
//! `list bypass` entry in each family and the router's own address; `proxy_router` proxies
//! the router's own connections while ksocks' (marked) upstream connections are exempt; after
//! `stop`, fw4's table has no ksocks chain or set left, the TPROXY route is gone and traffic
//! flows directly.

use crate::common::peers::{remove_intercept_rule, Peer};
use crate::common::*;
use crate::shim::{require_shim, Router, OPENWRT};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

pub const PORT: u16 = 12346;
pub const UPSTREAM_PORT: u16 = 1080;
pub const MARK: &str = "0x2a";
pub const TPROXY_MARK: &str = "0x10";
pub const TABLE: &str = "123";

pub fn ip(args: &[&str]) {
    run_checked(Command::new("ip").args(args)).unwrap_or_else(|e| panic!("{e}"));
}

pub fn in_ns_output(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .expect("run in namespace");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Addresses in the server namespace: .2 the server (from the harness), .3 the upstream
/// SOCKS5 server, .4 a host on the `bypass` list (and ::4 in IPv6).
pub fn server_v4(topo: &Topology, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 19, topo.n as u8, host))
}
pub fn server_v6(topo: &Topology, host: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(
        0x2001,
        0xdb8,
        topo.n as u16,
        2,
        0,
        0,
        0,
        host,
    ))
}

/// One connection from `from` (client or router namespace) to a listener at `dst` in
/// namespace `to_ns`: 200 KiB up, 300 KiB down, verified. Returns the peer the listener saw.
fn transfer(from: &str, to_ns: &str, dst: SocketAddr, seed: u64) -> IpAddr {
    let l = Topology::in_ns(to_ns, move || TcpListener::bind(dst))
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("bind {dst} in {to_ns}: {e}"));
    let srv = std::thread::spawn(move || {
        let mut s = accept_timeout(&l, Duration::from_secs(10)).expect("accept");
        let peer = s.peer_addr().unwrap().ip();
        expect_stream(&mut s, seed, 200 << 10, "server: upload");
        send_pattern(&mut s, seed + 1, 300 << 10, 64 << 10).expect("server: reply");
        peer
    });
    let mut c = Topology::in_ns(from, move || {
        TcpStream::connect_timeout(&dst, Duration::from_secs(5))
    })
    .join()
    .unwrap()
    .unwrap_or_else(|e| panic!("connect {dst} from {from}: {e}"));
    with_timeouts(&c, IO_TIMEOUT);
    send_all_and_shutdown(&mut c, seed, 200 << 10);
    expect_stream(&mut c, seed + 1, 300 << 10, "client: reply");
    join(srv)
}

/// The harness topology with its intercept rule (and TPROXY route) removed, so only what the
/// init script installs moves traffic; the extra server addresses; the upstream.
pub fn setup(kind: Inbound) -> (Topology, Peer) {
    let topo = Topology::new(kind, PORT);
    remove_intercept_rule(&topo);
    let r = topo.router.clone();
    if kind == Inbound::Tproxy {
        for fam in ["-4", "-6"] {
            ip(&["-n", &r, fam, "rule", "del", "fwmark", "1", "lookup", "100"]);
            ip(&["-n", &r, fam, "route", "flush", "table", "100"]);
        }
    }
    let s = topo.server.clone();
    for host in [3u8, 4] {
        let a = format!("{}/24", server_v4(&topo, host));
        ip(&["-n", &s, "addr", "add", &a, "dev", "s0"]);
    }
    let a6 = format!("{}/64", server_v6(&topo, 4));
    ip(&["-n", &s, "-6", "addr", "add", &a6, "dev", "s0", "nodad"]);
    let up = SocketAddr::new(server_v4(&topo, 3), UPSTREAM_PORT);
    let upstream = Peer::start(
        &s,
        "upstream ksocks",
        Path::new(KSOCKS),
        &["-v".into(), "-s".into(), up.to_string()],
        up,
    );
    (topo, upstream)
}

/// The UCI section under test; `proxy_router` also makes the upstream `direct`, so that only
/// the mark keeps ksocks' own connections (to the destination itself) out of the rules.
fn config(topo: &Topology, kind: Inbound, proxy_router: bool) -> String {
    let inbound = match kind {
        Inbound::Redirect => "redirect",
        Inbound::Tproxy => "tproxy",
    };
    format!(
        "config ksocks 'lan'
	option enabled '1'
	option inbound '{inbound}'
	option port '{PORT}'
	option upstream '{}'
	option verbose '1'
	list src_device 'rc'
	list bypass '{}'
	list bypass '{}/128'
	option mark '{MARK}'
	option proxy_router '{}'
	option tproxy_mark '{TPROXY_MARK}'
	option route_table '{TABLE}'
",
        if proxy_router {
            "direct".to_string()
        } else {
            format!("socks5://{}:{UPSTREAM_PORT}", server_v4(topo, 3))
        },
        server_v4(topo, 4),
        server_v6(topo, 4),
        u8::from(proxy_router)
    )
}

/// fw4 as started at boot: its table, without ksocks' include yet.
pub fn boot_firewall(router: &Router, ns: &str) {
    let st = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(format!("{}/test/shim/bin/fw4", OPENWRT))
        .arg("reload")
        .env("SHIM_REAL", "1")
        .env("SHIM_OUT", router.path("boot-record"))
        .env(
            "SHIM_FW4_SKELETON",
            format!("{}/test/fw4-skeleton.nft", OPENWRT),
        )
        .env("SHIM_FW4_INCLUDE", router.path("none"))
        .status()
        .expect("fw4 shim");
    assert!(st.success(), "loading the fw4 skeleton failed");
}

/// Whether ksocks logs the close of a connection to `dst` (waiting up to 3 s for it).
fn proxied(ks: &Ksocks, dst: SocketAddr) -> bool {
    ks.wait_close_line(&[&format!("-> {dst} ")], Duration::from_secs(3))
        .is_some()
}

/// Whether ksocks has logged a connection to `dst` so far.
fn proxied_now(ks: &Ksocks, dst: SocketAddr) -> bool {
    ks.log().contains(&format!("-> {dst} "))
}

fn run(kind: Inbound) {
    if !require_root() || !require_shim() {
        return;
    }
    let (topo, upstream) = setup(kind);
    let r = topo.router.clone();
    let router = Router::new(&config(&topo, kind, false));
    boot_firewall(&router, &r);
    let rec = router.run("start", Some(&r));
    let inst = rec.instances();
    let cmd = inst
        .get("lan")
        .unwrap_or_else(|| panic!("no instance; log:\n{}", rec.log()))
        .command()
        .to_vec();
    assert_eq!(cmd[0], "/usr/sbin/ksocks");
    let args: Vec<&str> = cmd[1..].iter().map(String::as_str).collect();
    let ks = Ksocks::start(&topo, &args);
    let ruleset = in_ns_output(&r, &["nft", "list", "table", "inet", "fw4"]);
    assert!(ruleset.contains("chain ksocks_lan_prerouting"), "{ruleset}");

    let client = topo.client.clone();
    let server = topo.server.clone();
    // Proxied, both families: through ksocks and the upstream.
    for (i, fam) in [Family::V4, Family::V6].into_iter().enumerate() {
        let dst = topo.server_addr(fam, 5001);
        let peer = transfer(&client, &server, dst, 10 + 2 * i as u64);
        assert!(
            proxied(&ks, dst),
            "{dst} not proxied; log:\n{}",
            ks.log_tail(20)
        );
        ks.expect_close_line(200 << 10, 300 << 10, "done");
        assert_ne!(
            peer,
            topo.client_ip(fam),
            "{dst}: the server saw the client itself"
        );
        assert!(
            wait_until(Duration::from_secs(3), || upstream
                .log()
                .contains(&format!("-> {dst} "))),
            "the upstream did not carry {dst}; its log:\n{}",
            upstream.log()
        );
    }
    // Bypassed: the upstream's address, `list bypass` entries, the router itself.
    let bypass = [
        (
            &server,
            SocketAddr::new(server_v4(&topo, 3), 5002),
            Family::V4,
        ),
        (
            &server,
            SocketAddr::new(server_v4(&topo, 4), 5003),
            Family::V4,
        ),
        (
            &server,
            SocketAddr::new(server_v6(&topo, 4), 5003),
            Family::V6,
        ),
        (
            &r,
            SocketAddr::new(topo.router_ip(Family::V4), 5004),
            Family::V4,
        ),
    ];
    for (i, (ns, dst, fam)) in bypass.iter().enumerate() {
        let peer = transfer(&client, ns, *dst, 20 + 2 * i as u64);
        assert_eq!(peer, topo.client_ip(*fam), "{dst} went through a proxy");
    }
    // A proxied connection's close line is logged as soon as both ends are closed.
    std::thread::sleep(Duration::from_millis(500));
    for (_, dst, _) in &bypass {
        assert!(
            !proxied_now(&ks, *dst),
            "{dst} was proxied; log:\n{}",
            ks.log_tail(20)
        );
    }
    if kind == Inbound::Tproxy {
        let rules = in_ns_output(&r, &["ip", "rule", "list"]);
        assert!(
            rules.contains(&format!("fwmark {TPROXY_MARK} lookup {TABLE}")),
            "{rules}"
        );
    }

    // Stop: no chain or set left in fw4's table, no route, and traffic goes direct.
    router.run("stop", Some(&r));
    let ruleset = in_ns_output(&r, &["nft", "list", "table", "inet", "fw4"]);
    assert!(
        ruleset.contains("chain input"),
        "fw4's table is gone:\n{ruleset}"
    );
    assert!(!ruleset.contains("ksocks"), "left behind:\n{ruleset}");
    for fam in ["-4", "-6"] {
        let rules = in_ns_output(&r, &["ip", fam, "rule", "list"]);
        assert!(!rules.contains(TPROXY_MARK), "{rules}");
        let routes = in_ns_output(&r, &["ip", fam, "route", "list", "table", TABLE]);
        assert!(routes.trim().is_empty(), "table {TABLE}: {routes}");
    }
    let dst = topo.server_addr(Family::V4, 5005);
    assert_eq!(
        transfer(&client, &server, dst, 40),
        topo.client_ip(Family::V4)
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(!proxied_now(&ks, dst), "proxied after stop");
    ks.assert_idle();
}

#[test]
fn fw4_redirect_v4_v6_and_bypass() {
    run(Inbound::Redirect);
}

#[test]
fn fw4_tproxy_v4_v6_and_bypass() {
    run(Inbound::Tproxy);
}

/// `proxy_router`: a connection the router itself makes is proxied (upstream `direct`), and
/// ksocks' own connection to the same destination carries the mark, is exempt, and so does
/// not loop back into ksocks.
#[test]
fn fw4_proxy_router_exempts_ksocks_by_mark() {
    if !require_root() || !require_shim() {
        return;
    }
    let (topo, _upstream) = setup(Inbound::Redirect);
    let r = topo.router.clone();
    let router = Router::new(&config(&topo, Inbound::Redirect, true));
    boot_firewall(&router, &r);
    let rec = router.run("start", Some(&r));
    let cmd = rec.instances()["lan"].command().to_vec();
    let args: Vec<&str> = cmd[1..].iter().map(String::as_str).collect();
    assert!(args.windows(2).any(|w| w == ["--mark", MARK]), "{args:?}");
    let ks = Ksocks::start(&topo, &args);

    let dst = topo.server_addr(Family::V4, 5001);
    let peer = transfer(&r, &topo.server, dst, 50);
    assert!(
        proxied(&ks, dst),
        "router's connection not proxied:\n{}",
        ks.log_tail(20)
    );
    ks.expect_close_line(200 << 10, 300 << 10, "done");
    // Direct upstream: the server sees the router's address either way; ksocks logged one
    // connection to dst (its own, marked, was not redirected back to it).
    assert_eq!(peer, IpAddr::V4(Ipv4Addr::new(198, 19, topo.n as u8, 1)));
    let lines = ks
        .log()
        .lines()
        .filter(|l| l.contains(&format!("-> {dst} ")))
        .count();
    assert_eq!(lines, 1, "log:\n{}", ks.log_tail(20));
    router.run("stop", Some(&r));
    ks.assert_idle();
}
