//! Helpers of the tcsplice tests (tests/tcsplice*.rs): ksocks on `--dataplane tcsplice` in the
//! router, connections that are known to have been handed to the program, and the checks that
//! nothing of a flow is left behind — no map entry, no socket (frozen ones included), no
//! conntrack entry still ESTABLISHED, no tc attachment after exit.

use super::*;
use ksocks::sys::netlink::Netlink;
use ksocks::sys::socket;
use ksocks::sys::tc;
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

pub const KSOCKS_PORT: u16 = 12345;

/// ksocks on tcsplice in the router of a fresh topology.
pub struct Spl {
    pub ks: Ksocks,
    pub topo: Topology,
    pub fam: Family,
}

impl Drop for Spl {
    /// A failing test saves ksocks' whole log and prints where.
    fn drop(&mut self) {
        if thread::panicking() {
            let path = format!(
                "{}/ksocks-tcsplice-{}.log",
                env!("CARGO_TARGET_TMPDIR"),
                self.topo.n
            );
            let _ = std::fs::write(&path, self.ks.log());
            eprintln!(
                "--- ksocks log, last 20 lines ---\n{}\n--- whole log: {path}",
                self.ks.log_tail(20)
            );
        }
    }
}

impl Ksocks {
    /// Checks that every connection that reached a data plane ran on `plane`, or fell back
    /// with a log line saying why (`#<id> <plane>: not spliced: <reason>`, tcsplice). Returns
    /// (connections on `plane`, fallback reasons).
    pub fn assert_plane_or_logged(&self, plane: &str) -> (usize, Vec<String>) {
        let log = self.log();
        let (mut on, mut reasons) = (0, Vec::new());
        for line in log.lines().filter(|l| l.contains(" closed: ")) {
            let id = line.split_whitespace().nth(1).unwrap_or("?");
            if line.contains(" plane=none ") {
                continue;
            }
            if line.contains(&format!(" plane={plane} ")) {
                on += 1;
                continue;
            }
            let why = log
                .lines()
                .find_map(|l| l.strip_prefix(&format!("ksocks: {id} {plane}: not spliced: ")));
            let why = why.unwrap_or_else(|| {
                panic!(
                    "{id} ended off the {plane} plane without saying why: {line}\n{}",
                    self.log_tail(30)
                )
            });
            reasons.push(why.split_whitespace().next().unwrap_or("?").to_string());
        }
        (on, reasons)
    }

    /// On tcsplice, a proxy chain counts as tested only if its cases with a pause were
    /// spliced, in both families (the handshakes shift each leg's sequence numbers by what
    /// ksocks wrote and read, and the late reply crosses the splice). False (run the case
    /// again) when such a case fell back only for `busy` and `last` is not set.
    pub fn assert_bulk_spliced(&self, name: &str, last: bool) -> bool {
        let (spliced, fell_back) = self.assert_plane_or_logged("tcsplice");
        eprintln!("tcsplice: {spliced} spliced, not: {fell_back:?}");
        // Not the bulk cases: a 3 MiB exchange through a chain can end within the 100 ms
        // the relay waits before holding busy peers back (`early`: seen once in a full
        // parallel run), and the bidirectional ones never pause (`busy` by design). Each is
        // exact and spliced or logged either way; the late reply's 1 s pause always comes.
        let bulk = ["half_close_late_reply", "v6_half_close_late_reply"];
        let busy = !fell_back.is_empty() && fell_back.iter().all(|r| r == "busy");
        if spliced == 0 && bulk.contains(&name) && busy && !last {
            return false;
        }
        assert!(
            spliced > 0 || !bulk.contains(&name),
            "{name}: nothing spliced; log:\n{}",
            self.log_tail(20)
        );
        true
    }
}

/// Runs `sh -c cmd` in namespace `ns`; its stdout.
pub fn sh(ns: &str, cmd: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", cmd])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Spl {
    /// `None` (after a SKIP line) without root.
    pub fn start(kind: Inbound, fam: Family, extra: &[&str], env: &[(&str, &str)]) -> Option<Spl> {
        if !require_root() {
            return None;
        }
        let topo = Topology::new(kind, KSOCKS_PORT);
        let mut args: Vec<String> = topo.listen_args();
        args.extend(["--dataplane".into(), "tcsplice".into()]);
        args.extend(extra.iter().map(|a| a.to_string()));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let ks = Ksocks::start_env(&topo, &argv, env);
        Some(Spl { ks, topo, fam })
    }

    pub fn dst(&self, port: u16) -> SocketAddr {
        self.topo.server_addr(self.fam, port)
    }

    /// A connection to the server's `port` from client port `from` (0: any), with a hello
    /// both ways (`seed`), then handed to the program: returns once ksocks counts one more
    /// spliced connection than `before`. (client, server) streams.
    pub fn spliced(
        &self,
        l: &TcpListener,
        port: u16,
        from: u16,
        seed: u64,
    ) -> (TcpStream, TcpStream) {
        let before = self.ks.stats().get("tcsplice");
        let dst = self.dst(port);
        let fam = self.fam;
        let client_ip = self.topo.client_ip(fam);
        let mut c = self
            .topo
            .in_client(move || -> io::Result<TcpStream> {
                let s = socket2_bound(SocketAddr::new(client_ip, from))?;
                s.connect(dst)
            })
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("client connect to {dst}: {e}"));
        with_timeouts(&c, IO_TIMEOUT);
        let mut s = accept_timeout(l, Duration::from_secs(10)).expect("server accept");
        send_pattern(&mut c, seed, 100, 100).expect("client: hello");
        let d = recv_exact_verify(&mut s, seed, 100).expect("server: hello");
        Digest::of_pattern(seed, 100).assert_received(&d, "server: hello");
        send_pattern(&mut s, seed + 1, 100, 100).expect("server: hello");
        let d = recv_exact_verify(&mut c, seed + 1, 100).expect("client: hello");
        Digest::of_pattern(seed + 1, 100).assert_received(&d, "client: hello");
        let spliced = wait_until(Duration::from_secs(3), || {
            self.ks.stats().get("tcsplice") > before
        });
        assert!(
            spliced,
            "not spliced after a quiet moment; log:\n{}",
            self.ks.log_tail(20)
        );
        (c, s)
    }

    /// Nothing of the test's flows is left: no connection, map entry or socket in ksocks; no
    /// socket in the router but listeners and TIME-WAIT; no conntrack entry ESTABLISHED.
    pub fn assert_clean(&self) {
        self.ks.assert_idle();
        assert_router_clean(&self.topo);
    }

    /// Programs attached at tcx ingress, and filters named ksocks_tcsplice at clsact ingress,
    /// of rc and rs.
    pub fn attachments(&self) -> (u32, usize) {
        self.topo
            .in_router(|| {
                let mut nl = Netlink::open(libc::NETLINK_ROUTE).unwrap();
                let (mut tcx, mut filters) = (0, 0);
                for dev in [c"rc", c"rs"] {
                    // SAFETY: a NUL-terminated literal.
                    let ifindex = unsafe { libc::if_nametoindex(dev.as_ptr()) };
                    tcx += tc::tcx_count(ifindex, tc::BPF_TCX_INGRESS).unwrap_or(0);
                    let f = nl.bpf_filters(ifindex, true).unwrap_or_default();
                    filters += f.iter().filter(|f| f.name == "ksocks_tcsplice").count();
                }
                (tcx, filters)
            })
            .join()
            .unwrap()
    }
}

/// No socket in the router but listeners and TIME-WAIT (a frozen socket shows as ESTAB),
/// and no conntrack entry ESTABLISHED (a spliced flow's would be: its packets bypass it).
pub fn assert_router_clean(topo: &Topology) {
    let r = &topo.router;
    let mut left = String::new();
    let gone = wait_until(Duration::from_secs(5), || {
        left = sh(r, "ss -tanH | grep -v -e '^LISTEN' -e '^TIME-WAIT' || true");
        left.trim().is_empty()
    });
    assert!(gone, "router sockets left:\n{left}");
    if conntrack_available() {
        let mut est = String::new();
        let gone = wait_until(Duration::from_secs(5), || {
            est = sh(
                r,
                "conntrack -L -p tcp 2>/dev/null | grep ESTABLISHED || true",
            );
            est.trim().is_empty()
        });
        assert!(gone, "conntrack entries left:\n{est}");
    }
}

/// A TCP socket bound to `addr` with SO_REUSEADDR (so a client port can be reused towards
/// another destination while its first connection lives), made by the crate's own socket
/// calls.
pub fn socket2_bound(addr: SocketAddr) -> io::Result<Socket> {
    let fd = socket::tcp_socket(&addr)?;
    socket::set_int_opt(fd.as_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    socket::bind(fd.as_fd(), &addr)?;
    Ok(Socket(fd))
}

/// A socket bound by [`socket2_bound`], not yet connected.
pub struct Socket(OwnedFd);

impl AsFd for Socket {
    /// For socket options that must be set before connect (`TCP_MAXSEG`).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Socket {
    /// Connects (blocking) and hands the socket over as a stream.
    pub fn connect(self, addr: SocketAddr) -> io::Result<TcpStream> {
        let s = TcpStream::from(self.0);
        s.set_nonblocking(false)?;
        socket::connect(s.as_fd(), &addr)?;
        Ok(s)
    }
}

/// Whether the `conntrack` tool is there (CI installs it; elsewhere the check is skipped).
pub fn conntrack_available() -> bool {
    let ok = Command::new("conntrack")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        prerequisites(
            &["conntrack"],
            "the leftover-conntrack check needs",
            "",
            "apt-get install conntrack",
        );
    }
    ok
}

/// The close lines of a log: (client port, up, down, plane, end).
pub fn close_lines(log: &str) -> Vec<(u16, u64, u64, String, String)> {
    let field = |l: &str, k: &str| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or("")
            .to_string()
    };
    log.lines()
        .filter(|l| l.contains(" closed: "))
        .map(|l| {
            let client = l.split_whitespace().nth(2).unwrap_or("");
            let port = client
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            let num = |k: &str| field(l, k).parse().unwrap_or(u64::MAX);
            (
                port,
                num("up="),
                num("down="),
                field(l, "plane="),
                field(l, "end="),
            )
        })
        .collect()
}

/// A server that runs `f` for every connection it accepts, each on its own thread, until
/// `count` were accepted.
pub fn serve_many(
    l: TcpListener,
    count: usize,
    f: impl Fn(usize, TcpStream) + Send + Sync + Clone + 'static,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut handles = Vec::new();
        for i in 0..count {
            let s = accept_timeout(&l, Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("accept #{i}: {e}"));
            let f = f.clone();
            handles.push(thread::spawn(move || f(i, s)));
        }
        for h in handles {
            join(h);
        }
    })
}
