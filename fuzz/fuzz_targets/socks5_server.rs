//! A client's bytes as the SOCKS5 server sees them: greeting, then an
//! RFC 1929 request, then the CONNECT request, pipelined in one buffer;
//! each parser also runs on the raw input.
#![no_main]

#[path = "common.rs"]
mod common;

use common::check;
use ksocks::socks5::{self, Cmd};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = check(data, socks5::parse_greeting);
    let _ = check(data, socks5::parse_auth_request);
    if let Ok(Some((req, n))) = check(data, socks5::parse_request) {
        if req.cmd == Cmd::Connect {
            // emit_connect is the inverse up to RSV, which the parser ignores.
            let mut sent = data[..n].to_vec();
            sent[2] = 0;
            assert_eq!(&*socks5::emit_connect(&req.dest), &sent[..]);
        }
    }

    let mut at = 0;
    if let Ok(Some((_, n))) = check(data, socks5::parse_greeting) {
        at += n;
        if let Ok(Some((_, n))) = check(&data[at..], socks5::parse_auth_request) {
            at += n;
        }
        let _ = check(&data[at..], socks5::parse_request);
    }
});
