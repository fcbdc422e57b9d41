//! Deterministic traffic: a seeded byte pattern both ends can generate, a streaming hash and
//! digest that locate the first wrong byte, and the send/receive helpers every test uses to
//! prove a transfer exact.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};

// ---------------------------------------------------------------------------------------------
// Deterministic traffic

/// A deterministic byte stream: xorshift64* words, little-endian, seeded. Both ends generate
/// the same stream, so a receiver can locate the first wrong byte without storing anything.
pub struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        // Spread small seeds and never start at 0 (a fixed point of xorshift).
        let state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
        Pattern {
            state: if state == 0 { 1 } else { state },
            word: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes()
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while self.used < 8 && i < buf.len() {
            buf[i] = self.word[self.used];
            self.used += 1;
            i += 1;
        }
        let rest = &mut buf[i..];
        let mut chunks = rest.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_word());
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            self.word = self.next_word();
            let k = tail.len();
            tail.copy_from_slice(&self.word[..k]);
            self.used = k;
        }
    }

    /// The first `len` bytes of the stream for `seed`.
    pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        Pattern::new(seed).fill(&mut v);
        v
    }
}

/// A 64-bit hash over a byte stream, independent of how the stream is chunked.
#[derive(Clone)]
pub struct StreamHash {
    h: u64,
    word: [u8; 8],
    used: usize,
    len: u64,
}

impl Default for StreamHash {
    fn default() -> Self {
        StreamHash {
            h: 0xCBF2_9CE4_8422_2325,
            word: [0; 8],
            used: 0,
            len: 0,
        }
    }
}

impl StreamHash {
    fn mix(&mut self, w: u64) {
        self.h = (self.h ^ w)
            .wrapping_mul(0x0000_0100_0000_01B3)
            .rotate_left(29);
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        while self.used != 0 && !data.is_empty() {
            self.word[self.used] = data[0];
            self.used = (self.used + 1) % 8;
            data = &data[1..];
            if self.used == 0 {
                let w = u64::from_le_bytes(self.word);
                self.mix(w);
            }
        }
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            self.mix(u64::from_le_bytes(c.try_into().unwrap()));
        }
        for &b in chunks.remainder() {
            self.word[self.used] = b;
            self.used += 1;
        }
    }

    pub fn digest(&self) -> Digest {
        let mut h = self.clone();
        let mut w = [0u8; 8];
        w[..h.used].copy_from_slice(&h.word[..h.used]);
        h.mix(u64::from_le_bytes(w) ^ (h.used as u64) << 56);
        h.mix(h.len);
        Digest {
            len: self.len,
            hash: h.h,
            first_diff: None,
        }
    }
}

/// What one end saw of a stream: its length, its hash, and (receiver side) the offset of the
/// first byte that differs from the expected pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Digest {
    pub len: u64,
    pub hash: u64,
    pub first_diff: Option<u64>,
}

impl Digest {
    /// The digest of the first `len` bytes of the pattern for `seed`.
    pub fn of_pattern(seed: u64, len: u64) -> Digest {
        let mut p = Pattern::new(seed);
        let mut h = StreamHash::default();
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            p.fill(&mut buf[..k]);
            h.update(&buf[..k]);
            left -= k as u64;
        }
        h.digest()
    }

    /// Panics with a precise message unless `received` matches `self` (the sent digest).
    pub fn assert_received(&self, received: &Digest, what: &str) {
        if self.len == received.len && self.hash == received.hash && received.first_diff.is_none() {
            return;
        }
        let diff = match received.first_diff {
            Some(off) => format!("first differing byte at offset {off}"),
            None if received.len < self.len => {
                format!(
                    "received a correct prefix, {} bytes missing",
                    self.len - received.len
                )
            }
            None if received.len > self.len => {
                format!(
                    "{} extra bytes after the expected end",
                    received.len - self.len
                )
            }
            None => "hash differs (no differing offset found?)".into(),
        };
        panic!(
            "{what}: sent {} bytes hash {:016x}, received {} bytes hash {:016x}: {diff}",
            self.len, self.hash, received.len, received.hash
        );
    }
}

/// Checks received bytes against the pattern for `seed` as they arrive.
pub struct Verifier {
    expected: Pattern,
    hash: StreamHash,
    first_diff: Option<u64>,
    scratch: Vec<u8>,
}

impl Verifier {
    pub fn new(seed: u64) -> Verifier {
        Verifier {
            expected: Pattern::new(seed),
            hash: StreamHash::default(),
            first_diff: None,
            scratch: Vec::new(),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        if self.first_diff.is_none() {
            self.scratch.resize(data.len(), 0);
            self.expected.fill(&mut self.scratch);
            if self.scratch[..] != *data {
                let i = data
                    .iter()
                    .zip(&self.scratch)
                    .position(|(a, b)| a != b)
                    .unwrap();
                self.first_diff = Some(self.hash.len + i as u64);
            }
        }
        self.hash.update(data);
    }

    pub fn len(&self) -> u64 {
        self.hash.len
    }

    pub fn digest(&self) -> Digest {
        Digest {
            first_diff: self.first_diff,
            ..self.hash.digest()
        }
    }
}

/// Writes `len` bytes of the pattern for `seed` to `w` in chunks of up to `chunk` bytes.
/// Returns the digest of what was written (on error: the error and the bytes written so far).
pub fn send_pattern(
    w: &mut impl Write,
    seed: u64,
    len: u64,
    chunk: usize,
) -> Result<Digest, (io::Error, u64)> {
    let mut p = Pattern::new(seed);
    let mut h = StreamHash::default();
    let mut buf = vec![0u8; chunk.max(1)];
    let mut left = len;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..k]);
        if let Err(e) = w.write_all(&buf[..k]) {
            return Err((e, h.len));
        }
        h.update(&buf[..k]);
        left -= k as u64;
    }
    Ok(h.digest())
}

/// Reads from `r` until EOF (or `max` bytes), verifying against the pattern for `seed`.
pub fn recv_verify(r: &mut impl Read, seed: u64, max: u64) -> io::Result<Digest> {
    let mut v = Verifier::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    while v.len() < max {
        let k = (max - v.len()).min(buf.len() as u64) as usize;
        match r.read(&mut buf[..k]) {
            Ok(0) => break,
            Ok(n) => v.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("read after {} bytes: {e}", v.len()),
                ))
            }
        }
    }
    Ok(v.digest())
}

/// Reads exactly `len` bytes (not waiting for EOF) and verifies them against `seed`.
pub fn recv_exact_verify(r: &mut impl Read, seed: u64, len: u64) -> io::Result<Digest> {
    let d = recv_verify(r, seed, len)?;
    if d.len < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("EOF after {} of {len} bytes", d.len),
        ));
    }
    Ok(d)
}

/// Sends the pattern and half-closes; panics on error.
pub fn send_all_and_shutdown(s: &mut TcpStream, seed: u64, len: u64) -> Digest {
    let d = send_pattern(s, seed, len, 64 * 1024)
        .unwrap_or_else(|(e, n)| panic!("send after {n} bytes: {e}"));
    s.shutdown(Shutdown::Write).expect("shutdown(SHUT_WR)");
    d
}

/// Reads until EOF and asserts it saw exactly `len` bytes of the pattern for `seed`.
pub fn expect_stream(s: &mut TcpStream, seed: u64, len: u64, what: &str) {
    let got = recv_verify(s, seed, len + 1).unwrap_or_else(|e| panic!("{what}: {e}"));
    Digest::of_pattern(seed, len).assert_received(&got, what);
}

/// One `read`, retried when a signal interrupts it (reads with SO_RCVTIMEO are never restarted
/// by the kernel, so any stray signal or freezer wake-up surfaces as EINTR).
pub fn read_some(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut tries = 0;
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted && tries < 100 => tries += 1,
            other => return other,
        }
    }
}

/// Expects EOF (or a reset) within the stream's read timeout, no data.
pub fn expect_eof(s: &mut TcpStream, what: &str) {
    let mut b = [0u8; 1];
    match read_some(s, &mut b) {
        Ok(0) => {}
        Ok(_) => panic!("{what}: expected EOF, got data"),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: expected EOF, got {e}"),
    }
}
