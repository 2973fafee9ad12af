#!/usr/bin/env bash
# keyhold end to end, for a person to watch: build, create a store, make one key of every type, use
# each of them, check the results with OpenSSL, show that a tampered key ID is refused, then make and
# use a key inside a PKCS#11 token (SoftHSM2) and see what the token cannot do.
#
#   bash ci/demo.sh
#
# Everything happens in a temp dir that is deleted on exit. Every step says what it does and checks
# the outcome it expects; the first unexpected outcome stops the demo with a non-zero exit.
# Needs: a Rust toolchain, openssl, softhsm2 and opensc (pkcs11-tool) (ci/test.sh installs the rest
# of what keyhold's tests need). The SoftHSM2 token is private to the temp dir; the PINs are demo PINs.
# KEYHOLD_DEMO_BIN=/path/to/keyhold runs the demo on that binary instead of building one.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

checks=0
reported=no # whether the failure that stops the demo has been explained already
exec 3>&1 # commands are shown on fd 3 (stdout), so that capturing a command's output does not capture them

# --- helpers ----------------------------------------------------------------------------------

section() { printf '\n=== %s ===\n' "$*"; }
step() { printf '\n--- %s\n' "$*"; }
ok() {
  checks=$((checks + 1))
  printf '    ok: %s\n' "$*"
}
die() {
  printf '\nDEMO FAILED: %s\n' "$*" >&2
  reported=yes
  exit 1
}

declare -A SHORT # key ID -> how commands show it (the IDs are long; each is printed in full once)

# Shows a command the way one would type it (keyhold's binary and store as just `keyhold`).
show() {
  local line="" arg
  for arg in "$@"; do
    if [ -n "${SHORT[$arg]:-}" ]; then
      arg=${SHORT[$arg]}
    elif ! [[ $arg =~ ^[A-Za-z0-9_./:=+@%,-]+$ ]]; then
      arg=$(printf '%q' "$arg")
    fi
    line+=" $arg"
  done
  line=${line//" $KEYHOLD --store $STORE"/" keyhold"}
  line=${line//" $REPO/"/" "}
  printf '  $%s\n' "$line" >&3
}
run() {
  show "$@"
  "$@"
}
# keyhold on the demo's store; with KH_CONFIG set, also with that backend configuration (--config).
kh() {
  if [ -n "${KH_CONFIG:-}" ]; then
    run "$KEYHOLD" --store "$STORE" --config "$KH_CONFIG" "$@"
  else
    run "$KEYHOLD" --store "$STORE" "$@"
  fi
}

# expect_refusal CODE TEXT COMMAND...: the command must exit with CODE and say TEXT on stderr.
expect_refusal() {
  local want=$1 text=$2 rc=0
  shift 2
  "$@" >/dev/null 2>err.txt || rc=$?
  sed 's/^/    stderr: /' err.txt
  [ "$rc" -eq "$want" ] || die "expected exit $want, got $rc from: $*"
  grep -qF -- "$text" err.txt || die "expected '$text' on stderr from: $*"
  ok "refused with exit $rc"
}

# expect_output TEXT COMMAND...: the command must succeed and print exactly TEXT.
expect_output() {
  local want=$1 got
  shift
  got=$("$@") || die "failed: $*"
  printf '    %s\n' "$got"
  [ "$got" = "$want" ] || die "expected '$want', got '$got'"
  ok "as expected"
}

same_file() {
  cmp -s "$1" "$2" || die "$1 and $2 differ"
  ok "$2 equals $1"
}

size_of() { wc -c <"$1" | tr -d ' '; }

# Changes one character in the middle of a string, keeping it in the same alphabet where possible.
flip_one_char() {
  local s=$1 i=$((${#1} / 2)) c new
  c=${s:i:1}
  case $c in
    0) new=1 ;;
    [1-9a-f]) new=0 ;;
    A) new=B ;;
    *) new=A ;;
  esac
  printf '%s' "${s:0:i}$new${s:i+1}"
}

# --- build ------------------------------------------------------------------------------------

demo_build() {
  section "Build"
  if [ -n "${KEYHOLD_DEMO_BIN:-}" ]; then
    step "using the given binary (KEYHOLD_DEMO_BIN), not building"
    KEYHOLD=$(realpath "$KEYHOLD_DEMO_BIN")
  else
    step "building keyhold (cargo build --release)"
    cargo build --release --quiet
    KEYHOLD=$(realpath "${CARGO_TARGET_DIR:-target}/release/keyhold")
  fi
  [ -x "$KEYHOLD" ] || die "no binary at $KEYHOLD"
  ok "$KEYHOLD"
}

# --- software store ---------------------------------------------------------------------------

declare -A ID # key name -> key ID

create_key() {
  local name=$1
  shift
  ID[$name]=$(kh key create "$name" "$@")
  [ -n "${ID[$name]}" ] || die "key create $name printed no ID"
  SHORT[${ID[$name]}]="\$${name//-/_}_id"
  printf '    %s=%s\n' "${name//-/_}_id" "${ID[$name]}"
}

demo_store() {
  section "A passphrase-sealed software store"
  step "passphrase from the environment (a DEMO passphrase: never use a known passphrase for real keys)"
  export KEYHOLD_PASSPHRASE="keyhold demo passphrase, not a secret"
  echo '  $ export KEYHOLD_PASSPHRASE="keyhold demo passphrase, not a secret"'

  step "creating the store (Argon2id at 19 MiB / 2 iterations to keep the demo quick; default 64 MiB / 3)"
  printf '  (below, keyhold means: %s --store %s)\n' "$KEYHOLD" "$STORE"
  local out
  out=$(kh init --sealer passphrase --argon2-memory-mib 19 --argon2-iterations 2)
  printf '    %s\n' "$out"
  [[ $out == "initialised keyhold store $STORE (store id "*", sealer passphrase)" ]] ||
    die "unexpected init output"
  ok "store initialised"
  expect_refusal 1 "keyhold: " kh init --sealer passphrase

  step "one key of each type; key create prints the key ID, the handle applications keep"
  create_key p256 --type ecdsa-p256
  create_key p384 --type ecdsa-p384
  create_key ed25519 --type ed25519
  create_key rsa2048-pss --type rsa-2048
  create_key rsa3072-pkcs1 --type rsa-3072 --padding pkcs1v15
  create_key rsa2048-oaep --type rsa-2048 --purpose decrypt
  create_key rsa4096-pss --type rsa-4096
  create_key aes --type aes-256-gcm
  create_key hmac --type hmac-sha256
  ok "${#ID[@]} keys created"

  step "the keys in the store"
  local list
  list=$(kh key list)
  printf '%s\n' "$list"
  [ "$(printf '%s\n' "$list" | grep -c -F -f <(printf '%s\n' "${ID[@]}"))" -eq "${#ID[@]}" ] ||
    die "key list does not show all ${#ID[@]} key IDs"
  ok "key list shows all ${#ID[@]} keys"

  step "one key in detail"
  kh key show --key "${ID[p256]}"
}

# --- signatures -------------------------------------------------------------------------------

# sign_and_verify NAME OPENSSL-CHECK [ARGS...]: sign msg.txt with key NAME, check the signature with
# OpenSSL on the exported public key and with keyhold verify, and see a changed message rejected.
sign_and_verify() {
  local name=$1 check=$2
  shift 2
  step "$name: sign, export the public key, verify with openssl and with keyhold"
  kh sign --key "${ID[$name]}" --in msg.txt --out "$name.sig"
  printf '    %s bytes of signature\n' "$(size_of "$name.sig")"
  kh key pubkey --key "${ID[$name]}" --out "$name.pub.pem"
  head -n 1 "$name.pub.pem" | grep -qx -- '-----BEGIN PUBLIC KEY-----' || die "$name.pub.pem is not a PEM public key"
  "$check" "$name" "$@"
  expect_output "signature valid" kh verify --key "${ID[$name]}" --signature "$name.sig" --in msg.txt
  expect_refusal 1 "signature invalid" kh verify --key "${ID[$name]}" --signature "$name.sig" --in msg-changed.txt
}

openssl_dgst() {
  local name=$1
  shift
  expect_output "Verified OK" run openssl dgst "$@" -verify "$name.pub.pem" -signature "$name.sig" msg.txt
}

openssl_eddsa() {
  local name=$1
  expect_output "Signature Verified Successfully" \
    run openssl pkeyutl -verify -pubin -inkey "$name.pub.pem" -rawin -in msg.txt -sigfile "$name.sig"
}

demo_signatures() {
  section "Signatures, checked by OpenSSL"
  printf 'pay 100 EUR to Alice\n' >msg.txt
  printf 'pay 900 EUR to Mallory\n' >msg-changed.txt
  echo "  message: $(cat msg.txt); a changed message: $(cat msg-changed.txt)"
  local pss=(-sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:auto)

  sign_and_verify p256 openssl_dgst -sha256
  sign_and_verify p384 openssl_dgst -sha384
  sign_and_verify ed25519 openssl_eddsa
  sign_and_verify rsa2048-pss openssl_dgst -sha256 "${pss[@]}"
  sign_and_verify rsa3072-pkcs1 openssl_dgst -sha256
  sign_and_verify rsa4096-pss openssl_dgst -sha256 "${pss[@]}"

  step "p256: the raw r||s format (JOSE) instead of DER"
  kh sign --key "${ID[p256]}" --format raw --in msg.txt --out p256.raw.sig
  [ "$(size_of p256.raw.sig)" -eq 64 ] || die "a raw P-256 signature is 64 bytes, got $(size_of p256.raw.sig)"
  ok "64 bytes"
  expect_output "signature valid" kh verify --key "${ID[p256]}" --format raw --signature p256.raw.sig --in msg.txt
}

# --- encryption -------------------------------------------------------------------------------

demo_encryption() {
  section "Encryption"
  printf 'the launch code is 0000\n' >secret.txt

  step "AES-256-GCM: encrypt with additional authenticated data (AAD), decrypt with the same AAD"
  kh encrypt --key "${ID[aes]}" --aad "order 42" --in secret.txt --out secret.aes.khe
  [ "$(head -c 4 secret.aes.khe)" = KHE1 ] || die "the envelope does not start with KHE1"
  printf '    envelope: %s bytes, starts with KHE1\n' "$(size_of secret.aes.khe)"
  kh decrypt --key "${ID[aes]}" --aad "order 42" --in secret.aes.khe --out secret.aes.out
  same_file secret.txt secret.aes.out

  step "AES-256-GCM: the wrong AAD, or none, is refused"
  expect_refusal 1 "decryption failed" kh decrypt --key "${ID[aes]}" --aad "order 43" --in secret.aes.khe
  expect_refusal 1 "decryption failed" kh decrypt --key "${ID[aes]}" --in secret.aes.khe

  step "RSA-OAEP (SHA-256): encrypt with the public key, decrypt with the private key"
  kh encrypt --key "${ID[rsa2048-oaep]}" --in secret.txt --out secret.rsa.khe
  printf '    envelope: %s bytes\n' "$(size_of secret.rsa.khe)"
  kh decrypt --key "${ID[rsa2048-oaep]}" --in secret.rsa.khe --out secret.rsa.out
  same_file secret.txt secret.rsa.out

  step "RSA-OAEP: at most 190 bytes fit a 2048-bit key"
  head -c 190 /dev/zero >190.bin
  head -c 191 /dev/zero >191.bin
  kh encrypt --key "${ID[rsa2048-oaep]}" --in 190.bin --out 190.khe
  ok "190 bytes encrypted"
  expect_refusal 1 "keyhold: " kh encrypt --key "${ID[rsa2048-oaep]}" --in 191.bin
}

# --- MACs -------------------------------------------------------------------------------------

demo_mac() {
  section "HMAC-SHA256"
  step "compute a tag, verify it, and see a changed message rejected"
  kh mac --key "${ID[hmac]}" --in msg.txt --out msg.tag
  [ "$(size_of msg.tag)" -eq 32 ] || die "an HMAC-SHA256 tag is 32 bytes, got $(size_of msg.tag)"
  ok "32-byte tag"
  expect_output "tag valid" kh mac-verify --key "${ID[hmac]}" --tag msg.tag --in msg.txt
  expect_refusal 1 "keyhold: " kh mac-verify --key "${ID[hmac]}" --tag msg.tag --in msg-changed.txt
}

# --- random -----------------------------------------------------------------------------------

demo_random() {
  section "Random bytes"
  step "16 random bytes, as hex"
  local hex
  hex=$(kh random 16)
  printf '    %s\n' "$hex"
  [[ $hex =~ ^[0-9a-f]{32}$ ]] || die "expected 32 lowercase hex digits"
  ok "32 hex digits"
}

# --- authenticated key IDs --------------------------------------------------------------------

demo_tampered_id() {
  section "Key IDs are authenticated"
  local good=${ID[p256]} bad
  bad=$(flip_one_char "$good")
  [ "$bad" != "$good" ] || die "flip_one_char changed nothing"
  SHORT[$bad]="\$tampered_id"
  step "one character of the P-256 key's ID changed"
  printf '    p256_id=%s\n    tampered_id=%s\n' "$good" "$bad"
  local i=0
  while [ "${good:i:1}" = "${bad:i:1}" ]; do i=$((i + 1)); done
  printf '    (character %d of %d: %s -> %s)\n' $((i + 1)) ${#good} "${good:i:1}" "${bad:i:1}"
  expect_refusal 3 "key ID failed authentication" kh key show --key "$bad"
  expect_refusal 3 "key ID failed authentication" kh sign --key "$bad" --in msg.txt
  step "the genuine ID still works"
  kh sign --key "$good" --in msg.txt --out again.sig
  ok "signed with the genuine ID"
}

# --- hardware backends ------------------------------------------------------------------------
# The PKCS#11 backend on a SoftHSM2 token, below. The TPM 2.0 backend (a swtpm, tpm/swtpm-start.sh)
# comes with its issue, as a section like this one.

readonly SOFTHSM_MODULE=/usr/lib/softhsm/libsofthsm2.so

# expect_lines TEXT PATTERN...: TEXT (a command's output) must have a line matching each extended
# regular expression PATTERN.
expect_lines() {
  local text=$1 pattern
  shift
  for pattern in "$@"; do
    grep -qE -- "$pattern" <<<"$text" || die "expected a line matching '$pattern'"
  done
  ok "$# expected lines"
}

# The token's objects, as pkcs11-tool lists them (logged in, so private objects are listed too).
token_objects() {
  run pkcs11-tool --module "$SOFTHSM_MODULE" --token-label "$HSM_LABEL" --login --pin "$HSM_PIN" \
    --list-objects 2>/dev/null
}

demo_softhsm() {
  section "A PKCS#11 token (SoftHSM2): keys made and used inside it"
  local tool
  for tool in softhsm2-util pkcs11-tool; do
    command -v "$tool" >/dev/null 2>&1 ||
      die "$tool not found: apt-get install softhsm2 opensc (ci/test.sh installs them)"
  done
  [ -e "$SOFTHSM_MODULE" ] || die "no SoftHSM2 module at $SOFTHSM_MODULE"

  step "a private token under the demo's temp dir (DEMO PINs: never use known PINs for real keys)"
  # The label is the one hsm-config/softhsm2.toml selects, so the sample is used unchanged.
  HSM_LABEL=keyhold
  HSM_PIN=1234
  export SOFTHSM2_TOKEN_LABEL=$HSM_LABEL SOFTHSM2_TOKEN_PIN=$HSM_PIN SOFTHSM2_TOKEN_SO_PIN=5678
  echo "  \$ export SOFTHSM2_TOKEN_LABEL=$HSM_LABEL SOFTHSM2_TOKEN_PIN=$HSM_PIN SOFTHSM2_TOKEN_SO_PIN=5678"
  local export_line
  export_line=$(run "$REPO/hsm-config/softhsm2-token.sh" "$WORK/hsm" 2>hsm-init.txt) || {
    sed 's/^/    stderr: /' hsm-init.txt
    die "softhsm2-token.sh failed"
  }
  sed 's/^/    /' hsm-init.txt
  printf '    %s\n' "$export_line"
  [[ $export_line == "export SOFTHSM2_CONF="* ]] || die "softhsm2-token.sh printed no export line"
  eval "$export_line"
  { [ "$SOFTHSM2_CONF" = "$WORK/hsm/softhsm2.conf" ] && [ -f "$SOFTHSM2_CONF" ]; } ||
    die "SOFTHSM2_CONF is not the token dir's softhsm2.conf: $SOFTHSM2_CONF"
  ok "SOFTHSM2_CONF=$SOFTHSM2_CONF"
  local slots
  slots=$(run softhsm2-util --show-slots 2>/dev/null) || die "softhsm2-util --show-slots failed"
  grep -qE "^[[:space:]]*Label:[[:space:]]+${HSM_LABEL}[[:space:]]*$" <<<"$slots" ||
    die "no token labelled $HSM_LABEL in softhsm2-util --show-slots"
  ok "token $HSM_LABEL initialised, in a slot of SoftHSM's choosing"

  step "keyhold's configuration for it: hsm-config/softhsm2.toml as it is (its settings, comments left out)"
  run cp "$REPO/hsm-config/softhsm2.toml" hsm.toml
  grep -Ev '^[[:space:]]*(#|$)' hsm.toml | sed 's/^/    /'
  grep -qx 'pin_env = "KEYHOLD_HSM_PIN"' hsm.toml || die "hsm.toml does not take the PIN from KEYHOLD_HSM_PIN"
  grep -qx "token_label = \"$HSM_LABEL\"" hsm.toml || die "hsm.toml does not select the token $HSM_LABEL"
  ok "backend hsm: token $HSM_LABEL, PIN from \$KEYHOLD_HSM_PIN"
  export KEYHOLD_HSM_PIN=$HSM_PIN
  echo "  \$ export KEYHOLD_HSM_PIN=$HSM_PIN"
  KH_CONFIG=hsm.toml

  step "an ECDSA P-256 key generated inside the token (--backend hsm)"
  create_key hsm-p256 --type ecdsa-p256 --backend hsm
  local details locator
  details=$(kh key show --key "${ID[hsm-p256]}")
  printf '%s\n' "$details" | sed 's/^/    /'
  expect_lines "$details" '^backend: hsm$' '^attributes: .*always_sensitive=true' \
    '^attributes: .*never_extractable=true'
  locator=$(sed -n 's/^locator: //p' <<<"$details")
  [[ $locator =~ ^[0-9a-f]{32}$ ]] || die "expected a 32-hex-digit locator (the object's CKA_ID), got '$locator'"

  sign_and_verify hsm-p256 openssl_dgst -sha256

  step "the token's objects, listed by OpenSC's pkcs11-tool: labelled namespace/name, CKA_ID = the locator"
  local objects
  objects=$(token_objects) || die "pkcs11-tool --list-objects failed"
  printf '%s\n' "$objects" | sed 's/^/    /'
  expect_lines "$objects" '^Private Key Object; EC' '^Public Key Object; EC' \
    '^[[:space:]]+label:[[:space:]]+default/hsm-p256$' "^[[:space:]]+ID:[[:space:]]+$locator$" \
    '^[[:space:]]+Access:.*never extractable'
  [ "$(grep -cE '^[[:space:]]+label:' <<<"$objects")" -eq 2 ] ||
    die "expected 2 objects on the token (the key pair), got $(grep -cE '^[[:space:]]+label:' <<<"$objects")"
  ok "the key pair, and nothing else, is on the token"

  step "keyhold doctor: backends, token, key types, session limit, PIN flags, orphaned objects"
  local report
  report=$(kh doctor) || die "keyhold doctor failed"
  printf '%s\n' "$report" | sed 's/^/    /'
  expect_lines "$report" '^backend hsm$' "token: .*$HSM_LABEL" 'key types: .*ecdsa-p256/sign' \
    'rsa-2048/decrypt .*OAEP' 'orphaned objects: 0'

  step "an RSA decryption key on this token is refused: SoftHSM 2.6 does RSA-OAEP with SHA-1 only"
  expect_refusal 1 "OAEP" kh key create hsm-rsa-decrypt --type rsa-2048 --purpose decrypt --backend hsm
  local list
  list=$(kh key list) || die "key list failed"
  ! grep -qE '^hsm-rsa-decrypt[[:space:]]' <<<"$list" || die "the refused key is in the store"
  ok "no key was created"

  step "the same with fallback = \"software\": the key is made in software, and says so"
  local edit='s/^#fallback = "refuse"$/fallback = "software"/'
  printf "  \$ sed '%s' hsm.toml >hsm-fallback.toml\n" "$edit"
  sed "$edit" hsm.toml >hsm-fallback.toml
  grep -qx 'fallback = "software"' hsm-fallback.toml || die "hsm-fallback.toml has no fallback = \"software\""
  ok "hsm-fallback.toml: hsm.toml with fallback = \"software\""
  KH_CONFIG=hsm-fallback.toml
  create_key hsm-rsa-decrypt --type rsa-2048 --purpose decrypt --backend hsm
  details=$(kh key show --key "${ID[hsm-rsa-decrypt]}")
  printf '%s\n' "$details" | sed 's/^/    /'
  expect_lines "$details" '^backend: software.*fallback.*hsm' '^algorithm: rsa-oaep-sha256$'
  printf 'the launch code is 0000\n' >secret.txt
  kh encrypt --key "${ID[hsm-rsa-decrypt]}" --in secret.txt --out secret.fallback.khe
  kh decrypt --key "${ID[hsm-rsa-decrypt]}" --in secret.fallback.khe --out secret.fallback.out
  same_file secret.txt secret.fallback.out
  objects=$(token_objects) || die "pkcs11-tool --list-objects failed"
  [ "$(grep -cE '^[[:space:]]+label:' <<<"$objects")" -eq 2 ] || die "the fallback key is on the token"
  ok "the token still holds only the P-256 key pair"
  KH_CONFIG=
}

# --- main -------------------------------------------------------------------------------------

on_exit() {
  local rc=$?
  rm -rf "$WORK"
  if [ "$rc" -ne 0 ] && [ "$reported" = no ]; then
    printf '\nDEMO FAILED: the last command exited with status %d (see above)\n' "$rc" >&2
  fi
}

REPO=$(pwd)
WORK=$(mktemp -d -t keyhold-demo.XXXXXX)
trap on_exit EXIT
STORE=$WORK/store

demo_build
cd "$WORK"
demo_store
demo_signatures
demo_encryption
demo_mac
demo_random
demo_tampered_id
demo_softhsm

printf '\n=== demo complete: %d checks passed ===\n' "$checks"
