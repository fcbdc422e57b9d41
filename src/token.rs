//! Epoll tokens: what a readiness event is about, packed in the event's 64-bit user data.
//!
//! Layout: the top four bits say the kind; a connection token carries its slot's generation
//! (27 bits), slot index (32 bits) and side (1 bit), so an event for a connection closed
//! earlier in the same batch (its slot reused) is recognised as stale. A UDP token's 60 low
//! bits belong to the UDP module (`udp::Token`), which the loop hands them to unread.
//!
//! Invariant: `decode(encode(t)) == t` for every token; kinds never overlap.

use crate::end::Side;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    Signal,
    Resolver,
    /// A resolver answer for the upstream proxy's name (`target`).
    UpstreamName,
    /// The listener at this index.
    Listener(usize),
    Conn {
        gen: u32,
        idx: usize,
        side: Side,
    },
    /// A UDP socket or a SOCKS control connection of the UDP module: 60 bits it decodes.
    Udp(u64),
}

const KIND_SHIFT: u32 = 60;
const SIGNAL: u64 = 1;
const RESOLVER: u64 = 2;
const LISTENER: u64 = 3;
const CONN: u64 = 4;
const UPSTREAM_NAME: u64 = 5;
const UDP: u64 = 6;
/// The bits below the kind.
pub const LOW_MASK: u64 = (1 << KIND_SHIFT) - 1;
/// Generations wrap at 27 bits.
pub const GEN_MASK: u32 = (1 << 27) - 1;

impl Token {
    pub fn encode(self) -> u64 {
        match self {
            Token::Signal => SIGNAL << KIND_SHIFT,
            Token::Resolver => RESOLVER << KIND_SHIFT,
            Token::UpstreamName => UPSTREAM_NAME << KIND_SHIFT,
            Token::Listener(i) => LISTENER << KIND_SHIFT | (i as u32) as u64,
            Token::Conn { gen, idx, side } => {
                CONN << KIND_SHIFT
                    | ((gen & GEN_MASK) as u64) << 33
                    | ((idx as u32) as u64) << 1
                    | side as u64
            }
            Token::Udp(v) => UDP << KIND_SHIFT | (v & LOW_MASK),
        }
    }

    /// `None` for a value no token encodes to.
    pub fn decode(v: u64) -> Option<Token> {
        let low = v & LOW_MASK;
        Some(match v >> KIND_SHIFT {
            SIGNAL => Token::Signal,
            RESOLVER => Token::Resolver,
            UPSTREAM_NAME => Token::UpstreamName,
            LISTENER => Token::Listener(low as u32 as usize),
            CONN => Token::Conn {
                gen: (low >> 33) as u32 & GEN_MASK,
                idx: (low >> 1) as u32 as usize,
                side: if low & 1 == 0 {
                    Side::Client
                } else {
                    Side::Upstream
                },
            },
            UDP => Token::Udp(low),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens round-trip and keep kinds, sides and generations apart.
    #[test]
    fn token_round_trip() {
        let tokens = [
            Token::Signal,
            Token::Resolver,
            Token::UpstreamName,
            Token::Listener(0),
            Token::Listener(7),
            Token::Conn {
                gen: 0,
                idx: 0,
                side: Side::Client,
            },
            Token::Conn {
                gen: 7,
                idx: 12345,
                side: Side::Upstream,
            },
            Token::Conn {
                gen: GEN_MASK,
                idx: u32::MAX as usize,
                side: Side::Client,
            },
            Token::Udp(0),
            Token::Udp(LOW_MASK),
        ];
        for t in tokens {
            assert_eq!(Token::decode(t.encode()), Some(t), "{t:?}");
        }
        let mut values: Vec<u64> = tokens.iter().map(|t| t.encode()).collect();
        values.sort_unstable();
        values.dedup();
        assert_eq!(values.len(), tokens.len());
        assert_eq!(Token::decode(0), None);
    }
}
