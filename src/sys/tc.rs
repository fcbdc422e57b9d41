//! The `bpf(2)` commands of the tc data plane: `BPF_PROG_TEST_RUN` (runs a classifier on a
//! packet we build, for the golden-packet tests and the start-up self-test) and
//! `BPF_LINK_CREATE` with `BPF_TCX_INGRESS` (Linux >= 6.6; the link detaches when its last
//! descriptor closes, so a crashed ksocks leaves nothing attached).
//!
//! Same conventions as [`super::bpf`]: a zeroed `#[repr(C)]` prefix of `union bpf_attr`
//! (include/uapi/linux/bpf.h of 6.18: `test` at lines 1655-1677, `link_create` at 1762-1839).

use super::bpf::{bpf, owned, ptr, SyscallError};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

// enum bpf_cmd
const BPF_PROG_TEST_RUN: libc::c_int = 10;
const BPF_PROG_QUERY: libc::c_int = 16;
const BPF_LINK_CREATE: libc::c_int = 28;
// enum bpf_attach_type
pub const BPF_TCX_INGRESS: u32 = 46;
pub const BPF_TCX_EGRESS: u32 = 47;
/// `test.flags`: the kernel gives the skb a CHECKSUM_COMPLETE sum before the run and fails
/// the run with `EBADMSG` if the program left that sum wrong (net/bpf/test_run.c:1088-1122).
pub const BPF_F_TEST_SKB_CHECKSUM_COMPLETE: u32 = 1 << 2;

/// tc return codes (include/uapi/linux/pkt_cls.h; TCX_* in bpf.h have the same values).
pub const TC_ACT_UNSPEC: i32 = -1;
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_REDIRECT: i32 = 7;

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

/// What one `BPF_PROG_TEST_RUN` returned.
#[derive(Debug)]
pub struct TestRun {
    /// The program's return value (e.g. [`TC_ACT_REDIRECT`]).
    pub retval: i32,
    /// The packet after the run, as far as `data_out` held it.
    pub data: Vec<u8>,
}

/// Runs `prog` once on the Ethernet frame `data`. `ctx` is a `struct __sk_buff` prefix in
/// native byte order (only `mark`, `priority`, `ingress_ifindex`, `ifindex`, `cb`, `tstamp`,
/// `wire_len`, `gso_segs`, `gso_size` may be non-zero, net/bpf/test_run.c:876-937); `ifindex`
/// picks the device the skb arrives on, in the caller's network namespace.
pub fn prog_test_run(
    prog: BorrowedFd,
    data: &[u8],
    ctx: &[u8],
    flags: u32,
) -> Result<TestRun, SyscallError> {
    let mut out = vec![0u8; data.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: data.len() as u32,
        data_size_out: out.len() as u32,
        data_in: ptr(data.as_ptr()),
        data_out: ptr(out.as_mut_ptr()),
        repeat: 1,
        ctx_size_in: ctx.len() as u32,
        ctx_in: if ctx.is_empty() { 0 } else { ptr(ctx.as_ptr()) },
        flags,
        ..Default::default()
    };
    // SAFETY: data_in and ctx_in are live buffers of the sizes given; data_out is a live,
    // exclusively borrowed buffer of data_size_out bytes, which bounds what the kernel
    // writes; ctx_out is NULL.
    let ret = unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) };
    ret.map_err(|err| SyscallError {
        call: "BPF_PROG_TEST_RUN",
        err,
    })?;
    out.truncate((attr.data_size_out as usize).min(out.len()));
    Ok(TestRun {
        retval: attr.retval as i32,
        data: out,
    })
}

/// Attaches the SCHED_CLS program `prog` at tcx `attach_type` ([`BPF_TCX_INGRESS`]) of
/// interface `ifindex` of the caller's network namespace, after any program already there.
/// The returned link fd is the attachment: closing it (or the process dying) detaches.
/// `EINVAL` on kernels before 6.6 means "use clsact" (src/sys/netlink.rs).
pub fn tcx_attach(prog: BorrowedFd, ifindex: u32, attach_type: u32) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type,
        ..Default::default()
    };
    // SAFETY: the attr holds no pointers.
    let ret = unsafe { bpf(BPF_LINK_CREATE, &mut attr) };
    owned("BPF_LINK_CREATE", ret).map_err(|e| e.err)
}

#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    /// Written by tcx queries whatever size the caller passed (bpf_mprog_query).
    revision: u64,
}

/// How many programs are attached at tcx `attach_type` of interface `ifindex`
/// (`BPF_PROG_QUERY`; `EINVAL` on kernels without tcx).
pub fn tcx_count(ifindex: u32, attach_type: u32) -> io::Result<u32> {
    let mut attr = QueryAttr {
        target_ifindex: ifindex,
        attach_type,
        ..Default::default()
    };
    // SAFETY: prog_ids is NULL, so the kernel only writes the counts into the attr.
    unsafe { bpf(BPF_PROG_QUERY, &mut attr) }?;
    Ok(attr.prog_cnt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem;
    use std::ptr::addr_of;

    macro_rules! offset {
        ($value:expr, $field:ident) => {
            addr_of!($value.$field) as usize - addr_of!($value) as usize
        };
    }

    /// Offsets from `union bpf_attr` in include/uapi/linux/bpf.h (6.18).
    #[test]
    fn attr_layouts_match_the_kernel() {
        let t = TestRunAttr::default();
        assert_eq!(mem::size_of::<TestRunAttr>(), 80);
        assert_eq!(offset!(t, data_in), 16);
        assert_eq!(offset!(t, data_out), 24);
        assert_eq!(offset!(t, repeat), 32);
        assert_eq!(offset!(t, ctx_size_in), 40);
        assert_eq!(offset!(t, ctx_in), 48);
        assert_eq!(offset!(t, ctx_out), 56);
        assert_eq!(offset!(t, flags), 64);
        assert_eq!(offset!(t, batch_size), 72);
        let l = LinkCreateAttr::default();
        assert_eq!(mem::size_of::<LinkCreateAttr>(), 32);
        assert_eq!(offset!(l, target_ifindex), 4);
        assert_eq!(offset!(l, attach_type), 8);
        assert_eq!(offset!(l, flags), 12);
        assert_eq!(offset!(l, relative_fd), 16);
        assert_eq!(offset!(l, expected_revision), 24);
        let q = QueryAttr::default();
        assert_eq!(offset!(q, prog_ids), 16);
        assert_eq!(offset!(q, prog_cnt), 24);
        assert_eq!(offset!(q, revision), 56);
    }
}
