//! `keyhold store verify` through the real binary (docs/cli.md, "Integrity audits"): the text and
//! JSON reports, and the exit codes 0, 6 (a check failed, naming the key) and 7 (unchecked).
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use serde_json::Value;
use support::env::*;

fn sql(env: &Env, statement: &str) -> usize {
    let conn = rusqlite::Connection::open(env.database_file()).unwrap();
    conn.execute(statement, []).unwrap()
}

/// `store verify` (with `extra` arguments before it) as exit code, stdout and stderr.
fn verify(env: &Env, extra: &[&str]) -> (Option<i32>, String, String) {
    let mut args = extra.to_vec();
    args.extend(["store", "verify"]);
    let out = env.run(&args, b"");
    assert_clean_stderr(&out, "store verify");
    (out.status.code(), stdout_str(&out), stderr(&out))
}

#[test]
fn a_clean_store_verifies_with_exit_0() {
    let env = Env::init();
    env.create_key("signer", "ecdsa-p256", &[]);
    env.create_key("box", "aes-256-gcm", &[]);
    let (code, report, err) = verify(&env, &[]);
    assert_eq!(code, Some(0), "{report}{err}");
    // Not a terminal: no progress bar, nothing on stderr.
    assert_eq!(err, "");
    assert!(report.contains("(id "), "{report}");
    assert!(
        report.contains(
            "records (MACs of keys, versions, history, counters): PASSED\n  2 key records"
        ),
        "{report}"
    );
    assert!(
        report.contains(
            "key material in its backends: PASSED\n  2 key versions: 2 found as recorded"
        ),
        "{report}"
    );
    assert!(
        report.contains("audit log (MACs and hash chain): PASSED\n  2 entries, head "),
        "{report}"
    );
    assert!(
        report.ends_with("\nstore verify: every check passed\n"),
        "{report}"
    );

    let (code, json, _) = verify(&env, &["--json"]);
    assert_eq!(code, Some(0));
    let value: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["healthy"], Value::Bool(true));
    assert_eq!(value["status"], "passed");
    assert_eq!(value["keys"], 2);
    let kinds: Vec<&str> = value["sections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["records", "commitment", "objects", "audit"]);
}

/// On a terminal (one that can redraw a line: TERM set, not `dumb`), a progress bar on stderr
/// (drawn, then cleared) and the same report.
#[test]
fn a_terminal_gets_a_progress_bar() {
    let env = Env::init().with_var("TERM", "xterm");
    env.create_key("signer", "ecdsa-p256", &[]);
    let out = env.on_terminal(&["store", "verify"]);
    assert_ok(&out, "store verify on a terminal");
    let shown = stdout_str(&out);
    assert!(shown.contains("records ["), "{shown:?}");
    assert!(
        shown.contains("store verify: every check passed"),
        "{shown:?}"
    );
}

/// A record changed with sqlite3: every other command refuses the store (exit 6 at open);
/// `store verify` still reports the whole store, names the key, and exits 6.
#[test]
fn a_tampered_record_is_reported_by_name_with_exit_6() {
    let env = Env::init();
    let id = env.create_key("signer", "ecdsa-p256", &[]);
    env.create_key("other", "hmac-sha256", &[]);
    assert_eq!(
        sql(
            &env,
            "UPDATE keys SET name = 'forged' WHERE name = 'signer'"
        ),
        1
    );
    let listed = env.run(&["key", "list"], b"");
    assert_fail(&listed, 6, "integrity check failed", "key list");

    let (code, report, err) = verify(&env, &[]);
    assert_eq!(code, Some(6), "{report}{err}");
    assert!(
        report.contains("records (MACs of keys, versions, history, counters): FAILED"),
        "{report}"
    );
    let line = report
        .lines()
        .find(|l| l.contains("FAILED default/forged (uuid "))
        .unwrap_or_else(|| panic!("no finding names the key: {report}"));
    assert!(line.contains("its key record fails its MAC"), "{line}");
    assert!(
        !line.contains(&id),
        "no ID is shown for a forged record: {line}"
    );
    assert!(
        report.contains("audit log (MACs and hash chain): PASSED"),
        "{report}"
    );
    assert_eq!(
        err.lines().last(),
        Some("keyhold: store verify found problems: 1 problem (records)"),
        "{err}"
    );

    let (code, json, err) = verify(&env, &["--json"]);
    assert_eq!(code, Some(6));
    let value: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["healthy"], Value::Bool(false));
    assert_eq!(value["status"], "failed");
    let finding = &value["sections"][0]["findings"][0];
    assert_eq!(finding["status"], "failed");
    assert_eq!(finding["key"]["label"], "default/forged");
    assert_eq!(finding["key"]["authenticated"], false);
    let error: Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
    assert_eq!(error["error"]["code"], 6);
    assert_eq!(error["error"]["kind"], "verify_findings");
}

/// An audit line removed: the records pass, the audit section fails naming the line, exit 6.
#[test]
fn an_altered_audit_log_exits_6() {
    let env = Env::init();
    env.create_key("a", "ed25519", &[]);
    env.create_key("b", "ed25519", &[]);
    env.create_key("c", "ed25519", &[]);
    let log = env.store.join(keyhold::audit::FILE);
    let text = std::fs::read_to_string(&log).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.remove(1);
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    let (code, report, err) = verify(&env, &[]);
    assert_eq!(code, Some(6), "{report}{err}");
    assert!(
        report.contains(
            "audit log (MACs and hash chain): FAILED\n  the log does not verify\n  FAILED audit \
             log line 2: entry 3 where entry 2 belongs"
        ),
        "{report}"
    );
    assert!(
        err.ends_with("store verify found problems: 1 problem (audit)\n"),
        "{err}"
    );
}

/// Review (2026-12-02): the log's last entries cut off (each entry still verifies, the chain is
/// whole up to the cut) is tampering: the state records the last change's entry and the anchor
/// file the last entry, so `store verify` fails the audit section with exit 10, as `audit
/// verify` does.
#[test]
fn an_audit_log_cut_at_its_end_exits_10() {
    // Here even in remote mode: it reads the audit log's file right after a key use, and through
    // `keyhold serve` key uses reach the file within `[audit] flush_ms`, not as the command ends.
    let env = Env::init().local_only("it reads the audit log's file right after a key use");
    let id = env.create_key("a", "ed25519", &[]);
    env.create_key("b", "ed25519", &[]);
    env.ok(&["sign", "--key", &id], b"m", "sign");
    let log = env.store.join(keyhold::audit::FILE);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for keep in [lines.len() - 1, lines.len() - 2] {
        std::fs::write(&log, lines[..keep].join("\n") + "\n").unwrap();
        let (code, report, err) = verify(&env, &[]);
        assert_eq!(code, Some(10), "keep {keep}: {report}{err}");
        assert!(
            report.contains("audit log (MACs and hash chain): FAILED\n  the log does not verify"),
            "{report}"
        );
        assert!(report.contains("cut off"), "{report}");
        assert!(
            err.ends_with("store verify found problems: 1 problem (audit)\n"),
            "{err}"
        );
    }
}

#[cfg(feature = "pkcs11")]
mod pkcs11 {
    use super::*;
    use keyhold::backend::Backend;

    /// On SoftHSM2: a token key deleted behind keyhold's back exits 6 naming the key; the token
    /// gone, its keys are unchecked (exit 7).
    #[test]
    fn token_keys_missing_exit_6_and_unreachable_exit_7() {
        let hsm = keyhold::testing::SoftHsm::new().unwrap();
        let env = Env::on_softhsm(&hsm);
        env.init_store();
        let doomed = env.create_key("doomed", "hmac-sha256", &["--backend", "hsm"]);
        env.create_key("kept", "ecdsa-p256", &["--backend", "hsm"]);
        env.create_key("soft", "ed25519", &[]);
        let (code, report, err) = verify(&env, &[]);
        assert_eq!(code, Some(0), "{report}{err}");

        let show = env.ok_text(&["--json", "key", "show", "--key", &doomed]);
        let info: Value = serde_json::from_str(&show).unwrap();
        let locator = info["locator"].as_str().unwrap();
        keyhold::backend::pkcs11::Pkcs11Backend::new("outside", &hsm.backend_config())
            .unwrap()
            .destroy_object(locator)
            .unwrap();
        let (code, report, err) = verify(&env, &[]);
        assert_eq!(code, Some(6), "{report}{err}");
        let line = report
            .lines()
            .find(|l| l.contains("FAILED default/doomed v1 (uuid "))
            .unwrap_or_else(|| panic!("no finding names the key: {report}"));
        assert!(
            line.contains(&format!("id {doomed}, backend hsm)")),
            "{line}"
        );
        assert!(
            line.contains("its secret key object is not on the token"),
            "{line}"
        );

        hsm.delete_token().unwrap();
        // From here on, here and not through a service (remote test mode): a service that had
        // the token open asks the SoftHSM2 it loaded, which still answers, finding no object
        // (exit 6); a process that starts now finds no token.
        let env = env.local_only("the token goes away under a running service");
        let (code, report, err) = verify(&env, &[]);
        assert_eq!(code, Some(7), "{report}{err}");
        assert!(
            report.contains("key material in its backends: UNCHECKED\n  3 key versions: 1 found as recorded, 0 failed, 2 unchecked"),
            "{report}"
        );
        assert!(
            report.contains("UNCHECKED default/kept v1 (uuid "),
            "{report}"
        );
        assert_eq!(
            err.lines().last(),
            Some("keyhold: store verify found problems: 2 unchecked"),
            "{err}"
        );
    }
}
