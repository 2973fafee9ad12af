//! A build without the `tpm` or `pkcs11` feature (`cargo build --no-default-features`): one
//! configuration file serves every build, so TPM and PKCS#11 backends still parse, and using one
//! (or a store sealed by one) says which feature is missing and how to rebuild, through the
//! library, `doctor` and the real binary. CI runs this file in its no-default-features step.
#![cfg(not(all(feature = "pkcs11", feature = "tpm")))]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::path::Path;

use keyhold::config::{BackendConfig, Config};
use keyhold::{Error, KeyRequest, KeySpec, KeyType, Keystore};
use support::env::*;
use support::{sealer, PASSPHRASE};

/// A configuration naming both device kinds, as a machine with an HSM and a TPM would have it.
const CONFIG: &str = "\
[backends.tpm0]
type = \"tpm\"
tcti = \"swtpm:host=127.0.0.1,port=2321\"
fallback = \"refuse\"
max_loaded = 3

[backends.hsm]
type = \"pkcs11\"
module = \"/usr/lib/softhsm/libsofthsm2.so\"
token_label = \"keyhold\"
pin_env = \"KEYHOLD_TEST_HSM_PIN\"
";

/// What keyhold says of a feature it was built without.
fn missing(feature: &str) -> String {
    format!(
        "keyhold was built without the `{feature}` feature: rebuild it with `cargo build \
         --features {feature}`"
    )
}

#[test]
fn a_configuration_with_device_backends_parses_and_is_still_checked() {
    let config = Config::from_toml(CONFIG).unwrap();
    let Some(BackendConfig::Tpm(tpm)) = config.backends.get("tpm0") else {
        panic!("no tpm backend: {config:?}")
    };
    assert_eq!(tpm.settings().unwrap().max_loaded, 3);
    assert!(matches!(
        config.backends.get("hsm"),
        Some(BackendConfig::Pkcs11(_))
    ));
    // Settings are checked as in a full build: a mistake is found here, not after a rebuild.
    let err = Config::from_toml("[backends.tpm0]\ntype = \"tpm\"\nmax_loaded = 0\n").unwrap_err();
    assert!(
        err.to_string().contains("max_loaded must be at least 1"),
        "{err}"
    );
}

/// A store opened with that configuration: software keys work, keys asked of a backend this
/// build lacks are refused with the feature to rebuild with, and `doctor` shows the backend
/// unavailable for that reason.
fn assert_backend_not_built(backend: &str, message: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::from_toml(CONFIG).unwrap();
    let ks =
        Keystore::create_with(&dir.path().join("store"), &sealer(PASSPHRASE), &config).unwrap();
    let request = |name: &str, backend: Option<&str>| KeyRequest {
        namespace: "default".into(),
        name: name.into(),
        spec: KeySpec::new(KeyType::EcdsaP256, None, None).unwrap(),
        backend: backend.map(str::to_owned),
    };
    ks.create_key(&request("soft", None)).unwrap();
    match ks.create_key(&request("device", Some(backend))) {
        Err(Error::BackendUnavailable { backend: b, reason }) => {
            assert_eq!(b, backend);
            assert_eq!(reason, message);
        }
        other => panic!("expected BackendUnavailable, got {other:?}"),
    }
    let doctor = ks.doctor().unwrap();
    let health = doctor
        .backends
        .iter()
        .find(|b| b.name == backend)
        .unwrap_or_else(|| panic!("doctor lists no backend `{backend}`"));
    let err = health.report.as_ref().unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("backend `{backend}` is unavailable: {message}")
    );
    assert!(doctor.backend_unavailable());
}

#[cfg(not(feature = "tpm"))]
#[test]
fn a_tpm_backend_says_the_tpm_feature_is_missing() {
    assert_backend_not_built("tpm0", &missing("tpm"));
}

#[cfg(not(feature = "pkcs11"))]
#[test]
fn a_pkcs11_backend_says_the_pkcs11_feature_is_missing() {
    assert_backend_not_built("hsm", &missing("pkcs11"));
}

/// A passphrase store made by the binary, with the two-backend configuration beside it (passed
/// as `--config` to every command).
fn cli_store() -> Env {
    let env = Env::new().with_config(CONFIG);
    env.init_store();
    env
}

/// The store's metadata made to record `sealer`, as a store made by a build with that feature
/// records it (only the recorded kind matters: the build refuses before unsealing).
fn record_sealer(store: &Path, sealer: &str) {
    let db = store.join(keyhold::store::DB_FILE);
    let conn = rusqlite::Connection::open(db).unwrap();
    let n = conn
        .execute(
            "UPDATE meta SET value = ?1 WHERE key = 'sealer'",
            [sealer.as_bytes()],
        )
        .unwrap();
    assert_eq!(n, 1);
}

/// `init --sealer KIND`, opening a store sealed by KIND, and `doctor` on a configuration naming
/// a backend of KIND, in a build without the feature KIND needs.
fn assert_cli_not_built(kind: &str, backend: &str, message: &str) {
    let env = cli_store();

    let fresh = Env::new().with_config(CONFIG);
    let out = fresh.run(&["init", "--sealer", kind, "--backend", backend], b"");
    assert_eq!(out.status.code(), Some(1), "init: {}", stderr(&out));
    assert_eq!(stderr(&out), format!("keyhold: {message}\n"));
    fresh.assert_no_store("init with a sealer the build lacks");

    let out = env.run(&["--json", "doctor"], b"");
    assert_eq!(out.status.code(), Some(7), "doctor: {}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(message), "doctor --json: {stdout}");
    let out = env.run(&["doctor"], b"");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "backend {backend}\n  UNAVAILABLE: backend `{backend}` is unavailable: {message}\n"
        )),
        "doctor: {stdout}"
    );

    record_sealer(&env.store, kind);
    let out = env.run_vars(&[("KEYHOLD_SEALER", kind)], &["--json", "key", "list"]);
    assert_eq!(out.status.code(), Some(1), "key list: {}", stderr(&out));
    let error: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(error["error"]["kind"], "not_built");
    assert_eq!(error["error"]["message"], message);
}

#[cfg(not(feature = "tpm"))]
#[test]
fn the_binary_says_the_tpm_feature_is_missing() {
    assert_cli_not_built("tpm", "tpm0", &missing("tpm"));
}

#[cfg(not(feature = "pkcs11"))]
#[test]
fn the_binary_says_the_pkcs11_feature_is_missing() {
    assert_cli_not_built("pkcs11", "hsm", &missing("pkcs11"));
}
