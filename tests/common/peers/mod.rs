//! Other programs and protocol ends the proxy tests talk to. This file holds what they need on the
//! host: the check that the external tools are installed, the sweep of a killed run's leftovers,
//! temporary directories, per-namespace hosts files and a throw-away system user for danted's
//! username method. `servers` starts the external SOCKS5 / shadowsocks servers (danted,
//! microsocks, ssserver) inside a test namespace and serves and fetches `Pattern` bodies over
//! HTTP; `socks` is a minimal SOCKS5 client that can also send arbitrary (broken) bytes. Both are
//! re-exported, so every helper is `peers::NAME`.
//!
//! Invariants: everything created here (processes, users, files) is removed by a `Drop` guard,
//! also when the test panics; leftovers of a killed run are swept like the harness sweeps
//! namespaces (only names carrying a pid that is no longer alive); every wait is bounded.

mod servers;
mod socks;

// Each test crate uses a different subset of the helpers (as `#![allow(dead_code)]` in
// common/mod.rs says), so a crate may name nothing a re-export brings in.
#[allow(unused_imports)]
pub use {servers::*, socks::*};

use super::*;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once};
use std::thread;
use std::time::Duration;

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
