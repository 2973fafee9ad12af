#!/usr/bin/env bash
# Installs what keyhold's demo and tests need on a Debian 12 machine that has only a Rust toolchain
# (rustup): the one list both `ci/demo.sh` and `ci/test.sh` run first, so that either works alone on
# a fresh machine.
#
#   bash ci/install.sh               # system packages: emulators, tools, the C toolchain and headers
#   bash ci/install.sh --test-tools  # the same, plus rustfmt, clippy and cargo-nextest
#   bash ci/install.sh --bench-tools # the same, plus what the benchmark's peers build with (ci/bench.sh)
#
# Installs only what is missing; needs root (or sudo) when something is.
set -euo pipefail

readonly APT_PACKAGES=(
  # PKCS#11 tokens the tests and the demo drive: SoftHSM2, and openCryptoki's soft token (a second,
  # independent implementation, with its slot daemon); OpenSC's pkcs11-tool to inspect them
  softhsm2 opencryptoki opensc
  # TPM 2.0: the swtpm emulator, tpm2-tss (tss-esapi links it, found through pkg-config) with its
  # swtpm TCTI, and tpm2-tools
  swtpm swtpm-tools libtss2-dev libtss2-tcti-swtpm0 tpm2-tools pkg-config
  # OpenSSL checks keyhold's signatures and encrypts for its keys in the demo and the tests
  openssl
  # the C compiler and libc headers that aws-lc-rs and rusqlite's bundled SQLite build with
  gcc libc6-dev
  # systemd-analyze verify checks dist/systemd/ (it runs without systemd as PID 1, in containers)
  systemd
  # curl speaks HTTP over keyhold serve's Unix socket in the demo and the service's tests
  curl
)

# Parsec (ci/bench.sh builds parsec-service and parsec-client): psa-crypto's C build and bindgen
readonly BENCH_APT_PACKAGES=(cmake clang libclang-dev)

die() {
  printf 'ci/install.sh: %s\n' "$*" >&2
  exit 1
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

# Installs the packages named, those of them that are missing.
install_apt_packages() {
  local missing=() p
  for p in "$@"; do
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

case "${1:-}" in
  "") install_apt_packages "${APT_PACKAGES[@]}" ;;
  --test-tools)
    install_apt_packages "${APT_PACKAGES[@]}"
    install_rust_tools
    ;;
  --bench-tools) install_apt_packages "${APT_PACKAGES[@]}" "${BENCH_APT_PACKAGES[@]}" ;;
  *) die "unknown argument \`$1\` (expected nothing, --test-tools or --bench-tools)" ;;
esac
