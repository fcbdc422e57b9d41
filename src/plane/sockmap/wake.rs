//! Whether the kernel wakes the psock worker that sends redirected bytes into a socket once
//! that socket's send buffer has room again; the start-up probe that finds out, and the kick
//! that wakes a worker by hand.
//!
//! When that worker (`sk_psock_backlog`, net/core/skmsg.c) finds the destination's send
//! buffer full, it keeps the skb and returns. Linux 5.10 runs it again only when another skb
//! is redirected to the socket or from the socket's write-space callback, and the callback is
//! the psock's (`sk_psock_write_space`) only on a socket that joined a map with programs
//! (`sk_psock_start_strp`, our `hook`). A socket that is only a redirect target keeps TCP's
//! own callback: once the last skb is redirected to it, the rest stays in the kernel for ever
//! (the 5.10 stall of the kernel matrix). Later kernels retry the worker every jiffy while the
//! buffer is full (`schedule_delayed_work(&psock->work, 1)`, upstream 29173d07f798).
//!
//! Invariant: the probe decides from bytes that arrive, never from the kernel's version, and
//! any doubt (a timeout, a slow machine) answers "not woken", which only keeps more bytes in
//! userspace.

use super::books::SendTotal;
use super::kernel::Kernel;
use super::selftest::{ctx, loopback, pattern, timeout, Loopback};
use crate::sys::socket;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::thread;
use std::time::{Duration, Instant};

/// Bytes the probe redirects: far more than the target's send buffer (locked at `TARGET_SNDBUF`)
/// and its peer's initial receive window can hold, so the worker must meet a full buffer
/// (64 KiB entered before it stopped, on 6.18).
const PROBE_BYTES: usize = 256 << 10;
const TARGET_SNDBUF: i32 = 16 << 10;
/// The target's send queue is taken as settled (the worker stopped on a full buffer) after
/// this long without change.
const SETTLE: Duration = Duration::from_millis(20);
/// Once the peer reads, bytes must keep arriving with gaps no longer than this.
const QUIET: Duration = Duration::from_millis(300);
/// How long each of the probe's two transfers may take.
const PROBE_TIME: Duration = Duration::from_secs(3);

/// What the start-up probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wakeup {
    /// Every redirect target is woken (the kernel retries a full socket): no rule needed.
    Always,
    /// Only sockets that joined `hook` once are woken (Linux 5.10): a direction may run in the
    /// kernel only towards such a socket.
    HookedOnly,
}

/// Runs the write-space callback of `fd` (`do_tcp_setsockopt`, TCP_NOTSENT_LOWAT calls
/// `sk->sk_write_space`): on a socket that joined `hook`, that schedules its psock worker.
/// ksocks never sets this option, so writing 0 (the sysctl's value) changes nothing else.
pub fn kick_write_space(fd: BorrowedFd) {
    let _ = socket::set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, 0);
}

impl Kernel {
    /// Probes which redirect targets this kernel wakes: one never hooked first; if that one
    /// is not, one that joined `hook` and left it (what ksocks' rule relies on then). `Err`
    /// if even that one is not woken, or the probe itself failed.
    pub(super) fn probe_wakeup(&self) -> Result<Wakeup, String> {
        if self.woken(false, Instant::now() + PROBE_TIME)? {
            return Ok(Wakeup::Always);
        }
        match self.woken(true, Instant::now() + PROBE_TIME)? {
            true => Ok(Wakeup::HookedOnly),
            false => Err("the kernel does not wake a redirect target when its send buffer frees, even one that joined the hook map".into()),
        }
    }

    /// c2 -> p2 (hooked) => p1 (`armed`: hooked and unhooked first) -> c1: fills p1 while c1
    /// does not read, waits until p1's worker has stopped on the full buffer with bytes left,
    /// then reads c1. Woken when every byte arrives, exact.
    fn woken(&self, armed: bool, deadline: Instant) -> Result<bool, String> {
        let Loopback {
            mut c1,
            p1,
            p2,
            mut c2,
            k1,
            k2,
        } = loopback()?;
        socket::set_int_opt(p1.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, TARGET_SNDBUF)
            .map_err(ctx("SO_SNDBUF"))?;
        let base = SendTotal::exact(0, p1.as_fd())?;
        self.pair(p1.as_fd(), k1, p2.as_fd(), k2)
            .map_err(ctx("pair"))?;
        let result = (|| {
            if armed {
                self.hook(p1.as_fd(), k1).map_err(ctx("hook"))?;
                self.unhook(k1).map_err(ctx("unhook"))?;
            }
            self.hook(p2.as_fd(), k2).map_err(ctx("hook"))?;
            let data = pattern(PROBE_BYTES, 11);
            timeout(&c2, deadline)?;
            c2.write_all(&data).map_err(ctx("send"))?;
            let entered = || -> io::Result<u64> {
                Ok(SendTotal::read(p1.as_fd())?.at_least().saturating_sub(base))
            };
            // Until everything was redirected and p1's queue stopped growing.
            let (mut last, mut since) = (u64::MAX, Instant::now());
            loop {
                let now = Instant::now();
                let n = entered().map_err(ctx("send queue counters"))?;
                if n != last {
                    (last, since) = (n, now);
                } else if self.forwarded(k2) == PROBE_BYTES as u64 && now - since >= SETTLE {
                    break;
                }
                if now >= deadline {
                    return Ok(false); // a slow machine: not proven
                }
                thread::sleep(Duration::from_millis(2));
            }
            if last >= PROBE_BYTES as u64 {
                return Ok(false); // never met a full buffer: not proven
            }
            // Only the peer reading can make room now; no other skb will be redirected.
            let mut got = Vec::with_capacity(PROBE_BYTES);
            let mut buf = vec![0; 64 << 10];
            while got.len() < PROBE_BYTES {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(false);
                }
                c1.set_read_timeout(Some(left.min(QUIET)))
                    .map_err(ctx("SO_RCVTIMEO"))?;
                match c1.read(&mut buf) {
                    Ok(0) => return Err("the probe's connection closed".into()),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        return Ok(false)
                    }
                    Err(e) => return Err(format!("receive: {e}")),
                }
            }
            match got == data {
                true => Ok(true),
                false => Err("the probe's bytes arrived altered".into()),
            }
        })();
        let _ = self.unhook(k2);
        let _ = self.unhook(k1);
        self.unpair(k1, k2);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both probes run to an answer on this kernel, and a target that joined the hook map is
    /// woken (what the plane's rule relies on where unhooked ones are not; the kernel matrix
    /// shows 5.10 answering `HookedOnly`).
    #[test]
    fn probe_answers() {
        let mut k = match Kernel::load(64) {
            Ok(k) => k,
            Err(crate::bpf::Error::Syscall(ref e))
                if e.err.raw_os_error() == Some(libc::EPERM)
                    && std::env::var("CI").as_deref() != Ok("true") =>
            {
                eprintln!("skipped: {e} (run as root)");
                return;
            }
            Err(e) => panic!("{e:#}"),
        };
        let t = Instant::now();
        let unhooked = k.woken(false, Instant::now() + PROBE_TIME).unwrap();
        let hooked = k.woken(true, Instant::now() + PROBE_TIME).unwrap();
        eprintln!(
            "woken: unhooked target {unhooked}, hooked once {hooked}, {:?}",
            t.elapsed()
        );
        assert!(hooked, "a target that joined the hook map was not woken");
        k.self_test().unwrap();
        assert_eq!(k.wakeup == Wakeup::Always, unhooked);
        assert_eq!(k.entries(), 0);
    }
}
