//! One direction (src -> dst) of the userspace planes: `copy` (read/write through a bounded
//! buffer) or `splice` (splice(2) through a pipe, so bytes never enter userspace). The copy and
//! splice planes run two of these; sockmap runs them for what it moves in userspace.
//!
//! Invariants of a `Flow`:
//! - at most `cap` bytes are held (buffer or pipe); a full carrier stops reading src, so a slow
//!   reader slows the sender (TCP flow control) instead of growing memory;
//! - the buffer or pipe exists only while bytes are in it (`release`), so idle connections cost
//!   no memory beyond the struct;
//! - end of stream from src becomes `shutdown(dst, SHUT_WR)` only after every byte before it was
//!   written to dst; the other direction is independent and keeps flowing;
//! - a socket splice(2) refuses, or a pipe that cannot be made, turns this flow into a copy
//!   while it holds nothing, so the fallback loses no byte.

use crate::end::Broken;
use crate::sys::{self, socket};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// What holds a flow's bytes between src and dst. Either exists only while it holds bytes
/// (a pipe is kept until idle: making one costs syscalls), so `None` means "nothing held".
enum Carrier {
    Copy(Option<Buffer>),
    Splice(Option<Pipe>),
}

struct Buffer {
    buf: Box<[u8]>,
    /// Bytes `head..tail` are held.
    head: usize,
    tail: usize,
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes in the pipe.
    len: usize,
}

pub struct Flow {
    carrier: Carrier,
    cap: usize,
    /// src reached end of stream.
    pub eof: bool,
    /// `shutdown(dst, SHUT_WR)` was done: this direction is finished.
    pub shut: bool,
    /// The last read of src would have blocked: its receive queue was empty then.
    pub drained: bool,
    /// Bytes read from src / written to dst by this flow.
    pub read: u64,
    pub written: u64,
}

/// At most this many read/write rounds per readiness event, so one busy connection cannot
/// starve the others in the single-threaded loop.
const ROUNDS: usize = 8;

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Flow {
    pub fn copy(cap: usize) -> Flow {
        Flow::new(Carrier::Copy(None), cap)
    }

    pub fn splice(cap: usize) -> Flow {
        Flow::new(Carrier::Splice(None), cap)
    }

    fn new(carrier: Carrier, cap: usize) -> Flow {
        Flow {
            carrier,
            cap,
            eof: false,
            shut: false,
            drained: false,
            read: 0,
            written: 0,
        }
    }

    pub fn is_splice(&self) -> bool {
        matches!(self.carrier, Carrier::Splice(_))
    }

    /// Bytes held between src and dst.
    pub fn pending(&self) -> usize {
        match &self.carrier {
            Carrier::Copy(Some(b)) => b.tail - b.head,
            Carrier::Splice(Some(p)) => p.len,
            _ => 0,
        }
    }

    /// Whether src should be watched for readability.
    pub fn wants_read(&self) -> bool {
        !self.eof && self.pending() < self.cap
    }

    /// Whether dst should be watched for writability.
    pub fn wants_write(&self) -> bool {
        self.pending() > 0
    }

    /// Frees the buffer or pipe when it holds nothing.
    pub fn release(&mut self) {
        if self.pending() == 0 {
            self.carrier = match self.carrier {
                Carrier::Copy(_) => Carrier::Copy(None),
                Carrier::Splice(_) => Carrier::Splice(None),
            };
        }
    }

    /// Moves what can move now without blocking: drain to dst, refill from src, and pass on
    /// end of stream once drained. Returns whether anything happened.
    pub fn pump(&mut self, src: BorrowedFd, dst: BorrowedFd) -> Result<bool, Broken> {
        let mut progress = false;
        for _ in 0..ROUNDS {
            let wrote = self.flush(dst)?;
            progress |= wrote > 0;
            if self.pending() > 0 || self.eof {
                break; // dst is full (wait for EPOLLOUT) or src is finished
            }
            let got = self.fill(src)?;
            progress |= got > 0 || self.eof;
            if got == 0 {
                break;
            }
        }
        if self.eof && self.pending() == 0 && !self.shut {
            self.shut = true;
            progress = true;
            // ENOTCONN: dst is already gone; its own events will report that.
            if let Err(e) = socket::shutdown_write(dst) {
                if e.raw_os_error() != Some(libc::ENOTCONN) {
                    return Err(Broken::Dst(e));
                }
            }
        }
        if let Carrier::Copy(_) = self.carrier {
            self.release(); // pipes are kept until idle: creating one costs syscalls
        }
        Ok(progress)
    }

    /// Reads from src into the carrier; 0 means would block or end of stream (sets `eof`).
    fn fill(&mut self, src: BorrowedFd) -> Result<usize, Broken> {
        let res = match self.read_into_carrier(src)? {
            Some(res) => res,
            // splice(2) refused this socket, or no pipe could be made: copy from now on. The
            // carrier holds nothing, so switching loses no byte.
            None => {
                self.carrier = Carrier::Copy(None);
                self.read_into_carrier(src)?.unwrap_or(Ok(0))
            }
        };
        match res {
            Ok(0) => {
                self.eof = true;
                Ok(0)
            }
            Ok(n) => {
                self.read += n as u64;
                self.drained = false;
                Ok(n)
            }
            Err(e) if would_block(&e) => {
                self.drained = true;
                Ok(0)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(Broken::Src(e)),
        }
    }

    /// One read of src into the carrier, making the buffer or pipe first if there is none.
    /// `Ok(None)`: this splice carrier cannot carry src (EINVAL from splice(2) while the pipe
    /// is empty, or out of descriptors for a pipe).
    fn read_into_carrier(&mut self, src: BorrowedFd) -> Result<Option<io::Result<usize>>, Broken> {
        let cap = self.cap;
        match &mut self.carrier {
            Carrier::Copy(slot) => {
                let b = slot.get_or_insert_with(|| Buffer {
                    buf: vec![0u8; cap].into_boxed_slice(),
                    head: 0,
                    tail: 0,
                });
                if b.head == b.tail {
                    (b.head, b.tail) = (0, 0);
                }
                let res = socket::recv(src, &mut b.buf[b.tail..]);
                if let Ok(n) = res {
                    b.tail += n;
                }
                Ok(Some(res))
            }
            Carrier::Splice(slot) => {
                let p = match slot {
                    Some(p) => p,
                    None => match sys::pipe() {
                        Ok((read, write)) => slot.insert(Pipe {
                            read,
                            write,
                            len: 0,
                        }),
                        Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                            return Ok(None)
                        }
                        Err(e) => return Err(Broken::Src(e)),
                    },
                };
                let res = sys::splice(src, p.write.as_fd(), cap - p.len);
                match res {
                    Ok(n) => p.len += n,
                    Err(ref e) if p.len == 0 && e.raw_os_error() == Some(libc::EINVAL) => {
                        return Ok(None)
                    }
                    Err(_) => {}
                }
                Ok(Some(res))
            }
        }
    }

    /// Writes held bytes to dst; returns how many were written.
    fn flush(&mut self, dst: BorrowedFd) -> Result<usize, Broken> {
        let mut total = 0;
        loop {
            let res = match &mut self.carrier {
                Carrier::Copy(Some(b)) if b.tail > b.head => {
                    let res = socket::send(dst, &b.buf[b.head..b.tail]);
                    if let Ok(n) = res {
                        b.head += n;
                    }
                    res
                }
                Carrier::Splice(Some(p)) if p.len > 0 => {
                    let res = sys::splice(p.read.as_fd(), dst, p.len);
                    if let Ok(n) = res {
                        p.len -= n;
                    }
                    res
                }
                _ => break, // nothing held
            };
            match res {
                Ok(0) => break, // not expected with bytes held; never spin on it
                Ok(n) => {
                    self.written += n as u64;
                    total += n;
                }
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Broken::Dst(e)),
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    /// A connected loopback pair (a, b), both non-blocking.
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    /// Bytes move exactly, end of stream becomes a FIN, and the buffer is freed when drained.
    fn moves_bytes_then_fin(mut flow: Flow) {
        let (mut client, src) = pair();
        let (dst, mut server) = pair();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut sent = 0;
        let mut got = Vec::new();
        for _ in 0..100_000 {
            if sent < data.len() {
                if let Ok(n) = client.write(&data[sent..]) {
                    sent += n;
                }
            } else if !flow.eof {
                let _ = client.shutdown(std::net::Shutdown::Write);
            }
            flow.pump(src.as_fd(), dst.as_fd()).unwrap();
            let mut buf = [0u8; 65536];
            match server.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        assert!(flow.shut, "end of stream was not passed on");
        assert_eq!(got, data);
        assert_eq!(flow.read, data.len() as u64);
        assert_eq!(flow.written, data.len() as u64);
        flow.release();
        assert_eq!(flow.pending(), 0);
    }

    #[test]
    fn copy_moves_bytes_then_fin() {
        moves_bytes_then_fin(Flow::copy(4096));
    }

    #[test]
    fn splice_moves_bytes_then_fin() {
        moves_bytes_then_fin(Flow::splice(65536));
    }

    /// A full buffer stops reading: at most `cap` bytes are held while dst does not drain.
    #[test]
    fn full_buffer_stops_reading() {
        let (mut client, src) = pair();
        let (dst, _server) = pair();
        let mut flow = Flow::copy(1024);
        let chunk = vec![1u8; 1 << 20];
        for _ in 0..64 {
            let _ = client.write(&chunk);
            flow.pump(src.as_fd(), dst.as_fd()).unwrap();
        }
        assert!(flow.pending() <= 1024);
        assert!(!flow.wants_read() || flow.pending() < 1024);
        assert!(flow.read < 64 << 20, "sender was not held back");
    }

    /// A reset on the source is reported as `Broken::Src`.
    #[test]
    fn source_reset_is_reported() {
        let (client, src) = pair();
        let (dst, _server) = pair();
        socket::set_linger_zero(client.as_fd()).unwrap();
        drop(client);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut flow = Flow::copy(1024);
        assert!(matches!(
            flow.pump(src.as_fd(), dst.as_fd()),
            Err(Broken::Src(_))
        ));
    }
}
