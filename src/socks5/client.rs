//! The client side of SOCKS5 (`--upstream socks5://`): emitting our greeting,
//! credentials and CONNECT, and parsing the server's answers. Conventions as in
//! the parent module.

use super::common::*;

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
    emit_request(CMD_CONNECT, dest)
}

/// Emit a request with command `cmd`: `CMD_CONNECT`, or `CMD_UDP_ASSOCIATE` with the address
/// our datagrams will come from (RFC 1928 §7).
pub fn emit_request(cmd: u8, dest: &Dest) -> Msg<MAX_REQUEST_LEN> {
    let mut m = Msg::new();
    m.put(&[VERSION, cmd, 0]);
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
    use crate::socks5::common::golden::*;
    use crate::socks5::*;

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

    /// A 255-byte domain name is the longest and round-trips.
    #[test]
    fn request_max_domain() {
        let dest = Dest::Domain("a".repeat(255), 443);
        let m = emit_connect(&dest);
        assert_eq!(m.len(), MAX_REQUEST_LEN);
        let (r, n) = parse_request(&m).unwrap().unwrap();
        assert_eq!((r.dest, n), (dest, MAX_REQUEST_LEN));
    }

    /// A UDP ASSOCIATE request differs from CONNECT in CMD only.
    #[test]
    fn emit_udp_associate() {
        let m = emit_request(CMD_UDP_ASSOCIATE, &Dest::Ip(v4("198.18.0.2:8080")));
        assert_eq!(m[1], 3);
        assert_eq!((&m[..1], &m[2..]), (&IPV4_REQ[..1], &IPV4_REQ[2..]));
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
