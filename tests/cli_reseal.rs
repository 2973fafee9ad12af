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
