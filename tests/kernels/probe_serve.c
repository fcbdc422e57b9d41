/* The probe's server (`probe serve PORT`): a dual-stack listener, a child process per
 * connection; each child checks the upload byte by byte and answers the download and the
 * status byte (see the invariant in probe.c).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>

#include "probe.h"

static void serve_one(int fd, double timeout)
{
    double deadline = now() + timeout;
    unsigned char h[HEADER];
    set_nonblock(fd);
    if (read_exact(fd, h, HEADER, deadline) < 0 || get32(h) != MAGIC) {
        fprintf(stderr, "probe serve: no valid header\n");
        return;
    }
    uint32_t id = get32(h + 4);
    uint64_t seed = (uint64_t)get32(h + 8) << 32 | get32(h + 12);
    uint32_t up = get32(h + 16), down = get32(h + 20), flags = get32(h + 24);
    struct in i = {.key = key_of(seed, 0), .len = up, .tail = -1};
    struct out o = {.key = key_of(seed, 1), .len = down, .tail = -1, .tail_held = 1,
                    .gated = !(flags & BULK), .shut = 1};
    char err[256];
    if (pump(fd, &o, &i, deadline, 1, err, sizeof err) < 0) {
        fprintf(stderr, "probe serve: #%u (up %u B, down %u B, %s%s): %s\n", id, up, down,
                flags & BULK ? "bulk" : "after-fin", flags >> PAUSE_SHIFT ? ", paused" : "", err);
    }
}

int serve(int port, double timeout)
{
    int fd = socket(AF_INET6, SOCK_STREAM, 0), zero = 0, one = 1;
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port)};
    if (fd < 0 || setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 512) < 0) {
        perror("probe serve: listen");
        return 1;
    }
    signal(SIGCHLD, SIG_IGN); /* children are reaped by the kernel */
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            perror("probe serve: accept");
            return 1;
        }
        pid_t pid = fork();
        if (pid == 0) {
            close(fd);
            serve_one(c, timeout);
            close(c);
            _exit(0);
        }
        close(c);
    }
}
