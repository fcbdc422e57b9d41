# shellcheck shell=bash
# shellcheck disable=SC2034 # its globals are read by bench/run and the other parts
# bench/lib/topology.sh — part of bench/run (sourced by it, in order, after prereqs.sh): the
# client -> router -> server namespaces and what lives in them. Runs at source time: the
# addresses and ports, the work directory ($WORK, $RAW), the private ksocks copy, the cpuacct
# cgroup and its cgexec helper, the cleanup trap (namespaces, cgroup, work directory), the fd
# limit and the idle-connection counts. Defines inC/inR/inS, setup_topology, wait_listen,
# start_servers (nginx, sockperf, hold and stall servers) and restart_iperf.
# ---------------------------------------------------------------- topology
N=240
TAG="ksb$(( $$ % 10000 ))-$N"   # not "ks<pid>-": the test harness reaps those as stale
NC="$TAG-c"; NR="$TAG-r"; NS="$TAG-s"
C_IP=198.18.$N.2; R_C_IP=198.18.$N.1; R_S_IP=198.19.$N.1; S_IP=198.19.$N.2
PROXY_PORT=12345
IPERF_PORT=5201; SOCKPERF_PORT=11111; HTTP_PORT=80; HOLD_PORTS=7000-7009
STALL_PORT=7100; STALL_CONNS=8   # stalled bulk downloads (stall_test)
WORK=$(mktemp -d /tmp/ksocks-bench.XXXXXX)
RAW="$WORK/raw.tsv"
: >"$RAW"
PROXY_PIDS=""
declare -A PROXY_NAME=()  # pid -> command name, recorded at start (an exited pid has none)
KS_QUIET="^ksocks: (listening|data plane|ready|stats|upstream|tcsplice on )"   # startup lines, not complaints
ROUND=1
CUR_CFG=""

# run a private copy of ksocks: a rebuild during the run must not mix two builds in one table
KSOCKS_REV=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || true)
[ -n "$KSOCKS_REV" ] && [ -n "$(git -C "$REPO" status --porcelain -- src bpf build.rs Cargo.toml 2>/dev/null)" ] \
	&& KSOCKS_REV="$KSOCKS_REV+uncommitted changes"
if [ -z "$KSOCKS_NOTE" ] && [ -x "$KSOCKS" ]; then
	cp "$KSOCKS" "$WORK/ksocks" && KSOCKS="$WORK/ksocks"
fi

# CPU accounting: a cpuacct cgroup (v1) holds every process the bench starts in its namespaces,
# with a child "proxy" for the proxy under test and "load" for servers and clients. Its
# cpuacct.usage is exact (ns, includes exited threads and forked children, and softirq work done
# in those tasks' context). Without it, /proc/PID/stat ticks are used for the proxy.
# cgexec runs before `ip netns exec`, which remounts /sys without the cgroup mounts.
CG=/sys/fs/cgroup/cpuacct/ksocks-bench-$$
if [ -d /sys/fs/cgroup/cpuacct ] && mkdir "$CG" "$CG/proxy" "$CG/load" 2>/dev/null; then :; else CG=""; fi
export CG
CGX="$WORK/cgexec"
cat >"$CGX" <<'EOF'
#!/bin/sh
# cgexec GROUP CMD... : join the bench cgroup GROUP (when there is one), then exec CMD
g=$1; shift
[ -n "${CG:-}" ] && echo $$ >"$CG/$g/cgroup.procs" 2>/dev/null
exec "$@"
EOF
chmod +x "$CGX"

cleanup() {
	local rc=$? ns p
	trap - EXIT INT TERM
	for ns in "$NC" "$NR" "$NS"; do
		ip netns list 2>/dev/null | grep -qw "$ns" || continue
		for p in $(ip netns pids "$ns" 2>/dev/null); do kill "$p" 2>/dev/null; done
	done
	for _ in $(seq 1 30); do
		p=""
		for ns in "$NC" "$NR" "$NS"; do p="$p$(ip netns pids "$ns" 2>/dev/null)"; done
		[ -z "$p" ] && break
		sleep 0.1
	done
	for ns in "$NC" "$NR" "$NS"; do
		for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
		ip netns del "$ns" 2>/dev/null
	done
	if [ -n "$CG" ]; then
		for _ in $(seq 1 20); do rmdir "$CG/proxy" "$CG/load" "$CG" 2>/dev/null; [ -d "$CG" ] || break; sleep 0.1; done
	fi
	[ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
	exit $rc
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

inC() { ip netns exec "$NC" "$@"; }
inR() { ip netns exec "$NR" "$@"; }
inS() { ip netns exec "$NS" "$@"; }

setup_topology() {
	ip netns add "$NC" && ip netns add "$NR" && ip netns add "$NS" || return 1
	ip -n "$NR" link add r-c type veth peer name c-r netns "$NC" || return 1
	ip -n "$NR" link add r-s type veth peer name s-r netns "$NS" || return 1
	ip -n "$NC" addr add "$C_IP/24" dev c-r
	ip -n "$NR" addr add "$R_C_IP/24" dev r-c
	ip -n "$NR" addr add "$R_S_IP/24" dev r-s
	ip -n "$NS" addr add "$S_IP/24" dev s-r
	local ns
	for ns in "$NC" "$NR" "$NS"; do ip -n "$ns" link set lo up; done
	ip -n "$NC" link set c-r up; ip -n "$NR" link set r-c up
	ip -n "$NR" link set r-s up; ip -n "$NS" link set s-r up
	ip -n "$NC" route add default via "$R_C_IP"
	ip -n "$NS" route add default via "$R_S_IP"
	inR sysctl -qw net.ipv4.ip_forward=1
	# UDP rows: TPROXY needs marked datagrams routed to the router itself
	ip -n "$NR" rule add fwmark 1 lookup 100 && ip -n "$NR" route add local 0.0.0.0/0 dev lo table 100
	# the router's proxies bind listeners below 20000: keep its ephemeral ports above
	inR sysctl -qw net.ipv4.ip_local_port_range="20000 65535"
	for ns in "$NC" "$NS"; do ip netns exec "$ns" sysctl -qw net.ipv4.ip_local_port_range="1024 65535"; done
	for ns in "$NC" "$NR" "$NS"; do
		ip netns exec "$ns" sysctl -qw \
			net.core.somaxconn=65535 net.ipv4.tcp_max_syn_backlog=65535 net.ipv4.tcp_tw_reuse=1
	done
}

# the highest fd limit we may set (raising the hard limit needs CAP_SYS_RESOURCE)
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
# a relay needs 2 descriptors per connection: below 20,100 the "10,000" step holds what fits
HOLD_MAX=$(( (NOFILE - 100) / 2 ))
[ "$HOLD_MAX" -gt 10000 ] && HOLD_MAX=10000
HOLD_COUNTS="1000,$HOLD_MAX"

wait_listen() { # ns port [secs]
	for _ in $(seq 1 $(( ${3:-10} * 10 ))); do
		ip netns exec "$1" ss -Hltn "sport = :$2" 2>/dev/null | grep -q . && return 0
		sleep 0.1
	done
	return 1
}

start_servers() {
	[ "$TCP_ROWS" = 1 ] || return 0   # UDP rows only need iperf3, started per configuration
	local cfg="$WORK/nginx"
	mkdir -p "$cfg/logs"
	cat >"$cfg/nginx.conf" <<-EOF
	worker_processes 1;
	daemon off;
	pid $cfg/nginx.pid;
	error_log $cfg/logs/error.log error;
	worker_rlimit_nofile 16384;
	events { worker_connections 8192; }
	http {
	  access_log off;
	  client_body_temp_path $cfg/body; proxy_temp_path $cfg/proxy;
	  fastcgi_temp_path $cfg/fcgi; uwsgi_temp_path $cfg/uwsgi; scgi_temp_path $cfg/scgi;
	  server { listen $S_IP:$HTTP_PORT backlog=65535; location / { return 200 "ok\n"; } }
	}
	EOF
	"$CGX" load ip netns exec "$NS" nginx -p "$cfg" -c "$cfg/nginx.conf" >"$cfg/logs/stdout" 2>&1 &
	"$CGX" load ip netns exec "$NS" sockperf sr --tcp -i "$S_IP" -p "$SOCKPERF_PORT" >"$WORK/sockperf-server.log" 2>&1 &
	"$CGX" load ip netns exec "$NS" "$PY" "$TOOLS" hold-server --ports "$HOLD_PORTS" --status "$WORK/hold-server" \
		--max-time 3600 >"$WORK/hold-server.log" 2>&1 &
	"$CGX" load ip netns exec "$NS" "$PY" "$TOOLS" stall-server --port "$STALL_PORT" --max-time 3600 \
		>"$WORK/stall-server.log" 2>&1 &
	wait_listen "$NS" "$HTTP_PORT" && wait_listen "$NS" "$SOCKPERF_PORT" && wait_listen "$NS" 7000 \
		&& wait_listen "$NS" "$STALL_PORT" || return 1
	inC "$PY" -c "import socket,sys; socket.create_connection(('$S_IP', $HTTP_PORT), 3).close()" \
		|| { log "topology: client cannot reach the server"; return 1; }
}

# iperf3 -s is restarted per configuration so a test stuck by a broken proxy cannot poison the next
IPERF_PID=""
restart_iperf() {
	[ -n "$IPERF_PID" ] && { kill "$IPERF_PID" 2>/dev/null; wait "$IPERF_PID" 2>/dev/null; }
	"$CGX" load ip netns exec "$NS" iperf3 -s -B "$S_IP" -p "$IPERF_PORT" --idle-timeout 30 >"$WORK/iperf-server.log" 2>&1 &
	IPERF_PID=$!
	wait_listen "$NS" "$IPERF_PORT"
}
