//! Proxy-chain integration tests (issue 4): ksocks as a SOCKS5 server (`--socks`) and ksocks
//! sending connections through an upstream proxy (`--upstream socks5://` to danted and
//! microsocks, `--upstream ss://none@` to shadowsocks-rust `ssserver -m none`), in the
//! client -> router -> server namespaces, against the real programs, every byte checked by hash.
//!
//! - `interop::<chain>::<plane>::<case>`: the byte-exactness cases of the core issue through
//!   each chain (`socks`, `socks_auth`, `danted`, `danted_auth`, `microsocks`,
//!   `microsocks_auth`, `ss`, `socks_via_ss`) on the sockmap, splice, copy and tcsplice
//!   planes; close lines must show the exact byte counts and the plane (or a logged fallback;
//!   on tcsplice the bulk cases must have been spliced). After each case ksocks holds nothing.
//! - `curl::<plane>::*`: `curl --socks5` / `--socks5-hostname` through `ksocks --socks`: IPv4
//!   and IPv6 listeners and destinations, names from test hosts files, no auth,
//!   `--socks-auth`, `--socks-auth-file`, and chained on to danted and microsocks.
//! - `bad_input::*`: raw bytes to `ksocks --socks`: each gets the right reply bytes or a close,
//!   a log line, and a good connection through the same ksocks keeps its bytes meanwhile.
//! - `upstream_failure::*`: refusing, rejecting and absent upstream proxies.
//!
//! Run as root: `cargo test --test proxy -- --test-threads=8 [FILTER]`, e.g. `interop::ss` or
//! `::sockmap::`. Needs curl, danted (dante-server), microsocks and ssserver (shadowsocks-rust):
//! `scripts/test-peers` installs them. Outside CI a test without them skips with a message;
//! with `CI=true` it fails. On a failure the logs of ksocks and the peer are printed and the
//! whole ksocks log is saved under `target/tmp/`.
//!
//! The upstream proxies run in the server namespace on the server's address (the router
//! reaches them over the veth, like a remote proxy); ksocks runs in the router. A domain name
//! from a SOCKS client is passed on to a chained upstream unresolved, so the server namespace
//! gets the test hosts file too.
//!
//! Layout: this file holds the constants and the macros that generate the `interop` and
//! `curl` matrices and the `bad_input` list; the code those tests call lives in the modules
//! `setup` (the `Setup` harness all tests share), `chains` (the interop chains) and `cases`
//! (their case bodies), `curl_ctx` (the curl matrix's setup), `bad_ctx` (the bad-input setup
//! and bystander) and `bad` (its cases). `upstream_failure` and `upstream_by_name` hold their
//! tests with their setups.

#[path = "../common/mod.rs"]
mod common;

mod bad;
mod bad_ctx;
mod cases;
mod chains;
mod curl_ctx;
mod setup;
mod upstream_by_name;
mod upstream_failure;

use bad_ctx::run_bad;
use chains::{run_interop, Mode};
use common::Family;
use curl_ctx::{run_curl, CurlAuth};

/// The data planes every interop case runs on.
macro_rules! planes {
    ($mac:ident) => {
        $mac!(sockmap splice copy tcsplice);
    };
}

const REDIRECT_PORT: u16 = 12345;
const SOCKS_PORT: u16 = 1080;
/// The upstream proxy (danted, microsocks, ssserver) in the server namespace.
const UPSTREAM_PORT: u16 = 1081;
/// A port in the server namespace where nothing listens.
const CLOSED_PORT: u16 = 5009;
const SERVER_PORT: u16 = 5001;
const HTTP_PORT: u16 = 8080;
const MIB: u64 = 1024 * 1024;

const USER: &str = "alice";
const PASS: &str = "s3cret-Pass";

const NAME4: &str = "srv4.ksocks.test";
const NAME6: &str = "srv6.ksocks.test";

// ---------------------------------------------------------------------------------------------
// The interop matrix: `interop::<chain>::<plane>::<case>`

/// Cases every chain runs. `upload_then_reply` and `half_close_late_reply` need a peer that
/// passes a half-close on; microsocks does not (its copy loop closes both directions at the
/// first EOF), so its list leaves them out: that is microsocks' limit, not ksocks'.
macro_rules! interop_cases {
    (full $mode:ident $plane:ident) => {
        interop_cases!(@every_peer $mode $plane);
        interop_cases!(@each $mode $plane;
            upload_then_reply = V4 upload_then_reply,
            half_close_late_reply = V4 half_close_late_reply,
            v6_upload_then_reply = V6 upload_then_reply,
            v6_half_close_late_reply = V6 half_close_late_reply
        );
    };
    (no_half_close $mode:ident $plane:ident) => {
        interop_cases!(@every_peer $mode $plane);
        interop_cases!(@each $mode $plane;
            v6_bidirectional_bulk = V6 bidirectional_bulk
        );
    };
    // The cases of both lists.
    (@every_peer $mode:ident $plane:ident) => {
        interop_cases!(@each $mode $plane;
            server_speaks_first = V4 server_speaks_first,
            ping_pong_from_first_byte = V4 ping_pong_from_first_byte,
            bidirectional_bulk = V4 bidirectional_bulk,
            server_closes_first = V4 server_closes_first,
            client_reset_mid_transfer = V4 client_reset_mid_transfer,
            v6_server_speaks_first = V6 server_speaks_first
        );
    };
    (@each $mode:ident $plane:ident; $($name:ident = $fam:ident $case:ident),+) => {
        $(
            #[test]
            fn $name() {
                crate::run_interop(
                    crate::Mode::$mode,
                    crate::Family::$fam,
                    stringify!($plane),
                    stringify!($name),
                    crate::cases::$case,
                );
            }
        )+
    };
}

macro_rules! interop_matrix {
    ($($plane:ident)+) => {
        mod interop {
            mod socks { $( mod $plane { interop_cases!(full Socks $plane); } )+ }
            mod socks_auth { $( mod $plane { interop_cases!(full SocksAuth $plane); } )+ }
            mod danted { $( mod $plane { interop_cases!(full Danted $plane); } )+ }
            mod danted_auth { $( mod $plane { interop_cases!(full DantedAuth $plane); } )+ }
            mod microsocks { $( mod $plane { interop_cases!(no_half_close Microsocks $plane); } )+ }
            mod microsocks_auth { $( mod $plane { interop_cases!(no_half_close MicrosocksAuth $plane); } )+ }
            mod ss { $( mod $plane { interop_cases!(full Ss $plane); } )+ }
            mod socks_via_ss { $( mod $plane { interop_cases!(full SocksViaSs $plane); } )+ }
        }
    };
}

planes!(interop_matrix);

// ---------------------------------------------------------------------------------------------
// The curl matrix: `curl::<plane>::*`

/// One `#[test]` per `name: CurlAuth variant`, for the data plane `$plane`.
macro_rules! curl_tests {
    ($plane:ident; $($(#[$doc:meta])* $name:ident: $auth:ident;)+) => {
        $(
            $(#[$doc])*
            #[test]
            fn $name() {
                crate::run_curl(stringify!($plane), crate::CurlAuth::$auth, stringify!($name));
            }
        )+
    };
}

macro_rules! curl_matrix {
    ($($plane:ident)+) => {
        mod curl {
            $(
                mod $plane {
                    curl_tests! { $plane;
                        /// No authentication.
                        no_auth: None;
                        /// `--socks-auth USER:PASS`; wrong and missing credentials are refused.
                        auth_arg: Arg;
                        /// `--socks-auth-file` with two users; the second one is used.
                        auth_file: File;
                        /// ksocks chained to danted (`--upstream socks5://`).
                        via_danted: ViaDanted;
                        /// ksocks chained to microsocks with auth (`--upstream socks5://u:p@`).
                        via_microsocks_auth: ViaMicrosocksAuth;
                    }
                }
            )+
        }
    };
}

planes!(curl_matrix);

// ---------------------------------------------------------------------------------------------
// Bad input to ksocks --socks: `bad_input::*`

macro_rules! bad_input_tests {
    ($($(#[$doc:meta])* $name:ident: $auth:expr;)+) => {
        mod bad_input {
            $(
                $(#[$doc])*
                #[test]
                fn $name() {
                    crate::run_bad($auth, stringify!($name), crate::bad::$name);
                }
            )+
        }
    };
}

bad_input_tests! {
    /// `[5]` then FIN: closed without a reply.
    greeting_version_only_then_fin: false;
    /// A greeting announcing 3 methods carrying 2, then FIN.
    greeting_truncated_then_fin: false;
    /// NMETHODS = 0.
    greeting_no_methods: false;
    /// Only unknown methods: `[5, 0xFF]` (no acceptable method), then close.
    greeting_no_acceptable_method: false;
    /// The longest greeting (255 methods), none acceptable.
    greeting_255_methods_none_acceptable: false;
    /// The longest greeting with no-auth last, pipelined with a request and payload: works.
    greeting_255_methods_pipelined_connect: false;
    /// A SOCKS4 CONNECT.
    socks4_request: false;
    /// An HTTP GET.
    http_get: false;
    /// An HTTP CONNECT (an HTTP proxy client).
    http_connect: false;
    /// A TLS ClientHello start.
    tls_client_hello: false;
    /// 1 MiB of garbage instead of a greeting.
    flood_instead_of_greeting: false;
    /// A good greeting, then 1 MiB of garbage.
    flood_after_greeting: false;
    /// Request with VER 4.
    request_wrong_version: false;
    /// BIND: REP 7.
    request_bind: false;
    /// Command 0x09: REP 7.
    request_unknown_command: false;
    /// ATYP 0x09: REP 8.
    request_bad_atyp: false;
    /// A zero-length domain name.
    request_empty_domain: false;
    /// A domain name that is not UTF-8.
    request_non_utf8_domain: false;
    /// Half an IPv4 request, then FIN.
    request_truncated_then_fin: false;
    /// A domain request cut inside the name, then FIN.
    request_domain_truncated_then_fin: false;
    /// A name the resolver cannot find: REP 4 (host unreachable).
    request_unresolvable_name: false;
    /// Offering username/password to a server without auth: 0xFF.
    user_pass_offered_without_auth_configured: false;
    /// With auth required, a client offering only no-auth gets 0xFF.
    auth_required_no_auth_offered: true;
    /// Wrong password: status 1, then close.
    auth_wrong_password: true;
    /// Unknown user: status 1, then close.
    auth_unknown_user: true;
    /// 255-byte username and password (the maximum), wrong: status 1.
    auth_max_length_credentials: true;
    /// Empty username.
    auth_empty_username: true;
    /// Sub-negotiation version 5 instead of 1.
    auth_wrong_subnegotiation_version: true;
    /// Auth request cut inside the username, then FIN.
    auth_truncated_then_fin: true;
    /// A correct pipelined auth then a bad request: REP 8.
    auth_ok_then_bad_request: true;
    /// The client resets in the middle of its greeting.
    reset_during_handshake: false;
    /// Nothing sent: closed after the 2 s handshake timeout, without a reply.
    slowloris_silent: false;
    /// One byte per second: closed 2 s after connecting (the timeout is not per byte).
    slowloris_one_byte_per_second: false;
    /// A greeting, then silence: closed after 2 s.
    slowloris_silent_after_greeting: false;
    /// With auth: method selected, then silence.
    slowloris_silent_after_method_selection: true;
    /// 100 bad and silent clients at once; all closed, ksocks and the bystander unaffected.
    hundred_bad_clients_at_once: false;
}
