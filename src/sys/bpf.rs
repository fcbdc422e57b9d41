//! The `bpf(2)` commands ksocks needs, one small function each.
//!
//! Each attr is a zeroed `#[repr(C)]` prefix of the kernel's `union bpf_attr`
//! (include/uapi/linux/bpf.h), with explicit padding; the size passed to the kernel is the
//! prefix's, so every later field reads as zero. Map operations go through [`Map`], which
//! remembers the key and value sizes so that the kernel never reads or writes past a
//! caller's buffer.

use super::syscall;
use std::ffi::CStr;
use std::fmt;
use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

// UAPI enum values, not in libc; from include/uapi/linux/bpf.h.
// enum bpf_cmd
const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_int = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_MAP_DELETE_ELEM: libc::c_int = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_int = 4;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_ATTACH: libc::c_int = 8;
const BPF_MAP_LOOKUP_BATCH: libc::c_int = 24;
// enum bpf_map_type
pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_MAP_TYPE_SOCKHASH: u32 = 18;
// enum bpf_prog_type
pub const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
pub const BPF_PROG_TYPE_SK_SKB: u32 = 14;
// enum bpf_attach_type
pub const BPF_SK_SKB_STREAM_PARSER: u32 = 4;
pub const BPF_SK_SKB_STREAM_VERDICT: u32 = 5;
// flag of BPF_MAP_UPDATE_ELEM: fail with EEXIST if the key is present (BPF_ANY = 0 would not)
pub const BPF_NOEXIST: u64 = 1;
/// flag of BPF_MAP_UPDATE_ELEM: fail with ENOENT unless the key is present
pub const BPF_EXIST: u64 = 2;
/// `map_flags` of a hash map whose elements are allocated on update and freed after an RCU
/// grace period, so a program never reads an element that an update is reusing.
pub const BPF_F_NO_PREALLOC: u32 = 1;
/// `src_reg` of a `ld_imm64` whose `imm` is a map fd.
pub const BPF_PSEUDO_MAP_FD: u8 = 1;
/// `BPF_OBJ_NAME_LEN`, including the terminating NUL.
const OBJ_NAME_LEN: usize = 16;
/// Verifier log buffer for a failed load; our programs' logs are a few KiB.
const LOG_SIZE: usize = 256 * 1024;

/// A failed `bpf()` command, naming it.
#[derive(Debug)]
pub struct SyscallError {
    pub call: &'static str,
    pub err: io::Error,
}

impl fmt::Display for SyscallError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "bpf({}): {}", self.call, self.err)
    }
}

/// A refused `BPF_PROG_LOAD`, with the verifier's log from a retry.
#[derive(Debug)]
pub struct LoadError {
    pub err: SyscallError,
    pub log: String,
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; OBJ_NAME_LEN],
}

/// For LOOKUP/UPDATE/DELETE/GET_NEXT_KEY; `value` doubles as `next_key`.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// For `BPF_MAP_LOOKUP_BATCH` (the `batch` member of the union).
#[repr(C)]
#[derive(Default)]
struct MapBatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Where a batch lookup resumes: an opaque token the kernel writes (a `u32` bucket index for
/// hash maps), kept as bytes so that byte order never matters.
pub type BatchToken = [u8; 8];

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; OBJ_NAME_LEN],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

/// `bpf(cmd, attr, sizeof attr)`.
///
/// # Safety
/// `attr` must be the attr struct of `cmd`, and every pointer in it must be valid for what
/// `cmd` does with it: reads of `key`/`value`/`insns`/`license`, writes of the lookup
/// `value`, `next_key` and the log buffer, each of the size the kernel expects.
pub(super) unsafe fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    let size = mem::size_of::<T>() as libc::c_uint;
    // SAFETY: `attr` is live for the call and `size` is its size; the caller vouches for
    // the pointers inside it.
    unsafe { syscall!(syscall(libc::SYS_bpf, cmd, attr as *mut T, size)) }
}

/// A user pointer as the kernel's `__aligned_u64` (also on 32-bit targets).
pub(super) fn ptr(p: *const u8) -> u64 {
    p as usize as u64
}

/// An object name: at most 15 bytes, NUL-padded.
fn name(s: &str) -> [u8; OBJ_NAME_LEN] {
    let mut out = [0; OBJ_NAME_LEN];
    let n = s.len().min(OBJ_NAME_LEN - 1);
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
    out
}

/// Wraps a descriptor a `bpf()` command just returned.
pub(super) fn owned(
    call: &'static str,
    ret: io::Result<libc::c_long>,
) -> Result<OwnedFd, SyscallError> {
    let fd = ret.map_err(|err| SyscallError { call, err })?;
    // SAFETY: on success the command returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A BPF map with fixed key and value sizes.
#[derive(Debug)]
pub struct Map {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

impl Map {
    /// `BPF_MAP_CREATE`.
    pub fn create(
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_name: &str,
    ) -> Result<Map, SyscallError> {
        Map::create_with_flags(map_type, key_size, value_size, max_entries, 0, map_name)
    }

    /// `BPF_MAP_CREATE` with `map_flags` (e.g. `BPF_F_NO_PREALLOC`).
    pub fn create_with_flags(
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        map_name: &str,
    ) -> Result<Map, SyscallError> {
        let mut attr = MapCreateAttr {
            map_type,
            key_size,
            value_size,
            max_entries,
            map_flags,
            map_name: name(map_name),
            ..Default::default()
        };
        // SAFETY: the attr holds no pointers.
        let fd = owned("BPF_MAP_CREATE", unsafe { bpf(BPF_MAP_CREATE, &mut attr) })?;
        Ok(Map {
            fd,
            key_size: key_size as usize,
            value_size: value_size as usize,
        })
    }

    /// `BPF_MAP_UPDATE_ELEM` with `BPF_ANY` or `BPF_NOEXIST`.
    pub fn update(&self, key: &[u8], value: &[u8], flags: u64) -> Result<(), SyscallError> {
        const CALL: &str = "BPF_MAP_UPDATE_ELEM";
        self.check(CALL, key, Some(value))?;
        let mut attr = self.attr(key.as_ptr(), value.as_ptr(), flags);
        // SAFETY: key and value are live slices of the map's key and value sizes.
        self.done(CALL, unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) })
    }

    /// `BPF_MAP_LOOKUP_ELEM` into `value`; `ENOENT` when absent.
    pub fn lookup(&self, key: &[u8], value: &mut [u8]) -> Result<(), SyscallError> {
        const CALL: &str = "BPF_MAP_LOOKUP_ELEM";
        self.check(CALL, key, Some(value))?;
        let mut attr = self.attr(key.as_ptr(), value.as_mut_ptr(), 0);
        // SAFETY: key is a live slice of the key size; value is a live, exclusively
        // borrowed slice of the value size, which is what the kernel writes.
        self.done(CALL, unsafe { bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) })
    }

    /// `BPF_MAP_DELETE_ELEM`; `ENOENT` when absent.
    pub fn delete(&self, key: &[u8]) -> Result<(), SyscallError> {
        const CALL: &str = "BPF_MAP_DELETE_ELEM";
        self.check(CALL, key, None)?;
        let mut attr = self.attr(key.as_ptr(), std::ptr::null(), 0);
        // SAFETY: key is a live slice of the key size.
        self.done(CALL, unsafe { bpf(BPF_MAP_DELETE_ELEM, &mut attr) })
    }

    /// `BPF_MAP_GET_NEXT_KEY`: the key after `key` (the first if `None`) into `next`;
    /// `ENOENT` after the last.
    pub fn next_key(&self, key: Option<&[u8]>, next: &mut [u8]) -> Result<(), SyscallError> {
        const CALL: &str = "BPF_MAP_GET_NEXT_KEY";
        self.check(CALL, next, None)?;
        let key = match key {
            Some(key) => {
                self.check(CALL, key, None)?;
                key.as_ptr()
            }
            None => std::ptr::null(), // start from the first key
        };
        let mut attr = self.attr(key, next.as_mut_ptr(), 0);
        // SAFETY: key is NULL or a live slice of the key size; next is a live, exclusively
        // borrowed slice of the key size, which is what the kernel writes.
        self.done(CALL, unsafe { bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) })
    }

    /// `BPF_MAP_LOOKUP_BATCH` (Linux >= 5.6): the entries after `token` (from the start if
    /// `None`), as many as fit in `keys` (a multiple of the key size) and `values`. Returns
    /// how many were written, the token to continue from, and whether the map ended.
    pub fn lookup_batch(
        &self,
        token: Option<&BatchToken>,
        keys: &mut [u8],
        values: &mut [u8],
    ) -> Result<(usize, BatchToken, bool), SyscallError> {
        const CALL: &str = "BPF_MAP_LOOKUP_BATCH";
        let n = keys.len() / self.key_size;
        if n == 0 || values.len() < n * self.value_size {
            let err = io::Error::new(io::ErrorKind::InvalidInput, "batch buffers too small");
            return Err(SyscallError { call: CALL, err });
        }
        let mut next: BatchToken = [0; 8];
        let mut attr = MapBatchAttr {
            in_batch: token.map_or(0, |t| ptr(t.as_ptr())),
            out_batch: ptr(next.as_mut_ptr()),
            keys: ptr(keys.as_mut_ptr()),
            values: ptr(values.as_mut_ptr()),
            count: n as u32,
            map_fd: self.fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: the tokens are live 8-byte buffers (the kernel uses 4); keys and values are
        // live, exclusively borrowed buffers for `count` keys and values, which is at most
        // what the kernel writes; it writes the number written back into `attr.count`.
        let ret = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        match ret {
            Ok(_) => Ok((attr.count as usize, next, false)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                Ok((attr.count as usize, next, true))
            }
            Err(err) => Err(SyscallError { call: CALL, err }),
        }
    }

    fn attr(&self, key: *const u8, value: *const u8, flags: u64) -> MapElemAttr {
        MapElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: ptr(key),
            value: ptr(value),
            flags,
            ..Default::default()
        }
    }

    fn check(
        &self,
        call: &'static str,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<(), SyscallError> {
        if key.len() == self.key_size && value.map_or(true, |v| v.len() == self.value_size) {
            return Ok(());
        }
        let err = io::Error::new(
            io::ErrorKind::InvalidInput,
            "key or value size differs from the map's",
        );
        Err(SyscallError { call, err })
    }

    fn done(&self, call: &'static str, ret: io::Result<libc::c_long>) -> Result<(), SyscallError> {
        ret.map(drop).map_err(|err| SyscallError { call, err })
    }
}

impl AsFd for Map {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// `BPF_PROG_LOAD` of `insns` (whole `struct bpf_insn`s in native byte order). On failure
/// it loads again with a verifier log and returns the first error with that log.
pub fn prog_load(
    prog_type: u32,
    expected_attach_type: u32,
    insns: &[u8],
    license: &CStr,
    prog_name: &str,
) -> Result<OwnedFd, LoadError> {
    const CALL: &str = "BPF_PROG_LOAD";
    if insns.len() % 8 != 0 {
        let err = io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a whole number of instructions",
        );
        return Err(LoadError {
            err: SyscallError { call: CALL, err },
            log: String::new(),
        });
    }
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: (insns.len() / 8) as u32,
        insns: ptr(insns.as_ptr()),
        license: ptr(license.as_ptr().cast()),
        prog_name: name(prog_name),
        expected_attach_type,
        ..Default::default()
    };
    let err = match load(&mut attr) {
        Ok(fd) => return Ok(fd),
        Err(err) => err,
    };
    let mut log = vec![0u8; LOG_SIZE];
    attr.log_level = 1;
    attr.log_size = LOG_SIZE as u32;
    attr.log_buf = ptr(log.as_mut_ptr());
    if let Ok(fd) = load(&mut attr) {
        return Ok(fd); // a transient failure; the retry worked
    }
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    Err(LoadError {
        err,
        log: String::from_utf8_lossy(&log[..end]).into_owned(),
    })
}

/// How often a load interrupted by a signal is tried (libbpf tries 5 times as well).
const LOAD_ATTEMPTS: usize = 5;

/// One `BPF_PROG_LOAD`, tried again when it fails with `EAGAIN`: the verifier gives up
/// with `EAGAIN` whenever a signal is pending, and a frozen-and-thawed task (cgroup freezer,
/// checkpointing hosts) sees one without any signal being sent.
fn load(attr: &mut ProgLoadAttr) -> Result<OwnedFd, SyscallError> {
    let mut attempt = 1;
    loop {
        // SAFETY: the attr's pointers (insns, license, and the log buffer when log_size is
        // set) are live for the call and of the lengths the attr gives.
        let ret = owned("BPF_PROG_LOAD", unsafe { bpf(BPF_PROG_LOAD, attr) });
        match ret {
            Err(e) if e.err.raw_os_error() == Some(libc::EAGAIN) && attempt < LOAD_ATTEMPTS => {
                attempt += 1
            }
            other => return other,
        }
    }
}

/// `BPF_PROG_ATTACH` of `prog` to the map `target` (sk_skb programs attach to a sockmap).
pub fn prog_attach(
    target: BorrowedFd,
    prog: BorrowedFd,
    attach_type: u32,
) -> Result<(), SyscallError> {
    let mut attr = ProgAttachAttr {
        target_fd: target.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        ..Default::default()
    };
    // SAFETY: the attr holds no pointers.
    let ret = unsafe { bpf(BPF_PROG_ATTACH, &mut attr) };
    ret.map(drop).map_err(|err| SyscallError {
        call: "BPF_PROG_ATTACH",
        err,
    })
}

/// Kernels before 5.11 charge BPF maps and programs to `RLIMIT_MEMLOCK` (often 64 KiB);
/// lift it as far as we may. Later kernels charge the memory cgroup and ignore it.
pub fn raise_memlock() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a live local the kernel writes.
    if unsafe { syscall!(getrlimit(libc::RLIMIT_MEMLOCK, &mut lim)) }.is_err() {
        return;
    }
    let inf = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    let hard = libc::rlimit {
        rlim_cur: lim.rlim_max,
        rlim_max: lim.rlim_max,
    };
    for want in [inf, hard] {
        // SAFETY: `want` is a live local the kernel reads.
        if unsafe { syscall!(setrlimit(libc::RLIMIT_MEMLOCK, &want)) }.is_ok() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr::addr_of;

    macro_rules! offset {
        ($value:expr, $field:ident) => {
            addr_of!($value.$field) as usize - addr_of!($value) as usize
        };
    }

    /// Without privileges a test skips, except under CI=true.
    fn skip(e: &SyscallError) -> bool {
        let ci = std::env::var("CI").as_deref() == Ok("true");
        let skip = e.err.raw_os_error() == Some(libc::EPERM) && !ci;
        if skip {
            eprintln!("skipped: {e} (run as root)");
        }
        skip
    }

    /// Sizes and offsets match `union bpf_attr` in include/uapi/linux/bpf.h (values from
    /// `offsetof` on the 6.x header).
    #[test]
    fn attr_layouts_match_the_kernel() {
        let m = MapCreateAttr::default();
        assert_eq!(mem::size_of::<MapCreateAttr>(), 44);
        assert_eq!(offset!(m, max_entries), 12);
        assert_eq!(offset!(m, map_flags), 16);
        assert_eq!(offset!(m, numa_node), 24);
        assert_eq!(offset!(m, map_name), 28);

        let e = MapElemAttr::default();
        assert_eq!(mem::size_of::<MapElemAttr>(), 32);
        assert_eq!(offset!(e, key), 8);
        assert_eq!(offset!(e, value), 16);
        assert_eq!(offset!(e, flags), 24);

        let p = ProgLoadAttr::default();
        assert_eq!(mem::size_of::<ProgLoadAttr>(), 72);
        assert_eq!(offset!(p, insn_cnt), 4);
        assert_eq!(offset!(p, insns), 8);
        assert_eq!(offset!(p, license), 16);
        assert_eq!(offset!(p, log_level), 24);
        assert_eq!(offset!(p, log_size), 28);
        assert_eq!(offset!(p, log_buf), 32);
        assert_eq!(offset!(p, kern_version), 40);
        assert_eq!(offset!(p, prog_flags), 44);
        assert_eq!(offset!(p, prog_name), 48);
        assert_eq!(offset!(p, prog_ifindex), 64);
        assert_eq!(offset!(p, expected_attach_type), 68);

        let b = MapBatchAttr::default();
        assert_eq!(mem::size_of::<MapBatchAttr>(), 56);
        assert_eq!(offset!(b, keys), 16);
        assert_eq!(offset!(b, values), 24);
        assert_eq!(offset!(b, count), 32);
        assert_eq!(offset!(b, map_fd), 36);
        assert_eq!(offset!(b, elem_flags), 40);
        assert_eq!(offset!(b, flags), 48);

        let a = ProgAttachAttr::default();
        assert_eq!(mem::size_of::<ProgAttachAttr>(), 16);
        assert_eq!(offset!(a, attach_bpf_fd), 4);
        assert_eq!(offset!(a, attach_type), 8);
        assert_eq!(offset!(a, attach_flags), 12);
    }

    /// Names are cut to 15 bytes and stay NUL-terminated.
    #[test]
    fn object_names_are_truncated() {
        assert_eq!(&name("ksocks_counters"), b"ksocks_counters\0");
        assert_eq!(&name("ksocks_counters_long"), b"ksocks_counters\0");
        assert_eq!(&name("a")[..2], b"a\0");
    }

    /// The kernel never sees a buffer of the wrong size.
    #[test]
    fn map_ops_check_sizes() {
        let map = match Map::create(BPF_MAP_TYPE_HASH, 8, 8, 4, "ksocks_test") {
            Ok(map) => map,
            Err(e) if skip(&e) => return,
            Err(e) => panic!("{e}"),
        };
        let e = map.update(&[0; 4], &[0; 8], BPF_NOEXIST).unwrap_err();
        assert_eq!(e.err.kind(), io::ErrorKind::InvalidInput);
        map.update(&1u64.to_ne_bytes(), &2u64.to_ne_bytes(), BPF_NOEXIST)
            .unwrap();
        let mut v = [0; 8];
        map.lookup(&1u64.to_ne_bytes(), &mut v).unwrap();
        assert_eq!(u64::from_ne_bytes(v), 2);
        let mut k = [0; 8];
        map.next_key(None, &mut k).unwrap();
        assert_eq!(u64::from_ne_bytes(k), 1);
        let end = map.next_key(Some(&k), &mut [0; 8]).unwrap_err();
        assert_eq!(end.err.raw_os_error(), Some(libc::ENOENT));
        map.delete(&1u64.to_ne_bytes()).unwrap();
        let gone = map.lookup(&1u64.to_ne_bytes(), &mut v).unwrap_err();
        assert_eq!(gone.err.raw_os_error(), Some(libc::ENOENT));
    }

    /// A refused program comes back with the first error and the verifier's log.
    #[test]
    fn refused_program_carries_the_log() {
        // `exit` with r0 never set. (BPF_JMP | BPF_EXIT; no registers, so byte order-free.)
        let insns = [0x95, 0, 0, 0, 0, 0, 0, 0];
        let license = c"GPL";
        match prog_load(BPF_PROG_TYPE_SK_SKB, 0, &insns, license, "ksocks_bad") {
            Ok(_) => panic!("the verifier accepted a program that returns garbage"),
            Err(e) if skip(&e.err) => {}
            Err(e) => {
                assert_eq!(e.err.err.raw_os_error(), Some(libc::EACCES), "{}", e.err);
                assert!(e.log.contains("R0 !read_ok"), "{}", e.log);
            }
        }
    }
}
