/* The probe's `deny SYSCALL ERRNO CMD [ARGS...]`: runs CMD under a seccomp filter that answers
 * SYSCALL with -ERRNO, what a kernel without that feature answers.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "probe.h"

#ifndef SECCOMP_MODE_FILTER
#define SECCOMP_MODE_FILTER 2
#endif
#define RET_ALLOW 0x7fff0000u
#define RET_ERRNO 0x00050000u
#define LD_W_ABS 0x20 /* BPF_LD | BPF_W | BPF_ABS */
#define JEQ_K 0x15    /* BPF_JMP | BPF_JEQ | BPF_K */
#define RET_K 0x06    /* BPF_RET | BPF_K */
#if defined(__x86_64__)
#define AUDIT_ARCH_SELF 0xc000003eu /* AUDIT_ARCH_X86_64 */
#elif defined(__s390x__)
#define AUDIT_ARCH_SELF 0x80000016u /* AUDIT_ARCH_S390X */
#elif defined(__aarch64__)
#define AUDIT_ARCH_SELF 0xc00000b7u /* AUDIT_ARCH_AARCH64 */
#else
#error "add this architecture's AUDIT_ARCH value"
#endif

struct seccomp_data_view { /* struct seccomp_data, <linux/seccomp.h> */
    int nr;
    uint32_t arch;
    uint64_t instruction_pointer;
    uint64_t args[6];
};
struct filter_insn {
    uint16_t code;
    uint8_t jt, jf;
    uint32_t k;
};
struct filter_prog {
    unsigned short len;
    struct filter_insn *insns;
};

int deny(int argc, char **argv)
{
    static const struct { const char *name; long nr; } calls[] = {
        {"bpf", SYS_bpf}, {"splice", SYS_splice}};
    static const struct { const char *name; int no; } errs[] = {
        {"ENOSYS", ENOSYS}, {"EINVAL", EINVAL}, {"EOPNOTSUPP", EOPNOTSUPP}, {"EPERM", EPERM}};
    long nr = -1;
    int no = -1;
    if (argc < 4) {
        fprintf(stderr, "usage: probe deny SYSCALL ERRNO CMD [ARGS...]\n");
        return 2;
    }
    for (size_t i = 0; i < sizeof calls / sizeof calls[0]; i++)
        if (!strcmp(argv[1], calls[i].name))
            nr = calls[i].nr;
    for (size_t i = 0; i < sizeof errs / sizeof errs[0]; i++)
        if (!strcmp(argv[2], errs[i].name))
            no = errs[i].no;
    if (nr < 0 || no < 0) {
        fprintf(stderr, "probe deny: unknown syscall %s or errno %s\n", argv[1], argv[2]);
        return 2;
    }
    struct filter_insn f[] = {
        {LD_W_ABS, 0, 0, offsetof(struct seccomp_data_view, arch)},
        {JEQ_K, 1, 0, AUDIT_ARCH_SELF},
        {RET_K, 0, 0, RET_ALLOW},
        {LD_W_ABS, 0, 0, offsetof(struct seccomp_data_view, nr)},
        {JEQ_K, 0, 1, (uint32_t)nr},
        {RET_K, 0, 0, RET_ERRNO | (uint32_t)no},
        {RET_K, 0, 0, RET_ALLOW},
    };
    struct filter_prog prog = {.len = sizeof f / sizeof f[0], .insns = f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) < 0) {
        perror("probe deny: seccomp");
        return 1;
    }
    execvp(argv[3], argv + 3);
    perror("probe deny: exec");
    return 127;
}
