//! Handshake state machines, pure: bytes in, bytes out, a decision. No I/O.
//!
//! - `SocksServer`: the server side of SOCKS5 for `--socks` clients (RFC 1928, RFC 1929); a
//!   UDP ASSOCIATE request ends it with `Outcome::Associate`, and the UDP module answers it.
//! - `SocksClient`: the client side towards a `socks5://` upstream, for CONNECT or (the UDP
//!   module's) UDP ASSOCIATE.
//! - shadowsocks needs no state: its address header is written once (`shadowsocks::emit_header`).
//!
//! Each `feed` consumes whole messages from the front of `buf` and appends what must be sent to
//! `out`. When a handshake is complete, whatever is left in `buf` is payload that arrived with
//! the last message (a pipelining client, or a banner right behind the proxy's reply); the
//! caller forwards it before the data plane starts, so no byte is lost.

use crate::socks5::{self, Cmd, Dest, Rep};
use std::net::{Ipv4Addr, SocketAddr};

/// Longest handshake input kept: a request is at most 262 bytes, an RFC 1929 auth 513.
pub const MAX_INPUT: usize = 1024;

/// A username and password pair accepted by `--socks-auth`.
pub type Credential = (Vec<u8>, Vec<u8>);

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Waiting for more bytes (anything in `out` should be sent meanwhile).
    More,
    /// The handshake is done: connect to this destination (server) / the tunnel is open
    /// (client CONNECT) / the server's UDP relay is at this BND address (client UDP ASSOCIATE).
    Done(Dest),
    /// Server side: the client asked for UDP ASSOCIATE, naming where its datagrams will come
    /// from (often `0.0.0.0:0`, "not known yet"); the reply is the UDP relay's to send.
    Associate(Dest),
    /// Refused or failed: send `out` (if any), log `why`, close.
    Fail { why: String, rep: Option<Rep> },
}

fn fail(why: impl Into<String>, rep: Option<Rep>) -> Outcome {
    Outcome::Fail {
        why: why.into(),
        rep,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServerState {
    Greeting,
    Auth,
    Request,
    Done,
}

pub struct SocksServer {
    state: ServerState,
}

/// The reply address for failures: RFC 1928 leaves BND unspecified then.
fn unspecified() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
}

impl Default for SocksServer {
    fn default() -> Self {
        SocksServer {
            state: ServerState::Greeting,
        }
    }
}

impl SocksServer {
    /// With `users` empty, no authentication; otherwise RFC 1929 username/password is required.
    pub fn feed(&mut self, buf: &mut Vec<u8>, out: &mut Vec<u8>, users: &[Credential]) -> Outcome {
        loop {
            let step = match self.state {
                ServerState::Greeting => self.greeting(buf, out, users),
                ServerState::Auth => self.auth(buf, out, users),
                ServerState::Request => self.request(buf, out),
                ServerState::Done => return fail("handshake already finished", None),
            };
            match step {
                Some(Outcome::More) if !buf.is_empty() && self.state != ServerState::Done => {
                    continue
                }
                Some(o) => return o,
                None if buf.len() >= MAX_INPUT => return fail("handshake message too long", None),
                None => return Outcome::More,
            }
        }
    }

    /// `None`: need more bytes. `Some(More)`: a message was consumed, go on.
    fn greeting(
        &mut self,
        buf: &mut Vec<u8>,
        out: &mut Vec<u8>,
        users: &[Credential],
    ) -> Option<Outcome> {
        match socks5::parse_greeting(buf) {
            Ok(None) => None,
            Err(e) => Some(fail(format!("bad greeting: {e}"), None)),
            Ok(Some((g, n))) => {
                buf.drain(..n);
                let method = g.select(!users.is_empty());
                out.extend_from_slice(&socks5::emit_method_selection(method));
                Some(match method {
                    socks5::METHOD_NO_AUTH => {
                        self.state = ServerState::Request;
                        Outcome::More
                    }
                    socks5::METHOD_USER_PASS => {
                        self.state = ServerState::Auth;
                        Outcome::More
                    }
                    _ => fail("no acceptable authentication method offered", None),
                })
            }
        }
    }

    fn auth(
        &mut self,
        buf: &mut Vec<u8>,
        out: &mut Vec<u8>,
        users: &[Credential],
    ) -> Option<Outcome> {
        match socks5::parse_auth_request(buf) {
            Ok(None) => None,
            Err(e) => Some(fail(format!("bad authentication request: {e}"), None)),
            Ok(Some((c, n))) => {
                let ok = users.iter().any(|(u, p)| u == c.user && p == c.pass);
                let user = String::from_utf8_lossy(c.user).into_owned();
                buf.drain(..n);
                out.extend_from_slice(&socks5::emit_auth_reply(ok));
                if !ok {
                    return Some(fail(
                        format!("authentication failed for user '{user}'"),
                        None,
                    ));
                }
                self.state = ServerState::Request;
                Some(Outcome::More)
            }
        }
    }

    fn request(&mut self, buf: &mut Vec<u8>, out: &mut Vec<u8>) -> Option<Outcome> {
        match socks5::parse_request(buf) {
            Ok(None) => None,
            Err(e) => {
                let rep = e.rep().unwrap_or(Rep::GeneralFailure);
                out.extend_from_slice(&socks5::emit_reply(rep, unspecified()));
                Some(fail(format!("bad request: {e}"), Some(rep)))
            }
            Ok(Some((req, n))) => {
                buf.drain(..n);
                self.state = ServerState::Done;
                if req.cmd == Cmd::UdpAssociate {
                    return Some(Outcome::Associate(req.dest));
                }
                if req.cmd != Cmd::Connect {
                    let rep = Rep::CommandNotSupported;
                    out.extend_from_slice(&socks5::emit_reply(rep, unspecified()));
                    return Some(fail(
                        format!("command {:?} not supported", req.cmd),
                        Some(rep),
                    ));
                }
                Some(Outcome::Done(req.dest))
            }
        }
    }
}

/// The reply that completes a server handshake.
pub fn server_reply(rep: Rep, bind: Option<SocketAddr>) -> Vec<u8> {
    socks5::emit_reply(rep, bind.unwrap_or_else(unspecified)).to_vec()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientState {
    Method,
    Auth,
    Reply,
    Done,
}

pub struct SocksClient {
    state: ClientState,
    auth: Option<Credential>,
    dest: Dest,
    /// `CMD_CONNECT` or `CMD_UDP_ASSOCIATE`.
    cmd: u8,
}

impl SocksClient {
    /// Starts a handshake to reach `dest`; the greeting goes to `out`.
    pub fn new(dest: Dest, auth: Option<Credential>, out: &mut Vec<u8>) -> SocksClient {
        out.extend_from_slice(socks5::emit_greeting(auth.is_some()));
        SocksClient {
            state: ClientState::Method,
            auth,
            dest,
            cmd: socks5::CMD_CONNECT,
        }
    }

    /// Starts a UDP ASSOCIATE handshake for datagrams that will come from `from`; `Done`
    /// then carries the server's relay address (BND).
    pub fn associate(from: SocketAddr, auth: Option<Credential>, out: &mut Vec<u8>) -> Self {
        SocksClient {
            cmd: socks5::CMD_UDP_ASSOCIATE,
            ..SocksClient::new(Dest::Ip(from), auth, out)
        }
    }

    pub fn feed(&mut self, buf: &mut Vec<u8>, out: &mut Vec<u8>) -> Outcome {
        loop {
            let before = self.state;
            let res = match self.state {
                ClientState::Method => self.method(buf, out),
                ClientState::Auth => self.auth_reply(buf, out),
                ClientState::Reply => self.reply(buf),
                ClientState::Done => return fail("handshake already finished", None),
            };
            match res {
                Some(o @ (Outcome::Done(_) | Outcome::Fail { .. })) => return o,
                Some(Outcome::More) if self.state != before => continue,
                _ if buf.len() >= MAX_INPUT => {
                    return fail("upstream handshake message too long", None)
                }
                _ => return Outcome::More,
            }
        }
    }

    fn method(&mut self, buf: &mut Vec<u8>, out: &mut Vec<u8>) -> Option<Outcome> {
        match socks5::parse_method_selection(buf) {
            Ok(None) => None,
            Err(e) => Some(fail(format!("upstream: bad method selection: {e}"), None)),
            Ok(Some((method, n))) => {
                buf.drain(..n);
                match (method, &self.auth) {
                    (socks5::METHOD_NO_AUTH, _) => {
                        out.extend_from_slice(&socks5::emit_request(self.cmd, &self.dest));
                        self.state = ClientState::Reply;
                    }
                    (socks5::METHOD_USER_PASS, Some((user, pass))) => {
                        match socks5::emit_auth_request(user, pass) {
                            Ok(msg) => {
                                out.extend_from_slice(&msg);
                                self.state = ClientState::Auth;
                            }
                            Err(e) => {
                                return Some(fail(format!("upstream: credentials: {e}"), None))
                            }
                        }
                    }
                    _ => return Some(fail("upstream refused our authentication methods", None)),
                }
                Some(Outcome::More)
            }
        }
    }

    fn auth_reply(&mut self, buf: &mut Vec<u8>, out: &mut Vec<u8>) -> Option<Outcome> {
        match socks5::parse_auth_reply(buf) {
            Ok(None) => None,
            Err(e) => Some(fail(
                format!("upstream: bad authentication reply: {e}"),
                None,
            )),
            Ok(Some((false, _))) => Some(fail("upstream: authentication failed", None)),
            Ok(Some((true, n))) => {
                buf.drain(..n);
                out.extend_from_slice(&socks5::emit_request(self.cmd, &self.dest));
                self.state = ClientState::Reply;
                Some(Outcome::More)
            }
        }
    }

    fn reply(&mut self, buf: &mut Vec<u8>) -> Option<Outcome> {
        match socks5::parse_reply(buf) {
            Ok(None) => None,
            Err(e) => Some(fail(format!("upstream: bad reply: {e}"), None)),
            Ok(Some((reply, n))) => {
                buf.drain(..n);
                self.state = ClientState::Done;
                if reply.rep != Rep::Succeeded {
                    return Some(fail(
                        format!("upstream replied {} ({})", reply.rep as u8, reply.rep),
                        Some(reply.rep),
                    ));
                }
                Some(Outcome::Done(match self.cmd {
                    socks5::CMD_UDP_ASSOCIATE => reply.bind,
                    _ => self.dest.clone(),
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users() -> Vec<Credential> {
        vec![(b"alice".to_vec(), b"secret".to_vec())]
    }

    /// A pipelined no-auth client: greeting, request and payload in one write.
    #[test]
    fn server_pipelined_no_auth() {
        let mut s = SocksServer::default();
        let mut buf = vec![5, 1, 0, 5, 1, 0, 1, 198, 19, 1, 2, 0, 80];
        buf.extend_from_slice(b"GET /");
        let mut out = Vec::new();
        let dest: SocketAddr = "198.19.1.2:80".parse().unwrap();
        assert_eq!(
            s.feed(&mut buf, &mut out, &[]),
            Outcome::Done(Dest::Ip(dest))
        );
        assert_eq!(out, [5, 0]);
        assert_eq!(buf, b"GET /", "payload after the request is kept");
    }

    /// Byte-at-a-time input gives the same result (slow or fragmented clients).
    #[test]
    fn server_byte_at_a_time_with_auth() {
        let mut msg = vec![5, 2, 0, 2, 1, 5];
        msg.extend_from_slice(b"alice");
        msg.push(6);
        msg.extend_from_slice(b"secret");
        msg.extend_from_slice(&[5, 1, 0, 3, 11]);
        msg.extend_from_slice(b"example.com");
        msg.extend_from_slice(&[1, 187]);
        let (mut s, mut buf, mut out) = (SocksServer::default(), Vec::new(), Vec::new());
        let mut result = Outcome::More;
        for b in msg {
            assert_eq!(result, Outcome::More);
            buf.push(b);
            result = s.feed(&mut buf, &mut out, &users());
        }
        assert_eq!(
            result,
            Outcome::Done(Dest::Domain("example.com".into(), 443))
        );
        assert_eq!(out, [5, 2, 1, 0], "user/pass selected, then auth ok");
        assert!(buf.is_empty());
    }

    /// With auth configured, a client offering only no-auth is refused with 0xFF.
    #[test]
    fn server_refuses_no_auth_when_auth_required() {
        let (mut s, mut out) = (SocksServer::default(), Vec::new());
        let r = s.feed(&mut vec![5, 1, 0], &mut out, &users());
        assert!(matches!(r, Outcome::Fail { .. }));
        assert_eq!(out, [5, 0xff]);
    }

    /// Wrong password: auth reply 0x01, then close.
    #[test]
    fn server_rejects_bad_password() {
        let (mut s, mut out) = (SocksServer::default(), Vec::new());
        let mut buf = vec![5, 1, 2, 1, 5];
        buf.extend_from_slice(b"alice");
        buf.extend_from_slice(&[1, b'x']);
        assert!(matches!(
            s.feed(&mut buf, &mut out, &users()),
            Outcome::Fail { .. }
        ));
        assert_eq!(out, [5, 2, 1, 1]);
    }

    /// BIND gets "command not supported" (REP 7); a bad ATYP gets REP 8.
    #[test]
    fn server_unsupported_commands_and_address_types() {
        for (req, rep) in [
            (vec![5, 2, 0, 1, 1, 2, 3, 4, 0, 80], 7u8),
            (vec![5, 1, 0, 9, 1], 8),
        ] {
            let (mut s, mut out) = (SocksServer::default(), Vec::new());
            let mut buf = vec![5, 1, 0];
            buf.extend_from_slice(&req);
            let r = s.feed(&mut buf, &mut out, &[]);
            assert!(
                matches!(r, Outcome::Fail { rep: Some(_), .. }),
                "{req:?}: {r:?}"
            );
            assert_eq!(&out[..4], &[5, 0, 5, rep], "{req:?}");
        }
    }

    /// UDP ASSOCIATE (after authentication, as CONNECT) hands over with the client's DST and
    /// no reply written: the UDP relay answers with its own address.
    #[test]
    fn server_udp_associate() {
        let (mut s, mut out) = (SocksServer::default(), Vec::new());
        let mut buf = vec![5, 1, 2, 1, 5];
        buf.extend_from_slice(b"alice");
        buf.push(6);
        buf.extend_from_slice(b"secret");
        buf.extend_from_slice(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]);
        let any = Dest::Ip("0.0.0.0:0".parse().unwrap());
        assert_eq!(
            s.feed(&mut buf, &mut out, &users()),
            Outcome::Associate(any)
        );
        assert_eq!(out, [5, 2, 1, 0]);
        let (mut s, mut out) = (SocksServer::default(), Vec::new());
        let r = s.feed(
            &mut vec![5, 1, 0, 5, 3, 0, 1, 0, 0, 0, 0, 0, 0],
            &mut out,
            &users(),
        );
        assert!(matches!(r, Outcome::Fail { .. }), "no auth, no association");
    }

    /// The client side of UDP ASSOCIATE: CMD 3 with our address, and Done carries BND.
    #[test]
    fn client_udp_associate() {
        let mut out = Vec::new();
        let from = "198.19.1.1:40000".parse().unwrap();
        let mut c = SocksClient::associate(from, None, &mut out);
        assert_eq!(out, [5, 1, 0]);
        out.clear();
        assert_eq!(c.feed(&mut vec![5, 0], &mut out), Outcome::More);
        assert_eq!(out, [5, 3, 0, 1, 198, 19, 1, 1, 0x9c, 0x40]);
        let mut reply = vec![5, 0, 0, 1, 198, 19, 1, 2, 0x04, 0x38];
        let bnd = Dest::Ip("198.19.1.2:1080".parse().unwrap());
        assert_eq!(c.feed(&mut reply, &mut out), Outcome::Done(bnd));
    }

    /// Garbage and endless input are refused without waiting for ever.
    #[test]
    fn server_rejects_garbage_and_overlong_input() {
        let (mut s, mut out) = (SocksServer::default(), Vec::new());
        assert!(matches!(
            s.feed(&mut b"GET / HTTP/1.1\r\n".to_vec(), &mut out, &[]),
            Outcome::Fail { .. }
        ));
        let (mut s, mut out) = (SocksServer::default(), Vec::new());
        let mut buf = vec![5, 1, 2, 1, 255];
        buf.resize(MAX_INPUT, b'a');
        assert!(matches!(
            s.feed(&mut buf, &mut out, &users()),
            Outcome::Fail { .. }
        ));
    }

    /// The client side: greeting, auth, connect, reply; a banner behind the reply is kept.
    #[test]
    fn client_with_auth_and_banner() {
        let dest = Dest::Ip("198.19.1.2:22".parse().unwrap());
        let mut out = Vec::new();
        let mut c = SocksClient::new(dest.clone(), Some(users()[0].clone()), &mut out);
        assert_eq!(out, [5, 2, 0, 2]);
        out.clear();
        assert_eq!(c.feed(&mut vec![5, 2], &mut out), Outcome::More);
        assert_eq!(out[..2], [1, 5]);
        out.clear();
        assert_eq!(c.feed(&mut vec![1, 0], &mut out), Outcome::More);
        assert_eq!(out, [5, 1, 0, 1, 198, 19, 1, 2, 0, 22]);
        let mut buf = vec![5, 0, 0, 1, 10, 0, 0, 1, 4, 0];
        buf.extend_from_slice(b"SSH-2.0");
        assert_eq!(c.feed(&mut buf, &mut Vec::new()), Outcome::Done(dest));
        assert_eq!(buf, b"SSH-2.0");
    }

    /// A failure REP from the upstream is reported with its code.
    #[test]
    fn client_reports_upstream_rep() {
        let mut out = Vec::new();
        let mut c = SocksClient::new(Dest::Ip("198.19.1.2:22".parse().unwrap()), None, &mut out);
        let mut buf = vec![5, 0, 5, 5, 0, 1, 0, 0, 0, 0, 0, 0];
        match c.feed(&mut buf, &mut out) {
            Outcome::Fail {
                rep: Some(Rep::ConnectionRefused),
                why,
            } => assert!(why.contains("5"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    /// An upstream that demands auth we do not have is a failure, not a hang.
    #[test]
    fn client_without_credentials_refuses_user_pass() {
        let mut out = Vec::new();
        let mut c = SocksClient::new(Dest::Ip("198.19.1.2:22".parse().unwrap()), None, &mut out);
        assert!(matches!(
            c.feed(&mut vec![5, 2], &mut out),
            Outcome::Fail { .. }
        ));
    }
}
