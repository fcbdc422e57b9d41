# shellcheck shell=dash disable=SC3043
# Stand-in for OpenWrt's /lib/functions/procd.sh that records, instead of sending to procd
# over ubus, what a service asks for: one line per item in $SHIM_OUT, `KEY<TAB>VALUE`, e.g.
#   instance<TAB>lan        param command<TAB>/usr/sbin/ksocks   param limits<TAB>nofile=...
#   close_instance          trigger<TAB>config.change ksocks     validate<TAB>enabled bool:0
#   close_service<TAB>set   kill<TAB>ksocks
# An array parameter (command, respawn, file, ...) gives one line per element. Like the real
# one, an empty `respawn` gets the system defaults (3600 5 5) when the instance closes, and
# uci_load_validate/uci_validate_section run validate_data and eval its output.

: "${SHIM_OUT:=/dev/stderr}"

_shim_rec() { printf '%s\t%s\n' "$1" "$2" >>"$SHIM_OUT"; }

procd_open_service() { _SHIM_RESPAWN=; _shim_rec service "$1"; }
procd_close_service() {
	service_triggers
	_shim_rec close_service "${1:-set}"
}
procd_open_instance() {
	_SHIM_RESPAWN=
	_shim_rec instance "${1:-instance}"
}
procd_set_param() {
	local type="$1" v
	shift
	[ "$type" = respawn ] && _SHIM_RESPAWN=${1:-empty}
	if [ $# = 0 ]; then
		_shim_rec "param $type" ""
		return
	fi
	for v in "$@"; do _shim_rec "param $type" "$v"; done
}
procd_append_param() { procd_set_param "$@"; }
procd_close_instance() {
	local v
	if [ "$_SHIM_RESPAWN" = empty ]; then
		for v in 3600 5 5; do _shim_rec "param respawn" "$v"; done
	fi
	_shim_rec close_instance ""
}
procd_add_reload_trigger() {
	local f
	for f in "$@"; do _shim_rec trigger "config.change $f"; done
}
procd_add_validation() { "$@"; }
procd_kill() { _shim_rec kill "$1${2:+ $2}"; }
procd_running() { return 1; }

# What validate_data prints for the schema (section ""), recorded.
json_add_object() { :; }
json_close_object() { :; }
json_add_string() {
	case "$1" in package | type) ;; *) _shim_rec validate "$1 $2" ;; esac
}

uci_validate_section() {
	local _package="$1" _type="$2" _name="$3" _result _error
	shift 3
	_result=$(validate_data "$_package" "$_type" "$_name" "$@" 2>/dev/null)
	_error=$?
	eval "$_result"
	[ "$_error" = 0 ] || validate_data "$_package" "$_type" "$_name" "$@" 2>&1 >/dev/null |
		while read -r _line; do _shim_rec validate_log "$_line"; done
	return $_error
}

uci_load_validate() {
	local _package="$1" _type="$2" _name="$3" _function="$4" _option _result
	shift 4
	for _option in "$@"; do
		eval "local ${_option%%:*}"
	done
	uci_validate_section "$_package" "$_type" "$_name" "$@"
	_result=$?
	[ -n "$_function" ] || return $_result
	eval "$_function \"\$_name\" \"\$_result\""
}
