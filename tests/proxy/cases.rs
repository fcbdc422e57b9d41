//! The bodies of the interop cases (`crate::cases::<case>`, named by `interop_cases!`): each
//! takes a running chain `Ctx`; the ones shared with other test crates are re-exported from
//! `common::cases`.

use crate::chains::Ctx;
use crate::common;
use crate::common::cases::{serve_one, CaseCtx};
use crate::common::*;
use crate::MIB;
use std::net::Shutdown;
use std::thread;
use std::time::Duration;

/// The client uploads and half-closes; the server replies only after that FIN.
pub fn upload_then_reply(c: &mut Ctx) {
    common::cases::upload_then_reply(c, 2 * MIB, MIB);
}

/// The client half-closes; the server answers 2 s later and the chain keeps the connection.
/// On tcsplice the pause is the handoff's: the half-closed client is asked for a packet by
/// a keepalive probe, which goes out a second late (tests/transparent.rs waits 2 s too).
pub fn half_close_late_reply(c: &mut Ctx) {
    common::cases::half_close_late_reply(c, Duration::from_secs(2));
}

/// The server sends a banner before the client says anything (it arrives right behind the
/// proxy handshake's last message).
pub fn server_speaks_first(c: &mut Ctx) {
    let srv = serve_one(c.listen(), |mut s| {
        send_pattern(&mut s, 3, 1000, 1000).expect("server: banner");
        let d = recv_exact_verify(&mut s, 4, 100).expect("server: request");
        Digest::of_pattern(4, 100).assert_received(&d, "server: request");
        send_pattern(&mut s, 5, 10_000, 10_000).expect("server: reply");
        expect_eof(&mut s, "server: after reply");
    });
    let mut s = c.connect();
    let d = recv_exact_verify(&mut s, 3, 1000).expect("client: banner");
    Digest::of_pattern(3, 1000).assert_received(&d, "client: banner");
    send_pattern(&mut s, 4, 100, 100).expect("client: request");
    let d = recv_exact_verify(&mut s, 5, 10_000).expect("client: reply");
    Digest::of_pattern(5, 10_000).assert_received(&d, "client: reply");
    s.shutdown(Shutdown::Write).unwrap();
    join(srv);
    expect_eof(&mut s, "client: end");
    drop(s);
    c.expect_close(100, 11_000, "done");
}

/// Tiny requests in lockstep, the first written the instant the connection opens (for a
/// SOCKS client: in the same write as its greeting and request).
pub fn ping_pong_from_first_byte(c: &mut Ctx) {
    common::cases::ping_pong_from_first_byte(c, 50, Duration::from_millis(30), true);
}

/// 4 MiB each way at the same time; each side closes only after it received everything
/// (so it also holds for peers that cannot half-close). After the handshake a chained
/// connection is on the same data plane as a direct one, whose large transfers
/// tests/transparent.rs covers; here the sizes only need to span many segments.
pub fn bidirectional_bulk(c: &mut Ctx) {
    let n = 4 * MIB;
    let srv = serve_one(c.listen(), move |s| {
        let mut w = s.try_clone().unwrap();
        let tx =
            thread::spawn(move || send_pattern(&mut w, 6, n, 256 * 1024).expect("server: send"));
        let mut r = s;
        let d = recv_exact_verify(&mut r, 7, n).expect("server: receive");
        Digest::of_pattern(7, n).assert_received(&d, "server: receive");
        join(tx);
        expect_eof(&mut r, "server: end");
    });
    let s = c.connect();
    let mut w = s.try_clone().unwrap();
    let tx = thread::spawn(move || send_pattern(&mut w, 7, n, 256 * 1024).expect("client: send"));
    let mut r = s;
    let d = recv_exact_verify(&mut r, 6, n).expect("client: receive");
    Digest::of_pattern(6, n).assert_received(&d, "client: receive");
    join(tx);
    r.shutdown(Shutdown::Write).unwrap();
    join(srv);
    expect_eof(&mut r, "client: end");
    drop(r);
    c.expect_close(n, n, "done");
}

pub use common::cases::server_closes_first;

pub use common::cases::client_reset_mid_transfer;
