//! Tests of `sys::udp` against the kernel on loopback: original destinations, transparent
//! binds, truncation, ICMP errors on connected and unconnected sockets, and no allocation.

use super::*;
use crate::sys::epoll::{self, Epoll};
use crate::sys::socket::{connect, local_addr, recv, send};
use std::time::Duration;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A UDP socket bound to `at` (port 0 for any).
fn bound(at: &str) -> (OwnedFd, SocketAddr) {
    let a = addr(at);
    let fd = socket(&a).unwrap();
    bind(borrow(&fd), &a).unwrap();
    let local = local_addr(borrow(&fd)).unwrap();
    (fd, local)
}

/// Retries `f` while it would block, up to 1 s: loopback delivery is normally done before
/// `sendto` returns, but ICMP generation is rate-limited and may run later.
fn soon<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    for _ in 0..100 {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            other => return other,
        }
    }
    f()
}

/// Root (CAP_NET_ADMIN) is needed for transparent sockets; skip without, fail under CI.
fn privileged() -> bool {
    let probe = socket(&addr("0.0.0.0:0")).unwrap();
    match set_transparent(borrow(&probe), false) {
        Ok(()) => true,
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("SKIP: IP_TRANSPARENT needs CAP_NET_ADMIN: {e}");
            false
        }
        Err(e) => panic!("IP_TRANSPARENT under CI: {e}"),
    }
}

/// Each datagram carries the address it was sent to: a socket bound to 0.0.0.0 tells
/// 127.0.0.2 from 127.0.0.3, and the sender's address comes back too. Sending and
/// receiving allocate nothing (control messages are parsed on the stack).
#[test]
fn orig_dst_v4_per_datagram() {
    let (rx, local) = bound("0.0.0.0:0");
    set_recv_orig_dst(borrow(&rx), false).unwrap();
    let (tx, from) = bound("127.0.0.1:0");
    let mut buf = [0u8; 64];
    for dst in ["127.0.0.2", "127.0.0.3"] {
        let to = SocketAddr::new(dst.parse().unwrap(), local.port());
        let mut got = None;
        let allocs = crate::sys::alloc_count::during(|| {
            assert_eq!(send_to(borrow(&tx), b"hello", &to).unwrap(), 5);
            got = soon(|| recv_orig_dst(borrow(&rx), &mut buf)).ok();
        });
        let r = got.unwrap();
        assert_eq!((r.len, r.from, r.orig_dst, allocs), (5, from, Some(to), 0));
        assert_eq!(&buf[..5], b"hello");
    }
}

/// A dual-stack IPv6 socket reports an IPv4 datagram's sender and original destination as
/// plain IPv4 (not ::ffff:...), and an IPv6 datagram's as IPv6.
#[test]
fn orig_dst_dual_stack_is_canonical() {
    let any6 = addr("[::]:0");
    let rx = socket(&any6).unwrap();
    set_int_opt(borrow(&rx), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0).unwrap();
    bind(borrow(&rx), &any6).unwrap();
    let port = local_addr(borrow(&rx)).unwrap().port();
    set_recv_orig_dst(borrow(&rx), true).unwrap();
    let mut buf = [0u8; 64];

    let (tx4, from4) = bound("127.0.0.1:0");
    let to4 = SocketAddr::new("127.0.0.4".parse().unwrap(), port);
    send_to(borrow(&tx4), b"four", &to4).unwrap();
    let r = soon(|| recv_orig_dst(borrow(&rx), &mut buf)).unwrap();
    assert_eq!((r.len, r.from, r.orig_dst), (4, from4, Some(to4)));

    let (tx6, from6) = bound("[::1]:0");
    let to6 = SocketAddr::new("::1".parse().unwrap(), port);
    send_to(borrow(&tx6), b"six", &to6).unwrap();
    let r = soon(|| recv_orig_dst(borrow(&rx), &mut buf)).unwrap();
    assert_eq!((r.len, r.from, r.orig_dst), (3, from6, Some(to6)));
}

/// A datagram longer than the buffer reports its full length (the caller drops it), and
/// the next datagram is unaffected.
#[test]
fn truncation_is_reported() {
    let (rx, to) = bound("127.0.0.1:0");
    let (tx, _) = bound("127.0.0.1:0");
    let big = vec![7u8; 65507];
    assert_eq!(send_to(borrow(&tx), &big, &to).unwrap(), 65507);
    send_to(borrow(&tx), b"ok", &to).unwrap();
    let mut small = [0u8; 100];
    assert_eq!(
        soon(|| recv_from(borrow(&rx), &mut small)).unwrap().0,
        65507
    );
    assert_eq!(soon(|| recv_from(borrow(&rx), &mut small)).unwrap().0, 2);
    let empty = recv_from(borrow(&rx), &mut small).unwrap_err();
    assert_eq!(empty.kind(), io::ErrorKind::WouldBlock);
}

/// A socket bound transparently to a foreign address sends from that address: the
/// receiver sees the datagram coming from 198.18.0.99:5353, which no interface here has.
/// Without IP_TRANSPARENT the same bind is refused.
#[test]
fn transparent_bind_sends_from_foreign_address() {
    if !privileged() {
        return;
    }
    let foreign = addr("198.18.0.99:5353");
    let plain = socket(&foreign).unwrap();
    let err = bind(borrow(&plain), &foreign).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EADDRNOTAVAIL));

    let reply = bind_transparent(&foreign).unwrap();
    assert_eq!(local_addr(borrow(&reply)).unwrap(), foreign);
    let (rx, to) = bound("127.0.0.1:0");
    send_to(borrow(&reply), b"answer", &to).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = soon(|| recv_from(borrow(&rx), &mut buf)).unwrap();
    assert_eq!((n, from, &buf[..n]), (6, foreign, &b"answer"[..]));
    // Shared by every client: a second one hears from the same socket and address.
    let (rx2, to2) = bound("127.0.0.1:0");
    send_to(borrow(&reply), b"again", &to2).unwrap();
    assert_eq!(
        soon(|| recv_from(borrow(&rx2), &mut buf)).unwrap().1,
        foreign
    );
}

/// The same for IPv6 (IPV6_TRANSPARENT, a foreign 2001:db8:: address).
#[test]
fn transparent_bind_v6() {
    if !privileged() {
        return;
    }
    let foreign = addr("[2001:db8::99]:5353");
    let reply = bind_transparent(&foreign).unwrap();
    let (rx, to) = bound("[::1]:0");
    send_to(borrow(&reply), b"answer6", &to).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = soon(|| recv_from(borrow(&rx), &mut buf)).unwrap();
    assert_eq!((n, from), (7, foreign));
}

/// A connected socket whose peer's port is closed gets ECONNREFUSED once (from the ICMP
/// port unreachable), with EPOLLERR raised until it is read, then nothing.
#[test]
fn connected_socket_reports_refusal_once() {
    let (closed, dead) = bound("127.0.0.1:0");
    drop(closed);
    let (up, _) = bound("127.0.0.1:0");
    assert!(connect(borrow(&up), &dead).unwrap());
    let mut ep = Epoll::new(4).unwrap();
    ep.add(borrow(&up), 7, epoll::IN).unwrap();
    assert_eq!(send(borrow(&up), b"query").unwrap(), 5);
    let mut buf = [0u8; 16];
    let err = soon(|| recv(borrow(&up), &mut buf)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ECONNREFUSED));
    let mut events = Vec::new();
    ep.wait(&mut events, 0).unwrap();
    assert!(
        events.is_empty(),
        "EPOLLERR cleared by the read: {events:?}"
    );
    let again = recv(borrow(&up), &mut buf).unwrap_err();
    assert_eq!(again.kind(), io::ErrorKind::WouldBlock);
}

/// The pending error is raised as EPOLLERR (level-triggered) before it is read.
#[test]
fn connected_refusal_raises_epollerr() {
    let (closed, dead) = bound("127.0.0.1:0");
    drop(closed);
    let (up, _) = bound("127.0.0.1:0");
    connect(borrow(&up), &dead).unwrap();
    let mut ep = Epoll::new(4).unwrap();
    ep.add(borrow(&up), 7, epoll::IN).unwrap();
    send(borrow(&up), b"query").unwrap();
    let mut events = Vec::new();
    for _ in 0..100 {
        ep.wait(&mut events, 10).unwrap();
        if !events.is_empty() {
            break;
        }
    }
    assert_eq!(events.len(), 1);
    assert!(events[0].events & epoll::ERR != 0, "{events:?}");
    // Still raised on the next wait: level-triggered until the error is taken.
    ep.wait(&mut events, 0).unwrap();
    assert_eq!(events.len(), 1);
    let err = crate::sys::socket::take_error(borrow(&up))
        .unwrap()
        .unwrap();
    assert_eq!(err.raw_os_error(), Some(libc::ECONNREFUSED));
    ep.wait(&mut events, 0).unwrap();
    assert!(events.is_empty());
}

/// An unconnected socket hears of a refusal only with IP_RECVERR: then the error queue
/// names the destination that refused, and draining it clears EPOLLERR.
#[test]
fn unconnected_socket_error_queue() {
    let (closed, dead) = bound("127.0.0.1:0");
    drop(closed);
    let (deaf, _) = bound("127.0.0.1:0");
    send_to(borrow(&deaf), b"x", &dead).unwrap();
    let (up, _) = bound("127.0.0.1:0");
    set_recv_err(borrow(&up), false).unwrap();
    send_to(borrow(&up), b"query", &dead).unwrap();
    let mut got = None;
    let allocs = crate::sys::alloc_count::during(|| {
        got = soon(|| recv_error(borrow(&up))?.ok_or(io::ErrorKind::WouldBlock.into())).ok();
    });
    let e = got.unwrap();
    assert_eq!(
        (e.errno, e.dest, allocs),
        (libc::ECONNREFUSED, Some(dead), 0)
    );
    let icmp = (e.origin, e.icmp_type, e.icmp_code);
    assert_eq!(icmp, (libc::SO_EE_ORIGIN_ICMP, 3, 3), "port unreachable");
    assert_eq!(recv_error(borrow(&up)).unwrap(), None);
    let mut ep = Epoll::new(4).unwrap();
    ep.add(borrow(&up), 1, epoll::IN).unwrap();
    let mut events = Vec::new();
    ep.wait(&mut events, 0).unwrap();
    assert!(events.is_empty(), "{events:?}");
    // Without IP_RECVERR the unconnected socket learned nothing.
    assert_eq!(recv_error(borrow(&deaf)).unwrap(), None);
    let mut buf = [0u8; 4];
    let quiet = recv_from(borrow(&deaf), &mut buf).unwrap_err();
    assert_eq!(quiet.kind(), io::ErrorKind::WouldBlock);
}

/// IPv6: ICMPv6 port unreachable arrives as ECONNREFUSED with the IPv6 destination.
#[test]
fn unconnected_socket_error_queue_v6() {
    let (closed, dead) = bound("[::1]:0");
    drop(closed);
    let (up, _) = bound("[::1]:0");
    set_recv_err(borrow(&up), true).unwrap();
    send_to(borrow(&up), b"query", &dead).unwrap();
    let e = soon(|| recv_error(borrow(&up))?.ok_or(io::ErrorKind::WouldBlock.into()));
    let e = e.unwrap();
    assert_eq!((e.errno, e.dest), (libc::ECONNREFUSED, Some(dead)));
    assert_eq!(e.origin, libc::SO_EE_ORIGIN_ICMP6);
}

/// A pending error is returned by the next send too, and that datagram is not sent: with
/// IP_RECVERR an unconnected socket's refusal by one destination fails the next datagram
/// to another, unless the error queue was drained first. The relay counts such a send as a
/// drop and reads the queue on EPOLLERR before sending more.
#[test]
fn pending_error_fails_next_send() {
    let (closed, dead) = bound("127.0.0.1:0");
    drop(closed);
    let (live, to) = bound("127.0.0.1:0");
    let (up, _) = bound("127.0.0.1:0");
    set_recv_err(borrow(&up), false).unwrap();
    send_to(borrow(&up), b"query", &dead).unwrap();
    let mut ep = Epoll::new(4).unwrap();
    ep.add(borrow(&up), 1, epoll::IN).unwrap();
    let mut events = Vec::new();
    ep.wait(&mut events, 1000).unwrap();
    assert!(events.iter().any(|e| e.events & epoll::ERR != 0));
    let err = send_to(borrow(&up), b"lost", &to).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ECONNREFUSED));
    // sk_err is consumed, the queued report is still there, and EPOLLERR with it.
    ep.wait(&mut events, 0).unwrap();
    assert!(events.iter().any(|e| e.events & epoll::ERR != 0));
    assert_eq!(recv_error(borrow(&up)).unwrap().unwrap().dest, Some(dead));
    assert_eq!(send_to(borrow(&up), b"sent", &to).unwrap(), 4);
    let mut buf = [0u8; 8];
    let (n, _) = soon(|| recv_from(borrow(&live), &mut buf)).unwrap();
    assert_eq!(&buf[..n], b"sent", "the failed datagram never left");
}

#[test]
fn canonical_addresses() {
    assert_eq!(
        canonical(addr("[::ffff:198.18.0.1]:53")),
        addr("198.18.0.1:53")
    );
    assert_eq!(
        canonical(addr("[2001:db8::1]:53")),
        addr("[2001:db8::1]:53")
    );
    assert_eq!(canonical(addr("198.18.0.1:53")), addr("198.18.0.1:53"));
}
