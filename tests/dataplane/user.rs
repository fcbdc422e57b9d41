//! `--user nobody` on both kernel planes: ksocks started as root drops to uid/gid 65534 with
//! no capabilities, and sockmap (REDIRECT, TPROXY) and splice stay in use with exact transfers
//! and close lines, no fallback and no map entry left.

use crate::common::*;
use crate::{close_line, serve_one, shared, with_log, KSOCKS_PORT, MIB};
use std::net::Shutdown;
use std::sync::mpsc;
use std::time::Duration;

/// (uid, gid) of `name` from /etc/passwd.
fn passwd(name: &str) -> (u32, u32) {
    let p = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    p.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == name).then(|| (f[2].parse().unwrap(), f[3].parse().unwrap()))
        })
        .unwrap_or_else(|| panic!("no user {name} in /etc/passwd"))
}

fn status_field(pid: i32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("/proc/{pid}/status has no {key}"))
        .trim()
        .to_string()
}

/// Upload with a half-close and a reply after it, then a download-first exchange held open
/// while the stats are read; every byte checked, exact close lines, returns the stats seen
/// while the second connection was open.
fn exchanges(topo: &Topology, ks: &Ksocks, fam: Family, plane: &str) -> Stats {
    // 1. Banner, upload, half-close, reply after the FIN.
    let (up, down) = (3 * MIB + 11, 2 * MIB + 7);
    let srv = serve_one(topo.server_listener(fam, 5001), move |mut s| {
        send_pattern(&mut s, 40, 1000, 1000).expect("server: banner");
        expect_stream(&mut s, 41, up, "server: upload");
        send_pattern(&mut s, 42, down, 64 * 1024).expect("server: reply");
        s.shutdown(Shutdown::Write).unwrap();
    });
    let mut c = topo.client_connect(topo.server_addr(fam, 5001)).unwrap();
    let d = recv_exact_verify(&mut c, 40, 1000).expect("client: banner");
    Digest::of_pattern(40, 1000).assert_received(&d, "client: banner");
    send_all_and_shutdown(&mut c, 41, up);
    expect_stream(&mut c, 42, down, "client: reply");
    join(srv);
    let local = c.local_addr().unwrap();
    drop(c);
    let line = close_line(ks, local, up, 1000 + down, "done");
    assert!(line.contains(&format!("plane={plane}")), "{line}");

    // 2. Download first; while it is open, the stats; then the upload and the end.
    let (down, up) = (MIB + 5, 2 * MIB + 3);
    let (tx_go, rx_go) = mpsc::channel::<()>();
    let srv = serve_one(topo.server_listener(fam, 5002), move |mut s| {
        send_pattern(&mut s, 43, down, 64 * 1024).expect("server: download");
        rx_go.recv_timeout(Duration::from_secs(20)).expect("go");
        expect_stream(&mut s, 44, up, "server: upload after the download");
        s.shutdown(Shutdown::Write).unwrap();
    });
    let mut c = topo.client_connect(topo.server_addr(fam, 5002)).unwrap();
    let d = recv_exact_verify(&mut c, 43, down).expect("client: download");
    Digest::of_pattern(43, down).assert_received(&d, "client: download");
    let open = ks.stats();
    tx_go.send(()).unwrap();
    send_all_and_shutdown(&mut c, 44, up);
    expect_eof(&mut c, "client: end");
    join(srv);
    let local = c.local_addr().unwrap();
    drop(c);
    close_line(ks, local, up, down, "done");
    open
}

/// ksocks started as root with `--user nobody` runs as nobody with no capabilities, and the
/// kernel plane stays in use: exact transfers both ways, no fallback, no map entry left.
pub(crate) fn user_nobody(plane: &str, kind: Inbound) {
    let _machine = shared();
    if !require_root() {
        return;
    }
    let topo = Topology::new(kind, KSOCKS_PORT);
    let ks = Ksocks::serve(&topo, &["--dataplane", plane, "--user", "nobody"]);
    with_log(&ks, &format!("user-{plane}-{kind:?}"), || {
        let (uid, gid) = passwd("nobody");
        let pid = ks.pid();
        let ids = |key| -> Vec<u32> {
            status_field(pid, key)
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect()
        };
        assert_eq!(ids("Uid:"), vec![uid; 4], "real, effective, saved, fs uid");
        assert_eq!(ids("Gid:"), vec![gid; 4], "real, effective, saved, fs gid");
        let groups = ids("Groups:");
        assert!(
            groups.iter().all(|&g| g == gid),
            "supplementary groups left: {groups:?}"
        );
        for cap in ["CapEff:", "CapPrm:", "CapAmb:"] {
            let v = u64::from_str_radix(&status_field(pid, cap), 16).unwrap();
            assert_eq!(v, 0, "{cap} {v:#x} after --user");
        }
        for fam in [Family::V4, Family::V6] {
            let open = exchanges(&topo, &ks, fam, plane);
            assert_eq!(
                open.open(),
                1,
                "open connections during exchange 2: {open:?}"
            );
            assert_eq!(
                open.get(plane),
                1,
                "connections on the {plane} plane while one is open: {:?}",
                open.fields
            );
        }
        let st = ks.stats();
        assert_eq!(
            st.get("fallbacks"),
            0,
            "fallbacks as nobody: {:?}",
            st.fields
        );
        ks.assert_idle();
        eprintln!(
            "user {plane} {kind:?}: uid {uid} gid {gid}, CapEff 0; {:?}",
            st.fields
        );
    });
}

/// --user nobody with sockmap, REDIRECT.
#[test]
fn sockmap_redirect() {
    crate::user_nobody("sockmap", crate::Inbound::Redirect);
}
/// --user nobody with sockmap, TPROXY.
#[test]
fn sockmap_tproxy() {
    crate::user_nobody("sockmap", crate::Inbound::Tproxy);
}
/// --user nobody with splice, REDIRECT.
#[test]
fn splice_redirect() {
    crate::user_nobody("splice", crate::Inbound::Redirect);
}
