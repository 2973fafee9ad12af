//! The canary (issue 10): every command, error paths included, runs at `RUST_LOG=trace` on a store
//! with software keys and keys in a SoftHSM2 token whose PIN is known, with a known passphrase and
//! plaintext; the root secret and the software keys' material are learnt from the store (test
//! builds only: `keyhold::testing::reveal_software_key`). None of them — raw, hex in either case,
//! decimal bytes, base64 or base64url at any alignment — appears in any command's stdout (but
//! `decrypt`'s, which is the plaintext) or stderr, nor in the audit log, nor, but the sealed copies
//! the database holds, anywhere in the store directory.
#![cfg(feature = "pkcs11")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::process::{Command, Output};

use keyhold::testing::{reveal_software_key, SOFTHSM_MODULE};
use support::env::*;

const PIN: &str = "canary-token-pin-Qx7-not-a-secret";
const WRONG_PIN: &str = "canary-token-pin-Qx8-close-to-it";
const WRONG_PASS: &str = "canary-wrong-passphrase-Tr0ub4dor-4";
const PLAINTEXT: &[u8] = b"canary plaintext: the vault opens with 8675309-zebra-quasar";
const NEW_PASS: &str = "canary-new-passphrase-Wx3-ocelot-drift";
const RESTORED_PASS: &str = "canary-restored-passphrase-Jq9-tundra";

/// One command's run, kept to be searched once every secret is known.
struct Ran {
    line: String,
    out: Output,
    /// `decrypt`'s stdout is the plaintext by design.
    plaintext_out: bool,
    /// `recovery split`'s stdout is the recovery shares by design.
    shares_out: bool,
}

struct Canary {
    env: Env,
    ran: Vec<Ran>,
}

impl Canary {
    /// Runs keyhold with `args`, expecting exit `code`.
    fn run(&mut self, args: &[&str], stdin: &[u8], code: i32) -> Output {
        self.run_vars(&[], args, stdin, code)
    }

    fn run_vars(
        &mut self,
        vars: &[(&str, &str)],
        args: &[&str],
        stdin: &[u8],
        code: i32,
    ) -> Output {
        let out = self.env.run_with(args, Some(stdin), |cmd: &mut Command| {
            cmd.envs(vars.iter().copied());
        });
        let line = args.join(" ");
        assert_eq!(out.status.code(), Some(code), "{line}\n{}", show(&out));
        self.ran.push(Ran {
            line,
            plaintext_out: args.first() == Some(&"decrypt") && code == 0,
            shares_out: args.starts_with(&["recovery", "split"]) && code == 0,
            out: out.clone(),
        });
        out
    }

    fn ok(&mut self, args: &[&str], stdin: &[u8]) -> Vec<u8> {
        self.run(args, stdin, 0).stdout
    }

    fn create(&mut self, name: &str, ty: &str, extra: &[&str]) -> String {
        let mut args = vec!["key", "create", name, "--type", ty];
        args.extend_from_slice(extra);
        let out = self.run(&args, b"", 0);
        parse_id_line(&out.stdout, "key create")
    }
}

#[test]
fn no_secret_reaches_any_output_log_or_the_audit_log() {
    let hsm = softhsm_with_pin(PIN);
    let env = Env::new()
        .with_softhsm(SOFTHSM_MODULE, hsm.label(), PIN, "")
        .with_var("RUST_LOG", "trace")
        .with_secret(PIN)
        .with_secret(WRONG_PIN)
        .with_secret(WRONG_PASS)
        .with_secret(NEW_PASS)
        .with_secret(RESTORED_PASS);
    let mut c = Canary {
        env,
        ran: Vec::new(),
    };
    let plain = PLAINTEXT;

    // The store, and a wrong passphrase.
    c.run(INIT_ARGS, b"", 0);
    c.run(INIT_ARGS, b"", 1);
    c.run_vars(
        &[("KEYHOLD_PASSPHRASE", WRONG_PASS)],
        &["key", "list"],
        b"",
        4,
    );

    // Keys of every kind, in software and in the token; bad creations.
    let signer = c.create("signer", "ed25519", &[]);
    let ec = c.create("ec", "ecdsa-p256", &["--rotate-after", "90d"]);
    let aes = c.create("aes", "aes-256-gcm", &[]);
    let mac = c.create("mac", "hmac-sha256", &[]);
    let rsa = c.create("rsa", "rsa-2048", &["--purpose", "decrypt"]);
    let later = c.create(
        "later",
        "aes-256-gcm",
        &["--activate-at", "+1h", "--deactivate-at", "+2h"],
    );
    let hsm_signer = c.create("hsm-signer", "ecdsa-p256", &["--backend", "hsm"]);
    let hsm_aes = c.create("hsm-aes", "aes-256-gcm", &["--backend", "hsm"]);
    // Version 1's material, learnt now (the keys rotate below).
    let mut first_versions = Vec::new();
    for (name, id) in [("aes", &aes), ("mac", &mac)] {
        let revealed = reveal_software_key(&c.env.store, PASS, id).unwrap();
        first_versions.push((
            format!("{name}'s version 1"),
            revealed.material.expose().to_vec(),
        ));
    }
    c.run(&["key", "create", "aes", "--type", "aes-256-gcm"], b"", 1);
    c.run(&["key", "create", "bad", "--type", "des"], b"", 2);
    c.run(
        &[
            "key",
            "create",
            "bad",
            "--type",
            "ed25519",
            "--rotate-after",
            "soon",
        ],
        b"",
        1,
    );
    c.run_vars(
        &[("KH_TEST_PIN", WRONG_PIN)],
        &[
            "key",
            "create",
            "nope",
            "--type",
            "ecdsa-p256",
            "--backend",
            "hsm",
        ],
        b"",
        7,
    );

    // Listing and showing.
    for args in [
        vec!["key", "list"],
        vec!["key", "list", "--all"],
        vec!["--json", "key", "list"],
        vec!["key", "show", "--key", &signer],
        vec!["--json", "key", "show", "--key", &hsm_aes],
        vec!["key", "id", "aes"],
        vec!["key", "pubkey", "--key", &ec],
        vec!["key", "pubkey", "--key", &rsa, "--format", "jwk"],
        vec![
            "key",
            "pubkey",
            "--key",
            &hsm_signer,
            "--format",
            "der",
            "--out",
            "-",
        ],
        vec!["key", "history", "--key", &aes],
        vec!["--json", "key", "history", "--key", &aes],
        vec!["random", "32"],
        vec!["doctor"],
        vec!["maintain"],
    ] {
        c.ok(&args, b"");
    }
    c.run(&["key", "show", "--key", "kh1_AAAA"], b"", 3);
    c.run(&["key", "id", "nobody"], b"", 5);
    c.run(&["key", "pubkey", "--key", &aes], b"", 1);

    // Every operation, good and bad, on software and token keys.
    let sign_then_verify = |c: &mut Canary, id: &str| {
        let sig = c.ok(&["sign", "--key", id], plain);
        let sig_file = c.env.write("sig", &sig);
        c.ok(&["verify", "--key", id, "--signature", &sig_file], plain);
        c.run(
            &["verify", "--key", id, "--signature", &sig_file],
            b"another message",
            1,
        );
        c.ok(&["--json", "sign", "--key", id], plain);
    };
    sign_then_verify(&mut c, &signer);
    sign_then_verify(&mut c, &ec);
    sign_then_verify(&mut c, &hsm_signer);
    let seal_then_open = |c: &mut Canary, id: &str| -> Vec<u8> {
        let envelope = c.ok(&["encrypt", "--key", id, "--aad", "ctx"], plain);
        assert_eq!(
            c.ok(&["decrypt", "--key", id, "--aad", "ctx"], &envelope),
            plain
        );
        c.run(&["decrypt", "--key", id, "--aad", "other"], &envelope, 1);
        envelope
    };
    let envelope = seal_then_open(&mut c, &aes);
    seal_then_open(&mut c, &rsa);
    let hsm_envelope = seal_then_open(&mut c, &hsm_aes);
    let tag = c.ok(&["mac", "--key", &mac], plain);
    let tag_file = c.env.write("tag", &tag);
    c.ok(&["mac-verify", "--key", &mac, "--tag", &tag_file], plain);
    c.run(
        &["mac-verify", "--key", &mac, "--tag", &tag_file],
        b"other",
        1,
    );
    c.ok(
        &["--json", "mac", "--key", &mac, "--encoding", "hex"],
        plain,
    );
    c.run(&["sign", "--key", &aes], plain, 1);
    c.run(&["encrypt", "--key", &later], plain, 9);
    c.run(&["sign", "--key", &signer], b"", 1);
    c.run_vars(
        &[("KH_TEST_PIN", WRONG_PIN)],
        &["sign", "--key", &hsm_signer],
        plain,
        7,
    );

    // The lifecycle: rotation (the new versions' material is looked for too), rewrap, states,
    // policy, destruction scheduled, cancelled and done.
    for id in [&aes, &mac, &signer, &hsm_aes, &hsm_signer] {
        c.ok(&["key", "rotate", "--key", id, "--reason", "canary"], b"");
    }
    let rewrapped = c.ok(&["rewrap", "--key", &aes, "--aad", "ctx"], &envelope);
    assert_eq!(
        c.ok(&["decrypt", "--key", &aes, "--aad", "ctx"], &rewrapped),
        plain
    );
    c.ok(
        &["rewrap", "--key", &hsm_aes, "--aad", "ctx"],
        &hsm_envelope,
    );
    c.ok(&["key", "suspend", "--key", &mac, "--reason", "audit"], b"");
    c.run(&["mac", "--key", &mac], plain, 9);
    c.ok(&["mac-verify", "--key", &mac, "--tag", &tag_file], plain);
    c.run(&["key", "suspend", "--key", &mac], b"", 9);
    c.ok(&["key", "resume", "--key", &mac], b"");
    c.ok(
        &["key", "set", "--key", &aes, "--min-decrypt-version", "2"],
        b"",
    );
    c.run(&["decrypt", "--key", &aes, "--aad", "ctx"], &envelope, 9);
    c.run(
        &["key", "set", "--key", &aes, "--min-decrypt-version", "7"],
        b"",
        1,
    );
    c.ok(
        &[
            "key",
            "set",
            "--key",
            &ec,
            "--rotate-after",
            "never",
            "--deactivate-at",
            "+30d",
        ],
        b"",
    );
    c.ok(
        &["key", "compromise", "--key", &ec, "--reason", "canary"],
        b"",
    );
    let sig_file = c.env.path_str("sig");
    c.run(
        &["verify", "--key", &ec, "--signature", &sig_file],
        plain,
        9,
    );
    c.ok(&["key", "deactivate", "--key", &signer], b"");
    c.ok(
        &["key", "destroy", "--key", &hsm_signer, "--after", "7d"],
        b"",
    );
    c.run(&["sign", "--key", &hsm_signer], plain, 9);
    c.ok(&["key", "cancel-destroy", "--key", &hsm_signer], b"");
    c.run(&["key", "cancel-destroy", "--key", &hsm_signer], b"", 1);
    c.run(&["key", "destroy", "--key", &rsa, "--now"], b"", 2);

    // Now every secret is known: the root, the software keys' current material (the versions
    // rotated to) and their version 1's, learnt before the rotation.
    let store = c.env.store.clone();
    let mut secrets: Vec<(String, Vec<u8>)> = vec![
        ("passphrase".into(), PASS.as_bytes().to_vec()),
        ("token PIN".into(), PIN.as_bytes().to_vec()),
        ("wrong token PIN".into(), WRONG_PIN.as_bytes().to_vec()),
        ("wrong passphrase".into(), WRONG_PASS.as_bytes().to_vec()),
        ("plaintext".into(), PLAINTEXT.to_vec()),
    ];
    secrets.extend(first_versions);
    for (name, id) in [
        ("aes", &aes),
        ("mac", &mac),
        ("later", &later),
        ("rsa", &rsa),
    ] {
        let revealed = reveal_software_key(&store, PASS, id).unwrap();
        if secrets.iter().all(|(n, _)| n != "root secret") {
            secrets.push(("root secret".into(), revealed.root.expose().to_vec()));
        }
        secrets.push((format!("{name}'s key"), revealed.material.expose().to_vec()));
    }
    // The revealed material is the real key: HMAC with it is what keyhold computes.
    let mac_key = &secrets.iter().find(|(n, _)| n == "mac's key").unwrap().1;
    let expected = aws_lc_rs::hmac::sign(
        &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, mac_key),
        plain,
    );
    assert_eq!(c.ok(&["mac", "--key", &mac], plain), expected.as_ref());
    // The destruction, after the secrets of the key are known; and the audit log.
    c.ok(&["key", "destroy", "--key", &rsa, "--now", "--yes"], b"");
    c.run(&["decrypt", "--key", &rsa], b"x", 9);
    c.ok(&["audit", "verify"], b"");
    c.ok(&["audit", "show", "--key", &aes], b"");
    c.ok(&["--json", "audit", "show", "--since", "+0s"], b"");

    // Changing the seal and break-glass recovery: a new passphrase, shares split from it, a
    // mistyped share refused, then two shares restore the store to another passphrase. `split`
    // prints the shares by design; they are looked for in every other output and in the store.
    let cheap = ["--argon2-memory-mib", "19", "--argon2-iterations", "2"];
    let reseal = [&["reseal", "--to", "passphrase"][..], &cheap].concat();
    c.run_vars(&[("KEYHOLD_NEW_PASSPHRASE", NEW_PASS)], &reseal, b"", 0);
    let new_pass = [("KEYHOLD_PASSPHRASE", NEW_PASS)];
    let split = ["recovery", "split", "--shares", "3", "--threshold", "2"];
    let out = c.run_vars(&new_pass, &split, b"", 0);
    let shares: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    assert_eq!(shares.len(), 3);
    c.run_vars(&new_pass, &[&["--json"][..], &split].concat(), b"", 0);
    let typo = shares[1].replacen("khs1-", "khs1-0", 1);
    fn restore<'a>(file: &'a str, cheap: &[&'a str]) -> Vec<&'a str> {
        [
            &[
                "recovery",
                "restore",
                "--to",
                "passphrase",
                "--shares-file",
                file,
            ][..],
            cheap,
        ]
        .concat()
    }
    let bad = c
        .env
        .write("bad-shares", format!("{}\n{typo}\n", shares[0]).as_bytes());
    let restored = [("KEYHOLD_NEW_PASSPHRASE", RESTORED_PASS)];
    c.run_vars(&restored, &restore(&bad, &cheap), b"", 1);
    let good = c.env.write(
        "shares",
        format!("{}\n{}\n", shares[0], shares[2]).as_bytes(),
    );
    c.run_vars(&restored, &restore(&good, &cheap), b"", 0);
    c.run_vars(
        &[("KEYHOLD_PASSPHRASE", RESTORED_PASS)],
        &["key", "list"],
        b"",
        0,
    );
    std::fs::remove_file(&bad).unwrap();
    std::fs::remove_file(&good).unwrap();
    secrets.push(("new passphrase".into(), NEW_PASS.as_bytes().to_vec()));
    secrets.push((
        "restored passphrase".into(),
        RESTORED_PASS.as_bytes().to_vec(),
    ));
    for (i, share) in shares.iter().enumerate() {
        secrets.push((format!("share {}", i + 1), share.as_bytes().to_vec()));
    }

    // The logs were really on, down to debug (every key use logs one line there).
    let debug_lines = c
        .ran
        .iter()
        .filter(|r| String::from_utf8_lossy(&r.out.stderr).contains(" DEBUG "))
        .count();
    assert!(
        debug_lines > 20,
        "only {debug_lines} commands logged at debug level: RUST_LOG=trace did not reach them"
    );
    for ran in &c.ran {
        for (name, secret) in &secrets {
            if let Some(form) = holds_secret(&ran.out.stderr, secret) {
                panic!(
                    "`{}`: the {name} is in its stderr ({form})\n{}",
                    ran.line,
                    show(&ran.out)
                );
            }
            let plaintext_by_design = ran.plaintext_out && name == "plaintext";
            let share_by_design = ran.shares_out && name.starts_with("share ");
            if !plaintext_by_design && !share_by_design {
                if let Some(form) = holds_secret(&ran.out.stdout, secret) {
                    panic!(
                        "`{}`: the {name} is in its stdout ({form})\n{}",
                        ran.line,
                        show(&ran.out)
                    );
                }
            }
        }
    }
    // The store directory: the audit log holds none; the database holds keys only sealed.
    for entry in std::fs::read_dir(&store).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        for (name, secret) in &secrets {
            if let Some(form) = holds_secret(&bytes, secret) {
                panic!("{} holds the {name} ({form})", path.display());
            }
        }
    }
    assert!(
        c.ran.len() > 80,
        "the canary ran only {} commands",
        c.ran.len()
    );
}
