//! A token-sealed store's generation anchored in counter objects on its token (SoftHSM2; the
//! counter alone on openCryptoki too): a whole store copied back is refused even with its anchor file gone; an object
//! forged under the counter's label without the store's root counts for nothing; a crash between
//! a change and the counter's increment is repaired at the next command; a store that only keeps
//! keys on a token is not bound to it (it opens while the token is away).
#![cfg(feature = "pkcs11")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::sync::Arc;

use cryptoki::object::{Attribute, ObjectClass};
use keyhold::backend::pkcs11::Pkcs11Backend;
use keyhold::config::{Config, Pkcs11Config};
use keyhold::testing::SoftHsm;
use keyhold::{Error, KeyRequest, KeySpec, KeyType, Keystore, Pkcs11Sealer, SignatureFormat};
use support::env::{assert_ok, Env};

/// A store in a temp dir, sealed by the token of `backend`, its anchor files in the temp dir.
struct Fixture {
    dir: tempfile::TempDir,
    store: std::path::PathBuf,
    config: Config,
    backend: Pkcs11Config,
}

impl Fixture {
    fn new(mut config: Config, backend: Pkcs11Config) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        config.store.state_dir = Some(dir.path().join("state"));
        Self {
            dir,
            store,
            config,
            backend,
        }
    }

    fn sealer(&self) -> Pkcs11Sealer {
        Pkcs11Sealer::new(Arc::new(Pkcs11Backend::new("hsm", &self.backend).unwrap()))
    }

    fn create(&self) -> Keystore {
        Keystore::create_with(&self.store, &self.sealer(), &self.config).unwrap()
    }

    fn open(&self) -> keyhold::Result<Keystore> {
        Keystore::open_with(&self.store, &self.sealer(), &self.config)
    }

    fn forget_anchor_files(&self) {
        let _ = std::fs::remove_dir_all(self.dir.path().join("state"));
    }
}

fn key(ks: &Keystore, name: &str) -> String {
    ks.create_key(&KeyRequest {
        namespace: "default".into(),
        name: name.into(),
        spec: KeySpec::new(KeyType::Ed25519, None, None).unwrap(),
        backend: Some("software".into()),
    })
    .unwrap()
    .id
}

/// A destroyed key's store put back whole, its anchor file deleted too: the token's counter
/// objects still say it is older.
#[test]
fn a_token_sealed_store_copied_back_is_refused_by_its_counter_objects() {
    let hsm = SoftHsm::new().unwrap();
    let f = Fixture::new(hsm.config("hsm"), hsm.backend_config());
    support::destroy_then_put_back(f.create(), &f.store);
    f.forget_anchor_files();
    let err = f.open().unwrap_err();
    assert!(matches!(err, Error::StoreTampered { .. }), "{err:?}");
    let text = err.to_string();
    for fragment in [
        "older than the counter object `keyhold counter ",
        "restored from a copy",
    ] {
        assert!(text.contains(fragment), "expected `{fragment}` in: {text}");
    }
    // `store verify` reads the counter and says the same; `store reanchor` accepts the copy and
    // binds it to a counter anew, and it opens again.
    let report = Keystore::open_and_verify(&f.store, &f.sealer(), &f.config, &|_| {}).unwrap();
    let commitment = report
        .section(keyhold::verify::CheckKind::Commitment)
        .unwrap();
    assert!(commitment.is_tampered(), "{report:#?}");
    let done = Keystore::reanchor(&f.store, &f.sealer(), &f.config).unwrap();
    assert!(done.counter, "{done:?}");
    let ks = f.open().unwrap();
    key(&ks, "after");
}

/// The counter itself on both tokens: absent, made at 0, advanced, and read as foreign under
/// another store root's MAC key. openCryptoki's soft token has no CKM_AES_GCM, so it cannot seal
/// a store (the sealer says so), but it holds a counter as SoftHSM2 does.
#[test]
fn the_counter_objects_count_on_softhsm2_and_opencryptoki() {
    use keyhold::secret::SecretBytes;
    use keyhold::store::{Counter, CounterValue};
    let hsm = SoftHsm::new().unwrap();
    let ock = keyhold::testing::OpenCryptoki::new().unwrap();
    for (name, config, session) in [
        (
            "softhsm2",
            hsm.backend_config(),
            support::pkcs11::raw_session(hsm.label()),
        ),
        (
            "opencryptoki",
            ock.backend_config(),
            support::pkcs11::ock_raw_session(),
        ),
    ] {
        let backend = Arc::new(Pkcs11Backend::new("hsm", &config).unwrap());
        // A store ID of this run only: openCryptoki's token is shared by every test.
        let mut store_id = [0u8; 16];
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        store_id.copy_from_slice(&nanos.to_be_bytes());
        let counter = |key: u8| {
            keyhold::backend::pkcs11::TokenCounter::new(
                Arc::clone(&backend),
                &store_id,
                &SecretBytes::copy_from(&[key; 32]),
            )
        };
        let ours = counter(1);
        assert_eq!(ours.read().unwrap(), CounterValue::Absent, "{name}");
        ours.create().unwrap();
        assert_eq!(ours.read().unwrap(), CounterValue::Count(0), "{name}");
        for _ in 0..3 {
            ours.increment().unwrap();
        }
        assert_eq!(ours.read().unwrap(), CounterValue::Count(3), "{name}");
        assert_eq!(counter(2).read().unwrap(), CounterValue::Foreign, "{name}");
        // One object is left: the older counts were destroyed as the counter advanced.
        let label = format!("keyhold counter {}", keyhold::hex::encode(&store_id));
        let objects = session
            .find_objects(&[Attribute::Label(label.into_bytes())])
            .unwrap();
        assert_eq!(objects.len(), 1, "{name}");
        session.destroy_object(objects[0]).unwrap();
    }
}

/// Someone with the PIN but not the store's root makes objects under the counter's label: a
/// count without keyhold's MAC counts for nothing, so the store is neither held back nor let go.
#[test]
fn objects_forged_under_the_counter_s_label_count_for_nothing() {
    let hsm = SoftHsm::new().unwrap();
    let f = Fixture::new(hsm.config("hsm"), hsm.backend_config());
    let ks = f.create();
    key(&ks, "k");
    let label = format!("keyhold counter {}", ks.store_id());
    drop(ks);
    let session = support::pkcs11::raw_session(hsm.label());
    let mut forged = u64::MAX.to_be_bytes().to_vec();
    forged.extend_from_slice(&[0x42; 32]);
    session
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Label(label.into_bytes()),
            Attribute::Application(b"keyhold".to_vec()),
            Attribute::Value(forged),
        ])
        .unwrap();
    drop(session);
    let ks = f.open().unwrap();
    key(&ks, "after");
    drop(ks);
    f.open().unwrap();
}

/// A crash between a change's commit and the counter's increment, twice: the next command brings
/// the counter up to the store (through the real binary, on SoftHSM2).
#[test]
fn a_crash_between_a_change_and_the_counter_is_repaired_at_the_next_command() {
    let hsm = SoftHsm::new().unwrap();
    let env = Env::on_softhsm(&hsm).with_var("KEYHOLD_SEALER", "pkcs11");
    let out = env.run(&["init", "--sealer", "pkcs11", "--backend", "hsm"], b"");
    assert_ok(&out, "init --sealer pkcs11");
    let id = env.create_key("k", "ed25519", &["--backend", "software"]);
    support::env::crashes_before_the_counter_are_repaired(&env, &id);
}

/// A passphrase store that keeps keys on a token is anchored by its file only: binding it would
/// make the store refuse to open while the token is away, which its software keys do not need.
#[test]
fn a_store_that_only_keeps_keys_on_a_token_is_not_bound_to_it() {
    let hsm = SoftHsm::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let mut config = hsm.config("hsm");
    config.store.state_dir = Some(dir.path().join("state"));
    let sealer = support::sealer(support::PASSPHRASE);
    let ks = Keystore::create_with(&store, &sealer, &config).unwrap();
    let id = key(&ks, "k");
    drop(ks);
    hsm.delete_token().unwrap();
    let ks = Keystore::open_with(&store, &sealer, &config).unwrap();
    ks.sign(&id, b"m", SignatureFormat::Der).unwrap();
}
