//! The UDP rules the OpenWrt init script generates, in a router namespace, as in
//! packaging/fw4.rs: the harness's topology without its intercept rule, fw4's table
//! (packaging/openwrt/test/fw4-skeleton.nft) with the init script's include loaded the way fw4
//! loads it, and ksocks started with the exact command line recorded for procd. The section
//! redirects TCP and has `udp_tproxy` listeners, so the TPROXY policy route is there for UDP
//! alone; its upstream is `direct`, so only the mark keeps ksocks' own datagrams out of the
//! rules.
//!
//! Checked, IPv4 and IPv6: datagrams from a LAN client to a server go through ksocks (its close
//! line per association with the exact datagram and byte counts; every echo byte-exact and
//! from the server's address; the server hears the router, not the client); datagrams to the
//! bypass set (`list bypass` entries in each family, the router's own address) do not (the
//! server hears the client itself, and ksocks creates no association); the router's own DNS
//! queries (`proxy_router_dns`) are answered through ksocks while ksocks' own queries to the
//! same server carry its mark and are not diverted back to it (no loop); after `stop`, fw4's
//! table has no ksocks chain or set, the route is gone and datagrams flow directly.

use crate::common::peers::require_tools;
use crate::common::udp::*;
use crate::common::*;
use crate::fw4::{boot_firewall, in_ns_output, server_v4, server_v6, setup};
use crate::fw4::{MARK, PORT, TABLE, TPROXY_MARK};
use crate::shim::{require_shim, Router};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

const ECHO_PORT: u16 = 5001;
const BYPASS_PORT: u16 = 5003;

fn config(topo: &Topology) -> String {
    format!(
        "config ksocks 'lan'
	option enabled '1'
	option inbound 'redirect'
	option port '{PORT}'
	option upstream 'direct'
	option verbose '1'
	list src_device 'rc'
	list bypass '{}'
	list bypass '{}/128'
	list udp_tproxy '0.0.0.0:{PORT}'
	list udp_tproxy '[::]:{PORT}'
	option udp_timeout '2'
	option mark '{MARK}'
	option proxy_router_dns '1'
	option tproxy_mark '{TPROXY_MARK}'
	option route_table '{TABLE}'
",
        server_v4(topo, 4),
        server_v6(topo, 4),
    )
}

/// The router's address on the server side (the source of its own and ksocks' datagrams).
fn router_out_ip(topo: &Topology, fam: Family) -> IpAddr {
    match fam {
        Family::V4 => server_v4(topo, 1),
        Family::V6 => server_v6(topo, 1),
    }
}

fn family(a: SocketAddr) -> Family {
    match a {
        SocketAddr::V4(_) => Family::V4,
        SocketAddr::V6(_) => Family::V6,
    }
}

/// One datagram from `from` to `dst`, answered by whatever listens there; returns the reply's
/// source.
fn ping_pong(from: &UdpSocket, dst: SocketAddr, what: &str) -> SocketAddr {
    from.send_to(what.as_bytes(), dst).expect("send");
    let mut buf = [0u8; 256];
    let (n, src) = from
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("{what}: no answer from {dst}: {e}"));
    assert_eq!(&buf[..n], what.as_bytes(), "{what}: not an echo");
    src
}

#[test]
fn fw4_udp_tproxy_v4_v6_bypass_and_router_dns() {
    if !require_root() || !require_shim() || !require_tools(&["dnsmasq"]) {
        return;
    }
    let (topo, _socks_upstream) = setup(Inbound::Redirect);
    let r = topo.router.clone();
    let router = Router::new(&config(&topo));
    boot_firewall(&router, &r);
    let rec = router.run("start", Some(&r));
    let cmd = rec
        .instances()
        .get("lan")
        .unwrap_or_else(|| panic!("no instance; log:\n{}", rec.log()))
        .command()
        .to_vec();
    let args: Vec<&str> = cmd[1..].iter().map(String::as_str).collect();
    assert!(
        args.windows(2)
            .any(|w| w == ["--udp-tproxy", &format!("[::]:{PORT}")]),
        "{args:?}"
    );
    let ks = Ksocks::start(&topo, &args);
    let ruleset = in_ns_output(&r, &["nft", "list", "table", "inet", "fw4"]);
    assert!(
        ruleset.contains("chain ksocks_lan_udp_prerouting"),
        "{ruleset}"
    );
    for fam in ["-4", "-6"] {
        let rules = in_ns_output(&r, &["ip", fam, "rule", "list"]);
        assert!(
            rules.contains(&format!("fwmark {TPROXY_MARK} lookup {TABLE}")),
            "the TPROXY route is made for UDP with TCP redirected: {rules}"
        );
    }
    let bypass = [
        SocketAddr::new(server_v4(&topo, 4), BYPASS_PORT),
        SocketAddr::new(server_v6(&topo, 4), BYPASS_PORT),
    ];
    let echo_at = [
        topo.server_addr(Family::V4, ECHO_PORT),
        topo.server_addr(Family::V6, ECHO_PORT),
    ];
    let echo = UdpEcho::start(&topo, &[echo_at[0], echo_at[1], bypass[0], bypass[1]]);
    let names = dns_names(2);
    let _dns = start_dnsmasq(&topo, &names);
    warm_up(&topo, &[Family::V4, Family::V6]);

    // Proxied: byte-exact echoes, one association per client socket, its close line exact.
    for (k, dst) in echo_at.into_iter().enumerate() {
        let fam = family(dst);
        let sock = client_udp(&topo, fam);
        let client = sock.local_addr().unwrap();
        let t = Plain { sock, to: dst };
        let t: Box<dyn Dgram> = Box::new(t);
        let res = echo_check(vec![t], dst, 10 + k, (1, 6000));
        assert_eq!(
            (res.received, res.lost),
            (res.sent, 0),
            "{dst}: {res:?}\n{}",
            ks.log_tail(20)
        );
        let heard = echo.last_peer.lock().unwrap().expect("the server heard");
        assert_eq!(
            heard.ip(),
            router_out_ip(&topo, fam),
            "{dst}: the server heard {heard}, not ksocks on the router"
        );
        // The association ends after udp_timeout (2 s) idle.
        let closes = wait_udp_closes(&ks, 1, Duration::from_secs(10), |c| {
            c.client == client.to_string() && c.dest == dst.to_string()
        });
        let c = &closes[0];
        assert_eq!(
            [c.get("in"), c.get("via"), c.get("end")],
            ["tproxy", "direct", "idle"],
            "{}",
            c.line
        );
        assert_eq!(
            (c.num("up_dgrams"), c.num("down_dgrams")),
            (res.sent, res.sent),
            "{}",
            c.line
        );
        assert_eq!((c.num("up"), c.num("down")), (res.bytes, res.bytes));
    }

    // Not proxied: `list bypass` in both families, and the router's own address.
    let created = ks.stats().get("udp_created");
    for dst in bypass {
        let sock = client_udp(&topo, family(dst));
        let src = ping_pong(&sock, dst, "bypassed");
        assert_eq!(src, dst, "the answer's source");
        let heard = echo.last_peer.lock().unwrap().expect("the server heard");
        assert_eq!(
            heard,
            sock.local_addr().unwrap(),
            "{dst} went through a proxy"
        );
    }
    let local = SocketAddr::new(topo.router_ip(Family::V4), 5353);
    let svc = udp_in(&r, local);
    let client = client_udp(&topo, Family::V4);
    client.send_to(b"local?", local).unwrap();
    let (n, from) = svc
        .recv_from(&mut [0u8; 16])
        .expect("the router's own service hears the client");
    assert_eq!((n, from), (6, client.local_addr().unwrap()));
    assert_eq!(
        ks.stats().get("udp_created"),
        created,
        "a bypass was proxied"
    );

    // The router's own DNS queries, through ksocks; ksocks' own (marked) go out directly.
    for (i, fam) in [Family::V4, Family::V6].into_iter().enumerate() {
        let any: SocketAddr = match fam {
            Family::V4 => "0.0.0.0:0".parse().unwrap(),
            Family::V6 => "[::]:0".parse().unwrap(),
        };
        let dst = topo.server_addr(fam, 53);
        let mut t = Plain {
            sock: udp_in(&r, any),
            to: dst,
        };
        let (name, v4, v6) = &names[i];
        let qtype = [QTYPE_A, QTYPE_AAAA][i];
        let want: IpAddr = [IpAddr::V4(*v4), IpAddr::V6(*v6)][i];
        let answer = dns_ask(&mut t, 0x4b00 + i as u16, name, qtype, 3)
            .unwrap_or_else(|| panic!("the router's query to {dst}: no answer"));
        assert_eq!((answer.rcode, answer.addrs), (0, vec![want]));
        let closes = wait_udp_closes(&ks, 1, Duration::from_secs(5), |c| {
            c.dest == dst.to_string()
                && c.client.parse::<SocketAddr>().map(|a| a.ip()) == Ok(router_out_ip(&topo, fam))
        });
        assert_eq!(closes[0].get("end"), "answered", "{}", closes[0].line);
    }
    let s = ks.stats();
    assert_eq!(s.get("udp_drop_loop"), 0, "ksocks' own query came back");

    // Stop: nothing of ksocks left in fw4's table or the routing policy; datagrams go direct.
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
    let created = ks.stats().get("udp_created");
    let sock = client_udp(&topo, Family::V4);
    assert_eq!(ping_pong(&sock, echo_at[0], "after stop"), echo_at[0]);
    let heard = echo.last_peer.lock().unwrap().expect("the server heard");
    assert_eq!(heard, sock.local_addr().unwrap(), "proxied after stop");
    assert_eq!(ks.stats().get("udp_created"), created);
    ks.assert_idle();
}
