//! A TPM-sealed store's backup restored on another machine (docs/cli.md, "Backups"): two swtpm
//! instances are two machines' TPMs. With a recovery passphrase (`init --sealer tpm --recovery`),
//! the backup restores where the first TPM is not, its software keys work there, its TPM key is
//! refused with the reason, and `reseal --to tpm` binds the store to the TPM it is on now.
//! Without one, the other TPM is named and nothing is made; the store stays whole on its own TPM.
#![cfg(feature = "tpm")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use keyhold::testing::Swtpm;
use support::claims::*;
use support::env::*;

/// The recovery passphrase of the stores here, and the one `reseal --to tpm --recovery` sets.
const RECOVERY: &str = "backup on another machine recovery";
const NEW_RECOVERY: &str = "the second machine's recovery passphrase";
/// The passphrase of the store between the two re-seals that move it to another TPM.
const INTERIM: &str = "passphrase while moving to this TPM";

/// The cheapest Argon2id cost, for the recovery seals.
const CHEAP: &[&str] = &["--argon2-memory-mib", "19", "--argon2-iterations", "2"];

/// A machine: its own TPM, its own home (anchor files) and store directory.
fn machine(tpm: &Swtpm) -> Env {
    tpm_env(Env::new(), &tpm.tcti(), "fallback = \"software\"")
        .with_secret(RECOVERY)
        .with_secret(NEW_RECOVERY)
        .with_secret(INTERIM)
}

fn with_recovery(pass: &str) -> [(&str, &str); 1] {
    [("KEYHOLD_PASSPHRASE", pass)]
}

/// `backup --to DIR` with no passphrase (the TPM unseals); the backup file's path.
fn backup(env: &Env) -> String {
    let dir = env.path_str("backups");
    let (out, _) = env.ok_vars(&[], &["--json", "backup", "--to", &dir]);
    let report = parse_json(&out, "backup --json");
    report["backup"].as_str().unwrap().to_owned()
}

#[test]
fn a_tpm_sealed_backup_restores_on_another_machine_with_the_recovery_passphrase() {
    let (tpm_a, tpm_b) = (Swtpm::new().unwrap(), Swtpm::new().unwrap());
    let a = machine(&tpm_a);
    a.ok_vars(
        &with_recovery(RECOVERY),
        &[&["init", "--sealer", "tpm", "--recovery"], CHEAP].concat(),
    );
    let signer = a.create_key("signer", "ed25519", &["--backend", "software"]);
    let aes = a.create_key("data", "aes-256-gcm", &["--backend", "software"]);
    let tpm_key = parse_id_line(&a.ok(CREATE_TPM_KEY, b"", "create a TPM key"), "TPM key");
    let envelope = a.path_str("envelope");
    a.ok(
        &["encrypt", "--key", &aes, "--out", &envelope],
        b"kept across machines",
        "encrypt",
    );
    let pem = a.pubkey_pem(&signer);
    // The TPM unseals: no passphrase is needed on the first machine.
    let file = backup(&a);

    // The second machine has the backup file and the configuration, with its own TPM.
    let b = machine(&tpm_b);
    let moved = b.path_str("backup.khb");
    std::fs::copy(&file, &moved).unwrap();
    let envelope_b = b.path_str("envelope");
    std::fs::copy(&envelope, &envelope_b).unwrap();
    let restore = ["restore", "--from", &moved];
    // No recovery passphrase to give: refused, saying why one is needed, nothing made.
    let err = b.refused(&[], &restore, 4);
    assert!(
        err.contains("is not the one that sealed the store") && err.contains("recovery passphrase"),
        "{err}"
    );
    b.assert_no_store("restore refused without the recovery passphrase");
    let err = b.refused(&with_recovery("not the recovery passphrase"), &restore, 4);
    assert!(!err.is_empty());
    b.assert_no_store("restore refused with a wrong recovery passphrase");

    let restore = ["--json", "restore", "--from", &moved];
    let (out, err) = b.ok_vars(&with_recovery(RECOVERY), &restore);
    assert!(
        err.contains("unsealing with the recovery passphrase"),
        "{err}"
    );
    let report = parse_json(&out, "restore --json");
    assert_eq!(report["keys"], 3, "{report}");
    // Software keys work on the second machine, opened by the recovery passphrase.
    let (plain, _) = b.ok_vars(
        &with_recovery(RECOVERY),
        &["decrypt", "--key", &aes, "--in", &envelope_b, "--out", "-"],
    );
    assert_eq!(plain, b"kept across machines");
    let (public, _) = b.ok_vars(
        &with_recovery(RECOVERY),
        &["key", "pubkey", "--key", &signer],
    );
    assert_eq!(String::from_utf8(public).unwrap(), pem);
    // The TPM key lives in the first TPM only; the TPM here is not used in its place, nor for
    // anything else while the store is open without it (it might be an impostor).
    let err = b.refused(
        &with_recovery(RECOVERY),
        &["sign", "--key", &tpm_key, "--in", &envelope_b],
        7,
    );
    assert!(
        err.contains("is not the one the store was sealed by")
            && err.contains("keyhold uses no other TPM in its place"),
        "{err}"
    );
    // Not even to seal the store to it in the same breath: that is an explicit step.
    let err = b.refused(
        &[
            ("KEYHOLD_PASSPHRASE", RECOVERY),
            ("KEYHOLD_NEW_PASSPHRASE", NEW_RECOVERY),
        ],
        &[&["reseal", "--to", "tpm", "--recovery"], CHEAP].concat(),
        7,
    );
    assert!(
        err.contains("keyhold uses no other TPM in its place"),
        "{err}"
    );

    // Moved to the second machine's TPM, the store opens there without a passphrase.
    move_to_this_tpm(&b);
    let (plain, err) = b.ok_vars(
        &[],
        &["decrypt", "--key", &aes, "--in", &envelope_b, "--out", "-"],
    );
    assert_eq!(plain, b"kept across machines");
    assert!(!err.contains("recovery"), "{err}");
    b.ok_vars(&[], &["audit", "verify"]);

    // The first machine's store is untouched, and still needs no passphrase.
    let (plain, _) = a.ok_vars(
        &[],
        &["decrypt", "--key", &aes, "--in", &envelope, "--out", "-"],
    );
    assert_eq!(plain, b"kept across machines");
    a.ok_vars(&[], &["sign", "--key", &tpm_key, "--in", &envelope]);
}

/// The documented way to the TPM that is here: `reseal --to passphrase` with the recovery
/// passphrase, then `reseal --to tpm --recovery` from the passphrase store (stated as such),
/// which trusts the TPM here as `init` does.
fn move_to_this_tpm(env: &Env) {
    env.ok_vars(
        &[
            ("KEYHOLD_PASSPHRASE", RECOVERY),
            ("KEYHOLD_NEW_PASSPHRASE", INTERIM),
        ],
        &[&["reseal", "--to", "passphrase"], CHEAP].concat(),
    );
    env.ok_vars(
        &[
            ("KEYHOLD_SEALER", "passphrase"),
            ("KEYHOLD_PASSPHRASE", INTERIM),
            ("KEYHOLD_NEW_PASSPHRASE", NEW_RECOVERY),
        ],
        &[&["reseal", "--to", "tpm", "--recovery"], CHEAP].concat(),
    );
}

/// The store's directory copied to the second machine (not restored from a backup): it is
/// anchored in the first TPM's counter, so it is refused there until `store reanchor --yes`
/// accepts it (with the recovery passphrase); then it moves to the TPM here as above.
#[test]
fn a_copied_tpm_store_opens_elsewhere_after_reanchor_with_the_recovery_passphrase() {
    let (tpm_a, tpm_b) = (Swtpm::new().unwrap(), Swtpm::new().unwrap());
    let a = machine(&tpm_a);
    a.ok_vars(
        &with_recovery(RECOVERY),
        &[&["init", "--sealer", "tpm", "--recovery"], CHEAP].concat(),
    );
    let aes = a.create_key("data", "aes-256-gcm", &["--backend", "software"]);
    let b = machine(&tpm_b);
    std::fs::create_dir_all(&b.store).unwrap();
    for entry in std::fs::read_dir(&a.store).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, b.store.join(path.file_name().unwrap())).unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&b.store, std::fs::Permissions::from_mode(0o700)).unwrap();
    let err = b.refused(&with_recovery(RECOVERY), &["key", "list"], 7);
    assert!(err.contains("keyhold store reanchor --yes"), "{err}");
    b.ok_vars(&with_recovery(RECOVERY), &["store", "reanchor", "--yes"]);
    move_to_this_tpm(&b);
    let out = b.ok_vars(&[], &["key", "list"]).0;
    assert!(String::from_utf8(out).unwrap().contains("data"));
    let sealed = b.ok(
        &["encrypt", "--key", &aes, "--out", "-"],
        b"after the move",
        "encrypt",
    );
    assert!(!sealed.is_empty());
}

#[test]
fn without_a_recovery_passphrase_another_tpm_is_named_and_nothing_is_made() {
    let (tpm_a, tpm_b) = (Swtpm::new().unwrap(), Swtpm::new().unwrap());
    let a = machine(&tpm_a);
    a.ok_vars(&[], &["init", "--sealer", "tpm"]);
    a.create_key("signer", "ed25519", &["--backend", "software"]);
    let file = backup(&a);
    let b = machine(&tpm_b);
    // A recovery passphrase given anyway changes nothing: the store has no recovery seal.
    let err = b.refused(&with_recovery(RECOVERY), &["restore", "--from", &file], 4);
    assert!(err.contains("another TPM"), "{err}");
    b.assert_no_store("restore on another TPM without a recovery seal");
    // Recovery shares are the way for such a store (tests/cli_backup.rs restores from them).
}
