#!/usr/bin/env bash
# Starts a software TPM 2.0 (swtpm) on Unix sockets in DIR, daemonised, and prints its TCTI.
#
#   tpm/swtpm-start.sh DIR
#   export "$(tpm/swtpm-start.sh DIR)"        # sets TPM2TOOLS_TCTI for tpm2-tools
#
# State lives in DIR (kept across restarts: a restart is a reboot), the command socket is
# DIR/swtpm.sock, the control socket DIR/swtpm.sock.ctrl (tpm2-tss's swtpm TCTI expects exactly that
# name), the pid DIR/swtpm.pid. No TCP ports, so any number of instances can run side by side.
# The TPM is powered on and TPM2_Startup(CLEAR) is done by swtpm itself. Stop it with swtpm-stop.sh.
# The only line on stdout is TPM2TOOLS_TCTI=swtpm:path=DIR/swtpm.sock.
set -euo pipefail

die() {
  printf 'swtpm-start.sh: %s\n' "$*" >&2
  exit 1
}

[ $# -eq 1 ] || die "usage: swtpm-start.sh DIR"
command -v swtpm >/dev/null 2>&1 || die "swtpm not found: apt-get install swtpm swtpm-tools"

mkdir -p -- "$1"
dir=$(cd -- "$1" && pwd)
sock=$dir/swtpm.sock
pidfile=$dir/swtpm.pid

# sun_path holds 108 bytes including the terminating NUL (the .ctrl socket is 5 longer).
[ ${#sock} -le 102 ] || die "socket path too long for a Unix socket (${#sock} bytes): use a shorter DIR"

if [ -f "$pidfile" ]; then
  pid=$(cat -- "$pidfile")
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" = swtpm ]; then
    die "swtpm already running in $dir (pid $pid): stop it with swtpm-stop.sh $dir"
  fi
  rm -f -- "$pidfile"
fi
rm -f -- "$sock" "$sock.ctrl"

swtpm socket --tpm2 \
  --tpmstate "dir=$dir" \
  --server "type=unixio,path=$sock" \
  --ctrl "type=unixio,path=$sock.ctrl" \
  --flags not-need-init,startup-clear \
  --daemon --pid "file=$pidfile"

# --daemon returns once the instance has forked; wait for both sockets (up to 10 s).
for _ in $(seq 100); do
  if [ -S "$sock" ] && [ -S "$sock.ctrl" ]; then
    printf 'TPM2TOOLS_TCTI=swtpm:path=%s\n' "$sock"
    exit 0
  fi
  sleep 0.1
done
die "swtpm did not create $sock within 10 s"
