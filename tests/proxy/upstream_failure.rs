//! `upstream_failure::*`: refusing, rejecting, absent and blackholed upstream proxies, and
//! the failures a direct `--socks` CONNECT passes on; `FailCtx` runs ksocks with such an
//! upstream and checks what the client gets (a reset or a SOCKS REP) and what is logged.

use crate::common::cases::serve_one;
use crate::common::peers::*;
use crate::common::*;
use crate::setup::{checked, sa, socks_listen_args, Setup};
use crate::{CLOSED_PORT, PASS, REDIRECT_PORT, SERVER_PORT, SOCKS_PORT, UPSTREAM_PORT, USER};
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

/// ksocks with an upstream that fails: `peer` (if any) runs in the server namespace on
/// UPSTREAM_PORT; nothing listens on CLOSED_PORT there.
pub struct FailCtx {
    ks: Ksocks,
    peer: Option<Peer>,
    _files: Option<TempDir>,
    _user: Option<SystemUser>,
    topo: Topology,
}

impl Setup for FailCtx {
    fn ks(&mut self) -> &mut Ksocks {
        &mut self.ks
    }
    fn peer(&self) -> Option<&Peer> {
        self.peer.as_ref()
    }
}

/// Which peer an upstream-failure test runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FailPeer {
    None,
    Microsocks,
    MicrosocksAuth,
    Danted,
    /// danted with the username method; `{user}` in the upstream URL is its user name.
    DantedAuth,
    Ss,
}

impl FailCtx {
    /// `socks_inbound`: ksocks listens with `--socks` (else REDIRECT); `upstream` is formatted
    /// with `{up}` replaced by the upstream address (UPSTREAM_PORT in the server namespace).
    fn start(socks_inbound: bool, peer: FailPeer, upstream: &str) -> FailCtx {
        let topo = Topology::new(Inbound::Redirect, REDIRECT_PORT);
        let up = sa(topo.server_ip(Family::V4), UPSTREAM_PORT);
        let mut user = None;
        let (peer, files) = match peer {
            FailPeer::None => (None, None),
            FailPeer::Microsocks => (Some(start_microsocks(&topo.server, up, None)), None),
            FailPeer::MicrosocksAuth => (
                Some(start_microsocks(&topo.server, up, Some((USER, PASS)))),
                None,
            ),
            FailPeer::Danted => {
                let (p, d) = start_danted(&topo.server, up, "s0", None);
                (Some(p), Some(d))
            }
            FailPeer::DantedAuth => {
                let u = user.insert(SystemUser::create());
                let (p, d) = start_danted(&topo.server, up, "s0", Some(u));
                (Some(p), Some(d))
            }
            FailPeer::Ss => (Some(start_ssserver(&topo.server, up)), None),
        };
        let mut args: Vec<String> = vec!["--connect-timeout".into(), "3".into()];
        if socks_inbound {
            remove_intercept_rule(&topo);
            args.extend(socks_listen_args(&topo));
        } else {
            args.extend(topo.listen_args());
        }
        if !upstream.is_empty() {
            let name = user.as_ref().map(|u| u.name.as_str()).unwrap_or("");
            let url = upstream
                .replace("{up}", &up.to_string())
                .replace("{user}", name);
            args.extend(["-u".into(), url]);
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let ks = Ksocks::start(&topo, &argv);
        FailCtx {
            ks,
            peer,
            _files: files,
            _user: user,
            topo,
        }
    }

    fn closed_dst(&self) -> SocketAddr {
        self.topo.server_addr(Family::V4, CLOSED_PORT)
    }

    /// A REDIRECT client to the closed port: must get a reset (or the connect itself reset)
    /// within 2 s, without data. Returns the client address if the connect succeeded.
    fn expect_redirect_reset(&self) -> Option<SocketAddr> {
        let t0 = Instant::now();
        let me = match self.topo.client_connect(self.closed_dst()) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("client connect: {e}"),
            Ok(mut s) => {
                let me = s.local_addr().unwrap();
                // Only read: a write racing the reset would consume the ECONNRESET, and the
                // read after it would see a plain EOF.
                let mut b = [0u8; 16];
                match read_some(&mut s, &mut b) {
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
                    other => panic!("client: expected a reset, got {other:?}"),
                }
                Some(me)
            }
        };
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "reset after {:?}",
            t0.elapsed()
        );
        me
    }

    /// A SOCKS client asking for the closed port: returns the reply's REP, then expects the
    /// close.
    fn socks_rep(&self) -> u8 {
        let mut s = self
            .topo
            .client_connect(sa(self.topo.router_ip(Family::V4), SOCKS_PORT))
            .expect("connect to ksocks --socks");
        let r = socks_connect(&mut s, &Target::Ip(self.closed_dst()), None, &[], false)
            .expect("SOCKS handshake");
        expect_eof(&mut s, "SOCKS client after a failure reply");
        r.rep
    }

    /// `expect_redirect_reset`, then a log line with `part`.
    fn expect_reset_logged(&self, part: &str) {
        self.expect_redirect_reset();
        self.expect_log(part);
    }

    /// `socks_rep` must be 5, then a log line with `part`.
    fn expect_rep5_logged(&self, part: &str) {
        assert_eq!(self.socks_rep(), 5, "REP to the SOCKS client");
        self.expect_log(part);
    }

    fn expect_log(&self, part: &str) {
        assert!(
            self.ks.wait_for_log(part, Duration::from_secs(5)),
            "no log line with {part:?}; log:\n{}",
            self.ks.log_tail(20)
        );
    }

    fn expect_end(&self, ends: &[&str]) {
        self.ks.expect_end(ends);
    }
}

fn run_fail(
    name: &str,
    tools: &[&str],
    socks_inbound: bool,
    peer: FailPeer,
    upstream: &str,
    case: fn(&mut FailCtx),
) {
    if !require_root() || !require_tools(tools) {
        return;
    }
    let mut ctx = FailCtx::start(socks_inbound, peer, upstream);
    checked(&mut ctx, &format!("fail-{name}"), case);
}

/// REDIRECT via microsocks to a closed port: microsocks answers REP 5; the client gets a
/// reset and the log names the REP.
#[test]
fn microsocks_refuses_redirect_client_reset() {
    run_fail(
        "microsocks_refuses_redirect",
        &["microsocks"],
        false,
        FailPeer::Microsocks,
        "socks5://{up}",
        |c| c.expect_reset_logged("upstream replied 5 ("),
    );
}

/// The same through danted.
#[test]
fn danted_refuses_redirect_client_reset() {
    run_fail(
        "danted_refuses_redirect",
        &["danted"],
        false,
        FailPeer::Danted,
        "socks5://{up}",
        |c| c.expect_reset_logged("upstream replied 5 ("),
    );
}

/// A SOCKS client of ksocks, chained to microsocks, asking for a closed port: REP 5
/// passed on.
#[test]
fn microsocks_refuses_socks_client_rep5() {
    run_fail(
        "microsocks_refuses_socks",
        &["microsocks"],
        true,
        FailPeer::Microsocks,
        "socks5://{up}",
        |c| c.expect_rep5_logged("upstream replied 5 ("),
    );
}

/// Wrong password for the upstream: the client gets a reset, the log says why.
#[test]
fn upstream_wrong_password_client_reset() {
    run_fail(
        "upstream_wrong_password",
        &["microsocks"],
        false,
        FailPeer::MicrosocksAuth,
        "socks5://alice:wrong@{up}",
        |c| c.expect_reset_logged("upstream: authentication failed"),
    );
}

/// danted's username method checks the system password: a wrong one is refused (so the
/// `danted_auth` chain really authenticates).
#[test]
fn danted_wrong_password_client_reset() {
    run_fail(
        "danted_wrong_password",
        &["danted", "useradd", "chpasswd"],
        false,
        FailPeer::DantedAuth,
        "socks5://{user}:wrong@{up}",
        |c| c.expect_reset_logged("upstream: authentication failed"),
    );
}

/// The upstream demands a password ksocks was not given.
#[test]
fn upstream_requires_auth_we_lack_client_reset() {
    run_fail(
        "upstream_requires_auth",
        &["microsocks"],
        false,
        FailPeer::MicrosocksAuth,
        "socks5://{up}",
        |c| c.expect_reset_logged("upstream refused our authentication methods"),
    );
}

/// No SOCKS5 proxy listening: the REDIRECT client is reset, `end=refused`.
#[test]
fn socks5_upstream_not_listening_redirect_reset() {
    run_fail(
        "socks5_upstream_absent_redirect",
        &[],
        false,
        FailPeer::None,
        "socks5://{up}",
        |c| {
            c.expect_reset_logged("connect: Connection refused");
            c.expect_end(&["refused"]);
        },
    );
}

/// No SOCKS5 proxy listening, SOCKS client: REP 5.
#[test]
fn socks5_upstream_not_listening_socks_rep5() {
    run_fail(
        "socks5_upstream_absent_socks",
        &[],
        true,
        FailPeer::None,
        "socks5://{up}",
        |c| {
            c.expect_rep5_logged("connect: Connection refused");
            c.expect_end(&["refused"]);
        },
    );
}

/// No shadowsocks server listening: the REDIRECT client is reset.
#[test]
fn ss_upstream_not_listening_redirect_reset() {
    run_fail(
        "ss_upstream_absent_redirect",
        &[],
        false,
        FailPeer::None,
        "ss://none@{up}",
        |c| {
            c.expect_reset_logged("connect: Connection refused");
            c.expect_end(&["refused"]);
        },
    );
}

/// ssserver cannot reach the destination: shadowsocks has no error reply, so ssserver
/// just closes; the client sees the close (EOF or reset), never data.
#[test]
fn ss_destination_refused_client_closed() {
    run_fail(
        "ss_destination_refused",
        &["ssserver"],
        false,
        FailPeer::Ss,
        "ss://none@{up}",
        |c| {
            let mut s = c
                .topo
                .client_connect(c.closed_dst())
                .expect("client connect");
            with_timeouts(&s, Duration::from_secs(5));
            let _ = s.write_all(b"hello");
            let mut b = [0u8; 16];
            match read_some(&mut s, &mut b) {
                Ok(0) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
                other => panic!("client: expected a close, got {other:?}"),
            }
            c.expect_end(&["done", "upstream-reset", "error"]);
        },
    );
}

/// Direct `--socks` CONNECT to a closed port: REP 5.
#[test]
fn direct_socks_destination_refused_rep5() {
    run_fail("direct_socks_refused", &[], true, FailPeer::None, "", |c| {
        c.expect_rep5_logged("connect: Connection refused");
        c.expect_end(&["refused"]);
    });
}

/// The upstream proxy's SYNs are dropped: with --connect-timeout 3 the SOCKS client gets
/// a failure REP after about 3 s.
#[test]
fn socks5_upstream_blackholed_times_out() {
    run_fail(
        "socks5_upstream_blackholed",
        &[],
        true,
        FailPeer::None,
        "socks5://{up}",
        |c| {
            c.topo.server_blackhole(UPSTREAM_PORT);
            let t0 = Instant::now();
            let rep = c.socks_rep();
            let t = t0.elapsed();
            assert_ne!(rep, 0, "REP to the SOCKS client");
            assert!(
                t >= Duration::from_millis(2500) && t < Duration::from_secs(6),
                "failure reply after {t:?}, connect timeout 3 s"
            );
            c.expect_end(&["timeout"]);
        },
    );
}

/// A successful direct CONNECT: BND.ADDR/BND.PORT is ksocks' upstream socket's local
/// address, i.e. the peer address the server sees.
#[test]
fn socks_reply_bound_address_is_upstream_local_address() {
    run_fail("socks_bound_address", &[], true, FailPeer::None, "", |c| {
        for fam in [Family::V4, Family::V6] {
            let l = c.topo.server_listener(fam, SERVER_PORT);
            let srv = serve_one(l, |mut s| {
                let peer = s.peer_addr().unwrap();
                send_pattern(&mut s, 50, 100, 100).unwrap();
                s.shutdown(Shutdown::Write).unwrap();
                expect_eof(&mut s, "server: end");
                peer
            });
            let mut s = c
                .topo
                .client_connect(sa(c.topo.router_ip(fam), SOCKS_PORT))
                .unwrap();
            let dst = c.topo.server_addr(fam, SERVER_PORT);
            let r = socks_connect(&mut s, &Target::Ip(dst), None, &[], false).unwrap();
            assert_eq!(r.rep, 0);
            expect_stream(&mut s, 50, 100, "client");
            drop(s);
            let seen = join(srv);
            assert_eq!(
                r.bound,
                Some(seen),
                "{fam:?}: BND in the reply vs the server's peer address"
            );
        }
    });
}
