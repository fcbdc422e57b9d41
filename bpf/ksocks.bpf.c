// SPDX-License-Identifier: MIT OR Apache-2.0
/*
 * ksocks sockmap programs: the kernel moves a spliced connection's bytes.
 *
 * Each proxied connection is two sockets, A and B. Userspace (src/offload.rs)
 *   1. puts redirect[cookie(A)] = B, redirect[cookie(B)] = A, counters[..] = 0,
 *   2. only then inserts A and B into `hook`, which carries these programs.
 * From then on every skb arriving on A is sent out of B (and vice versa) and
 * counted in counters[cookie(A)]. Order matters: a socket must never be hooked
 * before its peer is known (KERNEL-NOTES s.4).
 *
 * Built with plain clang (no libbpf headers): the few UAPI bits used are
 * declared below, values from include/uapi/linux/bpf.h.
 */
typedef unsigned int __u32;
typedef unsigned long long __u64;

/* struct __sk_buff: only its first member is read. */
struct __sk_buff {
	__u32 len;
};

enum sk_action { SK_DROP = 0, SK_PASS = 1 };

/* enum bpf_func_id */
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static __u64 (*bpf_get_socket_cookie)(void *ctx) = (void *)46;
static long (*bpf_sk_redirect_hash)(struct __sk_buff *skb, void *map, void *key,
				    __u64 flags) = (void *)72;

/*
 * Maps, found by the loader by symbol name in section "maps". The loader
 * creates them with its own table (type, key and value sizes are checked
 * against these definitions by a unit test) and the size it is given.
 */
struct map_def {
	__u32 type, key_size, value_size, max_entries, map_flags;
};
#define BPF_MAP_TYPE_HASH 1
#define BPF_MAP_TYPE_SOCKHASH 18
#define MAP(name, type, key, value) \
	struct map_def name __attribute__((section("maps"), used)) = { type, key, value, 0, 0 }

MAP(redirect, BPF_MAP_TYPE_SOCKHASH, sizeof(__u64), sizeof(__u32)); /* cookie -> peer socket */
MAP(hook, BPF_MAP_TYPE_SOCKHASH, sizeof(__u64), sizeof(__u32));     /* cookie -> socket; programs attached */
MAP(counters, BPF_MAP_TYPE_HASH, sizeof(__u64), sizeof(__u64));     /* cookie -> bytes redirected from it */

/* Stream parser: every skb is one whole message. With a parser the verdict
 * sees strparser-framed skbs; only parser + verdict stayed exact in the soak
 * (KERNEL-NOTES s.1, s.5). */
__attribute__((section("sk_skb/stream_parser"), used))
int ksocks_parser(struct __sk_buff *skb)
{
	return skb->len;
}

__attribute__((section("sk_skb/stream_verdict"), used))
int ksocks_verdict(struct __sk_buff *skb)
{
	__u32 len = skb->len;
	__u64 cookie, *count;

	/* A zero-length skb (the FIN) redirected makes the peer's psock fail
	 * with EPIPE; passing it fails too when the psock is busy (KERNEL-NOTES s.2). */
	if (len == 0)
		return SK_DROP;
	cookie = bpf_get_socket_cookie(skb);
	/* No BPF_F_INGRESS: the skb is transmitted by the peer socket (s.4). */
	if (bpf_sk_redirect_hash(skb, &redirect, &cookie, 0) != SK_PASS)
		return SK_DROP;
	count = bpf_map_lookup_elem(&counters, &cookie);
	if (count)
		__sync_fetch_and_add(count, len);
	return SK_PASS;
}

/* GPL-compatible string, so the kernel allows every helper we might use. */
char _license[] __attribute__((section("license"), used)) = "Dual MIT/GPL";
