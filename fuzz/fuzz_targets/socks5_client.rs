//! An upstream server's bytes as the SOCKS5 client sees them: method
//! selection, auth reply, then the CONNECT reply, pipelined in one buffer;
//! each parser also runs on the raw input.
#![no_main]

#[path = "common.rs"]
mod common;

use common::check;
use ksocks::socks5::{self, Dest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = check(data, socks5::parse_method_selection);
    let _ = check(data, socks5::parse_auth_reply);
    if let Ok(Some((reply, n))) = check(data, socks5::parse_reply) {
        if let Dest::Ip(bind) = reply.bind {
            // emit_reply is the inverse up to RSV, which the parser ignores.
            let mut sent = data[..n].to_vec();
            sent[2] = 0;
            assert_eq!(&*socks5::emit_reply(reply.rep, bind), &sent[..]);
        }
    }

    let mut at = 0;
    if let Ok(Some((method, n))) = check(data, socks5::parse_method_selection) {
        at += n;
        if method == socks5::METHOD_USER_PASS {
            if let Ok(Some((_, n))) = check(&data[at..], socks5::parse_auth_reply) {
                at += n;
            }
        }
        let _ = check(&data[at..], socks5::parse_reply);
    }
});
