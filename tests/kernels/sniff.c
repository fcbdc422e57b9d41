/* The kernel matrix's packet recorder: the TCP headers crossing one interface, for a failed
 * case's log (tests/kernels/init, SNIFF=yes).
 *
 *   sniff IFACE    records until SIGTERM, then prints one line per TCP segment:
 *                  time, in/out, addresses and ports, flags, seq, ack, payload length, window,
 *                  TSval/TSecr and SACK blocks
 *
 * Invariant: it changes as little as possible of what it watches. A classic BPF filter cuts
 * each packet to SNAP bytes into a TPACKET_V3 ring, which wakes this process once per block;
 * records go to memory and are printed only at the end (a line per packet as it came slowed a
 * TCG guest enough to change which connections were spliced).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netpacket/packet.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>

static uint32_t get32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Classic BPF, as SO_ATTACH_FILTER takes it (include/uapi/linux/filter.h). */
struct filter_insn {
    uint16_t code;
    uint8_t jt, jf;
    uint32_t k;
};
struct filter_prog {
    unsigned short len;
    struct filter_insn *insns;
};

#define SNAP 112
struct rec {
    struct timespec at;
    unsigned char out, b[SNAP];
    unsigned short got;
};
static volatile sig_atomic_t sniff_stop;
static void on_term(int sig) { (void)sig, sniff_stop = 1; }

static void print_rec(const struct rec *r)
{
    const unsigned char *b = r->b;
    size_t got = r->got, l4;
    unsigned proto = (unsigned)b[12] << 8 | b[13], len;
    char sa[INET6_ADDRSTRLEN], da[INET6_ADDRSTRLEN];
    if (proto == 0x0800 && got >= 34 && b[23] == 6) {
        l4 = 14 + (size_t)(b[14] & 15) * 4;
        len = ((unsigned)b[16] << 8 | b[17]) - (unsigned)(l4 - 14);
        inet_ntop(AF_INET, b + 26, sa, sizeof sa);
        inet_ntop(AF_INET, b + 30, da, sizeof da);
    } else if (proto == 0x86dd && got >= 54 && b[20] == 6) {
        l4 = 54;
        len = (unsigned)b[18] << 8 | b[19];
        inet_ntop(AF_INET6, b + 22, sa, sizeof sa);
        inet_ntop(AF_INET6, b + 38, da, sizeof da);
    } else {
        return;
    }
    if (got < l4 + 20)
        return;
    const unsigned char *t = b + l4;
    unsigned hl = (unsigned)(t[12] >> 4) * 4;
    char opts[160] = "";
    size_t o = 0;
    for (unsigned i = 20; i < hl && l4 + i + 1 < got;) {
        unsigned k = t[i], kl = t[i + 1];
        if (k == 0)
            break;
        if (k == 1) {
            i++;
            continue;
        }
        if (kl < 2 || l4 + i + kl > got)
            break;
        if (k == 8 && kl == 10)
            o += (size_t)snprintf(opts + o, sizeof opts - o, " ts=%u/%u", get32(t + i + 2),
                                  get32(t + i + 6));
        for (unsigned e = 2; k == 5 && e + 8 <= kl && o < sizeof opts - 24; e += 8)
            o += (size_t)snprintf(opts + o, sizeof opts - o, " sack=%u-%u", get32(t + i + e),
                                  get32(t + i + e + 4));
        i += kl;
    }
    printf("%ld.%06ld %s %s.%u > %s.%u %s%s%s%s%s seq=%u ack=%u len=%u win=%u%s\n",
           (long)r->at.tv_sec, r->at.tv_nsec / 1000, r->out ? "out" : "in", sa,
           (unsigned)t[0] << 8 | t[1], da, (unsigned)t[2] << 8 | t[3], t[13] & 2 ? "S" : "",
           t[13] & 1 ? "F" : "", t[13] & 4 ? "R" : "", t[13] & 8 ? "P" : "",
           t[13] & 16 ? "." : "", get32(t + 4), get32(t + 8), len - hl,
           (unsigned)t[14] << 8 | t[15], opts);
}

/* TPACKET_V3 (include/uapi/linux/if_packet.h; musl's headers lack it). */
struct ring_req3 {
    unsigned block_size, block_nr, frame_size, frame_nr, retire_blk_tov, sizeof_priv, feature;
};
struct block_desc {
    uint32_t version, offset_to_priv, block_status, num_pkts, offset_to_first_pkt, blk_len;
    uint64_t seq_num;
    uint32_t ts[4];
};
struct pkt3 {
    uint32_t next_offset, sec, nsec, snaplen, len, status;
    uint16_t mac, net;
};
#define SOL_PACKET_ 263
#define PACKET_RX_RING_ 5
#define PACKET_VERSION_ 10
#define TPACKET_V3_ 2
#define RING_BLOCK (1u << 20)
#define RING_BLOCKS 32u

int main(int argc, char **argv)
{
    int fd = socket(AF_PACKET, SOCK_RAW, htons(0x0003 /* ETH_P_ALL */)), v = TPACKET_V3_;
    struct sockaddr_ll sll = {.sll_family = AF_PACKET, .sll_protocol = htons(0x0003),
                              .sll_ifindex = argc == 2 ? (int)if_nametoindex(argv[1]) : 0};
    struct filter_insn cut[] = {{0x06 /* RET_K */, 0, 0, SNAP}};
    struct filter_prog prog = {.len = 1, .insns = cut};
    struct ring_req3 req = {.block_size = RING_BLOCK, .block_nr = RING_BLOCKS,
                            .frame_size = 2048, .frame_nr = RING_BLOCK / 2048 * RING_BLOCKS,
                            .retire_blk_tov = 50};
    size_t cap = 400000, n = 0;
    struct rec *recs = malloc(cap * sizeof *recs);
    if (fd < 0 || !recs || !sll.sll_ifindex ||
        setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof prog) < 0 ||
        setsockopt(fd, SOL_PACKET_, PACKET_VERSION_, &v, sizeof v) < 0 ||
        setsockopt(fd, SOL_PACKET_, PACKET_RX_RING_, &req, sizeof req) < 0) {
        fprintf(stderr, "usage: sniff IFACE (%s)\n", strerror(errno));
        return 1;
    }
    unsigned char *ring = mmap(NULL, (size_t)RING_BLOCK * RING_BLOCKS, PROT_READ | PROT_WRITE,
                               MAP_SHARED, fd, 0);
    if (ring == MAP_FAILED || bind(fd, (struct sockaddr *)&sll, sizeof sll) < 0) {
        perror("sniff: ring");
        return 1;
    }
    struct sigaction sa = {.sa_handler = on_term};
    sigaction(SIGTERM, &sa, NULL);
    for (unsigned blk = 0; n < cap;) {
        struct block_desc *bd = (struct block_desc *)(ring + (size_t)blk * RING_BLOCK);
        if (!(__atomic_load_n(&bd->block_status, __ATOMIC_ACQUIRE) & 1 /* TP_STATUS_USER */)) {
            if (sniff_stop)
                break;
            struct pollfd pf = {.fd = fd, .events = POLLIN | POLLERR};
            poll(&pf, 1, 100);
            continue;
        }
        unsigned char *at = (unsigned char *)bd + bd->offset_to_first_pkt;
        for (uint32_t i = 0; i < bd->num_pkts && n < cap; i++) {
            struct pkt3 *h = (struct pkt3 *)at;
            const struct sockaddr_ll *from = (const void *)(at + ((sizeof(struct pkt3) + 12 + 15) & ~15u));
            recs[n].at.tv_sec = h->sec, recs[n].at.tv_nsec = h->nsec;
            recs[n].out = from->sll_pkttype == PACKET_OUTGOING;
            recs[n].got = (unsigned short)(h->snaplen < SNAP ? h->snaplen : SNAP);
            memcpy(recs[n].b, at + h->mac, recs[n].got);
            n++;
            at += h->next_offset;
        }
        __atomic_store_n(&bd->block_status, 0 /* TP_STATUS_KERNEL */, __ATOMIC_RELEASE);
        blk = (blk + 1) % RING_BLOCKS;
    }
    for (size_t i = 0; i < n; i++)
        print_rec(&recs[i]);
    return 0;
}
