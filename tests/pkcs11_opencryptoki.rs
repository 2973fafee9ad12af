//! The PKCS#11 backend on openCryptoki's soft token, the second conformant implementation: its
//! token info has a malformed clock and unavailable counters, it has no EC or AES-GCM mechanisms,
//! and it refuses `CKA_COPYABLE`, `CKA_DESTROYABLE` and `CKA_WRAP_WITH_TRUSTED`.
//!
//! The token is machine-wide (label `keyhold-ock`, user PIN `12345678`, slot daemon running; see
//! `../shared/HARDWARE-NOTES.md`): each test uses its own namespace and destroys what it made.
#![cfg(feature = "pkcs11")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::path::{Path, PathBuf};

use keyhold::backend::pkcs11::Pkcs11Backend;
use keyhold::backend::Backend;
use keyhold::config::{BackendConfig, Config, Fallback, Pkcs11Config};
use keyhold::testing::{
    OpenCryptoki, OPENCRYPTOKI_LABEL, OPENCRYPTOKI_MODULE, OPENCRYPTOKI_USER_PIN,
};
use keyhold::{
    Error, KeyOptions, KeyRequest, KeySpec, KeyType, Keystore, Purpose, SignatureFormat,
};
use support::pkcs11::{objects_under, ock_raw_session};
use support::{openssl_verifies, sealer, PASSPHRASE};
use tempfile::TempDir;

const MODULE: &str = OPENCRYPTOKI_MODULE;
const LABEL: &str = OPENCRYPTOKI_LABEL;
const SERIAL: &str = "123";
const PIN: &str = OPENCRYPTOKI_USER_PIN;
const OCK: &str = "ock";

/// A backend configuration for the token, selected by label or serial, PIN from a file in `dir`.
/// Starts openCryptoki's slot daemon and sets its token up first if no test has yet.
fn ock_config(dir: &Path, label: Option<&str>, serial: Option<&str>) -> Pkcs11Config {
    OpenCryptoki::ensure_ready().expect("set up openCryptoki's soft token");
    let pin_file = dir.join("ock.pin");
    std::fs::write(&pin_file, PIN).unwrap();
    Pkcs11Config {
        module: PathBuf::from(MODULE),
        token_label: label.map(str::to_owned),
        token_serial: serial.map(str::to_owned),
        token_uri: None,
        pin_env: None,
        pin_file: Some(pin_file),
        pin_credential: None,
        max_sessions: None,
        fallback: Fallback::Refuse,
    }
}

/// A store whose backend `ock` is the token, with `fallback`.
struct OckStore {
    ks: Keystore,
    namespace: String,
    _dir: TempDir,
}

impl OckStore {
    fn new(fallback: Fallback) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut backend = ock_config(dir.path(), Some(LABEL), None);
        backend.fallback = fallback;
        let mut config = Config::default();
        config
            .backends
            .insert(OCK.into(), BackendConfig::Pkcs11(backend));
        let ks =
            Keystore::create_with(&dir.path().join("store"), &sealer(PASSPHRASE), &config).unwrap();
        let mut suffix = [0u8; 4];
        aws_lc_rs::rand::fill(&mut suffix).unwrap();
        let namespace = format!(
            "p11core-{}",
            suffix
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        Self {
            ks,
            namespace,
            _dir: dir,
        }
    }

    fn request(&self, name: &str, key_type: KeyType, purpose: Option<Purpose>) -> KeyRequest {
        KeyRequest {
            namespace: self.namespace.clone(),
            name: name.into(),
            spec: KeySpec::new(key_type, purpose, None).unwrap(),
            backend: Some(OCK.into()),
        }
    }
}

impl Drop for OckStore {
    /// The token is shared: whatever a test made goes, even when it failed half-way.
    fn drop(&mut self) {
        if let Ok(keys) = self.ks.list_keys(None) {
            for key in keys {
                let _ = self.ks.destroy_key(&key.id);
            }
        }
        let session = ock_raw_session();
        for handle in objects_under(&session, &format!("{}/", self.namespace)) {
            let _ = session.destroy_object(handle);
        }
    }
}

#[test]
fn opencryptoki_token_is_found_by_label_and_by_serial() {
    let dir = tempfile::tempdir().unwrap();
    let by_label = Pkcs11Backend::new(OCK, &ock_config(dir.path(), Some(LABEL), None)).unwrap();
    let report = by_label.report().unwrap();
    let token = report
        .details
        .iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.clone())
        .unwrap();
    assert_eq!(token, "`keyhold-ock` serial 123 (IBM Corp. IBM SoftTok)");
    // The malformed clock and the CK_UNAVAILABLE_INFORMATION counters are shown, not fatal.
    assert!(
        report
            .details
            .iter()
            .any(|(k, v)| k == "token clock" && v.len() == 8 && v.as_bytes()[2] == b':'),
        "{:?}",
        report.details
    );
    assert!(report.objects.is_some(), "{:?}", report.details);

    let by_serial = Pkcs11Backend::new(OCK, &ock_config(dir.path(), None, Some(SERIAL))).unwrap();
    let caps = by_serial.capabilities().unwrap();
    assert!(caps.supports(KeyType::Rsa2048, Purpose::Sign));

    // A label that is not there: the error names this token, not "none".
    let absent =
        Pkcs11Backend::new(OCK, &ock_config(dir.path(), Some("no-such-token"), None)).unwrap();
    let err = absent.capabilities().unwrap_err();
    match &err {
        Error::BackendUnavailable { reason, .. } => assert!(
            reason.contains("no token labelled `no-such-token` is present")
                && reason.contains("tokens present: `keyhold-ock` (serial 123)"),
            "{reason}"
        ),
        other => panic!("expected BackendUnavailable, got {other:?}"),
    }
}

#[test]
fn opencryptoki_capabilities_come_from_its_mechanism_info() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Pkcs11Backend::new(OCK, &ock_config(dir.path(), Some(LABEL), None)).unwrap();
    let caps = backend.capabilities().unwrap();
    for (key_type, purpose) in [
        (KeyType::Rsa2048, Purpose::Sign),
        (KeyType::Rsa4096, Purpose::Sign),
        (KeyType::Rsa2048, Purpose::Decrypt),
        (KeyType::HmacSha256, Purpose::Mac),
    ] {
        assert!(
            caps.supports(key_type, purpose),
            "{key_type} {purpose}: {:?}",
            caps.missing(key_type, purpose)
        );
    }
    for (key_type, purpose, lacks) in [
        (KeyType::EcdsaP256, Purpose::Sign, "CKM_EC_KEY_PAIR_GEN"),
        (KeyType::EcdsaP384, Purpose::Sign, "CKM_ECDSA"),
        (
            KeyType::Ed25519,
            Purpose::Sign,
            "CKM_EC_EDWARDS_KEY_PAIR_GEN",
        ),
        (KeyType::Aes256Gcm, Purpose::Encrypt, "CKM_AES_GCM"),
    ] {
        assert!(!caps.supports(key_type, purpose), "{key_type} {purpose}");
        let why = caps.missing(key_type, purpose).unwrap();
        assert!(
            why.starts_with("token `keyhold-ock` (IBM SoftTok) lacks") && why.contains(lacks),
            "{key_type} {purpose}: {why}"
        );
    }
}

#[test]
fn opencryptoki_makes_keys_without_the_attributes_it_refuses_and_they_work() {
    let t = OckStore::new(Fallback::Software);

    // RSA signing: made in the token without CKA_COPYABLE/CKA_DESTROYABLE (it refuses both).
    let signer =
        t.ks.create_key(&t.request("signer", KeyType::Rsa2048, None))
            .unwrap();
    assert_eq!(signer.backend, OCK);
    let attr = |info: &keyhold::KeyInfo, name: &str| info.attributes.get(name).cloned();
    assert_eq!(attr(&signer, "copyable").as_deref(), Some("not reported"));
    assert_eq!(
        attr(&signer, "destroyable").as_deref(),
        Some("not reported")
    );
    assert_eq!(attr(&signer, "usages").as_deref(), Some("sign"));
    assert_eq!(attr(&signer, "public_usages").as_deref(), Some("verify"));
    assert_eq!(attr(&signer, "never_extractable").as_deref(), Some("true"));
    assert_eq!(attr(&signer, "modifiable").as_deref(), Some("false"));
    assert_eq!(attr(&signer, "extra_usages"), None);
    let message = b"signed inside openCryptoki";
    let sig =
        t.ks.sign(&signer.id, message, SignatureFormat::Der)
            .unwrap();
    let pem = t.ks.public_key(&signer.id).unwrap().to_pem();
    assert!(openssl_verifies(
        &pem,
        signer.spec.algorithm(),
        message,
        &sig
    ));

    // RSA-OAEP with SHA-256 and a label: openCryptoki does it, so the key stays in the token.
    let decrypter =
        t.ks.create_key(&t.request("decrypter", KeyType::Rsa2048, Some(Purpose::Decrypt)))
            .unwrap();
    assert_eq!(decrypter.backend, OCK, "{:?}", decrypter.attributes);
    assert_eq!(attr(&decrypter, "usages").as_deref(), Some("decrypt"));
    let env = t.ks.encrypt(&decrypter.id, b"a data key", b"aad").unwrap();
    assert_eq!(
        t.ks.decrypt(&decrypter.id, &env, b"aad").unwrap().expose(),
        b"a data key"
    );
    let err = t.ks.decrypt(&decrypter.id, &env, b"other").unwrap_err();
    assert!(matches!(err, Error::DecryptionFailed { .. }), "{err:?}");

    // HMAC in the token.
    let mac =
        t.ks.create_key(&t.request("mac", KeyType::HmacSha256, None))
            .unwrap();
    assert_eq!(mac.backend, OCK);
    assert_eq!(attr(&mac, "usages").as_deref(), Some("sign+verify"));
    let tag = t.ks.mac(&mac.id, b"data").unwrap();
    t.ks.verify_mac(&mac.id, b"data", &tag).unwrap();

    // What it has no mechanism for falls back to software, and says so.
    for (name, key_type) in [("ec", KeyType::EcdsaP256), ("aes", KeyType::Aes256Gcm)] {
        let info = t.ks.create_key(&t.request(name, key_type, None)).unwrap();
        assert_eq!(info.backend, "software", "{name}");
        assert_eq!(attr(&info, "fallback_for").as_deref(), Some(OCK));
    }

    // Destroying removes the token's objects.
    let session = ock_raw_session();
    let prefix = format!("{}/", t.namespace);
    assert_eq!(
        objects_under(&session, &prefix).len(),
        5,
        "2 pairs and 1 secret"
    );
    for key in t.ks.list_keys(None).unwrap() {
        t.ks.destroy_key(&key.id).unwrap();
    }
    assert_eq!(objects_under(&session, &prefix), vec![]);
}

/// This is also why the C_WrapKey test of extractable keys (pkcs11.rs,
/// `extractable_keys_wrap_only_under_so_trusted_keys`) runs on SoftHSM2 only: openCryptoki 3.8.1
/// refuses CKA_WRAP_WITH_TRUSTED, so keyhold makes no extractable key on it to try to wrap.
#[test]
fn opencryptoki_refuses_extractable_keys_it_cannot_restrict_to_trusted_wrapping_keys() {
    let t = OckStore::new(Fallback::Refuse);
    let err =
        t.ks.create_key_with(
            &t.request("wrapme", KeyType::HmacSha256, None),
            &KeyOptions::new().extractable(true),
        )
        .unwrap_err();
    match &err {
        Error::Unsupported { backend, what } => {
            assert_eq!(backend, OCK);
            assert!(
                what.contains("CKA_WRAP_WITH_TRUSTED") && what.contains("AttributeTypeInvalid"),
                "{what}"
            );
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    assert!(t.ks.list_keys(None).unwrap().is_empty());
    assert_eq!(
        objects_under(&ock_raw_session(), &format!("{}/", t.namespace)),
        vec![],
        "a refused key left objects on the token"
    );
}
