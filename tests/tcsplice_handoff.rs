//! The tcsplice handoff end to end, without the ksocks event loop: a small driver in the
//! router namespace accepts a REDIRECT-ed connection, connects upstream with the same MSS,
//! relays a little in userspace, then blocks the flow in BPF, freezes both sockets with
//! `TCP_REPAIR`, installs the two `flows` entries, and leaves the rest to the tc program.
//! Every byte is checked by hash; the program's counters must have seen the bytes and the
//! router sockets' counters must not have moved. Then FIN both ways, and a RST.
mod common;

use common::*;
use ksocks::plane::tcsplice::kernel::Kernel as Program;
use ksocks::plane::tcsplice::map::{self, Flow, FlowKey, Frozen, State, VALUE_SIZE};
use ksocks::sys::netlink::Netlink;
use ksocks::sys::repair::{self, RepairWindow};
use ksocks::sys::{socket, tc};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const PORT: u16 = 7000;
const SERVER_PORT: u16 = 8000;
const DIRECT_PORT: u16 = 8001;
/// The MSS both legs advertise (TCP_MAXSEG on the listener and the upstream socket).
const MSS: u16 = 1400;

/// A router namespace with the program attached at tcx ingress of rc and rs.
struct Router {
    topo: Topology,
    prog: Arc<Program>,
    _links: Vec<OwnedFd>,
    listener: TcpListener,
    server: TcpListener,
}

fn sh(ns: &str, cmd: &str) {
    run_checked(Command::new("ip").args(["netns", "exec", ns, "sh", "-c", cmd])).unwrap();
}

impl Router {
    fn new(fam: Family, gro: bool) -> Option<Router> {
        Router::with(fam, gro, false)
    }

    /// `clsact`: attach with a clsact qdisc + `bpf` filter (kernels < 6.6) instead of tcx.
    fn with(fam: Family, gro: bool, clsact: bool) -> Option<Router> {
        if !require_root() {
            return None;
        }
        let topo = Topology::new(Inbound::Redirect, PORT);
        // Plain forwarding for the comparison port, before the REDIRECT rule.
        sh(
            &topo.router,
            &format!("nft insert rule inet ksocks pre tcp dport {DIRECT_PORT} accept"),
        );
        if gro {
            // The peers send MSS-sized packets (no TSO/GSO: on veth a sender's GSO skb would
            // cross as one), the router's GRO merges them into super-packets
            // (CHECKSUM_PARTIAL, GSO) before the program; fraglist GRO stays off
            // (docs/TCSPLICE.md: it would lose the seq rewrite on all but the head).
            for (ns, dev) in [(&topo.client, "c0"), (&topo.server, "s0")] {
                sh(ns, &format!("ethtool -K {dev} tso off gso off"));
            }
            for dev in ["rc", "rs"] {
                sh(
                    &topo.router,
                    &format!("ethtool -K {dev} gro on rx-gro-list off"),
                );
            }
        }
        let prog = Arc::new(Program::load(64).unwrap_or_else(|e| panic!("load: {e:#}")));
        let p = prog.clone();
        let wild: SocketAddr = match fam {
            Family::V4 => format!("0.0.0.0:{PORT}").parse().unwrap(),
            Family::V6 => format!("[::]:{PORT}").parse().unwrap(),
        };
        let (links, listener) = topo
            .in_router(move || {
                let mut links = Vec::new();
                for dev in [c"rc", c"rs"] {
                    // SAFETY: a NUL-terminated literal.
                    let ifindex = unsafe { libc::if_nametoindex(dev.as_ptr()) };
                    if clsact {
                        let mut nl = Netlink::open(libc::NETLINK_ROUTE).unwrap();
                        nl.add_clsact(ifindex).unwrap();
                        nl.add_bpf_filter(
                            ifindex,
                            true,
                            0xC5,
                            1,
                            p.prog.as_fd(),
                            "ksocks_tcsplice",
                        )
                        .unwrap();
                    } else {
                        links.push(
                            tc::tcx_attach(p.prog.as_fd(), ifindex, tc::BPF_TCX_INGRESS).unwrap(),
                        );
                    }
                }
                let l = TcpListener::bind(wild).unwrap();
                // The MSS clients see in our SYN-ACK, inherited by accepted sockets.
                repair::set_maxseg(l.as_fd(), MSS).unwrap();
                (links, l)
            })
            .join()
            .unwrap();
        let server = topo.server_listener(fam, SERVER_PORT);
        Some(Router {
            topo,
            prog,
            _links: links,
            listener,
            server,
        })
    }

    fn put(&self, key: &FlowKey, flow: &Flow) {
        self.prog
            .flows
            .update(&key.encode().unwrap(), &flow.encode(), 0)
            .unwrap();
    }

    fn get(&self, key: &FlowKey) -> Flow {
        let mut v = [0u8; VALUE_SIZE];
        self.prog
            .flows
            .lookup(&key.encode().unwrap(), &mut v)
            .unwrap();
        Flow::decode(&v, key.src.is_ipv6())
    }

    /// Rewrites only the state of an entry, keeping what the program observed.
    fn set_state(&self, key: &FlowKey, state: State) {
        let f = Flow {
            state,
            ..self.get(key)
        };
        self.put(key, &f);
    }
}

/// One connection through the router: client and server ends, the router's two sockets,
/// the two keys, and each side's byte streams so far.
struct Conn {
    client: TcpStream,
    server: TcpStream,
    ra: TcpStream,
    rb: TcpStream,
    key_a: FlowKey,
    key_b: FlowKey,
    up: Pattern,
    down: Pattern,
    up_check: Verifier,
    down_check: Verifier,
    up_len: u64,
    down_len: u64,
    seed: u64,
}

/// Packets the program dropped for an error, all reasons.
fn errors(p: &Program) -> u64 {
    (0u32..8)
        .map(|i| {
            let mut v = [0u8; 8];
            p.errors.lookup(&i.to_ne_bytes(), &mut v).unwrap();
            u64::from_ne_bytes(v)
        })
        .sum()
}

fn write_pattern(s: &mut TcpStream, p: &mut Pattern, len: usize) {
    let mut buf = vec![0u8; len];
    p.fill(&mut buf);
    s.write_all(&buf).unwrap();
}

fn read_into(s: &mut TcpStream, v: &mut Verifier, len: usize) {
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).unwrap();
    v.update(&buf);
}

/// Copies what `from` has now to `to` (userspace relay, before the handoff).
fn relay(from: &mut TcpStream, to: &mut TcpStream) -> usize {
    from.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n]).unwrap();
        total += n;
    }
    from.set_nonblocking(false).unwrap();
    total
}

fn quiet(s: &TcpStream) -> bool {
    repair::inq(s.as_fd()).unwrap() == 0 && socket::outq(s.as_fd()).unwrap() == 0
}

fn frozen(s: &TcpStream) -> Frozen {
    let (snd_nxt, rcv_nxt) = repair::queue_seqs(s.as_fd()).unwrap();
    let o = repair::options(s.as_fd()).unwrap();
    Frozen {
        local: s.local_addr().unwrap(),
        peer: s.peer_addr().unwrap(),
        snd_nxt,
        rcv_nxt,
        ts_now: repair::ts_clock(s.as_fd()).unwrap(),
        snd_wscale: o.snd_wscale,
        rcv_wscale: o.rcv_wscale,
        timestamps: o.options & repair::TCPI_OPT_TIMESTAMPS != 0,
    }
}

/// Safety net: a zero receive window, so a stray segment reaching a frozen socket is
/// dropped (and answered with a duplicate ACK) instead of being acknowledged.
fn close_window(s: &TcpStream, rcv_nxt: u32) {
    let w = repair::repair_window(s.as_fd()).unwrap();
    let snd_wl1 = if (w.snd_wl1.wrapping_sub(rcv_nxt) as i32) > 0 {
        rcv_nxt
    } else {
        w.snd_wl1
    };
    let zero = RepairWindow {
        rcv_wnd: 0,
        rcv_wup: rcv_nxt,
        snd_wl1,
        ..w
    };
    repair::set_repair_window(s.as_fd(), &zero).unwrap();
}

/// Connects through the router and hands the connection to the program: the handoff state
/// machine of docs/TCSPLICE.md, step by step.
fn handoff(r: &Router, fam: Family, seed: u64) -> Conn {
    let dst = r.topo.server_addr(fam, SERVER_PORT);
    let mut client = r.topo.client_connect(dst).unwrap();
    let listener = r.listener.try_clone().unwrap();
    // Accept, read the original destination, connect upstream with the same MSS.
    let (mut ra, mut rb, orig) = r
        .topo
        .in_router(move || {
            let ra = accept_timeout(&listener, IO_TIMEOUT).unwrap();
            let orig = socket::original_dst(ra.as_fd(), dst.is_ipv6()).unwrap();
            let rb = socket2_connect(orig, MSS);
            (ra, rb, orig)
        })
        .join()
        .unwrap();
    assert_eq!(orig, dst);
    let mut server = accept_timeout(&r.server, IO_TIMEOUT).unwrap();
    let key_a = FlowKey {
        src: ra.peer_addr().unwrap(),
        dst: orig,
    };
    let key_b = FlowKey {
        src: rb.peer_addr().unwrap(),
        dst: rb.local_addr().unwrap(),
    };
    // 1. OBSERVE: the program learns each peer's TSval while userspace relays.
    let observe = Flow::observe;
    r.put(&key_a, &observe(&key_a));
    r.put(&key_b, &observe(&key_b));
    let (mut up, mut down) = (Pattern::new(seed), Pattern::new(seed + 1));
    let (mut up_check, mut down_check) = (Verifier::new(seed), Verifier::new(seed + 1));
    write_pattern(&mut client, &mut up, 4096);
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut moved = 0;
    while moved < 4096 && Instant::now() < deadline {
        moved += relay(&mut ra, &mut rb);
    }
    read_into(&mut server, &mut up_check, 4096);
    write_pattern(&mut server, &mut down, 3000);
    let mut moved = 0;
    while moved < 3000 && Instant::now() < deadline {
        moved += relay(&mut rb, &mut ra);
    }
    read_into(&mut client, &mut down_check, 3000);
    // 2. Quiesce: everything relayed and acknowledged (here the peers pause by design).
    assert!(
        wait_until(Duration::from_secs(5), || quiet(&ra) && quiet(&rb)),
        "not quiet"
    );
    // 3. BLOCK, then data sent now is dropped at ingress and retransmitted after the splice.
    r.set_state(&key_a, State::Block);
    r.set_state(&key_b, State::Block);
    write_pattern(&mut client, &mut up, 1000);
    write_pattern(&mut server, &mut down, 500);
    assert!(wait_until(Duration::from_secs(5), || r
        .get(&key_a)
        .seen
        .dropped
        > 0
        && r.get(&key_b).seen.dropped > 0));
    relay(&mut ra, &mut rb);
    relay(&mut rb, &mut ra);
    assert!(quiet(&ra) && quiet(&rb), "BLOCK let data through");
    // 4. Freeze and read both sockets.
    repair::repair_on(ra.as_fd()).unwrap();
    repair::repair_on(rb.as_fd()).unwrap();
    let (fa, fb) = (frozen(&ra), frozen(&rb));
    assert!(fa.timestamps && fb.timestamps);
    let (sa, sb) = (r.get(&key_a).seen, r.get(&key_b).seen);
    assert!(sa.ts_last.is_some() && sb.ts_last.is_some());
    // 5. Install the rewrite, then check nothing reached the sockets meanwhile.
    close_window(&ra, fa.rcv_nxt);
    close_window(&rb, fb.rcv_nxt);
    for (k, f) in map::splice_entries(&fa, orig, sa, &fb, sb) {
        r.put(&k, &f);
    }
    assert_eq!(
        repair::queue_seqs(ra.as_fd()).unwrap(),
        (fa.snd_nxt, fa.rcv_nxt)
    );
    assert_eq!(
        repair::queue_seqs(rb.as_fd()).unwrap(),
        (fb.snd_nxt, fb.rcv_nxt)
    );
    Conn {
        client,
        server,
        ra,
        rb,
        key_a,
        key_b,
        up,
        down,
        up_check,
        down_check,
        up_len: 5096,
        down_len: 3500,
        seed,
    }
}

/// A blocking TCP connection to `to` whose SYN advertises `mss` (must run in the router ns).
fn socket2_connect(to: SocketAddr, mss: u16) -> TcpStream {
    let fd = socket::tcp_socket(&to).unwrap();
    repair::set_maxseg(fd.as_fd(), mss).unwrap();
    let _ = socket::connect(fd.as_fd(), &to);
    let s = TcpStream::from(fd);
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&s),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    assert_eq!(
        unsafe { libc::poll(&mut pfd, 1, 5000) },
        1,
        "upstream connect timed out"
    );
    assert!(socket::take_error(s.as_fd()).unwrap().is_none());
    s.set_nonblocking(false).unwrap();
    with_timeouts(&s, IO_TIMEOUT);
    s
}

/// Sends `len` more bytes of `p` then shuts down; returns the elapsed time.
fn sender(mut s: TcpStream, mut p: Pattern, len: u64) -> thread::JoinHandle<Duration> {
    thread::spawn(move || {
        let t = Instant::now();
        let mut buf = vec![0u8; 256 * 1024];
        let mut left = len;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            p.fill(&mut buf[..k]);
            s.write_all(&buf[..k]).unwrap();
            left -= k as u64;
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        t.elapsed()
    })
}

/// Reads until EOF into `v`.
fn receiver(mut s: TcpStream, mut v: Verifier) -> thread::JoinHandle<Verifier> {
    thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match read_some(&mut s, &mut buf) {
                Ok(0) => return v,
                Ok(n) => v.update(&buf[..n]),
                Err(e) => panic!("read after {} bytes: {e}", v.len()),
            }
        }
    })
}

/// Moves `up` and `down` bytes at once, both ends shut down; checks every byte and the FINs.
fn bulk(r: &Router, c: Conn, up: u64, down: u64) -> (Duration, map::Seen) {
    let before = (
        socket::tcp_bytes(c.ra.as_fd()).unwrap(),
        socket::tcp_bytes(c.rb.as_fd()).unwrap(),
    );
    let t = Instant::now();
    let s1 = sender(c.client.try_clone().unwrap(), c.up, up);
    let s2 = sender(c.server.try_clone().unwrap(), c.down, down);
    let r1 = receiver(c.server.try_clone().unwrap(), c.up_check);
    let r2 = receiver(c.client.try_clone().unwrap(), c.down_check);
    let (up_t, _) = (join(s1), join(s2));
    let (got_up, got_down) = (join(r1), join(r2));
    let elapsed = t.elapsed().max(up_t);
    let (up_total, down_total) = (c.up_len + up, c.down_len + down);
    Digest::of_pattern(c.seed, up_total).assert_received(&got_up.digest(), "client -> server");
    Digest::of_pattern(c.seed + 1, down_total)
        .assert_received(&got_down.digest(), "server -> client");
    // The program carried the bytes; the router's sockets did not.
    let (fa, fb) = (r.get(&c.key_a).seen, r.get(&c.key_b).seen);
    assert!(fa.bytes >= up + 1000, "program saw {} bytes up", fa.bytes);
    assert!(
        fb.bytes >= down + 500,
        "program saw {} bytes down",
        fb.bytes
    );
    assert!(fa.fin && fb.fin, "FIN seen both ways");
    let after = (
        socket::tcp_bytes(c.ra.as_fd()).unwrap(),
        socket::tcp_bytes(c.rb.as_fd()).unwrap(),
    );
    assert_eq!(before, after, "the router's sockets moved bytes");
    assert_eq!(errors(&r.prog), 0, "program errors");
    drop((c.ra, c.rb)); // repair mode: silent
                        // The spliced packets bypassed conntrack: delete both entries by their original tuple
                        // (client -> original destination; router -> server); a second delete finds nothing.
    let (a, b) = (c.key_a, c.key_b);
    r.topo
        .in_router(move || {
            let mut nl = Netlink::open(libc::NETLINK_NETFILTER).unwrap();
            for (src, dst) in [(a.src, a.dst), (b.dst, b.src)] {
                nl.ct_delete(src, dst)
                    .unwrap_or_else(|e| panic!("{src} -> {dst}: {e}"));
                let again = nl.ct_delete(src, dst).unwrap_err();
                assert_eq!(again.raw_os_error(), Some(libc::ENOENT));
            }
        })
        .join()
        .unwrap();
    r.prog.flows.delete(&c.key_a.encode().unwrap()).unwrap();
    r.prog.flows.delete(&c.key_b.encode().unwrap()).unwrap();
    eprintln!(
        "client -> server: {} packets, {} bytes ({} per packet); dropped {}",
        fa.packets,
        fa.bytes,
        fa.bytes / fa.packets.max(1),
        fa.dropped
    );
    (elapsed, fa)
}

/// IPv4 and IPv6: 64 MiB up and 16 MiB down at once through the program only, every byte
/// checked, FIN both ways.
#[test]
fn bulk_both_ways_then_fin() {
    for fam in [Family::V4, Family::V6] {
        let Some(r) = Router::new(fam, false) else {
            return;
        };
        let c = handoff(&r, fam, 10);
        bulk(&r, c, 64 << 20, 16 << 20);
    }
}

/// The same with MSS-sized packets on the wire and GRO in the router: the program sees GRO
/// super-packets (CHECKSUM_PARTIAL) and they are segmented again on the way out. (Without
/// this, veth hands the sender's GSO skbs across whole: also super-packets, not from GRO.)
#[test]
fn bulk_with_gro() {
    let Some(r) = Router::new(Family::V4, true) else {
        return;
    };
    let c = handoff(&r, Family::V4, 20);
    let (_, seen) = bulk(&r, c, 64 << 20, 16 << 20);
    assert!(
        seen.bytes / seen.packets > u64::from(MSS),
        "no GRO super-packets reached the program: {seen:?}"
    );
}

/// The same through a clsact qdisc and a direct-action `bpf` filter (kernels before 6.6).
#[test]
fn bulk_through_clsact() {
    let Some(r) = Router::with(Family::V4, false, true) else {
        return;
    };
    let c = handoff(&r, Family::V4, 50);
    bulk(&r, c, 16 << 20, 16 << 20);
}

/// A client's RST crosses the splice: the server's read fails with ECONNRESET.
#[test]
fn reset_crosses_the_splice() {
    let Some(r) = Router::new(Family::V4, false) else {
        return;
    };
    let mut c = handoff(&r, Family::V4, 30);
    // Some bytes first, so the reset comes mid-stream.
    write_pattern(&mut c.client, &mut c.up, 10_000);
    read_into(&mut c.server, &mut c.up_check, 11_000); // + the 1000 retransmitted from BLOCK
    set_linger_zero(&c.client);
    drop(c.client);
    let mut buf = [0u8; 16];
    let err = c.server.read(&mut buf).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert!(r.get(&c.key_a).seen.rst, "RST seen by the program");
    assert_eq!(errors(&r.prog), 0);
}

/// Informative: one spliced stream against plain forwarding through the same router, same
/// run; once with the peers' TSO (veth passes their GSO skbs whole), once with MSS-sized
/// packets and router GRO. `cargo test --release --test tcsplice_handoff -- --ignored
/// --nocapture`.
#[test]
#[ignore]
fn throughput_vs_forwarding() {
    for gro in [false, true] {
        let Some(r) = Router::new(Family::V4, gro) else {
            return;
        };
        let size = 1u64 << 30;
        let direct = {
            let l = r.topo.server_listener(Family::V4, DIRECT_PORT);
            let to = r.topo.server_addr(Family::V4, DIRECT_PORT);
            let client = r.topo.client_connect(to).unwrap();
            let server = accept_timeout(&l, IO_TIMEOUT).unwrap();
            let t = Instant::now();
            let rx = receiver(server, Verifier::new(5));
            let tx = sender(client, Pattern::new(5), size);
            join(tx);
            let got = join(rx);
            Digest::of_pattern(5, size).assert_received(&got.digest(), "direct");
            t.elapsed()
        };
        let c = handoff(&r, Family::V4, 40);
        let (spliced, _) = bulk(&r, c, size, 0);
        let gbit = |d: Duration| size as f64 * 8.0 / d.as_secs_f64() / 1e9;
        eprintln!(
            "1 GiB, {}: forwarding {:.2} s ({:.1} Gbit/s), tcsplice {:.2} s ({:.1} Gbit/s), ratio {:.2}",
            if gro { "MSS packets + router GRO" } else { "peers' TSO" },
            direct.as_secs_f64(),
            gbit(direct),
            spliced.as_secs_f64(),
            gbit(spliced),
            gbit(spliced) / gbit(direct)
        );
    }
}
