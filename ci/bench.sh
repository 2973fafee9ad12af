#!/usr/bin/env bash
# keyhold's service benchmark and its Parsec peer (issue 12): installs what the peers need, runs
# them beside keyhold on SoftHSM2 tokens, runs `cargo bench --bench serve`, and writes every
# figure into BENCHMARKS.md at the repository root (replacing it).
#
#   bash ci/bench.sh
#
# What it does, in order:
# 1. ci/install.sh --bench-tools (SoftHSM2 and the rest of keyhold's tools; cmake, clang and
#    libclang-dev for Parsec's build); `cargo install` of parsec-service (pkcs11 provider) and
#    parsec-tool into target/bench-peers (skipped when those versions are there); ci/parsec-peer
#    (parsec-client signing from threads) and keyhold's release binary.
# 2. One SoftHSM2 directory in a temp dir with two tokens: `parsec-bench` for Parsec,
#    `keyhold-bench` for keyhold (user PIN 1234: test tokens).
# 3. Parsec (config.toml: a Unix socket, UnixPeerCredentials, SQLite key info, the pkcs11 provider
#    on its token with the user PIN, allow_root since CI runs as root) with one ECDSA P-256 key
#    made by parsec-tool; `parsec-tool sign` per process (median of BENCH_RUNS runs) and from 8
#    processes at once (signatures/s), then parsec-client from 1, 4 and 16 threads. All of it twice:
#    with Parsec's default idle_listener_sleep_duration (10 ms) and with 1 ms.
# 4. keyhold on a pkcs11-sealed store (root secret sealed by an AES key in its token) with an
#    ECDSA P-256 key on the token: `keyhold sign` per process and from 8 processes at once.
# 5. `cargo bench --features testing --bench serve` (in-process vs keyhold serve, ~2 minutes).
# 6. BENCHMARKS.md.
#
# Environment: BENCH_RUNS (per-process runs, default 30), BENCH_PARALLEL (signatures per process
# of the 8 parallel ones, default 25), BENCH_PEER_SECS (seconds per thread count of the
# parsec-client peer, default 3), KEYHOLD_BENCH_SECS (the serve bench's, default 3).
#
# Needs root (or sudo) only to install packages. Leaves nothing running: Parsec is stopped and the
# temp dir removed on exit.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
readonly ROOT=$PWD
readonly PEERS=$ROOT/target/bench-peers
readonly PARSEC_VERSION=1.5.0
readonly PARSEC_TOOL_VERSION=0.7.0
readonly SOFTHSM_MODULE=/usr/lib/softhsm/libsofthsm2.so
readonly PIN=1234
readonly SO_PIN=5678
readonly RUNS=${BENCH_RUNS:-30}
readonly PARALLEL=${BENCH_PARALLEL:-25}
readonly PEER_SECS=${BENCH_PEER_SECS:-3}
readonly PROCS=8
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
readonly LOAD_START
# The machine's steal and all CPU time so far, in clock ticks (/proc/stat's first line: steal is
# the time the hypervisor ran something else while this machine wanted its CPUs).
cpu_ticks() { awk '$1 == "cpu" { print $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9; exit }' /proc/stat; }
TICKS_START=$(cpu_ticks)
readonly TICKS_START
# The share of the CPU time since the script started that the host took, in percent.
steal_since_start() {
  awk -v a="$TICKS_START" -v b="$(cpu_ticks)" 'BEGIN {
    split(a, x, " "); split(b, y, " ")
    if (y[2] > x[2]) printf "%.1f%%", 100 * (y[1] - x[1]) / (y[2] - x[2]); else printf "unknown"
  }'
}

banner() {
  printf '\n==> [%s] %s\n' "$(date -u +%H:%M:%SZ)" "$*"
}

die() {
  printf 'ci/bench.sh: %s\n' "$*" >&2
  exit 1
}

# rustup's default install puts cargo here; a non-login shell may not have it on PATH yet.
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck source=/dev/null
  . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain with rustup first"

# ---------------------------------------------------------------------------------------------
# Installing

# `cargo install NAME --version V ARGS…` into $PEERS, unless that version is there already.
install_crate() {
  local name=$1 version=$2
  shift 2
  if cargo install --list --root "$PEERS" 2>/dev/null | grep -q "^$name v$version:"; then
    echo "    $name $version: present"
    return
  fi
  cargo install "$name" --version "$version" --locked --root "$PEERS" \
    --target-dir "$PEERS/build" "$@"
}

banner "install"
bash ci/install.sh --bench-tools
install_crate parsec-service "$PARSEC_VERSION" --features pkcs11-provider
install_crate parsec-tool "$PARSEC_TOOL_VERSION"
cargo build --release --manifest-path ci/parsec-peer/Cargo.toml --target-dir "$PEERS/build"
# The features of the bench's own build, so that the bench below reuses this binary's build.
cargo build --release --features testing --bin keyhold
readonly PARSEC=$PEERS/bin/parsec
readonly PARSEC_TOOL=$PEERS/bin/parsec-tool
readonly PARSEC_PEER=$PEERS/build/release/keyhold-parsec-peer
readonly KEYHOLD=$ROOT/target/release/keyhold

# ---------------------------------------------------------------------------------------------
# Measuring

WORK=$(mktemp -d "${TMPDIR:-/tmp}/keyhold-bench.XXXXXX")
readonly WORK
PARSEC_PID=
SERVE_PID=
cleanup() {
  if [ -n "$SERVE_PID" ]; then
    kill "$SERVE_PID" 2>/dev/null || true
    wait "$SERVE_PID" 2>/dev/null || true
  fi
  if [ -n "$PARSEC_PID" ]; then
    kill "$PARSEC_PID" 2>/dev/null || true
    wait "$PARSEC_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# The median, in milliseconds to 0.1, of RUNS runs of the command (its output discarded); exits
# naming the command if one run fails.
per_process_ms() {
  local i t0 times=()
  for ((i = 0; i < RUNS; i++)); do
    t0=$EPOCHREALTIME
    "$@" >/dev/null 2>&1 || die "failed: $*"
    times+=("$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", (b - a) * 1000 }')")
  done
  printf '%s\n' "${times[@]}" | sort -g | awk '{ v[NR] = $1 } END { printf "%.1f", v[int((NR + 1) / 2)] }'
}

# Successful runs of the command per second, from PROCS processes at once, each running it
# PARALLEL times one after the other; failed runs are counted and reported, not fatal (a
# measurement): `RATE/s`, then ` (F of N failed: FIRST ERROR)` if any failed.
parallel_per_s() {
  local p t0 pids=() ok failed first
  rm -f "$WORK"/par.*
  t0=$EPOCHREALTIME
  for ((p = 0; p < PROCS; p++)); do
    (
      for ((i = 0; i < PARALLEL; i++)); do
        if "$@" >/dev/null 2>>"$WORK/par.$p.err"; then
          echo ok >>"$WORK/par.$p.ok"
        else
          echo "exit $?" >>"$WORK/par.$p.failed"
        fi
      done
    ) &
    pids+=($!)
  done
  wait "${pids[@]}"
  ok=$(cat "$WORK"/par.*.ok 2>/dev/null | wc -l)
  failed=$(cat "$WORK"/par.*.failed 2>/dev/null | wc -l)
  awk -v a="$t0" -v b="$EPOCHREALTIME" -v n="$ok" 'BEGIN { printf "%.0f/s", n / (b - a) }'
  if [ "$failed" -gt 0 ]; then
    first=$(cat "$WORK"/par.*.err | grep -v '^\[INFO' | head -n 1)
    printf ' (%s of %s failed: %s)' "$failed" $((PROCS * PARALLEL)) "$first"
  fi
}

banner "tokens: SoftHSM2 in $WORK"
mkdir -p "$WORK/tokens"
export SOFTHSM2_CONF=$WORK/softhsm2.conf
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' \
  "$WORK/tokens" >"$SOFTHSM2_CONF"
init_token() {
  softhsm2-util --init-token --free --label "$1" --pin "$PIN" --so-pin "$SO_PIN" |
    sed -n 's/.*reassigned to slot \([0-9]*\).*/\1/p'
}
PARSEC_SLOT=$(init_token parsec-bench)
[ -n "$PARSEC_SLOT" ] || die "softhsm2-util did not say the parsec-bench token's slot"
init_token keyhold-bench >/dev/null

# Starts Parsec on its token with idle_listener_sleep_duration $1 (ms), and waits for its socket.
start_parsec() {
  cat >"$WORK/parsec.toml" <<EOF
[core_settings]
# CI runs as root; Parsec refuses to unless told.
allow_root = true
log_level = "error"
idle_listener_sleep_duration = $1

[listener]
listener_type = "DomainSocket"
timeout = 200
socket_path = "$WORK/parsec.sock"

[authenticator]
auth_type = "UnixPeerCredentials"

[[key_manager]]
name = "sqlite-manager"
manager_type = "SQLite"
store_path = "$WORK/parsec-kim.sqlite3"

[[provider]]
name = "pkcs11-provider"
provider_type = "Pkcs11"
key_info_manager = "sqlite-manager"
library_path = "$SOFTHSM_MODULE"
slot_number = $PARSEC_SLOT
user_pin = "$PIN"
EOF
  rm -f "$WORK/parsec.sock"
  (cd "$WORK" && exec "$PARSEC" --config "$WORK/parsec.toml") >>"$WORK/parsec.log" 2>&1 &
  PARSEC_PID=$!
  local i
  for ((i = 0; i < 200; i++)); do
    [ -S "$WORK/parsec.sock" ] && return
    kill -0 "$PARSEC_PID" 2>/dev/null || die "parsec exited: $(cat "$WORK/parsec.log")"
    sleep 0.05
  done
  die "parsec did not make its socket in 10 s: $(cat "$WORK/parsec.log")"
}

stop_parsec() {
  kill "$PARSEC_PID"
  wait "$PARSEC_PID" 2>/dev/null || true
  PARSEC_PID=
}

export PARSEC_SERVICE_ENDPOINT=unix:$WORK/parsec.sock
declare -A PARSEC_TOOL_MS PARSEC_TOOL_PAR PARSEC_CLIENT
for sleep_ms in 10 1; do
  banner "parsec $PARSEC_VERSION, idle_listener_sleep_duration = $sleep_ms ms"
  start_parsec "$sleep_ms"
  if [ "$sleep_ms" = 10 ]; then
    "$PARSEC_TOOL" create-ecc-key --key-name bench >/dev/null 2>&1 ||
      die "parsec-tool create-ecc-key failed: $(cat "$WORK/parsec.log")"
  fi
  "$PARSEC_TOOL" sign --key-name bench "keyhold bench message" >/dev/null ||
    die "parsec-tool sign failed: $(cat "$WORK/parsec.log")"
  PARSEC_TOOL_MS[$sleep_ms]=$(per_process_ms "$PARSEC_TOOL" sign --key-name bench "keyhold bench message")
  PARSEC_TOOL_PAR[$sleep_ms]=$(parallel_per_s "$PARSEC_TOOL" sign --key-name bench "keyhold bench message")
  echo "    parsec-tool sign: ${PARSEC_TOOL_MS[$sleep_ms]} ms median per process, ${PARSEC_TOOL_PAR[$sleep_ms]} from $PROCS processes"
  PARSEC_CLIENT[$sleep_ms]=$("$PARSEC_PEER" bench "$PEER_SECS")
  echo "${PARSEC_CLIENT[$sleep_ms]}" | sed 's/^/    /'
  stop_parsec
done

banner "keyhold sign on a pkcs11-sealed store (token keyhold-bench)"
printf '%s' "$PIN" >"$WORK/pin"
chmod 600 "$WORK/pin"
cat >"$WORK/keyhold.toml" <<EOF
[store]
sealer = "pkcs11"
state_dir = "$WORK/state"

[backends.hsm]
type = "pkcs11"
module = "$SOFTHSM_MODULE"
token_label = "keyhold-bench"
pin_file = "$WORK/pin"
EOF
kh() {
  "$KEYHOLD" --config "$WORK/keyhold.toml" --store "$WORK/store" "$@"
}
kh init --sealer pkcs11 --backend hsm >/dev/null
KEY=$(kh --namespace bench key create ec --type ecdsa-p256 --backend hsm)
printf 'keyhold bench message' >"$WORK/message"
kh sign --key "$KEY" --in "$WORK/message" --encoding base64 >/dev/null
KEYHOLD_MS=$(per_process_ms kh sign --key "$KEY" --in "$WORK/message" --encoding base64)
KEYHOLD_PAR=$(parallel_per_s kh sign --key "$KEY" --in "$WORK/message" --encoding base64)
echo "    keyhold sign: $KEYHOLD_MS ms median per process, $KEYHOLD_PAR from $PROCS processes"

banner "keyhold --remote … sign: the same store and key, held by keyhold serve"
cat >>"$WORK/keyhold.toml" <<EOF

[clients.bench]
uid = $(id -u)
namespaces = ["bench"]
EOF
# Not through kh: a function put in the background runs in a subshell, and $! would be that
# subshell, leaving keyhold running when it is killed.
"$KEYHOLD" --config "$WORK/keyhold.toml" --store "$WORK/store" serve --listen "unix:$WORK/keyhold.sock" \
  >"$WORK/serve-cli.log" 2>&1 &
SERVE_PID=$!
for ((i = 0; i < 200; i++)); do
  [ -S "$WORK/keyhold.sock" ] && break
  sleep 0.05
done
[ -S "$WORK/keyhold.sock" ] || die "keyhold serve did not listen: $(cat "$WORK/serve-cli.log")"
khr() {
  "$KEYHOLD" --remote "unix:$WORK/keyhold.sock" "$@"
}
khr sign --key "$KEY" --in "$WORK/message" --encoding base64 >/dev/null
REMOTE_MS=$(per_process_ms khr sign --key "$KEY" --in "$WORK/message" --encoding base64)
REMOTE_PAR=$(parallel_per_s khr sign --key "$KEY" --in "$WORK/message" --encoding base64)
echo "    keyhold --remote sign: $REMOTE_MS ms median per process, $REMOTE_PAR from $PROCS processes"
kill "$SERVE_PID"
wait "$SERVE_PID" 2>/dev/null || true
SERVE_PID=
# The better of Parsec's two settings is the one to beat.
PARSEC_BEST_MS=$(printf '%s\n%s\n' "${PARSEC_TOOL_MS[10]}" "${PARSEC_TOOL_MS[1]}" | sort -g | head -1)
REMOTE_10MS=$(awk -v r="$REMOTE_MS" 'BEGIN { print (r <= 10) ? "met" : "not met" }')
REMOTE_X_PARSEC=$(awk -v r="$REMOTE_MS" -v p="$PARSEC_BEST_MS" 'BEGIN { printf "%.1f", p / r }')
REMOTE_2X=$(awk -v x="$REMOTE_X_PARSEC" 'BEGIN { print (x >= 2) ? "met" : "not met" }')
# Against Parsec as it installs (its default 10 ms idle sleep), the setting of issue 12's 42 ms.
REMOTE_X_DEFAULT=$(awk -v r="$REMOTE_MS" -v p="${PARSEC_TOOL_MS[10]}" 'BEGIN { printf "%.1f", p / r }')
REMOTE_2X_DEFAULT=$(awk -v x="$REMOTE_X_DEFAULT" 'BEGIN { print (x >= 2) ? "met" : "not met" }')

banner "cargo bench --features testing --bench serve"
SERVE_OUT=$WORK/serve.out
cargo bench --features testing --bench serve 2> >(tee "$WORK/serve.err" >&2) | tee "$SERVE_OUT"

# ---------------------------------------------------------------------------------------------
# BENCHMARKS.md

banner "BENCHMARKS.md"
cpu=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
mem=$(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
os=$(. /etc/os-release && echo "$PRETTY_NAME")
softhsm=$(dpkg-query -W -f='${Version}' softhsm2 2>/dev/null || echo "?")
commit=$(git rev-parse --short HEAD 2>/dev/null || echo "?")
dirty=$(git status --porcelain -- . ':!BENCHMARKS.md' 2>/dev/null | grep -qv '^??' &&
  echo " (with uncommitted changes)" || true)

# The serve bench's `case/Nc side ops p50 p99` lines as table rows, a row per case and count.
serve_table() {
  awk '
    $2 ~ /^(inproc|remote|http|raw|batch100|floor|hyper|hyperwork|client)$/ && $1 ~ /\/[0-9]+c$/ {
      key = $1; if (!(key in seen)) { seen[key] = 1; order[++n] = key }
      cell[key, $2] = sprintf("%s (%s / %s)", $3, $4, $5)
      if ($6 != "") cell[key, $2] = cell[key, $2] " **errors**"
    }
    END {
      for (i = 1; i <= n; i++) {
        k = order[i]; split(k, parts, "/"); sub(/c$/, "", parts[2])
        row = "| " parts[1] " | " parts[2]
        split("inproc remote http raw batch100 floor hyper hyperwork client", sides, " ")
        for (j = 1; j <= 9; j++) row = row " | " ((k, sides[j]) in cell ? cell[k, sides[j]] : "")
        print row " |"
      }
    }' "$SERVE_OUT"
}

# parsec-client's ops/s at N threads (setting $1), and keyhold RemoteKeystore's on SoftHSM2.
peer_rate() {
  echo "${PARSEC_CLIENT[$1]}" | awk -v n="ecdsa-p256-sign/$2c" '$2 == n { print $3 }'
}
remote_rate() {
  awk -v k="ecdsa-p256-sign-softhsm/$1c" '$1 == k && $2 == "remote" { print $3 }' "$SERVE_OUT"
}
library_rows() {
  local n kh p10 p1
  for n in 1 4 16; do
    kh=$(remote_rate "$n")
    p10=$(peer_rate 10 "$n")
    p1=$(peer_rate 1 "$n")
    awk -v n="$n" -v kh="$kh" -v a="$p10" -v b="$p1" 'BEGIN {
      best = (a > b ? a : b); r = (best > 0 ? kh / best : 0)
      printf "| %s | %s | %s | %s | %.2f | %s |\n", n, kh, a, b, r, (r >= 2 ? "met" : "not met")
    }'
  done
}

LIBRARY_ROWS=$(library_rows)
if grep -q 'not met' <<<"$LIBRARY_ROWS"; then library_verdict="not met"; else library_verdict="met"; fi

{
  cat <<EOF
# Benchmarks

Written by \`bash ci/bench.sh\` (issue 12); every figure below is from one run of it. Do not edit by
hand: run the script again.

- **Date**: $(date -u '+%Y-%m-%d %H:%M UTC')
- **Commit**: $commit$dirty
- **Machine**: $cpu, $(nproc) CPUs, $mem, $os, kernel $(uname -r); SoftHSM2 $softhsm
- **Sharing**: client and server run on the same $(nproc) CPUs (the client threads, the in-process
  keystore, \`keyhold serve\`, Parsec and their clients). Other work on the machine is not
  controlled: load average (1, 5, 15 min) $LOAD_START when the script started, $(cut -d' ' -f1-3 /proc/loadavg)
  when it wrote this file; the host took $(steal_since_start) of the CPUs' time (steal, from
  /proc/stat) while the script ran, and the serve bench gives its share for each case and
  client count. On a loaded machine the figures move between runs, and a verdict within a few
  percent of its target can flip.
- **Commands**: \`bash ci/bench.sh\`, which runs \`cargo bench --features testing --bench serve\`
  (KEYHOLD_BENCH_SECS=${KEYHOLD_BENCH_SECS:-3}), \`parsec-tool sign\` and \`keyhold sign\` ($RUNS runs per
  process, median; $PROCS processes × $PARALLEL signatures in parallel) and
  \`ci/parsec-peer\` (parsec-client, $PEER_SECS s per thread count).

## Targets (issue 12)

EOF
  sed -n '/^targets (issue 12):/,/^errors:/p' "$SERVE_OUT" | sed -e '1d' -e '$d' -e 's/^ *\(.*\): \([a-z ]*\)$/- \1: **\2**/'
  awk '/^remote at 16 clients against Cosmian/ { on = 1; next } on && NF == 0 { on = 0 }
    on { printf "- keyhold serve beats Cosmian KMS 5.28 at 16 clients, %s: **%s** (%s/s against %s/s)\n", $1, $7 == "beaten" ? "met" : "not met", $3, $5 }' "$SERVE_OUT"
  cat <<EOF
- keyhold's client library ≥ 2× parsec-client from threads (1, 4, 16): **$library_verdict**
- \`keyhold --remote … sign\` ≤ 10 ms median as a whole process: **$REMOTE_10MS** ($REMOTE_MS ms)
- \`keyhold --remote … sign\` ≥ 2× \`parsec-tool sign\` per process, against Parsec as it installs (idle sleep 10 ms, the setting of the issue's 42 ms): **$REMOTE_2X_DEFAULT** (${REMOTE_X_DEFAULT}×: $REMOTE_MS ms against ${PARSEC_TOOL_MS[10]} ms)
- \`keyhold --remote … sign\` ≥ 2× \`parsec-tool sign\` per process, against Parsec's better setting: **$REMOTE_2X** (${REMOTE_X_PARSEC}×: $REMOTE_MS ms against $PARSEC_BEST_MS ms)

## keyhold serve: in process vs over the Unix socket

\`cargo bench --features testing --bench serve\`: the real \`keyhold serve\` on a temp socket, a
passphrase store, beside a second store with the same configuration opened in the bench's process
(\`[software] key_cache_secs = 300\`, audit log on, one SoftHSM2 token for both). Each cell is
ops/s (p50 µs / p99 µs); \`remote\` is one shared \`RemoteKeystore\`; \`http\` is the same
request hand-written (HTTP/1.1 on a kept-alive \`UnixStream\` per thread: the service without
the client library's cost); \`raw\` is aws-lc-rs signing with a parsed key; \`batch100\` is
\`POST /v1/batch\` of 100 signatures per request (hand-written HTTP/1.1 on a kept-alive connection
per thread): signatures/s, and the latency of a whole batch; \`floor\` is the hand-written
request's bytes over a Unix socket to a thread of a second process (the floors' own: the bench
run again, as a service is a process of its own) that answers each with the bytes of the
service's answer to it, without parsing or doing anything: one round trip and nothing else;
\`hyper\` is the same request to a hyper HTTP/1.1 server on tokio's multi-thread runtime in the
floors' process that reads the body whole and answers the service's answer's body: the floor of
the stack \`keyhold serve\` is built on; \`hyperwork\` is a second such server that, before
each answer, does the case's work with aws-lc-rs on the thread that read the request (the
signature with a parsed key; AES-256-GCM of the 1 KiB): a service on that stack with no keyhold
code at all; \`client\` is a \`RemoteKeystore\` calling the \`hyper\` server: the floor of
\`remote\`.

| case | clients | in process | remote | hand-written HTTP | raw aws-lc-rs | batch of 100 | floor | hyper | hyper + work | client |
|---|---|---|---|---|---|---|---|---|---|---|
EOF
  serve_table
  cat <<EOF

Ratios and targets, as the bench printed them. "CPU per operation" is the CPU time of the
bench's process, of \`keyhold serve\` and of the floors' process (from \`/proc/PID/stat\`) over a side's measured rounds,
divided by the operations done: what one operation costs the machine, client and service
together, and so the rate the machine's CPUs could reach at that cost if the work spread over
all of them. When the CPUs are the limit (16 clients on 2 CPUs), a request over the socket that
costs k times an in-process call's CPU cannot reach more than 1/k of its rate.

"What one round trip per operation leaves" applies this to the floors. A service that answers
each operation in a round trip of its own does at least the keystore's work (its lowest CPU per
operation in process, at any client count) and the round trip, so its rate is at most the CPUs
over those two costs together (and, at 1 client, one over the two latencies). Where that bound is
below a target, the target is excluded for a service on that floor: \`floor\` is a thread per
connection echoing bytes (a server reading many connections per wake-up may pay less),
\`hyper\` a service on hyper and tokio, \`client\` one called through keyhold's client library
(the \`remote\` side's path). Only more operations per round trip (a batch) escape the bound.

"What a service doing only the work reaches" measures instead of bounding: the \`hyperwork\`
server runs no keyhold code (no routing, JSON, authentication, key lookup, audit or metrics), so
its rate is the most a service on hyper and tokio answering each operation in its own round trip
reached here, and its p99 over the in-process p99 the least overhead. A target above it is
excluded for keyhold serve as built; one below it is not, and the gap between \`hyperwork\` and
\`http\` (the same hand-written request to keyhold serve) is keyhold's own cost per request.

"Both targets at 16 clients" checks whether the batch target and the throughput target can hold
together: batches at 2x the unbatched rate, unbatched at 0.7x in-process, ask batches for 1.4x
the in-process rate at 16 clients. A batch does at least the keystore's work per operation, so
its rate is at most the CPUs over the keystore's lowest in-process CPU per operation; where that
is below what is needed, they cannot both hold.

\`\`\`
EOF
  sed -n '/^remote\/inproc/,$p' "$SERVE_OUT"
  cat <<EOF
\`\`\`

## Parsec $PARSEC_VERSION beside keyhold, on SoftHSM2 tokens

Parsec $PARSEC_VERSION (\`cargo install parsec-service --features pkcs11-provider\`) with
parsec-tool $PARSEC_TOOL_VERSION: its pkcs11 provider on the token \`parsec-bench\`, user PIN in
its config, UnixPeerCredentials, SQLite key info, \`allow_root = true\` (this runs as root), and one
ECDSA P-256 key made by \`parsec-tool create-ecc-key\`. Parsec's listener sleeps
\`idle_listener_sleep_duration\` (default 10 ms) whenever no connection is waiting, and every
request is a connection of its own, so the figures are given with the default and with 1 ms.
keyhold: a **pkcs11-sealed store** (its root secret sealed by an AES key in the token
\`keyhold-bench\`; no passphrase, no Argon2) with an ECDSA P-256 key on that token; each
\`keyhold sign\` opens the store, the token and logs in.

| whole process, one signature | median per process | $PROCS processes in parallel |
|---|---|---|
| \`parsec-tool sign\` (idle sleep 10 ms, default) | ${PARSEC_TOOL_MS[10]} ms | ${PARSEC_TOOL_PAR[10]} |
| \`parsec-tool sign\` (idle sleep 1 ms) | ${PARSEC_TOOL_MS[1]} ms | ${PARSEC_TOOL_PAR[1]} |
| \`keyhold sign\` (pkcs11-sealed store, no service) | $KEYHOLD_MS ms | $KEYHOLD_PAR |
| \`keyhold --remote … sign\` (the same store and key, held by \`keyhold serve\`) | $REMOTE_MS ms | $REMOTE_PAR |

In the parallel column a failed run is counted, not retried, and the rate counts successful runs
only; the first failure's message is quoted.

\`keyhold --remote … sign\` runs the CLI as a whole process against \`keyhold serve\` holding the
same pkcs11-sealed store (its client \`bench\` by peer credentials): no store is opened and no
token logged in by the command.

Client libraries from threads, ECDSA P-256 signing on SoftHSM2, signatures/s: keyhold's
\`RemoteKeystore\` (its figure from the table above, the same run) and \`parsec-client\` 0.16
(\`psa_sign_hash\` of a 32-byte digest, a \`BasicClient\` per thread; ci/parsec-peer). Target:
keyhold ≥ 2× Parsec, against the better of Parsec's two settings.

| threads | keyhold RemoteKeystore | parsec-client (sleep 10 ms) | parsec-client (sleep 1 ms) | ratio | ≥ 2× |
|---|---|---|---|---|---|
EOF
  echo "$LIBRARY_ROWS"
  cat <<EOF

parsec-client's p50 and p99 latencies (µs), as ci/parsec-peer printed them
(\`NAME case/threads ops_per_s p50_us p99_us\`):

\`\`\`
# idle_listener_sleep_duration = 10 ms
${PARSEC_CLIENT[10]}
# idle_listener_sleep_duration = 1 ms
${PARSEC_CLIENT[1]}
\`\`\`

## Raw output of the serve bench

\`\`\`
EOF
  grep '^#' "$WORK/serve.err" || true
  cat "$SERVE_OUT"
  echo '```'
} >"$ROOT/BENCHMARKS.md"
echo "    wrote $ROOT/BENCHMARKS.md"
