//! The sockmap plane's start-up probe: a loopback pair of TCP connections spliced through
//! the kernel, bytes checked both ways, a FIN passed on by byte accounting while the other
//! direction keeps flowing, which redirect targets the kernel wakes (`wake`), and no map
//! entry left afterwards. Also the tests of the kernel objects against the running kernel.
//!
//! Invariant: the probe runs before any connection uses the maps (it counts every entry) and
//! is bounded in time (`SELF_TEST_TIME`).

use super::books::SendTotal;
use super::kernel::Kernel;
use crate::bpf;
use crate::sys::socket;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::thread;
use std::time::{Duration, Instant};

/// How long the start-up self-test may take.
const SELF_TEST_TIME: Duration = Duration::from_secs(2);

impl Kernel {
    /// Start-up probe: splices a loopback pair of TCP connections through the kernel, checks
    /// bytes both ways, a FIN passed on by byte accounting (KERNEL-NOTES s.1) while the
    /// other direction keeps flowing, which redirect targets are woken on write space (kept
    /// in `self.wakeup`), and that no map entry is left afterwards. Run it before any
    /// connection uses the maps (the entry check counts them all).
    pub fn self_test(&mut self) -> Result<(), bpf::Error> {
        let result = self
            .run_self_test(Instant::now() + SELF_TEST_TIME)
            .and_then(|()| self.probe_wakeup());
        let left = self.entries();
        self.wakeup = result.map_err(bpf::Error::SelfTest)?;
        match left {
            0 => Ok(()),
            n => Err(bpf::Error::SelfTest(format!("{n} map entries left behind"))),
        }
    }

    fn run_self_test(&self, deadline: Instant) -> Result<(), String> {
        let Loopback {
            mut c1,
            p1,
            p2,
            mut c2,
            k1,
            k2,
        } = loopback()?;
        let base1 = SendTotal::exact(0, p1.as_fd())?;
        let base2 = SendTotal::exact(0, p2.as_fd())?;
        self.pair(p1.as_fd(), k1, p2.as_fd(), k2)
            .map_err(ctx("pair"))?;
        let result = (|| {
            self.hook(p1.as_fd(), k1).map_err(ctx("hook"))?;
            self.hook(p2.as_fd(), k2).map_err(ctx("hook"))?;
            let (up, down) = (pattern(10_000, 3), pattern(20_000, 7));
            transfer(&mut c1, &mut c2, &up, deadline)?;
            transfer(&mut c2, &mut c1, &down[..15_000], deadline)?;
            c1.shutdown(Shutdown::Write).map_err(ctx("shutdown"))?;
            self.pass_fin(&p1, k1, 10_000, &p2, base2, deadline)?;
            expect_eof(&mut c2, deadline)?;
            // The other direction keeps flowing after the half-close.
            transfer(&mut c2, &mut c1, &down[15_000..], deadline)?;
            c2.shutdown(Shutdown::Write).map_err(ctx("shutdown"))?;
            self.pass_fin(&p2, k2, 20_000, &p1, base1, deadline)?;
            expect_eof(&mut c1, deadline)?;
            match (self.forwarded(k1), self.forwarded(k2)) {
                (10_000, 20_000) => Ok(()),
                (a, b) => Err(format!("counters {a}/{b}, expected 10000/20000")),
            }
        })();
        let _ = self.unhook(k1);
        let _ = self.unhook(k2);
        self.unpair(k1, k2);
        result
    }

    /// Passes on the FIN that follows `expected` bytes from `src`'s peer: waits until it
    /// arrived and everything before it has entered `dst`'s send path — the byte accounting
    /// of KERNEL-NOTES s.1, `bytes_received(src) - 1 == bytes_acked(dst) + outq(dst) -
    /// dst_base` — then shuts `dst` for writing. Polls every millisecond. (The event loop
    /// learns of the FIN from `EPOLLRDHUP` instead of knowing `expected`.)
    fn pass_fin(
        &self,
        src: &TcpStream,
        src_cookie: u64,
        expected: u64,
        dst: &TcpStream,
        dst_base: u64,
        deadline: Instant,
    ) -> Result<(), String> {
        loop {
            let received = socket::tcp_bytes(src.as_fd())
                .map_err(ctx("TCP_INFO"))?
                .received;
            // A lower bound (`SendTotal`) can only delay the FIN, never pass it on early.
            let sent = SendTotal::read(dst.as_fd())
                .map_err(ctx("TCP_INFO"))?
                .at_least()
                .saturating_sub(dst_base);
            let forwarded = self.forwarded(src_cookie);
            if sent > forwarded || forwarded > expected {
                return Err(format!("kernel duplicated bytes: {expected} sent, {forwarded} forwarded, {sent} queued"));
            }
            if received == expected + 1 && forwarded == expected && sent == expected {
                return dst.shutdown(Shutdown::Write).map_err(ctx("shutdown"));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "FIN not passed on in time: {expected} sent, {received} received (with FIN), {forwarded} forwarded, {sent} queued"
                ));
            }
            thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Two loopback connections c1 -> [p1 | p2] -> c2, like client -> ksocks -> server, with
/// the socket cookies of p1 and p2.
pub(super) struct Loopback {
    pub c1: TcpStream,
    pub p1: TcpStream,
    pub p2: TcpStream,
    pub c2: TcpStream,
    pub k1: u64,
    pub k2: u64,
}

pub(super) fn loopback() -> Result<Loopback, String> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(ctx("bind"))?;
    let addr = listener.local_addr().map_err(ctx("bind"))?;
    let c1 = TcpStream::connect(addr).map_err(ctx("connect"))?;
    let (p1, _) = listener.accept().map_err(ctx("accept"))?;
    let p2 = TcpStream::connect(addr).map_err(ctx("connect"))?;
    let (c2, _) = listener.accept().map_err(ctx("accept"))?;
    let k1 = socket::socket_cookie(p1.as_fd()).map_err(ctx("SO_COOKIE"))?;
    let k2 = socket::socket_cookie(p2.as_fd()).map_err(ctx("SO_COOKIE"))?;
    Ok(Loopback {
        c1,
        p1,
        p2,
        c2,
        k1,
        k2,
    })
}

pub(super) fn ctx(what: &'static str) -> impl Fn(io::Error) -> String {
    move |e| format!("{what}: {e}")
}

/// `len` bytes that reveal loss, duplication and reordering.
pub(super) fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ seed.wrapping_mul((i / 251) as u8))
        .collect()
}

/// Bounds blocking reads and writes on `s` by what is left until `deadline`.
pub(super) fn timeout(s: &TcpStream, deadline: Instant) -> Result<(), String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err("timed out".into());
    }
    s.set_read_timeout(Some(left)).map_err(ctx("SO_RCVTIMEO"))?;
    s.set_write_timeout(Some(left)).map_err(ctx("SO_SNDTIMEO"))
}

/// Writes `data` into `from` and checks `to` reads exactly it.
fn transfer(
    from: &mut TcpStream,
    to: &mut TcpStream,
    data: &[u8],
    deadline: Instant,
) -> Result<(), String> {
    timeout(from, deadline)?;
    from.write_all(data).map_err(ctx("send"))?;
    timeout(to, deadline)?;
    let mut got = vec![0; data.len()];
    to.read_exact(&mut got).map_err(ctx("receive"))?;
    match got == data {
        true => Ok(()),
        false => Err(format!("{} bytes arrived altered", data.len())),
    }
}

fn expect_eof(s: &mut TcpStream, deadline: Instant) -> Result<(), String> {
    timeout(s, deadline)?;
    match s.read(&mut [0; 1]).map_err(ctx("waiting for EOF"))? {
        0 => Ok(()),
        _ => Err("bytes after the FIN".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads, or skips when not permitted (never under CI=true).
    fn load_or_skip(max: u32) -> Option<Kernel> {
        match Kernel::load(max) {
            Ok(o) => Some(o),
            Err(bpf::Error::Syscall(ref e))
                if e.err.raw_os_error() == Some(libc::EPERM)
                    && std::env::var("CI").as_deref() != Ok("true") =>
            {
                eprintln!("skipped: {e} (run as root)");
                None
            }
            Err(e) => panic!("{e:#}"),
        }
    }

    /// A connected loopback pair (client, accepted).
    fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        (client, listener.accept().unwrap().0)
    }

    /// The start-up probe passes on this kernel and leaves the maps empty.
    #[test]
    fn load_and_self_test() {
        let Some(mut offload) = load_or_skip(64) else {
            return;
        };
        offload.self_test().unwrap();
        assert_eq!(offload.entries(), 0);
        offload.self_test().unwrap(); // repeatable
    }

    /// pair/hook/unhook/unpair add and remove exactly their entries; errors keep errno.
    #[test]
    fn map_entry_round_trips() {
        let Some(offload) = load_or_skip(64) else {
            return;
        };
        let ((_c1, p1), (_c2, p2)) = (tcp_pair(), tcp_pair());
        let (k1, k2) = (
            socket::socket_cookie(p1.as_fd()).unwrap(),
            socket::socket_cookie(p2.as_fd()).unwrap(),
        );
        offload.pair(p1.as_fd(), k1, p2.as_fd(), k2).unwrap();
        assert_eq!(offload.entries(), 4);
        let again = offload.pair(p1.as_fd(), k1, p2.as_fd(), k2).unwrap_err();
        assert_eq!(again.raw_os_error(), Some(libc::EEXIST));
        assert_eq!(
            offload.entries(),
            4,
            "a failed pair must not disturb the existing one"
        );
        offload.hook(p1.as_fd(), k1).unwrap();
        offload.hook(p2.as_fd(), k2).unwrap();
        assert_eq!(offload.entries(), 6);
        // 6.18 says EBUSY (the socket already has a verdict program) before EEXIST.
        let twice = offload.hook(p1.as_fd(), k1).unwrap_err().raw_os_error();
        assert!(
            matches!(twice, Some(libc::EBUSY | libc::EEXIST)),
            "{twice:?}"
        );
        offload.unhook(k1).unwrap();
        offload.unhook(k1).unwrap(); // absent is fine
        assert_eq!(offload.entries(), 5);
        offload.unpair(k1, k2);
        offload.unpair(k1, k2);
        assert_eq!(offload.entries(), 1, "p2 is still hooked");
        drop(p2); // the last close() removes a socket from every SOCKHASH
        assert_eq!(offload.entries(), 0);
    }

    /// The batch read of `counters` returns every paired socket, across several batches.
    #[test]
    fn counters_batch_read() {
        let Some(offload) = load_or_skip(2048) else {
            return;
        };
        crate::sys::raise_nofile().unwrap(); // 2,400 sockets
        let pairs: Vec<_> = (0..600).map(|_| (tcp_pair(), tcp_pair())).collect();
        let mut cookies = Vec::new();
        for ((_, p1), (_, p2)) in &pairs {
            let (k1, k2) = (
                socket::socket_cookie(p1.as_fd()).unwrap(),
                socket::socket_cookie(p2.as_fd()).unwrap(),
            );
            offload.pair(p1.as_fd(), k1, p2.as_fd(), k2).unwrap();
            cookies.extend([k1, k2]);
        }
        let mut seen = Vec::new();
        offload.read_counters(&mut seen, 512).unwrap();
        let mut keys: Vec<u64> = seen
            .iter()
            .map(|(k, v)| {
                assert_eq!(*v, 0);
                *k
            })
            .collect();
        keys.sort_unstable();
        cookies.sort_unstable();
        assert_eq!(
            keys, cookies,
            "1200 counters in three batches of at most 512"
        );
        for w in cookies.chunks(2) {
            offload.unpair(w[0], w[1]);
        }
        assert_eq!(offload.entries(), 0);
    }

    /// A pair that fails half way leaves nothing behind.
    #[test]
    fn failed_pair_is_undone() {
        let Some(offload) = load_or_skip(64) else {
            return;
        };
        let (_c1, p1) = tcp_pair();
        let k1 = socket::socket_cookie(p1.as_fd()).unwrap();
        let not_a_socket = std::fs::File::open("/dev/null").unwrap();
        assert!(offload
            .pair(p1.as_fd(), k1, not_a_socket.as_fd(), 1)
            .is_err());
        assert_eq!(offload.entries(), 0);
    }

    /// A full map refuses with E2BIG.
    #[test]
    fn full_map_says_e2big() {
        let Some(offload) = load_or_skip(2) else {
            return;
        };
        let ((_c1, p1), (_c2, p2)) = (tcp_pair(), tcp_pair());
        let ((_c3, p3), (_c4, p4)) = (tcp_pair(), tcp_pair());
        let k: Vec<u64> = [&p1, &p2, &p3, &p4]
            .iter()
            .map(|s| socket::socket_cookie(s.as_fd()).unwrap())
            .collect();
        offload.pair(p1.as_fd(), k[0], p2.as_fd(), k[1]).unwrap();
        let full = offload
            .pair(p3.as_fd(), k[2], p4.as_fd(), k[3])
            .unwrap_err();
        assert_eq!(full.raw_os_error(), Some(libc::E2BIG));
        offload.unpair(k[0], k[1]);
        assert_eq!(offload.entries(), 0);
    }

    /// Period of the bulk test's byte stream (not a power of two, so a misplaced skb shows).
    const PERIOD: usize = (1 << 20) + 7;

    /// Two copies of a pseudo-random block: stream byte `p` is `block[p % PERIOD]`, and any
    /// run of up to PERIOD bytes from position p is `block[p % PERIOD..][..len]`.
    fn block() -> Vec<u8> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut b: Vec<u8> = (0..PERIOD)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        b.extend_from_within(..);
        b
    }

    /// Writes `total` stream bytes, then shuts down for writing.
    fn source(
        mut s: TcpStream,
        total: u64,
        block: std::sync::Arc<Vec<u8>>,
    ) -> thread::JoinHandle<()> {
        thread::spawn(move || {
            let mut pos = 0u64;
            while pos < total {
                let n = (total - pos).min(1 << 20) as usize;
                let start = (pos % PERIOD as u64) as usize;
                s.write_all(&block[start..start + n]).unwrap();
                pos += n as u64;
            }
            s.shutdown(Shutdown::Write).unwrap();
        })
    }

    /// Reads until EOF, checking every byte against its position in the stream.
    fn sink(mut s: TcpStream, block: std::sync::Arc<Vec<u8>>) -> thread::JoinHandle<u64> {
        thread::spawn(move || {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut buf = vec![0; 1 << 20];
            let mut pos = 0u64;
            loop {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    return pos;
                }
                let start = (pos % PERIOD as u64) as usize;
                assert!(
                    buf[..n] == block[start..start + n],
                    "wrong bytes at offset {pos}"
                );
                pos += n as u64;
            }
        })
    }

    /// Moves `up` bytes c1 -> c2 and `down` bytes c2 -> c1 at once through a hooked pair,
    /// passes both FINs by byte accounting, and returns the elapsed time.
    fn bulk(offload: &Kernel, up: u64, down: u64) -> Duration {
        let ((c1, p1), (p2, c2)) = (tcp_pair(), tcp_pair()); // p2 connect()ed, like upstream
        let (k1, k2) = (
            socket::socket_cookie(p1.as_fd()).unwrap(),
            socket::socket_cookie(p2.as_fd()).unwrap(),
        );
        let (base1, base2) = (
            SendTotal::exact(0, p1.as_fd()).unwrap(),
            SendTotal::exact(0, p2.as_fd()).unwrap(),
        );
        offload.pair(p1.as_fd(), k1, p2.as_fd(), k2).unwrap();
        offload.hook(p1.as_fd(), k1).unwrap();
        offload.hook(p2.as_fd(), k2).unwrap();
        let block = std::sync::Arc::new(block());
        let start = Instant::now();
        let threads = [
            source(c1.try_clone().unwrap(), up, block.clone()),
            source(c2.try_clone().unwrap(), down, block.clone()),
        ];
        let (to_c2, to_c1) = (sink(c2, block.clone()), sink(c1, block));
        for t in threads {
            t.join().unwrap(); // each source wrote everything and sent its FIN
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        offload.pass_fin(&p1, k1, up, &p2, base2, deadline).unwrap();
        offload
            .pass_fin(&p2, k2, down, &p1, base1, deadline)
            .unwrap();
        assert_eq!(to_c2.join().unwrap(), up);
        assert_eq!(to_c1.join().unwrap(), down);
        let elapsed = start.elapsed();
        assert_eq!((offload.forwarded(k1), offload.forwarded(k2)), (up, down));
        offload.unhook(k1).unwrap();
        offload.unhook(k2).unwrap();
        offload.unpair(k1, k2);
        assert_eq!(offload.entries(), 0);
        elapsed
    }

    /// 64 MiB each way at once, every byte checked, both FINs passed on exactly.
    #[test]
    fn bulk_both_ways_is_exact() {
        let Some(offload) = load_or_skip(64) else {
            return;
        };
        bulk(&offload, 64 << 20, 64 << 20);
        bulk(&offload, 1, 0);
        bulk(&offload, 0, 3);
    }

    /// 1 GiB one way, every byte checked; prints the throughput. `cargo test --release --
    /// --ignored --nocapture one_gib`.
    #[test]
    #[ignore]
    fn one_gib() {
        let Some(offload) = load_or_skip(64) else {
            return;
        };
        let size = 1u64 << 30;
        let t = bulk(&offload, size, 0);
        eprintln!(
            "1 GiB in {:.3} s: {:.1} Gbit/s",
            t.as_secs_f64(),
            size as f64 * 8.0 / t.as_secs_f64() / 1e9
        );
    }

    /// Baseline for `one_gib`: the same harness over one plain loopback connection.
    #[test]
    #[ignore]
    fn one_gib_direct() {
        let (c, s) = tcp_pair();
        let block = std::sync::Arc::new(block());
        let start = Instant::now();
        let src = source(c, 1 << 30, block.clone());
        assert_eq!(sink(s, block).join().unwrap(), 1 << 30);
        src.join().unwrap();
        let t = start.elapsed();
        eprintln!(
            "direct: 1 GiB in {:.3} s: {:.1} Gbit/s",
            t.as_secs_f64(),
            8.0 * (1u64 << 30) as f64 / t.as_secs_f64() / 1e9
        );
    }
}
