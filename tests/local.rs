//! The README's local-host recipe, run as written: ksocks proxies the router's own connections
//! (an nftables OUTPUT rule redirects them), and `--mark` (or `--user` with `meta skuid`)
//! keeps ksocks' upstream connections out of that rule. The recipe is read from README.md's
//! "Local host" section, so the documented commands are the ones tested.
//!
//! Clients run in the router namespace and connect to the server namespace; every byte is
//! checked by hash, on each data plane. Run as root: `cargo test --test local`.

mod common;

use common::cases::CaseCtx;
use common::*;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

const SERVER_PORT: u16 = 5001;
const MIB: u64 = 1024 * 1024;

/// The recipe from README.md: ksocks' arguments and the `nft` commands, in order.
struct Recipe {
    args: Vec<String>,
    nft: Vec<String>,
}

fn recipe() -> Recipe {
    let readme = include_str!("../README.md");
    let section = readme
        .split("### Local host")
        .nth(1)
        .expect("README.md has a \"### Local host\" section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the Local host section has a ```sh block");
    let mut args = Vec::new();
    let mut nft = Vec::new();
    for line in block.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("ksocks ") {
            args = rest
                .trim_end_matches('&')
                .split_whitespace()
                .map(String::from)
                .collect();
        } else if line.starts_with("nft ") {
            nft.push(line.to_string());
        }
    }
    assert!(
        !args.is_empty(),
        "no ksocks command in the recipe:\n{block}"
    );
    assert!(
        nft.len() >= 4,
        "expected the recipe's nft commands:\n{block}"
    );
    Recipe { args, nft }
}

/// Runs `cmd` with `sh -c` in namespace `ns` (the recipe's commands carry shell quoting).
fn sh_in(ns: &str, cmd: &str) {
    run_checked(Command::new("ip").args(["netns", "exec", ns, "sh", "-c", cmd]))
        .unwrap_or_else(|e| panic!("{e}"));
}

struct Ctx {
    topo: Topology,
    ks: Ksocks,
}

impl Ctx {
    fn dst(&self) -> SocketAddr {
        self.topo.server_addr(Family::V4, SERVER_PORT)
    }
}

impl CaseCtx for Ctx {
    fn listen(&self) -> TcpListener {
        self.topo.server_listener(Family::V4, SERVER_PORT)
    }
    /// A connection made by a program on the router itself.
    fn connect(&self) -> TcpStream {
        let dst = self.dst();
        let s = self
            .topo
            .in_router(move || TcpStream::connect_timeout(&dst, Duration::from_secs(5)))
            .join()
            .expect("router connect thread")
            .unwrap_or_else(|e| panic!("router connect to {dst}: {e}"));
        with_timeouts(&s, Duration::from_secs(30));
        s
    }
    fn connect_with(&self, first: &[u8]) -> TcpStream {
        let mut s = self.connect();
        s.write_all(first).expect("client: first bytes");
        s
    }
    fn expect_close(&self, up: u64, down: u64, end: &str) {
        let line = self.ks.expect_close_line(up, down, end);
        // The destination is the server, recovered from the OUTPUT redirect's conntrack entry.
        assert!(
            line.contains(&format!("-> {} ", self.dst())),
            "close line without the original destination {}: {line}",
            self.dst()
        );
    }
    fn expect_end(&self, ends: &[&str]) -> String {
        self.ks.expect_end(ends)
    }
    fn label(&self) -> String {
        " (local host)".into()
    }
}

/// How ksocks' own connections are kept out of the OUTPUT rule.
#[derive(Clone, Copy, Debug)]
enum Exempt {
    /// As the recipe is written: `--mark` and `meta mark ... return`.
    Mark,
    /// The recipe's alternative: ksocks runs as a dedicated user (`--user nobody` here, in
    /// place of `--mark`) and the rule returns on `meta skuid`.
    User,
    /// `--mark` as the recipe has it, with ksocks also dropping to `--user nobody`: it must
    /// keep CAP_NET_ADMIN, without which SO_MARK fails on every upstream socket.
    MarkAsUser,
    /// Neither: ksocks' own upstream connections are redirected to ksocks again.
    Nothing,
}

fn setup(plane: &str, exempt: Exempt) -> Ctx {
    let r = recipe();
    // The topology's own PREROUTING rule only sees the client namespace's traffic; the
    // router's own connections meet only the recipe's OUTPUT rule.
    let topo = Topology::new(Inbound::Redirect, 12345);
    let mut args: Vec<String> = r.args.clone();
    let mut nft = r.nft.clone();
    if !matches!(exempt, Exempt::Mark | Exempt::MarkAsUser) {
        let at = args
            .iter()
            .position(|a| a == "--mark")
            .expect("the recipe uses --mark");
        args.drain(at..at + 2);
    }
    if let Exempt::User = exempt {
        args.extend(["--user".into(), "nobody".into()]);
        let rule = nft
            .iter_mut()
            .find(|l| l.contains("meta mark"))
            .expect("the recipe's mark rule");
        let mark_at = rule.find("meta mark").unwrap();
        rule.replace_range(mark_at.., "meta skuid nobody return");
    }
    if let Exempt::MarkAsUser = exempt {
        args.extend(["--user".into(), "nobody".into()]);
    }
    for cmd in &nft {
        sh_in(&topo.router, cmd);
    }
    args.extend(["--dataplane".into(), plane.into()]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let ks = Ksocks::start(&topo, &argv);
    Ctx { topo, ks }
}

fn run_case(plane: &str, exempt: Exempt, case: fn(&mut Ctx)) {
    if !require_root() {
        return;
    }
    let mut c = setup(plane, exempt);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        case(&mut c);
        c.ks.assert_idle();
    }));
    if let Err(e) = r {
        eprintln!(
            "--- ksocks log (local host, {plane}, {exempt:?}), last 30 lines ---\n{}",
            c.ks.log_tail(30)
        );
        std::panic::resume_unwind(e);
    }
}

fn upload_then_reply(c: &mut Ctx) {
    common::cases::upload_then_reply(c, 8 * MIB, 4 * MIB);
}

fn ping_pong(c: &mut Ctx) {
    common::cases::ping_pong_from_first_byte(c, 200, Duration::from_millis(20), false);
}

fn half_close_late_reply(c: &mut Ctx) {
    common::cases::half_close_late_reply(c, Duration::from_millis(300));
}

fn client_reset_mid_transfer(c: &mut Ctx) {
    common::cases::client_reset_mid_transfer(c);
}

macro_rules! planes {
    ($($plane:ident)*) => {$(
        mod $plane {
            use super::Exempt::{Mark, MarkAsUser, User};
            #[test]
            fn upload_then_reply() {
                super::run_case(stringify!($plane), Mark, super::upload_then_reply);
            }
            #[test]
            fn ping_pong() {
                super::run_case(stringify!($plane), Mark, super::ping_pong);
            }
            #[test]
            fn half_close_late_reply() {
                super::run_case(stringify!($plane), Mark, super::half_close_late_reply);
            }
            #[test]
            fn client_reset_mid_transfer() {
                super::run_case(stringify!($plane), Mark, super::client_reset_mid_transfer);
            }
            #[test]
            fn user_instead_of_mark() {
                super::run_case(stringify!($plane), User, super::upload_then_reply);
            }
            #[test]
            fn mark_with_user() {
                super::run_case(stringify!($plane), MarkAsUser, |c| {
                    super::upload_then_reply(c);
                    assert!(c.ks.log().contains("keeping capabilities [12]"), "{}", c.ks.log_tail(20));
                });
            }
        }
    )*};
}

planes!(copy splice sockmap);

/// Without the exemption each upstream connection of ksocks is redirected to ksocks again, and
/// every hop would open the next until the connection limit. ksocks recognises its own
/// upstream socket as the client, refuses that hop with a log line naming the fix, and the
/// program on the router gets a refusal instead of a hang.
#[test]
fn without_exemption_the_loop_is_refused() {
    run_case("copy", Exempt::Nothing, |c| {
        let _server = c.listen(); // never reached
        let dst = c.dst();
        let r = c
            .topo
            .in_router(move || TcpStream::connect_timeout(&dst, Duration::from_secs(5)))
            .join()
            .expect("router connect thread");
        // Refused: reset before connect() returned, or closed right after, without data.
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connect: {e}"),
            Ok(mut s) => {
                with_timeouts(&s, Duration::from_secs(5));
                let _ = s.write_all(b"hello");
                expect_eof(&mut s, "client of a proxy loop");
            }
        }
        let line = c.ks.expect_end(&["loop"]);
        assert!(line.contains(&format!("-> {} ", c.dst())), "{line}");
        assert!(
            c.ks.wait_for_log("proxy loop", Duration::from_secs(5)),
            "no proxy-loop log line:\n{}",
            c.ks.log_tail(10)
        );
        assert!(
            c.ks.log().contains("--mark or --user"),
            "the log names the fix"
        );
        wait_until(Duration::from_secs(5), || c.ks.stats().open() == 0);
        let total = c.ks.stats().get("total");
        assert_eq!(total, 2, "one connection and one refused hop, not a chain");
    });
}
