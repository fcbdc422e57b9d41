//! SOCKS5 wire format: RFC 1928 (greeting, request, reply) and RFC 1929
//! (username/password), for both the server side (`--socks`) and the client
//! side (`--upstream socks5://`). Pure functions over bytes, no I/O.
//!
//! Every parser takes untrusted bytes from the start of a message and returns
//! `Result<Option<(T, usize)>, Error>`:
//! - `Ok(Some((msg, n)))`: a whole message, `n` bytes consumed; bytes after
//!   `n` belong to the next message (pipelined clients) and must be kept;
//! - `Ok(None)`: the input is a valid prefix, read more and call again;
//! - `Err(e)`: the input can never become a valid message; reply (see
//!   [`Error::rep`]) and close.
//!
//! Lengths are checked before every index, so no input panics. Emitters
//! return a fixed buffer ([`Msg`] or an array); only domain names allocate.

use core::fmt;
use core::ops::Deref;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

pub const VERSION: u8 = 0x05;
/// RFC 1929 §2: the sub-negotiation has its own version number.
pub const AUTH_VERSION: u8 = 0x01;

pub const METHOD_NO_AUTH: u8 = 0x00;
pub const METHOD_USER_PASS: u8 = 0x02;
pub const METHOD_NONE_ACCEPTABLE: u8 = 0xff;

pub const CMD_CONNECT: u8 = 0x01;
pub const CMD_BIND: u8 = 0x02;
pub const CMD_UDP_ASSOCIATE: u8 = 0x03;

pub const ATYP_IPV4: u8 = 0x01;
pub const ATYP_DOMAIN: u8 = 0x03;
pub const ATYP_IPV6: u8 = 0x04;

/// Longest encoded address: ATYP, LEN, 255 name bytes, PORT.
pub const MAX_ADDR_LEN: usize = 1 + 1 + 255 + 2;

/// Why bytes can never become a valid message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// VER is not 5 (or not 1 in an RFC 1929 message).
    Version(u8),
    /// A greeting with NMETHODS = 0.
    NoMethods,
    /// CMD is not CONNECT, BIND or UDP ASSOCIATE.
    Command(u8),
    /// ATYP is not 1, 3 or 4.
    AddrType(u8),
    /// A domain name of length 0, or not UTF-8.
    Domain,
    /// A username or password of length 0 (RFC 1929 allows 1..=255).
    Credential,
    /// A method selection naming a method that is not defined here.
    Method(u8),
    /// A reply whose REP code RFC 1928 does not define.
    Rep(u8),
}

impl Error {
    /// The reply a server sends before closing, if RFC 1928 defines one.
    pub fn rep(&self) -> Option<Rep> {
        match self {
            Error::Command(_) => Some(Rep::CommandNotSupported),
            Error::AddrType(_) => Some(Rep::AddressTypeNotSupported),
            Error::Domain => Some(Rep::GeneralFailure),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Error::Version(v) => write!(f, "unsupported SOCKS version {v}"),
            Error::NoMethods => f.write_str("greeting offers no authentication methods"),
            Error::Command(c) => write!(f, "unknown SOCKS command {c:#04x}"),
            Error::AddrType(a) => write!(f, "unknown address type {a:#04x}"),
            Error::Domain => f.write_str("empty or non-UTF-8 domain name"),
            Error::Credential => f.write_str("empty username or password"),
            Error::Method(m) => write!(f, "unknown authentication method {m:#04x}"),
            Error::Rep(r) => write!(f, "unknown reply code {r:#04x}"),
        }
    }
}

/// The shape every parser returns; see the module header.
pub type Parsed<T> = Result<Option<(T, usize)>, Error>;

/// An emitted message: a fixed buffer and the length in use.
#[derive(Clone, Copy)]
pub struct Msg<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Msg<N> {
    fn new() -> Self {
        Msg {
            buf: [0; N],
            len: 0,
        }
    }

    /// Callers size `N` for the longest message, so this never truncates.
    fn put(&mut self, bytes: &[u8]) {
        let end = (self.len + bytes.len()).min(N);
        self.buf[self.len..end].copy_from_slice(&bytes[..end - self.len]);
        self.len = end;
    }
}

impl<const N: usize> Deref for Msg<N> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<const N: usize> fmt::Debug for Msg<N> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// `Some(x)` gives `x`; `None` returns "need more bytes" from the parser.
macro_rules! need {
    ($e:expr) => {
        match $e {
            Some(v) => v,
            None => return Ok(None),
        }
    };
}

// ---- addresses (shared with shadowsocks) -----------------------------------

/// A destination as it travels on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dest {
    Ip(SocketAddr),
    /// A name of 1..=255 bytes (validated UTF-8, not resolved) and a port.
    Domain(String, u16),
}

impl From<SocketAddr> for Dest {
    fn from(addr: SocketAddr) -> Self {
        Dest::Ip(addr)
    }
}

impl fmt::Display for Dest {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Dest::Ip(addr) => write!(f, "{addr}"),
            Dest::Domain(name, port) => write!(f, "{name}:{port}"),
        }
    }
}

/// Parse ATYP, DST.ADDR, DST.PORT (RFC 1928 §5) from the start of `buf`.
pub fn parse_addr(buf: &[u8]) -> Parsed<Dest> {
    let atyp = *need!(buf.first());
    let (start, len) = match atyp {
        ATYP_IPV4 => (1, 4),
        ATYP_IPV6 => (1, 16),
        ATYP_DOMAIN => match buf.get(1) {
            None => return Ok(None),
            Some(0) => return Err(Error::Domain),
            Some(&n) => (2, n as usize),
        },
        _ => return Err(Error::AddrType(atyp)),
    };
    let end = start + len + 2;
    let field = need!(buf.get(start..end));
    let (addr, port) = field.split_at(len);
    let port = u16::from_be_bytes([port[0], port[1]]);
    let dest = match atyp {
        ATYP_IPV4 => {
            let octets: [u8; 4] = addr.try_into().unwrap_or_default();
            Dest::Ip(SocketAddr::new(Ipv4Addr::from(octets).into(), port))
        }
        ATYP_IPV6 => {
            let octets: [u8; 16] = addr.try_into().unwrap_or_default();
            Dest::Ip(SocketAddr::new(Ipv6Addr::from(octets).into(), port))
        }
        _ => match core::str::from_utf8(addr) {
            Ok(name) => Dest::Domain(name.into(), port),
            Err(_) => return Err(Error::Domain),
        },
    };
    Ok(Some((dest, end)))
}

/// Encode ATYP, ADDR, PORT. A name longer than 255 bytes (which no parser
/// produces) is cut at 255; an empty one is sent as is.
pub fn encode_addr(dest: &Dest) -> Msg<MAX_ADDR_LEN> {
    let mut m = Msg::new();
    let port = match dest {
        Dest::Ip(SocketAddr::V4(a)) => {
            m.put(&[ATYP_IPV4]);
            m.put(&a.ip().octets());
            a.port()
        }
        Dest::Ip(SocketAddr::V6(a)) => {
            m.put(&[ATYP_IPV6]);
            m.put(&a.ip().octets());
            a.port()
        }
        Dest::Domain(name, port) => {
            let name = &name.as_bytes()[..name.len().min(255)];
            m.put(&[ATYP_DOMAIN, name.len() as u8]);
            m.put(name);
            *port
        }
    };
    m.put(&port.to_be_bytes());
    m
}

// ---- replies ---------------------------------------------------------------

/// REP codes, RFC 1928 §6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Rep {
    Succeeded = 0x00,
    GeneralFailure = 0x01,
    NotAllowed = 0x02,
    NetworkUnreachable = 0x03,
    HostUnreachable = 0x04,
    ConnectionRefused = 0x05,
    TtlExpired = 0x06,
    CommandNotSupported = 0x07,
    AddressTypeNotSupported = 0x08,
}

impl Rep {
    pub fn from_u8(code: u8) -> Option<Rep> {
        use Rep::*;
        [
            Succeeded,
            GeneralFailure,
            NotAllowed,
            NetworkUnreachable,
            HostUnreachable,
            ConnectionRefused,
            TtlExpired,
            CommandNotSupported,
            AddressTypeNotSupported,
        ]
        .get(code as usize)
        .copied()
    }
}

impl fmt::Display for Rep {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Rep::Succeeded => "succeeded",
            Rep::GeneralFailure => "general SOCKS server failure",
            Rep::NotAllowed => "connection not allowed by ruleset",
            Rep::NetworkUnreachable => "network unreachable",
            Rep::HostUnreachable => "host unreachable",
            Rep::ConnectionRefused => "connection refused",
            Rep::TtlExpired => "TTL expired",
            Rep::CommandNotSupported => "command not supported",
            Rep::AddressTypeNotSupported => "address type not supported",
        })
    }
}

/// The REP code for a failed `connect()`. ETIMEDOUT maps to TTL expired
/// (0x06), as microsocks and most C servers do: both mean "no answer in
/// time", and curl then prints "TTL expired" rather than a misleading
/// "host unreachable".
pub fn rep_from_errno(errno: i32) -> Rep {
    match errno {
        libc::ECONNREFUSED => Rep::ConnectionRefused,
        libc::ENETUNREACH | libc::ENETDOWN => Rep::NetworkUnreachable,
        libc::EHOSTUNREACH | libc::EHOSTDOWN => Rep::HostUnreachable,
        libc::ETIMEDOUT => Rep::TtlExpired,
        libc::EACCES | libc::EPERM => Rep::NotAllowed,
        libc::EAFNOSUPPORT => Rep::AddressTypeNotSupported,
        _ => Rep::GeneralFailure,
    }
}

// ---- server side -----------------------------------------------------------

/// The methods a client's greeting offers that ksocks implements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Greeting {
    pub no_auth: bool,
    pub user_pass: bool,
}

impl Greeting {
    /// The method to answer with: username/password when the server
    /// requires it (no-auth is then refused), else no-auth.
    pub fn select(&self, auth_required: bool) -> u8 {
        match (auth_required, self.user_pass, self.no_auth) {
            (true, true, _) => METHOD_USER_PASS,
            (false, _, true) => METHOD_NO_AUTH,
            _ => METHOD_NONE_ACCEPTABLE,
        }
    }
}

/// Parse VER, NMETHODS, METHODS (RFC 1928 §3).
pub fn parse_greeting(buf: &[u8]) -> Parsed<Greeting> {
    let n = match *buf {
        [] => return Ok(None),
        [ver, ..] if ver != VERSION => return Err(Error::Version(ver)),
        [_] => return Ok(None),
        [_, 0, ..] => return Err(Error::NoMethods),
        [_, n, ..] => n as usize,
    };
    let methods = need!(buf.get(2..2 + n));
    let g = Greeting {
        no_auth: methods.contains(&METHOD_NO_AUTH),
        user_pass: methods.contains(&METHOD_USER_PASS),
    };
    Ok(Some((g, 2 + n)))
}

/// Emit the server's METHOD selection, e.g. [`METHOD_NONE_ACCEPTABLE`].
pub fn emit_method_selection(method: u8) -> [u8; 2] {
    [VERSION, method]
}

/// An RFC 1929 username/password request, borrowed from the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Credentials<'a> {
    pub user: &'a [u8],
    pub pass: &'a [u8],
}

/// Parse VER, ULEN, UNAME, PLEN, PASSWD (RFC 1929 §2).
pub fn parse_auth_request(buf: &[u8]) -> Parsed<Credentials<'_>> {
    let ver = *need!(buf.first());
    if ver != AUTH_VERSION {
        return Err(Error::Version(ver));
    }
    let (user, n) = need!(parse_field(&buf[1..])?);
    let (pass, m) = need!(parse_field(&buf[1 + n..])?);
    Ok(Some((Credentials { user, pass }, 1 + n + m)))
}

/// One length-prefixed, non-empty RFC 1929 field.
fn parse_field(buf: &[u8]) -> Parsed<&[u8]> {
    match buf.split_first() {
        None => Ok(None),
        Some((0, _)) => Err(Error::Credential),
        Some((&n, rest)) => Ok(rest.get(..n as usize).map(|f| (f, 1 + f.len()))),
    }
}

/// Emit the RFC 1929 status: 0x00 success, 0x01 failure (then close).
pub fn emit_auth_reply(ok: bool) -> [u8; 2] {
    [AUTH_VERSION, if ok { 0x00 } else { 0x01 }]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmd {
    Connect,
    Bind,
    UdpAssociate,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub cmd: Cmd,
    pub dest: Dest,
}

/// Parse VER, CMD, RSV, ATYP, DST.ADDR, DST.PORT (RFC 1928 §4). RSV is
/// ignored rather than checked, as curl, dante and microsocks do.
pub fn parse_request(buf: &[u8]) -> Parsed<Request> {
    let cmd = match *buf {
        [] => return Ok(None),
        [ver, ..] if ver != VERSION => return Err(Error::Version(ver)),
        [_] => return Ok(None),
        [_, CMD_CONNECT, ..] => Cmd::Connect,
        [_, CMD_BIND, ..] => Cmd::Bind,
        [_, CMD_UDP_ASSOCIATE, ..] => Cmd::UdpAssociate,
        [_, cmd, ..] => return Err(Error::Command(cmd)),
    };
    let addr = need!(buf.get(3..));
    let (dest, n) = need!(parse_addr(addr)?);
    Ok(Some((Request { cmd, dest }, 3 + n)))
}

/// Longest reply to an IP request: VER, REP, RSV, ATYP, 16 + 2.
pub const MAX_REPLY_LEN: usize = 4 + 16 + 2;

/// Emit VER, REP, RSV, ATYP, BND.ADDR, BND.PORT (RFC 1928 §6). On failure
/// pass any address of the request's family, e.g. `0.0.0.0:0`.
pub fn emit_reply(rep: Rep, bind: SocketAddr) -> Msg<MAX_REPLY_LEN> {
    let mut m = Msg::new();
    m.put(&[VERSION, rep as u8, 0]);
    m.put(&encode_addr(&Dest::Ip(bind)));
    m
}

// ---- client side -----------------------------------------------------------

/// Emit our greeting: no-auth, plus username/password when we have them.
pub fn emit_greeting(user_pass: bool) -> &'static [u8] {
    if user_pass {
        &[VERSION, 2, METHOD_NO_AUTH, METHOD_USER_PASS]
    } else {
        &[VERSION, 1, METHOD_NO_AUTH]
    }
}

/// Parse the server's VER, METHOD: one of the three `METHOD_*` constants.
/// The caller checks that the chosen method is one it offered.
pub fn parse_method_selection(buf: &[u8]) -> Parsed<u8> {
    match *buf {
        [ver, ..] if ver != VERSION => Err(Error::Version(ver)),
        [_, m @ (METHOD_NO_AUTH | METHOD_USER_PASS | METHOD_NONE_ACCEPTABLE), ..] => {
            Ok(Some((m, 2)))
        }
        [_, m, ..] => Err(Error::Method(m)),
        _ => Ok(None),
    }
}

/// Longest RFC 1929 request: VER, ULEN, 255, PLEN, 255.
pub const MAX_AUTH_REQUEST_LEN: usize = 3 + 255 + 255;

/// Emit VER, ULEN, UNAME, PLEN, PASSWD; both fields must be 1..=255 bytes.
pub fn emit_auth_request(user: &[u8], pass: &[u8]) -> Result<Msg<MAX_AUTH_REQUEST_LEN>, Error> {
    let ok = |f: &[u8]| (1..=255).contains(&f.len());
    if !ok(user) || !ok(pass) {
        return Err(Error::Credential);
    }
    let mut m = Msg::new();
    m.put(&[AUTH_VERSION, user.len() as u8]);
    m.put(user);
    m.put(&[pass.len() as u8]);
    m.put(pass);
    Ok(m)
}

/// Parse the server's VER, STATUS: `true` when STATUS is 0x00 (RFC 1929 §2).
pub fn parse_auth_reply(buf: &[u8]) -> Parsed<bool> {
    match *buf {
        [ver, ..] if ver != AUTH_VERSION => Err(Error::Version(ver)),
        [_, status, ..] => Ok(Some((status == 0, 2))),
        _ => Ok(None),
    }
}

/// Longest CONNECT request: VER, CMD, RSV and an address.
pub const MAX_REQUEST_LEN: usize = 3 + MAX_ADDR_LEN;

/// Emit a CONNECT request for `dest` (RFC 1928 §4).
pub fn emit_connect(dest: &Dest) -> Msg<MAX_REQUEST_LEN> {
    let mut m = Msg::new();
    m.put(&[VERSION, CMD_CONNECT, 0]);
    m.put(&encode_addr(dest));
    m
}

/// A server's reply; `bind` is its BND.ADDR/BND.PORT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub rep: Rep,
    pub bind: Dest,
}

/// Parse VER, REP, RSV, ATYP, BND.ADDR, BND.PORT (RFC 1928 §6); the length
/// depends on ATYP. A failure code still parses: check `rep`.
pub fn parse_reply(buf: &[u8]) -> Parsed<Reply> {
    let rep = match *buf {
        [] => return Ok(None),
        [ver, ..] if ver != VERSION => return Err(Error::Version(ver)),
        [_] => return Ok(None),
        [_, code, ..] => Rep::from_u8(code).ok_or(Error::Rep(code))?,
    };
    let addr = need!(buf.get(3..));
    let (bind, n) = need!(parse_addr(addr)?);
    Ok(Some((Reply { rep, bind }, 3 + n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const IPV4_REQ: &[u8] = &[5, 1, 0, 1, 198, 18, 0, 2, 0x1f, 0x90];
    const IPV6_REQ: &[u8] = &[
        5, 1, 0, 4, 0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 2, 0x13, 0x89,
    ];
    const DOMAIN_REQ: &[u8] = &[
        5, 1, 0, 3, 11, b'e', b'x', b'a', b'm', b'p', b'l', b'e', b'.', b'c', b'o', b'm', 0, 80,
    ];
    const AUTH_REQ: &[u8] = &[1, 4, b'u', b's', b'e', b'r', 2, b'p', b'w'];

    /// Every proper prefix of a valid message asks for more bytes.
    fn all_prefixes_need_more<'a, T: fmt::Debug>(
        msg: &'a [u8],
        parse: impl Fn(&'a [u8]) -> Parsed<T>,
    ) {
        for n in 0..msg.len() {
            assert!(
                matches!(parse(&msg[..n]), Ok(None)),
                "prefix {n} of {msg:?}"
            );
        }
        let Ok(Some((_, used))) = parse(msg) else {
            panic!("{msg:?} did not parse")
        };
        assert_eq!(used, msg.len());
    }

    /// A greeting offering both methods parses, and reports its length.
    #[test]
    fn greeting_both_methods() {
        let g = Greeting {
            no_auth: true,
            user_pass: true,
        };
        assert_eq!(parse_greeting(&[5, 2, 0, 2]), Ok(Some((g, 4))));
        all_prefixes_need_more(&[5, 2, 0, 2], parse_greeting);
    }

    /// With auth required only user/pass is chosen; without, only no-auth.
    #[test]
    fn greeting_select() {
        let g = |no_auth, user_pass| Greeting { no_auth, user_pass };
        assert_eq!(g(true, true).select(true), METHOD_USER_PASS);
        assert_eq!(g(true, false).select(true), METHOD_NONE_ACCEPTABLE);
        assert_eq!(g(true, true).select(false), METHOD_NO_AUTH);
        assert_eq!(g(false, true).select(false), METHOD_NONE_ACCEPTABLE);
        assert_eq!(g(false, false).select(false), METHOD_NONE_ACCEPTABLE);
    }

    /// Methods ksocks does not implement are ignored, not rejected.
    #[test]
    fn greeting_unknown_methods() {
        let g = Greeting::default();
        assert_eq!(parse_greeting(&[5, 3, 1, 0x80, 0xfe]), Ok(Some((g, 5))));
    }

    /// Bytes after the greeting (a pipelined request) are not consumed.
    #[test]
    fn greeting_pipelined() {
        let mut buf = vec![5, 1, 0];
        buf.extend_from_slice(IPV4_REQ);
        let (g, n) = parse_greeting(&buf).unwrap().unwrap();
        assert!(g.no_auth && !g.user_pass);
        assert_eq!(n, 3);
        let (r, m) = parse_request(&buf[n..]).unwrap().unwrap();
        assert_eq!(r.dest, Dest::Ip(v4("198.18.0.2:8080")));
        assert_eq!(n + m, buf.len());
    }

    /// A greeting with the wrong version or no methods is an error.
    #[test]
    fn greeting_errors() {
        assert_eq!(parse_greeting(&[4]), Err(Error::Version(4)));
        assert_eq!(parse_greeting(&[4, 1, 0]), Err(Error::Version(4)));
        assert_eq!(parse_greeting(&[5, 0]), Err(Error::NoMethods));
        assert_eq!(parse_greeting(&[5, 0, 0]), Err(Error::NoMethods));
    }

    /// A greeting listing 255 methods is the largest and still parses.
    #[test]
    fn greeting_max() {
        let mut buf = vec![5, 255];
        buf.extend(0..=254u8);
        assert!(matches!(parse_greeting(&buf), Ok(Some((_, 257)))));
        assert_eq!(parse_greeting(&buf[..256]), Ok(None));
    }

    /// Method selection and auth reply have fixed golden bytes.
    #[test]
    fn emit_fixed_messages() {
        assert_eq!(emit_method_selection(METHOD_NO_AUTH), [5, 0]);
        assert_eq!(emit_method_selection(METHOD_USER_PASS), [5, 2]);
        assert_eq!(emit_method_selection(METHOD_NONE_ACCEPTABLE), [5, 0xff]);
        assert_eq!(emit_auth_reply(true), [1, 0]);
        assert_eq!(emit_auth_reply(false), [1, 1]);
        assert_eq!(emit_greeting(false), [5, 1, 0]);
        assert_eq!(emit_greeting(true), [5, 2, 0, 2]);
    }

    /// A username/password request parses to borrowed fields.
    #[test]
    fn auth_request() {
        let c = Credentials {
            user: b"user",
            pass: b"pw",
        };
        assert_eq!(parse_auth_request(AUTH_REQ), Ok(Some((c, 9))));
        all_prefixes_need_more(AUTH_REQ, parse_auth_request);
    }

    /// Wrong sub-negotiation version and empty fields are errors.
    #[test]
    fn auth_request_errors() {
        assert_eq!(parse_auth_request(&[5, 4]), Err(Error::Version(5)));
        assert_eq!(parse_auth_request(&[1, 0]), Err(Error::Credential));
        assert_eq!(parse_auth_request(&[1, 1, b'u', 0]), Err(Error::Credential));
        assert_eq!(parse_auth_request(&[1, 1, b'u']), Ok(None));
    }

    /// Emitting and parsing credentials round-trips, up to 255 bytes each.
    #[test]
    fn auth_request_round_trip() {
        let m = emit_auth_request(b"user", b"pw").unwrap();
        assert_eq!(&*m, AUTH_REQ);
        let long = [b'x'; 255];
        let m = emit_auth_request(&long, &long).unwrap();
        assert_eq!(m.len(), MAX_AUTH_REQUEST_LEN);
        let (c, n) = parse_auth_request(&m).unwrap().unwrap();
        assert_eq!((c.user, c.pass, n), (&long[..], &long[..], m.len()));
        all_prefixes_need_more(&m, parse_auth_request);
    }

    /// Credentials outside 1..=255 bytes are refused by the emitter.
    #[test]
    fn auth_request_emit_limits() {
        assert_eq!(emit_auth_request(b"", b"p").unwrap_err(), Error::Credential);
        assert_eq!(emit_auth_request(b"u", b"").unwrap_err(), Error::Credential);
        assert_eq!(
            emit_auth_request(&[1; 256], b"p").unwrap_err(),
            Error::Credential
        );
        assert_eq!(
            emit_auth_request(b"u", &[1; 256]).unwrap_err(),
            Error::Credential
        );
    }

    /// IPv4, IPv6 and domain CONNECT requests parse from golden bytes.
    #[test]
    fn request_golden() {
        let r = |dest| Request {
            cmd: Cmd::Connect,
            dest,
        };
        assert_eq!(
            parse_request(IPV4_REQ),
            Ok(Some((r(Dest::Ip(v4("198.18.0.2:8080"))), 10)))
        );
        let six = v4("[2001:db8:1:2::2]:5001");
        assert_eq!(parse_request(IPV6_REQ), Ok(Some((r(Dest::Ip(six)), 22))));
        let name = Dest::Domain("example.com".into(), 80);
        assert_eq!(
            parse_request(DOMAIN_REQ),
            Ok(Some((r(name), DOMAIN_REQ.len())))
        );
        for msg in [IPV4_REQ, IPV6_REQ, DOMAIN_REQ] {
            all_prefixes_need_more(msg, parse_request);
        }
    }

    /// BIND and UDP ASSOCIATE parse, so the server can answer 0x07.
    #[test]
    fn request_other_commands() {
        let bind = parse_request(&[5, 2, 0, 1, 0, 0, 0, 0, 0, 0])
            .unwrap()
            .unwrap()
            .0;
        assert_eq!(bind.cmd, Cmd::Bind);
        let udp = parse_request(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0])
            .unwrap()
            .unwrap()
            .0;
        assert_eq!(udp.cmd, Cmd::UdpAssociate);
    }

    /// Bad version, command, address type or domain are errors with a REP.
    #[test]
    fn request_errors() {
        assert_eq!(parse_request(&[4, 1, 0, 1]), Err(Error::Version(4)));
        assert_eq!(parse_request(&[5, 0]), Err(Error::Command(0)));
        assert_eq!(parse_request(&[5, 9, 0, 1]), Err(Error::Command(9)));
        assert_eq!(parse_request(&[5, 1, 0, 2]), Err(Error::AddrType(2)));
        assert_eq!(parse_request(&[5, 1, 0, 0]), Err(Error::AddrType(0)));
        assert_eq!(parse_request(&[5, 1, 0, 3, 0]), Err(Error::Domain));
        assert_eq!(
            parse_request(&[5, 1, 0, 3, 1, 0xff, 0, 80]),
            Err(Error::Domain)
        );
        assert_eq!(Error::Command(9).rep(), Some(Rep::CommandNotSupported));
        assert_eq!(Error::AddrType(2).rep(), Some(Rep::AddressTypeNotSupported));
        assert_eq!(Error::Version(4).rep(), None);
    }

    /// A 255-byte domain name is the longest and round-trips.
    #[test]
    fn request_max_domain() {
        let dest = Dest::Domain("a".repeat(255), 443);
        let m = emit_connect(&dest);
        assert_eq!(m.len(), MAX_REQUEST_LEN);
        let (r, n) = parse_request(&m).unwrap().unwrap();
        assert_eq!((r.dest, n), (dest, MAX_REQUEST_LEN));
    }

    /// emit_connect produces the golden requests, which parse back.
    #[test]
    fn connect_round_trip() {
        assert_eq!(&*emit_connect(&Dest::Ip(v4("198.18.0.2:8080"))), IPV4_REQ);
        assert_eq!(
            &*emit_connect(&Dest::Ip(v4("[2001:db8:1:2::2]:5001"))),
            IPV6_REQ
        );
        assert_eq!(
            &*emit_connect(&Dest::Domain("example.com".into(), 80)),
            DOMAIN_REQ
        );
    }

    /// Replies have golden bytes for both families and parse back.
    #[test]
    fn reply_round_trip() {
        let m = emit_reply(Rep::Succeeded, v4("198.19.0.1:40000"));
        assert_eq!(&*m, &[5, 0, 0, 1, 198, 19, 0, 1, 0x9c, 0x40]);
        let m6 = emit_reply(Rep::ConnectionRefused, v4("[::]:0"));
        assert_eq!(
            &*m6,
            &[5, 5, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        for (msg, rep) in [(&m, Rep::Succeeded), (&m6, Rep::ConnectionRefused)] {
            let (r, n) = parse_reply(msg).unwrap().unwrap();
            assert_eq!((r.rep, n), (rep, msg.len()));
            all_prefixes_need_more(msg, parse_reply);
        }
    }

    /// A reply may carry a domain BND.ADDR; its length follows ATYP.
    #[test]
    fn reply_domain() {
        let buf = [5, 0, 0, 3, 1, b'h', 0, 1, 0xaa];
        let r = Reply {
            rep: Rep::Succeeded,
            bind: Dest::Domain("h".into(), 1),
        };
        assert_eq!(parse_reply(&buf), Ok(Some((r, 8))));
    }

    /// Replies with a bad version, REP code or ATYP are errors.
    #[test]
    fn reply_errors() {
        assert_eq!(parse_reply(&[4, 0]), Err(Error::Version(4)));
        assert_eq!(parse_reply(&[5, 9]), Err(Error::Rep(9)));
        assert_eq!(parse_reply(&[5, 0, 0, 7]), Err(Error::AddrType(7)));
    }

    /// Method selection: the three known methods, errors otherwise.
    #[test]
    fn method_selection() {
        assert_eq!(parse_method_selection(&[]), Ok(None));
        assert_eq!(parse_method_selection(&[5]), Ok(None));
        assert_eq!(parse_method_selection(&[5, 0]), Ok(Some((0, 2))));
        assert_eq!(parse_method_selection(&[5, 2, 9]), Ok(Some((2, 2))));
        assert_eq!(parse_method_selection(&[5, 0xff]), Ok(Some((0xff, 2))));
        assert_eq!(parse_method_selection(&[5, 1]), Err(Error::Method(1)));
        assert_eq!(parse_method_selection(&[4]), Err(Error::Version(4)));
    }

    /// Auth reply: status 0 is success, anything else failure.
    #[test]
    fn auth_reply() {
        assert_eq!(parse_auth_reply(&[1]), Ok(None));
        assert_eq!(parse_auth_reply(&[1, 0]), Ok(Some((true, 2))));
        assert_eq!(parse_auth_reply(&[1, 1]), Ok(Some((false, 2))));
        assert_eq!(parse_auth_reply(&[1, 0xff]), Ok(Some((false, 2))));
        assert_eq!(parse_auth_reply(&[5, 0]), Err(Error::Version(5)));
    }

    /// Destinations print as host:port, IPv6 in brackets, for log lines.
    #[test]
    fn dest_display() {
        assert_eq!(Dest::Ip(v4("198.18.0.2:80")).to_string(), "198.18.0.2:80");
        assert_eq!(
            Dest::Ip(v4("[2001:db8::2]:80")).to_string(),
            "[2001:db8::2]:80"
        );
        assert_eq!(Dest::Domain("a.test".into(), 443).to_string(), "a.test:443");
        assert_eq!(
            Dest::from(v4("198.18.0.2:80")),
            Dest::Ip(v4("198.18.0.2:80"))
        );
    }

    /// Every REP code round-trips through its byte; 9.. are unknown.
    #[test]
    fn rep_codes() {
        for code in 0..=8u8 {
            assert_eq!(Rep::from_u8(code).unwrap() as u8, code);
        }
        assert_eq!(Rep::from_u8(9), None);
        assert_eq!(Rep::from_u8(0xff), None);
    }

    /// connect() errno values map to the documented REP codes.
    #[test]
    fn errno_mapping() {
        assert_eq!(rep_from_errno(libc::ECONNREFUSED), Rep::ConnectionRefused);
        assert_eq!(rep_from_errno(libc::ENETUNREACH), Rep::NetworkUnreachable);
        assert_eq!(rep_from_errno(libc::EHOSTUNREACH), Rep::HostUnreachable);
        assert_eq!(rep_from_errno(libc::ETIMEDOUT), Rep::TtlExpired);
        assert_eq!(rep_from_errno(libc::EACCES), Rep::NotAllowed);
        assert_eq!(rep_from_errno(libc::EPERM), Rep::NotAllowed);
        assert_eq!(
            rep_from_errno(libc::EAFNOSUPPORT),
            Rep::AddressTypeNotSupported
        );
        assert_eq!(rep_from_errno(libc::ENOMEM), Rep::GeneralFailure);
        assert_eq!(rep_from_errno(0), Rep::GeneralFailure);
    }

    /// Every prefix of every golden message, and every single byte value
    /// after it, runs through every parser without panicking.
    #[test]
    fn no_panic_on_prefixes() {
        let msgs: &[&[u8]] = &[IPV4_REQ, IPV6_REQ, DOMAIN_REQ, AUTH_REQ, &[5, 2, 0, 2]];
        for msg in msgs {
            for n in 0..=msg.len() {
                for b in 0..=255u8 {
                    let mut buf = msg[..n].to_vec();
                    buf.push(b);
                    for input in [&msg[..n], &buf[..]] {
                        let _ = parse_greeting(input);
                        let _ = parse_auth_request(input);
                        let _ = parse_request(input);
                        let _ = parse_method_selection(input);
                        let _ = parse_auth_reply(input);
                        let _ = parse_reply(input);
                        let _ = parse_addr(input);
                    }
                }
            }
        }
    }
}
