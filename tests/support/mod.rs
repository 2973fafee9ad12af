//! Shared helpers for the integration tests: the library-level ones (keystore.rs, properties.rs,
//! conformance.rs, pkcs11.rs, …) use this module; the command-line ones (cli_*.rs) the harness in
//! [`env`].
#![allow(dead_code)]

#[cfg(feature = "pkcs11")]
pub mod pkcs11;
pub mod pty;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use keyhold::{
    Algorithm, Argon2Params, KeyInfo, KeyRequest, KeySpec, KeyType, Keystore, PassphraseSealer,
    Purpose,
};
use secrecy::SecretString;
use tempfile::TempDir;

#[cfg(feature = "tpm")]
pub mod tpm;

/// Cheap Argon2 settings: tests check behaviour, not KDF cost.
pub const FAST: Argon2Params = Argon2Params {
    memory_mib: 19,
    iterations: 2,
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
        let ks = Keystore::create_with(&path, &sealer(PASSPHRASE), &state_config(dir.path()))
            .expect("create store");
        Self { dir, path, ks }
    }

    /// The configuration the store is opened with: the defaults, with the anchor files in the
    /// temp dir (not in the user's state directory).
    pub fn config(&self) -> keyhold::config::Config {
        state_config(self.dir.path())
    }

    pub fn reopen(&self) -> keyhold::Result<Keystore> {
        Keystore::open_with(&self.path, &sealer(PASSPHRASE), &self.config())
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
    pub fn snapshot(&self) -> BTreeMap<PathBuf, FileBytes> {
        snapshot(&self.path)
    }
}

/// The default configuration with keyhold's state directory (anchor files) under `dir`.
pub fn state_config(dir: &Path) -> keyhold::config::Config {
    let mut config = keyhold::config::Config::default();
    config.store.state_dir = Some(dir.join("state"));
    config
}

/// A file's bytes, shown by a failed `assert_eq!` as length and SHA-256 (a store file is too big
/// to print).
#[derive(Clone, PartialEq, Eq)]
pub struct FileBytes(pub Vec<u8>);

impl std::fmt::Debug for FileBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &self.0);
        write!(
            f,
            "{} bytes, sha256 {}",
            self.0.len(),
            keyhold::hex::encode(digest.as_ref())
        )
    }
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for FileBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Every file in `dir` with its bytes, but the audit log: it records failed attempts too, so it
/// grows by design (its writer thread may add to it at any time), and tests/cli_audit.rs checks
/// what it holds.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, FileBytes> {
    std::fs::read_dir(dir)
        .expect("read store dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.file_name() != Some(std::ffi::OsStr::new(keyhold::audit::FILE)))
        .map(|p| {
            let bytes = std::fs::read(&p).expect("read store file");
            (p, FileBytes(bytes))
        })
        .collect()
}

/// The harness of the command-line tests (tests/cli_*.rs).
pub mod env;
#[cfg(feature = "serve")]
pub mod remote;
#[cfg(feature = "serve")]
pub mod serve;

/// Helpers of the CLI tests of README claims (cli_hardening, cli_exit_codes, cli_reseal, …).
pub mod claims;

/// Runs `openssl` with `args` in `dir`; returns whether it succeeded, and its stdout and stderr.
pub fn openssl(dir: &Path, args: &[&str]) -> (bool, String) {
    let mut cmd = std::process::Command::new("openssl");
    cmd.args(args).current_dir(dir);
    let out = env::run_command(cmd, None);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Asserts that `openssl pkey -pubin` parses `pem` as a public key of `key_type`.
pub fn assert_openssl_accepts_public_key(pem: &str, key_type: KeyType) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("pub.pem"), pem).expect("write pub.pem");
    let (ok, text) = openssl(dir.path(), &["pkey", "-pubin", "-in", "pub.pem", "-noout"]);
    assert!(
        ok,
        "openssl pkey refused the {key_type} PEM:\n{pem}\n{text}"
    );
    // The key is of the type keyhold says it is.
    let (ok, text) = openssl(
        dir.path(),
        &["pkey", "-pubin", "-in", "pub.pem", "-noout", "-text"],
    );
    assert!(ok, "openssl pkey -text: {text}");
    let expected = match key_type {
        KeyType::EcdsaP256 => "prime256v1",
        KeyType::EcdsaP384 => "secp384r1",
        KeyType::Ed25519 => "ED25519",
        KeyType::Rsa2048 => "(2048 bit)",
        KeyType::Rsa3072 => "(3072 bit)",
        KeyType::Rsa4096 => "(4096 bit)",
        other => panic!("{other} keys have no public key"),
    };
    assert!(
        text.contains(expected),
        "openssl does not see a {key_type} key ({expected}):\n{text}"
    );
}

/// Whether `openssl` verifies `signature` (DER for ECDSA) over `message` with `pem`, as `algorithm`
/// says (PSS with the 32-byte salt keyhold documents).
pub fn openssl_verifies(pem: &str, algorithm: Algorithm, message: &[u8], signature: &[u8]) -> bool {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("pub.pem"), pem).expect("write pub.pem");
    std::fs::write(dir.path().join("msg"), message).expect("write msg");
    std::fs::write(dir.path().join("sig"), signature).expect("write sig");
    let dgst = |digest: &'static str, extra: &[&'static str]| -> Vec<&'static str> {
        let mut args = vec!["dgst", digest, "-verify", "pub.pem"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-signature", "sig", "msg"]);
        args
    };
    let args = match algorithm {
        Algorithm::EcdsaP256Sha256 | Algorithm::RsaPkcs1Sha256 => dgst("-sha256", &[]),
        Algorithm::EcdsaP384Sha384 => dgst("-sha384", &[]),
        Algorithm::RsaPssSha256 => dgst(
            "-sha256",
            &[
                "-sigopt",
                "rsa_padding_mode:pss",
                "-sigopt",
                "rsa_pss_saltlen:auto",
            ],
        ),
        Algorithm::Ed25519 => vec![
            "pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem", "-rawin", "-in", "msg",
            "-sigfile", "sig",
        ],
        other => panic!("{other} does not sign"),
    };
    let (ok, text) = openssl(dir.path(), &args);
    if ok {
        assert!(
            text.contains("Verified OK") || text.contains("Signature Verified Successfully"),
            "openssl succeeded without saying so: {text}"
        );
    }
    if ok && algorithm == Algorithm::RsaPssSha256 {
        // keyhold documents a 32-byte salt: hold it to that, not only to "some salt".
        let strict = dgst(
            "-sha256",
            &[
                "-sigopt",
                "rsa_padding_mode:pss",
                "-sigopt",
                "rsa_pss_saltlen:32",
            ],
        );
        let (strict_ok, text) = openssl(dir.path(), &strict);
        assert!(strict_ok, "the PSS salt is not 32 bytes: {text}");
    }
    ok
}

/// The value of the `name: value` line `name` in `keyhold key show` output.
pub fn field<'a>(show: &'a str, name: &str) -> &'a str {
    show.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no `{name}` in key show:\n{show}"))
}

/// The `attribute NAME: VALUE` lines of `keyhold key show` output, by name.
pub fn attribute_map(show: &str) -> BTreeMap<String, String> {
    show.lines()
        .filter_map(|l| l.strip_prefix("attribute "))
        .map(|l| {
            let (name, value) = l
                .split_once(": ")
                .unwrap_or_else(|| panic!("an attribute line without `: `: {l}"));
            (name.to_owned(), value.to_owned())
        })
        .collect()
}

/// [`attribute_map`] spelled `name=value, …` sorted by name (`-` for none), for comparisons
/// with a known list.
pub fn attributes(show: &str) -> String {
    let map = attribute_map(show);
    if map.is_empty() {
        return "-".into();
    }
    map.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Asserts that `err` says the TPM was cleared or replaced since the key was made.
pub fn assert_tpm_replaced(err: &keyhold::Error) {
    match err {
        keyhold::Error::BackendUnavailable { reason, .. } => {
            assert!(reason.contains("cleared or replaced"), "{reason}")
        }
        other => panic!("expected BackendUnavailable, got {other:?}"),
    }
}

/// What an intruder who can write a store directory and use the machine's TPM does (issue 8, M1):
/// replaces the store's sealed root secret with a TPM seal of a root they chose, and forges the
/// metadata MAC under that root (keyhold's derivation is public). The seal names `backend` as the
/// configured TPM backend to reach the TPM through. Returns the chosen root.
#[cfg(feature = "tpm")]
pub fn replace_root_with_tpm_seal(store: &Path, tcti: &str, backend: Option<&str>) -> [u8; 32] {
    use aws_lc_rs::{hkdf, hmac};
    use keyhold::sealer::{RootSecret, Sealer};
    let chosen = [0x42u8; 32];
    let mut meta = keyhold::store::Store::open(store)
        .expect("open the store")
        .meta()
        .clone();
    let device = keyhold::backend::tpm::device(tcti, Default::default()).expect("TPM device");
    let root = RootSecret::from_bytes(keyhold::secret::SecretBytes::copy_from(&chosen))
        .expect("a 32-byte root");
    meta.sealed_root = keyhold::TpmSealer::new(device, backend.map(str::to_owned))
        .seal(&root, &meta.store_id)
        .expect("seal the chosen root");
    let mut mac_key = [0u8; 32];
    hkdf::Salt::new(hkdf::HKDF_SHA256, &meta.store_id)
        .extract(&chosen)
        .expand(
            &[b"keyhold v1 store meta mac".as_slice()],
            hkdf::HKDF_SHA256,
        )
        .and_then(|okm| okm.fill(&mut mac_key))
        .expect("hkdf");
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, &mac_key),
        &meta.mac_input(2),
    );
    let conn = rusqlite::Connection::open(store.join(keyhold::store::DB_FILE)).expect("open db");
    for (key, value) in [
        ("sealer", meta.sealed_root.sealer.as_bytes()),
        ("sealer_params", &meta.sealed_root.params[..]),
        ("sealed_root", &meta.sealed_root.blob[..]),
        ("meta_mac", tag.as_ref()),
    ] {
        let n = conn
            .execute(
                "UPDATE meta SET value = ?2 WHERE key = ?1",
                rusqlite::params![key, value],
            )
            .expect("write meta");
        assert_eq!(n, 1, "meta entry {key}");
    }
    chosen
}

/// The copy-back attack: a software key `victim` made and used in `ks` (whose store is in
/// `dir`), the store's files copied, the key destroyed, the keystore closed, and the copy put
/// back — the destroyed key's rows with it.
#[allow(dead_code)] // used by the anchor tests only
pub fn destroy_then_put_back(ks: Keystore, dir: &Path) {
    let id = ks
        .create_key(&keyhold::KeyRequest {
            namespace: "default".into(),
            name: "victim".into(),
            spec: keyhold::KeySpec::new(keyhold::KeyType::Ed25519, None, None).unwrap(),
            backend: Some("software".into()),
        })
        .unwrap()
        .id;
    ks.sign(&id, b"before", keyhold::SignatureFormat::Der)
        .unwrap();
    let before = snapshot(dir);
    ks.destroy_key(&id).unwrap();
    drop(ks);
    restore(dir, &before);
}

/// Puts a store directory back as `snapshot` holds it.
pub fn restore(dir: &Path, snapshot: &BTreeMap<PathBuf, FileBytes>) {
    for entry in std::fs::read_dir(dir).expect("read store dir") {
        let path = entry.expect("dir entry").path();
        if !snapshot.contains_key(&path) {
            std::fs::remove_file(&path).expect("remove a file the snapshot lacks");
        }
    }
    for (path, bytes) in snapshot {
        std::fs::write(path, bytes).expect("restore a store file");
    }
}

/// Rewrites the stored seal parameters (JSON) behind keyhold's back; returns the bytes they had
/// (a JSON round trip reorders keys: put the original bytes back with [`set_seal_params`]).
pub fn edit_seal_params(store: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let conn = rusqlite::Connection::open(store.join(keyhold::store::DB_FILE)).expect("open db");
    let params: Vec<u8> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'sealer_params'",
            [],
            |r| r.get(0),
        )
        .expect("read the seal parameters");
    let mut json: serde_json::Value = serde_json::from_slice(&params).expect("JSON parameters");
    edit(&mut json);
    set_seal_params(store, &serde_json::to_vec(&json).expect("encode JSON"));
    params
}

/// Writes the stored seal parameters behind keyhold's back.
pub fn set_seal_params(store: &Path, params: &[u8]) {
    let conn = rusqlite::Connection::open(store.join(keyhold::store::DB_FILE)).expect("open db");
    let n = conn
        .execute(
            "UPDATE meta SET value = ?1 WHERE key = 'sealer_params'",
            [params],
        )
        .expect("write the seal parameters");
    assert_eq!(n, 1);
}

/// Opens a keyhold AES-GCM envelope with the raw key `value`: "KHE1", algorithm, uuid, version
/// (25 bytes), the nonce length, the nonce, the body; the GCM AAD is the 25-byte header then the
/// caller's AAD.
pub fn open_envelope(value: &[u8], envelope: &[u8], aad: &[u8]) -> Vec<u8> {
    use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    assert_eq!(envelope[25], 12, "a 12-byte nonce");
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, value).unwrap());
    let nonce = Nonce::try_assume_unique_for_key(&envelope[26..38]).unwrap();
    let mut full_aad = envelope[..25].to_vec();
    full_aad.extend_from_slice(aad);
    let mut body = envelope[38..].to_vec();
    key.open_in_place(nonce, Aad::from(full_aad), &mut body)
        .unwrap()
        .to_vec()
}

/// Hex to bytes (the tests' own, so that keyhold's decoder is not what checks keyhold).
pub fn unhex(hex: &str) -> Vec<u8> {
    assert_eq!(hex.len() % 2, 0, "odd hex {hex}");
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}
