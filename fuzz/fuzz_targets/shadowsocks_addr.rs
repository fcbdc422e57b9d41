//! The shadowsocks address header: parse, and emit must give back the
//! exact bytes consumed.
#![no_main]

#[path = "common.rs"]
mod common;

use common::check;
use ksocks::shadowsocks;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((dest, n))) = check(data, shadowsocks::parse_header) {
        assert_eq!(&*shadowsocks::emit_header(&dest), &data[..n]);
    }
});
