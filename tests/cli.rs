//! The CLI contract of docs/cli.md, checked against the real binary in temp stores.
//!
//! Each test builds its own store (Argon2 at 8 MiB / 1 iteration), drives `keyhold` as a
//! subprocess, and checks exit codes, stdout formats and stderr messages exactly; failures must
//! leave the store byte-for-byte unchanged. Signatures and public keys are cross-checked with
//! `openssl`.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use keyhold::Algorithm;
use serde_json::Value as Json;
use support::env::*;
use support::{field, openssl_verifies};

// ---------------------------------------------------------------------------------------------
// 1. init
// ---------------------------------------------------------------------------------------------

#[test]
fn init_creates_private_store_and_refuses_a_second_init() {
    let env = Env::new();
    let out = env.run(INIT_ARGS, b"");
    assert_ok(&out, "init");
    let line = stdout_str(&out);
    let prefix = format!("initialised keyhold store {} (store id ", env.store_str());
    assert!(
        line.starts_with(&prefix) && line.ends_with(", sealer passphrase)\n") && line.lines().count() == 1,
        "init: expected `initialised keyhold store DIR (store id HEX, sealer passphrase)`, got {line:?}"
    );
    let hex = &line[prefix.len()..line.len() - ", sealer passphrase)\n".len()];
    assert!(
        is_lower_hex(hex),
        "init: expected the store id to be lowercase hex, got {hex:?}"
    );

    let check_modes = |when: &str| {
        let modes = modes_under(&env.store);
        assert!(
            modes.len() > 1,
            "{when}: expected files inside the store dir"
        );
        for (path, is_dir, mode) in modes {
            let want = if is_dir { 0o700 } else { 0o600 };
            assert_eq!(
                mode,
                want,
                "{when}: expected {} to have mode {want:o}, got {mode:o}",
                path.display()
            );
        }
    };
    check_modes("after init");

    let before = env.snapshot();
    let again = env.run(INIT_ARGS, b"");
    assert_fail(&again, 1, "already exists", "second init on the same store");
    env.assert_unchanged(&before, "second init");

    // Files created later (keys) are private too.
    env.create_key("k", "ecdsa-p256", &[]);
    env.create_key("h", "hmac-sha256", &[]);
    check_modes("after key create");
}

#[test]
fn init_refuses_argon2_memory_below_19_mib() {
    let env = Env::new();
    let out = env.run(
        &[
            "init",
            "--sealer",
            "passphrase",
            "--argon2-memory-mib",
            "18",
            "--argon2-iterations",
            "2",
        ],
        b"",
    );
    assert_clean_failure(&out, 1, "init with 18 MiB Argon2 memory (minimum is 19)");
    env.assert_no_store("init with 18 MiB Argon2 memory");
}

/// `--store`, else `$KEYHOLD_STORE`, else `$XDG_DATA_HOME/keyhold`, else `~/.local/share/keyhold`.
#[test]
fn store_location_follows_the_documented_order() {
    let env = Env::new();
    let home = env.dir.path();
    // No --store here: the harness' `command` always passes one.
    let run_init = |vars: &[(&str, &std::path::Path)], store_flag: Option<&std::path::Path>| {
        let mut cmd = env.bare_command();
        if let Some(dir) = store_flag {
            cmd.arg("--store").arg(dir);
        }
        cmd.args(INIT_ARGS);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let out = env.run_cmd(cmd, Some(b""));
        assert_ok(&out, &format!("init with {vars:?}, --store {store_flag:?}"));
    };
    let has_store = |dir: &std::path::Path| {
        std::fs::read_dir(dir)
            .map(|d| d.count() > 0)
            .unwrap_or(false)
    };

    run_init(&[], None);
    let default = home.join(".local/share/keyhold");
    assert!(
        has_store(&default),
        "no --store, KEYHOLD_STORE or XDG_DATA_HOME: expected the store in ~/.local/share/keyhold"
    );

    let xdg = home.join("xdg");
    run_init(&[("XDG_DATA_HOME", &xdg)], None);
    assert!(
        has_store(&xdg.join("keyhold")),
        "XDG_DATA_HOME set: expected the store in $XDG_DATA_HOME/keyhold"
    );

    let ks = home.join("ks");
    let xdg2 = home.join("xdg2");
    run_init(&[("KEYHOLD_STORE", &ks), ("XDG_DATA_HOME", &xdg2)], None);
    assert!(
        has_store(&ks),
        "KEYHOLD_STORE set: expected the store there"
    );
    assert!(
        !xdg2.join("keyhold").exists(),
        "KEYHOLD_STORE set: expected XDG_DATA_HOME to be ignored"
    );

    let flag = home.join("flag");
    let ks2 = home.join("ks2");
    run_init(&[("KEYHOLD_STORE", &ks2)], Some(&flag));
    assert!(has_store(&flag), "--store given: expected the store there");
    assert!(
        !ks2.exists(),
        "--store given: expected KEYHOLD_STORE to be ignored"
    );
}

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
    let o = env.run(
        &[
            "verify",
            "--key",
            &id,
            "--signature",
            &sig_path,
            "--in",
            &bad_msg_path,
        ],
        b"",
    );
    assert_fail(
        &o,
        1,
        "signature invalid",
        &format!("{ty}: verify of a modified message"),
    );
    assert!(
        o.stdout.is_empty() || !stdout_str(&o).contains("signature valid"),
        "{ty}: modified message: expected no `signature valid` on stdout"
    );
    assert!(
        !openssl_verifies(&pem, alg, &bad_msg, &sig),
        "{ty}: control: expected openssl to reject the modified message"
    );

    // A modified signature fails too.
    let bad_sig_path = env.write("sig.bad", &flip(&sig, sig.len() - 1));
    let o = env.run(
        &[
            "verify",
            "--key",
            &id,
            "--signature",
            &bad_sig_path,
            "--in",
            &msg_path,
        ],
        b"",
    );
    assert_fail(
        &o,
        1,
        "signature invalid",
        &format!("{ty}: verify of a modified signature"),
    );
    env.assert_unchanged(&before, &format!("{ty}: failed verifications"));
    (env, id)
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
    let o = env.run(
        &[
            "verify",
            "--key",
            id,
            "--signature",
            &raw_path,
            "--in",
            &msg_path,
        ],
        b"",
    );
    assert_fail(
        &o,
        1,
        "signature invalid",
        &format!("{ty}: raw signature verified as DER"),
    );
    // A modified raw signature fails.
    let bad = env.write("sig.raw.bad", &flip(&raw, 5));
    let o = env.run(
        &[
            "verify",
            "--key",
            id,
            "--signature",
            &bad,
            "--in",
            &msg_path,
            "--format",
            "raw",
        ],
        b"",
    );
    assert_fail(
        &o,
        1,
        "signature invalid",
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
    let o = env.run(
        &[
            "verify",
            "--key",
            &other,
            "--signature",
            &env.path_str("sig"),
            "--in",
            &env.path_str("msg"),
        ],
        b"",
    );
    assert_fail(
        &o,
        1,
        "signature invalid",
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

#[test]
fn sign_verify_ed25519_with_openssl() {
    let (env, id) = sign_verify_roundtrip("ed25519", &[], Algorithm::Ed25519);
    let sig = std::fs::read(env.file("sig")).expect("sig");
    assert_eq!(sig.len(), 64, "ed25519: expected a 64-byte signature");
    // Ed25519 is deterministic, and --format is ignored for it.
    let again = env.ok(
        &[
            "sign",
            "--key",
            &id,
            "--format",
            "raw",
            "--in",
            &env.path_str("msg"),
        ],
        b"",
        "ed25519: sign again",
    );
    assert_eq!(
        again, sig,
        "ed25519: expected the same signature again (deterministic; --format changes nothing)"
    );
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
    let again = env.ok(
        &["sign", "--key", &id, "--in", &env.path_str("msg")],
        b"",
        "rsa pkcs1v15: sign again",
    );
    assert_eq!(
        again, sig,
        "rsa-2048 pkcs1v15: expected a deterministic signature"
    );
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

// ---------------------------------------------------------------------------------------------
// 4. AES-256-GCM
// ---------------------------------------------------------------------------------------------

const AES_HEADER: usize = 4 + 1 + 16 + 4; // magic, algorithm, key uuid, key version

#[test]
fn aes_gcm_round_trips_and_envelope_layout() {
    let env = Env::init();
    let id = env.create_key("aes", "aes-256-gcm", &[]);

    let text = b"attack at dawn, bring snacks".to_vec();
    let binary: Vec<u8> = (0u8..=255).cycle().take(1000).collect();
    let big = pseudo_random(1024 * 1024, 7);
    for (what, pt) in [("text", &text), ("binary", &binary), ("1 MiB", &big)] {
        for aad in [None, Some("purpose=test; user=42")] {
            let mut enc_args = vec!["encrypt", "--key", id.as_str()];
            if let Some(a) = aad {
                enc_args.extend(["--aad", a]);
            }
            let envlp = env.ok(&enc_args, pt, &format!("encrypt {what} aad={aad:?}"));
            assert!(
                envlp.starts_with(b"KHE1"),
                "encrypt {what}: expected the envelope to start with KHE1"
            );
            assert_eq!(
                envlp[4], 1,
                "encrypt {what}: expected algorithm byte 1 (AES-256-GCM)"
            );
            assert_eq!(
                envlp[AES_HEADER], 12,
                "encrypt {what}: expected a 96-bit (12-byte) nonce"
            );
            assert_eq!(
                envlp.len(),
                AES_HEADER + 1 + 12 + pt.len() + 16,
                "encrypt {what}: expected header + nonce + ciphertext + 16-byte tag"
            );
            assert!(
                !envlp.windows(16).any(|w| w == &pt[..16]),
                "encrypt {what}: expected no plaintext in the envelope"
            );
            let mut dec_args = vec!["decrypt", "--key", id.as_str()];
            if let Some(a) = aad {
                dec_args.extend(["--aad", a]);
            }
            let back = env.ok(&dec_args, &envlp, &format!("decrypt {what} aad={aad:?}"));
            assert!(
                back == *pt,
                "decrypt {what}: expected the original plaintext back"
            );
        }
    }

    // The envelope's key version (u32 BE) is the key's version from `key show`.
    let shown = String::from_utf8(env.ok(&["key", "show", "--key", &id], b"", "key show"))
        .expect("key show is UTF-8");
    let version: u32 = shown
        .lines()
        .find_map(|l| l.strip_prefix("version: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("key show: expected a numeric `version:` line in {shown:?}"));
    let envlp = env.ok(
        &["encrypt", "--key", &id],
        &text,
        "encrypt for the version check",
    );
    assert_eq!(
        envlp[21..25],
        version.to_be_bytes(),
        "envelope: expected bytes 21..25 to be the key version {version} (u32 BE)"
    );
    let other = env.create_key("aes-other", "aes-256-gcm", &[]);
    let other_env = env.ok(
        &["encrypt", "--key", &other],
        &text,
        "encrypt with a second key",
    );
    assert_ne!(
        envlp[5..21],
        other_env[5..21],
        "envelope: expected two keys to put different key uuids in bytes 5..21"
    );

    // Random nonce: the same plaintext twice gives different envelopes.
    let a = env.ok(&["encrypt", "--key", &id], &text, "encrypt #1");
    let b = env.ok(&["encrypt", "--key", &id], &text, "encrypt #2");
    assert_ne!(
        a[AES_HEADER + 1..AES_HEADER + 13],
        b[AES_HEADER + 1..AES_HEADER + 13],
        "expected a fresh nonce per message"
    );

    // --in / --out files.
    let pt_path = env.write("pt", &big);
    let ct_path = env.path_str("ct");
    let rt_path = env.path_str("rt");
    let o = env.ok(
        &["encrypt", "--key", &id, "--in", &pt_path, "--out", &ct_path],
        b"",
        "encrypt --in --out",
    );
    assert!(o.is_empty(), "encrypt --out: expected nothing on stdout");
    env.ok(
        &["decrypt", "--key", &id, "--in", &ct_path, "--out", &rt_path],
        b"",
        "decrypt --in --out",
    );
    assert!(
        std::fs::read(&rt_path).expect("read rt") == big,
        "decrypt --out: expected the 1 MiB plaintext back"
    );
}

fn assert_decrypt_fails(env: &Env, args: &[&str], input: &[u8], plaintext: &[u8], ctx: &str) {
    let o = env.run(args, input);
    assert_fail(&o, 1, "decryption failed", ctx);
    assert!(
        o.stdout.is_empty(),
        "{ctx}: expected no plaintext (nothing) on stdout, got {} bytes",
        o.stdout.len()
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains(std::str::from_utf8(plaintext).expect("text pt")),
        "{ctx}: expected no plaintext in stderr"
    );
}

#[test]
fn aes_gcm_tampering_wrong_aad_and_wrong_key_fail_cleanly() {
    let env = Env::init();
    let id = env.create_key("aes", "aes-256-gcm", &[]);
    let other = env.create_key("aes2", "aes-256-gcm", &[]);
    let pt = b"the eagle lands at midnight, confidential";
    let aad = "tenant=7";
    let envlp = env.ok(
        &["encrypt", "--key", &id, "--aad", aad],
        pt,
        "encrypt with aad",
    );
    let plain = env.ok(&["encrypt", "--key", &id], pt, "encrypt without aad");
    let before = env.snapshot();

    assert_decrypt_fails(
        &env,
        &["decrypt", "--key", &id, "--aad", "tenant=8"],
        &envlp,
        pt,
        "decrypt with the wrong AAD",
    );
    assert_decrypt_fails(
        &env,
        &["decrypt", "--key", &id],
        &envlp,
        pt,
        "decrypt without the AAD it was made with",
    );
    assert_decrypt_fails(
        &env,
        &["decrypt", "--key", &id, "--aad", aad],
        &plain,
        pt,
        "decrypt with an AAD it was not made with",
    );
    assert_decrypt_fails(
        &env,
        &["decrypt", "--key", &other, "--aad", aad],
        &envlp,
        pt,
        "decrypt with another AES key",
    );

    let n = envlp.len();
    for cut in [
        n - 1,
        n - 16,
        AES_HEADER + 13,
        AES_HEADER + 1,
        AES_HEADER,
        10,
        4,
        1,
    ] {
        assert_decrypt_fails(
            &env,
            &["decrypt", "--key", &id, "--aad", aad],
            &envlp[..cut],
            pt,
            &format!("decrypt an envelope truncated to {cut} bytes"),
        );
    }
    let mut longer = envlp.clone();
    longer.push(0);
    assert_decrypt_fails(
        &env,
        &["decrypt", "--key", &id, "--aad", aad],
        &longer,
        pt,
        "decrypt an envelope with a trailing byte",
    );

    let named = [
        (0, "magic"),
        (3, "magic"),
        (4, "algorithm"),
        (5, "key uuid"),
        (20, "key uuid"),
        (21, "key version"),
        (24, "key version"),
        (AES_HEADER, "nonce length"),
        (AES_HEADER + 1, "nonce"),
        (AES_HEADER + 12, "nonce"),
        (AES_HEADER + 13, "ciphertext"),
        (AES_HEADER + 13 + pt.len() / 2, "ciphertext"),
        (n - 16, "tag"),
        (n - 1, "tag"),
    ];
    for (pos, what) in named {
        assert_decrypt_fails(
            &env,
            &["decrypt", "--key", &id, "--aad", aad],
            &flip(&envlp, pos),
            pt,
            &format!("decrypt with byte {pos} ({what}) flipped"),
        );
    }

    // A failed decrypt with --out leaves no plaintext in the output file.
    let out_path = env.path_str("should-not-hold-plaintext");
    let o = env.run(
        &[
            "decrypt", "--key", &id, "--aad", "wrong", "--out", &out_path,
        ],
        &envlp,
    );
    assert_fail(
        &o,
        1,
        "decryption failed",
        "decrypt --out with the wrong AAD",
    );
    let written = std::fs::read(&out_path).unwrap_or_default();
    assert!(
        written.is_empty(),
        "decrypt --out failed: expected no (partial) plaintext in the output file, found {} bytes",
        written.len()
    );

    env.assert_unchanged(&before, "failed decryptions");
    // The genuine envelope still decrypts.
    let back = env.ok(
        &["decrypt", "--key", &id, "--aad", aad],
        &envlp,
        "decrypt the untouched envelope",
    );
    assert_eq!(
        back, pt,
        "expected the untouched envelope to decrypt after the failures"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. RSA-OAEP
// ---------------------------------------------------------------------------------------------

#[test]
fn rsa_oaep_round_trip_and_plaintext_limit() {
    let env = Env::init();
    let id = env.create_key("rsa-dec", "rsa-2048", &["--purpose", "decrypt"]);
    for (what, pt) in [
        ("short", b"wrap me".to_vec()),
        ("190 bytes (the limit)", pseudo_random(190, 3)),
    ] {
        for aad in [None, Some("ctx-1")] {
            let mut enc = vec!["encrypt", "--key", id.as_str()];
            let mut dec = vec!["decrypt", "--key", id.as_str()];
            if let Some(a) = aad {
                enc.extend(["--aad", a]);
                dec.extend(["--aad", a]);
            }
            let envlp = env.ok(&enc, &pt, &format!("rsa encrypt {what} aad={aad:?}"));
            assert!(
                envlp.starts_with(b"KHE1"),
                "rsa encrypt {what}: expected KHE1"
            );
            assert_eq!(
                envlp[4], 2,
                "rsa encrypt {what}: expected algorithm byte 2 (RSA-OAEP-SHA256)"
            );
            // docs/cli.md: RSA-OAEP envelopes have nonce length 0.
            assert_eq!(
                envlp[AES_HEADER], 0,
                "rsa encrypt {what}: expected nonce length 0"
            );
            assert_eq!(
                envlp.len(),
                AES_HEADER + 1 + 256,
                "rsa encrypt {what}: expected header + nonce length 0 + 256-byte ciphertext"
            );
            let back = env.ok(&dec, &envlp, &format!("rsa decrypt {what} aad={aad:?}"));
            assert_eq!(back, pt, "rsa decrypt {what}: expected the plaintext back");
        }
    }
    let before = env.snapshot();
    let o = env.run(&["encrypt", "--key", &id], &pseudo_random(191, 4));
    assert_fail(
        &o,
        1,
        "190",
        "rsa-2048 encrypt of 191 bytes (limit 190): expected a message naming the limit",
    );
    assert!(
        o.stdout.is_empty(),
        "rsa encrypt over the limit: expected no envelope on stdout"
    );

    env.assert_unchanged(&before, "rsa-2048 encrypt over the limit");
    let rsa3072 = env.create_key("rsa-dec-3072", "rsa-3072", &["--purpose", "decrypt"]);
    let pt318 = pseudo_random(318, 5);
    let envlp = env.ok(
        &["encrypt", "--key", &rsa3072],
        &pt318,
        "rsa-3072 encrypt of 318 bytes (the limit)",
    );
    let back = env.ok(
        &["decrypt", "--key", &rsa3072],
        &envlp,
        "rsa-3072 decrypt of 318 bytes",
    );
    assert_eq!(
        back, pt318,
        "rsa-3072: expected the 318-byte plaintext back"
    );
    let o = env.run(&["encrypt", "--key", &rsa3072], &pseudo_random(319, 6));
    assert_fail(
        &o,
        1,
        "318",
        "rsa-3072 encrypt of 319 bytes (limit 318): expected a message naming the limit",
    );
    let before = env.snapshot();

    // Tampering and wrong AAD fail as `decryption failed`.
    let pt = b"rsa secret payload";
    let envlp = env.ok(&["encrypt", "--key", &id, "--aad", "a"], pt, "rsa encrypt");
    assert_decrypt_fails(
        &env,
        &["decrypt", "--key", &id, "--aad", "b"],
        &envlp,
        pt,
        "rsa decrypt with the wrong AAD",
    );
    for pos in [0, 4, 8, 22, envlp.len() - 100, envlp.len() - 1] {
        assert_decrypt_fails(
            &env,
            &["decrypt", "--key", &id, "--aad", "a"],
            &flip(&envlp, pos),
            pt,
            &format!("rsa decrypt with byte {pos} flipped"),
        );
    }
    assert_decrypt_fails(
        &env,
        &["decrypt", "--key", &id, "--aad", "a"],
        &envlp[..envlp.len() - 1],
        pt,
        "rsa decrypt of a truncated envelope",
    );
    env.assert_unchanged(&before, "rsa failures");
}

#[test]
fn rsa_oaep_decrypts_what_openssl_encrypts_with_the_documented_label() {
    let env = Env::init();
    let id = env.create_key("rsa-dec", "rsa-2048", &["--purpose", "decrypt"]);
    let pem = env.pubkey_pem(&id);
    let pub_path = env.write("pub.pem", pem.as_bytes());
    let aad = "ctx-1";
    // A keyhold envelope gives the header; the label is "KHL1:" ‖ base64url(SHA-256(
    // header-before-nonce-length ‖ aad)) ‖ 0x00 (docs/cli.md).
    let template = env.ok(
        &["encrypt", "--key", &id, "--aad", aad],
        b"template",
        "rsa encrypt template",
    );
    assert_eq!(
        template[AES_HEADER], 0,
        "RSA-OAEP envelopes have nonce length 0"
    );
    let mut binding = template[..AES_HEADER].to_vec();
    binding.extend_from_slice(aad.as_bytes());
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &binding);
    let mut label = b"KHL1:".to_vec();
    label.extend_from_slice(
        base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, digest)
            .as_bytes(),
    );
    label.push(0);
    assert_eq!(label.len(), 49, "docs/cli.md: the label is 49 bytes");
    let label_hex = keyhold::hex::encode(&label);
    let pt = b"encrypted by openssl, decrypted by keyhold";
    let pt_path = env.write("pt", pt);
    let ct_path = env.path_str("ct");
    openssl_ok(
        &[
            "pkeyutl",
            "-encrypt",
            "-pubin",
            "-inkey",
            &pub_path,
            "-in",
            &pt_path,
            "-out",
            &ct_path,
            "-pkeyopt",
            "rsa_padding_mode:oaep",
            "-pkeyopt",
            "rsa_oaep_md:sha256",
            "-pkeyopt",
            "rsa_mgf1_md:sha256",
            "-pkeyopt",
            &format!("rsa_oaep_label:{label_hex}"),
        ],
        "openssl RSA-OAEP-SHA256 encrypt",
    );
    let mut envlp = template[..=AES_HEADER].to_vec();
    envlp.extend(std::fs::read(&ct_path).expect("read openssl ciphertext"));
    let back = env.ok(
        &["decrypt", "--key", &id, "--aad", aad],
        &envlp,
        "keyhold decrypt of openssl's OAEP ciphertext",
    );
    assert_eq!(back, pt, "expected keyhold to decrypt openssl's RSA-OAEP-SHA256/MGF1-SHA256 ciphertext with the documented label");
}

// ---------------------------------------------------------------------------------------------
// 6. HMAC
// ---------------------------------------------------------------------------------------------

#[test]
fn hmac_mac_and_mac_verify() {
    let env = Env::init();
    let id = env.create_key("mac", "hmac-sha256", &[]);
    let msg = b"message to authenticate".to_vec();
    let tag = env.ok(&["mac", "--key", &id], &msg, "mac");
    assert_eq!(tag.len(), 32, "mac: expected a 32-byte binary tag");
    assert_eq!(
        env.ok(&["mac", "--key", &id], &msg, "mac again"),
        tag,
        "mac: expected HMAC to be deterministic"
    );
    let msg_path = env.write("msg", &msg);
    let tag_path = env.write("tag", &tag);
    let out_path = env.path_str("tag.out");
    let o = env.ok(
        &["mac", "--key", &id, "--in", &msg_path, "--out", &out_path],
        b"",
        "mac --in --out",
    );
    assert!(o.is_empty(), "mac --out: expected nothing on stdout");
    assert_eq!(
        std::fs::read(&out_path).expect("read tag"),
        tag,
        "mac --out: expected the same tag in the file"
    );

    let v = env.ok(
        &[
            "mac-verify",
            "--key",
            &id,
            "--tag",
            &tag_path,
            "--in",
            &msg_path,
        ],
        b"",
        "mac-verify",
    );
    assert_eq!(
        String::from_utf8_lossy(&v),
        "tag valid\n",
        "mac-verify: expected stdout `tag valid`"
    );
    env.ok(
        &["mac-verify", "--key", &id, "--tag", &tag_path],
        &msg,
        "mac-verify message on stdin",
    );

    let before = env.snapshot();
    for pos in [0, 15, 31] {
        let bad = env.write("tag.bad", &flip(&tag, pos));
        let o = env.run(
            &["mac-verify", "--key", &id, "--tag", &bad, "--in", &msg_path],
            b"",
        );
        assert_fail(
            &o,
            1,
            "tag invalid",
            &format!("mac-verify with tag byte {pos} flipped"),
        );
        assert!(
            !stdout_str(&o).contains("tag valid"),
            "mac-verify bad tag: expected no `tag valid`"
        );
    }
    let short = env.write("tag.short", &tag[..31]);
    let o = env.run(
        &[
            "mac-verify",
            "--key",
            &id,
            "--tag",
            &short,
            "--in",
            &msg_path,
        ],
        b"",
    );
    assert_fail(&o, 1, "tag invalid", "mac-verify with a 31-byte tag");
    let o = env.run(
        &["mac-verify", "--key", &id, "--tag", &tag_path],
        &flip(&msg, 3),
    );
    assert_fail(&o, 1, "tag invalid", "mac-verify of a modified message");
    env.assert_unchanged(&before, "failed mac-verify");
    let other = env.create_key("mac2", "hmac-sha256", &[]);
    let o = env.run(
        &[
            "mac-verify",
            "--key",
            &other,
            "--tag",
            &tag_path,
            "--in",
            &msg_path,
        ],
        b"",
    );
    assert_fail(&o, 1, "tag invalid", "mac-verify with another HMAC key");
    let tag2 = env.ok(&["mac", "--key", &other], &msg, "mac with the other key");
    assert_ne!(tag2, tag, "expected two HMAC keys to give different tags");
}

// ---------------------------------------------------------------------------------------------
// 7. authenticated key IDs
// ---------------------------------------------------------------------------------------------

fn replacement_for(id: &str, pos: usize) -> Vec<char> {
    let chars: Vec<char> = id.chars().collect();
    let mut alphabet: Vec<char> = chars.clone();
    alphabet.sort_unstable();
    alphabet.dedup();
    let c = chars[pos];
    // Prefer characters the ID's own alphabet uses, so the change is well-formed, not just malformed.
    let mut reps: Vec<char> = alphabet.into_iter().filter(|&x| x != c).collect();
    if reps.is_empty() {
        reps.push(if c == 'a' { 'b' } else { 'a' });
    }
    reps
}

fn with_char(id: &str, pos: usize, rep: char) -> String {
    id.chars()
        .enumerate()
        .map(|(i, c)| if i == pos { rep } else { c })
        .collect()
}

#[test]
fn key_id_with_any_character_changed_fails_authentication() {
    let env = Env::init();
    let id = env.create_key("target", "ecdsa-p256", &[]);
    let _other = env.create_key("bystander", "ecdsa-p256", &[]);
    assert!(
        id.starts_with("kh1_"),
        "expected key IDs to start with `kh1_`, got {id}"
    );
    let before = env.snapshot();
    let n = id.chars().count();
    for pos in 0..n {
        let reps = replacement_for(&id, pos);
        // Three alternatives at the prefix and the last character (whose spare bits a lax
        // decoder could ignore), one elsewhere.
        let tries = if pos < 4 || pos == n - 1 { 3 } else { 1 };
        for rep in reps.iter().take(tries).copied() {
            let bad = with_char(&id, pos, rep);
            let o = env.run(&["key", "show", &format!("--key={bad}")], b"");
            assert_fail(
                &o,
                3,
                "key ID failed authentication",
                &format!("key show with char {pos} of the ID changed to {rep:?} ({bad})"),
            );
            assert!(
                o.stdout.is_empty(),
                "modified ID {bad}: expected nothing on stdout"
            );
        }
    }
    for pos in [0, 2, n / 2, n - 1] {
        let bad = with_char(&id, pos, replacement_for(&id, pos)[0]);
        let o = env.run(&["sign", &format!("--key={bad}")], b"payload");
        assert_fail(
            &o,
            3,
            "key ID failed authentication",
            &format!("sign with char {pos} of the ID changed"),
        );
        assert!(
            o.stdout.is_empty(),
            "sign with modified ID: expected no signature on stdout"
        );
    }
    env.assert_unchanged(&before, "modified key IDs");
    env.ok(
        &["sign", "--key", &id],
        b"payload",
        "the genuine ID still works",
    );
}

#[test]
fn malformed_key_ids_fail_authentication() {
    let env = Env::init();
    let id = env.create_key("target", "ed25519", &[]);
    let before = env.snapshot();
    let half = &id[..id.len() / 2];
    let minus_one = &id[..id.len() - 1];
    let plus_one = format!("{id}A");
    let upper = id.to_uppercase();
    let cases: Vec<(&str, String)> = vec![
        ("truncated by one char", minus_one.to_owned()),
        ("truncated to half", half.to_owned()),
        ("prefix only", "kh1_".to_owned()),
        ("empty", String::new()),
        (
            "garbage with prefix",
            "kh1_zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz".to_owned(),
        ),
        ("one char appended", plus_one),
        ("upper-cased", upper),
    ];
    for (what, bad) in cases {
        if bad == id {
            continue; // upper-casing may be a no-op only if the ID has no letters (it has)
        }
        let o = env.run(&["key", "show", &format!("--key={bad}")], b"");
        assert_fail(
            &o,
            3,
            "key ID failed authentication",
            &format!("key show with a {what} ID {bad:?}"),
        );
    }
    // A name (no kh1_ prefix, at most 64 name characters) is not an ID: a usage error (exit 2)
    // that says to pass --name.
    for (what, bad) in [
        ("garbage", "not-a-key-id"),
        ("the name instead of the ID", "target"),
    ] {
        let o = env.run(&["key", "show", &format!("--key={bad}")], b"");
        assert_fail(
            &o,
            2,
            &format!("to use a key by name, pass --name {bad}"),
            what,
        );
    }
    env.assert_unchanged(&before, "malformed IDs");
}

#[test]
fn key_id_from_another_store_fails_authentication() {
    let one = Env::init();
    let two = Env::init();
    let id1 = one.create_key("same-name", "ecdsa-p256", &[]);
    let _id2 = two.create_key("same-name", "ecdsa-p256", &[]);
    let before = two.snapshot();
    let o = two.run(&["key", "show", "--key", &id1], b"");
    assert_fail(
        &o,
        3,
        "key ID failed authentication",
        "key show in store two with store one's ID",
    );
    let o = two.run(&["sign", "--key", &id1], b"payload");
    assert_fail(
        &o,
        3,
        "key ID failed authentication",
        "sign in store two with store one's ID",
    );
    assert!(
        o.stdout.is_empty(),
        "sign with a foreign ID: expected no signature"
    );
    two.assert_unchanged(&before, "foreign ID");
}

#[test]
fn destroyed_key_gives_no_such_key() {
    let env = Env::init();
    let id = env.create_key("doomed", "ecdsa-p256", &[]);
    let keep = env.create_key("keeper", "ecdsa-p256", &[]);
    let out = env.ok(&["key", "destroy", "--key", &id], b"", "key destroy");
    assert_eq!(
        String::from_utf8_lossy(&out),
        "destroyed default/doomed\n",
        "key destroy: expected `destroyed NS/NAME`"
    );
    let before = env.snapshot();
    let o = env.run(&["key", "show", "--key", &id], b"");
    assert_fail(&o, 5, "no such key", "key show of a destroyed key");
    let o = env.run(&["sign", "--key", &id], b"payload");
    assert_fail(&o, 5, "no such key", "sign with a destroyed key");
    assert!(
        o.stdout.is_empty(),
        "sign with a destroyed key: expected no signature"
    );
    let o = env.run(&["key", "pubkey", "--key", &id], b"");
    assert_fail(&o, 5, "no such key", "pubkey of a destroyed key");
    let o = env.run(&["key", "destroy", "--key", &id], b"");
    assert_fail(&o, 5, "no such key", "destroying a destroyed key again");
    env.assert_unchanged(&before, "uses of a destroyed key");
    env.ok(
        &["sign", "--key", &keep],
        b"payload",
        "the other key still signs",
    );
}

// ---------------------------------------------------------------------------------------------
// 8. passphrases
// ---------------------------------------------------------------------------------------------

#[test]
fn wrong_passphrase_cannot_unseal() {
    let env = Env::init();
    let id = env.create_key("k", "ecdsa-p256", &[]);
    let aes = env.create_key("a", "aes-256-gcm", &[]);
    let envlp = env.ok(&["encrypt", "--key", &aes], b"secret", "encrypt");
    let before = env.snapshot();
    let wrong = "not-the-passphrase-9f3c";
    let cases: Vec<(Vec<&str>, &[u8])> = vec![
        (
            vec!["key", "create", "new", "--type", "ecdsa-p256"],
            &b""[..],
        ),
        (vec!["sign", "--key", &id], &b"payload"[..]),
        (vec!["decrypt", "--key", &aes], &envlp[..]),
        (vec!["encrypt", "--key", &aes], &b"payload"[..]),
    ];
    for (args, input) in &cases {
        let o = env.run_with(args, Some(input), |c| {
            c.env("KEYHOLD_PASSPHRASE", wrong);
        });
        assert_fail(
            &o,
            4,
            "cannot unseal the store",
            &format!("{args:?} with the wrong passphrase"),
        );
        assert!(
            !stderr(&o).contains(wrong),
            "{args:?}: expected the wrong passphrase not to be echoed"
        );
        assert!(
            o.stdout.is_empty(),
            "{args:?} wrong passphrase: expected nothing on stdout"
        );
    }
    let wrong_file = env.write("wrong.pass", format!("{wrong}\n").as_bytes());
    let o = env.run(
        &["--passphrase-file", &wrong_file, "sign", "--key", &id],
        b"payload",
    );
    assert_fail(
        &o,
        4,
        "cannot unseal the store",
        "sign with a wrong --passphrase-file",
    );
    env.assert_unchanged(&before, "wrong passphrase");
}

#[test]
fn no_passphrase_source_names_keyhold_passphrase() {
    let env = Env::init();
    let id = env.create_key("k", "ecdsa-p256", &[]);
    let msg = env.write("msg", b"payload");
    let before = env.snapshot();
    // Detached from any terminal (new session, stdin /dev/null), no env, no file.
    let run_detached = |env: &Env, args: &[&str]| {
        env.detached(args, |c| {
            c.env_remove("KEYHOLD_PASSPHRASE");
        })
    };
    for args in [
        vec!["sign", "--key", id.as_str(), "--in", msg.as_str()],
        vec!["key", "create", "x", "--type", "ed25519"],
    ] {
        let o = run_detached(&env, &args);
        assert_clean_failure(&o, 1, &format!("{args:?} with no passphrase source"));
        let err = stderr(&o);
        assert!(
            err.contains("KEYHOLD_PASSPHRASE"),
            "{args:?}: expected the error to name KEYHOLD_PASSPHRASE\n{}",
            show(&o)
        );
        assert!(
            err.contains("--passphrase-file"),
            "{args:?}: expected the error to name --passphrase-file too (all three sources)\n{}",
            show(&o)
        );
        assert!(
            err.contains("terminal") || err.contains("tty"),
            "{args:?}: expected the error to name the terminal prompt too (all three sources)\n{}",
            show(&o)
        );
    }
    env.assert_unchanged(&before, "no passphrase");

    let fresh = Env::new();
    let o = run_detached(&fresh, INIT_ARGS);
    assert_clean_failure(&o, 1, "init with no passphrase source");
    assert!(
        stderr(&o).contains("KEYHOLD_PASSPHRASE"),
        "init without passphrase: expected KEYHOLD_PASSPHRASE named\n{}",
        show(&o)
    );
    fresh.assert_no_store("init without passphrase");
}

#[test]
fn passphrase_file_works_and_comes_first() {
    let env = Env::new();
    let pass_file = env.write(
        "pass",
        format!("{PASS}\nsecond line is ignored\n").as_bytes(),
    );
    let mut init = vec!["--passphrase-file", pass_file.as_str()];
    init.extend_from_slice(INIT_ARGS);
    let o = env.run_with(&init, Some(b""), |c| {
        c.env_remove("KEYHOLD_PASSPHRASE");
    });
    assert_ok(&o, "init with --passphrase-file only");
    // Created with the file, used with the environment variable: same passphrase.
    let id = env.create_key("k", "ecdsa-p256", &[]);
    let o = env.run_with(
        &["--passphrase-file", &pass_file, "sign", "--key", &id],
        Some(b"payload"),
        |c| {
            c.env_remove("KEYHOLD_PASSPHRASE");
        },
    );
    assert_ok(&o, "sign with --passphrase-file only");
    let o = env.run_with(
        &["--passphrase-file", &pass_file, "sign", "--key", &id],
        Some(b"payload"),
        |c| {
            c.env("KEYHOLD_PASSPHRASE", "wrong-env-passphrase");
        },
    );
    assert_ok(
        &o,
        "--passphrase-file (right) takes precedence over KEYHOLD_PASSPHRASE (wrong)",
    );
    let wrong = env.write("wrong", b"wrong-file-passphrase\n");
    let o = env.run(
        &["--passphrase-file", &wrong, "sign", "--key", &id],
        b"payload",
    );
    assert_fail(
        &o,
        4,
        "cannot unseal the store",
        "--passphrase-file (wrong) over KEYHOLD_PASSPHRASE (right)",
    );
}

// ---------------------------------------------------------------------------------------------
// 9. missing and corrupt stores
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_store_says_to_run_keyhold_init() {
    let env = Env::new();
    for args in [
        vec!["key", "list"],
        vec!["key", "create", "k", "--type", "ed25519"],
        vec!["sign", "--key", "kh1_x"],
    ] {
        let o = env.run(&args, b"payload");
        assert_clean_failure(&o, 1, &format!("{args:?} without a store"));
        assert!(
            stderr(&o).contains("keyhold init"),
            "{args:?} without a store: expected the message to mention `keyhold init`\n{}",
            show(&o)
        );
        assert!(
            !env.store.exists(),
            "{args:?} without a store: expected the store dir not to be created"
        );
    }
}

#[test]
fn corrupt_database_is_a_clean_error() {
    for (what, garbage) in [("garbage", pseudo_random(8192, 99)), ("empty", Vec::new())] {
        let env = Env::init();
        let id = env.create_key("k", "ecdsa-p256", &[]);
        let db = env.database_file();
        std::fs::write(&db, &garbage).expect("overwrite database");
        let before = env.snapshot();
        for args in [
            vec!["key", "list"],
            vec!["sign", "--key", id.as_str()],
            vec!["key", "create", "n", "--type", "ed25519"],
        ] {
            let o = env.run(&args, b"payload");
            assert_clean_failure(
                &o,
                1,
                &format!("{args:?} on a database overwritten with {what}"),
            );
            assert!(
                stderr(&o).lines().any(|l| l.starts_with("keyhold: ")),
                "{args:?} corrupt store: expected a `keyhold: ` message\n{}",
                show(&o)
            );
            assert!(
                o.stdout.is_empty(),
                "{args:?} corrupt store: expected nothing on stdout"
            );
        }
        env.assert_unchanged(
            &before,
            &format!("commands on a database overwritten with {what} (must not re-create it)"),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 11. purposes, types and names
// ---------------------------------------------------------------------------------------------

#[test]
fn operations_refuse_a_key_of_the_wrong_purpose() {
    let env = Env::init();
    // Neutral names, so a purpose found in the message is not just part of the key's name.
    let ec = env.create_key("k1", "ecdsa-p256", &[]);
    let ed = env.create_key("k2", "ed25519", &[]);
    let aes = env.create_key("k3", "aes-256-gcm", &[]);
    let mac = env.create_key("k4", "hmac-sha256", &[]);
    let rsa_sign = env.create_key("k5", "rsa-2048", &[]);
    let rsa_dec = env.create_key("k6", "rsa-2048", &["--purpose", "decrypt"]);
    let sig_path = env.write("sig", &[0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01]);
    let before = env.snapshot();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["encrypt", "--key", &ec], "sign"),
        (vec!["decrypt", "--key", &ec], "sign"),
        (vec!["mac", "--key", &ed], "sign"),
        (vec!["sign", "--key", &aes], "encrypt"),
        (vec!["mac", "--key", &aes], "encrypt"),
        (
            vec!["verify", "--key", &aes, "--signature", &sig_path],
            "encrypt",
        ),
        (vec!["sign", "--key", &mac], "mac"),
        (vec!["encrypt", "--key", &mac], "mac"),
        (vec!["encrypt", "--key", &rsa_sign], "sign"),
        (vec!["decrypt", "--key", &rsa_sign], "sign"),
        (vec!["sign", "--key", &rsa_dec], "decrypt"),
        (vec!["mac", "--key", &rsa_dec], "decrypt"),
    ];
    for (args, purpose) in cases {
        let o = env.run(&args, b"KHE1 some input that is not empty");
        assert_fail(
            &o,
            1,
            purpose,
            &format!(
                "{args:?}: wrong purpose, expected a message naming the key's purpose `{purpose}`"
            ),
        );
        assert!(o.stdout.is_empty(), "{args:?}: expected nothing on stdout");
    }
    env.assert_unchanged(&before, "wrong-purpose operations");
}

fn listed_names(env: &Env, extra_global: &[&str]) -> Vec<String> {
    let mut args = extra_global.to_vec();
    args.extend(["key", "list"]);
    let out = env.ok(&args, b"", "key list");
    let text = String::from_utf8(out).expect("key list is UTF-8");
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn invalid_type_and_purpose_combinations_are_refused() {
    let env = Env::init();
    let before = env.snapshot();
    for (ty, purpose) in [
        ("ed25519", "decrypt"),
        ("aes-256-gcm", "sign"),
        ("ecdsa-p256", "encrypt"),
        ("hmac-sha256", "sign"),
        ("ecdsa-p384", "mac"),
    ] {
        let o = env.run(
            &["key", "create", "bad", "--type", ty, "--purpose", purpose],
            b"",
        );
        // Not a usage error (exit 2 is for what the command line cannot parse, docs/cli.md):
        // a combination keyhold refuses, exit 1.
        assert_clean_failure(
            &o,
            1,
            &format!("key create --type {ty} --purpose {purpose}"),
        );
        assert!(
            stderr(&o).contains(purpose),
            "{ty}/{purpose}: expected the message to name the refused purpose\n{}",
            show(&o)
        );
    }
    let o = env.run(&["key", "create", "bad", "--type", "foo"], b"");
    assert_fail(
        &o,
        2,
        "foo",
        "key create --type foo: expected a usage error (exit 2)",
    );
    let o = env.run(&["key", "create", "bad"], b"");
    assert_eq!(
        o.status.code(),
        Some(2),
        "key create without --type: expected a usage error (exit 2)\n{}",
        show(&o)
    );
    let o = env.run(&["frobnicate"], b"");
    assert_eq!(
        o.status.code(),
        Some(2),
        "unknown command: expected a usage error (exit 2)\n{}",
        show(&o)
    );
    env.assert_unchanged(&before, "refused key creations");
    assert!(
        listed_names(&env, &[]).is_empty(),
        "expected no key to have been created by refused commands"
    );
}

#[test]
fn duplicate_key_name_is_refused_and_first_key_still_works() {
    let env = Env::init();
    let first = env.create_key("dup", "ecdsa-p256", &[]);
    let before = env.snapshot();
    for ty in ["ecdsa-p256", "hmac-sha256"] {
        let o = env.run(&["key", "create", "dup", "--type", ty], b"");
        assert_fail(&o, 1, "dup", &format!("second key named `dup` ({ty})"));
        assert!(
            o.stdout.is_empty(),
            "duplicate name: expected no ID on stdout"
        );
    }
    env.assert_unchanged(&before, "duplicate name");
    let sig = env.ok(
        &["sign", "--key", &first],
        b"payload",
        "first `dup` key signs",
    );
    let sig_path = env.write("sig", &sig);
    env.ok(
        &["verify", "--key", &first, "--signature", &sig_path],
        b"payload",
        "first `dup` key verifies",
    );
    // The same name in another namespace is fine.
    env.ok(
        &[
            "--namespace",
            "other",
            "key",
            "create",
            "dup",
            "--type",
            "ecdsa-p256",
        ],
        b"",
        "same name, other namespace",
    );
}

#[test]
fn bad_names_and_namespaces_are_refused() {
    let env = Env::init();
    let long65 = "a".repeat(65);
    let before = env.snapshot();
    for name in [
        "../x",
        "",
        long65.as_str(),
        "a/b",
        "a b",
        ".hidden",
        "x\u{e9}",
        "x;y",
        "-dash",
    ] {
        let args = if name.starts_with('-') {
            vec!["key", "create", "--type", "ed25519", "--", name]
        } else {
            vec!["key", "create", name, "--type", "ed25519"]
        };
        let o = env.run(&args, b"");
        assert_clean_failure(&o, 1, &format!("key create with bad name {name:?}"));
        assert!(
            o.stdout.is_empty(),
            "bad name {name:?}: expected no ID on stdout"
        );
    }
    for ns in ["../ns", "", long65.as_str(), "a/b", ".ns"] {
        let o = env.run(
            &["--namespace", ns, "key", "create", "k", "--type", "ed25519"],
            b"",
        );
        assert_clean_failure(&o, 1, &format!("key create in bad namespace {ns:?}"));
    }
    env.assert_unchanged(&before, "bad names");
    assert!(
        listed_names(&env, &[]).is_empty(),
        "expected no key created with a bad name"
    );

    // The edges that are allowed.
    let long64 = "Z".repeat(64);
    for name in ["a", long64.as_str(), "A-z_0.9-x", "0start"] {
        env.create_key(name, "ed25519", &[]);
    }
    env.ok(
        &[
            "--namespace",
            &long64,
            "key",
            "create",
            "k",
            "--type",
            "ed25519",
        ],
        b"",
        "64-char namespace",
    );
}

// ---------------------------------------------------------------------------------------------
// 12. input limits
// ---------------------------------------------------------------------------------------------

#[test]
fn empty_input_is_refused() {
    let env = Env::init();
    let ec = env.create_key("ec", "ecdsa-p256", &[]);
    let aes = env.create_key("aes", "aes-256-gcm", &[]);
    let mac = env.create_key("mac", "hmac-sha256", &[]);
    let sig = env.ok(&["sign", "--key", &ec], b"x", "sign");
    let sig_path = env.write("sig", &sig);
    let tag = env.ok(&["mac", "--key", &mac], b"x", "mac");
    let tag_path = env.write("tag", &tag);
    let empty = env.write("empty", b"");
    let before = env.snapshot();
    for (args, op) in [
        (vec!["sign", "--key", ec.as_str()], "sign"),
        (vec!["encrypt", "--key", aes.as_str()], "encrypt"),
        (vec!["decrypt", "--key", aes.as_str()], "decrypt"),
        (vec!["mac", "--key", mac.as_str()], "mac"),
    ] {
        let o = env.run(&args, b"");
        assert_fail(
            &o,
            1,
            &format!("input is empty: nothing to {op}"),
            &format!("{op} of empty stdin"),
        );
        assert!(
            o.stdout.is_empty(),
            "{op} of empty input: expected nothing on stdout"
        );
        let mut with_file = args.clone();
        with_file.extend(["--in", empty.as_str()]);
        let o = env.run(&with_file, b"");
        assert_fail(
            &o,
            1,
            "input is empty",
            &format!("{op} of an empty --in file"),
        );
    }
    let o = env.run(&["verify", "--key", &ec, "--signature", &sig_path], b"");
    assert_fail(&o, 1, "input is empty", "verify of an empty message");
    let o = env.run(&["mac-verify", "--key", &mac, "--tag", &tag_path], b"");
    assert_fail(&o, 1, "input is empty", "mac-verify of an empty message");
    env.assert_unchanged(&before, "empty inputs");
}

#[test]
fn input_over_64_mib_is_refused() {
    let env = Env::init();
    let ec = env.create_key("ec", "ecdsa-p256", &[]);
    let aes = env.create_key("aes", "aes-256-gcm", &[]);
    let mac = env.create_key("mac", "hmac-sha256", &[]);
    let sig = env.ok(&["sign", "--key", &ec], b"x", "sign");
    let sig_path = env.write("sig", &sig);
    let tag = env.ok(&["mac", "--key", &mac], b"x", "mac");
    let tag_path = env.write("tag", &tag);
    let mut big = vec![0x5au8; LIMIT + 1];
    big[LIMIT] = 0xa5;
    let big_path = env.write("big", &big);
    let before = env.snapshot();
    let cases: Vec<Vec<&str>> = vec![
        vec!["sign", "--key", &ec, "--in", &big_path],
        vec!["encrypt", "--key", &aes, "--in", &big_path],
        vec!["mac", "--key", &mac, "--in", &big_path],
        vec![
            "verify",
            "--key",
            &ec,
            "--signature",
            &sig_path,
            "--in",
            &big_path,
        ],
        vec![
            "mac-verify",
            "--key",
            &mac,
            "--tag",
            &tag_path,
            "--in",
            &big_path,
        ],
    ];
    for args in cases {
        let o = env.run(&args, b"");
        assert_fail(
            &o,
            1,
            "input is larger than the 64 MiB limit",
            &format!("{args:?} with 64 MiB + 1 byte"),
        );
        assert!(
            o.stdout.is_empty(),
            "{args:?} over the limit: expected nothing on stdout"
        );
    }
    // From stdin as well.
    let o = env.run(&["mac", "--key", &mac], &big);
    assert_fail(&o, 1, "64 MiB limit", "mac of 64 MiB + 1 byte on stdin");
    env.assert_unchanged(&before, "oversized inputs");
}

/// docs/cli.md: *every* operation refuses input over 64 MiB, `decrypt` included (kept apart so a
/// different rule for envelopes shows up on its own).
#[test]
fn decrypt_input_over_the_envelope_limit_is_refused() {
    let env = Env::init();
    let aes = env.create_key("aes", "aes-256-gcm", &[]);
    // A genuine envelope's header followed by filler: one byte more than the largest envelope
    // (64 MiB of plaintext + 1 KiB of framing) that decrypt takes.
    let mut big = env.ok(&["encrypt", "--key", &aes], b"x", "encrypt");
    big.resize(LIMIT + 1024 + 1, 0x5a);
    let big_path = env.write("big", &big);
    let before = env.snapshot();
    let o = env.run(&["decrypt", "--key", &aes, "--in", &big_path], b"");
    assert_fail(
        &o,
        1,
        "input is larger than the 64 MiB limit",
        "decrypt with 64 MiB + 1 KiB + 1 byte of input",
    );
    assert!(
        o.stdout.is_empty(),
        "decrypt over the limit: expected nothing on stdout"
    );
    env.assert_unchanged(&before, "oversized decrypt");
}

#[test]
fn input_of_exactly_64_mib_is_accepted() {
    let env = Env::init();
    let ec = env.create_key("ec", "ecdsa-p256", &[]);
    let path = env.write("exact", &vec![0x11u8; LIMIT]);
    let sig_path = env.path_str("sig");
    env.ok(
        &["sign", "--key", &ec, "--in", &path, "--out", &sig_path],
        b"",
        "sign exactly 64 MiB",
    );
    env.ok(
        &[
            "verify",
            "--key",
            &ec,
            "--signature",
            &sig_path,
            "--in",
            &path,
        ],
        b"",
        "verify exactly 64 MiB",
    );
}

// ---------------------------------------------------------------------------------------------
// 13. random
// ---------------------------------------------------------------------------------------------

#[test]
fn random_prints_lowercase_hex_and_checks_bounds() {
    let env = Env::init();
    let hex_of = |n: &str| -> String {
        let out = env.ok(&["random", n], b"", &format!("random {n}"));
        let s = String::from_utf8(out).expect("random output is UTF-8");
        let hex = s
            .strip_suffix('\n')
            .unwrap_or_else(|| panic!("random {n}: expected a trailing newline, got {s:?}"));
        assert!(
            is_lower_hex(hex),
            "random {n}: expected lowercase hex only, got {hex:?}"
        );
        hex.to_owned()
    };
    let a = hex_of("32");
    assert_eq!(a.len(), 64, "random 32: expected 64 hex characters");
    let b = hex_of("32");
    assert_ne!(a, b, "random 32 twice: expected different output");
    assert_eq!(hex_of("1").len(), 2, "random 1: expected 2 hex characters");
    assert_eq!(
        hex_of("65536").len(),
        131072,
        "random 65536: expected 131072 hex characters"
    );
    // Out of range: refused by keyhold (exit 1); not a number: a usage error (exit 2).
    for (n, code) in [("0", 1), ("65537", 1), ("-1", 2), ("abc", 2)] {
        let o = env.run(&["random", n], b"");
        assert_clean_failure(&o, code, &format!("random {n}: expected an error"));
        assert!(o.stdout.is_empty(), "random {n}: expected no output");
    }
}

// ---------------------------------------------------------------------------------------------
// 14. --json
// ---------------------------------------------------------------------------------------------

/// The members of a key object (docs/cli.md, `--json`), sorted.
const KEY_FIELDS: [&str; 14] = [
    "algorithm",
    "attributes",
    "backend",
    "created",
    "fallback",
    "id",
    "locator",
    "name",
    "namespace",
    "purpose",
    "state",
    "store_id",
    "type",
    "version",
];

/// A key object has exactly the documented members, each of its type; its `attributes` are those
/// `key show` lists for the key (`text`: its output).
fn assert_key_object(v: &Json, show_text: &str, ctx: &str) {
    assert_eq!(json_keys(v, ctx), KEY_FIELDS, "{ctx}: the members of {v}");
    // Every member but these three is a string.
    for f in KEY_FIELDS
        .iter()
        .filter(|f| !["attributes", "fallback", "version"].contains(f))
    {
        assert!(v[f].is_string(), "{ctx}: `{f}` is a string in {v}");
    }
    assert!(v["version"].is_u64(), "{ctx}: `version` is a number in {v}");
    let created = v["created"].as_str().unwrap_or_default();
    assert!(
        created.len() == 20
            && created.ends_with('Z')
            && created.as_bytes()[10] == b'T'
            && created
                .bytes()
                .enumerate()
                .all(|(i, b)| matches!(i, 4 | 7 | 10 | 13 | 16 | 19) || b.is_ascii_digit()),
        "{ctx}: `created` is an RFC 3339 UTC time (YYYY-MM-DDTHH:MM:SSZ): {created:?}"
    );
    let attributes = v["attributes"]
        .as_object()
        .unwrap_or_else(|| panic!("{ctx}: `attributes` is an object in {v}"));
    let text: Vec<(String, String)> = match field(show_text, "attributes") {
        "-" => Vec::new(),
        list => list
            .split(", ")
            .map(|a| {
                let (k, v) = a.split_once('=').expect("name=value");
                (k.to_owned(), v.to_owned())
            })
            .collect(),
    };
    let json: Vec<(String, String)> = attributes
        .iter()
        .map(|(k, v)| {
            let v = v
                .as_str()
                .unwrap_or_else(|| panic!("{ctx}: attribute `{k}` is a string in {v}"));
            (k.clone(), v.to_owned())
        })
        .collect();
    assert_eq!(json, text, "{ctx}: the attributes are key show's");
    assert!(
        v["fallback"].is_null(),
        "{ctx}: `fallback` is null for a key made where it was asked for: {v}"
    );
}

#[test]
fn json_outputs_are_json_with_the_documented_fields() {
    let env = Env::new();
    let mut init = vec!["--json"];
    init.extend_from_slice(INIT_ARGS);
    let out = env.ok(&init, b"", "init --json");
    let v = parse_json(&out, "init --json");
    assert_eq!(
        json_keys(&v, "init --json"),
        ["sealer", "store", "store_id"],
        "init --json: {v}"
    );
    assert_eq!(
        v["sealer"].as_str(),
        Some("passphrase"),
        "init --json: expected sealer \"passphrase\""
    );
    assert_eq!(
        v["store"].as_str(),
        Some(env.store_str()),
        "init --json: expected store to be the store directory"
    );
    let store_id = v["store_id"]
        .as_str()
        .expect("store_id is a string")
        .to_owned();

    let out = env.ok(
        &["--json", "key", "create", "jk", "--type", "ecdsa-p256"],
        b"",
        "key create --json",
    );
    let created = parse_json(&out, "key create --json");
    let id = created["id"].as_str().expect("id is a string").to_owned();
    let show_text = env.ok_text(&["key", "show", "--key", &id]);
    assert_key_object(&created, &show_text, "key create --json");
    assert_eq!(
        created["name"].as_str(),
        Some("jk"),
        "key create --json: name"
    );
    assert_eq!(
        created["namespace"].as_str(),
        Some("default"),
        "key create --json: namespace"
    );
    assert_eq!(
        created["type"].as_str(),
        Some("ecdsa-p256"),
        "key create --json: type"
    );
    assert_eq!(
        created["purpose"].as_str(),
        Some("sign"),
        "key create --json: purpose"
    );
    assert_eq!(
        created["backend"].as_str(),
        Some("software"),
        "key create --json: backend"
    );
    assert_eq!(
        created["store_id"].as_str(),
        Some(store_id.as_str()),
        "key create --json: store_id equals init's"
    );

    let out = env.ok(
        &["--json", "key", "show", "--key", &id],
        b"",
        "key show --json",
    );
    let shown = parse_json(&out, "key show --json");
    assert_eq!(
        shown, created,
        "key show --json: expected the same object as key create --json"
    );

    env.create_key("second", "hmac-sha256", &[]);
    let out = env.ok(&["--json", "key", "list"], b"", "key list --json");
    let list = parse_json(&out, "key list --json");
    let Some(items) = list.as_array() else {
        panic!("key list --json: expected an array, got {list:?}")
    };
    let names: Vec<&str> = items.iter().filter_map(|o| o["name"].as_str()).collect();
    assert_eq!(
        names,
        ["jk", "second"],
        "key list --json: expected both keys, sorted by name"
    );
    for item in items {
        let id = item["id"].as_str().expect("id is a string");
        let show_text = env.ok_text(&["key", "show", "--key", id]);
        assert_key_object(item, &show_text, "key list --json");
    }

    // Binary outputs are never wrapped.
    let sig = env.ok(&["--json", "sign", "--key", &id], b"payload", "sign --json");
    assert_eq!(
        sig.first(),
        Some(&0x30),
        "sign --json: expected the raw DER signature, not JSON"
    );
    let sig_path = env.write("sig", &sig);
    let out = env.ok(
        &["--json", "verify", "--key", &id, "--signature", &sig_path],
        b"payload",
        "verify --json",
    );
    assert_eq!(
        parse_json(&out, "verify --json"),
        serde_json::json!({"valid": true}),
        "verify --json: expected {{\"valid\":true}}"
    );

    let mac = env.create_key("m", "hmac-sha256", &[]);
    let tag = env.ok(&["--json", "mac", "--key", &mac], b"payload", "mac --json");
    assert_eq!(tag.len(), 32, "mac --json: expected the raw 32-byte tag");
    let tag_path = env.write("tag", &tag);
    let out = env.ok(
        &["--json", "mac-verify", "--key", &mac, "--tag", &tag_path],
        b"payload",
        "mac-verify --json",
    );
    assert_eq!(
        parse_json(&out, "mac-verify --json"),
        serde_json::json!({"valid": true}),
        "mac-verify --json: expected {{\"valid\":true}}"
    );

    let out = env.ok(&["--json", "random", "16"], b"", "random --json");
    let r = parse_json(&out, "random --json");
    assert_eq!(
        json_keys(&r, "random --json"),
        ["hex"],
        "random --json: {r}"
    );
    let hex = r["hex"]
        .as_str()
        .unwrap_or_else(|| panic!("random --json: expected {{\"hex\": ...}}, got {r:?}"));
    assert!(
        hex.len() == 32 && is_lower_hex(hex),
        "random --json 16: expected 32 lowercase hex chars, got {hex:?}"
    );

    let pem = env.ok(
        &["--json", "key", "pubkey", "--key", &id, "--format", "der"],
        b"",
        "pubkey der --json",
    );
    assert_eq!(
        pem.first(),
        Some(&0x30),
        "pubkey --format der --json: expected raw DER, not JSON"
    );
}

// ---------------------------------------------------------------------------------------------
// 15. list, show, namespaces
// ---------------------------------------------------------------------------------------------

#[test]
fn key_list_is_a_table_sorted_by_name() {
    let env = Env::init();
    let z = env.create_key("zeta", "ed25519", &[]);
    let a = env.create_key("alpha", "aes-256-gcm", &[]);
    let m = env.create_key("mid", "rsa-2048", &["--purpose", "decrypt"]);
    let out = env.ok(&["key", "list"], b"", "key list");
    let text = String::from_utf8(out).expect("UTF-8");
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .expect("a header line")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "TYPE", "PURPOSE", "BACKEND", "STATE", "ID"],
        "key list: expected the documented header"
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    let expected = [
        ("alpha", "aes-256-gcm", "encrypt", &a),
        ("mid", "rsa-2048", "decrypt", &m),
        ("zeta", "ed25519", "sign", &z),
    ];
    assert_eq!(rows.len(), 3, "key list: expected three rows, got:\n{text}");
    for (row, (name, ty, purpose, id)) in rows.iter().zip(expected) {
        assert_eq!(row.len(), 6, "key list: expected 6 columns in {row:?}");
        assert_eq!(
            (row[0], row[1], row[2], row[3], row[5]),
            (name, ty, purpose, "software", id.as_str()),
            "key list row (sorted by name)"
        );
    }
}

#[test]
fn key_show_prints_the_documented_fields() {
    let env = Env::init();
    let id = env.create_key("shown", "ecdsa-p384", &[]);
    let out = env.ok(&["key", "show", "--key", &id], b"", "key show");
    let text = String::from_utf8(out).expect("UTF-8");
    let fields: Vec<(&str, &str)> = text
        .lines()
        .map(|l| {
            l.split_once(": ")
                .unwrap_or_else(|| panic!("key show: expected `field: value` lines, got {l:?}"))
        })
        .collect();
    let names: Vec<&str> = fields.iter().map(|(k, _)| k.trim()).collect();
    assert_eq!(
        names,
        [
            "id",
            "store",
            "namespace",
            "name",
            "type",
            "purpose",
            "algorithm",
            "backend",
            "locator",
            "state",
            "version",
            "created",
            "attributes"
        ],
        "key show: expected the documented fields in order"
    );
    let get = |k: &str| {
        fields
            .iter()
            .find(|(f, _)| f.trim() == k)
            .map(|(_, v)| v.trim())
            .unwrap_or_default()
    };
    assert_eq!(get("id"), id, "key show: id");
    assert_eq!(get("namespace"), "default", "key show: namespace");
    assert_eq!(get("name"), "shown", "key show: name");
    assert_eq!(get("type"), "ecdsa-p384", "key show: type");
    assert_eq!(get("purpose"), "sign", "key show: purpose");
    assert_eq!(
        get("backend"),
        "software (sealed by passphrase)",
        "key show: backend"
    );
    assert_eq!(
        get("attributes"),
        "-",
        "key show: a software key has no attributes"
    );
    assert!(!text.contains(PASS), "key show: expected no passphrase");
}

#[test]
fn namespaces_isolate_listing() {
    let env = Env::init();
    let ida = env.ok(
        &[
            "--namespace",
            "a",
            "key",
            "create",
            "only-in-a",
            "--type",
            "ed25519",
        ],
        b"",
        "create in namespace a",
    );
    let ida = parse_id_line(&ida, "create in a");
    env.ok(
        &[
            "--namespace",
            "b",
            "key",
            "create",
            "only-in-b",
            "--type",
            "ed25519",
        ],
        b"",
        "create in namespace b",
    );
    env.create_key("in-default", "ed25519", &[]);
    assert_eq!(
        listed_names(&env, &["--namespace", "a"]),
        ["only-in-a"],
        "namespace a: expected only its own key"
    );
    assert_eq!(
        listed_names(&env, &["--namespace", "b"]),
        ["only-in-b"],
        "namespace b: expected only its own key"
    );
    assert_eq!(
        listed_names(&env, &[]),
        ["in-default"],
        "default namespace: expected only its own key"
    );
    let o = env.run_with(&["key", "list"], Some(b""), |c| {
        c.env("KEYHOLD_NAMESPACE", "a");
    });
    assert_ok(&o, "key list with KEYHOLD_NAMESPACE=a");
    let names: Vec<String> = stdout_str(&o)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    assert_eq!(
        names,
        ["only-in-a"],
        "KEYHOLD_NAMESPACE=a: expected namespace a's key"
    );
    let out = env.ok(
        &["--namespace", "a", "key", "destroy", "--key", &ida],
        b"",
        "destroy in a",
    );
    assert_eq!(
        String::from_utf8_lossy(&out),
        "destroyed a/only-in-a\n",
        "key destroy: expected `destroyed NS/NAME`"
    );
}

// ---------------------------------------------------------------------------------------------
// 16. What a new user trips over first (issue 8 §4)
// ---------------------------------------------------------------------------------------------

/// The exact message for a name given where an ID goes.
fn not_an_id_message(name: &str) -> String {
    format!("keyhold: `{name}` is not a key ID (IDs start with kh1_): to use a key by name, pass --name {name}\n")
}

#[test]
fn a_name_given_as_key_is_a_usage_error_that_says_to_pass_name() {
    let env = Env::init();
    let id = env.create_key("web-tls", "ecdsa-p256", &[]);
    let before = env.snapshot();
    for args in [
        vec!["key", "show", "--key", "web-tls"],
        vec!["key", "pubkey", "--key", "web-tls"],
        vec!["key", "destroy", "--key", "web-tls"],
        vec!["sign", "--key", "web-tls", "--out", "sig"],
        vec!["mac", "--key", "web-tls", "--out", "tag"],
        vec!["encrypt", "--key", "web-tls", "--out", "env"],
    ] {
        let o = env.run(&args, b"data");
        assert_eq!(
            o.status.code(),
            Some(2),
            "{args:?}: expected exit 2\n{}",
            show(&o)
        );
        assert_eq!(stderr(&o), not_an_id_message("web-tls"), "{args:?}");
        assert!(o.stdout.is_empty(), "{args:?}: expected nothing on stdout");
    }
    // Something that is not a name is checked as an ID.
    let o = env.run(&["key", "show", "--key", "no such/thing"], b"");
    assert_fail(&o, 3, "key ID failed authentication", "a non-name");
    // A modified ID is still an authentication failure (exit 3), not a usage error.
    let mut tampered = id.clone();
    tampered.pop();
    let o = env.run(&["key", "show", "--key", &tampered], b"");
    assert_fail(&o, 3, "key ID failed authentication", "a truncated ID");
    env.assert_unchanged(&before, "names given as --key");
}

#[test]
fn keys_can_be_named_with_name_and_key_id() {
    let env = Env::init();
    let id = env.create_key("web-tls", "ed25519", &[]);
    let mac = env.create_key("session", "hmac-sha256", &[]);
    let other = env.ok(
        &[
            "--namespace",
            "other",
            "key",
            "create",
            "web-tls",
            "--type",
            "ecdsa-p256",
        ],
        b"",
        "create web-tls in namespace other",
    );
    let other = parse_id_line(&other, "create in other");

    // key id NAME prints the ID, resolved in --namespace.
    let out = env.ok(&["key", "id", "web-tls"], b"", "key id web-tls");
    assert_eq!(String::from_utf8_lossy(&out), format!("{id}\n"));
    let out = env.ok(
        &["--namespace", "other", "key", "id", "web-tls"],
        b"",
        "key id in other",
    );
    assert_eq!(String::from_utf8_lossy(&out), format!("{other}\n"));
    let out = env.ok(&["--json", "key", "id", "web-tls"], b"", "key id --json");
    let v = parse_json(&out, "key id --json");
    assert_eq!(v["id"].as_str(), Some(id.as_str()), "key id --json: {v:?}");
    assert_eq!(
        v["namespace"].as_str(),
        Some("default"),
        "key id --json: {v:?}"
    );
    let o = env.run(&["--namespace", "third", "key", "id", "web-tls"], b"");
    assert_fail(
        &o,
        5,
        "there is no key named `web-tls` in namespace `third`",
        "key id elsewhere",
    );
    let o = env.run(&["key", "show", "--name", "nope"], b"");
    assert_fail(
        &o,
        5,
        "there is no key named `nope` in namespace `default`",
        "show --name nope",
    );

    // --name wherever --key is taken; the same results as with the ID.
    let by_id = env.ok(&["key", "show", "--key", &id], b"", "show --key");
    let by_name = env.ok(&["key", "show", "--name", "web-tls"], b"", "show --name");
    assert_eq!(
        by_name, by_id,
        "key show --name: expected the same record as --key"
    );
    assert_eq!(
        env.ok(
            &["key", "pubkey", "--name", "web-tls"],
            b"",
            "pubkey --name"
        ),
        env.ok(&["key", "pubkey", "--key", &id], b"", "pubkey --key")
    );
    for (make, check, flag, name, id) in [
        ("sign", "verify", "--signature", "web-tls", &id),
        ("mac", "mac-verify", "--tag", "session", &mac),
    ] {
        let made = env.ok(&[make, "--name", name, "--out", "-"], b"msg", make);
        let path = env.write("made", &made);
        env.ok(&[check, "--key", id, flag, &path], b"msg", check);
        env.ok(&[check, "--name", name, flag, &path], b"msg", check);
    }
    let aes = env.create_key("files", "aes-256-gcm", &[]);
    let envelope = env.ok(
        &["encrypt", "--name", "files", "--out", "-"],
        b"secret",
        "encrypt --name",
    );
    let plain = env.ok(
        &["decrypt", "--key", &aes, "--out", "-"],
        &envelope,
        "decrypt --key",
    );
    assert_eq!(plain, b"secret");
    let plain = env.ok(
        &["decrypt", "--name", "files", "--out", "-"],
        &envelope,
        "decrypt --name",
    );
    assert_eq!(plain, b"secret");

    // Exactly one of --key and --name.
    let o = env.run(&["key", "show", "--key", &id, "--name", "web-tls"], b"");
    assert_fail(&o, 2, "cannot be used with", "--key and --name");
    let o = env.run(&["key", "show"], b"");
    assert_fail(
        &o,
        2,
        "--key <ID>|--name <NAME>",
        "neither --key nor --name",
    );

    let out = env.ok(
        &[
            "--namespace",
            "other",
            "key",
            "destroy",
            "--name",
            "web-tls",
        ],
        b"",
        "destroy --name",
    );
    assert_eq!(String::from_utf8_lossy(&out), "destroyed other/web-tls\n");
    let o = env.run(&["key", "show", "--key", &other], b"");
    assert_fail(&o, 5, "no such key", "the destroyed key's ID");
    env.ok(
        &["key", "show", "--name", "web-tls"],
        b"",
        "the default namespace's web-tls stays",
    );
}

/// Someone who can write the store swaps two records' names: `--name` finds the record by name,
/// but checks its MAC before using the ID it makes, so the swap is refused, not followed.
#[test]
fn a_name_resolves_only_through_an_authenticated_record() {
    let env = Env::init();
    env.create_key("web-tls", "ed25519", &[]);
    env.create_key("attacker", "ed25519", &[]);
    // An untouched record: with every record failing, the store reads as one whose sealed root
    // was replaced (exit 4), a different refusal.
    env.create_key("bystander", "ed25519", &[]);
    let db = rusqlite::Connection::open(env.database_file()).expect("open the store's database");
    db.execute_batch(
        "UPDATE keys SET name = 'swap' WHERE name = 'web-tls';
         UPDATE keys SET name = 'web-tls' WHERE name = 'attacker';
         UPDATE keys SET name = 'attacker' WHERE name = 'swap';",
    )
    .expect("swap the names");
    drop(db);
    for args in [
        vec!["key", "id", "web-tls"],
        vec!["sign", "--name", "web-tls", "--out", "-"],
        vec!["key", "show", "--name", "web-tls"],
    ] {
        let o = env.run(&args, b"msg");
        assert_fail(
            &o,
            6,
            "integrity check failed: 2 of the store's 3 key records fail their MAC",
            &format!("{args:?}"),
        );
        assert!(
            o.stdout.is_empty(),
            "{args:?}: expected no output\n{}",
            show(&o)
        );
    }
}

#[test]
fn json_errors_verify_results_and_destroyed_state() {
    let env = Env::init();
    let id = env.create_key("signer", "ed25519", &[]);
    let mac = env.create_key("mac", "hmac-sha256", &[]);
    let error_of = |o: &std::process::Output, code: i32, kind: &str, says: &str, ctx: &str| {
        assert_eq!(o.status.code(), Some(code), "{ctx}: exit code\n{}", show(o));
        assert!(
            o.stdout.is_empty(),
            "{ctx}: expected nothing on stdout\n{}",
            show(o)
        );
        let err = stderr(o);
        assert_eq!(
            err.lines().count(),
            1,
            "{ctx}: expected one JSON line on stderr\n{}",
            show(o)
        );
        let v = serde_json::from_str::<Json>(err.trim_end())
            .unwrap_or_else(|e| panic!("{ctx}: not JSON ({e}): {err}"));
        let inner = v
            .get("error")
            .unwrap_or_else(|| panic!("{ctx}: no `error` in {v:?}"));
        assert_eq!(
            inner.get("code"),
            Some(&serde_json::json!(code)),
            "{ctx}: {v:?}"
        );
        assert_eq!(inner["kind"].as_str(), Some(kind), "{ctx}: {v:?}");
        let message = inner["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(says),
            "{ctx}: expected the message to say {says:?}: {v:?}"
        );
    };
    let mut tampered = id.clone();
    tampered.pop();
    error_of(
        &env.run(&["--json", "key", "show", "--key", &tampered], b""),
        3,
        "key_id_authentication",
        "key ID failed authentication",
        "tampered ID",
    );
    error_of(
        &env.run(&["--json", "key", "show", "--key", "signer"], b""),
        2,
        "usage",
        "pass --name signer",
        "a name as --key",
    );
    error_of(
        &env.run(&["--json", "key", "show", "--bogus"], b""),
        2,
        "usage",
        "unexpected argument '--bogus'",
        "clap's usage error",
    );
    error_of(
        &env.run(&["--json", "key", "show", "--name", "gone"], b""),
        5,
        "no_such_key",
        "no key named `gone`",
        "unknown name",
    );
    error_of(
        &env.run(&["--json", "mac", "--key", &id, "--out", "-"], b"m"),
        1,
        "wrong_purpose",
        "cannot",
        "wrong purpose",
    );
    error_of(
        &env.run_with(&["--json", "key", "list"], Some(b""), |c| {
            c.env("KEYHOLD_PASSPHRASE", "wrong");
        }),
        4,
        "unseal",
        "cannot unseal",
        "wrong passphrase",
    );

    // verify / mac-verify: {"valid":false} on stdout and exit 1, nothing on stderr; without
    // --json the text message.
    for (make, check, flag, key, text) in [
        ("sign", "verify", "--signature", &id, "signature invalid"),
        ("mac", "mac-verify", "--tag", &mac, "tag invalid"),
    ] {
        let made = env.ok(&[make, "--key", key, "--out", "-"], b"signed", make);
        let path = env.write("made", &made);
        let o = env.run(&["--json", check, "--key", key, flag, &path], b"other");
        assert_eq!(
            o.status.code(),
            Some(1),
            "{check} --json, invalid\n{}",
            show(&o)
        );
        assert_eq!(
            parse_json(&o.stdout, check),
            serde_json::json!({"valid": false}),
            "{check} --json, invalid"
        );
        assert!(
            o.stderr.is_empty(),
            "{check} --json, invalid: stderr\n{}",
            show(&o)
        );
        let o = env.run(&[check, "--key", key, flag, &path], b"other");
        assert_fail(&o, 1, text, &format!("{check} (text), invalid"));
        let o = env.run(&["--json", check, "--key", key, flag, &path], b"signed");
        assert_ok(&o, &format!("{check} --json, valid"));
        assert_eq!(
            parse_json(&o.stdout, check),
            serde_json::json!({"valid": true}),
            "{check} --json, valid"
        );
    }

    let out = env.ok(
        &["--json", "key", "destroy", "--key", &id],
        b"",
        "destroy --json",
    );
    let v = parse_json(&out, "destroy --json");
    assert_eq!(
        v["state"].as_str(),
        Some("destroyed"),
        "destroy --json: {v:?}"
    );
    assert_eq!(v["name"].as_str(), Some("signer"), "destroy --json: {v:?}");
}

#[test]
fn binary_output_to_a_terminal_is_refused_unless_out_is_given() {
    let env = Env::init();
    let sig = env.create_key("sig", "ed25519", &[]);
    let mac = env.create_key("mac", "hmac-sha256", &[]);
    let aes = env.create_key("aes", "aes-256-gcm", &[]);
    let msg = env.write("msg", b"to the terminal");
    let envelope = env.ok(
        &["encrypt", "--key", &aes, "--in", &msg, "--out", "-"],
        b"",
        "encrypt",
    );
    let env_path = env.write("envelope", &envelope);
    let before = env.snapshot();
    for (args, what) in [
        (vec!["sign", "--key", &sig, "--in", &msg], "signature"),
        (vec!["mac", "--key", &mac, "--in", &msg], "tag"),
        (vec!["encrypt", "--key", &aes, "--in", &msg], "envelope"),
        (
            vec!["decrypt", "--key", &aes, "--in", &env_path],
            "plaintext",
        ),
        (
            vec!["key", "pubkey", "--key", &sig, "--format", "der"],
            "DER public key",
        ),
    ] {
        let o = env.on_terminal(&args);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{args:?} on a terminal\n{}",
            show(&o)
        );
        let text = stdout_str(&o);
        assert!(
            text.contains(&format!(
                "keyhold: refusing to write the {what} (binary) to a terminal: pass --out FILE"
            )),
            "{args:?}: {text}"
        );
        // With --out - the user says stdout is meant.
        let mut insist = args.clone();
        insist.extend(["--out", "-"]);
        let o = env.on_terminal(&insist);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{insist:?} on a terminal\n{}",
            show(&o)
        );
    }
    // Text encodings are not binary.
    let o = env.on_terminal(&["mac", "--key", &mac, "--in", &msg, "--encoding", "hex"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "mac --encoding hex on a terminal\n{}",
        show(&o)
    );
    let o = env.on_terminal(&["key", "pubkey", "--key", &sig]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "pubkey PEM on a terminal\n{}",
        show(&o)
    );
    env.assert_unchanged(&before, "refused terminal output");
}

#[test]
fn sign_and_mac_encodings_and_dash_for_stdin_and_stdout() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let env = Env::init();
    // Ed25519 and HMAC are deterministic: every encoding holds the same bytes.
    for (ty, op, check, check_flag) in [
        ("ed25519", "sign", "verify", "--signature"),
        ("hmac-sha256", "mac", "mac-verify", "--tag"),
    ] {
        let id = env.create_key(ty, ty, &[]);
        let msg = env.write("msg", b"encoded");
        let raw = env.ok(&[op, "--key", &id, "--in", &msg], b"", &format!("{op} raw"));
        let hex = env.ok(
            &[op, "--key", &id, "--in", "-", "--encoding", "hex"],
            b"encoded",
            &format!("{op} hex"),
        );
        let hex = String::from_utf8(hex).expect("hex is text");
        assert_eq!(
            hex,
            format!("{}\n", keyhold::hex::encode(&raw)),
            "{op} --encoding hex"
        );
        let base64 = env.ok(
            &[op, "--key", &id, "--encoding", "base64", "--out", "-"],
            b"encoded",
            &format!("{op} base64"),
        );
        assert_eq!(
            String::from_utf8_lossy(&base64),
            format!("{}\n", b64.encode(&raw)),
            "{op} --encoding base64"
        );
        let out_file = env.path_str("encoded.out");
        env.ok(
            &[
                op,
                "--key",
                &id,
                "--in",
                &msg,
                "--encoding",
                "base64",
                "--out",
                &out_file,
            ],
            b"",
            "--out FILE",
        );
        assert_eq!(std::fs::read(&out_file).expect("read --out"), base64);

        // Verified in each encoding, from a file or from stdin (`-`, the message then from --in).
        for (encoding, bytes) in [
            ("raw", raw.clone()),
            ("hex", hex.clone().into_bytes()),
            ("base64", base64.clone()),
        ] {
            let file = env.write("check", &bytes);
            env.ok(
                &[
                    check,
                    "--key",
                    &id,
                    check_flag,
                    &file,
                    "--encoding",
                    encoding,
                ],
                b"encoded",
                &format!("{check} {encoding}"),
            );
            env.ok(
                &[
                    check,
                    "--key",
                    &id,
                    check_flag,
                    "-",
                    "--in",
                    &msg,
                    "--encoding",
                    encoding,
                ],
                &bytes,
                &format!("{check} {encoding} from stdin"),
            );
            let o = env.run(
                &[
                    check,
                    "--key",
                    &id,
                    check_flag,
                    &file,
                    "--encoding",
                    encoding,
                ],
                b"changed",
            );
            assert_eq!(
                o.status.code(),
                Some(1),
                "{check} {encoding}, changed message\n{}",
                show(&o)
            );
        }
        let o = env.run(&[check, "--key", &id, check_flag, "-"], &raw);
        assert_fail(
            &o,
            2,
            "cannot both come from stdin: pass --in FILE",
            "both on stdin",
        );
        let not_hex = env.write("nothex", b"zz\n");
        let o = env.run(
            &[
                check,
                "--key",
                &id,
                check_flag,
                &not_hex,
                "--encoding",
                "hex",
            ],
            b"encoded",
        );
        assert_fail(&o, 1, "is not hex (--encoding hex)", "not hex");
    }
}

/// The message for a backend the configuration lacks says which file was read.
fn assert_read_from(o: &std::process::Output, path: &std::path::Path) {
    let says = format!("configuration read from {} (looked for: ", path.display());
    assert!(stderr(o).contains(&says), "expected {says:?}\n{}", show(o));
}

#[test]
fn configuration_file_default_locations_and_where_they_were_looked_for() {
    let env = Env::init();
    let home = env.dir.path();
    let xdg = home.join("xdg");
    let write = |path: &std::path::Path, text: &str| {
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        std::fs::write(path, text).expect("write a config");
    };
    let bad = "[software]\nkey_cache_secs = \"soon\"\n";
    let good = "[software]\nkey_cache_secs = 0\n";
    let home_config = home.join(".config/keyhold/config.toml");
    let xdg_config = xdg.join("keyhold/config.toml");
    let env_config = home.join("env.toml");
    let flag_config = home.join("flag.toml");
    let run = |extra: &[&str], xdg_set: bool, env_set: bool| {
        let mut args = extra.to_vec();
        args.extend(["key", "create", "k", "--type", "ed25519"]);
        args.extend(["--backend", "hsm"]);
        env.run_with(&args, Some(b""), |c| {
            if xdg_set {
                c.env("XDG_CONFIG_HOME", &xdg);
            }
            if env_set {
                c.env("KEYHOLD_CONFIG", &env_config);
            }
        })
    };
    // No file anywhere: the message lists every place looked at.
    let o = run(&[], false, false);
    assert_fail(&o, 1, "no backend named `hsm`", "no configuration");
    let expected = format!(
        "no configuration file was found, so only the built-in `software` backend exists (looked \
         for: --config (not given), $KEYHOLD_CONFIG (unset), {}, /etc/keyhold/config.toml)",
        home_config.display()
    );
    assert!(
        stderr(&o).contains(&expected),
        "expected {expected:?}\n{}",
        show(&o)
    );

    // ~/.config/keyhold/config.toml is read when XDG_CONFIG_HOME is unset.
    write(&home_config, good);
    assert_read_from(&run(&[], false, false), &home_config);
    write(&home_config, bad);
    let o = run(&[], false, false);
    assert_fail(
        &o,
        1,
        &format!("{}: line 2, column 18", home_config.display()),
        "~/.config read",
    );
    // $XDG_CONFIG_HOME/keyhold/config.toml replaces ~/.config.
    write(&xdg_config, good);
    assert_read_from(&run(&[], true, false), &xdg_config);
    // $KEYHOLD_CONFIG comes before both, and must exist.
    let o = run(&[], true, true);
    assert_fail(
        &o,
        1,
        &format!("cannot read {}", env_config.display()),
        "$KEYHOLD_CONFIG missing",
    );
    write(&env_config, good);
    let o = run(&[], true, true);
    assert!(
        stderr(&o).contains(&format!(
            "configuration read from {} (looked for: $KEYHOLD_CONFIG={})",
            env_config.display(),
            env_config.display()
        )),
        "{}",
        show(&o)
    );
    // --config comes before everything.
    write(&flag_config, bad);
    let flag = flag_config.to_str().expect("UTF-8 path");
    let o = run(&["--config", flag], true, true);
    assert_fail(
        &o,
        1,
        &format!("{flag}: line 2, column 18"),
        "--config read",
    );
}

/// A SoftHSM2 token that cannot make RSA decryption keys (SoftHSM 2.6 has no OAEP-SHA256), with
/// `fallback = "software"`: the key is made in software, and every output says so.
#[test]
#[cfg(feature = "pkcs11")]
fn a_fallback_to_software_is_warned_reported_in_json_and_marked_in_list() {
    use keyhold::testing::SoftHsm;
    let hsm = SoftHsm::new().expect("a SoftHSM2 token");
    let env = Env::init();
    let config = env.write(
        "keyhold.toml",
        format!(
            "[backends.hsm]\ntype = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"{}\"\n\
             pin_env = \"KH_TEST_PIN\"\nfallback = \"software\"\n",
            keyhold::testing::SOFTHSM_MODULE,
            hsm.label()
        )
        .as_bytes(),
    );
    let conf_file = SoftHsm::conf_file().expect("SOFTHSM2_CONF");
    let run = |args: &[&str], adjust: &dyn Fn(&mut std::process::Command)| {
        let mut all = vec!["--config", config.as_str()];
        all.extend_from_slice(args);
        env.run_with(&all, Some(b""), |c| {
            c.env("SOFTHSM2_CONF", &conf_file)
                .env("KH_TEST_PIN", keyhold::testing::TEST_USER_PIN);
            adjust(c);
        })
    };
    // `key create NAME` of a type the token lacks, after `global` options.
    let create_dec = |global: &[&str], name: &str, adjust: &dyn Fn(&mut std::process::Command)| {
        let mut args = global.to_vec();
        args.extend([
            "key",
            "create",
            name,
            "--type",
            "rsa-2048",
            "--purpose",
            "decrypt",
        ]);
        args.extend(["--backend", "hsm"]);
        run(&args, adjust)
    };
    let o = create_dec(&[], "dec", &|_| {});
    assert_ok(&o, "create with a fallback");
    let id = parse_id_line(&o.stdout, "create with a fallback");
    let warning: Vec<String> = stderr(&o).lines().map(str::to_owned).collect();
    assert_eq!(warning.len(), 1, "expected one warning line\n{}", show(&o));
    assert!(
        warning[0].contains("WARN")
            && warning[0].contains("backend `hsm` cannot make rsa-2048 keys for decrypt (")
            && warning[0].contains("OAEP")
            && warning[0].contains("key `default/dec` was created in the software backend instead"),
        "{}",
        show(&o)
    );

    // --json says so, with the reason.
    let o = create_dec(&["--json"], "dec2", &|_| {});
    assert_ok(&o, "create --json with a fallback");
    let v = parse_json(&o.stdout, "create --json");
    assert_eq!(v["backend"].as_str(), Some("software"), "{v:?}");
    let fallback = v
        .get("fallback")
        .unwrap_or_else(|| panic!("no `fallback` in {v:?}"));
    assert_eq!(fallback["for"].as_str(), Some("hsm"), "{v:?}");
    assert!(
        fallback["reason"]
            .as_str()
            .is_some_and(|r| r.contains("OAEP")),
        "{v:?}"
    );

    // key list marks it; a key the token made is not marked.
    let o = run(
        &[
            "key",
            "create",
            "sig",
            "--type",
            "ecdsa-p256",
            "--backend",
            "hsm",
        ],
        &|_| {},
    );
    assert_ok(&o, "a token key");
    assert!(o.stderr.is_empty(), "no fallback, no warning\n{}", show(&o));
    let o = run(&["key", "list"], &|_| {});
    assert_ok(&o, "key list");
    let rows: Vec<Vec<String>> = stdout_str(&o)
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    let backend_of = |name: &str| {
        rows.iter()
            .find(|r| r[0] == name)
            .map(|r| r[3].clone())
            .unwrap_or_else(|| panic!("no row {name} in\n{}", stdout_str(&o)))
    };
    assert_eq!(backend_of("dec"), "software(fallback:hsm)");
    assert_eq!(backend_of("sig"), "hsm");
    assert!(
        rows.iter().all(|r| r.len() == 6),
        "six columns\n{}",
        stdout_str(&o)
    );
    // Without the configuration, using the token's key says where the configuration was looked
    // for.
    let o = env.run(&["sign", "--name", "sig", "--out", "-"], b"msg");
    assert_fail(
        &o,
        1,
        "no backend named `hsm`",
        "a token key without the configuration",
    );
    assert!(
        stderr(&o).contains(
            "no configuration file was found, so only the built-in `software` \
             backend exists (looked for: --config (not given), $KEYHOLD_CONFIG (unset), "
        ),
        "{}",
        show(&o)
    );
    // key show --json carries `fallback` too, and every attribute, sorted.
    let o = run(&["--json", "key", "show", "--key", &id], &|_| {});
    let v = parse_json(&o.stdout, "show --json");
    assert_eq!(
        v.get("fallback").and_then(|f| f["for"].as_str()),
        Some("hsm"),
        "{v:?}"
    );
    // …with the reason, recorded at creation (not re-derived from today's token).
    assert!(
        v.get("fallback")
            .and_then(|f| f["reason"].as_str())
            .is_some_and(|r| r.contains("OAEP")),
        "{v:?}"
    );
    let o = run(&["key", "show", "--name", "sig"], &|_| {});
    let text = stdout_str(&o);
    let attributes = text
        .lines()
        .find_map(|l| l.strip_prefix("attributes: "))
        .unwrap_or_else(|| panic!("no attributes line in\n{text}"));
    let names: Vec<&str> = attributes
        .split(", ")
        .filter_map(|a| a.split_once('='))
        .map(|(k, _)| k)
        .collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert!(
        names.len() >= 2 && names == sorted,
        "attributes sorted: {attributes}"
    );
    let o = run(&["--json", "key", "show", "--name", "sig"], &|_| {});
    let v = parse_json(&o.stdout, "show --json");
    let Some(members) = v.get("attributes").and_then(|a| a.as_object()) else {
        panic!("attributes object in {v:?}")
    };
    let json_names: Vec<&str> = members.keys().map(String::as_str).collect();
    assert_eq!(json_names, names, "the JSON attributes are the text's");
    // serde_json's map sorts its keys: the order keyhold wrote them in is read from the text.
    let text = stdout_str(&o);
    let at: Vec<usize> = names
        .iter()
        .map(|n| {
            text.find(&format!("\"{n}\":"))
                .unwrap_or_else(|| panic!("no {n:?} in {text}"))
        })
        .collect();
    assert!(
        at.windows(2).all(|w| w[0] < w[1]),
        "the JSON attributes are in the text's order: {text}"
    );

    // Logging: RUST_LOG=off and -q silence the warning; -v adds info lines.
    let o = create_dec(&[], "dec3", &|c| {
        c.env("RUST_LOG", "off");
    });
    assert_ok(&o, "RUST_LOG=off");
    assert!(
        o.stderr.is_empty(),
        "RUST_LOG=off: expected nothing on stderr\n{}",
        show(&o)
    );
    let o = create_dec(&["-q"], "dec4", &|_| {});
    assert_ok(&o, "-q");
    assert!(
        o.stderr.is_empty(),
        "-q: expected nothing on stderr\n{}",
        show(&o)
    );
    let o = run(&["-q", "key", "show", "--key", "dec"], &|_| {});
    assert_fail(&o, 2, "is not a key ID", "-q keeps errors");
    let o = create_dec(&["-v"], "dec5", &|c| {
        c.env("RUST_LOG", "off");
    });
    assert_ok(&o, "-v");
    assert!(
        stderr(&o).contains(" INFO "),
        "-v: expected info lines (over RUST_LOG=off)\n{}",
        show(&o)
    );
}

#[test]
fn out_files_are_private_and_never_follow_links() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::init();
    let aes = env.create_key("aes", "aes-256-gcm", &[]);
    let envelope = env.ok(&["encrypt", "--key", &aes], b"top secret", "encrypt");
    let env_path = env.write("envelope", &envelope);
    // An existing world-readable file becomes owner-only when plaintext is written into it.
    let out = env.path_str("plain.txt");
    std::fs::write(&out, b"old").unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644)).unwrap();
    env.ok(
        &["decrypt", "--key", &aes, "--in", &env_path, "--out", &out],
        b"",
        "decrypt",
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"top secret");
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "decrypt --out: expected an owner-only file");
    // A symbolic link planted at --out is not followed.
    let target = env.path_str("elsewhere");
    let link = env.path_str("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let o = env.run(
        &["decrypt", "--key", &aes, "--in", &env_path, "--out", &link],
        b"",
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "decrypt --out onto a symlink must fail"
    );
    assert!(
        !std::path::Path::new(&target).exists(),
        "the link's target was written"
    );
}
