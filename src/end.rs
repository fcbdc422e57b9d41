//! The two sides of a proxied connection and the ways it can end: the vocabulary that
//! connection setup, every data plane and the event loop share, so that none of them needs
//! another's types.
//!
//! Invariant: a failure is always blamed on the side whose socket reported it; the other side
//! is then reset (`End::resets`), so no peer waits on a half-dead connection.

use std::fmt;
use std::io;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client = 0,
    Upstream = 1,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }

    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }
}

/// Why a connection ended; printed as `end=...` in the close line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Both directions finished normally.
    Done,
    ClientReset,
    UpstreamReset,
    Refused,
    Unreachable,
    Timeout,
    Idle,
    Loop,
    NoDestination,
    Shutdown,
    Error,
}

impl End {
    /// Whether the surviving sockets are reset (`SO_LINGER` 0) rather than closed with a FIN.
    pub fn resets(self) -> bool {
        matches!(
            self,
            End::ClientReset | End::UpstreamReset | End::Refused | End::Error
        )
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            End::Done => "done",
            End::ClientReset => "client-reset",
            End::UpstreamReset => "upstream-reset",
            End::Refused => "refused",
            End::Unreachable => "unreachable",
            End::Timeout => "timeout",
            End::Idle => "idle",
            End::Loop => "loop",
            End::NoDestination => "no-destination",
            End::Shutdown => "shutdown",
            End::Error => "error",
        })
    }
}

/// Classifies a failed non-blocking connect.
pub fn connect_end(err: &io::Error) -> End {
    match err.raw_os_error() {
        Some(libc::ECONNREFUSED) => End::Refused,
        Some(libc::ETIMEDOUT) => End::Timeout,
        Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EHOSTDOWN | libc::ENETDOWN) => {
            End::Unreachable
        }
        _ => End::Error,
    }
}

pub fn reset_of(side: Side) -> End {
    match side {
        Side::Client => End::ClientReset,
        Side::Upstream => End::UpstreamReset,
    }
}

/// How one direction (src -> dst) broke; the caller resets the other socket.
#[derive(Debug)]
pub enum Broken {
    /// Reading the source failed (usually ECONNRESET: the sender reset).
    Src(io::Error),
    /// Writing the destination failed (EPIPE/ECONNRESET: the receiver reset).
    Dst(io::Error),
}

/// Maps a broken direction whose source is `src_side` to the end it causes.
pub fn broken_end(src_side: Side, broken: Broken) -> End {
    match broken {
        Broken::Src(_) => reset_of(src_side),
        Broken::Dst(_) => reset_of(src_side.other()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connect failures map to the documented ends.
    #[test]
    fn connect_errors_are_classified() {
        let end = |e| connect_end(&io::Error::from_raw_os_error(e));
        assert_eq!(end(libc::ECONNREFUSED), End::Refused);
        assert_eq!(end(libc::EHOSTUNREACH), End::Unreachable);
        assert_eq!(end(libc::ENETUNREACH), End::Unreachable);
        assert_eq!(end(libc::ETIMEDOUT), End::Timeout);
        assert_eq!(end(libc::EACCES), End::Error);
    }

    /// Only abnormal ends reset the surviving side.
    #[test]
    fn which_ends_reset() {
        assert!(End::ClientReset.resets() && End::UpstreamReset.resets() && End::Refused.resets());
        assert!(!End::Done.resets() && !End::Timeout.resets() && !End::Idle.resets());
    }

    /// A broken flow blames the right side: a read failure is the source's reset, a write
    /// failure the destination's.
    #[test]
    fn broken_flow_blames_the_right_side() {
        let e = || io::Error::from_raw_os_error(libc::ECONNRESET);
        assert_eq!(broken_end(Side::Client, Broken::Src(e())), End::ClientReset);
        assert_eq!(
            broken_end(Side::Client, Broken::Dst(e())),
            End::UpstreamReset
        );
        assert_eq!(
            broken_end(Side::Upstream, Broken::Src(e())),
            End::UpstreamReset
        );
        assert_eq!(
            broken_end(Side::Upstream, Broken::Dst(e())),
            End::ClientReset
        );
    }
}
