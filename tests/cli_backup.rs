//! `keyhold backup` and `keyhold restore` (docs/cli.md, "Backups"): a backup holds no key material
//! or record in clear, restores a destroyed key (the legitimate way back, past the store's
//! anchor), restores on "another machine" (another state directory), from recovery shares, and
//! refuses a changed backup, another store's directory and a wrong passphrase, changing nothing.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use support::env::*;

fn backup(env: &Env, dir: &str) -> std::path::PathBuf {
    let out = env.ok(&["--json", "backup", "--to", dir], b"", "backup");
    let report = parse_json(&out, "backup --json");
    std::path::PathBuf::from(report["backup"].as_str().unwrap())
}

/// Runs keyhold on the store at `store` with `vars`; asserts success; returns stdout.
fn at(env: &Env, store: &str, vars: &[(&str, &str)], args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let mut cmd = env.bare_command();
    cmd.arg("--store").arg(store).args(args);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = env.run_cmd(cmd, Some(stdin));
    assert_ok(&out, &format!("{args:?} on {store}"));
    out.stdout
}

fn signs(env: &Env, id: &str) {
    let sig = env.path_str("sig");
    let msg = env.write("msg", b"restored");
    env.ok(
        &["sign", "--key", id, "--in", &msg, "--out", &sig],
        b"",
        "sign",
    );
    env.ok(
        &["verify", "--key", id, "--in", &msg, "--signature", &sig],
        b"",
        "verify",
    );
}

#[test]
fn a_backup_holds_nothing_in_clear_and_restores_a_destroyed_key_past_the_anchor() {
    let env = Env::init();
    let id = env.create_key("victim-key-name", "ed25519", &[]);
    signs(&env, &id);
    let dir = env.path_str("backups");
    let file = backup(&env, &dir);
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(std::path::Path::new(&dir)), 0o700);
    let bytes = std::fs::read(&file).unwrap();
    let revealed = keyhold::testing::reveal_software_key(&env.store, PASS, &id).unwrap();
    for (what, secret) in [
        ("the key's material", revealed.material.expose().to_vec()),
        ("the root secret", revealed.root.expose().to_vec()),
        ("the key's name", b"victim-key-name".to_vec()),
    ] {
        assert_eq!(
            holds_secret(&bytes, &secret),
            None,
            "{what} is in the backup"
        );
    }
    for (form, text) in secret_forms(PASS) {
        assert_eq!(
            holds_secret(&bytes, text.as_bytes()),
            None,
            "passphrase ({form})"
        );
    }

    let before_destruction = env.db();
    env.ok(
        &["key", "destroy", "--key", &id, "--now", "--yes"],
        b"",
        "destroy",
    );
    env.refused(&[], &["sign", "--key", &id], 9);
    let (out, _) = env.ok_vars(&[], &["--json", "restore", "--from", &dir]);
    let report = parse_json(&out, "restore --json");
    assert_eq!(report["keys"], 1);
    assert_eq!(
        report["audit_log_restored"], false,
        "the store's own log is kept"
    );
    let generation = report["generation"].as_u64().unwrap();
    assert!(
        generation > report["backup_generation"].as_u64().unwrap() + 1,
        "past the destruction's generation too: {report}"
    );
    signs(&env, &id);
    // A copy of the store from before the restore is older than it: refused.
    let restored = env.db();
    std::fs::write(env.database_file(), &before_destruction).unwrap();
    env.refused(&[], &["sign", "--key", &id], 10);
    std::fs::write(env.database_file(), &restored).unwrap();
    signs(&env, &id);
}

#[test]
fn a_backup_restores_on_another_machine_into_a_new_directory() {
    let env = Env::init();
    let id = env.create_key("k", "ed25519", &[]);
    let aes = env.create_key("data", "aes-256-gcm", &[]);
    let envelope = env.path_str("envelope");
    env.ok(
        &["encrypt", "--key", &aes, "--out", &envelope],
        b"secret data",
        "encrypt",
    );
    let dir = env.path_str("backups");
    backup(&env, &dir);
    // Another machine: another state directory, another store path, nothing of the first.
    let elsewhere = env.path_str("elsewhere");
    let other = [("XDG_STATE_HOME", env.path_str("other-state"))];
    let other: Vec<(&str, &str)> = other.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (out, _) = env.ok_vars(
        &other,
        &["--json", "restore", "--from", &dir, "--to", &elsewhere],
    );
    let report = parse_json(&out, "restore --json");
    assert_eq!(report["keys"], 2);
    assert_eq!(
        report["audit_log_restored"], true,
        "a new store gets the backup's log"
    );
    let there = |args: &[&str]| at(&env, &elsewhere, &other, args, b"");
    let plain = there(&["decrypt", "--key", &aes, "--in", &envelope, "--out", "-"]);
    assert_eq!(plain, b"secret data");
    at(&env, &elsewhere, &other, &["sign", "--key", &id], b"m");
    there(&["audit", "verify"]);
}

#[test]
fn a_changed_backup_another_store_or_a_wrong_passphrase_change_nothing() {
    let env = Env::init();
    let id = env.create_key("k", "ed25519", &[]);
    let dir = env.path_str("backups");
    let file = backup(&env, &dir);
    env.ok(&["key", "suspend", "--key", &id], b"", "suspend");
    let before = env.snapshot();
    let good = std::fs::read(&file).unwrap();
    // One byte of the encrypted body; the header's generation, still valid JSON (a digit one
    // higher): both fail the backup's authentication.
    let generation_digit = {
        let key = b"\"generation\":";
        good.windows(key.len()).position(|w| w == key).unwrap() + key.len()
    };
    let digit = good[generation_digit];
    assert!(digit.is_ascii_digit());
    for (what, at, value) in [
        ("the body", good.len() - 40, good[good.len() - 40] ^ 0x01),
        (
            "the header's generation",
            generation_digit,
            if digit == b'9' { b'8' } else { digit + 1 },
        ),
    ] {
        let mut bad = good.clone();
        bad[at] = value;
        std::fs::write(&file, &bad).unwrap();
        let err = env.refused(&[], &["restore", "--from", file.to_str().unwrap()], 6);
        assert!(err.contains("fails its authentication"), "{what}: {err}");
        env.assert_unchanged(&before, what);
    }
    std::fs::write(&file, &good).unwrap();
    // Another store's directory.
    let other = Env::init();
    let err = other.refused(&[], &["restore", "--from", file.to_str().unwrap()], 1);
    assert!(err.contains("holds another store"), "{err}");
    // The wrong passphrase.
    env.refused(
        &[("KEYHOLD_PASSPHRASE", "not the passphrase")],
        &["restore", "--from", &dir],
        4,
    );
    env.assert_unchanged(&before, "a wrong passphrase");
    // And the good backup restores.
    env.ok(&["restore", "--from", &dir], b"", "restore");
    signs(&env, &id);
}

#[test]
fn a_backup_restores_from_recovery_shares() {
    let env = Env::init();
    let id = env.create_key("k", "ed25519", &[]);
    let out = env.ok(
        &["recovery", "split", "--shares", "3", "--threshold", "2"],
        b"",
        "split",
    );
    let shares: Vec<String> = String::from_utf8(out)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(str::to_owned)
        .collect();
    let shares_file = env.write(
        "shares",
        format!("{}\n{}\n", shares[0], shares[2]).as_bytes(),
    );
    let dir = env.path_str("backups");
    backup(&env, &dir);
    let elsewhere = env.path_str("elsewhere");
    env.ok(
        &[
            "restore",
            "--from",
            &dir,
            "--to",
            &elsewhere,
            "--shares-file",
            &shares_file,
        ],
        b"",
        "restore from shares",
    );
    at(&env, &elsewhere, &[], &["sign", "--key", &id], b"m");
}

/// `backup` and `restore` SIGKILLed at random points, 24 times each: after every kill the store
/// opens and verifies whole (`store verify` exit 0), as it was or as restored (a restore is one
/// rename), never in between; and every backup file in the directory restores (a backup is
/// written under a temporary name, renamed once complete).
#[test]
fn killed_backups_and_restores_lose_nothing() {
    // At least ROUNDS rounds, and on until MIN_KILLED of them were killed (a kill lands or not
    // by timing: on a loaded machine more commands finish before their delay), at most MAX.
    const ROUNDS: usize = 24;
    const MIN_KILLED: usize = ROUNDS / 4;
    const MAX_ROUNDS: usize = 4 * ROUNDS;
    let env = Env::init();
    let kept = env.create_key("kept", "ed25519", &[]);
    let original = backup(&env, &env.path_str("original"));
    let original = original.to_str().unwrap().to_owned();
    let dir = env.path_str("backups");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("seed {seed}");
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // The shortest of three uninterrupted runs: a first, cold run can take several times longer,
    // and delays drawn from it would let most commands finish.
    let timed = |args: &[&str]| {
        (0..3)
            .map(|_| {
                let started = std::time::Instant::now();
                let (code, _, err) = run_killed_after(env.command(args), None);
                assert_eq!(code, Some(0), "{args:?}: {err}");
                started.elapsed()
            })
            .min()
            .unwrap_or_default()
    };
    // Each command's running time, measured uninterrupted.
    let restore_time = timed(&["restore", "--from", &original]);
    let backup_time = timed(&["backup", "--to", &dir]);
    // Since the backup: `kept` destroyed and a key `newN` made. A restore brings back `kept` and
    // drops `newN`; after one, the loop makes the difference again.
    let diverge = |n: usize| {
        env.ok(
            &["key", "destroy", "--key", &kept, "--now", "--yes"],
            b"",
            "destroy",
        );
        env.create_key(&format!("new{n}"), "ed25519", &[])
    };
    let mut new = diverge(0);
    let restore_args = ["restore", "--from", original.as_str()];
    let backup_args = ["backup", "--to", dir.as_str()];
    let (mut restored, mut as_before, mut killed) = (0, 0, 0);
    let mut rounds = 0;
    for round in 0..MAX_ROUNDS {
        if round >= ROUNDS && killed >= MIN_KILLED {
            break;
        }
        rounds += 1;
        if env.run(&["sign", "--key", &kept], b"m").status.success() {
            new = diverge(round + 1);
        }
        let (args, took): (&[&str], _) = if round % 2 == 0 {
            (&restore_args, restore_time)
        } else {
            (&backup_args, backup_time)
        };
        // Uniform over twice the command's time: about half the runs are killed, anywhere.
        let delay = took.mul_f64((next() % 1000) as f64 / 500.0);
        let (code, _, err) = run_killed_after(env.command(args), Some(delay));
        if code.is_none() {
            killed += 1;
        } else {
            assert_eq!(code, Some(0), "round {round} {args:?}: {err}");
        }
        let out = env.run(&["--json", "store", "verify"], b"");
        assert_eq!(
            out.status.code(),
            Some(0),
            "round {round}: {args:?} killed after {delay:?}: {}\n{}",
            stderr(&out),
            String::from_utf8_lossy(&out.stdout)
        );
        let kept_signs = env.run(&["sign", "--key", &kept], b"m").status.success();
        let new_signs = env.run(&["sign", "--key", &new], b"m").status.success();
        assert!(
            kept_signs != new_signs,
            "round {round}: either the backup's state (kept) or the later one (new), not both \
             nor neither: kept {kept_signs}, new {new_signs}"
        );
        if kept_signs {
            restored += 1;
        } else {
            as_before += 1;
        }
    }
    // Every backup file left restores, into a directory of its own.
    let mut files = 0;
    assert!(
        restored > 0,
        "no restore completed: the loop tested nothing of it"
    );
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "khbackup") {
            files += 1;
            let to = env.path_str(&format!("check-{files}"));
            env.ok(
                &["restore", "--from", path.to_str().unwrap(), "--to", &to],
                b"",
                "a backup left by the loop",
            );
        }
    }
    println!(
        "{rounds} rounds: {killed} killed, store as restored {restored} times, as before \
         {as_before} times; {files} backup files, each restores"
    );
    assert!(
        killed >= MIN_KILLED,
        "too few kills in {rounds} rounds to mean anything: {killed}"
    );
}

/// Review F6 and F7: `restore --from DIR` picks the newest backup by its authenticated header,
/// not by a file name anyone can change; a store whose audit log was lost gets the backup's, and
/// the log verifies though the anchor file had recorded a later entry of the lost one.
#[test]
fn restore_picks_by_the_header_and_a_restored_log_verifies() {
    let env = Env::init();
    let id = env.create_key("k", "ed25519", &[]);
    let dir = env.path_str("backups");
    let older = backup(&env, &dir);
    env.ok(&["key", "suspend", "--key", &id], b"", "suspend");
    let newer = backup(&env, &dir);
    // The older file renamed to look newest.
    let forged = std::path::Path::new(&dir).join(format!(
        "keyhold-{}-g99999999-99999999T999999Z.khbackup",
        "0".repeat(32)
    ));
    std::fs::rename(&older, &forged).unwrap();
    let (out, _) = env.ok_vars(&[], &["--json", "restore", "--from", &dir]);
    let report = parse_json(&out, "restore --json");
    assert_eq!(report["backup"], newer.to_str().unwrap(), "{report}");
    // More entries, then the log is lost: the restore brings the backup's back.
    env.ok(&["key", "resume", "--key", &id], b"", "resume");
    env.ok(&["sign", "--key", &id], b"m", "sign");
    std::fs::remove_file(env.store.join("audit.log")).unwrap();
    let (out, _) = env.ok_vars(
        &[],
        &["--json", "restore", "--from", newer.to_str().unwrap()],
    );
    assert_eq!(
        parse_json(&out, "restore --json")["audit_log_restored"],
        true
    );
    env.ok(&["audit", "verify"], b"", "the restored log verifies");
}

/// Changes of the store as a whole leave an entry in the audit log: backup, restore, reseal.
#[test]
fn backup_restore_and_reseal_are_in_the_audit_log() {
    let env = Env::init();
    env.create_key("k", "ed25519", &[]);
    let dir = env.path_str("backups");
    backup(&env, &dir);
    env.ok(&["restore", "--from", &dir], b"", "restore");
    let new_passphrase = "a new passphrase for the audit test";
    env.ok_vars(
        &[("KEYHOLD_NEW_PASSPHRASE", new_passphrase)],
        &["reseal", "--to", "passphrase"],
    );
    let vars = [("KEYHOLD_PASSPHRASE", new_passphrase)];
    let (out, _) = env.ok_vars(&vars, &["audit", "show"]);
    let shown = String::from_utf8(out).unwrap();
    for op in ["store-backup", "store-restore", "store-reseal"] {
        assert!(shown.contains(op), "no {op} entry:\n{shown}");
    }
    env.ok_vars(&vars, &["audit", "verify"]);
}
