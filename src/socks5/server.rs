//! The server side of SOCKS5 (`--socks`): parsing a client's greeting, RFC 1929
//! credentials and request, and emitting the method selection, auth status and
//! reply. Conventions as in the parent module.

use super::common::*;
use std::net::SocketAddr;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socks5::common::golden::*;

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
}
