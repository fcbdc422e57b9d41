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
