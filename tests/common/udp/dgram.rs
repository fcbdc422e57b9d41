//! Datagram transports: plain UDP to one server (TPROXY intercepts it on the way), or through a
//! SOCKS5 UDP ASSOCIATE (RFC 1928 §7) from the client namespace, behind one `Dgram` trait; and
//! the full-cone check over either.
//!
//! Invariants: a SOCKS5 UDP datagram is parsed whole and one with FRAG != 0 or a bad header is
//! an error; datagrams from anyone but the relay are ignored.

use super::super::peers::CMD_UDP_ASSOCIATE;
use super::super::peers::{read_socks_reply, socks_auth, socks_greeting, socks_request, Target};
use super::*;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};

/// Something that sends payloads to one destination and receives payloads with their source.
pub trait Dgram: Send {
    fn send(&mut self, payload: &[u8]) -> io::Result<()>;
    /// Receives one payload into `buf`: (source, length).
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<(SocketAddr, usize)>;
}

/// A plain UDP socket talking to `to` (TPROXY intercepts it on the way).
pub struct Plain {
    pub sock: UdpSocket,
    pub to: SocketAddr,
}

impl Dgram for Plain {
    fn send(&mut self, payload: &[u8]) -> io::Result<()> {
        self.sock.send_to(payload, self.to).map(|_| ())
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<(SocketAddr, usize)> {
        let (n, from) = self.sock.recv_from(buf)?;
        Ok((from, n))
    }
}

/// RSV RSV FRAG ATYP DST.ADDR DST.PORT (RFC 1928 §7), FRAG 0.
pub fn socks_udp_header(t: &Target) -> Vec<u8> {
    let req = socks_request(0, t);
    let mut h = vec![0, 0, 0];
    h.extend_from_slice(&req[3..]);
    h
}

/// The address and the payload offset of a SOCKS5 UDP datagram (IP addresses only).
pub fn parse_socks_udp(d: &[u8]) -> Option<(SocketAddr, usize)> {
    match *d.get(3)? {
        1 => {
            let a: [u8; 4] = d.get(4..8)?.try_into().ok()?;
            let p = u16::from_be_bytes([*d.get(8)?, *d.get(9)?]);
            Some((SocketAddr::new(IpAddr::from(a), p), 10))
        }
        4 => {
            let a: [u8; 16] = d.get(4..20)?.try_into().ok()?;
            let p = u16::from_be_bytes([*d.get(20)?, *d.get(21)?]);
            Some((SocketAddr::new(IpAddr::from(a), p), 22))
        }
        _ => None,
    }
}

/// A SOCKS5 UDP ASSOCIATE from the client namespace: the control connection (the association
/// lives as long as it), a UDP socket, and the relay address the server announced.
pub struct SocksUdp {
    pub control: TcpStream,
    pub sock: UdpSocket,
    pub relay: SocketAddr,
    /// Where `send` sends to.
    pub to: Target,
}

impl SocksUdp {
    /// Associates through the SOCKS5 server at `proxy`, naming the UDP socket's address in
    /// the request (`announce` true) or 0.0.0.0:0.
    pub fn associate(
        topo: &Topology,
        proxy: SocketAddr,
        auth: Option<(&str, &str)>,
        announce: bool,
        to: Target,
    ) -> io::Result<SocksUdp> {
        let fam = if proxy.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        };
        let mut control = topo.client_connect(proxy)?;
        let sock = client_udp(topo, fam);
        let method = if auth.is_some() { 2 } else { 0 };
        control.write_all(&socks_greeting(&[method]))?;
        let mut sel = [0u8; 2];
        control.read_exact(&mut sel)?;
        if sel != [5, method] {
            return Err(io::Error::other(format!("method selection {sel:?}")));
        }
        if let Some((u, p)) = auth {
            control.write_all(&socks_auth(u, p))?;
            let mut st = [0u8; 2];
            control.read_exact(&mut st)?;
            if st != [1, 0] {
                return Err(io::Error::other(format!("auth status {st:?}")));
            }
        }
        let from = match announce {
            true => sock.local_addr()?,
            false => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
        };
        control.write_all(&socks_request(CMD_UDP_ASSOCIATE, &Target::Ip(from)))?;
        let reply = read_socks_reply(&mut control)?;
        match (reply.rep, reply.bound) {
            (0, Some(relay)) => Ok(SocksUdp {
                control,
                sock,
                relay,
                to,
            }),
            (rep, _) => Err(io::Error::other(format!(
                "UDP ASSOCIATE refused: REP {rep}"
            ))),
        }
    }

    /// Another handle on the same association (sockets shared), for `echo_check`.
    pub fn try_clone(&self) -> io::Result<SocksUdp> {
        Ok(SocksUdp {
            control: self.control.try_clone()?,
            sock: self.sock.try_clone()?,
            relay: self.relay,
            to: self.to.clone(),
        })
    }

    /// Sends raw bytes (a broken header, say) to the relay.
    pub fn send_raw(&self, bytes: &[u8]) -> io::Result<()> {
        self.sock.send_to(bytes, self.relay).map(|_| ())
    }
}

impl Dgram for SocksUdp {
    fn send(&mut self, payload: &[u8]) -> io::Result<()> {
        let mut d = socks_udp_header(&self.to);
        d.extend_from_slice(payload);
        self.send_raw(&d)
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<(SocketAddr, usize)> {
        let mut d = vec![0u8; 65536];
        loop {
            let (n, from) = self.sock.recv_from(&mut d)?;
            if from != self.relay {
                continue;
            }
            let bad = || io::Error::new(io::ErrorKind::InvalidData, "bad SOCKS5 UDP header");
            let (src, at) = parse_socks_udp(&d[..n]).ok_or_else(bad)?;
            if d[2] != 0 {
                return Err(bad());
            }
            let len = n - at;
            buf[..len].copy_from_slice(&d[at..n]);
            return Ok((src, len));
        }
    }
}

/// Full cone through `t` (which sends to `a`): `a` hears the client from some mapped
/// address; `b`, a server the client never addressed, sends there, and the client receives
/// it from `b`'s address. Returns the mapped address.
pub fn check_full_cone(t: &mut dyn Dgram, a: &UdpSocket, b: &UdpSocket) -> SocketAddr {
    let mut buf = [0u8; 64];
    t.send(b"hello A").unwrap();
    let (n, mapped) = a.recv_from(&mut buf).expect("A hears the client");
    assert_eq!(&buf[..n], b"hello A");
    b.send_to(b"B, unsolicited", mapped).unwrap();
    let (src, n) = t.recv(&mut buf).expect("the client hears B");
    assert_eq!(
        (src, &buf[..n]),
        (b.local_addr().unwrap(), &b"B, unsolicited"[..])
    );
    a.send_to(b"A answers", mapped).unwrap();
    let (src, n) = t.recv(&mut buf).expect("the client hears A");
    assert_eq!(
        (src, &buf[..n]),
        (a.local_addr().unwrap(), &b"A answers"[..])
    );
    mapped
}
