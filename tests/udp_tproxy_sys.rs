//! The kernel behaviour the UDP plane's TPROXY design rests on (docs/UDP.md), checked with the
//! `sys::udp` calls in the namespace topology (client -> router -> server) under a real
//! nftables `tproxy` rule for UDP, without ksocks (tests/udp.rs runs ksocks itself): if a
//! kernel changed one of these, these tests say which.
//!
//! - a diverted datagram carries its original destination in a control message;
//! - a reply socket bound transparently to that destination reaches the client from the
//!   server's own address:port;
//! - while unconnected, that reply socket does not capture the client's later datagrams (they
//!   still reach the listener), whereas a connected one would: why reply sockets are shared
//!   and unconnected.
//!
//! Run as root: `cargo test --test udp_tproxy_sys`.

mod common;

use common::*;
use ksocks::sys::udp;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::Duration;

const PORT: u16 = 12346;
const DNS: u16 = 53;

/// Adds the UDP twin of the topology's TCP TPROXY rule (the `ip rule`/route are already there).
fn add_udp_tproxy(topo: &Topology) {
    let rules = format!(
        "table inet ksocks_udp {{\n chain pre {{\n  type filter hook prerouting priority mangle; policy accept;\n  iifname \"rc\" meta l4proto udp tproxy ip to :{PORT} meta mark set 1 accept\n  iifname \"rc\" meta l4proto udp tproxy ip6 to :{PORT} meta mark set 1 accept\n }}\n}}\n"
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", &topo.router, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft");
    io::Write::write_all(&mut child.stdin.take().unwrap(), rules.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "nft rules");
}

/// Retries a non-blocking call while it would block, for up to 5 s.
fn soon<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    for _ in 0..500 {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            other => return other,
        }
    }
    f()
}

fn any(fam: Family, port: u16) -> SocketAddr {
    match fam {
        Family::V4 => ([0, 0, 0, 0], port).into(),
        Family::V6 => (std::net::Ipv6Addr::UNSPECIFIED, port).into(),
    }
}

/// A TPROXY UDP listener on the router: transparent, asking for original destinations.
fn listener(topo: &Topology, fam: Family) -> OwnedFd {
    let at = any(fam, PORT);
    join(topo.in_router(move || {
        let fd = udp::socket(&at)?;
        udp::set_transparent(fd.as_fd(), at.is_ipv6())?;
        udp::set_recv_orig_dst(fd.as_fd(), at.is_ipv6())?;
        ksocks::sys::socket::bind(fd.as_fd(), &at)?;
        Ok::<_, io::Error>(fd)
    }))
    .expect("TPROXY listener")
}

/// A plain UDP socket in the client namespace, bound to the client's address.
fn client_socket(topo: &Topology, fam: Family) -> UdpSocket {
    let at = SocketAddr::new(topo.client_ip(fam), 0);
    let s = join(topo.in_client(move || UdpSocket::bind(at))).expect("client socket");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn tproxy_case(fam: Family) {
    if !require_root() {
        return;
    }
    let topo = Topology::new(Inbound::Tproxy, PORT);
    add_udp_tproxy(&topo);
    let listen = listener(&topo, fam);
    let client = client_socket(&topo, fam);
    let me = client.local_addr().unwrap();
    let server = topo.server_addr(fam, DNS);
    let mut buf = [0u8; 2048];

    // 1. The diverted datagram names the server as its original destination.
    client.send_to(b"one", server).unwrap();
    let r = soon(|| udp::recv_orig_dst(listen.as_fd(), &mut buf)).unwrap();
    assert_eq!((r.len, r.from, r.orig_dst), (3, me, Some(server)));
    assert_eq!(&buf[..3], b"one");

    // 2. A reply socket bound transparently to the server's address:port answers the client,
    //    which sees the server it addressed.
    let reply = join(topo.in_router(move || udp::bind_transparent(&server))).unwrap();
    udp::send_to(reply.as_fd(), b"answer", &me).unwrap();
    let (n, from) = client.recv_from(&mut buf).unwrap();
    assert_eq!((n, from, &buf[..n]), (6, server, &b"answer"[..]));

    // 3. Unconnected, it does not capture the client's next datagram: the listener gets it.
    client.send_to(b"two", server).unwrap();
    let r = soon(|| udp::recv_orig_dst(listen.as_fd(), &mut buf)).unwrap();
    assert_eq!((r.len, r.orig_dst), (3, Some(server)));
    let idle = udp::recv_from(reply.as_fd(), &mut buf).unwrap_err();
    assert_eq!(idle.kind(), io::ErrorKind::WouldBlock);

    // 4. A connected transparent socket would: TPROXY's lookup of established sockets
    //    (nf_tproxy_get_sock_v4/v6) hands the datagram to it, not to the listener.
    let connected = join(topo.in_router(move || {
        let fd = udp::bind_transparent(&server)?;
        ksocks::sys::socket::connect(fd.as_fd(), &me)?;
        Ok::<_, io::Error>(fd)
    }))
    .unwrap();
    client.send_to(b"three", server).unwrap();
    let (n, _) = soon(|| udp::recv_from(connected.as_fd(), &mut buf)).unwrap();
    assert_eq!(&buf[..n], b"three");
    let none = udp::recv_orig_dst(listen.as_fd(), &mut buf).unwrap_err();
    assert_eq!(none.kind(), io::ErrorKind::WouldBlock);
}

/// IPv4: original destination, reply from the server's address, unconnected reply sockets
/// leave the listener its datagrams.
#[test]
fn tproxy_udp_v4() {
    tproxy_case(Family::V4);
}

/// The same over IPv6 (`tproxy ip6`, IPV6_TRANSPARENT, IPV6_RECVORIGDSTADDR).
#[test]
fn tproxy_udp_v6() {
    tproxy_case(Family::V6);
}
