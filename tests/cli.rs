//! Process-level CLI behaviour of the ksocks binary: help, version, and rejected input. No
//! namespaces or root needed; every run is killed after a few seconds at most.

mod common;

use common::run_ksocks;
use std::time::Duration;

const T: Duration = Duration::from_secs(5);

/// `--help` and `-h` print usage to stdout naming every contract flag, and exit 0.
#[test]
fn help_lists_flags() {
    for flag in ["--help", "-h"] {
        let (code, out, _) = run_ksocks(&[flag], T);
        assert_eq!(code, Some(0), "{flag} exit status");
        for f in [
            "--redirect",
            "--tproxy",
            "--dataplane",
            "--max-conns",
            "--connect-timeout",
            "--idle-timeout",
            "--udp-tproxy",
            "--mark",
            "--buffer-size",
            "--verbose",
            "--quiet",
            "--version",
        ] {
            assert!(
                out.contains(f),
                "{flag} output does not mention {f}:\n{out}"
            );
        }
    }
}

/// The README's "Command line" section is `ksocks --help`, word for word.
#[test]
fn readme_shows_the_help() {
    let (code, out, _) = run_ksocks(&["--help"], T);
    assert_eq!(code, Some(0));
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    assert!(
        readme.contains(&format!("```\n{out}```\n")),
        "README.md's command line block differs from `ksocks --help`; paste it again:\n{out}"
    );
}

/// UDP flags (parsed without a process): -T alone is a valid configuration, repeatable in both
/// families; out-of-range values name their flag.
#[test]
fn udp_flags() {
    use ksocks::cli::{parse, Command};
    let args = "-T 0.0.0.0:1 --udp-tproxy [::]:1 --udp-timeout 5 --udp-max 100";
    let Ok(Command::Run(c)) = parse(args.split(' ')) else {
        panic!("{args}: not a run configuration");
    };
    let udp = (c.udp_listeners, c.udp_timeout.as_secs(), c.udp_max);
    let want = vec!["0.0.0.0:1".parse().unwrap(), "[::]:1".parse().unwrap()];
    assert_eq!(udp, (want, 5, 100));
    for (args, flag) in [
        ("-T 0.0.0.0:1 --udp-timeout 0", "--udp-timeout"),
        ("-T 0.0.0.0:1 --udp-max 0", "--udp-max"),
        ("-T 12346", "--udp-tproxy: invalid value"),
    ] {
        let err = parse(args.split(' ')).expect_err(args);
        assert!(err.0.contains(flag), "{args}: {}", err.0);
    }
}

/// `--version` and `-V` print the crate version and exit 0.
#[test]
fn version() {
    for flag in ["--version", "-V"] {
        let (code, out, _) = run_ksocks(&[flag], T);
        assert_eq!(code, Some(0), "{flag} exit status");
        assert!(
            out.contains(env!("CARGO_PKG_VERSION")),
            "{flag} output lacks {}: {out}",
            env!("CARGO_PKG_VERSION")
        );
    }
}

/// Bad input exits non-zero at once with an `error:` line on stderr.
#[test]
fn bad_input_is_an_error() {
    let cases: &[&[&str]] = &[
        &["--no-such-flag"],
        &["-Z"],
        &["stray-positional"],
        &["-r"],
        &["-r", "not-an-address"],
        &["-r", "0.0.0.0:12345", "--dataplane", "warp"],
        &["-r", "0.0.0.0:12345", "--max-conns", "many"],
        &["-r", "0.0.0.0:12345", "--connect-timeout", "-1"],
        &["-r", "0.0.0.0:12345", "--buffer-size", "x"],
    ];
    for args in cases {
        let (code, _, err) = run_ksocks(args, T);
        assert!(
            matches!(code, Some(c) if c != 0),
            "ksocks {args:?}: exit {code:?}, expected non-zero; stderr: {err}"
        );
        assert!(
            err.contains("error:"),
            "ksocks {args:?}: stderr lacks 'error:': {err}"
        );
    }
}

/// With no listener at all ksocks refuses to start rather than idling.
#[test]
fn no_listener_is_an_error() {
    let (code, _, err) = run_ksocks(&[], T);
    assert!(
        matches!(code, Some(c) if c != 0),
        "ksocks with no listener: exit {code:?}; stderr: {err}"
    );
    assert!(err.contains("error:"), "stderr lacks 'error:': {err}");
}
