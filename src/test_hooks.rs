//! Test-only hooks, compiled in only with the `test-hooks` cargo feature (scripts/test enables
//! it; release builds and packages do not): each widens a kernel race window so that an
//! integration test hits it every time on a fast machine, where a slow router's CPU hits it
//! now and then.
//!
//! - `KSOCKS_TEST_OUTQ_WAIT_US=N`: a `SIOCOUTQ` read that finds unacknowledged bytes waits (at
//!   most N µs) until the peer acknowledges some of them and returns the new value. The ACK
//!   then always lands between that read and the `TCP_INFO` read before it (issue 15: an ACK
//!   there skewed the sockmap books and reset healthy connections).
//! - `KSOCKS_TEST_CLSACT=1`: tcsplice attaches with a clsact qdisc and filter even where tcx
//!   works, so the path of kernels before 6.6 runs here too.
//! - `KSOCKS_TEST_LATE_MS=N`: once a tcsplice connection is spliced, its client's entry goes
//!   back to OBSERVE for N ms, so the client's segments meanwhile reach the frozen socket, as
//!   a segment delayed between tc ingress and TCP across the handoff does (a preempted CPU;
//!   seen under qemu in the kernel matrix).

use std::sync::OnceLock;
use std::time::Duration;

/// How long a `SIOCOUTQ` read may wait for an ACK; `None` when the hook is off.
pub fn outq_wait() -> Option<Duration> {
    static WAIT: OnceLock<Option<Duration>> = OnceLock::new();
    *WAIT.get_or_init(|| {
        let us: u64 = std::env::var("KSOCKS_TEST_OUTQ_WAIT_US")
            .ok()?
            .parse()
            .ok()?;
        crate::error!("test hook: SIOCOUTQ reads wait up to {us} us for an ACK");
        Some(Duration::from_micros(us))
    })
}

/// Whether tcsplice must attach with clsact rather than tcx.
pub fn force_clsact() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let on = std::env::var("KSOCKS_TEST_CLSACT").is_ok_and(|v| v == "1");
        if on {
            crate::error!("test hook: tcsplice attaches with clsact");
        }
        on
    })
}

/// How long a spliced connection's client segments go to the frozen socket; `None`: off.
pub fn late() -> Option<Duration> {
    static LATE: OnceLock<Option<Duration>> = OnceLock::new();
    *LATE.get_or_init(|| {
        let ms: u64 = std::env::var("KSOCKS_TEST_LATE_MS").ok()?.parse().ok()?;
        crate::error!(
            "test hook: for {ms} ms after a handoff the client's segments reach the frozen socket"
        );
        Some(Duration::from_millis(ms))
    })
}
