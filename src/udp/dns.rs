//! Ending DNS associations as soon as they are answered: a client's resolver opens a port per
//! query (or two, A and AAAA) and never uses it again, so waiting `--udp-timeout` for each
//! would hold thousands of idle associations on a busy router.
//!
//! The rule, pure (bytes in, a decision out): an association whose first destination is port
//! 53 remembers the ID of each query it forwards (RFC 1035 §4.1.1: ID is the first 2 bytes, QR
//! the top bit of the third); an answer from port 53 with a remembered ID forgets it; the
//! answer that leaves none outstanding ends the association. Anything else (a datagram to
//! another port, more than [`MAX_QUERIES`] outstanding, a short datagram) turns the rule off
//! for that association, which then ends by the idle timeout like any other.
//!
//! Invariant: no allocation; a few bytes per association.

/// Outstanding queries remembered per association.
pub const MAX_QUERIES: usize = 8;
const PORT: u16 = 53;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dns {
    ids: [u16; MAX_QUERIES],
    n: u8,
    on: bool,
}

/// ID and QR of a DNS message, `None` when it is too short to be one.
fn header(msg: &[u8]) -> Option<(u16, bool)> {
    match *msg {
        [a, b, flags, _, ..] if msg.len() >= 12 => {
            Some((u16::from_be_bytes([a, b]), flags >= 0x80))
        }
        _ => None,
    }
}

impl Dns {
    /// The rule applies when the association's first destination port is 53.
    pub fn new(first_port: u16) -> Dns {
        Dns {
            on: first_port == PORT,
            ..Dns::default()
        }
    }

    /// A datagram forwarded to port `port`.
    pub fn query(&mut self, port: u16, msg: &[u8]) {
        if !self.on {
            return;
        }
        let n = self.n as usize;
        match header(msg) {
            Some((id, false)) if port == PORT => {
                if self.ids[..n].contains(&id) {
                    return; // a retransmission
                }
                match self.ids.get_mut(n) {
                    Some(slot) => {
                        *slot = id;
                        self.n += 1;
                    }
                    None => self.on = false,
                }
            }
            _ => self.on = false,
        }
    }

    /// A datagram from port `port`: true when it answers the last outstanding query.
    pub fn answer(&mut self, port: u16, msg: &[u8]) -> bool {
        if !self.on || port != PORT {
            return false;
        }
        let n = self.n as usize;
        let Some((id, true)) = header(msg) else {
            return false;
        };
        let Some(i) = self.ids[..n].iter().position(|&q| q == id) else {
            return false;
        };
        self.ids[i] = self.ids[n - 1];
        self.n -= 1;
        self.n == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: u16, answer: bool) -> Vec<u8> {
        let mut m = vec![0u8; 29];
        m[..2].copy_from_slice(&id.to_be_bytes());
        m[2] = if answer { 0x81 } else { 0x01 };
        m
    }

    /// A lone query ends at its answer; unrelated answers and other ports do not end it.
    #[test]
    fn one_query() {
        let mut d = Dns::new(53);
        d.query(53, &msg(7, false));
        assert!(!d.answer(53, &msg(8, true)), "another ID");
        assert!(!d.answer(5353, &msg(7, true)), "another port");
        assert!(!d.answer(53, &msg(7, false)), "not an answer");
        assert!(d.answer(53, &msg(7, true)));
    }

    /// A and AAAA from one port: the association ends at the second answer, in either order;
    /// a retransmitted query is one query.
    #[test]
    fn two_queries_and_retransmission() {
        let mut d = Dns::new(53);
        d.query(53, &msg(1, false));
        d.query(53, &msg(2, false));
        d.query(53, &msg(1, false));
        assert!(!d.answer(53, &msg(2, true)));
        assert!(d.answer(53, &msg(1, true)));
    }

    /// The rule is off for other ports, for an association that also talks elsewhere, for
    /// too many queries and for short datagrams.
    #[test]
    fn off() {
        let mut d = Dns::new(443);
        d.query(53, &msg(1, false));
        assert!(!d.answer(53, &msg(1, true)));
        let mut d = Dns::new(53);
        d.query(53, &msg(1, false));
        d.query(123, &msg(2, false));
        assert!(!d.answer(53, &msg(1, true)));
        let mut d = Dns::new(53);
        for id in 0..=MAX_QUERIES as u16 {
            d.query(53, &msg(id, false));
        }
        assert!((0..=MAX_QUERIES as u16).all(|id| !d.answer(53, &msg(id, true))));
        let mut d = Dns::new(53);
        d.query(53, &[0, 1, 0]);
        assert!(!d.answer(53, &[0, 1, 0x80]));
        assert_eq!(Dns::default(), Dns::new(0));
    }
}
