/* The kernel matrix's byte-checking peer: one static binary for the guest, client and server.
 *
 *   probe serve PORT
 *       dual-stack listener on [::]:PORT; a child process per connection
 *   probe run [-n CONNS] [-c AT_ONCE] [-S SEED] [-m MAX_BYTES] [-t SECS] [-s] [-p MS] HOST PORT
 *             [PROXY PPORT]
 *       CONNS connections to HOST:PORT (through the SOCKS5 server PROXY:PPORT when given),
 *       AT_ONCE at a time; prints one summary line; exit 0 only if every connection was exact
 *       -s: slow readers (below); -p: pauses (below)
 *   probe deny SYSCALL ERRNO CMD [ARGS...]
 *       runs CMD with SYSCALL (bpf, splice) answering -ERRNO (ENOSYS, EINVAL, EOPNOTSUPP, EPERM),
 *       by a seccomp filter: what a kernel without that feature answers
 *
 * Invariant: every byte is compared, none is only hashed or counted. Each connection sends a
 * 28-byte header (magic, id, seed, upload and download sizes, pattern), then `up` bytes of a
 * stream derived from the seed, then half-closes. The server compares each byte and the EOF
 * right after the last one, answers `down` bytes of a second stream and one status byte ('K'
 * when the upload was exact, 'X' when not), then closes; the client compares each of those and
 * the EOF after them. Pattern "after-fin": the server answers only after the client's FIN;
 * pattern "bulk": it answers at once, both directions move together. Sizes are 0 B to MAX
 * (3 MiB by default), log-uniform so that small and large transfers are both common.
 * Pauses (-p MS): one after-fin connection in four has the client wait MS milliseconds between
 * its header and the rest of its upload: both directions are still for that long, the quiet
 * moment the tcsplice plane hands a connection over at, so the whole upload, both FINs and
 * the answer cross the splice.
 * Slow readers (-s): every connection is after-fin and moves MAX/4 to MAX bytes each way; the
 * client's receive buffer is fixed at SLOW_RCVBUF before connect() (no autotuning) and, once
 * its upload and FIN are sent, it reads at most SLOW_READ bytes every SLOW_PAUSE_US: the
 * proxy's socket towards the client fills while the client has already half-closed.
 *
 * Files: this one holds main and the client (`probe run`); probe_serve.c the server,
 * probe_deny.c `deny`, probe_pump.c the pattern generator and the out/in pump both sides share,
 * probe.h what the files share (constants, the direction state, prototypes).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "probe.h"

/* ---- client ---- */

struct target {
    struct sockaddr_storage addr;
    socklen_t len;
};

static int parse_addr(const char *host, const char *port, struct target *t)
{
    int p = atoi(port);
    memset(t, 0, sizeof *t);
    struct sockaddr_in *a4 = (struct sockaddr_in *)&t->addr;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&t->addr;
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)p);
        t->len = sizeof *a4;
    } else if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)p);
        t->len = sizeof *a6;
    } else {
        return -1;
    }
    return p > 0 && p < 65536 ? 0 : -1;
}

/* The SOCKS5 CONNECT request for `dst` (RFC 1928 section 4), after a no-auth greeting. */
static size_t socks_request(const struct target *dst, unsigned char *buf)
{
    size_t n = 0;
    buf[n++] = 5, buf[n++] = 1, buf[n++] = 0;           /* greeting: no authentication */
    buf[n++] = 5, buf[n++] = 1, buf[n++] = 0;           /* CONNECT */
    if (dst->addr.ss_family == AF_INET) {
        const struct sockaddr_in *a = (const void *)&dst->addr;
        buf[n++] = 1;
        memcpy(buf + n, &a->sin_addr, 4), n += 4;
        memcpy(buf + n, &a->sin_port, 2), n += 2;
    } else {
        const struct sockaddr_in6 *a = (const void *)&dst->addr;
        buf[n++] = 4;
        memcpy(buf + n, &a->sin6_addr, 16), n += 16;
        memcpy(buf + n, &a->sin6_port, 2), n += 2;
    }
    return n;
}

static int write_all(int fd, const unsigned char *p, size_t n, double deadline)
{
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w > 0) {
            p += w, n -= (size_t)w;
            continue;
        }
        if (w < 0 && errno != EAGAIN && errno != EINTR)
            return -1;
        double left = deadline - now();
        if (left <= 0)
            return -1;
        struct pollfd pf = {.fd = fd, .events = POLLOUT};
        poll(&pf, 1, (int)(left * 1000) + 1);
    }
    return 0;
}

/* The reply: VER REP RSV ATYP BND.ADDR BND.PORT; anything but success fails. */
static int socks_method(int fd, double deadline, char *err, size_t errlen)
{
    unsigned char r[2];
    if (read_exact(fd, r, 2, deadline) < 0 || r[0] != 5 || r[1] != 0) {
        snprintf(err, errlen, "SOCKS5 greeting refused or cut");
        return -1;
    }
    return 0;
}

static int socks_reply(int fd, double deadline, char *err, size_t errlen)
{
    unsigned char r[22];
    if (read_exact(fd, r, 4, deadline) < 0 || r[0] != 5 || r[1] != 0 ||
        (r[3] != 1 && r[3] != 4)) {
        snprintf(err, errlen, "SOCKS5 CONNECT failed (REP %d)", r[1]);
        return -1;
    }
    if (read_exact(fd, r, r[3] == 1 ? 6 : 18, deadline) < 0) {
        snprintf(err, errlen, "SOCKS5 reply cut");
        return -1;
    }
    return 0;
}

struct plan {
    uint32_t id;
    uint64_t seed;
    uint32_t up, down, flags;
    int pipeline; /* SOCKS5: greeting, request and header in one write */
    int slow;     /* a slow reader, after its upload and FIN */
};

static uint32_t size_of(uint64_t r, uint32_t max)
{
    if (r % 8 == 0)
        return 0;
    r /= 8;
    unsigned bits = (unsigned)(r % 23); /* 1 B .. 4 MiB before the cap */
    r /= 23;
    uint64_t s = (1ull << bits) + r % (1ull << bits);
    return s > max ? max : (uint32_t)s;
}

static struct plan plan_of(uint64_t base, uint32_t id, uint32_t max, int slow, unsigned pause)
{
    uint64_t r = mix(base * 1000003 + id);
    struct plan p = {.id = id, .seed = r, .slow = slow};
    p.up = size_of(mix(r + 1), max);
    p.down = size_of(mix(r + 2), max);
    p.flags = mix(r + 3) % 4 == 0 ? BULK : 0;
    p.pipeline = (int)(mix(r + 4) & 1);
    if (pause && !(p.flags & BULK) && mix(r + 5) % 4 == 0)
        p.flags |= pause << PAUSE_SHIFT;
    if (slow) { /* MAX/4 .. MAX each way, the answer after the FIN */
        p.up = max / 4 + (uint32_t)(mix(r + 1) % (max - max / 4 + 1));
        p.down = max / 4 + (uint32_t)(mix(r + 2) % (max - max / 4 + 1));
        p.flags = 0;
    }
    return p;
}

static int one_conn(const struct plan *p, const struct target *dst, const struct target *proxy,
                    double timeout, char *err, size_t errlen)
{
    double deadline = now() + timeout;
    const struct target *to = proxy ? proxy : dst;
    int fd = socket(to->addr.ss_family, SOCK_STREAM, 0);
    if (fd < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        return -1;
    }
    struct timeval tv = {.tv_sec = (long)timeout};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv); /* bounds connect() */
    int rcvbuf = SLOW_RCVBUF; /* set before connect(): the window scale follows it */
    if (p->slow && setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf) < 0) {
        snprintf(err, errlen, "SO_RCVBUF: %s", strerror(errno));
        close(fd);
        return -1;
    }
    if (connect(fd, (const struct sockaddr *)&to->addr, to->len) < 0) {
        snprintf(err, errlen, "connect: %s", strerror(errno));
        close(fd);
        return -1;
    }
    set_nonblock(fd);
    struct out o = {.key = key_of(p->seed, 0), .len = p->up, .tail = -1, .shut = 1,
                    .pre_len = HEADER, .pause_ms = p->flags >> PAUSE_SHIFT};
    put32(o.pre, MAGIC);
    put32(o.pre + 4, p->id);
    put32(o.pre + 8, (uint32_t)(p->seed >> 32));
    put32(o.pre + 12, (uint32_t)p->seed);
    put32(o.pre + 16, p->up);
    put32(o.pre + 20, p->down);
    put32(o.pre + 24, p->flags);
    if (proxy) {
        unsigned char req[64];
        size_t n = socks_request(dst, req);
        if (p->pipeline) {
            memcpy(req + n, o.pre, HEADER);
            n += HEADER;
            o.pre_off = HEADER;
        }
        /* Pipelined: greeting, request and header in one write; otherwise one step at a time. */
        size_t first = p->pipeline ? n : 3;
        if (write_all(fd, req, first, deadline) < 0 || socks_method(fd, deadline, err, errlen) < 0 ||
            write_all(fd, req + first, n - first, deadline) < 0 ||
            socks_reply(fd, deadline, err, errlen) < 0) {
            if (!err[0])
                snprintf(err, errlen, "SOCKS5 request: %s", strerror(errno));
            close(fd);
            return -1;
        }
    }
    struct in i = {.key = key_of(p->seed, 1), .len = p->down, .want_tail = 1, .tail = -1,
                   .pace = p->slow ? SLOW_READ : 0};
    int rc = pump(fd, &o, &i, deadline, 0, err, errlen);
    close(fd);
    if (rc == 0 && i.tail != 'K') {
        snprintf(err, errlen, "the server found the upload altered (status '%c')", i.tail);
        rc = -1;
    }
    return rc;
}

struct tally {
    uint64_t ok, failed, up, down, paused;
};

static int run(int argc, char **argv)
{
    uint32_t conns = 32, at_once = 8, max = 3u << 20;
    uint64_t seed = 1;
    double timeout = 120;
    int opt, slow = 0;
    unsigned pause = 0;
    while ((opt = getopt(argc, argv, "n:c:S:m:t:sp:")) != -1) {
        switch (opt) {
        case 'n': conns = (uint32_t)strtoul(optarg, NULL, 0); break;
        case 'c': at_once = (uint32_t)strtoul(optarg, NULL, 0); break;
        case 'S': seed = strtoull(optarg, NULL, 0); break;
        case 'm': max = (uint32_t)strtoul(optarg, NULL, 0); break;
        case 't': timeout = atof(optarg); break;
        case 's': slow = 1; break;
        case 'p': pause = (unsigned)strtoul(optarg, NULL, 0) & 0xffff; break;
        default: return 2;
        }
    }
    struct target dst, proxy;
    int n = argc - optind;
    if ((n != 2 && n != 4) || parse_addr(argv[optind], argv[optind + 1], &dst) < 0 ||
        (n == 4 && parse_addr(argv[optind + 2], argv[optind + 3], &proxy) < 0)) {
        fprintf(stderr, "usage: probe run [-n N] [-c C] [-S SEED] [-m MAX] [-t SECS] [-s] [-p MS] HOST PORT "
                        "[SOCKS5_HOST SOCKS5_PORT]\n");
        return 2;
    }
    if (at_once == 0 || at_once > conns)
        at_once = conns ? conns : 1;
    struct tally *t = mmap(NULL, sizeof *t * at_once, PROT_READ | PROT_WRITE,
                           MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (t == MAP_FAILED) {
        perror("probe: mmap");
        return 1;
    }
    memset(t, 0, sizeof *t * at_once);
    double t0 = now();
    for (uint32_t w = 0; w < at_once; w++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("probe: fork");
            return 1;
        }
        if (pid)
            continue;
        for (uint32_t id = w; id < conns; id += at_once) {
            struct plan p = plan_of(seed, id, max, slow, pause);
            char err[256] = "";
            if (one_conn(&p, &dst, n == 4 ? &proxy : NULL, timeout, err, sizeof err) == 0) {
                t[w].ok++;
                t[w].paused += p.flags >> PAUSE_SHIFT != 0;
                t[w].up += HEADER + (uint64_t)p.up;
                t[w].down += (uint64_t)p.down + 1;
            } else {
                t[w].failed++;
                fprintf(stderr, "probe: #%u (up %u B, down %u B, %s%s%s%s) failed: %s\n", id, p.up,
                        p.down, p.flags & BULK ? "bulk" : "after-fin",
                        p.flags >> PAUSE_SHIFT ? ", paused" : "",
                        n == 4 && p.pipeline ? ", pipelined" : "", p.slow ? ", slow reader" : "",
                        err);
            }
        }
        _exit(0);
    }
    int crashed = 0, status;
    while (wait(&status) > 0)
        crashed += !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    struct tally sum = {0};
    for (uint32_t w = 0; w < at_once; w++) {
        sum.ok += t[w].ok, sum.failed += t[w].failed;
        sum.up += t[w].up, sum.down += t[w].down, sum.paused += t[w].paused;
    }
    uint64_t lost = conns - sum.ok - sum.failed;
    printf("probe: conns=%u exact=%llu failed=%llu up=%llu down=%llu paused=%llu secs=%.1f\n",
           conns, (unsigned long long)sum.ok, (unsigned long long)(sum.failed + lost),
           (unsigned long long)sum.up, (unsigned long long)sum.down,
           (unsigned long long)sum.paused, now() - t0);
    return sum.ok == conns && !crashed ? 0 : 1;
}

int main(int argc, char **argv)
{
    if (argc >= 3 && !strcmp(argv[1], "serve"))
        return serve(atoi(argv[2]), 300);
    if (argc >= 2 && !strcmp(argv[1], "run"))
        return run(argc - 1, argv + 1);
    if (argc >= 2 && !strcmp(argv[1], "deny"))
        return deny(argc - 1, argv + 1);
    fprintf(stderr, "usage: probe serve PORT | probe run ... | probe deny SYSCALL ERRNO CMD...\n");
    return 2;
}
