//! The command line with a TPM: the real binary against a real swtpm, sealing the store in the
//! TPM, making keys in it, falling back to software, and re-sealing after a PCR change.
#![cfg(feature = "tpm")]
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
                "[backends.tpm]\ntype = \"tpm\"\ntcti = \"{}\"\nfallback = \"software\"\n\n\
                 [store]\nsealer = \"tpm\"\n",
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
        let vars: Vec<(&str, &str)> = passphrase
            .map(|p| ("KEYHOLD_PASSPHRASE", p))
            .into_iter()
            .collect();
        self.run_vars(&vars, args)
    }

    /// Runs keyhold with these environment variables set (and keyhold's others removed).
    fn run_vars(&self, vars: &[(&str, &str)], args: &[&str]) -> Output {
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
            .env_remove("KEYHOLD_SEALER")
            .env("TSS2_LOG", "all+none")
            .envs(vars.iter().copied())
            .stdin(Stdio::null());
        command.output().unwrap()
    }

    /// Runs keyhold with these variables; it must succeed. Returns stdout and stderr.
    fn ok_vars(&self, vars: &[(&str, &str)], args: &[&str]) -> (Vec<u8>, String) {
        let out = self.run_vars(vars, args);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(out.status.success(), "{args:?}: expected success: {stderr}");
        (out.stdout, stderr)
    }

    /// Runs keyhold with these variables; it must exit `code`, printing nothing on stdout.
    /// Returns stderr.
    fn refused(&self, vars: &[(&str, &str)], args: &[&str], code: i32) -> String {
        let out = self.run_vars(vars, args);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?} printed {:?}", out.stdout);
        stderr
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

    /// Extends PCR 8 between keyhold runs (swtpm serves one connection at a time). Not 16: that
    /// one anybody can reset, and keyhold refuses to bind to it.
    fn extend_pcr8(&self) {
        keyhold::backend::tpm::device(&self.tpm.tcti(), DeviceSettings::default())
            .unwrap()
            .extend_pcr(8, b"new firmware")
            .unwrap();
    }

    /// `init` sealed to PCR 8 with the recovery passphrase [`RECOVERY`].
    fn init_pcr_bound(&self) {
        self.ok_vars(
            &[("KEYHOLD_PASSPHRASE", RECOVERY)],
            &[
                "init",
                "--sealer",
                "tpm",
                "--pcrs",
                "8",
                "--argon2-memory-mib",
                "19",
                "--argon2-iterations",
                "2",
            ],
        );
    }

    /// The configuration without the `[store]` statement of the sealer.
    fn unstate_sealer(&self) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let (backends, _) = text.split_once("[store]").unwrap();
        std::fs::write(&self.config, backends).unwrap();
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
    env.init_pcr_bound();
    let ec = env.create("ec", &["--type", "ecdsa-p384"]);
    env.ok(&["key", "list"]);

    env.extend_pcr8();
    let before = env.db();
    let out = env.run(&["key", "list"]);
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("PCRs 8 ") && stderr.contains("keyhold reseal"),
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
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("PCRs 8 → 8"), "{stdout}");
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
            vec!["init", "--sealer", "tpm", "--pcrs", "16"],
            "PCR 16 can be reset by any program",
        ),
        (
            vec!["init", "--sealer", "tpm", "--pcrs", "0,23"],
            "PCR 23 can be reset by any program",
        ),
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
        &[
            "init",
            "--sealer",
            "passphrase",
            "--argon2-memory-mib",
            "19",
        ],
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

/// M1 end to end: a passphrase store whose sealed root secret an intruder replaced with a TPM seal
/// of a root they chose (and a metadata MAC forged under it). keyhold refuses it with exit 4,
/// whether the user states nothing (passphrase, the default) or is talked into stating `tpm`;
/// nothing is written, and with the original seal back every key is intact.
#[test]
fn a_passphrase_store_whose_root_was_replaced_by_a_tpm_seal_is_refused() {
    let pass = [("KEYHOLD_PASSPHRASE", "cli m1 store passphrase")];
    let env = Env::new();
    env.unstate_sealer();
    env.ok_vars(
        &pass,
        &[
            "init",
            "--sealer",
            "passphrase",
            "--argon2-memory-mib",
            "19",
        ],
    );
    let (id, _) = env.ok_vars(&pass, &["key", "create", "k", "--type", "hmac-sha256"]);
    let id = String::from_utf8(id).unwrap();
    let data = env.path("data");
    std::fs::write(&data, b"m1").unwrap();
    let mac = [
        "mac",
        "--key",
        id.trim_end(),
        "--in",
        data.to_str().unwrap(),
    ];
    let (tag, _) = env.ok_vars(&pass, &mac);

    let original = support::snapshot(&env.store);
    support::replace_root_with_tpm_seal(&env.store, &env.tpm.tcti(), Some("tpm"));
    let attacked = env.db();
    // Nothing stated: keyhold expects a passphrase seal and does not follow the store's `tpm`.
    for vars in [&[][..], &pass[..]] {
        let stderr = env.refused(vars, &mac, 4);
        assert!(
            stderr.contains("records a `tpm` seal")
                && stderr.contains("replaced its sealed root secret"),
            "{stderr}"
        );
    }
    // Stated `tpm` (a user talked into it): the TPM unseals the intruder's root, under which no
    // record verifies; no key is made under it.
    let stated = [("KEYHOLD_SEALER", "tpm")];
    let stderr = env.refused(
        &stated,
        &["key", "create", "new", "--type", "hmac-sha256"],
        4,
    );
    assert!(
        stderr.contains("sealed root secret was replaced"),
        "{stderr}"
    );
    assert_eq!(env.db(), attacked, "a refused open wrote to the store");

    support::restore(&env.store, &original);
    assert_eq!(env.ok_vars(&pass, &mac).0, tag, "the key changed");
}

/// A TPM store opened without the user stating its sealer: refused (exit 4), with exactly what to
/// set; `init` says so up front. Stated through the environment, it opens.
#[test]
fn a_tpm_store_tells_its_user_what_to_set() {
    let env = Env::new();
    env.unstate_sealer();
    let (_, note) = env.ok_vars(&[], &["init", "--sealer", "tpm"]);
    assert!(note.contains("KEYHOLD_SEALER=tpm"), "{note}");
    let stderr = env.refused(&[], &["key", "list"], 4);
    assert!(
        stderr.contains("KEYHOLD_SEALER=tpm")
            && stderr.contains("sealer = \"tpm\"")
            && stderr.contains("[store]"),
        "{stderr}"
    );
    env.ok_vars(&[("KEYHOLD_SEALER", "tpm")], &["key", "list"]);
}

/// M2 end to end: the PCR list in the store is changed behind keyhold's back (to a resettable PCR,
/// or to another one): the TPM refuses the seal, `reseal` unseals with the recovery passphrase
/// and then refuses the metadata (exit 6). The new seal is built only from the authenticated
/// metadata, so the doctored list is never carried over, whatever it is. Nothing is re-sealed.
#[test]
fn reseal_refuses_a_pcr_list_changed_behind_its_back() {
    let recovery = [("KEYHOLD_PASSPHRASE", RECOVERY)];
    let env = Env::new();
    env.init_pcr_bound();
    env.ok(&["key", "list"]);

    let original = support::edit_seal_params(&env.store, |p| p["pcrs"] = serde_json::json!([16]));
    for doctored in [16, 9] {
        support::edit_seal_params(&env.store, |p| p["pcrs"] = serde_json::json!([doctored]));
        let before = env.db();
        env.refused(&[], &["key", "list"], 4);
        let stderr = env.refused(&recovery, &["reseal"], 6);
        assert!(
            stderr.contains("sealer metadata") && stderr.contains("nothing was re-sealed"),
            "{stderr}"
        );
        assert_eq!(env.db(), before, "reseal wrote to the store");
    }

    // A resettable PCR asked for at reseal is refused too.
    support::set_seal_params(&env.store, &original);
    let stderr = env.refused(&recovery, &["reseal", "--pcrs", "23"], 1);
    assert!(stderr.contains("PCR 23 can be reset"), "{stderr}");
    env.ok(&["key", "list"]);
}
