//! Crash safety (`doctor` finds orphaned and missing token objects) and the `pkcs11` sealer, on
//! real SoftHSM2 tokens.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::sync::Arc;

use keyhold::backend::pkcs11::Pkcs11Backend;
use keyhold::backend::{Backend, KeyContext, KeyOptions};
use keyhold::testing::SoftHsm;
use keyhold::{
    Argon2Params, Error, KeyRequest, KeySpec, KeyType, Keystore, PassphraseSealer, Pkcs11Sealer,
    SignatureFormat,
};
use secrecy::SecretString;

fn passphrase() -> PassphraseSealer {
    PassphraseSealer::new(SecretString::from("doctor tests".to_owned()))
        .with_params(Argon2Params {
            memory_mib: 19,
            iterations: 2,
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
    let store_id: [u8; 16] = keyhold::hex::decode(&f.ks.store_id())
        .unwrap()
        .try_into()
        .unwrap();
    made_by(f, &store_id)
}

/// A key object made in the token for the store `store_id`, with no record anywhere.
fn made_by(f: &Fixture, store_id: &[u8; 16]) -> String {
    let backend = Pkcs11Backend::new("hsm", &f.hsm.backend_config()).unwrap();
    let spec = KeySpec::new(KeyType::EcdsaP256, None, None).unwrap();
    let made = backend
        .generate(
            KeyContext {
                store_id,
                uuid: &[1; 16],
                label: "default/crashed",
                spec: &spec,
            },
            &KeyOptions::default(),
        )
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

    // Another store's object on the same token is neither an orphan nor removable from here.
    let foreign = made_by(&f, &[0x5a; 16]);
    let doctor = f.ks.doctor().unwrap();
    assert_eq!(doctor.orphans.len(), 1, "{:?}", doctor.orphans);
    assert_eq!(doctor.foreign_objects, 1);
    let err = f.ks.remove_orphan("hsm", &foreign).unwrap_err();
    assert!(
        err.to_string().contains("does not belong to this store"),
        "{err}"
    );

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

#[test]
fn a_backend_that_cannot_be_set_up_leaves_software_keys_working() {
    let hsm = SoftHsm::new().unwrap();
    let mut config = hsm.config("hsm");
    let keyhold::config::BackendConfig::Pkcs11(p) = config.backends.get_mut("hsm").unwrap() else {
        unreachable!("the fixture makes a pkcs11 backend")
    };
    p.module = "/nonexistent/libnothing.so".into();
    let dir = tempfile::tempdir().unwrap();
    let ks = Keystore::create_with(&dir.path().join("s"), &passphrase(), &config).unwrap();
    let sw = ks
        .create_key(&KeyRequest {
            backend: None,
            ..request("sw", KeyType::HmacSha256)
        })
        .unwrap();
    ks.mac(&sw.id, b"still works").unwrap();
    let err = ks
        .create_key(&request("hw", KeyType::EcdsaP256))
        .unwrap_err();
    assert!(matches!(err, Error::BackendUnavailable { .. }), "{err}");
    assert!(err.to_string().contains("libnothing.so"), "{err}");
    let doctor = ks.doctor().unwrap();
    let hsm_health = doctor.backends.iter().find(|b| b.name == "hsm").unwrap();
    let report_err = hsm_health.report.as_ref().unwrap_err().to_string();
    assert!(
        report_err.contains("cannot load the PKCS#11 module"),
        "{report_err}"
    );
}

#[test]
fn token_keys_have_exactly_one_usage() {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::object::{Attribute, AttributeType};
    use cryptoki::session::UserType;

    let f = fixture();
    let signer =
        f.ks.create_key(&request("signer", KeyType::EcdsaP256))
            .unwrap();
    let aes =
        f.ks.create_key(&request("aes", KeyType::Aes256Gcm))
            .unwrap();
    let mac =
        f.ks.create_key(&request("mac", KeyType::HmacSha256))
            .unwrap();

    let raw = Pkcs11::new(keyhold::testing::SOFTHSM_MODULE).unwrap();
    let _ = raw.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let slot = raw
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|&s| raw.get_token_info(s).unwrap().label().trim_end() == f.hsm.label())
        .unwrap();
    let session = raw.open_ro_session(slot).unwrap();
    match session.login(
        UserType::User,
        Some(&SecretString::from(
            keyhold::testing::TEST_USER_PIN.to_owned(),
        )),
    ) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
        }
        Err(e) => panic!("C_Login: {e}"),
    }
    let usages = |label: &str| -> Vec<(String, bool)> {
        let mut out = Vec::new();
        for handle in session
            .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
            .unwrap()
        {
            for attr in session
                .get_attributes(
                    handle,
                    &[
                        AttributeType::Sign,
                        AttributeType::Verify,
                        AttributeType::Encrypt,
                        AttributeType::Decrypt,
                        AttributeType::Wrap,
                        AttributeType::Unwrap,
                        AttributeType::Derive,
                    ],
                )
                .unwrap()
            {
                let (name, on) = match attr {
                    Attribute::Sign(v) => ("sign", v),
                    Attribute::Verify(v) => ("verify", v),
                    Attribute::Encrypt(v) => ("encrypt", v),
                    Attribute::Decrypt(v) => ("decrypt", v),
                    Attribute::Wrap(v) => ("wrap", v),
                    Attribute::Unwrap(v) => ("unwrap", v),
                    Attribute::Derive(v) => ("derive", v),
                    _ => continue,
                };
                if on {
                    out.push((name.to_owned(), on));
                }
            }
        }
        out.sort();
        out
    };
    let on = |v: &[&str]| -> Vec<(String, bool)> {
        let mut v: Vec<_> = v.iter().map(|s| (s.to_string(), true)).collect();
        v.sort();
        v
    };
    assert_eq!(
        usages("default/signer"),
        on(&["sign", "verify"]),
        "{}",
        signer.locator
    );
    assert_eq!(
        usages("default/aes"),
        on(&["decrypt", "encrypt"]),
        "{}",
        aes.locator
    );
    assert_eq!(
        usages("default/mac"),
        on(&["sign", "verify"]),
        "{}",
        mac.locator
    );
}

#[test]
fn an_empty_pin_is_never_sent() {
    let hsm = SoftHsm::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pin = dir.path().join("pin");
    std::fs::write(&pin, b"\n").unwrap();
    let mut config = hsm.backend_config();
    config.pin_file = Some(pin);
    let backend = Pkcs11Backend::new("hsm", &config).unwrap();
    let spec = KeySpec::new(KeyType::EcdsaP256, None, None).unwrap();
    let context = KeyContext {
        store_id: &[7; 16],
        uuid: &[1; 16],
        label: "default/k",
        spec: &spec,
    };
    for _ in 0..2 {
        let err = backend
            .generate(context, &KeyOptions::default())
            .unwrap_err();
        assert!(matches!(err, Error::BackendLogin { .. }), "{err}");
        assert!(err.to_string().contains("PIN is empty"), "{err}");
    }
    assert_eq!(backend.login_attempts(), 0);
}
