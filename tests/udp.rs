//! UDP through TPROXY (`--udp-tproxy`), direct upstream, in the namespace topology under real
//! nftables `tproxy` rules for UDP: DNS to dnsmasq (asked by dig and by a scripted client),
//! byte-exact echo of 1,000 datagrams up to 64 KiB, 2,000 concurrent associations and their
//! idle expiry, eviction at `--udp-max`, full cone, ICMP errors, a flood, `--user nobody`.
//! Each test checks that the datagrams went through ksocks: its close lines (`plane=udp`) and
//! its stats counters.
//!
//! Run as root: `cargo test --test udp`.

mod common;

use common::peers::require_tools;
use common::udp::*;
use common::*;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

const PORT: u16 = 12346;
const ECHO: u16 = 7;

/// A TPROXY topology with the UDP rule, and ksocks on `-T` in both families with `extra`.
fn tproxy(extra: &[&str]) -> Option<(Topology, Ksocks)> {
    tproxy_fams(extra, &[Family::V4, Family::V6])
}

/// The same, with the paths of `fams` only warmed up (IPv6's takes a second).
fn tproxy_fams(extra: &[&str], fams: &[Family]) -> Option<(Topology, Ksocks)> {
    if !require_root() || !require_tools(&["ping"]) {
        return None;
    }
    let topo = Topology::new(Inbound::Tproxy, PORT);
    add_udp_tproxy(&topo, PORT);
    warm_up(&topo, fams);
    let mut args = vec!["-T", "0.0.0.0:12346", "-T", "[::]:12346"];
    args.extend_from_slice(extra);
    let ks = Ksocks::start(&topo, &args);
    Some((topo, ks))
}

fn plain(topo: &Topology, fam: Family, to: SocketAddr) -> Box<dyn Dgram> {
    Box::new(Plain {
        sock: client_udp(topo, fam),
        to,
    })
}

fn dns_case(fam: Family) {
    if !require_tools(&["dnsmasq", "dig"]) {
        return;
    }
    let Some((topo, ks)) = tproxy_fams(&[], &[fam]) else {
        return;
    };
    let names = dns_names(20);
    let _dns = start_dnsmasq(&topo, &names);
    let server = topo.server_addr(fam, 53);
    // dig, a real client: one process, one socket, one association per query.
    let digs = 8;
    for (name, v4, v6) in names.iter().take(digs) {
        let (qtype, want) = match fam {
            Family::V4 => ("A", v4.to_string()),
            Family::V6 => ("AAAA", v6.to_string()),
        };
        let out = Command::new("ip")
            .args(["netns", "exec", &topo.client, "dig", "+short", "+tries=3"])
            .args(["+time=1", &format!("@{}", server.ip()), name, qtype])
            .output()
            .expect("run dig");
        // On a veth pair this fresh, IPv6 neighbour discovery holds the first exchange about
        // a second even with plain forwarding (checked without ksocks), so dig may report a
        // timeout (`;;` lines) before its retry is answered.
        let text = String::from_utf8_lossy(&out.stdout);
        let answer: Vec<&str> = text.lines().filter(|l| !l.starts_with(";;")).collect();
        assert_eq!(answer, [&want[..]], "dig {name} {qtype}: {out:?}");
    }
    // A scripted client on one port: A and AAAA for every name, and an unknown name.
    let mut t = plain(&topo, fam, server);
    for (i, (name, v4, v6)) in names.iter().enumerate() {
        let a = dns_ask(&mut *t, 2 * i as u16, name, QTYPE_A, 3).expect("A answer");
        assert_eq!((a.rcode, a.addrs), (0, vec![IpAddr::V4(*v4)]), "{name} A");
        let a = dns_ask(&mut *t, 2 * i as u16 + 1, name, QTYPE_AAAA, 3).expect("AAAA");
        assert_eq!(
            (a.rcode, a.addrs),
            (0, vec![IpAddr::V6(*v6)]),
            "{name} AAAA"
        );
    }
    let nx = dns_ask(&mut *t, 999, "absent.test", QTYPE_A, 3).expect("NXDOMAIN answer");
    assert_eq!((nx.rcode, nx.addrs.len()), (3, 0));
    // Every exchange went through ksocks and ended as soon as it was answered.
    let queries = digs + 2 * names.len() + 1;
    let dest = server.to_string();
    let closes = wait_udp_closes(&ks, queries, Duration::from_secs(5), |c| c.dest == dest);
    for c in &closes {
        assert_eq!(c.get("end"), "answered", "{}", c.line);
        assert_eq!(c.get("in"), "tproxy");
        assert!(
            c.num("down_dgrams") >= 1 && c.num("up_dgrams") >= 1,
            "{}",
            c.line
        );
    }
    let s = ks.stats();
    assert_eq!(s.get("udp_end_answered"), closes.len() as u64);
    assert_eq!(s.get("udp_assocs"), 0, "answered associations are gone");
}

/// DNS over IPv4: dig and a scripted client get dnsmasq's answers through ksocks, and every
/// association ends `answered` without waiting for the idle timeout.
#[test]
fn dns_v4() {
    dns_case(Family::V4);
}

/// The same over IPv6 (`tproxy ip6`, IPV6_RECVORIGDSTADDR, IPv6 reply sockets).
#[test]
fn dns_v6() {
    dns_case(Family::V6);
}

fn echo_case(fam: Family) {
    let Some((topo, ks)) = tproxy_fams(&[], &[fam]) else {
        return;
    };
    let server = topo.server_addr(fam, ECHO);
    let _echo = UdpEcho::start(&topo, &[server]);
    let transports = (0..8).map(|_| plain(&topo, fam, server)).collect();
    let r = echo_check(transports, server, 1000, (0, max_payload(fam)));
    let s = ks.stats();
    assert_eq!(
        (r.sent, r.received, r.lost),
        (1000, 1000, 0),
        "{r:?} {:?}",
        s.fields
    );
    assert_eq!(s.get("udp_up_dgrams"), 1000);
    assert_eq!(s.get("udp_down_dgrams"), 1000);
    assert_eq!(s.get("udp_up_bytes"), r.bytes);
    assert_eq!(s.get("udp_down_bytes"), r.bytes);
    assert_eq!(s.get("udp_drops"), 0, "{:?}", s.fields);
    assert_eq!((s.get("udp_assocs"), s.get("udp_reply_socks")), (8, 1));
}

/// 1,000 datagrams of random sizes from 0 to 65,507 bytes, 8 clients one in flight each, come
/// back byte for byte from the server's own address, none lost.
#[test]
fn echo_v4() {
    echo_case(Family::V4);
}

/// The same over IPv6, up to 65,527 bytes.
#[test]
fn echo_v6() {
    echo_case(Family::V6);
}

/// 2,000 clients (distinct ports) each open an association and get their answer, all at once;
/// after `--udp-timeout` every association is gone: counted idle, one close line each, and
/// ksocks holds no more sockets than at start (reply sockets expire too).
#[test]
fn many_associations_then_idle_timeout() {
    raise_nofile();
    let Some((topo, ks)) = tproxy_fams(&["--udp-timeout", "2"], &[Family::V4]) else {
        return;
    };
    let server = topo.server_addr(Family::V4, ECHO);
    let _echo = UdpEcho::start(&topo, &[server]);
    let n = 2000;
    let rss0 = ks.rss_kib();
    let at = SocketAddr::new(topo.client_ip(Family::V4), 0);
    let socks: Vec<UdpSocket> =
        join(topo.in_client(move || (0..n).map(|_| UdpSocket::bind(at).expect("bind")).collect()));
    let mut buf = [0u8; 64];
    for (i, s) in socks.iter().enumerate() {
        s.send_to(&(i as u32).to_be_bytes(), server).unwrap();
    }
    for (i, s) in socks.iter().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let (len, from) = s
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert_eq!((&buf[..len], from), (&(i as u32).to_be_bytes()[..], server));
    }
    let s = ks.stats();
    assert_eq!((s.get("udp_assocs"), s.get("udp_created")), (n, n));
    assert_eq!((s.get("udp_down_dgrams"), s.get("udp_drops")), (n, 0));
    let per = (ks.rss_kib().saturating_sub(rss0)) as f64 / n as f64;
    eprintln!("{n} associations: RSS +{:.2} KiB each", per);
    let idle = wait_udp_closes(&ks, n as usize, Duration::from_secs(8), |c| {
        c.get("end") == "idle"
    });
    assert_eq!(idle.len(), n as usize);
    assert!(idle
        .iter()
        .all(|c| c.num("up_dgrams") == 1 && c.num("down_dgrams") == 1));
    let s = ks.stats();
    assert_eq!((s.get("udp_assocs"), s.get("udp_end_idle")), (0, n));
    assert!(wait_until(Duration::from_secs(5), || ks
        .stats()
        .get("udp_reply_socks")
        == 0));
    ks.assert_idle();
}

/// At `--udp-max 100`, 150 clients in turn: the 50 least recently active associations are
/// evicted (counted, one close line each), every client gets its answer, and an evicted
/// client's next datagram opens a new association and is answered too.
#[test]
fn udp_max_evicts_the_oldest() {
    let Some((topo, ks)) = tproxy_fams(&["--udp-max", "100"], &[Family::V4]) else {
        return;
    };
    let server = topo.server_addr(Family::V4, ECHO);
    let _echo = UdpEcho::start(&topo, &[server]);
    let socks: Vec<UdpSocket> = (0..150).map(|_| client_udp(&topo, Family::V4)).collect();
    let mut buf = [0u8; 16];
    let ask = |s: &UdpSocket, buf: &mut [u8]| {
        s.send_to(b"ping", server).unwrap();
        let (n, from) = s.recv_from(buf).expect("answer");
        assert_eq!((&buf[..n], from), (&b"ping"[..], server));
    };
    for s in &socks {
        ask(s, &mut buf);
    }
    let s = ks.stats();
    assert_eq!((s.get("udp_assocs"), s.get("udp_end_evicted")), (100, 50));
    let evicted = wait_udp_closes(&ks, 50, Duration::from_secs(5), |c| {
        c.get("end") == "evicted"
    });
    let first: Vec<String> = socks[..50]
        .iter()
        .map(|s| s.local_addr().unwrap().to_string())
        .collect();
    for c in &evicted {
        assert!(
            first.contains(&c.client),
            "{} was not among the oldest",
            c.line
        );
    }
    ask(&socks[0], &mut buf);
    let s = ks.stats();
    assert_eq!((s.get("udp_assocs"), s.get("udp_end_evicted")), (100, 51));
    assert_eq!(s.get("udp_peak"), 100);
}

/// Full cone: after a client sent to server A, server B (another port) sends to the address A
/// saw and the client receives it from B's address; a second client port has its own mapping.
#[test]
fn full_cone() {
    let Some((topo, ks)) = tproxy(&[]) else {
        return;
    };
    for fam in [Family::V4, Family::V6] {
        let (a, b) = (
            udp_in(&topo.server, topo.server_addr(fam, 7000)),
            udp_in(&topo.server, topo.server_addr(fam, 7001)),
        );
        let mut one = plain(&topo, fam, a.local_addr().unwrap());
        let mapped = check_full_cone(&mut *one, &a, &b);
        let mut two = plain(&topo, fam, a.local_addr().unwrap());
        let other = check_full_cone(&mut *two, &a, &b);
        assert_ne!(mapped, other, "one mapping per client port");
    }
    let s = ks.stats();
    assert_eq!((s.get("udp_assocs"), s.get("udp_reply_socks")), (4, 4));
    assert_eq!((s.get("udp_up_dgrams"), s.get("udp_down_dgrams")), (4, 8));
}

/// A destination port with nothing listening answers ICMP port unreachable: the association
/// ends at once as `refused` (v4 and v6) and its socket is closed, while another client's
/// echo in the same ksocks goes on.
#[test]
fn icmp_refusal_ends_the_association() {
    let Some((topo, ks)) = tproxy(&[]) else {
        return;
    };
    let server = topo.server_addr(Family::V4, ECHO);
    let _echo = UdpEcho::start(&topo, &[server]);
    let mut good = plain(&topo, Family::V4, server);
    assert_eq!(dns_like_echo(&mut *good, 5), 5);
    for fam in [Family::V4, Family::V6] {
        let closed = topo.server_addr(fam, 9);
        let c = client_udp(&topo, fam);
        c.send_to(b"anyone?", closed).unwrap();
        let dest = closed.to_string();
        let lines = wait_udp_closes(&ks, 1, Duration::from_secs(5), |c| c.dest == dest);
        assert_eq!(lines[0].get("end"), "refused", "{}", lines[0].line);
        assert_eq!(lines[0].num("up_dgrams"), 1);
    }
    assert_eq!(
        dns_like_echo(&mut *good, 5),
        5,
        "the other association goes on"
    );
    let s = ks.stats();
    assert_eq!((s.get("udp_end_icmp"), s.get("udp_assocs")), (2, 1));
    // The good association's socket and its reply socket, nothing of the refused ones.
    assert!(wait_until(Duration::from_secs(3), || {
        ks.socket_count() == ks.socket_baseline + 2
    }));
}

/// `n` exchanges through `t`, each retried up to 10 times; how many were answered.
fn dns_like_echo(t: &mut dyn Dgram, n: u32) -> u32 {
    let mut buf = [0u8; 64];
    let mut answered = 0;
    for i in 0..n {
        let msg = i.to_be_bytes();
        'tries: for _ in 0..10 {
            t.send(&msg).unwrap();
            let end = Instant::now() + Duration::from_millis(300);
            while Instant::now() < end {
                match t.recv(&mut buf) {
                    Ok((_, len)) if buf[..len] == msg => {
                        answered += 1;
                        break 'tries;
                    }
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
        }
    }
    answered
}

/// One client floods small datagrams for 3 s as fast as it can send them; meanwhile another
/// client's 100 exchanges (with retries, as resolvers do) all complete, and ksocks' memory
/// stays bounded: the flood costs datagrams dropped (by the kernel on the listener, counted),
/// never queued inside ksocks.
#[test]
fn flood_from_one_client() {
    let Some((topo, ks)) = tproxy_fams(&[], &[Family::V4]) else {
        return;
    };
    let server = topo.server_addr(Family::V4, ECHO);
    let _echo = UdpEcho::start(&topo, &[server]);
    // A sink that never reads: the server's kernel drops what does not fit, silently.
    let sink = join(topo.in_server({
        let at = topo.server_addr(Family::V4, 9000);
        move || UdpSocket::bind(at).expect("sink")
    }));
    let sink_addr = sink.local_addr().unwrap();
    let rss0 = ks.rss_kib();
    let cpu0 = cpu_ticks(ks.pid());
    let flooder = client_udp(&topo, Family::V4);
    let flood = std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(3);
        let mut sent = 0u64;
        while Instant::now() < end {
            for _ in 0..256 {
                if flooder.send_to(&[0x55; 100], sink_addr).is_ok() {
                    sent += 1;
                }
            }
        }
        (flooder.local_addr().unwrap(), sent)
    });
    let mut good = plain(&topo, Family::V4, server);
    let answered = dns_like_echo(&mut *good, 100);
    let (flood_client, sent) = join(flood);
    assert_eq!(
        answered, 100,
        "every exchange of the other client was answered"
    );
    let s = ks.stats();
    let grown = ks.rss_kib().saturating_sub(rss0);
    let cpu = cpu_ticks(ks.pid()) - cpu0;
    eprintln!(
        "flood: {sent} datagrams sent, {} relayed, {} dropped by the kernel on the listener; ksocks RSS +{grown} KiB, CPU {cpu} ticks",
        s.get("udp_up_dgrams"),
        s.get("udp_drop_kernel")
    );
    assert!(grown < 16 << 10, "RSS grew by {grown} KiB during the flood");
    assert!(s.get("udp_up_dgrams") > 1000, "{:?}", s.fields);
    assert_eq!(s.get("udp_assocs"), 2, "the flood is one association");
    ks.stats();
    drop(ks);
    let _ = flood_client;
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the state.
    f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0)
}

/// With `--user nobody` ksocks keeps only CAP_NET_RAW and CAP_NET_BIND_SERVICE and still
/// answers from the server's address and port (7, below 1024): reply sockets are made after
/// the privilege drop, also once the first expired.
#[test]
fn user_nobody() {
    let Some((topo, ks)) = tproxy_fams(&["--user", "nobody", "--udp-timeout", "1"], &[Family::V4])
    else {
        return;
    };
    assert!(ks.log().contains("running as nobody"), "{}", ks.log());
    let status = std::fs::read_to_string(format!("/proc/{}/status", ks.pid())).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap()
            .trim()
            .to_string()
    };
    assert!(field("Uid:").starts_with("65534"), "{status}");
    let caps = format!("{:016x}", 1u64 << 13 | 1 << 10);
    assert_eq!(
        field("CapEff:"),
        caps,
        "CAP_NET_RAW and CAP_NET_BIND_SERVICE only"
    );
    let server = topo.server_addr(Family::V4, ECHO);
    let _echo = UdpEcho::start(&topo, &[server]);
    for round in 0..2 {
        let transports = (0..2).map(|_| plain(&topo, Family::V4, server)).collect();
        let r = echo_check(transports, server, 50, (0, MAX_V4));
        assert_eq!(
            (r.received, r.lost),
            (50, 0),
            "round {round}: {}",
            ks.log_tail(5)
        );
        // Let the association and its reply socket expire; the next round makes new ones.
        assert!(wait_until(Duration::from_secs(5), || ks
            .stats()
            .get("udp_reply_socks")
            == 0));
    }
    let s = ks.stats();
    assert_eq!((s.get("udp_drop_reply"), s.get("udp_created")), (0, 4));
}
