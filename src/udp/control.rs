//! Opening associations and everything around them that is not a datagram: the upstream
//! side of each route (a direct socket, or the proxy's address from the loop's `Target`, whose
//! name may still be looked up), the SOCKS5 server's UDP ASSOCIATE (the client's control
//! connection handed over by the loop, the relay socket announced in the reply), and name
//! lookups for SOCKS clients on the direct route. Our own UDP ASSOCIATE to a `socks5://`
//! upstream is in `socks_up`.
//!
//! Invariant: an association ends with its SOCKS client's control connection; one whose
//! upstream proxy's address cannot be had ends at once (`upstream`), one whose address is being
//! looked up waits, its datagrams in its bounded pending buffer.

use super::assoc::{Assoc, End, Inbound, Key, Name, Route, SocksIn};
use super::socks_up::open_socks5;
use super::table::Id;
use super::{Ctx, Sock, Udp, W_LOOP, W_OPEN};
use crate::conns::{Entry, Stage};
use crate::handshake::server_reply;
use crate::resolve::{Answer, Resolver};
use crate::socks5::{Dest, Rep};
use crate::sys::{epoll, socket, udp};
use crate::target::Lookup;
use crate::upstream::Upstream;
use crate::{debug, error, info};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

/// `SO_MARK` from `--mark`, so firewall rules can exempt ksocks' own datagrams.
pub(super) fn set_mark(fd: BorrowedFd, mark: Option<u32>) -> io::Result<()> {
    match mark {
        Some(m) => socket::set_int_opt(fd, libc::SOL_SOCKET, libc::SO_MARK, m as libc::c_int),
        None => Ok(()),
    }
}

fn unspecified(v4: bool) -> SocketAddr {
    match v4 {
        true => (Ipv4Addr::UNSPECIFIED, 0).into(),
        false => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// A direct association's socket for `to`'s family: unconnected (full cone: any destination
/// may answer) and with `IP_RECVERR`, the only way an unconnected socket hears of ICMP errors.
/// Returns it with its local port.
pub(super) fn open_direct(to: &SocketAddr, mark: Option<u32>) -> io::Result<(OwnedFd, u16)> {
    let any = unspecified(to.is_ipv4());
    let fd = udp::socket(&any)?;
    udp::set_recv_err(fd.as_fd(), to.is_ipv6())?;
    set_mark(fd.as_fd(), mark)?;
    socket::bind(fd.as_fd(), &any)?;
    let port = socket::local_addr(fd.as_fd())?.port();
    Ok((fd, port))
}

/// A UDP socket connected to `server` (a shadowsocks server, or for now the SOCKS5 server
/// whose relay address its reply will give), with its local address.
pub(super) fn open_connected(
    server: &SocketAddr,
    mark: Option<u32>,
) -> io::Result<(OwnedFd, SocketAddr)> {
    let fd = udp::socket(server)?;
    set_mark(fd.as_fd(), mark)?;
    socket::connect(fd.as_fd(), server)?;
    let local = socket::local_addr(fd.as_fd())?;
    Ok((fd, local))
}

/// Whether a name lookup gave an address, failed, or is still running (`None`).
type NameLookup = Option<Result<IpAddr, ()>>;

/// The address of `name` for a direct association: the one it already resolved, or a new
/// lookup (one at a time per association; a second name while one runs is dropped).
pub(super) fn lookup(
    a: &mut Assoc,
    name: &str,
    port: u16,
    resolver: Option<&Resolver>,
    token: u64,
) -> NameLookup {
    match a.name.as_deref() {
        Some(n) if &*n.name == name => return n.ip.map(Ok),
        Some(Name { ip: None, .. }) => return Some(Err(())),
        _ => {}
    }
    let Some(resolver) = resolver else {
        return Some(Err(()));
    };
    resolver.lookup(token, name, port);
    a.name = Some(Box::new(Name {
        name: name.into(),
        ip: None,
    }));
    None
}

impl Udp {
    fn serial(&mut self) -> u64 {
        self.next_serial += 1;
        self.next_serial - 1
    }

    /// The upstream side of association `id` along the configured route: a direct socket now
    /// if the first destination is known; for a proxy, its address from the loop's target (a
    /// name still being looked up makes the association wait, and `upstream_resolved` comes
    /// back here), then a socket connected to the shadowsocks server, or a connection to the
    /// SOCKS5 server for UDP ASSOCIATE (its handshake starts once connected). `Err` says how
    /// the association ends, and why.
    fn open_route(
        &mut self,
        cx: &mut Ctx,
        id: Id,
        first: Option<SocketAddr>,
        now: Instant,
    ) -> Result<(), (End, String)> {
        let socks5 = matches!(self.set.upstream, Upstream::Socks5 { .. });
        let server = match (&self.set.upstream, cx.target.as_deref_mut()) {
            (Upstream::Direct, _) => None,
            (_, None) => return Err((End::Upstream, "no upstream address".into())),
            (_, Some(t)) => match t.get(Sock::Target(id).token(), cx.resolver) {
                Lookup::Ready(addr) => Some(addr),
                Lookup::Wait => {
                    if let Some(a) = self.assocs.get_mut(id) {
                        a.route = Route::Resolving { socks5 };
                    }
                    return Ok(());
                }
                Lookup::Failed(why) => return Err((End::Upstream, format!("upstream {t}: {why}"))),
            },
        };
        let mark = self.set.mark;
        let Some(a) = self.assocs.get_mut(id) else {
            return Ok(());
        };
        let opened = match (&self.set.upstream, server, first) {
            (Upstream::Direct, _, None) => return Ok(()),
            (Upstream::Direct, _, Some(to)) => {
                a.up_v4 = to.is_ipv4();
                open_direct(&to, mark).map(|(fd, port)| (fd, port, Route::Direct))
            }
            (Upstream::Shadowsocks { .. }, Some(addr), _) => open_connected(&addr, mark)
                .map(|(fd, local)| (fd, local.port(), Route::Shadowsocks)),
            (Upstream::Socks5 { auth, .. }, Some(addr), _) => open_socks5(addr, auth, mark)
                .map(|(fd, local, up)| (fd, local.port(), Route::Socks5(up))),
            (_, None, _) => return Ok(()),
        };
        let (fd, port, route) = opened.map_err(|e| {
            let why = format!("cannot open the upstream socket: {e}");
            (End::Error(e.raw_os_error().unwrap_or(0)), why)
        })?;
        self.ports.add(port);
        (a.upstream, a.up_port, a.route) = (Some(fd), port, route);
        let ss = matches!(a.route, Route::Shadowsocks);
        self.register_route(cx.ep, id, now).map_err(|e| {
            let why = format!("epoll: {e}");
            (End::Error(e.raw_os_error().unwrap_or(0)), why)
        })?;
        if ss {
            self.flush_pending(cx, id); // what waited for the proxy's name
        }
        Ok(())
    }

    /// Registers association `id`'s upstream sockets with epoll (and its handshake deadline).
    fn register_route(&mut self, ep: &epoll::Epoll, id: Id, now: Instant) -> io::Result<()> {
        let Some((_, a)) = self.assocs.get(id) else {
            return Ok(());
        };
        if let Some(up) = &a.upstream {
            ep.add(up.as_fd(), Sock::Up(id).token(), epoll::IN)?;
        }
        if let Route::Socks5(s) = &a.route {
            let mask = epoll::IN | epoll::OUT | epoll::RDHUP;
            ep.add(s.control.as_fd(), Sock::UpControl(id).token(), mask)?;
            let deadline = now + self.set.connect_timeout;
            self.handshakes.push_back((deadline, id));
        }
        Ok(())
    }

    /// Inserts a new association and registers its SOCKS client's sockets; `None` (nothing
    /// left open) on failure.
    fn admit(&mut self, ep: &epoll::Epoll, key: Key, a: Assoc, now: Instant) -> Option<Id> {
        let serial = a.serial;
        let id = self.insert(key, a, now)?;
        let registered = match self.assocs.get(id) {
            Some((
                _,
                Assoc {
                    inbound: Inbound::Socks(s),
                    ..
                },
            )) => {
                let mask = epoll::IN | epoll::RDHUP;
                ep.add(s.control.as_fd(), Sock::Control(id).token(), mask)
                    .and_then(|_| ep.add(s.relay.as_fd(), Sock::Relay(id).token(), epoll::IN))
            }
            _ => Ok(()),
        };
        if let Err(e) = registered {
            error!("#u{serial}: epoll: {e}");
            self.end(id, End::Error(e.raw_os_error().unwrap_or(0)));
            return None;
        }
        Some(id)
    }

    /// A TPROXY client's first datagram (to `dest`): its association, or `None` (the datagram
    /// dropped and counted).
    pub(super) fn open_tproxy(
        &mut self,
        cx: &mut Ctx,
        client: SocketAddr,
        dest: SocketAddr,
        now: Instant,
    ) -> Option<Id> {
        // One of our own upstream sockets, diverted back to us by a rule that does not
        // spare ksocks' traffic: each hop would open the next association.
        if self.ports.in_use(client.port()) && socket::is_local_ip(client.ip()) {
            self.count.drops.r#loop += 1;
            self.warn_once(W_LOOP, format_args!("udp {client} -> {dest}: proxy loop (the client is one of ksocks' own upstream sockets; exempt them from the TPROXY rule with --mark or --user), dropped"));
            return None;
        }
        let serial = self.serial();
        let a = Assoc::new(serial, client, Inbound::Tproxy, Route::Direct);
        let id = self.admit(cx.ep, Key::Client(client), a, now)?;
        if let Err((end, why)) = self.open_route(cx, id, Some(dest), now) {
            self.count.drops.route += 1;
            let what = format_args!("#u{serial} {client} -> {dest}: {why}");
            self.warn_once(W_OPEN, what);
            self.end(id, end);
            return None;
        }
        debug!("#u{serial} {client} -> {dest}: new association");
        Some(id)
    }

    /// A SOCKS5 client asked for UDP ASSOCIATE: its connection, handed over by the loop,
    /// becomes the association's control connection (the request's DST says where its
    /// datagrams will come from; what setup still owed it is sent first). Opens a relay socket
    /// on the address the client reached us at and answers with it.
    pub fn adopt(&mut self, mut cx: Ctx, entry: Entry) {
        let Entry { conn, stage } = entry;
        let mut unsent = match stage {
            Stage::Setup(mut setup) => setup.take_client_output(),
            Stage::Relay { .. } => Vec::new(),
        };
        let (control, peer, dst) = (conn.client.fd, conn.client_addr, conn.dest);
        let now = Instant::now();
        let serial = self.serial();
        // RFC 1928 §7: DST is the address the client will send from. Its IP is not used (a
        // client behind NAT names its private one); its port is, unless 0.
        let port = match dst {
            Dest::Ip(a) => a.port(),
            Dest::Domain(..) => 0,
        };
        let client = SocketAddr::new(udp::canonical(peer).ip(), port);
        let relay = (|| {
            let local = socket::local_addr(control.as_fd())?;
            let at = SocketAddr::new(udp::canonical(local).ip(), 0);
            let relay = udp::socket(&at)?;
            socket::bind(relay.as_fd(), &at)?;
            if port != 0 {
                socket::connect(relay.as_fd(), &client)?;
            }
            let bnd = socket::local_addr(relay.as_fd())?;
            Ok::<_, io::Error>((relay, bnd))
        })();
        let (relay, bnd) = match relay {
            Ok(r) => r,
            Err(e) => {
                error!("#u{serial} {client}: UDP ASSOCIATE: {e}");
                unsent.extend_from_slice(&server_reply(Rep::GeneralFailure, None));
                let _ = socket::send(control.as_fd(), &unsent);
                return;
            }
        };
        let inbound = Inbound::Socks(Box::new(SocksIn { control, relay }));
        let a = Assoc::new(serial, client, inbound, Route::Direct);
        let Some(id) = self.admit(cx.ep, Key::Socks(serial), a, now) else {
            return;
        };
        let opened = self.open_route(&mut cx, id, None, now);
        let reply = match &opened {
            Ok(()) => server_reply(Rep::Succeeded, Some(bnd)),
            Err(_) => server_reply(Rep::GeneralFailure, None),
        };
        unsent.extend_from_slice(&reply);
        // A reply of at most 22 bytes (and a method selection) to a socket that has sent
        // nothing else fits its send buffer; if not, the client would only see the close.
        let sent = match self.assocs.get(id) {
            Some((
                _,
                Assoc {
                    inbound: Inbound::Socks(s),
                    ..
                },
            )) => socket::send(s.control.as_fd(), &unsent).map(|n| n == unsent.len()),
            _ => Ok(false),
        };
        match (opened, sent) {
            (Ok(()), Ok(true)) => debug!("#u{serial} {client}: UDP ASSOCIATE, relay {bnd}"),
            (Err((end, why)), _) => {
                error!("#u{serial} {client}: UDP ASSOCIATE: {why}");
                self.end(id, end);
            }
            (Ok(()), Ok(false) | Err(_)) => self.end(id, End::ControlClosed),
        }
    }

    /// The upstream proxy's name was looked up for the association of loop token `token`,
    /// which waited: open its route now, or end it.
    pub fn upstream_resolved(&mut self, mut cx: Ctx, token: u64) {
        let Some(Sock::Target(id)) = Sock::from_token(token) else {
            return;
        };
        let waiting = matches!(self.assocs.get(id), Some((_, a)) if matches!(a.route, Route::Resolving { .. }));
        if !waiting {
            return;
        }
        if let Err((end, why)) = self.open_route(&mut cx, id, None, Instant::now()) {
            if let Some((_, a)) = self.assocs.get(id) {
                error!("#u{} {} -> {}: {why}", a.serial, a.client, a.dest);
            }
            self.end(id, end);
        }
    }

    /// The SOCKS client's control connection is readable: its end ends the association; bytes
    /// on it (RFC 1928 defines none after the request) are read and ignored.
    pub(super) fn on_control(&mut self, id: Id) {
        let Some((_, a)) = self.assocs.get(id) else {
            return;
        };
        if let Inbound::Socks(s) = &a.inbound {
            if control_closed(s.control.as_fd()) {
                self.end(id, End::ControlClosed);
            }
        }
    }

    /// A name lookup finished; the association's if its token is one of ours.
    pub fn resolved(&mut self, mut cx: Ctx, (token, answer): Answer) {
        let Some(Sock::Name(id)) = Sock::from_token(token) else {
            return;
        };
        let Some(a) = self.assocs.get_mut(id) else {
            return;
        };
        let family = upstream_family(a);
        let Some(n) = a.name.as_deref_mut().filter(|n| n.ip.is_none()) else {
            return;
        };
        let picked = match answer {
            Ok(addrs) => pick(&addrs, family).ok_or_else(|| "no address".to_string()),
            Err(why) => Err(why),
        };
        match picked {
            Ok(ip) => {
                n.ip = Some(ip);
                self.flush_pending(&mut cx, id);
            }
            Err(why) => {
                info!(
                    "#u{} {}: cannot resolve {}: {why}",
                    a.serial, a.client, n.name
                );
                a.name = None;
                self.drop_pending(id);
            }
        }
    }
}

/// Reads a control connection after the handshake: true when it ended (EOF or error).
pub(super) fn control_closed(fd: BorrowedFd) -> bool {
    let mut sink = [0u8; 512];
    match socket::recv(fd, &mut sink) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    }
}

/// The address family a direct association's socket sends in, if it has one yet.
fn upstream_family(a: &Assoc) -> Option<bool> {
    let up = a.upstream.as_ref()?;
    socket::local_addr(up.as_fd()).ok().map(|l| l.is_ipv4())
}

/// An address of `addrs` in the family `v4` (any when `None`), the first otherwise.
fn pick(addrs: &[SocketAddr], v4: Option<bool>) -> Option<IpAddr> {
    addrs
        .iter()
        .find(|a| v4.map_or(true, |v4| a.is_ipv4() == v4))
        .or(addrs.first())
        .map(|a| a.ip())
}
