//! Crash safety (`doctor` finds orphaned and missing token objects) and the `pkcs11` sealer, on
//! real SoftHSM2 tokens.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::sync::Arc;

use keyhold::backend::pkcs11::Pkcs11Backend;
use keyhold::backend::{Backend, KeyContext};
use keyhold::testing::SoftHsm;
use keyhold::{
    Argon2Params, Error, KeyRequest, KeySpec, KeyType, Keystore, PassphraseSealer, Pkcs11Sealer,
    SignatureFormat,
};
use secrecy::SecretString;

fn passphrase() -> PassphraseSealer {
    PassphraseSealer::new(SecretString::from("doctor tests".to_owned()))
        .with_params(Argon2Params {
            memory_mib: 8,
            iterations: 1,
            parallelism: 1,
        })
        .unwrap()
}

fn request(name: &str, key_type: KeyType) -> KeyRequest {
    KeyRequest {
        namespace: "default".into(),
        name: name.into(),
        spec: KeySpec::new(key_type, None, None).unwrap(),
        backend: Some("hsm".into()),
    }
}

struct Fixture {
    hsm: SoftHsm,
    _dir: tempfile::TempDir,
    ks: Keystore,
}

fn fixture() -> Fixture {
    let hsm = SoftHsm::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let ks = Keystore::create_with(&path, &passphrase(), &hsm.config("hsm")).unwrap();
    Fixture { hsm, _dir: dir, ks }
}

/// A key made in the token whose record was never written: what a crash between
/// `C_GenerateKeyPair` and the SQLite insert leaves behind.
fn orphan(f: &Fixture) -> String {
    let backend = Pkcs11Backend::new("hsm", &f.hsm.backend_config()).unwrap();
    let spec = KeySpec::new(KeyType::EcdsaP256, None, None).unwrap();
    let made = backend
        .generate(KeyContext {
            store_id: &[0; 16],
            uuid: &[1; 16],
            label: "default/crashed",
            spec: &spec,
        })
        .unwrap();
    made.locator
}

#[test]
fn doctor_finds_and_removes_an_orphan_left_by_a_crash() {
    let f = fixture();
    let kept =
        f.ks.create_key(&request("kept", KeyType::EcdsaP256))
            .unwrap();
    let doctor = f.ks.doctor().unwrap();
    assert!(doctor.orphans.is_empty(), "{:?}", doctor.orphans);
    assert!(doctor.missing.is_empty(), "{:?}", doctor.missing);

    let locator = orphan(&f);
    let doctor = f.ks.doctor().unwrap();
    assert_eq!(doctor.orphans.len(), 1, "{:?}", doctor.orphans);
    assert_eq!(doctor.orphans[0].locator, locator);
    assert_eq!(doctor.orphans[0].label, "default/crashed");
    assert_eq!(doctor.orphans[0].backend, "hsm");

    // A recorded key is not an orphan and cannot be removed as one.
    let err = f.ks.remove_orphan("hsm", &kept.locator).unwrap_err();
    assert!(err.to_string().contains("not an orphan"), "{err}");
    f.ks.sign(&kept.id, b"still here", SignatureFormat::Der)
        .unwrap();

    f.ks.remove_orphan("hsm", &locator).unwrap();
    let doctor = f.ks.doctor().unwrap();
    assert!(doctor.orphans.is_empty(), "{:?}", doctor.orphans);
    f.ks.sign(&kept.id, b"still here", SignatureFormat::Der)
        .unwrap();
}

#[test]
fn doctor_reports_records_whose_objects_are_gone() {
    let f = fixture();
    let key =
        f.ks.create_key(&request("doomed", KeyType::HmacSha256))
            .unwrap();
    let backend = Pkcs11Backend::new("hsm", &f.hsm.backend_config()).unwrap();
    backend.destroy_object(&key.locator).unwrap();
    let doctor = f.ks.doctor().unwrap();
    assert_eq!(doctor.missing.len(), 1);
    assert_eq!(doctor.missing[0].name, "doomed");
    let hsm = doctor.backends.iter().find(|b| b.name == "hsm").unwrap();
    let report = hsm.report.as_ref().unwrap();
    assert_eq!(report.kind, "pkcs11");
    let token = &report.details.iter().find(|(k, _)| k == "token").unwrap().1;
    assert!(token.contains(f.hsm.label()), "{token}");
    // Using the key says what happened instead of failing obscurely.
    let err = f.ks.mac(&key.id, b"x").unwrap_err();
    assert!(err.to_string().contains("not on the token"), "{err}");
}

#[test]
fn pkcs11_sealer_seals_the_root_secret_in_the_token() {
    let hsm = SoftHsm::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let config = hsm.config("hsm");
    let sealer = || {
        Pkcs11Sealer::new(Arc::new(
            Pkcs11Backend::new("hsm", &hsm.backend_config()).unwrap(),
        ))
    };
    let id = {
        let ks = Keystore::create_with(&path, &sealer(), &config).unwrap();
        assert_eq!(ks.sealer_kind(), "pkcs11");
        let key = ks
            .create_key(&KeyRequest {
                backend: None,
                ..request("sw", KeyType::Ed25519)
            })
            .unwrap();
        // The sealing key lives in the token but is no orphan.
        let doctor = ks.doctor().unwrap();
        assert!(doctor.orphans.is_empty(), "{:?}", doctor.orphans);
        key.id
    };
    let ks = Keystore::open_with(&path, &sealer(), &config).unwrap();
    ks.sign(&id, b"reopened", SignatureFormat::Der).unwrap();

    // A passphrase cannot open a token-sealed store, and another token cannot either.
    let err = Keystore::open(&path, &passphrase()).unwrap_err();
    assert!(matches!(err, Error::Unseal { .. }), "{err}");
    let other = SoftHsm::new().unwrap();
    let wrong = Pkcs11Sealer::new(Arc::new(
        Pkcs11Backend::new("hsm", &other.backend_config()).unwrap(),
    ));
    let err = Keystore::open_with(&path, &wrong, &other.config("hsm")).unwrap_err();
    assert!(
        matches!(err, Error::Unseal { .. } | Error::BackendUnavailable { .. }),
        "{err}"
    );
}
