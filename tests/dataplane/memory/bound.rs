//! The bound a stalled connection must keep and how it is measured: the TCP buffer limits the
//! memory tests pin, the test parameters (connections, bytes offered, windows, budget), the
//! socket memory one path may hold (`path_capacity`), and machine-wide readings of the kernel
//! memory the stalled connections take (`MemSample`).

use crate::common::*;
use crate::{KIB, MIB};
use std::thread;
use std::time::Duration;

/// Pins the TCP buffer limits in all three namespaces to the values the memory bound below is
/// computed from. They are this kernel's defaults (6.18: tcp_rmem max 32 MiB, tcp_wmem max
/// 4 MiB); pinning them keeps the bound true should a machine's sysctl.conf differ.
pub(super) fn pin_tcp_buffers(topo: &Topology) {
    for ns in [&topo.client, &topo.router, &topo.server] {
        Topology::in_ns(ns, || {
            std::fs::write("/proc/sys/net/ipv4/tcp_rmem", "4096 131072 33554432")?;
            std::fs::write("/proc/sys/net/ipv4/tcp_wmem", "4096 16384 4194304")
        })
        .join()
        .expect("sysctl thread")
        .expect("pin tcp_rmem/tcp_wmem");
    }
}

/// tcp_rmem max, tcp_wmem max as pinned by `pin_tcp_buffers`.
const RMEM_MAX: u64 = 32 * MIB;
const WMEM_MAX: u64 = 4 * MIB;
/// SO_SNDBUF / SO_RCVBUF of the test's own endpoints (the kernel doubles it).
pub(super) const END_BUF: u64 = 256 * KIB;
/// The budget the tests give ksocks.
pub(super) const INFLIGHT_MAX: u64 = MIB;
/// Stalled connections per test: the memory they hold grows with their number, the noise of a
/// machine-wide measurement does not (see `MemSample`).
pub(super) const CONNS: u64 = 8;
/// What each sender offers: far more than fits in the buffers between sender and receiver.
pub(super) const OFFERED: u64 = 192 * MIB;
/// The never-reading receivers hold still this long; the slow ones read at `SLOW_RATE` each.
pub(super) const WINDOW: Duration = Duration::from_secs(5);
pub(super) const SLOW_WINDOW: Duration = Duration::from_secs(4);
pub(super) const SLOW_RATE: f64 = 3_000_000.0;
/// Socket memory one connection's path may hold, i.e. the most a stalled connection can queue,
/// in bytes. Download (server -> client; upload is the mirror image, the same sum):
///
/// ```text
///   server SO_SNDBUF (2 x 256 KiB)                                    0.5 MiB
/// + ksocks' upstream socket receive queue, autotuned up to tcp_rmem max   32 MiB
/// + sockmap: the client socket's psock queue, kept under --inflight-max by pausing the
///   source; polled so that at most another half budget arrives between two polls, and its
///   skbs cost up to ~2x their payload: 2 x 1.5 x 1 MiB                   3 MiB
///   (splice: one pipe per direction, at most 1 MiB; copy: a 16 KiB buffer)
/// + sockmap: the budget is enforced by polling the kernel's counters (at most 5 ms apart
///   while bytes move); the kernel keeps moving bytes while ksocks waits for a CPU, so a
///   source can overshoot by what it sends in that time — up to 12 MB seen at a connection's
///   first poll with 16 busy peers on 2 cores                        16 MiB
/// + ksocks' client socket send queue, autotuned up to tcp_wmem max      4 MiB
///   (sockmap: the tests pass `--sndbuf 0`, ksocks' default since 3de798f; with
///   `--sndbuf N` SO_SNDBUFFORCE and the kernel's doubling allow 2 x N here)
/// + client SO_RCVBUF (2 x 256 KiB)                                     0.5 MiB
/// = 56 MiB for sockmap, 38 MiB for splice, 37 MiB for copy.
/// ```
///
/// Socket queues are limited by truesize, so this is memory, not just payload, and it bounds
/// the payload too: a sender can be at most this far ahead of its receiver (the exact,
/// noise-free assertion). The memory assertion allows 24 MiB more per connection for what the
/// machine-wide measurement cannot separate (see `MemSample`). A proxy without backpressure
/// queues everything the senders offer — KERNEL-NOTES s.6: 3.3 GB in 8 s behind one reader;
/// here all 8 x 192 MiB within a few seconds — and fails both bounds (checked with
/// `KSOCKS_TEST_INFLIGHT_MAX=4294967296`).
pub(super) fn path_capacity(plane: &str) -> u64 {
    let (inflight, sndq) = match plane {
        "sockmap" => (3 * INFLIGHT_MAX + POLL_OVERSHOOT, WMEM_MAX),
        "splice" => (MIB, WMEM_MAX),
        _ => (16 * KIB, WMEM_MAX),
    };
    2 * END_BUF + RMEM_MAX + inflight + sndq + 2 * END_BUF
}
pub(super) const MEM_SLACK: u64 = 24 * MIB;
/// See `path_capacity`: what a source can send past the budget between two polls.
const POLL_OVERSHOOT: u64 = 16 * MIB;
/// ksocks' RSS may grow by this much at most (its userspace buffers are 16 KiB per direction).
pub(super) const RSS_GROWTH_KIB: u64 = 8 * 1024;

/// One reading of `/proc/meminfo` (plus the per-CPU free page lists), in KiB.
///
/// The figure the tests assert on is the kernel memory the stalled connections hold: the drop
/// in `MemAvailable` (+ pages on the per-CPU free lists, free memory that `MemAvailable` does
/// not count and that swings by 100+ MiB here) not explained by a rise of `AnonPages` (process
/// heaps — ksocks' own, checked separately through its RSS, the test's, a compiler next door —
/// move both by the same amount; kernel socket and psock queues move only the first).
///
/// On a shared, busy machine other kernel users (other tests' sockets) still move it by tens
/// of MiB within seconds, in steps. So it is measured twice, independently: taken from a
/// baseline before the connections (median over the second half of the window), and released
/// between the end of the window and the moment all connections are closed and ksocks idle;
/// the smaller of the two, divided by the number of connections, is compared with the bound.
/// Real queues show in both; a step of noise shows in one of them only. The exact figure, free
/// of noise, is the senders': no path can hold more than its sender wrote.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct MemSample {
    avail: i64,
    anon: i64,
}

pub(super) fn meminfo() -> MemSample {
    let s = std::fs::read_to_string("/proc/meminfo").expect("read /proc/meminfo");
    let field = |name: &str| -> i64 {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("/proc/meminfo has no {name}"))
    };
    // The per-CPU page lists: `count:` lines of each zone's pagesets, in pages.
    let zi = std::fs::read_to_string("/proc/zoneinfo").unwrap_or_default();
    let pcp: i64 = zi
        .lines()
        .filter_map(|l| l.trim().strip_prefix("count:"))
        .filter_map(|v| v.trim().parse::<i64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let page_kib = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as i64 / 1024;
    MemSample {
        avail: field("MemAvailable:") + pcp * page_kib,
        anon: field("AnonPages:"),
    }
}

/// Kernel memory taken between two samples, KiB.
pub(super) fn taken(from: &MemSample, to: &MemSample) -> i64 {
    (from.avail - to.avail) - (to.anon - from.anon)
}

pub(super) fn median(mut v: Vec<i64>) -> i64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[v.len() / 2]
}

pub(super) fn median_sample(s: &[MemSample]) -> MemSample {
    MemSample {
        avail: median(s.iter().map(|m| m.avail).collect()),
        anon: median(s.iter().map(|m| m.anon).collect()),
    }
}

/// Median of 7 samples 40 ms apart, per field.
pub(super) fn mem_baseline() -> MemSample {
    let mut s = Vec::new();
    for _ in 0..7 {
        s.push(meminfo());
        thread::sleep(Duration::from_millis(40));
    }
    median_sample(&s)
}
