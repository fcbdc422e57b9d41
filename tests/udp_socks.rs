//! The SOCKS5 server's UDP ASSOCIATE (`-s`, RFC 1928 §7) from a scripted client in the client
//! namespace (curl has no SOCKS5 UDP): byte-exact echo and DNS in both families, datagrams from
//! strangers dropped, the association ending with its control connection (and its relay port
//! closing), authentication as for CONNECT, bad headers counted and dropped, names resolved.
//!
//! Run as root: `cargo test --test udp_socks`.

mod common;

use common::peers::{remove_intercept_rule, require_tools, NetnsHosts, Target};
use common::udp::*;
use common::*;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

const PORT: u16 = 12345;
const ECHO: u16 = 7;
const SOCKS: u16 = 1080;

/// A topology without interception, ksocks' SOCKS5 server on the router's client-side
/// addresses (both families) with `extra`; each of `names` is written into the router's hosts
/// file as the server's IPv4 address, before ksocks starts.
fn socks(extra: &[&str], names: &[&str]) -> Option<(Topology, Option<NetnsHosts>, Ksocks)> {
    if !require_root() || !require_tools(&["ping"]) {
        return None;
    }
    let topo = Topology::new(Inbound::Redirect, PORT);
    remove_intercept_rule(&topo);
    warm_up(&topo, &[Family::V4, Family::V6]);
    let server = topo.server_ip(Family::V4);
    let entries: Vec<(IpAddr, &str)> = names.iter().map(|n| (server, *n)).collect();
    let hosts = (!names.is_empty()).then(|| NetnsHosts::write(&topo.router, &entries));
    let (v4, v6) = (proxy(&topo, Family::V4), proxy(&topo, Family::V6));
    let (v4, v6) = (v4.to_string(), v6.to_string());
    let mut args = vec!["-s", &v4, "-s", &v6];
    args.extend_from_slice(extra);
    let ks = Ksocks::start(&topo, &args);
    Some((topo, hosts, ks))
}

fn proxy(topo: &Topology, fam: Family) -> SocketAddr {
    SocketAddr::new(topo.router_ip(fam), SOCKS)
}

fn associate(topo: &Topology, fam: Family, to: SocketAddr) -> SocksUdp {
    SocksUdp::associate(topo, proxy(topo, fam), None, true, Target::Ip(to)).expect("associate")
}

/// Echo (v4: 1,000 datagrams over 8 associations, up to 65,497 bytes, the most a 10-byte
/// header leaves; v6: 200 up to 65,505) and DNS through UDP ASSOCIATE; every association goes
/// through ksocks (`in=socks`) and ends with its control connection.
#[test]
fn associate_echo_and_dns() {
    if !require_tools(&["dnsmasq"]) {
        return;
    }
    let Some((topo, _, ks)) = socks(&[], &[]) else {
        return;
    };
    let names = dns_names(5);
    let _dns = start_dnsmasq(&topo, &names);
    let servers = [
        topo.server_addr(Family::V4, ECHO),
        topo.server_addr(Family::V6, ECHO),
    ];
    let _echo = UdpEcho::start(&topo, &servers);
    for (fam, count, n, header) in [(Family::V4, 1000, 8, 10), (Family::V6, 200, 2, 22)] {
        let server = topo.server_addr(fam, ECHO);
        let transports = (0..n)
            .map(|_| Box::new(associate(&topo, fam, server)) as Box<dyn Dgram>)
            .collect();
        let r = echo_check(transports, server, count, (0, max_payload(fam) - header));
        assert_eq!((r.received, r.lost), (count as u64, 0), "{fam:?} {r:?}");
        let dns = topo.server_addr(fam, 53);
        let mut t = associate(&topo, fam, dns);
        for (i, (name, v4, v6)) in names.iter().enumerate() {
            let a = dns_ask(&mut t, i as u16, name, QTYPE_AAAA, 3).expect("answer");
            assert_eq!(a.addrs, vec![IpAddr::V6(*v6)]);
            let a = dns_ask(&mut t, 100 + i as u16, name, QTYPE_A, 3).expect("answer");
            assert_eq!(a.addrs, vec![IpAddr::V4(*v4)]);
        }
    }
    // The transports are gone (their control connections closed): so are the associations.
    let closes = wait_udp_closes(&ks, 12, Duration::from_secs(5), |c| {
        c.get("end") == "control-closed"
    });
    for c in &closes {
        assert_eq!(
            (c.get("in"), c.get("via")),
            ("socks", "direct"),
            "{}",
            c.line
        );
    }
    let echoed: u64 = closes
        .iter()
        .filter(|c| c.dest.ends_with(":7"))
        .map(|c| c.num("down_dgrams"))
        .sum();
    assert_eq!(echoed, 1200);
    let s = ks.stats();
    assert_eq!((s.get("udp_end_control"), s.get("udp_drops")), (12, 0));
    assert_eq!(
        s.get("udp_end_answered"),
        0,
        "a SOCKS association lives as long as its control connection"
    );
    ks.assert_idle();
}

/// Only the client may use its relay: before its port is known, a datagram from another
/// address is dropped and counted; afterwards the relay is connected to the client and the
/// kernel turns others away. Closing the control connection ends the association at once and
/// closes the relay port (a datagram to it is refused).
#[test]
fn associate_strangers_and_control_close() {
    let Some((topo, _, ks)) = socks(&[], &[]) else {
        return;
    };
    let server = topo.server_addr(Family::V4, ECHO);
    let echo = UdpEcho::start(&topo, &[server]);
    let to = Target::Ip(server);
    let mut t =
        SocksUdp::associate(&topo, proxy(&topo, Family::V4), None, false, to.clone()).unwrap();
    let mut datagram = socks_udp_header(&to);
    datagram.extend_from_slice(b"not yours");
    // A stranger at another address, first.
    let stranger = udp_in(&topo.server, topo.server_addr(Family::V4, 0));
    stranger.send_to(&datagram, t.relay).unwrap();
    assert!(wait_until(Duration::from_secs(3), || ks
        .stats()
        .get("udp_drop_stranger")
        == 1));
    // The client: its first datagram names its port.
    let r = echo_check(vec![Box::new(t.try_clone().unwrap())], server, 5, (1, 100));
    assert_eq!(r.received, 5);
    // Another port of the client's own address, now: the kernel drops it.
    let neighbour = client_udp(&topo, Family::V4);
    neighbour.send_to(&datagram, t.relay).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        echo.echoed.load(std::sync::atomic::Ordering::Relaxed),
        5,
        "only the client's"
    );
    // Close the control connection.
    let relay = t.relay;
    t.control.shutdown(std::net::Shutdown::Both).unwrap();
    let c = wait_udp_closes(&ks, 1, Duration::from_secs(5), |_| true);
    assert_eq!(c[0].get("end"), "control-closed", "{}", c[0].line);
    assert_eq!((c[0].num("up_dgrams"), c[0].num("down_dgrams")), (5, 5));
    let probe = client_udp(&topo, Family::V4);
    probe.connect(relay).unwrap();
    probe.send(b"anyone?").unwrap();
    let err = probe
        .recv(&mut [0u8; 16])
        .expect_err("the relay port is closed");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    let _ = t.recv(&mut [0u8; 16]);
    ks.assert_idle();
}

/// With `--socks-auth`, UDP ASSOCIATE needs the password as CONNECT does.
#[test]
fn associate_requires_authentication() {
    let Some((topo, _, ks)) = socks(&["--socks-auth", "alice:secret"], &[]) else {
        return;
    };
    let server = topo.server_addr(Family::V4, ECHO);
    let _echo = UdpEcho::start(&topo, &[server]);
    let p = proxy(&topo, Family::V4);
    let to = Target::Ip(server);
    assert!(
        SocksUdp::associate(&topo, p, None, true, to.clone()).is_err(),
        "no auth"
    );
    assert!(SocksUdp::associate(&topo, p, Some(("alice", "wrong")), true, to.clone()).is_err());
    let t = SocksUdp::associate(&topo, p, Some(("alice", "secret")), true, to).unwrap();
    assert_eq!(
        echo_check(vec![Box::new(t)], server, 10, (0, 1000)).received,
        10
    );
    assert_eq!(ks.stats().get("udp_created"), 1);
}

/// Broken datagrams from the client are dropped and counted by kind (truncated, unknown ATYP,
/// empty or cut name: `header`; FRAG != 0: `fragment`) and the association goes on; an answer
/// too big for the SOCKS header (65,507 bytes from the server) is dropped as `too_big`.
#[test]
fn associate_bad_input() {
    let Some((topo, _, ks)) = socks(&[], &[]) else {
        return;
    };
    let server = topo.server_addr(Family::V4, ECHO);
    let _echo = UdpEcho::start(&topo, &[server]);
    let mut t = associate(&topo, Family::V4, server);
    let mut buf = [0u8; 64];
    t.send(b"first").unwrap();
    assert_eq!(t.recv(&mut buf).unwrap(), (server, 5));
    let ip = |frag: u8| {
        let mut d = socks_udp_header(&Target::Ip(server));
        d[2] = frag;
        d.extend_from_slice(b"x");
        d
    };
    let bad: [Vec<u8>; 6] = [
        vec![0, 0],
        ip(0)[..7].to_vec(),
        vec![0, 0, 0, 5, 1, 2, 3, 4, 0, 7, b'x'],
        vec![0, 0, 0, 3, 0, 0, 7, b'x'],
        vec![0, 0, 0, 3, 20, b'a', b'b'],
        ip(1),
    ];
    for d in &bad {
        t.send_raw(d).unwrap();
    }
    t.send(b"after").unwrap();
    assert_eq!(
        t.recv(&mut buf).unwrap(),
        (server, 5),
        "the association goes on"
    );
    // A server that answers anything with the largest IPv4 datagram.
    let big = udp_in(&topo.server, topo.server_addr(Family::V4, 9));
    let bigger = std::thread::spawn(move || {
        let (_, from) = big.recv_from(&mut [0u8; 16]).expect("asked");
        big.send_to(&vec![7u8; MAX_V4], from).expect("answer");
    });
    let mut d = socks_udp_header(&Target::Ip(topo.server_addr(Family::V4, 9)));
    d.extend_from_slice(b"big?");
    t.send_raw(&d).unwrap();
    join(bigger);
    assert!(wait_until(Duration::from_secs(3), || ks
        .stats()
        .get("udp_drop_too_big")
        == 1));
    t.send(b"still").unwrap();
    assert_eq!(t.recv(&mut buf).unwrap(), (server, 5));
    let s = ks.stats();
    assert_eq!(
        (s.get("udp_drop_header"), s.get("udp_drop_fragment")),
        (5, 1)
    );
    assert_eq!((s.get("udp_up_dgrams"), s.get("udp_down_dgrams")), (4, 3));
    assert_eq!(s.get("udp_assocs"), 1);
}

/// A name (ATYP 3) on the direct route is looked up once by ksocks' resolver (the router's
/// hosts file here) and its answers come back from the IP address; a name that does not
/// resolve drops what waited for it (counted `route`), and the association goes on.
#[test]
fn associate_names() {
    let Some((topo, _hosts, ks)) = socks(&[], &["echo.test"]) else {
        return;
    };
    let server = topo.server_addr(Family::V4, ECHO);
    let _echo = UdpEcho::start(&topo, &[server]);
    let name = |n: &str| Target::Name(n.into(), ECHO);
    let p = proxy(&topo, Family::V4);
    let mut t = SocksUdp::associate(&topo, p, None, true, name("echo.test")).unwrap();
    let r = echo_check(
        vec![Box::new(t.try_clone().unwrap())],
        server,
        20,
        (1, 2000),
    );
    assert_eq!(r.received, 20);
    t.to = name("nowhere.test");
    t.send(b"lost").unwrap();
    assert!(wait_until(Duration::from_secs(5), || ks
        .stats()
        .get("udp_drop_route")
        == 1));
    assert!(
        ks.log().contains("cannot resolve nowhere.test"),
        "{}",
        ks.log_tail(5)
    );
    t.to = name("echo.test");
    t.send(b"again").unwrap();
    assert_eq!(t.recv(&mut [0u8; 16]).unwrap(), (server, 5));
    let s = ks.stats();
    assert_eq!((s.get("udp_up_dgrams"), s.get("udp_down_dgrams")), (21, 21));
}
