//! Level-triggered epoll: one instance, interest keyed by a caller-chosen `u64` token.

use super::{owned, syscall};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

pub const IN: u32 = libc::EPOLLIN as u32;
pub const OUT: u32 = libc::EPOLLOUT as u32;
pub const RDHUP: u32 = libc::EPOLLRDHUP as u32;
pub const ERR: u32 = libc::EPOLLERR as u32;
pub const HUP: u32 = libc::EPOLLHUP as u32;

pub struct Epoll {
    fd: OwnedFd,
    raw: Vec<libc::epoll_event>,
}

/// One readiness report: the token given at registration and the `EPOLL*` bits.
#[derive(Clone, Copy, Debug)]
pub struct Event {
    pub token: u64,
    pub events: u32,
}

impl Epoll {
    /// `capacity` bounds how many events one `wait` returns.
    pub fn new(capacity: usize) -> io::Result<Epoll> {
        // SAFETY: plain integer argument.
        let fd = unsafe { syscall!(epoll_create1(libc::EPOLL_CLOEXEC))? };
        let raw = vec![libc::epoll_event { events: 0, u64: 0 }; capacity];
        Ok(Epoll { fd: owned(fd), raw })
    }

    fn ctl(&self, op: libc::c_int, fd: BorrowedFd, token: u64, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        let epfd = self.fd.as_raw_fd();
        // SAFETY: `ev` is a valid epoll_event; the kernel only reads it.
        unsafe { syscall!(epoll_ctl(epfd, op, fd.as_raw_fd(), &mut ev))? };
        Ok(())
    }

    pub fn add(&self, fd: BorrowedFd, token: u64, events: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, events)
    }

    pub fn modify(&self, fd: BorrowedFd, token: u64, events: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, token, events)
    }

    pub fn delete(&self, fd: BorrowedFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Waits up to `timeout_ms` (-1 = for ever) and fills `out` with what is ready.
    pub fn wait(&mut self, out: &mut Vec<Event>, timeout_ms: i32) -> io::Result<()> {
        let (raw, cap) = (self.raw.as_mut_ptr(), self.raw.len() as libc::c_int);
        // SAFETY: `raw` points to a writable array of `cap` epoll_event structs.
        let n = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), raw, cap, timeout_ms) };
        out.clear();
        if n == -1 {
            let err = io::Error::last_os_error();
            return if err.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(err)
            };
        }
        // Copy the fields out: on some architectures epoll_event is packed.
        out.extend(self.raw[..n as usize].iter().map(|e| Event {
            token: e.u64,
            events: e.events,
        }));
        Ok(())
    }
}

impl AsFd for Epoll {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
