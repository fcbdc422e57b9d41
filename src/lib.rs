//! ksocks: a transparent TCP proxy for Linux routers whose data plane runs in the kernel.
//!
//! `main` parses the command line (`cli`), binds listeners and picks a data plane
//! (`offload` probes the kernel), then runs the single-threaded readiness loop
//! (`event_loop`) over connections (`conn`) that move bytes in userspace (`relay`: copy or
//! splice) or in the kernel (`sockmap`). All `unsafe` lives in `sys`.
#![deny(unsafe_code)]

pub mod log;

pub mod cli;
pub mod conn;
pub mod event_loop;
pub mod handshake;
pub mod offload;
pub mod relay;
pub mod resolve;
pub mod shadowsocks;
pub mod sockmap;
pub mod socks5;
#[allow(unsafe_code)]
pub mod sys;
pub mod upstream;
