//! The ksocks process under test: started in a namespace with its log collected, its
//! `SIGUSR1` stats parsed, its close lines waited for, stopped by `SIGTERM` (then `SIGKILL`),
//! and never outliving the test.

use super::*;
use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

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
