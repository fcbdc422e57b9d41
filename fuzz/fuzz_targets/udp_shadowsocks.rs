//! A datagram as a shadowsocks server without encryption sends or receives it (address
//! header, then payload): the parser never panics, a verdict of "truncated" holds for every
//! prefix, a fragment is never reported (the format has no FRAG), and a parsed header is
//! rebuilt byte for byte by `prepend` in front of the payload, which is everything after it.
#![no_main]

use ksocks::udp::wire::{Error, Format, HEADROOM};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parsed = Format::Shadowsocks.parse(data);
    assert!(!matches!(parsed, Err(Error::Fragment(_)) | Err(Error::NoRoom)));
    if parsed == Err(Error::Truncated) {
        let half = Format::Shadowsocks.parse(&data[..data.len() / 2]);
        assert_eq!(half, Err(Error::Truncated));
    }
    let Ok(d) = parsed else { return };
    assert_eq!(d.payload, &data[d.header_len..]);
    let header = &data[..d.header_len];
    let cut = Format::Shadowsocks.parse(&header[..header.len() - 1]);
    assert_eq!(cut, Err(Error::Truncated));

    let dest = d.addr.to_dest();
    let mut buf = vec![0xa5u8; HEADROOM + d.payload.len()];
    buf[HEADROOM..].copy_from_slice(d.payload);
    let start = Format::Shadowsocks.prepend(&mut buf, HEADROOM, &dest).unwrap();
    assert_eq!(&buf[start..], data);
    // With RSV and FRAG in front it is the SOCKS5 datagram.
    let mut socks = vec![0, 0, 0];
    socks.extend_from_slice(data);
    let s = Format::Socks5.parse(&socks).unwrap();
    assert_eq!((s.addr, s.header_len), (d.addr, d.header_len + 3));
});
