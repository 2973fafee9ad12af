#!/usr/bin/env bash
# Creates a private SoftHSM2 token under DIR and prints the line that points SoftHSM at it.
#
#   hsm-config/softhsm2-token.sh DIR [LABEL [PIN [SO_PIN]]]
#   eval "$(hsm-config/softhsm2-token.sh DIR)"        # sets SOFTHSM2_CONF in this shell
#
# Writes DIR/softhsm2.conf (from softhsm2.conf.template beside this script, kept if it exists) with
# its token directory DIR/tokens, then initialises a token labelled LABEL in the first free slot.
# Several tokens (different labels) can share one DIR. The only line on stdout is
#   export SOFTHSM2_CONF=DIR/softhsm2.conf
#
# The label and PINs come from the arguments, else from SOFTHSM2_TOKEN_LABEL, SOFTHSM2_TOKEN_PIN and
# SOFTHSM2_TOKEN_SO_PIN, else from DEMO defaults (label keyhold, PIN 1234, SO PIN 5678) that are
# for tests and demos only: never guard real keys with them. Note that PINs given as arguments (to
# this script, and by it to softhsm2-util) are visible to other local users in the process list.
set -euo pipefail

die() {
  printf 'softhsm2-token.sh: %s\n' "$*" >&2
  exit 1
}

[[ $# -ge 1 && $# -le 4 ]] || die "usage: softhsm2-token.sh DIR [LABEL [PIN [SO_PIN]]]"
command -v softhsm2-util >/dev/null 2>&1 || die "softhsm2-util not found: apt-get install softhsm2"

template=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/softhsm2.conf.template
[ -f "$template" ] || die "template not found: $template"

label=${2:-${SOFTHSM2_TOKEN_LABEL:-keyhold}}
pin=${3:-${SOFTHSM2_TOKEN_PIN:-}}
so_pin=${4:-${SOFTHSM2_TOKEN_SO_PIN:-}}
if [ -z "$pin" ] || [ -z "$so_pin" ]; then
  echo "softhsm2-token.sh: WARNING: using the DEMO PIN 1234 / SO PIN 5678: for tests and demos only" >&2
  pin=${pin:-1234}
  so_pin=${so_pin:-5678}
fi
# PKCS#11 labels are 32 bytes; PINs are 4 to 255 bytes in SoftHSM.
[[ ${#label} -ge 1 && ${#label} -le 32 ]] || die "token label must be 1 to 32 characters: $label"
[[ ${#pin} -ge 4 && ${#so_pin} -ge 4 ]] || die "PIN and SO PIN must be at least 4 characters"

mkdir -p -- "$1"
dir=$(cd -- "$1" && pwd)
[[ $dir != *$'\n'* ]] || die "DIR must not contain a newline"
conf=$dir/softhsm2.conf

# The token files hold the keys (encrypted under the PIN): keep them to ourselves.
(umask 077 && mkdir -p -- "$dir/tokens")
if [ ! -f "$conf" ]; then
  tmpl=$(cat -- "$template")
  # The replacement is quoted so that bash 5.2's patsub_replacement leaves any & in DIR alone.
  printf '%s\n' "${tmpl//@TOKENDIR@/"$dir/tokens"}" >"$conf"
fi
export SOFTHSM2_CONF=$conf

# --init-token --free would quietly make a second token with the same label; refuse instead.
if softhsm2-util --show-slots 2>/dev/null | LABEL=$label awk '
  /^[ \t]*Label:/ { sub(/^[ \t]*Label:[ \t]*/, ""); sub(/[ \t]+$/, ""); if ($0 == ENVIRON["LABEL"]) found = 1 }
  END { exit !found }'; then
  die "a token labelled $label already exists under $dir"
fi

# softhsm2-util reports on stdout ("... reassigned to slot N"): keep our stdout for the export line.
softhsm2-util --init-token --free --label "$label" --pin "$pin" --so-pin "$so_pin" >&2

printf 'export SOFTHSM2_CONF=%q\n' "$conf"
