//! Connection setup, from an accepted client to a connection ready for its data plane: the
//! SOCKS5 server handshake (`--socks`), the name lookup, the upstream connect, the upstream
//! proxy's handshake (`socks5://`, `ss://`), and flushing what the handshakes left to write
//! (a SOCKS reply, payload that arrived early). The protocol decisions are the pure state
//! machines of `handshake`; this module does their I/O and tells the event loop each step.
//!
//! Invariant: a connection leaves setup (`Step::Ready`) only with its upstream socket
//! connected and every handshake byte written, so the data plane starts on clean streams and
//! no early byte is lost; every phase runs under a deadline.

use crate::cli::{Config, ListenerKind};
use crate::conn::Conn;
use crate::end::{connect_end, reset_of, End, Side};
use crate::handshake::{server_reply, Credential, Outcome, SocksClient, SocksServer, MAX_INPUT};
use crate::loops::UpPorts;
use crate::plane::Plane;
use crate::resolve::{Answer, Resolver};
use crate::shadowsocks;
use crate::sock::Sock;
use crate::socks5::{self, Dest, Rep};
use crate::sys::{epoll, socket};
use crate::target::{Lookup, Target};
use crate::upstream::Upstream;
use crate::{error, info};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// SOCKS5 server handshake with the client (`--socks`).
    Socks,
    /// Waiting for the resolver (a SOCKS5 request for a domain name, direct upstream).
    Resolving,
    /// Waiting for the upstream connect to finish.
    Connecting,
    /// SOCKS5 handshake with the upstream proxy (`--upstream socks5://`).
    Proxy,
    /// Writing the last handshake bytes (the SOCKS reply, early payload) before the data plane.
    Flushing,
}

pub struct Setup {
    pub phase: Phase,
    /// Handshake, resolve and connect deadline.
    pub deadline: Instant,
    /// `None` until the destination is known (SOCKS5 handshake, name lookup).
    pub upstream: Option<Sock>,
    server: Option<SocksServer>,
    client: Option<SocksClient>,
    /// Bytes read from [client, upstream] and not yet consumed.
    input: [Vec<u8>; 2],
    /// Bytes to write to [client, upstream].
    output: [Vec<u8>; 2],
    /// Bytes read from [client, upstream] during the handshake, protocol and early payload.
    pub read: [u64; 2],
    /// The address being connected to.
    target: Option<SocketAddr>,
}

/// What the event loop does next with a connection in setup.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Wait for readiness or a resolver answer.
    Wait,
    /// The destination is known: check for loops, then `route`.
    Route,
    /// Handshakes done and flushed: enter the data plane.
    Ready,
    /// A SOCKS5 UDP ASSOCIATE (`conn.dest` is the client's DST): the connection leaves for the
    /// UDP module, with what is left to write to the client (`take_client_output`).
    Associate,
    End(End),
}

/// What setup needs beyond the connection itself.
pub struct Ctx<'a> {
    pub cfg: &'a Config,
    pub resolver: Option<&'a Resolver>,
    /// The descriptor held back so an accepted connection always gets its upstream socket.
    pub reserve: &'a mut Option<OwnedFd>,
    pub up_ports: &'a mut UpPorts,
    /// The upstream proxy's address; `None` for `direct`.
    pub target: Option<&'a mut Target>,
    /// The data plane, which may set options on the upstream socket before it connects.
    pub plane: &'a Plane,
    /// Set when descriptors ran out: the event loop pauses accepting.
    pub starved: Option<io::Error>,
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

impl Setup {
    /// A SOCKS client starts with its handshake; a redirected one has its destination and
    /// goes straight to `Step::Route` (the caller routes it).
    pub fn start(inbound: ListenerKind, deadline: Instant) -> (Box<Setup>, Step) {
        let socks = inbound == ListenerKind::Socks;
        let setup = Box::new(Setup {
            phase: Phase::Socks,
            deadline,
            upstream: None,
            server: socks.then(SocksServer::default),
            client: None,
            input: Default::default(),
            output: Default::default(),
            read: [0, 0],
            target: None,
        });
        (setup, if socks { Step::Wait } else { Step::Route })
    }

    /// The epoll masks (client, upstream) the phase needs.
    pub fn masks(&self) -> (u32, u32) {
        let out = |side: Side| match self.output[side as usize].is_empty() {
            true => 0,
            false => epoll::OUT,
        };
        match self.phase {
            Phase::Socks => (epoll::IN | out(Side::Client), 0),
            Phase::Resolving => (0, 0),
            Phase::Connecting => (0, epoll::OUT),
            Phase::Proxy => (0, epoll::IN | out(Side::Upstream)),
            Phase::Flushing => (out(Side::Client), out(Side::Upstream)),
        }
    }

    /// The destination is known and not a loop: resolve a name, or connect to the
    /// destination or the upstream proxy. `token` identifies the connection to the resolver.
    pub fn route(&mut self, conn: &mut Conn, ctx: &mut Ctx, token: u64) -> Step {
        let target = match (&ctx.cfg.upstream, &conn.dest, ctx.target.as_deref_mut()) {
            (Upstream::Direct, Dest::Ip(addr), _) => *addr,
            (Upstream::Direct, Dest::Domain(name, port), _) => {
                let Some(resolver) = ctx.resolver else {
                    error!(
                        "#{} {}: no resolver running; refusing",
                        conn.id,
                        conn.route()
                    );
                    return Step::End(refuse(conn, End::Error, Rep::GeneralFailure));
                };
                resolver.lookup(token, name, *port);
                return self.wait_for_name(ctx);
            }
            (_, _, Some(t)) => match t.get(token, ctx.resolver) {
                Lookup::Ready(addr) => addr,
                Lookup::Wait => return self.wait_for_name(ctx),
                Lookup::Failed(why) => {
                    error!(
                        "#{} {}: upstream {t}: cannot resolve: {why}",
                        conn.id,
                        conn.route()
                    );
                    return Step::End(refuse(conn, End::Unreachable, Rep::HostUnreachable));
                }
            },
            (_, _, None) => {
                error!(
                    "#{} {}: internal error: no upstream address",
                    conn.id,
                    conn.route()
                );
                return Step::End(refuse(conn, End::Error, Rep::GeneralFailure));
            }
        };
        self.connect(conn, ctx, target)
    }

    fn wait_for_name(&mut self, ctx: &Ctx) -> Step {
        self.phase = Phase::Resolving;
        self.deadline = Instant::now() + ctx.cfg.connect_timeout;
        Step::Wait
    }

    /// The address this connection is connecting to, while it is.
    pub fn connecting_to(&self) -> Option<SocketAddr> {
        match self.phase {
            Phase::Connecting => self.target,
            _ => None,
        }
    }

    /// An answer from the resolver for this connection.
    pub fn resolved(&mut self, conn: &mut Conn, ctx: &mut Ctx, answer: Answer) -> Step {
        match answer.1 {
            Ok(addrs) if !addrs.is_empty() => self.connect(conn, ctx, addrs[0]),
            Ok(_) => {
                error!("#{} {}: cannot resolve: no address", conn.id, conn.route());
                Step::End(refuse(conn, End::Unreachable, Rep::HostUnreachable))
            }
            Err(why) => {
                error!("#{} {}: cannot resolve: {why}", conn.id, conn.route());
                Step::End(refuse(conn, End::Unreachable, Rep::HostUnreachable))
            }
        }
    }

    /// Creates the upstream socket and starts connecting to `target`.
    fn connect(&mut self, conn: &mut Conn, ctx: &mut Ctx, target: SocketAddr) -> Step {
        let (mark, plane) = (ctx.cfg.mark, ctx.plane);
        let attempt = |reserve: &mut Option<OwnedFd>| -> io::Result<(OwnedFd, bool)> {
            let fd = match socket::tcp_socket(&target) {
                Err(e) if is_fd_exhaustion(&e) && reserve.is_some() => {
                    *reserve = None; // its slot is ours now
                    socket::tcp_socket(&target)?
                }
                other => other?,
            };
            if let Some(mark) = mark {
                socket::set_int_opt(
                    fd.as_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_MARK,
                    mark as libc::c_int,
                )?;
            }
            plane.prepare_upstream(fd.as_fd(), &target)?;
            let connected = socket::connect(fd.as_fd(), &target)?;
            Ok((fd, connected))
        };
        self.target = Some(target);
        let res = attempt(ctx.reserve);
        if ctx.reserve.is_none() {
            // Spent: accept nothing more until a descriptor frees up.
            ctx.starved = Some(io::Error::from_raw_os_error(libc::EMFILE));
        }
        match res {
            Ok((fd, connected)) => {
                // The port is bound by connect(); a connection redirected back to us from it
                // is accepted only after this returns to the loop.
                let port = socket::local_addr(fd.as_fd()).map_or(0, |a| a.port());
                ctx.up_ports.add(port);
                conn.up_port = port;
                self.upstream = Some(Sock::new(fd));
                self.phase = Phase::Connecting;
                self.deadline = Instant::now() + ctx.cfg.connect_timeout;
                match connected {
                    true => self.connected(conn, ctx),
                    false => Step::Wait,
                }
            }
            Err(e) => {
                error!("#{} {}: connect {target}: {e}", conn.id, conn.route());
                if let Some(t) = ctx.target.as_deref_mut() {
                    t.connect_failed(target, ctx.resolver);
                }
                if is_fd_exhaustion(&e) {
                    ctx.starved = Some(e);
                    return Step::End(refuse(conn, End::Error, Rep::GeneralFailure));
                }
                let rep = socks5::rep_from_errno(e.raw_os_error().unwrap_or(0));
                Step::End(refuse(conn, connect_end(&e), rep))
            }
        }
    }

    /// The TCP connect finished: start the upstream proxy's handshake, if any.
    fn connected(&mut self, conn: &mut Conn, ctx: &mut Ctx) -> Step {
        self.deadline = Instant::now() + ctx.cfg.connect_timeout;
        match &ctx.cfg.upstream {
            Upstream::Direct => self.tunnel_open(conn),
            Upstream::Shadowsocks { .. } => {
                let header = shadowsocks::emit_header(&conn.dest);
                self.output[1].extend_from_slice(&header);
                self.tunnel_open(conn)
            }
            Upstream::Socks5 { auth, .. } => {
                let dest = conn.dest.clone();
                self.client = Some(SocksClient::new(dest, auth.clone(), &mut self.output[1]));
                self.phase = Phase::Proxy;
                self.flush(conn)
            }
        }
    }

    /// The path to the destination is open: answer a SOCKS client, queue the payload that came
    /// early, and write all of it before the data plane starts.
    fn tunnel_open(&mut self, conn: &mut Conn) -> Step {
        if conn.inbound == ListenerKind::Socks {
            let bind = self
                .upstream
                .as_ref()
                .and_then(|u| socket::local_addr(u.fd()).ok());
            self.output[0].extend_from_slice(&server_reply(Rep::Succeeded, bind));
        }
        let [to_up, to_client] = std::mem::take(&mut self.input);
        conn.pre = [to_up.len() as u64, to_client.len() as u64];
        self.output[1].extend_from_slice(&to_up);
        self.output[0].extend_from_slice(&to_client);
        self.phase = Phase::Flushing;
        self.flush(conn)
    }

    /// Writes pending handshake output; in `Flushing`, says `Ready` once all is out.
    fn flush(&mut self, conn: &mut Conn) -> Step {
        for side in [Side::Client, Side::Upstream] {
            let out = &mut self.output[side as usize];
            if out.is_empty() {
                continue;
            }
            let fd = match (side, &self.upstream) {
                (Side::Client, _) => conn.client.fd(),
                (Side::Upstream, Some(up)) => up.fd(),
                (Side::Upstream, None) => return Step::End(End::Error),
            };
            match socket::send(fd, out) {
                Ok(n) => {
                    out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Step::End(reset_of(side)),
            }
        }
        let done = self.output.iter().all(Vec::is_empty);
        match (done, self.phase) {
            (true, Phase::Flushing) => Step::Ready,
            _ => Step::Wait,
        }
    }

    /// Readiness of one side during setup.
    pub fn on_event(&mut self, conn: &mut Conn, ctx: &mut Ctx, side: Side, events: u32) -> Step {
        if (self.phase, side) == (Phase::Connecting, Side::Upstream) {
            return self.on_connecting(conn, ctx, events);
        }
        if events & epoll::ERR != 0 {
            return Step::End(reset_of(side));
        }
        if events & epoll::OUT != 0 {
            let step = self.flush(conn);
            if step != Step::Wait {
                return step;
            }
        }
        let reading = matches!(
            (self.phase, side),
            (Phase::Socks, Side::Client) | (Phase::Proxy, Side::Upstream)
        );
        if events & (epoll::IN | epoll::HUP) == 0 || !reading {
            return Step::Wait;
        }
        self.read_handshake(conn, ctx, side)
    }

    fn on_connecting(&mut self, conn: &mut Conn, ctx: &mut Ctx, events: u32) -> Step {
        let Some(up) = &self.upstream else {
            return Step::End(End::Error);
        };
        match socket::take_error(up.fd()) {
            Ok(None) if events & (epoll::ERR | epoll::HUP) == 0 => self.connected(conn, ctx),
            Ok(None) => Step::End(End::Error),
            Ok(Some(e)) | Err(e) => {
                error!("#{} {}: connect: {e}", conn.id, conn.route());
                if let (Some(t), Some(addr)) = (ctx.target.as_deref_mut(), self.target) {
                    t.connect_failed(addr, ctx.resolver);
                }
                let rep = socks5::rep_from_errno(e.raw_os_error().unwrap_or(0));
                Step::End(refuse(conn, connect_end(&e), rep))
            }
        }
    }

    /// Reads handshake bytes from `side` and feeds them to its state machine.
    fn read_handshake(&mut self, conn: &mut Conn, ctx: &mut Ctx, side: Side) -> Step {
        let fd = match (side, &self.upstream) {
            (Side::Client, _) => conn.client.fd(),
            (Side::Upstream, Some(up)) => up.fd(),
            (Side::Upstream, None) => return Step::End(End::Error),
        };
        let input = &mut self.input[side as usize];
        let mut chunk = [0u8; MAX_INPUT];
        let room = MAX_INPUT - input.len().min(MAX_INPUT);
        let n = match socket::recv(fd, &mut chunk[..room.max(1)]) {
            Ok(0) => {
                info!(
                    "#{} {}: {} closed during the handshake",
                    conn.id,
                    conn.route(),
                    side.name()
                );
                return Step::End(End::Error);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
            Err(_) => return Step::End(reset_of(side)),
        };
        input.extend_from_slice(&chunk[..n]);
        self.read[side as usize] += n as u64;
        let users: &[Credential] = &ctx.cfg.socks_auth;
        let (input, output) = (
            &mut self.input[side as usize],
            &mut self.output[side as usize],
        );
        let outcome = match (side, &mut self.server, &mut self.client) {
            (Side::Client, Some(server), _) => server.feed(input, output, users),
            (Side::Upstream, _, Some(client)) => client.feed(input, output),
            _ => return Step::End(End::Error),
        };
        match outcome {
            Outcome::More => self.flush(conn),
            Outcome::Fail { why, rep } => {
                let _ = self.flush(conn);
                error!("#{} {}: {why}", conn.id, conn.route());
                if side == Side::Upstream {
                    // An upstream refusal is passed on: its REP to a SOCKS client, a reset to
                    // the others.
                    let rep = rep.unwrap_or(Rep::GeneralFailure);
                    return Step::End(refuse(conn, End::Error, rep));
                }
                conn.replied = true; // the client got our reply (if any) and a FIN
                Step::End(End::Error)
            }
            Outcome::Associate(dest) if side == Side::Client => {
                conn.dest = dest;
                self.server = None;
                match self.flush(conn) {
                    Step::Wait => Step::Associate,
                    step => step,
                }
            }
            Outcome::Associate(_) => Step::End(End::Error),
            Outcome::Done(dest) => match side {
                Side::Client => {
                    conn.dest = dest;
                    self.server = None;
                    match self.flush(conn) {
                        Step::Wait => Step::Route,
                        step => step,
                    }
                }
                Side::Upstream => {
                    self.client = None;
                    self.tunnel_open(conn)
                }
            },
        }
    }

    /// Handshake bytes not yet written to the client (a pipelined client's method selection).
    pub fn take_client_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output[Side::Client as usize])
    }

    /// The phase's deadline passed: logs it and says how the connection ends.
    pub fn timed_out(&self, conn: &mut Conn) -> End {
        let what = match self.phase {
            Phase::Socks => "SOCKS5 handshake",
            Phase::Resolving => "name lookup",
            Phase::Connecting => "connect",
            _ => "upstream handshake",
        };
        error!("#{} {}: {what}: timed out", conn.id, conn.route());
        // A SOCKS client that has not finished its request expects no CONNECT reply.
        match self.phase {
            Phase::Socks => End::Timeout,
            _ => refuse(conn, End::Timeout, Rep::TtlExpired),
        }
    }
}

/// A refusal before the data plane: SOCKS clients get `rep` first and a FIN, the others
/// the end's usual close.
pub fn refuse(conn: &mut Conn, end: End, rep: Rep) -> End {
    if conn.inbound == ListenerKind::Socks {
        // A reply of at most 22 bytes to a socket that has sent nothing yet fits its
        // send buffer; if it did not, the client would just see the close.
        let _ = socket::send(conn.client.fd(), &server_reply(rep, None));
        conn.replied = true;
    }
    end
}
