//! DNS for the UDP tests: the test names and their addresses, dnsmasq answering them in the
//! server namespace, a query builder (RFC 1035 §4.1), an answer parser and a bounded ask over
//! any datagram transport.
//!
//! Invariants: dnsmasq is killed on drop; the parser never reads past the message (`None`
//! instead); an ask gives up after `tries` seconds.

use super::super::peers::{which, Peer, TempDir};
use super::*;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

/// `n` names `h<i>.test` with one IPv4 and one IPv6 address each, from documentation ranges.
pub fn dns_names(n: usize) -> Vec<(String, Ipv4Addr, Ipv6Addr)> {
    (0..n)
        .map(|i| {
            let v4 = Ipv4Addr::new(203, 0, 113, i as u8 + 1);
            let v6 = Ipv6Addr::new(0x2001, 0xdb8, 0xfeed, 0, 0, 0, 0, i as u16 + 1);
            (format!("h{i}.test"), v4, v6)
        })
        .collect()
}

/// dnsmasq (Debian's dnsmasq-base) on port 53 of both server addresses, answering A and AAAA
/// from a hosts file and NXDOMAIN for other names under `test`; killed on drop.
pub struct Dnsmasq {
    _peer: Peer,
    _dir: TempDir,
}

pub fn start_dnsmasq(topo: &Topology, names: &[(String, Ipv4Addr, Ipv6Addr)]) -> Dnsmasq {
    let dir = TempDir::new("dnsmasq");
    let mut hosts = String::new();
    for (name, v4, v6) in names {
        hosts.push_str(&format!("{v4} {name}\n{v6} {name}\n"));
    }
    let file = dir.write("hosts", &hosts, 0o644);
    let bin = which("dnsmasq").expect("dnsmasq installed");
    let (v4, v6) = (topo.server_ip(Family::V4), topo.server_ip(Family::V6));
    let args: Vec<String> = [
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--user=root",
        "--group=root",
        "--pid-file=",
        "--local=/test/",
        "--log-facility=-",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!("--addn-hosts={}", file.display()),
        format!("--listen-address={v4},{v6}"),
    ])
    .collect();
    let peer = Peer::start(
        &topo.server,
        "dnsmasq",
        &bin,
        &args,
        SocketAddr::new(v4, 53),
    );
    Dnsmasq {
        _peer: peer,
        _dir: dir,
    }
}

pub const QTYPE_A: u16 = 1;
pub const QTYPE_AAAA: u16 = 28;

/// A recursive query for `name`, type `qtype` (RFC 1035 §4.1).
pub fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0, (qtype >> 8) as u8, qtype as u8, 0, 1]);
    m
}

/// An answer's ID, RCODE and the A/AAAA addresses in it.
#[derive(Debug, PartialEq, Eq)]
pub struct DnsAnswer {
    pub id: u16,
    pub rcode: u8,
    pub addrs: Vec<IpAddr>,
}

fn skip_name(m: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *m.get(at)? as usize;
        match len {
            0 => return Some(at + 1),
            l if l >= 0xc0 => return Some(at + 2),
            l => at += 1 + l,
        }
    }
}

/// Parses an answer; `None` if it is not one.
pub fn dns_parse(m: &[u8]) -> Option<DnsAnswer> {
    let id = u16::from_be_bytes([*m.first()?, *m.get(1)?]);
    if m.get(2)? & 0x80 == 0 {
        return None;
    }
    let rcode = m.get(3)? & 0xf;
    let qd = u16::from_be_bytes([*m.get(4)?, *m.get(5)?]);
    let an = u16::from_be_bytes([*m.get(6)?, *m.get(7)?]);
    let mut at = 12;
    for _ in 0..qd {
        at = skip_name(m, at)? + 4;
    }
    let mut addrs = Vec::new();
    for _ in 0..an {
        at = skip_name(m, at)?;
        let ty = u16::from_be_bytes([*m.get(at)?, *m.get(at + 1)?]);
        let len = u16::from_be_bytes([*m.get(at + 8)?, *m.get(at + 9)?]) as usize;
        let data = m.get(at + 10..at + 10 + len)?;
        match (ty, len) {
            (QTYPE_A, 4) => addrs.push(IpAddr::from(<[u8; 4]>::try_from(data).ok()?)),
            (QTYPE_AAAA, 16) => addrs.push(IpAddr::from(<[u8; 16]>::try_from(data).ok()?)),
            _ => {}
        }
        at += 10 + len;
    }
    Some(DnsAnswer { id, rcode, addrs })
}

/// Asks `name` (type `qtype`) through `t` with up to `tries` attempts of 1 s; the answer.
pub fn dns_ask(
    t: &mut dyn Dgram,
    id: u16,
    name: &str,
    qtype: u16,
    tries: u32,
) -> Option<DnsAnswer> {
    let q = dns_query(id, name, qtype);
    let mut buf = vec![0u8; 4096];
    for _ in 0..tries {
        t.send(&q).ok()?;
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            match t.recv(&mut buf) {
                Ok((_, n)) => match dns_parse(&buf[..n]) {
                    Some(a) if a.id == id => return Some(a),
                    _ => continue,
                },
                Err(_) => break,
            }
        }
    }
    None
}
