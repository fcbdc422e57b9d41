//! The `flows` map of bpf/tcsplice.bpf.c as bytes, and the handoff arithmetic that fills it
//! (docs/TCSPLICE.md, "Rewrite arithmetic").
//!
//! Invariant: [`FlowKey::encode`] and [`Flow::encode`]/[`Flow::decode`] produce exactly the
//! C structs `flow_key` and `flow` (addresses and ports in network order, every other field
//! in host order), so one map entry means the same thing on both sides on every target.

use std::net::{IpAddr, SocketAddr};

/// `sizeof(struct flow_key)`.
pub const KEY_SIZE: usize = 40;
/// `sizeof(struct flow)`.
pub const VALUE_SIZE: usize = 112;

/// What the program does with a flow's packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Pass everything, record the sender's TSval.
    Observe = 0,
    /// Drop segments with payload, SYN or FIN; pass pure ACKs.
    Block = 1,
    /// Rewrite and redirect.
    Splice = 2,
}

/// A flow's 4-tuple as its packets arrive at tc ingress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowKey {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    let mut out = [0; 16];
    match ip {
        IpAddr::V4(a) => out[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => out = a.octets(),
    }
    out
}

impl FlowKey {
    /// `None` for a cross-family pair, which the program never sees as one flow.
    pub fn encode(&self) -> Option<[u8; KEY_SIZE]> {
        let family = match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(_), IpAddr::V4(_)) => 4,
            (IpAddr::V6(_), IpAddr::V6(_)) => 6,
            _ => return None,
        };
        let mut k = [0; KEY_SIZE];
        k[..16].copy_from_slice(&ip_bytes(self.src.ip()));
        k[16..32].copy_from_slice(&ip_bytes(self.dst.ip()));
        k[32..34].copy_from_slice(&self.src.port().to_be_bytes());
        k[34..36].copy_from_slice(&self.dst.port().to_be_bytes());
        k[36] = family;
        Some(k)
    }
}

/// One direction's map value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// Source and destination after the rewrite.
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub state: State,
    /// Window scale of the arriving packets (the sender's), and of the leg they leave on
    /// (the scale the receiver applies to them).
    pub ws_in: u8,
    pub ws_out: u8,
    /// Added (mod 2^32) to seq; to ack and every SACK edge; to TSval; to a non-zero TSecr.
    pub seq_add: u32,
    pub ack_add: u32,
    pub tsval_add: u32,
    pub tsecr_add: u32,
    /// Observed by the program.
    pub seen: Seen,
}

/// What the program records about a flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// Seeded by userspace when it writes SPLICE, advanced by the program from then on:
    /// the end of the highest payload the sender sent, and its last acknowledgement, both
    /// in the sender's own numbering (untranslated).
    pub seq_hi: u32,
    pub ack_last: u32,
    /// The last TSval the sender put on a packet, if any packet carried one.
    pub ts_last: Option<u32>,
    pub fin: bool,
    pub rst: bool,
    /// Packets seen in any state; in SPLICE, payload bytes past `seq_hi` (each byte once);
    /// packets dropped (BLOCK or error).
    pub packets: u64,
    pub bytes: u64,
    pub dropped: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last packet.
    pub last_ns: u64,
    /// Seeded by userspace when it writes SPLICE, then written by the program: the sender's
    /// last window field, unscaled. A RST from the other leg counts only inside this window
    /// past `ack_last` (a blind reset is dropped).
    pub win_last: u16,
}

impl Seen {
    /// Bytes the sender moved through the splice since userspace seeded `seq_hi` with
    /// `seed`: the program's 64-bit count with its low 32 bits taken from `seq_hi`, which
    /// stays exact where two CPUs racing on one flow made the count run ahead.
    pub fn moved(&self, seed: u32) -> u64 {
        let exact = self.seq_hi.wrapping_sub(seed);
        let off = exact.wrapping_sub(self.bytes as u32) as i32;
        self.bytes.wrapping_add_signed(i64::from(off))
    }
}

fn u32_at(b: &[u8; VALUE_SIZE], at: usize) -> u32 {
    let mut w = [0; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_ne_bytes(w)
}

fn u64_at(b: &[u8; VALUE_SIZE], at: usize) -> u64 {
    let mut w = [0; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(w)
}

fn addr_at(b: &[u8; VALUE_SIZE], at: usize, port_at: usize, v6: bool) -> SocketAddr {
    let port = u16::from_be_bytes([b[port_at], b[port_at + 1]]);
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    let ip: IpAddr = match v6 {
        true => a.into(),
        false => [a[0], a[1], a[2], a[3]].into(),
    };
    SocketAddr::new(ip, port)
}

impl Flow {
    /// The OBSERVE entry for packets with `key`: nothing rewritten, only the peer's
    /// timestamps and counters recorded.
    pub fn observe(key: &FlowKey) -> Flow {
        Flow {
            src: key.dst,
            dst: key.src,
            state: State::Observe,
            ws_in: 0,
            ws_out: 0,
            seq_add: 0,
            ack_add: 0,
            tsval_add: 0,
            tsecr_add: 0,
            seen: Seen::default(),
        }
    }

    /// The value bytes, observations included (a read-modify-write keeps them).
    pub fn encode(&self) -> [u8; VALUE_SIZE] {
        let mut v = [0; VALUE_SIZE];
        v[..16].copy_from_slice(&ip_bytes(self.src.ip()));
        v[16..32].copy_from_slice(&ip_bytes(self.dst.ip()));
        v[32..34].copy_from_slice(&self.src.port().to_be_bytes());
        v[34..36].copy_from_slice(&self.dst.port().to_be_bytes());
        v[36] = self.state as u8;
        v[37] = self.ws_in;
        v[38] = self.ws_out;
        for (i, x) in [self.seq_add, self.ack_add, self.tsval_add, self.tsecr_add]
            .iter()
            .enumerate()
        {
            v[40 + 4 * i..44 + 4 * i].copy_from_slice(&x.to_ne_bytes());
        }
        let s = &self.seen;
        v[56..60].copy_from_slice(&s.seq_hi.to_ne_bytes());
        v[60..64].copy_from_slice(&s.ack_last.to_ne_bytes());
        v[64..68].copy_from_slice(&s.ts_last.unwrap_or(0).to_ne_bytes());
        v[68..71].copy_from_slice(&[s.fin.into(), s.rst.into(), s.ts_last.is_some().into()]);
        for (i, x) in [s.packets, s.bytes, s.dropped, s.last_ns]
            .iter()
            .enumerate()
        {
            v[72 + 8 * i..80 + 8 * i].copy_from_slice(&x.to_ne_bytes());
        }
        v[104..108].copy_from_slice(&u32::from(s.win_last).to_ne_bytes());
        v
    }

    /// Reads a value back; `v6` says how to read the addresses (the key's family).
    pub fn decode(v: &[u8; VALUE_SIZE], v6: bool) -> Flow {
        let state = match v[36] {
            0 => State::Observe,
            1 => State::Block,
            _ => State::Splice,
        };
        Flow {
            src: addr_at(v, 0, 32, v6),
            dst: addr_at(v, 16, 34, v6),
            state,
            ws_in: v[37],
            ws_out: v[38],
            seq_add: u32_at(v, 40),
            ack_add: u32_at(v, 44),
            tsval_add: u32_at(v, 48),
            tsecr_add: u32_at(v, 52),
            seen: Seen {
                seq_hi: u32_at(v, 56),
                ack_last: u32_at(v, 60),
                ts_last: (v[70] != 0).then(|| u32_at(v, 64)),
                fin: v[68] != 0,
                rst: v[69] != 0,
                packets: u64_at(v, 72),
                bytes: u64_at(v, 80),
                dropped: u64_at(v, 88),
                last_ns: u64_at(v, 96),
                win_last: u32_at(v, 104) as u16,
            },
        }
    }
}

/// One frozen router socket, read in `TCP_REPAIR` mode (src/sys/repair.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frozen {
    /// The socket's own address and its peer's.
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// `TCP_QUEUE_SEQ` of the send queue (`write_seq`; = snd_nxt = snd_una when SIOCOUTQ is
    /// 0) and of the receive queue (`rcv_nxt`).
    pub snd_nxt: u32,
    pub rcv_nxt: u32,
    /// `TCP_TIMESTAMP`: the socket's TS clock now (bit 0: usec clock).
    pub ts_now: u32,
    /// `tcpi_snd_wscale` (applied to the peer's windows) and `tcpi_rcv_wscale` (ours).
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    /// Timestamps negotiated (`TCPI_OPT_TIMESTAMPS`).
    pub timestamps: bool,
}

/// The window a SPLICE entry starts with: the largest its sender can have advertised, until
/// its first ACK through the splice (the window probes of handoff step 5 ask for one at once).
pub const UNKNOWN_WINDOW: u16 = u16::MAX;

/// The two `flows` entries of a handoff: (key, value) for packets from A's peer (the client,
/// arriving with destination `a_dst`, its original destination) and from B's peer (the
/// server). `a_seen`/`b_seen` are what the program observed of each peer so far (their last
/// TSvals, FINs, counters), carried over; `seq_hi` and `ack_last` are seeded from the
/// frozen sockets, `win_last` is [`UNKNOWN_WINDOW`] and `bytes` starts at 0.
pub fn splice_entries(
    a: &Frozen,
    a_dst: SocketAddr,
    a_seen: Seen,
    b: &Frozen,
    b_seen: Seen,
) -> [(FlowKey, Flow); 2] {
    let (a_ts_last, b_ts_last) = (a_seen.ts_last.unwrap_or(0), b_seen.ts_last.unwrap_or(0));
    // Client byte i arrives at seq a.rcv_nxt + i and must leave as B's byte b.snd_nxt + i;
    // the client's acks count A's sent bytes, which are the server's bytes as B received
    // them (KERNEL-NOTES / docs/TCSPLICE.md, "Rewrite arithmetic").
    let c2s_seq = b.snd_nxt.wrapping_sub(a.rcv_nxt);
    let c2s_ack = b.rcv_nxt.wrapping_sub(a.snd_nxt);
    // TSvals continue the clock of the socket the receiver knew: the first translated TSval
    // is >= that socket's clock now, so the receiver's PAWS never sees time go back.
    let c2s_ts = b.ts_now.wrapping_sub(a_ts_last);
    let s2c_ts = a.ts_now.wrapping_sub(b_ts_last);
    let to_server = Flow {
        src: b.local,
        dst: b.peer,
        state: State::Splice,
        ws_in: a.snd_wscale,
        ws_out: b.rcv_wscale,
        seq_add: c2s_seq,
        ack_add: c2s_ack,
        tsval_add: c2s_ts,
        tsecr_add: s2c_ts.wrapping_neg(),
        seen: Seen {
            seq_hi: a.rcv_nxt,
            ack_last: a.snd_nxt,
            win_last: UNKNOWN_WINDOW,
            bytes: 0,
            ..a_seen
        },
    };
    let to_client = Flow {
        src: a_dst,
        dst: a.peer,
        state: State::Splice,
        ws_in: b.snd_wscale,
        ws_out: a.rcv_wscale,
        seq_add: c2s_ack.wrapping_neg(),
        ack_add: c2s_seq.wrapping_neg(),
        tsval_add: s2c_ts,
        tsecr_add: c2s_ts.wrapping_neg(),
        seen: Seen {
            seq_hi: b.rcv_nxt,
            ack_last: b.snd_nxt,
            win_last: UNKNOWN_WINDOW,
            bytes: 0,
            ..b_seen
        },
    };
    [
        (
            FlowKey {
                src: a.peer,
                dst: a_dst,
            },
            to_server,
        ),
        (
            FlowKey {
                src: b.peer,
                dst: b.local,
            },
            to_client,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frozen(local: &str, peer: &str, snd: u32, rcv: u32, ts: u32) -> Frozen {
        Frozen {
            local: local.parse().unwrap(),
            peer: peer.parse().unwrap(),
            snd_nxt: snd,
            rcv_nxt: rcv,
            ts_now: ts,
            snd_wscale: 7,
            rcv_wscale: 9,
            timestamps: true,
        }
    }

    /// Keys and values have the C layout: addresses and ports big-endian at fixed offsets.
    #[test]
    fn encodings_match_the_c_structs() {
        let k = FlowKey {
            src: "198.18.1.2:40000".parse().unwrap(),
            dst: "198.19.1.2:443".parse().unwrap(),
        };
        let b = k.encode().unwrap();
        assert_eq!(&b[..4], &[198, 18, 1, 2]);
        assert_eq!(&b[4..16], &[0; 12]);
        assert_eq!(&b[16..20], &[198, 19, 1, 2]);
        assert_eq!(&b[32..36], &[0x9c, 0x40, 0x01, 0xbb]);
        assert_eq!(&b[36..], &[4, 0, 0, 0]);
        let cross = FlowKey {
            src: "[2001:db8::1]:1".parse().unwrap(),
            dst: "1.2.3.4:2".parse().unwrap(),
        };
        assert_eq!(cross.encode(), None);

        let f = Flow {
            src: "[2001:db8:1::1]:5".parse().unwrap(),
            dst: "[2001:db8:2::2]:6".parse().unwrap(),
            state: State::Block,
            ws_in: 7,
            ws_out: 2,
            seq_add: 1,
            ack_add: 0xffff_ffff,
            tsval_add: 3,
            tsecr_add: 4,
            seen: Seen::default(),
        };
        let v = f.encode();
        assert_eq!(&v[32..40], &[0, 5, 0, 6, 1, 7, 2, 0]);
        assert_eq!(Flow::decode(&v, true), f);
    }

    /// Sequence translation wraps at 2^32 and the two directions' deltas are each other's
    /// negation, so a byte translated there and its ack translated back meet exactly.
    #[test]
    fn deltas_wrap_and_mirror() {
        let a = frozen(
            "198.18.1.1:12345",
            "198.18.1.2:40000",
            0xffff_fff0,
            10,
            1000,
        );
        let b = frozen("198.19.1.1:50000", "198.19.1.2:443", 20, 0xffff_ff00, 5);
        let orig = "198.19.1.2:443".parse().unwrap();
        let seen = |ts| Seen {
            ts_last: Some(ts),
            fin: true,
            bytes: 5,
            ..Seen::default()
        };
        let [(k1, c2s), (k2, s2c)] = splice_entries(&a, orig, seen(777), &b, seen(300));
        // Observations carry over; the books start at the frozen sockets' sequence numbers.
        assert!(c2s.seen.fin && s2c.seen.fin);
        assert_eq!(
            (c2s.seen.seq_hi, c2s.seen.ack_last, c2s.seen.bytes),
            (10, 0xffff_fff0, 0)
        );
        assert_eq!((s2c.seen.seq_hi, s2c.seen.ack_last), (0xffff_ff00, 20));
        // Each receiver's window is unknown until its first ACK through the splice.
        assert_eq!((c2s.seen.win_last, s2c.seen.win_last), (u16::MAX, u16::MAX));
        assert_eq!((k1.src, k1.dst), (a.peer, orig));
        assert_eq!((k2.src, k2.dst), (b.peer, b.local));
        assert_eq!((c2s.src, c2s.dst), (b.local, b.peer));
        assert_eq!((s2c.src, s2c.dst), (orig, a.peer));
        // The client's next byte (a.rcv_nxt) leaves as B's next byte.
        assert_eq!(a.rcv_nxt.wrapping_add(c2s.seq_add), b.snd_nxt);
        // The server's next byte leaves as A's next byte, across the wrap.
        assert_eq!(b.rcv_nxt.wrapping_add(s2c.seq_add), a.snd_nxt);
        // The client acking all A sent = the server's bytes B received.
        assert_eq!(a.snd_nxt.wrapping_add(c2s.ack_add), b.rcv_nxt);
        assert_eq!(b.snd_nxt.wrapping_add(s2c.ack_add), a.rcv_nxt);
        // Timestamps: the client's last TSval maps to B's clock now, and an echo of it
        // comes back as the value the client sent; same the other way.
        assert_eq!(777u32.wrapping_add(c2s.tsval_add), b.ts_now);
        assert_eq!(b.ts_now.wrapping_add(s2c.tsecr_add), 777);
        assert_eq!(300u32.wrapping_add(s2c.tsval_add), a.ts_now);
        assert_eq!(a.ts_now.wrapping_add(c2s.tsecr_add), 300);
        // Windows: client's windows are scaled by A's snd_wscale, read by the server with
        // B's rcv_wscale.
        assert_eq!((c2s.ws_in, c2s.ws_out), (7, 9));
        assert_eq!((s2c.ws_in, s2c.ws_out), (7, 9));
    }

    /// Bytes moved come from the 64-bit count with the low 32 bits from `seq_hi`, so a
    /// count that ran ahead (two CPUs) or a `seq_hi` past 2^32 still read exactly.
    #[test]
    fn moved_bytes_are_exact() {
        let seen = |seq_hi, bytes| Seen {
            seq_hi,
            bytes,
            ..Seen::default()
        };
        assert_eq!(seen(1100, 100).moved(1000), 100);
        assert_eq!(seen(1100, 160).moved(1000), 100, "count ran ahead");
        assert_eq!(
            seen(10, 6 << 30).moved(0xffff_fff0),
            (6 << 30) - (6 << 30) % (1 << 32) + 26
        );
        assert_eq!(seen(0, 0).moved(0), 0);
        let full = Seen {
            seq_hi: 1,
            ack_last: 2,
            ts_last: Some(3),
            fin: true,
            rst: false,
            packets: 4,
            bytes: 5,
            dropped: 6,
            last_ns: 7,
            win_last: 8,
        };
        let f = Flow {
            src: "1.2.3.4:5".parse().unwrap(),
            dst: "5.6.7.8:9".parse().unwrap(),
            state: State::Splice,
            ws_in: 1,
            ws_out: 2,
            seq_add: 3,
            ack_add: 4,
            tsval_add: 5,
            tsecr_add: 6,
            seen: full,
        };
        assert_eq!(Flow::decode(&f.encode(), false), f);
    }
}
