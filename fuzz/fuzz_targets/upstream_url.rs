//! `--upstream` URLs: never panic; what parses prints back to a URL that
//! parses the same (except credentials, which Display redacts).
#![no_main]

use ksocks::upstream::{self, Upstream};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(url) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(up) = upstream::parse(url) else { return };
    let shown = up.to_string();
    if !matches!(up, Upstream::Socks5 { auth: Some(_), .. }) {
        assert_eq!(upstream::parse(&shown), Ok(up), "{shown}");
    }
});
