//! Shared helpers for the library-level integration tests (keystore.rs, properties.rs).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use keyhold::{
    Argon2Params, KeyInfo, KeyRequest, KeySpec, KeyType, Keystore, PassphraseSealer, Purpose,
};
use secrecy::SecretString;
use tempfile::TempDir;

/// Cheap Argon2 settings: tests check behaviour, not KDF cost.
pub const FAST: Argon2Params = Argon2Params {
    memory_mib: 8,
    iterations: 1,
    parallelism: 1,
};

pub const PASSPHRASE: &str = "test passphrase, not a secret";

pub fn sealer(passphrase: &str) -> PassphraseSealer {
    PassphraseSealer::new(SecretString::from(passphrase.to_owned()))
        .with_params(FAST)
        .expect("fast params are valid")
}

/// A store in a temp dir, deleted on drop.
pub struct TestStore {
    pub dir: TempDir,
    pub path: PathBuf,
    pub ks: Keystore,
}

impl TestStore {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("store");
        let ks = Keystore::create(&path, &sealer(PASSPHRASE)).expect("create store");
        Self { dir, path, ks }
    }

    pub fn reopen(&self) -> keyhold::Result<Keystore> {
        Keystore::open(&self.path, &sealer(PASSPHRASE))
    }

    pub fn create(&self, name: &str, key_type: KeyType, purpose: Option<Purpose>) -> KeyInfo {
        self.ks
            .create_key(&KeyRequest {
                namespace: "default".into(),
                name: name.into(),
                spec: KeySpec::new(key_type, purpose, None).expect("valid spec"),
                backend: None,
            })
            .expect("create key")
    }

    pub fn db(&self) -> PathBuf {
        self.path.join(keyhold::store::DB_FILE)
    }

    /// Every file in the store directory with its bytes.
    pub fn snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        snapshot(&self.path)
    }
}

pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("read store dir")
        .map(|e| {
            let p = e.expect("dir entry").path();
            let bytes = std::fs::read(&p).expect("read store file");
            (p, bytes)
        })
        .collect()
}
