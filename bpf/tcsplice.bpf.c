// SPDX-License-Identifier: MIT OR Apache-2.0
/*
 * ksocks tcsplice: after the proxy handshake, the two TCP connections of a proxied flow are
 * translated into each other packet by packet at tc ingress (docs/TCSPLICE.md).
 *
 * One `flows` entry per direction, keyed by the 4-tuple as the packet arrives at tc ingress
 * (REDIRECT: before NAT, so the client's original destination). Userspace writes the rewrite
 * (addresses, ports, seq/ack/TS deltas, window scales) and the state; this program writes the
 * observations (FIN, RST, last TSval, counters, last-seen time). States:
 *   OBSERVE  pass everything; record the peer's TSval (ts_recent is not visible to userspace)
 *   BLOCK    drop segments carrying payload, SYN or FIN; pass pure ACKs, so the router's send
 *            queues drain while its receive queues stay still (a TCP_REPAIR socket still
 *            accepts data and sends ACKs: repair mode alone freezes nothing)
 *   SPLICE   rewrite and redirect out of the interface the FIB chooses
 * A packet that matches no entry, and an OBSERVE or BLOCK entry's packet that passes, goes on
 * untouched (TC_ACT_UNSPEC: the next tcx program or clsact filter, e.g. an ingress shaper, or
 * else the stack decides; TC_ACT_OK would be a final verdict that skips them). A SPLICE packet that cannot be forwarded is dropped, never passed: the
 * router's repair-mode socket would acknowledge data the server never got.
 *
 * Checksums are fixed incrementally (bpf_l4_csum_replace / bpf_l3_csum_replace), which is
 * right for CHECKSUM_PARTIAL GRO packets where a full recomputation is not
 * (net/core/utils.c:425-438).
 *
 * Built with plain clang (no libbpf headers): UAPI values below are from include/uapi/linux/
 * bpf.h, pkt_cls.h, if_ether.h, in.h and tcp.h of Linux 6.18. Ethernet devices only (the
 * program assumes a 14-byte MAC header; bpf_redirect_neigh refuses L3 ingress devices,
 * net/core/filter.c:2423).
 */
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef int __s32;

/* struct __sk_buff (include/uapi/linux/bpf.h), up to the last member read. */
struct __sk_buff {
	__u32 len, pkt_type, mark, queue_mapping, protocol, vlan_present, vlan_tci, vlan_proto;
	__u32 priority, ingress_ifindex, ifindex;
};

/* struct bpf_fib_lookup, IPv4 and IPv6 addresses as four words. */
struct bpf_fib_lookup {
	__u8 family, l4_protocol;
	__u16 sport, dport;
	__u16 tot_len;	/* in: 0 = check the skb against the egress MTU; out: mtu_result */
	__u32 ifindex;	/* in: ingress device; out: egress device */
	__u32 flowinfo;
	__u32 src[4];
	__u32 dst[4];	/* out: the next hop when the route has a gateway */
	__u32 vlan;
	__u8 smac[6], dmac[6];
};

struct bpf_redir_neigh {
	__u32 nh_family;
	__u32 nh[4];
};

#define TC_ACT_UNSPEC (-1)
#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
#define TC_ACT_REDIRECT 7

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
/* skb->protocol is a __be16 the kernel loads with a 16-bit load (net/core/filter.c,
 * bpf_convert_ctx_access, `case offsetof(struct __sk_buff, protocol)`): its value is the
 * EtherType's bytes read in the CPU's order, byte-swapped only on a little-endian CPU. The
 * bpfeb object must compare with the EtherType as is (swapping unconditionally made every
 * packet "not IP" on big-endian kernels: s390x 6.1, the kernel matrix). */
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define BE16(x) (x)
#else
#define BE16(x) __builtin_bswap16(x)
#endif
#define IPPROTO_TCP 6
#define AF_INET 2
#define AF_INET6 10
#define BPF_FIB_LKUP_RET_SUCCESS 0
#define BPF_FIB_LKUP_RET_NO_NEIGH 7
#define BPF_FIB_LKUP_RET_FRAG_NEEDED 8
#define BPF_F_PSEUDO_HDR (1ULL << 4)

/* enum bpf_func_id */
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static __u64 (*bpf_ktime_get_ns)(void) = (void *)5;
static long (*bpf_skb_store_bytes)(struct __sk_buff *skb, __u32 off, const void *from, __u32 len,
				   __u64 flags) = (void *)9;
static long (*bpf_l3_csum_replace)(struct __sk_buff *skb, __u32 off, __u64 from, __u64 to,
				   __u64 flags) = (void *)10;
static long (*bpf_l4_csum_replace)(struct __sk_buff *skb, __u32 off, __u64 from, __u64 to,
				   __u64 flags) = (void *)11;
static long (*bpf_redirect)(__u32 ifindex, __u64 flags) = (void *)23;
static long (*bpf_skb_load_bytes)(const struct __sk_buff *skb, __u32 off, void *to,
				  __u32 len) = (void *)26;
static __s32 (*bpf_csum_diff)(const void *from, __u32 from_size, const void *to, __u32 to_size,
			      __s32 seed) = (void *)28;
static long (*bpf_csum_update)(struct __sk_buff *skb, __s32 csum) = (void *)40;
static long (*bpf_fib_lookup)(struct __sk_buff *skb, struct bpf_fib_lookup *params, int plen,
			      __u32 flags) = (void *)69;
static long (*bpf_redirect_neigh)(__u32 ifindex, struct bpf_redir_neigh *params, int plen,
				  __u64 flags) = (void *)152;

/* Maps, found by the loader by symbol name in section "maps" (same convention as
 * ksocks.bpf.c); max_entries is set at load time. */
struct map_def {
	__u32 type, key_size, value_size, max_entries, map_flags;
};
#define BPF_MAP_TYPE_HASH 1
#define BPF_MAP_TYPE_ARRAY 2
#define BPF_F_NO_PREALLOC 1
#define MAP(name, type, key, value, flags) \
	struct map_def name __attribute__((section("maps"), used)) = { type, key, value, 0, flags }

/* The 4-tuple as it arrives; IPv4 addresses in the first 4 bytes, the rest zero. */
struct flow_key {
	__u8 saddr[16], daddr[16];
	__u8 sport[2], dport[2];	/* network order */
	__u8 family;			/* 4 or 6 */
	__u8 pad[3];
};

enum { OBSERVE = 0, BLOCK = 1, SPLICE = 2 };

struct flow {
	/* written by userspace */
	__u8 saddr[16], daddr[16];	/* new addresses */
	__u8 sport[2], dport[2];	/* new ports, network order */
	__u8 state, ws_in, ws_out, flags;
	__u32 seq_add, ack_add;		/* added to seq; to ack and SACK edges */
	__u32 tsval_add, tsecr_add;	/* added to TSval; to TSecr unless it is 0 */
	/* seeded by userspace when it writes SPLICE, then advanced by this program (SPLICE) */
	__u32 seq_hi;			/* end of the highest payload seen, sender's numbering */
	__u32 ack_last;			/* the sender's last acknowledgement, untranslated */
	/* written by this program */
	__u32 ts_last;			/* last TSval seen, host order */
	__u8 fin, rst, ts_seen, pad;
	__u64 packets;			/* packets seen (any state) */
	__u64 bytes;			/* SPLICE: payload bytes past seq_hi (each byte once) */
	__u64 dropped;			/* dropped by BLOCK or for an error */
	__u64 last_ns;			/* bpf_ktime_get_ns() of the last packet */
	/* seeded by userspace when it writes SPLICE (65535), then written by this program: */
	__u32 win_last;			/* the sender's last window field, unscaled */
	__u32 pad2;
};

/* Why SPLICE packets were dropped, or odd packets passed; indexes of `errors`. */
enum {
	ERR_FIB = 0,		/* no route (blackhole, unreachable, forwarding off...) */
	ERR_FRAG_NEEDED = 1,	/* non-GSO packet larger than the egress MTU */
	ERR_FRAGMENT = 2,	/* an IPv4 first fragment of an owned flow */
	ERR_SHORT = 3,		/* headers could not be read or written */
	ERR_SYN = 4,		/* SYN on an owned flow (port reuse while it lives) */
	ERR_REDIRECT = 5,	/* bpf_redirect_neigh failed */
	ERR_OPTIONS = 6,	/* malformed TCP option list: its TS/SACK cannot be found */
	ERR_RST = 7,		/* RST outside the receiver's window (a blind reset) */
	ERR_MAX = 8,
};

/* Sizes are checked against the loader's table by a unit test (src/tcsplice/map.rs). */
MAP(flows, BPF_MAP_TYPE_HASH, sizeof(struct flow_key), sizeof(struct flow), BPF_F_NO_PREALLOC);
MAP(errors, BPF_MAP_TYPE_ARRAY, sizeof(__u32), sizeof(__u64), 0);

static __attribute__((always_inline)) __u32 get32(const __u8 *p)
{
	return (__u32)p[0] << 24 | (__u32)p[1] << 16 | (__u32)p[2] << 8 | p[3];
}

static __attribute__((always_inline)) void put32(__u8 *p, __u32 v)
{
	p[0] = v >> 24;
	p[1] = v >> 16;
	p[2] = v >> 8;
	p[3] = v;
}

static __attribute__((always_inline)) void count_error(__u32 which)
{
	__u64 *n = bpf_map_lookup_elem(&errors, &which);

	if (n)
		__sync_fetch_and_add(n, 1);
}

static __attribute__((always_inline)) int drop(struct flow *f, __u32 why)
{
	__sync_fetch_and_add(&f->dropped, 1);
	if (why < ERR_MAX)
		count_error(why);
	return TC_ACT_SHOT;
}

/*
 * Whether a RST of spliced flow `f` (its sequence number `seq`, sender's numbering) falls in
 * the window its receiver last advertised, which the other leg's entry `peer` records: the
 * receiver's last ACK and window, in the numbering the RST takes once translated. Conntrack
 * would check this for a forwarded connection, but spliced packets bypass it, so without this
 * check a RST that guessed only the addresses and ports would end the flow. The window edge
 * is included (RFC 793 says RCV.NXT <= SEG.SEQ < RCV.NXT + RCV.WND; a real stack's RST is at
 * its snd_nxt, at most a window past the ACK); the receiver's own TCP then applies RFC 5961.
 * No peer entry (the flow is being torn down) or a peer not in SPLICE: believed.
 */
static __attribute__((always_inline)) int rst_believed(const struct flow *f, __u32 seq,
							__u8 family)
{
	struct flow_key k = {};
	struct flow *peer;

	__builtin_memcpy(k.saddr, f->daddr, 16);
	__builtin_memcpy(k.daddr, f->saddr, 16);
	__builtin_memcpy(k.sport, f->dport, 2);
	__builtin_memcpy(k.dport, f->sport, 2);
	k.family = family;
	peer = bpf_map_lookup_elem(&flows, &k);
	if (!peer || peer->state != SPLICE)
		return 1;
	return seq + f->seq_add - peer->ack_last <= (peer->win_last & 0xffff) << (peer->ws_in & 15);
}

#define TCP_MAX_HDR 60
#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04

/*
 * Walks the TCP options of `th` (hl bytes): records the TSval, and when `splice` rewrites
 * TSval/TSecr and the SACK edges in place. Returns non-zero for a malformed option list.
 *
 * The walk is unrolled over the 40 possible option offsets, each a compile-time constant,
 * with `next` the offset of the next option: no variable-offset stack access, and straight-
 * line code the verifier checks without a loop (a data-driven loop over the bytes made it
 * explore over a million instructions).
 */
static __attribute__((always_inline)) int options(__u8 *th, __u32 hl, struct flow *f, int splice)
{
	__u32 next = 20;

#pragma clang loop unroll(full)
	for (__u32 p = 20; p < TCP_MAX_HDR; p++) {
		__u8 kind, len;

		if (p != next || p >= hl)
			continue;
		kind = th[p];
		if (kind == 0)
			break;			/* end of option list */
		if (kind == 1) {
			next = p + 1;		/* NOP */
			continue;
		}
		len = th[p + 1];
		if (len < 2 || p + len > hl)
			return -1;
		if (kind == 8 && len == 10 && p + 10 <= TCP_MAX_HDR) {
			__u32 v = get32(&th[p + 2]), e = get32(&th[p + 6]);

			f->ts_last = v;
			f->ts_seen = 1;
			if (splice) {
				put32(&th[p + 2], v + f->tsval_add);
				if (e)
					put32(&th[p + 6], e + f->tsecr_add);
			}
		}
		if (kind == 5 && splice) {
			/* 1..4 blocks of (left, right) edges */
#pragma clang loop unroll(full)
			for (__u32 b = 2; b < 34; b += 8) {
				if (p + b + 8 <= TCP_MAX_HDR && b + 8 <= len) {
					put32(&th[p + b], get32(&th[p + b]) + f->ack_add);
					put32(&th[p + b + 4], get32(&th[p + b + 4]) + f->ack_add);
				}
			}
		}
		next = p + len;
	}
	return 0;
}

/* Sends the rewritten packet out of the interface the FIB chooses for its new destination. */
static __attribute__((always_inline)) int forward(struct __sk_buff *skb, struct flow *f, int v6)
{
	struct bpf_fib_lookup fib = {};
	struct bpf_redir_neigh nh = {};
	long rc;

	fib.family = v6 ? AF_INET6 : AF_INET;
	fib.l4_protocol = IPPROTO_TCP;
	fib.sport = *(__u16 *)f->sport;
	fib.dport = *(__u16 *)f->dport;
	fib.ifindex = skb->ingress_ifindex;
	__builtin_memcpy(fib.src, f->saddr, 16);
	__builtin_memcpy(fib.dst, f->daddr, 16);
	/* tot_len 0: the kernel checks a non-GSO skb against the egress MTU; GSO skbs pass
	 * unchecked (net/core/filter.c:6362-6373), so both legs' MSS must fit beforehand. */
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		/* MAC header: destination then source, as the FIB's neighbour entry says. */
		__u8 eth[12];

		__builtin_memcpy(eth, fib.dmac, 6);
		__builtin_memcpy(&eth[6], fib.smac, 6);
		if (bpf_skb_store_bytes(skb, 0, eth, 12, 0))
			return drop(f, ERR_SHORT);
		return bpf_redirect(fib.ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		/* Let the neighbour layer resolve (and queue behind ARP/ND) the next hop. */
		nh.nh_family = fib.family;
		__builtin_memcpy(nh.nh, fib.dst, 16);
		rc = bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
		if (rc == TC_ACT_REDIRECT)
			return rc;
		return drop(f, ERR_REDIRECT);
	}
	return drop(f, rc == BPF_FIB_LKUP_RET_FRAG_NEEDED ? ERR_FRAG_NEEDED : ERR_FIB);
}

__attribute__((section("tc"), used))
int tcsplice(struct __sk_buff *skb)
{
	__u8 ip[40], th[72] = {};
	struct flow_key key = {};
	struct flow *f;
	__u32 l4, hl, payload, proto = skb->protocol;
	int v6;

	if (proto == BE16(ETH_P_IP)) {
		__u32 ihl, tot;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, ip, 20))
			return TC_ACT_UNSPEC;
		if ((ip[0] >> 4) != 4 || ip[9] != IPPROTO_TCP)
			return TC_ACT_UNSPEC;
		/* A later fragment has no ports: not ours to judge. */
		if (((ip[6] & 0x1f) | ip[7]) != 0)
			return TC_ACT_UNSPEC;
		ihl = (ip[0] & 0xf) * 4;
		if (ihl < 20)
			return TC_ACT_UNSPEC;
		l4 = ETH_HLEN + ihl;
		tot = (__u32)ip[2] << 8 | ip[3];
		/* BIG TCP IPv4 super-packets carry tot_len 0 (then skb->len says it). */
		payload = tot ? tot - ihl : skb->len - l4;
		__builtin_memcpy(key.saddr, &ip[12], 4);
		__builtin_memcpy(key.daddr, &ip[16], 4);
		key.family = 4;
		v6 = 0;
	} else if (proto == BE16(ETH_P_IPV6)) {
		__u32 plen;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, ip, 40))
			return TC_ACT_UNSPEC;
		/* Extension headers are not walked: such a packet is not recognised. */
		if ((ip[0] >> 4) != 6 || ip[6] != IPPROTO_TCP)
			return TC_ACT_UNSPEC;
		l4 = ETH_HLEN + 40;
		plen = (__u32)ip[4] << 8 | ip[5];
		payload = plen ? plen : skb->len - l4;
		__builtin_memcpy(key.saddr, &ip[8], 16);
		__builtin_memcpy(key.daddr, &ip[24], 16);
		key.family = 6;
		v6 = 1;
	} else {
		return TC_ACT_UNSPEC;
	}
	if (bpf_skb_load_bytes(skb, l4, th, 20))
		return TC_ACT_UNSPEC;
	__builtin_memcpy(key.sport, &th[0], 2);
	__builtin_memcpy(key.dport, &th[2], 2);
	f = bpf_map_lookup_elem(&flows, &key);
	if (!f)
		return TC_ACT_UNSPEC;

	/* Ours from here on. */
	f->last_ns = bpf_ktime_get_ns();
	hl = (th[12] >> 4) * 4;
	if (hl < 20 || hl > TCP_MAX_HDR || payload < hl)
		return drop(f, ERR_SHORT);
	payload -= hl;
	if (!v6 && (ip[6] & 0x20))
		return drop(f, ERR_FRAGMENT);	/* first fragment: TCP here always sets DF */
	if (bpf_skb_load_bytes(skb, l4, th, hl))
		return drop(f, ERR_SHORT);
	__sync_fetch_and_add(&f->packets, 1);
	if (th[13] & TH_FIN)
		f->fin = 1;

	if (f->state != SPLICE) {
		if (th[13] & TH_RST)
			f->rst = 1;	/* the router's own socket checks it */
		options(th, hl, f, 0);	/* a malformed list is the receiver's business */
		if (f->state == BLOCK && (payload || (th[13] & (TH_FIN | TH_SYN))))
			return drop(f, ERR_MAX);
		return TC_ACT_UNSPEC;	/* not TC_ACT_OK: that would end tc classification here */
	}
	if (th[13] & TH_SYN)
		return drop(f, ERR_SYN);
	if (th[13] & TH_RST) {
		if (!rst_believed(f, get32(&th[4]), key.family))
			return drop(f, ERR_RST);
		f->rst = 1;
	}

	/* TCP header: ports, seq, ack, window, options. One checksum diff over all of it. */
	{
		__u8 old[TCP_MAX_HDR];
		__u32 win, seq = get32(&th[4]), ack = get32(&th[8]);
		__s32 diff, ahead = (__s32)(seq + payload - f->seq_hi);

		/* The books userspace reads: bytes moved (a retransmission counts once) and the
		 * sender's own view of the stream, for a reset userspace may have to send. Two
		 * CPUs racing on one flow may count a stretch twice; userspace takes the low 32
		 * bits from seq_hi, which the next packet always settles. */
		if (payload && ahead > 0) {	/* a pure ACK after a FIN is one past the data */
			f->seq_hi = seq + payload;
			__sync_fetch_and_add(&f->bytes, ahead);
		}
		if (th[13] & 0x10) {
			f->ack_last = ack;
			f->win_last = (__u32)th[14] << 8 | th[15];
		}

		__builtin_memcpy(old, th, TCP_MAX_HDR);
		__builtin_memcpy(&th[0], f->sport, 2);
		__builtin_memcpy(&th[2], f->dport, 2);
		put32(&th[4], seq + f->seq_add);
		if (th[13] & 0x10)	/* ACK */
			put32(&th[8], ack + f->ack_add);
		win = ((__u32)th[14] << 8 | th[15]) << (f->ws_in & 15) >> (f->ws_out & 15);
		if (win > 0xffff)
			win = 0xffff;
		th[14] = win >> 8;
		th[15] = win;
		if (options(th, hl, f, 1))
			return drop(f, ERR_OPTIONS);
		hl &= 0x3c;
		if (hl < 20)
			return drop(f, ERR_SHORT);
		diff = bpf_csum_diff(old, hl, th, hl, 0);
		if (bpf_skb_store_bytes(skb, l4, th, hl, 0) ||
		    bpf_l4_csum_replace(skb, l4 + 16, 0, diff, 0))
			return drop(f, ERR_SHORT);
	}

	/* Addresses: the TCP pseudo-header, and for IPv4 the header checksum. */
	if (v6) {
		__s32 diff = bpf_csum_diff(&ip[8], 32, f, 32, 0);

		if (bpf_skb_store_bytes(skb, ETH_HLEN + 8, f, 32, 0) ||
		    bpf_l4_csum_replace(skb, l4 + 16, 0, diff, BPF_F_PSEUDO_HDR))
			return drop(f, ERR_SHORT);
		/* IPv6 has no header checksum to absorb the address change, so the packet's
		 * CHECKSUM_COMPLETE sum did not move: undo what the pseudo-header update did to it
		 * (BPF_F_IPV6 does this only on Linux >= 6.16). Fails harmlessly otherwise. */
		bpf_csum_update(skb, diff);
	} else {
		__u8 addrs[8];
		__s32 diff;

		__builtin_memcpy(addrs, f->saddr, 4);
		__builtin_memcpy(&addrs[4], f->daddr, 4);
		diff = bpf_csum_diff(&ip[12], 8, addrs, 8, 0);
		if (bpf_skb_store_bytes(skb, ETH_HLEN + 12, addrs, 8, 0) ||
		    bpf_l3_csum_replace(skb, ETH_HLEN + 10, 0, diff, 0) ||
		    bpf_l4_csum_replace(skb, l4 + 16, 0, diff, BPF_F_PSEUDO_HDR))
			return drop(f, ERR_SHORT);
	}
	return forward(skb, f, v6);
}

/* GPL-compatible: bpf_fib_lookup is GPL-only. */
char _license[] __attribute__((section("license"), used)) = "Dual MIT/GPL";
