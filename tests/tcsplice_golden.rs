//! Golden packets through the real bpf/tcsplice.bpf.c with `BPF_PROG_TEST_RUN`, inside a
//! router namespace whose FIB and neighbours are known: every rewritten field is compared
//! with the value computed here, and both checksums are recomputed from scratch (and, with
//! `BPF_F_TEST_SKB_CHECKSUM_COMPLETE`, the kernel checks the skb's running sum as well).
mod common;

use common::frame::*;
use common::*;
use ksocks::plane::tcsplice::kernel::Kernel as Program;
use ksocks::plane::tcsplice::map::{Flow, FlowKey, Seen, State, UNKNOWN_WINDOW};
use ksocks::sys::tc::{self, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::process::Command;

const RS_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
const SERVER_MAC: [u8; 6] = [2, 0, 0, 0, 2, 2];
const RC_MAC: [u8; 6] = [2, 0, 0, 0, 3, 3];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 4, 4];

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Both checksums of a frame are right.
fn assert_checksums(frame: &[u8]) {
    let v6 = frame[12] == 0x86;
    let l4 = if v6 { 54 } else { 34 };
    if !v6 {
        assert_eq!(fold(sum16(0, &frame[14..34])), 0, "IPv4 header checksum");
    }
    let got = u16::from_be_bytes([frame[l4 + 16], frame[l4 + 17]]);
    assert_eq!(got, tcp_sum(frame, l4), "TCP checksum");
}

/// The router namespace of a topology with fixed MACs and permanent neighbours, and the
/// program loaded.
struct Bench {
    topo: Topology,
    prog: Program,
    rc: u32,
}

fn ip_in(ns: &str, args: &[&str]) {
    run_checked(Command::new("ip").arg("-n").arg(ns).args(args)).unwrap();
}

impl Bench {
    fn new() -> Option<Bench> {
        if !require_root() {
            return None;
        }
        let topo = Topology::new(Inbound::Redirect, 1);
        let r = topo.router.clone();
        ip_in(&r, &["link", "set", "rs", "address", &mac(RS_MAC)]);
        ip_in(&r, &["link", "set", "rc", "address", &mac(RC_MAC)]);
        for (fam, dev, m) in [
            (Family::V4, "rs", SERVER_MAC),
            (Family::V6, "rs", SERVER_MAC),
        ] {
            let ip = topo.server_ip(fam).to_string();
            ip_in(
                &r,
                &[
                    "neigh",
                    "replace",
                    &ip,
                    "lladdr",
                    &mac(m),
                    "dev",
                    dev,
                    "nud",
                    "permanent",
                ],
            );
        }
        for fam in [Family::V4, Family::V6] {
            let ip = topo.client_ip(fam).to_string();
            ip_in(
                &r,
                &[
                    "neigh",
                    "replace",
                    &ip,
                    "lladdr",
                    &mac(CLIENT_MAC),
                    "dev",
                    "rc",
                    "nud",
                    "permanent",
                ],
            );
        }
        let prog = Program::load(64).unwrap_or_else(|e| panic!("load: {e:#}"));
        let rc = topo
            .in_router(|| {
                // SAFETY: a NUL-terminated literal.
                unsafe { libc::if_nametoindex(c"rc".as_ptr()) }
            })
            .join()
            .unwrap();
        assert!(rc > 1);
        Some(Bench { topo, prog, rc })
    }

    /// Runs the program on `frame` as if it arrived on rc, in the router namespace.
    fn run(&self, frame: &[u8], flags: u32) -> (i32, Vec<u8>) {
        let mut ctx = [0u8; 44];
        ctx[36..40].copy_from_slice(&self.rc.to_ne_bytes()); // ingress_ifindex
        ctx[40..44].copy_from_slice(&self.rc.to_ne_bytes()); // ifindex: the arrival device
        let prog = self.prog.prog.try_clone().unwrap();
        let frame = frame.to_vec();
        let r = self
            .topo
            .in_router(move || tc::prog_test_run(prog.as_fd(), &frame, &ctx, flags))
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}"));
        (r.retval, r.data)
    }

    fn put(&self, key: &FlowKey, flow: &Flow) {
        let k = key.encode().unwrap();
        self.prog.flows.update(&k, &flow.encode(), 0).unwrap();
    }

    fn get(&self, key: &FlowKey) -> Flow {
        let mut v = [0u8; ksocks::plane::tcsplice::map::VALUE_SIZE];
        self.prog
            .flows
            .lookup(&key.encode().unwrap(), &mut v)
            .unwrap();
        Flow::decode(&v, key.src.is_ipv6())
    }

    fn errors(&self, i: u32) -> u64 {
        let mut v = [0u8; 8];
        self.prog.errors.lookup(&i.to_ne_bytes(), &mut v).unwrap();
        u64::from_ne_bytes(v)
    }

    /// (client -> server as the client sees it) and the rewrite to (router -> server).
    fn flow(&self, fam: Family, state: State) -> (FlowKey, Flow) {
        let t = &self.topo;
        // A client address whose checksum delta to the router's is not zero (::2 -> ::1
        // with :1: -> :2: would cancel out and hide a pseudo-header mistake).
        let client: IpAddr = match fam {
            Family::V4 => format!("198.18.{}.7", t.n).parse().unwrap(),
            Family::V6 => format!("2001:db8:{:x}:1::7", t.n).parse().unwrap(),
        };
        let client = SocketAddr::new(client, 40000);
        let server = t.server_addr(fam, 443);
        let router_out: IpAddr = match fam {
            Family::V4 => format!("198.19.{}.1", t.n).parse().unwrap(),
            Family::V6 => format!("2001:db8:{:x}:2::1", t.n).parse().unwrap(),
        };
        let router_out = SocketAddr::new(router_out, 50000);
        let key = FlowKey {
            src: client,
            dst: server,
        };
        let flow = Flow {
            src: router_out,
            dst: server,
            state,
            ws_in: 7,
            ws_out: 9,
            seq_add: 0x200,
            ack_add: 0xffff_fff0,
            tsval_add: 1_000_000,
            tsecr_add: 0u32.wrapping_sub(5000),
            seen: Seen::default(),
        };
        (key, flow)
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// NOP NOP TS, then NOP NOP SACK with two blocks: Linux's layout.
fn linux_opts(tsval: u32, tsecr: u32, sack: &[(u32, u32)]) -> Vec<u8> {
    let mut o = vec![1, 1, 8, 10];
    o.extend(tsval.to_be_bytes());
    o.extend(tsecr.to_be_bytes());
    if !sack.is_empty() {
        o.extend([1, 1, 5, 2 + 8 * sack.len() as u8]);
        for (l, r) in sack {
            o.extend(l.to_be_bytes());
            o.extend(r.to_be_bytes());
        }
    }
    o
}

/// Every field of a spliced IPv4 and IPv6 segment: addresses, ports, seq wrapping past
/// 2^32, ack and SACK edges wrapping back, TSval/TSecr, the window rescaled, MACs from the
/// FIB's neighbour, both checksums; once with the kernel checking CHECKSUM_COMPLETE too.
#[test]
fn splice_rewrites_every_field() {
    let Some(b) = Bench::new() else { return };
    for fam in [Family::V4, Family::V6] {
        for flags in [0, tc::BPF_F_TEST_SKB_CHECKSUM_COMPLETE] {
            let (key, mut flow) = b.flow(fam, State::Splice);
            // Userspace seeds the books with the frozen socket's rcv_nxt and snd_nxt.
            flow.seen.seq_hi = 0xffff_ff80;
            flow.seen.ack_last = 1;
            b.put(&key, &flow);
            let mut s = Seg::new(key.src, key.dst);
            s.seq = 0xffff_ff80; // + 0x200 wraps to 0x180
            s.ack = 0x0000_0008; // + 0xfffffff0 wraps to 0xfffffff8
            s.flags = ACK | PSH;
            s.win = 1000; // (1000 << 7) >> 9 = 250
            s.opts = linux_opts(77, 9000, &[(0x10, 0x20), (0xfffffff0, 0x5)]);
            s.payload = (0..1000u32).map(|i| (i * 7) as u8).collect();
            let (ret, out) = b.run(&s.frame(RC_MAC, CLIENT_MAC), flags);
            assert_eq!(ret, TC_ACT_REDIRECT, "{fam:?}");
            assert_eq!(&out[..6], &SERVER_MAC, "destination MAC from the neighbour");
            assert_eq!(&out[6..12], &RS_MAC, "source MAC of the egress device");
            let mut want = s.clone();
            want.src = flow.src;
            want.dst = flow.dst;
            want.seq = 0x180;
            want.ack = 0xffff_fff8;
            want.win = 250;
            want.opts = linux_opts(1_000_077, 4000, &[(0x0, 0x10), (0xffff_ffe0, 0xffff_fff5)]);
            let expect = want.frame(SERVER_MAC, RS_MAC);
            assert_checksums(&out);
            // The IPv4 header is equal except the checksum it already passed.
            assert_eq!(out, expect, "{fam:?} flags {flags}");
            let seen = b.get(&key).seen;
            assert_eq!((seen.ts_last, seen.bytes), (Some(77), 1000));
            // The books: seq_hi past the payload (across 2^32), the sender's own last ack.
            assert_eq!((seen.seq_hi, seen.ack_last), (0x368, 8));
            assert_eq!(seen.moved(0xffff_ff80), 1000);
            // A retransmission of the same bytes moves nothing.
            let (ret, _) = b.run(&s.frame(RC_MAC, CLIENT_MAC), flags);
            assert_eq!(ret, TC_ACT_REDIRECT);
            assert_eq!(b.get(&key).seen.moved(0xffff_ff80), 1000, "counted once");
            b.prog.flows.delete(&key.encode().unwrap()).unwrap();
        }
    }
}

/// Window scaling both ways and the 65535 clamp; a TSecr of 0 stays 0 (it means "no echo").
#[test]
fn window_scale_and_clamp() {
    let Some(b) = Bench::new() else { return };
    let (key, mut flow) = b.flow(Family::V4, State::Splice);
    for (ws_in, ws_out, win, want) in [
        (0, 7, 1000, 7),
        (14, 0, 65535, 65535),
        (2, 0, 20000, 65535),
        (7, 7, 1234, 1234),
        (0, 0, 0, 0),
    ] {
        flow.ws_in = ws_in;
        flow.ws_out = ws_out;
        b.put(&key, &flow);
        let mut s = Seg::new(key.src, key.dst);
        s.win = win;
        s.opts = linux_opts(5, 0, &[]);
        let (ret, out) = b.run(&s.frame(RC_MAC, CLIENT_MAC), 0);
        assert_eq!(ret, TC_ACT_REDIRECT);
        assert_checksums(&out);
        assert_eq!(
            u16::from_be_bytes([out[48], out[49]]),
            want,
            "{ws_in} {ws_out} {win}"
        );
        assert_eq!(be32(&out, 58), 1_000_005, "TSval");
        assert_eq!(be32(&out, 62), 0, "TSecr 0 is not translated");
    }
}

/// Options in another order and with odd padding are found; a malformed list is dropped.
#[test]
fn option_layouts() {
    let Some(b) = Bench::new() else { return };
    let (key, flow) = b.flow(Family::V6, State::Splice);
    b.put(&key, &flow);
    // TS first at offset 20, then NOP, SACK (one block) at 31, then EOL padding.
    let mut o = vec![8, 10];
    o.extend(10u32.to_be_bytes());
    o.extend(20u32.to_be_bytes());
    o.extend([1, 5, 10]);
    o.extend(100u32.to_be_bytes());
    o.extend(200u32.to_be_bytes());
    o.extend([0, 0, 0]);
    let mut s = Seg::new(key.src, key.dst);
    s.opts = o;
    let (ret, out) = b.run(&s.frame(RC_MAC, CLIENT_MAC), 0);
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_checksums(&out);
    let opt = 54 + 20;
    assert_eq!(be32(&out, opt + 2), 1_000_010);
    assert_eq!(be32(&out, opt + 6), 20u32.wrapping_add(flow.tsecr_add));
    assert_eq!(be32(&out, opt + 13), 100u32.wrapping_add(flow.ack_add));
    assert_eq!(be32(&out, opt + 17), 200u32.wrapping_add(flow.ack_add));
    // An option whose length runs past the header: TS/SACK cannot be found, so drop.
    s.opts = vec![1, 1, 8, 30];
    let before = b.errors(6);
    let (ret, _) = b.run(&s.frame(RC_MAC, CLIENT_MAC), 0);
    assert_eq!(ret, TC_ACT_SHOT);
    assert_eq!(b.errors(6), before + 1, "ERR_OPTIONS counted");
}

/// A packet of no flow passes untouched; BLOCK drops payload and FIN, passes pure ACKs;
/// OBSERVE passes everything and records the TSval; counters count.
#[test]
fn unowned_block_and_observe() {
    let Some(b) = Bench::new() else { return };
    for fam in [Family::V4, Family::V6] {
        let (key, flow) = b.flow(fam, State::Block);
        let mut s = Seg::new(key.src, key.dst);
        s.opts = linux_opts(123, 456, &[]);
        s.payload = vec![1; 100];
        let frame = s.frame(RC_MAC, CLIENT_MAC);
        let (ret, out) = b.run(&frame, 0);
        assert_eq!((ret, &out), (TC_ACT_UNSPEC, &frame), "not owned: untouched");

        b.put(&key, &flow);
        assert_eq!(b.run(&frame, 0).0, TC_ACT_SHOT, "payload blocked");
        let mut fin = s.clone();
        fin.payload.clear();
        fin.flags = ACK | FIN;
        assert_eq!(
            b.run(&fin.frame(RC_MAC, CLIENT_MAC), 0).0,
            TC_ACT_SHOT,
            "FIN blocked"
        );
        let mut pure = s.clone();
        pure.payload.clear();
        pure.opts = linux_opts(124, 456, &[(1, 2)]);
        let pure = pure.frame(RC_MAC, CLIENT_MAC);
        let (ret, out) = b.run(&pure, 0);
        assert_eq!(
            (ret, &out),
            (TC_ACT_UNSPEC, &pure),
            "pure ACK passes untouched, to the next filter"
        );
        let seen = b.get(&key).seen;
        // Bytes count only what a splice moved.
        assert_eq!((seen.packets, seen.dropped, seen.bytes), (3, 2, 0));
        assert_eq!((seen.ts_last, seen.fin, seen.rst), (Some(124), true, false));

        let observe = Flow {
            state: State::Observe,
            ..flow
        };
        b.put(&key, &observe);
        let (ret, out) = b.run(&frame, 0);
        assert_eq!(
            (ret, &out),
            (TC_ACT_UNSPEC, &frame),
            "OBSERVE passes payload, to the next filter"
        );
        assert_eq!(b.get(&key).seen.ts_last, Some(123));
        b.prog.flows.delete(&key.encode().unwrap()).unwrap();
    }
}

/// A RST on a spliced flow ends it only inside the window its receiver last advertised, which
/// the other leg's entry records (its last ACK and window; userspace seeds the window with
/// `UNKNOWN_WINDOW` until the receiver's first ACK): a blind RST a byte outside is dropped and
/// counted, and the entry keeps `rst` clear; one on either edge is forwarded and recorded. The
/// receiver's ACK through the splice moves the window the next RST is checked against.
#[test]
fn resets_count_only_inside_the_window() {
    let Some(b) = Bench::new() else { return };
    let mut blind = 0;
    for fam in [Family::V4, Family::V6] {
        let (key, flow) = b.flow(fam, State::Splice);
        // The server's leg: from the server to the router's upstream address, rewritten to
        // the client; the server scales its windows by 2^5.
        let peer_key = FlowKey {
            src: flow.dst,
            dst: flow.src,
        };
        let peer = Flow {
            src: key.dst,
            dst: key.src,
            state: State::Splice,
            ws_in: 5,
            ws_out: 7,
            seq_add: 0x300,
            ack_add: 0u32.wrapping_sub(0x200),
            tsval_add: 0,
            tsecr_add: 0,
            seen: Seen {
                ack_last: 0x100, // the server expects byte 0x100 (B's numbering) next
                win_last: 100,   // 100 << 5 = 3,200 bytes
                ..Seen::default()
            },
        };
        // (window's peer entry, RST seq in the client's numbering, believed). The client's
        // numbering is B's minus the client leg's seq_add (0x200).
        let edge = 0x100u32.wrapping_sub(0x200);
        let mut cases = vec![
            (peer, edge, true),
            (peer, edge.wrapping_add(3200), true),
            (peer, edge.wrapping_add(3201), false),
            (peer, edge.wrapping_sub(1), false),
            (peer, edge.wrapping_add(0x8000_0000), false),
        ];
        let unknown = Flow {
            seen: Seen {
                win_last: UNKNOWN_WINDOW,
                ..peer.seen
            },
            ..peer
        };
        cases.push((unknown, edge.wrapping_add(65535 << 5), true));
        cases.push((unknown, edge.wrapping_add((65535 << 5) + 1), false));

        // An ACK from the server through the splice moves its window: 0x1100, 10 << 5.
        b.put(&peer_key, &peer);
        let mut ack = Seg::new(peer_key.src, peer_key.dst);
        ack.seq = 7;
        ack.ack = 0x1100;
        ack.win = 10;
        let (ret, _) = b.run(&ack.frame(RS_MAC, SERVER_MAC), 0);
        assert_eq!(ret, TC_ACT_REDIRECT, "{fam:?} the server's ACK");
        let seen = b.get(&peer_key).seen;
        assert_eq!((seen.ack_last, seen.win_last), (0x1100, 10));
        let acked = Flow { seen, ..peer };
        let edge2 = 0x1100u32.wrapping_sub(0x200);
        cases.push((acked, edge2.wrapping_add(320), true));
        cases.push((acked, edge2.wrapping_add(321), false));
        cases.push((acked, edge.wrapping_add(3200), false)); // the old window's edge

        for (i, (peer, seq, believed)) in cases.into_iter().enumerate() {
            b.put(&key, &flow);
            b.put(&peer_key, &peer);
            let mut s = Seg::new(key.src, key.dst);
            s.seq = seq;
            s.flags = RST | ACK;
            let (ret, out) = b.run(&s.frame(RC_MAC, CLIENT_MAC), 0);
            let rst = b.get(&key).seen.rst;
            if believed {
                assert_eq!((ret, rst), (TC_ACT_REDIRECT, true), "{fam:?} case {i}");
                assert_eq!(be32(&out, out.len() - 16), seq.wrapping_add(0x200));
                assert_checksums(&out);
            } else {
                assert_eq!((ret, rst), (TC_ACT_SHOT, false), "{fam:?} case {i}");
                blind += 1;
            }
        }
        b.prog.flows.delete(&key.encode().unwrap()).unwrap();
        b.prog.flows.delete(&peer_key.encode().unwrap()).unwrap();
    }
    assert_eq!(b.errors(7), blind, "blind resets counted as ERR_RST");
}
