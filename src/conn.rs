//! One proxied connection's identity and client socket: who connected, where it wants to go,
//! and what its close line will say. Where it is in its life (setup or a data plane) is kept
//! beside it by the event loop (`conns::Stage`), so this type needs neither.
//!
//! Invariant: a connection is freed only when both directions are finished (each saw end of
//! stream and passed it on), or at once when either side resets or fails — then the other side
//! is reset too, so no peer waits on a half-dead connection and no socket lingers in CLOSE_WAIT.

use crate::cli::ListenerKind;
use crate::sock::Sock;
use crate::socks5::Dest;
use std::fmt;
use std::net::SocketAddr;
use std::time::Instant;

pub struct Conn {
    pub id: u64,
    pub inbound: ListenerKind,
    pub client: Sock,
    pub client_addr: SocketAddr,
    /// Where the client wants to go; a name until resolved, "?" before a SOCKS request.
    pub dest: Dest,
    /// Payload bytes forwarded during the handshake [up, down], counted in the close line.
    pub pre: [u64; 2],
    /// A SOCKS5 failure reply was sent: close with a FIN so the client can read it.
    pub replied: bool,
    pub started: Instant,
    /// Last time bytes moved (checked by the event loop's sweep), for the idle timeout.
    pub last_active: Instant,
    /// Byte totals last seen by the sweep.
    pub seen_bytes: u64,
    /// The upstream socket's local port once connecting (0 before), for the proxy-loop check.
    pub up_port: u16,
}

impl Conn {
    pub fn new(
        id: u64,
        inbound: ListenerKind,
        client: Sock,
        client_addr: SocketAddr,
        dest: Dest,
    ) -> Conn {
        let now = Instant::now();
        Conn {
            id,
            inbound,
            client,
            client_addr,
            dest,
            pre: [0, 0],
            replied: false,
            started: now,
            last_active: now,
            seen_bytes: 0,
            up_port: 0,
        }
    }

    /// `client -> destination`, as log lines name a connection.
    pub fn route(&self) -> Route<'_> {
        Route(self)
    }
}

/// Displays as `198.18.1.2:40000 -> 198.19.1.2:443`.
pub struct Route<'a>(&'a Conn);

impl fmt::Display for Route<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} -> {}", self.0.client_addr, self.0.dest)
    }
}
