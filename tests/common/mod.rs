//! Namespace harness for the integration tests: a client -> router -> server topology in three
//! network namespaces, the real `ksocks` binary running in the router, and traffic helpers that
//! check every byte.
//!
//! Invariants: every namespace and process a test creates is removed by a `Drop` guard, also when
//! the test panics; every wait is bounded in time; only addresses from 198.18.0.0/15 and
//! 2001:db8::/32 are used, and only inside namespaces created here.
#![allow(dead_code)] // each test crate uses a different subset of the helpers
pub mod cases;
pub mod frame;
pub mod peers;
pub mod splice;
pub mod udp;

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The ksocks binary under test.
pub const KSOCKS: &str = env!("CARGO_BIN_EXE_ksocks");
/// Default bound for any single socket operation in a test.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Prerequisites

/// True when the test can run. Without root, `ip` or `nft`: outside CI prints a SKIP line and
/// returns false; with `CI=true` panics, because CI must never silently skip.
pub fn require_root() -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root");
    }
    for tool in ["ip", "nft"] {
        let ok = Command::new(tool)
            .arg(if tool == "ip" { "-V" } else { "--version" })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            missing.push(tool);
        }
    }
    prerequisites(
        &missing,
        "network namespace tests need",
        "",
        "run as root with iproute2 and nftables installed",
    )
}

/// The verdict of a `require_*` check: true when nothing is `missing`. Otherwise outside CI
/// prints `SKIP: <need> <missing>; <hint>` and returns false; with `CI=true` panics, adding
/// `ci_note` to the reason.
pub fn prerequisites(missing: &[&str], need: &str, ci_note: &str, hint: &str) -> bool {
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{need} {}", missing.join(", "));
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true: a missing prerequisite is a failure{ci_note})");
    }
    eprintln!("SKIP: {msg}; {hint}");
    false
}

/// Raises the soft RLIMIT_NOFILE of the test process to the hard limit (1,000 connections need
/// 2,000+ descriptors on the client and server side together).
pub fn raise_nofile() -> libc::rlim_t {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: lim is a valid rlimit with cur <= max.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    lim.rlim_cur
}

// ---------------------------------------------------------------------------------------------
// Topology

/// How connections reach ksocks in the router.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inbound {
    Redirect,
    Tproxy,
}

/// Address family a test speaks; every topology has both configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

static NEXT_ID: AtomicU32 = AtomicU32::new(1);
static SWEEP: Once = Once::new();

/// Three namespaces `ks<pid%10000>-<n>-{c,r,s}`: client `c0` <-> `rc` router `rs` <-> `s0` server.
pub struct Topology {
    pub kind: Inbound,
    /// The ksocks listener port in the router.
    pub port: u16,
    /// The third address octet / v6 group of this topology (1..=250).
    pub n: u32,
    pub client: String,
    pub router: String,
    pub server: String,
    created: Vec<String>,
}

/// Runs `cmd` to completion; an error carries the command and its stderr.
pub fn run_checked(cmd: &mut Command) -> io::Result<()> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{:?} failed: {}",
            cmd,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn ip(args: &[&str]) -> io::Result<()> {
    run_checked(Command::new("ip").args(args))
}

/// Runs `nft -f -` with `rules` inside namespace `ns`.
fn nft(ns: &str, rules: &str) -> io::Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().unwrap().write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "nft in {ns} failed: {}\n{rules}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn name_prefix() -> String {
    format!("ks{}-", std::process::id() % 10000)
}

/// Removes namespaces named like ours (`ks<P>-<n>-<c|r|s>`) that a killed test run left behind:
/// only when no live process has a pid P (mod 10000), so a concurrent run (another build, another
/// test binary) never loses its namespaces.
fn sweep_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    let live = live_pid_suffixes();
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(p) = ns_name_pid(&name) else {
            continue;
        };
        if live.contains(&p) {
            continue;
        }
        kill_ns_pids(&name);
        let _ = ip(&["netns", "del", &name]);
        eprintln!("harness: removed stale namespace {name}");
    }
}

/// Pids of live processes, reduced mod 10000 like the names we give things.
fn live_pid_suffixes() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|p| p.file_name().to_str()?.parse::<u32>().ok())
                .map(|pid| pid % 10000)
                .collect()
        })
        .unwrap_or_default()
}

/// P when `name` is named like our namespaces, `ks<P>-<n>-<c|r|s>`.
fn ns_name_pid(name: &str) -> Option<u32> {
    let parts: Vec<&str> = name.strip_prefix("ks")?.split('-').collect();
    if parts.len() != 3 || !matches!(parts[2], "c" | "r" | "s") || parts[1].parse::<u32>().is_err()
    {
        return None;
    }
    parts[0].parse::<u32>().ok()
}

fn kill_ns_pids(ns: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            // SAFETY: kill has no memory-safety preconditions; pid is a process in a namespace
            // this harness created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

impl Topology {
    /// Builds the three namespaces, both veth pairs, IPv4 and IPv6 addresses and routes, router
    /// forwarding, and the nftables REDIRECT or TPROXY rule sending client TCP to `port`.
    pub fn new(kind: Inbound, port: u16) -> Topology {
        SWEEP.call_once(sweep_stale);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let n = (id - 1) % 250 + 1;
        let base = format!("{}{id}", name_prefix());
        let mut t = Topology {
            kind,
            port,
            n,
            client: format!("{base}-c"),
            router: format!("{base}-r"),
            server: format!("{base}-s"),
            created: Vec::new(),
        };
        if let Err(e) = t.build() {
            panic!("topology {base}: {e}");
        }
        t
    }

    fn build(&mut self) -> io::Result<()> {
        let (c, r, s) = (
            self.client.clone(),
            self.router.clone(),
            self.server.clone(),
        );
        for ns in [&c, &r, &s] {
            ip(&["netns", "add", ns])?;
            self.created.push(ns.clone());
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let n = self.n;
        ip(&[
            "-n", &r, "link", "add", "rc", "type", "veth", "peer", "name", "c0", "netns", &c,
        ])?;
        ip(&[
            "-n", &r, "link", "add", "rs", "type", "veth", "peer", "name", "s0", "netns", &s,
        ])?;
        let addrs: [(&str, &str, String, String); 4] = [
            (
                &c,
                "c0",
                format!("198.18.{n}.2/24"),
                format!("2001:db8:{n:x}:1::2/64"),
            ),
            (
                &r,
                "rc",
                format!("198.18.{n}.1/24"),
                format!("2001:db8:{n:x}:1::1/64"),
            ),
            (
                &r,
                "rs",
                format!("198.19.{n}.1/24"),
                format!("2001:db8:{n:x}:2::1/64"),
            ),
            (
                &s,
                "s0",
                format!("198.19.{n}.2/24"),
                format!("2001:db8:{n:x}:2::2/64"),
            ),
        ];
        for (ns, dev, v4, v6) in &addrs {
            ip(&["-n", ns, "addr", "add", v4, "dev", dev])?;
            ip(&["-n", ns, "-6", "addr", "add", v6, "dev", dev, "nodad"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        ip(&[
            "-n",
            &c,
            "route",
            "add",
            "default",
            "via",
            &format!("198.18.{n}.1"),
        ])?;
        ip(&[
            "-n",
            &c,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("2001:db8:{n:x}:1::1"),
        ])?;
        ip(&[
            "-n",
            &s,
            "route",
            "add",
            "default",
            "via",
            &format!("198.19.{n}.1"),
        ])?;
        ip(&[
            "-n",
            &s,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("2001:db8:{n:x}:2::1"),
        ])?;
        self.in_router(|| {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
            std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
        })
        .join()
        .expect("sysctl thread")?;
        let port = self.port;
        let rules = match self.kind {
            Inbound::Redirect => format!(
                "table inet ksocks {{\n chain pre {{\n  type nat hook prerouting priority dstnat; policy accept;\n  iifname \"rc\" meta l4proto tcp redirect to :{port}\n }}\n}}\n"
            ),
            Inbound::Tproxy => format!(
                "table inet ksocks {{\n chain pre {{\n  type filter hook prerouting priority mangle; policy accept;\n  iifname \"rc\" meta l4proto tcp tproxy ip to :{port} meta mark set 1 accept\n  iifname \"rc\" meta l4proto tcp tproxy ip6 to :{port} meta mark set 1 accept\n }}\n}}\n"
            ),
        };
        nft(&r, &rules)?;
        if self.kind == Inbound::Tproxy {
            ip(&["-n", &r, "rule", "add", "fwmark", "1", "lookup", "100"])?;
            ip(&[
                "-n",
                &r,
                "route",
                "add",
                "local",
                "0.0.0.0/0",
                "dev",
                "lo",
                "table",
                "100",
            ])?;
            ip(&[
                "-n", &r, "-6", "rule", "add", "fwmark", "1", "lookup", "100",
            ])?;
            ip(&[
                "-n", &r, "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "100",
            ])?;
        }
        Ok(())
    }

    /// The server's address in `fam` (what the client connects to; ksocks intercepts it).
    pub fn server_ip(&self, fam: Family) -> IpAddr {
        let n = self.n as u16;
        match fam {
            Family::V4 => IpAddr::V4(Ipv4Addr::new(198, 19, n as u8, 2)),
            Family::V6 => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, n, 2, 0, 0, 0, 2)),
        }
    }

    /// The client's address in `fam`.
    pub fn client_ip(&self, fam: Family) -> IpAddr {
        let n = self.n as u16;
        match fam {
            Family::V4 => IpAddr::V4(Ipv4Addr::new(198, 18, n as u8, 2)),
            Family::V6 => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, n, 1, 0, 0, 0, 2)),
        }
    }

    /// The router's address on the client side in `fam`.
    pub fn router_ip(&self, fam: Family) -> IpAddr {
        let n = self.n as u16;
        match fam {
            Family::V4 => IpAddr::V4(Ipv4Addr::new(198, 18, n as u8, 1)),
            Family::V6 => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, n, 1, 0, 0, 0, 1)),
        }
    }

    pub fn server_addr(&self, fam: Family, port: u16) -> SocketAddr {
        SocketAddr::new(self.server_ip(fam), port)
    }

    /// ksocks listener arguments for this topology: dual stack, REDIRECT or TPROXY.
    pub fn listen_args(&self) -> Vec<String> {
        let flag = match self.kind {
            Inbound::Redirect => "-r",
            Inbound::Tproxy => "-t",
        };
        vec![
            flag.into(),
            format!("0.0.0.0:{}", self.port),
            flag.into(),
            format!("[::]:{}", self.port),
        ]
    }

    /// Runs `f` on a new thread that first enters namespace `ns` (network namespaces are per
    /// thread, so the rest of the test process is unaffected). Sockets created by `f` stay in
    /// that namespace wherever they are used later.
    pub fn in_ns<T, F>(ns: &str, f: F) -> JoinHandle<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let path = format!("/run/netns/{ns}");
        thread::Builder::new()
            .name(format!("in-{ns}"))
            .spawn(move || {
                enter_netns(&path);
                f()
            })
            .expect("spawn namespace thread")
    }

    pub fn in_client<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        Self::in_ns(&self.client, f)
    }
    pub fn in_router<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        Self::in_ns(&self.router, f)
    }
    pub fn in_server<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        Self::in_ns(&self.server, f)
    }

    /// A listener in the server namespace on the server's `fam` address (backlog 4096).
    pub fn server_listener(&self, fam: Family, port: u16) -> TcpListener {
        let addr = self.server_addr(fam, port);
        let l = self
            .in_server(move || TcpListener::bind(addr))
            .join()
            .expect("server bind thread")
            .unwrap_or_else(|e| panic!("bind {addr} in server ns: {e}"));
        // Listening again on a listening socket only changes the backlog: 1,000 concurrent
        // connects must not overflow std's default of 128.
        // SAFETY: the fd is a valid listening socket owned by `l` for the duration of the call.
        unsafe { libc::listen(l.as_raw_fd(), 4096) };
        l
    }

    /// Connects from the client namespace to `addr`; the stream has read/write timeouts.
    pub fn client_connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let s = self
            .in_client(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
            .join()
            .expect("client connect thread")?;
        with_timeouts(&s, IO_TIMEOUT);
        Ok(s)
    }

    /// Connects many streams from the client namespace in one thread (cheaper than one thread
    /// per connection). Fails on the first error.
    pub fn client_connect_many(
        &self,
        addr: SocketAddr,
        count: usize,
    ) -> io::Result<Vec<TcpStream>> {
        let v = self
            .in_client(move || {
                let mut v = Vec::with_capacity(count);
                for _ in 0..count {
                    v.push(TcpStream::connect_timeout(&addr, Duration::from_secs(5))?);
                }
                Ok::<_, io::Error>(v)
            })
            .join()
            .expect("client connect thread")?;
        for s in &v {
            with_timeouts(s, IO_TIMEOUT);
        }
        Ok(v)
    }

    /// Installs an nftables rule in the server namespace that silently drops SYNs to `port`, so
    /// connects there time out instead of being refused.
    pub fn server_blackhole(&self, port: u16) {
        let rules = format!(
            "table inet blackhole {{\n chain in {{\n  type filter hook input priority 0; policy accept;\n  tcp dport {port} drop\n }}\n}}\n"
        );
        nft(&self.server, &rules).expect("server blackhole rule");
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            kill_ns_pids(ns);
        }
        for ns in self.created.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("harness: {e}");
            }
        }
    }
}

/// Moves the calling thread into the network namespace at `path` (panics on failure).
fn enter_netns(path: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: f is an open namespace fd for the duration of the call; setns only changes this
    // thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        panic!("setns {path}: {}", io::Error::last_os_error());
    }
}

// ---------------------------------------------------------------------------------------------
// Socket helpers

pub fn with_timeouts(s: &TcpStream, t: Duration) {
    s.set_read_timeout(Some(t)).expect("read timeout");
    s.set_write_timeout(Some(t)).expect("write timeout");
}

/// Accepts one connection, waiting at most `t`; the stream gets the default I/O timeouts.
pub fn accept_timeout(l: &TcpListener, t: Duration) -> io::Result<TcpStream> {
    let mut pfd = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let end = Instant::now() + t;
    let rc = loop {
        let left = end.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: pfd is a valid pollfd array of length 1 for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc >= 0 {
            break rc;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted || left.is_zero() {
            return Err(e);
        }
    };
    if rc == 0 {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "accept timed out"));
    }
    let (s, _) = l.accept()?;
    with_timeouts(&s, IO_TIMEOUT);
    Ok(s)
}

/// Makes the next close of `s` send a RST (SO_LINGER with a zero timeout).
pub fn set_linger_zero(s: &TcpStream) {
    let lg = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: lg is a valid linger struct and the length matches; the fd is owned by `s`.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &lg as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", io::Error::last_os_error());
}

/// Sets SO_RCVBUF or SO_SNDBUF (fixing the size disables autotuning on that socket).
pub fn set_buf(s: &TcpStream, opt: libc::c_int, bytes: usize) {
    let v = bytes as libc::c_int;
    // SAFETY: v is a valid c_int and the length matches; the fd is owned by `s`.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt: {}", io::Error::last_os_error());
}

/// Joins a thread, re-raising its panic with the thread's message.
pub fn join<T>(h: JoinHandle<T>) -> T {
    match h.join() {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e),
    }
}

/// Polls `f` every 20 ms until it returns true or `t` passes.
pub fn wait_until(t: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + t;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Deterministic traffic

/// A deterministic byte stream: xorshift64* words, little-endian, seeded. Both ends generate
/// the same stream, so a receiver can locate the first wrong byte without storing anything.
pub struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        // Spread small seeds and never start at 0 (a fixed point of xorshift).
        let state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
        Pattern {
            state: if state == 0 { 1 } else { state },
            word: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes()
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while self.used < 8 && i < buf.len() {
            buf[i] = self.word[self.used];
            self.used += 1;
            i += 1;
        }
        let rest = &mut buf[i..];
        let mut chunks = rest.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_word());
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            self.word = self.next_word();
            let k = tail.len();
            tail.copy_from_slice(&self.word[..k]);
            self.used = k;
        }
    }

    /// The first `len` bytes of the stream for `seed`.
    pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        Pattern::new(seed).fill(&mut v);
        v
    }
}

/// A 64-bit hash over a byte stream, independent of how the stream is chunked.
#[derive(Clone)]
pub struct StreamHash {
    h: u64,
    word: [u8; 8],
    used: usize,
    len: u64,
}

impl Default for StreamHash {
    fn default() -> Self {
        StreamHash {
            h: 0xCBF2_9CE4_8422_2325,
            word: [0; 8],
            used: 0,
            len: 0,
        }
    }
}

impl StreamHash {
    fn mix(&mut self, w: u64) {
        self.h = (self.h ^ w)
            .wrapping_mul(0x0000_0100_0000_01B3)
            .rotate_left(29);
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        while self.used != 0 && !data.is_empty() {
            self.word[self.used] = data[0];
            self.used = (self.used + 1) % 8;
            data = &data[1..];
            if self.used == 0 {
                let w = u64::from_le_bytes(self.word);
                self.mix(w);
            }
        }
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            self.mix(u64::from_le_bytes(c.try_into().unwrap()));
        }
        for &b in chunks.remainder() {
            self.word[self.used] = b;
            self.used += 1;
        }
    }

    pub fn digest(&self) -> Digest {
        let mut h = self.clone();
        let mut w = [0u8; 8];
        w[..h.used].copy_from_slice(&h.word[..h.used]);
        h.mix(u64::from_le_bytes(w) ^ (h.used as u64) << 56);
        h.mix(h.len);
        Digest {
            len: self.len,
            hash: h.h,
            first_diff: None,
        }
    }
}

/// What one end saw of a stream: its length, its hash, and (receiver side) the offset of the
/// first byte that differs from the expected pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Digest {
    pub len: u64,
    pub hash: u64,
    pub first_diff: Option<u64>,
}

impl Digest {
    /// The digest of the first `len` bytes of the pattern for `seed`.
    pub fn of_pattern(seed: u64, len: u64) -> Digest {
        let mut p = Pattern::new(seed);
        let mut h = StreamHash::default();
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            p.fill(&mut buf[..k]);
            h.update(&buf[..k]);
            left -= k as u64;
        }
        h.digest()
    }

    /// Panics with a precise message unless `received` matches `self` (the sent digest).
    pub fn assert_received(&self, received: &Digest, what: &str) {
        if self.len == received.len && self.hash == received.hash && received.first_diff.is_none() {
            return;
        }
        let diff = match received.first_diff {
            Some(off) => format!("first differing byte at offset {off}"),
            None if received.len < self.len => {
                format!(
                    "received a correct prefix, {} bytes missing",
                    self.len - received.len
                )
            }
            None if received.len > self.len => {
                format!(
                    "{} extra bytes after the expected end",
                    received.len - self.len
                )
            }
            None => "hash differs (no differing offset found?)".into(),
        };
        panic!(
            "{what}: sent {} bytes hash {:016x}, received {} bytes hash {:016x}: {diff}",
            self.len, self.hash, received.len, received.hash
        );
    }
}

/// Checks received bytes against the pattern for `seed` as they arrive.
pub struct Verifier {
    expected: Pattern,
    hash: StreamHash,
    first_diff: Option<u64>,
    scratch: Vec<u8>,
}

impl Verifier {
    pub fn new(seed: u64) -> Verifier {
        Verifier {
            expected: Pattern::new(seed),
            hash: StreamHash::default(),
            first_diff: None,
            scratch: Vec::new(),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        if self.first_diff.is_none() {
            self.scratch.resize(data.len(), 0);
            self.expected.fill(&mut self.scratch);
            if self.scratch[..] != *data {
                let i = data
                    .iter()
                    .zip(&self.scratch)
                    .position(|(a, b)| a != b)
                    .unwrap();
                self.first_diff = Some(self.hash.len + i as u64);
            }
        }
        self.hash.update(data);
    }

    pub fn len(&self) -> u64 {
        self.hash.len
    }

    pub fn digest(&self) -> Digest {
        Digest {
            first_diff: self.first_diff,
            ..self.hash.digest()
        }
    }
}

/// Writes `len` bytes of the pattern for `seed` to `w` in chunks of up to `chunk` bytes.
/// Returns the digest of what was written (on error: the error and the bytes written so far).
pub fn send_pattern(
    w: &mut impl Write,
    seed: u64,
    len: u64,
    chunk: usize,
) -> Result<Digest, (io::Error, u64)> {
    let mut p = Pattern::new(seed);
    let mut h = StreamHash::default();
    let mut buf = vec![0u8; chunk.max(1)];
    let mut left = len;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..k]);
        if let Err(e) = w.write_all(&buf[..k]) {
            return Err((e, h.len));
        }
        h.update(&buf[..k]);
        left -= k as u64;
    }
    Ok(h.digest())
}

/// Reads from `r` until EOF (or `max` bytes), verifying against the pattern for `seed`.
pub fn recv_verify(r: &mut impl Read, seed: u64, max: u64) -> io::Result<Digest> {
    let mut v = Verifier::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    while v.len() < max {
        let k = (max - v.len()).min(buf.len() as u64) as usize;
        match r.read(&mut buf[..k]) {
            Ok(0) => break,
            Ok(n) => v.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("read after {} bytes: {e}", v.len()),
                ))
            }
        }
    }
    Ok(v.digest())
}

/// Reads exactly `len` bytes (not waiting for EOF) and verifies them against `seed`.
pub fn recv_exact_verify(r: &mut impl Read, seed: u64, len: u64) -> io::Result<Digest> {
    let d = recv_verify(r, seed, len)?;
    if d.len < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("EOF after {} of {len} bytes", d.len),
        ));
    }
    Ok(d)
}

/// Sends the pattern and half-closes; panics on error.
pub fn send_all_and_shutdown(s: &mut TcpStream, seed: u64, len: u64) -> Digest {
    let d = send_pattern(s, seed, len, 64 * 1024)
        .unwrap_or_else(|(e, n)| panic!("send after {n} bytes: {e}"));
    s.shutdown(Shutdown::Write).expect("shutdown(SHUT_WR)");
    d
}

/// Reads until EOF and asserts it saw exactly `len` bytes of the pattern for `seed`.
pub fn expect_stream(s: &mut TcpStream, seed: u64, len: u64, what: &str) {
    let got = recv_verify(s, seed, len + 1).unwrap_or_else(|e| panic!("{what}: {e}"));
    Digest::of_pattern(seed, len).assert_received(&got, what);
}

/// One `read`, retried when a signal interrupts it (reads with SO_RCVTIMEO are never restarted
/// by the kernel, so any stray signal or freezer wake-up surfaces as EINTR).
pub fn read_some(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut tries = 0;
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted && tries < 100 => tries += 1,
            other => return other,
        }
    }
}

/// Expects EOF (or a reset) within the stream's read timeout, no data.
pub fn expect_eof(s: &mut TcpStream, what: &str) {
    let mut b = [0u8; 1];
    match read_some(s, &mut b) {
        Ok(0) => {}
        Ok(_) => panic!("{what}: expected EOF, got data"),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: expected EOF, got {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The ksocks process

/// Parsed `ksocks: stats ...` line.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub fields: HashMap<String, u64>,
}

impl Stats {
    pub fn get(&self, k: &str) -> u64 {
        *self
            .fields
            .get(k)
            .unwrap_or_else(|| panic!("stats line has no {k}= field: {:?}", self.fields))
    }
    pub fn open(&self) -> u64 {
        self.get("open")
    }

    /// Parses `ksocks: stats open=N total=N ...`; None if the line is not a stats line.
    pub fn parse(line: &str) -> Option<Stats> {
        let rest = line.trim().strip_prefix("ksocks: stats ")?;
        let mut fields = HashMap::new();
        for kv in rest.split_whitespace() {
            let (k, v) = kv.split_once('=')?;
            fields.insert(k.to_string(), v.parse().ok()?);
        }
        Some(Stats { fields })
    }
}

/// A running ksocks in the router namespace; killed on drop.
pub struct Ksocks {
    child: Child,
    log: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
    /// Socket descriptors held right after `ready` (the listeners).
    pub socket_baseline: usize,
}

impl Ksocks {
    /// Spawns `ip netns exec <router> ksocks -v <args>` and waits (≤ 5 s) for `ksocks: ready`.
    pub fn start(topo: &Topology, args: &[&str]) -> Ksocks {
        Self::try_start(topo, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like `start`, but with the topology's listener arguments first.
    pub fn serve(topo: &Topology, extra: &[&str]) -> Ksocks {
        let listen = topo.listen_args();
        let mut args: Vec<&str> = listen.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        Self::start(topo, &args)
    }

    pub fn try_start(topo: &Topology, args: &[&str]) -> Result<Ksocks, String> {
        Self::try_start_env(topo, args, &[])
    }

    /// Like `start`, with extra environment variables for ksocks (the test hooks).
    pub fn start_env(topo: &Topology, args: &[&str], env: &[(&str, &str)]) -> Ksocks {
        Self::try_start_env(topo, args, env).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_start_env(
        topo: &Topology,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Ksocks, String> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &topo.router, KSOCKS, "-v"])
            .args(args)
            .envs(env.iter().copied());
        // ksocks dies with the test thread that started it even if the test process is killed.
        die_with_parent(&mut cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn ksocks: {e}"))?;
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        // Ends at EOF, i.e. when ksocks exits.
        let reader = collect_lines(stderr, log.clone(), usize::MAX);
        let mut ks = Ksocks {
            child,
            log,
            reader: Some(reader),
            socket_baseline: 0,
        };
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            if ks.log().lines().any(|l| l.trim() == "ksocks: ready") {
                break;
            }
            if let Ok(Some(st)) = ks.child.try_wait() {
                thread::sleep(Duration::from_millis(50));
                return Err(format!(
                    "ksocks {args:?} exited with {st} before ready; log:\n{}",
                    ks.log()
                ));
            }
            if Instant::now() >= end {
                return Err(format!(
                    "ksocks {args:?} not ready within 5 s; log:\n{}",
                    ks.log()
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
        ks.socket_baseline = ks.socket_count();
        Ok(ks)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything ksocks wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits (bounded) until a log line contains `pattern`.
    pub fn wait_for_log(&self, pattern: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().contains(pattern))
    }

    /// Waits for a `closed:` line containing all of `parts`; returns it.
    pub fn wait_close_line(&self, parts: &[&str], timeout: Duration) -> Option<String> {
        let mut found = None;
        wait_until(timeout, || {
            found = self
                .log()
                .lines()
                .find(|l| l.contains(" closed: ") && parts.iter().all(|p| l.contains(p)))
                .map(str::to_string);
            found.is_some()
        });
        found
    }

    /// Waits (≤ 5 s) for the close line of a connection with these byte counts and end
    /// reason; returns it, or panics with the log tail.
    pub fn expect_close_line(&self, up: u64, down: u64, end: &str) -> String {
        let parts = [
            format!("up={up} "),
            format!("down={down} "),
            format!("end={end}"),
        ];
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        self.wait_close_line(&parts, Duration::from_secs(5))
            .unwrap_or_else(|| {
                panic!(
                    "no close line with {}; log:\n{}",
                    parts.concat(),
                    self.log_tail(20)
                )
            })
    }

    /// Waits (≤ 5 s) for a close line with one of `ends`; returns it, or panics with the log
    /// tail.
    pub fn expect_end(&self, ends: &[&str]) -> String {
        let mut line = None;
        wait_until(Duration::from_secs(5), || {
            line = self
                .log()
                .lines()
                .find(|l| {
                    l.contains(" closed: ") && ends.iter().any(|e| l.contains(&format!("end={e}")))
                })
                .map(str::to_string);
            line.is_some()
        });
        line.unwrap_or_else(|| {
            panic!(
                "no close line with end={ends:?}; log:\n{}",
                self.log_tail(20)
            )
        })
    }

    /// Sends SIGUSR1 and parses the next `ksocks: stats` line (≤ 3 s).
    pub fn stats(&self) -> Stats {
        let before = self.log().len();
        // SAFETY: kill has no memory-safety preconditions; the pid is our child.
        unsafe { libc::kill(self.pid(), libc::SIGUSR1) };
        let mut got = None;
        wait_until(Duration::from_secs(3), || {
            let log = self.log();
            got = log[before..].lines().find_map(Stats::parse);
            got.is_some()
        });
        got.unwrap_or_else(|| panic!("no stats line after SIGUSR1; log:\n{}", self.log()))
    }

    /// Resident set size in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Number of socket descriptors ksocks holds.
    pub fn socket_count(&self) -> usize {
        let Ok(d) = std::fs::read_dir(format!("/proc/{}/fd", self.pid())) else {
            return 0;
        };
        d.flatten()
            .filter(|e| {
                std::fs::read_link(e.path())
                    .map(|t| t.to_string_lossy().starts_with("socket:"))
                    .unwrap_or(false)
            })
            .count()
    }

    /// After a test: no connection open and no BPF map entry (stats), and socket fds back to the
    /// listener baseline, each within 5 s. Panics with the log otherwise.
    pub fn assert_idle(&self) {
        let mut last = Stats::default();
        let open_ok = wait_until(Duration::from_secs(5), || {
            last = self.stats();
            // map_entries: sockets still in the BPF maps (0 when sockmap is unused).
            last.open() == 0 && last.fields.get("map_entries").copied().unwrap_or(0) == 0
        });
        assert!(
            open_ok,
            "ksocks still holds connections: {:?}\nlog:\n{}",
            last.fields,
            self.log_tail(40)
        );
        let mut n = 0;
        let fds_ok = wait_until(Duration::from_secs(5), || {
            n = self.socket_count();
            n == self.socket_baseline
        });
        assert!(
            fds_ok,
            "ksocks holds {n} sockets, baseline {}\nlog:\n{}",
            self.socket_baseline,
            self.log_tail(40)
        );
    }

    /// The last `n` log lines, with the `stats` lines that polling produces reduced to the
    /// newest one.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        let last_stats = all.iter().rposition(|l| l.starts_with("ksocks: stats "));
        let lines: Vec<&str> = all
            .into_iter()
            .enumerate()
            .filter(|(i, l)| !l.starts_with("ksocks: stats ") || Some(*i) == last_stats)
            .map(|(_, l)| l)
            .collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then wait ≤ 3 s, then SIGKILL. Returns the exit status if it exited by itself.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(st)) = self.child.try_wait() {
            return Some(st);
        }
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(3);
        let mut status = None;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                status = Some(st);
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        if status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        status
    }
}

impl Drop for Ksocks {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Makes the child `cmd` spawns get SIGKILL when the thread that spawned it exits. The death
/// signal survives `ip netns exec`'s execve, so it reaches the program run in the namespace.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls prctl, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Spawns a thread that appends every line of `r` to `log` until EOF, while `log` holds fewer
/// than `cap` bytes.
pub fn collect_lines(
    r: impl Read + Send + 'static,
    log: Arc<Mutex<String>>,
    cap: usize,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut line = String::new();
        while let Ok(n) = r.read_line(&mut line) {
            if n == 0 {
                break;
            }
            let mut l = log.lock().unwrap();
            if l.len() < cap {
                l.push_str(&line);
            }
            drop(l);
            line.clear();
        }
    })
}

/// Runs ksocks as a plain process (no namespace) and returns (exit status, stdout, stderr),
/// killing it after `t`.
pub fn run_ksocks(args: &[&str], t: Duration) -> (Option<i32>, String, String) {
    let mut child = Command::new(KSOCKS)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ksocks");
    let end = Instant::now() + t;
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(10));
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (status.and_then(|s| s.code()), out, err)
}
