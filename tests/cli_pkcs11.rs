//! The command line with a PKCS#11 backend: the real binary against a real SoftHSM2 token.
#![cfg(feature = "pkcs11")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use support::{field, openssl_dgst_verifies};

use keyhold::testing::{SoftHsm, TEST_USER_PIN};

const PASS: &str = "cli pkcs11 test passphrase";

struct Env {
    hsm: SoftHsm,
    dir: tempfile::TempDir,
    store: PathBuf,
    config: PathBuf,
}

impl Env {
    fn new() -> Self {
        let hsm = SoftHsm::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let config = dir.path().join("keyhold.toml");
        std::fs::write(
            &config,
            format!(
                "[backends.hsm]\ntype = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"{}\"\n\
                 pin_env = \"KH_TEST_PIN\"\n",
                keyhold::testing::SOFTHSM_MODULE,
                hsm.label()
            ),
        )
        .unwrap();
        Self {
            hsm,
            dir,
            store,
            config,
        }
    }

    fn run_with_pin(&self, pin: &str, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_keyhold"))
            .arg("--store")
            .arg(&self.store)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env("SOFTHSM2_CONF", SoftHsm::conf_file().unwrap())
            .env("KH_TEST_PIN", pin)
            .env("KEYHOLD_PASSPHRASE", PASS)
            .env_remove("KEYHOLD_STORE")
            .env_remove("KEYHOLD_CONFIG")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_with_pin(TEST_USER_PIN, args)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?}: expected success, got {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn init_passphrase(&self) {
        self.ok(&[
            "init",
            "--sealer",
            "passphrase",
            "--argon2-memory-mib",
            "19",
            "--argon2-iterations",
            "2",
        ]);
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn db(&self) -> Vec<u8> {
        std::fs::read(self.store.join(keyhold::store::DB_FILE)).unwrap()
    }
}

#[test]
fn a_token_key_signs_and_openssl_dgst_verifies() {
    let env = Env::new();
    env.init_passphrase();
    let id = env.ok(&[
        "key",
        "create",
        "web",
        "--type",
        "ecdsa-p256",
        "--backend",
        "hsm",
    ]);
    let id = id.trim_end();
    let show = env.ok(&["key", "show", "--key", id]);
    assert_eq!(field(&show, "backend"), "hsm");
    assert_eq!(
        field(&show, "attributes"),
        "always_sensitive=true, copyable=false, destroyable=true, extractable=false, local=true, \
         modifiable=false, never_extractable=true, private=true, public_usages=verify, \
         sensitive=true, usages=sign"
    );
    let msg = env.path("msg");
    std::fs::write(&msg, b"signed inside the token").unwrap();
    let sig = env.path("sig");
    let pem = env.path("pub.pem");
    env.ok(&[
        "sign",
        "--key",
        id,
        "--in",
        msg.to_str().unwrap(),
        "--out",
        sig.to_str().unwrap(),
    ]);
    env.ok(&["key", "pubkey", "--key", id, "--out", pem.to_str().unwrap()]);
    assert!(
        openssl_dgst_verifies(&pem, &sig, &msg),
        "openssl rejected the token's signature"
    );
    std::fs::write(&msg, b"something else").unwrap();
    assert!(!openssl_dgst_verifies(&pem, &sig, &msg));
}

#[test]
fn an_extractable_key_is_recorded_as_such() {
    let env = Env::new();
    env.init_passphrase();
    let id = env.ok(&[
        "key",
        "create",
        "wrap-me",
        "--type",
        "aes-256-gcm",
        "--backend",
        "hsm",
        "--extractable",
    ]);
    let show = env.ok(&["key", "show", "--key", id.trim_end()]);
    assert_eq!(
        field(&show, "attributes"),
        "always_sensitive=true, copyable=false, destroyable=true, extractable=true, local=true, \
         modifiable=false, never_extractable=false, private=true, sensitive=true, \
         usages=encrypt+decrypt, wrap_with_trusted=true"
    );
}

#[test]
fn what_the_token_cannot_do_is_refused_with_the_reason() {
    let env = Env::new();
    env.init_passphrase();
    let before = env.db();
    let out = env.run(&[
        "key",
        "create",
        "dec",
        "--type",
        "rsa-2048",
        "--purpose",
        "decrypt",
        "--backend",
        "hsm",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("OAEP"), "{stderr}");
    assert!(stderr.contains(env.hsm.label()), "{stderr}");
    assert_eq!(env.db(), before, "a refused key must change nothing");
}

#[test]
fn a_wrong_pin_is_exit_7_and_changes_nothing() {
    let env = Env::new();
    env.init_passphrase();
    env.ok(&[
        "key",
        "create",
        "k",
        "--type",
        "ed25519",
        "--backend",
        "hsm",
    ]);
    let before = env.db();
    let out = env.run_with_pin(
        "0000",
        &[
            "key",
            "create",
            "k2",
            "--type",
            "ed25519",
            "--backend",
            "hsm",
        ],
    );
    assert_eq!(out.status.code(), Some(7));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("wrong user PIN"), "{stderr}");
    assert!(
        !stderr.contains("0000"),
        "the PIN must not be echoed: {stderr}"
    );
    assert_eq!(env.db(), before);
}

#[test]
fn a_store_sealed_by_the_token_opens_only_with_it() {
    let env = Env::new();
    let out = env.ok(&["init", "--sealer", "pkcs11", "--backend", "hsm"]);
    assert!(out.contains("sealer pkcs11"), "{out}");
    // keyhold opens a store only with the sealer the user states.
    let mut config = std::fs::read_to_string(&env.config).unwrap();
    config.push_str("\n[store]\nsealer = \"pkcs11\"\n");
    std::fs::write(&env.config, config).unwrap();
    let id = env.ok(&["key", "create", "sw", "--type", "hmac-sha256"]);
    let id = id.trim_end();
    let show = env.ok(&["key", "show", "--key", id]);
    assert_eq!(field(&show, "backend"), "software (sealed by pkcs11)");
    let data = env.path("data");
    std::fs::write(&data, b"data").unwrap();
    let out = env.run(&["mac", "--key", id, "--in", data.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), 32, "an HMAC-SHA256 tag");
    // Without the backend's configuration the store cannot be unsealed, and says why.
    let out = Command::new(env!("CARGO_BIN_EXE_keyhold"))
        .arg("--store")
        .arg(&env.store)
        .args(["key", "list"])
        .env_remove("KEYHOLD_CONFIG")
        .env("KEYHOLD_SEALER", "pkcs11")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sealed by the PKCS#11 backend `hsm`"),
        "{stderr}"
    );
    // With the wrong PIN: one refused login, exit 7.
    let out = env.run_with_pin("0000", &["key", "list"]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn doctor_shows_the_token_and_no_orphans() {
    let env = Env::new();
    env.init_passphrase();
    env.ok(&[
        "key",
        "create",
        "k",
        "--type",
        "ecdsa-p384",
        "--backend",
        "hsm",
    ]);
    let report = env.ok(&["doctor"]);
    assert!(
        report.contains(&format!("token: `{}`", env.hsm.label())),
        "{report}"
    );
    assert!(report.contains("user PIN: initialised"), "{report}");
    // SoftHSM's RSA-OAEP is SHA-1 only, which no mechanism flag tells: doctor says so.
    assert!(
        report.contains("RSA-OAEP with SHA-256: not known until an RSA decrypt key is made"),
        "{report}"
    );
    // …and does not promise RSA decryption: it is listed apart, as not known until tried.
    let types = report
        .lines()
        .find(|l| l.trim_start().starts_with("key types:") && !l.contains("rsa-2048/decrypt"));
    assert!(types.is_some(), "{report}");
    assert!(
        report.contains("not known until tried: rsa-2048/decrypt (RSA-OAEP with SHA-256: "),
        "{report}"
    );
    assert!(report.contains("orphaned objects: 0"), "{report}");
    assert!(report.contains("missing objects: 0"), "{report}");
    let json = env.ok(&["--json", "doctor"]);
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["orphans"].as_array().unwrap().len(), 0);
}

#[test]
fn an_absent_token_is_exit_7_naming_the_tokens_present() {
    let env = Env::new();
    env.init_passphrase();
    let text = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace(env.hsm.label(), "no-such-token");
    std::fs::write(&env.config, text).unwrap();
    let out = env.run(&[
        "key",
        "create",
        "k",
        "--type",
        "ed25519",
        "--backend",
        "hsm",
    ]);
    assert_eq!(out.status.code(), Some(7));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no token labelled `no-such-token`"),
        "{stderr}"
    );
    assert!(stderr.contains(env.hsm.label()), "{stderr}");
    // Software keys still work with the token gone.
    env.ok(&["key", "create", "sw", "--type", "ed25519"]);
}
