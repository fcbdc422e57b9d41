//! A connection's socket together with what epoll watches on it.
//!
//! Invariant: the registered mask always equals what was last asked for, and a socket that has
//! hung up (EPOLLHUP) and waits for nothing is not registered at all: level-triggered epoll
//! would otherwise report the hang-up for ever and spin the loop.

use crate::end::Side;
use crate::sys::epoll;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

pub struct Sock {
    pub fd: OwnedFd,
    /// Mask registered with epoll; `None` when not registered.
    registered: Option<u32>,
    /// EPOLLHUP was seen: both directions of this socket are shut, it will never report
    /// anything new, and keeping it registered would make level-triggered epoll spin.
    pub hup: bool,
}

impl Sock {
    pub fn new(fd: OwnedFd) -> Sock {
        Sock {
            fd,
            registered: None,
            hup: false,
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Brings the epoll registration in line with `mask`. A socket stays registered with an
    /// empty mask so that errors (EPOLLERR) are still reported, unless it has hung up.
    pub fn watch(&mut self, ep: &epoll::Epoll, token: u64, mask: u32) -> io::Result<()> {
        match self.registered {
            Some(_) if self.hup && mask == 0 => {
                ep.delete(self.fd())?;
                self.registered = None;
            }
            Some(current) if current != mask => {
                ep.modify(self.fd(), token, mask)?;
                self.registered = Some(mask);
            }
            None if !(self.hup && mask == 0) => {
                ep.add(self.fd(), token, mask)?;
                self.registered = Some(mask);
            }
            _ => {}
        }
        Ok(())
    }
}

/// The two sockets of a connection on a data plane, lent to the plane for one event.
pub struct Pair<'a> {
    pub client: &'a mut Sock,
    pub upstream: &'a mut Sock,
}

impl Pair<'_> {
    pub fn sock(&mut self, side: Side) -> &mut Sock {
        match side {
            Side::Client => self.client,
            Side::Upstream => self.upstream,
        }
    }

    /// (client, upstream) descriptors.
    pub fn fds(&self) -> (BorrowedFd<'_>, BorrowedFd<'_>) {
        (self.client.fd(), self.upstream.fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// Registration follows the mask, and a hung-up socket with nothing to wait for leaves
    /// epoll (level-triggered EPOLLHUP would otherwise spin the loop).
    #[test]
    fn watch_registers_and_leaves_on_hup() {
        let ep = epoll::Epoll::new(8).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let mut s = Sock::new(a.into());
        s.watch(&ep, 1, 0).unwrap();
        assert_eq!(
            s.registered,
            Some(0),
            "registered with no interest still reports errors"
        );
        s.watch(&ep, 1, epoll::IN).unwrap();
        assert_eq!(s.registered, Some(epoll::IN));
        s.hup = true;
        s.watch(&ep, 1, 0).unwrap();
        assert_eq!(s.registered, None);
        s.watch(&ep, 1, epoll::OUT).unwrap();
        assert_eq!(s.registered, Some(epoll::OUT));
    }
}
