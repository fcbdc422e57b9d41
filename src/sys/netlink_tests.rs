//! Tests of src/sys/netlink.rs: golden message bytes, and the real kernel in a network
//! namespace of the test thread's own (`unshare(CLONE_NEWNET)` affects only that thread).
use super::*;
use crate::sys::bpf;
use std::os::fd::AsFd;

/// The conntrack delete request for 198.18.1.2:40000 -> 198.19.1.2:443, byte by byte
/// (little-endian host: the only byte-order-dependent parts are the netlink lengths/types).
#[test]
fn ct_delete_golden_bytes() {
    let mut m = Msg::new(
        NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE,
        NLM_F_ACK,
        7,
        &[2, 0, 0, 0],
    );
    m.nest(CTA_TUPLE_ORIG)
        .nest(CTA_TUPLE_IP)
        .attr(CTA_IP_V4_SRC, &[198, 18, 1, 2])
        .attr(CTA_IP_V4_DST, &[198, 19, 1, 2])
        .end()
        .nest(CTA_TUPLE_PROTO)
        .attr(CTA_PROTO_NUM, &[6])
        .attr(CTA_PROTO_SRC_PORT, &40000u16.to_be_bytes())
        .attr(CTA_PROTO_DST_PORT, &443u16.to_be_bytes())
        .end()
        .end();
    let b = m.finish();
    if cfg!(target_endian = "big") {
        return assert_eq!(b.len(), 72);
    }
    #[rustfmt::skip]
    let want: [u8; 72] = [
        72, 0, 0, 0, 0x02, 0x01, 0x05, 0x00, 7, 0, 0, 0, 0, 0, 0, 0, // nlmsghdr
        2, 0, 0, 0,                                                  // nfgenmsg AF_INET v0
        52, 0, 0x01, 0x80,                                           // CTA_TUPLE_ORIG, nested
        20, 0, 0x01, 0x80,                                           //  CTA_TUPLE_IP
        8, 0, 1, 0, 198, 18, 1, 2,                                   //   CTA_IP_V4_SRC
        8, 0, 2, 0, 198, 19, 1, 2,                                   //   CTA_IP_V4_DST
        28, 0, 0x02, 0x80,                                           //  CTA_TUPLE_PROTO
        5, 0, 1, 0, 6, 0, 0, 0,                                      //   CTA_PROTO_NUM (+pad)
        6, 0, 2, 0, 0x9c, 0x40, 0, 0,                                //   SRC_PORT 40000
        6, 0, 3, 0, 0x01, 0xbb, 0, 0,                                //   DST_PORT 443
    ];
    assert_eq!(b, want);
}

/// The filter's tcm_info and parent: priority high, ETH_P_ALL in network order; clsact
/// ingress is ffff:fff2.
#[test]
fn filter_handles() {
    assert_eq!(hook(true), 0xFFFF_FFF2);
    assert_eq!(hook(false), 0xFFFF_FFF3);
    assert_eq!(filter_info(0xC5) >> 16, 0xC5);
    assert_eq!((filter_info(0xC5) as u16).to_ne_bytes(), [0, 3]);
}

/// Runs `f` on a thread in a new, empty network namespace; `None` without privileges.
fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let e = io::Error::last_os_error();
            assert!(std::env::var("CI").as_deref() != Ok("true"), "unshare: {e}");
            eprintln!("skipped: unshare(CLONE_NEWNET): {e}");
            return None;
        }
        Some(f())
    })
    .join()
    .unwrap()
}

/// A program that returns TC_ACT_UNSPEC: `r0 = -1; exit` (all-ones immediate and zero
/// registers read the same in either byte order).
fn unspec_prog() -> OwnedFd {
    let insns = [
        0xb7, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x95, 0, 0, 0, 0, 0, 0, 0,
    ];
    bpf::prog_load(bpf::BPF_PROG_TYPE_SCHED_CLS, 0, &insns, c"GPL", "ksocks_t")
        .unwrap_or_else(|e| panic!("{}: {}", e.err, e.log))
}

/// clsact + a named direct-action filter on lo: added, listed by name, deleted.
#[test]
fn clsact_bpf_filter_round_trip() {
    in_new_netns(|| {
        let mut nl = Netlink::open(libc::NETLINK_ROUTE).unwrap();
        // SAFETY: a NUL-terminated literal.
        let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
        let none = nl.bpf_filters(lo, true);
        assert!(none.is_err() || none.unwrap().is_empty());
        nl.add_clsact(lo).unwrap();
        let again = nl.add_clsact(lo).unwrap_err();
        assert_eq!(again.raw_os_error(), Some(libc::EEXIST));
        let prog = unspec_prog();
        nl.add_bpf_filter(lo, true, 0xC5, 1, prog.as_fd(), "ksocks_tcsplice")
            .unwrap();
        let found = nl.bpf_filters(lo, true).unwrap();
        assert_eq!(
            found,
            [Filter {
                prio: 0xC5,
                handle: 1,
                name: "ksocks_tcsplice".into()
            }]
        );
        assert!(
            nl.bpf_filters(lo, false).unwrap().is_empty(),
            "egress is empty"
        );
        nl.del_bpf_filter(lo, true, 0xC5, 1).unwrap();
        assert!(nl.bpf_filters(lo, true).unwrap().is_empty());
    });
}

/// A delete by tuple of an entry that does not exist says ENOENT (and flushes nothing).
#[test]
fn ct_delete_absent_is_enoent() {
    in_new_netns(|| {
        let mut nl = Netlink::open(libc::NETLINK_NETFILTER).unwrap();
        let e = nl
            .ct_delete(
                "198.18.1.2:1".parse().unwrap(),
                "198.19.1.2:2".parse().unwrap(),
            )
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        let e = nl
            .ct_delete(
                "[2001:db8::1]:1".parse().unwrap(),
                "[2001:db8::2]:2".parse().unwrap(),
            )
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    });
}
