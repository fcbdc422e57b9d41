//! The test topology: client -> router -> server network namespaces over veth pairs, their
//! addresses (198.18.0.0/15, 2001:db8::/32 only), routes and nftables REDIRECT/TPROXY rules,
//! and running code or commands inside them. Namespaces are removed by `Drop`, also when a
//! test panics, and stale ones of dead test processes are swept.

use super::*;
use std::fs::File;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::thread::{self, JoinHandle};
use std::time::Duration;

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
pub fn nft(ns: &str, rules: &str) -> io::Result<()> {
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
pub fn live_pid_suffixes() -> Vec<u32> {
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
pub fn ns_name_pid(name: &str) -> Option<u32> {
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
