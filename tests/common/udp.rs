//! UDP helpers for the UDP tests: the nftables TPROXY rule for UDP, UDP sockets in a
//! namespace, an echo server and dnsmasq in the server namespace, a DNS query builder and
//! answer parser, a scripted SOCKS5 UDP ASSOCIATE client, the byte-exact echo check shared by
//! every route, and the parser of ksocks' UDP close lines.
//!
//! Invariants as in the rest of the harness: every thread and process stops on drop, every
//! wait is bounded, every datagram is compared whole.

use super::peers::{read_socks_reply, socks_auth, socks_greeting, socks_request, Peer, Target};
use super::peers::{which, TempDir, CMD_UDP_ASSOCIATE};
use super::*;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64};

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

// ---------------------------------------------------------------------------------------------
// DNS

/// `n` names `h<i>.test` with one IPv4 and one IPv6 address each, from documentation ranges.
pub fn dns_names(n: usize) -> Vec<(String, Ipv4Addr, Ipv6Addr)> {
    (0..n)
        .map(|i| {
            let v4 = Ipv4Addr::new(203, 0, 113, i as u8 + 1);
            let v6 = Ipv6Addr::new(0x2001, 0xdb8, 0xfeed, 0, 0, 0, 0, i as u16 + 1);
            (format!("h{i}.test"), v4, v6)
        })
        .collect()
}

/// dnsmasq (Debian's dnsmasq-base) on port 53 of both server addresses, answering A and AAAA
/// from a hosts file and NXDOMAIN for other names under `test`; killed on drop.
pub struct Dnsmasq {
    _peer: Peer,
    _dir: TempDir,
}

pub fn start_dnsmasq(topo: &Topology, names: &[(String, Ipv4Addr, Ipv6Addr)]) -> Dnsmasq {
    let dir = TempDir::new("dnsmasq");
    let mut hosts = String::new();
    for (name, v4, v6) in names {
        hosts.push_str(&format!("{v4} {name}\n{v6} {name}\n"));
    }
    let file = dir.write("hosts", &hosts, 0o644);
    let bin = which("dnsmasq").expect("dnsmasq installed");
    let (v4, v6) = (topo.server_ip(Family::V4), topo.server_ip(Family::V6));
    let args: Vec<String> = [
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--user=root",
        "--group=root",
        "--pid-file=",
        "--local=/test/",
        "--log-facility=-",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!("--addn-hosts={}", file.display()),
        format!("--listen-address={v4},{v6}"),
    ])
    .collect();
    let peer = Peer::start(
        &topo.server,
        "dnsmasq",
        &bin,
        &args,
        SocketAddr::new(v4, 53),
    );
    Dnsmasq {
        _peer: peer,
        _dir: dir,
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

pub const QTYPE_A: u16 = 1;
pub const QTYPE_AAAA: u16 = 28;

/// A recursive query for `name`, type `qtype` (RFC 1035 §4.1).
pub fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0, (qtype >> 8) as u8, qtype as u8, 0, 1]);
    m
}

/// An answer's ID, RCODE and the A/AAAA addresses in it.
#[derive(Debug, PartialEq, Eq)]
pub struct DnsAnswer {
    pub id: u16,
    pub rcode: u8,
    pub addrs: Vec<IpAddr>,
}

fn skip_name(m: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *m.get(at)? as usize;
        match len {
            0 => return Some(at + 1),
            l if l >= 0xc0 => return Some(at + 2),
            l => at += 1 + l,
        }
    }
}

/// Parses an answer; `None` if it is not one.
pub fn dns_parse(m: &[u8]) -> Option<DnsAnswer> {
    let id = u16::from_be_bytes([*m.first()?, *m.get(1)?]);
    if m.get(2)? & 0x80 == 0 {
        return None;
    }
    let rcode = m.get(3)? & 0xf;
    let qd = u16::from_be_bytes([*m.get(4)?, *m.get(5)?]);
    let an = u16::from_be_bytes([*m.get(6)?, *m.get(7)?]);
    let mut at = 12;
    for _ in 0..qd {
        at = skip_name(m, at)? + 4;
    }
    let mut addrs = Vec::new();
    for _ in 0..an {
        at = skip_name(m, at)?;
        let ty = u16::from_be_bytes([*m.get(at)?, *m.get(at + 1)?]);
        let len = u16::from_be_bytes([*m.get(at + 8)?, *m.get(at + 9)?]) as usize;
        let data = m.get(at + 10..at + 10 + len)?;
        match (ty, len) {
            (QTYPE_A, 4) => addrs.push(IpAddr::from(<[u8; 4]>::try_from(data).ok()?)),
            (QTYPE_AAAA, 16) => addrs.push(IpAddr::from(<[u8; 16]>::try_from(data).ok()?)),
            _ => {}
        }
        at += 10 + len;
    }
    Some(DnsAnswer { id, rcode, addrs })
}

/// Asks `name` (type `qtype`) through `t` with up to `tries` attempts of 1 s; the answer.
pub fn dns_ask(
    t: &mut dyn Dgram,
    id: u16,
    name: &str,
    qtype: u16,
    tries: u32,
) -> Option<DnsAnswer> {
    let q = dns_query(id, name, qtype);
    let mut buf = vec![0u8; 4096];
    for _ in 0..tries {
        t.send(&q).ok()?;
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            match t.recv(&mut buf) {
                Ok((_, n)) => match dns_parse(&buf[..n]) {
                    Some(a) if a.id == id => return Some(a),
                    _ => continue,
                },
                Err(_) => break,
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Datagram transports: plain UDP to one server, or through a SOCKS5 UDP ASSOCIATE

/// Something that sends payloads to one destination and receives payloads with their source.
pub trait Dgram: Send {
    fn send(&mut self, payload: &[u8]) -> io::Result<()>;
    /// Receives one payload into `buf`: (source, length).
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<(SocketAddr, usize)>;
}

/// A plain UDP socket talking to `to` (TPROXY intercepts it on the way).
pub struct Plain {
    pub sock: UdpSocket,
    pub to: SocketAddr,
}

impl Dgram for Plain {
    fn send(&mut self, payload: &[u8]) -> io::Result<()> {
        self.sock.send_to(payload, self.to).map(|_| ())
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<(SocketAddr, usize)> {
        let (n, from) = self.sock.recv_from(buf)?;
        Ok((from, n))
    }
}

/// RSV RSV FRAG ATYP DST.ADDR DST.PORT (RFC 1928 §7), FRAG 0.
pub fn socks_udp_header(t: &Target) -> Vec<u8> {
    let req = socks_request(0, t);
    let mut h = vec![0, 0, 0];
    h.extend_from_slice(&req[3..]);
    h
}

/// The address and the payload offset of a SOCKS5 UDP datagram (IP addresses only).
pub fn parse_socks_udp(d: &[u8]) -> Option<(SocketAddr, usize)> {
    match *d.get(3)? {
        1 => {
            let a: [u8; 4] = d.get(4..8)?.try_into().ok()?;
            let p = u16::from_be_bytes([*d.get(8)?, *d.get(9)?]);
            Some((SocketAddr::new(IpAddr::from(a), p), 10))
        }
        4 => {
            let a: [u8; 16] = d.get(4..20)?.try_into().ok()?;
            let p = u16::from_be_bytes([*d.get(20)?, *d.get(21)?]);
            Some((SocketAddr::new(IpAddr::from(a), p), 22))
        }
        _ => None,
    }
}

/// A SOCKS5 UDP ASSOCIATE from the client namespace: the control connection (the association
/// lives as long as it), a UDP socket, and the relay address the server announced.
pub struct SocksUdp {
    pub control: TcpStream,
    pub sock: UdpSocket,
    pub relay: SocketAddr,
    /// Where `send` sends to.
    pub to: Target,
}

impl SocksUdp {
    /// Associates through the SOCKS5 server at `proxy`, naming the UDP socket's address in
    /// the request (`announce` true) or 0.0.0.0:0.
    pub fn associate(
        topo: &Topology,
        proxy: SocketAddr,
        auth: Option<(&str, &str)>,
        announce: bool,
        to: Target,
    ) -> io::Result<SocksUdp> {
        let fam = if proxy.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        };
        let mut control = topo.client_connect(proxy)?;
        let sock = client_udp(topo, fam);
        let method = if auth.is_some() { 2 } else { 0 };
        control.write_all(&socks_greeting(&[method]))?;
        let mut sel = [0u8; 2];
        control.read_exact(&mut sel)?;
        if sel != [5, method] {
            return Err(io::Error::other(format!("method selection {sel:?}")));
        }
        if let Some((u, p)) = auth {
            control.write_all(&socks_auth(u, p))?;
            let mut st = [0u8; 2];
            control.read_exact(&mut st)?;
            if st != [1, 0] {
                return Err(io::Error::other(format!("auth status {st:?}")));
            }
        }
        let from = match announce {
            true => sock.local_addr()?,
            false => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
        };
        control.write_all(&socks_request(CMD_UDP_ASSOCIATE, &Target::Ip(from)))?;
        let reply = read_socks_reply(&mut control)?;
        match (reply.rep, reply.bound) {
            (0, Some(relay)) => Ok(SocksUdp {
                control,
                sock,
                relay,
                to,
            }),
            (rep, _) => Err(io::Error::other(format!(
                "UDP ASSOCIATE refused: REP {rep}"
            ))),
        }
    }

    /// Another handle on the same association (sockets shared), for `echo_check`.
    pub fn try_clone(&self) -> io::Result<SocksUdp> {
        Ok(SocksUdp {
            control: self.control.try_clone()?,
            sock: self.sock.try_clone()?,
            relay: self.relay,
            to: self.to.clone(),
        })
    }

    /// Sends raw bytes (a broken header, say) to the relay.
    pub fn send_raw(&self, bytes: &[u8]) -> io::Result<()> {
        self.sock.send_to(bytes, self.relay).map(|_| ())
    }
}

impl Dgram for SocksUdp {
    fn send(&mut self, payload: &[u8]) -> io::Result<()> {
        let mut d = socks_udp_header(&self.to);
        d.extend_from_slice(payload);
        self.send_raw(&d)
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<(SocketAddr, usize)> {
        let mut d = vec![0u8; 65536];
        loop {
            let (n, from) = self.sock.recv_from(&mut d)?;
            if from != self.relay {
                continue;
            }
            let bad = || io::Error::new(io::ErrorKind::InvalidData, "bad SOCKS5 UDP header");
            let (src, at) = parse_socks_udp(&d[..n]).ok_or_else(bad)?;
            if d[2] != 0 {
                return Err(bad());
            }
            let len = n - at;
            buf[..len].copy_from_slice(&d[at..n]);
            return Ok((src, len));
        }
    }
}

/// Full cone through `t` (which sends to `a`): `a` hears the client from some mapped
/// address; `b`, a server the client never addressed, sends there, and the client receives
/// it from `b`'s address. Returns the mapped address.
pub fn check_full_cone(t: &mut dyn Dgram, a: &UdpSocket, b: &UdpSocket) -> SocketAddr {
    let mut buf = [0u8; 64];
    t.send(b"hello A").unwrap();
    let (n, mapped) = a.recv_from(&mut buf).expect("A hears the client");
    assert_eq!(&buf[..n], b"hello A");
    b.send_to(b"B, unsolicited", mapped).unwrap();
    let (src, n) = t.recv(&mut buf).expect("the client hears B");
    assert_eq!(
        (src, &buf[..n]),
        (b.local_addr().unwrap(), &b"B, unsolicited"[..])
    );
    a.send_to(b"A answers", mapped).unwrap();
    let (src, n) = t.recv(&mut buf).expect("the client hears A");
    assert_eq!(
        (src, &buf[..n]),
        (a.local_addr().unwrap(), &b"A answers"[..])
    );
    mapped
}

// ---------------------------------------------------------------------------------------------
// The echo check

/// What an echo run saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EchoResult {
    pub sent: u64,
    pub received: u64,
    /// Sent, never answered within the wait.
    pub lost: u64,
    pub bytes: u64,
}

/// Sends `count` datagrams of seeded random sizes from `min` to `max` (the first few exactly
/// `min` and `max`) spread over the transports, one in flight per transport, each thread its
/// own transport; every answer must be byte for byte what was sent, from `server`. Panics on
/// a wrong byte or source; returns the counts (a datagram unanswered within 5 s is lost: a
/// generous wait, as the tests running beside it load the same 2 cores).
pub fn echo_check(
    transports: Vec<Box<dyn Dgram>>,
    server: SocketAddr,
    count: usize,
    (min, max): (usize, usize),
) -> EchoResult {
    let per = count.div_ceil(transports.len());
    let handles: Vec<_> = transports
        .into_iter()
        .enumerate()
        .map(|(k, mut t)| {
            thread::spawn(move || {
                let mut r = EchoResult::default();
                let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ (k as u64 + 1);
                let mut next = move || {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed
                };
                let mut buf = vec![0u8; 65536];
                for i in 0..per {
                    let len = match (k, i) {
                        (0, 0) => min,
                        (_, 0) | (_, 1) => max,
                        _ => min + (next() % (max - min + 1) as u64) as usize,
                    };
                    let mut payload = vec![0u8; len];
                    let tag = ((k as u64) << 32 | i as u64).to_be_bytes();
                    Pattern::new(next()).fill(&mut payload);
                    let n = tag.len().min(len);
                    payload[..n].copy_from_slice(&tag[..n]);
                    t.send(&payload).expect("send");
                    r.sent += 1;
                    let deadline = Instant::now() + Duration::from_secs(5);
                    let got = loop {
                        match t.recv(&mut buf) {
                            Ok((from, n)) if buf[..n] == payload[..] => {
                                assert_eq!(from, server, "echo {k}/{i} came from {from}");
                                break true;
                            }
                            // An earlier datagram's late answer: not this one.
                            Ok((_, n)) if n >= 8 && buf[..8] != tag && len >= 8 => {}
                            Ok((_, n)) => {
                                panic!("echo {k}/{i}: {n} bytes back for {len} sent, not the same")
                            }
                            Err(_) if Instant::now() >= deadline => break false,
                            Err(_) => continue,
                        }
                        if Instant::now() >= deadline {
                            break false;
                        }
                    };
                    match got {
                        true => {
                            r.received += 1;
                            r.bytes += len as u64;
                        }
                        false => r.lost += 1,
                    }
                }
                r
            })
        })
        .collect();
    let mut total = EchoResult::default();
    for h in handles {
        let r = join(h);
        total.sent += r.sent;
        total.received += r.received;
        total.lost += r.lost;
        total.bytes += r.bytes;
    }
    total
}

// ---------------------------------------------------------------------------------------------
// ksocks' UDP close lines

/// One `#u<n> CLIENT -> DEST closed: plane=udp ...` line.
#[derive(Debug, Clone)]
pub struct UdpClose {
    pub line: String,
    pub client: String,
    pub dest: String,
    pub fields: HashMap<String, String>,
}

impl UdpClose {
    pub fn get(&self, k: &str) -> &str {
        self.fields
            .get(k)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no {k}= in {}", self.line))
    }
    pub fn num(&self, k: &str) -> u64 {
        self.get(k)
            .parse()
            .unwrap_or_else(|_| panic!("{k} in {}", self.line))
    }
}

/// Every UDP close line in `log`.
pub fn udp_closes(log: &str) -> Vec<UdpClose> {
    log.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("ksocks: #u")?;
            let (head, tail) = rest.split_once(" closed: plane=udp ")?;
            let mut words = head.split(' ');
            let (_, client, _, dest) = (words.next()?, words.next()?, words.next()?, words.next()?);
            let fields = tail
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Some(UdpClose {
                line: l.to_string(),
                client: client.to_string(),
                dest: dest.to_string(),
                fields,
            })
        })
        .collect()
}

/// Waits (≤ `t`) until `ks` logged at least `n` UDP close lines matching `f`; returns them all.
pub fn wait_udp_closes(
    ks: &Ksocks,
    n: usize,
    t: Duration,
    f: impl Fn(&UdpClose) -> bool,
) -> Vec<UdpClose> {
    let mut got = Vec::new();
    wait_until(t, || {
        got = udp_closes(&ks.log()).into_iter().filter(|c| f(c)).collect();
        got.len() >= n
    });
    assert!(
        got.len() >= n,
        "{} of {n} UDP close lines; log:\n{}",
        got.len(),
        ks.log_tail(30)
    );
    got
}
