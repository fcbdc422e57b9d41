//! UDP through the upstreams of `-u`: `ss://none` to shadowsocks-rust's `ssserver -m none -U`,
//! and `socks5://` through dante's UDP relay (RFC 1928 §7 UDP ASSOCIATE, the association
//! living as long as its TCP control connection), in the namespace topology with TPROXY
//! clients and SOCKS5 clients of ksocks' own server: DNS to dnsmasq, byte-exact echo up to the
//! largest payload the header leaves room for, full cone, the control connection's end, and
//! an upstream that refuses UDP (microsocks answers REP 7).
//!
//! Run as root: `cargo test --test udp_upstream`.

mod common;

use common::peers::{
    remove_intercept_rule, require_tools, start_microsocks, NetnsHosts, SystemUser, Target,
};
use common::udp::*;
use common::*;
use std::net::SocketAddr;
use std::time::Duration;

const PORT: u16 = 12346;
const ECHO: u16 = 7;
const UP: u16 = 1080;

/// A TPROXY topology with the UDP rule, both families warmed up.
fn topology() -> Option<Topology> {
    if !require_root() || !require_tools(&["ping", "dnsmasq"]) {
        return None;
    }
    let topo = Topology::new(Inbound::Tproxy, PORT);
    add_udp_tproxy(&topo, PORT);
    warm_up(&topo, &[Family::V4, Family::V6]);
    Some(topo)
}

fn tproxy_ksocks(topo: &Topology, upstream: &str, extra: &[&str]) -> Ksocks {
    let mut args = vec!["-T", "0.0.0.0:12346", "-T", "[::]:12346", "-u", upstream];
    args.extend_from_slice(extra);
    Ksocks::start(topo, &args)
}

fn plain(topo: &Topology, fam: Family, to: SocketAddr) -> Box<dyn Dgram> {
    Box::new(Plain {
        sock: client_udp(topo, fam),
        to,
    })
}

/// DNS, echo (v4: 1,000 datagrams; v6: 200) and full cone from TPROXY clients through the
/// upstream ksocks was started with; `header` is the upstream's header for an IPv4 address
/// (the IPv6 one is 12 bytes longer), which the largest payload leaves room for in an IPv4
/// datagram to the upstream (one byte more is dropped and counted `too_big`), `min` the
/// smallest payload the upstream relays. One datagram in flight: the peers' sockets have the
/// default 208 KiB receive buffer, which two reassembled 64 KiB datagrams fill.
fn tproxy_checks(topo: &Topology, ks: &Ksocks, via: &str, header: usize, min: usize) {
    let names = dns_names(10);
    let _dns = start_dnsmasq(topo, &names);
    let dns = topo.server_addr(Family::V4, 53);
    let mut t = plain(topo, Family::V4, dns);
    for (i, (name, v4, _)) in names.iter().enumerate() {
        let a = dns_ask(&mut *t, i as u16, name, QTYPE_A, 3).expect("answer");
        assert_eq!(a.addrs, vec![std::net::IpAddr::V4(*v4)], "{name}");
    }
    let servers = [
        topo.server_addr(Family::V4, ECHO),
        topo.server_addr(Family::V6, ECHO),
    ];
    let _echo = UdpEcho::start(topo, &servers);
    for (fam, count, extra) in [(Family::V4, 1000, 0), (Family::V6, 200, 12)] {
        let server = topo.server_addr(fam, ECHO);
        let transports = vec![plain(topo, fam, server)];
        // The upstream server is reached over IPv4, whose limit binds for both families.
        let max = MAX_V4 - header - extra;
        let r = echo_check(transports, server, count, (min, max));
        let s = ks.stats();
        assert_eq!(
            (r.received, r.lost),
            (count as u64, 0),
            "{fam:?} {r:?} {:?}",
            s.fields
        );
    }
    let (a, b) = (
        udp_in(&topo.server, topo.server_addr(Family::V4, 7000)),
        udp_in(&topo.server, topo.server_addr(Family::V4, 7001)),
    );
    let mut t = plain(topo, Family::V4, a.local_addr().unwrap());
    let mapped = check_full_cone(&mut *t, &a, &b);
    assert!(
        !topo.client_ip(Family::V4).eq(&mapped.ip()),
        "mapped by the upstream"
    );
    let s = ks.stats();
    assert_eq!(s.get("udp_drops"), 0, "{:?}", s.fields);
    assert_eq!(s.get("udp_up_dgrams"), 10 + 1000 + 200 + 1);
    assert_eq!(s.get("udp_down_dgrams"), 10 + 1000 + 200 + 2);
    let closes = wait_udp_closes(ks, 10, Duration::from_secs(5), |c| {
        c.get("end") == "answered"
    });
    assert!(
        closes.iter().all(|c| c.get("via") == via),
        "{}",
        closes[0].line
    );
}

/// `-u ss://none@...` to `ssserver -m none -U`: dnsmasq's answers, byte-exact echo up to
/// 65,500 bytes (IPv4; the 7-byte address header fills the rest), full cone.
#[test]
fn shadowsocks_tproxy() {
    if !require_tools(&["ssserver"]) {
        return;
    }
    let Some(topo) = topology() else {
        return;
    };
    let up = topo.server_addr(Family::V4, 8388);
    let (_ss, _dir) = start_ssserver_udp(&topo.server, up);
    let ks = tproxy_ksocks(&topo, &format!("ss://none@{up}"), &[]);
    // ssserver drops a datagram whose payload is empty (checked): 1 byte at least.
    tproxy_checks(&topo, &ks, "ss", 7, 1);
}

/// `-u socks5://...` through dante's UDP relay: dnsmasq's answers, byte-exact echo up to
/// 65,497 bytes (IPv4; RSV, FRAG and the address take 10), full cone (dante with
/// `udp.connectdst: no`).
#[test]
fn socks5_tproxy() {
    if !require_tools(&["danted"]) {
        return;
    }
    let Some(topo) = topology() else {
        return;
    };
    let up = topo.server_addr(Family::V4, UP);
    let (_dante, _dir) = start_danted_udp(&topo.server, up, "s0", None);
    let ks = tproxy_ksocks(&topo, &format!("socks5://{up}"), &[]);
    tproxy_checks(&topo, &ks, "socks5", 10, 0);
}

/// Through dante with RFC 1929 username/password: the association works, and when dante goes
/// away its control connection closes and the association ends at once as `control-closed`
/// (not at the idle timeout).
#[test]
fn socks5_control_connection_ends_the_association() {
    if !require_tools(&["danted", "useradd"]) {
        return;
    }
    let Some(topo) = topology() else {
        return;
    };
    let user = SystemUser::create();
    let up = topo.server_addr(Family::V4, UP);
    let (dante, dir) = start_danted_udp(&topo.server, up, "s0", Some(&user));
    let url = format!("socks5://{}:{}@{up}", user.name, user.pass);
    let ks = tproxy_ksocks(&topo, &url, &["--udp-timeout", "60"]);
    let server = topo.server_addr(Family::V4, ECHO);
    let _echo = UdpEcho::start(&topo, &[server]);
    let transports = vec![plain(&topo, Family::V4, server)];
    let r = echo_check(transports, server, 20, (0, 1000));
    assert_eq!(r.received, 20, "{r:?}");
    drop(dante);
    drop(dir);
    let c = wait_udp_closes(&ks, 1, Duration::from_secs(5), |_| true);
    assert_eq!(c[0].get("end"), "control-closed", "{}", c[0].line);
    assert_eq!((c[0].num("up_dgrams"), c[0].num("down_dgrams")), (20, 20));
    assert_eq!(ks.stats().get("udp_end_control"), 1);
}

/// microsocks answers UDP ASSOCIATE with REP 7 (command not supported): ksocks says so, ends
/// the association as `upstream`, and drops (counted) what waited for it.
#[test]
fn socks5_upstream_without_udp() {
    if !require_tools(&["microsocks"]) {
        return;
    }
    let Some(topo) = topology() else {
        return;
    };
    let up = topo.server_addr(Family::V4, UP);
    let _ms = start_microsocks(&topo.server, up, None);
    let ks = tproxy_ksocks(&topo, &format!("socks5://{up}"), &[]);
    let c = client_udp(&topo, Family::V4);
    c.send_to(b"lost", topo.server_addr(Family::V4, ECHO))
        .unwrap();
    let line = wait_udp_closes(&ks, 1, Duration::from_secs(5), |_| true);
    assert_eq!(line[0].get("end"), "upstream", "{}", line[0].line);
    assert!(
        ks.log().contains("upstream replied 7"),
        "{}",
        ks.log_tail(5)
    );
    let s = ks.stats();
    assert_eq!((s.get("udp_end_upstream"), s.get("udp_up_dgrams")), (1, 0));
}

/// A SOCKS5 client of ksocks' own server (`-s`) whose datagrams go on through an upstream:
/// echo and DNS through ssserver and through dante (the datagram's header is passed on as is,
/// or without RSV and FRAG to shadowsocks, and the answer's header comes back the same way).
#[test]
fn socks_client_through_upstreams() {
    if !require_tools(&["ssserver", "danted"]) {
        return;
    }
    let Some(topo) = topology() else {
        return;
    };
    remove_intercept_rule(&topo);
    let ss = topo.server_addr(Family::V4, 8388);
    let socks = topo.server_addr(Family::V4, UP);
    let (_ss, _ssdir) = start_ssserver_udp(&topo.server, ss);
    let (_dante, _dir) = start_danted_udp(&topo.server, socks, "s0", None);
    let names = dns_names(4);
    let _dns = start_dnsmasq(&topo, &names);
    let server = topo.server_addr(Family::V4, ECHO);
    let _echo = UdpEcho::start(&topo, &[server]);
    let upstreams = [
        (format!("ss://none@{ss}"), "ss", 7, 1),
        (format!("socks5://{socks}"), "socks5", 10, 0),
    ];
    for (url, via, header, min) in upstreams {
        let proxy = SocketAddr::new(topo.router_ip(Family::V4), 1080);
        let listen = proxy.to_string();
        let ks = Ksocks::start(&topo, &["-s", &listen, "-u", &url]);
        let t = SocksUdp::associate(&topo, proxy, None, true, Target::Ip(server)).unwrap();
        // Client to ksocks: 10 bytes of SOCKS header; ksocks to the upstream: `header`.
        let max = MAX_V4 - 10 - header;
        let r = echo_check(vec![Box::new(t)], server, 100, (min, max));
        assert_eq!((r.received, r.lost), (100, 0), "{via}: {r:?}");
        let dns = topo.server_addr(Family::V4, 53);
        let mut t = SocksUdp::associate(&topo, proxy, None, false, Target::Ip(dns)).unwrap();
        let a = dns_ask(&mut t, 1, &names[3].0, QTYPE_A, 3).expect("answer");
        assert_eq!(a.addrs, vec![std::net::IpAddr::V4(names[3].1)]);
        drop(t);
        let c = wait_udp_closes(&ks, 1, Duration::from_secs(5), |c| c.dest.ends_with(":53"));
        assert_eq!(
            (c[0].get("in"), c[0].get("via")),
            ("socks", via),
            "{}",
            c[0].line
        );
        assert_eq!(c[0].get("end"), "control-closed", "{}", c[0].line);
        assert_eq!(ks.stats().get("udp_drops"), 0);
    }
}

/// The upstream proxy by name (`-u ss://none@NAME:PORT`, `socks5://NAME:PORT`, the name in the
/// router's hosts file): the loop's lookup of the name gives the UDP associations their proxy
/// too, and nothing is dropped while it runs (a datagram waits in its association).
#[test]
fn upstream_by_name() {
    if !require_tools(&["ssserver", "danted"]) {
        return;
    }
    let Some(topo) = topology() else {
        return;
    };
    let _hosts = NetnsHosts::write(&topo.router, &[(topo.server_ip(Family::V4), "proxy.test")]);
    let ss = topo.server_addr(Family::V4, 8388);
    let socks = topo.server_addr(Family::V4, UP);
    let (_ss, _ssdir) = start_ssserver_udp(&topo.server, ss);
    let (_dante, _dir) = start_danted_udp(&topo.server, socks, "s0", None);
    let server = topo.server_addr(Family::V4, ECHO);
    let _echo = UdpEcho::start(&topo, &[server]);
    for (url, via) in [
        ("ss://none@proxy.test:8388", "ss"),
        ("socks5://proxy.test:1080", "socks5"),
    ] {
        let ks = tproxy_ksocks(&topo, url, &[]);
        let transports = (0..2).map(|_| plain(&topo, Family::V4, server)).collect();
        let r = echo_check(transports, server, 20, (1, 1000));
        assert_eq!((r.received, r.lost), (20, 0), "{via}: {r:?}");
        assert!(
            ks.log().contains("upstream proxy.test"),
            "{}",
            ks.log_tail(10)
        );
        let s = ks.stats();
        assert_eq!(
            (s.get("udp_up_dgrams"), s.get("udp_drops")),
            (20, 0),
            "{via}"
        );
        drop(ks);
    }
}
