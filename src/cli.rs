//! Command-line parsing: `parse(args) -> Command`, testable without a process.
//!
//! Every flag is listed in `HELP`; anything else is an error, never silently ignored.

use crate::handshake::Credential;
use crate::upstream::{self, Upstream};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

pub const HELP: &str = "\
ksocks: transparent TCP and UDP proxy whose TCP data plane runs in the kernel (tc BPF, sockmap or splice)

Usage: ksocks [OPTIONS]   (at least one listener)

Listeners (each repeatable):
  -r, --redirect ADDR        accept connections redirected by nftables/iptables REDIRECT;
                             the destination comes from SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST.
                             An IPv6 ADDR is IPv6-only: use -r 0.0.0.0:P -r [::]:P for both.
  -t, --tproxy ADDR          accept connections diverted by TPROXY (IP_TRANSPARENT);
                             the destination is the accepted socket's local address.
  -s, --socks ADDR           a SOCKS5 server (RFC 1928: CONNECT and UDP ASSOCIATE)
  -T, --udp-tproxy ADDR      receive UDP diverted by TPROXY; replies leave from the address
                             the client sent to (an IPv6 ADDR is IPv6-only, as for -r)

SOCKS5 server:
      --socks-auth USER:PASS require RFC 1929 username/password (repeatable); without it
                             no authentication is asked (warned about off loopback)
      --socks-auth-file PATH the same, one USER:PASS per line (keeps secrets out of ps)
      --handshake-timeout SECS  close clients that do not finish the handshake (default 10)

Upstream:
  -u, --upstream URL         where connections go (default direct):
                               direct
                               socks5://[USER:PASS@]HOST:PORT
                               ss://none@HOST:PORT or ss://BASE64URL(none:PASSWORD)@HOST:PORT
                             (shadowsocks without encryption: only unencrypted streams can be
                             spliced in the kernel). HOST is an IP address ([v6] in brackets)
                             or a name, resolved by the system resolver off the
                             event loop at start and again when connecting fails.

UDP (-T and SOCKS5 UDP ASSOCIATE, one association per client address:port, full cone):
      --udp-timeout SECS     end associations idle this long (default 60; DNS: once answered)
      --udp-max N            at most N associations (default 4096; when full the oldest idle ends)

Data plane:
      --dataplane MODE       auto | tcsplice | sockmap | splice | copy (default auto =
                             splice, which measured fastest of those with two TCP stacks;
                             sockmap moves every byte in the kernel with no proxy CPU;
                             tcsplice hands each connection to tc BPF after a quiet moment,
                             needs CAP_NET_ADMIN and Ethernet devices; see README)
      --splice-dev IFACE     tcsplice: an interface whose ingress the program watches
                             (repeatable; default every Ethernet interface that is up and
                             not a bridge/bond port, because a spliced packet must be
                             caught wherever it enters the router)
      --buffer-size BYTES    copy-loop buffer per direction (default 16384)
      --inflight-max BYTES   sockmap: bytes one direction may have in flight before the
                             source is paused (default 4194304)
      --sndbuf BYTES         sockmap: SO_SNDBUF of spliced sockets (default 0 = the kernel's
                             autotuning). The kernel retries a full socket one tick later, so
                             e.g. 8388608 moves bulk data faster on fast links, at the cost of
                             that much more memory behind each slow reader

Connections:
      --max-conns N          stop accepting at N open connections (default 4096)
      --connect-timeout SECS upstream connect timeout (default 10)
      --idle-timeout SECS    close connections idle this long (default 0 = never)
      --mark N               set SO_MARK N (decimal or 0x hex) on upstream sockets, so a
                             firewall rule can exempt them (loop avoidance)

Process:
      --user NAME            after setup, drop to this user and its group (-T keeps 2 capabilities)
  -v, --verbose              more logs: -v one line per connection, -vv data-plane events
  -q, --quiet                no logs except fatal errors
  -h, --help                 print this help
  -V, --version              print the version

Signals: SIGUSR1 prints a stats line; SIGINT/SIGTERM close everything and exit 0.
";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    Redirect,
    Tproxy,
    Socks,
}

impl fmt::Display for ListenerKind {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            ListenerKind::Redirect => "redirect",
            ListenerKind::Tproxy => "tproxy",
            ListenerKind::Socks => "socks",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dataplane {
    Auto,
    Tcsplice,
    Sockmap,
    Splice,
    Copy,
}

impl fmt::Display for Dataplane {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Dataplane::Auto => "auto",
            Dataplane::Tcsplice => "tcsplice",
            Dataplane::Sockmap => "sockmap",
            Dataplane::Splice => "splice",
            Dataplane::Copy => "copy",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub listeners: Vec<(ListenerKind, SocketAddr)>,
    pub dataplane: Dataplane,
    /// `--splice-dev` (empty: tcsplice's default).
    pub splice_devs: Vec<String>,
    pub max_conns: usize,
    pub connect_timeout: Duration,
    /// `None` means never time out idle connections.
    pub idle_timeout: Option<Duration>,
    pub mark: Option<u32>,
    pub buffer_size: usize,
    pub inflight_max: u64,
    /// SO_SNDBUF for sockmap sockets, 0 for the kernel's autotuning.
    pub sndbuf: usize,
    pub user: Option<String>,
    /// See `log`: -1 quiet, 0 default, 1 and more verbose.
    pub verbosity: i8,
    /// `--socks-auth` credentials; empty means no authentication.
    pub socks_auth: Vec<Credential>,
    pub handshake_timeout: Duration,
    pub upstream: Upstream,
    pub udp_listeners: Vec<SocketAddr>,
    pub udp_timeout: Duration,
    pub udp_max: usize,
}

/// Parses one `USER:PASS` (split at the first colon; both non-empty, at most 255 bytes).
pub fn parse_credential(text: &str) -> Result<Credential, CliError> {
    match text.split_once(':') {
        Some((u, p)) if (1..=255).contains(&u.len()) && (1..=255).contains(&p.len()) => {
            Ok((u.as_bytes().to_vec(), p.as_bytes().to_vec()))
        }
        _ => Err(CliError(
            "--socks-auth: expected USER:PASS, each 1 to 255 bytes".into(),
        )),
    }
}

/// Reads `--socks-auth-file`: one `USER:PASS` per line; blank lines and `#` comments skipped.
fn read_credentials(path: &str) -> Result<Vec<Credential>, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError(format!("--socks-auth-file {path}: {e}")))?;
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(parse_credential)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CliError(format!("--socks-auth-file {path}: {}", e.0)))
}

#[derive(Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // made once per process
pub enum Command {
    Run(Config),
    Help,
    Version,
}

#[derive(Debug, PartialEq, Eq)]
pub struct CliError(pub String);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} (try --help)", self.0)
    }
}

impl From<lexopt::Error> for CliError {
    fn from(e: lexopt::Error) -> CliError {
        CliError(e.to_string())
    }
}

/// Parses `value` with `FromStr`, naming the flag in the error.
fn parse_value<T: std::str::FromStr>(flag: &str, value: std::ffi::OsString) -> Result<T, CliError> {
    let text = value
        .into_string()
        .map_err(|_| CliError(format!("{flag}: not valid UTF-8")))?;
    text.parse()
        .map_err(|_| CliError(format!("{flag}: invalid value '{text}'")))
}

/// A firewall mark, decimal or `0x` hexadecimal as nft and iptables write it.
fn parse_mark(value: std::ffi::OsString) -> Result<u32, CliError> {
    let text: String = parse_value("--mark", value)?;
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| CliError(format!("--mark: invalid value '{text}'")))
}

fn in_range<T: PartialOrd + fmt::Display>(flag: &str, v: T, lo: T, hi: T) -> Result<T, CliError> {
    if v < lo || v > hi {
        return Err(CliError(format!("{flag}: {v} is outside {lo}..={hi}")));
    }
    Ok(v)
}

pub fn parse<I>(args: I) -> Result<Command, CliError>
where
    I: IntoIterator,
    I::Item: Into<std::ffi::OsString>,
{
    use lexopt::prelude::*;

    let mut listeners = Vec::new();
    let mut dataplane = Dataplane::Auto;
    let mut splice_devs = Vec::new();
    let mut max_conns = 4096;
    let mut connect_timeout = 10;
    let mut idle_timeout = 0;
    let mut mark = None;
    let mut buffer_size = 16384;
    let mut inflight_max = 4 << 20;
    let mut sndbuf = 0;
    let mut user = None;
    let mut verbosity: i8 = 0;
    let mut socks_auth = Vec::new();
    let mut handshake_timeout = 10;
    let mut upstream = Upstream::Direct;
    let mut udp_listeners = Vec::new();
    let mut udp_timeout = 60;
    let mut udp_max = 4096;

    let mut parser = lexopt::Parser::from_iter(
        std::iter::once("ksocks".into()).chain(args.into_iter().map(Into::into)),
    );
    while let Some(arg) = parser.next()? {
        match arg {
            Short('r') | Long("redirect") => {
                listeners.push((
                    ListenerKind::Redirect,
                    parse_value("--redirect", parser.value()?)?,
                ));
            }
            Short('t') | Long("tproxy") => {
                listeners.push((
                    ListenerKind::Tproxy,
                    parse_value("--tproxy", parser.value()?)?,
                ));
            }
            Short('s') | Long("socks") => {
                listeners.push((
                    ListenerKind::Socks,
                    parse_value("--socks", parser.value()?)?,
                ));
            }
            Short('T') | Long("udp-tproxy") => {
                udp_listeners.push(parse_value("--udp-tproxy", parser.value()?)?);
            }
            Long("udp-timeout") => {
                let v = parse_value("--udp-timeout", parser.value()?)?;
                udp_timeout = in_range("--udp-timeout", v, 1, 86400)?;
            }
            Long("udp-max") => {
                let v = parse_value("--udp-max", parser.value()?)?;
                udp_max = in_range("--udp-max", v, 1, 1 << 20)?;
            }
            Long("socks-auth") => {
                let v: String = parse_value("--socks-auth", parser.value()?)?;
                socks_auth.push(parse_credential(&v)?);
            }
            Long("socks-auth-file") => {
                let path: String = parse_value("--socks-auth-file", parser.value()?)?;
                socks_auth.extend(read_credentials(&path)?);
            }
            Long("handshake-timeout") => {
                let v = parse_value("--handshake-timeout", parser.value()?)?;
                handshake_timeout = in_range("--handshake-timeout", v, 1, 3600)?;
            }
            Short('u') | Long("upstream") => {
                let v: String = parse_value("--upstream", parser.value()?)?;
                upstream = upstream::parse(&v).map_err(|e| CliError(format!("--upstream: {e}")))?;
            }
            Long("dataplane") => {
                let v: String = parse_value("--dataplane", parser.value()?)?;
                dataplane = match v.as_str() {
                    "auto" => Dataplane::Auto,
                    "tcsplice" => Dataplane::Tcsplice,
                    "sockmap" => Dataplane::Sockmap,
                    "splice" => Dataplane::Splice,
                    "copy" => Dataplane::Copy,
                    _ => {
                        return Err(CliError(format!(
                            "--dataplane: '{v}' is not auto, tcsplice, sockmap, splice or copy"
                        )))
                    }
                };
            }
            Long("splice-dev") => splice_devs.push(parse_value("--splice-dev", parser.value()?)?),
            Long("max-conns") => {
                max_conns = in_range(
                    "--max-conns",
                    parse_value("--max-conns", parser.value()?)?,
                    1,
                    1 << 20,
                )?;
            }
            Long("connect-timeout") => {
                let v = parse_value("--connect-timeout", parser.value()?)?;
                connect_timeout = in_range("--connect-timeout", v, 1, 3600)?;
            }
            Long("idle-timeout") => {
                let v = parse_value("--idle-timeout", parser.value()?)?;
                idle_timeout = in_range("--idle-timeout", v, 0, 30 * 86400)?;
            }
            Long("mark") => mark = Some(parse_mark(parser.value()?)?),
            Long("buffer-size") => {
                let v = parse_value("--buffer-size", parser.value()?)?;
                buffer_size = in_range("--buffer-size", v, 512, 16 << 20)?;
            }
            Long("inflight-max") => {
                let v = parse_value("--inflight-max", parser.value()?)?;
                inflight_max = in_range("--inflight-max", v, 64 << 10, 1 << 32)?;
            }
            Long("sndbuf") => {
                sndbuf = in_range(
                    "--sndbuf",
                    parse_value("--sndbuf", parser.value()?)?,
                    0,
                    1 << 30,
                )?;
            }
            Long("user") => user = Some(parse_value("--user", parser.value()?)?),
            Short('v') | Long("verbose") => verbosity = verbosity.saturating_add(1).max(1),
            Short('q') | Long("quiet") => verbosity = -1,
            Short('h') | Long("help") => return Ok(Command::Help),
            Short('V') | Long("version") => return Ok(Command::Version),
            _ => return Err(arg.unexpected().into()),
        }
    }
    if listeners.is_empty() && udp_listeners.is_empty() {
        return Err(CliError(
            "no listener: give at least one --redirect, --tproxy, --socks or --udp-tproxy".into(),
        ));
    }
    if !splice_devs.is_empty() && dataplane != Dataplane::Tcsplice {
        return Err(CliError(
            "--splice-dev: only for --dataplane tcsplice".into(),
        ));
    }
    Ok(Command::Run(Config {
        listeners,
        dataplane,
        splice_devs,
        max_conns,
        connect_timeout: Duration::from_secs(connect_timeout),
        idle_timeout: (idle_timeout > 0).then(|| Duration::from_secs(idle_timeout)),
        mark,
        buffer_size,
        inflight_max,
        sndbuf,
        user,
        verbosity,
        socks_auth,
        handshake_timeout: Duration::from_secs(handshake_timeout),
        upstream,
        udp_listeners,
        udp_timeout: Duration::from_secs(udp_timeout),
        udp_max,
    }))
}

#[cfg(test)]
#[path = "cli_tests.rs"]
mod tests;
