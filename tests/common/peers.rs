//! Other programs and protocol ends the proxy tests talk to: external SOCKS5 / shadowsocks
//! servers (danted, microsocks, ssserver) started inside a test namespace, a throw-away system
//! user for danted's username method, per-namespace hosts files, an HTTP server whose bodies
//! are `Pattern` streams, `curl` runs whose output is verified, and a minimal SOCKS5 client that
//! can also send arbitrary (broken) bytes.
//!
//! Invariants: everything created here (processes, users, files) is removed by a `Drop` guard,
//! also when the test panics; leftovers of a killed run are swept like the harness sweeps
//! namespaces (only names carrying a pid that is no longer alive); every wait is bounded.

use super::*;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

// ---------------------------------------------------------------------------------------------
// Prerequisites

/// Where `scripts/test-peers` installs shadowsocks-rust, then the bench's cache, then PATH.
const SSSERVER_CANDIDATES: [&str; 2] = [
    "/var/cache/ksocks-test/cargo/bin/ssserver",
    "/var/cache/ksocks-bench/cargo/bin/ssserver",
];

/// The shadowsocks-rust server binary: `$KSOCKS_SSSERVER`, the cache directories, or PATH.
pub fn ssserver_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KSOCKS_SSSERVER") {
        let p = PathBuf::from(p);
        return is_executable(&p).then_some(p);
    }
    SSSERVER_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| is_executable(p))
        .or_else(|| which("ssserver"))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Looks `name` up in PATH (and the sbin directories, which root's PATH may lack).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/usr/local/sbin"])
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| is_executable(p));
    found
}

/// True when every program in `tools` is installed. Otherwise like `require_root`: outside CI
/// a SKIP line and false, with `CI=true` a panic (CI installs them with `scripts/test-peers`).
pub fn require_tools(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| match *t {
            "ssserver" => ssserver_path().is_none(),
            t => which(t).is_none(),
        })
        .collect();
    prerequisites(
        &missing,
        "this test needs",
        "; scripts/test-peers installs them",
        "install them with scripts/test-peers",
    )
}

// ---------------------------------------------------------------------------------------------
// Stale leftovers of killed runs

static SWEEP_PEERS: Once = Once::new();

/// Removes test users (`kst<P>u<n>`) and hosts directories (`/etc/netns/ks<P>-<n>-<c|r|s>`) left
/// by a killed run whose pid P is gone.
fn sweep_stale_peers() {
    let live = live_pid_suffixes();
    let dead = |p: &str| p.parse::<u32>().is_ok_and(|p| !live.contains(&p));
    if let Ok(passwd) = std::fs::read_to_string("/etc/passwd") {
        for user in passwd.lines().filter_map(|l| l.split(':').next()) {
            let Some(rest) = user.strip_prefix("kst") else {
                continue;
            };
            let Some((p, n)) = rest.split_once('u') else {
                continue;
            };
            if n.parse::<u32>().is_ok() && dead(p) {
                let _ = Command::new("userdel").arg(user).output();
                eprintln!("peers: removed stale test user {user}");
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/etc/netns") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if ns_name_pid(&name).is_some_and(|p| !live.contains(&p))
                && !Path::new("/run/netns").join(&name).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
                eprintln!("peers: removed stale /etc/netns/{name}");
            }
        }
    }
}

fn sweep_once() {
    SWEEP_PEERS.call_once(sweep_stale_peers);
}

// ---------------------------------------------------------------------------------------------
// Files

/// A directory for this test's generated files (configs, secrets), removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "peers-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        TempDir(p)
    }

    /// Writes `name` in the directory with mode `mode`; returns its path.
    pub fn write(&self, name: &str, content: &str, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.0.join(name);
        std::fs::write(&p, content).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `/etc/netns/<ns>/hosts`: `ip netns exec <ns>` bind-mounts it over /etc/hosts for the
/// programs it starts, so names resolve there without touching the machine's /etc/hosts. Must
/// exist before the program in that namespace is started; removed (with the directory) on drop.
pub struct NetnsHosts {
    dir: PathBuf,
}

impl NetnsHosts {
    pub fn write(ns: &str, entries: &[(IpAddr, &str)]) -> NetnsHosts {
        sweep_once();
        let dir = Path::new("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let hosts = NetnsHosts { dir };
        hosts.set(entries);
        let dir = &hosts.dir;
        // Names not in the file go to a nameserver that is never there (nothing listens on
        // port 53 in a test namespace): a lookup fails at once instead of waiting on the
        // machine's resolvers.
        let resolv = dir.join("resolv.conf");
        std::fs::write(
            &resolv,
            "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
        )
        .unwrap_or_else(|e| panic!("write {}: {e}", resolv.display()));
        hosts
    }

    /// Rewrites the file in place (the same inode, so programs already running in the
    /// namespace, which see it through a bind mount, read the new entries).
    pub fn set(&self, entries: &[(IpAddr, &str)]) {
        let mut text = String::from(
            "# written by the ksocks proxy tests\n127.0.0.1 localhost\n::1 localhost\n",
        );
        for (ip, name) in entries {
            text.push_str(&format!("{ip} {name}\n"));
        }
        let hosts = self.dir.join("hosts");
        std::fs::write(&hosts, text).unwrap_or_else(|e| panic!("write {}: {e}", hosts.display()));
    }
}

impl Drop for NetnsHosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("hosts"));
        let _ = std::fs::remove_file(self.dir.join("resolv.conf"));
        let _ = std::fs::remove_dir(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// System users (danted's `username` method checks the system password database)

/// useradd/userdel lock /etc/passwd; concurrent calls from parallel tests fail, so serialize.
static USERDB: Mutex<()> = Mutex::new(());
static NEXT_USER: AtomicU32 = AtomicU32::new(1);

/// A system user with a password and no home or shell, deleted on drop.
pub struct SystemUser {
    pub name: String,
    pub pass: String,
}

fn userdb_cmd(args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    let _g = USERDB.lock().unwrap_or_else(|e| e.into_inner());
    let mut last = String::new();
    // useradd exits 10 while another process holds the passwd lock: retry, bounded.
    for _ in 0..20 {
        let mut child = Command::new(args[0])
            .args(&args[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{}: {e}", args[0]))?;
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .map_err(|e| format!("{}: {e}", args[0]))?;
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            return Ok(());
        }
        last = format!(
            "{args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        thread::sleep(Duration::from_millis(100));
    }
    Err(last)
}

impl SystemUser {
    pub fn create() -> SystemUser {
        sweep_once();
        let n = NEXT_USER.fetch_add(1, Ordering::Relaxed);
        let name = format!("kst{}u{n}", std::process::id() % 10000);
        let pass = format!("pw-{n}-{}", std::process::id());
        userdb_cmd(
            &[
                "useradd",
                "--no-create-home",
                "--no-user-group",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                &name,
            ],
            None,
        )
        .unwrap_or_else(|e| panic!("create test user: {e}"));
        let u = SystemUser { name, pass };
        userdb_cmd(&["chpasswd"], Some(&format!("{}:{}\n", u.name, u.pass)))
            .unwrap_or_else(|e| panic!("set test user password: {e}"));
        u
    }
}

impl Drop for SystemUser {
    fn drop(&mut self) {
        if let Err(e) = userdb_cmd(&["userdel", &self.name], None) {
            eprintln!("peers: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// External programs in a namespace

/// A program started with `ip netns exec <ns>` in its own process group, its output collected;
/// the whole group is killed on drop.
pub struct Peer {
    pub what: String,
    child: Child,
    log: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Peer {
    /// Starts `program args` in namespace `ns` and waits (≤ 5 s) until `probe` accepts a TCP
    /// connection from inside that namespace.
    pub fn start(ns: &str, what: &str, program: &Path, args: &[String], probe: SocketAddr) -> Peer {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // The peer dies with the test thread that started it even if the test process is killed
        // (its forked children are killed by the group kill in Drop or by the namespace removal).
        die_with_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what} ({}): {e}", program.display()));
        let log = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        let out: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        for r in out {
            // Bounded: a chatty peer must not grow the test's memory without limit.
            readers.push(collect_lines(r, log.clone(), 1 << 20));
        }
        let mut p = Peer {
            what: what.to_string(),
            child,
            log,
            readers,
        };
        let ready = wait_until(Duration::from_secs(5), || {
            if let Ok(Some(_)) = p.child.try_wait() {
                return true;
            }
            Topology::in_ns(ns, move || {
                TcpStream::connect_timeout(&probe, Duration::from_millis(200)).is_ok()
            })
            .join()
            .unwrap_or(false)
        });
        if let Ok(Some(st)) = p.child.try_wait() {
            thread::sleep(Duration::from_millis(50));
            panic!("{what} exited with {st} at start; output:\n{}", p.log());
        }
        assert!(
            ready,
            "{what} not accepting on {probe} within 5 s; output:\n{}",
            p.log()
        );
        p
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let pgid = self.child.id() as i32;
        // SAFETY: kill has no memory-safety preconditions; the group is the one this child
        // leads (process_group(0)), holding only the peer and its forks.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The pipes close when the last process of the group is gone; the namespace removal
        // kills any straggler, so these joins end.
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

/// Removes the topology's nftables REDIRECT/TPROXY rule, so client connections to the router
/// itself (a `--socks` listener) arrive unchanged.
pub fn remove_intercept_rule(topo: &Topology) {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &topo.router,
            "nft",
            "delete",
            "table",
            "inet",
            "ksocks",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run nft");
    assert!(
        out.status.success(),
        "nft delete table inet ksocks in {}: {}",
        topo.router,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// danted (dante-server) listening on `listen` in namespace `ns`, sending out of `ext_dev`.
/// With `user`, the SOCKS5 username method (system password database) is required.
pub fn start_danted(
    ns: &str,
    listen: SocketAddr,
    ext_dev: &str,
    user: Option<&SystemUser>,
) -> (Peer, TempDir) {
    start_dante(ns, listen, ext_dev, user, false)
}

/// danted as [`start_danted`]; with `udp`, UDP ASSOCIATE is allowed too and the outside UDP
/// socket stays unconnected (`udp.connectdst: no`), which makes the relay full cone (by
/// default dante connects it to the first destination).
pub fn start_dante(
    ns: &str,
    listen: SocketAddr,
    ext_dev: &str,
    user: Option<&SystemUser>,
    udp: bool,
) -> (Peer, TempDir) {
    let dir = TempDir::new(if udp { "danted-udp" } else { "danted" });
    let method = if user.is_some() { "username" } else { "none" };
    let (connectdst, commands) = match udp {
        true => ("udp.connectdst: no\n", "connect udpassociate udpreply"),
        false => ("", "connect"),
    };
    let conf = format!(
        "# ksocks proxy test\n\
         logoutput: stderr\n\
         internal: {ip} port = {port}\n\
         external: {ext_dev}\n\
         socksmethod: {method}\n\
         clientmethod: none\n\
         user.privileged: root\n\
         user.unprivileged: nobody\n\
         {connectdst}\
         client pass {{ from: 0/0 to: 0/0 }}\n\
         socks pass {{ from: 0/0 to: 0/0 command: {commands} }}\n",
        ip = listen.ip(),
        port = listen.port(),
    );
    let path = dir.write("danted.conf", &conf, 0o644);
    let bin = which("danted").expect("danted installed");
    let args = vec![
        "-f".to_string(),
        path.display().to_string(),
        "-N".into(),
        "1".into(),
    ];
    let p = Peer::start(ns, "danted", &bin, &args, listen);
    (p, dir)
}

/// microsocks on `listen` in `ns`, with `-u user -P pass` when `auth` is given.
pub fn start_microsocks(ns: &str, listen: SocketAddr, auth: Option<(&str, &str)>) -> Peer {
    let bin = which("microsocks").expect("microsocks installed");
    let mut args = vec![
        "-i".to_string(),
        listen.ip().to_string(),
        "-p".into(),
        listen.port().to_string(),
    ];
    if let Some((u, p)) = auth {
        args.extend(["-u".into(), u.into(), "-P".into(), p.into()]);
    }
    Peer::start(ns, "microsocks", &bin, &args, listen)
}

/// shadowsocks-rust `ssserver -m none` on `listen` in `ns`.
pub fn start_ssserver(ns: &str, listen: SocketAddr) -> Peer {
    let bin = ssserver_path().expect("ssserver installed");
    let args = vec![
        "-s".to_string(),
        listen.to_string(),
        "-m".into(),
        "none".into(),
        "-k".into(),
        "ksocks-test".into(),
        "--tcp-no-delay".into(),
    ];
    Peer::start(ns, "ssserver", &bin, &args, listen)
}

// ---------------------------------------------------------------------------------------------
// HTTP server with Pattern bodies

/// Serves `GET /pattern/<seed>/<len>` with the first `len` bytes of the pattern for `seed`
/// (HTTP/1.1, `Connection: close`) on each listener until dropped. Listeners must have been
/// bound in the server namespace (e.g. `Topology::server_listener`).
pub struct HttpPatternServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    served: Arc<AtomicU32>,
}

impl HttpPatternServer {
    pub fn start(listeners: Vec<TcpListener>) -> HttpPatternServer {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU32::new(0));
        let threads = listeners
            .into_iter()
            .map(|l| {
                let (stop, served) = (stop.clone(), served.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(s) = accept_timeout(&l, Duration::from_millis(100)) else {
                            continue;
                        };
                        with_timeouts(&s, Duration::from_secs(10));
                        if serve_http(s).is_ok() {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        HttpPatternServer {
            stop,
            threads,
            served,
        }
    }

    /// Responses sent completely so far.
    pub fn served(&self) -> u32 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for HttpPatternServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve_http(mut s: TcpStream) -> io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = read_some(&mut s, &mut buf)?;
        if n == 0 || head.len() > 16 * 1024 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad request head",
            ));
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let parsed = path
        .strip_prefix("/pattern/")
        .and_then(|r| r.split_once('/'))
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
    let Some((seed, len)) = parsed else {
        s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
        return Ok(());
    };
    write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    )?;
    send_pattern(&mut s, seed, len, 64 * 1024).map_err(|(e, _)| e)?;
    s.shutdown(Shutdown::Write)?;
    // Wait for the client's close so the response is never cut by our RST.
    let _ = read_some(&mut s, &mut buf);
    Ok(())
}

/// The result of one `curl` run whose body was verified against a pattern.
pub struct CurlRun {
    pub status: Option<i32>,
    pub body: Digest,
    pub stderr: String,
}

/// Runs `ip netns exec <ns> curl -sS --max-time 20 <args>` (killed after 30 s at most),
/// verifying stdout against the pattern for `seed` as it streams.
pub fn curl_pattern(ns: &str, args: &[String], seed: u64) -> CurlRun {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-sS", "--max-time", "20"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn curl");
    let pid = child.id() as i32;
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let watchdog_done = Arc::new(AtomicBool::new(false));
    let wd = watchdog_done.clone();
    let watchdog = thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(30);
        while !wd.load(Ordering::Relaxed) && Instant::now() < end {
            thread::sleep(Duration::from_millis(50));
        }
        if !wd.load(Ordering::Relaxed) {
            // SAFETY: kill has no memory-safety preconditions; pid is our unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let body =
        recv_verify(&mut stdout, seed, u64::MAX).unwrap_or_else(|e| panic!("curl stdout: {e}"));
    let st = child.wait().expect("wait curl");
    watchdog_done.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    let stderr = err_reader.join().unwrap_or_default();
    CurlRun {
        status: st.code().or_else(|| st.signal().map(|s| 128 + s)),
        body,
        stderr,
    }
}

// ---------------------------------------------------------------------------------------------
// SOCKS5 client side (RFC 1928 / RFC 1929), including deliberately broken messages

/// A CONNECT destination.
#[derive(Clone, Debug)]
pub enum Target {
    Ip(SocketAddr),
    Name(String, u16),
}

pub const CMD_CONNECT: u8 = 1;
pub const CMD_BIND: u8 = 2;
pub const CMD_UDP_ASSOCIATE: u8 = 3;

/// VER NMETHODS METHODS.
pub fn socks_greeting(methods: &[u8]) -> Vec<u8> {
    let mut v = vec![5, methods.len() as u8];
    v.extend_from_slice(methods);
    v
}

/// RFC 1929: VER=1 ULEN UNAME PLEN PASSWD.
pub fn socks_auth(user: &str, pass: &str) -> Vec<u8> {
    let mut v = vec![1, user.len() as u8];
    v.extend_from_slice(user.as_bytes());
    v.push(pass.len() as u8);
    v.extend_from_slice(pass.as_bytes());
    v
}

/// VER CMD RSV ATYP DST.ADDR DST.PORT.
pub fn socks_request(cmd: u8, t: &Target) -> Vec<u8> {
    let mut v = vec![5, cmd, 0];
    let port = match t {
        Target::Ip(SocketAddr::V4(a)) => {
            v.push(1);
            v.extend_from_slice(&a.ip().octets());
            a.port()
        }
        Target::Ip(SocketAddr::V6(a)) => {
            v.push(4);
            v.extend_from_slice(&a.ip().octets());
            a.port()
        }
        Target::Name(n, port) => {
            v.push(3);
            v.push(n.len() as u8);
            v.extend_from_slice(n.as_bytes());
            *port
        }
    };
    v.extend_from_slice(&port.to_be_bytes());
    v
}

/// A parsed SOCKS5 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocksReply {
    pub rep: u8,
    pub bound: Option<SocketAddr>,
}

/// Reads one complete reply (VER REP RSV ATYP BND.ADDR BND.PORT).
pub fn read_socks_reply(s: &mut impl Read) -> io::Result<SocksReply> {
    let mut h = [0u8; 4];
    s.read_exact(&mut h)?;
    if h[0] != 5 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("reply version {} (header {h:?})", h[0]),
        ));
    }
    let bound = match h[3] {
        1 => {
            let mut a = [0u8; 6];
            s.read_exact(&mut a)?;
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Some(SocketAddr::new(ip.into(), u16::from_be_bytes([a[4], a[5]])))
        }
        4 => {
            let mut a = [0u8; 18];
            s.read_exact(&mut a)?;
            let ip: [u8; 16] = a[..16].try_into().unwrap();
            Some(SocketAddr::new(
                Ipv6Addr::from(ip).into(),
                u16::from_be_bytes([a[16], a[17]]),
            ))
        }
        3 => {
            let mut l = [0u8; 1];
            s.read_exact(&mut l)?;
            let mut a = vec![0u8; l[0] as usize + 2];
            s.read_exact(&mut a)?;
            None
        }
        t => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reply ATYP {t}"),
            ))
        }
    };
    Ok(SocksReply { rep: h[1], bound })
}

/// The client half of a SOCKS5 CONNECT on `s`: greeting, optional RFC 1929 auth, request, and
/// `first` payload bytes. `pipelined` sends all of it in one write before reading any answer
/// (what a pipelining client does); otherwise each message waits for its answer. Returns the
/// reply (REP 0 or not); errors on a protocol violation by the server.
pub fn socks_connect(
    s: &mut TcpStream,
    target: &Target,
    auth: Option<(&str, &str)>,
    first: &[u8],
    pipelined: bool,
) -> io::Result<SocksReply> {
    let method = if auth.is_some() { 2 } else { 0 };
    let greeting = socks_greeting(&[method]);
    let auth_msg = auth.map(|(u, p)| socks_auth(u, p));
    let req = socks_request(CMD_CONNECT, target);
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    if pipelined {
        let mut all = greeting;
        all.extend(auth_msg.iter().flatten());
        all.extend_from_slice(&req);
        all.extend_from_slice(first);
        s.write_all(&all)?;
    } else {
        s.write_all(&greeting)?;
    }
    let mut sel = [0u8; 2];
    s.read_exact(&mut sel)?;
    if sel != [5, method] {
        return Err(bad(format!(
            "method selection {sel:?}, expected [5, {method}]"
        )));
    }
    if let Some(a) = &auth_msg {
        if !pipelined {
            s.write_all(a)?;
        }
        let mut st = [0u8; 2];
        s.read_exact(&mut st)?;
        if st != [1, 0] {
            return Err(bad(format!("auth status {st:?}, expected [1, 0]")));
        }
    }
    if !pipelined {
        s.write_all(&req)?;
    }
    let reply = read_socks_reply(s)?;
    if !pipelined && reply.rep == 0 && !first.is_empty() {
        s.write_all(first)?;
    }
    Ok(reply)
}
