//! `Keystore::verify_store` and `Keystore::open_and_verify`: every record's MAC, the audit chain
//! and every key's material checked to the end, each problem naming its key; backends that cannot
//! be asked reported unchecked; the periodic run logging what it finds. On real SoftHSM2,
//! openCryptoki and swtpm where the test says so.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::path::Path;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use keyhold::config::Config;
use keyhold::verify::{CheckKind, Finding, Status, VerifyReport};
use keyhold::{Error, KeyInfo, KeyRequest, KeySpec, KeyType, Keystore};

fn request(namespace: &str, name: &str, key_type: KeyType, backend: Option<&str>) -> KeyRequest {
    KeyRequest {
        namespace: namespace.into(),
        name: name.into(),
        spec: KeySpec::new(key_type, None, None).unwrap(),
        backend: backend.map(Into::into),
    }
}

/// A store with software keys of four kinds, one rotated (a version row) and one used for
/// encryption (an AES-GCM counter row).
fn software_store(path: &Path) -> (Keystore, Vec<KeyInfo>) {
    let ks = Keystore::create(path, &support::sealer(support::PASSPHRASE)).unwrap();
    let keys: Vec<KeyInfo> = [
        ("signer", KeyType::EcdsaP256),
        ("ed", KeyType::Ed25519),
        ("box", KeyType::Aes256Gcm),
        ("mac", KeyType::HmacSha256),
    ]
    .into_iter()
    .map(|(name, t)| ks.create_key(&request("default", name, t, None)).unwrap())
    .collect();
    ks.rotate_key(&keys[0].id, Some("test")).unwrap();
    ks.encrypt(&keys[2].id, b"hello", b"aad").unwrap();
    (ks, keys)
}

/// [`software_store`], closed again: for tests that change it behind keyhold's back.
fn closed_store() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    drop(software_store(&path));
    (dir, path)
}

/// A new store with the backends of `config`.
#[cfg_attr(not(feature = "pkcs11"), allow(dead_code))]
fn store_on(config: &Config) -> (tempfile::TempDir, std::path::PathBuf, Keystore) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let ks = Keystore::create_with(&path, &support::sealer(support::PASSPHRASE), config).unwrap();
    (dir, path, ks)
}

fn open_and_verify(path: &Path, config: &Config) -> VerifyReport {
    Keystore::open_and_verify(path, &support::sealer(support::PASSPHRASE), config, &|_| {}).unwrap()
}

fn section(report: &VerifyReport, kind: CheckKind) -> &keyhold::verify::Section {
    report
        .section(kind)
        .unwrap_or_else(|| panic!("no {kind:?} section: {report:#?}"))
}

/// The findings of `kind` about the key labelled `label`.
fn about<'r>(report: &'r VerifyReport, kind: CheckKind, label: &str) -> Vec<&'r Finding> {
    section(report, kind)
        .findings
        .iter()
        .filter(|f| f.key.as_ref().is_some_and(|k| k.label == label))
        .collect()
}

fn sql(path: &Path, statement: &str) -> usize {
    let conn = rusqlite::Connection::open(path.join(keyhold::store::DB_FILE)).unwrap();
    conn.execute(statement, []).unwrap()
}

/// The database and the audit log, byte for byte.
fn files(path: &Path) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(path.join(keyhold::store::DB_FILE)).unwrap(),
        std::fs::read(path.join(keyhold::audit::FILE)).unwrap_or_default(),
    )
}

#[test]
fn a_clean_store_passes_every_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let (ks, _) = software_store(&path);
    let progress = Mutex::new(Vec::new());
    let report = ks
        .verify_store(&|p| progress.lock().unwrap().push(p))
        .unwrap();
    assert_eq!(report.status(), Status::Passed, "{report:#?}");
    assert_eq!(report.keys, 4);
    let kinds: Vec<CheckKind> = report.sections.iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        [
            CheckKind::Records,
            CheckKind::Commitment,
            CheckKind::Objects,
            CheckKind::Audit
        ]
    );
    // Four version-1 materials and the rotated key's version 2, each decrypted.
    assert!(
        section(&report, CheckKind::Objects)
            .summary
            .starts_with("5 key versions: 5 found as recorded"),
        "{report:#?}"
    );
    assert!(
        section(&report, CheckKind::Records)
            .summary
            .contains("1 later versions"),
        "{report:#?}"
    );
    let progress = progress.into_inner().unwrap();
    assert!(
        progress
            .iter()
            .any(|p| p.check == CheckKind::Objects && p.done == 5 && p.total == 5),
        "{progress:?}"
    );
    drop(ks);
    assert_eq!(
        open_and_verify(&path, &Config::default()).status(),
        Status::Passed
    );
}

/// Opening the store refuses it at the first record that fails; `open_and_verify` reports every
/// one, names each key, checks the rest, and writes nothing.
#[test]
fn every_tampered_row_is_reported_naming_its_key_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let (ks, keys) = software_store(&path);
    drop(ks);
    let uuid_of = |k: &KeyInfo| {
        let conn = rusqlite::Connection::open(path.join(keyhold::store::DB_FILE)).unwrap();
        conn.query_row(
            "SELECT hex(uuid) FROM keys WHERE name = ?1",
            [&k.name],
            |r| r.get::<_, String>(0),
        )
        .unwrap()
        .to_lowercase()
    };
    let signer_uuid = uuid_of(&keys[0]);
    assert_eq!(
        sql(
            &path,
            "UPDATE keys SET state = 'active', rotate_after = 1 WHERE name = 'mac'"
        ),
        1
    );
    assert_eq!(
        sql(&path, "UPDATE key_versions SET created_at = created_at + 1"),
        1
    );
    assert_eq!(
        sql(&path, "UPDATE key_events SET reason = 'forged' WHERE seq = 1 AND uuid = (SELECT uuid FROM keys WHERE name = 'ed')"),
        1
    );
    match Keystore::open(&path, &support::sealer(support::PASSPHRASE)) {
        Err(Error::Integrity { .. }) => {}
        other => panic!("open must refuse the tampered store: {other:?}"),
    }
    let before = files(&path);
    let report = open_and_verify(&path, &Config::default());
    assert_eq!(files(&path), before, "verify wrote to the store or its log");
    assert_eq!(report.status(), Status::Failed);
    let records = section(&report, CheckKind::Records);
    assert_eq!(records.status, Status::Failed);

    let mac = about(&report, CheckKind::Records, "default/mac");
    assert_eq!(mac.len(), 1, "{report:#?}");
    assert!(
        mac[0].what.contains("key record fails its MAC"),
        "{:?}",
        mac[0]
    );
    let name = mac[0].key.as_ref().unwrap();
    assert_eq!(name.uuid, uuid_of(&keys[3]));
    assert!(!name.authenticated);
    assert_eq!(name.id, None, "no ID is made from a forged record");

    let signer = about(&report, CheckKind::Records, "default/signer");
    assert_eq!(signer.len(), 1, "{report:#?}");
    assert_eq!(
        signer[0].what,
        "version 2 fails its MAC: it was changed outside keyhold"
    );
    let name = signer[0].key.as_ref().unwrap();
    assert_eq!(name.uuid, signer_uuid);
    assert_eq!(name.id.as_deref(), Some(keys[0].id.as_str()));
    assert_eq!(name.version, Some(2));

    let ed = about(&report, CheckKind::Records, "default/ed");
    assert_eq!(ed.len(), 1, "{report:#?}");
    assert!(
        ed[0].what.starts_with("history entry 1 fails its MAC"),
        "{:?}",
        ed[0]
    );

    assert!(about(&report, CheckKind::Records, "default/box").is_empty());
    // The rest was still checked: the untouched keys' material decrypts.
    assert_eq!(section(&report, CheckKind::Objects).status, Status::Passed);
    assert_eq!(section(&report, CheckKind::Audit).status, Status::Passed);
}

/// The sealer metadata's MAC replaced: opening refuses the store; verifying reports it and
/// checks the rest.
#[test]
fn a_forged_metadata_mac_is_reported() {
    let (_dir, path) = closed_store();
    assert_eq!(
        sql(
            &path,
            "UPDATE meta SET value = zeroblob(32) WHERE key = 'meta_mac'"
        ),
        1
    );
    match Keystore::open(&path, &support::sealer(support::PASSPHRASE)) {
        Err(Error::Integrity { what }) => assert!(what.contains("sealer metadata"), "{what}"),
        other => panic!("open must refuse forged metadata: {other:?}"),
    }
    let report = open_and_verify(&path, &Config::default());
    let records = section(&report, CheckKind::Records);
    assert_eq!(records.findings.len(), 1, "{report:#?}");
    assert!(
        records.findings[0]
            .what
            .starts_with("the store's sealer metadata (sealer `passphrase`")
            && records.findings[0].what.ends_with("fails its MAC"),
        "{:?}",
        records.findings[0]
    );
    assert_eq!(section(&report, CheckKind::Objects).status, Status::Passed);
}

/// A software blob changed in place: its record fails its MAC, and its material no longer
/// decrypts under the store's key; both are said, naming the key.
#[test]
fn a_corrupted_software_blob_is_reported() {
    let (_dir, path) = closed_store();
    assert_eq!(
        sql(
            &path,
            "UPDATE keys SET blob = CAST(substr(blob, 1, 20) || x'00' || substr(blob, 22) AS BLOB) \
             WHERE name = 'box'"
        ),
        1
    );
    let report = open_and_verify(&path, &Config::default());
    let objects = about(&report, CheckKind::Objects, "default/box");
    assert_eq!(objects.len(), 1, "{report:#?}");
    assert_eq!(objects[0].status, Status::Failed);
    assert_eq!(
        objects[0].what,
        "software key material does not decrypt under this store's key"
    );
    assert_eq!(about(&report, CheckKind::Records, "default/box").len(), 1);
    assert_eq!(section(&report, CheckKind::Objects).findings.len(), 1);
}

/// A record deleted outside keyhold leaves its history behind: named by the key's uuid.
#[test]
fn rows_of_a_deleted_record_are_reported() {
    let (_dir, path) = closed_store();
    assert_eq!(sql(&path, "DELETE FROM keys WHERE name = 'signer'"), 1);
    let report = open_and_verify(&path, &Config::default());
    let orphaned: Vec<&Finding> = section(&report, CheckKind::Records)
        .findings
        .iter()
        .filter(|f| f.what.contains("belong to no key record"))
        .collect();
    assert_eq!(orphaned.len(), 1, "{report:#?}");
    assert!(
        orphaned[0].what.contains("version") && orphaned[0].what.contains("history entry"),
        "{:?}",
        orphaned[0]
    );
    assert_eq!(report.keys, 3);
}

/// An edited audit line and a removed one are each reported by line, as `audit verify` does.
#[test]
fn an_altered_or_cut_audit_log_is_reported() {
    let (_dir, path) = closed_store();
    let log = path.join(keyhold::audit::FILE);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 4, "{text}");

    let mut edited: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    edited[1] = edited[1].replace("\"ok\"", "\"no\"");
    std::fs::write(&log, edited.join("\n") + "\n").unwrap();
    let report = open_and_verify(&path, &Config::default());
    let audit = section(&report, CheckKind::Audit);
    assert_eq!(audit.status, Status::Failed, "{report:#?}");
    assert!(
        audit.findings[0]
            .what
            .starts_with("audit log line 2: it fails its MAC"),
        "{:?}",
        audit.findings
    );

    let mut cut: Vec<&str> = lines.clone();
    cut.remove(1);
    std::fs::write(&log, cut.join("\n") + "\n").unwrap();
    let report = open_and_verify(&path, &Config::default());
    let audit = section(&report, CheckKind::Audit);
    assert!(
        audit.findings[0]
            .what
            .starts_with("audit log line 2: entry 3 where entry 2 belongs"),
        "{:?}",
        audit.findings
    );
    assert_eq!(section(&report, CheckKind::Records).status, Status::Passed);
}

/// Log lines of this process, for the periodic run's test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn captured_logs() -> &'static Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Captured::default();
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .init();
        logs
    })
}

/// `spawn_periodic_verify` runs on its own: a clean run logs INFO; after a record is changed
/// behind the open keystore's back, the next run reports it and logs an ERROR naming the key.
/// Waits for the runs' reports, never for a fixed time.
#[test]
fn the_periodic_verify_reports_a_tampered_record_and_logs_it() {
    let logs = captured_logs();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let (ks, _) = software_store(&path);
    let ks = Arc::new(ks);
    let (tx, rx) = mpsc::channel();
    let periodic = ks
        .spawn_periodic_verify(Duration::from_secs(1), move |report| {
            let _ = tx.send(match report {
                Ok(report) => Ok(report.clone()),
                Err(e) => Err(e.to_string()),
            });
        })
        .unwrap();
    let generous = Duration::from_secs(120);
    let first = rx.recv_timeout(generous).unwrap().unwrap();
    assert_eq!(first.status(), Status::Passed, "{first:#?}");
    assert!(
        String::from_utf8_lossy(&logs.0.lock().unwrap())
            .contains("INFO keyhold::keystore::verify::periodic: store verify: every check passed"),
        "{}",
        String::from_utf8_lossy(&logs.0.lock().unwrap())
    );

    assert_eq!(
        sql(&path, "UPDATE keys SET name = 'renamed' WHERE name = 'mac'"),
        1
    );
    let failed = loop {
        let report = rx.recv_timeout(generous).unwrap().unwrap();
        if report.status() == Status::Failed {
            break report;
        }
    };
    assert_eq!(
        about(&failed, CheckKind::Records, "default/renamed").len(),
        1
    );
    drop(periodic);
    let logged = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        logged.lines().any(|l| l.contains("ERROR")
            && l.contains("key=\"default/renamed\"")
            && l.contains("key record fails its MAC")),
        "{logged}"
    );
    assert!(
        logged
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("1 problems found")),
        "{logged}"
    );
    // Stopped with its handle: no report comes any more.
    while rx.try_recv().is_ok() {}
    assert!(rx.recv_timeout(Duration::from_secs(3)).is_err());
}

/// Verifying while another process's keystore rotates keys: the rows are read in one
/// transaction, so no run sees a record from before a rotation and its versions from after
/// (which would be reported as missing or extra versions). Stops after a bounded number of runs.
#[test]
fn verify_during_rotations_sees_one_state_of_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let (writer, keys) = software_store(&path);
    for n in 0..300 {
        writer
            .create_key(&request(
                "bulk",
                &format!("k{n}"),
                KeyType::HmacSha256,
                None,
            ))
            .unwrap();
    }
    let reader = Keystore::open(&path, &support::sealer(support::PASSPHRASE)).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let rotations = std::thread::scope(|scope| {
        let rotating = scope.spawn(|| {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 400 {
                writer.rotate_key(&keys[1].id, None).unwrap();
                n += 1;
            }
            n
        });
        for _ in 0..60 {
            let report = reader.verify_store(&|_| {}).unwrap();
            assert_eq!(report.status(), Status::Passed, "{report:#?}");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        rotating.join().unwrap()
    });
    assert!(rotations > 0);
}

/// Every record changed: the run reports all of them, but logs a line for the first 50 only and
/// says how many more there are.
#[test]
fn a_run_with_many_findings_logs_the_first_fifty() {
    let logs = captured_logs();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let ks = Keystore::create(&path, &support::sealer(support::PASSPHRASE)).unwrap();
    for n in 0..60 {
        ks.create_key(&request(
            "default",
            &format!("k{n}"),
            KeyType::HmacSha256,
            None,
        ))
        .unwrap();
    }
    assert_eq!(sql(&path, "UPDATE keys SET name = name || 'x'"), 60);
    let report = ks.verify_store_and_log().unwrap();
    // 60 records, and that none verifies.
    assert_eq!(section(&report, CheckKind::Records).findings.len(), 61);
    let logged = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    let lines = logged
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("check=\"records\""))
        .count();
    assert_eq!(lines, 50, "{logged}");
    assert!(
        logged.contains("store verify: 11 more findings not logged"),
        "{logged}"
    );
}

#[test]
fn a_zero_interval_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (ks, _) = software_store(&dir.path().join("store"));
    match Arc::new(ks).spawn_periodic_verify(Duration::ZERO, |_| {}) {
        Err(Error::InvalidInput(msg)) => assert!(msg.contains("at least one second"), "{msg}"),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

#[cfg(feature = "pkcs11")]
mod pkcs11 {
    use super::*;
    use keyhold::backend::pkcs11::Pkcs11Backend;
    use keyhold::backend::Backend;
    use keyhold::testing::{OpenCryptoki, SoftHsm};

    /// A SoftHSM2 key pair with one half deleted behind keyhold's back: failed, naming the key
    /// and the half; the other key of the token passes.
    #[test]
    fn a_token_object_deleted_behind_keyholds_back_is_reported() {
        let hsm = SoftHsm::new().unwrap();
        let (_dir, _path, ks) = store_on(&hsm.config("hsm"));
        let doomed = ks
            .create_key(&request(
                "default",
                "doomed",
                KeyType::EcdsaP256,
                Some("hsm"),
            ))
            .unwrap();
        ks.create_key(&request("default", "kept", KeyType::Aes256Gcm, Some("hsm")))
            .unwrap();
        assert_eq!(ks.verify_store(&|_| {}).unwrap().status(), Status::Passed);
        // Warm this keystore's handle cache, then delete the object with another session.
        ks.sign(&doomed.id, b"m", keyhold::SignatureFormat::Der)
            .unwrap();
        let outside = Pkcs11Backend::new("outside", &hsm.backend_config()).unwrap();
        outside.destroy_object(&doomed.locator).unwrap();

        let report = ks.verify_store(&|_| {}).unwrap();
        assert_eq!(report.status(), Status::Failed, "{report:#?}");
        let found = about(&report, CheckKind::Objects, "default/doomed");
        assert_eq!(found.len(), 1, "{report:#?}");
        assert!(
            found[0]
                .what
                .contains("its private key object is not on the token")
                && found[0]
                    .what
                    .contains("its public key object is not on the token"),
            "{:?}",
            found[0]
        );
        assert_eq!(
            found[0].key.as_ref().unwrap().id.as_deref(),
            Some(doomed.id.as_str())
        );
        assert!(about(&report, CheckKind::Objects, "default/kept").is_empty());
        assert_eq!(section(&report, CheckKind::Records).status, Status::Passed);
    }

    const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

    /// Someone with the PIN destroys a key's objects and generates, on the token, a key pair
    /// with the same CKA_ID: `sensitive` false gives one keyhold would never use (its attributes
    /// differ from the record's); true gives one that matches every attribute, which only the
    /// recorded public key tells apart.
    fn replace_key_pair(hsm: &SoftHsm, label: &str, locator: &str, sensitive: bool) {
        use cryptoki::mechanism::Mechanism;
        use cryptoki::object::Attribute;
        let session = support::pkcs11::raw_session(hsm.label());
        for handle in support::pkcs11::objects(&session, label, None) {
            session.destroy_object(handle).unwrap();
        }
        let id = keyhold::hex::decode(locator).unwrap();
        session
            .generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &[
                    Attribute::Token(true),
                    Attribute::Verify(true),
                    Attribute::EcParams(P256_PARAMS.to_vec()),
                    Attribute::Id(id.clone()),
                    Attribute::Label(label.as_bytes().to_vec()),
                ],
                &[
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(sensitive),
                    Attribute::Extractable(!sensitive),
                    Attribute::Sign(true),
                    Attribute::Id(id),
                    Attribute::Label(label.as_bytes().to_vec()),
                ],
            )
            .unwrap();
    }

    #[test]
    fn a_token_key_pair_replaced_with_the_pin_is_reported() {
        let hsm = SoftHsm::new().unwrap();
        let (_dir, _path, ks) = store_on(&hsm.config("hsm"));
        let weak = ks
            .create_key(&request("default", "weak", KeyType::EcdsaP256, Some("hsm")))
            .unwrap();
        let twin = ks
            .create_key(&request("default", "twin", KeyType::EcdsaP256, Some("hsm")))
            .unwrap();
        assert_eq!(ks.verify_store(&|_| {}).unwrap().status(), Status::Passed);
        replace_key_pair(&hsm, "default/weak", &weak.locator, false);
        replace_key_pair(&hsm, "default/twin", &twin.locator, true);

        let report = ks.verify_store(&|_| {}).unwrap();
        let found = about(&report, CheckKind::Objects, "default/weak");
        assert_eq!(found.len(), 1, "{report:#?}");
        for differs in ["CKA_SENSITIVE", "CKA_NEVER_EXTRACTABLE"] {
            assert!(found[0].what.contains(differs), "{:?}", found[0]);
        }
        let found = about(&report, CheckKind::Objects, "default/twin");
        assert_eq!(found.len(), 1, "{report:#?}");
        assert_eq!(
            found[0].what,
            "its device object does not match its record: its public key on the device is not \
             the one recorded: the key pair was replaced"
        );
        assert_eq!(found[0].status, Status::Failed);
    }

    /// A key destroyed by another process after the rows were read, before its objects are
    /// looked for, lost them for good reason: no finding, and the summary says so. (The
    /// progress report at the start of the objects check is where the other process acts.)
    #[test]
    fn a_key_destroyed_while_verifying_is_not_a_finding() {
        let hsm = SoftHsm::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let config = hsm.config("hsm");
        let writer =
            Keystore::create_with(&path, &support::sealer(support::PASSPHRASE), &config).unwrap();
        let key = writer
            .create_key(&request(
                "default",
                "gone",
                KeyType::HmacSha256,
                Some("hsm"),
            ))
            .unwrap();
        let reader =
            Keystore::open_with(&path, &support::sealer(support::PASSPHRASE), &config).unwrap();
        let destroyed = Mutex::new(false);
        let report = reader
            .verify_store(&|p| {
                let mut done = destroyed.lock().unwrap();
                if p.check == CheckKind::Objects && !*done {
                    writer.destroy_key(&key.id).unwrap();
                    *done = true;
                }
            })
            .unwrap();
        assert!(*destroyed.lock().unwrap());
        assert_eq!(report.status(), Status::Passed, "{report:#?}");
        assert!(
            section(&report, CheckKind::Objects)
                .summary
                .ends_with("1 rotated or destroyed by another process meanwhile"),
            "{report:#?}"
        );
    }

    /// A token that cannot be reached leaves its keys unchecked, not failed; software keys are
    /// still checked.
    #[test]
    fn keys_of_an_unavailable_token_are_unchecked() {
        let hsm = SoftHsm::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let ks = Keystore::create_with(
            &path,
            &support::sealer(support::PASSPHRASE),
            &hsm.config("hsm"),
        )
        .unwrap();
        ks.create_key(&request("default", "a", KeyType::EcdsaP256, Some("hsm")))
            .unwrap();
        ks.create_key(&request("default", "b", KeyType::HmacSha256, Some("hsm")))
            .unwrap();
        ks.create_key(&request("default", "soft", KeyType::Ed25519, None))
            .unwrap();
        drop(ks);
        hsm.delete_token().unwrap();
        let report = open_and_verify(&path, &hsm.config("hsm"));
        assert_eq!(report.status(), Status::Unchecked, "{report:#?}");
        let objects = section(&report, CheckKind::Objects);
        assert_eq!(objects.findings.len(), 2, "{report:#?}");
        for f in &objects.findings {
            assert_eq!(f.status, Status::Unchecked);
            assert!(
                f.what
                    .starts_with("not checked: backend `hsm` is unavailable"),
                "{f:?}"
            );
        }
        assert!(
            objects.summary.contains("1 found as recorded"),
            "{}",
            objects.summary
        );

        // A backend the configuration lacks: unchecked too.
        let report = open_and_verify(&path, &Config::default());
        assert_eq!(report.status(), Status::Unchecked);
        assert!(section(&report, CheckKind::Objects).findings[0]
            .what
            .contains("backend `hsm` is not in the configuration"));
    }

    /// The same on openCryptoki's soft token: passes, then its objects destroyed are reported.
    #[test]
    fn opencryptoki_objects_are_checked() {
        let ock = OpenCryptoki::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let ks = Keystore::create_with(
            &path,
            &support::sealer(support::PASSPHRASE),
            &ock.config("ock"),
        )
        .unwrap();
        let key = ks
            .create_key(&request(
                ock.namespace(),
                "k",
                KeyType::HmacSha256,
                Some("ock"),
            ))
            .unwrap();
        let label = format!("{}/k", ock.namespace());
        assert_eq!(ks.verify_store(&|_| {}).unwrap().status(), Status::Passed);
        assert_eq!(ock.destroy_objects().unwrap(), 1);
        let report = ks.verify_store(&|_| {}).unwrap();
        let found = about(&report, CheckKind::Objects, &label);
        assert_eq!(found.len(), 1, "{report:#?}");
        assert_eq!(found[0].status, Status::Failed);
        assert_eq!(
            found[0].key.as_ref().unwrap().id.as_deref(),
            Some(key.id.as_str())
        );
    }
}

#[cfg(feature = "tpm")]
mod tpm {
    use super::*;
    use keyhold::testing::Swtpm;

    /// TPM blobs load; with swtpm stopped, the TPM's keys are unchecked.
    #[test]
    fn tpm_blobs_load_and_a_stopped_tpm_leaves_them_unchecked() {
        let mut tpm = Swtpm::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let config = tpm.config("tpm");
        let ks =
            Keystore::create_with(&path, &support::sealer(support::PASSPHRASE), &config).unwrap();
        ks.create_key(&request("default", "t", KeyType::EcdsaP256, Some("tpm")))
            .unwrap();
        ks.create_key(&request("default", "h", KeyType::HmacSha256, Some("tpm")))
            .unwrap();
        drop(ks);
        let report = open_and_verify(&path, &config);
        assert_eq!(report.status(), Status::Passed, "{report:#?}");
        assert!(section(&report, CheckKind::Objects)
            .summary
            .starts_with("2 key versions: 2 found as recorded"));

        tpm.kill().unwrap();
        let report = open_and_verify(&path, &config);
        assert_eq!(report.status(), Status::Unchecked, "{report:#?}");
        let objects = section(&report, CheckKind::Objects);
        assert_eq!(objects.findings.len(), 2);
        assert!(objects
            .findings
            .iter()
            .all(|f| f.status == Status::Unchecked && f.what.contains("`tpm`")));
    }
}
