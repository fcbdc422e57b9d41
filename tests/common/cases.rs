//! Byte-exactness case bodies shared by tests/transparent.rs (REDIRECT/TPROXY straight to the
//! server) and tests/proxy/ (through a proxy chain): each is generic over [`CaseCtx`], which
//! both files' `Ctx` implement. Where the two suites differ only in a size, a delay or a bound,
//! that is a parameter; the caller passes its own value.

use super::*;

/// What a shared case needs from the running setup.
pub trait CaseCtx {
    /// The server's listener on the case's port.
    fn listen(&self) -> TcpListener;
    /// A client connection to that port, through whatever the setup puts in between.
    fn connect(&self) -> TcpStream;
    /// The same, with `first` written the instant the connection opens.
    fn connect_with(&self, first: &[u8]) -> TcpStream;
    /// Waits for the close line of a connection with these byte counts and end reason.
    fn expect_close(&self, up: u64, down: u64, end: &str);
    /// Waits for a close line with one of `ends`; returns it.
    fn expect_end(&self, ends: &[&str]) -> String;
    /// Names the setup in measurement lines (empty, or starting with a space).
    fn label(&self) -> String {
        String::new()
    }
}

const MIB: u64 = 1024 * 1024;

/// Spawns the server side: accepts one connection (≤ 10 s) and runs `f` on it.
pub fn serve_one<T: Send + 'static>(
    l: TcpListener,
    f: impl FnOnce(TcpStream) -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    thread::spawn(move || {
        let s = accept_timeout(&l, Duration::from_secs(10)).expect("server accept");
        f(s)
    })
}

/// The client uploads `up` bytes and half-closes; the server replies `down` bytes only after
/// that FIN.
pub fn upload_then_reply<C: CaseCtx>(c: &mut C, up: u64, down: u64) {
    let srv = serve_one(c.listen(), move |mut s| {
        expect_stream(&mut s, 1, up, "server: upload");
        send_pattern(&mut s, 2, down, 64 * 1024).expect("server: reply");
    });
    let mut s = c.connect();
    send_all_and_shutdown(&mut s, 1, up);
    expect_stream(&mut s, 2, down, "client: reply");
    join(srv);
    drop(s);
    c.expect_close(up, down, "done");
}

/// The client half-closes; the server answers `delay` later and the connection is kept.
pub fn half_close_late_reply<C: CaseCtx>(c: &mut C, delay: Duration) {
    let srv = serve_one(c.listen(), move |mut s| {
        expect_stream(&mut s, 8, 65_536, "server: request");
        thread::sleep(delay);
        send_pattern(&mut s, 9, 65_536, 65_536).expect("server: late reply");
    });
    let mut s = c.connect();
    send_all_and_shutdown(&mut s, 8, 65_536);
    expect_stream(&mut s, 9, 65_536, "client: late reply");
    join(srv);
    drop(s);
    c.expect_close(65_536, 65_536, "done");
}

/// Tiny requests in lockstep, `rounds` of them, the first written the instant the connection
/// opens: right after connect, or with `pipelined` by [`CaseCtx::connect_with`] (for a SOCKS
/// client: in the same write as its greeting and request; the clock then starts before the
/// connect). The mean round trip must stay under `max_rtt`.
pub fn ping_pong_from_first_byte<C: CaseCtx>(
    c: &mut C,
    rounds: u64,
    max_rtt: Duration,
    pipelined: bool,
) {
    const SIZE: u64 = 16;
    let srv = serve_one(c.listen(), move |mut s| {
        s.set_nodelay(true).unwrap();
        for i in 0..rounds {
            let d = recv_exact_verify(&mut s, 100 + i, SIZE).expect("server: ping");
            Digest::of_pattern(100 + i, SIZE).assert_received(&d, "server: ping");
            send_pattern(&mut s, 10_000 + i, SIZE, SIZE as usize).expect("server: pong");
        }
        expect_eof(&mut s, "server: after pings");
    });
    let (t0, mut s) = if pipelined {
        let t0 = Instant::now();
        let s = c.connect_with(&Pattern::bytes(100, SIZE as usize));
        s.set_nodelay(true).unwrap();
        (t0, s)
    } else {
        let s = c.connect();
        s.set_nodelay(true).unwrap();
        (Instant::now(), s)
    };
    for i in 0..rounds {
        if !pipelined || i > 0 {
            send_pattern(&mut s, 100 + i, SIZE, SIZE as usize).expect("client: ping");
        }
        let d = recv_exact_verify(&mut s, 10_000 + i, SIZE).expect("client: pong");
        Digest::of_pattern(10_000 + i, SIZE).assert_received(&d, "client: pong");
    }
    let rtt = t0.elapsed() / rounds as u32;
    eprintln!(
        "ping-pong{}: {rounds} rounds of {SIZE} B, mean round trip {rtt:?}",
        c.label()
    );
    s.shutdown(Shutdown::Write).unwrap();
    expect_eof(&mut s, "client: end");
    join(srv);
    drop(s);
    c.expect_close(rounds * SIZE, rounds * SIZE, "done");
    // 40 ms per round would mean Nagle/delayed-ACK stalls in the relay.
    assert!(rtt < max_rtt, "ping-pong round trip {rtt:?}");
}

/// The server sends its answer and closes fully before the client closes.
pub fn server_closes_first<C: CaseCtx>(c: &mut C) {
    let srv = serve_one(c.listen(), |mut s| {
        let d = recv_exact_verify(&mut s, 10, 1024).expect("server: request");
        Digest::of_pattern(10, 1024).assert_received(&d, "server: request");
        send_pattern(&mut s, 11, MIB, 64 * 1024).expect("server: reply");
        drop(s);
    });
    let mut s = c.connect();
    send_pattern(&mut s, 10, 1024, 1024).expect("client: request");
    expect_stream(&mut s, 11, MIB, "client: reply");
    join(srv);
    // Linger a moment with our side still open: ksocks must not leak a half-dead pair.
    thread::sleep(Duration::from_millis(200));
    drop(s);
    c.expect_close(1024, MIB, "done");
}

/// The client resets (SO_LINGER 0) in the middle of an upload; the server sees the end (EOF
/// or reset: a proxy in between may turn it into a FIN) within a few seconds, and everything
/// it received is a correct prefix.
pub fn client_reset_mid_transfer<C: CaseCtx>(c: &mut C) {
    let srv = serve_one(c.listen(), |mut s| {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut v = Verifier::new(14);
        let mut buf = vec![0u8; 64 * 1024];
        let why = loop {
            match read_some(&mut s, &mut buf) {
                Ok(0) => break "eof",
                Ok(n) => v.update(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break "reset",
                Err(e) => panic!("server: after {} bytes: {e} (reset not passed on)", v.len()),
            }
        };
        (why, v.digest(), Instant::now())
    });
    let mut s = c.connect();
    send_pattern(&mut s, 14, 2 * MIB, 64 * 1024).expect("client: send");
    set_linger_zero(&s);
    drop(s);
    let t_reset = Instant::now();
    let (why, d, t_seen) = join(srv);
    assert_eq!(
        d.first_diff, None,
        "server received wrong bytes before the reset"
    );
    assert!(
        d.len <= 2 * MIB,
        "server got {} bytes, client sent {}",
        d.len,
        2 * MIB
    );
    let lag = t_seen.saturating_duration_since(t_reset);
    assert!(
        lag < Duration::from_secs(3),
        "server saw {why} {lag:?} after the reset"
    );
    c.expect_end(&["client-reset"]);
}
