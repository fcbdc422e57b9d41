# shellcheck shell=dash disable=SC2034,SC3043
# Stand-in for the parts of OpenWrt's /lib/functions.sh (and /lib/config/uci.sh) that init
# scripts use: UCI packages loaded into CONFIG_<section>_<option> variables (lists joined by
# spaces, and <option>_LENGTH/_ITEM<n>), the config_cb/option_cb/list_cb hooks, config_foreach,
# config_get, config_get_bool, append, list_contains. Reads $UCI_CONFIG_DIR (default
# /etc/config); a UCI file is made of `config`, `option` and `list` lines, which are shell
# commands once the functions of those names below exist.

append() {
	local var="$1" value="$2" sep="${3:- }"
	eval "export -- \"$var=\${$var:+\${$var}\${value:+\$sep}}\$value\""
}

list_contains() {
	local var="$1" str="$2" val
	eval "val=\" \${$var} \""
	[ "${val%% "$str" *}" != "$val" ]
}

reset_cb() {
	config_cb() { return 0; }
	option_cb() { return 0; }
	list_cb() { return 0; }
}
reset_cb

config_set() {
	eval "CONFIG_${1}_${2}=\$3"
}

config() {
	local cfgtype="$1" name="$2"
	CONFIG_NUM_SECTIONS=$((CONFIG_NUM_SECTIONS + 1))
	name="${name:-cfg$CONFIG_NUM_SECTIONS}"
	append CONFIG_SECTIONS "$name"
	CONFIG_SECTION="$name"
	config_set "$name" TYPE "$cfgtype"
	config_cb "$cfgtype" "$name"
}

option() {
	config_set "$CONFIG_SECTION" "$1" "$2"
	option_cb "$1" "$2"
}

list() {
	local len
	config_get len "$CONFIG_SECTION" "${1}_LENGTH" 0
	len=$((len + 1))
	config_set "$CONFIG_SECTION" "${1}_ITEM$len" "$2"
	config_set "$CONFIG_SECTION" "${1}_LENGTH" "$len"
	append "CONFIG_${CONFIG_SECTION}_$1" "$2" " "
	list_cb "$1" "$2"
}

package() { return 0; }

config_load() {
	local file="${UCI_CONFIG_DIR:-/etc/config}/$1"
	CONFIG_SECTIONS=
	CONFIG_NUM_SECTIONS=0
	CONFIG_SECTION=
	[ -f "$file" ] || return 1
	# shellcheck disable=SC1090
	. "$file"
}

config_get() {
	case "$2${3:-$1}" in *[!A-Za-z0-9_]*) return 0 ;; esac
	case "$3" in
	"") eval "echo \"\${CONFIG_${1}_${2}:-\${4}}\"" ;;
	*) eval "export -- \"$1=\${CONFIG_${2}_${3}:-\${4}}\"" ;;
	esac
}

config_get_bool() {
	local _tmp
	config_get _tmp "$2" "$3" "$4"
	case "$_tmp" in
	1 | on | true | yes | enabled) _tmp=1 ;;
	0 | off | false | no | disabled) _tmp=0 ;;
	*) _tmp="$4" ;;
	esac
	export "$1=$_tmp"
}

config_foreach() {
	local function="$1" type="$2" section cfgtype
	shift 2
	for section in $CONFIG_SECTIONS; do
		config_get cfgtype "$section" TYPE
		[ -n "$type" ] && [ "$type" != "$cfgtype" ] && continue
		"$function" "$section" "$@"
	done
}
