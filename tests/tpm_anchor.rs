//! A store's generation anchored in a TPM NV counter (swtpm): a whole store copied back is
//! refused even with its anchor file gone; only the store's root advances the counter; a crash
//! between a change and the counter's increment is repaired; a counter deleted, a TPM missing
//! from the configuration or unreachable are refused.
#![cfg(feature = "tpm")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use keyhold::backend::tpm::{counter_index, TpmCounter};
use keyhold::config::Config;
use keyhold::secret::SecretBytes;
use keyhold::store::{Counter, CounterValue};
use keyhold::testing::Swtpm;
use keyhold::{Error, KeyRequest, KeySpec, KeyType, Keystore, SignatureFormat};
use support::env::{assert_ok, Env};
use support::{sealer, PASSPHRASE};

struct Fixture {
    tpm: Swtpm,
    dir: tempfile::TempDir,
    store: std::path::PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let tpm = Swtpm::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        Self { tpm, dir, store }
    }

    fn config(&self) -> Config {
        let mut config = self.tpm.config("tpm");
        config.store.state_dir = Some(self.dir.path().join("state"));
        config
    }

    fn create(&self) -> Keystore {
        Keystore::create_with(&self.store, &sealer(PASSPHRASE), &self.config()).unwrap()
    }

    fn open(&self) -> keyhold::Result<Keystore> {
        Keystore::open_with(&self.store, &sealer(PASSPHRASE), &self.config())
    }

    fn forget_anchor_files(&self) {
        let _ = std::fs::remove_dir_all(self.dir.path().join("state"));
    }

    fn store_id(&self, ks: &Keystore) -> [u8; 16] {
        keyhold::hex::decode(&ks.store_id())
            .unwrap()
            .try_into()
            .unwrap()
    }

    /// The store's counter as someone without the root would reach it.
    fn counter_with(&self, store_id: &[u8; 16], auth: &[u8]) -> TpmCounter {
        let device = keyhold::backend::tpm::device(&self.tpm.tcti(), Default::default()).unwrap();
        TpmCounter::new(
            device,
            "tpm",
            counter_index(store_id),
            &SecretBytes::copy_from(auth),
        )
    }
}

fn key(ks: &Keystore, name: &str) -> String {
    ks.create_key(&KeyRequest {
        namespace: "default".into(),
        name: name.into(),
        spec: KeySpec::new(KeyType::Ed25519, None, None).unwrap(),
        backend: None,
    })
    .unwrap()
    .id
}

fn tampered(result: keyhold::Result<Keystore>, fragments: &[&str]) {
    let err = result.unwrap_err();
    assert!(matches!(err, Error::StoreTampered { .. }), "{err:?}");
    for f in fragments {
        assert!(err.to_string().contains(f), "expected `{f}` in: {err}");
    }
}

#[test]
fn a_whole_store_copied_back_is_refused_by_the_tpm_counter_without_its_anchor_file() {
    let f = Fixture::new();
    support::destroy_then_put_back(f.create(), &f.store);
    // The intruder deletes the tripwire too; the TPM's counter still says.
    f.forget_anchor_files();
    tampered(
        f.open(),
        &[
            "older than the NV counter",
            "of TPM `tpm`",
            "restored from a copy",
        ],
    );
}

#[test]
fn only_the_store_s_root_reads_or_advances_its_counter() {
    let f = Fixture::new();
    let ks = f.create();
    key(&ks, "k");
    let id = f.store_id(&ks);
    let stranger = f.counter_with(&id, &[0x42; 32]);
    assert_eq!(stranger.read().unwrap(), CounterValue::Foreign);
    let err = stranger.increment().unwrap_err();
    assert!(
        err.to_string().contains("TPM2_NV_Increment"),
        "a wrong authValue is refused: {err}"
    );
    // Nothing moved: the store still opens, and changes as before.
    drop(ks);
    let ks = f.open().unwrap();
    key(&ks, "k2");
}

#[test]
fn a_deleted_counter_or_a_tpm_gone_from_the_configuration_is_refused() {
    let f = Fixture::new();
    let ks = f.create();
    key(&ks, "k");
    let index = counter_index(&f.store_id(&ks));
    drop(ks);
    // Without the TPM in the configuration, the store cannot be checked: refused, saying why.
    let mut without = Config::default();
    without.store.state_dir = Some(f.dir.path().join("state"));
    let err = Keystore::open_with(&f.store, &sealer(PASSPHRASE), &without).unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(err.to_string().contains("no TPM is configured"), "{err}");
    // The TPM's owner deletes the counter.
    let out = std::process::Command::new("tpm2_nvundefine")
        .args(["-T", &f.tpm.tcti(), &format!("{index:#010x}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "tpm2_nvundefine: {out:?}");
    tampered(f.open(), &["that anchors this store is gone"]);
}

#[test]
fn a_bound_store_does_not_open_while_its_tpm_is_unreachable() {
    let mut f = Fixture::new();
    let ks = f.create();
    key(&ks, "k");
    drop(ks);
    f.tpm.kill().unwrap();
    let err = f.open().unwrap_err();
    assert!(matches!(err, Error::BackendUnavailable { .. }), "{err:?}");
    f.tpm.restart().unwrap();
    f.open().unwrap();
}

#[test]
fn a_crash_between_a_change_and_the_counter_is_repaired_at_the_next_command() {
    let f = Fixture::new();
    let config = format!(
        "[backends.tpm]\ntype = \"tpm\"\ntcti = \"{}\"\n",
        f.tpm.tcti()
    );
    let env = Env::new().with_config(&config);
    env.init_store();
    let id = env.create_key("k", "ed25519", &[]);
    support::env::crashes_before_the_counter_are_repaired(&env, &id);
}

#[test]
fn store_verify_reads_the_counter_and_names_a_copy_put_back() {
    use keyhold::verify::{CheckKind, Status};
    let f = Fixture::new();
    let ks = f.create();
    let id = key(&ks, "k");
    let before = support::snapshot(&f.store);
    ks.change_state(&id, keyhold::Transition::Suspend, None)
        .unwrap();
    let clean = ks.verify_store(&|_| {}).unwrap();
    let section = |r: &keyhold::verify::VerifyReport| {
        r.sections
            .iter()
            .find(|s| s.kind == CheckKind::Commitment)
            .unwrap()
            .clone()
    };
    assert_eq!(section(&clean).status, Status::Passed, "{clean:#?}");
    assert!(section(&clean).summary.contains("in step"), "{clean:#?}");
    drop(ks);
    support::restore(&f.store, &before);
    f.forget_anchor_files();
    let report =
        Keystore::open_and_verify(&f.store, &sealer(PASSPHRASE), &f.config(), &|_| {}).unwrap();
    let commitment = section(&report);
    assert_eq!(commitment.status, Status::Failed, "{report:#?}");
    assert!(
        commitment.findings[0]
            .what
            .contains("the store is older than the NV counter"),
        "{report:#?}"
    );
}

/// Two keystores on one store changing it at once, many times: store and counter end in step
/// (the exact interleaving the counter lock is for is forced in the next test).
#[test]
fn concurrent_changes_keep_the_counter_in_step() {
    let f = Fixture::new();
    let first = f.create();
    let a = key(&first, "a");
    let b = key(&first, "b");
    let second = f.open().unwrap();
    std::thread::scope(|scope| {
        for (ks, id) in [(&first, &a), (&second, &b)] {
            scope.spawn(move || {
                for _ in 0..40 {
                    ks.rotate_key(id, None).unwrap();
                }
            });
        }
    });
    drop((first, second));
    let ks = f.open().unwrap();
    let report = ks.verify_store(&|_| {}).unwrap();
    assert_eq!(
        report.status(),
        keyhold::verify::Status::Passed,
        "{report:#?}"
    );
}

/// The moment the lock is for: one process has committed a change and not yet advanced the
/// counter (held there by a fault point) when another changes the store. The second waits for
/// the first; without the lock it would take the counter one behind for a crash, advance it, and
/// leave it ahead of the store for good.
#[test]
fn a_change_between_another_s_commit_and_its_increment_waits_for_it() {
    let f = Fixture::new();
    let config = format!(
        "[backends.tpm]\ntype = \"tpm\"\ntcti = \"{}\"\n",
        f.tpm.tcti()
    );
    let env = Env::new().with_config(&config);
    env.init_store();
    let a = env.create_key("a", "ed25519", &[]);
    let b = env.create_key("b", "ed25519", &[]);
    let mark = env.path_str("paused");
    let mut first = env.command(&["key", "rotate", "--key", &a]);
    first
        .env(
            keyhold::testing::FAULT_VAR,
            "pause-after-commit-before-counter",
        )
        .env(keyhold::testing::FAULT_MARK_VAR, &mark)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut first = first.spawn().unwrap();
    let waited = std::time::Instant::now();
    while !std::path::Path::new(&mark).exists() {
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(120),
            "the first process never reached its fault point"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    env.ok(&["key", "rotate", "--key", &b], b"", "the second change");
    assert!(first.wait().unwrap().success());
    let out = env.run(&["key", "list"], b"");
    assert_ok(&out, "the store opens: counter and store in step");
    env.ok(&["store", "verify"], b"", "store verify");
}

#[test]
fn a_store_whose_tpm_was_cleared_is_reanchored_on_purpose_and_then_guarded_again() {
    let f = Fixture::new();
    let ks = f.create();
    let id = key(&ks, "k");
    drop(ks);
    // The TPM is cleared (its owner hierarchy's NV indices go with it).
    let out = std::process::Command::new("tpm2_clear")
        .args(["-T", &f.tpm.tcti()])
        .output()
        .unwrap();
    assert!(out.status.success(), "tpm2_clear: {out:?}");
    tampered(f.open(), &["is gone", "the TPM was cleared"]);
    let done = Keystore::reanchor(&f.store, &sealer(PASSPHRASE), &f.config()).unwrap();
    assert!(done.counter, "{done:?}");
    let ks = f.open().unwrap();
    let before = support::snapshot(&f.store);
    ks.sign(&id, b"m", SignatureFormat::Der).unwrap();
    ks.change_state(&id, keyhold::Transition::Suspend, None)
        .unwrap();
    drop(ks);
    support::restore(&f.store, &before);
    f.forget_anchor_files();
    tampered(f.open(), &["older than the NV counter"]);
}

/// Review F1: a copy from before the store was anchored in the TPM (its state knows no counter)
/// is refused once the counter exists, even with the anchor file gone; reanchor accepts it.
#[test]
fn a_copy_from_before_the_store_was_anchored_is_refused_by_the_existing_counter() {
    let f = Fixture::new();
    let mut plain = Config::default();
    plain.store.state_dir = Some(f.dir.path().join("state"));
    let ks = Keystore::create_with(&f.store, &sealer(PASSPHRASE), &plain).unwrap();
    let id = key(&ks, "k");
    drop(ks);
    let unanchored = support::snapshot(&f.store);
    // Anchored from the first open with the TPM configured; then the key is destroyed.
    let ks = f.open().unwrap();
    ks.destroy_key(&id).unwrap();
    drop(ks);
    support::restore(&f.store, &unanchored);
    f.forget_anchor_files();
    tampered(
        f.open(),
        &["has counted this store's changes", "older copy"],
    );
    Keystore::reanchor(&f.store, &sealer(PASSPHRASE), &f.config()).unwrap();
    let ks = f.open().unwrap();
    ks.sign(&id, b"m", SignatureFormat::Der).unwrap();
}

/// Review F2: a keystore that could not bind the store (its TPM was down when it opened it)
/// does not change the store once another process has bound it: it would neither check nor
/// advance the counter.
#[test]
fn a_keystore_without_the_counter_does_not_write_to_a_store_bound_since() {
    let mut f = Fixture::new();
    let mut plain = Config::default();
    plain.store.state_dir = Some(f.dir.path().join("state"));
    drop(Keystore::create_with(&f.store, &sealer(PASSPHRASE), &plain).unwrap());
    f.tpm.kill().unwrap();
    let unbound = f.open().unwrap();
    f.tpm.restart().unwrap();
    let bound = f.open().unwrap();
    key(&bound, "made-by-the-bound-one");
    let err = unbound
        .create_key(&KeyRequest {
            namespace: "default".into(),
            name: "k".into(),
            spec: KeySpec::new(KeyType::Ed25519, None, None).unwrap(),
            backend: None,
        })
        .unwrap_err();
    assert!(matches!(err, Error::StoreUnusable { .. }), "{err:?}");
    assert!(err.to_string().contains("open it again"), "{err}");
    drop((unbound, bound));
    f.open().unwrap();
}
