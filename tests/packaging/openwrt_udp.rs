//! The OpenWrt init script's UDP options under the recording stand-ins of
//! tests/packaging/shim.rs: the exact command line, open-file limit, policy route and fw4 rules
//! procd and fw4 would get for sections with `udp_tproxy` (beside TCP REDIRECT, and alone with
//! inbound 'none'), and the UDP values and combinations validation refuses.

use crate::openwrt::{assert_ksocks_accepts, assert_rejected};
use crate::shim::*;

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

const CONFIG: &str = "config ksocks 'lan'
	option enabled '1'
	option upstream 'socks5://192.0.2.1:1080'
	list src_device 'br-lan'
	list udp_tproxy '0.0.0.0:12345'
	list udp_tproxy '[::]:12345'
	option udp_timeout '30'
	option udp_max '1000'
	option mark '0x2a'
	option proxy_router_dns '1'

config ksocks 'udponly'
	option enabled '1'
	option inbound 'none'
	list udp_tproxy '127.0.0.1:5353'
	list src_device 'br-lan'
	option user 'nobody'
";

/// The UDP chains fw4 gets for section 'lan' of CONFIG, exactly.
const LAN_UDP_RULES: &str = "	chain ksocks_lan_udp_prerouting {
		type filter hook prerouting priority mangle + 1; policy accept;
		meta l4proto != udp return
		iifname \"lo\" meta mark 0x1 udp dport 53 tproxy ip to :12345 accept
		iifname \"lo\" meta mark 0x1 udp dport 53 tproxy ip6 to :12345 accept
		iifname != { \"br-lan\" } return
		fib daddr type { local, broadcast, multicast } return
		ip daddr @ksocks_lan_bypass4 return
		ip6 daddr @ksocks_lan_bypass6 return
		meta l4proto udp tproxy ip to :12345 meta mark set 0x1 accept
		meta l4proto udp tproxy ip6 to :12345 meta mark set 0x1 accept
	}
	chain ksocks_lan_udp_output {
		type route hook output priority mangle + 1; policy accept;
		meta l4proto != udp return
		udp dport != 53 return
		meta mark 0x2a return
		fib daddr type local return
		ip daddr @ksocks_lan_bypass4 return
		ip6 daddr @ksocks_lan_bypass6 return
		meta mark set 0x1
	}
";

/// TCP REDIRECT with UDP TPROXY beside it: the UDP flags in the table's order, room for the
/// associations in the open-file limit, the policy route TPROXY needs (made although TCP is
/// redirected, removed on stop), and the UDP chains. A UDP-only section (inbound 'none')
/// starts with no rules and no route.
#[test]
fn init_udp_section() {
    if !require_shim() {
        return;
    }
    let r = Router::new(CONFIG);
    let rec = r.run("start", None);
    let inst = rec.instances();
    assert_eq!(
        inst.keys().collect::<Vec<_>>(),
        ["lan", "udponly"],
        "{}",
        rec.log()
    );
    let lan = &inst["lan"];
    assert_eq!(
        lan.command(),
        s(&[
            "/usr/sbin/ksocks",
            "--redirect",
            "0.0.0.0:12345",
            "--redirect",
            "[::]:12345",
            "--udp-tproxy",
            "0.0.0.0:12345",
            "--udp-tproxy",
            "[::]:12345",
            "--udp-timeout",
            "30",
            "--udp-max",
            "1000",
            "--upstream",
            "socks5://192.0.2.1:1080",
            "--mark",
            "0x2a",
        ])
    );
    // 6 per connection (4096 by default), 3 per UDP association, 64.
    assert_eq!(lan.param("limits"), ["nofile=27640 27640"]);
    assert_ksocks_accepts(lan.command());
    let udp = &inst["udponly"];
    assert_eq!(
        udp.command(),
        s(&[
            "/usr/sbin/ksocks",
            "--udp-tproxy",
            "127.0.0.1:5353",
            "--user",
            "nobody",
        ])
    );
    assert_eq!(udp.param("limits"), ["nofile=36928 36928"]);
    assert_ksocks_accepts(udp.command());

    assert_eq!(
        rec.values("ip"),
        [
            "-4 rule add fwmark 0x1 lookup 100",
            "-4 route replace local 0.0.0.0/0 dev lo table 100",
            "-6 rule add fwmark 0x1 lookup 100",
            "-6 route replace local ::/0 dev lo table 100",
        ]
    );
    let fw = r.fw_include().expect("fw4 include written");
    assert!(
        fw.contains(LAN_UDP_RULES),
        "not the expected UDP rules:\n{fw}"
    );
    assert!(
        fw.contains("meta l4proto tcp redirect to :12345"),
        "TCP is still redirected:\n{fw}"
    );
    assert!(!fw.contains("udponly"), "inbound none has no rules: {fw}");

    let stop = r.run("stop", None);
    assert_eq!(
        stop.values("ip"),
        [
            "-4 rule del fwmark 0x1 lookup 100",
            "-4 route flush table 100",
            "-6 rule del fwmark 0x1 lookup 100",
            "-6 route flush table 100",
        ]
    );
    assert!(r.fw_include().is_none());
}

/// A listener on a specific address gets TPROXY to that address (a wildcard socket would not
/// hear `:PORT` for an address it is not bound to); without `proxy_router_dns` there is no
/// output chain and no `lo` rule; `user` instead of `mark` exempts by uid.
#[test]
fn init_udp_addresses_and_exemption() {
    if !require_shim() {
        return;
    }
    let conf = "config ksocks 'lan'
	option enabled '1'
	option inbound 'tproxy'
	option upstream 'direct'
	list src_device 'br-lan'
	list udp_tproxy '192.168.1.1:53000'
	list udp_tproxy '[fd00::1]:53001'
	option user 'ksocks'
	option proxy_router_dns '0'

config ksocks 'dns'
	option enabled '1'
	option port '2000'
	option upstream 'direct'
	list src_device 'br-lan'
	list udp_tproxy '0.0.0.0:2000'
	option user 'ksocks'
	option proxy_router_dns '1'
	option tproxy_mark '0x2'
	option route_table '102'
";
    let r = Router::new(conf);
    let rec = r.run("start", None);
    assert_eq!(rec.instances().len(), 2, "{}", rec.log());
    let fw = r.fw_include().expect("fw4 include written");
    for want in [
        "meta l4proto udp tproxy ip to 192.168.1.1:53000 meta mark set 0x1 accept",
        "meta l4proto udp tproxy ip6 to [fd00::1]:53001 meta mark set 0x1 accept",
        "iifname \"lo\" meta mark 0x2 udp dport 53 tproxy ip to :2000 accept",
        "meta l4proto udp tproxy ip to :2000 meta mark set 0x2 accept",
        "meta skuid \"ksocks\" return",
    ] {
        assert!(fw.contains(want), "no `{want}` in\n{fw}");
    }
    assert!(!fw.contains("ksocks_lan_udp_output"), "{fw}");
    assert!(!fw.contains("iifname \"lo\" meta mark 0x1"), "{fw}");
    // One route per section, each with its own mark and table.
    let ip = rec.values("ip");
    for want in [
        "-4 rule add fwmark 0x1 lookup 100",
        "-6 rule add fwmark 0x2 lookup 102",
    ] {
        assert_eq!(ip.iter().filter(|l| **l == want).count(), 1, "{ip:?}");
    }
    assert_eq!(ip.len(), 8, "{ip:?}");
}

/// Bad UDP values, and combinations the rules could not honour.
#[test]
fn init_rejects_bad_udp_values() {
    if !require_shim() {
        return;
    }
    assert_rejected(&[
        (
            "list udp_tproxy '1.2.3.4'",
            "bad.udp_tproxy[0]=1.2.3.4 validates as",
        ),
        (
            "list udp_tproxy 'localhost:53'",
            "bad.udp_tproxy[0]=localhost:53 validates as",
        ),
        (
            "list udp_tproxy '::1:53'",
            "bad.udp_tproxy[0]=::1:53 validates as",
        ),
        (
            "list udp_tproxy '0.0.0.0:1234'\n\tlist udp_tproxy 'nope'\n\tlist udp_tproxy '[::]:1234'",
            "invalid entry in list 'udp_tproxy'",
        ),
        ("option udp_timeout '0'", "bad.udp_timeout=0 validates as"),
        (
            "option udp_timeout '86401'",
            "bad.udp_timeout=86401 validates as",
        ),
        ("option udp_max '0'", "bad.udp_max=0 validates as"),
        ("option udp_max '1048577'", "bad.udp_max=1048577 validates as"),
        ("option udp_max 'lots'", "bad.udp_max=lots validates as"),
        (
            "option proxy_router_dns 'maybe'",
            "bad.proxy_router_dns=maybe validates as",
        ),
        // Between options.
        (
            "option mark '0x2a'\n\toption proxy_router_dns '1'",
            "proxy_router_dns needs a 'udp_tproxy' listener",
        ),
        (
            "list udp_tproxy '0.0.0.0:1234'\n\toption proxy_router_dns '1'",
            "proxy_router_dns needs 'mark' (or 'user')",
        ),
        (
            "option inbound 'none'\n\tlist udp_tproxy '0.0.0.0:1234'\n\toption mark '0x2a'\n\toption proxy_router_dns '1'",
            "proxy_router_dns needs rules, which inbound 'none' does not get",
        ),
        // The TPROXY route would catch ksocks' own upstream traffic, TCP redirected or not.
        (
            "list udp_tproxy '0.0.0.0:1234'\n\toption mark '1'",
            "'mark' must differ from 'tproxy_mark'",
        ),
    ]);
}
