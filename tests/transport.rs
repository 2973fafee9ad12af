//! Key transport through the library: export and import recorded as the keystore records
//! creations (history, audit log, attributes), and each backend's answer on real devices —
//! openCryptoki's soft token and swtpm besides the software backend (SoftHSM2 is exercised
//! through the binary in tests/cli_transport.rs).
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::KeyPair as _;
#[cfg(any(feature = "tpm", feature = "pkcs11"))]
use keyhold::Keystore;
use keyhold::{Error, ExportTo, KeyOptions, KeyRequest, KeySpec, KeyType, SignatureFormat};
use support::TestStore;
#[cfg(any(feature = "tpm", feature = "pkcs11"))]
use support::{sealer, PASSPHRASE};

fn request(namespace: &str, name: &str, key_type: KeyType, backend: &str) -> KeyRequest {
    KeyRequest {
        namespace: namespace.into(),
        name: name.into(),
        spec: KeySpec::new(key_type, None, None).unwrap(),
        backend: Some(backend.into()),
    }
}

/// A fresh P-256 private key (PKCS#8) and its public key (SPKI DER), made outside keyhold.
fn outside_p256() -> (Vec<u8>, Vec<u8>) {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let alg = &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING;
    let pkcs8 = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let pair = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref()).unwrap();
    let spki = pair.public_key().as_der().unwrap().as_ref().to_vec();
    (pkcs8.as_ref().to_vec(), spki)
}

#[test]
fn an_import_is_recorded_as_a_creation_is_with_its_origin() {
    let store = TestStore::new();
    let (pkcs8, spki) = outside_p256();
    let info = store
        .ks
        .import_key(
            &request("default", "byok", KeyType::EcdsaP256, "software"),
            &pkcs8,
            None,
            &KeyOptions::new(),
        )
        .unwrap();
    assert_eq!(
        info.attributes.get("origin").map(String::as_str),
        Some("imported")
    );
    assert_eq!(store.ks.public_key(&info.id).unwrap().spki_der(), &spki[..]);
    // The record survives a reopen (its MAC covers the attributes), with its history.
    let ks = store.reopen().unwrap();
    let history = ks.history(&info.id).unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].event, "imported");
    assert_eq!(history[0].to, "active");
    let import = ks
        .audit_entries()
        .unwrap()
        .into_iter()
        .find(|e| e.key_id.as_deref() == Some(info.id.as_str()))
        .unwrap();
    assert_eq!(
        (import.operation.as_str(), import.outcome.as_str()),
        ("import", "ok")
    );
    // The imported key signs as the original.
    let sig = ks.sign(&info.id, b"m", SignatureFormat::Der).unwrap();
    let public = aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
        &spki[26..],
    );
    public.verify(b"m", &sig).unwrap();
}

#[test]
fn a_software_key_exported_and_imported_again_is_the_same_key() {
    let store = TestStore::new();
    let spec = KeySpec::new(KeyType::HmacSha256, None, None).unwrap();
    let original = store
        .ks
        .create_key_with(
            &KeyRequest {
                namespace: "default".into(),
                name: "mac".into(),
                spec,
                backend: None,
            },
            &KeyOptions::new().extractable(true),
        )
        .unwrap();
    let kek = store.create("kek", KeyType::Aes256Gcm, None);
    let wrapped = store
        .ks
        .export_key(&original.id, ExportTo::Key(&kek.id))
        .unwrap();
    let copy = store
        .ks
        .import_key(
            &request("default", "copy", KeyType::HmacSha256, "software"),
            &wrapped,
            Some(&kek.id),
            &KeyOptions::new(),
        )
        .unwrap();
    assert_eq!(
        store.ks.mac(&copy.id, b"data").unwrap(),
        store.ks.mac(&original.id, b"data").unwrap()
    );
    // A software key is not wrapped under a token's trusted key: refused before anything else.
    let trusted = store
        .ks
        .export_key(&original.id, ExportTo::Trusted("transport-kek"));
    assert!(
        matches!(&trusted, Err(Error::Unsupported { backend, what })
            if backend == "software" && what.contains("--wrap-with-trusted is for token keys")),
        "{trusted:?}"
    );
    // Not exportable again unless asked.
    let again = store.ks.export_key(&copy.id, ExportTo::Key(&kek.id));
    assert!(
        matches!(&again, Err(Error::InvalidInput(m)) if m.contains("is not exportable")),
        "{again:?}"
    );
    // An unwrapping key must unwrap: a signing key is the wrong purpose, and nothing is made.
    let signer = store.create("signer", KeyType::EcdsaP256, None);
    let wrong = store.ks.import_key(
        &request("default", "nope", KeyType::HmacSha256, "software"),
        &wrapped,
        Some(&signer.id),
        &KeyOptions::new(),
    );
    assert!(
        matches!(wrong, Err(Error::WrongPurpose { .. })),
        "{wrong:?}"
    );
    assert!(store
        .ks
        .key_info_by_name("default", "nope")
        .unwrap()
        .is_none());
}

#[cfg(feature = "tpm")]
mod tpm {
    use super::*;

    fn setup() -> (keyhold::testing::Swtpm, tempfile::TempDir, Keystore) {
        let tpm = keyhold::testing::Swtpm::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ks = Keystore::create_with(
            &dir.path().join("store"),
            &sealer(PASSPHRASE),
            &tpm.config("tpm"),
        )
        .unwrap();
        (tpm, dir, ks)
    }

    /// Software → TPM: a P-256 key exported from software, wrapped, is imported into the TPM
    /// (TPM2_Import) and signs there as the software key; an HMAC key gives the same tags.
    #[test]
    fn software_keys_move_into_the_tpm_and_work_there_as_before() {
        let (_tpm, _dir, ks) = setup();
        let kek = ks
            .create_key(&request("default", "kek", KeyType::Aes256Gcm, "software"))
            .unwrap();
        for (name, key_type) in [("signer", KeyType::EcdsaP256), ("mac", KeyType::HmacSha256)] {
            let original = ks
                .create_key_with(
                    &request("default", name, key_type, "software"),
                    &KeyOptions::new().extractable(true),
                )
                .unwrap();
            let wrapped = ks.export_key(&original.id, ExportTo::Key(&kek.id)).unwrap();
            let moved = ks
                .import_key(
                    &request("default", &format!("{name}-tpm"), key_type, "tpm"),
                    &wrapped,
                    Some(&kek.id),
                    &KeyOptions::new(),
                )
                .unwrap();
            assert_eq!(moved.backend, "tpm");
            assert_eq!(
                moved.attributes.get("origin").map(String::as_str),
                Some("imported")
            );
            assert_eq!(
                moved.attributes.get("fixed_tpm").map(String::as_str),
                Some("false")
            );
            if key_type == KeyType::HmacSha256 {
                assert_eq!(
                    ks.mac(&moved.id, b"data").unwrap(),
                    ks.mac(&original.id, b"data").unwrap()
                );
            } else {
                assert_eq!(
                    ks.public_key(&moved.id).unwrap(),
                    ks.public_key(&original.id).unwrap()
                );
                let sig = ks.sign(&moved.id, b"m", SignatureFormat::Der).unwrap();
                ks.verify(&original.id, b"m", &sig, SignatureFormat::Der)
                    .unwrap();
            }
        }
    }

    #[test]
    fn a_tpm_refuses_rsa_imports_with_the_reason_and_nothing_is_recorded() {
        let (_tpm, _dir, ks) = setup();
        let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let refused = ks.import_key(
            &request("default", "in-tpm", KeyType::Rsa2048, "tpm"),
            pair.as_der().unwrap().as_ref(),
            None,
            &KeyOptions::new(),
        );
        match refused {
            Err(Error::Unsupported { backend, what }) => {
                assert_eq!(backend, "tpm");
                assert!(
                    what.starts_with("importing rsa-2048 keys: the TPM takes an RSA private key"),
                    "{what}"
                );
            }
            other => panic!("expected the TPM to refuse the import: {other:?}"),
        }
        assert!(ks.list_all_keys(None).unwrap().is_empty());
    }
}

#[cfg(feature = "pkcs11")]
mod opencryptoki {
    use super::*;
    use keyhold::testing::OpenCryptoki;
    use keyhold::Purpose;

    /// A store whose backend `ock` is openCryptoki's shared soft token, in the fixture's own
    /// namespace (its objects are destroyed when the fixture drops).
    fn setup() -> (OpenCryptoki, tempfile::TempDir, Keystore) {
        let ock = OpenCryptoki::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ks = Keystore::create_with(
            &dir.path().join("store"),
            &sealer(PASSPHRASE),
            &ock.config("ock"),
        )
        .unwrap();
        (ock, dir, ks)
    }

    #[test]
    fn an_hmac_key_imported_into_opencryptoki_gives_the_tag_of_its_material() {
        let (ock, _dir, ks) = setup();
        let key = [0x3cu8; 32];
        let imported = ks.import_key(
            &request(ock.namespace(), "mac", KeyType::HmacSha256, "ock"),
            &key,
            None,
            &KeyOptions::new(),
        );
        let info = imported.unwrap();
        let expected = aws_lc_rs::hmac::sign(
            &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &key),
            b"data",
        );
        assert_eq!(ks.mac(&info.id, b"data").unwrap(), expected.as_ref());
        assert_eq!(
            info.attributes.get("origin").map(String::as_str),
            Some("imported")
        );
        assert_eq!(
            info.attributes.get("sensitive").map(String::as_str),
            Some("true")
        );
    }

    /// openCryptoki 3.8's soft token cannot take part in a trusted export, for two reasons,
    /// each refused clearly: it knows no CKA_WRAP_WITH_TRUSTED, so keyhold makes no exportable
    /// key there (an exportable key would be wrappable under any key a PIN holder makes), and it
    /// has no CKM_AES_KEY_WRAP_PAD, which the export wraps with (that refusal's own test is in
    /// src/backend/pkcs11/export.rs, as no key can reach it here).
    #[test]
    fn opencryptoki_makes_no_exportable_key_and_has_no_rfc_5649_wrap() {
        use support::pkcs11::{module, objects_under, ock_raw_session};
        let (ock, _dir, ks) = setup();
        let refused = ks.create_key_with(
            &request(ock.namespace(), "mac", KeyType::HmacSha256, "ock"),
            &KeyOptions::new().extractable(true),
        );
        assert!(
            matches!(&refused, Err(Error::Unsupported { backend, what })
                if backend == "ock"
                    && what.contains("extractable only under trusted keys (CKA_WRAP_WITH_TRUSTED)")
                    && what.contains("token `keyhold-ock`")),
            "{refused:?}"
        );
        // Nothing recorded, nothing left on the token.
        assert!(ks
            .key_info_by_name(ock.namespace(), "mac")
            .unwrap()
            .is_none());
        let session = ock_raw_session();
        assert!(objects_under(&session, &format!("{}/", ock.namespace())).is_empty());
        let slot = session.get_session_info().unwrap().slot_id();
        let mechanisms = module(keyhold::testing::OPENCRYPTOKI_MODULE)
            .get_mechanism_list(slot)
            .unwrap();
        assert!(!mechanisms.contains(&cryptoki::mechanism::MechanismType::AES_KEY_WRAP_PAD));
    }

    #[test]
    fn an_rsa_key_imported_into_opencryptoki_signs_as_the_original() {
        let (ock, _dir, ks) = setup();
        let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let pkcs8 = pair.as_der().unwrap();
        let spec = KeySpec::new(KeyType::Rsa2048, Some(Purpose::Sign), None).unwrap();
        let info = ks
            .import_key(
                &KeyRequest {
                    namespace: ock.namespace().into(),
                    name: "rsa".into(),
                    spec,
                    backend: Some("ock".into()),
                },
                pkcs8.as_ref(),
                None,
                &KeyOptions::new(),
            )
            .unwrap();
        let sig = ks.sign(&info.id, b"m", SignatureFormat::Der).unwrap();
        let public = aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::RSA_PSS_2048_8192_SHA256,
            pair.public_key().as_ref(),
        );
        public.verify(b"m", &sig).unwrap();
        // The token's public object is the key's.
        assert_eq!(
            ks.backend_public_key(&info.id).unwrap(),
            ks.public_key(&info.id).unwrap()
        );
    }
}
