//! The SOCKS5 vocabulary both sides share: protocol constants, the parse
//! error, the `Parsed` shape and `need!` ("read more bytes"), fixed-size
//! emitted messages, addresses (also used by shadowsocks) and reply codes.

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
    pub(super) fn new() -> Self {
        Msg {
            buf: [0; N],
            len: 0,
        }
    }

    /// Callers size `N` for the longest message, so this never truncates.
    pub(super) fn put(&mut self, bytes: &[u8]) {
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

pub(crate) use need;

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
    Ok(parse_addr_ref(buf)?.map(|(addr, n)| (addr.to_dest(), n)))
}

/// A destination borrowed from the bytes it was parsed from: the UDP relay
/// parses one per datagram, and a name then costs no allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrRef<'a> {
    Ip(SocketAddr),
    Domain(&'a str, u16),
}

impl AddrRef<'_> {
    pub fn to_dest(self) -> Dest {
        match self {
            AddrRef::Ip(addr) => Dest::Ip(addr),
            AddrRef::Domain(name, port) => Dest::Domain(name.into(), port),
        }
    }
}

/// [`parse_addr`] without the allocation: the one address parser.
pub fn parse_addr_ref(buf: &[u8]) -> Parsed<AddrRef<'_>> {
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
            AddrRef::Ip(SocketAddr::new(Ipv4Addr::from(octets).into(), port))
        }
        ATYP_IPV6 => {
            let octets: [u8; 16] = addr.try_into().unwrap_or_default();
            AddrRef::Ip(SocketAddr::new(Ipv6Addr::from(octets).into(), port))
        }
        _ => match core::str::from_utf8(addr) {
            Ok(name) => AddrRef::Domain(name, port),
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

/// Golden messages and helpers the tests of all three files share.
#[cfg(test)]
pub(crate) mod golden {
    use super::*;

    pub fn v4(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    pub const IPV4_REQ: &[u8] = &[5, 1, 0, 1, 198, 18, 0, 2, 0x1f, 0x90];
    pub const IPV6_REQ: &[u8] = &[
        5, 1, 0, 4, 0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 2, 0x13, 0x89,
    ];
    pub const DOMAIN_REQ: &[u8] = &[
        5, 1, 0, 3, 11, b'e', b'x', b'a', b'm', b'p', b'l', b'e', b'.', b'c', b'o', b'm', 0, 80,
    ];
    pub const AUTH_REQ: &[u8] = &[1, 4, b'u', b's', b'e', b'r', 2, b'p', b'w'];

    /// Every proper prefix of a valid message asks for more bytes.
    pub fn all_prefixes_need_more<'a, T: fmt::Debug>(
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
}

#[cfg(test)]
mod tests {
    use super::golden::v4;
    use super::*;

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
}
