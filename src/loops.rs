//! Proxy loops, refused before they start: a destination that is one of ksocks' own listeners
//! (a rule that redirects the proxy to itself, or a client connecting to the port directly),
//! and a client that is ksocks' own upstream socket (an OUTPUT redirect on the router without
//! the `--mark`/`--user` exemption), which would otherwise open the next hop, and the next, up
//! to `--max-conns`.
//!
//! Invariant: `UpPorts` counts, per local port, the live connections whose upstream socket is
//! bound to it; a client whose port is not counted cannot be one of ours, so the full check
//! (a `getsockname` per candidate) runs only on a port collision.

use crate::accept::Listener;
use crate::cli::ListenerKind;
use crate::sys::socket;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;

pub struct UpPorts {
    /// 128 KiB of zeroed pages; only those of ports in use become resident.
    count: Vec<u16>,
}

impl Default for UpPorts {
    fn default() -> Self {
        UpPorts {
            count: vec![0; 1 << 16],
        }
    }
}

impl UpPorts {
    pub fn add(&mut self, port: u16) {
        let c = &mut self.count[port as usize];
        *c = c.saturating_add(1);
    }

    pub fn remove(&mut self, port: u16) {
        let c = &mut self.count[port as usize];
        *c = c.saturating_sub(1);
    }

    pub fn in_use(&self, port: u16) -> bool {
        self.count[port as usize] != 0
    }
}

/// Whether `dest` is one of our listeners. With no NAT, SO_ORIGINAL_DST returns the accepted
/// socket's own address; for TPROXY that is always the case, so only the listener addresses
/// count there.
pub fn to_listener(
    listeners: &[Listener],
    kind: ListenerKind,
    dest: &SocketAddr,
    client: BorrowedFd,
) -> bool {
    if kind == ListenerKind::Redirect && socket::local_addr(client).ok().as_ref() == Some(dest) {
        return true;
    }
    listeners.iter().map(|l| l.addr).any(|l| {
        l == *dest
            || (l.ip().is_unspecified()
                && l.port() == dest.port()
                && l.is_ipv4() == dest.is_ipv4()
                && socket::is_local_ip(dest.ip()))
    })
}

/// The id of the connection whose upstream socket is the client at `client_addr`, among
/// `conns` = (id, upstream port, upstream socket).
pub fn own_upstream<'a>(
    ports: &UpPorts,
    client_addr: SocketAddr,
    conns: impl Iterator<Item = (u64, u16, BorrowedFd<'a>)>,
) -> Option<u64> {
    let port = client_addr.port();
    if !ports.in_use(port) {
        return None;
    }
    // Rare (a client port that one of ours also uses): find which, by full address.
    conns
        .filter(|&(_, p, _)| p == port)
        .find(|&(_, _, fd)| socket::local_addr(fd).ok() == Some(client_addr))
        .map(|(id, ..)| id)
}
