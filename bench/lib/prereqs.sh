# shellcheck shell=bash
# shellcheck disable=SC2034 # its globals are read by bench/run and the other parts
# bench/lib/prereqs.sh — part of bench/run (sourced by it, in order, after option parsing):
# installs what is missing (apt packages, shadowsocks-rust with cargo into $CACHE/cargo),
# builds ksocks (cargo build --release) and checks that the measuring tools are there.
# Runs at source time: sets TCP_ROWS, SSRUST_BIN, KSOCKS, KSOCKS_NOTE, KSOCKS_BUILD_NOTE; exits
# when a required tool is missing. Uses CONFIGS, INSTALL, BUILD, REPO, CACHE, PY and log().
# ---------------------------------------------------------------- install what is missing
APT_UPDATED=0
apt_install() {
	[ "$INSTALL" = 1 ] || return 1
	if [ "$APT_UPDATED" = 0 ]; then
		log "apt-get update"
		DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || true
		APT_UPDATED=1
	fi
	log "apt-get install -y $*"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1
}

# A run of UDP rows only needs iperf3 and nft (no TCP servers, no chart).
TCP_ROWS=0
for c in $CONFIGS; do case "$c" in udp-*) ;; *) TCP_ROWS=1 ;; esac; done
need_pkgs=()
pairs="iperf3:iperf3 nft:nftables"
[ "$TCP_ROWS" = 1 ] && pairs="$pairs sockperf:sockperf wrk:wrk nginx:nginx-light redsocks:redsocks
	microsocks:microsocks ss-redir:shadowsocks-libev socat:socat"
for pair in $pairs; do
	command -v "${pair%%:*}" >/dev/null 2>&1 || need_pkgs+=("${pair#*:}")
done
[ "$TCP_ROWS" = 1 ] && { $PY -c 'import matplotlib' 2>/dev/null || need_pkgs+=(python3-matplotlib); }
if [ ${#need_pkgs[@]} -gt 0 ]; then
	apt_install "${need_pkgs[@]}" || log "apt-get install failed for: ${need_pkgs[*]} (rows needing them are skipped)"
fi

# shadowsocks-rust (sslocal/ssserver): cargo install into $CACHE/cargo, once (long compile).
SSRUST_BIN=""
find_ssrust() {
	local d
	for d in "$CACHE/cargo/bin" "$(dirname "$(command -v ssserver 2>/dev/null || echo /nonexistent/x)")"; do
		if [ -x "$d/ssserver" ] && [ -x "$d/sslocal" ]; then SSRUST_BIN="$d"; return 0; fi
	done
	return 1
}
case " $CONFIGS " in *" ss-rust "*|*" ksocks-ss "*|*" udp-ss-rust "*)
	if ! find_ssrust && [ "$INSTALL" = 1 ] && command -v cargo >/dev/null 2>&1; then
		log "installing shadowsocks-rust with cargo into $CACHE/cargo (first run only; this compiles for a long time)"
		mkdir -p "$CACHE"
		nice -n 10 cargo install shadowsocks-rust --locked --no-default-features \
			--features "local local-redir server multi-threaded" \
			--root "$CACHE/cargo" --target-dir "$CACHE/target" >"$CACHE/cargo-install.log" 2>&1 \
			|| log "cargo install shadowsocks-rust failed (see $CACHE/cargo-install.log)"
		find_ssrust || true
	fi ;;
esac

# ksocks: cargo build --release in the repo
KSOCKS="$REPO/target/release/ksocks"
KSOCKS_NOTE=""
KSOCKS_BUILD_NOTE=""
case " $CONFIGS " in *" ksocks"*|*" udp-ksocks"*)
	if [ "$BUILD" = 1 ] && [ -f "$REPO/Cargo.toml" ] && command -v cargo >/dev/null 2>&1; then
		log "cargo build --release (ksocks)"
		if ! (cd "$REPO" && cargo build --release >"${TMPDIR:-/tmp}/ksocks-bench-build.log" 2>&1); then
			log "cargo build --release failed (tail of log:)"; tail -5 "${TMPDIR:-/tmp}/ksocks-bench-build.log" >&2
			if [ -x "$KSOCKS" ]; then
				KSOCKS_BUILD_NOTE="cargo build --release failed; measured the existing binary of $(date -u -r "$KSOCKS" '+%F %H:%M UTC')"
			else
				KSOCKS_NOTE="cargo build --release failed"
			fi
		fi
	fi
	if [ ! -x "$KSOCKS" ]; then
		KSOCKS_NOTE="${KSOCKS_NOTE:-no binary} ($KSOCKS missing)"
	elif ! "$KSOCKS" --help >/dev/null 2>&1; then
		KSOCKS_NOTE="ksocks --help fails"
	fi ;;
esac

tools="iperf3 nft ip ss"
[ "$TCP_ROWS" = 1 ] && tools="$tools sockperf wrk nginx"
for t in $tools; do
	command -v "$t" >/dev/null 2>&1 || { echo "bench/run: $t missing and could not be installed" >&2; exit 1; }
done
