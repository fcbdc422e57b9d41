//! Support of the curl matrix: `CurlCtx` (`ksocks --socks` with an HTTP pattern server and
//! hosts files), `CurlAuth` (what stands between curl and the server besides ksocks) and
//! `run_curl`, the fetches of one plane and auth form, each body checked by hash.

use crate::common::peers::*;
use crate::common::*;
use crate::setup::{checked, sa, socks_listen_args, Setup};
use crate::{HTTP_PORT, MIB, NAME4, NAME6, PASS, REDIRECT_PORT, SOCKS_PORT, UPSTREAM_PORT, USER};
use std::net::SocketAddr;
use std::time::Duration;

/// A `--socks` ksocks with an HTTP pattern server in the server namespace and hosts files in
/// the router (for `--socks5-hostname`) and client (for `--socks5`).
struct CurlCtx {
    ks: Ksocks,
    peer: Option<Peer>,
    _peer_files: Option<TempDir>,
    _http: HttpPatternServer,
    _files: TempDir,
    _hosts: [NetnsHosts; 3],
    topo: Topology,
}

/// What stands between curl and the HTTP server besides `ksocks --socks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CurlAuth {
    /// No authentication, direct.
    None,
    /// `--socks-auth USER:PASS`, direct.
    Arg,
    /// `--socks-auth-file`, direct.
    File,
    /// No authentication; ksocks goes on through `--upstream socks5://` to danted.
    ViaDanted,
    /// No authentication; ksocks goes on through `--upstream socks5://USER:PASS@` to
    /// microsocks with auth.
    ViaMicrosocksAuth,
}

impl CurlAuth {
    fn client_auth(self) -> bool {
        matches!(self, CurlAuth::Arg | CurlAuth::File)
    }
}

impl CurlCtx {
    fn start(plane: &str, auth: CurlAuth) -> CurlCtx {
        let topo = Topology::new(Inbound::Redirect, REDIRECT_PORT);
        remove_intercept_rule(&topo);
        let names = [
            (topo.server_ip(Family::V4), NAME4),
            (topo.server_ip(Family::V6), NAME6),
        ];
        // Router: ksocks resolves `--socks5-hostname` names; client: curl resolves `--socks5`
        // names; server: an upstream proxy resolves the names ksocks passes on to it.
        let hosts = [
            NetnsHosts::write(&topo.router, &names),
            NetnsHosts::write(&topo.client, &names),
            NetnsHosts::write(&topo.server, &names),
        ];
        let http = HttpPatternServer::start(vec![
            topo.server_listener(Family::V4, HTTP_PORT),
            topo.server_listener(Family::V6, HTTP_PORT),
        ]);
        let files = TempDir::new("curl");
        let mut args: Vec<String> = vec!["--dataplane".into(), plane.into()];
        args.extend(socks_listen_args(&topo));
        let (mut peer, mut peer_files) = (None, None);
        let up = sa(topo.server_ip(Family::V4), UPSTREAM_PORT);
        match auth {
            CurlAuth::None => {}
            CurlAuth::ViaDanted => {
                let (p, d) = start_danted(&topo.server, up, "s0", None);
                (peer, peer_files) = (Some(p), Some(d));
                args.extend(["-u".into(), format!("socks5://{up}")]);
            }
            CurlAuth::ViaMicrosocksAuth => {
                peer = Some(start_microsocks(&topo.server, up, Some((USER, PASS))));
                args.extend(["-u".into(), format!("socks5://{USER}:{PASS}@{up}")]);
            }
            CurlAuth::Arg => args.extend(["--socks-auth".into(), format!("{USER}:{PASS}")]),
            CurlAuth::File => {
                let f = files.write(
                    "socks-users",
                    &format!("bob:other-pass\n{USER}:{PASS}\n"),
                    0o600,
                );
                args.extend(["--socks-auth-file".into(), f.display().to_string()]);
            }
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let ks = Ksocks::start(&topo, &argv);
        CurlCtx {
            ks,
            peer,
            _peer_files: peer_files,
            _http: http,
            _files: files,
            _hosts: hosts,
            topo,
        }
    }

    /// `curl <flag> <proxy> [--proxy-user] URL` from the client namespace; asserts exit 0 and
    /// the body's hash.
    fn fetch(
        &self,
        flag: &str,
        proxy: SocketAddr,
        host: &str,
        seed: u64,
        len: u64,
        user: Option<(&str, &str)>,
    ) {
        let url = format!("http://{host}:{HTTP_PORT}/pattern/{seed}/{len}");
        let mut args = vec![flag.to_string(), proxy.to_string()];
        if let Some((u, p)) = user {
            args.extend(["--proxy-user".into(), format!("{u}:{p}")]);
        }
        args.extend(["-o".into(), "-".into(), url.clone()]);
        let what = format!("curl {}", args.join(" "));
        let r = curl_pattern(&self.topo.client, &args, seed);
        assert_eq!(
            r.status,
            Some(0),
            "{what}: exit {:?}: {}",
            r.status,
            r.stderr.trim()
        );
        Digest::of_pattern(seed, len).assert_received(&r.body, &what);
    }

    /// A curl that must fail at the proxy (exit 97, CURLE_PROXY) without body bytes.
    fn fetch_refused(&self, proxy: SocketAddr, user: Option<(&str, &str)>) {
        let url = format!("http://{NAME4}:{HTTP_PORT}/pattern/1/1000");
        let mut args = vec!["--socks5-hostname".to_string(), proxy.to_string()];
        if let Some((u, p)) = user {
            args.extend(["--proxy-user".into(), format!("{u}:{p}")]);
        }
        args.extend(["-o".into(), "-".into(), url]);
        let r = curl_pattern(&self.topo.client, &args, 1);
        assert_eq!(
            r.status,
            Some(97),
            "curl {args:?} should fail at the proxy: {}",
            r.stderr.trim()
        );
        assert_eq!(r.body.len, 0, "curl {args:?} got body bytes");
    }
}

impl Setup for CurlCtx {
    fn ks(&mut self) -> &mut Ksocks {
        &mut self.ks
    }
    fn peer(&self) -> Option<&Peer> {
        self.peer.as_ref()
    }
}

/// The curl matrix for one data plane and auth form: both SOCKS listener families, v4 and v6
/// destinations, names resolved by ksocks (socks5-hostname) and by curl (socks5), IP literals.
pub(crate) fn run_curl(plane: &str, auth: CurlAuth, name: &str) {
    let peer: &[&str] = match auth {
        CurlAuth::ViaDanted => &["danted"],
        CurlAuth::ViaMicrosocksAuth => &["microsocks"],
        _ => &[],
    };
    if !require_root() || !require_tools(&["curl"]) || !require_tools(peer) {
        return;
    }
    let mut ctx = CurlCtx::start(plane, auth);
    let tag = format!("curl-{plane}-{name}");
    checked(&mut ctx, &tag, |c| {
        let user = auth.client_auth().then_some((USER, PASS));
        let p4 = sa(c.topo.router_ip(Family::V4), SOCKS_PORT);
        let p6 = sa(c.topo.router_ip(Family::V6), SOCKS_PORT);
        let s4 = c.topo.server_ip(Family::V4).to_string();
        let s6 = format!("[{}]", c.topo.server_ip(Family::V6));
        let h = "--socks5-hostname";
        let l = "--socks5";
        c.fetch(h, p4, NAME4, 1, 3 * MIB, user); // ksocks resolves, A record
        c.fetch(h, p6, NAME6, 2, MIB, user); // v6 listener, ksocks resolves, AAAA
        c.fetch(h, p6, NAME4, 3, 100_000, user); // v6 listener, v4 destination by name
        c.fetch(l, p4, NAME6, 4, 2 * MIB, user); // curl resolves: ATYP 4 request on v4 listener
        c.fetch(l, p6, NAME4, 5, 1_000_001, user); // curl resolves: ATYP 1 on v6 listener
        c.fetch(l, p4, &s4, 6, 1, user); // IP literals
        c.fetch(l, p6, &s6, 7, 65_536, user);
        if auth.client_auth() {
            c.fetch_refused(p4, Some((USER, "wrong")));
            c.fetch_refused(p6, None);
            assert!(
                c.ks.wait_for_log(
                    &format!("authentication failed for user '{USER}'"),
                    Duration::from_secs(5)
                ),
                "no authentication-failed log line"
            );
        }
        // A close line may lag its transfer by a moment (tcsplice learns of the last ACK
        // from its scan of the entries).
        let mut closes = 0;
        wait_until(Duration::from_secs(5), || {
            closes =
                c.ks.log()
                    .lines()
                    .filter(|l| l.contains(" closed: ") && l.contains("end=done"))
                    .count();
            closes >= 7
        });
        assert!(closes >= 7, "{closes} end=done close lines for 7 fetches");
    });
}
