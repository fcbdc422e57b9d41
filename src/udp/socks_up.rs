//! Our UDP ASSOCIATE to a `socks5://` upstream (RFC 1928 §7): per association a TCP control
//! connection (connect, greeting, RFC 1929 auth, the request naming the local address of our
//! UDP socket) and, once the server's reply names its relay, the upstream UDP socket connected
//! to that relay; what waited meanwhile is sent then.
//!
//! Invariant: the association lives exactly as long as this control connection: a failed
//! connect or handshake ends it (`upstream`; a failed connect also tells the loop's target to
//! try the proxy's next address), the connection's end ends it (`control-closed`), and its end
//! closes the connection.

use super::assoc::{End, Handshake, Route, Socks5Up};
use super::control::{control_closed, open_connected, set_mark};
use super::relay::is_hard;
use super::table::Id;
use super::{Ctx, Sock, Udp};
use crate::handshake::{Credential, Outcome, SocksClient, MAX_INPUT};
use crate::socks5::Dest;
use crate::sys::{epoll, socket};
use crate::{debug, error};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

/// The upstream UDP socket (connected to the server's own address for now, so that the kernel
/// picks the local address the request names), its local address, and the control connection
/// being opened to `server`.
pub(super) fn open_socks5(
    server: SocketAddr,
    auth: &Option<Credential>,
    mark: Option<u32>,
) -> io::Result<(OwnedFd, SocketAddr, Box<Socks5Up>)> {
    let (fd, local) = open_connected(&server, mark)?;
    let control = socket::tcp_socket(&server)?;
    set_mark(control.as_fd(), mark)?;
    let connected = socket::connect(control.as_fd(), &server)?;
    let mut output = Vec::new();
    let client = SocksClient::associate(local, auth.clone(), &mut output);
    let handshake = Handshake {
        client,
        input: Vec::new(),
        output,
        connected,
    };
    let up = Socks5Up {
        control,
        server,
        handshake: Some(Box::new(handshake)),
    };
    Ok((fd, local, Box::new(up)))
}

impl Udp {
    /// Our control connection to a `socks5://` upstream: connect, then the UDP ASSOCIATE
    /// handshake; once the server named its relay, the upstream socket is connected to it and
    /// what waited is sent. Afterwards only its end matters.
    pub(super) fn on_up_control(&mut self, cx: &mut Ctx, id: Id, events: u32, now: Instant) {
        let Some(a) = self.assocs.get_mut(id) else {
            return;
        };
        let (serial, client) = (a.serial, a.client);
        let Route::Socks5(s) = &mut a.route else {
            return;
        };
        let server = s.server;
        let Some(h) = s.handshake.as_deref_mut() else {
            if control_closed(s.control.as_fd()) {
                self.end(id, End::ControlClosed);
            }
            return;
        };
        let connecting = !h.connected;
        let step = handshake_step(s.control.as_fd(), h, events);
        let mask = epoll::IN | epoll::RDHUP | if h.output.is_empty() { 0 } else { epoll::OUT };
        let relay = match step {
            Ok(None) => {
                if let Err(e) = cx
                    .ep
                    .modify(s.control.as_fd(), Sock::UpControl(id).token(), mask)
                {
                    error!("#u{serial} {client}: epoll: {e}");
                    self.end(id, End::Error(e.raw_os_error().unwrap_or(0)));
                }
                return;
            }
            Ok(Some(Dest::Ip(bnd))) if bnd.ip().is_unspecified() => {
                SocketAddr::new(server.ip(), bnd.port())
            }
            Ok(Some(Dest::Ip(bnd))) => bnd,
            Ok(Some(bnd)) => {
                let why = format!("relay address {bnd} is a name");
                return self.up_failed(id, server, &why);
            }
            Err(why) => {
                if let (true, Some(t)) = (connecting, cx.target.as_deref_mut()) {
                    t.connect_failed(server, cx.resolver);
                }
                return self.up_failed(id, server, &why);
            }
        };
        s.handshake = None;
        let up = a
            .upstream
            .as_ref()
            .map(|u| socket::connect(u.as_fd(), &relay));
        let watch = cx
            .ep
            .modify(s.control.as_fd(), Sock::UpControl(id).token(), mask);
        if let Err(e) = watch.and(up.unwrap_or(Ok(true))) {
            return self.up_failed(id, server, &format!("relay {relay}: {e}"));
        }
        debug!("#u{serial} {client}: upstream {server}: UDP relay {relay}");
        self.assocs.touch(id, now);
        self.flush_pending(cx, id);
    }

    fn up_failed(&mut self, id: Id, server: SocketAddr, why: &str) {
        if let Some((_, a)) = self.assocs.get(id) {
            error!(
                "#u{} {} -> {}: upstream {server}: UDP ASSOCIATE: {why}",
                a.serial, a.client, a.dest
            );
        }
        self.end(id, End::Upstream);
    }
}

/// One step of our UDP ASSOCIATE handshake on `fd`: `Ok(Some(bnd))` when the server named its
/// relay, `Ok(None)` to wait, `Err` when it failed.
fn handshake_step(fd: BorrowedFd, h: &mut Handshake, events: u32) -> Result<Option<Dest>, String> {
    if !h.connected {
        if events & (epoll::OUT | epoll::ERR | epoll::HUP) == 0 {
            return Ok(None);
        }
        match socket::take_error(fd) {
            Ok(None) if events & (epoll::ERR | epoll::HUP) == 0 => h.connected = true,
            Ok(Some(e)) | Err(e) => return Err(format!("connect: {e}")),
            Ok(None) => return Err("connect failed".into()),
        }
    }
    loop {
        if !h.output.is_empty() {
            match socket::send(fd, &h.output) {
                Ok(n) => drop(h.output.drain(..n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("send: {e}")),
            }
        }
        let mut chunk = [0u8; MAX_INPUT];
        let room = MAX_INPUT.saturating_sub(h.input.len()).max(1);
        let n = match socket::recv(fd, &mut chunk[..room]) {
            Ok(0) => return Err("the server closed the connection".into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if is_hard(e.raw_os_error().unwrap_or(0)) => return Err(format!("{e}")),
            Err(e) => return Err(format!("recv: {e}")),
        };
        h.input.extend_from_slice(&chunk[..n]);
        match h.client.feed(&mut h.input, &mut h.output) {
            Outcome::More => continue,
            Outcome::Done(bnd) => return Ok(Some(bnd)),
            Outcome::Fail { why, .. } => return Err(why),
            Outcome::Associate(_) => return Err("unexpected answer".into()),
        }
    }
}
