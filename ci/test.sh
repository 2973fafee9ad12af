#!/usr/bin/env bash
# keyhold's test gate: the one command CI runs (through .ci/run) and developers run before committing.
#
#   bash ci/test.sh
#
# On a fresh Debian 12 machine (rustup toolchain present) it first installs what is missing: the
# emulators and tools the tests drive (SoftHSM2, swtpm, tpm2-tss, tpm2-tools, OpenSC, OpenSSL),
# cargo-nextest, rustfmt and clippy. Then: format check, clippy, the test suite under nextest's `ci`
# profile (.config/nextest.toml), and the doctests. The tests start their own SoftHSM2 tokens and
# swtpm instances in temp dirs; this script starts nothing and exports no secrets.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

readonly APT_PACKAGES=(
  softhsm2 swtpm swtpm-tools libtss2-dev libtss2-tcti-swtpm0 tpm2-tools opensc pkg-config openssl
  # the C compiler and libc headers that aws-lc-rs and rusqlite's bundled SQLite build with
  gcc libc6-dev
)

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

# Runs a command as root: directly when we are root, through sudo when it is there.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "need root (or sudo) to run: $*"
  fi
}

is_installed() {
  [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

install_apt_packages() {
  local missing=() p
  for p in "${APT_PACKAGES[@]}"; do
    is_installed "$p" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "    all apt packages present"
    return
  fi
  echo "    missing: ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

install_rust_tools() {
  if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    rustup component add rustfmt clippy
  fi
  if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
  fi
  cargo --version
  cargo nextest --version | head -n 1
}

# rustup's default install puts cargo here; a non-login shell may not have it on PATH yet.
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck source=/dev/null
  . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain with rustup first"

step "system packages" install_apt_packages
step "rust tools" install_rust_tools
step "format" cargo fmt --all --check
step "clippy" cargo clippy --all-targets --all-features -- -D warnings
# Benches are measurements (cargo bench), not tests: leave them out of the test run.
step "tests" cargo nextest run --all-features --lib --bins --tests --profile ci
step "doctests" cargo test --doc --all-features

banner "all checks passed in $((SECONDS - started)) s"
