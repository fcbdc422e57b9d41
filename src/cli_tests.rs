//! Tests of src/cli.rs: defaults, every flag, credentials and upstream URLs, bad input, and
//! the help text listing every flag.
use super::*;

fn run(args: &[&str]) -> Result<Config, CliError> {
    match parse(args.iter().copied())? {
        Command::Run(c) => Ok(c),
        other => panic!("expected a run config, got {other:?}"),
    }
}

/// Marks as nft and iptables print them: decimal or 0x hex.
#[test]
fn mark_decimal_or_hex() {
    for (text, want) in [
        ("42", 42),
        ("0x2a", 42),
        ("0X2A", 42),
        ("0xffffffff", u32::MAX),
    ] {
        let c = run(&["-r", "0.0.0.0:1", "--mark", text]).unwrap();
        assert_eq!(c.mark, Some(want), "--mark {text}");
    }
}

/// Defaults are the documented ones.
#[test]
fn defaults() {
    let c = run(&["-r", "0.0.0.0:12345"]).unwrap();
    assert_eq!(
        c.listeners,
        vec![(ListenerKind::Redirect, "0.0.0.0:12345".parse().unwrap())]
    );
    assert_eq!(c.dataplane, Dataplane::Auto);
    assert!(c.splice_devs.is_empty());
    assert_eq!(c.max_conns, 4096);
    assert_eq!(c.connect_timeout, Duration::from_secs(10));
    assert_eq!(c.idle_timeout, None);
    assert_eq!(c.mark, None);
    assert_eq!(c.buffer_size, 16384);
    assert_eq!(c.inflight_max, 4 << 20);
    assert_eq!(c.sndbuf, 0);
    assert_eq!(c.verbosity, 0);
    let udp = (c.udp_listeners.len(), c.udp_timeout.as_secs(), c.udp_max);
    assert_eq!(udp, (0, 60, 4096));
}

/// Every flag, long and short forms, repeated listeners in both families.
#[test]
fn all_flags() {
    let c = run(&[
        "--redirect",
        "0.0.0.0:1",
        "-r",
        "[::]:1",
        "-t",
        "127.0.0.1:2",
        "--tproxy=[::1]:3",
        "--dataplane",
        "tcsplice",
        "--splice-dev",
        "eth0",
        "--splice-dev=br-lan",
        "--max-conns",
        "10",
        "--connect-timeout",
        "3",
        "--idle-timeout",
        "60",
        "--mark",
        "255",
        "--buffer-size",
        "4096",
        "--inflight-max",
        "1048576",
        "--user",
        "nobody",
        "-vv",
    ])
    .unwrap();
    assert_eq!(c.listeners.len(), 4);
    assert_eq!(
        c.listeners[1],
        (ListenerKind::Redirect, "[::]:1".parse().unwrap())
    );
    assert_eq!(
        c.listeners[3],
        (ListenerKind::Tproxy, "[::1]:3".parse().unwrap())
    );
    assert_eq!(c.dataplane, Dataplane::Tcsplice);
    assert_eq!(c.splice_devs, ["eth0", "br-lan"]);
    assert_eq!(c.max_conns, 10);
    assert_eq!(c.connect_timeout, Duration::from_secs(3));
    assert_eq!(c.idle_timeout, Some(Duration::from_secs(60)));
    assert_eq!(c.mark, Some(255));
    assert_eq!(c.buffer_size, 4096);
    assert_eq!(c.inflight_max, 1 << 20);
    assert_eq!(c.user.as_deref(), Some("nobody"));
    assert_eq!(c.verbosity, 2);
    assert_eq!(run(&["-r", "0.0.0.0:1", "-v", "-q"]).unwrap().verbosity, -1);
}

/// SOCKS listeners, credentials (flag and file) and upstream URLs.
#[test]
fn socks_and_upstream_flags() {
    let path = std::env::temp_dir().join(format!("ksocks-auth-{}", std::process::id()));
    std::fs::write(&path, "# users\nbob:pw2\n\n  carol:p:w  \n").unwrap();
    let c = run(&[
        "-s",
        "127.0.0.1:1080",
        "--socks-auth",
        "alice:secret",
        "--socks-auth-file",
        path.to_str().unwrap(),
        "--handshake-timeout",
        "5",
        "-u",
        "socks5://u:p@198.19.1.2:1080",
    ])
    .unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(
        c.listeners,
        vec![(ListenerKind::Socks, "127.0.0.1:1080".parse().unwrap())]
    );
    let users: Vec<(&[u8], &[u8])> = c.socks_auth.iter().map(|(u, p)| (&u[..], &p[..])).collect();
    assert_eq!(
        users,
        vec![
            (&b"alice"[..], &b"secret"[..]),
            (b"bob", b"pw2"),
            (b"carol", b"p:w")
        ]
    );
    assert_eq!(c.handshake_timeout, Duration::from_secs(5));
    assert!(matches!(c.upstream, Upstream::Socks5 { .. }));
    let c = run(&[
        "-r",
        "0.0.0.0:1",
        "--upstream",
        "ss://none@[2001:db8::1]:8388",
    ])
    .unwrap();
    assert!(matches!(c.upstream, Upstream::Shadowsocks { .. }));
    assert_eq!(
        run(&["-r", "0.0.0.0:1"]).unwrap().upstream,
        Upstream::Direct
    );
}

#[test]
fn help_and_version() {
    assert_eq!(parse(["--help"]).unwrap(), Command::Help);
    assert_eq!(parse(["-V"]).unwrap(), Command::Version);
}

/// Bad input is an error that names the flag, never ignored.
#[test]
fn rejects_bad_input() {
    let cases: &[(&[&str], &str)] = &[
        (&[], "no listener"),
        (&["-r", "0.0.0.0:1", "--bogus"], "bogus"),
        (&["-r", "0.0.0.0"], "--redirect: invalid value"),
        (&["-r", "::1:80"], "--redirect: invalid value"),
        (&["-r"], "missing argument"),
        (&["-r", "0.0.0.0:1", "--dataplane", "fast"], "--dataplane"),
        (
            &["-r", "0.0.0.0:1", "--splice-dev", "eth0"],
            "only for --dataplane tcsplice",
        ),
        (&["-r", "0.0.0.0:1", "--max-conns", "0"], "--max-conns"),
        (&["-r", "0.0.0.0:1", "--max-conns", "-5"], "--max-conns"),
        (&["-r", "0.0.0.0:1", "--buffer-size", "10"], "--buffer-size"),
        (
            &["-r", "0.0.0.0:1", "--connect-timeout", "0"],
            "--connect-timeout",
        ),
        (&["-r", "0.0.0.0:1", "--mark", "x"], "--mark"),
        (&["-r", "0.0.0.0:1", "--mark", "0x"], "--mark"),
        (&["-r", "0.0.0.0:1", "--mark", "0x1g"], "--mark"),
        (&["-r", "0.0.0.0:1", "--mark", "0x100000000"], "--mark"),
        (&["-r", "0.0.0.0:1", "--mark", "-1"], "--mark"),
        (&["-r", "0.0.0.0:1", "stray"], "stray"),
        (&["-s", "0.0.0.0:1", "--socks-auth", "nocolon"], "USER:PASS"),
        (&["-s", "0.0.0.0:1", "--socks-auth", ":pass"], "USER:PASS"),
        (
            &[
                "-r",
                "0.0.0.0:1",
                "-u",
                "ss://aes-256-gcm:pw@198.19.1.2:8388",
            ],
            "unencrypted",
        ),
        (
            &["-r", "0.0.0.0:1", "-u", "http://198.19.1.2:8080"],
            "--upstream",
        ),
        (
            &[
                "-s",
                "0.0.0.0:1",
                "--socks-auth-file",
                "/nonexistent/ksocks",
            ],
            "--socks-auth-file",
        ),
    ];
    for (args, needle) in cases {
        let err = run(args).expect_err(&format!("{args:?} should fail"));
        assert!(
            err.0.contains(needle),
            "{args:?}: error '{}' lacks '{needle}'",
            err.0
        );
    }
}

/// The help text documents every long flag the parser accepts.
#[test]
fn help_lists_every_flag() {
    for flag in [
        "--redirect",
        "--tproxy",
        "--dataplane",
        "--splice-dev",
        "--buffer-size",
        "--inflight-max",
        "--max-conns",
        "--connect-timeout",
        "--idle-timeout",
        "--udp-tproxy",
        "--udp-timeout",
        "--udp-max",
        "--mark",
        "--user",
        "--verbose",
        "--quiet",
        "--help",
        "--version",
    ] {
        assert!(HELP.contains(flag), "{flag} missing from HELP");
    }
}
