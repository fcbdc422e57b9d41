//! The README's UDP recipe, run as written: its `ksocks` command, `ip rule`/`ip route` and
//! nftables ruleset (read from README.md's "### UDP" section, with the test's client-side
//! interface for `br-lan`) in the router namespace. A LAN client's DNS (v4 and v6) and TCP go
//! through ksocks; the router's own DNS queries (chain `out`) go through ksocks; a service on
//! the router's own address is left alone; and without `--mark` ksocks' own datagrams come back
//! to it, which it refuses as a loop.
//!
//! Run as root: `cargo test --test udp_recipe`.

mod common;

use common::peers::{remove_intercept_rule, require_tools};
use common::udp::*;
use common::*;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

/// The recipe: ksocks' arguments and the shell commands after it, with `br-lan` -> `rc`;
/// with `iptables`, the commented iptables variant instead of the nftables ruleset.
fn recipe(iptables: bool) -> (Vec<String>, String) {
    let readme = include_str!("../README.md");
    let section = readme
        .split("### UDP")
        .nth(1)
        .expect("README.md has a \"### UDP\" section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("the UDP section has a ```sh block");
    let (first, rest) = block.split_once('\n').unwrap();
    let args = first
        .strip_prefix("ksocks ")
        .expect("the block starts with the ksocks command")
        .trim_end_matches('&')
        .split_whitespace()
        .map(|a| a.trim_matches('\'').to_string())
        .collect();
    let rest = match iptables {
        false => rest.to_string(),
        true => {
            let ip: Vec<&str> = rest.lines().filter(|l| l.starts_with("ip ")).collect();
            let ipt = rest.lines().filter_map(|l| l.strip_prefix("#   iptables "));
            let ipt: Vec<String> = ipt.map(|l| format!("iptables {l}")).collect();
            assert!(ipt.len() >= 5, "the iptables variant:\n{rest}");
            format!("{}\n{}\n", ip.join("\n"), ipt.join("\n"))
        }
    };
    (args, rest.replace("br-lan", "rc"))
}

/// `dig +short` in namespace `ns`; the answer lines (dig's `;;` remarks left out).
fn dig(ns: &str, server: SocketAddr, name: &str, qtype: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "dig", "+short", "+tries=2", "+time=1"])
        .args([&format!("@{}", server.ip()), name, qtype])
        .output()
        .expect("run dig");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with(";;"))
        .map(String::from)
        .collect()
}

fn setup(without_mark: bool, iptables: bool) -> Option<(Topology, Ksocks, Dnsmasq)> {
    if !require_root() || !require_tools(&["ping", "dnsmasq", "dig"]) {
        return None;
    }
    if iptables && !require_tools(&["iptables"]) {
        return None;
    }
    let (mut args, commands) = recipe(iptables);
    let topo = Topology::new(Inbound::Redirect, 12345);
    remove_intercept_rule(&topo);
    run_checked(Command::new("ip").args(["netns", "exec", &topo.router, "sh", "-c", &commands]))
        .unwrap_or_else(|e| panic!("the README recipe: {e}"));
    if without_mark {
        let at = args
            .iter()
            .position(|a| a == "--mark")
            .expect("--mark in the recipe");
        args.drain(at..at + 2);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ks = Ksocks::start(&topo, &args);
    warm_up(&topo, &[Family::V4, Family::V6]);
    let dns = start_dnsmasq(&topo, &dns_names(3));
    Some((topo, ks, dns))
}

/// The recipe as written: LAN DNS in both families and TCP through ksocks, the router's own
/// DNS through ksocks (from its server-side address), the router's own UDP service untouched.
#[test]
fn readme_udp_recipe() {
    let Some((topo, ks, _dns)) = setup(false, false) else {
        return;
    };
    let names = dns_names(3);
    for (fam, want) in [
        (Family::V4, names[0].1.to_string()),
        (Family::V6, names[0].2.to_string()),
    ] {
        let qtype = if fam == Family::V4 { "A" } else { "AAAA" };
        let got = dig(&topo.client, topo.server_addr(fam, 53), &names[0].0, qtype);
        assert_eq!(got, [want], "LAN client, {fam:?}");
    }
    // The router's own query: marked in chain out, back through lo, to ksocks.
    let got = dig(
        &topo.router,
        topo.server_addr(Family::V4, 53),
        &names[1].0,
        "A",
    );
    assert_eq!(got, [names[1].1.to_string()], "the router's own query");
    let closes = wait_udp_closes(&ks, 3, Duration::from_secs(5), |c| {
        c.get("end") == "answered"
    });
    // The router's own address towards the server (the topology's 198.19.<n>.1).
    let router = format!("198.19.{}.1", topo.n);
    assert!(
        closes
            .iter()
            .any(|c| c.client.starts_with(&format!("{router}:"))),
        "no association from the router itself: {closes:?}"
    );
    // TCP through the same rules (-t).
    let server = topo.server_listener(Family::V4, 5001);
    let mut c = topo
        .client_connect(topo.server_addr(Family::V4, 5001))
        .unwrap();
    let mut s = accept_timeout(&server, Duration::from_secs(5)).unwrap();
    c.write_all(b"tcp too").unwrap();
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"tcp too");
    drop((c, s));
    ks.expect_close_line(7, 0, "done");
    // A UDP service on the router's own address is not diverted.
    let local = SocketAddr::new(topo.router_ip(Family::V4), 5353);
    let svc = udp_in(&topo.router, local);
    let created = ks.stats().get("udp_created");
    let client = client_udp(&topo, Family::V4);
    client.send_to(b"local?", local).unwrap();
    let (n, from) = svc
        .recv_from(&mut [0u8; 16])
        .expect("the router's service hears it");
    assert_eq!((n, from), (6, client.local_addr().unwrap()));
    let s = ks.stats();
    assert_eq!((s.get("udp_created"), s.get("udp_drop_loop")), (created, 0));
}

/// Without `--mark`, ksocks' own upstream datagram to port 53 is marked in chain out and
/// comes back to it: refused as a loop (counted, logged once), not relayed again and again.
#[test]
fn readme_udp_recipe_without_mark_is_a_refused_loop() {
    let Some((topo, ks, _dns)) = setup(true, false) else {
        return;
    };
    let _ = dig(
        &topo.router,
        topo.server_addr(Family::V4, 53),
        "h0.test",
        "A",
    );
    assert!(wait_until(Duration::from_secs(5), || ks
        .stats()
        .get("udp_drop_loop")
        >= 1));
    assert!(
        ks.wait_for_log("proxy loop", Duration::from_secs(2)),
        "{}",
        ks.log_tail(10)
    );
    assert!(
        ks.stats().get("udp_created") <= 3,
        "one association per attempt, no chain"
    );
}

/// The commented iptables variant (IPv4): a LAN client's DNS and the router's own DNS go
/// through ksocks, as with the nftables ruleset.
#[test]
fn readme_udp_recipe_iptables() {
    let Some((topo, ks, _dns)) = setup(false, true) else {
        return;
    };
    let names = dns_names(3);
    let server = topo.server_addr(Family::V4, 53);
    assert_eq!(
        dig(&topo.client, server, &names[0].0, "A"),
        [names[0].1.to_string()]
    );
    assert_eq!(
        dig(&topo.router, server, &names[2].0, "A"),
        [names[2].1.to_string()]
    );
    let closes = wait_udp_closes(&ks, 2, Duration::from_secs(5), |c| {
        c.get("end") == "answered"
    });
    let router = format!("198.19.{}.1:", topo.n);
    assert!(
        closes.iter().any(|c| c.client.starts_with(&router)),
        "{closes:?}"
    );
    assert_eq!(ks.stats().get("udp_drop_loop"), 0);
}
