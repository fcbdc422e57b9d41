//! UDP helpers for the UDP tests. This file holds the plumbing: the nftables TPROXY rule for
//! UDP, UDP sockets in a namespace, an echo server in the server namespace and the UDP-capable
//! SOCKS5 / shadowsocks servers. `dns` has dnsmasq and a DNS query builder and answer parser,
//! `dgram` the datagram transports (plain UDP, a scripted SOCKS5 UDP ASSOCIATE client), `check`
//! the byte-exact echo check shared by every route and the parser of ksocks' UDP close lines.
//! All are re-exported, so every helper is `udp::NAME`.
//!
//! Invariants as in the rest of the harness: every thread and process stops on drop, every
//! wait is bounded, every datagram is compared whole.

mod check;
mod dgram;
mod dns;

// Each test crate uses a different subset of the helpers (as `#![allow(dead_code)]` in
// common/mod.rs says), so a crate may name nothing a re-export brings in.
#[allow(unused_imports)]
pub use {check::*, dgram::*, dns::*};

use super::peers::{Peer, TempDir};
use super::*;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// The largest UDP payload over IPv4 and IPv6 (no jumbograms).
pub const MAX_V4: usize = 65507;
pub const MAX_V6: usize = 65527;

pub fn max_payload(fam: Family) -> usize {
    match fam {
        Family::V4 => MAX_V4,
        Family::V6 => MAX_V6,
    }
}

/// Adds the UDP twin of the topology's TCP TPROXY rule, to `port` (the `ip rule`/route of a
/// `Tproxy` topology are already there).
pub fn add_udp_tproxy(topo: &Topology, port: u16) {
    let rules = format!(
        "table inet ksocks_udp {{\n chain pre {{\n  type filter hook prerouting priority mangle; policy accept;\n  iifname \"rc\" meta l4proto udp tproxy ip to :{port} meta mark set 1 accept\n  iifname \"rc\" meta l4proto udp tproxy ip6 to :{port} meta mark set 1 accept\n }}\n}}\n"
    );
    nft(&topo.router, &rules).expect("UDP TPROXY rule");
}

/// Pings the server from the client in `fams` (each ≤ 3 s, in parallel), so that
/// neighbour discovery is done before a test measures loss: on a veth pair this fresh, the
/// first IPv6 exchange waits about a second for it even with plain forwarding, and the
/// neighbour queue meanwhile holds less than one 64 KiB datagram's fragments.
pub fn warm_up(topo: &Topology, fams: &[Family]) {
    let pings: Vec<_> = fams
        .iter()
        .map(|&fam| {
            Command::new("ip")
                .args(["netns", "exec", &topo.client, "ping", "-c1", "-W3", "-q"])
                .arg(topo.server_ip(fam).to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("ping")
        })
        .collect();
    for mut p in pings {
        let _ = p.wait();
    }
}

/// `SO_RCVBUFFORCE` and `SO_SNDBUFFORCE` (root): room for several 64 KiB datagrams, which the
/// default 208 KiB does not have once they are fragmented.
pub fn set_udp_bufs(s: &UdpSocket, bytes: usize) {
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        let v = bytes as libc::c_int;
        // SAFETY: the option value is one int, passed by pointer with its size, on a live socket.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
}

/// A UDP socket bound to `at` in namespace `ns`, 4 MiB buffers, a 2 s read timeout.
pub fn udp_in(ns: &str, at: SocketAddr) -> UdpSocket {
    let s = Topology::in_ns(ns, move || UdpSocket::bind(at))
        .join()
        .expect("bind thread")
        .unwrap_or_else(|e| panic!("bind UDP {at} in {ns}: {e}"));
    set_udp_bufs(&s, 4 << 20);
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

/// A UDP socket in the client namespace on the client's address, any port.
pub fn client_udp(topo: &Topology, fam: Family) -> UdpSocket {
    udp_in(&topo.client, SocketAddr::new(topo.client_ip(fam), 0))
}

/// Echoes every datagram back to its sender, from each of `addrs` in the server namespace,
/// until dropped.
pub struct UdpEcho {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub echoed: Arc<AtomicU64>,
    /// Where each socket last heard from, the address ksocks' upstream socket has.
    pub last_peer: Arc<Mutex<Option<SocketAddr>>>,
}

impl UdpEcho {
    pub fn start(topo: &Topology, addrs: &[SocketAddr]) -> UdpEcho {
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicU64::new(0));
        let last_peer = Arc::new(Mutex::new(None));
        let mut threads = Vec::new();
        for &addr in addrs {
            let s = udp_in(&topo.server, addr);
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let (stop, echoed, last) = (stop.clone(), echoed.clone(), last_peer.clone());
            threads.push(thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = s.recv_from(&mut buf) {
                        *last.lock().unwrap() = Some(from);
                        if s.send_to(&buf[..n], from).is_ok() {
                            echoed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        UdpEcho {
            stop,
            threads,
            echoed,
            last_peer,
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// danted with UDP ASSOCIATE allowed and full cone ([`super::peers::start_dante`]).
pub fn start_danted_udp(
    ns: &str,
    listen: SocketAddr,
    ext_dev: &str,
    user: Option<&super::peers::SystemUser>,
) -> (Peer, TempDir) {
    super::peers::start_dante(ns, listen, ext_dev, user, true)
}

/// shadowsocks-rust's `ssserver`, method `none`, TCP and UDP on `listen` in `ns`. It sets
/// Don't Fragment on its UDP sockets unless told otherwise, and then silently drops every
/// datagram larger than the path MTU (1,500 bytes here) in both directions: the two
/// `*_udp_allow_fragmentation` settings (config file only) let it relay up to 64 KiB.
pub fn start_ssserver_udp(ns: &str, listen: SocketAddr) -> (Peer, TempDir) {
    let dir = TempDir::new("ssserver-udp");
    let conf = format!(
        "{{\"server\": \"{}\", \"server_port\": {}, \"password\": \"ksocks-test\", \"method\": \"none\", \"mode\": \"tcp_and_udp\", \"outbound_udp_allow_fragmentation\": true, \"inbound_udp_allow_fragmentation\": true}}\n",
        listen.ip(),
        listen.port()
    );
    let path = dir.write("ssserver.json", &conf, 0o644);
    let bin = super::peers::ssserver_path().expect("ssserver installed");
    let args = vec!["-c".to_string(), path.display().to_string()];
    (Peer::start(ns, "ssserver", &bin, &args, listen), dir)
}
