//! The harness every proxy test runs under: the `Setup` trait (a test's ksocks and its peer's
//! output), `checked` (after the body ksocks must still run and hold nothing; on failure the
//! logs are printed and saved), and the addresses of the `--socks` listeners.

use crate::common::peers::*;
use crate::common::*;
use crate::SOCKS_PORT;
use std::net::{IpAddr, SocketAddr};

/// `[v6]:port` or `v4:port`.
pub(crate) fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// The `--socks` listener arguments: the router's client-side address in both families.
pub(crate) fn socks_listen_args(topo: &Topology) -> Vec<String> {
    vec![
        "-s".into(),
        sa(topo.router_ip(Family::V4), SOCKS_PORT).to_string(),
        "-s".into(),
        sa(topo.router_ip(Family::V6), SOCKS_PORT).to_string(),
    ]
}

/// A running test setup: its ksocks, and the output of whatever else it runs.
pub(crate) trait Setup {
    fn ks(&mut self) -> &mut Ksocks;
    /// The peer it runs, if any.
    fn peer(&self) -> Option<&Peer> {
        None
    }
    /// Output of the peer (empty when there is none).
    fn peer_output(&self) -> String {
        self.peer()
            .map(|p| format!("\n--- {} output ---\n{}", p.what, p.log()))
            .unwrap_or_default()
    }
}

/// Runs `body`, then checks that ksocks still runs and holds nothing; on failure prints
/// ksocks' log tail and the peers' output and saves the whole ksocks log under `target/tmp/`
/// before the panic propagates.
pub(crate) fn checked<S: Setup>(setup: &mut S, name: &str, body: impl FnOnce(&mut S)) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        body(setup);
        let ks = setup.ks();
        assert!(ks.is_running(), "ksocks exited; log:\n{}", ks.log_tail(30));
        ks.assert_idle();
    }));
    if let Err(e) = r {
        let peers = setup.peer_output();
        let ks = setup.ks();
        let path = format!("{}/ksocks-proxy-{name}.log", env!("CARGO_TARGET_TMPDIR"));
        let saved = match std::fs::write(&path, ks.log()) {
            Ok(()) => format!("full ksocks log: {path}"),
            Err(e) => format!("could not save the full log to {path}: {e}"),
        };
        eprintln!(
            "--- ksocks log ({name}), last 30 lines ---\n{}{peers}\n--- {saved}",
            ks.log_tail(30)
        );
        std::panic::resume_unwind(e);
    }
}
