#!/usr/bin/env bash
# Stops the swtpm that swtpm-start.sh started in DIR, on Unix sockets or TCP (--tcp). The TPM state
# in DIR is kept (start it again on the same DIR, and the same port, to simulate a reboot); delete DIR
# to forget it. Stopping a DIR where nothing runs is not an error.
#
#   tpm/swtpm-stop.sh DIR
set -euo pipefail

die() {
  printf 'swtpm-stop.sh: %s\n' "$*" >&2
  exit 1
}

[ $# -eq 1 ] || die "usage: swtpm-stop.sh DIR"
[ -d "$1" ] || die "no such directory: $1"
dir=$(cd -- "$1" && pwd)
pidfile=$dir/swtpm.pid

pid=""
[ -f "$pidfile" ] && pid=$(cat -- "$pidfile")
# Only signal the pid if it is still a swtpm: after a crash and reboot the number may be reused.
if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" = swtpm ]; then
  kill -TERM "$pid" # swtpm saves its state and exits on SIGTERM
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "swtpm-stop.sh: swtpm (pid $pid) ignored SIGTERM for 5 s; killing it" >&2
    kill -KILL "$pid"
  fi
  echo "stopped swtpm (pid $pid) in $dir" >&2
else
  echo "no swtpm running in $dir" >&2
fi
rm -f -- "$pidfile" "$dir/swtpm.sock" "$dir/swtpm.sock.ctrl"
