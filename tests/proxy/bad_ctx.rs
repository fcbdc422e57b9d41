//! Support of the `bad_input` tests: `BadCtx` (`ksocks --socks` with a 2 s handshake timeout,
//! optionally with auth) and its checks of reply bytes, close and log line, and the
//! `Bystander`, a good connection held open across each bad case that must keep its bytes.

use crate::common::cases::serve_one;
use crate::common::peers::*;
use crate::common::*;
use crate::setup::{checked, sa, socks_listen_args, Setup};
use crate::{NAME4, PASS, REDIRECT_PORT, SOCKS_PORT, USER};
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

/// The port of the bystander's server (a good connection held open across each bad case).
const BYSTANDER_PORT: u16 = 5002;
/// Bytes the bystander sends each way.
const BYSTANDER_LEN: usize = 256 * 1024;

/// A good SOCKS connection opened before a bad case and finished after it: half its upload
/// goes before, half after, and the server answers only when it has all of it, so the
/// connection is open (in the data plane) the whole time.
struct Bystander {
    s: TcpStream,
    srv: thread::JoinHandle<Result<(), String>>,
}

impl Bystander {
    fn start(c: &BadCtx) -> Bystander {
        let l = c.topo.server_listener(Family::V4, BYSTANDER_PORT);
        // Errors are returned, not panicked on: when a case fails the bystander is dropped
        // unfinished, and that must not add a second, misleading panic.
        let srv = serve_one(l, |mut s| -> Result<(), String> {
            let len = BYSTANDER_LEN as u64;
            let d = recv_exact_verify(&mut s, 900, len).map_err(|e| format!("upload: {e}"))?;
            let want = Digest::of_pattern(900, len);
            if d != want {
                return Err(format!("upload: received {d:?}, sent {want:?}"));
            }
            send_pattern(&mut s, 901, len, 64 * 1024)
                .map_err(|(e, n)| format!("reply after {n} bytes: {e}"))?;
            s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
            let mut b = [0u8; 1];
            match read_some(&mut s, &mut b) {
                Ok(0) => Ok(()),
                other => Err(format!("expected EOF at the end, got {other:?}")),
            }
        });
        let dst = c.topo.server_addr(Family::V4, BYSTANDER_PORT);
        let mut s = c
            .topo
            .client_connect(c.socks(Family::V4))
            .expect("bystander: connect");
        let r = socks_connect(&mut s, &Target::Ip(dst), c.auth(), &[], false)
            .expect("bystander: SOCKS handshake");
        assert_eq!(r.rep, 0, "bystander: SOCKS reply {r:?}");
        let data = Pattern::bytes(900, BYSTANDER_LEN);
        s.write_all(&data[..BYSTANDER_LEN / 2])
            .expect("bystander: first half");
        Bystander { s, srv }
    }

    /// Sends the second half and checks the whole reply.
    fn finish(mut self) {
        let data = Pattern::bytes(900, BYSTANDER_LEN);
        self.s
            .write_all(&data[BYSTANDER_LEN / 2..])
            .expect("bystander: second half");
        self.s.shutdown(Shutdown::Write).unwrap();
        expect_stream(&mut self.s, 901, BYSTANDER_LEN as u64, "bystander: reply");
        if let Err(e) = join(self.srv) {
            panic!("bystander server: {e}");
        }
    }
}

/// `ksocks --socks` on both families with `--handshake-timeout 2`, optionally with auth, and
/// a hosts file naming the server (`NAME4`).
pub struct BadCtx {
    pub(crate) ks: Ksocks,
    _hosts: NetnsHosts,
    pub(crate) topo: Topology,
    auth: bool,
}

impl Setup for BadCtx {
    fn ks(&mut self) -> &mut Ksocks {
        &mut self.ks
    }
}

/// A failure reply with the unspecified bind address (RFC 1928 leaves BND open then).
pub(crate) fn rep_bytes(rep: u8) -> Vec<u8> {
    vec![5, rep, 0, 1, 0, 0, 0, 0, 0, 0]
}

/// `a` followed by `b`.
pub(crate) fn cat(a: &[u8], b: &[u8]) -> Vec<u8> {
    [a, b].concat()
}

impl BadCtx {
    pub(crate) fn socks(&self, fam: Family) -> SocketAddr {
        sa(self.topo.router_ip(fam), SOCKS_PORT)
    }

    fn auth(&self) -> Option<(&'static str, &'static str)> {
        self.auth.then_some((USER, PASS))
    }

    /// A raw TCP connection to the v4 SOCKS listener, 5 s I/O timeouts.
    pub(crate) fn raw(&self) -> TcpStream {
        let s = self
            .topo
            .client_connect(self.socks(Family::V4))
            .expect("connect to ksocks --socks");
        with_timeouts(&s, Duration::from_secs(5));
        s
    }

    /// Reads until EOF or reset (≤ 5 s, at most `max` bytes); returns the bytes and whether
    /// the end was a reset.
    pub(crate) fn read_to_close(
        &self,
        s: &mut TcpStream,
        max: usize,
        what: &str,
    ) -> (Vec<u8>, bool) {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match read_some(s, &mut buf) {
                Ok(0) => return (got, false),
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    assert!(
                        got.len() <= max,
                        "{what}: ksocks sent {} bytes, at most {max} expected: {got:?}",
                        got.len()
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return (got, true),
                Err(e) => panic!("{what}: no close from ksocks ({e}) after receiving {got:?}"),
            }
        }
    }

    /// Waits for a log line about the connection from `client` containing `part`, and its
    /// close line with one of `ends`.
    pub(crate) fn expect_logged(&self, client: SocketAddr, part: &str, ends: &[&str]) {
        let who = format!(" {client} -> ");
        let mut found = (false, false);
        wait_until(Duration::from_secs(5), || {
            let log = self.ks.log();
            let mine: Vec<&str> = log.lines().filter(|l| l.contains(&who)).collect();
            found = (
                mine.iter().any(|l| l.contains(part)),
                mine.iter().any(|l| {
                    l.contains(" closed: ") && ends.iter().any(|e| l.contains(&format!("end={e}")))
                }),
            );
            found == (true, true)
        });
        assert!(
            found == (true, true),
            "log for {client}: line with {part:?}: {}, close line with end={ends:?}: {}; log:\n{}",
            found.0,
            found.1,
            self.ks.log_tail(20)
        );
    }

    /// Sends `input` (then a FIN when `fin`), expects exactly `reply` and a close, then the
    /// log line `log` and a close line `end=<end>` for this connection.
    pub(crate) fn check(&self, input: &[u8], fin: bool, reply: &[u8], log: &str, end: &str) {
        let mut s = self.raw();
        let me = s.local_addr().unwrap();
        s.write_all(input).expect("send bad input");
        if fin {
            s.shutdown(Shutdown::Write).unwrap();
        }
        let (got, _reset) = self.read_to_close(&mut s, reply.len(), "bad input");
        assert_eq!(got, reply, "ksocks' answer to {input:?}");
        self.expect_logged(me, log, &[end]);
    }
}

pub(crate) fn run_bad(auth: bool, name: &str, case: fn(&mut BadCtx)) {
    if !require_root() {
        return;
    }
    let topo = Topology::new(Inbound::Redirect, REDIRECT_PORT);
    remove_intercept_rule(&topo);
    let hosts = NetnsHosts::write(&topo.router, &[(topo.server_ip(Family::V4), NAME4)]);
    let mut args = socks_listen_args(&topo);
    args.extend(["--handshake-timeout".into(), "2".into()]);
    if auth {
        args.extend(["--socks-auth".into(), format!("{USER}:{PASS}")]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let ks = Ksocks::start(&topo, &argv);
    let mut ctx = BadCtx {
        ks,
        _hosts: hosts,
        topo,
        auth,
    };
    checked(&mut ctx, &format!("bad-{name}"), |c| {
        let by = Bystander::start(c);
        case(c);
        assert!(
            c.ks.is_running(),
            "ksocks exited after the bad input; log:\n{}",
            c.ks.log_tail(30)
        );
        by.finish();
    });
}
