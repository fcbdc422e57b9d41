//! The UDP module driven as the event loop drives it, on loopback without a namespace: a SOCKS5
//! UDP ASSOCIATE handed over on a TCP connection, datagrams to a loopback echo and back through
//! the direct route, the control connection's end; and the allocation count of the steady
//! state, which must be zero per datagram (the counting allocator of `sys::alloc_count`).

use super::*;
use crate::cli::{self, Command, ListenerKind};
use crate::conn::Conn;
use crate::conns::{Entry, Stage};
use crate::setup::Setup;
use crate::sock::Sock;
use crate::socks5::Dest;
use crate::sys::alloc_count;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

fn config(args: &[&str]) -> Config {
    match cli::parse(args.iter().copied()) {
        Ok(Command::Run(cfg)) => cfg,
        other => panic!("{args:?}: {other:?}"),
    }
}

/// What the loop lends the module: its epoll, no resolver, no upstream proxy.
fn cx(ep: &epoll::Epoll) -> Ctx<'_> {
    Ctx {
        ep,
        resolver: None,
        target: None,
    }
}

/// Hands `theirs` over as the loop does a SOCKS client that asked for UDP ASSOCIATE with DST.
fn adopt(udp: &mut Udp, ep: &epoll::Epoll, theirs: TcpStream, peer: SocketAddr, dst: Dest) {
    let conn = Conn::new(1, ListenerKind::Socks, Sock::new(theirs.into()), peer, dst);
    let (setup, _) = Setup::start(ListenerKind::Socks, Instant::now());
    let stage = Stage::Setup(setup);
    udp.adopt(cx(ep), Entry { conn, stage });
}

/// A UDP module with one SOCKS association adopted from a loopback TCP connection: the module,
/// its epoll, the client's control stream and UDP socket, and the relay address.
fn associated() -> (Udp, epoll::Epoll, TcpStream, UdpSocket, SocketAddr) {
    let mut udp = Udp::bind(&config(&["-s", "127.0.0.1:1080"])).unwrap();
    let ep = epoll::Epoll::new(64).unwrap();
    udp.start(&ep).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut control = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (theirs, peer) = l.accept().unwrap();
    theirs.set_nonblocking(true).unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let dst = Dest::Ip(client.local_addr().unwrap());
    adopt(&mut udp, &ep, theirs, peer, dst);
    let mut reply = [0u8; 10];
    control.read_exact(&mut reply).unwrap();
    assert_eq!(reply[..4], [5, 0, 0, 1], "success, IPv4");
    let relay = SocketAddr::from(([127, 0, 0, 1], u16::from_be_bytes([reply[8], reply[9]])));
    (udp, ep, control, client, relay)
}

/// Waits for readiness and hands every event to the module, as the loop does; returns the
/// allocations the module made.
fn turn(udp: &mut Udp, ep: &mut epoll::Epoll, events: &mut Vec<epoll::Event>) -> u64 {
    ep.wait(events, 50).unwrap();
    let mut allocs = 0;
    for ev in events.iter() {
        let Some(Token::Udp(_)) = Token::decode(ev.token) else {
            panic!("not a UDP token: {:x}", ev.token);
        };
        allocs += alloc_count::during(|| udp.event(cx(ep), ev.token, ev.events));
    }
    allocs
}

/// A SOCKS5 UDP datagram to `to` carrying `payload`.
fn datagram(to: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut d = vec![0, 0, 0];
    d.extend_from_slice(&crate::socks5::encode_addr(&Dest::Ip(to)));
    d.extend_from_slice(payload);
    d
}

/// Client -> relay -> direct upstream -> echo -> back to the client with a SOCKS5 header
/// naming the echo; after the first datagram (which opens the upstream socket), 200 more
/// cost no allocation at all; closing the control connection ends the association.
#[test]
fn socks_relay_steady_state_allocates_nothing() {
    let (mut udp, mut ep, control, client, relay) = associated();
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    let echo_addr = echo.local_addr().unwrap();
    let echoer = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        for _ in 0..201 {
            let (n, from) = echo.recv_from(&mut buf).unwrap();
            echo.send_to(&buf[..n], from).unwrap();
        }
    });
    let mut events = Vec::with_capacity(64);
    let mut buf = vec![0u8; 65536];
    let mut steady = 0;
    for i in 0..201u32 {
        let payload = vec![i as u8; (i as usize * 97) % 3000];
        client
            .send_to(&datagram(echo_addr, &payload), relay)
            .unwrap();
        let mut allocs = 0;
        let got = loop {
            allocs += turn(&mut udp, &mut ep, &mut events);
            client.set_nonblocking(true).unwrap();
            let r = client.recv_from(&mut buf);
            client.set_nonblocking(false).unwrap();
            if let Ok((n, from)) = r {
                assert_eq!(from, relay);
                break buf[..n].to_vec();
            }
        };
        assert_eq!(got, datagram(echo_addr, &payload), "datagram {i}");
        if i > 0 {
            steady += allocs;
        }
    }
    echoer.join().unwrap();
    assert_eq!(steady, 0, "allocations for 200 datagrams each way");
    let c = udp.stats().counters;
    assert_eq!(
        (c.up_dgrams, c.down_dgrams, c.drops),
        (201, 201, Default::default())
    );
    drop(control);
    for _ in 0..20 {
        turn(&mut udp, &mut ep, &mut events);
        if udp.assocs.is_empty() {
            break;
        }
    }
    assert!(
        udp.assocs.is_empty(),
        "the control connection's end ends the association"
    );
    assert_eq!(udp.count.ended[4], 1, "counted as control");
}

/// A stranger's datagram (another address, before the client's port is known: the request
/// named port 0) is dropped and counted; bytes on the control connection are ignored; broken
/// headers are counted by kind; a destination in the other family than the first is dropped.
#[test]
fn strangers_and_bad_headers() {
    let mut udp = Udp::bind(&config(&["-s", "127.0.0.1:1080"])).unwrap();
    let mut ep = epoll::Epoll::new(64).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut control = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (theirs, peer) = l.accept().unwrap();
    theirs.set_nonblocking(true).unwrap();
    let any = Dest::Ip(SocketAddr::from(([0, 0, 0, 0], 0)));
    adopt(&mut udp, &ep, theirs, peer, any);
    let mut reply = [0u8; 10];
    control.read_exact(&mut reply).unwrap();
    let relay = SocketAddr::from(([127, 0, 0, 1], u16::from_be_bytes([reply[8], reply[9]])));
    let (client, stranger) = (
        UdpSocket::bind("127.0.0.1:0").unwrap(),
        UdpSocket::bind("127.0.0.2:0").unwrap(),
    );
    let to = SocketAddr::from(([127, 0, 0, 1], 9));
    stranger.send_to(&datagram(to, b"x"), relay).unwrap();
    client
        .send_to(&[0, 0, 1, 1, 127, 0, 0, 1, 0, 9, 1], relay)
        .unwrap();
    client.send_to(&[0, 0, 0, 9], relay).unwrap();
    client.send_to(&[0, 0], relay).unwrap();
    control.write_all(b"ignored").unwrap();
    let mut events = Vec::new();
    for _ in 0..5 {
        turn(&mut udp, &mut ep, &mut events);
    }
    let d = udp.count.drops;
    assert_eq!((d.stranger, d.fragment, d.header), (1, 1, 2), "{d:?}");
    assert_eq!(udp.assocs.len(), 1, "the association goes on");
    // The direct socket takes the family of the first destination; the other one is dropped.
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .send_to(&datagram(sink.local_addr().unwrap(), b"v4"), relay)
        .unwrap();
    let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 9));
    client.send_to(&datagram(v6, b"v6"), relay).unwrap();
    for _ in 0..3 {
        turn(&mut udp, &mut ep, &mut events);
    }
    assert_eq!((udp.count.up_dgrams, udp.count.drops.route), (1, 1));
    assert_eq!(udp.assocs.len(), 1);
}
