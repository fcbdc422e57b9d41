//! A datagram as the SOCKS5 UDP relay sees it (RFC 1928 §7, either direction): the parser
//! never panics, FRAG != 0 is always a fragment, a verdict of "truncated" holds for every
//! prefix, and a parsed header is rebuilt byte for byte (but RSV, which it ignores) by
//! `prepend` in front of the payload, which is everything after it.
#![no_main]

use ksocks::udp::wire::{Error, Format, HEADROOM};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parsed = Format::Socks5.parse(data);
    match (data.get(2), &parsed) {
        (Some(&frag), _) if frag != 0 => assert_eq!(parsed, Err(Error::Fragment(frag))),
        (None, _) => assert_eq!(parsed, Err(Error::Truncated)),
        _ => {}
    }
    if parsed == Err(Error::Truncated) {
        assert_eq!(Format::Socks5.parse(&data[..data.len() / 2]), Err(Error::Truncated));
    }
    let Ok(d) = parsed else { return };
    assert_eq!(d.payload, &data[d.header_len..]);
    // The same bytes without RSV and FRAG are the shadowsocks datagram.
    let ss = Format::Shadowsocks.parse(&data[3..]).unwrap();
    assert_eq!((ss.addr, ss.header_len + 3, ss.payload), (d.addr, d.header_len, d.payload));
    // The header alone is a datagram with an empty payload; one byte less is truncated.
    let header = &data[..d.header_len];
    assert_eq!(Format::Socks5.parse(header).unwrap().addr, d.addr);
    let cut = Format::Socks5.parse(&header[..header.len() - 1]);
    assert_eq!(cut, Err(Error::Truncated));

    let dest = d.addr.to_dest();
    let mut buf = vec![0xa5u8; HEADROOM];
    let start = Format::Socks5.prepend(&mut buf, HEADROOM, &dest).unwrap();
    let mut sent = header.to_vec();
    sent[..2].fill(0);
    assert_eq!(&buf[start..], &sent[..]);
    assert_eq!(Format::Socks5.header_len(&dest), header.len());
});
