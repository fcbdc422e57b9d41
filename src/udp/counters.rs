//! The UDP module's counters and its part of the `SIGUSR1` stats line: associations (live,
//! peak, created, ended by reason), datagrams and bytes each way, and every datagram dropped,
//! by reason.
//!
//! Invariant: each datagram that reaches ksocks is either relayed (counted in `up`/`down`) or
//! dropped and counted under exactly one reason; nothing is dropped silently.

use super::assoc::{End, END_WORDS};
use std::fmt;

/// Dropped datagrams by reason (stats fields `udp_drop_<reason>`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drops {
    /// Longer than the receive buffer (cannot happen with 64 KiB buffers; counted anyway).
    pub truncated: u64,
    /// A TPROXY datagram without its original destination (not diverted by TPROXY).
    pub no_dest: u64,
    /// Addressed to one of ksocks' own listeners, or sent by one of its upstream sockets.
    pub r#loop: u64,
    /// A SOCKS5 datagram with FRAG != 0 (RFC 1928 §7 lets a relay drop fragments).
    pub fragment: u64,
    /// A bad SOCKS5 or shadowsocks header: truncated, unknown ATYP, bad name.
    pub header: u64,
    /// From an address other than the SOCKS client's, or to a client not yet known.
    pub stranger: u64,
    /// Too big for the path once its header is added (EMSGSIZE).
    pub too_big: u64,
    /// The socket's send buffer was full (EAGAIN/ENOBUFS): dropped, never queued.
    pub full: u64,
    /// The upstream was not ready and its small waiting buffer was full.
    pub pending: u64,
    /// No way to send it: a name that did not resolve, an address family the association's
    /// socket cannot reach, or an association that could not be opened.
    pub route: u64,
    /// No reply socket for its source (IP_TRANSPARENT refused, address in use).
    pub reply: u64,
    /// Another socket error.
    pub error: u64,
    /// Dropped by the kernel on a TPROXY listener whose receive queue was full
    /// (`SO_RXQ_OVFL`): ksocks was slower than the clients.
    pub kernel: u64,
}

impl Drops {
    fn fields(&self) -> [(&'static str, u64); 13] {
        [
            ("truncated", self.truncated),
            ("no_dest", self.no_dest),
            ("loop", self.r#loop),
            ("fragment", self.fragment),
            ("header", self.header),
            ("stranger", self.stranger),
            ("too_big", self.too_big),
            ("full", self.full),
            ("pending", self.pending),
            ("route", self.route),
            ("reply", self.reply),
            ("error", self.error),
            ("kernel", self.kernel),
        ]
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub created: u64,
    pub ended: [u64; END_WORDS.len()],
    pub up_dgrams: u64,
    pub up_bytes: u64,
    pub down_dgrams: u64,
    pub down_bytes: u64,
    pub drops: Drops,
}

impl Counters {
    pub fn ended(&mut self, why: End) {
        if let Some(i) = why.index() {
            self.ended[i] += 1;
        }
    }

    pub fn up(&mut self, bytes: usize) {
        self.up_dgrams += 1;
        self.up_bytes += bytes as u64;
    }

    pub fn down(&mut self, bytes: usize) {
        self.down_dgrams += 1;
        self.down_bytes += bytes as u64;
    }
}

/// The UDP fields of the stats line, each ` udp_<name>=<n>`.
pub struct Line<'a> {
    pub counters: &'a Counters,
    pub live: usize,
    pub peak: usize,
    pub reply_sockets: usize,
}

impl fmt::Display for Line<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let c = self.counters;
        write!(
            f,
            " udp_assocs={} udp_peak={} udp_created={} udp_reply_socks={}",
            self.live, self.peak, c.created, self.reply_sockets
        )?;
        for (word, n) in END_WORDS.iter().zip(c.ended) {
            write!(f, " udp_end_{word}={n}")?;
        }
        write!(
            f,
            " udp_up_dgrams={} udp_up_bytes={} udp_down_dgrams={} udp_down_bytes={}",
            c.up_dgrams, c.up_bytes, c.down_dgrams, c.down_bytes
        )?;
        let drops = c.drops.fields();
        let total: u64 = drops.iter().map(|(_, n)| n).sum();
        write!(f, " udp_drops={total}")?;
        for (word, n) in drops {
            write!(f, " udp_drop_{word}={n}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stats fields are `key=number` pairs, the drops add up to `udp_drops`, and the end
    /// reasons land in their own fields.
    #[test]
    fn line() {
        let mut c = Counters::default();
        c.ended(End::Icmp(libc::ECONNREFUSED));
        c.ended(End::Shutdown);
        c.up(100);
        c.drops.fragment = 2;
        c.drops.kernel = 3;
        let text = Line {
            counters: &c,
            live: 4,
            peak: 9,
            reply_sockets: 1,
        }
        .to_string();
        let fields: Vec<(&str, u64)> = text
            .split_whitespace()
            .map(|kv| kv.split_once('=').unwrap())
            .map(|(k, v)| (k, v.parse().unwrap()))
            .collect();
        let get = |k: &str| fields.iter().find(|f| f.0 == k).map(|f| f.1);
        assert_eq!(get("udp_assocs"), Some(4));
        assert_eq!(get("udp_end_icmp"), Some(1));
        assert_eq!(get("udp_end_idle"), Some(0));
        assert_eq!(get("udp_up_bytes"), Some(100));
        assert_eq!(get("udp_drops"), Some(5));
        assert_eq!(get("udp_drop_loop"), Some(0));
        assert!(fields.iter().all(|f| f.0.starts_with("udp_")));
    }
}
