//! `-u socks5://NAME:PORT` and `ss://none@NAME:PORT`: the upstream proxy's name is resolved by
//! ksocks' resolver thread (from the router namespace's hosts file), at start and again after
//! a connect to it fails.

use crate::common::cases::serve_one;
use crate::common::peers::*;
use crate::common::*;
use crate::setup::{checked, sa, Setup};
use crate::{REDIRECT_PORT, SERVER_PORT, UPSTREAM_PORT};
use std::io;
use std::time::Duration;

const UP_NAME: &str = "up.ksocks.test";

struct NameCtx {
    ks: Ksocks,
    _peer: Peer,
    _files: Option<TempDir>,
    hosts: NetnsHosts,
    topo: Topology,
}

impl Setup for NameCtx {
    fn ks(&mut self) -> &mut Ksocks {
        &mut self.ks
    }
}

/// The peer on the server's IPv4 address; the hosts file names `resolve_to`.
fn start(ss: bool, resolve_to: Family) -> NameCtx {
    let topo = Topology::new(Inbound::Redirect, REDIRECT_PORT);
    let up = sa(topo.server_ip(Family::V4), UPSTREAM_PORT);
    let hosts = NetnsHosts::write(&topo.router, &[(topo.server_ip(resolve_to), UP_NAME)]);
    let (peer, files, url) = match ss {
        true => (
            start_ssserver(&topo.server, up),
            None,
            format!("ss://none@{UP_NAME}:{UPSTREAM_PORT}"),
        ),
        false => {
            let (p, d) = start_danted(&topo.server, up, "s0", None);
            (p, Some(d), format!("socks5://{UP_NAME}:{UPSTREAM_PORT}"))
        }
    };
    let mut args = topo.listen_args();
    args.extend(["-u".into(), url, "--connect-timeout".into(), "3".into()]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let ks = Ksocks::start(&topo, &argv);
    NameCtx {
        ks,
        _peer: peer,
        _files: files,
        hosts,
        topo,
    }
}

impl NameCtx {
    /// Waits for the log line naming the address the name resolved to.
    fn expect_resolved(&self, fam: Family) {
        let line = format!(
            "upstream {UP_NAME}:{UPSTREAM_PORT} is {}",
            sa(self.topo.server_ip(fam), UPSTREAM_PORT)
        );
        assert!(
            self.ks.wait_for_log(&line, Duration::from_secs(5)),
            "no {line:?}; log:\n{}",
            self.ks.log_tail(20)
        );
    }

    /// One REDIRECT client through the upstream, checked both ways.
    fn transfer(&self, seed: u64) {
        let l = self.topo.server_listener(Family::V4, SERVER_PORT);
        let srv = serve_one(l, move |mut s| {
            expect_stream(&mut s, seed, 100_000, "server: upload");
            send_pattern(&mut s, seed + 1, 300_000, 64 * 1024).expect("server: reply");
        });
        let dst = self.topo.server_addr(Family::V4, SERVER_PORT);
        let mut s = self.topo.client_connect(dst).expect("client connect");
        send_all_and_shutdown(&mut s, seed, 100_000);
        expect_stream(&mut s, seed + 1, 300_000, "client: reply");
        join(srv);
        self.ks.expect_close_line(100_000, 300_000, "done");
    }
}

fn run(ss: bool, resolve_to: Family, name: &str, case: fn(&mut NameCtx)) {
    let tools: &[&str] = if ss { &["ssserver"] } else { &["danted"] };
    if !require_root() || !require_tools(tools) {
        return;
    }
    let mut ctx = start(ss, resolve_to);
    checked(&mut ctx, name, case);
}

/// The name is resolved at start and the connection goes through the SOCKS5 upstream.
#[test]
fn socks5_upstream_by_name() {
    run(false, Family::V4, "by-name-socks5", |c| {
        c.expect_resolved(Family::V4);
        c.transfer(11);
    });
}

/// The same through shadowsocks.
#[test]
fn ss_upstream_by_name() {
    run(true, Family::V4, "by-name-ss", |c| {
        c.expect_resolved(Family::V4);
        c.transfer(21);
    });
}

/// The name first points where nothing listens (the server's IPv6 address; ssserver is on
/// IPv4): that connect is refused and the client reset, the name is looked up again, and
/// the next connection reaches the proxy at its new address.
#[test]
fn name_looked_up_again_after_a_failed_connect() {
    run(true, Family::V6, "by-name-again", |c| {
        c.expect_resolved(Family::V6);
        c.hosts.set(&[(c.topo.server_ip(Family::V4), UP_NAME)]);
        let dst = c.topo.server_addr(Family::V4, SERVER_PORT);
        match c.topo.client_connect(dst) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("client connect: {e}"),
            Ok(mut s) => {
                let mut b = [0u8; 16];
                match read_some(&mut s, &mut b) {
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
                    other => panic!("first client: expected a reset, got {other:?}"),
                }
            }
        }
        c.ks.expect_end(&["refused"]);
        c.expect_resolved(Family::V4);
        c.transfer(31);
    });
}
