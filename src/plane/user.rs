//! The userspace planes, `copy` and `splice`: a connection's two directions as two `Flow`s,
//! moved on readiness of their source (readable) or destination (writable).
//!
//! Invariant: the relay is finished only when both directions passed their end of stream
//! on; a read or write failure ends it at once, blaming the side that failed.

use super::flow::Flow;
use crate::end::{broken_end, reset_of, End, Side};
use crate::sock::Pair;
use crate::sys::{epoll, socket};

pub struct Relay {
    /// [client -> upstream, upstream -> client].
    flows: [Flow; 2],
}

impl Relay {
    pub fn copy(buffer: usize) -> Relay {
        Relay {
            flows: [Flow::copy(buffer), Flow::copy(buffer)],
        }
    }

    pub fn splice(pipe_bytes: usize) -> Relay {
        Relay {
            flows: [Flow::splice(pipe_bytes), Flow::splice(pipe_bytes)],
        }
    }

    /// "splice" while the client -> upstream flow splices (a socket splice(2) refuses turns
    /// its flow into a copy), else "copy".
    pub fn name(&self) -> &'static str {
        match self.flows[0].is_splice() {
            true => "splice",
            false => "copy",
        }
    }

    /// Bytes written (client -> upstream, upstream -> client).
    pub fn bytes(&self) -> (u64, u64) {
        (self.flows[0].written, self.flows[1].written)
    }

    pub fn finished(&self) -> bool {
        self.flows.iter().all(|f| f.shut)
    }

    /// Nothing is held and every end of stream seen was passed on: what the two sockets
    /// hold is all there is (the tcsplice handoff waits for this).
    pub fn settled(&self) -> bool {
        self.flows
            .iter()
            .all(|f| f.pending() == 0 && f.eof == f.shut)
    }

    /// Bytes held in the buffers or pipes.
    pub fn held(&self) -> usize {
        self.flows.iter().map(Flow::pending).sum()
    }

    /// End of stream seen from [client, upstream].
    pub fn eof(&self) -> [bool; 2] {
        [self.flows[0].eof, self.flows[1].eof]
    }

    /// Frees buffers and pipes that hold nothing (an idle connection).
    pub fn release(&mut self) {
        self.flows.iter_mut().for_each(Flow::release);
    }

    /// Handles readiness of one side: pump out of it when readable (or hung up: a read returns
    /// what is left, then 0), into it when writable. Both are cheap to try when they cannot
    /// move.
    pub fn on_event(&mut self, pair: &mut Pair, side: Side, events: u32) -> Option<End> {
        if events & epoll::HUP != 0 {
            pair.sock(side).hup = true;
        }
        let (c, u) = pair.fds();
        if events & epoll::ERR != 0 {
            let fd = if side == Side::Client { c } else { u };
            if let Ok(Some(_)) = socket::take_error(fd) {
                return Some(reset_of(side));
            }
        }
        let [up, down] = &mut self.flows;
        let (from_side, to_side, src, dst) = match side {
            Side::Client => (up, down, c, u),
            Side::Upstream => (down, up, u, c),
        };
        if events & (epoll::IN | epoll::HUP | epoll::ERR) != 0 {
            if let Err(b) = from_side.pump(src, dst) {
                return Some(broken_end(side, b));
            }
        }
        if events & epoll::OUT != 0 {
            if let Err(b) = to_side.pump(dst, src) {
                return Some(broken_end(side.other(), b));
            }
        }
        None
    }

    /// The epoll masks (client, upstream) the flows need now.
    pub fn masks(&self) -> (u32, u32) {
        let [up, down] = &self.flows;
        let mask = |reads: &Flow, writes: &Flow| {
            (if reads.wants_read() { epoll::IN } else { 0 })
                | (if writes.wants_write() { epoll::OUT } else { 0 })
        };
        (mask(up, down), mask(down, up))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sock::Sock;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::{AsFd, OwnedFd};

    fn tcp_pair() -> (OwnedFd, OwnedFd) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a.into(), b.into())
    }

    /// A fresh relay reads both sides and writes neither; after a client FIN is passed on the
    /// client is no longer read, and the relay is finished only when both directions are.
    #[test]
    fn relay_transitions() {
        let (peer_c, client) = tcp_pair();
        let (upstream, peer_u) = tcp_pair();
        let (mut client, mut upstream) = (Sock::new(client), Sock::new(upstream));
        let mut pair = Pair {
            client: &mut client,
            upstream: &mut upstream,
        };
        let mut relay = Relay::copy(1024);
        assert_eq!(relay.masks(), (epoll::IN, epoll::IN));
        assert_eq!(relay.name(), "copy");
        socket::send(peer_c.as_fd(), b"hello").unwrap();
        socket::shutdown_write(peer_c.as_fd()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(relay.on_event(&mut pair, Side::Client, epoll::IN), None);
        assert_eq!(
            relay.masks(),
            (0, epoll::IN),
            "client EOF passed on: only upstream is read"
        );
        assert!(!relay.finished());
        let mut buf = [0u8; 16];
        assert_eq!(socket::recv(peer_u.as_fd(), &mut buf).unwrap(), 5);
        socket::shutdown_write(peer_u.as_fd()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(relay.on_event(&mut pair, Side::Upstream, epoll::IN), None);
        assert!(relay.finished());
        assert_eq!(relay.bytes(), (5, 0));
    }

    /// A reset from the upstream is reported as such, so the client gets a reset too.
    #[test]
    fn relay_reports_upstream_reset() {
        let (_peer_c, client) = tcp_pair();
        let (upstream, peer_u) = tcp_pair();
        let (mut client, mut upstream) = (Sock::new(client), Sock::new(upstream));
        let mut pair = Pair {
            client: &mut client,
            upstream: &mut upstream,
        };
        let mut relay = Relay::splice(65536);
        assert_eq!(relay.name(), "splice");
        socket::set_linger_zero(peer_u.as_fd()).unwrap();
        drop(peer_u);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(
            relay.on_event(&mut pair, Side::Upstream, epoll::IN | epoll::ERR),
            Some(End::UpstreamReset)
        );
    }
}
