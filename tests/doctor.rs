//! Crash safety (`doctor` finds orphaned and missing token objects) and the `pkcs11` sealer, on
//! real SoftHSM2 tokens.
#![cfg(feature = "pkcs11")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::path::Path;
use std::process::Output;
use std::sync::Arc;

use keyhold::backend::pkcs11::Pkcs11Backend;
use keyhold::backend::{Backend, KeyContext, KeyOptions};
use keyhold::testing::SoftHsm;
use keyhold::{
    Error, KeyRequest, KeySpec, KeyType, Keystore, PassphraseSealer, Pkcs11Sealer, SignatureFormat,
};

fn passphrase() -> PassphraseSealer {
    support::sealer(support::PASSPHRASE)
}

fn request(name: &str, key_type: KeyType) -> KeyRequest {
    KeyRequest {
        namespace: "default".into(),
        name: name.into(),
        spec: KeySpec::new(key_type, None, None).unwrap(),
        backend: Some("hsm".into()),
    }
}

struct Fixture {
    hsm: SoftHsm,
    _dir: tempfile::TempDir,
    ks: Keystore,
}

fn fixture() -> Fixture {
    let hsm = SoftHsm::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let ks = Keystore::create_with(&path, &passphrase(), &hsm.config("hsm")).unwrap();
    Fixture { hsm, _dir: dir, ks }
}

/// A key made in the token whose record was never written: what a crash between
/// `C_GenerateKeyPair` and the SQLite insert leaves behind.
fn orphan(f: &Fixture) -> String {
    let store_id: [u8; 16] = keyhold::hex::decode(&f.ks.store_id())
        .unwrap()
        .try_into()
        .unwrap();
    made_by(f, &store_id)
}

/// A key object made in the token for the store `store_id`, with no record anywhere.
fn made_by(f: &Fixture, store_id: &[u8; 16]) -> String {
    let backend = Pkcs11Backend::new("hsm", &f.hsm.backend_config()).unwrap();
    let spec = KeySpec::new(KeyType::EcdsaP256, None, None).unwrap();
    let made = backend
        .generate(
            KeyContext {
                store_id,
                uuid: &[1; 16],
                label: "default/crashed",
                spec: &spec,
            },
            &KeyOptions::default(),
        )
        .unwrap();
    made.locator
}

#[test]
fn doctor_finds_and_removes_an_orphan_left_by_a_crash() {
    let f = fixture();
    let kept =
        f.ks.create_key(&request("kept", KeyType::EcdsaP256))
            .unwrap();
    let doctor = f.ks.doctor().unwrap();
    assert!(doctor.orphans.is_empty(), "{:?}", doctor.orphans);
    assert!(doctor.missing.is_empty(), "{:?}", doctor.missing);

    let locator = orphan(&f);
    let doctor = f.ks.doctor().unwrap();
    assert_eq!(doctor.orphans.len(), 1, "{:?}", doctor.orphans);
    assert_eq!(doctor.orphans[0].locator, locator);
    assert_eq!(doctor.orphans[0].label, "default/crashed");
    assert_eq!(doctor.orphans[0].backend, "hsm");

    // A recorded key is not an orphan and cannot be removed as one.
    let err = f.ks.remove_orphan("hsm", &kept.locator).unwrap_err();
    assert!(err.to_string().contains("not an orphan"), "{err}");
    f.ks.sign(&kept.id, b"still here", SignatureFormat::Der)
        .unwrap();

    // Another store's object on the same token is neither an orphan nor removable from here.
    let foreign = made_by(&f, &[0x5a; 16]);
    let doctor = f.ks.doctor().unwrap();
    assert_eq!(doctor.orphans.len(), 1, "{:?}", doctor.orphans);
    assert_eq!(doctor.foreign_objects, 1);
    let err = f.ks.remove_orphan("hsm", &foreign).unwrap_err();
    assert!(
        err.to_string().contains("does not belong to this store"),
        "{err}"
    );

    f.ks.remove_orphan("hsm", &locator).unwrap();
    let doctor = f.ks.doctor().unwrap();
    assert!(doctor.orphans.is_empty(), "{:?}", doctor.orphans);
    f.ks.sign(&kept.id, b"still here", SignatureFormat::Der)
        .unwrap();
}

#[test]
fn doctor_reports_records_whose_objects_are_gone() {
    let f = fixture();
    let key =
        f.ks.create_key(&request("doomed", KeyType::HmacSha256))
            .unwrap();
    let backend = Pkcs11Backend::new("hsm", &f.hsm.backend_config()).unwrap();
    backend.destroy_object(&key.locator).unwrap();
    let doctor = f.ks.doctor().unwrap();
    assert_eq!(doctor.missing.len(), 1);
    assert_eq!(doctor.missing[0].key.name, "doomed");
    assert_eq!(doctor.missing[0].absent, ["secret key"]);
    let hsm = doctor.backends.iter().find(|b| b.name == "hsm").unwrap();
    let report = hsm.report.as_ref().unwrap();
    assert_eq!(report.kind, "pkcs11");
    let token = &report.details.iter().find(|(k, _)| k == "token").unwrap().1;
    assert!(token.contains(f.hsm.label()), "{token}");
    // Using the key says what happened instead of failing obscurely.
    let err = f.ks.mac(&key.id, b"x").unwrap_err();
    assert!(err.to_string().contains("not on the token"), "{err}");
}

#[test]
fn pkcs11_sealer_seals_the_root_secret_in_the_token() {
    let hsm = SoftHsm::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let config = hsm.config("hsm");
    let sealer = || {
        Pkcs11Sealer::new(Arc::new(
            Pkcs11Backend::new("hsm", &hsm.backend_config()).unwrap(),
        ))
    };
    let id = {
        let ks = Keystore::create_with(&path, &sealer(), &config).unwrap();
        assert_eq!(ks.sealer_kind(), "pkcs11");
        let key = ks
            .create_key(&KeyRequest {
                backend: None,
                ..request("sw", KeyType::Ed25519)
            })
            .unwrap();
        // The sealing key lives in the token but is no orphan.
        let doctor = ks.doctor().unwrap();
        assert!(doctor.orphans.is_empty(), "{:?}", doctor.orphans);
        key.id
    };
    let ks = Keystore::open_with(&path, &sealer(), &config).unwrap();
    ks.sign(&id, b"reopened", SignatureFormat::Der).unwrap();

    // A passphrase cannot open a token-sealed store, and another token cannot either.
    let err = Keystore::open(&path, &passphrase()).unwrap_err();
    assert!(matches!(err, Error::Unseal { .. }), "{err}");
    let other = SoftHsm::new().unwrap();
    let wrong = Pkcs11Sealer::new(Arc::new(
        Pkcs11Backend::new("hsm", &other.backend_config()).unwrap(),
    ));
    let err = Keystore::open_with(&path, &wrong, &other.config("hsm")).unwrap_err();
    assert!(
        matches!(err, Error::Unseal { .. } | Error::BackendUnavailable { .. }),
        "{err}"
    );
}

#[test]
fn a_backend_that_cannot_be_set_up_leaves_software_keys_working() {
    let hsm = SoftHsm::new().unwrap();
    let mut config = hsm.config("hsm");
    let keyhold::config::BackendConfig::Pkcs11(p) = config.backends.get_mut("hsm").unwrap() else {
        unreachable!("the fixture makes a pkcs11 backend")
    };
    p.module = "/nonexistent/libnothing.so".into();
    let dir = tempfile::tempdir().unwrap();
    let ks = Keystore::create_with(&dir.path().join("s"), &passphrase(), &config).unwrap();
    let sw = ks
        .create_key(&KeyRequest {
            backend: None,
            ..request("sw", KeyType::HmacSha256)
        })
        .unwrap();
    ks.mac(&sw.id, b"still works").unwrap();
    let err = ks
        .create_key(&request("hw", KeyType::EcdsaP256))
        .unwrap_err();
    assert!(matches!(err, Error::BackendUnavailable { .. }), "{err}");
    assert!(err.to_string().contains("libnothing.so"), "{err}");
    let doctor = ks.doctor().unwrap();
    let hsm_health = doctor.backends.iter().find(|b| b.name == "hsm").unwrap();
    let report_err = hsm_health.report.as_ref().unwrap_err().to_string();
    assert!(
        report_err.contains("cannot load the PKCS#11 module"),
        "{report_err}"
    );
}

#[test]
fn token_keys_have_exactly_one_usage() {
    use cryptoki::object::AttributeType;
    let usage_name = |attr: AttributeType| match attr {
        AttributeType::Sign => "sign",
        AttributeType::Verify => "verify",
        AttributeType::Encrypt => "encrypt",
        AttributeType::Decrypt => "decrypt",
        AttributeType::Wrap => "wrap",
        AttributeType::Unwrap => "unwrap",
        AttributeType::Derive => "derive",
        other => panic!("not a usage: {other}"),
    };

    let f = fixture();
    let signer =
        f.ks.create_key(&request("signer", KeyType::EcdsaP256))
            .unwrap();
    let aes =
        f.ks.create_key(&request("aes", KeyType::Aes256Gcm))
            .unwrap();
    let mac =
        f.ks.create_key(&request("mac", KeyType::HmacSha256))
            .unwrap();

    let session = support::pkcs11::raw_session(f.hsm.label());
    // The usages switched on, over every object of the key (both halves of a pair).
    let usages = |label: &str| -> Vec<(String, bool)> {
        let mut out: Vec<(String, bool)> = support::pkcs11::objects(&session, label, None)
            .into_iter()
            .flat_map(|h| support::pkcs11::usages(&session, h))
            .filter(|&(_, on)| on)
            .map(|(attr, on)| (usage_name(attr).to_owned(), on))
            .collect();
        out.sort();
        out
    };
    let on = |v: &[&str]| -> Vec<(String, bool)> {
        let mut v: Vec<_> = v.iter().map(|s| (s.to_string(), true)).collect();
        v.sort();
        v
    };
    assert_eq!(
        usages("default/signer"),
        on(&["sign", "verify"]),
        "{}",
        signer.locator
    );
    assert_eq!(
        usages("default/aes"),
        on(&["decrypt", "encrypt"]),
        "{}",
        aes.locator
    );
    assert_eq!(
        usages("default/mac"),
        on(&["sign", "verify"]),
        "{}",
        mac.locator
    );
}

#[test]
fn an_empty_pin_is_never_sent() {
    let hsm = SoftHsm::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pin = dir.path().join("pin");
    std::fs::write(&pin, b"\n").unwrap();
    let mut config = hsm.backend_config();
    config.pin_file = Some(pin);
    let backend = Pkcs11Backend::new("hsm", &config).unwrap();
    let spec = KeySpec::new(KeyType::EcdsaP256, None, None).unwrap();
    let context = KeyContext {
        store_id: &[7; 16],
        uuid: &[1; 16],
        label: "default/k",
        spec: &spec,
    };
    for _ in 0..2 {
        let err = backend
            .generate(context, &KeyOptions::default())
            .unwrap_err();
        assert!(matches!(err, Error::BackendLogin { .. }), "{err}");
        assert!(err.to_string().contains("PIN is empty"), "{err}");
    }
    assert_eq!(backend.login_attempts(), 0);
}

/// Destroys only the `class` object of the key at `locator`, leaving its other half.
fn destroy_half(hsm: &SoftHsm, locator: &str, class: cryptoki::object::ObjectClass) {
    use cryptoki::object::Attribute;
    let session = support::pkcs11::raw_session(hsm.label());
    let handles = session
        .find_objects(&[
            Attribute::Id(keyhold::hex::decode(locator).unwrap()),
            Attribute::Class(class),
        ])
        .unwrap();
    assert_eq!(handles.len(), 1, "{class} of {locator}");
    session.destroy_object(handles[0]).unwrap();
}

/// `locator` with its hex letters after the store prefix (the first 16 digits) in uppercase:
/// the same `CKA_ID`, spelled so that a string comparison misses it while the prefix check
/// passes. `None` if that part has no letters to change.
fn respelled(locator: &str) -> Option<String> {
    let (prefix, rest) = locator.split_at(16);
    let upper = rest.to_uppercase();
    (upper != rest).then(|| format!("{prefix}{upper}"))
}

fn assert_not_canonical(err: &Error) {
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("is not a locator as keyhold writes them (32 lowercase hex digits)"),
        "{err}"
    );
}

/// M3: `--remove-orphan` with a recorded key's locator respelled in uppercase destroyed the key.
#[test]
fn remove_orphan_refuses_a_recorded_key_in_another_spelling() {
    let f = fixture();
    let (key, attack) = (0..8)
        .find_map(|i| {
            let key =
                f.ks.create_key(&request(&format!("k{i}"), KeyType::EcdsaP256))
                    .unwrap();
            respelled(&key.locator).map(|attack| (key, attack))
        })
        .unwrap();
    let err = f.ks.remove_orphan("hsm", &attack).unwrap_err();
    assert_not_canonical(&err);
    let whole = key.locator.to_uppercase();
    assert_not_canonical(&f.ks.remove_orphan("hsm", &whole).unwrap_err());
    let longer = format!("{}00", key.locator);
    assert_not_canonical(&f.ks.remove_orphan("hsm", &longer).unwrap_err());
    // The canonical spelling is refused as a recorded key, as before.
    let err = f.ks.remove_orphan("hsm", &key.locator).unwrap_err();
    assert!(
        err.to_string().contains("belongs to a key of this store"),
        "{err}"
    );

    f.ks.sign(&key.id, b"still here", SignatureFormat::Der)
        .unwrap();
    let doctor = f.ks.doctor().unwrap();
    assert!(doctor.missing.is_empty(), "{:?}", doctor.missing);
}

/// A store sealed by the token, whose sealing key's locator is `(store, locator)`.
fn token_sealed_store(hsm: &SoftHsm, dir: &Path) -> (Keystore, String) {
    let sealer = Pkcs11Sealer::new(Arc::new(
        Pkcs11Backend::new("hsm", &hsm.backend_config()).unwrap(),
    ));
    let ks = Keystore::create_with(&dir.join("store"), &sealer, &hsm.config("hsm")).unwrap();
    let locator = sealer_locator(hsm, &ks.store_id());
    (ks, locator)
}

/// The locator of the only object of store `store_id` on the token: its sealing key.
fn sealer_locator(hsm: &SoftHsm, store_id: &str) -> String {
    let backend = Pkcs11Backend::new("hsm", &hsm.backend_config()).unwrap();
    let objects = backend.report().unwrap().objects.unwrap();
    let ours: Vec<_> = objects
        .iter()
        .filter(|o| o.locator.starts_with(&store_id[..16]))
        .collect();
    assert_eq!(ours.len(), 1, "{objects:?}");
    ours[0].locator.clone()
}

/// M3 against the pkcs11 sealer: destroying its key would lose the whole store.
#[test]
fn remove_orphan_refuses_the_sealer_key_in_another_spelling() {
    let dir = tempfile::tempdir().unwrap();
    let (hsm, ks, attack) = (0..8)
        .find_map(|i| {
            let hsm = SoftHsm::new().unwrap();
            let (ks, locator) = token_sealed_store(&hsm, &dir.path().join(i.to_string()));
            respelled(&locator).map(|attack| (hsm, ks, attack))
        })
        .unwrap();
    let sw = ks
        .create_key(&KeyRequest {
            backend: None,
            ..request("sw", KeyType::HmacSha256)
        })
        .unwrap();
    assert_not_canonical(&ks.remove_orphan("hsm", &attack).unwrap_err());
    let err = ks.remove_orphan("hsm", &attack.to_lowercase()).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("is the key sealing this store's root secret"),
        "{err}"
    );
    let path = ks.dir().to_path_buf();
    drop(ks);
    let sealer = Pkcs11Sealer::new(Arc::new(
        Pkcs11Backend::new("hsm", &hsm.backend_config()).unwrap(),
    ));
    let ks = Keystore::open_with(&path, &sealer, &hsm.config("hsm")).unwrap();
    ks.mac(&sw.id, b"the store still opens").unwrap();
}

/// doctor used to group objects by locator: a key pair whose private half was deleted looked
/// present because its public half remained.
#[test]
fn doctor_sees_a_deleted_private_half() {
    let f = fixture();
    let key =
        f.ks.create_key(&request("halved", KeyType::EcdsaP256))
            .unwrap();
    let intact =
        f.ks.create_key(&request("intact", KeyType::Rsa2048))
            .unwrap();
    destroy_half(
        &f.hsm,
        &key.locator,
        cryptoki::object::ObjectClass::PRIVATE_KEY,
    );
    let doctor = f.ks.doctor().unwrap();
    assert_eq!(doctor.missing.len(), 1, "{:?}", doctor.missing);
    assert_eq!(doctor.missing[0].key.id, key.id);
    assert_eq!(doctor.missing[0].absent, ["private key"]);
    assert!(doctor.orphans.is_empty(), "{:?}", doctor.orphans);

    destroy_half(
        &f.hsm,
        &intact.locator,
        cryptoki::object::ObjectClass::PUBLIC_KEY,
    );
    let doctor = f.ks.doctor().unwrap();
    assert_eq!(doctor.missing.len(), 2, "{:?}", doctor.missing);
    let rsa = doctor
        .missing
        .iter()
        .find(|m| m.key.id == intact.id)
        .unwrap();
    assert_eq!(rsa.absent, ["public key"]);
    assert!(!doctor.healthy());
}

/// doctor used to say "missing objects: 0" for keys of a backend the configuration lacks.
#[test]
fn doctor_reports_keys_of_an_unconfigured_backend_as_unchecked() {
    let f = fixture();
    let key =
        f.ks.create_key(&request("elsewhere", KeyType::HmacSha256))
            .unwrap();
    let path = f.ks.dir().to_path_buf();
    let ks =
        Keystore::open_with(&path, &passphrase(), &keyhold::config::Config::default()).unwrap();
    let doctor = ks.doctor().unwrap();
    assert!(doctor.missing.is_empty(), "{:?}", doctor.missing);
    assert_eq!(doctor.unchecked.len(), 1, "{:?}", doctor.unchecked);
    assert_eq!(doctor.unchecked[0].key.id, key.id);
    assert_eq!(
        doctor.unchecked[0].reason,
        "backend `hsm` is not in the configuration"
    );
    assert!(!doctor.healthy());
    assert!(!doctor.backend_unavailable());
}

/// The real binary (through the shared harness) against a SoftHSM2 token, with the backend
/// `hsm` in its configuration.
struct Cli {
    hsm: SoftHsm,
    env: support::env::Env,
}

impl Cli {
    fn new() -> Self {
        Self::with_token(SoftHsm::new().unwrap())
    }

    fn with_token(hsm: SoftHsm) -> Self {
        let env = support::env::Env::new()
            .with_config("")
            .with_var(
                "SOFTHSM2_CONF",
                SoftHsm::conf_file().unwrap().to_str().unwrap(),
            )
            .with_var("KH_TEST_PIN", keyhold::testing::TEST_USER_PIN);
        let cli = Self { hsm, env };
        // NULs padding a label are padding, like spaces: the configured label is without them.
        cli.configure(
            cli.hsm.label().trim_end_matches('\0'),
            keyhold::testing::SOFTHSM_MODULE,
        );
        cli
    }

    /// Writes the configuration: backend `hsm` is the token `label` of `module`.
    fn configure(&self, label: &str, module: &str) {
        // TOML basic strings take \uXXXX escapes for any character, controls included.
        let label: String = label
            .chars()
            .map(|c| match c {
                '"' | '\\' => format!("\\{c}"),
                c if c.is_control() => format!("\\u{:04x}", u32::from(c)),
                c => c.to_string(),
            })
            .collect();
        self.env
            .set_config(&support::env::hsm_config(module, &label, ""));
    }

    fn run(&self, args: &[&str]) -> Output {
        self.env.run(args, b"")
    }

    fn ok(&self, args: &[&str]) -> String {
        self.env.ok_text(args)
    }

    fn init(&self, sealer: &[&str]) -> String {
        let mut args = vec![
            "init",
            "--argon2-memory-mib",
            "19",
            "--argon2-iterations",
            "2",
        ];
        args.extend_from_slice(sealer);
        let out = self.ok(&args);
        if let Some(kind) = sealer.iter().skip_while(|a| **a != "--sealer").nth(1) {
            // A store sealed without a passphrase opens only when the user says so (M1).
            let mut config = self.env.config_text();
            config.push_str(&format!("\n[store]\nsealer = \"{kind}\"\n"));
            self.env.set_config(&config);
        }
        let id = out.split("store id ").nth(1).unwrap();
        id[..id.find(',').unwrap()].to_owned()
    }

    fn create(&self, name: &str, key_type: &str) -> String {
        self.ok(&[
            "key",
            "create",
            name,
            "--type",
            key_type,
            "--backend",
            "hsm",
        ])
        .trim_end()
        .to_owned()
    }

    /// `doctor`'s exit code, stdout and stderr.
    fn doctor(&self) -> (Option<i32>, String, String) {
        let out = self.run(&["doctor"]);
        (
            out.status.code(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    }
}

/// M3 through the binary: the respelled locator of a recorded key and of the sealer's key is
/// refused with exit 1, and both keys still work.
#[test]
fn cli_remove_orphan_in_another_spelling_keeps_the_key_and_the_sealer_key() {
    let (cli, store_id) = (0..8)
        .find_map(|_| {
            let cli = Cli::new();
            let store_id = cli.init(&["--sealer", "pkcs11", "--backend", "hsm"]);
            respelled(&sealer_locator(&cli.hsm, &store_id)).map(|_| (cli, store_id))
        })
        .unwrap();
    let sealer_key = sealer_locator(&cli.hsm, &store_id);
    let (id, attack) = (0..8)
        .find_map(|i| {
            let id = cli.create(&format!("k{i}"), "ecdsa-p256");
            let locator = cli.ok(&["key", "show", "--key", &id]);
            let locator = support::field(&locator, "locator").to_owned();
            respelled(&locator).map(|attack| (id, attack))
        })
        .unwrap();
    for target in [attack, respelled(&sealer_key).unwrap()] {
        let out = cli.run(&["doctor", "--remove-orphan", &format!("hsm:{target}")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "`{target}` is not a locator as keyhold writes them (32 lowercase hex digits)"
            )),
            "{stderr}"
        );
    }
    let out = cli.run(&["doctor", "--remove-orphan", &format!("hsm:{sealer_key}")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is the key sealing this store's root secret"),
        "{stderr}"
    );
    // The store still opens (through the sealer's key) and the key still signs.
    let msg = cli.env.dir.path().join("msg");
    std::fs::write(&msg, b"still here").unwrap();
    cli.ok(&[
        "sign",
        "--key",
        &id,
        "--in",
        msg.to_str().unwrap(),
        "--out",
        cli.env.dir.path().join("sig").to_str().unwrap(),
    ]);
    let (code, report, _) = cli.doctor();
    assert_eq!(code, Some(0), "{report}");
}

/// Exit codes: 0 healthy, 8 when the store and the token disagree (missing objects before
/// unchecked keys), 7 when a backend is unavailable or keys are unchecked.
#[test]
fn doctor_exit_codes_say_what_it_found() {
    let cli = Cli::new();
    cli.init(&["--sealer", "passphrase"]);
    let id = cli.create("signer", "ecdsa-p256");
    let (code, report, stderr) = cli.doctor();
    assert_eq!(code, Some(0), "{report}{stderr}");
    assert!(
        report.contains("missing objects: 0\nunchecked keys: 0\n"),
        "{report}"
    );

    // Keys of a backend the configuration lacks: unchecked, exit 7.
    cli.env.set_config("");
    let (code, report, stderr) = cli.doctor();
    assert_eq!(code, Some(7), "{report}{stderr}");
    assert!(report.contains("unchecked keys: 1\n"), "{report}");
    assert!(
        report.contains(
            "default/signer in hsm: not checked, backend `hsm` is not in the configuration"
        ),
        "{report}"
    );
    assert_eq!(
        stderr.lines().last(),
        Some("keyhold: doctor found problems: 1 key unchecked"),
        "{stderr}"
    );

    // The backend configured but its module missing: unavailable, exit 7.
    cli.configure(cli.hsm.label(), "/nonexistent/libnothing.so");
    let (code, report, stderr) = cli.doctor();
    assert_eq!(code, Some(7), "{report}{stderr}");
    assert!(report.contains("UNAVAILABLE: "), "{report}");
    assert!(
        report.contains("not checked, backend unavailable: "),
        "{report}"
    );
    assert_eq!(
        stderr.lines().last(),
        Some("keyhold: doctor found problems: 1 backend unavailable, 1 key unchecked"),
        "{stderr}"
    );

    // A private half deleted behind keyhold's back: exit 8.
    cli.configure(cli.hsm.label(), keyhold::testing::SOFTHSM_MODULE);
    let show = cli.ok(&["key", "show", "--key", &id]);
    let locator = support::field(&show, "locator").to_owned();
    destroy_half(
        &cli.hsm,
        &locator,
        cryptoki::object::ObjectClass::PRIVATE_KEY,
    );
    let (code, report, stderr) = cli.doctor();
    assert_eq!(code, Some(8), "{report}{stderr}");
    assert!(
        report.contains(&format!(
            "default/signer in hsm (locator {locator}): its private key is not on the device"
        )),
        "{report}"
    );
    let json = cli.run(&["--json", "doctor"]);
    assert_eq!(json.status.code(), Some(8));
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(
        value["missing"][0]["absent"],
        serde_json::json!(["private key"])
    );
    assert_eq!(value["healthy"], serde_json::json!(false));

    // Disagreement outranks what could not be checked: 8 with an unchecked key as well.
    let mut text = cli.env.config_text();
    text.push_str(
        "\n[backends.gone]\ntype = \"pkcs11\"\nmodule = \"/nonexistent/libnothing.so\"\n\
         token_label = \"x\"\npin_env = \"KH_TEST_PIN\"\n",
    );
    cli.env.set_config(&text);
    let (code, report, stderr) = cli.doctor();
    assert_eq!(code, Some(8), "{report}{stderr}");
    assert!(
        stderr.contains("1 key with missing objects, 1 backend unavailable"),
        "{stderr}"
    );
}

/// An orphan left by a crash is a disagreement: exit 8 until it is removed.
#[test]
fn doctor_exits_8_for_an_orphan_until_it_is_removed() {
    let cli = Cli::new();
    let store_id = cli.init(&["--sealer", "passphrase"]);
    let store_id: [u8; 16] = keyhold::hex::decode(&store_id).unwrap().try_into().unwrap();
    let backend = Pkcs11Backend::new("hsm", &cli.hsm.backend_config()).unwrap();
    let spec = KeySpec::new(KeyType::Ed25519, None, None).unwrap();
    let locator = backend
        .generate(
            KeyContext {
                store_id: &store_id,
                uuid: &[2; 16],
                label: "default/crashed",
                spec: &spec,
            },
            &KeyOptions::default(),
        )
        .unwrap()
        .locator;
    let (code, report, stderr) = cli.doctor();
    assert_eq!(code, Some(8), "{report}{stderr}");
    assert!(report.contains("orphaned objects: 1\n"), "{report}");
    assert_eq!(
        stderr.lines().last(),
        Some("keyhold: doctor found problems: 1 orphaned object"),
        "{stderr}"
    );
    let out = cli.ok(&["doctor", "--remove-orphan", &format!("hsm:{locator}")]);
    assert!(
        out.contains(&format!("removed orphaned object {locator} from hsm")),
        "{out}"
    );
    assert!(out.contains("orphaned objects: 0\n"), "{out}");
}

/// A token label is text whoever initialised the token chose: doctor shows its control
/// characters escaped and drops its NUL padding, so it cannot drive the terminal.
#[test]
fn doctor_escapes_control_characters_in_token_fields() {
    let label = "kh\u{1b}]0;owned\u{7}\u{1b}[2J\u{202e}x\0\0\0\0\0\0\0\0\0\0\0\0";
    assert_eq!(label.len(), 32);
    let cli = Cli::with_token(SoftHsm::with_label(label).unwrap());
    cli.init(&["--sealer", "passphrase"]);
    let (code, report, stderr) = cli.doctor();
    assert_eq!(code, Some(0), "{report}{stderr}");
    assert!(
        report.contains("token: `kh\\u{1b}]0;owned\\u{7}\\u{1b}[2J\\u{202e}x` serial "),
        "{report}"
    );
    for raw in ['\u{1b}', '\u{7}', '\0', '\u{202e}'] {
        assert!(
            !report.contains(raw),
            "{raw:?} reached the terminal: {report:?}"
        );
    }

    // Other commands' errors carry token labels too ("tokens present: …"): escaped the same way.
    cli.configure("another-token", keyhold::testing::SOFTHSM_MODULE);
    let out = cli.run(&[
        "key",
        "create",
        "k",
        "--type",
        "hmac-sha256",
        "--backend",
        "hsm",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert!(stderr.contains("kh\\u{1b}]0;owned\\u{7}"), "{stderr:?}");
    for raw in ['\u{1b}', '\u{7}', '\0', '\u{202e}'] {
        assert!(
            !stderr.contains(raw),
            "{raw:?} reached the terminal: {stderr:?}"
        );
    }
}

/// On openCryptoki's soft token, shared by every test on the machine: a store sees its own keys
/// and counts everyone else's objects as foreign, never as its orphans; the fixture removes the
/// objects of its namespace when dropped.
#[test]
fn doctor_on_the_shared_opencryptoki_token_and_fixture_cleanup() {
    let ock = keyhold::testing::OpenCryptoki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ks = Keystore::create_with(&dir.path().join("store"), &passphrase(), &ock.config("hsm"))
        .unwrap();
    let other = Keystore::create_with(&dir.path().join("other"), &passphrase(), &ock.config("hsm"))
        .unwrap();
    let in_ns = |name: &str| KeyRequest {
        namespace: ock.namespace().to_owned(),
        ..request(name, KeyType::HmacSha256)
    };
    let key = ks.create_key(&in_ns("mine")).unwrap();
    other.create_key(&in_ns("theirs")).unwrap();
    let doctor = ks.doctor().unwrap();
    assert!(doctor.healthy(), "{doctor:?}");
    assert!(doctor.foreign_objects >= 1, "{doctor:?}");
    assert!(doctor.orphans.is_empty(), "{:?}", doctor.orphans);

    ks.mac(&key.id, b"on openCryptoki").unwrap();
    assert_eq!(ock.destroy_objects().unwrap(), 2);
    let doctor = ks.doctor().unwrap();
    assert_eq!(doctor.missing.len(), 1, "{:?}", doctor.missing);
    assert_eq!(doctor.missing[0].absent, ["secret key"]);
}
