//! Attacks a security review of issue 8's fixes found still open, each performed against a real
//! SoftHSM2 token: an extractable key replaced by one wrappable under any key (M4), an orphan
//! removed through a second backend on the same token (M3), and a tampered record reported as a
//! replaced root. Each failed before its fix.
#![cfg(feature = "pkcs11")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::path::PathBuf;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType as CkKeyType, ObjectClass};
use keyhold::backend::KeyOptions;
use keyhold::config::{BackendConfig, Config};
use keyhold::testing::SoftHsm;
use keyhold::{Error, KeyRequest, KeySpec, KeyType, Keystore};
use support::pkcs11::raw_session;
use support::{sealer, unhex, PASSPHRASE};
use tempfile::TempDir;

fn store(config: &Config) -> (TempDir, PathBuf, Keystore) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let ks = Keystore::create_with(&path, &sealer(PASSPHRASE), config).unwrap();
    (dir, path, ks)
}

fn request(name: &str, key_type: KeyType, backend: &str) -> KeyRequest {
    KeyRequest {
        namespace: "tests".into(),
        name: name.into(),
        spec: KeySpec::new(key_type, None, None).unwrap(),
        backend: Some(backend.into()),
    }
}

/// M4, extractable keys: the lookup template of a key created `--extractable` does not pin
/// `CKA_WRAP_WITH_TRUSTED`, which keyhold requires at generation. A PIN holder destroys the key
/// and generates in the token a same-`CKA_ID` replacement that is local, sensitive, always
/// sensitive and extractable, but wrappable under any key. keyhold then encrypts with it; the
/// attacker wraps it out under a key of their own and reads every envelope made since.
#[test]
fn an_extractable_key_replaced_by_one_wrappable_under_any_key_is_never_used() {
    let hsm = SoftHsm::new().unwrap();
    let (_dir, path, ks) = store(&hsm.config("hsm"));
    let info = ks
        .create_key_with(
            &request("vault", KeyType::Aes256Gcm, "hsm"),
            &KeyOptions::new().extractable(true),
        )
        .unwrap();
    assert_eq!(
        info.attributes.get("wrap_with_trusted").map(String::as_str),
        Some("true")
    );
    drop(ks);

    // The attacker, with the PIN.
    let session = raw_session(hsm.label());
    let id = unhex(&info.locator);
    for handle in session.find_objects(&[Attribute::Id(id.clone())]).unwrap() {
        session.destroy_object(handle).unwrap();
    }
    let planted = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(true),
                Attribute::WrapWithTrusted(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::ValueLen(32.into()),
                Attribute::Id(id),
                Attribute::Label(b"tests/vault".to_vec()),
            ],
        )
        .unwrap();

    // keyhold, later (a new process).
    let ks = Keystore::open_with(&path, &sealer(PASSPHRASE), &hsm.config("hsm")).unwrap();
    let used = ks.encrypt(&info.id, b"payroll 2026", b"aad");

    // Whatever keyhold did, the planted key can be wrapped out by the attacker: if keyhold
    // encrypted with it, the attacker reads the envelope.
    let wrapper = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
                Attribute::ValueLen(32.into()),
            ],
        )
        .unwrap();
    let wrapped = session
        .wrap_key(&Mechanism::AesKeyWrap, wrapper, planted)
        .unwrap();
    let copy = session
        .unwrap_key(
            &Mechanism::AesKeyWrap,
            wrapper,
            &wrapped,
            &[
                Attribute::Token(false),
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(CkKeyType::AES),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
            ],
        )
        .unwrap();
    let value = session
        .get_attributes(copy, &[cryptoki::object::AttributeType::Value])
        .unwrap();
    let [Attribute::Value(value)] = value.as_slice() else {
        panic!("no CKA_VALUE: {value:?}");
    };
    assert_eq!(
        value.len(),
        32,
        "the attacker holds the planted key's value"
    );

    match used {
        Err(Error::KeyObjectMismatch { reason, .. }) => {
            assert!(reason.contains("CKA_WRAP_WITH_TRUSTED"), "{reason}")
        }
        Ok(envelope) => {
            // Envelope: "KHE1", algorithm, uuid, version (25 bytes), nonce length, nonce, body;
            // the GCM AAD is the 25-byte header then the caller's AAD.
            use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
            let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, value).unwrap());
            let nonce = Nonce::try_assume_unique_for_key(&envelope[26..38]).unwrap();
            let mut aad = envelope[..25].to_vec();
            aad.extend_from_slice(b"aad");
            let mut body = envelope[38..].to_vec();
            let plain = key
                .open_in_place(nonce, Aad::from(aad), &mut body)
                .map(|p| String::from_utf8_lossy(p).into_owned());
            panic!("keyhold encrypted under a key the attacker extracted; they read: {plain:?}")
        }
        Err(other) => panic!("expected KeyObjectMismatch, got {other:?}"),
    }
}

/// M3, another spelling of the backend: two configured backends that reach one token (say, one
/// per PIN source or fallback policy). `doctor` lists every key of `hsm` as an orphan of `alias`,
/// and `--remove-orphan alias:LOCATOR` destroys a recorded key: the guard compares backend
/// names, not the objects they reach.
#[test]
fn remove_orphan_through_a_second_backend_on_the_same_token_is_refused() {
    let hsm = SoftHsm::new().unwrap();
    let mut config = hsm.config("hsm");
    config
        .backends
        .insert("alias".into(), BackendConfig::Pkcs11(hsm.backend_config()));
    let (_dir, _path, ks) = store(&config);
    let info = ks
        .create_key(&request("signer", KeyType::EcdsaP256, "hsm"))
        .unwrap();

    let doctor = ks.doctor().unwrap();
    let listed: Vec<String> = doctor
        .orphans
        .iter()
        .map(|o| format!("{}:{}", o.backend, o.locator))
        .collect();
    let removed = ks.remove_orphan("alias", &info.locator);
    let signed = ks.sign(&info.id, b"m", keyhold::SignatureFormat::Der);
    match removed {
        Err(Error::InvalidInput(m)) => assert!(m.contains("not an orphan"), "{m}"),
        other => panic!(
            "expected a refusal, got {other:?}; doctor had listed as orphans {listed:?}; the \
             recorded key now signs: {:?}",
            signed.map(|_| ())
        ),
    }
    assert!(
        listed.is_empty(),
        "doctor lists a recorded key's objects as orphans: {listed:?}"
    );
}

/// A one-key store whose record was changed behind keyhold's back (the root secret untouched)
/// reads as "the sealed root secret was replaced" (`Error::Unseal`, exit 4, "store cannot be
/// unsealed"), not as a record that failed its integrity check (`Error::Integrity`, exit 6, as
/// docs/cli.md defines it). `tests/keystore.rs::tampered_records_are_refused` accepts either.
#[test]
fn a_tampered_record_in_a_one_key_store_is_an_integrity_failure_not_a_replaced_root() {
    let t = support::TestStore::new();
    t.create("only", KeyType::EcdsaP256, None);
    let conn = rusqlite::Connection::open(t.db()).unwrap();
    assert_eq!(
        conn.execute("UPDATE keys SET name = 'other'", []).unwrap(),
        1
    );
    drop(conn);
    match t.reopen() {
        Err(Error::Integrity { what }) => assert!(what.contains("fail"), "{what}"),
        Err(Error::Unseal { reason }) => {
            panic!("one tampered record, root untouched, is reported as a replaced root: {reason}")
        }
        other => panic!("expected Error::Integrity, got {other:?}"),
    }
}
