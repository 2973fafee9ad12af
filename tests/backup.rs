//! What a backup brings back (docs/cli.md, "Backups"): software keys in full anywhere; token keys
//! while the token still holds them (the backup holds references); TPM keys only on the TPM that
//! made them — on real SoftHSM2 and swtpm.
#![cfg(any(feature = "pkcs11", feature = "tpm"))]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use keyhold::config::Config;
use keyhold::{Backup, KeyRequest, KeySpec, KeyType, Keystore, RootSource, SignatureFormat};
use support::{sealer, PASSPHRASE};

fn key(ks: &Keystore, name: &str, key_type: KeyType, backend: Option<&str>) -> String {
    ks.create_key(&KeyRequest {
        namespace: "default".into(),
        name: name.into(),
        spec: KeySpec::new(key_type, None, None).unwrap(),
        backend: backend.map(str::to_owned),
    })
    .unwrap()
    .id
}

fn with_state(mut config: Config, dir: &std::path::Path) -> Config {
    config.store.state_dir = Some(dir.join("state"));
    config
}

fn restore(backups: &std::path::Path, to: &std::path::Path, config: &Config) {
    Backup::open(backups)
        .unwrap()
        .restore(RootSource::Sealer(&sealer(PASSPHRASE)), to, config)
        .unwrap();
}

#[cfg(feature = "pkcs11")]
#[test]
fn token_keys_come_back_while_the_token_holds_them() {
    let hsm = keyhold::testing::SoftHsm::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let config = with_state(hsm.config("hsm"), dir.path());
    let ks = Keystore::create_with(&store, &sealer(PASSPHRASE), &config).unwrap();
    let kept = key(&ks, "kept", KeyType::EcdsaP256, Some("hsm"));
    let gone = key(&ks, "gone", KeyType::EcdsaP256, Some("hsm"));
    let soft = key(&ks, "soft", KeyType::Ed25519, None);
    let backups = dir.path().join("backups");
    ks.backup(&backups).unwrap();
    // After the backup, one token key is destroyed: its object leaves the token.
    ks.destroy_key(&gone).unwrap();
    drop(ks);
    restore(&backups, &store, &config);
    let ks = Keystore::open_with(&store, &sealer(PASSPHRASE), &config).unwrap();
    ks.sign(&kept, b"m", SignatureFormat::Der).unwrap();
    ks.sign(&soft, b"m", SignatureFormat::Der).unwrap();
    // The record is back, the object is not: the key cannot be used, and says so.
    let err = ks.sign(&gone, b"m", SignatureFormat::Der).unwrap_err();
    assert!(
        err.to_string().contains("not on the token")
            || matches!(err, keyhold::Error::KeyObjectMismatch { .. }),
        "{err:?}"
    );
    let doctor = ks.doctor().unwrap();
    assert_eq!(
        doctor.missing.len(),
        1,
        "doctor names the key whose object is gone"
    );
}

#[cfg(feature = "tpm")]
#[test]
fn tpm_keys_come_back_on_their_tpm_only() {
    let tpm = keyhold::testing::Swtpm::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let config = with_state(tpm.config("tpm"), dir.path());
    let ks = Keystore::create_with(&store, &sealer(PASSPHRASE), &config).unwrap();
    let in_tpm = key(&ks, "in-tpm", KeyType::EcdsaP256, Some("tpm"));
    let soft = key(&ks, "soft", KeyType::Ed25519, None);
    let backups = dir.path().join("backups");
    ks.backup(&backups).unwrap();
    drop(ks);
    // On the same TPM, into the store's own directory: everything works.
    restore(&backups, &store, &config);
    let ks = Keystore::open_with(&store, &sealer(PASSPHRASE), &config).unwrap();
    ks.sign(&in_tpm, b"m", SignatureFormat::Der).unwrap();
    drop(ks);
    // Another machine: another TPM, another state directory, a new directory.
    let other_tpm = keyhold::testing::Swtpm::new().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let other = with_state(other_tpm.config("tpm"), elsewhere.path());
    let there = elsewhere.path().join("store");
    restore(&backups, &there, &other);
    let ks = Keystore::open_with(&there, &sealer(PASSPHRASE), &other).unwrap();
    ks.sign(&soft, b"m", SignatureFormat::Der).unwrap();
    support::assert_tpm_replaced(&ks.sign(&in_tpm, b"m", SignatureFormat::Der).unwrap_err());
}
