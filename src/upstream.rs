//! The `-u/--upstream URL` argument: where proxied connections go.
//!
//! - `direct` (the default): connect to the destination itself;
//! - `socks5://[user:pass@]host:port`: user and pass are percent-decoded and
//!   must be 1..=255 bytes each (RFC 1929);
//! - `ss://none@host:port`, `ss://plain@host:port`, and SIP002
//!   `ss://BASE64URL(method:password)@host:port[/][#tag]` (base64url or
//!   standard base64, padded or not), also the legacy
//!   `ss://BASE64(method:password@host:port)`. Only the methods `none` and
//!   `plain` are accepted: ksocks hands the stream to the kernel after the
//!   header, so it cannot encrypt.
//!
//! A host is an IP literal (`198.18.0.1`, `[2001:db8::1]`) or a DNS name
//! (`proxy.example.net`), which `target` resolves through the resolver thread
//! at run time (at start, and again when connecting to it fails), never on the
//! event loop. Runs once at start, so it allocates freely; it never panics.

pub use crate::target::Server;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstream {
    Direct,
    /// `auth` is (username, password), each 1..=255 bytes.
    Socks5 {
        server: Server,
        auth: Option<(Vec<u8>, Vec<u8>)>,
    },
    Shadowsocks {
        server: Server,
    },
}

impl Upstream {
    /// The proxy's address, `None` for `direct`.
    pub fn server(&self) -> Option<&Server> {
        match self {
            Upstream::Direct => None,
            Upstream::Socks5 { server, .. } | Upstream::Shadowsocks { server } => Some(server),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// Not `direct`, `socks5://` or `ss://`.
    Scheme(String),
    /// The part after the scheme is not `host:port`.
    HostPort(String),
    /// The host is neither an IP address nor a DNS name.
    Host(String),
    /// The port is not a number in 1..=65535.
    Port(String),
    /// A `%` not followed by two hex digits.
    Percent,
    /// Userinfo that is neither `none`/`plain`, `method:password` nor base64.
    Base64,
    /// socks5 userinfo that is not `user:pass` with 1..=255 bytes each.
    Credentials,
    /// A shadowsocks method other than `none`/`plain`.
    Method(String),
    /// `?plugin=...` or another query: ksocks runs no SIP003 plugins.
    Plugin,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Error::Scheme(url) => write!(
                f,
                "unknown upstream {url:?}; expected direct, socks5://host:port or ss://none@host:port"
            ),
            Error::HostPort(s) => write!(f, "upstream address {s:?} is not host:port"),
            Error::Host(h) => write!(
                f,
                "upstream host {h:?} is neither an IP address nor a host name (IPv6 in brackets: [2001:db8::1]:1080)"
            ),
            Error::Port(p) => write!(f, "upstream port {p:?} is not a number in 1..=65535"),
            Error::Percent => f.write_str("bad percent-encoding in upstream URL (use %XX)"),
            Error::Base64 => f.write_str("shadowsocks userinfo is not valid base64 of method:password"),
            Error::Credentials => {
                f.write_str("socks5 upstream credentials must be user:pass, each 1 to 255 bytes")
            }
            Error::Method(m) => write!(
                f,
                "ksocks only relays unencrypted shadowsocks streams (method none/plain); {m} is not supported"
            ),
            Error::Plugin => f.write_str("shadowsocks plugins and URL queries are not supported"),
        }
    }
}

/// Parse an upstream URL; see the module header for the accepted forms.
pub fn parse(url: &str) -> Result<Upstream, Error> {
    if url.eq_ignore_ascii_case("direct") {
        return Ok(Upstream::Direct);
    }
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| Error::Scheme(url.into()))?;
    if scheme.eq_ignore_ascii_case("socks5") {
        let (userinfo, host) = split_userinfo(rest);
        let server = parse_host_port(host)?;
        let auth = userinfo.map(parse_credentials).transpose()?;
        Ok(Upstream::Socks5 { server, auth })
    } else if scheme.eq_ignore_ascii_case("ss") {
        parse_ss(rest.split('#').next().unwrap_or(rest))
    } else {
        Err(Error::Scheme(url.into()))
    }
}

/// The authority after `ss://`, with the `#tag` already dropped.
fn parse_ss(rest: &str) -> Result<Upstream, Error> {
    let (userinfo, host) = match split_userinfo(rest) {
        (Some(userinfo), host) => (percent_decode(userinfo)?, host.to_string()),
        // Legacy form: the whole authority is base64(method:password@host:port).
        (None, encoded) => {
            let plain = base64_decode(encoded.trim_end_matches('/')).ok_or(Error::Base64)?;
            let plain = String::from_utf8(plain).map_err(|_| Error::Base64)?;
            let (userinfo, host) = plain.rsplit_once('@').ok_or(Error::Base64)?;
            (userinfo.as_bytes().to_vec(), host.to_string())
        }
    };
    if host.contains('?') {
        return Err(Error::Plugin);
    }
    let server = parse_host_port(&host)?;
    let method = ss_method(&userinfo)?;
    if method.eq_ignore_ascii_case("none") || method.eq_ignore_ascii_case("plain") {
        Ok(Upstream::Shadowsocks { server })
    } else {
        Err(Error::Method(method))
    }
}

/// The method from `none`, `method:password` or base64 of the latter.
fn ss_method(userinfo: &[u8]) -> Result<String, Error> {
    let plain = match userinfo {
        u if u.contains(&b':') => u.to_vec(),
        u if u.eq_ignore_ascii_case(b"none") || u.eq_ignore_ascii_case(b"plain") => u.to_vec(),
        u => base64_decode(std::str::from_utf8(u).map_err(|_| Error::Base64)?)
            .ok_or(Error::Base64)?,
    };
    match plain.split(|&b| b == b':').next() {
        Some(method) if !method.is_empty() => Ok(String::from_utf8_lossy(method).into_owned()),
        _ => Err(Error::Base64),
    }
}

/// Split `userinfo@host` at the last `@`, so an unescaped `@` in a password
/// still works.
fn split_userinfo(s: &str) -> (Option<&str>, &str) {
    match s.rsplit_once('@') {
        Some((userinfo, host)) => (Some(userinfo), host),
        None => (None, s),
    }
}

fn parse_credentials(userinfo: &str) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let (user, pass) = userinfo.split_once(':').ok_or(Error::Credentials)?;
    let (user, pass) = (percent_decode(user)?, percent_decode(pass)?);
    let ok = |f: &[u8]| (1..=255).contains(&f.len());
    if !ok(&user) || !ok(&pass) {
        return Err(Error::Credentials);
    }
    Ok((user, pass))
}

/// `198.18.0.1:1080`, `[2001:db8::1]:1080` or `proxy.example.net:1080`, with an optional
/// trailing `/`.
fn parse_host_port(s: &str) -> Result<Server, Error> {
    let s = s.strip_suffix('/').unwrap_or(s);
    let bad = || Error::HostPort(s.into());
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, port) = rest.split_once("]:").ok_or_else(bad)?;
        let ip: Ipv6Addr = host.parse().map_err(|_| Error::Host(host.into()))?;
        (Ok(ip.into()), port)
    } else {
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || host.contains(':') {
            return Err(bad());
        }
        match host.parse::<Ipv4Addr>() {
            Ok(ip) => (Ok(ip.into()), port),
            Err(_) if is_host_name(host) => (Err(host), port),
            Err(_) => return Err(Error::Host(host.into())),
        }
    };
    // u16::from_str would accept "+80"; a port is digits only.
    let num = match port.bytes().all(|b| b.is_ascii_digit()) {
        true => port.parse::<u16>().ok().filter(|&p| p != 0),
        false => None,
    };
    let port = num.ok_or_else(|| Error::Port(port.into()))?;
    Ok(match host {
        Ok(ip) => Server::Addr(SocketAddr::new(ip, port)),
        Err(name) => Server::Name(name.to_ascii_lowercase(), port),
    })
}

/// RFC 1123 host name: at most 253 bytes of dot-separated labels, each 1..=63 letters,
/// digits or `-`, not starting or ending with `-`; not all digits and dots (a mistyped IPv4
/// address is an error, not a name to look up).
fn is_host_name(h: &str) -> bool {
    let h = h.strip_suffix('.').unwrap_or(h);
    let label = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    h.len() <= 253 && h.split('.').all(label) && !h.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

fn percent_decode(s: &str) -> Result<Vec<u8>, Error> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |j: usize| b.get(j).and_then(|&c| (c as char).to_digit(16));
            let (hi, lo) = hex(i + 1).zip(hex(i + 2)).ok_or(Error::Percent)?;
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// RFC 4648 base64, either alphabet (`+/` or `-_`), padding optional.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let body = s
        .strip_suffix("==")
        .or_else(|| s.strip_suffix('='))
        .unwrap_or(s);
    if body.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in body.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6 | v as u32) & 0xffff;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// For the start-up log: the password is never printed.
impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Upstream::Direct => f.write_str("direct"),
            Upstream::Socks5 { server, auth: None } => write!(f, "socks5://{server}"),
            Upstream::Socks5 {
                server,
                auth: Some((user, _)),
            } => {
                write!(f, "socks5://{}:***@{server}", String::from_utf8_lossy(user))
            }
            Upstream::Shadowsocks { server } => write!(f, "ss://none@{server}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ss(s: &str) -> Upstream {
        Upstream::Shadowsocks {
            server: Server::Addr(addr(s)),
        }
    }

    /// `direct`, in any case.
    #[test]
    fn direct() {
        assert_eq!(parse("direct"), Ok(Upstream::Direct));
        assert_eq!(parse("DIRECT"), Ok(Upstream::Direct));
    }

    /// socks5 with IPv4 and bracketed IPv6, no auth, optional trailing slash.
    #[test]
    fn socks5_no_auth() {
        let up = |a| Upstream::Socks5 {
            server: Server::Addr(addr(a)),
            auth: None,
        };
        assert_eq!(parse("socks5://198.18.0.1:1080"), Ok(up("198.18.0.1:1080")));
        assert_eq!(
            parse("SOCKS5://198.18.0.1:1080/"),
            Ok(up("198.18.0.1:1080"))
        );
        assert_eq!(
            parse("socks5://[2001:db8::1]:1080"),
            Ok(up("[2001:db8::1]:1080"))
        );
    }

    /// socks5 credentials are percent-decoded; a raw `@` in the password works.
    #[test]
    fn socks5_auth() {
        let up = |u: &[u8], p: &[u8]| Upstream::Socks5 {
            server: Server::Addr(addr("198.18.0.1:1080")),
            auth: Some((u.to_vec(), p.to_vec())),
        };
        assert_eq!(
            parse("socks5://user:pass@198.18.0.1:1080"),
            Ok(up(b"user", b"pass"))
        );
        assert_eq!(
            parse("socks5://us%3Aer:p%40ss%2f@198.18.0.1:1080"),
            Ok(up(b"us:er", b"p@ss/"))
        );
        assert_eq!(
            parse("socks5://u:p@ss@198.18.0.1:1080"),
            Ok(up(b"u", b"p@ss"))
        );
        assert_eq!(
            parse("socks5://u:a:b@198.18.0.1:1080"),
            Ok(up(b"u", b"a:b"))
        );
        assert_eq!(
            parse("socks5://%ff:%00@198.18.0.1:1080"),
            Ok(up(&[0xff], &[0]))
        );
    }

    /// Missing or empty fields and over-long credentials are refused.
    #[test]
    fn socks5_bad_credentials() {
        let long = "x".repeat(256);
        for url in [
            "socks5://user@198.18.0.1:1080".to_string(),
            "socks5://:pass@198.18.0.1:1080".into(),
            "socks5://user:@198.18.0.1:1080".into(),
            format!("socks5://{long}:p@198.18.0.1:1080"),
            format!("socks5://u:{long}@198.18.0.1:1080"),
        ] {
            assert_eq!(parse(&url), Err(Error::Credentials), "{url}");
        }
        assert!(parse(&format!("socks5://{0}:{0}@198.18.0.1:1", "x".repeat(255))).is_ok());
        assert_eq!(parse("socks5://u:%4@198.18.0.1:1080"), Err(Error::Percent));
        assert_eq!(parse("socks5://u:%zz@198.18.0.1:1080"), Err(Error::Percent));
        assert_eq!(parse("socks5://u:%+f@198.18.0.1:1080"), Err(Error::Percent));
    }

    /// Host names parse as names (lower-cased); names in brackets, mistyped IPv4 addresses,
    /// bad labels, unbracketed IPv6 and bad ports are refused with a reason.
    #[test]
    fn host_names_and_bad_host_port() {
        let server = |n: &str| Server::Name(n.into(), 1080);
        let name = |n: &str, auth| {
            Ok(Upstream::Socks5 {
                server: server(n),
                auth,
            })
        };
        assert_eq!(parse("socks5://proxy.lan:1080"), name("proxy.lan", None));
        assert_eq!(
            parse("socks5://Proxy-1.Example.NET.:1080/"),
            name("proxy-1.example.net.", None)
        );
        assert_eq!(
            parse("socks5://u:p@gw:1080"),
            name("gw", Some((b"u".to_vec(), b"p".to_vec())))
        );
        assert_eq!(
            parse("ss://none@ss.example:8388"),
            Ok(Upstream::Shadowsocks {
                server: Server::Name("ss.example".into(), 8388)
            })
        );
        let host = |h: &str| Err(Error::Host(h.into()));
        assert_eq!(parse("socks5://[proxy]:1080"), host("proxy"));
        assert_eq!(parse("socks5://[198.18.0.1]:1080"), host("198.18.0.1"));
        assert_eq!(parse("socks5://198.18.0:1080"), host("198.18.0"));
        assert_eq!(parse("socks5://198.18.0.256:1080"), host("198.18.0.256"));
        assert_eq!(parse("socks5://-bad.lan:1080"), host("-bad.lan"));
        assert_eq!(parse("socks5://a..b:1080"), host("a..b"));
        assert_eq!(parse("socks5://a_b:1080"), host("a_b"));
        let long = format!("socks5://{}:1080", "a".repeat(64));
        assert_eq!(parse(&long), Err(Error::Host("a".repeat(64))));
        assert_eq!(
            parse("socks5://2001:db8::1:1080"),
            Err(Error::HostPort("2001:db8::1:1080".into()))
        );
        assert_eq!(
            parse("socks5://198.18.0.1"),
            Err(Error::HostPort("198.18.0.1".into()))
        );
        assert_eq!(
            parse("socks5://[::1]"),
            Err(Error::HostPort("[::1]".into()))
        );
        assert_eq!(
            parse("socks5://:1080"),
            Err(Error::HostPort(":1080".into()))
        );
        for port in ["0", "65536", "+80", "", "80x", "-1"] {
            let url = format!("socks5://198.18.0.1:{port}");
            assert_eq!(parse(&url), Err(Error::Port(port.into())), "{url}");
        }
        assert_eq!(
            parse("socks5://198.18.0.1:1080/x"),
            Err(Error::Port("1080/x".into()))
        );
    }

    /// Unknown schemes and bare words are refused.
    #[test]
    fn bad_scheme() {
        for url in [
            "",
            "socks4://198.18.0.1:1080",
            "http://198.18.0.1:80",
            "198.18.0.1:1080",
            "none",
        ] {
            assert_eq!(parse(url), Err(Error::Scheme(url.into())), "{url}");
        }
    }

    /// `ss://none@` and `ss://plain@`, IPv4 and IPv6, with a tag.
    #[test]
    fn ss_plain_forms() {
        assert_eq!(
            parse("ss://none@198.18.0.1:8388"),
            Ok(ss("198.18.0.1:8388"))
        );
        assert_eq!(
            parse("ss://plain@[2001:db8::1]:8388"),
            Ok(ss("[2001:db8::1]:8388"))
        );
        assert_eq!(
            parse("ss://NONE@198.18.0.1:8388/#my%20server"),
            Ok(ss("198.18.0.1:8388"))
        );
        assert_eq!(
            parse("ss://none:@198.18.0.1:8388"),
            Ok(ss("198.18.0.1:8388"))
        );
    }

    /// SIP002 base64url userinfo, with and without padding, either alphabet.
    #[test]
    fn ss_sip002() {
        // base64("none:secret") = "bm9uZTpzZWNyZXQ="
        for ui in ["bm9uZTpzZWNyZXQ=", "bm9uZTpzZWNyZXQ", "bm9uZTpzZWNyZXQ%3D"] {
            assert_eq!(
                parse(&format!("ss://{ui}@198.18.0.1:8388")),
                Ok(ss("198.18.0.1:8388")),
                "{ui}"
            );
        }
        // base64("plain:?>?") = "cGxhaW46Pz4/" (standard) = "cGxhaW46Pz4_" (url)
        assert_eq!(
            parse("ss://cGxhaW46Pz4/@198.18.0.1:1"),
            Ok(ss("198.18.0.1:1"))
        );
        assert_eq!(
            parse("ss://cGxhaW46Pz4_@198.18.0.1:1"),
            Ok(ss("198.18.0.1:1"))
        );
        // base64("none:") = "bm9uZTo"
        assert_eq!(parse("ss://bm9uZTo@198.18.0.1:1"), Ok(ss("198.18.0.1:1")));
    }

    /// Legacy ss://BASE64(method:password@host:port).
    #[test]
    fn ss_legacy() {
        // base64("none:pw@198.18.0.1:8388")
        assert_eq!(
            parse("ss://bm9uZTpwd0AxOTguMTguMC4xOjgzODg="),
            Ok(ss("198.18.0.1:8388"))
        );
        assert_eq!(
            parse("ss://bm9uZTpwd0AxOTguMTguMC4xOjgzODg"),
            Ok(ss("198.18.0.1:8388"))
        );
    }

    /// Encrypting methods are refused with the documented message.
    #[test]
    fn ss_encrypted_method() {
        // base64url("aes-256-gcm:pw") = "YWVzLTI1Ni1nY206cHc"
        let err = parse("ss://YWVzLTI1Ni1nY206cHc@198.18.0.1:8388").unwrap_err();
        assert_eq!(err, Error::Method("aes-256-gcm".into()));
        assert_eq!(
            err.to_string(),
            "ksocks only relays unencrypted shadowsocks streams (method none/plain); aes-256-gcm is not supported"
        );
        let err = parse("ss://chacha20-ietf-poly1305:pw@198.18.0.1:8388").unwrap_err();
        assert_eq!(err, Error::Method("chacha20-ietf-poly1305".into()));
    }

    /// Plugins, bad base64 and bad hosts in ss URLs are refused.
    #[test]
    fn ss_errors() {
        assert_eq!(
            parse("ss://none@198.18.0.1:8388/?plugin=obfs-local"),
            Err(Error::Plugin)
        );
        assert_eq!(parse("ss://b@198.18.0.1:8388"), Err(Error::Base64));
        assert_eq!(parse("ss://bm9u*ZTo@198.18.0.1:8388"), Err(Error::Base64));
        assert_eq!(parse("ss://%ff%fe@198.18.0.1:8388"), Err(Error::Base64));
        assert_eq!(parse("ss://!!!"), Err(Error::Base64));
        assert_eq!(parse("ss://=@198.18.0.1:8388"), Err(Error::Base64));
        assert_eq!(parse("ss://:pw@198.18.0.1:8388"), Err(Error::Base64));
        assert_eq!(
            parse("ss://none@ss_example:8388"),
            Err(Error::Host("ss_example".into()))
        );
    }

    /// base64 decoding against RFC 4648 §10 test vectors.
    #[test]
    fn base64_vectors() {
        let cases = [
            ("", ""),
            ("Zg==", "f"),
            ("Zm8=", "fo"),
            ("Zm9v", "foo"),
            ("Zm9vYg", "foob"),
        ];
        for (enc, dec) in cases
            .into_iter()
            .chain([("Zm9vYmE=", "fooba"), ("Zm9vYmFy", "foobar")])
        {
            assert_eq!(base64_decode(enc).as_deref(), Some(dec.as_bytes()), "{enc}");
        }
        assert_eq!(base64_decode("Z"), None);
        assert_eq!(base64_decode("Zm9v="), Some(b"foo".to_vec()));
        assert_eq!(base64_decode("Zg==="), None);
    }

    /// Display never shows the password.
    #[test]
    fn display_redacts() {
        let up = parse("socks5://alice:hunter2@198.18.0.1:1080").unwrap();
        assert_eq!(up.to_string(), "socks5://alice:***@198.18.0.1:1080");
        assert_eq!(
            parse("ss://plain@[::1]:1").unwrap().to_string(),
            "ss://none@[::1]:1"
        );
        assert_eq!(Upstream::Direct.to_string(), "direct");
    }

    /// Every prefix of valid URLs, and multi-byte UTF-8 cut points, never panic.
    #[test]
    fn no_panic_on_prefixes() {
        let urls = [
            "socks5://us%3Aer:p%40ss@[2001:db8::1]:1080/",
            "ss://bm9uZTpzZWNyZXQ=@198.18.0.1:8388/?plugin=x#tag",
            "ss://bm9uZTpwd0AxOTguMTguMC4xOjgzODg=",
            "ss://é@[é]:é#é",
        ];
        for url in urls {
            for (i, _) in url.char_indices() {
                let _ = parse(&url[..i]);
                let _ = parse(&url[i..]);
            }
        }
    }
}
