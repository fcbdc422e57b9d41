//! Namespace harness for the integration tests: a client -> router -> server topology in three
//! network namespaces, the real `ksocks` binary running in the router, and traffic helpers that
//! check every byte.
//!
//! Invariants: every namespace and process a test creates is removed by a `Drop` guard, also when
//! the test panics; every wait is bounded in time; only addresses from 198.18.0.0/15 and
//! 2001:db8::/32 are used, and only inside namespaces created here.
#![allow(dead_code)] // each test crate uses a different subset of the helpers
pub mod cases;
pub mod frame;
pub mod peers;
mod process;
pub mod splice;
mod topology;
mod traffic;
pub mod udp;

pub use process::*;
pub use topology::*;
pub use traffic::*;

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The ksocks binary under test.
pub const KSOCKS: &str = env!("CARGO_BIN_EXE_ksocks");
/// Default bound for any single socket operation in a test.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Prerequisites

/// True when the test can run. Without root, `ip` or `nft`: outside CI prints a SKIP line and
/// returns false; with `CI=true` panics, because CI must never silently skip.
pub fn require_root() -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root");
    }
    for tool in ["ip", "nft"] {
        let ok = Command::new(tool)
            .arg(if tool == "ip" { "-V" } else { "--version" })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            missing.push(tool);
        }
    }
    prerequisites(
        &missing,
        "network namespace tests need",
        "",
        "run as root with iproute2 and nftables installed",
    )
}

/// The verdict of a `require_*` check: true when nothing is `missing`. Otherwise outside CI
/// prints `SKIP: <need> <missing>; <hint>` and returns false; with `CI=true` panics, adding
/// `ci_note` to the reason.
pub fn prerequisites(missing: &[&str], need: &str, ci_note: &str, hint: &str) -> bool {
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{need} {}", missing.join(", "));
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true: a missing prerequisite is a failure{ci_note})");
    }
    eprintln!("SKIP: {msg}; {hint}");
    false
}

/// Raises the soft RLIMIT_NOFILE of the test process to the hard limit (1,000 connections need
/// 2,000+ descriptors on the client and server side together).
pub fn raise_nofile() -> libc::rlim_t {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: lim is a valid rlimit with cur <= max.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    lim.rlim_cur
}

// ---------------------------------------------------------------------------------------------
// Socket helpers

pub fn with_timeouts(s: &TcpStream, t: Duration) {
    s.set_read_timeout(Some(t)).expect("read timeout");
    s.set_write_timeout(Some(t)).expect("write timeout");
}

/// Accepts one connection, waiting at most `t`; the stream gets the default I/O timeouts.
pub fn accept_timeout(l: &TcpListener, t: Duration) -> io::Result<TcpStream> {
    let mut pfd = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let end = Instant::now() + t;
    let rc = loop {
        let left = end.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: pfd is a valid pollfd array of length 1 for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc >= 0 {
            break rc;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted || left.is_zero() {
            return Err(e);
        }
    };
    if rc == 0 {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "accept timed out"));
    }
    let (s, _) = l.accept()?;
    with_timeouts(&s, IO_TIMEOUT);
    Ok(s)
}

/// Makes the next close of `s` send a RST (SO_LINGER with a zero timeout).
pub fn set_linger_zero(s: &TcpStream) {
    let lg = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: lg is a valid linger struct and the length matches; the fd is owned by `s`.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &lg as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", io::Error::last_os_error());
}

/// Sets SO_RCVBUF or SO_SNDBUF (fixing the size disables autotuning on that socket).
pub fn set_buf(s: &TcpStream, opt: libc::c_int, bytes: usize) {
    let v = bytes as libc::c_int;
    // SAFETY: v is a valid c_int and the length matches; the fd is owned by `s`.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt: {}", io::Error::last_os_error());
}

/// Joins a thread, re-raising its panic with the thread's message.
pub fn join<T>(h: JoinHandle<T>) -> T {
    match h.join() {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e),
    }
}

/// Polls `f` every 20 ms until it returns true or `t` passes.
pub fn wait_until(t: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + t;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}
