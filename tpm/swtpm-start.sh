#!/usr/bin/env bash
# Starts a software TPM 2.0 (swtpm) in DIR, daemonised, and prints its TCTI.
#
#   tpm/swtpm-start.sh DIR                 # Unix sockets: for tpm2-tools
#   tpm/swtpm-start.sh --tcp PORT DIR      # TCP on 127.0.0.1, ports PORT and PORT+1: for keyhold
#   export "$(tpm/swtpm-start.sh DIR)"     # sets TPM2TOOLS_TCTI for tpm2-tools (and keyhold)
#
# State lives in DIR (kept across restarts: a restart is a reboot), the pid in DIR/swtpm.pid. The TPM
# is powered on and TPM2_Startup(CLEAR) is done by swtpm itself. Stop it with swtpm-stop.sh DIR.
#
# Unix mode: the command socket is DIR/swtpm.sock, the control socket DIR/swtpm.sock.ctrl (tpm2-tss's
# swtpm TCTI expects exactly that name). No TCP ports, so any number of instances can run side by
# side. The only line on stdout is TPM2TOOLS_TCTI=swtpm:path=DIR/swtpm.sock. keyhold cannot use it:
# tss-esapi 7.7 drops `path=` from the TCTI and would connect to localhost:2321 instead.
#
# TCP mode: commands on 127.0.0.1:PORT, control on 127.0.0.1:PORT+1 (the swtpm TCTI derives the
# control port from the command port), bound to loopback only. The only line on stdout is
# TPM2TOOLS_TCTI=swtpm:host=127.0.0.1,port=PORT, which keyhold (`tcti = …` in its configuration, or
# $TPM2TOOLS_TCTI) and tpm2-tools both take. swtpm serves one client connection at a time: do not
# run tpm2-tools while a keyhold process is connected.
#
# Exit status: 0 started; 2 (TCP mode) PORT or PORT+1 is taken, try another; 1 anything else.
set -euo pipefail

die() {
  printf 'swtpm-start.sh: %s\n' "$*" >&2
  exit 1
}

usage="usage: swtpm-start.sh DIR | swtpm-start.sh --tcp PORT DIR"
port=""
if [ "${1:-}" = --tcp ]; then
  [ $# -eq 3 ] || die "$usage"
  port=$2
  shift 2
  if ! [[ $port =~ ^[1-9][0-9]{3,4}$ ]] || [ "$port" -lt 1024 ] || [ "$port" -gt 65534 ]; then
    die "PORT must be a number from 1024 to 65534 (PORT+1 is the control port), not '$port'"
  fi
fi
[ $# -eq 1 ] || die "$usage"
command -v swtpm >/dev/null 2>&1 || die "swtpm not found: apt-get install swtpm swtpm-tools"

mkdir -p -- "$1"
# Absolute: swtpm --daemon changes to / before it writes its state.
dir=$(cd -- "$1" && pwd)
sock=$dir/swtpm.sock
pidfile=$dir/swtpm.pid

if [ -f "$pidfile" ]; then
  pid=$(cat -- "$pidfile")
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" = swtpm ]; then
    die "swtpm already running in $dir (pid $pid): stop it with swtpm-stop.sh $dir"
  fi
  rm -f -- "$pidfile"
fi

# Whether something accepts TCP connections on 127.0.0.1:$1. (Connecting to swtpm and closing at
# once is harmless: it serves the next client.)
accepts() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

if [ -z "$port" ]; then
  # sun_path holds 108 bytes including the terminating NUL (the .ctrl socket is 5 longer).
  [ ${#sock} -le 102 ] || die "socket path too long for a Unix socket (${#sock} bytes): use a shorter DIR"
  rm -f -- "$sock" "$sock.ctrl"
  server=(--server "type=unixio,path=$sock" --ctrl "type=unixio,path=$sock.ctrl")
  tcti="swtpm:path=$sock"
  ready() { [ -S "$sock" ] && [ -S "$sock.ctrl" ]; }
else
  ctrl=$((port + 1))
  taken() {
    printf 'swtpm-start.sh: port %s or %s on 127.0.0.1 is taken: try another PORT\n' "$port" "$ctrl" >&2
    exit 2
  }
  if accepts "$port" || accepts "$ctrl"; then taken; fi
  server=(--server "type=tcp,port=$port,bindaddr=127.0.0.1" --ctrl "type=tcp,port=$ctrl,bindaddr=127.0.0.1")
  tcti="swtpm:host=127.0.0.1,port=$port"
  ready() { accepts "$port" && accepts "$ctrl"; }
fi

# swtpm binds its sockets before it forks, so a port taken since the check above fails here.
if ! swtpm socket --tpm2 \
  --tpmstate "dir=$dir" \
  "${server[@]}" \
  --flags not-need-init,startup-clear \
  --daemon --pid "file=$pidfile" 2>"$dir/swtpm-start.err"; then
  err=$(cat -- "$dir/swtpm-start.err")
  rm -f -- "$dir/swtpm-start.err"
  printf '%s\n' "$err" >&2
  if [ -n "$port" ] && [[ $err == *"Address already in use"* ]]; then taken; fi
  die "swtpm did not start"
fi
rm -f -- "$dir/swtpm-start.err"

# --daemon returns once the instance has forked; wait until it serves (up to 10 s).
for _ in $(seq 100); do
  if ready; then
    printf 'TPM2TOOLS_TCTI=%s\n' "$tcti"
    exit 0
  fi
  sleep 0.1
done
die "swtpm in $dir did not serve $tcti within 10 s"
