# shellcheck shell=bash
# shellcheck disable=SC2034 # its globals are read by bench/run and the other parts
# bench/lib/proxies.sh — part of bench/run (sourced by it, in order, after topology.sh):
# starting and stopping each proxy configuration in the router namespace. Defines the nft
# redirect / TPROXY rules (nft_redirect, nft_tproxy_udp, nft_clear), wait_pid_listen,
# pick_ss_libev_cipher, ksocks_start, start_proxy CONFIG (sets PROXY_PIDS, BINS, PLANE, or
# START_ERR when the configuration cannot run) and stop_proxy.
# ---------------------------------------------------------------- proxies
nft_redirect() { # redirect all TCP from the client veth to :$1 in the router
	inR nft -f - <<-EOF
	table ip kbench {
	  chain pre { type nat hook prerouting priority dstnat; policy accept;
	    iifname "r-c" meta l4proto tcp redirect to :$1
	  }
	}
	EOF
}
nft_tproxy_udp() { # divert all UDP from the client veth to :$1 in the router with TPROXY
	inR nft -f - <<-EOF
	table ip kbench_udp {
	  chain pre { type filter hook prerouting priority mangle; policy accept;
	    iifname "r-c" meta l4proto udp tproxy to :$1 meta mark set 1 accept
	  }
	}
	EOF
}
nft_clear() { inR nft delete table ip kbench 2>/dev/null; inR nft delete table ip kbench_udp 2>/dev/null; true; }

BINS=""       # main executables of the current proxy (for binary size)
PLANE=""

wait_pid_listen() { # pid port: wait until listening; fail when the process died
	for _ in $(seq 1 100); do
		kill -0 "$1" 2>/dev/null || return 1
		inR ss -Hltn "sport = :$2" 2>/dev/null | grep -q . && return 0
		sleep 0.1
	done
	return 1
}

SS_LIBEV_CIPHER=""
pick_ss_libev_cipher() { # salsa20 measured fastest; verify Debian's build accepts it
	local c pid
	for c in salsa20 chacha20-ietf; do
		ip netns exec "$NR" ss-server -s 127.0.0.1 -p 8399 -k bench -m "$c" >"$WORK/ss-probe.log" 2>&1 &
		pid=$!
		if wait_pid_listen "$pid" 8399 && sleep 0.3 && kill -0 "$pid" 2>/dev/null; then
			kill "$pid"; wait "$pid" 2>/dev/null
			SS_LIBEV_CIPHER=$c; return 0
		fi
		kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
	done
	return 1
}

ksocks_start() { # mode [extra args...]; sets PROXY_PIDS, PLANE
	local mode=$1; shift
	local log="$WORK/ksocks-$CUR_CFG-r$ROUND.log" pid extra
	read -r -a extra <<<"${KSOCKS_ARGS:-}"   # extra flags for debugging, split on blanks
	"$CGX" proxy ip netns exec "$NR" "$KSOCKS" --redirect "0.0.0.0:$PROXY_PORT" --dataplane "$mode" --max-conns 30000 "$@" "${extra[@]}" \
		>"$log" 2>&1 &
	pid=$!
	for _ in $(seq 1 100); do
		grep -q '^ksocks: ready' "$log" 2>/dev/null && break
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if ! grep -q '^ksocks: ready' "$log" 2>/dev/null; then
		kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
		START_ERR="ksocks --dataplane $mode did not start: $(grep -v '^$' "$log" | tail -1 | cut -c1-160)"
		return 1
	fi
	PLANE=$(sed -n 's/^ksocks: data plane: //p' "$log" | head -1)
	PROXY_PIDS=$pid
}

start_proxy() { # config -> 0 ok (PROXY_PIDS set), 1 skipped (START_ERR set)
	local c=$1 p1 p2 port
	PROXY_PIDS=""; BINS=""; PLANE=""; START_ERR=""; CUR_CFG=$c
	case "$c" in
	direct|udp-direct) return 0 ;;
	udp-ksocks) # the UDP relay: TPROXY listener, direct upstream (the TCP plane is not used)
		[ -z "$KSOCKS_NOTE" ] || { START_ERR="$KSOCKS_NOTE"; return 1; }
		"$KSOCKS" --help 2>&1 | grep -q -- '--udp-tproxy' || { START_ERR="this ksocks has no --udp-tproxy yet"; return 1; }
		BINS="$KSOCKS"
		local log="$WORK/ksocks-$c-r$ROUND.log"
		"$CGX" proxy ip netns exec "$NR" "$KSOCKS" --udp-tproxy "0.0.0.0:$PROXY_PORT" >"$log" 2>&1 &
		PROXY_PIDS=$!
		for _ in $(seq 1 100); do
			grep -q '^ksocks: ready' "$log" 2>/dev/null && break
			kill -0 "$PROXY_PIDS" 2>/dev/null || break
			sleep 0.1
		done
		grep -q '^ksocks: ready' "$log" 2>/dev/null || { START_ERR="ksocks -T did not start: $(tail -1 "$log")"; return 1; }
		nft_tproxy_udp "$PROXY_PORT" ;;
	udp-ss-rust) # shadowsocks-rust's redir UDP (TPROXY) -> ssserver -m none -U on loopback
		[ -n "$SSRUST_BIN" ] || { START_ERR="shadowsocks-rust (sslocal/ssserver) not installed"; return 1; }
		BINS="$SSRUST_BIN/sslocal $SSRUST_BIN/ssserver"
		"$CGX" proxy ip netns exec "$NR" "$SSRUST_BIN/ssserver" -s 127.0.0.1:8389 -m none -k bench -U >"$WORK/ssserver-udp.log" 2>&1 &
		p1=$!
		wait_pid_listen "$p1" 8389 || { START_ERR="ssserver -U did not start: $(tail -1 "$WORK/ssserver-udp.log")"; kill $p1 2>/dev/null; return 1; }
		"$CGX" proxy ip netns exec "$NR" "$SSRUST_BIN/sslocal" --protocol redir -b "0.0.0.0:$PROXY_PORT" -s 127.0.0.1:8389 \
			-m none -k bench -U --udp-redir tproxy >"$WORK/sslocal-udp.log" 2>&1 &
		p2=$!
		wait_pid_listen "$p2" "$PROXY_PORT" || { START_ERR="sslocal redir -U did not start: $(tail -1 "$WORK/sslocal-udp.log")"; kill $p1 $p2 2>/dev/null; return 1; }
		PROXY_PIDS="$p2 $p1"
		nft_tproxy_udp "$PROXY_PORT" ;;
	ksocks-sockmap|ksocks-splice|ksocks-copy|ksocks-tcsplice)
		[ -z "$KSOCKS_NOTE" ] || { START_ERR="$KSOCKS_NOTE"; return 1; }
		BINS="$KSOCKS"
		ksocks_start "${c#ksocks-}" || return 1
		nft_redirect "$PROXY_PORT" ;;
	ref-sockmap|ref-splice|ref-copy) # KSOCKS_REF: another build, side by side
		[ -x "${KSOCKS_REF:-}" ] || { START_ERR="KSOCKS_REF is not an executable"; return 1; }
		BINS="$KSOCKS_REF"
		KSOCKS="$KSOCKS_REF" ksocks_start "${c#ref-}" || return 1
		nft_redirect "$PROXY_PORT" ;;
	ksocks-sockmap-8m) # the psock worker's one-tick retry, amortised by a larger send buffer
		[ -z "$KSOCKS_NOTE" ] || { START_ERR="$KSOCKS_NOTE"; return 1; }
		BINS="$KSOCKS"
		ksocks_start sockmap --sndbuf 8388608 || return 1
		nft_redirect "$PROXY_PORT" ;;
	redsocks)
		if ! command -v redsocks >/dev/null || ! command -v microsocks >/dev/null; then
			START_ERR="redsocks or microsocks not installed"; return 1
		fi
		BINS="$(command -v redsocks) $(command -v microsocks)"
		cat >"$WORK/redsocks.conf" <<-EOF
		base { log_debug = off; log_info = off; log = stderr; daemon = off; redirector = iptables;
		       redsocks_conn_max = $(( NOFILE / 2 - 50 )); }
		redsocks { local_ip = 0.0.0.0; local_port = $PROXY_PORT; ip = 127.0.0.1; port = 1080;
		           type = socks5; listenq = 4096; }
		EOF
		"$CGX" proxy ip netns exec "$NR" microsocks -i 127.0.0.1 -p 1080 >"$WORK/microsocks.log" 2>&1 &
		p1=$!
		wait_pid_listen "$p1" 1080 || { START_ERR="microsocks did not start"; kill $p1 2>/dev/null; return 1; }
		"$CGX" proxy ip netns exec "$NR" redsocks -c "$WORK/redsocks.conf" >"$WORK/redsocks.log" 2>&1 &
		p2=$!
		wait_pid_listen "$p2" "$PROXY_PORT" || { START_ERR="redsocks did not start: $(tail -1 "$WORK/redsocks.log")"; kill $p1 $p2 2>/dev/null; return 1; }
		PROXY_PIDS="$p2 $p1"
		nft_redirect "$PROXY_PORT" ;;
	ss-libev)
		command -v ss-redir >/dev/null || { START_ERR="shadowsocks-libev not installed"; return 1; }
		[ -n "$SS_LIBEV_CIPHER" ] || pick_ss_libev_cipher || { START_ERR="ss-server accepts neither salsa20 nor chacha20-ietf"; return 1; }
		BINS="$(command -v ss-redir) $(command -v ss-server)"
		PLANE="cipher $SS_LIBEV_CIPHER"
		"$CGX" proxy ip netns exec "$NR" ss-server -s 127.0.0.1 -p 8388 -k bench -m "$SS_LIBEV_CIPHER" --no-delay >"$WORK/ss-server.log" 2>&1 &
		p1=$!
		wait_pid_listen "$p1" 8388 || { START_ERR="ss-server did not start"; kill $p1 2>/dev/null; return 1; }
		"$CGX" proxy ip netns exec "$NR" ss-redir -s 127.0.0.1 -p 8388 -b 0.0.0.0 -l "$PROXY_PORT" -k bench -m "$SS_LIBEV_CIPHER" --no-delay >"$WORK/ss-redir.log" 2>&1 &
		p2=$!
		wait_pid_listen "$p2" "$PROXY_PORT" || { START_ERR="ss-redir did not start"; kill $p1 $p2 2>/dev/null; return 1; }
		PROXY_PIDS="$p2 $p1"
		nft_redirect "$PROXY_PORT" ;;
	ss-rust|ksocks-ss)
		[ -n "$SSRUST_BIN" ] || { START_ERR="shadowsocks-rust (sslocal/ssserver) not installed"; return 1; }
		if [ "$c" = ksocks-ss ]; then
			[ -z "$KSOCKS_NOTE" ] || { START_ERR="$KSOCKS_NOTE"; return 1; }
			"$KSOCKS" --help 2>&1 | grep -q -- '--upstream' || { START_ERR="this ksocks has no --upstream yet"; return 1; }
		fi
		"$CGX" proxy ip netns exec "$NR" "$SSRUST_BIN/ssserver" -s 127.0.0.1:8389 -m none -k bench --tcp-no-delay >"$WORK/ssserver.log" 2>&1 &
		p1=$!
		wait_pid_listen "$p1" 8389 || { START_ERR="ssserver did not start: $(tail -1 "$WORK/ssserver.log")"; kill $p1 2>/dev/null; return 1; }
		if [ "$c" = ss-rust ]; then
			BINS="$SSRUST_BIN/sslocal $SSRUST_BIN/ssserver"
			"$CGX" proxy ip netns exec "$NR" "$SSRUST_BIN/sslocal" --protocol redir -b "0.0.0.0:$PROXY_PORT" -s 127.0.0.1:8389 \
				-m none -k bench --tcp-no-delay --tcp-redir redirect >"$WORK/sslocal.log" 2>&1 &
			p2=$!
			wait_pid_listen "$p2" "$PROXY_PORT" || { START_ERR="sslocal did not start: $(tail -1 "$WORK/sslocal.log")"; kill $p1 $p2 2>/dev/null; return 1; }
			PROXY_PIDS="$p2 $p1"
		else
			BINS="$KSOCKS $SSRUST_BIN/ssserver"
			ksocks_start auto --upstream "ss://none@127.0.0.1:8389" || { kill $p1 2>/dev/null; return 1; }
			PROXY_PIDS="$PROXY_PIDS $p1"
		fi
		nft_redirect "$PROXY_PORT" ;;
	socat)
		command -v socat >/dev/null || { START_ERR="socat not installed"; return 1; }
		BINS="$(command -v socat)"
		# socat cannot read SO_ORIGINAL_DST: one fixed-target relay per service port, each
		# reached through its own nft redirect (equivalent for this benchmark)
		local rules="" ports lp=10000
		ports="$IPERF_PORT $SOCKPERF_PORT $HTTP_PORT $(seq "${HOLD_PORTS%-*}" "${HOLD_PORTS#*-}")"
		for port in $ports; do
			lp=$((lp + 1))
			"$CGX" proxy ip netns exec "$NR" socat "TCP4-LISTEN:$lp,fork,reuseaddr,backlog=4096,nodelay" \
				"TCP4:$S_IP:$port,nodelay" >>"$WORK/socat.log" 2>&1 &
			PROXY_PIDS="$PROXY_PIDS $!"
			rules="$rules iifname \"r-c\" tcp dport $port redirect to :$lp
"
		done
		for lp in $(seq 10001 "$lp"); do
			wait_listen "$NR" "$lp" 5 || { START_ERR="socat did not start: $(tail -1 "$WORK/socat.log")"; return 1; }
		done
		inR nft -f - <<-EOF
		table ip kbench {
		  chain pre { type nat hook prerouting priority dstnat; policy accept;
		  $rules
		  }
		}
		EOF
		;;
	esac
	return 0
}

stop_proxy() {
	local p
	nft_clear
	for p in $PROXY_PIDS; do kill "$p" 2>/dev/null; done
	for _ in $(seq 1 50); do
		local alive=0
		for p in $PROXY_PIDS; do kill -0 "$p" 2>/dev/null && alive=1; done
		[ $alive = 0 ] && break
		sleep 0.1
	done
	for p in $PROXY_PIDS; do kill -9 "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
	# forked children (socat) that outlived their parent
	for p in $(ip netns pids "$NR" 2>/dev/null); do kill "$p" 2>/dev/null; done
	PROXY_PIDS=""
}
