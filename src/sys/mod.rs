//! The only module that contains `unsafe`: thin wrappers over the Linux syscalls ksocks makes.
//!
//! Invariant: every file descriptor is an `OwnedFd` from the moment the kernel returns it and is
//! lent out as `BorrowedFd`; every `unsafe` block wraps exactly one call and says why it is sound.
//! Callers above this module never see raw pointers.

#[cfg(test)]
pub mod alloc_count;
pub mod bpf;
pub mod epoll;
pub mod ethtool;
pub mod netlink;
pub mod repair;
pub mod socket;
pub mod tc;
pub mod udp;

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Calls a `libc` function and turns the C convention (`-1` and `errno`) into `io::Result`.
/// The call site must be inside an `unsafe` block with a `// SAFETY:` comment.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        let res = libc::$fn($($arg),*);
        if res == -1 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}
pub(crate) use syscall;

/// Wraps a descriptor the kernel just returned.
fn owned(fd: libc::c_int) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful syscall and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `SIGPIPE` would kill the process on a write to a reset socket; we want `EPIPE` instead.
pub fn ignore_sigpipe() {
    // SAFETY: installing SIG_IGN for SIGPIPE has no memory-safety preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// Blocks `signals` for the process and returns a non-blocking signalfd that reports them.
pub fn signalfd(signals: &[libc::c_int]) -> io::Result<OwnedFd> {
    // SAFETY: an all-zero sigset_t is a valid value that sigemptyset then initialises.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t.
    unsafe { syscall!(sigemptyset(&mut set))? };
    for &sig in signals {
        // SAFETY: `set` is an initialised sigset_t and `sig` a valid signal number.
        unsafe { syscall!(sigaddset(&mut set, sig))? };
    }
    // SAFETY: `set` is initialised; the old mask is not requested (null).
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: `set` is initialised; -1 asks for a new descriptor.
    let fd = unsafe { syscall!(signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC))? };
    Ok(owned(fd))
}

/// Reads one pending signal number from a signalfd, `None` when there is none.
pub fn read_signal(fd: BorrowedFd) -> io::Result<Option<u32>> {
    // SAFETY: signalfd_siginfo is plain old data; all-zero is a valid value.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: `info` is a writable buffer of exactly `size` bytes.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    match n {
        -1 => {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::WouldBlock {
                Ok(None)
            } else {
                Err(err)
            }
        }
        n if n as usize == size => Ok(Some(info.ssi_signo)),
        _ => Ok(None),
    }
}

/// Raises `RLIMIT_NOFILE`'s soft value to its hard value; returns the new soft value.
pub fn raise_nofile() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    unsafe { syscall!(getrlimit(libc::RLIMIT_NOFILE, &mut lim))? };
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit whose soft value does not exceed the hard one.
        unsafe { syscall!(setrlimit(libc::RLIMIT_NOFILE, &lim))? };
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is 32 bits on some 32-bit targets
    Ok(lim.rlim_cur as u64)
}

/// A pipe pair, both ends non-blocking, for `splice(2)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a writable array of two ints.
    unsafe { syscall!(pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC))? };
    Ok((owned(fds[0]), owned(fds[1])))
}

/// Sets a pipe's capacity (`F_SETPIPE_SZ`); the kernel rounds up to a power-of-two pages.
pub fn set_pipe_size(fd: BorrowedFd, bytes: usize) -> io::Result<()> {
    // SAFETY: F_SETPIPE_SZ takes an int argument and touches no memory of ours.
    unsafe {
        syscall!(fcntl(
            fd.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            bytes as libc::c_int
        ))?
    };
    Ok(())
}

/// Moves up to `len` bytes from `from` to `to` inside the kernel without blocking.
pub fn splice(from: BorrowedFd, to: BorrowedFd, len: usize) -> io::Result<usize> {
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    let null = std::ptr::null_mut();
    // SAFETY: null offsets are allowed for pipes and sockets; no memory of ours is passed.
    let n = unsafe { libc::splice(from.as_raw_fd(), null, to.as_raw_fd(), null, len, flags) };
    if n == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Non-blocking-agnostic `read(2)` (pipes); `Ok(0)` is end of file.
pub fn read(fd: BorrowedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a writable buffer of `buf.len()` bytes.
    let n = unsafe { syscall!(read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()))? };
    Ok(n as usize)
}

/// `write(2)` (pipes).
pub fn write(fd: BorrowedFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a readable buffer of `buf.len()` bytes.
    let n = unsafe { syscall!(write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()))? };
    Ok(n as usize)
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a writable timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// The user and group to drop to with `--user`.
pub struct Account {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

/// Looks up a user name in the password database.
pub fn lookup_user(name: &str) -> io::Result<Option<Account>> {
    let cname = std::ffi::CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: `cname` is a valid NUL-terminated string; the result is read before any other
    // getpw* call can overwrite it (single-threaded at start-up).
    let pw = unsafe { libc::getpwnam(cname.as_ptr()) };
    if pw.is_null() {
        return Ok(None);
    }
    // SAFETY: `pw` is non-null and points to libc's static passwd record.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok(Some(Account { uid, gid }))
}

/// Capabilities (include/uapi/linux/capability.h; not exported by `libc`).
pub mod cap {
    /// Binding ports below 1024 (UDP reply sockets for DNS and other well-known ports).
    pub const NET_BIND_SERVICE: u32 = 10;
    /// TCP_REPAIR, IP_TRANSPARENT, ctnetlink, tc filters.
    pub const NET_ADMIN: u32 = 12;
    /// IP_TRANSPARENT (either this or NET_ADMIN).
    pub const NET_RAW: u32 = 13;
}

/// Drops to `account`: supplementary groups cleared, then gid, then uid. Leaving uid 0 clears
/// every capability, which is what `--user` promises, except those in `keep`, which stay
/// permitted and effective (`PR_SET_KEEPCAPS` across the `setuid`, then `capset`): the ones
/// the chosen features need after start-up, and no others.
pub fn drop_privileges(account: &Account, keep: &[u32]) -> io::Result<()> {
    // SAFETY: an empty group list with a null pointer is allowed.
    unsafe { syscall!(setgroups(0, std::ptr::null()))? };
    // SAFETY: plain integer argument.
    unsafe { syscall!(setgid(account.gid))? };
    if !keep.is_empty() {
        // SAFETY: PR_SET_KEEPCAPS takes one integer argument; the rest are ignored.
        unsafe { syscall!(prctl(libc::PR_SET_KEEPCAPS, 1 as libc::c_ulong, 0, 0, 0))? };
    }
    // SAFETY: plain integer argument.
    unsafe { syscall!(setuid(account.uid))? };
    if keep.is_empty() {
        return Ok(());
    }
    // struct __user_cap_header_struct / __user_cap_data_struct, version 3: two 32-bit words.
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    for &c in keep {
        let d = &mut data[(c / 32) as usize % 2];
        d.effective |= 1 << (c % 32);
        d.permitted |= 1 << (c % 32);
    }
    // SAFETY: `header` and `data` are live locals of the layouts capset(2) reads for
    // _LINUX_CAPABILITY_VERSION_3.
    unsafe {
        syscall!(syscall(
            libc::SYS_capset,
            &mut header as *mut Header,
            data.as_ptr()
        ))?
    };
    // SAFETY: PR_SET_KEEPCAPS takes one integer argument; the rest are ignored.
    unsafe { syscall!(prctl(libc::PR_SET_KEEPCAPS, 0 as libc::c_ulong, 0, 0, 0))? };
    Ok(())
}
