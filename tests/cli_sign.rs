//! The CLI contract of docs/cli.md, against the real binary in temp stores: `sign` / `verify` of every key type, cross-checked with openssl, and the public key formats.
//!
//! Each test builds its own store (Argon2 at the documented minimum, 19 MiB / 2 iterations)
//! through the shared harness (tests/support/env.rs), drives `keyhold` as a subprocess, and checks
//! exit codes, stdout formats and stderr messages exactly; failures must leave the store
//! byte-for-byte unchanged.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use keyhold::Algorithm;
use serde_json::Value as Json;
use support::env::*;
use support::openssl_verifies;

// ---------------------------------------------------------------------------------------------
// 2. sign / verify with openssl interop, every key type
// ---------------------------------------------------------------------------------------------

/// Create → pubkey (openssl parses it) → sign → keyhold verify → openssl verify → modified
/// message and modified signature both fail. Returns the env (with `pub.pem`, `msg`, `sig`
/// scratch files) and the key ID for extra checks.
fn sign_verify_roundtrip(ty: &str, create_extra: &[&str], alg: Algorithm) -> (Env, String) {
    let env = Env::init();
    let id = env.create_key("signer", ty, create_extra);
    let pem = env.pubkey_pem(&id);
    let pub_pem = env.write("pub.pem", pem.as_bytes());
    openssl_ok(
        &["pkey", "-pubin", "-in", &pub_pem, "-noout"],
        &format!("{ty}: openssl parses the PEM"),
    );

    let mut msg = b"keyhold says hello to openssl\n".repeat(7);
    msg.extend(0u8..=255);
    let msg_path = env.write("msg", &msg);
    let sig_path = env.path_str("sig");

    // sign with --in/--out: nothing on stdout, signature in the file.
    let out = env.ok(
        &["sign", "--key", &id, "--in", &msg_path, "--out", &sig_path],
        b"",
        &format!("{ty}: sign --in --out"),
    );
    assert!(
        out.is_empty(),
        "{ty}: sign --out: expected nothing on stdout, got {} bytes",
        out.len()
    );
    let sig = std::fs::read(&sig_path).expect("read signature");
    assert!(!sig.is_empty(), "{ty}: expected a non-empty signature file");

    // sign from stdin to stdout also verifies.
    let sig2 = env.ok(
        &["sign", "--key", &id],
        &msg,
        &format!("{ty}: sign stdin→stdout"),
    );
    let sig2_path = env.write("sig2", &sig2);

    for (what, sp) in [
        ("--out signature", &sig_path),
        ("stdout signature", &sig2_path),
    ] {
        let v = env.ok(
            &["verify", "--key", &id, "--signature", sp, "--in", &msg_path],
            b"",
            &format!("{ty}: keyhold verify ({what})"),
        );
        assert_eq!(
            String::from_utf8_lossy(&v),
            "signature valid\n",
            "{ty}: verify: expected stdout `signature valid`"
        );
        let sig = std::fs::read(sp).expect("read signature");
        assert!(
            openssl_verifies(&pem, alg, &msg, &sig),
            "{ty}: expected openssl to verify the {what}"
        );
    }
    // verify reading the message from stdin
    env.ok(
        &["verify", "--key", &id, "--signature", &sig_path],
        &msg,
        &format!("{ty}: verify message on stdin"),
    );

    // A modified message fails, in keyhold and (as a control) in openssl.
    let bad_msg = flip(&msg, 17);
    let bad_msg_path = env.write("msg.bad", &bad_msg);
    let before = env.snapshot();
    assert_signature_invalid(
        &env,
        &id,
        &sig_path,
        &bad_msg_path,
        &[],
        &format!("{ty}: verify of a modified message"),
    );
    assert!(
        !openssl_verifies(&pem, alg, &bad_msg, &sig),
        "{ty}: control: expected openssl to reject the modified message"
    );

    // A modified signature fails too.
    let bad_sig_path = env.write("sig.bad", &flip(&sig, sig.len() - 1));
    assert_signature_invalid(
        &env,
        &id,
        &bad_sig_path,
        &msg_path,
        &[],
        &format!("{ty}: verify of a modified signature"),
    );
    env.assert_unchanged(&before, &format!("{ty}: failed verifications"));
    (env, id)
}

/// `verify --key ID --signature SIG --in MSG EXTRA…` exits 1 saying `signature invalid`, and
/// prints no `signature valid`.
fn assert_signature_invalid(env: &Env, id: &str, sig: &str, msg: &str, extra: &[&str], ctx: &str) {
    let mut args = vec!["verify", "--key", id, "--signature", sig, "--in", msg];
    args.extend_from_slice(extra);
    let o = env.run(&args, b"");
    assert_fail(&o, 1, "signature invalid", ctx);
    assert!(
        !stdout_str(&o).contains("signature valid"),
        "{ctx}: expected no `signature valid` on stdout"
    );
}

fn raw_format_check(env: &Env, id: &str, ty: &str, raw_len: usize, alg: Algorithm) {
    let msg_path = env.path_str("msg");
    let raw_path = env.path_str("sig.raw");
    env.ok(
        &[
            "sign", "--key", id, "--format", "raw", "--in", &msg_path, "--out", &raw_path,
        ],
        b"",
        &format!("{ty}: sign --format raw"),
    );
    let raw = std::fs::read(&raw_path).expect("read raw signature");
    assert_eq!(
        raw.len(),
        raw_len,
        "{ty}: expected a {raw_len}-byte r‖s signature with --format raw"
    );
    let v = env.ok(
        &[
            "verify",
            "--key",
            id,
            "--signature",
            &raw_path,
            "--in",
            &msg_path,
            "--format",
            "raw",
        ],
        b"",
        &format!("{ty}: verify --format raw"),
    );
    assert_eq!(
        String::from_utf8_lossy(&v),
        "signature valid\n",
        "{ty}: verify raw: expected `signature valid`"
    );
    // r‖s really is r‖s: re-encoded as DER, openssl accepts it.
    let pem = std::fs::read_to_string(env.file("pub.pem")).expect("read pub.pem");
    let msg = std::fs::read(&msg_path).expect("read msg");
    assert!(
        openssl_verifies(&pem, alg, &msg, &raw_ecdsa_to_der(&raw)),
        "{ty}: expected openssl to verify the raw signature re-encoded as DER"
    );
    // A raw signature read as DER (the default) is not valid.
    assert_signature_invalid(
        env,
        id,
        &raw_path,
        &msg_path,
        &[],
        &format!("{ty}: raw signature verified as DER"),
    );
    // A modified raw signature fails.
    let bad = env.write("sig.raw.bad", &flip(&raw, 5));
    assert_signature_invalid(
        env,
        id,
        &bad,
        &msg_path,
        &["--format", "raw"],
        &format!("{ty}: modified raw signature"),
    );
}

#[test]
fn sign_verify_ecdsa_p256_with_openssl() {
    let (env, id) = sign_verify_roundtrip("ecdsa-p256", &[], Algorithm::EcdsaP256Sha256);
    let sig = std::fs::read(env.file("sig")).expect("sig");
    assert_eq!(
        sig[0], 0x30,
        "ecdsa-p256: expected a DER SEQUENCE signature by default"
    );
    raw_format_check(&env, &id, "ecdsa-p256", 64, Algorithm::EcdsaP256Sha256);

    // Another P-256 key does not verify this key's signature.
    let other = env.create_key("other", "ecdsa-p256", &[]);
    assert_signature_invalid(
        &env,
        &other,
        &env.path_str("sig"),
        &env.path_str("msg"),
        &[],
        "ecdsa-p256: signature checked against another key",
    );
}

#[test]
fn sign_verify_ecdsa_p384_with_openssl() {
    let (env, id) = sign_verify_roundtrip("ecdsa-p384", &[], Algorithm::EcdsaP384Sha384);
    let sig = std::fs::read(env.file("sig")).expect("sig");
    assert_eq!(
        sig[0], 0x30,
        "ecdsa-p384: expected a DER SEQUENCE signature by default"
    );
    raw_format_check(&env, &id, "ecdsa-p384", 96, Algorithm::EcdsaP384Sha384);
}

/// `sign --key ID EXTRA… --in msg` gives `sig` again (a deterministic signature scheme).
fn assert_signs_the_same_again(env: &Env, id: &str, extra: &[&str], sig: &[u8], ty: &str) {
    let msg = env.path_str("msg");
    let mut args = vec!["sign", "--key", id, "--in", &msg];
    args.extend_from_slice(extra);
    let again = env.ok(&args, b"", &format!("{ty}: sign again"));
    assert_eq!(
        again, sig,
        "{ty}: expected the same signature again (deterministic; {extra:?} changes nothing)"
    );
}

#[test]
fn sign_verify_ed25519_with_openssl() {
    let (env, id) = sign_verify_roundtrip("ed25519", &[], Algorithm::Ed25519);
    let sig = std::fs::read(env.file("sig")).expect("sig");
    assert_eq!(sig.len(), 64, "ed25519: expected a 64-byte signature");
    // Ed25519 is deterministic, and --format is ignored for it.
    assert_signs_the_same_again(&env, &id, &["--format", "raw"], &sig, "ed25519");
}

#[test]
fn sign_verify_rsa2048_pss_with_openssl() {
    let (env, _id) = sign_verify_roundtrip("rsa-2048", &[], Algorithm::RsaPssSha256);
    let sig = std::fs::read(env.file("sig")).expect("sig");
    assert_eq!(sig.len(), 256, "rsa-2048: expected a 256-byte signature");
    // The documented salt length is 32: openssl_verifies holds PSS to exactly that (checked in
    // sign_verify_roundtrip). PSS is not PKCS#1 v1.5:
    let pem = std::fs::read_to_string(env.file("pub.pem")).expect("read pub.pem");
    let msg = std::fs::read(env.file("msg")).expect("read msg");
    assert!(
        !openssl_verifies(&pem, Algorithm::RsaPkcs1Sha256, &msg, &sig),
        "rsa-2048 default padding: expected PSS (openssl's PKCS#1 v1.5 check must fail)"
    );
}

#[test]
fn sign_verify_rsa2048_pkcs1v15_with_openssl() {
    let (env, id) = sign_verify_roundtrip(
        "rsa-2048",
        &["--padding", "pkcs1v15"],
        Algorithm::RsaPkcs1Sha256,
    );
    let sig = std::fs::read(env.file("sig")).expect("sig");
    assert_signs_the_same_again(&env, &id, &[], &sig, "rsa-2048 pkcs1v15");
}

#[test]
fn sign_verify_rsa3072_pss_with_openssl() {
    let (env, _id) = sign_verify_roundtrip("rsa-3072", &[], Algorithm::RsaPssSha256);
    let sig = std::fs::read(env.file("sig")).expect("sig");
    assert_eq!(sig.len(), 384, "rsa-3072: expected a 384-byte signature");
}

#[test]
fn sign_verify_rsa4096_pss_with_openssl() {
    let (env, _id) = sign_verify_roundtrip("rsa-4096", &[], Algorithm::RsaPssSha256);
    let sig = std::fs::read(env.file("sig")).expect("sig");
    assert_eq!(sig.len(), 512, "rsa-4096: expected a 512-byte signature");
}

// ---------------------------------------------------------------------------------------------
// 3. public key formats
// ---------------------------------------------------------------------------------------------

#[test]
fn pubkey_der_equals_pem_body_and_openssl_der() {
    let env = Env::init();
    for ty in ["ecdsa-p256", "ecdsa-p384", "ed25519", "rsa-2048"] {
        let id = env.create_key(&format!("k-{ty}"), ty, &[]);
        let pem = env.pubkey_pem(&id);
        let pem_path = env.write(&format!("{ty}.pem"), pem.as_bytes());
        let der = env.ok(
            &["key", "pubkey", "--key", &id, "--format", "der"],
            b"",
            &format!("{ty}: pubkey --format der"),
        );
        assert_eq!(
            der,
            pem_body(&pem),
            "{ty}: expected --format der to be the PEM body, base64-decoded"
        );
        let ossl_der_path = env.path_str(&format!("{ty}.ossl.der"));
        openssl_ok(
            &[
                "pkey",
                "-pubin",
                "-in",
                &pem_path,
                "-outform",
                "DER",
                "-out",
                &ossl_der_path,
            ],
            "openssl pkey -outform DER",
        );
        let ossl_der = std::fs::read(&ossl_der_path).expect("read openssl DER");
        assert_eq!(
            der, ossl_der,
            "{ty}: expected --format der to equal openssl's DER of the same key"
        );

        // --out writes the same bytes to a file, nothing to stdout.
        let out_path = env.path_str(&format!("{ty}.out.pem"));
        let o = env.ok(
            &["key", "pubkey", "--key", &id, "--out", &out_path],
            b"",
            &format!("{ty}: pubkey --out"),
        );
        assert!(
            o.is_empty(),
            "{ty}: pubkey --out: expected nothing on stdout"
        );
        assert_eq!(
            std::fs::read_to_string(&out_path).expect("read --out"),
            pem,
            "{ty}: expected --out to hold the PEM"
        );
    }
}

fn jwk_of(env: &Env, id: &str, ty: &str) -> Json {
    let out = env.ok(
        &["key", "pubkey", "--key", id, "--format", "jwk"],
        b"",
        &format!("{ty}: pubkey --format jwk"),
    );
    let text = String::from_utf8(out).expect("JWK is UTF-8");
    assert!(
        text.trim_start().starts_with('{'),
        "{ty}: expected the JWK to be a JSON object, got {text:?}"
    );
    serde_json::from_str::<Json>(&text)
        .unwrap_or_else(|e| panic!("{ty}: expected the JWK to parse as JSON ({e}): {text:?}"))
}

#[test]
fn pubkey_jwk_has_expected_kty_crv_and_coordinates() {
    let env = Env::init();
    for (ty, kty, crv, coord) in [
        ("ecdsa-p256", "EC", Some("P-256"), 32usize),
        ("ecdsa-p384", "EC", Some("P-384"), 48),
        ("ed25519", "OKP", Some("Ed25519"), 32),
        ("rsa-2048", "RSA", None, 256),
    ] {
        let id = env.create_key(&format!("j-{ty}"), ty, &[]);
        let der = env.ok(
            &["key", "pubkey", "--key", &id, "--format", "der"],
            b"",
            "pubkey der",
        );
        let jwk = jwk_of(&env, &id, ty);
        assert_eq!(
            jwk["kty"].as_str(),
            Some(kty),
            "{ty}: expected JWK kty {kty}, got {jwk:?}"
        );
        assert_eq!(
            jwk["crv"].as_str(),
            crv,
            "{ty}: expected JWK crv {crv:?}, got {jwk:?}"
        );
        match kty {
            "EC" => {
                let x = b64url(jwk["x"].as_str().expect("EC JWK has x"));
                let y = b64url(jwk["y"].as_str().expect("EC JWK has y"));
                assert_eq!(
                    (x.len(), y.len()),
                    (coord, coord),
                    "{ty}: expected {coord}-byte x and y"
                );
                let mut point = vec![4u8];
                point.extend(&x);
                point.extend(&y);
                assert!(
                    der.ends_with(&point),
                    "{ty}: expected JWK x,y to be the SPKI's public point"
                );
            }
            "OKP" => {
                let x = b64url(jwk["x"].as_str().expect("OKP JWK has x"));
                assert_eq!(x.len(), 32, "{ty}: expected a 32-byte x");
                assert!(
                    der.ends_with(&x),
                    "{ty}: expected JWK x to be the SPKI's public key"
                );
            }
            _ => {
                let n = b64url(jwk["n"].as_str().expect("RSA JWK has n"));
                assert_eq!(
                    n.len(),
                    coord,
                    "{ty}: expected a {coord}-byte modulus without leading zero"
                );
                assert!(
                    der.windows(n.len()).any(|w| w == n.as_slice()),
                    "{ty}: expected JWK n inside the SPKI"
                );
                assert_eq!(
                    jwk["e"].as_str(),
                    Some("AQAB"),
                    "{ty}: expected e = AQAB (65537)"
                );
            }
        }
        assert!(
            jwk.get("d").is_none(),
            "{ty}: expected no private part `d` in the JWK"
        );
    }
}
