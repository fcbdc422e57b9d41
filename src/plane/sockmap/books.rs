//! The sockmap plane's books for one direction src -> dst: what the kernel received, moved
//! and queued, read from counters the kernel keeps (KERNEL-NOTES s.1, s.3, s.6).
//!
//! - `received` = `tcpi_bytes_received(src)`, less a received FIN and the handshake's bytes;
//! - `kern` = bytes the verdict program redirected from src (BPF `counters` map);
//! - `entered` = `tcpi_bytes_acked(dst) + SIOCOUTQ(dst)` less its value at pairing: bytes
//!   that reached dst's send queue since.
//!
//! Invariant: every counter only grows, and they are read in causal order (what entered dst
//! was redirected before; what was redirected was received before), so `entered <= given`
//! and `kern <= received` hold unless the kernel misbehaved. A value that cannot be read
//! exactly is read as a lower bound, which can only delay a FIN or a resume, never pass one
//! on early and never look like a duplication. No subtraction may wrap: a counter below its
//! base is reported as broken accounting.

use super::kernel::Kernel;
use crate::debug;
use crate::sys::socket;
use std::io;
use std::os::fd::BorrowedFd;

/// Tries at pairing to read dst's send-queue total exactly. Each failed try means an ACK
/// moved `snd_una` between the reads; the bytes ksocks wrote before pairing are acknowledged
/// after a few ACKs at most, so the reading settles; if it does not, the connection goes on
/// the copy plane instead.
const BASE_TRIES: usize = 64;
/// A poll's tries for an exact reading before it settles for the lower bound.
const BOOKS_TRIES: usize = 3;

/// Every byte that ever entered a socket's send queue: `tcpi_bytes_acked + SIOCOUTQ`, i.e.
/// `write_seq` less a constant.
///
/// The two values come from two syscalls, and an ACK can land between them (issue 15: on a
/// slow CPU an ACK of the SOCKS reply skewed the sum by 10 and reset healthy connections).
/// - `SIOCOUTQ` is `READ_ONCE(tp->write_seq) - tp->snd_una`, read without the socket lock
///   (`tcp_ioctl`, net/ipv4/tcp.c).
/// - `tcpi_bytes_acked` is `tp->bytes_acked`, read under `lock_sock_fast` (`tcp_get_info`,
///   net/ipv4/tcp.c); `tcp_snd_una_update` (net/ipv4/tcp_input.c) advances it by exactly the
///   bytes `snd_una` moves, in the same section under the socket lock.
///
/// So `bytes_acked - snd_una` is constant and both only grow. Reading acked (a1), then
/// SIOCOUTQ, then acked again (a2): if a1 == a2, snd_una did not move in between, and
/// a1 + outq is `write_seq` at the SIOCOUTQ read, less that constant: exact. If a2 > a1, an
/// ACK came in between; a1 + outq is still a lower bound (snd_una only grows), never more
/// than what entered the queue.
///
/// One `TCP_INFO` cannot give the sum: it reports bytes in flight only as segments
/// (`tcpi_unacked`), and `tcpi_bytes_sent` counts retransmissions (and needs Linux 4.19).
pub enum SendTotal {
    Exact(u64),
    AtLeast(u64),
}

impl SendTotal {
    pub fn read(fd: BorrowedFd) -> io::Result<SendTotal> {
        Ok(SendTotal::read_with_outq(fd)?.0)
    }

    /// The total and the `SIOCOUTQ` read for it.
    pub fn read_with_outq(fd: BorrowedFd) -> io::Result<(SendTotal, u64)> {
        let a1 = socket::tcp_bytes(fd)?.acked;
        let outq = socket::outq(fd)? as u64;
        let a2 = socket::tcp_bytes(fd)?.acked;
        let total = if a1 == a2 {
            SendTotal::Exact(a1 + outq)
        } else {
            SendTotal::AtLeast(a1 + outq)
        };
        Ok((total, outq))
    }

    /// An exact reading, or why none could be had (the caller falls back).
    pub fn exact(id: u64, fd: BorrowedFd) -> Result<u64, String> {
        for _ in 0..BASE_TRIES {
            match SendTotal::read(fd).map_err(|e| format!("send queue counters: {e}"))? {
                SendTotal::Exact(n) => return Ok(n),
                SendTotal::AtLeast(_) => debug!(
                    "#{id}: pairing: an ACK changed the counters while reading the send queue; reading again"
                ),
            }
        }
        Err("send queue counters kept changing while read".into())
    }

    pub fn at_least(&self) -> u64 {
        match *self {
            SendTotal::Exact(n) | SendTotal::AtLeast(n) => n,
        }
    }
}

/// A direction's counters at pairing.
#[derive(Clone, Copy, Debug)]
pub struct Bases {
    /// dst's exact `SendTotal` when the plane started.
    pub sent: u64,
    /// Bytes src received that a handshake consumed before pairing (not the flow's).
    pub received: u64,
}

/// The kernel's view of one direction.
pub struct Books {
    /// Data bytes src received since pairing (its FIN not counted).
    pub received: u64,
    pub src_fin: bool,
    pub kern: u64,
    pub entered: u64,
    /// dst's send queue (`SIOCOUTQ`) when `entered` was read.
    pub outq: u64,
}

/// Why the books could not be read.
pub enum BooksError {
    Io(io::Error),
    /// A counter fell below its value at pairing: the kernel's numbers cannot be trusted.
    Broken(String),
}

impl From<io::Error> for BooksError {
    fn from(e: io::Error) -> BooksError {
        BooksError::Io(e)
    }
}

/// Reads the books of the direction `names` = (from, to) of connection `id`.
pub fn read(
    id: u64,
    names: (&str, &str),
    kernel: &Kernel,
    (src, dst): (BorrowedFd, BorrowedFd),
    cookie: u64,
    bases: Bases,
) -> Result<Books, BooksError> {
    let (from, to) = names;
    let (mut total, mut outq) = SendTotal::read_with_outq(dst)?;
    for _ in 1..BOOKS_TRIES {
        let SendTotal::AtLeast(_) = total else { break };
        debug!("#{id}: {from} -> {to}: an ACK changed the counters while reading the send queue; reading again");
        (total, outq) = SendTotal::read_with_outq(dst)?;
    }
    let kern = kernel.forwarded(cookie);
    // `tcp_get_info` reads the state before taking the socket lock and `bytes_received`
    // under it, and `tcp_data_queue` (net/ipv4/tcp_input.c) advances `rcv_nxt` (and
    // `bytes_received`) for a FIN before `tcp_fin` moves the state, in one locked section: a
    // state that shows the FIN comes with a count that includes it. The reverse (a FIN that
    // arrives between the two reads) counts it as one more pending byte until the next poll.
    let s = socket::tcp_bytes(src)?;
    // A received FIN counts one in bytes_received. CLOSE is a FIN after our own (the timewait
    // socket took over) unless a reset left an error, which is the peer's reset.
    let closed = s.state == socket::tcp_state::CLOSE;
    if closed && socket::take_error(src)?.is_some() {
        return Err(io::Error::from(io::ErrorKind::ConnectionReset).into());
    }
    let src_fin = closed || socket::tcp_state::fin_received(s.state);
    let received = s
        .received
        .checked_sub(src_fin as u64 + bases.received)
        .ok_or_else(|| {
            BooksError::Broken(format!(
                "received {} less than the handshake's {} and FIN {}",
                s.received, bases.received, src_fin as u8
            ))
        })?;
    let entered = match total {
        SendTotal::Exact(n) => n.checked_sub(bases.sent).ok_or_else(|| {
            BooksError::Broken(format!(
                "send queue total {n} below its value at pairing {}",
                bases.sent
            ))
        })?,
        // A lower bound may be below the base when nothing new entered.
        SendTotal::AtLeast(n) => n.saturating_sub(bases.sent),
    };
    Ok(Books {
        received,
        src_fin,
        kern,
        entered,
        outq,
    })
}
