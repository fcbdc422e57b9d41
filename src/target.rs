//! The upstream proxy's address at run time. An IP address is used as given. A name is
//! resolved by the resolver thread, never on the event loop: at start, and again after a
//! connect to it fails (a proxy that moved, a DHCP lease that changed); connections that need
//! the address while a lookup runs wait for it.
//!
//! Invariants: at most one lookup of the name runs at a time; every connection that waited
//! for a lookup is routed again when it answers (connected, or refused with the reason); a
//! failed lookup is not repeated more often than once per `RETRY`, so a dead name cannot turn
//! every new connection into a DNS query.

use crate::error;
use crate::resolve::Resolver;
use crate::token::Token;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The shortest time between two lookups after one failed.
const RETRY: Duration = Duration::from_secs(1);

/// Where an upstream proxy listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Server {
    Addr(SocketAddr),
    /// A DNS name (1..=253 bytes, labels of letters, digits and `-`) and a port.
    Name(String, u16),
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Server::Addr(a) => write!(f, "{a}"),
            Server::Name(n, p) => write!(f, "{n}:{p}"),
        }
    }
}

pub struct Target {
    server: Server,
    /// The addresses of the last successful lookup (or the literal), tried in turn.
    addrs: Vec<SocketAddr>,
    next: usize,
    resolving: bool,
    /// The last failed lookup: when, and why.
    failed: Option<(Instant, String)>,
    /// Tokens of connections waiting for the lookup.
    waiting: Vec<u64>,
}

/// What a connection does about the upstream address.
pub enum Lookup {
    Ready(SocketAddr),
    /// A lookup runs; the connection's token is queued for `answered`.
    Wait,
    /// The name cannot be resolved now.
    Failed(String),
}

impl Target {
    /// Starts resolving a name at once, so the first connection finds it ready.
    pub fn new(server: Server, resolver: Option<&Resolver>) -> Target {
        let addrs = match &server {
            Server::Addr(a) => vec![*a],
            Server::Name(..) => Vec::new(),
        };
        let mut t = Target {
            server,
            addrs,
            next: 0,
            resolving: false,
            failed: None,
            waiting: Vec::new(),
        };
        t.resolve(resolver);
        t
    }

    /// Whether the address is a name (the event loop then runs the resolver).
    pub fn is_name(server: &Server) -> bool {
        matches!(server, Server::Name(..))
    }

    fn resolve(&mut self, resolver: Option<&Resolver>) {
        if let (Server::Name(name, port), Some(r), false) = (&self.server, resolver, self.resolving)
        {
            r.lookup(Token::UpstreamName.encode(), name, *port);
            self.resolving = true;
        }
    }

    /// The address connection `token` should connect to now.
    pub fn get(&mut self, token: u64, resolver: Option<&Resolver>) -> Lookup {
        if !self.resolving {
            if let Some(a) = self.addrs.get(self.next % self.addrs.len().max(1)) {
                return Lookup::Ready(*a);
            }
            match &self.failed {
                Some((when, why)) if when.elapsed() < RETRY => return Lookup::Failed(why.clone()),
                _ => self.resolve(resolver),
            }
        }
        if !self.resolving {
            return Lookup::Failed("no resolver running".into());
        }
        self.waiting.push(token);
        Lookup::Wait
    }

    /// A connect to `addr` failed: the next connection tries the next address, and a name
    /// is looked up again (its address may have changed).
    pub fn connect_failed(&mut self, addr: SocketAddr, resolver: Option<&Resolver>) {
        if self.addrs.get(self.next % self.addrs.len().max(1)) == Some(&addr) {
            self.next = self.next.wrapping_add(1);
        }
        if matches!(self.server, Server::Name(..)) {
            self.addrs.clear();
            self.failed = None;
            self.resolve(resolver);
        }
    }

    /// The resolver answered the name: keeps the addresses and returns the tokens of the
    /// connections that waited, to be routed again.
    pub fn answered(&mut self, result: Result<Vec<SocketAddr>, String>) -> Vec<u64> {
        self.resolving = false;
        match result {
            Ok(addrs) if !addrs.is_empty() => {
                crate::info!(
                    "upstream {} is {}{}",
                    self.server,
                    addrs[0],
                    match addrs.len() {
                        1 => String::new(),
                        n => format!(" (and {} more)", n - 1),
                    }
                );
                self.addrs = addrs;
                self.next = 0;
                self.failed = None;
            }
            Ok(_) => self.failed = Some((Instant::now(), "no address".into())),
            Err(why) => {
                error!("upstream {}: cannot resolve: {why}", self.server);
                self.failed = Some((Instant::now(), why));
            }
        }
        std::mem::take(&mut self.waiting)
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        self.server.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A literal is ready at once; a failed connect moves to the next address (one here).
    #[test]
    fn literal_is_ready() {
        let mut t = Target::new(Server::Addr(a("198.18.0.1:1080")), None);
        assert!(matches!(t.get(1, None), Lookup::Ready(x) if x == a("198.18.0.1:1080")));
        t.connect_failed(a("198.18.0.1:1080"), None);
        assert!(matches!(t.get(1, None), Lookup::Ready(x) if x == a("198.18.0.1:1080")));
    }

    /// Without a resolver a name fails with a reason instead of waiting for ever.
    #[test]
    fn name_without_resolver_fails() {
        let mut t = Target::new(Server::Name("proxy.test".into(), 1080), None);
        assert!(matches!(t.get(1, None), Lookup::Failed(_)));
    }

    /// The real resolver thread: waiting connections come back when the answer does, the
    /// addresses rotate after a failed connect, and a failed connect looks the name up again.
    #[test]
    fn name_through_the_resolver() {
        let r = Resolver::start().unwrap();
        let mut t = Target::new(Server::Name("localhost".into(), 1080), Some(&r));
        assert!(matches!(t.get(7, Some(&r)), Lookup::Wait));
        assert!(matches!(t.get(8, Some(&r)), Lookup::Wait));
        let answer = wait_answer(&r);
        assert_eq!(answer.0, Token::UpstreamName.encode());
        assert_eq!(t.answered(answer.1), vec![7, 8]);
        let Lookup::Ready(first) = t.get(9, Some(&r)) else {
            panic!("resolved name not ready")
        };
        assert!(first.ip().is_loopback() && first.port() == 1080);
        t.connect_failed(first, Some(&r));
        assert!(
            matches!(t.get(10, Some(&r)), Lookup::Wait),
            "looked up again"
        );
        assert_eq!(t.answered(wait_answer(&r).1), vec![10]);
        t.answered(Err("gone".into()));
        t.addrs.clear();
        assert!(
            matches!(t.get(11, Some(&r)), Lookup::Failed(w) if w == "gone"),
            "no retry within RETRY"
        );
    }

    fn wait_answer(r: &Resolver) -> crate::resolve::Answer {
        for _ in 0..500 {
            if let Some(a) = r.answers().pop() {
                return a;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no answer from the resolver within 5 s");
    }
}
