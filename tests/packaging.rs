//! Packaging: the OpenWrt feed package's init script against a recording stand-in of procd
//! and UCI (packaging/shim.rs, packaging/openwrt.rs, packaging/openwrt_udp.rs), its fw4 rules
//! with real TCP and UDP traffic in namespaces (packaging/fw4.rs, packaging/fw4_udp.rs); here,
//! every shell script through shellcheck, the systemd package's example rules and arguments
//! with real traffic, and UDP TPROXY under exactly the unit's capabilities.
//!
//! Run as root for the namespace tests: `cargo test --test packaging`.

mod common;

#[path = "packaging/fw4.rs"]
mod fw4;
#[path = "packaging/fw4_udp.rs"]
mod fw4_udp;
#[path = "packaging/openwrt.rs"]
mod openwrt;
#[path = "packaging/openwrt_udp.rs"]
mod openwrt_udp;
#[path = "packaging/shim.rs"]
mod shim;

use common::peers::{remove_intercept_rule, require_tools};
use common::*;
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Every shell script in the repository: tracked files starting with a `sh`, `bash` or
/// `rc.common` shebang, and `*.sh` files (the shim's libraries, which name their dialect).
fn shell_scripts() -> Vec<String> {
    let out = Command::new("git")
        .args([
            "-C",
            ROOT,
            "ls-files",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .output()
        .expect("git ls-files");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|f| {
            let first = std::fs::read(Path::new(ROOT).join(f))
                .map(|b| b.split(|&c| c == b'\n').next().unwrap_or(&[]).to_vec())
                .unwrap_or_default();
            let first = String::from_utf8_lossy(&first);
            f.ends_with(".sh")
                || (first.starts_with("#!")
                    && ["sh", "bash", "rc.common"]
                        .iter()
                        .any(|s| first.split_whitespace().any(|w| w.ends_with(s))))
        })
        .map(String::from)
        .collect()
}

/// shellcheck finds nothing in any shell script (all severities).
#[test]
fn shellcheck_every_script() {
    if !require_tools(&["shellcheck", "git"]) {
        return;
    }
    let scripts = shell_scripts();
    for want in [
        ".ci/run",
        "scripts/demo",
        "scripts/test-packages",
        "packaging/openwrt/net/ksocks/files/ksocks.init",
        "packaging/openwrt/test/shim/lib/functions/procd.sh",
    ] {
        assert!(
            scripts.iter().any(|s| s == want),
            "{want} not found: {scripts:?}"
        );
    }
    let out = Command::new("shellcheck")
        .current_dir(ROOT)
        .args(["--external-sources", "--format=gcc"])
        .args(&scripts)
        .output()
        .expect("run shellcheck");
    assert!(
        out.status.success(),
        "shellcheck on {} scripts:\n{}{}",
        scripts.len(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("shellcheck: {} scripts clean", scripts.len());
}

/// The systemd package's example: ksocks with the arguments of /etc/default/ksocks behind the
/// rules of the example nft file (its LAN set to the test's client side), both families
/// proxied with every byte verified; ksocks' own marked connections are exempt.
#[test]
fn systemd_example_rules_and_arguments() {
    if !require_root() {
        return;
    }
    let env = std::fs::read_to_string(format!("{ROOT}/packaging/systemd/ksocks.default"))
        .expect("ksocks.default");
    let args = env
        .lines()
        .find_map(|l| l.strip_prefix("KSOCKS_ARGS=\""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("KSOCKS_ARGS=\"...\" in ksocks.default");
    let args: Vec<&str> = args.split_whitespace().collect();
    let port = args
        .iter()
        .find_map(|a| a.strip_prefix("0.0.0.0:"))
        .and_then(|p| p.parse().ok())
        .expect("a 0.0.0.0:PORT listener");
    let topo = Topology::new(Inbound::Redirect, port);
    remove_intercept_rule(&topo);
    let rules = std::fs::read_to_string(format!("{ROOT}/packaging/systemd/ksocks.nft"))
        .expect("ksocks.nft")
        .replace("define LAN = \"br-lan\"", "define LAN = \"rc\"");
    assert!(
        rules.contains("define LAN = \"rc\""),
        "the example defines LAN"
    );
    let mut nft = Command::new("ip")
        .args(["netns", "exec", &topo.router, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nft");
    use std::io::Write;
    nft.stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(
        nft.wait().unwrap().success(),
        "the example rules do not load"
    );
    let ks = Ksocks::start(&topo, &args);
    for (seed, fam) in [(1, Family::V4), (3, Family::V6)] {
        let (up, down) = ((100 + seed) << 10, (150 + seed) << 10);
        let l = topo.server_listener(fam, 5001);
        let srv = std::thread::spawn(move || {
            let mut s = accept_timeout(&l, std::time::Duration::from_secs(10)).expect("accept");
            expect_stream(&mut s, seed, up, "server: upload");
            send_pattern(&mut s, seed + 1, down, 64 << 10).expect("server: reply");
        });
        let mut c = topo
            .client_connect(topo.server_addr(fam, 5001))
            .expect("connect");
        send_all_and_shutdown(&mut c, seed, up);
        expect_stream(&mut c, seed + 1, down, "client: reply");
        join(srv);
        let line = ks.expect_close_line(up, down, "done");
        assert!(
            line.contains(&format!("-> {} ", topo.server_addr(fam, 5001))),
            "{line}"
        );
    }
    ks.assert_idle();
}

/// The unit's capabilities cover UDP: ksocks with the example arguments plus `-T` listeners,
/// run as a non-root user holding exactly the unit's AmbientCapabilities= (no new privileges,
/// as scripts/test-packages runs the demo), answers a LAN client's DNS query diverted by
/// TPROXY, in both families. The answer leaves from a socket bound transparently to the
/// server's port 53: IP_TRANSPARENT needs CAP_NET_ADMIN (or CAP_NET_RAW), a port below 1024
/// CAP_NET_BIND_SERVICE; without either the query goes unanswered.
#[test]
fn systemd_unit_capabilities_cover_udp_tproxy() {
    use common::udp::*;
    if !require_root() || !require_tools(&["setpriv", "dnsmasq"]) {
        return;
    }
    let unit = std::fs::read_to_string(format!("{ROOT}/packaging/systemd/ksocks.service"))
        .expect("ksocks.service");
    let set = |key: &str| -> Vec<String> {
        let v = unit.lines().find_map(|l| l.strip_prefix(key));
        let v = v.unwrap_or_else(|| panic!("no {key} in the unit"));
        let caps = v.split_whitespace().map(|c| c.trim_start_matches("CAP_"));
        caps.map(|c| format!("+{}", c.to_lowercase())).collect()
    };
    let caps = set("AmbientCapabilities=");
    assert_eq!(caps, set("CapabilityBoundingSet="), "ambient = bounding");
    let caps = format!("-all,{}", caps.join(","));
    let env = std::fs::read_to_string(format!("{ROOT}/packaging/systemd/ksocks.default"))
        .expect("ksocks.default");
    let args = env
        .lines()
        .find_map(|l| l.strip_prefix("KSOCKS_ARGS=\""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("KSOCKS_ARGS=\"...\" in ksocks.default");
    let port = 12345;
    let topo = Topology::new(Inbound::Redirect, port);
    let r = topo.router.clone();
    for (fam, all) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
        run_checked(
            Command::new("ip")
                .args(["-n", &r, fam, "rule", "add", "fwmark", "1"])
                .args(["lookup", "100"]),
        )
        .unwrap();
        run_checked(
            Command::new("ip")
                .args(["-n", &r, fam, "route", "add", "local", all])
                .args(["dev", "lo", "table", "100"]),
        )
        .unwrap();
    }
    add_udp_tproxy(&topo, port);
    let names = dns_names(2);
    let _dns = start_dnsmasq(&topo, &names);
    warm_up(&topo, &[Family::V4, Family::V6]);

    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &r,
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
    ])
    .args(["--clear-groups", "--no-new-privs"])
    .args([
        &format!("--inh-caps={caps}"),
        &format!("--ambient-caps={caps}"),
    ])
    .arg(format!("--bounding-set={caps}"))
    .args([KSOCKS, "-v"])
    .args(args.split_whitespace())
    .args(["-T", "0.0.0.0:12345", "-T", "[::]:12345"]);
    let ks = Unprivileged::spawn(cmd);
    for (i, fam) in [Family::V4, Family::V6].into_iter().enumerate() {
        let dst = topo.server_addr(fam, 53);
        let mut t = Plain {
            sock: client_udp(&topo, fam),
            to: dst,
        };
        let client = t.sock.local_addr().unwrap().to_string();
        let (name, v4, v6) = &names[i];
        let (qtype, want) = match fam {
            Family::V4 => (QTYPE_A, IpAddr::V4(*v4)),
            Family::V6 => (QTYPE_AAAA, IpAddr::V6(*v6)),
        };
        let answer = dns_ask(&mut t, 7 + i as u16, name, qtype, 3);
        let answer = answer.unwrap_or_else(|| panic!("{dst}: no answer; log:\n{}", ks.log()));
        assert_eq!((answer.rcode, answer.addrs), (0, vec![want]));
        assert!(
            wait_until(Duration::from_secs(5), || udp_closes(&ks.log())
                .iter()
                .any(|c| c.client == client && c.get("end") == "answered")),
            "no association of {client} answered; log:\n{}",
            ks.log()
        );
    }
    // It ran as that user with exactly those capabilities.
    let status = std::fs::read_to_string(format!("/proc/{}/status", ks.child.id())).unwrap();
    let field = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).unwrap_or("");
    assert!(
        field("Uid:").split_whitespace().all(|u| u == "65534"),
        "{status}"
    );
    let eff = u64::from_str_radix(field("CapEff:").trim(), 16).unwrap();
    assert_eq!(eff, cap_mask(&caps), "{status}");
}

/// The capability bits of a setpriv list ("-all,+net_admin,...").
fn cap_mask(list: &str) -> u64 {
    let bit = |name: &str| match name {
        "net_bind_service" => 10,
        "net_admin" => 12,
        "net_raw" => 13,
        "sys_admin" => 21,
        "bpf" => 39,
        other => panic!("capability {other}: add its number here"),
    };
    list.split(',')
        .filter_map(|c| c.strip_prefix('+'))
        .fold(0, |m, c| m | 1u64 << bit(c))
}

/// ksocks started by `cmd` (a wrapper that changes user), its stderr collected; killed on drop.
struct Unprivileged {
    child: std::process::Child,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Unprivileged {
    fn spawn(mut cmd: Command) -> Unprivileged {
        let mut child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn ksocks");
        let log = std::sync::Arc::default();
        collect_lines(
            child.stderr.take().unwrap(),
            std::sync::Arc::clone(&log),
            1 << 20,
        );
        let ks = Unprivileged { child, log };
        assert!(
            wait_until(Duration::from_secs(5), || ks
                .log()
                .contains("ksocks: ready")),
            "ksocks not ready; log:\n{}",
            ks.log()
        );
        ks
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Unprivileged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
