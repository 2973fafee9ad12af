//! `keyhold recovery split` and `keyhold recovery restore` (docs/cli.md, "Break-glass recovery"):
//! the real binary, a TPM-sealed store on a real swtpm whose TPM is then thrown away, and every
//! refusal of bad shares on a passphrase store, each leaving the store as it was.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use support::env::*;

/// The passphrase a store is restored under.
const RESTORED: &str = "restored passphrase: amber-falcon-5521";

/// The shares `recovery split` printed: every line that is not a `#` comment.
fn shares_of(stdout: &[u8]) -> Vec<String> {
    let text = std::str::from_utf8(stdout).unwrap();
    let shares: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    assert!(
        shares.iter().all(|s| s.starts_with("khs1-")),
        "split prints comment lines and shares only:\n{text}"
    );
    shares
}

/// A shares file holding `shares`, one per line.
fn shares_file(env: &Env, name: &str, shares: &[&String]) -> String {
    let text: String = shares.iter().map(|s| format!("{s}\n")).collect();
    env.write(name, text.as_bytes())
}

/// `recovery restore --to passphrase` at the cheapest Argon2 cost, with `--shares-file FILE` if
/// given (else the shares are asked for on the terminal).
fn restore_args(file: Option<&str>) -> Vec<&str> {
    let mut args = vec!["recovery", "restore", "--to", "passphrase"];
    args.extend_from_slice(&INIT_ARGS[3..]);
    if let Some(file) = file {
        args.extend(["--shares-file", file]);
    }
    args
}

const NEW_PASS: [(&str, &str); 1] = [("KEYHOLD_NEW_PASSPHRASE", RESTORED)];

/// The use case: a TPM-sealed store (swtpm) is split 3 ways with threshold 2; the TPM is
/// then thrown away (the swtpm and its state deleted) and a fresh one stands in its place, so the
/// store no longer opens (exit 4: another TPM). Two of the three shares restore it to a
/// passphrase: its software keys verify what they signed and decrypt what they encrypted, sign
/// again, and keep their IDs; the shares appear in no output but split's.
#[cfg(feature = "tpm")]
#[test]
fn a_tpm_store_whose_tpm_is_gone_is_restored_from_two_of_three_shares() {
    use keyhold::testing::Swtpm;
    let config = |tpm: &Swtpm| {
        format!(
            "[backends.tpm]\ntype = \"tpm\"\ntcti = \"{}\"\nfallback = \"software\"\n",
            tpm.tcti()
        )
    };
    let tpm = Swtpm::new().unwrap();
    let env = Env::new()
        .with_config(&config(&tpm))
        .without_passphrase()
        .with_var("TSS2_LOG", "all+none")
        .with_secret(RESTORED);
    let tpm_stated = [("KEYHOLD_SEALER", "tpm")];
    env.ok_vars(&tpm_stated, &["init", "--sealer", "tpm"]);
    let create = |name: &str, ty: &str| {
        let (out, _) = env.ok_vars(&tpm_stated, &["key", "create", name, "--type", ty]);
        parse_id_line(&out, name)
    };
    let signer = create("signer", "ecdsa-p256");
    let aes = create("data", "aes-256-gcm");
    let msg = env.write("msg", b"signed while the TPM was alive");
    let plain = env.write("plain", b"encrypted while the TPM was alive");
    let (sig, envelope) = (env.path_str("sig"), env.path_str("envelope"));
    env.ok_vars(
        &tpm_stated,
        &["sign", "--key", &signer, "--in", &msg, "--out", &sig],
    );
    env.ok_vars(
        &tpm_stated,
        &["encrypt", "--key", &aes, "--in", &plain, "--out", &envelope],
    );
    let (listed, _) = env.ok_vars(&tpm_stated, &["--json", "key", "list"]);

    let (out, err) = env.ok_vars(
        &tpm_stated,
        &["recovery", "split", "--shares", "3", "--threshold", "2"],
    );
    assert_eq!(err, "", "split logs nothing");
    let shares = shares_of(&out);
    assert_eq!(shares.len(), 3);

    // The TPM dies: its state is gone, and a fresh TPM answers at the configured address.
    drop(tpm);
    let fresh = Swtpm::new().unwrap();
    env.set_config(&config(&fresh));
    let before = env.snapshot();
    env.refused(&tpm_stated, &["key", "list"], 4);
    env.assert_unchanged(&before, "a store whose TPM is gone");

    let file = shares_file(&env, "two-of-three", &[&shares[0], &shares[2]]);
    let out = env.run_vars(&NEW_PASS, &restore_args(Some(&file)));
    assert_ok(&out, "recovery restore");
    assert_eq!(
        stdout_str(&out),
        format!(
            "restored keyhold store {} from 2 recovery shares: sealed by passphrase\n",
            env.store_str()
        )
    );
    for share in &shares {
        assert!(
            !stderr(&out).contains(share.as_str()),
            "a share in restore's stderr\n{}",
            show(&out)
        );
    }

    let restored = [("KEYHOLD_PASSPHRASE", RESTORED)];
    let (out, _) = env.ok_vars(
        &restored,
        &[
            "verify",
            "--key",
            &signer,
            "--signature",
            &sig,
            "--in",
            &msg,
        ],
    );
    assert_eq!(out, b"signature valid\n");
    let (back, _) = env.ok_vars(
        &restored,
        &["decrypt", "--key", &aes, "--in", &envelope, "--out", "-"],
    );
    assert_eq!(back, b"encrypted while the TPM was alive");
    env.ok_vars(
        &restored,
        &["sign", "--key", &signer, "--in", &msg, "--out", "-"],
    );
    let (relisted, _) = env.ok_vars(&restored, &["--json", "key", "list"]);
    assert_eq!(relisted, listed, "the keys and their IDs are unchanged");
    // The store is the passphrase's now: the old TPM seal is gone, not kept beside it.
    env.refused(&tpm_stated, &["key", "list"], 4);
}

/// A passphrase store, its key and three shares (threshold 2) of it, and three of another store.
struct Split {
    env: Env,
    shares: Vec<String>,
    others: Vec<String>,
}

fn split_store() -> Split {
    let env = Env::init().with_secret(RESTORED);
    env.create_key("signer", "ed25519", &[]);
    let args = ["recovery", "split", "--shares", "3", "--threshold", "2"];
    let shares = shares_of(&env.ok(&args, b"", "recovery split"));
    let other = Env::init();
    let others = shares_of(&other.ok(&args, b"", "recovery split (another store)"));
    Split {
        env,
        shares,
        others,
    }
}

/// Every bad set of shares is refused with its own message and exit code, naming the share at
/// fault, and leaves the store byte for byte as it was, opening with its old passphrase:
/// one share of a threshold of 2 (exit 1); a share with one digit changed (exit 1, `share 2 is
/// mistyped`); a share of another store (exit 1, `share 2 belongs to another store`); the same
/// share twice (exit 1, `share 2 is share 1 again`); and well-formed shares of this store (right
/// store prefix, split ID and checksum) of a root secret that is not the store's, made with the
/// library's own splitter: they combine, but the store does not verify under the result (exit 4).
#[test]
fn bad_shares_are_refused_and_change_nothing() {
    let Split {
        env,
        shares,
        others,
    } = split_store();
    let before = env.snapshot();
    let refuse = |name: &str, set: &[&String], code: i32, needle: &str| {
        let file = shares_file(&env, name, set);
        let err = env.refused(&NEW_PASS, &restore_args(Some(&file)), code);
        assert!(err.contains(needle), "{name}: {err}");
        env.assert_unchanged(&before, name);
    };
    refuse(
        "one",
        &[&shares[1]],
        1,
        "1 share given, but these shares need 2 to rebuild the root secret",
    );
    let at = shares[1].len() - 12;
    let digit = if &shares[1][at..=at] == "0" { "1" } else { "0" };
    let typo = format!("{}{digit}{}", &shares[1][..at], &shares[1][at + 1..]);
    refuse(
        "typo",
        &[&shares[0], &typo],
        1,
        "share 2 is mistyped: its checksum does not match",
    );
    refuse(
        "other store",
        &[&shares[0], &others[1]],
        1,
        "share 2 belongs to another store",
    );
    refuse(
        "twice",
        &[&shares[2], &shares[2]],
        1,
        "share 2 is share 3 again (the same share as share 1)",
    );

    let store_id: [u8; 16] = keyhold::store::Store::open(&env.store)
        .unwrap()
        .meta()
        .store_id;
    let wrong_root = keyhold::sealer::RootSecret::generate().unwrap();
    let forged = keyhold::sealer::shares::split(&wrong_root, &store_id, 2, 2).unwrap();
    let forged: Vec<String> = forged.iter().map(|s| s.encode().to_string()).collect();
    refuse(
        "well-formed, wrong root",
        &[&forged[0], &forged[1]],
        4,
        "the recovery shares do not rebuild this store's root secret",
    );

    env.ok_text(&["key", "list"]);
}

/// `split --json` prints `{"store_id","threshold","shares"}`; any two of its three shares (here
/// the last two, from the JSON) restore the store to a new passphrase, after which the old one is
/// refused; `--threshold` above `--shares` is a usage error (exit 2).
#[test]
fn split_json_and_restore_to_a_new_passphrase() {
    let env = Env::init().with_secret(RESTORED);
    let id = env.create_key("signer", "ed25519", &[]);
    let out = env.run(
        &["recovery", "split", "--shares", "2", "--threshold", "3"],
        b"",
    );
    assert_fail(
        &out,
        2,
        "--threshold 3 is more than --shares 2",
        "threshold > shares",
    );
    let out = env.ok(
        &[
            "--json",
            "recovery",
            "split",
            "--shares",
            "3",
            "--threshold",
            "2",
        ],
        b"",
        "recovery split --json",
    );
    let json = parse_json(&out, "split --json");
    assert_eq!(
        json_keys(&json, "split"),
        ["shares", "store_id", "threshold"]
    );
    assert_eq!(json["threshold"], 2);
    let shares: Vec<String> = json["shares"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(shares.len(), 3);
    let file = shares_file(&env, "shares", &[&shares[1], &shares[2]]);
    env.ok_vars(&NEW_PASS, &restore_args(Some(&file)));
    let err = env.refused(&[], &["key", "list"], 4);
    assert!(err.contains("wrong passphrase"), "{err}");
    let (out, _) = env.ok_vars(
        &[("KEYHOLD_PASSPHRASE", RESTORED)],
        &["key", "id", "signer"],
    );
    assert_eq!(String::from_utf8(out).unwrap(), format!("{id}\n"));
}

/// Shares typed on a terminal (no `--shares-file`) are asked for one at a time, echo off, until
/// the first share's threshold is reached: a mistyped first share is refused at once, naming it
/// (exit 1, store unchanged); two good ones restore the store. No share shows on the terminal.
#[test]
fn shares_typed_on_a_terminal_restore_the_store() {
    use support::pty::converse;
    let Split { env, shares, .. } = split_store();
    let before = env.snapshot();
    let args = restore_args(None);
    let typo = shares[2].replacen("-", "-f", 2).replacen("-f", "-", 1);
    assert_ne!(typo, shares[2]);
    let (code, shown) = converse(&env, &NEW_PASS, &args, &[("recovery share 1: ", &typo)]);
    assert_eq!(code, Some(1), "{shown}");
    assert!(shown.contains("keyhold: share 1 "), "{shown}");
    env.assert_unchanged(&before, "a mistyped share");

    let dialogue = [
        ("recovery share 1: ", shares[2].as_str()),
        ("recovery share 2: ", shares[0].as_str()),
    ];
    let (code, shown) = converse(&env, &NEW_PASS, &args, &dialogue);
    assert_eq!(code, Some(0), "{shown}");
    assert!(
        shown.contains("from 2 recovery shares: sealed by passphrase"),
        "{shown}"
    );
    for share in &shares {
        assert!(!shown.contains(share.as_str()), "a share shows:\n{shown}");
    }
    env.ok_vars(&[("KEYHOLD_PASSPHRASE", RESTORED)], &["key", "list"]);
}
