//! The OpenWrt init script (packaging/openwrt/net/ksocks/files/ksocks.init) under the
//! recording stand-ins of tests/packaging/shim.rs: what procd would be given for a UCI config
//! (the exact command line, limits and respawn of each instance), the validation of every
//! option, which bad values keep a section from starting and with what log line, and that
//! every ksocks flag has a UCI option.

use crate::common::peers::TempDir;
use crate::common::*;
use crate::shim::*;
use std::process::Command;

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// ksocks' own parser accepts a recorded command line (`--help` at the end makes it stop after
/// parsing every flag before it, binding nothing).
pub fn assert_ksocks_accepts(cmd: &[String]) {
    let mut args: Vec<&str> = cmd[1..].iter().map(String::as_str).collect();
    args.push("--help");
    let (code, _, err) = run_ksocks(&args, std::time::Duration::from_secs(5));
    assert_eq!(code, Some(0), "ksocks refused {args:?}: {err}");
}

pub const MINIMAL: &str = "config ksocks 'lan'\n\toption enabled '1'\n\toption upstream 'socks5://192.0.2.1:1080'\n\tlist src_device 'br-lan'\n";

/// A minimal section gives ksocks' defaults: both families on port 12345, nofile from the
/// default 4096 connections, procd's default respawn, stderr to logd, and fw4 rules.
#[test]
fn init_minimal_section() {
    if !require_shim() {
        return;
    }
    let r = Router::new(MINIMAL);
    let rec = r.run("start", None);
    let inst = rec.instances();
    assert_eq!(inst.keys().collect::<Vec<_>>(), ["lan"], "{rec:?}");
    let lan = &inst["lan"];
    assert_eq!(
        lan.command(),
        s(&[
            "/usr/sbin/ksocks",
            "--redirect",
            "0.0.0.0:12345",
            "--redirect",
            "[::]:12345",
            "--upstream",
            "socks5://192.0.2.1:1080",
        ])
    );
    assert_eq!(lan.param("limits"), ["nofile=24640 24640"]);
    assert_eq!(lan.param("respawn"), ["3600", "5", "5"]);
    assert_eq!(lan.param("stderr"), ["1"]);
    assert!(lan.param("file").is_empty());
    assert_eq!(rec.values("trigger"), ["config.change ksocks"]);
    assert_eq!(rec.values("fw4"), ["-q reload"]);
    assert!(
        rec.values("ip").is_empty(),
        "REDIRECT needs no policy route"
    );
    let fw = r.fw_include().expect("fw4 include written");
    assert!(
        fw.contains("type nat hook prerouting priority dstnat + 1;"),
        "{fw}"
    );
    assert!(fw.contains("iifname != { \"br-lan\" } return"), "{fw}");
    assert!(fw.contains("meta l4proto tcp redirect to :12345"), "{fw}");
    assert!(
        fw.contains("192.0.2.1 }"),
        "upstream address bypassed: {fw}"
    );
    assert_ksocks_accepts(lan.command());

    // The same config again: rules unchanged, so fw4 is not reloaded.
    let again = r.run("start", None);
    assert!(again.values("fw4").is_empty(), "{again:?}");
    // Stop: rules removed, fw4 reloaded, the service killed.
    let stop = r.run("stop", None);
    assert_eq!(stop.values("fw4"), ["-q reload"]);
    assert_eq!(stop.values("kill"), ["ksocks"]);
    assert!(r.fw_include().is_none());
}

/// An upstream given by name is passed on as written (ksocks resolves it), and the router's
/// resolveip answer fills the bypass sets of both families.
#[test]
fn init_upstream_by_name() {
    if !require_shim() {
        return;
    }
    let conf = MINIMAL.replace("socks5://192.0.2.1:1080", "socks5://proxy.lan:1080");
    let r = Router::new(&conf);
    let rec = r.run("start", None);
    let lan = &rec.instances()["lan"];
    assert_eq!(
        lan.command()[lan.command().len() - 2..],
        s(&["--upstream", "socks5://proxy.lan:1080"])
    );
    assert_ksocks_accepts(lan.command());
    assert_eq!(rec.values("resolveip"), ["-t 3 proxy.lan"]);
    let fw = r.fw_include().expect("fw4 include written");
    assert!(fw.contains("192.0.2.53 }"), "v4 bypass: {fw}");
    assert!(fw.contains("2001:db8::53 }"), "v6 bypass: {fw}");
    let bad = MINIMAL.replace("socks5://192.0.2.1:1080", "socks5://-proxy.lan:1080");
    let rec = Router::new(&bad).run("start", None);
    assert!(
        rec.instances().is_empty(),
        "a bad host name is refused: {rec:?}"
    );
}

/// Every option set: the exact command line, in the option table's order, and ksocks' own
/// parser accepts it. A disabled section starts nothing; two enabled ones start two instances.
#[test]
fn init_every_option() {
    if !require_shim() {
        return;
    }
    let r = Router::new("");
    let users = r.dir.write("users", "alice:secret\n", 0o600);
    let users = users.to_str().unwrap();
    r.set_config(&format!(
        "config ksocks 'tp'
	option enabled 'yes'
	option inbound 'tproxy'
	option port '12346'
	list listen '198.18.0.1'
	list listen '2001:db8::1'
	list socks '127.0.0.1:1080'
	list socks '[::1]:1081'
	option socks_auth_file '{users}'
	option handshake_timeout '5'
	list udp_tproxy '198.18.0.1:12346'
	list udp_tproxy '[2001:db8::1]:12346'
	option udp_timeout '30'
	option udp_max '100'
	option upstream 'ss://none@[2001:db8::9]:8388'
	option dataplane 'sockmap'
	option buffer_size '4096'
	option inflight_max '1048576'
	option sndbuf '8388608'
	option max_conns '100'
	option connect_timeout '3'
	option idle_timeout '600'
	option mark '0x2a'
	option verbose '2'
	option quiet '0'
	list src_device 'br-lan'
	list src_device 'wg0'
	list bypass '203.0.113.0/24'
	option proxy_router '0'
	option proxy_router_dns '1'
	option tproxy_mark '0x10'
	option route_table '123'

config ksocks 'socksonly'
	option enabled '1'
	option inbound 'none'
	list socks '192.168.1.1:1080'
	option dataplane 'tcsplice'
	list splice_dev 'br-lan'
	list splice_dev 'wan'
	option user 'nobody'
	option quiet 'on'
	option nofile '5000'

config ksocks 'off'
	option enabled '0'
	option port 'not a port'
"
    ));
    let rec = r.run("start", None);
    let inst = rec.instances();
    assert_eq!(
        inst.keys().collect::<Vec<_>>(),
        ["socksonly", "tp"],
        "{}",
        rec.log()
    );
    let tp = &inst["tp"];
    assert_eq!(
        tp.command(),
        s(&[
            "/usr/sbin/ksocks",
            "--tproxy",
            "198.18.0.1:12346",
            "--tproxy",
            "[2001:db8::1]:12346",
            "--socks",
            "127.0.0.1:1080",
            "--socks",
            "[::1]:1081",
            "--socks-auth-file",
            users,
            "--handshake-timeout",
            "5",
            "--udp-tproxy",
            "198.18.0.1:12346",
            "--udp-tproxy",
            "[2001:db8::1]:12346",
            "--udp-timeout",
            "30",
            "--udp-max",
            "100",
            "--upstream",
            "ss://none@[2001:db8::9]:8388",
            "--dataplane",
            "sockmap",
            "--buffer-size",
            "4096",
            "--inflight-max",
            "1048576",
            "--sndbuf",
            "8388608",
            "--max-conns",
            "100",
            "--connect-timeout",
            "3",
            "--idle-timeout",
            "600",
            "--mark",
            "0x2a",
            "--verbose",
            "--verbose",
        ])
    );
    // 6 per connection, 3 per UDP association, 64.
    assert_eq!(tp.param("limits"), ["nofile=964 964"]);
    assert_eq!(tp.param("file"), [users], "auth file changes restart it");
    assert_ksocks_accepts(tp.command());
    let so = &inst["socksonly"];
    assert_eq!(
        so.command(),
        s(&[
            "/usr/sbin/ksocks",
            "--socks",
            "192.168.1.1:1080",
            "--dataplane",
            "tcsplice",
            "--splice-dev",
            "br-lan",
            "--splice-dev",
            "wan",
            "--user",
            "nobody",
            "--quiet",
        ])
    );
    assert_eq!(so.param("limits"), ["nofile=5000 5000"]);
    assert_ksocks_accepts(so.command());

    // TPROXY (TCP and UDP): the policy route for the section's mark and table, made once.
    assert_eq!(
        rec.values("ip"),
        [
            "-4 rule add fwmark 0x10 lookup 123",
            "-4 route replace local 0.0.0.0/0 dev lo table 123",
            "-6 rule add fwmark 0x10 lookup 123",
            "-6 route replace local ::/0 dev lo table 123",
        ]
    );
    let fw = r.fw_include().expect("fw4 include");
    for want in [
        "chain ksocks_tp_prerouting {",
        "type filter hook prerouting priority mangle + 1;",
        "iifname != { \"br-lan\", \"wg0\" } return",
        "meta l4proto tcp tproxy ip to :12346 meta mark set 0x10 accept",
        "meta l4proto tcp tproxy ip6 to :12346 meta mark set 0x10 accept",
        "chain ksocks_tp_udp_prerouting {",
        "meta l4proto udp tproxy ip to 198.18.0.1:12346 meta mark set 0x10 accept",
        "meta l4proto udp tproxy ip6 to [2001:db8::1]:12346 meta mark set 0x10 accept",
        "iifname \"lo\" meta mark 0x10 udp dport 53 tproxy ip to 198.18.0.1:12346 accept",
        "chain ksocks_tp_udp_output {",
        "meta mark 0x2a return",
        "203.0.113.0/24",
        "2001:db8::9 }",
    ] {
        assert!(fw.contains(want), "no `{want}` in\n{fw}");
    }
    assert!(!fw.contains("socksonly"), "inbound none has no rules: {fw}");
    // Every option of the table is validated, and procd is told the schema.
    let table: Vec<String> = option_table(false)
        .iter()
        .map(|[o, t, ..]| format!("{o} {t}"))
        .collect();
    assert_eq!(rec.values("validate"), table);

    let stop = r.run("stop", None);
    assert_eq!(
        stop.values("ip"),
        [
            "-4 rule del fwmark 0x10 lookup 123",
            "-4 route flush table 123",
            "-6 rule del fwmark 0x10 lookup 123",
            "-6 route flush table 123",
        ]
    );
}

/// Each bad value keeps its section from starting, with validate_data's verdict on that
/// option (or the script's reason) in the log; a good section beside it still starts.
#[test]
fn init_rejects_bad_values() {
    if !require_shim() {
        return;
    }
    // (lines added to a section that is otherwise valid, what the log must say)
    let cases: &[(&str, &str)] = &[
        ("option enabled 'maybe'", "invalid 'enabled'"),
        ("option enabled 'Yes'", "invalid 'enabled'"),
        ("option inbound 'nat'", "bad.inbound=nat validates as"),
        ("option port '70000'", "bad.port=70000 validates as"),
        ("option port '0'", "bad.port=0 validates as"),
        ("option port '-1'", "bad.port=-1 validates as"),
        (
            "list listen '1.2.3.4.5'",
            "bad.listen[0]=1.2.3.4.5 validates as",
        ),
        ("list socks '1.2.3.4'", "bad.socks[0]=1.2.3.4 validates as"),
        ("list socks 'localhost:1080'", "bad.socks[0]=localhost:1080"),
        (
            "option socks_auth_file '/nonexistent'",
            "bad.socks_auth_file=/nonexistent",
        ),
        (
            "option handshake_timeout '0'",
            "bad.handshake_timeout=0 validates as",
        ),
        (
            "option upstream 'http://1.2.3.4:80'",
            "bad.upstream=http://1.2.3.4:80",
        ),
        (
            "option upstream 'socks5://1.2.3.4'",
            "bad.upstream=socks5://1.2.3.4 ",
        ),
        (
            "option upstream 'ss://1.2.3.4:8388'",
            "bad.upstream=ss://1.2.3.4:8388",
        ),
        (
            "option dataplane 'turbo'",
            "bad.dataplane=turbo validates as",
        ),
        (
            "list splice_dev 'br lan'",
            "bad.splice_dev[0]=br lan validates as",
        ),
        (
            "option buffer_size '100'",
            "bad.buffer_size=100 validates as",
        ),
        (
            "option inflight_max '1k'",
            "bad.inflight_max=1k validates as",
        ),
        ("option sndbuf '-1'", "bad.sndbuf=-1 validates as"),
        ("option max_conns '0'", "bad.max_conns=0 validates as"),
        (
            "option connect_timeout '3601'",
            "bad.connect_timeout=3601 validates as",
        ),
        (
            "option idle_timeout 'forever'",
            "bad.idle_timeout=forever validates as",
        ),
        ("option mark '0'", "bad.mark=0 validates as"),
        ("option mark '0xzz'", "bad.mark=0xzz validates as"),
        ("option user 'Root!'", "bad.user=Root! validates as"),
        ("option verbose '3'", "bad.verbose=3 validates as"),
        ("option quiet 'maybe'", "bad.quiet=maybe validates as"),
        (
            "list src_device 'br lan'",
            "bad.src_device[1]=br lan validates as",
        ),
        (
            "list bypass '10.0.0.0/33'",
            "bad.bypass[0]=10.0.0.0/33 validates as",
        ),
        ("option proxy_router '2'", "bad.proxy_router=2 validates as"),
        (
            "option tproxy_mark 'mark'",
            "bad.tproxy_mark=mark validates as",
        ),
        (
            "option route_table '254'",
            "bad.route_table=254 validates as",
        ),
        ("option nofile '10'", "bad.nofile=10 validates as"),
        // validate_data passes a list whose last entry is valid; the script counts them.
        (
            "list listen 'nope'\n\tlist listen '::'",
            "invalid entry in list 'listen'",
        ),
        // Between options.
        (
            "option inbound 'none'",
            "inbound 'none' needs a 'socks' or 'udp_tproxy' listener",
        ),
        (
            "option inbound 'tproxy'\n\toption proxy_router '1'",
            "proxy_router needs inbound 'redirect'",
        ),
        ("option proxy_router '1'", "needs 'mark' (or 'user')"),
        (
            "option inbound 'tproxy'\n\toption mark '1'\n\toption tproxy_mark '0x1'",
            "'mark' must differ from 'tproxy_mark'",
        ),
        // Unknown options (a typo, or a flag ksocks does not have yet).
        ("option upsteam 'direct'", "unknown option(s): upsteam"),
        (
            "list splice_dev 'eth0'",
            "section 'bad': splice_dev needs dataplane 'tcsplice'",
        ),
    ];
    assert_rejected(cases);
}

/// Each case (lines added to a section 'bad' beside the valid MINIMAL one, what the log must
/// say) keeps 'bad' from starting and from getting firewall rules, with that reason in the
/// system log, and 'lan' still starts.
pub fn assert_rejected(cases: &[(&str, &str)]) {
    // Four routers at a time: each case is a few shell and Python start-ups.
    let check = |lines: &str, want: &str| {
        let r = Router::new("");
        r.set_config(&format!(
            "{MINIMAL}\nconfig ksocks 'bad'\n\toption enabled '1'\n\toption port '1234'\n\tlist src_device 'br-lan'\n\t{lines}\n"
        ));
        let rec = r.run("start", None);
        let inst = rec.instances();
        let log = rec.log();
        assert!(
            !inst.contains_key("bad"),
            "{lines:?} accepted: {:?}\nlog:\n{log}",
            inst.get("bad")
        );
        assert!(
            inst.contains_key("lan"),
            "{lines:?} stopped the good section"
        );
        assert!(
            log.contains(want),
            "{lines:?}: no `{want}` in the log:\n{log}"
        );
        if want.contains("validates as") {
            let line = log.lines().find(|l| l.contains(want)).unwrap();
            assert!(line.ends_with("with false"), "{line}");
        }
        assert!(
            log.contains("logger: -t ksocks -p daemon.err section 'bad'"),
            "{lines:?}: the reason is not in the system log:\n{log}"
        );
        let fw = r.fw_include().unwrap_or_default();
        assert!(!fw.contains("ksocks_bad_"), "{lines:?} got firewall rules");
        assert!(fw.contains("ksocks_lan_"), "{lines:?}: no rules for 'lan'");
        // 'lan' (REDIRECT, TCP only) needs no policy route: any would be 'bad's.
        assert!(rec.values("ip").is_empty(), "{lines:?} got a policy route");
    };
    std::thread::scope(|scope| {
        for chunk in cases.chunks(cases.len().div_ceil(4)) {
            scope.spawn(move || chunk.iter().for_each(|(l, w)| check(l, w)));
        }
    });
}

/// Every ksocks flag (`ksocks --help`) is reachable from UCI: an option of the table, or one
/// the script derives (listeners from inbound/listen/port), or one left out on purpose
/// (`--socks-auth` would put passwords in ps; `socks_auth_file` is the UCI way).
#[test]
fn every_flag_has_a_uci_option() {
    let (code, help, _) = run_ksocks(&["--help"], std::time::Duration::from_secs(5));
    assert_eq!(code, Some(0));
    let flags: Vec<String> = help
        .lines()
        .filter(|l| l.starts_with("  -") || l.starts_with("      --"))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("--")))
        .map(|w| w.trim_end_matches(',').to_string())
        .collect();
    assert!(flags.len() > 15, "parsed {flags:?} from --help");
    let table = option_table(false);
    let derived = [
        "--redirect",
        "--tproxy",
        "--socks-auth",
        "--help",
        "--version",
    ];
    let missing: Vec<&String> = flags
        .iter()
        .filter(|f| !derived.contains(&f.as_str()) && !table.iter().any(|r| &r[2] == *f))
        .collect();
    assert!(
        missing.is_empty(),
        "ksocks flags with no UCI option: {missing:?}; add a line each to options() in \
         packaging/openwrt/net/ksocks/files/ksocks.init (its commented lines are ready for UDP)"
    );
    // The commented lines are for flags ksocks does not have yet: once it has one, the line
    // must be enabled.
    for [opt, _, flag, _] in option_table(true) {
        assert!(
            !flags.contains(&flag),
            "ksocks has {flag} now: uncomment `{opt}` in options() of ksocks.init"
        );
    }
    // The example config names only options the script knows.
    let conf = std::fs::read_to_string(format!("{OPENWRT}/net/ksocks/files/ksocks.config"))
        .expect("ksocks.config");
    let future: Vec<String> = option_table(true)
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    for line in conf.lines().map(|l| l.trim().trim_start_matches('#')) {
        let mut w = line.split_whitespace();
        if let (Some("option" | "list"), Some(name)) = (w.next(), w.next()) {
            assert!(
                table.iter().any(|r| r[0] == name) || future.iter().any(|f| f == name),
                "ksocks.config uses `{name}`, which ksocks.init does not know"
            );
        }
    }
}

/// The example config as shipped starts nothing (disabled), and once enabled is valid.
#[test]
fn example_config() {
    if !require_shim() {
        return;
    }
    let conf = std::fs::read_to_string(format!("{OPENWRT}/net/ksocks/files/ksocks.config"))
        .expect("ksocks.config");
    let r = Router::new(&conf);
    let rec = r.run("start", None);
    assert!(rec.instances().is_empty(), "{rec:?}");
    assert!(r.fw_include().is_none());
    r.set_config(&conf.replace("option enabled '0'", "option enabled '1'"));
    let rec = r.run("start", None);
    let lan = rec
        .instances()
        .remove("lan")
        .expect("enabled example starts");
    assert_ksocks_accepts(lan.command());
    assert!(
        rec.log().lines().all(|l| !l.starts_with("logger")),
        "{}",
        rec.log()
    );
}

/// The uci-defaults script adds the firewall include once, and leaves an existing one alone.
#[test]
fn uci_defaults_adds_the_fw4_include() {
    if !require_shim() {
        return;
    }
    let dir = TempDir::new("ucidefaults");
    let out = dir.0.join("record");
    let script = format!("{OPENWRT}/net/ksocks/files/ksocks.uci-defaults");
    let path = format!(
        "{OPENWRT}/test/shim/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    let run = |existing: Option<&str>| -> String {
        let _ = std::fs::remove_file(&out);
        let mut c = Command::new("sh");
        c.arg(&script).env("PATH", &path).env("SHIM_OUT", &out);
        if let Some(v) = existing {
            c.env("SHIM_UCI_GET", v);
        }
        let st = c.status().expect("run uci-defaults");
        assert!(
            st.success(),
            "uci-defaults must exit 0 (or it is run again)"
        );
        std::fs::read_to_string(&out).unwrap_or_default()
    };
    assert_eq!(
        run(None),
        "uci\t-q get firewall.ksocks\nuci\t-q batch\n\
         uci-batch\tset firewall.ksocks=include\n\
         uci-batch\tset firewall.ksocks.type='nftables'\n\
         uci-batch\tset firewall.ksocks.path='/var/run/ksocks/fw4.nft'\n\
         uci-batch\tset firewall.ksocks.position='table-append'\n\
         uci-batch\tcommit firewall\n"
    );
    assert_eq!(run(Some("include")), "uci\t-q get firewall.ksocks\n");
    // The include names the file the init script writes.
    let init = std::fs::read_to_string(init_script()).unwrap();
    assert!(init.contains("RUNDIR=${KSOCKS_RUNDIR:-/var/run/ksocks}"));
    assert!(init.contains("FW_FILE=$RUNDIR/fw4.nft"));
}
