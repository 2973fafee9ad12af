//! The command line with a TPM: the real binary against a real swtpm, sealing the store in the
//! TPM, making keys in it, falling back to software, and re-sealing after a PCR change.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use support::{field, openssl_dgst_verifies};

use keyhold::backend::tpm::device::DeviceSettings;
use keyhold::testing::Swtpm;

/// The recovery passphrase of PCR-bound stores (read like a store passphrase).
const RECOVERY: &str = "cli tpm recovery passphrase";

struct Env {
    tpm: Swtpm,
    dir: tempfile::TempDir,
    store: PathBuf,
    config: PathBuf,
}

impl Env {
    fn new() -> Self {
        let tpm = Swtpm::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let config = dir.path().join("keyhold.toml");
        std::fs::write(
            &config,
            format!(
                "[backends.tpm]\ntype = \"tpm\"\ntcti = \"{}\"\nfallback = \"software\"\n",
                tpm.tcti()
            ),
        )
        .unwrap();
        Self {
            tpm,
            dir,
            store,
            config,
        }
    }

    fn run_with(&self, passphrase: Option<&str>, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_keyhold"));
        command
            .arg("--store")
            .arg(&self.store)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("KEYHOLD_STORE")
            .env_remove("KEYHOLD_CONFIG")
            .env_remove("KEYHOLD_PASSPHRASE")
            .env("TSS2_LOG", "all+none")
            .stdin(Stdio::null());
        if let Some(p) = passphrase {
            command.env("KEYHOLD_PASSPHRASE", p);
        }
        command.output().unwrap()
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_with(None, args)
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

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn create(&self, name: &str, args: &[&str]) -> String {
        let mut all = vec!["key", "create", name, "--backend", "tpm"];
        all.extend_from_slice(args);
        self.ok(&all).trim_end().to_owned()
    }

    /// Encrypts a message to `key` with `aad`, decrypts it, checks it comes back, and returns the
    /// envelope's path.
    fn round_trip(&self, key: &str, aad: &str) -> PathBuf {
        let (plain, envelope, back) = (self.path("plain"), self.path("env"), self.path("back"));
        std::fs::write(&plain, b"encrypted under a TPM-sealed store").unwrap();
        let p = |p: &Path| p.to_str().unwrap().to_owned();
        for (op, from, to) in [
            ("encrypt", &plain, &envelope),
            ("decrypt", &envelope, &back),
        ] {
            self.ok(&[
                op,
                "--key",
                key,
                "--aad",
                aad,
                "--in",
                &p(from),
                "--out",
                &p(to),
            ]);
        }
        assert_eq!(
            std::fs::read(&back).unwrap(),
            std::fs::read(&plain).unwrap()
        );
        envelope
    }

    /// Extends PCR 16 between keyhold runs (swtpm serves one connection at a time).
    fn extend_pcr16(&self) {
        keyhold::backend::tpm::device(&self.tpm.tcti(), DeviceSettings::default())
            .unwrap()
            .extend_pcr(16, b"new firmware")
            .unwrap();
    }

    fn db(&self) -> Vec<u8> {
        std::fs::read(self.store.join(keyhold::store::DB_FILE)).unwrap()
    }
}

#[test]
fn a_tpm_sealed_store_with_a_tpm_key_and_a_software_fallback() {
    let env = Env::new();
    let out = env.ok(&["init", "--sealer", "tpm"]);
    assert!(out.contains("sealer tpm"), "{out}");

    // A key made in the TPM: signed there, verified by openssl.
    let ec = env.create("web", &["--type", "ecdsa-p256"]);
    let show = env.ok(&["key", "show", "--key", &ec]);
    assert_eq!(field(&show, "backend"), "tpm");
    assert!(
        field(&show, "attributes").contains("never_extractable=true"),
        "{show}"
    );
    let (msg, sig, pem) = (env.path("msg"), env.path("sig"), env.path("pub.pem"));
    std::fs::write(&msg, b"signed inside the TPM").unwrap();
    let p = |p: &Path| p.to_str().unwrap().to_owned();
    env.ok(&["sign", "--key", &ec, "--in", &p(&msg), "--out", &p(&sig)]);
    env.ok(&["key", "pubkey", "--key", &ec, "--out", &p(&pem)]);
    assert!(
        openssl_dgst_verifies(&pem, &sig, &msg),
        "openssl rejected it"
    );
    std::fs::write(&msg, b"something else").unwrap();
    assert!(!openssl_dgst_verifies(&pem, &sig, &msg));

    // AES-GCM is not a TPM algorithm: with fallback = "software" it is made in software, under
    // the root secret the TPM sealed.
    let aes = env.create("data", &["--type", "aes-256-gcm"]);
    let show = env.ok(&["key", "show", "--key", &aes]);
    assert_eq!(
        field(&show, "backend"),
        "software (sealed by tpm; fallback for tpm)"
    );
    env.round_trip(&aes, "");

    // RSA-OAEP decryption inside the TPM.
    let rsa = env.create("unwrap", &["--type", "rsa-2048", "--purpose", "decrypt"]);
    let envelope = env.round_trip(&rsa, "ctx");
    let out = env.run(&[
        "decrypt",
        "--key",
        &rsa,
        "--aad",
        "other",
        "--in",
        &p(&envelope),
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let list = env.ok(&["key", "list"]);
    assert_eq!(list.lines().count(), 4, "{list}");
    let doctor = env.ok(&["doctor"]);
    assert!(doctor.contains("SRK name"), "{doctor}");
}

#[test]
fn a_pcr_bound_store_is_refused_after_a_change_until_reseal() {
    let env = Env::new();
    let out = env.run_with(
        Some(RECOVERY),
        &[
            "init",
            "--sealer",
            "tpm",
            "--pcrs",
            "16",
            "--argon2-memory-mib",
            "8",
            "--argon2-iterations",
            "1",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ec = env.create("ec", &["--type", "ecdsa-p384"]);
    env.ok(&["key", "list"]);

    env.extend_pcr16();
    let before = env.db();
    let out = env.run(&["key", "list"]);
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("PCRs 16 ") && stderr.contains("keyhold reseal"),
        "{stderr}"
    );

    // Without the recovery passphrase reseal cannot unseal, and changes nothing.
    let out = env.run_with(Some("not the recovery passphrase"), &["reseal"]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(env.db(), before);

    let out = env.run_with(Some(RECOVERY), &["reseal"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("PCRs 16"));
    let msg = env.path("msg");
    std::fs::write(&msg, b"after the reseal").unwrap();
    let sig = env.path("sig");
    env.ok(&[
        "sign",
        "--key",
        &ec,
        "--in",
        msg.to_str().unwrap(),
        "--out",
        sig.to_str().unwrap(),
    ]);
}

#[test]
fn bad_sealer_arguments_are_refused_and_create_nothing() {
    let env = Env::new();
    for (args, text) in [
        (vec!["init", "--sealer", "tpm", "--pcrs", "24"], "PCR"),
        (vec!["init", "--sealer", "tpm", "--pcrs", "0;7"], "PCR list"),
        (
            vec!["init", "--sealer", "passphrase", "--pcrs", "7"],
            "--pcrs goes with --sealer tpm",
        ),
        (vec!["init", "--sealer", "tpm", "--no-recovery"], "--pcrs"),
        (vec!["init", "--sealer", "tpm", "--backend", "nope"], "nope"),
    ] {
        let out = env.run_with(Some(RECOVERY), &args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(text), "{args:?}: {stderr}");
        assert!(
            !env.store.join(keyhold::store::DB_FILE).exists(),
            "{args:?} made a store"
        );
    }
    // reseal is for TPM-sealed stores.
    let out = env.run_with(
        Some(RECOVERY),
        &["init", "--sealer", "passphrase", "--argon2-memory-mib", "8"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = env.run_with(Some(RECOVERY), &["reseal"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("sealed by `passphrase`"));
}

/// tpm2-tss logs `ERROR:esys:…` lines of its own for errors keyhold handles and reports itself
/// (here the PCR policy that no longer holds): keyhold quiets it unless the user set TSS2_LOG.
#[test]
fn tpm2_tss_is_quiet_unless_the_user_sets_tss2_log() {
    let env = Env::new();
    let out = env.run(&["init", "--sealer", "tpm", "--pcrs", "8", "--no-recovery"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    keyhold::backend::tpm::device(&env.tpm.tcti(), DeviceSettings::default())
        .unwrap()
        .extend_pcr(8, b"another boot loader")
        .unwrap();
    let run = |tss2_log: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_keyhold"));
        command
            .arg("--store")
            .arg(&env.store)
            .arg("--config")
            .arg(&env.config)
            .args(["key", "list"])
            .env_remove("KEYHOLD_STORE")
            .env_remove("KEYHOLD_CONFIG")
            .env_remove("KEYHOLD_PASSPHRASE")
            .env_remove("RUST_LOG")
            .env_remove("TSS2_LOG")
            .stdin(Stdio::null());
        if let Some(level) = tss2_log {
            command.env("TSS2_LOG", level);
        }
        command.output().unwrap()
    };
    let out = run(None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("PCRs 8 "), "{stderr}");
    assert!(!stderr.contains("ERROR:esys"), "tpm2-tss spoke:\n{stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "only keyhold's message:\n{stderr}"
    );
    // The user's TSS2_LOG is left alone: the same failure, with tpm2-tss's lines.
    let out = run(Some("esys+error"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("ERROR:esys"),
        "TSS2_LOG=esys+error:\n{stderr}"
    );
}
