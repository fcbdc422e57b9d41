/* What the probe's files share: the wire format's constants, the state of one direction's
 * outgoing and incoming bytes, and the functions more than one file calls. probe.c holds
 * main, the usage and the invariant, and the client (`probe run`); probe_pump.c the pattern
 * generator, the header's byte order and the out/in pump; probe_serve.c the server
 * (`probe serve`); probe_deny.c the seccomp filter (`probe deny`).
 */
#ifndef PROBE_H
#define PROBE_H

#include <stddef.h>
#include <stdint.h>

#define MAGIC 0x4b534d58u /* "KSMX" */
#define HEADER 28
#define CHUNK 65536
#define BULK 1u
#define PAUSE_SHIFT 8 /* flags >> PAUSE_SHIFT: the client's pause after its header, in ms */
#define SLOW_RCVBUF 32768
#define SLOW_READ 16384
#define SLOW_PAUSE_US 2000

/* One direction's outgoing bytes: a prefix (header), `len` stream bytes, an optional tail. */
struct out {
    unsigned char pre[HEADER];
    size_t pre_len, pre_off;
    uint64_t key, off, len;
    int tail;      /* -1: none; otherwise the byte to send after the stream */
    int tail_held; /* the tail is not known yet (the server's verdict) */
    int gated;     /* nothing may be sent yet (after-fin pattern) */
    unsigned pause_ms; /* wait this long once the prefix (header) is sent */
    int shut;      /* half-close when everything is sent */
    int done;
};

/* One direction's incoming bytes: `len` stream bytes, an optional tail byte, then EOF. */
struct in {
    uint64_t key, off, len;
    int want_tail, tail; /* tail: -1 until it arrives */
    int eof;
    size_t pace; /* 0, or read at most this many bytes per step (slow reader) */
    char err[200];
};

/* probe_pump.c */
uint64_t mix(uint64_t z);
uint64_t key_of(uint64_t seed, int dir);
double now(void);
void put32(unsigned char *p, uint32_t v);
uint32_t get32(const unsigned char *p);
int pump(int fd, struct out *o, struct in *i, double deadline, int gate_on_eof, char *err,
         size_t errlen);
int set_nonblock(int fd);
int read_exact(int fd, unsigned char *buf, size_t n, double deadline);

/* probe_serve.c */
int serve(int port, double timeout);

/* probe_deny.c */
int deny(int argc, char **argv);

#endif
