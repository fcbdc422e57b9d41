//! Listening sockets and accepting from them: binding each kind of listener, taking the
//! listeners in and out of epoll (at `--max-conns`, and for a pause when descriptors run out),
//! reporting each descriptor-starvation episode once, and the reserve descriptor that
//! guarantees an accepted connection its upstream socket.
//!
//! Invariants: nothing spins on EMFILE (accepts pause for `FD_BACKOFF`); accepting resumes only
//! when a connection slot and the reserve descriptor are both available; one starvation
//! episode is one log line, however many pauses it takes.

use crate::cli::ListenerKind;
use crate::sys::{epoll, socket};
use crate::token::Token;
use crate::{error, info};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

/// How long to stop accepting after EMFILE/ENFILE.
const FD_BACKOFF: Duration = Duration::from_millis(100);
/// Descriptor starvation: how often a continuing episode is reported, and how long accepts
/// must go without running out before a new episode is logged as new.
const STARVE_REPORT: Duration = Duration::from_secs(30);
const STARVE_QUIET: Duration = Duration::from_secs(5);

pub struct Listener {
    pub fd: OwnedFd,
    pub kind: ListenerKind,
    pub addr: SocketAddr,
}

/// Binds one listener: `IPV6_V6ONLY` for IPv6 addresses, `IP_TRANSPARENT` for TPROXY.
pub fn bind_listener(kind: ListenerKind, addr: SocketAddr) -> io::Result<Listener> {
    let fd = socket::tcp_socket(&addr)?;
    let s = fd.as_fd();
    socket::set_int_opt(s, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if addr.is_ipv6() {
        socket::set_int_opt(s, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    if kind == ListenerKind::Tproxy {
        match addr {
            SocketAddr::V4(_) => socket::set_int_opt(s, libc::SOL_IP, libc::IP_TRANSPARENT, 1)?,
            SocketAddr::V6(_) => socket::set_int_opt(s, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1)?,
        }
    }
    socket::bind(s, &addr)?;
    socket::listen(s, libc::SOMAXCONN)?;
    let addr = socket::local_addr(s)?;
    Ok(Listener { fd, kind, addr })
}

pub fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// One episode of descriptor starvation: when it was last reported, its last pause, and the
/// pauses since the report.
struct Starving {
    reported: Instant,
    last: Instant,
    pauses: u64,
}

fn open_reserve() -> Option<OwnedFd> {
    std::fs::File::open("/dev/null").ok().map(OwnedFd::from)
}

pub struct Acceptor {
    pub listeners: Vec<Listener>,
    listening: bool,
    pub backoff_until: Option<Instant>,
    /// Set while descriptors run out; one episode is logged once, however many pauses it has.
    starving: Option<Starving>,
    /// A descriptor held back (/dev/null) so that an accepted connection can always get its
    /// upstream socket: when socket() says EMFILE, this one is closed and the call retried,
    /// and accepting stops until it can be opened again. `None` while it is spent.
    pub reserve: Option<OwnedFd>,
}

impl Acceptor {
    pub fn new(listeners: Vec<Listener>) -> Acceptor {
        Acceptor {
            listeners,
            listening: false,
            backoff_until: None,
            starving: None,
            reserve: open_reserve(),
        }
    }

    pub fn set_listening(&mut self, ep: &epoll::Epoll, on: bool) -> io::Result<()> {
        if self.listening == on {
            return Ok(());
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if on {
                ep.add(l.fd.as_fd(), Token::Listener(i).encode(), epoll::IN)?;
            } else {
                ep.delete(l.fd.as_fd())?;
            }
        }
        self.listening = on;
        Ok(())
    }

    /// Accepts the next connection on listener `li`; `None` when there is none now (or the
    /// descriptors ran out: accepting then pauses).
    pub fn accept(
        &mut self,
        ep: &epoll::Epoll,
        li: usize,
        open: usize,
    ) -> Option<(OwnedFd, SocketAddr)> {
        let l = self.listeners.get(li)?;
        loop {
            match socket::accept(l.fd.as_fd()) {
                Ok(conn) => {
                    self.end_starving();
                    return Some(conn);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if is_fd_exhaustion(&e) => {
                    self.starve(ep, &e, open);
                    return None;
                }
                // The client gave up before we accepted it; try the next one.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO)
                    ) => {}
                Err(e) => {
                    error!("accept on {}: {e}", l.addr);
                    return None;
                }
            }
        }
    }

    /// Out of descriptors: stop accepting for a moment instead of spinning on EMFILE. The
    /// first pause of an episode is logged; later ones only as a count every `STARVE_REPORT`.
    pub fn starve(&mut self, ep: &epoll::Epoll, e: &io::Error, open: usize) {
        let now = Instant::now();
        match &mut self.starving {
            None => {
                error!("out of file descriptors ({e}); pausing accepts, {open} connections open");
                self.starving = Some(Starving {
                    reported: now,
                    last: now,
                    pauses: 0,
                });
            }
            Some(s) => {
                s.last = now;
                s.pauses += 1;
                if now - s.reported >= STARVE_REPORT {
                    error!(
                        "still out of file descriptors: {} more pauses, {open} connections open",
                        s.pauses
                    );
                    s.reported = now;
                    s.pauses = 0;
                }
            }
        }
        let _ = self.set_listening(ep, false);
        self.backoff_until = Some(now + FD_BACKOFF);
    }

    /// An accept succeeded: the episode is over once none has failed for `STARVE_QUIET`.
    fn end_starving(&mut self) {
        if let Some(s) = &self.starving {
            if s.last.elapsed() >= STARVE_QUIET {
                info!("file descriptors available again; accepting");
                self.starving = None;
            }
        }
    }

    /// A connection closed or the back-off passed: accept again if there is room, the reserve
    /// descriptor can be had again, and no back-off is running.
    pub fn resume(&mut self, ep: &epoll::Epoll, room: bool) {
        if self.reserve.is_none() {
            self.reserve = open_reserve();
        }
        if !self.listening && room && self.reserve.is_some() && self.backoff_until.is_none() {
            let _ = self.set_listening(ep, true);
        }
    }

    /// Ends the back-off once it has run out.
    pub fn tick(&mut self, ep: &epoll::Epoll, now: Instant, room: bool) {
        if self.backoff_until.is_some_and(|t| now >= t) {
            self.backoff_until = None;
            self.resume(ep, room);
        }
    }
}
