//! The key lifecycle through the library: SP 800-57 states and what each allows, versions and
//! `min_decrypt_version`, schedules (activation, expiry, rotation, destruction), the AES-GCM
//! invocation limit, the history, the authentication of every lifecycle row, and stores made
//! before the lifecycle existed. (Rotation on every backend is in conformance.rs.)
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::time::Duration;

use keyhold::config::Config;
use keyhold::{
    Error, KeyOptions, KeyRequest, KeySpec, KeyState, KeyType, Keystore, PolicyChange,
    SignatureFormat, Transition, UseOptions,
};
use support::{sealer, TestStore, PASSPHRASE};

const DER: SignatureFormat = SignatureFormat::Der;

fn request(name: &str, key_type: KeyType) -> KeyRequest {
    KeyRequest {
        namespace: "default".into(),
        name: name.into(),
        spec: KeySpec::new(key_type, None, None).unwrap(),
        backend: None,
    }
}

/// Asserts `result` is `WrongState` with exactly `message`.
fn wrong_state<T: std::fmt::Debug>(result: keyhold::Result<T>, message: &str) {
    let err = result.unwrap_err();
    assert!(matches!(err, Error::WrongState { .. }), "{err:?}");
    assert_eq!(err.to_string(), message);
}

/// Waits until the wall clock, in whole seconds as the store keeps it, reaches `at`.
fn wait_until(at: i64) {
    while keyhold::time::now() < at {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tamper(t: &TestStore, sql: &str) -> usize {
    let conn = rusqlite::Connection::open(t.db()).unwrap();
    conn.execute(sql, []).unwrap()
}

fn events(t: &TestStore, id: &str) -> Vec<String> {
    t.ks.history(id)
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect()
}

#[test]
fn each_state_allows_what_sp_800_57_says() {
    let t = TestStore::new();
    let signer = t.create("signer", KeyType::Ed25519, None);
    let aes = t.create("aes", KeyType::Aes256Gcm, None);
    let id = &signer.id;
    let sig = t.ks.sign(id, b"m", DER).unwrap();
    let env = t.ks.encrypt(&aes.id, b"m", b"").unwrap();

    // Suspended: processes only, until resumed.
    let s =
        t.ks.change_state(id, Transition::Suspend, Some("audit"))
            .unwrap();
    assert_eq!(s.state, KeyState::Suspended);
    wrong_state(
        t.ks.sign(id, b"m", DER),
        "key `default/signer` is suspended: it cannot sign; a suspended key only decrypts and \
         verifies: `keyhold key resume` makes it active again",
    );
    t.ks.verify(id, b"m", &sig, DER).unwrap();
    wrong_state(
        t.ks.rotate_key(id, None),
        "key `default/signer` is suspended: it cannot rotate; only an active key makes new versions",
    );
    wrong_state(
        t.ks.change_state(id, Transition::Suspend, None),
        "key `default/signer` is suspended: it cannot be suspended",
    );
    t.ks.change_state(id, Transition::Resume, None).unwrap();
    t.ks.sign(id, b"m", DER).unwrap();
    wrong_state(
        t.ks.change_state(id, Transition::Resume, None),
        "key `default/signer` is active: it cannot be resumed",
    );

    // Deactivated: processes only, for good.
    t.ks.change_state(&aes.id, Transition::Deactivate, None)
        .unwrap();
    wrong_state(
        t.ks.encrypt(&aes.id, b"m", b""),
        "key `default/aes` is deactivated: it cannot encrypt; a deactivated key only decrypts \
         and verifies, for good: create or rotate to a new key",
    );
    assert_eq!(t.ks.decrypt(&aes.id, &env, b"").unwrap().expose(), b"m");
    wrong_state(
        t.ks.change_state(&aes.id, Transition::Resume, None),
        "key `default/aes` is deactivated: it cannot be resumed",
    );

    // Compromised: processes only when the caller accepts it, and says so.
    t.ks.change_state(id, Transition::Compromise, Some("laptop stolen"))
        .unwrap();
    wrong_state(
        t.ks.verify(id, b"m", &sig, DER),
        "key `default/signer` is compromised: it cannot verify; pass --allow-compromised to \
         decrypt or verify with it anyway",
    );
    wrong_state(
        t.ks.sign(id, b"m", DER),
        "key `default/signer` is compromised: it cannot sign; a compromised key never signs, \
         encrypts or computes MACs again",
    );
    let allowed = UseOptions::new().allow_compromised(true);
    let used = t.ks.verify_with(id, b"m", &sig, DER, &allowed).unwrap();
    assert_eq!(used.state, KeyState::Compromised);
    wrong_state(
        t.ks.sign_with(id, b"m", DER, &allowed),
        "key `default/signer` is compromised: it cannot sign; a compromised key never signs, \
         encrypts or computes MACs again",
    );
    wrong_state(
        t.ks.change_state(id, Transition::Resume, None),
        "key `default/signer` is compromised: it cannot be resumed",
    );

    // Every change is in the history, with its reason; a reopened store shows the same.
    let history = t.reopen().unwrap().history(id).unwrap();
    let seen: Vec<(&str, &str, &str, Option<&str>)> = history
        .iter()
        .map(|e| {
            (
                e.event.as_str(),
                e.from.as_deref().unwrap_or("-"),
                e.to.as_str(),
                e.reason.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("created", "-", "active", None),
            ("suspended", "active", "suspended", Some("audit")),
            ("resumed", "suspended", "active", None),
            (
                "compromised",
                "active",
                "compromised",
                Some("laptop stolen")
            ),
        ]
    );
    assert!(history.windows(2).all(|w| w[0].at <= w[1].at));
}

#[test]
fn versions_below_the_minimum_no_longer_decrypt_or_verify() {
    let t = TestStore::new();
    let aes = t.create("aes", KeyType::Aes256Gcm, None);
    let signer = t.create("signer", KeyType::EcdsaP256, None);
    let env1 = t.ks.encrypt(&aes.id, b"old", b"").unwrap();
    let sig1 = t.ks.sign(&signer.id, b"old", DER).unwrap();
    t.ks.rotate_key(&aes.id, None).unwrap();
    t.ks.rotate_key(&signer.id, None).unwrap();
    let env2 = t.ks.encrypt(&aes.id, b"new", b"").unwrap();

    let policy = PolicyChange::new().min_decrypt_version(2);
    assert_eq!(
        t.ks.set_policy(&aes.id, &policy, None)
            .unwrap()
            .min_decrypt_version,
        2
    );
    t.ks.set_policy(&signer.id, &policy, None).unwrap();
    wrong_state(
        t.ks.decrypt(&aes.id, &env1, b""),
        "key `default/aes` is retired below version 2: it cannot decrypt with version 1; \
         `keyhold key set --min-decrypt-version 1` would allow it again",
    );
    assert_eq!(t.ks.decrypt(&aes.id, &env2, b"").unwrap().expose(), b"new");
    // A signature of version 1 no longer verifies: version 2 alone is tried, or asked for.
    let err = t.ks.verify(&signer.id, b"old", &sig1, DER).unwrap_err();
    assert!(matches!(err, Error::VerificationFailed { .. }), "{err}");
    let v1 = UseOptions::new().version(Some(1));
    wrong_state(
        t.ks.verify_with(&signer.id, b"old", &sig1, DER, &v1),
        "key `default/signer` is retired below version 2: it cannot verify with version 1; \
         `keyhold key set --min-decrypt-version 1` would allow it again",
    );
    for bad in [0, 3] {
        let err =
            t.ks.set_policy(&aes.id, &PolicyChange::new().min_decrypt_version(bad), None)
                .unwrap_err();
        assert_eq!(
            err.to_string(),
            "key `default/aes` has versions 1 to 2: --min-decrypt-version must be one of them"
        );
    }
    // Lowering it again brings version 1 back.
    t.ks.set_policy(&aes.id, &PolicyChange::new().min_decrypt_version(1), None)
        .unwrap();
    assert_eq!(t.ks.decrypt(&aes.id, &env1, b"").unwrap().expose(), b"old");
}

#[test]
fn pre_activation_then_active_then_expired_on_schedule() {
    let t = TestStore::new();
    let now = keyhold::time::now();
    let (on, off) = (now + 2, now + 5);
    let options = KeyOptions::new()
        .activate_at(Some(on))
        .deactivate_at(Some(off));
    let key =
        t.ks.create_key_with(&request("scheduled", KeyType::Ed25519), &options)
            .unwrap();
    assert_eq!(key.state, KeyState::PreActivation);
    let until = keyhold::time::format_utc(on);
    wrong_state(
        t.ks.sign(&key.id, b"m", DER),
        &format!("key `default/scheduled` is in pre-activation until {until}: it cannot sign"),
    );
    wrong_state(
        t.ks.verify(&key.id, b"m", &[0u8; 64], DER),
        &format!("key `default/scheduled` is in pre-activation until {until}: it cannot verify"),
    );
    wait_until(on);
    let sig = t.ks.sign(&key.id, b"m", DER).unwrap();
    assert_eq!(t.ks.key_info(&key.id).unwrap().state, KeyState::Active);
    wait_until(off);
    wrong_state(
        t.ks.sign(&key.id, b"m", DER),
        "key `default/scheduled` is deactivated: it cannot sign; a deactivated key only \
         decrypts and verifies, for good: create or rotate to a new key",
    );
    t.ks.verify(&key.id, b"m", &sig, DER).unwrap();
    assert_eq!(events(&t, &key.id), ["created", "activated", "expired"]);

    // The schedule is checked before anything is made.
    let later = keyhold::time::now();
    let bad = KeyOptions::new()
        .activate_at(Some(later + 20))
        .deactivate_at(Some(later + 10));
    let before = t.snapshot();
    let err =
        t.ks.create_key_with(&request("never", KeyType::Ed25519), &bad)
            .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the deactivation time must come after the activation time"
    );
    let err =
        t.ks.create_key_with(
            &request("never", KeyType::Ed25519),
            &KeyOptions::new().deactivate_at(Some(later - 1)),
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the deactivation time is past: give a time to come"
    );
    assert_eq!(t.snapshot(), before);
}

#[test]
fn rotate_after_rotates_on_use_and_by_maintenance() {
    let t = TestStore::new();
    let options = KeyOptions::new().rotate_after(Some(Duration::from_secs(1)));
    let on_use =
        t.ks.create_key_with(&request("on-use", KeyType::HmacSha256), &options)
            .unwrap();
    let by_maintenance =
        t.ks.create_key_with(&request("by-maintenance", KeyType::Ed25519), &options)
            .unwrap();
    let tag = t.ks.mac(&on_use.id, b"m").unwrap();
    wait_until(on_use.created_at + 1);
    let used = t.ks.mac_with(&on_use.id, b"m", &UseOptions::new()).unwrap();
    assert_eq!(used.version, 2, "an overdue key rotates before it is used");
    let checked =
        t.ks.verify_mac_with(&on_use.id, b"m", &tag, &UseOptions::new())
            .unwrap();
    assert_eq!(checked.version, 1);
    let done = t.ks.maintain().unwrap().done;
    let actions: Vec<(&str, &str)> = done
        .iter()
        .map(|d| (d.key.as_str(), d.action.as_str()))
        .collect();
    assert_eq!(
        actions,
        [("default/by-maintenance", "rotated to version 2")]
    );
    assert_eq!(t.ks.key_info(&by_maintenance.id).unwrap().version, 2);
    assert_eq!(
        t.ks.history(&on_use.id).unwrap()[1].reason.as_deref(),
        Some("rotate-after reached")
    );
    // Nothing more is due.
    assert!(t.ks.maintain().unwrap().done.is_empty());
    let err =
        t.ks.set_policy(
            &on_use.id,
            &PolicyChange::new().rotate_after(Some(Duration::ZERO)),
            None,
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "--rotate-after must be at least one second"
    );
}

#[test]
fn a_scheduled_destruction_waits_can_be_cancelled_and_then_is_final() {
    let t = TestStore::new();
    let key = t.create("doomed", KeyType::Aes256Gcm, None);
    let env = t.ks.encrypt(&key.id, b"keep me", b"").unwrap();
    let blob: Vec<u8> = {
        let conn = rusqlite::Connection::open(t.db()).unwrap();
        conn.query_row("SELECT blob FROM keys", [], |r| r.get(0))
            .unwrap()
    };
    let later = keyhold::time::now() + 3600;
    let scheduled =
        t.ks.schedule_destroy(&key.id, later, Some("retired"))
            .unwrap();
    assert_eq!(
        (scheduled.state, scheduled.destroy_at),
        (KeyState::Active, Some(later))
    );
    wrong_state(
        t.ks.encrypt(&key.id, b"m", b""),
        &format!(
            "key `default/doomed` is scheduled for destruction on {}: it cannot encrypt; until \
             then it only decrypts and verifies (`keyhold key cancel-destroy` keeps it)",
            keyhold::time::format_utc(later)
        ),
    );
    assert_eq!(
        t.ks.decrypt(&key.id, &env, b"").unwrap().expose(),
        b"keep me"
    );
    t.ks.cancel_destroy(&key.id, Some("still needed")).unwrap();
    t.ks.encrypt(&key.id, b"m", b"").unwrap();
    let err = t.ks.cancel_destroy(&key.id, None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "key `default/doomed` is not scheduled for destruction: nothing to cancel"
    );

    // Due in a second: maintenance destroys it, for good.
    let soon = keyhold::time::now() + 1;
    t.ks.schedule_destroy(&key.id, soon, None).unwrap();
    wait_until(soon);
    let done = t.ks.maintain().unwrap().done;
    assert_eq!(done.len(), 1);
    assert_eq!(
        (done[0].key.as_str(), done[0].action.as_str()),
        ("default/doomed", "destroyed")
    );
    let tombstone = t.ks.key_info(&key.id).unwrap();
    assert_eq!(tombstone.state, KeyState::Destroyed);
    let on = keyhold::time::format_utc(tombstone.destroyed_at.unwrap());
    wrong_state(
        t.ks.decrypt(&key.id, &env, b""),
        &format!("key `default/doomed` is destroyed on {on}: it cannot decrypt"),
    );
    wrong_state(
        t.ks.cancel_destroy(&key.id, None),
        &format!("key `default/doomed` is destroyed on {on}: it cannot be kept: its destruction has begun"),
    );
    assert_eq!(
        events(&t, &key.id),
        [
            "created",
            "destroy-scheduled",
            "destroy-cancelled",
            "destroy-scheduled",
            "destroying",
            "destroyed"
        ]
    );
    // The sealed key is gone from the file, free pages included (SQLite secure_delete), and
    // so are its counter rows.
    let file = std::fs::read(t.db()).unwrap();
    for piece in blob.chunks(16).filter(|c| c.len() == 16) {
        assert!(
            !file.windows(16).any(|w| w == piece),
            "the database still holds part of the destroyed key's blob"
        );
    }
    let conn = rusqlite::Connection::open(t.db()).unwrap();
    let counters: i64 = conn
        .query_row("SELECT count(*) FROM gcm_counters", [], |r| r.get(0))
        .unwrap();
    assert_eq!(counters, 0);
}

#[test]
fn the_gcm_invocation_limit_holds_across_processes_and_rotates() {
    let mut config = Config::default();
    config.lifecycle.gcm_invocation_limit = Some(5);
    let t = TestStore::new();
    let key = t.create("aes", KeyType::Aes256Gcm, None);
    // Two keystores on one store are two processes' connections; each reserves invocations in
    // the store before using them.
    let a = Keystore::open_with(&t.path, &sealer(PASSPHRASE), &config).unwrap();
    let b = Keystore::open_with(&t.path, &sealer(PASSPHRASE), &config).unwrap();
    let options = UseOptions::new();
    let mut versions = Vec::new();
    let mut envelopes = Vec::new();
    for ks in [&a, &b, &a, &b, &a, &b, &a] {
        let used = ks.encrypt_with(&key.id, b"m", b"", &options).unwrap();
        versions.push(used.version);
        envelopes.push(used.output);
    }
    // Five invocations of version 1 in all, whoever made them; then version 2.
    assert_eq!(versions, [1, 1, 1, 1, 1, 2, 2]);
    for env in &envelopes {
        assert_eq!(t.ks.decrypt(&key.id, env, b"").unwrap().expose(), b"m");
    }
    let history = t.ks.history(&key.id).unwrap();
    assert_eq!(
        history[1].reason.as_deref(),
        Some("AES-GCM invocation limit of the version reached")
    );
    let conn = rusqlite::Connection::open(t.db()).unwrap();
    let reserved: i64 = conn
        .query_row(
            "SELECT reserved FROM gcm_counters WHERE version = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(reserved, 5, "version 1 reserved more than its limit");

    // A limit above NIST's or of zero is refused.
    for bad in ["0", "4294967297"] {
        let err =
            Config::from_toml(&format!("[lifecycle]\ngcm_invocation_limit = {bad}")).unwrap_err();
        assert!(
            err.to_string().contains("give 1 to 4294967296"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn every_lifecycle_row_is_authenticated() {
    let cases: &[(&str, &str)] = &[
        (
            "a version's blob",
            "UPDATE key_versions SET blob = CAST(substr(blob, 2) || x'00' AS BLOB)",
        ),
        ("a version's number", "UPDATE key_versions SET version = 3"),
        (
            "a version's locator",
            "UPDATE key_versions SET locator = 'x' || locator",
        ),
        (
            "a history entry",
            "UPDATE key_events SET reason = 'nothing happened' WHERE seq = 2",
        ),
        (
            "a history entry's time",
            "UPDATE key_events SET at = at + 1 WHERE seq = 1",
        ),
        ("a counter", "UPDATE gcm_counters SET reserved = 0"),
        ("the MAC format", "UPDATE keys SET mac_format = 1"),
        (
            "the minimum version",
            "UPDATE keys SET min_decrypt_version = 1",
        ),
        (
            "a scheduled destruction",
            "UPDATE keys SET destroy_at = NULL",
        ),
        ("an expiry", "UPDATE keys SET deactivate_at = 1"),
        ("a rotation period", "UPDATE keys SET rotate_after = 100000"),
        ("the state", "UPDATE keys SET state = 'active'"),
    ];
    for (what, sql) in cases {
        let t = TestStore::new();
        let key = t.create("aes", KeyType::Aes256Gcm, None);
        t.ks.encrypt(&key.id, b"m", b"").unwrap();
        t.ks.rotate_key(&key.id, Some("scheduled")).unwrap();
        t.ks.encrypt(&key.id, b"m", b"").unwrap();
        t.ks.set_policy(
            &key.id,
            &PolicyChange::new()
                .min_decrypt_version(2)
                .rotate_after(Some(Duration::from_secs(3600))),
            None,
        )
        .unwrap();
        t.ks.change_state(&key.id, Transition::Suspend, None)
            .unwrap();
        t.ks.schedule_destroy(&key.id, keyhold::time::now() + 3600, None)
            .unwrap();
        assert!(tamper(&t, sql) >= 1, "{what}: `{sql}` changed nothing");
        let err = t.reopen().unwrap_err();
        assert!(matches!(err, Error::Integrity { .. }), "{what}: {err}");
    }
    // A deleted version row is no MAC failure, but the commitment misses it: the store does not
    // open, and says which key.
    let t = TestStore::new();
    let key = t.create("aes", KeyType::Aes256Gcm, None);
    t.ks.rotate_key(&key.id, None).unwrap();
    assert_eq!(tamper(&t, "DELETE FROM key_versions"), 1);
    let err = t.reopen().unwrap_err();
    assert!(matches!(err, Error::StoreTampered { .. }), "{err}");
    assert!(
        err.to_string().contains("key `default/aes` (record "),
        "names the key: {err}"
    );
}

#[test]
fn a_version_of_one_key_cannot_be_moved_to_another() {
    let t = TestStore::new();
    let a = t.create("a", KeyType::Ed25519, None);
    let b = t.create("b", KeyType::Ed25519, None);
    t.ks.rotate_key(&a.id, None).unwrap();
    t.ks.rotate_key(&b.id, None).unwrap();
    // Give b's version 2 the row of a's: same columns but the uuid, whose MAC binds the uuid.
    let moved = tamper(
        &t,
        "UPDATE key_versions SET locator = (SELECT v.locator FROM key_versions v JOIN keys k \
         ON k.uuid = v.uuid WHERE k.name = 'a'), blob = (SELECT v.blob FROM key_versions v JOIN \
         keys k ON k.uuid = v.uuid WHERE k.name = 'a'), public_key = (SELECT v.public_key FROM \
         key_versions v JOIN keys k ON k.uuid = v.uuid WHERE k.name = 'a'), mac = (SELECT v.mac \
         FROM key_versions v JOIN keys k ON k.uuid = v.uuid WHERE k.name = 'a') WHERE uuid = \
         (SELECT uuid FROM keys WHERE name = 'b')",
    );
    assert_eq!(moved, 1);
    let err = t.reopen().unwrap_err();
    assert!(matches!(err, Error::Integrity { .. }), "{err}");
}

/// A store made by keyhold before the lifecycle existed (schema 1, tests/fixtures/store-schema1:
/// see its README) opens, keeps every key ID and every output, and takes the lifecycle on.
#[test]
fn a_store_of_schema_1_keeps_every_key_and_output() {
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-schema1");
    let read = |name: &str| std::fs::read(fixture.join(name)).unwrap();
    let id = |name: &str| {
        String::from_utf8(read(&format!("{name}.id")))
            .unwrap()
            .trim()
            .to_owned()
    };
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    std::fs::write(store.join("keyhold.db"), read("keyhold.db")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(
        store.join("keyhold.db"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let user_version = |path: &std::path::Path| -> i64 {
        rusqlite::Connection::open(path.join("keyhold.db"))
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap()
    };
    assert_eq!(user_version(&store), 1);
    let seal = sealer("fixture-passphrase");
    // The fixture's store ID is always the same: its anchor file goes in the temp dir.
    let ks = Keystore::open_with(&store, &seal, &support::state_config(dir.path())).unwrap();
    assert_eq!(user_version(&store), 4, "migrated to the current schema");
    let msg = read("msg");
    ks.verify(&id("sig"), &msg, &read("sig.sig"), DER).unwrap();
    ks.verify(&id("ec"), &msg, &read("ec.sig"), DER).unwrap();
    ks.verify_mac(&id("mac"), &msg, &read("mac.tag")).unwrap();
    assert_eq!(
        ks.decrypt(&id("aes"), &read("aes.env"), b"v1")
            .unwrap()
            .expose(),
        &msg[..]
    );
    assert_eq!(
        ks.decrypt(&id("rsa"), &read("rsa.env"), b"")
            .unwrap()
            .expose(),
        &msg[..]
    );
    let keys = ks.list_keys(None).unwrap();
    assert_eq!(keys.len(), 5);
    assert!(keys
        .iter()
        .all(|k| k.state == KeyState::Active && k.version == 1));
    // A schema-1 key has no history before the upgrade; it rotates like any other.
    assert!(ks.history(&id("aes")).unwrap().is_empty());
    let rotated = ks.rotate_key(&id("aes"), None).unwrap();
    assert_eq!((rotated.id, rotated.version), (id("aes"), 2));
    assert_eq!(
        ks.decrypt(&id("aes"), &read("aes.env"), b"v1")
            .unwrap()
            .expose(),
        &msg[..]
    );
    drop(ks);
    let ks = Keystore::open_with(&store, &seal, &support::state_config(dir.path())).unwrap();
    ks.sign(&id("sig"), b"after", DER).unwrap();
    // The migrated store takes the service's token clients too (schema 4).
    let grant = keyhold::ClientGrant {
        namespaces: vec!["default".into()],
        operations: None,
    };
    let (client, token) = ks.add_client("app", &grant).unwrap();
    assert_eq!(ks.client_by_token(token.expose()).unwrap(), Some(client));
    drop(ks);
    // An untouched schema-1 record keeps its old MAC, which covers none of the lifecycle
    // fields: setting one behind keyhold's back is refused.
    let conn = rusqlite::Connection::open(store.join("keyhold.db")).unwrap();
    let n = conn
        .execute("UPDATE keys SET destroy_at = 1 WHERE name = 'ec'", [])
        .unwrap();
    assert_eq!(n, 1);
    let err = Keystore::open_with(&store, &seal, &support::state_config(dir.path())).unwrap_err();
    assert!(matches!(err, Error::Integrity { .. }), "{err}");
}

#[test]
fn two_processes_rotating_at_once_make_one_version_each_in_turn() {
    let t = TestStore::new();
    let key = t.create("raced", KeyType::EcdsaP256, None);
    let others: Vec<Keystore> = (0..4).map(|_| t.reopen().unwrap()).collect();
    let barrier = std::sync::Barrier::new(others.len());
    let rotated: Vec<u32> = std::thread::scope(|s| {
        let handles: Vec<_> = others
            .iter()
            .map(|ks| {
                let (id, barrier) = (&key.id, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    ks.rotate_key(id, None).unwrap().version
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Each rotation saw the version before it under the write lock: versions 2..=5, no gap, no
    // version made twice; every made version is recorded or was destroyed (the software backend
    // holds nothing outside its records), and all of them still verify.
    let mut sorted = rotated.clone();
    sorted.sort_unstable();
    let info = t.ks.key_info(&key.id).unwrap();
    assert_eq!(info.versions.len() as u32, info.version);
    assert!(
        sorted.iter().all(|v| (2..=info.version).contains(v)),
        "{rotated:?}"
    );
    let history = t.ks.history(&key.id).unwrap();
    let rotations = history.iter().filter(|e| e.event == "rotated").count() as u32;
    assert_eq!(rotations, info.version - 1);
    let options = UseOptions::new();
    for v in 1..=info.version {
        let sig = t.ks.sign(&key.id, b"m", DER).unwrap();
        let used =
            t.ks.verify_with(&key.id, b"m", &sig, DER, &options.version(Some(v)))
                .map(|u| u.version);
        // Only the newest signs; older versions are there to verify what they signed.
        assert_eq!(used.is_ok(), v == info.version, "version {v}");
    }
}

/// Maintenance reads every record, then works key by key: a destruction cancelled by another
/// process in between is not carried out, even once its time has passed (each step decides again
/// under the write lock). The key is due for activation when maintenance reads it, and its
/// destruction is cancelled, then its time waited out, just before maintenance gets to it.
#[test]
fn a_destruction_cancelled_while_maintenance_runs_is_not_carried_out() {
    let t = TestStore::new();
    let now = keyhold::time::now();
    let options = KeyOptions::new().activate_at(Some(now + 1));
    let key =
        t.ks.create_key_with(&request("zz", KeyType::Ed25519), &options)
            .unwrap();
    let destroy_at = now + 2;
    t.ks.schedule_destroy(&key.id, destroy_at, None).unwrap();
    wait_until(now + 1);
    let maintainer = t.reopen().unwrap();
    let mut cancelled = false;
    let report = maintainer
        .maintain_then(|label| {
            assert_eq!(label, "default/zz");
            t.ks.cancel_destroy(&key.id, Some("still needed")).unwrap();
            cancelled = true;
            wait_until(destroy_at);
        })
        .unwrap();
    assert!(cancelled, "maintenance found nothing due");
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert!(
        report.done.iter().all(|d| d.action != "destroyed"),
        "{:?}",
        report.done
    );
    let info = t.ks.key_info(&key.id).unwrap();
    assert_eq!((info.state, info.destroy_at), (KeyState::Active, None));
    t.ks.sign(&key.id, b"m", DER).unwrap();
}
