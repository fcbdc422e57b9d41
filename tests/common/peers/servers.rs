//! The programs and servers at the far end of a proxied connection: a `Peer` is an external
//! program (danted, microsocks, ssserver) started in a test namespace with its output collected;
//! `HttpPatternServer` serves `Pattern` bodies over HTTP and `curl_pattern` fetches them with
//! curl, verifying every byte as it streams.
//!
//! Invariants: a `Peer`'s whole process group is killed on drop, also when the test panics; the
//! HTTP server's threads stop on drop; every wait (start-up probe, curl run) is bounded.

use super::*;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

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
