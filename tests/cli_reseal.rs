//! `keyhold reseal` with its options (`--no-pcrs`, `--pcrs LIST`, `--json`) and `init --pcrs …
//! --no-recovery`'s warning, on a real swtpm (docs/cli.md, "The TPM sealer"). tests/cli_tpm.rs
//! checks the plain `reseal` after a PCR change (its line and WARN) and its refusals.
#![cfg(feature = "tpm")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use keyhold::backend::tpm::device::DeviceSettings;
use keyhold::testing::Swtpm;
use support::claims::*;
use support::env::*;

/// The recovery passphrase of the PCR-bound stores here.
const RECOVERY: &str = "cli reseal recovery passphrase";

/// A fresh swtpm and an Env on a store sealed by it (not yet made).
fn setup() -> (Swtpm, Env) {
    let tpm = Swtpm::new().unwrap();
    let env = tpm_env(Env::new(), &tpm.tcti(), "fallback = \"software\"").with_secret(RECOVERY);
    (tpm, env)
}

/// Extends PCR `pcr` between keyhold runs (swtpm serves one connection at a time).
fn extend_pcr(tpm: &Swtpm, pcr: u8) {
    keyhold::backend::tpm::device(&tpm.tcti(), DeviceSettings::default())
        .unwrap()
        .extend_pcr(pcr, b"an intended firmware change")
        .unwrap();
}

/// `reseal`'s documented line: `re-sealed keyhold store DIR to the TPM: PCRs OLD → NEW`.
fn resealed(env: &Env, old: &str, new: &str) -> String {
    format!(
        "re-sealed keyhold store {} to the TPM: PCRs {old} → {new}\n",
        env.store_str()
    )
}

/// `reseal --json`'s object: exactly `store`, `sealer`, `old_pcrs`, `pcrs`, the lists arrays of
/// numbers (empty for none).
fn assert_reseal_json(env: &Env, stdout: &[u8], old: &[u8], new: &[u8]) {
    let text = std::str::from_utf8(stdout).unwrap();
    assert_eq!(text.lines().count(), 1, "one line: {text}");
    let json = parse_json(stdout, "reseal --json");
    assert_eq!(
        json_keys(&json, "reseal --json"),
        ["old_pcrs", "pcrs", "sealer", "store"],
        "{json}"
    );
    assert_eq!(
        json,
        serde_json::json!({
            "store": env.store_str(),
            "sealer": "tpm",
            "old_pcrs": old,
            "pcrs": new,
        })
    );
    for list in ["old_pcrs", "pcrs"] {
        assert!(
            json[list].as_array().unwrap().iter().all(|n| n.is_u64()),
            "{list}: numbers: {json}"
        );
    }
}

/// A store sealed to PCR 8 with a recovery passphrase is re-bound three ways, each checked by
/// what the TPM then does:
/// - `reseal --no-pcrs` (the PCRs unchanged, so the TPM unseals and no passphrase is asked for,
///   and none is available: run with no terminal) prints `PCRs 8 → none`; after PCR 8 changes
///   the store still opens;
/// - `reseal --pcrs 8,7,8 --json` (sorted, duplicates dropped, as at `init`) prints `old_pcrs` []
///   and `pcrs` [7,8]; after PCR 7 changes the store is refused (exit 4) naming `PCRs 7,8`;
/// - `reseal --json` then needs the recovery passphrase (WARN line), which `--no-pcrs` kept, and
///   re-binds to the old seal's PCRs, [7,8] → [7,8].
///
/// Keys and envelopes made before stay valid throughout; `--pcrs` with `--no-pcrs` is a usage
/// error.
#[test]
fn reseal_no_pcrs_pcrs_list_and_json_rebind_the_store() {
    let (tpm, env) = setup();
    // Here even in remote mode: PCR 8 changes behind keyhold's back, and a service started
    // before has the store unsealed already (it does not unseal again until restarted).
    let env = env.local_only("PCRs change under a running service");
    let mut init = vec!["init", "--sealer", "tpm", "--pcrs", "8"];
    init.extend_from_slice(&INIT_ARGS[3..]);
    env.ok_vars(&[("KEYHOLD_PASSPHRASE", RECOVERY)], &init);
    let aes = env.create_key("data", "aes-256-gcm", &["--backend", "tpm"]);
    let envelope = env.ok(
        &["encrypt", "--key", &aes],
        b"kept across reseals",
        "encrypt",
    );
    let decrypts = |ctx: &str| {
        assert_eq!(
            env.ok(&["decrypt", "--key", &aes], &envelope, ctx),
            b"kept across reseals"
        );
    };

    let before = env.snapshot();
    let out = env.run(&["reseal", "--no-pcrs", "--pcrs", "7"], b"");
    assert_fail(&out, 2, "cannot be used with", "reseal --no-pcrs --pcrs 7");
    env.assert_unchanged(&before, "a refused reseal");

    let out = env.detached(&["reseal", "--no-pcrs"], |_| {});
    assert_ok(&out, "reseal --no-pcrs");
    assert_eq!(stdout_str(&out), resealed(&env, "8", "none"));
    assert_eq!(stderr(&out), "", "the TPM unsealed: no recovery, no WARN");
    extend_pcr(&tpm, 8);
    decrypts("bound to no PCRs, PCR 8 changed");

    let (out, err) = env.ok_vars(&[], &["--json", "reseal", "--pcrs", "8,7,8"]);
    assert_reseal_json(&env, &out, &[], &[7, 8]);
    assert_eq!(err, "");
    decrypts("bound to PCRs 7,8, unchanged");
    extend_pcr(&tpm, 7);
    let err = env.refused(&[], &["decrypt", "--key", &aes], 4);
    assert!(
        err.contains("PCRs 7,8 no longer hold the values they had when it was sealed"),
        "{err}"
    );

    let (out, err) = env.ok_vars(&[("KEYHOLD_PASSPHRASE", RECOVERY)], &["--json", "reseal"]);
    assert_reseal_json(&env, &out, &[7, 8], &[7, 8]);
    let warnings: Vec<&str> = err.lines().collect();
    assert_eq!(warnings.len(), 1, "one WARN line:\n{err}");
    assert!(
        warnings[0].contains(" WARN the TPM refused to unseal the root secret: PCRs 7,8 ")
            && warnings[0].ends_with(": unsealing with the recovery passphrase"),
        "{err}"
    );
    decrypts("re-sealed with the recovery passphrase");
}

/// docs/cli.md: `--no-recovery` (with `--pcrs`) asks for no recovery passphrase, and "a warning
/// on stderr says that the store and its software keys are lost if those PCRs change for good";
/// it is a log line, so `-q` silences it. And so it is: after PCR 8 changes the store is refused
/// (exit 4) with the documented no-recovery message, and `reseal` cannot help (exit 4).
#[test]
fn init_no_recovery_warns_that_the_store_is_lost_with_its_pcrs() {
    let (tpm, env) = setup();
    // Here even in remote mode: PCR 8 changes behind keyhold's back, and a service started
    // before has the store unsealed already (it does not unseal again until restarted).
    let env = env.local_only("PCRs change under a running service");
    let init = ["init", "--sealer", "tpm", "--pcrs", "8", "--no-recovery"];
    // No passphrase anywhere and no terminal: init must not ask for one.
    let out = env.detached(&init, |_| {});
    assert_ok(&out, "init --no-recovery");
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one WARN line:\n{err}");
    let (stamp, warning) = lines[0]
        .split_once("  WARN ")
        .unwrap_or_else(|| panic!("{err}"));
    assert!(stamp.ends_with('Z'), "a timestamp first: {err}");
    assert_eq!(
        warning,
        "sealed to PCRs without a recovery passphrase: if those PCRs change for good, the store \
         and its software keys are lost"
    );
    // -q: the same init on another store prints nothing on stderr.
    let quiet = tpm_env(Env::new(), &tpm.tcti(), "");
    let out = quiet.detached(&[&["-q"][..], &init].concat(), |_| {});
    assert_ok(&out, "init -q --no-recovery");
    assert_eq!(stderr(&out), "", "-q silences the warning");

    env.ok_text(&["key", "list"]);
    extend_pcr(&tpm, 8);
    let before = env.snapshot();
    let err = env.refused(&[], &["key", "list"], 4);
    assert!(
        err.contains(
            "PCRs 8 no longer hold the values they had when it was sealed (firmware, boot loader \
             or configuration changed): this store has no recovery passphrase, so its keys cannot \
             be recovered; restore the PCR values"
        ),
        "{err}"
    );
    let err = env.refused(&[("KEYHOLD_PASSPHRASE", RECOVERY)], &["reseal"], 4);
    assert!(
        err.contains("this store has no recovery passphrase"),
        "{err}"
    );
    env.assert_unchanged(&before, "refused commands");
}

/// The store's passphrases in the `reseal --to` tests: each distinctive, so a leak shows.
const SECOND: &str = "second passphrase: mauve-lantern-7731";
const THIRD: &str = "third passphrase: quiet-harbour-0408";

/// A message, an ed25519 signature and an AES-GCM envelope made before a reseal, checked after.
struct Before {
    signer: String,
    aes: String,
    signature: String,
    envelope: Vec<u8>,
    ids: String,
}

const SIGNED: &[u8] = b"signed before the reseal";
const SEALED: &[u8] = b"encrypted before the reseal";

/// Keys and what they made, in the Env's store (opened with `vars`).
fn before_reseal(env: &Env, vars: &[(&str, &str)]) -> Before {
    let create = |name: &str, ty: &str| {
        let (out, _) = env.ok_vars(vars, &["key", "create", name, "--type", ty]);
        parse_id_line(&out, name)
    };
    let signer = create("signer", "ed25519");
    let aes = create("data", "aes-256-gcm");
    let msg = env.write("signed", SIGNED);
    let plain = env.write("plain", SEALED);
    let signature = env.path_str("signature");
    env.ok_vars(
        vars,
        &["sign", "--key", &signer, "--in", &msg, "--out", &signature],
    );
    let envelope = env.path_str("envelope");
    env.ok_vars(
        vars,
        &["encrypt", "--key", &aes, "--in", &plain, "--out", &envelope],
    );
    let ids = String::from_utf8(env.ok_vars(vars, &["--json", "key", "list"]).0).unwrap();
    Before {
        envelope: std::fs::read(&envelope).unwrap(),
        signer,
        aes,
        signature,
        ids,
    }
}

/// The signature still verifies, the envelope still decrypts, the keys and their IDs are the
/// same (`key list --json` byte for byte), and the keys still work (opened with `vars`).
fn still_valid(env: &Env, vars: &[(&str, &str)], b: &Before, ctx: &str) {
    let msg = env.path_str("signed");
    let (out, _) = env.ok_vars(
        vars,
        &[
            "verify",
            "--key",
            &b.signer,
            "--signature",
            &b.signature,
            "--in",
            &msg,
        ],
    );
    assert_eq!(stdout_str_of(&out), "signature valid\n", "{ctx}: verify");
    let envelope = env.write("envelope-copy", &b.envelope);
    let (plain, _) = env.ok_vars(
        vars,
        &["decrypt", "--key", &b.aes, "--in", &envelope, "--out", "-"],
    );
    assert_eq!(plain, SEALED, "{ctx}: decrypt");
    let (ids, _) = env.ok_vars(vars, &["--json", "key", "list"]);
    assert_eq!(stdout_str_of(&ids), b.ids, "{ctx}: the keys and their IDs");
    env.ok_vars(
        vars,
        &["sign", "--key", &b.signer, "--in", &msg, "--out", "-"],
    );
}

fn stdout_str_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `reseal --to`'s line: `re-sealed keyhold store DIR: OLD → NEW`.
fn moved(env: &Env, old: &str, new: &str) -> String {
    format!(
        "re-sealed keyhold store {}: {old} → {new}\n",
        env.store_str()
    )
}

/// The sealer parameters the store records (its metadata, as keyhold reads it).
#[cfg(feature = "pkcs11")]
fn seal_params(env: &Env) -> (String, serde_json::Value) {
    let store = keyhold::store::Store::open(&env.store).unwrap();
    let sealed = &store.meta().sealed_root;
    (
        sealed.sealer.clone(),
        serde_json::from_slice(&sealed.params).unwrap(),
    )
}

/// One store moved through every sealer and back, each step checked by what then opens it and by
/// the keys made at the start (signature verifies, envelope decrypts, IDs unchanged):
/// - passphrase → passphrase with a new passphrase (`KEYHOLD_NEW_PASSPHRASE`) and a new Argon2
///   cost (recorded: 20 MiB, 3 passes, 2 lanes): the old passphrase is refused after (exit 4,
///   `wrong passphrase`), while a copy of the store made before still opens with it (README:
///   a passphrase change does not revoke old copies);
/// - passphrase → tpm (swtpm): a warning says how to state the new sealer; stated as
///   passphrase, the store is refused (exit 4, it records a `tpm` seal);
/// - tpm → pkcs11 (SoftHSM2), `--json` (`{"store","old_sealer","sealer"}`);
/// - pkcs11 → passphrase with `--new-passphrase-file`: the old seal's token key is left in the
///   token, which `doctor` lists as an orphan (exit 8) and `--remove-orphan` removes; the store
///   then opens with the new passphrase and no TPM.
#[cfg(feature = "pkcs11")]
#[test]
fn reseal_to_moves_a_store_through_every_sealer_keeping_its_keys() {
    let tpm = Swtpm::new().unwrap();
    let hsm = keyhold::testing::SoftHsm::new().unwrap();
    let tpm_table = format!(
        "[backends.tpm]\ntype = \"tpm\"\ntcti = \"{}\"\n",
        tpm.tcti()
    );
    let env = Env::new()
        .with_softhsm(
            keyhold::testing::SOFTHSM_MODULE,
            hsm.label(),
            keyhold::testing::TEST_USER_PIN,
            &tpm_table,
        )
        .with_var("TSS2_LOG", "all+none")
        .with_secret(SECOND)
        .with_secret(THIRD);
    env.init_store();
    let first = [("KEYHOLD_PASSPHRASE", PASS)];
    let b = before_reseal(&env, &first);
    // A copy of the store as it is now, sealed under the first passphrase.
    let copy = env.file("old-copy");
    std::fs::create_dir(&copy).unwrap();
    for (name, bytes) in env.snapshot() {
        std::fs::write(copy.join(name), bytes).unwrap();
    }

    // passphrase → passphrase: a new passphrase and a new Argon2 cost.
    let (out, err) = env.ok_vars(
        &[("KEYHOLD_NEW_PASSPHRASE", SECOND)],
        &[
            "reseal",
            "--to",
            "passphrase",
            "--argon2-memory-mib",
            "20",
            "--argon2-iterations",
            "3",
            "--argon2-parallelism",
            "2",
        ],
    );
    assert_eq!(stdout_str_of(&out), moved(&env, "passphrase", "passphrase"));
    assert_eq!(err, "", "the stated sealer is still right: no warning");
    let (kind, params) = seal_params(&env);
    assert_eq!(kind, "passphrase");
    assert_eq!(
        (
            &params["memory_kib"],
            &params["iterations"],
            &params["parallelism"]
        ),
        (
            &serde_json::json!(20 * 1024),
            &serde_json::json!(3),
            &serde_json::json!(2)
        ),
        "{params}"
    );
    let err = env.refused(&first, &["key", "list"], 4);
    assert!(
        err.contains("wrong passphrase"),
        "the old passphrase: {err}"
    );
    let second = [("KEYHOLD_PASSPHRASE", SECOND)];
    still_valid(&env, &second, &b, "new passphrase");
    // README's threat model: the change does not revoke the copy made before it: its seal still
    // gives the root secret to the old passphrase (here keyhold refuses to open it, exit 10: the
    // store's anchor knows the copy is older; elsewhere nothing stops a tool of one's own).
    let mut old_copy = env.bare_command();
    old_copy
        .arg("--store")
        .arg(&copy)
        .args(["key", "id", "signer"])
        .env("KEYHOLD_PASSPHRASE", PASS);
    let out = env.run_cmd(old_copy, None);
    assert_eq!(out.status.code(), Some(10), "the copy on this machine");
    let meta = keyhold::store::Store::open(&copy).unwrap().meta().clone();
    keyhold::Sealer::unseal(
        &keyhold::PassphraseSealer::new(PASS.to_owned().into()),
        &meta.sealed_root,
        &meta.store_id,
    )
    .expect("the old passphrase unseals the copy's root secret");

    // passphrase → tpm.
    let (out, err) = env.ok_vars(&second, &["reseal", "--to", "tpm"]);
    assert_eq!(stdout_str_of(&out), moved(&env, "passphrase", "tpm"));
    assert!(
        err.contains("to open this store, state its sealer: set KEYHOLD_SEALER=tpm"),
        "{err}"
    );
    let err = env.refused(&second, &["key", "list"], 4);
    assert!(err.contains("the store records a `tpm` seal"), "{err}");
    let tpm_stated = [("KEYHOLD_SEALER", "tpm")];
    still_valid(&env, &tpm_stated, &b, "sealed by the TPM");

    // tpm → pkcs11, as JSON.
    let (out, err) = env.ok_vars(
        &tpm_stated,
        &["--json", "reseal", "--to", "pkcs11", "--backend", "hsm"],
    );
    assert_eq!(
        parse_json(&out, "reseal --to --json"),
        serde_json::json!({"store": env.store_str(), "old_sealer": "tpm", "sealer": "pkcs11"})
    );
    assert!(err.contains("KEYHOLD_SEALER=pkcs11"), "{err}");
    assert_eq!(seal_params(&env).0, "pkcs11");
    env.refused(&tpm_stated, &["key", "list"], 4);
    let token_stated = [("KEYHOLD_SEALER", "pkcs11")];
    still_valid(&env, &token_stated, &b, "sealed by the token");

    // pkcs11 → passphrase, the new one from a file; then neither token nor TPM is needed.
    let file = env.write("third", format!("{THIRD}\n").as_bytes());
    let (out, _) = env.ok_vars(
        &token_stated,
        &[
            "reseal",
            "--to",
            "passphrase",
            "--new-passphrase-file",
            &file,
        ],
    );
    assert_eq!(stdout_str_of(&out), moved(&env, "pkcs11", "passphrase"));
    let third = [("KEYHOLD_PASSPHRASE", THIRD)];
    // docs/cli.md: the old seal's token key is left in the token (a copy of the store made
    // before still opens with it); doctor lists it as an orphan (exit 8) and removes it on demand.
    let out = env.run_vars(&third, &["--json", "doctor"]);
    assert_eq!(out.status.code(), Some(8), "{}", show(&out));
    let orphans = parse_json(&out.stdout, "doctor --json")["orphans"].clone();
    let orphans = orphans.as_array().unwrap();
    assert_eq!(orphans.len(), 1, "{orphans:?}");
    assert!(
        orphans[0]["label"]
            .as_str()
            .unwrap()
            .starts_with("keyhold-root-secret/"),
        "{orphans:?}"
    );
    let target = format!("hsm:{}", orphans[0]["locator"].as_str().unwrap());
    env.ok_vars(&third, &["doctor", "--remove-orphan", &target]);
    still_valid(&env, &third, &b, "back to a passphrase");
    let err = env.refused(&second, &["key", "list"], 4);
    assert!(err.contains("wrong passphrase"), "{err}");
    // The configuration still names the TPM, whose counter anchors the store's generation
    // (docs/cli.md, "A tampered or rolled-back store"): without it the store does not open.
    drop(tpm);
    env.refused(&third, &["key", "list"], 7);
}

/// A reseal that cannot finish leaves the store as it was (byte for byte) and opening with the
/// old passphrase: the new sealer's device absent (exit 7), the new passphrase empty (exit 1) or
/// nowhere to be found (no variable, no file, no terminal: exit 1), the old passphrase wrong
/// (exit 4), `--to pkcs11` without a backend (exit 1), `--no-pcrs` with `--to` (exit 2).
#[test]
fn an_interrupted_reseal_leaves_the_old_seal_in_place() {
    // A TPM nobody listens for: port 9 (discard) on loopback refuses the connection.
    let env = Env::new()
        .with_config("[backends.tpm]\ntype = \"tpm\"\ntcti = \"swtpm:host=127.0.0.1,port=9\"\n")
        .with_var("TSS2_LOG", "all+none")
        .with_secret(SECOND);
    env.init_store();
    let b = before_reseal(&env, &[]);
    let before = env.snapshot();
    let new = [("KEYHOLD_NEW_PASSPHRASE", SECOND)];

    let err = env.refused(&new, &["reseal", "--to", "tpm"], 7);
    assert!(err.contains("unavailable"), "{err}");
    env.assert_unchanged(&before, "the new sealer's device is absent");

    let err = env.refused(
        &[("KEYHOLD_NEW_PASSPHRASE", "")],
        &["reseal", "--to", "passphrase"],
        1,
    );
    assert!(
        err.contains("the new passphrase is empty: choose a long one; nothing was changed"),
        "{err}"
    );
    env.assert_unchanged(&before, "an empty new passphrase");

    let out = env.detached(&["reseal", "--to", "passphrase"], |_| {});
    assert_fail(
        &out,
        1,
        "no new passphrase: set KEYHOLD_NEW_PASSPHRASE, pass --new-passphrase-file FILE, or run \
         keyhold in a terminal",
        "no new passphrase anywhere",
    );
    env.assert_unchanged(&before, "no new passphrase");

    let wrong = [
        ("KEYHOLD_PASSPHRASE", "not the passphrase at all"),
        ("KEYHOLD_NEW_PASSPHRASE", SECOND),
    ];
    let err = env.refused(&wrong, &["reseal", "--to", "passphrase"], 4);
    assert!(err.contains("wrong passphrase"), "{err}");
    env.assert_unchanged(&before, "a wrong old passphrase");

    let err = env.refused(&new, &["reseal", "--to", "pkcs11"], 1);
    assert!(err.contains("--to pkcs11 needs --backend NAME"), "{err}");
    let out = env.run_vars(&new, &["reseal", "--to", "tpm", "--no-pcrs"]);
    assert_fail(&out, 2, "cannot be used with", "--to with --no-pcrs");
    env.assert_unchanged(&before, "refused arguments");

    still_valid(
        &env,
        &[],
        &b,
        "after every refusal, with the old passphrase",
    );
}

/// docs/cli.md: opening a passphrase store whose unsealing takes longer than a second says
/// `keyhold: unlocking…` on stderr when it is a terminal, and nothing otherwise. The threshold is
/// set to 0 ms here (a test build's `KEYHOLD_TEST_UNLOCKING_AFTER_MS`), so that the only thing
/// deciding is whether stderr is a terminal: captured, stderr stays empty; on a terminal (a pty
/// from script(1)) the notice is there. (The timing itself is a unit test of src/cli/io.rs, with
/// the threshold injected.)
#[test]
fn unlocking_is_said_on_a_terminal_and_nowhere_else() {
    let env = Env::init().with_var("KEYHOLD_TEST_UNLOCKING_AFTER_MS", "0");
    let out = env.run(&["key", "list"], b"");
    assert_ok(&out, "key list, stderr captured");
    assert_eq!(stderr(&out), "", "not a terminal: silent");
    let out = env.on_terminal(&["key", "list"]);
    assert_ok(&out, "key list on a terminal");
    assert!(
        stdout_str(&out).contains("keyhold: unlocking…"),
        "{}",
        show(&out)
    );
}

/// The new passphrase typed on a terminal (no `KEYHOLD_NEW_PASSPHRASE`, no file) is asked for
/// twice, echo off: two different answers are refused (exit 1, `the passphrases differ: nothing
/// was changed`) and leave the store byte for byte as it was, opening with the old passphrase;
/// the same answer twice re-seals, and that passphrase then opens the store. Nothing typed shows.
#[test]
fn a_new_passphrase_typed_on_a_terminal_is_asked_twice() {
    use support::pty::converse;
    let env = Env::new().with_secret(SECOND).with_secret(THIRD);
    env.init_store();
    let b = before_reseal(&env, &[]);
    let before = env.snapshot();
    let reseal = [&["reseal", "--to", "passphrase"][..], &INIT_ARGS[3..]].concat();
    let asked = |first: &'static str, second: &'static str| {
        [
            ("keyhold new passphrase: ", first),
            ("repeat the new passphrase: ", second),
        ]
    };
    let (code, shown) = converse(&env, &[], &reseal, &asked(SECOND, THIRD));
    assert_eq!(code, Some(1), "{shown}");
    assert!(
        shown.contains("keyhold: the passphrases differ: nothing was changed"),
        "{shown}"
    );
    assert!(!shown.contains(SECOND) && !shown.contains(THIRD), "{shown}");
    env.assert_unchanged(&before, "two different new passphrases");
    still_valid(&env, &[], &b, "after the refusal, with the old passphrase");

    let (code, shown) = converse(&env, &[], &reseal, &asked(SECOND, SECOND));
    assert_eq!(code, Some(0), "{shown}");
    assert!(
        shown.contains(moved(&env, "passphrase", "passphrase").trim_end()),
        "{shown}"
    );
    assert!(!shown.contains(SECOND), "{shown}");
    still_valid(
        &env,
        &[("KEYHOLD_PASSPHRASE", SECOND)],
        &b,
        "typed new passphrase",
    );
}

/// `reseal --to tpm --pcrs LIST` on a TPM-sealed store: a fresh seal bound to those PCRs, whose
/// recovery passphrase is the *new* passphrase (`KEYHOLD_NEW_PASSPHRASE`). After PCR 8 changes,
/// the store is refused (exit 4, pointing to `keyhold reseal`), and the plain `reseal` re-binds it
/// with that recovery passphrase; the envelope made at the start still decrypts.
#[test]
fn reseal_to_tpm_with_pcrs_takes_the_new_passphrase_as_recovery() {
    let (tpm, env) = setup();
    let env = env.with_secret(SECOND);
    env.ok_text(&["init", "--sealer", "tpm"]);
    let aes = env.create_key("data", "aes-256-gcm", &[]);
    let envelope = env.ok(&["encrypt", "--key", &aes], b"kept across", "encrypt");
    let mut args = vec!["reseal", "--to", "tpm", "--pcrs", "8"];
    args.extend_from_slice(&INIT_ARGS[3..]);
    let (out, _) = env.ok_vars(&[("KEYHOLD_NEW_PASSPHRASE", SECOND)], &args);
    assert_eq!(stdout_str_of(&out), moved(&env, "tpm", "tpm"));
    extend_pcr(&tpm, 8);
    let err = env.refused(&[], &["decrypt", "--key", &aes], 4);
    assert!(
        err.contains("PCRs 8 no longer hold the values") && err.contains("run `keyhold reseal`"),
        "{err}"
    );
    let (out, _) = env.ok_vars(&[("KEYHOLD_PASSPHRASE", SECOND)], &["reseal"]);
    assert_eq!(stdout_str_of(&out), resealed(&env, "8", "8"));
    assert_eq!(
        env.ok(&["decrypt", "--key", &aes], &envelope, "decrypt"),
        b"kept across"
    );
}

/// `reseal --to passphrase` killed (SIGKILL) at points spread over its whole running time — while
/// it unseals, seals, checks the new seal, or commits — alternating between two passphrases: after
/// every kill exactly one of the two opens the store (the old one, or the new one once the commit
/// happened; never neither, never both), and the signature and envelope made at the start still
/// verify and decrypt under it. The kill points are a fixed sweep (no clock decides the outcome:
/// every point must give that result).
#[test]
fn a_reseal_killed_at_any_point_leaves_one_passphrase_that_opens_the_store() {
    use std::process::Stdio;
    use std::time::Instant;
    let env = Env::new().with_secret(SECOND).with_secret(THIRD);
    env.init_store();
    let b = before_reseal(&env, &[]);
    let reseal = [&["reseal", "--to", "passphrase"][..], &INIT_ARGS[3..]].concat();
    let opens = |pass: &str| {
        let out = env.run_vars(&[("KEYHOLD_PASSPHRASE", pass)], &["key", "id", "signer"]);
        match out.status.code() {
            Some(0) => true,
            Some(4) if stderr(&out).contains("wrong passphrase") => false,
            _ => panic!("opening after a kill\n{}", show(&out)),
        }
    };
    // One run to completion measures how long a reseal takes here.
    let mut current = PASS;
    let start = Instant::now();
    env.ok_vars(
        &[
            ("KEYHOLD_PASSPHRASE", current),
            ("KEYHOLD_NEW_PASSPHRASE", SECOND),
        ],
        &reseal,
    );
    let took = start.elapsed();
    current = SECOND;
    const POINTS: u32 = 16;
    let (mut old_kept, mut new_took) = (0, 0);
    for point in 0..=POINTS {
        let next = if current == SECOND { THIRD } else { SECOND };
        let mut cmd = env.command(&reseal);
        cmd.env("KEYHOLD_PASSPHRASE", current)
            .env("KEYHOLD_NEW_PASSPHRASE", next)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().unwrap();
        let delay = took.mul_f64(1.2 * f64::from(point) / f64::from(POINTS));
        std::thread::sleep(delay);
        let _ = child.kill();
        child.wait().unwrap();
        let (old, new) = (opens(current), opens(next));
        assert!(
            old != new,
            "killed {delay:?} in (a reseal takes {took:?}): the old passphrase opens: {old}, the \
             new one: {new}"
        );
        if new {
            new_took += 1;
            current = next;
        } else {
            old_kept += 1;
        }
        still_valid(&env, &[("KEYHOLD_PASSPHRASE", current)], &b, "after a kill");
    }
    println!("kills: {old_kept} left the old seal, {new_took} had replaced it");
}
