# shellcheck shell=bash
# bench/lib/measure.sh — part of bench/run (sourced by it, in order, after proxies.sh): result
# recording into $RAW (rec, note) and the measurements: CPU and memory accounting (cg_secs,
# cpu_of, bench_cpu, rss_of), iperf3 throughput with CPU per GB, sockperf latency, wrk
# connection rate, idle-connection memory (hold_test), stalled downloads (stall_test), binary
# size, the optional perf profile, the UDP run, and measure / measure_udp (one round of a
# configuration).
# ---------------------------------------------------------------- result recording
rec() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$RAW"; }   # config metric value
note() { rec "$1" note "$2"; log "$1: $2"; }

# ---------------------------------------------------------------- measurements
cg_secs() { [ -n "$CG" ] && awk '{printf "%.4f\n", $1 / 1e9}' "$CG/$1/cpuacct.usage" || echo 0; }
cpu_of() { # the proxy's CPU seconds so far
	# shellcheck disable=SC2086 # one argument per pid
	if [ -n "$CG" ]; then cg_secs proxy
	elif [ -n "$PROXY_PIDS" ]; then $PY "$TOOLS" cpu $PROXY_PIDS
	else echo 0; fi
}
bench_cpu() { # CPU seconds of everything the bench runs (proxy, servers, clients)
	[ -n "$CG" ] && cg_secs . || echo 0
}
rss_of() { # KiB; socat forks a process per connection: use Pss there so shared pages count once
	[ -n "$PROXY_PIDS" ] || { echo 0; return; }
	# shellcheck disable=SC2086 # one argument per pid
	if [ "$1" = socat ]; then $PY "$TOOLS" pss $PROXY_PIDS; else $PY "$TOOLS" rss $PROXY_PIDS; fi
}

iperf_once() { # config streams run -> records tput (Gbit/s) and, for 1 stream, CPU per GB
	local c=$1 P=$2 out="$WORK/iperf-$1-$2-$3.json" cpu0 cpu1 sys0 sys1 b0 b1 kt res
	cpu0=$(cpu_of); sys0=$($PY "$TOOLS" sysbusy); b0=$(bench_cpu); $PY "$TOOLS" kthreads-snap "$WORK/kthreads"
	timeout $(( DUR + 20 )) "$CGX" load ip netns exec "$NC" iperf3 -c "$S_IP" -p "$IPERF_PORT" -t "$DUR" -P "$P" \
		--connect-timeout 3000 -J >"$out" 2>/dev/null
	sleep 0.3   # let forked relays exit and be reaped so their CPU lands in cutime
	cpu1=$(cpu_of); sys1=$($PY "$TOOLS" sysbusy); b1=$(bench_cpu); kt=$($PY "$TOOLS" kthreads-delta "$WORK/kthreads")
	b1=$(awk -v a="$b1" -v b="$kt" 'BEGIN{printf "%.4f", a + b}')
	res=$($PY - "$out" "$cpu0" "$cpu1" "$sys0" "$sys1" "$b0" "$b1" "$kt" <<-'EOF'
	import json, sys
	try:
	    d = json.load(open(sys.argv[1]))
	    e = d["end"]["sum_received"]
	    gbps, gb = e["bits_per_second"] / 1e9, e["bytes"] / 1e9
	except Exception:
	    sys.exit(1)
	if gb <= 0:
	    sys.exit(1)
	c0, c1, s0, s1, b0, b1, kt = map(float, sys.argv[2:9])
	print(f"{gbps:.3f} {(c1 - c0) / gb:.4f} {(s1 - s0) / gb:.4f} {(b1 - b0) / gb:.4f} {kt / gb:.4f}")
	EOF
	) || { note "$c" "iperf3 -P $P run $3 failed: $(grep -o '"error":[^,}]*' "$out" 2>/dev/null | head -1)"; return 1; }
	# shellcheck disable=SC2086 # the fields of the result line
	set -- $res
	if [ "$P" = 1 ]; then
		rec "$c" tput1 "$1"; rec "$c" proxy_cpu_gb "$2"; rec "$c" sys_cpu_gb "$3"
		[ -n "$CG" ] && { rec "$c" bench_cpu_gb "$4"; rec "$c" kthread_cpu_gb "$5"; }
	else
		rec "$c" tput8 "$1"
	fi
}

sockperf_once() {
	local c=$1 out="$WORK/sockperf-$1-$2.txt" avg p99
	timeout $(( DUR + 20 )) "$CGX" load ip netns exec "$NC" sockperf pp --tcp -i "$S_IP" -p "$SOCKPERF_PORT" \
		-m 64 -t "$DUR" --full-rtt >"$out" 2>&1
	avg=$(grep -o 'avg-rtt=[0-9.]*' "$out" | head -1 | cut -d= -f2)
	p99=$(grep 'percentile 99.000' "$out" | head -1 | awk '{print $NF}')
	if [ -n "$avg" ] && [ -n "$p99" ]; then
		rec "$c" lat_avg "$avg"; rec "$c" lat_p99 "$p99"
	else
		note "$c" "sockperf run $2 failed: $(grep -v '^$' "$out" | tail -1 | cut -c1-120)"
	fi
}

wrk_once() {
	local c=$1 out="$WORK/wrk-$1-$2.txt" rps
	timeout $(( DUR + 20 )) "$CGX" load ip netns exec "$NC" wrk -t 1 -c 32 -d "${DUR}s" --timeout 2s \
		-H 'Connection: close' "http://$S_IP:$HTTP_PORT/" >"$out" 2>&1
	rps=$(awk '/^Requests\/sec:/{print $2}' "$out")
	if [ -n "$rps" ] && [ "${rps%.*}" -gt 0 ] 2>/dev/null; then
		rec "$c" cps "$rps"
		grep -q 'Socket errors' "$out" && note "$c" "wrk run $2: $(grep 'Socket errors' "$out" | sed 's/^ *//')"
	else
		note "$c" "wrk run $2 failed: $(tail -1 "$out" | cut -c1-120)"
	fi
}

hold_status() { cat "$WORK/hold-server" 2>/dev/null || echo 0; }

wait_held() { # target secs -> echoes count reached (stops early when stable for 2 s)
	local target=$1 n last=-1 stable=0
	for _ in $(seq 1 $(( $2 * 10 ))); do
		n=$(hold_status)
		[ "$n" -ge "$target" ] 2>/dev/null && break
		if [ "$n" = "$last" ]; then stable=$((stable + 1)); [ $stable -ge 20 ] && break; else stable=0; fi
		last=$n
		sleep 0.1
	done
	hold_status
}

hold_test() { # config: RSS with 1,000 and 10,000 concurrent idle connections
	local c=$1 counts=$HOLD_COUNTS pid n stage=0 target
	[ "$c" = socat ] && { counts=1000; note socat "10,000 connections skipped: socat forks one process per connection"; }
	rm -f "$WORK/hold-client"
	"$CGX" load ip netns exec "$NC" "$PY" "$TOOLS" hold-client --dst "$S_IP" --ports "$HOLD_PORTS" \
		--counts "$counts" --status "$WORK/hold-client" --max-time 240 \
		>"$WORK/hold-client.log" 2>&1 &
	pid=$!
	for target in ${counts//,/ }; do
		for _ in $(seq 1 900); do
			grep -q "stage=$stage " "$WORK/hold-client" 2>/dev/null && break
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		n=$(wait_held "$target" 20)
		sleep 1
		local label=1k; [ "$target" -gt 1000 ] && label=10k
		rec "$c" "rss_$label" "$(rss_of "$c")"
		rec "$c" "held_$label" "$n"
		[ "$n" -ge "$target" ] 2>/dev/null || note "$c" "only $n of $target idle connections reached the server ($(cat "$WORK/hold-client" 2>/dev/null); fd limit $NOFILE)"
		kill -USR1 "$pid" 2>/dev/null
		stage=$((stage + 1))
	done
	kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
	for _ in $(seq 1 200); do [ "$(hold_status)" -le 0 ] 2>/dev/null && break; sleep 0.1; done
}

stall_test() { # config: what the router holds for each stalled bulk download
	local c=$1 pid n=$STALL_CONNS held rss0 rss1 status="$WORK/stall-client"
	rm -f "$status"
	rss0=$(rss_of "$c")
	"$CGX" load ip netns exec "$NC" "$PY" "$TOOLS" stall-client --dst "$S_IP" --port "$STALL_PORT" \
		--count "$n" --status "$status" --max-time 60 >"$WORK/stall-client.log" 2>&1 &
	pid=$!
	for _ in $(seq 1 100); do grep -q opened "$status" 2>/dev/null && break; sleep 0.1; done
	sleep 4   # the handoff, then the senders fill whatever holds them
	# bytes queued in every TCP socket of the router (a proxy's, or frozen ones), plus the
	# proxy's own growth
	held=$(inR ss -tnH 2>/dev/null | awk '{s += $2 + $3} END {print s + 0}')
	rss1=$(rss_of "$c")
	case "$c" in ksocks*|ref-*)  # which plane carried the stalled connections
		# shellcheck disable=SC2086 # PROXY_PIDS is a list of pids
		kill -USR1 $PROXY_PIDS 2>/dev/null; sleep 0.3
		note "$c" "stall test: $(grep '^ksocks: stats' "$WORK/ksocks-$c-r$ROUND.log" | tail -1 | grep -o 'open=.*fallbacks=[0-9]*')" ;;
	esac
	kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
	rec "$c" stall_kib "$(awk -v h="$held" -v a="$rss0" -v b="$rss1" -v n="$n" 'BEGIN{d = b - a; if (d < 0) d = 0; printf "%.1f", (h / 1024 + d) / n}')"
	grep -q "opened=$n" "$status" 2>/dev/null || note "$c" "stall test: $(cat "$status" 2>/dev/null) of $n connections"
	sleep 1
}

bin_info() { # config: sum of main executable sizes, and a description
	local c=$1 b r total=0 desc=""
	for b in $BINS; do
		r=$(readlink -f "$b") || continue
		local sz; sz=$(stat -c %s "$r")
		total=$((total + sz))
		desc="$desc${desc:+ + }$(basename "$r") $((sz / 1024)) KiB $($PY "$TOOLS" elf "$r")"
	done
	[ $total -gt 0 ] && { rec "$c" bin_size "$total"; rec "$c" bin_desc "$desc"; }
}

want_perf() { [ "$PERF" = all ] && return 0; case ",$PERF," in *",$1,"*) return 0 ;; esac; return 1; }

perf_once() { # config: an extra 1-stream iperf3 run under `perf record -a -g` (not measured)
	local c=$1
	local pd="$WORK/perf-$c.data" txt="$OUT-perf-$c.txt" ip comms pids ns
	command -v perf >/dev/null || { note "$c" "perf not installed: no profile"; return; }
	# iperf3 runs 6 s longer than the profile so a slow start of perf on a busy machine still
	# lands inside it
	"$CGX" load ip netns exec "$NC" iperf3 -c "$S_IP" -p "$IPERF_PORT" -t $(( DUR + 6 )) --connect-timeout 3000 \
		>"$WORK/iperf-perf-$c.txt" 2>&1 &
	ip=$!
	sleep 2
	ip netns exec "$NR" ss -tnmi >"$WORK/ss-perf-$c.txt" 2>/dev/null
	timeout $(( DUR + 20 )) perf record -e cpu-clock -F 999 -a -g -o "$pd" -- sleep "$DUR" >/dev/null 2>&1
	wait "$ip" 2>/dev/null
	{
		echo "# perf profile of one 1-stream iperf3 run through $c (perf record -e cpu-clock -F 999 -a -g)"
		echo "# $(grep -E 'receiver' "$WORK/iperf-perf-$c.txt" 2>/dev/null | tail -1)"
		echo "# router sockets 2 s into the run (ss -tnmi in the router; empty for direct):"
		head -40 "$WORK/ss-perf-$c.txt" | sed 's/^/#   /'
	} >"$txt"
	[ -s "$pd" ] || { note "$c" "perf record failed: no profile"; return; }
	{
		echo; echo "## where the CPU went, by command and CPU (whole machine, other work included)"
		timeout 120 perf report -i "$pd" --stdio --no-children --sort comm,cpu --percent-limit 0.5 -g none 2>/dev/null \
			| grep -v '^#' | grep -v '^$'
	} >>"$txt"
	# only the benchmark's own processes (by pid: other work on the machine may run the same
	# commands, e.g. ksocks under cargo test) and the kernel threads
	pids=$( { for ns in "$NC" "$NR" "$NS"; do ip netns pids "$ns" 2>/dev/null; done; echo "$ip"; } | sort -un | paste -sd, -)
	comms=$(timeout 120 perf report -i "$pd" --stdio --no-children --sort comm -g none 2>/dev/null \
		| awk '!/^#/ && NF >= 2 {print $2}' | grep -E '^(ksoftirqd/[0-9]+|kworker/.*)$' | paste -sd, -)
	{
		echo; echo "## hottest symbols in the benchmark's own processes (pids $pids)"
		timeout 120 perf report -i "$pd" --stdio --no-children --pid "$pids" --sort comm,sym \
			--percent-limit 0.5 -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -60
		echo; echo "## hottest symbols in kernel threads ($comms)"
		[ -n "$comms" ] && timeout 120 perf report -i "$pd" --stdio --no-children --comms "$comms" --sort comm,sym \
			--percent-limit 0.2 -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -30
		echo; echo "## call chains into the top symbols of the benchmark's processes (caller graph, >= 2%)"
		timeout 120 perf report -i "$pd" --stdio --no-children --pid "$pids" --sort sym \
			--percent-limit 2 -g caller,0.5,callee,function,percent --max-stack 14 2>/dev/null \
			| grep -v '^#' | grep -v '^$' | head -220
	} >>"$txt"
	rm -f "$pd"
	note "$c" "perf profile: $(basename "$txt")"
}

udp_once() { # config run -> records UDP throughput received, loss %, CPU per GB received
	local c=$1 out="$WORK/iperf-udp-$1-$2.json" cpu0 cpu1 sys0 sys1 b0 b1 kt res
	cpu0=$(cpu_of); sys0=$($PY "$TOOLS" sysbusy); b0=$(bench_cpu); $PY "$TOOLS" kthreads-snap "$WORK/kthreads"
	timeout $(( DUR + 20 )) "$CGX" load ip netns exec "$NC" iperf3 -c "$S_IP" -p "$IPERF_PORT" -u -b "$UDP_RATE" -l "$UDP_LEN" -w 4M \
		-t "$DUR" --connect-timeout 3000 -J >"$out" 2>/dev/null
	sleep 0.3
	cpu1=$(cpu_of); sys1=$($PY "$TOOLS" sysbusy); b1=$(bench_cpu); kt=$($PY "$TOOLS" kthreads-delta "$WORK/kthreads")
	b1=$(awk -v a="$b1" -v b="$kt" 'BEGIN{printf "%.4f", a + b}')
	res=$($PY - "$out" "$cpu0" "$cpu1" "$sys0" "$sys1" "$b0" "$b1" <<-'EOF'
	import json, sys
	try:
	    e = json.load(open(sys.argv[1]))["end"]
	    sent, got = e["sum_sent"], e["sum_received"]
	    gb = got["bytes"] / 1e9
	    loss = e["sum"]["lost_percent"]
	except Exception:
	    sys.exit(1)
	if gb <= 0:
	    sys.exit(1)
	c0, c1, s0, s1, b0, b1 = map(float, sys.argv[2:8])
	print(f"{sent['bits_per_second'] / 1e9:.3f} {got['bits_per_second'] / 1e9:.3f} {loss:.3f} "
	      f"{(c1 - c0) / gb:.4f} {(s1 - s0) / gb:.4f} {(b1 - b0) / gb:.4f}")
	EOF
	) || { note "$c" "iperf3 -u run $2 failed: $(grep -o '"error":[^,}]*' "$out" 2>/dev/null | head -1)"; return 1; }
	# shellcheck disable=SC2086 # the six figures, split on blanks
	set -- $res
	rec "$c" udp_sent "$1"; rec "$c" udp_tput "$2"; rec "$c" udp_loss "$3"
	rec "$c" udp_proxy_cpu_gb "$4"; rec "$c" udp_sys_cpu_gb "$5"
	[ -n "$CG" ] && rec "$c" udp_bench_cpu_gb "$6"
}

measure_udp() { # config round: the fixed-rate UDP run; memory and binary size once
	local c=$1 r=$2
	[ "$r" = 1 ] && [ -n "$PROXY_PIDS" ] && rec "$c" rss_idle "$(rss_of "$c")"
	udp_once "$c" "$r"
	if [ "$r" = "$RUNS" ]; then
		[ -n "$PROXY_PIDS" ] && rec "$c" udp_rss "$(rss_of "$c")"
		bin_info "$c"
	fi
}

measure() { # config round: one run of every metric; memory, binary size and profile once
	local c=$1 r=$2
	[ "$r" = 1 ] && rec "$c" rss_idle "$(rss_of "$c")"
	iperf_once "$c" 1 "$r"
	iperf_once "$c" 8 "$r"
	[ "$r" = 1 ] && want_perf "$c" && perf_once "$c"
	sockperf_once "$c" "$r"
	wrk_once "$c" "$r"
	if [ "$r" = "$RUNS" ]; then hold_test "$c"; stall_test "$c"; bin_info "$c"; fi
}
