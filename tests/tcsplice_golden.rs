//! Golden packets through the real bpf/tcsplice.bpf.c with `BPF_PROG_TEST_RUN`, inside a
//! router namespace whose FIB and neighbours are known: every rewritten field is compared
//! with the value computed here, and both checksums are recomputed from scratch (and, with
//! `BPF_F_TEST_SKB_CHECKSUM_COMPLETE`, the kernel checks the skb's running sum as well).
mod common;

use common::*;
use ksocks::plane::tcsplice::kernel::Kernel as Program;
use ksocks::plane::tcsplice::map::{Flow, FlowKey, Seen, State};
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

/// One's-complement sum of `data` (big-endian 16-bit words) added to `sum`.
fn sum16(mut sum: u32, data: &[u8]) -> u32 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP segment to build: header fields, raw option bytes, payload.
#[derive(Clone)]
struct Seg {
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    ack: u32,
    flags: u8,
    win: u16,
    opts: Vec<u8>,
    payload: Vec<u8>,
}

const ACK: u8 = 0x10;
const FIN: u8 = 0x01;
const PSH: u8 = 0x08;

impl Seg {
    fn new(src: SocketAddr, dst: SocketAddr) -> Seg {
        Seg {
            src,
            dst,
            seq: 1000,
            ack: 2000,
            flags: ACK,
            win: 512,
            opts: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// Ethernet + IP + TCP with correct checksums.
    fn frame(&self, eth_dst: [u8; 6], eth_src: [u8; 6]) -> Vec<u8> {
        assert_eq!(self.opts.len() % 4, 0);
        let mut t = Vec::new();
        t.extend(self.src.port().to_be_bytes());
        t.extend(self.dst.port().to_be_bytes());
        t.extend(self.seq.to_be_bytes());
        t.extend(self.ack.to_be_bytes());
        t.push((((20 + self.opts.len()) / 4) << 4) as u8);
        t.push(self.flags);
        t.extend(self.win.to_be_bytes());
        t.extend([0, 0, 0, 0]);
        t.extend(&self.opts);
        t.extend(&self.payload);
        let mut f = Vec::new();
        f.extend(eth_dst);
        f.extend(eth_src);
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend([0x08, 0x00, 0x45, 0]);
                f.extend(((20 + t.len()) as u16).to_be_bytes());
                f.extend([0x12, 0x34, 0x40, 0, 64, 6, 0, 0]);
                f.extend(s.octets());
                f.extend(d.octets());
                let c = fold(sum16(0, &f[14..34]));
                f[24..26].copy_from_slice(&c.to_be_bytes());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend([0x86, 0xdd, 0x60, 0, 0, 0]);
                f.extend((t.len() as u16).to_be_bytes());
                f.extend([6, 64]);
                f.extend(s.octets());
                f.extend(d.octets());
            }
            _ => unreachable!(),
        }
        let l4 = f.len();
        f.extend(t);
        let c = tcp_sum(&f, l4);
        f[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        f
    }
}

/// The TCP checksum of the segment at `l4` in `frame`, with its check field taken as zero.
fn tcp_sum(frame: &[u8], l4: usize) -> u16 {
    let v6 = frame[12] == 0x86;
    let seg = &frame[l4..];
    let mut s = if v6 {
        sum16(0, &frame[22..54])
    } else {
        sum16(0, &frame[26..34])
    };
    s += 6 + seg.len() as u32;
    s = sum16(s, &seg[..16]);
    s = sum16(s, &seg[18..]);
    fold(s)
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
