/* The probe's streams and the loop that moves them, used by both the client and the server:
 * the pattern generator (every byte of a stream can be made on its own), the header's byte
 * order, one direction's sender (out_step) and byte-by-byte checker (in_step), the pump that
 * runs both until the peer's EOF, and the blocking read with a deadline.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "probe.h"

uint64_t mix(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Byte i of stream `key` is byte i%8 of mix(key + i/8): any range can be made on its own. */
static void gen(uint64_t key, uint64_t off, unsigned char *buf, size_t n)
{
    size_t k = 0;
    while (k < n) {
        uint64_t i = off + k, w = mix(key + (i >> 3));
        for (unsigned b = i & 7; b < 8 && k < n; b++, k++)
            buf[k] = (unsigned char)(w >> (b * 8));
    }
}

uint64_t key_of(uint64_t seed, int dir) { return mix(seed) ^ (uint64_t)dir << 63; }

double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

void put32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (24 - 8 * i));
}
uint32_t get32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static unsigned char scratch[CHUNK], expect[CHUNK];

/* Sends what the socket takes. Returns -1 on a socket error (message in err). */
static int out_step(int fd, struct out *o, char *err, size_t errlen)
{
    while (!o->done && !o->gated) {
        const unsigned char *p;
        size_t n;
        if (o->pre_off == o->pre_len && o->pause_ms) { /* header sent: nothing moves a while */
            usleep(o->pause_ms * 1000);
            o->pause_ms = 0;
        }
        if (o->pre_off < o->pre_len) {
            p = o->pre + o->pre_off;
            n = o->pre_len - o->pre_off;
        } else if (o->off < o->len) {
            n = o->len - o->off > CHUNK ? CHUNK : (size_t)(o->len - o->off);
            gen(o->key, o->off, scratch, n);
            p = scratch;
        } else if (o->tail >= 0 || o->tail_held) {
            if (o->tail_held)
                return 0;
            scratch[0] = (unsigned char)o->tail;
            p = scratch;
            n = 1;
        } else {
            if (o->shut && shutdown(fd, SHUT_WR) < 0) {
                snprintf(err, errlen, "shutdown: %s", strerror(errno));
                return -1;
            }
            o->done = 1;
            return 0;
        }
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return 0;
            snprintf(err, errlen, "send at byte %llu: %s", (unsigned long long)o->off,
                     strerror(errno));
            return -1;
        }
        if (o->pre_off < o->pre_len)
            o->pre_off += (size_t)w;
        else if (o->off < o->len)
            o->off += (uint64_t)w;
        else
            o->tail = -1;
    }
    return 0;
}

/* Reads what is there and compares every byte. Returns -1 on a mismatch or socket error. */
static int in_step(int fd, struct in *i)
{
    for (int once = 0; !i->eof && !(i->pace && once); once = 1) {
        ssize_t r = recv(fd, scratch, i->pace ? i->pace : CHUNK, 0);
        if (r < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return 0;
            snprintf(i->err, sizeof i->err, "recv after %llu of %llu bytes: %s",
                     (unsigned long long)i->off, (unsigned long long)i->len, strerror(errno));
            return -1;
        }
        if (r == 0) {
            i->eof = 1;
            if (i->off < i->len || (i->want_tail && i->tail < 0)) {
                snprintf(i->err, sizeof i->err, "EOF after %llu of %llu bytes%s",
                         (unsigned long long)i->off, (unsigned long long)i->len,
                         i->off == i->len ? " (no status byte)" : "");
                return -1;
            }
            return 0;
        }
        size_t k = 0, n = (size_t)r;
        if (i->off < i->len) {
            size_t m = i->len - i->off < n ? (size_t)(i->len - i->off) : n;
            gen(i->key, i->off, expect, m);
            if (memcmp(expect, scratch, m) != 0) {
                size_t d = 0;
                while (expect[d] == scratch[d])
                    d++;
                snprintf(i->err, sizeof i->err,
                         "byte %llu of %llu differs (expected 0x%02x, got 0x%02x)",
                         (unsigned long long)(i->off + d), (unsigned long long)i->len,
                         expect[d], scratch[d]);
                return -1;
            }
            i->off += m;
            k = m;
        }
        if (k < n && i->want_tail && i->tail < 0)
            i->tail = scratch[k++];
        if (k < n) {
            snprintf(i->err, sizeof i->err, "%zu bytes after the last of %llu", n - k,
                     (unsigned long long)i->len);
            return -1;
        }
    }
    return 0;
}

/* Runs both directions until the peer's EOF arrived and everything was sent. */
int pump(int fd, struct out *o, struct in *i, double deadline, int gate_on_eof,
         char *err, size_t errlen)
{
    for (;;) {
        if (out_step(fd, o, err, errlen) < 0)
            return -1;
        if (in_step(fd, i) < 0) {
            snprintf(err, errlen, "%s", i->err);
            return -1;
        }
        if (i->eof && gate_on_eof) {
            o->gated = 0;
            if (o->tail_held) {
                o->tail_held = 0;
                o->tail = 'K';
            }
            gate_on_eof = 0;
            continue;
        }
        if (o->done && i->eof)
            return 0;
        if (i->pace && o->done) /* a slow reader: the upload and FIN are out, pause */
            usleep(SLOW_PAUSE_US);
        double left = deadline - now();
        if (left <= 0) {
            snprintf(err, errlen, "timed out: sent %llu of %llu, received %llu of %llu%s",
                     (unsigned long long)o->off, (unsigned long long)o->len,
                     (unsigned long long)i->off, (unsigned long long)i->len,
                     i->eof ? " and EOF" : "");
            return -1;
        }
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (!o->done && !o->gated && !(o->tail_held && o->off == o->len && o->pre_off == o->pre_len))
            p.events |= POLLOUT;
        if (i->eof)
            p.events &= ~POLLIN;
        if (!p.events) /* waiting for nothing the socket can tell: cannot happen */
            p.events = POLLIN;
        poll(&p, 1, (int)(left * 1000) + 1);
    }
}

int set_nonblock(int fd) { return fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

int read_exact(int fd, unsigned char *buf, size_t n, double deadline)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(fd, buf + got, n - got, 0);
        if (r > 0) {
            got += (size_t)r;
            continue;
        }
        if (r == 0 || (errno != EAGAIN && errno != EINTR))
            return -1;
        double left = deadline - now();
        if (left <= 0)
            return -1;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        poll(&p, 1, (int)(left * 1000) + 1);
    }
    return 0;
}
