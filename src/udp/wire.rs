//! The two headers a relayed datagram carries, pure (bytes in, bytes out, no I/O):
//!
//! - SOCKS5 (RFC 1928 §7): `RSV(2) FRAG(1) ATYP DST.ADDR DST.PORT DATA`, between a SOCKS
//!   client and its UDP relay, in both directions (towards the relay the address is the
//!   destination, back from it the source);
//! - shadowsocks without encryption (`ssserver -m none -U`): `ATYP DST.ADDR DST.PORT DATA`,
//!   the stream header followed by the payload, one per datagram, in both directions
//!   (shadowsocks-rust's `CipherCategory::None` arms of `encrypt_client_payload` and
//!   `decrypt_server_payload` write and read exactly that; a reply names its source).
//!
//! The address codec is the one in [`socks5`] (`parse_addr_ref`, `encode_addr`, and
//! [`shadowsocks::emit_header`]), so the stream and datagram headers cannot drift apart.
//!
//! Invariants: a datagram is whole, so there is no "need more": too short is
//! [`Error::Truncated`]; parsing never panics and never allocates (a name is borrowed from
//! the datagram); a header is written in place just before the payload
//! ([`Format::prepend`]), so the relay receives a payload once at [`HEADROOM`] and sends it
//! from there with its header, without copying the payload.

use crate::shadowsocks;
use crate::socks5::{self, AddrRef, Dest, MAX_ADDR_LEN};
use core::fmt;

/// RSV (2 bytes) and FRAG.
pub const SOCKS5_FIXED_LEN: usize = 3;
/// The longest header of either format: RSV, FRAG and a 255-byte name.
pub const HEADROOM: usize = SOCKS5_FIXED_LEN + MAX_ADDR_LEN;

/// The two encapsulations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Socks5,
    Shadowsocks,
}

/// Why a datagram cannot be relayed; each is counted under its own name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Shorter than its header says.
    Truncated,
    /// FRAG is not 0: a fragment of a datagram the client split. RFC 1928 §7 lets a relay
    /// that does not reassemble drop it, which ksocks does (no client in use fragments).
    Fragment(u8),
    /// The address is bad: unknown ATYP, an empty or non-UTF-8 name.
    Addr(socks5::Error),
    /// [`Format::prepend`]: the header does not fit before the payload.
    NoRoom,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Error::Truncated => f.write_str("datagram shorter than its header"),
            Error::Fragment(n) => write!(f, "fragmented datagram (FRAG {n}) dropped"),
            Error::Addr(e) => write!(f, "bad address in datagram header: {e}"),
            Error::NoRoom => f.write_str("no room for the datagram header"),
        }
    }
}

/// A parsed datagram: the address in its header and the payload after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Datagram<'a> {
    /// The destination (client to relay) or the source (relay to client).
    pub addr: AddrRef<'a>,
    /// The payload starts here in the bytes parsed.
    pub header_len: usize,
    pub payload: &'a [u8],
}

impl Format {
    /// Parse the header of a whole datagram.
    pub fn parse(self, buf: &[u8]) -> Result<Datagram<'_>, Error> {
        let at = match self {
            Format::Socks5 => match *buf {
                [_, _, 0, ..] => SOCKS5_FIXED_LEN,
                [_, _, frag, ..] => return Err(Error::Fragment(frag)),
                _ => return Err(Error::Truncated),
            },
            Format::Shadowsocks => 0,
        };
        let rest = buf.get(at..).ok_or(Error::Truncated)?;
        match socks5::parse_addr_ref(rest) {
            Ok(Some((addr, n))) => Ok(Datagram {
                addr,
                header_len: at + n,
                payload: &rest[n..],
            }),
            Ok(None) => Err(Error::Truncated),
            Err(e) => Err(Error::Addr(e)),
        }
    }

    /// Write the header for `addr` into `buf` so that it ends at `payload_at`, where the
    /// payload already is; returns where the datagram starts. RSV and FRAG are written as 0.
    pub fn prepend(self, buf: &mut [u8], payload_at: usize, addr: &Dest) -> Result<usize, Error> {
        let encoded = match self {
            Format::Socks5 => socks5::encode_addr(addr),
            Format::Shadowsocks => shadowsocks::emit_header(addr),
        };
        let fixed = match self {
            Format::Socks5 => SOCKS5_FIXED_LEN,
            Format::Shadowsocks => 0,
        };
        let start = payload_at
            .checked_sub(fixed + encoded.len())
            .ok_or(Error::NoRoom)?;
        let header = buf.get_mut(start..payload_at).ok_or(Error::NoRoom)?;
        let (zeros, address) = header.split_at_mut(fixed);
        zeros.fill(0);
        address.copy_from_slice(&encoded);
        Ok(start)
    }

    /// The header's length for `addr`, to check a datagram's size before building it.
    pub fn header_len(self, addr: &Dest) -> usize {
        let fixed = match self {
            Format::Socks5 => SOCKS5_FIXED_LEN,
            Format::Shadowsocks => 0,
        };
        fixed + socks5::encode_addr(addr).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn ip(s: &str) -> Dest {
        Dest::Ip(s.parse::<SocketAddr>().unwrap())
    }

    const V4: &[u8] = &[0, 0, 0, 1, 198, 19, 1, 2, 0, 53, b'q', b'?'];
    const V6: &[u8] = &[
        0, 0, 0, 4, 0x20, 1, 0x0d, 0xb8, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 2, 0x01, 0xbb, 0xff,
    ];
    const NAME: &[u8] = &[
        0, 0, 0, 3, 6, b'a', b'.', b't', b'e', b's', b't', 0x13, 0x89, 7,
    ];

    /// Golden SOCKS5 UDP headers for IPv4, IPv6 and a name parse to their address and payload.
    #[test]
    fn socks5_golden() {
        let d = Format::Socks5.parse(V4).unwrap();
        let v4 = "198.19.1.2:53".parse().unwrap();
        assert_eq!(
            (d.addr, d.header_len, d.payload),
            (AddrRef::Ip(v4), 10, &b"q?"[..])
        );
        let d = Format::Socks5.parse(V6).unwrap();
        let v6 = "[2001:db8:1:2::2]:443".parse().unwrap();
        assert_eq!(
            (d.addr, d.header_len, d.payload),
            (AddrRef::Ip(v6), 22, &[0xff][..])
        );
        let d = Format::Socks5.parse(NAME).unwrap();
        let name = AddrRef::Domain("a.test", 5001);
        assert_eq!((d.addr, d.header_len, d.payload), (name, 13, &[7][..]));
    }

    /// The same datagrams without RSV and FRAG are shadowsocks datagrams.
    #[test]
    fn shadowsocks_golden() {
        for golden in [V4, V6, NAME] {
            let s = Format::Socks5.parse(golden).unwrap();
            let d = Format::Shadowsocks.parse(&golden[3..]).unwrap();
            assert_eq!(
                (d.addr, d.header_len + 3, d.payload),
                (s.addr, s.header_len, s.payload)
            );
        }
    }

    /// A header with an empty payload is a valid (empty) datagram.
    #[test]
    fn empty_payload() {
        let d = Format::Socks5.parse(&V4[..10]).unwrap();
        assert_eq!(d.payload, b"");
        let d = Format::Shadowsocks.parse(&V4[3..10]).unwrap();
        assert_eq!(d.payload, b"");
    }

    /// prepend writes the golden bytes in front of a payload already in place, for both
    /// formats, and what it wrote parses back to the same address and payload.
    #[test]
    fn prepend_round_trip() {
        let cases = [(ip("198.19.1.2:53"), V4), (ip("[2001:db8:1:2::2]:443"), V6)];
        for (dest, golden) in cases {
            let payload_len = golden.len() - Format::Socks5.parse(golden).unwrap().header_len;
            let mut buf = [0xaau8; HEADROOM + 16];
            buf[HEADROOM..HEADROOM + payload_len]
                .copy_from_slice(&golden[golden.len() - payload_len..]);
            let end = HEADROOM + payload_len;
            let start = Format::Socks5.prepend(&mut buf, HEADROOM, &dest).unwrap();
            assert_eq!(&buf[start..end], golden);
            assert_eq!(Format::Socks5.header_len(&dest), HEADROOM - start);
            let start = Format::Shadowsocks
                .prepend(&mut buf, HEADROOM, &dest)
                .unwrap();
            assert_eq!(&buf[start..end], &golden[3..]);
            assert_eq!(Format::Shadowsocks.header_len(&dest), HEADROOM - start);
            assert_eq!(
                Format::Shadowsocks
                    .parse(&buf[start..end])
                    .unwrap()
                    .addr
                    .to_dest(),
                dest
            );
        }
    }

    /// A name header round-trips, including the longest (255 bytes), which fills HEADROOM.
    #[test]
    fn prepend_names() {
        for name in ["a.test".to_string(), "n".repeat(255)] {
            let dest = Dest::Domain(name.clone(), 5001);
            let mut buf = vec![0u8; HEADROOM + 1];
            buf[HEADROOM] = 7;
            let start = Format::Socks5.prepend(&mut buf, HEADROOM, &dest).unwrap();
            let d = Format::Socks5.parse(&buf[start..]).unwrap();
            assert_eq!(
                (d.addr, d.payload),
                (AddrRef::Domain(&name, 5001), &[7][..])
            );
            if name.len() == 255 {
                assert_eq!(start, 0);
            }
        }
    }

    /// prepend refuses, without writing, when the header does not fit before the payload.
    #[test]
    fn prepend_no_room() {
        let dest = ip("198.19.1.2:53");
        let mut buf = [0xaau8; 16];
        assert_eq!(
            Format::Socks5.prepend(&mut buf, 9, &dest),
            Err(Error::NoRoom)
        );
        assert_eq!(
            Format::Shadowsocks.prepend(&mut buf, 6, &dest),
            Err(Error::NoRoom)
        );
        assert_eq!(
            Format::Socks5.prepend(&mut buf, 17, &dest),
            Err(Error::NoRoom)
        );
        assert_eq!(buf, [0xaa; 16]);
        assert_eq!(Format::Socks5.prepend(&mut buf, 10, &dest), Ok(0));
    }

    /// FRAG != 0 is reported as a fragment whatever follows; RSV is not checked (as for
    /// requests: curl, dante and microsocks do not check it either).
    #[test]
    fn fragments() {
        assert_eq!(Format::Socks5.parse(&[0, 0, 1]), Err(Error::Fragment(1)));
        let mut frag = V4.to_vec();
        frag[2] = 0x81;
        assert_eq!(Format::Socks5.parse(&frag), Err(Error::Fragment(0x81)));
        let mut rsv = V4.to_vec();
        rsv[0] = 0xff;
        assert!(Format::Socks5.parse(&rsv).is_ok());
    }

    /// Every proper prefix of a header is Truncated (never a panic, never "need more").
    #[test]
    fn truncated() {
        for golden in [V4, V6, NAME] {
            let header_len = Format::Socks5.parse(golden).unwrap().header_len;
            for n in 0..header_len {
                assert_eq!(
                    Format::Socks5.parse(&golden[..n]),
                    Err(Error::Truncated),
                    "{n}"
                );
                if n >= 3 {
                    let ss = Format::Shadowsocks.parse(&golden[3..n]);
                    assert_eq!(ss, Err(Error::Truncated), "{n}");
                }
            }
        }
    }

    /// Unknown ATYP, empty and non-UTF-8 names are address errors.
    #[test]
    fn bad_addresses() {
        let addr = |e| Err(Error::Addr(e));
        assert_eq!(
            Format::Socks5.parse(&[0, 0, 0, 2, 1]),
            addr(socks5::Error::AddrType(2))
        );
        assert_eq!(
            Format::Shadowsocks.parse(&[0]),
            addr(socks5::Error::AddrType(0))
        );
        assert_eq!(
            Format::Shadowsocks.parse(&[3, 0, 0, 53]),
            addr(socks5::Error::Domain)
        );
        let bad_utf8 = [3, 2, 0xc3, 0x28, 0, 53];
        assert_eq!(
            Format::Shadowsocks.parse(&bad_utf8),
            addr(socks5::Error::Domain)
        );
    }

    /// Every prefix of every golden datagram followed by every byte value parses or fails
    /// without panicking, in both formats.
    #[test]
    fn no_panic_on_prefixes() {
        for golden in [V4, V6, NAME] {
            for n in 0..=golden.len() {
                for b in 0..=255u8 {
                    let mut buf = golden[..n].to_vec();
                    buf.push(b);
                    for format in [Format::Socks5, Format::Shadowsocks] {
                        let _ = format.parse(&buf);
                        let _ = format.parse(&buf[1..]);
                    }
                }
            }
        }
    }

    /// Parsing and prepending do not allocate (a name is borrowed, headers are built on the
    /// stack and copied into the caller's buffer).
    #[test]
    fn no_allocation() {
        let dest = ip("[2001:db8:1:2::2]:443");
        let mut buf = [0u8; HEADROOM + 4];
        let allocs = crate::sys::alloc_count::during(|| {
            for golden in [V4, V6, NAME] {
                assert!(Format::Socks5.parse(golden).is_ok());
                assert!(Format::Shadowsocks.parse(&golden[3..]).is_ok());
            }
            assert!(Format::Socks5.prepend(&mut buf, HEADROOM, &dest).is_ok());
            assert!(Format::Shadowsocks
                .prepend(&mut buf, HEADROOM, &dest)
                .is_ok());
        });
        assert_eq!(allocs, 0);
    }
}
