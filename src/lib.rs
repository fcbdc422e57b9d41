//! ksocks: a transparent TCP proxy for Linux routers whose data plane runs in the kernel.
//!
//! `main` parses the command line (`cli`), binds listeners (`accept`) and picks a data plane
//! (`plane`), then runs the single-threaded readiness loop (`event_loop`). A connection
//! (`conn`, kept in `conns`) goes through `setup` (handshakes with the `handshake` state
//! machines over the wire formats `socks5`, `shadowsocks`, `upstream`) and then onto its
//! plane: `plane::user` (copy or splice, one `plane::flow` per direction), `plane::sockmap`
//! or `plane::tcsplice` (both loaded by the plane-independent BPF loader `bpf`). All `unsafe`
//! lives in `sys`.
#![deny(unsafe_code)]

pub mod log;

pub mod accept;
pub mod bpf;
pub mod cli;
pub mod conn;
pub mod conns;
pub mod end;
pub mod event_loop;
pub mod handshake;
pub mod loops;
pub mod plane;
pub mod resolve;
pub mod setup;
pub mod shadowsocks;
pub mod sock;
pub mod socks5;
pub mod stats;
#[allow(unsafe_code)]
pub mod sys;
pub mod target;
#[cfg(feature = "test-hooks")]
pub mod test_hooks;
pub mod token;
pub mod udp;
pub mod upstream;
