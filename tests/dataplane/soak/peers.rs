//! Both ends of one soak connection, per `Kind`: the client follows its plan, the server reads
//! the connection id and plays the other side; every stream sent and received is recorded in
//! the ledger, every failure returned as a message.

use super::plan::*;
use super::{Expect, Soak};
use crate::common::*;
use crate::KIB;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

type R<T> = Result<T, String>;

/// Sends stream `k` of connection `id` (prefixed by `prefix`, e.g. the id) and records it.
fn tx(soak: &Soak, w: &mut TcpStream, id: u64, k: u64, len: u64, prefix: &[u8]) -> R<()> {
    let seed = stream_seed(soak.base, id, k);
    if !prefix.is_empty() {
        // The prefix and the first bytes go out in one write: "from the first byte".
        let first = len.min(64 * 1024) as usize;
        let mut b = prefix.to_vec();
        b.extend_from_slice(&Pattern::bytes(seed, first));
        w.write_all(&b)
            .map_err(|e| format!("stream {k}: first write: {e}"))?;
        let mut p = Pattern::new(seed);
        let mut skip = vec![0u8; first];
        p.fill(&mut skip);
        let mut h = StreamHash::default();
        h.update(&b[prefix.len()..]);
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = len - first as u64;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            p.fill(&mut buf[..n]);
            w.write_all(&buf[..n])
                .map_err(|e| format!("stream {k}: send after {} of {len}: {e}", len - left))?;
            h.update(&buf[..n]);
            left -= n as u64;
        }
        soak.sent(id, k, h.digest());
        return Ok(());
    }
    let d = send_pattern(w, seed, len, 64 * 1024)
        .map_err(|(e, n)| format!("stream {k}: send after {n} of {len}: {e}"))?;
    soak.sent(id, k, d);
    Ok(())
}

/// Receives stream `k`: exactly `len` bytes, then (if `eof`) EOF; verifies and records it.
fn rx(soak: &Soak, r: &mut TcpStream, id: u64, k: u64, len: u64, eof: bool) -> R<()> {
    let seed = stream_seed(soak.base, id, k);
    let max = if eof { len + 1 } else { len };
    let d = recv_verify(r, seed, max).map_err(|e| format!("stream {k}: {e}"))?;
    if let Some(off) = d.first_diff {
        return Err(format!("stream {k}: wrong byte at offset {off} of {len}"));
    }
    if d.len != len {
        return Err(format!("stream {k}: received {} of {len} bytes", d.len));
    }
    soak.received(id, k, d);
    Ok(())
}

fn expect_fin(r: &mut TcpStream, what: &str) -> R<()> {
    let mut b = [0u8; 1];
    match read_some(r, &mut b) {
        Ok(0) => Ok(()),
        Ok(_) => Err(format!("{what}: data where EOF was expected")),
        Err(e) => Err(format!("{what}: expected EOF: {e}")),
    }
}

fn shut(s: &TcpStream) -> R<()> {
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown(SHUT_WR): {e}"))
}

/// The client side of one planned connection. Returns the client's address and what the close
/// line must say.
pub(super) fn soak_client(soak: &Soak, topo_dst: SocketAddr, p: &Plan) -> R<(SocketAddr, Expect)> {
    let mut s = TcpStream::connect_timeout(&topo_dst, Duration::from_secs(5))
        .map_err(|e| format!("connect {topo_dst}: {e}"))?;
    with_timeouts(&s, IO_TIMEOUT);
    let local = s.local_addr().map_err(|e| format!("local_addr: {e}"))?;
    let id = p.id;
    let idb = id.to_le_bytes();
    let expect = match p.kind {
        Kind::UploadReply | Kind::HalfCloseDelay => {
            tx(soak, &mut s, id, S_UP, p.up, &idb)?;
            shut(&s)?;
            rx(soak, &mut s, id, S_DOWN, p.down, true)?;
            (Some(8 + p.up), Some(p.down), "done")
        }
        Kind::Banner => {
            let mut h = [0u8; 16];
            s.read_exact(&mut h)
                .map_err(|e| format!("banner header: {e}"))?;
            let bseed = u64::from_le_bytes(h[..8].try_into().unwrap());
            let blen = u64::from_le_bytes(h[8..].try_into().unwrap());
            if blen == 0 || blen > 64 * KIB {
                return Err(format!("banner header says {blen} bytes"));
            }
            let d = recv_verify(&mut s, bseed, blen).map_err(|e| format!("banner: {e}"))?;
            if d.len != blen || d.first_diff.is_some() {
                return Err(format!("banner: {d:?}, expected {blen} bytes"));
            }
            // The server records the banner under the connection id once it knows it.
            soak.received(id, S_BANNER, d);
            s.write_all(&idb).map_err(|e| format!("id: {e}"))?;
            rx(soak, &mut s, id, S_DOWN, p.down, true)?;
            shut(&s)?;
            (Some(8), Some(16 + blen + p.down), "done")
        }
        Kind::PingPong => {
            s.set_nodelay(true).unwrap();
            let (mut up, mut down) = (8, 0);
            for (r, &(ping, pong)) in p.rounds.iter().enumerate() {
                let k = S_PING + 2 * r as u64;
                tx(soak, &mut s, id, k, ping, if r == 0 { &idb } else { &[] })?;
                rx(soak, &mut s, id, k + 1, pong, false)?;
                up += ping;
                down += pong;
            }
            shut(&s)?;
            expect_fin(&mut s, "client: after the last pong")?;
            (Some(up), Some(down), "done")
        }
        Kind::Bidirectional => {
            let mut w = s.try_clone().map_err(|e| format!("clone: {e}"))?;
            let (up, base) = (p.up, soak.base);
            // The writer only needs the seed; it returns its digest for the ledger.
            let writer = thread::spawn(move || -> R<Digest> {
                let seed = stream_seed(base, id, S_UP);
                w.write_all(&idb).map_err(|e| format!("id: {e}"))?;
                let d = send_pattern(&mut w, seed, up, 64 * 1024)
                    .map_err(|(e, n)| format!("stream 0: send after {n} of {up}: {e}"))?;
                shut(&w)?;
                Ok(d)
            });
            let r = rx(soak, &mut s, id, S_DOWN, p.down, true);
            let w = writer
                .join()
                .map_err(|_| "client writer panicked".to_string())?;
            soak.sent(id, S_UP, w?);
            r?;
            (Some(8 + p.up), Some(p.down), "done")
        }
        Kind::ServerClosesFirst => {
            tx(soak, &mut s, id, S_UP, p.up, &idb)?;
            rx(soak, &mut s, id, S_DOWN, p.down, true)?;
            thread::sleep(p.delay / 10);
            (Some(8 + p.up), Some(p.down), "done")
        }
        Kind::ClientReset => {
            s.write_all(&idb).map_err(|e| format!("id: {e}"))?;
            // The server acknowledges the id, so the reset hits an established relay.
            let mut ack = [0u8; 1];
            s.read_exact(&mut ack).map_err(|e| format!("ack: {e}"))?;
            if ack[0] != 0x06 {
                return Err(format!("ack byte {:#x}", ack[0]));
            }
            let seed = stream_seed(soak.base, id, S_UP);
            send_pattern(&mut s, seed, p.reset_after, 64 * 1024)
                .map_err(|(e, n)| format!("send before the reset, after {n}: {e}"))?;
            set_linger_zero(&s);
            (None, None, "client-reset")
        }
        Kind::Tiny => {
            let b = Pattern::bytes(stream_seed(soak.base, id, S_UP), 1)[0];
            s.write_all(&[b]).map_err(|e| format!("tiny: {e}"))?;
            shut(&s)?;
            let mut got = [0u8; 1];
            s.read_exact(&mut got)
                .map_err(|e| format!("tiny reply: {e}"))?;
            if got[0] != b ^ 0xA5 {
                return Err(format!(
                    "tiny reply {:#x}, expected {:#x}",
                    got[0],
                    b ^ 0xA5
                ));
            }
            expect_fin(&mut s, "client: after the tiny reply")?;
            (Some(1), Some(1), "done")
        }
    };
    drop(s);
    Ok((local, expect))
}

/// The server side of one accepted connection on `port`.
pub(super) fn soak_server(soak: &Soak, mut s: TcpStream, port: u16) -> R<()> {
    if port == TINY_PORT {
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .map_err(|e| format!("tiny server: {e}"))?;
        expect_fin(&mut s, "tiny server: after its byte")?;
        s.write_all(&[b[0] ^ 0xA5])
            .map_err(|e| format!("tiny server: reply: {e}"))?;
        return shut(&s);
    }
    let mut banner = None;
    if port == BANNER_PORT {
        let n = soak.banner_ctr.fetch_add(1, Ordering::Relaxed);
        let bseed = stream_seed(soak.base, u64::MAX - n, S_BANNER);
        let blen = Rng(bseed).log_uniform(64 * KIB);
        let mut b = Vec::with_capacity(16 + blen as usize);
        b.extend_from_slice(&bseed.to_le_bytes());
        b.extend_from_slice(&blen.to_le_bytes());
        b.extend_from_slice(&Pattern::bytes(bseed, blen as usize));
        s.write_all(&b).map_err(|e| format!("banner: {e}"))?;
        let mut h = StreamHash::default();
        h.update(&b[16..]);
        banner = Some(h.digest());
    }
    let mut idb = [0u8; 8];
    s.read_exact(&mut idb)
        .map_err(|e| format!("server: reading a connection id: {e}"))?;
    let id = u64::from_le_bytes(idb);
    let Some(p) = soak.plans.get(id as usize) else {
        return Err(format!("server: unknown connection id {id:#x}"));
    };
    let ctx = |e: String| format!("{} (server): {e}", p.describe());
    if let Some(d) = banner {
        soak.sent(id, S_BANNER, d);
    }
    let mut run = || -> R<()> {
        match p.kind {
            Kind::UploadReply | Kind::HalfCloseDelay => {
                rx(soak, &mut s, id, S_UP, p.up, true)?;
                if p.kind == Kind::HalfCloseDelay {
                    thread::sleep(p.delay);
                }
                tx(soak, &mut s, id, S_DOWN, p.down, &[])?;
                shut(&s)
            }
            Kind::Banner => {
                tx(soak, &mut s, id, S_DOWN, p.down, &[])?;
                shut(&s)?;
                expect_fin(&mut s, "server: after the download")
            }
            Kind::PingPong => {
                s.set_nodelay(true).unwrap();
                for (r, &(ping, pong)) in p.rounds.iter().enumerate() {
                    let k = S_PING + 2 * r as u64;
                    rx(soak, &mut s, id, k, ping, false)?;
                    tx(soak, &mut s, id, k + 1, pong, &[])?;
                }
                expect_fin(&mut s, "server: after the last ping")?;
                shut(&s)
            }
            Kind::Bidirectional => {
                let mut w = s.try_clone().map_err(|e| format!("clone: {e}"))?;
                let (down, seed) = (p.down, stream_seed(soak.base, id, S_DOWN));
                let writer = thread::spawn(move || -> R<Digest> {
                    let d = send_pattern(&mut w, seed, down, 64 * 1024)
                        .map_err(|(e, n)| format!("stream 1: send after {n} of {down}: {e}"))?;
                    shut(&w)?;
                    Ok(d)
                });
                let r = rx(soak, &mut s, id, S_UP, p.up, true);
                let w = writer
                    .join()
                    .map_err(|_| "server writer panicked".to_string())?;
                soak.sent(id, S_DOWN, w?);
                r
            }
            Kind::ServerClosesFirst => {
                rx(soak, &mut s, id, S_UP, p.up, false)?;
                tx(soak, &mut s, id, S_DOWN, p.down, &[])?;
                Ok(()) // dropped: a full close while the client's side is still open
            }
            Kind::ClientReset => {
                s.write_all(&[0x06]).map_err(|e| format!("ack: {e}"))?;
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut v = Verifier::new(stream_seed(soak.base, id, S_UP));
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match read_some(&mut s, &mut buf) {
                        Ok(0) => {
                            return Err(format!(
                                "EOF instead of the client's reset after {} bytes",
                                v.len()
                            ))
                        }
                        Ok(n) => v.update(&buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                        Err(e) => {
                            return Err(format!(
                                "after {} bytes: {e} (the reset was not passed on)",
                                v.len()
                            ))
                        }
                    }
                }
                let d = v.digest();
                if d.first_diff.is_some() || d.len > p.reset_after {
                    return Err(format!(
                        "before the reset: {d:?}, client sent {}",
                        p.reset_after
                    ));
                }
                Ok(())
            }
            Kind::Tiny => Err("tiny connection on the main port".into()),
        }
    };
    run().map_err(ctx)
}
