//! The library API on real stores in temp dirs: every key type, tampering, bad input.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::sync::Arc;

use keyhold::{Error, KeyRequest, KeySpec, KeyType, Keystore, Purpose, SignatureFormat};
use support::{sealer, TestStore, PASSPHRASE};

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn keystore_and_backends_are_send_and_sync() {
    assert_send_sync::<Keystore>();
    assert_send_sync::<Arc<dyn keyhold::Backend>>();
}

#[test]
fn every_type_and_purpose_works_end_to_end() {
    let t = TestStore::new();
    for key_type in KeyType::ALL {
        for &purpose in key_type.purposes() {
            let name = format!("{}-{}", key_type, purpose);
            let info = t.create(&name, key_type, Some(purpose));
            assert_eq!(info.spec.key_type(), key_type);
            let id = &info.id;
            match purpose {
                Purpose::Sign => {
                    for format in [SignatureFormat::Der, SignatureFormat::Raw] {
                        let sig = t.ks.sign(id, b"message", format).unwrap();
                        t.ks.verify(id, b"message", &sig, format).unwrap();
                        let err = t.ks.verify(id, b"massage", &sig, format).unwrap_err();
                        assert!(matches!(err, Error::VerificationFailed { .. }), "{err}");
                    }
                    let recorded = t.ks.public_key(id).unwrap();
                    assert_eq!(recorded, t.ks.backend_public_key(id).unwrap());
                }
                Purpose::Decrypt | Purpose::Encrypt => {
                    let env = t.ks.encrypt(id, b"secret data", b"aad").unwrap();
                    let pt = t.ks.decrypt(id, &env, b"aad").unwrap();
                    assert_eq!(pt.expose(), b"secret data");
                    let err = t.ks.decrypt(id, &env, b"other").unwrap_err();
                    assert!(matches!(err, Error::DecryptionFailed { .. }), "{err}");
                }
                Purpose::Mac => {
                    let tag = t.ks.mac(id, b"data").unwrap();
                    assert_eq!(tag.len(), 32);
                    t.ks.verify_mac(id, b"data", &tag).unwrap();
                    let err = t.ks.verify_mac(id, b"dat", &tag).unwrap_err();
                    assert!(matches!(err, Error::VerificationFailed { .. }), "{err}");
                }
                _ => unreachable!("no other purposes"),
            }
        }
    }
    assert_eq!(t.ks.list_keys(None).unwrap().len(), 11);
}

#[test]
fn ecdsa_raw_signatures_have_fixed_width() {
    let t = TestStore::new();
    let p256 = t.create("a", KeyType::EcdsaP256, None);
    let p384 = t.create("b", KeyType::EcdsaP384, None);
    assert_eq!(
        t.ks.sign(&p256.id, b"m", SignatureFormat::Raw)
            .unwrap()
            .len(),
        64
    );
    assert_eq!(
        t.ks.sign(&p384.id, b"m", SignatureFormat::Raw)
            .unwrap()
            .len(),
        96
    );
    // A DER signature is not accepted as raw, nor the other way round.
    let der = t.ks.sign(&p256.id, b"m", SignatureFormat::Der).unwrap();
    let err =
        t.ks.verify(&p256.id, b"m", &der, SignatureFormat::Raw)
            .unwrap_err();
    assert!(matches!(err, Error::VerificationFailed { .. }), "{err}");
    let raw = t.ks.sign(&p256.id, b"m", SignatureFormat::Raw).unwrap();
    let err =
        t.ks.verify(&p256.id, b"m", &raw, SignatureFormat::Der)
            .unwrap_err();
    assert!(matches!(err, Error::VerificationFailed { .. }), "{err}");
}

#[test]
fn ids_survive_reopening_and_keys_keep_working() {
    let t = TestStore::new();
    let key = t.create("k", KeyType::Ed25519, None);
    let sig = t.ks.sign(&key.id, b"m", SignatureFormat::Der).unwrap();
    drop(t.ks.list_keys(None).unwrap());
    let again = t.reopen().unwrap();
    again
        .verify(&key.id, b"m", &sig, SignatureFormat::Der)
        .unwrap();
    assert_eq!(again.key_info(&key.id).unwrap(), key);
}

#[test]
fn an_id_from_another_store_is_refused() {
    let a = TestStore::new();
    let b = TestStore::new();
    let key = a.create("same-name", KeyType::HmacSha256, None);
    b.create("same-name", KeyType::HmacSha256, None);
    let err = b.ks.mac(&key.id, b"x").unwrap_err();
    assert!(matches!(err, Error::KeyIdAuthentication { .. }), "{err}");
    assert!(err.to_string().contains("another store"), "{err}");
}

#[test]
fn destroyed_keys_say_when_not_bad_ids() {
    let t = TestStore::new();
    let key = t.create("gone", KeyType::Aes256Gcm, None);
    let tombstone = t.ks.destroy_key(&key.id).unwrap();
    let on = keyhold::time::format_utc(tombstone.destroyed_at.unwrap());
    let err = t.ks.encrypt(&key.id, b"x", b"").unwrap_err();
    assert!(matches!(err, Error::WrongState { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!("key `default/gone` is destroyed on {on}: it cannot encrypt")
    );
    // The name is free again, and the new key has a new ID; the old ID still names the
    // tombstone, and the name the new key.
    let again = t.create("gone", KeyType::Aes256Gcm, None);
    assert_ne!(again.id, key.id);
    let err = t.ks.encrypt(&key.id, b"x", b"").unwrap_err();
    assert!(matches!(err, Error::WrongState { .. }), "{err}");
    let by_name = t.ks.key_info_by_name("default", "gone").unwrap().unwrap();
    assert_eq!(by_name.id, again.id);
    t.ks.encrypt(&again.id, b"x", b"").unwrap();
}

#[test]
fn wrong_purpose_is_refused_and_named() {
    let t = TestStore::new();
    let signer = t.create("signer", KeyType::EcdsaP256, None);
    let aes = t.create("aes", KeyType::Aes256Gcm, None);
    let rsa_dec = t.create("rsa", KeyType::Rsa2048, Some(Purpose::Decrypt));
    let before = t.snapshot();
    let err = t.ks.encrypt(&signer.id, b"x", b"").unwrap_err();
    assert_eq!(
        err.to_string(),
        "key `default/signer` has purpose sign: it cannot encrypt"
    );
    let err = t.ks.sign(&aes.id, b"x", SignatureFormat::Der).unwrap_err();
    assert!(
        matches!(
            err,
            Error::WrongPurpose {
                purpose: "encrypt",
                ..
            }
        ),
        "{err}"
    );
    let err = t.ks.mac(&signer.id, b"x").unwrap_err();
    assert_eq!(
        err.to_string(),
        "key `default/signer` has purpose sign: it cannot compute a MAC"
    );
    let err =
        t.ks.sign(&rsa_dec.id, b"x", SignatureFormat::Der)
            .unwrap_err();
    assert_eq!(
        err.to_string(),
        "key `default/rsa` has purpose decrypt: it cannot sign"
    );
    let err = t.ks.public_key(&aes.id).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput(m) if m.ends_with("secret key: it has no public key")),
        "{err:?}"
    );
    assert_eq!(t.snapshot(), before);
}

#[test]
fn empty_and_oversized_input_is_refused_before_use() {
    let t = TestStore::new();
    let signer = t.create("s", KeyType::EcdsaP256, None);
    let aes = t.create("a", KeyType::Aes256Gcm, None);
    let mac = t.create("m", KeyType::HmacSha256, None);
    let big = vec![0u8; keyhold::MAX_INPUT + 1];
    let before = t.snapshot();
    for err in [
        t.ks.sign(&signer.id, b"", SignatureFormat::Der)
            .unwrap_err(),
        t.ks.encrypt(&aes.id, b"", b"").unwrap_err(),
        t.ks.mac(&mac.id, b"").unwrap_err(),
    ] {
        assert!(
            err.to_string().starts_with("input is empty: nothing to"),
            "{err}"
        );
    }
    for err in [
        t.ks.sign(&signer.id, &big, SignatureFormat::Der)
            .unwrap_err(),
        t.ks.encrypt(&aes.id, &big, b"").unwrap_err(),
        t.ks.mac(&mac.id, &big).unwrap_err(),
    ] {
        assert!(err.to_string().contains("64 MiB limit"), "{err}");
    }
    assert_eq!(t.snapshot(), before);
    // Exactly the limit is accepted.
    let max = vec![7u8; keyhold::MAX_INPUT];
    let env = t.ks.encrypt(&aes.id, &max, b"").unwrap();
    assert_eq!(t.ks.decrypt(&aes.id, &env, b"").unwrap().expose(), &max[..]);
}

#[test]
fn modified_envelopes_fail_without_detail() {
    let t = TestStore::new();
    let aes = t.create("a", KeyType::Aes256Gcm, None);
    let other = t.create("b", KeyType::Aes256Gcm, None);
    let env = t.ks.encrypt(&aes.id, b"attack at dawn", b"ctx").unwrap();
    assert_eq!(&env[..4], b"KHE1");
    for i in 0..env.len() {
        let mut bad = env.clone();
        bad[i] ^= 0x01;
        let err = t.ks.decrypt(&aes.id, &bad, b"ctx").unwrap_err();
        assert!(
            matches!(err, Error::DecryptionFailed { .. }),
            "byte {i}: {err}"
        );
    }
    for cut in 0..env.len() {
        let err = t.ks.decrypt(&aes.id, &env[..cut], b"ctx").unwrap_err();
        // Empty input is refused as such; a cut inside the framing (25-byte header, the nonce length, a 12-byte
        // nonce, then at least one byte) is named; past it, authentication fails.
        let expected = match cut {
            0 => "input is empty: nothing to decrypt",
            1..=38 => "truncated",
            _ => "does not match",
        };
        assert!(err.to_string().contains(expected), "cut {cut}: {err}");
        assert_eq!(
            matches!(err, Error::DecryptionFailed { .. }),
            cut > 0,
            "cut {cut}: {err:?}"
        );
    }
    let err = t.ks.decrypt(&other.id, &env, b"ctx").unwrap_err();
    assert!(err.to_string().contains("another key"), "{err}");
    let err = t.ks.decrypt(&aes.id, &env, b"").unwrap_err();
    assert_eq!(
        err.to_string(),
        "decryption failed: the ciphertext, its AAD or the key does not match"
    );
}

#[test]
fn rsa_oaep_plaintext_limit_is_explained() {
    let t = TestStore::new();
    let key = t.create("r", KeyType::Rsa2048, Some(Purpose::Decrypt));
    let ok = vec![1u8; 190];
    let env = t.ks.encrypt(&key.id, &ok, b"").unwrap();
    assert_eq!(t.ks.decrypt(&key.id, &env, b"").unwrap().expose(), &ok[..]);
    let err = t.ks.encrypt(&key.id, &[1u8; 191], b"").unwrap_err();
    assert!(err.to_string().contains("at most 190 bytes"), "{err}");
}

#[test]
fn wrong_passphrase_is_refused_and_changes_nothing() {
    let t = TestStore::new();
    t.create("k", KeyType::EcdsaP256, None);
    let before = t.snapshot();
    let err = Keystore::open(&t.path, &sealer("not the passphrase")).unwrap_err();
    assert!(matches!(err, Error::Unseal { .. }), "{err}");
    assert!(err.to_string().contains("wrong passphrase"), "{err}");
    assert!(!err.to_string().contains(PASSPHRASE));
    assert_eq!(t.snapshot(), before);
}

#[test]
fn missing_existing_and_corrupt_stores_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing-here");
    let err = Keystore::open(&missing, &sealer(PASSPHRASE)).unwrap_err();
    assert!(err.to_string().contains("keyhold init"), "{err}");
    assert!(!missing.exists(), "opening must not create a store");

    let t = TestStore::new();
    let before = t.snapshot();
    let err = Keystore::create(&t.path, &sealer(PASSPHRASE)).unwrap_err();
    assert!(matches!(err, Error::StoreExists { .. }), "{err}");
    assert_eq!(t.snapshot(), before);

    std::fs::write(t.db(), b"this is not a database, just garbage bytes....").unwrap();
    let err = t.reopen().unwrap_err();
    assert!(matches!(err, Error::StoreUnusable { .. }), "{err}");
    assert!(
        err.to_string().contains("not a readable SQLite database"),
        "{err}"
    );
}

#[test]
fn a_store_from_a_newer_keyhold_is_refused() {
    let t = TestStore::new();
    {
        let conn = rusqlite::Connection::open(t.db()).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
    }
    let err = t.reopen().unwrap_err();
    assert!(err.to_string().contains("newer than this keyhold"), "{err}");
}

#[test]
fn store_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let t = TestStore::new();
    t.create("k", KeyType::EcdsaP256, None);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&t.path), 0o700);
    for file in t.snapshot().keys() {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
}

/// Each column of a key record, changed in the database behind keyhold's back.
fn tamper(t: &TestStore, sql: &str) {
    let conn = rusqlite::Connection::open(t.db()).unwrap();
    let n = conn.execute(sql, []).unwrap();
    assert_eq!(n, 1, "{sql} changed {n} rows");
}

#[test]
fn tampered_records_are_refused() {
    let cases = [
        "UPDATE keys SET name = 'other'",
        "UPDATE keys SET namespace = 'other'",
        "UPDATE keys SET key_type = 'ecdsa-p384'",
        "UPDATE keys SET algorithm = 'ecdsa-p384-sha384'",
        "UPDATE keys SET locator = 'x' || locator",
        "UPDATE keys SET state = 'active '",
        "UPDATE keys SET version = 2",
        "UPDATE keys SET created_at = created_at - 1",
        "UPDATE keys SET public_key = NULL",
        "UPDATE keys SET public_key = CAST(public_key || x'00' AS BLOB)",
        "UPDATE keys SET blob = substr(blob, 1, length(blob) - 1)",
        "UPDATE keys SET mac = zeroblob(32)",
        "UPDATE keys SET uuid = zeroblob(16)",
    ];
    for sql in cases {
        let t = TestStore::new();
        let key = t.create("k", KeyType::EcdsaP256, None);
        tamper(&t, sql);
        let before = t.snapshot();
        // A store with a record that fails its MAC no longer opens (see
        // `a_store_whose_records_fail_their_macs_does_not_open`); a keystore that was open before
        // the change refuses the record when it is used.
        let reopened = t.reopen().expect_err(sql);
        assert!(
            matches!(reopened, Error::Integrity { .. }),
            "{sql}: {reopened:?}"
        );
        let ks = &t.ks;
        let err = ks.sign(&key.id, b"m", SignatureFormat::Der).expect_err(sql);
        match (&err, sql.contains("uuid") || sql.contains("mac =")) {
            // The record's MAC (or its uuid) is what the store's commitment counts: the key's
            // rows are no longer the ones committed, which is checked first at each use.
            (Error::StoreTampered { .. }, true) => {}
            (Error::Integrity { .. }, false) => {}
            _ => panic!("{sql}: unexpected {err}"),
        }
        let listed = ks.list_keys(None).unwrap_err();
        assert!(matches!(listed, Error::Integrity { .. }), "{sql}: {listed}");
        assert_eq!(t.snapshot(), before, "{sql} changed the store");
    }
}

#[test]
fn records_swapped_between_keys_are_refused() {
    let t = TestStore::new();
    let a = t.create("a", KeyType::HmacSha256, None);
    let b = t.create("b", KeyType::HmacSha256, None);
    // Give `a` the sealed material of `b`: its MAC covers the blob, so `a` must refuse it.
    tamper(
        &t,
        "UPDATE keys SET blob = (SELECT blob FROM keys WHERE name = 'b') WHERE name = 'a'",
    );
    let err = t.ks.mac(&a.id, b"x").unwrap_err();
    assert!(matches!(err, Error::Integrity { .. }), "{err}");
    t.ks.mac(&b.id, b"x").unwrap();
}

#[test]
fn many_threads_share_one_keystore() {
    let t = TestStore::new();
    let key = t.create("k", KeyType::EcdsaP256, None);
    let ks = Arc::new(t.reopen().unwrap());
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let ks = Arc::clone(&ks);
            let id = key.id.clone();
            std::thread::spawn(move || {
                for j in 0..50 {
                    let msg = format!("{i}-{j}");
                    let sig = ks.sign(&id, msg.as_bytes(), SignatureFormat::Der).unwrap();
                    ks.verify(&id, msg.as_bytes(), &sig, SignatureFormat::Der)
                        .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn duplicate_names_and_bad_names_are_refused() {
    let t = TestStore::new();
    let first = t.create("dup", KeyType::Ed25519, None);
    let request = |name: &str| KeyRequest {
        namespace: "default".into(),
        name: name.into(),
        spec: KeySpec::new(KeyType::Ed25519, None, None).unwrap(),
        backend: None,
    };
    let err = t.ks.create_key(&request("dup")).unwrap_err();
    assert!(matches!(err, Error::KeyExists { .. }), "{err}");
    t.ks.sign(&first.id, b"still works", SignatureFormat::Der)
        .unwrap();
    for bad in ["", "../x", "a/b", &"x".repeat(65)] {
        let err = t.ks.create_key(&request(bad)).unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{bad:?}: {err:?}");
    }
    let mut elsewhere = request("dup");
    elsewhere.namespace = "team-b".into();
    t.ks.create_key(&elsewhere).unwrap();
    assert_eq!(t.ks.list_keys(Some("team-b")).unwrap().len(), 1);
    assert_eq!(t.ks.list_keys(Some("default")).unwrap().len(), 1);
    let mut unknown = request("x");
    unknown.backend = Some("hsm".into());
    let err = t.ks.create_key(&unknown).unwrap_err();
    assert!(err.to_string().contains("no backend named `hsm`"), "{err}");
}

#[test]
fn a_key_destroyed_by_another_process_is_gone_here_too() {
    // Two keystores on one store are two SQLite connections, as two processes would have.
    let t = TestStore::new();
    let key = t.create("shared", KeyType::Ed25519, None);
    let other = t.reopen().unwrap();
    // Both have used (and so resolved and cached) the key.
    t.ks.sign(&key.id, b"m", SignatureFormat::Der).unwrap();
    other.sign(&key.id, b"m", SignatureFormat::Der).unwrap();
    other.destroy_key(&key.id).unwrap();
    // Another connection's commit is seen within the keystore's documented window.
    std::thread::sleep(Keystore::OTHERS_SEEN_WITHIN * 2);
    let err = t.ks.sign(&key.id, b"m", SignatureFormat::Der).unwrap_err();
    assert!(
        matches!(&err, Error::WrongState { state, .. } if state.starts_with("destroyed on ")),
        "{err}"
    );
    // And a record changed behind both keystores' backs is re-verified, not served from a cache.
    let kept = t.create("kept", KeyType::Ed25519, None);
    t.ks.sign(&kept.id, b"m", SignatureFormat::Der).unwrap();
    tamper(
        &t,
        "UPDATE keys SET created_at = created_at + 1 WHERE name = 'kept'",
    );
    std::thread::sleep(Keystore::OTHERS_SEEN_WITHIN * 2);
    let err = t.ks.sign(&kept.id, b"m", SignatureFormat::Der).unwrap_err();
    assert!(matches!(err, Error::Integrity { .. }), "{err}");
}

#[test]
fn init_refuses_a_directory_that_holds_other_things() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(home.join("notes.txt"), b"mine").unwrap();
    let err = Keystore::create(&home, &sealer(PASSPHRASE)).unwrap_err();
    assert!(err.to_string().contains("is not empty"), "{err}");
    let mode = std::fs::metadata(&home).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o755,
        "init must not change the permissions of a directory it refused"
    );
    assert!(!home.join(keyhold::store::DB_FILE).exists());
}

/// Changes meta entries behind keyhold's back.
/// Every key record is checked under the unsealed root at open: one that fails refuses the store
/// (a replaced root with one record forged under it must not open). In a passphrase store, which
/// the user's passphrase opened, every record failing is still changed records, not a replaced
/// root (for the seals that open without the user, tests/tpm_sealer.rs).
#[test]
fn a_store_whose_records_fail_their_macs_does_not_open() {
    let t = TestStore::new();
    t.create("a", KeyType::HmacSha256, None);
    t.create("b", KeyType::Ed25519, None);
    tamper(
        &t,
        "UPDATE keys SET created_at = created_at + 1 WHERE name = 'a'",
    );
    match t.reopen().unwrap_err() {
        Error::Integrity { what } => assert!(
            what.contains("1 of the store's 2 key records fail their MAC"),
            "{what}"
        ),
        other => panic!("expected Error::Integrity, got {other:?}"),
    }
    tamper(
        &t,
        "UPDATE keys SET created_at = created_at + 1 WHERE name = 'b'",
    );
    match t.reopen().unwrap_err() {
        Error::Integrity { what } => assert!(
            what.contains("2 of the store's 2 key records fail their MAC"),
            "{what}"
        ),
        other => panic!("expected Error::Integrity, got {other:?}"),
    }
}

/// The store's metadata is authenticated under the root: a changed or missing MAC, or a changed
/// entry it covers, refuses the store once unsealed.
#[test]
fn store_metadata_is_authenticated_under_the_root() {
    for sql in [
        "UPDATE meta SET value = CAST(CAST(CAST(value AS TEXT) + 1 AS TEXT) AS BLOB) \
         WHERE key = 'created_at'",
        "UPDATE meta SET value = zeroblob(32) WHERE key = 'meta_mac'",
        "DELETE FROM meta WHERE key = 'meta_mac'",
    ] {
        let t = TestStore::new();
        t.create("k", KeyType::HmacSha256, None);
        tamper(&t, sql);
        let before = t.snapshot();
        match t.reopen().unwrap_err() {
            Error::Integrity { what } => {
                assert!(what.contains("sealer metadata"), "{sql}: {what}")
            }
            other => panic!("{sql}: expected Error::Integrity, got {other:?}"),
        }
        assert_eq!(
            t.snapshot(),
            before,
            "{sql}: the refused open wrote to the store"
        );
    }
}

/// Argon2 parameters lowered in the store (below OWASP's 19 MiB, t=2) are refused before Argon2
/// runs, with the error that says they were modified.
#[test]
fn weakened_argon2_parameters_in_the_store_are_refused() {
    let t = TestStore::new();
    support::edit_seal_params(&t.path, |p| p["memory_kib"] = 8192.into());
    match t.reopen().unwrap_err() {
        Error::Unseal { reason } => assert!(
            reason.contains("argon2 parameters were modified") && reason.contains("8192 KiB"),
            "{reason}"
        ),
        other => panic!("expected Error::Unseal, got {other:?}"),
    }
}

/// The library leaves the host process alone: opening (and creating) a store changes neither
/// `RLIMIT_CORE` nor dumpability. Hardening is the application's choice
/// (`keyhold::secret::harden_process`, which the command calls).
#[test]
fn opening_a_store_does_not_change_the_core_limit() {
    use rustix::process::{getrlimit, Resource};
    let before = getrlimit(Resource::Core);
    assert_ne!(
        before.maximum,
        Some(0),
        "the hard core limit is already 0: this test cannot see a change"
    );
    let dumpable = rustix::process::dumpable_behavior().unwrap();
    let t = TestStore::new();
    t.reopen().unwrap();
    let after = getrlimit(Resource::Core);
    assert_eq!(
        (after.current, after.maximum),
        (before.current, before.maximum)
    );
    assert_eq!(rustix::process::dumpable_behavior().unwrap(), dumpable);
}

/// A destroyed software key's sealed blob does not stay in the database file's free pages.
#[test]
fn a_destroyed_keys_blob_is_wiped_from_the_file() {
    let t = TestStore::new();
    let key = t.create("gone", KeyType::Ed25519, None);
    t.create("kept", KeyType::HmacSha256, None);
    let blob: Vec<u8> = rusqlite::Connection::open(t.db())
        .unwrap()
        .query_row("SELECT blob FROM keys WHERE name = 'gone'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(blob.len() >= 48, "a sealed key blob");
    let file = std::fs::read(t.db()).unwrap();
    let holds = |file: &[u8], piece: &[u8]| file.windows(piece.len()).any(|w| w == piece);
    assert!(
        holds(&file, &blob[blob.len() - 32..]),
        "the blob is in the file before"
    );
    t.ks.destroy_key(&key.id).unwrap();
    for (path, file) in t.snapshot() {
        // Any 16 bytes of the blob's tail (the AES-GCM tag and ciphertext) would be a leftover.
        for piece in blob.chunks(16).filter(|c| c.len() == 16) {
            assert!(
                !holds(&file, piece),
                "{} still holds part of the destroyed key's blob",
                path.display()
            );
        }
    }
}

/// A store directory or database that group or others can write is refused at open, saying how to
/// fix it; so is one another user owns (checked when the test runs as root, which can give it away).
#[test]
fn a_store_others_can_write_or_own_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let t = TestStore::new();
    let set = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    let refused = |what: &str| match t.reopen().unwrap_err() {
        Error::StoreUnusable { reason, .. } => reason,
        other => panic!("{what}: expected Error::StoreUnusable, got {other:?}"),
    };
    set(&t.path, 0o770);
    let reason = refused("group-writable directory");
    assert!(
        reason.contains("writable by group or others")
            && reason.contains(&format!("chmod 700 {}", t.path.display())),
        "{reason}"
    );
    set(&t.path, 0o700);
    set(&t.db(), 0o606);
    let reason = refused("world-writable database");
    assert!(
        reason.contains(&format!("chmod 600 {}", t.db().display())),
        "{reason}"
    );
    set(&t.db(), 0o600);
    t.reopen().unwrap();
    if rustix::process::geteuid().is_root() {
        std::os::unix::fs::chown(t.db(), Some(65534), None).unwrap();
        let reason = refused("database of another user");
        assert!(
            reason.contains("belongs to uid 65534") && reason.contains("chown"),
            "{reason}"
        );
    }
}

/// `create` makes the store directory with one mkdir, mode 0700; an existing directory of another
/// user is refused rather than taken over (checked when the test runs as root).
#[test]
fn the_store_directory_is_made_private_in_one_step() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let store = shared.join("store");
    Keystore::create(&store, &sealer(PASSPHRASE)).unwrap();
    let mode = std::fs::metadata(&store).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700);
    if rustix::process::geteuid().is_root() {
        let planted = shared.join("planted");
        std::fs::create_dir(&planted).unwrap();
        std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).unwrap();
        let err = Keystore::create(&planted, &sealer(PASSPHRASE)).unwrap_err();
        assert!(err.to_string().contains("belongs to uid 65534"), "{err}");
        assert!(!planted.join(keyhold::store::DB_FILE).exists());
    }
}
