#!/usr/bin/env bash
# keyhold's test gate: the one command CI runs (through .ci/run) and developers run before committing.
#
#   bash ci/test.sh
#
# On a fresh Debian 12 machine (rustup toolchain present) it first installs what is missing
# (ci/install.sh: SoftHSM2, openCryptoki, swtpm, tpm2-tss, tpm2-tools, OpenSC, OpenSSL,
# cargo-nextest, rustfmt, clippy). Then: format check, clippy with every feature, the build
# without default features (cargo features `pkcs11` and `tpm` off: neither cryptoki nor tpm2-tss)
# linted, built and tested on what is meaningful there (the unit tests, the software suites, and
# tests/built_without.rs: device backends in the configuration say which feature is missing), the
# whole test suite under nextest's `ci` profile (.config/nextest.toml), and the doctests. The tests start their own fixtures (SoftHSM2 tokens and swtpm instances in temp dirs,
# openCryptoki's slot daemon and its one soft token); this script starts nothing and exports no
# secrets.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

started=$SECONDS

banner() {
  printf '\n==> [%s] %s\n' "$(date -u +%H:%M:%SZ)" "$*"
}

die() {
  printf 'ci/test.sh: %s\n' "$*" >&2
  exit 1
}

# Runs a step under a banner and reports how long it took; the first failing step ends the run.
step() {
  local name=$1
  shift
  banner "$name: $*"
  local t0=$SECONDS
  if ! "$@"; then
    banner "FAILED: $name, after $((SECONDS - t0)) s ($((SECONDS - started)) s in all)"
    exit 1
  fi
  printf '    %s: ok in %d s\n' "$name" $((SECONDS - t0))
}

# rustup's default install puts cargo here; a non-login shell may not have it on PATH yet.
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck source=/dev/null
  . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain with rustup first"

# A clean clone (CI) builds everything once: incremental compilation's caches would only cost time
# and space there.
if [ "${CI:-}" = true ]; then
  export CARGO_INCREMENTAL=0
fi

# Library tests that open stores with the default configuration record each store's generation
# in an anchor file under $XDG_STATE_HOME (README, "rollback"): keep those out of the user's own.
XDG_STATE_HOME=$(mktemp -d "${TMPDIR:-/tmp}/keyhold-test-state.XXXXXX")
export XDG_STATE_HOME
trap 'rm -rf "$XDG_STATE_HOME"' EXIT

# dist/systemd/'s units, as `systemd-analyze verify` reads them. It needs no running systemd (it
# works in a container), checks that ExecStart= runs (pointed at the binary the tests ran) and that
# every directive parses, but exits 0 on many warnings ("Failed to parse…, ignoring"): any line
# it prints fails the step.
verify_systemd_units() {
  local dir out
  dir=$(mktemp -d "${TMPDIR:-/tmp}/keyhold-units.XXXXXX")
  # The binary the test step built: `systemd-analyze` only checks that it is there and
  # executable, and `cargo build` would build it again (without the dev-dependencies' features).
  local bin
  bin=$(realpath -m "${CARGO_TARGET_DIR:-target}/debug/keyhold")
  [ -x "$bin" ] || cargo build --quiet --bin keyhold
  sed "s|/usr/bin/keyhold|$bin|" dist/systemd/keyhold.service >"$dir/keyhold.service"
  cp dist/systemd/keyhold.socket "$dir/"
  if ! out=$(systemd-analyze verify "$dir/keyhold.socket" "$dir/keyhold.service" 2>&1) || [ -n "$out" ]; then
    printf '%s\n' "$out" >&2
    rm -rf "$dir"
    return 1
  fi
  rm -rf "$dir"
}

step "install" bash ci/install.sh --test-tools
step "format" cargo fmt --all --check
step "clippy" cargo clippy --all-targets --all-features -- -D warnings
# A user with only an HSM, or only software keys, builds without the TPM (issue 8): keep that
# build warning-free and working. Only the tests that differ there run twice (about 10 s).
step "clippy-minimal" cargo clippy --all-targets --no-default-features -- -D warnings
step "build-minimal" cargo build --no-default-features
step "tests-minimal" cargo nextest run --no-default-features --profile ci --lib --bins \
  --test built_without --test keystore --test conformance
# Benches are measurements (cargo bench), not tests: leave them out of the test run.
step "tests" cargo nextest run --all-features --lib --bins --tests --profile ci
# The command-line tests again, with their key and cryptographic commands through a real
# `keyhold serve` on each test's store (tests/support/remote.rs; issue 12: the remote CLI gives
# the same output and exit codes). The other commands run here, as in the step above.
step "tests-remote" env KEYHOLD_TEST_REMOTE=1 cargo nextest run --all-features --profile ci \
  -E 'binary(/^cli_/)'
step "doctests" cargo test --doc --all-features
step "systemd-units" verify_systemd_units

banner "all checks passed in $((SECONDS - started)) s"
