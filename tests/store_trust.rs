//! The store as one authenticated whole, attacked as an intruder who can write the store's files
//! would: rows deleted, put back from an older copy, duplicated, a key rolled back with its
//! digest, the whole store copied back, the committed state deleted. Every row still passes its
//! own MAC in these attacks; the commitment and the anchor are what refuse them.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use keyhold::{Error, KeyInfo, KeyType, Keystore, SignatureFormat, Transition};
use support::{sealer, TestStore, PASSPHRASE};

const DER: SignatureFormat = SignatureFormat::Der;

fn sql(t: &TestStore, sql: &str) -> usize {
    let conn = rusqlite::Connection::open(t.db()).unwrap();
    conn.execute_batch("PRAGMA foreign_keys = OFF").unwrap();
    let before = conn.total_changes();
    conn.execute_batch(sql).unwrap();
    (conn.total_changes() - before) as usize
}

/// A byte copy of the store's database, as an intruder would keep one.
fn copy_db(t: &TestStore, name: &str) -> std::path::PathBuf {
    let copy = t.dir.path().join(name);
    std::fs::copy(t.db(), &copy).unwrap();
    copy
}

/// Asserts that reopening is refused as tampering, with every fragment in the message.
fn refused(t: &TestStore, fragments: &[&str]) -> String {
    let err = t.reopen().unwrap_err();
    assert!(matches!(err, Error::StoreTampered { .. }), "{err:?}");
    let msg = err.to_string();
    for f in fragments {
        assert!(msg.contains(f), "expected `{f}` in: {msg}");
    }
    msg
}

fn uuid_hex(t: &TestStore, name: &str) -> String {
    let conn = rusqlite::Connection::open(t.db()).unwrap();
    let uuid: Vec<u8> = conn
        .query_row("SELECT uuid FROM keys WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .unwrap();
    keyhold::hex::encode(&uuid)
}

#[test]
fn a_whole_store_copied_back_is_older_than_its_anchor_and_refused() {
    let t = TestStore::new();
    let key = t.create("victim", KeyType::Ed25519, None);
    t.ks.sign(&key.id, b"before", DER).unwrap();
    let before = t.snapshot();
    t.ks.destroy_key(&key.id).unwrap();
    // The intruder puts back the whole directory as it was: every row and the commitment agree.
    support::restore(&t.path, &before);
    let msg = refused(&t, &["it is older than its anchor", "restored from a copy"]);
    assert!(
        msg.contains(&t.dir.path().join("state").display().to_string()),
        "{msg}"
    );
    // What the message offers for a copy put back on purpose: without the anchor the copy opens
    // (the anchor file is a tripwire, not a guarantee: README).
    let anchors = t.dir.path().join("state/anchors");
    for f in std::fs::read_dir(&anchors).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }
    let ks = t.reopen().unwrap();
    ks.sign(&key.id, b"after", DER).unwrap();
}

#[test]
fn an_older_copy_of_one_row_put_back_is_refused_naming_the_key() {
    let t = TestStore::new();
    let victim = t.create("victim", KeyType::Ed25519, None);
    let other = t.create("other", KeyType::Ed25519, None);
    t.ks.rotate_key(&victim.id, None).unwrap();
    let old = copy_db(&t, "old.db");
    t.ks.destroy_key(&victim.id).unwrap();
    t.ks.sign(&other.id, b"m", DER).unwrap();
    let uuid = uuid_hex(&t, "victim");
    // The tombstone replaced by the live record of before, MAC and all.
    let changed = sql(
        &t,
        &format!(
            "ATTACH '{}' AS old;
             DELETE FROM keys WHERE name = 'victim';
             INSERT INTO keys SELECT * FROM old.keys WHERE name = 'victim';",
            old.display()
        ),
    );
    assert_eq!(changed, 2);
    refused(
        &t,
        &[
            "key `default/victim`",
            &uuid,
            "not the ones committed",
            "put back from an older copy",
        ],
    );
}

#[test]
fn a_destroyed_version_put_back_is_refused() {
    let t = TestStore::new();
    let victim = t.create("victim", KeyType::Aes256Gcm, None);
    t.ks.rotate_key(&victim.id, None).unwrap();
    let old = copy_db(&t, "old.db");
    t.ks.destroy_key(&victim.id).unwrap();
    let changed = sql(
        &t,
        &format!(
            "ATTACH '{}' AS old; INSERT INTO key_versions SELECT * FROM old.key_versions;",
            old.display()
        ),
    );
    assert_eq!(changed, 1);
    refused(&t, &["key `default/victim`"]);
}

#[test]
fn a_deleted_record_is_refused_not_read_as_destroyed() {
    let t = TestStore::new();
    let victim = t.create("victim", KeyType::Ed25519, None);
    t.create("other", KeyType::Ed25519, None);
    let uuid = uuid_hex(&t, "victim");
    assert_eq!(sql(&t, "DELETE FROM keys WHERE name = 'victim'"), 1);
    refused(&t, &[&format!("key record {uuid}: its record was deleted")]);
    // The running keystore, which opened the store before, says no such key rather than lies
    // about the key being destroyed only until its next open; it cannot write any more either.
    let err = t.ks.rotate_key(&victim.id, None).unwrap_err();
    assert!(!matches!(err, Error::WrongState { .. }), "{err:?}");
}

#[test]
fn every_row_of_a_key_deleted_is_refused() {
    let t = TestStore::new();
    t.create("victim", KeyType::Ed25519, None);
    let uuid = uuid_hex(&t, "victim");
    let n = sql(
        &t,
        &format!(
            "DELETE FROM keys WHERE uuid = x'{uuid}'; DELETE FROM key_events WHERE uuid = x'{uuid}';"
        ),
    );
    assert!(n >= 2, "the record and its creation entry: {n}");
    refused(
        &t,
        &[&format!("key record {uuid}: every row of it was deleted")],
    );
}

#[test]
fn a_key_s_last_history_entries_deleted_are_refused() {
    let t = TestStore::new();
    let key = t.create("victim", KeyType::Ed25519, None);
    t.ks.change_state(&key.id, Transition::Suspend, Some("incident"))
        .unwrap();
    t.ks.change_state(&key.id, Transition::Resume, None)
        .unwrap();
    let changed = sql(
        &t,
        "DELETE FROM key_events WHERE seq = (SELECT MAX(seq) FROM key_events)",
    );
    assert_eq!(changed, 1);
    refused(&t, &["key `default/victim`"]);
}

#[test]
fn a_deleted_gcm_counter_is_refused() {
    // Deleting the counter would restart the invocation count at 0.
    let t = TestStore::new();
    let key = t.create("aes", KeyType::Aes256Gcm, None);
    t.ks.encrypt(&key.id, b"m", b"").unwrap();
    assert_eq!(sql(&t, "DELETE FROM gcm_counters"), 1);
    refused(&t, &["key `default/aes`"]);
}

#[test]
fn a_duplicated_row_is_refused() {
    let t = TestStore::new();
    let key = t.create("victim", KeyType::Ed25519, None);
    t.ks.change_state(&key.id, Transition::Suspend, None)
        .unwrap();
    // The intruder rebuilds the history table without its primary key and duplicates a row:
    // both copies pass their MAC, and would cancel out of an XOR.
    sql(
        &t,
        "CREATE TABLE ev AS SELECT * FROM key_events;
         DROP TABLE key_events;
         ALTER TABLE ev RENAME TO key_events;
         INSERT INTO key_events SELECT * FROM key_events WHERE seq = 2;",
    );
    refused(&t, &["key `default/victim`", "duplicated"]);
}

/// Keys `victim` and `other` made, the database copied to `old.db`, then `victim` destroyed.
fn destroyed_after_a_copy(t: &TestStore) -> (KeyInfo, KeyInfo, std::path::PathBuf) {
    let victim = t.create("victim", KeyType::Ed25519, None);
    let other = t.create("other", KeyType::Ed25519, None);
    let old = copy_db(t, "old.db");
    t.ks.destroy_key(&victim.id).unwrap();
    (victim, other, old)
}

#[test]
fn a_key_rolled_back_together_with_its_digest_is_detected() {
    let t = TestStore::new();
    let (key, other, old) = destroyed_after_a_copy(&t);
    let uuid = uuid_hex(&t, "victim");
    // Every row of the key and its digest, as the older copy had them; the state is today's.
    sql(
        &t,
        &format!(
            "ATTACH '{}' AS old;
             DELETE FROM keys WHERE uuid = x'{uuid}';
             DELETE FROM key_events WHERE uuid = x'{uuid}';
             DELETE FROM key_digests WHERE uuid = x'{uuid}';
             INSERT INTO keys SELECT * FROM old.keys WHERE uuid = x'{uuid}';
             INSERT INTO key_events SELECT * FROM old.key_events WHERE uuid = x'{uuid}';
             INSERT INTO key_digests SELECT * FROM old.key_digests WHERE uuid = x'{uuid}';",
            old.display()
        ),
    );
    // The keystore that stayed open (a service) refuses the next use of either key, and the
    // next change, as the next open does: the digests no longer add up to the total.
    for err in [
        t.ks.sign(&key.id, b"m", DER).unwrap_err(),
        t.ks.sign(&other.id, b"m", DER).unwrap_err(),
        t.ks.rotate_key(&other.id, None).unwrap_err(),
    ] {
        assert!(matches!(err, Error::StoreTampered { .. }), "{err:?}");
        assert!(err.to_string().contains("cannot tell which key"), "{err}");
    }
    refused(&t, &["the store cannot tell which key"]);
}

/// Review (2026-12-02, second): an open that another process's re-seal overtakes (between the
/// open's first read and its check of the rows) goes on with the new metadata (its MAC is the
/// same root's), never called tampered.
#[test]
fn opens_while_another_process_reseals_are_never_called_tampered() {
    let t = TestStore::new();
    t.create("k", KeyType::Ed25519, None);
    let config = t.config();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let resealer = scope.spawn(|| {
            let mut resealed = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && resealed < 40 {
                Keystore::reseal_with(&t.path, &sealer(PASSPHRASE), &config, |_| {
                    Ok((sealer(PASSPHRASE), ()))
                })
                .unwrap();
                resealed += 1;
            }
            resealed
        });
        for n in 0..30 {
            if let Err(e) = t.reopen() {
                panic!("open {n}: {e}");
            }
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(
            resealer.join().unwrap() > 0,
            "no re-seal ran beside the opens"
        );
    });
}

/// Review (2026-12-02): opening a store while another keystore writes to it read the state, the
/// rows and the digests in separate reads, and took a change in between for tampering (exit 10).
/// The open reads them in one read transaction, the anchor file before them.
#[test]
fn opens_while_another_keystore_writes_see_one_state_of_the_store() {
    let t = TestStore::new();
    t.create("first", KeyType::Ed25519, None);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let opened = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut made = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && made < 200 {
                t.create(&format!("k{made}"), KeyType::Ed25519, None);
                made += 1;
            }
            made
        });
        let mut opened = 0;
        for _ in 0..30 {
            let ks = t.reopen().unwrap_or_else(|e| panic!("open {opened}: {e}"));
            ks.list_keys(None).unwrap();
            opened += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let made = writer.join().unwrap();
        assert!(
            made > 0,
            "the writer made no key while the store was opened"
        );
        opened
    });
    assert_eq!(opened, 30);
}

#[test]
fn the_committed_state_deleted_or_altered_is_refused() {
    let t = TestStore::new();
    t.create("k", KeyType::Ed25519, None);
    let old = copy_db(&t, "old.db");
    assert_eq!(sql(&t, "DELETE FROM meta WHERE key = 'store_state'"), 1);
    refused(&t, &["committed state", "was deleted"]);
    std::fs::copy(&old, t.db()).unwrap();
    // The generation's first byte changed: the MAC no longer covers it.
    sql(
        &t,
        "UPDATE meta SET value = CAST(x'01' || substr(value, 2) AS BLOB) WHERE key = 'store_state'",
    );
    refused(&t, &["committed state", "fails its MAC"]);
}

#[test]
fn an_open_keystore_refuses_to_write_over_an_older_copy() {
    let t = TestStore::new();
    let key = t.create("k", KeyType::Ed25519, None);
    let before = t.snapshot();
    t.ks.rotate_key(&key.id, None).unwrap();
    // Put back while the keystore has the store open: its next write sees the state go back.
    support::restore(&t.path, &before);
    let err = t.ks.rotate_key(&key.id, None).unwrap_err();
    assert!(matches!(err, Error::StoreTampered { .. }), "{err:?}");
    assert!(
        err.to_string().contains("went back from generation"),
        "{err}"
    );
}

#[test]
fn a_crash_before_the_anchor_was_updated_is_repaired_but_an_anchor_ahead_is_not() {
    let t = TestStore::new();
    let key = t.create("k", KeyType::Ed25519, None);
    t.ks.rotate_key(&key.id, None).unwrap();
    let anchor_file = std::fs::read_dir(t.dir.path().join("state/anchors"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let generation = |text: &str| -> u64 { text.lines().nth(1).unwrap().parse().unwrap() };
    let now = generation(&std::fs::read_to_string(&anchor_file).unwrap());
    assert!(now >= 2, "creation and rotation are changes: {now}");
    // As if the process died between its commit and the anchor's update.
    std::fs::write(
        &anchor_file,
        format!("keyhold store anchor v1\n{}\n", now - 1),
    )
    .unwrap();
    t.reopen().unwrap();
    assert_eq!(
        generation(&std::fs::read_to_string(&anchor_file).unwrap()),
        now,
        "brought up to date"
    );
    std::fs::write(
        &anchor_file,
        format!("keyhold store anchor v1\n{}\n", now + 1),
    )
    .unwrap();
    refused(&t, &["older than its anchor"]);
}

#[test]
fn a_store_made_before_the_commitment_is_adopted_once_and_then_guarded() {
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-schema1");
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let db = store.join("keyhold.db");
    std::fs::copy(fixture.join("keyhold.db"), &db).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = support::state_config(dir.path());
    let seal = sealer("fixture-passphrase");
    let ks = Keystore::open_with(&store, &seal, &config).unwrap();
    assert_eq!(ks.list_keys(None).unwrap().len(), 5);
    drop(ks);
    // Adopted: a row deleted from now on is refused.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let before = std::fs::read(&db).unwrap();
    conn.execute("DELETE FROM keys WHERE name = 'aes'", [])
        .unwrap();
    drop(conn);
    let err = Keystore::open_with(&store, &seal, &config).unwrap_err();
    assert!(matches!(err, Error::StoreTampered { .. }), "{err:?}");
    // The pre-commitment file put back (its old metadata MAC, no state) is not adopted again:
    // this machine's anchor remembers the store.
    std::fs::write(&db, std::fs::read(fixture.join("keyhold.db")).unwrap()).unwrap();
    let err = Keystore::open_with(&store, &seal, &config).unwrap_err();
    assert!(matches!(err, Error::StoreTampered { .. }), "{err:?}");
    assert!(err.to_string().contains("was deleted"), "{err}");
    std::fs::write(&db, before).unwrap();
    Keystore::open_with(&store, &seal, &config).unwrap();
    let _ = PASSPHRASE;
}

/// The audit log as lines.
fn log_lines(t: &TestStore) -> Vec<String> {
    std::fs::read_to_string(t.path.join("audit.log"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn cut_log(t: &TestStore, keep: usize) {
    let lines = log_lines(t);
    let kept: String = lines[..keep].iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(t.path.join("audit.log"), kept).unwrap();
}

fn audit_refused(ks: &Keystore, fragment: &str) {
    let err = ks.verify_audit().unwrap_err();
    assert!(matches!(err, Error::StoreTampered { .. }), "{err:?}");
    assert!(
        err.to_string().contains(fragment),
        "expected `{fragment}` in: {err}"
    );
}

#[test]
fn an_audit_log_cut_before_the_last_change_is_refused_even_when_written_on_since() {
    let t = TestStore::new();
    let key = t.create("k", KeyType::Ed25519, None);
    t.ks.change_state(&key.id, Transition::Suspend, None)
        .unwrap();
    t.ks.change_state(&key.id, Transition::Resume, None)
        .unwrap();
    t.ks.verify_audit().unwrap();
    let whole = log_lines(&t).len();
    assert!(whole >= 3, "create, suspend, resume: {whole}");
    // The resume's entry cut off.
    cut_log(&t, whole - 1);
    let ks = t.reopen().unwrap();
    audit_refused(&ks, "its end was cut off");
    // Written on since: as long as before again, but not the entries keyhold wrote.
    ks.sign(&key.id, b"m", DER).unwrap();
    ks.sign(&key.id, b"m", DER).unwrap();
    audit_refused(&ks, "is not the one keyhold wrote");
}

#[test]
fn key_uses_cut_off_the_end_of_the_audit_log_are_caught_by_the_anchor_file() {
    let t = TestStore::new();
    let key = t.create("k", KeyType::Ed25519, None);
    for _ in 0..3 {
        t.ks.sign(&key.id, b"m", DER).unwrap();
    }
    t.ks.verify_audit().unwrap();
    let whole = log_lines(&t).len();
    cut_log(&t, whole - 2);
    audit_refused(&t.ks, "its end was cut off");
}

/// Review F4: an anchor file claiming a generation no store reaches is read as absent (and
/// rewritten), not taken as a reason to refuse the store for good or to wrap its generation.
#[test]
fn an_anchor_file_with_an_absurd_generation_is_ignored() {
    let t = TestStore::new();
    let key = t.create("k", KeyType::Ed25519, None);
    let anchor_file = std::fs::read_dir(t.dir.path().join("state/anchors"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(
        &anchor_file,
        format!("keyhold store anchor v1\n{}\n", u64::MAX),
    )
    .unwrap();
    let ks = t.reopen().unwrap();
    ks.rotate_key(&key.id, None).unwrap();
    let text = std::fs::read_to_string(&anchor_file).unwrap();
    assert!(!text.contains(&u64::MAX.to_string()), "rewritten: {text}");
}

/// Review F3: a keystore kept open (a service) refuses a key whose rows were put back behind its
/// back at the key's next use, not only at the next open; and no change is built on such rows.
#[test]
fn an_open_keystore_refuses_a_destroyed_key_put_back_at_its_next_use() {
    let t = TestStore::new();
    let (victim, other, old) = destroyed_after_a_copy(&t);
    sql(
        &t,
        &format!(
            "ATTACH '{}' AS old;
             DELETE FROM keys WHERE name = 'victim';
             INSERT INTO keys SELECT * FROM old.keys WHERE name = 'victim';",
            old.display()
        ),
    );
    let err = t.ks.sign(&victim.id, b"m", DER).unwrap_err();
    assert!(matches!(err, Error::StoreTampered { .. }), "{err:?}");
    // The other key is untouched and still works; a change of the victim is refused too.
    t.ks.sign(&other.id, b"m", DER).unwrap();
    let err = t.ks.rotate_key(&victim.id, None).unwrap_err();
    assert!(matches!(err, Error::StoreTampered { .. }), "{err:?}");
}
