//! Name resolution for SOCKS5 domain-name requests, off the event loop.
//!
//! One resolver thread runs the system resolver (`getaddrinfo` via `ToSocketAddrs`: /etc/hosts,
//! /etc/resolv.conf, nsswitch, exactly as every other program on the router resolves) and
//! hands results back through a queue plus one byte on a pipe that the event loop watches.
//! Chosen over an in-process DNS client: ~60 lines instead of ~400, and no second, subtly
//! different resolver to audit. The cost: lookups are answered one at a time, so one slow
//! name delays the others queued behind it (each is bounded by the resolver's own timeout).
//! The thread is never on the data path; it touches no socket of a connection.

use crate::sys;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// One finished lookup: the token it was asked with, and the addresses or the error text.
pub type Answer = (u64, Result<Vec<SocketAddr>, String>);

pub struct Resolver {
    requests: mpsc::Sender<(u64, String, u16)>,
    answers: Arc<Mutex<Vec<Answer>>>,
    wake: OwnedFd,
}

impl Resolver {
    pub fn start() -> io::Result<Resolver> {
        let (wake, notify) = sys::pipe()?;
        let (requests, rx) = mpsc::channel::<(u64, String, u16)>();
        let answers = Arc::new(Mutex::new(Vec::new()));
        let out = Arc::clone(&answers);
        std::thread::Builder::new()
            .name("resolver".into())
            .spawn(move || {
                for (token, name, port) in rx {
                    let result = (name.as_str(), port)
                        .to_socket_addrs()
                        .map(|addrs| addrs.collect::<Vec<_>>())
                        .map_err(|e| e.to_string())
                        .and_then(|a| {
                            if a.is_empty() {
                                Err("no address".into())
                            } else {
                                Ok(a)
                            }
                        });
                    out.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((token, result));
                    // A full pipe already holds a wake-up; the answer is in the queue either way.
                    let _ = sys::write(notify.as_fd(), &[1]);
                }
            })?;
        Ok(Resolver {
            requests,
            answers,
            wake,
        })
    }

    pub fn lookup(&self, token: u64, name: &str, port: u16) {
        // The thread only exits when `requests` is dropped, so sending cannot fail.
        let _ = self.requests.send((token, name.to_owned(), port));
    }

    /// The descriptor that becomes readable when answers are waiting.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// Clears the wake-up pipe and returns the answers so far.
    pub fn answers(&self) -> Vec<Answer> {
        let mut sink = [0u8; 64];
        while matches!(sys::read(self.wake.as_fd(), &mut sink), Ok(n) if n > 0) {}
        std::mem::take(&mut *self.answers.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Lookups are answered through the queue with their token; failures carry a message.
    #[test]
    fn answers_arrive_with_their_tokens() {
        let r = Resolver::start().unwrap();
        r.lookup(7, "localhost", 80);
        r.lookup(8, "name.invalid", 80);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while got.len() < 2 && Instant::now() < deadline {
            got.extend(r.answers());
            std::thread::sleep(Duration::from_millis(5));
        }
        got.sort_by_key(|a| a.0);
        assert_eq!(got.len(), 2);
        let local = got[0].1.as_ref().unwrap();
        assert!(
            local.iter().all(|a| a.ip().is_loopback() && a.port() == 80),
            "{local:?}"
        );
        assert!(got[1].1.is_err());
    }
}
