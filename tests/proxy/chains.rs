//! The proxy chains of the interop matrix: `Mode` (how the client's connection reaches the
//! server), `Ctx` (one running case: topology, peer, ksocks on one data plane) with the
//! close-line check that the connection stayed on that plane, and `run_interop`, which
//! retries a tcsplice bulk case that found no quiet moment.

use crate::common::cases::CaseCtx;
use crate::common::peers::*;
use crate::common::*;
use crate::setup::{checked, sa, socks_listen_args, Setup};
use crate::{PASS, REDIRECT_PORT, SERVER_PORT, SOCKS_PORT, UPSTREAM_PORT, USER};
use std::io::Write;
use std::net::{TcpListener, TcpStream};

/// How the client's connection reaches the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The client speaks SOCKS5 to `ksocks --socks` (no auth), ksocks connects directly.
    Socks,
    /// The same with `--socks-auth USER:PASS`.
    SocksAuth,
    /// REDIRECT to ksocks, `--upstream socks5://` to danted (no auth).
    Danted,
    /// ... to danted with the username method (a throw-away system user).
    DantedAuth,
    /// ... to microsocks (no auth).
    Microsocks,
    /// ... to microsocks `-u USER -P PASS`.
    MicrosocksAuth,
    /// REDIRECT to ksocks, `--upstream ss://none@` to `ssserver -m none`.
    Ss,
    /// A SOCKS5 client of `ksocks --socks`, which goes on through `--upstream ss://none@`.
    SocksViaSs,
}

impl Mode {
    fn tools(self) -> &'static [&'static str] {
        match self {
            Mode::Socks | Mode::SocksAuth => &[],
            Mode::Danted | Mode::DantedAuth => &["danted", "useradd", "chpasswd"],
            Mode::Microsocks | Mode::MicrosocksAuth => &["microsocks"],
            Mode::Ss | Mode::SocksViaSs => &["ssserver"],
        }
    }

    fn socks_inbound(self) -> bool {
        matches!(self, Mode::Socks | Mode::SocksAuth | Mode::SocksViaSs)
    }
}

/// One running interop case. Field order is drop order: ksocks, then the peer, its files and
/// user, then the namespaces.
pub struct Ctx {
    pub ks: Ksocks,
    peer: Option<Peer>,
    _files: Option<TempDir>,
    _user: Option<SystemUser>,
    pub topo: Topology,
    pub mode: Mode,
    pub fam: Family,
    /// The `--dataplane` ksocks runs with; close lines must name it.
    pub plane: &'static str,
}

impl Ctx {
    /// Builds the topology, starts the mode's peer and ksocks `--dataplane plane`.
    fn start(mode: Mode, fam: Family, plane: &'static str) -> Ctx {
        let topo = Topology::new(Inbound::Redirect, REDIRECT_PORT);
        let up = sa(topo.server_ip(fam), UPSTREAM_PORT);
        let (mut peer, mut files, mut user) = (None, None, None);
        let mut args: Vec<String> = vec!["--dataplane".into(), plane.into()];
        match mode {
            Mode::Socks | Mode::SocksAuth => {
                remove_intercept_rule(&topo);
                args.extend(socks_listen_args(&topo));
                if mode == Mode::SocksAuth {
                    args.extend(["--socks-auth".into(), format!("{USER}:{PASS}")]);
                }
            }
            Mode::Danted | Mode::DantedAuth => {
                let u = (mode == Mode::DantedAuth).then(SystemUser::create);
                let (p, d) = start_danted(&topo.server, up, "s0", u.as_ref());
                let cred = u
                    .as_ref()
                    .map(|u| format!("{}:{}@", u.name, u.pass))
                    .unwrap_or_default();
                args.extend(topo.listen_args());
                args.extend(["-u".into(), format!("socks5://{cred}{up}")]);
                (peer, files, user) = (Some(p), Some(d), u);
            }
            Mode::Microsocks | Mode::MicrosocksAuth => {
                let auth = (mode == Mode::MicrosocksAuth).then_some((USER, PASS));
                peer = Some(start_microsocks(&topo.server, up, auth));
                let cred = auth.map(|(u, p)| format!("{u}:{p}@")).unwrap_or_default();
                args.extend(topo.listen_args());
                args.extend(["-u".into(), format!("socks5://{cred}{up}")]);
            }
            Mode::SocksViaSs => {
                remove_intercept_rule(&topo);
                peer = Some(start_ssserver(&topo.server, up));
                args.extend(socks_listen_args(&topo));
                args.extend(["-u".into(), format!("ss://none@{up}")]);
            }
            Mode::Ss => {
                peer = Some(start_ssserver(&topo.server, up));
                args.extend(topo.listen_args());
                args.extend(["-u".into(), format!("ss://none@{up}")]);
            }
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let ks = Ksocks::start(&topo, &argv);
        Ctx {
            ks,
            peer,
            _files: files,
            _user: user,
            topo,
            mode,
            fam,
            plane,
        }
    }

    fn auth(&self) -> Option<(&'static str, &'static str)> {
        (self.mode == Mode::SocksAuth).then_some((USER, PASS))
    }
}

impl CaseCtx for Ctx {
    fn listen(&self) -> TcpListener {
        self.topo.server_listener(self.fam, SERVER_PORT)
    }

    /// A client connection to the server's SERVER_PORT through this mode's chain. `first` is
    /// written the instant the connection opens: right after connect (REDIRECT) or in the same
    /// write as the SOCKS greeting and request (a pipelining client).
    fn connect_with(&self, first: &[u8]) -> TcpStream {
        let dst = self.topo.server_addr(self.fam, SERVER_PORT);
        if self.mode.socks_inbound() {
            let proxy = sa(self.topo.router_ip(self.fam), SOCKS_PORT);
            let mut s = self
                .topo
                .client_connect(proxy)
                .unwrap_or_else(|e| panic!("client connect to ksocks {proxy}: {e}"));
            let r = socks_connect(
                &mut s,
                &Target::Ip(dst),
                self.auth(),
                first,
                !first.is_empty(),
            )
            .unwrap_or_else(|e| panic!("SOCKS handshake with ksocks: {e}"));
            assert_eq!(r.rep, 0, "SOCKS reply to CONNECT {dst}: {r:?}");
            s
        } else {
            let mut s = self
                .topo
                .client_connect(dst)
                .unwrap_or_else(|e| panic!("client connect to {dst}: {e}"));
            s.write_all(first).expect("client: first bytes");
            s
        }
    }

    fn connect(&self) -> TcpStream {
        self.connect_with(&[])
    }

    /// Waits for the close line with these payload byte counts and end reason, and checks it
    /// ran on the data plane ksocks was started with: the proxy handshake must not keep a
    /// connection off the kernel plane. The one exception is the documented sockmap fallback
    /// (a socket whose FIN arrived before insertion cannot join a sockmap, EOPNOTSUPP, and
    /// finishes on the copy plane), accepted only when ksocks logged it for this connection.
    fn expect_close(&self, up: u64, down: u64, end: &str) {
        let line = self.ks.expect_close_line(up, down, end);
        if line.contains(&format!(" plane={} ", self.plane)) {
            return;
        }
        let id = line
            .strip_prefix("ksocks: ")
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or("?");
        let log = self.ks.log();
        let logged = |what: &str| {
            log.lines()
                .any(|l| l.starts_with(&format!("ksocks: {id} ")) && l.contains(what))
        };
        let fell_back = match self.plane {
            "sockmap" => {
                line.contains(" plane=copy ") && logged("sockmap unavailable for this connection")
            }
            // tcsplice relays in userspace (splice) until a quiet moment; a connection that
            // never had one says why.
            "tcsplice" => line.contains(" plane=splice ") && logged("tcsplice: not spliced: "),
            _ => false,
        };
        assert!(
            fell_back,
            "connection ran on the wrong data plane (started with --dataplane {}): {line}\nlog:\n{}",
            self.plane,
            self.ks.log_tail(20)
        );
        eprintln!(
            "note: {id} finished in userspace ({} fallback logged)",
            self.plane
        );
    }

    fn expect_end(&self, ends: &[&str]) -> String {
        self.ks.expect_end(ends)
    }

    fn label(&self) -> String {
        format!(" {:?} {}", self.mode, self.plane)
    }
}

impl Setup for Ctx {
    fn ks(&mut self) -> &mut Ksocks {
        &mut self.ks
    }
    fn peer_output(&self) -> String {
        let Some(p) = &self.peer else {
            return String::new();
        };
        let log = p.log();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "\n--- {} output, last 20 lines ---\n{}",
            p.what,
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }
}

pub(crate) fn run_interop(
    mode: Mode,
    fam: Family,
    plane: &'static str,
    name: &str,
    case: fn(&mut Ctx),
) {
    if !require_root() || !require_tools(mode.tools()) {
        return;
    }
    // On tcsplice a bulk case may find no quiet moment on a loaded machine (`fallback_busy`,
    // by design): it runs again, at most ATTEMPTS times in all, and fails if it never splices.
    const ATTEMPTS: u32 = 3;
    for attempt in 1..=ATTEMPTS {
        let mut ctx = Ctx::start(mode, fam, plane);
        let tag = format!("{mode:?}-{plane}-{name}").to_lowercase();
        let mut done = true;
        checked(&mut ctx, &tag, |c| {
            case(c);
            if let Some(p) = c.peer.as_mut() {
                assert!(p.is_running(), "{} exited during the case", p.what);
            }
            if plane == "tcsplice" {
                done = c.ks.assert_bulk_spliced(name, attempt == ATTEMPTS);
            }
        });
        if done {
            return;
        }
        eprintln!(
            "{name}: every connection fell back busy (attempt {attempt} of {ATTEMPTS}); again"
        );
    }
}
