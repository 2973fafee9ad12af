//! The CLI contract of docs/cli.md, against the real binary in temp stores: `encrypt` / `decrypt`: AES-256-GCM and RSA-OAEP envelopes, their layout, tampering, and openssl interop.
//!
//! Each test builds its own store (Argon2 at the documented minimum, 19 MiB / 2 iterations)
//! through the shared harness (tests/support/env.rs), drives `keyhold` as a subprocess, and checks
//! exit codes, stdout formats and stderr messages exactly; failures must leave the store
//! byte-for-byte unchanged.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use support::env::*;

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
