//! Shadowsocks with encryption off (`ssserver -m none` / `plain`): the
//! stream is one address header, ATYP, DST.ADDR, DST.PORT in exactly the
//! SOCKS5 encoding (shadowsocks.org "Protocol"), then the raw payload in
//! both directions. There is no reply; the server just starts relaying.
//!
//! The codec is the one in [`socks5`], so the two can never
//! drift apart. `parse_header` follows the same `Ok(None)` = need more
//! bytes convention and never panics.

use crate::socks5::{self, Dest, Msg, Parsed, MAX_ADDR_LEN};

/// Longest header: ATYP, LEN, 255 name bytes, PORT.
pub const MAX_HEADER_LEN: usize = MAX_ADDR_LEN;

/// Emit the header a client sends first. A domain name is sent as is, so
/// the shadowsocks server resolves it.
pub fn emit_header(dest: &Dest) -> Msg<MAX_HEADER_LEN> {
    socks5::encode_addr(dest)
}

/// Parse the header at the start of a server-side stream.
pub fn parse_header(buf: &[u8]) -> Parsed<Dest> {
    socks5::parse_addr(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socks5::Error;

    /// IPv4, IPv6 and domain headers have these golden bytes and parse back.
    #[test]
    fn golden_round_trip() {
        let cases: [(Dest, &[u8]); 3] = [
            (
                Dest::Ip("198.19.1.2:5001".parse().unwrap()),
                &[1, 198, 19, 1, 2, 0x13, 0x89],
            ),
            (
                Dest::Ip("[2001:db8:1:2::2]:443".parse().unwrap()),
                &[
                    4, 0x20, 1, 0x0d, 0xb8, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 2, 1, 0xbb,
                ],
            ),
            (
                Dest::Domain("a.test".into(), 80),
                &[3, 6, b'a', b'.', b't', b'e', b's', b't', 0, 80],
            ),
        ];
        for (dest, bytes) in cases {
            assert_eq!(&*emit_header(&dest), bytes);
            assert_eq!(parse_header(bytes), Ok(Some((dest, bytes.len()))));
            for n in 0..bytes.len() {
                assert_eq!(parse_header(&bytes[..n]), Ok(None), "prefix {n}");
            }
        }
    }

    /// Payload after the header is left for the relay.
    #[test]
    fn payload_not_consumed() {
        let buf = [1, 127, 0, 0, 1, 0, 80, b'G', b'E', b'T'];
        assert!(matches!(parse_header(&buf), Ok(Some((_, 7)))));
    }

    /// Unknown ATYP, empty and non-UTF-8 names are errors.
    #[test]
    fn errors() {
        assert_eq!(parse_header(&[0]), Err(Error::AddrType(0)));
        assert_eq!(parse_header(&[5, 1, 2]), Err(Error::AddrType(5)));
        assert_eq!(parse_header(&[3, 0]), Err(Error::Domain));
        assert_eq!(parse_header(&[3, 2, 0xc3, 0x28, 0, 1]), Err(Error::Domain));
    }

    /// A 255-byte name is the longest header and round-trips.
    #[test]
    fn max_header() {
        let dest = Dest::Domain("n".repeat(255), 1);
        let m = emit_header(&dest);
        assert_eq!(m.len(), MAX_HEADER_LEN);
        assert_eq!(parse_header(&m), Ok(Some((dest, MAX_HEADER_LEN))));
    }

    /// Every prefix of the longest header plus any next byte never panics.
    #[test]
    fn no_panic_on_prefixes() {
        let m = emit_header(&Dest::Domain("n".repeat(255), 1));
        for n in 0..=m.len() {
            for b in 0..=255u8 {
                let mut buf = m[..n].to_vec();
                buf.push(b);
                let _ = parse_header(&buf);
                let _ = parse_header(&buf[1..]);
            }
        }
    }
}
