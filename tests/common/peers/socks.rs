//! The SOCKS5 client side (RFC 1928, RFC 1929 username/password): message builders, a reply
//! parser and a complete CONNECT, including deliberately broken messages. Wire bytes only: the
//! caller supplies the connected stream.
//!
//! Invariant: a reply is read whole (its length follows from ATYP) or rejected as a protocol
//! violation; nothing here waits without the stream's own timeouts.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};

/// A CONNECT destination.
#[derive(Clone, Debug)]
pub enum Target {
    Ip(SocketAddr),
    Name(String, u16),
}

pub const CMD_CONNECT: u8 = 1;
pub const CMD_BIND: u8 = 2;
pub const CMD_UDP_ASSOCIATE: u8 = 3;

/// VER NMETHODS METHODS.
pub fn socks_greeting(methods: &[u8]) -> Vec<u8> {
    let mut v = vec![5, methods.len() as u8];
    v.extend_from_slice(methods);
    v
}

/// RFC 1929: VER=1 ULEN UNAME PLEN PASSWD.
pub fn socks_auth(user: &str, pass: &str) -> Vec<u8> {
    let mut v = vec![1, user.len() as u8];
    v.extend_from_slice(user.as_bytes());
    v.push(pass.len() as u8);
    v.extend_from_slice(pass.as_bytes());
    v
}

/// VER CMD RSV ATYP DST.ADDR DST.PORT.
pub fn socks_request(cmd: u8, t: &Target) -> Vec<u8> {
    let mut v = vec![5, cmd, 0];
    let port = match t {
        Target::Ip(SocketAddr::V4(a)) => {
            v.push(1);
            v.extend_from_slice(&a.ip().octets());
            a.port()
        }
        Target::Ip(SocketAddr::V6(a)) => {
            v.push(4);
            v.extend_from_slice(&a.ip().octets());
            a.port()
        }
        Target::Name(n, port) => {
            v.push(3);
            v.push(n.len() as u8);
            v.extend_from_slice(n.as_bytes());
            *port
        }
    };
    v.extend_from_slice(&port.to_be_bytes());
    v
}

/// A parsed SOCKS5 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocksReply {
    pub rep: u8,
    pub bound: Option<SocketAddr>,
}

/// Reads one complete reply (VER REP RSV ATYP BND.ADDR BND.PORT).
pub fn read_socks_reply(s: &mut impl Read) -> io::Result<SocksReply> {
    let mut h = [0u8; 4];
    s.read_exact(&mut h)?;
    if h[0] != 5 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("reply version {} (header {h:?})", h[0]),
        ));
    }
    let bound = match h[3] {
        1 => {
            let mut a = [0u8; 6];
            s.read_exact(&mut a)?;
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Some(SocketAddr::new(ip.into(), u16::from_be_bytes([a[4], a[5]])))
        }
        4 => {
            let mut a = [0u8; 18];
            s.read_exact(&mut a)?;
            let ip: [u8; 16] = a[..16].try_into().unwrap();
            Some(SocketAddr::new(
                Ipv6Addr::from(ip).into(),
                u16::from_be_bytes([a[16], a[17]]),
            ))
        }
        3 => {
            let mut l = [0u8; 1];
            s.read_exact(&mut l)?;
            let mut a = vec![0u8; l[0] as usize + 2];
            s.read_exact(&mut a)?;
            None
        }
        t => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reply ATYP {t}"),
            ))
        }
    };
    Ok(SocksReply { rep: h[1], bound })
}

/// The client half of a SOCKS5 CONNECT on `s`: greeting, optional RFC 1929 auth, request, and
/// `first` payload bytes. `pipelined` sends all of it in one write before reading any answer
/// (what a pipelining client does); otherwise each message waits for its answer. Returns the
/// reply (REP 0 or not); errors on a protocol violation by the server.
pub fn socks_connect(
    s: &mut TcpStream,
    target: &Target,
    auth: Option<(&str, &str)>,
    first: &[u8],
    pipelined: bool,
) -> io::Result<SocksReply> {
    let method = if auth.is_some() { 2 } else { 0 };
    let greeting = socks_greeting(&[method]);
    let auth_msg = auth.map(|(u, p)| socks_auth(u, p));
    let req = socks_request(CMD_CONNECT, target);
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    if pipelined {
        let mut all = greeting;
        all.extend(auth_msg.iter().flatten());
        all.extend_from_slice(&req);
        all.extend_from_slice(first);
        s.write_all(&all)?;
    } else {
        s.write_all(&greeting)?;
    }
    let mut sel = [0u8; 2];
    s.read_exact(&mut sel)?;
    if sel != [5, method] {
        return Err(bad(format!(
            "method selection {sel:?}, expected [5, {method}]"
        )));
    }
    if let Some(a) = &auth_msg {
        if !pipelined {
            s.write_all(a)?;
        }
        let mut st = [0u8; 2];
        s.read_exact(&mut st)?;
        if st != [1, 0] {
            return Err(bad(format!("auth status {st:?}, expected [1, 0]")));
        }
    }
    if !pipelined {
        s.write_all(&req)?;
    }
    let reply = read_socks_reply(s)?;
    if !pipelined && reply.rep == 0 && !first.is_empty() {
        s.write_all(first)?;
    }
    Ok(reply)
}
