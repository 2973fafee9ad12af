#!/usr/bin/env bash
# keyhold end to end, for a person to watch: build, create a store, make one key of every type, use
# each of them, check the results with OpenSSL, show that a tampered key ID is refused, then make and
# use a key inside a PKCS#11 token (SoftHSM2) and see what the token cannot do; then a second store
# whose root secret a TPM 2.0 (swtpm) seals to PCR 8: keys made and used inside the TPM (ECDSA,
# RSA-OAEP), an AES key the TPM cannot make falling back to software, and a PCR change that locks the
# store until `keyhold reseal` re-binds it with the recovery passphrase. On a software key, a token
# key and a TPM key: the lifecycle — rotate, the old envelope still decrypts, rewrap, suspend,
# a scheduled destruction, cancelled.
#
#   bash ci/demo.sh
#
# Everything happens in a temp dir that is deleted on exit. Every step says what it does and checks
# the outcome it expects; the first unexpected outcome stops the demo with a non-zero exit.
# Needs a Rust toolchain; it installs what else it needs first (ci/install.sh: openssl, softhsm2,
# opensc, swtpm, tpm2-tss and tpm2-tools, the C toolchain; root or sudo if any is missing). The SoftHSM2
# token and the swtpm (on two free TCP ports of 127.0.0.1) are private to the temp dir and stopped on
# exit; the PINs and passphrases are demo ones.
# KEYHOLD_DEMO_BIN=/path/to/keyhold runs the demo on that binary instead of building one.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash ci/install.sh

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

# --- key lifecycle ----------------------------------------------------------------------------

# The version an encrypt/decrypt/rewrap --json report names (the report printed by COMMAND...).
reported_version() {
  local report
  report=$("$@") || die "failed: $*"
  printf '    report: %s\n' "$report" >&3
  sed -n 's/.*"version":\([0-9]*\).*/\1/p' <<<"$report"
}

# lifecycle_story NAME: the lifecycle of the encryption key NAME (in ID): rotate, the old envelope
# still decrypts (version 1), rewrap to version 2, suspend (encrypt refused, decrypt works),
# resume, a scheduled destruction (shown, encrypt refused), cancelled: the key works again.
lifecycle_story() {
  local name=$1 key=${ID[$1]} details out history
  step "$name: an envelope under version 1, then key rotate: a new version, the same key ID"
  kh encrypt --key "$key" --aad "order 42" --in secret.txt --out "$name.v1.khe"
  expect_output "rotated default/$name to version 2" kh key rotate --key "$key" --reason "demo: yearly rotation"
  details=$(kh key show --key "$key")
  printf '%s\n' "$details" | grep -E '^(id|state|version|versions|min decrypt version):' | sed 's/^/    /'
  expect_lines "$details" "^id: $key\$" '^version: 2$' '^versions: 1 \([^)]*\), 2 \([^)]*\)$'

  step "$name: the version-1 envelope still decrypts, and the report says version 1"
  [ "$(reported_version kh --json decrypt --key "$key" --aad "order 42" --in "$name.v1.khe" --out "$name.v1.out")" = 1 ] ||
    die "decrypt did not report version 1"
  ok "decrypted with version 1"
  same_file secret.txt "$name.v1.out"

  step "$name: rewrap moves the envelope to version 2 (the plaintext never leaves keyhold)"
  [ "$(reported_version kh --json rewrap --key "$key" --aad "order 42" --in "$name.v1.khe" --out "$name.v2.khe")" = 2 ] ||
    die "rewrap did not report version 2"
  ok "rewrapped under version 2"
  [ "$(reported_version kh --json decrypt --key "$key" --aad "order 42" --in "$name.v2.khe" --out "$name.v2.out")" = 2 ] ||
    die "the rewrapped envelope did not decrypt with version 2"
  ok "decrypted with version 2"
  same_file secret.txt "$name.v2.out"

  step "$name: suspended, it only decrypts: encrypt is refused with exit 9, naming the state"
  expect_output "suspended default/$name" kh key suspend --key "$key" --reason "demo: incident 42"
  expect_refusal 9 "is suspended: it cannot encrypt" kh encrypt --key "$key" --in secret.txt --out "$name.refused.khe"
  kh decrypt --key "$key" --aad "order 42" --in "$name.v2.khe" --out "$name.suspended.out"
  same_file secret.txt "$name.suspended.out"
  expect_output "resumed default/$name" kh key resume --key "$key"

  step "$name: key destroy schedules the destruction 7 days ahead; until then the key only decrypts"
  out=$(kh key destroy --key "$key" --reason "demo: project ended") || die "key destroy failed"
  printf '    %s\n' "$out"
  [[ $out == "default/$name will be destroyed on "*" (keyhold key cancel-destroy --key $key keeps it)" ]] ||
    die "unexpected key destroy output"
  ok "scheduled"
  details=$(kh key show --key "$key")
  printf '%s\n' "$details" | grep -E '^state:' | sed 's/^/    /'
  expect_lines "$details" '^state: active, destruction scheduled for [0-9]{4}-[0-9]{2}-[0-9]{2}T'
  expect_refusal 9 "is scheduled for destruction on" kh encrypt --key "$key" --in secret.txt --out "$name.refused.khe"

  step "$name: key cancel-destroy keeps it, and it encrypts again"
  expect_output "kept default/$name: its destruction is cancelled" kh key cancel-destroy --key "$key" --reason "demo: still needed"
  kh encrypt --key "$key" --aad "order 42" --in secret.txt --out "$name.v2b.khe"
  kh decrypt --key "$key" --aad "order 42" --in "$name.v2b.khe" --out "$name.v2b.out"
  same_file secret.txt "$name.v2b.out"

  step "$name: key history: every transition, with its reason"
  history=$(kh key history --key "$key") || die "key history failed"
  printf '%s\n' "$history" | sed 's/^/    /'
  expect_lines "$history" ' rotated .* v2  demo: yearly rotation$' ' suspended .*demo: incident 42$' ' resumed ' \
    ' destroy-scheduled .*demo: project ended$' ' destroy-cancelled .*demo: still needed$'
}

demo_lifecycle() {
  section "The key lifecycle (software key): versions, rotation, rewrap, states, scheduled destruction"
  lifecycle_story aes
}

# --- store trust ------------------------------------------------------------------------------

demo_store_trust() {
  section "Store trust: verify, a rolled-back copy refused, backup and restore"
  step "store verify: every row's MAC, the commitment over all rows, the anchor, every key's material, the audit log"
  local out
  out=$(kh store verify) || die "store verify failed"
  printf '%s\n' "$out" | sed 's/^/    /' | tail -3
  grep -q "store verify: every check passed" <<<"$out" || die "store verify did not pass"
  ok "the store verifies whole"

  step "a key, then a backup: one file, encrypted and authenticated under the root secret"
  printf 'keyhold demo message\n' >"$WORK/msg"
  create_key trust-demo --type ed25519
  out=$(kh backup --to "$WORK/backups")
  printf '    %s\n' "$out"
  ls "$WORK"/backups/keyhold-*.khbackup >/dev/null || die "no backup file"
  ok "backup written"

  step "someone copies the store file aside, then the key is destroyed"
  cp "$STORE/keyhold.db" "$WORK/old-copy.db"
  kh key destroy --key "${ID[trust-demo]}" --now --yes >/dev/null
  ok "destroyed"
  step "...and puts the old copy back: every row passes its MAC, but the store is older than its anchor"
  run cp "$WORK/old-copy.db" "$STORE/keyhold.db"
  expect_refusal 10 "it is older than its anchor" kh sign --key "${ID[trust-demo]}" --in "$WORK/msg"

  step "restore from the backup: verified whole, then put in place in one rename (the legitimate way back)"
  out=$(kh restore --from "$WORK/backups")
  printf '    %s\n' "$out"
  [[ $out == "restored keyhold store $STORE from "* ]] || die "unexpected restore output"
  out=$(kh store verify) || die "store verify after the restore failed"
  ok "the restored store verifies whole"
  kh sign --key "${ID[trust-demo]}" --in "$WORK/msg" --out "$WORK/trust.sig" >/dev/null ||
    die "the restored key does not sign"
  ok "the key is back as the backup had it: it signs"
}

# --- the service ------------------------------------------------------------------------------

demo_service() {
  section "Cryptography as a service: keyhold serve on a Unix socket"
  step "the configuration names the service's clients: this user, granted the namespace default"
  printf '[clients.demo]\nuid = %s\nnamespaces = ["default"]\n' "$(id -u)" >"$WORK/serve.toml"
  sed 's/^/    /' "$WORK/serve.toml"
  local sock="$WORK/keyhold.sock" pid out sig i
  echo "  \$ keyhold --config serve.toml serve --listen unix:$sock &"
  "$KEYHOLD" --store "$STORE" --config "$WORK/serve.toml" serve --listen "unix:$sock" \
    2>"$WORK/serve.log" &
  pid=$!
  for ((i = 0; i < 200; i++)); do
    [ -S "$sock" ] && break
    sleep 0.05
  done
  [ -S "$sock" ] || die "keyhold serve did not listen: $(cat "$WORK/serve.log")"
  ok "listening on unix:$sock (the store unsealed once, by the service)"

  step "an application signs over HTTP/JSON: it holds the key ID, never the key or the passphrase"
  out=$(run curl -s --unix-socket "$sock" -H 'content-type: application/json' \
    -d "{\"data\":\"$(base64 -w0 "$WORK/msg")\"}" "http://keyhold/v1/keys/${ID[p256]}/sign")
  printf '    %s\n' "${out:0:100}..."
  sig=$(sed -n 's/.*"signature":"\([^"]*\)".*/\1/p' <<<"$out")
  [ -n "$sig" ] || die "no signature in the service's answer"
  base64 -d <<<"$sig" >"$WORK/service.sig"
  kh verify --key "${ID[p256]}" --in "$WORK/msg" --signature "$WORK/service.sig" >/dev/null ||
    die "the service's signature does not verify"
  kh key pubkey --key "${ID[p256]}" --out "$WORK/p256.pem" >/dev/null
  run openssl dgst -sha256 -verify "$WORK/p256.pem" -signature "$WORK/service.sig" "$WORK/msg" >/dev/null ||
    die "OpenSSL refuses the service's signature"
  ok "the service's signature verifies, with keyhold and with OpenSSL"

  step "the CLI through the service (--remote): the same command, the same output, no store opened"
  run "$KEYHOLD" --remote "unix:$sock" sign --key "${ID[ed25519]}" --in "$WORK/msg" \
    --out "$WORK/remote.sig" || die "keyhold --remote sign failed"
  kh verify --key "${ID[ed25519]}" --in "$WORK/msg" --signature "$WORK/remote.sig" >/dev/null ||
    die "the remote signature does not verify"
  ok "signed through the service, verified here"

  step "namespaces are a tenant boundary: another namespace's key does not exist for this client"
  local other
  other=$(kh --namespace other key create elsewhere --type ed25519)
  out=$(run curl -s --unix-socket "$sock" -H 'content-type: application/json' \
    -d '{"data":"bQ=="}' "http://keyhold/v1/keys/$other/sign")
  printf '    %s\n' "$out"
  [ "$out" = '{"error":{"code":"no_such_key","message":"no such key"}}' ] ||
    die "another namespace's key was not answered as one that does not exist"
  ok "404, word for word the answer for a key that does not exist"

  step "SIGTERM: requests in flight finish, the socket is removed"
  kill -TERM "$pid"
  wait "$pid" || die "keyhold serve did not exit 0 on SIGTERM: $(cat "$WORK/serve.log")"
  [ ! -e "$sock" ] || die "the socket is still there"
  ok "stopped cleanly"
}

# --- hardware backends ------------------------------------------------------------------------
# The PKCS#11 backend on a SoftHSM2 token, then the TPM 2.0 backend and sealer on a swtpm.

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
      die "$tool not found: apt-get install softhsm2 opensc (ci/install.sh installs them)"
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
  expect_lines "$details" '^backend: hsm$' '^attribute always_sensitive: true$' \
    '^attribute never_extractable: true$'
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
    'not known until tried: rsa-2048/decrypt .*OAEP' 'orphaned objects: 0'

  step "an RSA decryption key on this token is tried, then refused: SoftHSM 2.6 does RSA-OAEP with SHA-1 only"
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

  step "the lifecycle of a token key: an AES-256-GCM key made inside the token"
  KH_CONFIG=hsm.toml
  create_key hsm-aes --type aes-256-gcm --backend hsm
  lifecycle_story hsm-aes
  step "both versions of hsm-aes are objects in the token (a rotation makes the new one there)"
  objects=$(token_objects) || die "pkcs11-tool --list-objects failed"
  [ "$(grep -cE '^[[:space:]]+label:[[:space:]]+default/hsm-aes$' <<<"$objects")" -eq 2 ] ||
    die "expected 2 secret key objects labelled default/hsm-aes"
  ok "two secret key objects labelled default/hsm-aes"
  KH_CONFIG=
}

# --- TPM 2.0 ----------------------------------------------------------------------------------

# Starts a private swtpm in $WORK/tpm on a free pair of TCP ports of 127.0.0.1 (tpm/swtpm-start.sh
# --tcp; keyhold's TPM library, tss-esapi 7.7, cannot reach swtpm over a Unix socket) and sets TCTI.
# Ports are picked below Linux's ephemeral range; a pair found taken is replaced by another.
start_swtpm() {
  local attempt port line rc
  for attempt in 1 2 3 4 5 6 7 8 9 10; do
    port=$((20000 + RANDOM % 12000))
    rc=0
    line=$(run "$REPO/tpm/swtpm-start.sh" --tcp "$port" "$WORK/tpm" 2>swtpm-start.txt) || rc=$?
    sed 's/^/    stderr: /' swtpm-start.txt
    case $rc in
      0) break ;;
      2) printf '    ports %d and %d are taken (attempt %d): trying another pair\n' "$port" $((port + 1)) "$attempt" ;;
      *) die "swtpm-start.sh failed with exit $rc" ;;
    esac
  done
  [ "$rc" -eq 0 ] || die "no free pair of TCP ports for swtpm after 10 attempts"
  printf '    %s\n' "$line"
  [ "$line" = "TPM2TOOLS_TCTI=swtpm:host=127.0.0.1,port=$port" ] || die "swtpm-start.sh printed '$line'"
  TCTI=${line#TPM2TOOLS_TCTI=}
  ok "swtpm serves commands on 127.0.0.1:$port and control on 127.0.0.1:$((port + 1))"
}

# The current SHA-256 value of PCR 8, as 64 lowercase hex digits.
pcr8() {
  run tpm2_pcrread -T "$TCTI" sha256:8 | sed -n 's/^ *8 *: 0x\([0-9A-Fa-f]\{64\}\)$/\1/p' | tr 'A-F' 'a-f'
}

# RSA-OAEP label keyhold uses for an envelope header HEADER-FILE and AAD (docs/cli.md), as hex:
# "KHL1:" || base64url-without-padding(SHA-256(header || aad)) || 0x00.
oaep_label_hex() {
  local digest
  digest=$({ cat "$1"; printf '%s' "$2"; } | openssl dgst -sha256 -binary | openssl base64 -A | tr '+/' '-_' | tr -d '=')
  printf 'KHL1:%s\0' "$digest" | od -An -v -tx1 | tr -d ' \n'
}

demo_tpm() {
  section "A TPM 2.0 (swtpm): a store sealed by the TPM, keys made and used inside it"
  local tool
  for tool in swtpm tpm2_pcrread tpm2_pcrextend; do
    command -v "$tool" >/dev/null 2>&1 ||
      die "$tool not found: apt-get install swtpm swtpm-tools tpm2-tools (ci/install.sh installs them)"
  done

  step "a private swtpm under the demo's temp dir, on TCP loopback (keyhold cannot use swtpm's Unix socket)"
  start_swtpm
  # tpm2-tss logs every refused TPM command on stderr itself; keyhold's own message says it all.
  export TSS2_LOG=all+none
  echo '  $ export TSS2_LOG=all+none   # tpm2-tss: no log lines of its own on stderr'

  step "keyhold's configuration for it: tpm/keyhold-tpm.toml with the TCTI set and fallback = \"software\""
  local edit_tcti="s|^#tcti = \"device:/dev/tpmrm0\"\$|tcti = \"$TCTI\"|"
  local edit_fallback='s/^#fallback = "refuse"$/fallback = "software"/'
  printf "  \$ sed -e '%s' -e '%s' tpm/keyhold-tpm.toml >tpm.toml\n" "$edit_tcti" "$edit_fallback"
  sed -e "$edit_tcti" -e "$edit_fallback" "$REPO/tpm/keyhold-tpm.toml" >tpm.toml
  grep -Ev '^[[:space:]]*(#|$)' tpm.toml | sed 's/^/    /'
  grep -qx "tcti = \"$TCTI\"" tpm.toml || die "tpm.toml does not set tcti = \"$TCTI\""
  grep -qx 'fallback = "software"' tpm.toml || die "tpm.toml has no fallback = \"software\""
  ok "backend tpm: $TCTI, fallback software"
  KH_CONFIG=tpm.toml

  step "state the store's sealer in the configuration: keyhold never takes it from the store's own files"
  echo "  (else whoever can write the store directory could swap its seal for a TPM seal of a root they know)"
  local edit_sealer='s/^#sealer = "tpm"$/sealer = "tpm"/'
  printf "  \$ sed -i '%s' tpm.toml   # under [store]\n" "$edit_sealer"
  sed -i "$edit_sealer" tpm.toml
  grep -qx 'sealer = "tpm"' tpm.toml || die "tpm.toml does not state sealer = \"tpm\""
  ok "[store] sealer = \"tpm\""

  step "a second store, its root secret sealed by the TPM to PCR 8, with a recovery passphrase"
  echo "  (PCR 8 is one the operating system extends and only a reboot resets: swtpm lets the demo extend it;"
  echo "   a real store binds to what boot measures, e.g. --pcrs 0,7; 16 and 23 are refused: anyone can reset them)"
  local soft_store=$STORE
  STORE=$WORK/tpm-store
  unset KEYHOLD_PASSPHRASE
  echo '  $ unset KEYHOLD_PASSPHRASE   # this store needs none; only the recovery passphrase, once'
  printf 'keyhold demo recovery passphrase, not a secret\n' >recovery.txt
  echo '  $ echo "keyhold demo recovery passphrase, not a secret" >recovery.txt'
  printf '  (below, keyhold means: %s --store %s)\n' "$KEYHOLD" "$STORE"
  expect_refusal 1 "PCR 16 can be reset by any program" kh --passphrase-file recovery.txt init --sealer tpm --pcrs 16
  local out
  out=$(kh --passphrase-file recovery.txt init --sealer tpm --pcrs 8 \
    --argon2-memory-mib 19 --argon2-iterations 2)
  printf '    %s\n' "$out"
  [[ $out == "initialised keyhold store $STORE (store id "*", sealer tpm)" ]] || die "unexpected init output"
  ok "store initialised, sealed by the TPM"

  step "an ECDSA P-256 key generated inside the TPM (--backend tpm); the store opens with no passphrase"
  create_key tpm-p256 --type ecdsa-p256 --backend tpm
  local details
  details=$(kh key show --key "${ID[tpm-p256]}")
  printf '%s\n' "$details" | sed 's/^/    /'
  expect_lines "$details" '^backend: tpm$' '^attribute never_extractable: true$' '^attribute srk_name: [0-9a-f]{68}$'

  sign_and_verify tpm-p256 openssl_dgst -sha256

  step "AES-256-GCM with --backend tpm: not a TPM algorithm, so made in software under the TPM-sealed root"
  create_key tpm-aes --type aes-256-gcm --backend tpm
  details=$(kh key show --key "${ID[tpm-aes]}")
  printf '%s\n' "$details" | sed 's/^/    /'
  expect_lines "$details" '^backend: software \(sealed by tpm; fallback for tpm\)$' '^algorithm: aes-256-gcm$'
  kh encrypt --key "${ID[tpm-aes]}" --aad "order 42" --in secret.txt --out secret.tpm-aes.khe
  kh decrypt --key "${ID[tpm-aes]}" --aad "order 42" --in secret.tpm-aes.khe --out secret.tpm-aes.out
  same_file secret.txt secret.tpm-aes.out

  step "RSA-OAEP: an RSA-2048 decryption key inside the TPM; encrypt with its public key, decrypt in the TPM"
  create_key tpm-rsa-oaep --type rsa-2048 --purpose decrypt --backend tpm
  details=$(kh key show --key "${ID[tpm-rsa-oaep]}")
  expect_lines "$details" '^backend: tpm$' '^algorithm: rsa-oaep-sha256$'
  kh encrypt --key "${ID[tpm-rsa-oaep]}" --aad "order 42" --in secret.txt --out secret.tpm-rsa.khe
  kh decrypt --key "${ID[tpm-rsa-oaep]}" --aad "order 42" --in secret.tpm-rsa.khe --out secret.tpm-rsa.out
  same_file secret.txt secret.tpm-rsa.out
  expect_refusal 1 "decryption failed" kh decrypt --key "${ID[tpm-rsa-oaep]}" --aad "order 43" --in secret.tpm-rsa.khe

  step "OpenSSL encrypts for the TPM key with keyhold's OAEP label (docs/cli.md); the TPM decrypts"
  echo "  (label = \"KHL1:\" + base64url(SHA-256(envelope header + AAD)) + 0x00; the header is an envelope's first 25 bytes)"
  head -c 25 secret.tpm-rsa.khe >header.bin
  kh key pubkey --key "${ID[tpm-rsa-oaep]}" --out tpm-rsa-oaep.pub.pem
  local label
  label=$(oaep_label_hex header.bin "order 42")
  [[ $label =~ ^[0-9a-f]{98}$ ]] || die "expected a 49-byte label, got '$label'"
  printf '    label: %s\n' "$label"
  printf 'wrapped by openssl\n' >openssl-secret.txt
  run openssl pkeyutl -encrypt -pubin -inkey tpm-rsa-oaep.pub.pem -pkeyopt rsa_padding_mode:oaep \
    -pkeyopt rsa_oaep_md:sha256 -pkeyopt rsa_mgf1_md:sha256 -pkeyopt "rsa_oaep_label:$label" \
    -in openssl-secret.txt -out openssl.ct
  { cat header.bin; printf '\0'; cat openssl.ct; } >openssl.khe
  printf '  $ %s\n' "{ cat header.bin; printf '\\0'; cat openssl.ct; } >openssl.khe   # header, nonce length 0, ciphertext"
  kh decrypt --key "${ID[tpm-rsa-oaep]}" --aad "order 42" --in openssl.khe --out openssl-secret.out
  same_file openssl-secret.txt openssl-secret.out

  step "keyhold doctor: the TPM, and which key types it makes (the rest fall back to software)"
  local report
  report=$(kh doctor) || die "keyhold doctor failed"
  printf '%s\n' "$report" | sed -n '/^backend tpm$/,/^$/{/^$/!p;}' | sed 's/^/    /'
  expect_lines "$report" '^backend tpm$' "tcti: $TCTI" 'key types: .*ecdsa-p256/sign.*rsa-2048/decrypt' \
    'cannot: aes-256-gcm/encrypt' 'cannot: ed25519/sign'

  step "PCR 8 changes, as PCRs 0-7 do after a firmware, boot loader or Secure Boot change"
  echo "  (tpm2-tools talk to the TPM only while no keyhold process runs: swtpm serves one client at a time)"
  local before after
  before=$(pcr8)
  printf '    PCR 8: %s\n' "$before"
  run tpm2_pcrextend -T "$TCTI" "8:sha256=$(printf 'demo: a new boot loader' | sha256sum | cut -c1-64)"
  after=$(pcr8)
  printf '    PCR 8: %s\n' "$after"
  if ! [[ $after =~ ^[0-9a-f]{64}$ ]] || [ "$after" = "$before" ]; then die "PCR 8 did not change"; fi
  ok "PCR 8 changed"
  step "the TPM now refuses to unseal the store's root secret: nothing opens it"
  expect_refusal 4 "run \`keyhold reseal\`" kh key list
  expect_refusal 4 "cannot unseal the store" kh sign --key "${ID[tpm-p256]}" --in msg.txt

  step "keyhold reseal: with the recovery passphrase, re-binds the store to PCR 8 as it is now"
  out=$(kh --passphrase-file recovery.txt reseal 2>reseal-err.txt) || {
    sed 's/^/    stderr: /' reseal-err.txt
    die "keyhold reseal failed"
  }
  sed 's/^[^ ]*Z  WARN /WARN /; s/^/    stderr: /' reseal-err.txt
  printf '    %s\n' "$out"
  grep -qF "unsealing with the recovery passphrase" reseal-err.txt || die "reseal did not say it used the recovery passphrase"
  [ "$out" = "re-sealed keyhold store $STORE to the TPM: PCRs 8 → 8" ] || die "unexpected reseal output"
  ok "re-sealed with the recovery passphrase"

  step "the store opens again with no passphrase, with the same keys"
  kh sign --key "${ID[tpm-p256]}" --in msg.txt --out tpm-p256.resealed.sig
  expect_output "Verified OK" run openssl dgst -sha256 -verify tpm-p256.pub.pem -signature tpm-p256.resealed.sig msg.txt
  kh decrypt --key "${ID[tpm-aes]}" --aad "order 42" --in secret.tpm-aes.khe --out secret.tpm-aes.resealed
  same_file secret.txt secret.tpm-aes.resealed

  step "the lifecycle of a TPM key: the RSA-OAEP key rotates to a new key made inside the TPM"
  lifecycle_story tpm-rsa-oaep
  expect_lines "$(kh key show --key "${ID[tpm-rsa-oaep]}")" '^backend: tpm$'

  step "stopping the swtpm (its state is deleted with the temp dir)"
  run "$REPO/tpm/swtpm-stop.sh" "$WORK/tpm" 2>&1 | sed 's/^/    /'
  [ ! -f "$WORK/tpm/swtpm.pid" ] || die "swtpm-stop.sh left its pid file"
  ok "swtpm stopped"
  STORE=$soft_store
  KH_CONFIG=
}

# --- main -------------------------------------------------------------------------------------

on_exit() {
  local rc=$?
  # The demo's swtpm, if it still runs (swtpm-stop.sh signals only the swtpm of that pid file).
  if [ -f "$WORK/tpm/swtpm.pid" ]; then
    "$REPO/tpm/swtpm-stop.sh" "$WORK/tpm" >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
  if [ "$rc" -ne 0 ] && [ "$reported" = no ]; then
    printf '\nDEMO FAILED: the last command exited with status %d (see above)\n' "$rc" >&2
  fi
}

REPO=$(pwd)
WORK=$(mktemp -d -t keyhold-demo.XXXXXX)
trap on_exit EXIT
STORE=$WORK/store
# Each store's anchor file (its generation, kept outside the store) goes in the demo's directory.
export XDG_STATE_HOME=$WORK/state

demo_build
cd "$WORK"
demo_store
demo_signatures
demo_encryption
demo_mac
demo_random
demo_tampered_id
demo_lifecycle
demo_store_trust
demo_service
demo_softhsm
demo_tpm

printf '\n=== demo complete: %d checks passed ===\n' "$checks"
