//! The CLI contract of docs/cli.md for a tampered store: exit 10 and the JSON kind
//! `store_tampered`, for a store copied back whole (its anchor file in the user's state
//! directory, or where `[store] state_dir` says) and for a deleted row; nothing is written.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use support::env::*;

#[test]
fn a_store_copied_back_after_a_destruction_is_refused_with_exit_10() {
    let env = Env::init();
    let id = env.create_key("victim", "ed25519", &[]);
    env.ok(&["sign", "--key", &id], b"m", "sign before");
    let old = env.db();
    env.ok(
        &["key", "destroy", "--key", &id, "--now", "--yes"],
        b"",
        "destroy",
    );
    std::fs::write(env.database_file(), &old).unwrap();
    let before = env.snapshot();
    let err = env.refused(&[], &["sign", "--key", &id], 10);
    assert!(
        err.contains("it is older than its anchor") && err.contains(".local/state/keyhold"),
        "{err}"
    );
    let out = env.run(&["--json", "key", "list"], b"");
    assert_eq!(out.status.code(), Some(10), "key list --json");
    let report = parse_json(stderr(&out).as_bytes(), "the JSON error");
    assert_eq!(report["error"]["kind"], "store_tampered");
    assert_eq!(report["error"]["code"], 10);
    env.assert_unchanged(&before, "a refused store is left as it is");
}

#[test]
fn the_anchor_goes_where_the_configuration_says() {
    let env = Env::new();
    let state = env.path_str("elsewhere");
    let env = env.with_config(&format!("[store]\nstate_dir = \"{state}\"\n"));
    env.init_store();
    let id = env.create_key("k", "ed25519", &[]);
    let anchors: Vec<_> = std::fs::read_dir(env.file("elsewhere/anchors"))
        .unwrap()
        .collect();
    assert_eq!(anchors.len(), 1, "one anchor file, named by the store ID");
    assert!(
        !env.file(".local/state/keyhold").exists(),
        "nothing in the default place"
    );
    let old = env.db();
    env.ok(&["key", "suspend", "--key", &id], b"", "suspend");
    std::fs::write(env.database_file(), &old).unwrap();
    env.refused(&[], &["sign", "--key", &id], 10);
}

#[test]
fn a_deleted_record_is_refused_with_exit_10_naming_its_record() {
    let env = Env::init();
    let id = env.create_key("victim", "ed25519", &[]);
    env.create_key("other", "ed25519", &[]);
    let conn = rusqlite::Connection::open(env.database_file()).unwrap();
    let uuid: Vec<u8> = conn
        .query_row("SELECT uuid FROM keys WHERE name = 'victim'", [], |r| {
            r.get(0)
        })
        .unwrap();
    conn.execute("DELETE FROM keys WHERE name = 'victim'", [])
        .unwrap();
    drop(conn);
    // Not "destroyed", not "no such key": the store is refused, whichever key is asked for.
    let err = env.refused(&[], &["key", "show", "--key", &id], 10);
    assert!(
        err.contains(&format!(
            "key record {}: its record was deleted",
            keyhold::hex::encode(&uuid)
        )),
        "{err}"
    );
}

#[test]
fn store_verify_reports_the_commitment_and_the_anchor_with_exit_10() {
    let env = Env::init();
    let id = env.create_key("victim", "ed25519", &[]);
    env.create_key("other", "ed25519", &[]);
    let out = env.run(&["--json", "store", "verify"], b"");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report = parse_json(&out.stdout, "store verify --json");
    let commitment = report["sections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["kind"] == "commitment")
        .unwrap()
        .clone();
    assert_eq!(commitment["status"], "passed", "{commitment}");
    assert!(
        commitment["summary"]
            .as_str()
            .unwrap()
            .contains("anchor file at generation"),
        "{commitment}"
    );

    // A whole copy from before a change: every MAC and the commitment agree; the anchor does not.
    let old = env.db();
    env.ok(&["key", "suspend", "--key", &id], b"", "suspend");
    let now = env.db();
    std::fs::write(env.database_file(), &old).unwrap();
    let before = env.snapshot();
    let out = env.run(&["store", "verify"], b"");
    assert_eq!(out.status.code(), Some(10), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("it is older than its anchor"), "{text}");
    env.assert_unchanged(&before, "store verify writes nothing");

    // A deleted record: named in the commitment section.
    std::fs::write(env.database_file(), &now).unwrap();
    let conn = rusqlite::Connection::open(env.database_file()).unwrap();
    conn.execute("DELETE FROM keys WHERE name = 'victim'", [])
        .unwrap();
    drop(conn);
    let out = env.run(&["--json", "store", "verify"], b"");
    assert_eq!(out.status.code(), Some(10), "{}", stderr(&out));
    let report = parse_json(&out.stdout, "store verify --json");
    let findings = report["sections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["kind"] == "commitment")
        .unwrap()["findings"]
        .clone();
    assert!(
        findings.to_string().contains("its record was deleted"),
        "{findings}"
    );
}

#[test]
fn store_reanchor_accepts_a_copy_put_back_on_purpose_and_says_so_in_the_audit_log() {
    let env = Env::init();
    let id = env.create_key("k", "ed25519", &[]);
    let old = env.db();
    env.ok(&["key", "suspend", "--key", &id], b"", "suspend");
    std::fs::write(env.database_file(), &old).unwrap();
    env.refused(&[], &["sign", "--key", &id], 10);
    let before = env.snapshot();
    let err = env.refused(&[], &["store", "reanchor"], 2);
    assert!(err.contains("--yes"), "{err}");
    env.assert_unchanged(&before, "no --yes");
    let out = env.ok(&["--json", "store", "reanchor", "--yes"], b"", "reanchor");
    let report = parse_json(&out, "store reanchor --json");
    assert!(
        report["generation"].as_u64().unwrap() > report["from_generation"].as_u64().unwrap(),
        "{report}"
    );
    // The copy is the store now: the key is active as it was in it.
    env.ok(&["sign", "--key", &id], b"m", "sign in the accepted copy");
    let audit = env.ok_text(&["audit", "show"]);
    assert!(audit.contains("store-reanchor"), "{audit}");
    env.ok(&["store", "verify"], b"", "verify after reanchor");
}
