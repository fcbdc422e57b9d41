//! SOCKS5 wire format: RFC 1928 (greeting, request, reply) and RFC 1929
//! (username/password), pure functions over bytes, no I/O: `common` holds what
//! both sides share — constants, errors, addresses, reply codes; `server`
//! parses what a client sends to `--socks` and emits the answers, `client`
//! speaks to a `socks5://` upstream. All three are re-exported here.
//!
//! Every parser takes untrusted bytes from the start of a message and returns
//! `Result<Option<(T, usize)>, Error>`:
//! - `Ok(Some((msg, n)))`: a whole message, `n` bytes consumed; bytes after
//!   `n` belong to the next message (pipelined clients) and must be kept;
//! - `Ok(None)`: the input is a valid prefix, read more and call again;
//! - `Err(e)`: the input can never become a valid message; reply (see
//!   [`Error::rep`]) and close.
//!
//! Lengths are checked before every index, so no input panics. Emitters
//! return a fixed buffer ([`Msg`] or an array); only domain names allocate.

mod client;
mod common;
mod server;

pub use client::*;
pub use common::*;
pub use server::*;
