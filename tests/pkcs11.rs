//! The PKCS#11 backend against a real SoftHSM2 token, no mocks: key values stay in the token, the
//! PIN is tried once, threads share one token, a vanished token is a typed error, fallback and
//! refusal, reopening. Every test makes its own token.
#![cfg(feature = "pkcs11")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{
    Attribute, AttributeInfo, AttributeType, KeyType as CkKeyType, ObjectClass,
};
use keyhold::backend::pkcs11::Pkcs11Backend;
use keyhold::backend::{Backend, KeyContext, KeyOptions, KeyRef};
use keyhold::config::{BackendConfig, Config, Fallback};
use keyhold::testing::{PinFault, SoftHsm, SOFTHSM_MODULE, TEST_USER_PIN};
use keyhold::{
    Error, KeyInfo, KeyRequest, KeySpec, KeyState, KeyType, Keystore, Purpose, SignatureFormat,
};
use secrecy::SecretString;
use support::pkcs11::{
    is_token_gone, module_under_test, objects, raw_session, so_session, spied, usages, Spy,
    SPY_MODULE,
};
use support::{
    assert_openssl_accepts_public_key, open_envelope, sealer, snapshot, unhex, PASSPHRASE,
};
use tempfile::TempDir;

/// The backend name every test gives its token.
const HSM: &str = "hsm";

/// A store in a temp dir whose backend `hsm` is a token; drop it before the token.
struct HsmStore {
    ks: Keystore,
    path: PathBuf,
    config: Config,
    _dir: TempDir,
}

impl HsmStore {
    fn new(config: Config) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let ks = Keystore::create_with(&path, &sealer(PASSPHRASE), &config).unwrap();
        Self {
            ks,
            path,
            config,
            _dir: dir,
        }
    }

    fn on(hsm: &SoftHsm) -> Self {
        Self::new(hsm.config(HSM))
    }

    /// Creates `name` (in namespace `tests`) in the token.
    fn create(&self, name: &str, key_type: KeyType, purpose: Option<Purpose>) -> KeyInfo {
        self.create_in(Some(HSM), name, key_type, purpose).unwrap()
    }

    /// Creates `name` (in namespace `tests`) in `backend` (`None`: software).
    fn create_in(
        &self,
        backend: Option<&str>,
        name: &str,
        key_type: KeyType,
        purpose: Option<Purpose>,
    ) -> keyhold::Result<KeyInfo> {
        self.ks.create_key(&KeyRequest {
            namespace: "tests".into(),
            name: name.into(),
            spec: KeySpec::new(key_type, purpose, None).unwrap(),
            backend: backend.map(str::to_owned),
        })
    }

    fn reopen(&self) -> Keystore {
        Keystore::open_with(&self.path, &sealer(PASSPHRASE), &self.config).unwrap()
    }
}

/// Whether `result` says the token itself is gone (not merely one of its objects).
fn is_backend_unavailable<T: std::fmt::Debug>(result: &keyhold::Result<T>) -> bool {
    is_token_gone(result, HSM)
}

#[test]
fn private_and_secret_values_cannot_be_read_or_wrapped_out() {
    let hsm = SoftHsm::new().unwrap();
    let t = HsmStore::on(&hsm);
    let keys = [
        ("ec", KeyType::EcdsaP256, ObjectClass::PRIVATE_KEY),
        ("aes", KeyType::Aes256Gcm, ObjectClass::SECRET_KEY),
        ("hmac", KeyType::HmacSha256, ObjectClass::SECRET_KEY),
    ];
    let session = raw_session(hsm.label());
    // A key of the test's own, in the session only, to try to wrap keyhold's keys out with.
    let wrapping = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(CkKeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Wrap(true),
            ],
        )
        .unwrap();

    for (name, key_type, class) in keys {
        let info = t.create(name, key_type, None);
        assert_eq!(info.backend, HSM);
        assert_eq!(
            info.attributes.get("always_sensitive").map(String::as_str),
            Some("true"),
            "{name}: {:?}",
            info.attributes
        );
        assert_eq!(
            info.attributes.get("never_extractable").map(String::as_str),
            Some("true"),
            "{name}: {:?}",
            info.attributes
        );

        let label = format!("tests/{name}");
        let found = objects(&session, &label, Some(class));
        assert_eq!(found.len(), 1, "{label}: {found:?}");
        let handle = found[0];
        let attrs = session
            .get_attributes(
                handle,
                &[
                    AttributeType::Id,
                    AttributeType::Token,
                    AttributeType::Private,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                ],
            )
            .unwrap();
        for attr in &attrs {
            match attr {
                Attribute::Id(id) => assert_eq!(*id, unhex(&info.locator), "{label}: CKA_ID"),
                Attribute::Token(v) => assert!(*v, "{label}: not a token object"),
                Attribute::Private(v) => assert!(*v, "{label}: not private"),
                Attribute::Sensitive(v) => assert!(*v, "{label}: not sensitive"),
                Attribute::Extractable(v) => assert!(!*v, "{label}: extractable"),
                Attribute::AlwaysSensitive(v) => assert!(*v, "{label}: not always sensitive"),
                Attribute::NeverExtractable(v) => assert!(*v, "{label}: once extractable"),
                other => panic!("unasked-for attribute {other:?}"),
            }
        }
        assert_eq!(attrs.len(), 7, "{label}: {attrs:?}");

        // One purpose: the usages of that purpose and no other, whatever the token's defaults.
        let allowed: &[AttributeType] = match key_type {
            KeyType::EcdsaP256 => &[AttributeType::Sign],
            KeyType::Aes256Gcm => &[AttributeType::Encrypt, AttributeType::Decrypt],
            _ => &[AttributeType::Sign, AttributeType::Verify],
        };
        let usages = usages(&session, handle);
        for &(usage, on) in &usages {
            assert_eq!(on, allowed.contains(&usage), "{label}: {usage}");
        }
        for usage in allowed {
            assert!(
                usages.iter().any(|(u, _)| u == usage),
                "{label}: no {usage}"
            );
        }

        // CKA_VALUE: CKR_ATTRIBUTE_SENSITIVE.
        let value = session
            .get_attribute_info(handle, &[AttributeType::Value])
            .unwrap();
        assert!(
            matches!(value.as_slice(), [AttributeInfo::Sensitive]),
            "{label}: CKA_VALUE gave {value:?}"
        );

        // Nor can it be wrapped out under a key the caller holds.
        let wrapped = session.wrap_key(&Mechanism::AesKeyWrapPad, wrapping, handle);
        assert!(
            matches!(wrapped, Err(CkError::Pkcs11(RvError::KeyUnextractable, _))),
            "{label}: C_WrapKey gave {wrapped:?}"
        );

        // The key still works after all that.
        match key_type {
            KeyType::EcdsaP256 => {
                let sig = t.ks.sign(&info.id, b"m", SignatureFormat::Der).unwrap();
                t.ks.verify(&info.id, b"m", &sig, SignatureFormat::Der)
                    .unwrap();
            }
            KeyType::Aes256Gcm => {
                let env = t.ks.encrypt(&info.id, b"m", b"a").unwrap();
                assert_eq!(t.ks.decrypt(&info.id, &env, b"a").unwrap().expose(), b"m");
            }
            _ => {
                let tag = t.ks.mac(&info.id, b"m").unwrap();
                t.ks.verify_mac(&info.id, b"m", &tag).unwrap();
            }
        }

        // destroy_key removes every object of the key from the token.
        assert!(!objects(&session, &label, None).is_empty());
        t.ks.destroy_key(&info.id).unwrap();
        assert_eq!(
            objects(&session, &label, None),
            vec![],
            "{label} left objects"
        );
    }
}

#[test]
fn pkcs11_tool_lists_the_keys_by_label() {
    let hsm = SoftHsm::new().unwrap();
    let t = HsmStore::on(&hsm);
    let signer = t.create("signer", KeyType::EcdsaP256, None);
    let sealer_key = t.create("sealer", KeyType::Aes256Gcm, None);
    let mut cmd = Command::new("pkcs11-tool");
    cmd.args([
        "--module",
        SOFTHSM_MODULE,
        "--token-label",
        hsm.label(),
        "--login",
        "--pin",
        TEST_USER_PIN,
        "-O",
    ])
    .env("SOFTHSM2_CONF", SoftHsm::conf_file().unwrap());
    let out = support::env::run_command(cmd, None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pkcs11-tool failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (info, kind) in [
        (&signer, "Private Key Object; EC"),
        (&sealer_key, "Secret Key Object; AES"),
    ] {
        let label = format!("{}/{}", info.namespace, info.name);
        // pkcs11-tool prints each object as a header line and indented `name: value` lines.
        let object = stdout
            .split_inclusive('\n')
            .fold(Vec::<String>::new(), |mut objects, line| {
                if line.starts_with(char::is_whitespace) {
                    if let Some(last) = objects.last_mut() {
                        last.push_str(line);
                    }
                } else {
                    objects.push(line.to_owned());
                }
                objects
            })
            .into_iter()
            .find(|o| o.starts_with(kind) && o.contains(&label))
            .unwrap_or_else(|| panic!("no {kind} labelled {label} in:\n{stdout}"));
        let line = |name: &str| {
            object
                .lines()
                .find_map(|l| l.trim().strip_prefix(name).map(str::trim))
                .unwrap_or_else(|| panic!("no {name} in {object}"))
                .to_owned()
        };
        assert_eq!(line("label:"), label, "{object}");
        assert_eq!(line("ID:"), info.locator, "{object}");
    }
}

/// What a keystore tells a backend of a key, for tests that use a backend without one.
fn context<'a>(spec: &'a KeySpec, label: &'a str) -> KeyContext<'a> {
    KeyContext {
        store_id: &[7u8; 16],
        uuid: &[9u8; 16],
        label,
        spec,
    }
}

/// The wrong PIN's `C_Login` calls are counted where they arrive, at the module: the test runs
/// again in a child whose wrong-PIN backend reaches SoftHSM2 through pkcs11-spy (the right-PIN
/// backend, the control, loads SoftHSM2 directly and is not counted).
#[test]
fn a_wrong_pin_is_tried_once_and_never_again() {
    if let Some(spy) = spied("a_wrong_pin_is_tried_once_and_never_again") {
        assert_eq!(
            spy.returned("C_Login"),
            ["CKR_PIN_INCORRECT"],
            "one refused C_Login, then none"
        );
        return;
    }
    let hsm = SoftHsm::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wrong_pin = "987654";
    assert_ne!(wrong_pin, TEST_USER_PIN);
    let pin_file = dir.path().join("wrong.pin");
    std::fs::write(&pin_file, format!("{wrong_pin}\n")).unwrap();
    let mut config = hsm.backend_config();
    config.pin_file = Some(pin_file);
    config.module = PathBuf::from(module_under_test());

    let spec = KeySpec::new(KeyType::EcdsaP256, None, None).unwrap();
    let context = context(&spec, "tests/pin");
    let wrong = Pkcs11Backend::new(HSM, &config).unwrap();
    assert_eq!(wrong.login_attempts(), 0, "logged in before being used");
    for attempt in 1..=3 {
        let err = wrong.generate(context, &KeyOptions::default()).unwrap_err();
        match &err {
            Error::BackendLogin { backend, reason } => {
                assert_eq!(backend, HSM);
                assert!(reason.contains("wrong user PIN"), "{err}");
            }
            other => panic!("attempt {attempt}: expected BackendLogin, got {other:?}"),
        }
        let message = err.to_string();
        assert!(message.contains("wrong user PIN"), "{message}");
        assert!(message.contains(hsm.label()), "names the token: {message}");
        assert!(!message.contains(wrong_pin), "the PIN leaked: {message}");
        assert_eq!(wrong.login_attempts(), 1, "after attempt {attempt}");
    }

    // The right PIN, in a new backend, works, with one login.
    let right = Pkcs11Backend::new(HSM, &hsm.backend_config()).unwrap();
    let made = right.generate(context, &KeyOptions::default()).unwrap();
    assert_eq!(right.login_attempts(), 1);
    let key = KeyRef {
        context,
        locator: &made.locator,
        blob: made.blob.as_deref(),
    };
    let sig = right.sign(key, b"m", SignatureFormat::Der).unwrap();
    made.public_key
        .as_ref()
        .unwrap()
        .verify(b"m", &sig, SignatureFormat::Der)
        .unwrap();
    assert_eq!(right.login_attempts(), 1);

    // The refused backend stays refused, without another C_Login, for any operation.
    let err = wrong.sign(key, b"m", SignatureFormat::Der).unwrap_err();
    assert!(
        matches!(&err, Error::BackendLogin { reason, .. } if reason.contains("wrong user PIN")),
        "{err:?}"
    );
    assert_eq!(wrong.login_attempts(), 1);
    right.destroy(key).unwrap();
}

/// README: "a wrong PIN costs one `C_Login` per process and gives exit code 7". Two `keyhold
/// sign` processes with a wrong PIN, each through pkcs11-spy with a log of its own: each exits 7
/// saying so, after exactly one `C_Login`, refused.
#[test]
fn the_cli_with_a_wrong_pin_sends_one_c_login_per_process_and_exits_7() {
    let hsm = SoftHsm::new().unwrap();
    let t = HsmStore::on(&hsm);
    let key = t.create("signer", KeyType::EcdsaP256, None);
    // The store was made through the library, under its passphrase.
    let mut env = support::env::Env::new()
        .without_passphrase()
        .with_softhsm(SPY_MODULE, hsm.label(), "000000", "")
        .with_var("KEYHOLD_PASSPHRASE", PASSPHRASE);
    env.store = t.path.clone();
    let message = env.write("msg", b"m");
    for run in ["first", "second"] {
        let logs = tempfile::tempdir().unwrap();
        let spy = Spy::new(logs.path());
        let out = env.run_with(&["sign", "--key", &key.id, "--in", &message], None, |cmd| {
            cmd.envs(spy.env());
        });
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(7), "{run}: {stderr}");
        assert!(
            stderr.contains("cannot log in to backend `hsm`: wrong user PIN"),
            "{run}: {stderr}"
        );
        assert_eq!(
            spy.calls().returned("C_Login"),
            ["CKR_PIN_INCORRECT"],
            "{run} process"
        );
    }
}

/// README: "no login is tried at all once the token reports its PIN locked or on its final try".
///
/// Why a fault hook: no token here reports either flag on demand. SoftHSM2 never locks a PIN (12
/// wrong PINs still give CKR_PIN_INCORRECT; it sets only CKF_USER_PIN_COUNT_LOW), and
/// openCryptoki's one soft token is shared by every test on the machine: locking it breaks them
/// all, and only re-initialising it (destroying every object) would undo it. So
/// `SoftHsm::report_pin` makes keyhold read CKF_USER_PIN_FINAL_TRY or CKF_USER_PIN_LOCKED in the
/// real token's info (C_GetTokenInfo still reaches the token). The right PIN is configured, so a
/// login, had one been tried, would have worked: the control, with the flag gone, shows one does.
/// The `C_Login` calls are counted at the module by pkcs11-spy, in a child run of this test.
#[test]
fn no_login_is_tried_on_a_token_reporting_its_pin_on_its_final_try_or_locked() {
    if let Some(spy) =
        spied("no_login_is_tried_on_a_token_reporting_its_pin_on_its_final_try_or_locked")
    {
        // Two faults, each refused without a login; then each control's one login.
        assert_eq!(spy.returned("C_Login"), ["CKR_OK", "CKR_OK"]);
        assert!(
            spy.count("C_GetTokenInfo") > 0,
            "the flags came from the token"
        );
        return;
    }
    let spec = KeySpec::new(KeyType::HmacSha256, None, None).unwrap();
    let context = context(&spec, "tests/flags");
    for (fault, says) in [
        (
            PinFault::FinalTry,
            "one more wrong PIN would lock the token labelled `{}`: keyhold will not try",
        ),
        (
            PinFault::Locked,
            "the user PIN of the token labelled `{}` is locked: unlock it with the SO PIN",
        ),
    ] {
        let hsm = SoftHsm::new().unwrap();
        let says = says.replace("{}", hsm.label());
        let mut config = hsm.backend_config();
        config.module = PathBuf::from(module_under_test());
        hsm.report_pin(Some(fault));
        let backend = Pkcs11Backend::new(HSM, &config).unwrap();
        for attempt in 1..=2 {
            match backend.generate(context, &KeyOptions::default()) {
                Err(Error::BackendLogin { backend, reason }) => {
                    assert_eq!(backend, HSM);
                    assert!(
                        reason.contains(&says),
                        "{fault:?}, attempt {attempt}: {reason}"
                    );
                }
                other => {
                    panic!("{fault:?}, attempt {attempt}: expected BackendLogin, got {other:?}")
                }
            }
        }
        assert_eq!(backend.login_attempts(), 0, "{fault:?}");

        // The control: the same token and PIN, the flag gone, a new backend logs in once.
        hsm.report_pin(None);
        let fine = Pkcs11Backend::new(HSM, &config).unwrap();
        let made = fine.generate(context, &KeyOptions::default()).unwrap();
        assert_eq!(fine.login_attempts(), 1, "{fault:?}");
        fine.destroy(KeyRef {
            context,
            locator: &made.locator,
            blob: made.blob.as_deref(),
        })
        .unwrap();
    }
}

/// README: an extractable token key can be wrapped only under keys the SO marked trusted
/// (keyhold makes it with CKA_WRAP_WITH_TRUSTED). Performed with raw cryptoki on SoftHSM2:
/// C_WrapKey under an AES key the user made is refused with CKR_KEY_NOT_WRAPPABLE; under an AES
/// key the SO made with CKA_TRUSTED it succeeds, and the wrapped value is keyhold's key (an
/// envelope keyhold made opens under it): the refusal is about trust, not the mechanism.
/// openCryptoki 3.8.1 refuses CKA_WRAP_WITH_TRUSTED, so keyhold makes no extractable key there at
/// all (pkcs11_opencryptoki.rs, `opencryptoki_refuses_extractable_keys_…`): nothing to wrap.
#[test]
fn extractable_keys_wrap_only_under_so_trusted_keys() {
    let hsm = SoftHsm::new().unwrap();
    // The SO's part first: PKCS#11 logs in an application, not a session, and once keyhold is
    // logged in as the user, no SO login is possible in this process.
    let so = so_session(hsm.label());
    let secret_aes = |token: bool| {
        vec![
            Attribute::Token(token),
            Attribute::Private(false),
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(CkKeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
        ]
    };
    let mut trusted_template = secret_aes(true);
    trusted_template.push(Attribute::Trusted(true));
    so.generate_key(&Mechanism::AesKeyGen, &trusted_template)
        .unwrap();
    so.logout().unwrap();
    drop(so);

    let t = HsmStore::on(&hsm);
    let info =
        t.ks.create_key_with(
            &KeyRequest {
                namespace: "tests".into(),
                name: "vault".into(),
                spec: KeySpec::new(KeyType::Aes256Gcm, None, None).unwrap(),
                backend: Some(HSM.into()),
            },
            &KeyOptions::new().extractable(true),
        )
        .unwrap();
    assert_eq!(
        info.attributes.get("wrap_with_trusted").map(String::as_str),
        Some("true"),
        "{:?}",
        info.attributes
    );
    let envelope = t.ks.encrypt(&info.id, b"wrapped out", b"aad").unwrap();

    let session = raw_session(hsm.label());
    let [key] = objects(&session, "tests/vault", Some(ObjectClass::SECRET_KEY))[..] else {
        panic!("one secret key object expected");
    };
    let trusted = session.find_objects(&[Attribute::Trusted(true)]).unwrap();
    assert_eq!(trusted.len(), 1, "the SO's key");
    let untrusted = session
        .generate_key(&Mechanism::AesKeyGen, &secret_aes(false))
        .unwrap();

    let refused = session.wrap_key(&Mechanism::AesKeyWrap, untrusted, key);
    assert!(
        matches!(
            refused,
            Err(CkError::Pkcs11(RvError::KeyNotWrappable, Function::WrapKey))
        ),
        "C_WrapKey under an untrusted key gave {refused:?}"
    );

    // The control: under the trusted key it wraps, and what it wraps is keyhold's key.
    let wrapped = session
        .wrap_key(&Mechanism::AesKeyWrap, trusted[0], key)
        .unwrap();
    let mut copy_template = secret_aes(false);
    copy_template.retain(|a| a.attribute_type() != AttributeType::ValueLen);
    copy_template.extend([Attribute::Sensitive(false), Attribute::Extractable(true)]);
    let copy = session
        .unwrap_key(&Mechanism::AesKeyWrap, trusted[0], &wrapped, &copy_template)
        .unwrap();
    let value = session
        .get_attributes(copy, &[AttributeType::Value])
        .unwrap();
    let [Attribute::Value(value)] = value.as_slice() else {
        panic!("no CKA_VALUE: {value:?}");
    };
    assert_eq!(open_envelope(value, &envelope, b"aad"), b"wrapped out");
}

#[test]
fn eight_threads_sign_a_thousand_times_each_on_one_token() {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 1000;
    let hsm = SoftHsm::new().unwrap();
    let t = HsmStore::on(&hsm);
    let key = t.create("busy", KeyType::EcdsaP256, None);
    let ks = Arc::new(t.ks);

    let start = Instant::now();
    let workers: Vec<_> = (0..THREADS)
        .map(|thread| {
            let ks = Arc::clone(&ks);
            let id = key.id.clone();
            std::thread::spawn(move || {
                let mut signed = Vec::with_capacity(PER_THREAD);
                let mut errors = Vec::new();
                for i in 0..PER_THREAD {
                    let message = format!("thread {thread} message {i}").into_bytes();
                    match ks.sign(&id, &message, SignatureFormat::Der) {
                        Ok(sig) => signed.push((message, sig)),
                        Err(e) => errors.push(format!("{e:?}")),
                    }
                }
                (signed, errors)
            })
        })
        .collect();
    let mut signed = Vec::new();
    let mut errors = Vec::new();
    for worker in workers {
        let (s, e) = worker.join().unwrap();
        signed.extend(s);
        errors.extend(e);
    }
    let elapsed = start.elapsed();
    println!(
        "{THREADS} threads x {PER_THREAD} P-256 signatures on one SoftHSM token: {:.2?} \
         ({:.0} signatures/s)",
        elapsed,
        (THREADS * PER_THREAD) as f64 / elapsed.as_secs_f64()
    );
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        errors.first()
    );
    assert_eq!(signed.len(), THREADS * PER_THREAD);

    // Every signature verifies, against the recorded public key and through the keystore.
    let public = ks.public_key(&key.id).unwrap();
    for (message, sig) in &signed {
        public.verify(message, sig, SignatureFormat::Der).unwrap();
    }
    for (message, sig) in signed.iter().step_by(97) {
        ks.verify(&key.id, message, sig, SignatureFormat::Der)
            .unwrap();
    }
    // And a signature is not good for another thread's message.
    let (_, sig) = &signed[0];
    let other = public.verify(&signed[1].0, sig, SignatureFormat::Der);
    assert!(
        matches!(other, Err(Error::VerificationFailed { what: "signature" })),
        "{other:?}"
    );
}

/// A store with a P-256 and an AES key in a token, both used once (so a session is open and logged
/// in and their handles are cached), and a software Ed25519 key; then the token is deleted.
struct DeletedToken {
    t: HsmStore,
    _hsm: SoftHsm,
    signer: KeyInfo,
    aes: KeyInfo,
    software: KeyInfo,
    /// An envelope the AES key made before the deletion.
    envelope: Vec<u8>,
    /// The store directory just before the deletion.
    before: std::collections::BTreeMap<PathBuf, support::FileBytes>,
}

impl DeletedToken {
    fn new() -> Self {
        let hsm = SoftHsm::new().unwrap();
        let t = HsmStore::on(&hsm);
        let signer = t.create("in-token", KeyType::EcdsaP256, None);
        let aes = t.create("aes-in-token", KeyType::Aes256Gcm, None);
        let software = t
            .create_in(None, "in-software", KeyType::Ed25519, None)
            .unwrap();
        assert_eq!(software.backend, "software");
        t.ks.sign(&signer.id, b"before", SignatureFormat::Der)
            .unwrap();
        let envelope = t.ks.encrypt(&aes.id, b"before", b"").unwrap();
        // AES-GCM invocations are reserved in the store ahead of use, in growing blocks (1, then
        // 2): after a second encryption this process holds one more, so the encryption refused
        // after the deletion below writes nothing.
        t.ks.encrypt(&aes.id, b"before", b"").unwrap();
        let before = snapshot(&t.path);
        hsm.delete_token().unwrap();
        Self {
            t,
            _hsm: hsm,
            signer,
            aes,
            software,
            envelope,
            before,
        }
    }

    fn assert_store_unchanged(&self) {
        assert_eq!(snapshot(&self.t.path), self.before, "the store changed");
    }
}

#[test]
fn a_deleted_token_is_a_typed_error_and_the_store_is_untouched() {
    let d = DeletedToken::new();
    let ks = &d.t.ks;

    let first = ks.sign(&d.signer.id, b"after", SignatureFormat::Der);
    let second = ks.sign(&d.signer.id, b"after", SignatureFormat::Der);
    let decrypt = ks
        .decrypt(&d.aes.id, &d.envelope, b"")
        .map(|p| p.expose().to_vec());
    let encrypt = ks.encrypt(&d.aes.id, b"after", b"");
    println!("after delete_token:\n  sign: {first:?}\n  sign again: {second:?}");
    println!("  decrypt: {decrypt:?}\n  encrypt: {encrypt:?}");
    assert!(is_backend_unavailable(&first), "sign: {first:?}");
    assert!(is_backend_unavailable(&second), "sign again: {second:?}");
    assert!(is_backend_unavailable(&decrypt), "decrypt: {decrypt:?}");
    assert!(is_backend_unavailable(&encrypt), "encrypt: {encrypt:?}");
    d.assert_store_unchanged();

    // What needs no token still works: the records, recorded public keys, software keys.
    assert_eq!(ks.key_info(&d.signer.id).unwrap(), d.signer);
    assert_eq!(ks.list_keys(None).unwrap().len(), 3);
    ks.public_key(&d.signer.id).unwrap();
    let sig = ks.sign(&d.software.id, b"m", SignatureFormat::Der).unwrap();
    ks.verify(&d.software.id, b"m", &sig, SignatureFormat::Der)
        .unwrap();
    d.assert_store_unchanged();
}

/// The same condition as `sign` above (the key's objects went with the token): the same error.
#[test]
fn backend_public_key_of_a_deleted_token_is_backend_unavailable() {
    let d = DeletedToken::new();
    let public = d.t.ks.backend_public_key(&d.signer.id);
    assert!(
        is_backend_unavailable(&public),
        "backend_public_key: {public:?}"
    );
}

/// A key cannot be made in a token that is gone: the caller should be told it is unavailable.
#[test]
fn create_key_in_a_deleted_token_is_backend_unavailable() {
    let d = DeletedToken::new();
    let created = d.t.create_in(Some(HSM), "new", KeyType::EcdsaP256, None);
    d.assert_store_unchanged();
    assert!(is_backend_unavailable(&created), "create_key: {created:?}");
}

#[test]
fn fallback_software_makes_what_the_token_cannot_in_software() {
    let hsm = SoftHsm::new().unwrap();
    let mut backend = hsm.backend_config();
    backend.fallback = Fallback::Software;
    let mut config = Config::default();
    config
        .backends
        .insert(HSM.into(), BackendConfig::Pkcs11(backend));
    let t = HsmStore::new(config);

    let info = t
        .create_in(Some(HSM), "oaep", KeyType::Rsa2048, Some(Purpose::Decrypt))
        .unwrap();
    assert_eq!(info.backend, "software");
    assert_eq!(
        info.attributes.get("fallback_for").map(String::as_str),
        Some(HSM),
        "{:?}",
        info.attributes
    );
    let env = t.ks.encrypt(&info.id, b"a data key", b"aad").unwrap();
    assert_eq!(
        t.ks.decrypt(&info.id, &env, b"aad").unwrap().expose(),
        b"a data key"
    );
    let err = t.ks.decrypt(&info.id, &env, b"other").unwrap_err();
    assert!(matches!(err, Error::DecryptionFailed { .. }), "{err}");
    // It says so after reopening, too.
    let again = t.reopen();
    assert_eq!(again.key_info(&info.id).unwrap(), info);

    // What the token can make still goes to the token.
    let signer = t
        .create_in(Some(HSM), "signer", KeyType::EcdsaP256, None)
        .unwrap();
    assert_eq!(signer.backend, HSM);
    assert!(!signer.attributes.contains_key("fallback_for"));
}

#[test]
fn refuse_is_the_default_and_names_the_token_and_oaep() {
    let hsm = SoftHsm::new().unwrap();
    let t = HsmStore::on(&hsm);
    let err = t
        .create_in(Some(HSM), "oaep", KeyType::Rsa2048, Some(Purpose::Decrypt))
        .unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported { backend, .. } if backend == HSM),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains(hsm.label()), "{message}");
    assert!(
        message.contains("lacks CKM_RSA_PKCS_OAEP with SHA-256"),
        "{message}"
    );
    assert!(t.ks.list_keys(None).unwrap().is_empty());
    // Learned on a real key, which is gone again: nothing is left on the token.
    assert_eq!(
        raw_session(hsm.label()).find_objects(&[]).unwrap(),
        vec![],
        "the refused key left objects"
    );
    // Only RSA decryption is marked: the backend still makes everything else.
    let caps =
        t.ks.backends()
            .find(|b| b.name() == HSM)
            .unwrap()
            .capabilities()
            .unwrap();
    assert!(!caps.supports(KeyType::Rsa3072, Purpose::Decrypt));
    assert!(caps
        .missing(KeyType::Rsa3072, Purpose::Decrypt)
        .unwrap()
        .contains("OAEP"));
    assert!(caps.supports(KeyType::Rsa2048, Purpose::Sign));
    let signer = t.create("signer", KeyType::EcdsaP256, None);
    assert_eq!(signer.backend, HSM);
    t.ks.sign(&signer.id, b"m", SignatureFormat::Der).unwrap();
}

/// The DER OID of P-256, as CKA_EC_PARAMS.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// M4: someone with the PIN destroys a keyhold key's private object and generates, on the token
/// (so CKA_LOCAL is true), a replacement with the same CKA_ID and label that is extractable and
/// not sensitive. keyhold must never sign with it: not through its cached handle, not after
/// reopening.
#[test]
fn a_same_id_replacement_made_with_the_pin_is_never_used() {
    let hsm = SoftHsm::new().unwrap();
    let t = HsmStore::on(&hsm);
    let info = t.create("victim", KeyType::EcdsaP256, None);
    t.ks.sign(&info.id, b"before", SignatureFormat::Der)
        .unwrap();

    let session = raw_session(hsm.label());
    let label = "tests/victim";
    let id = unhex(&info.locator);
    let [private] = objects(&session, label, Some(ObjectClass::PRIVATE_KEY))[..] else {
        panic!("one private object expected");
    };
    session.destroy_object(private).unwrap();
    let (_, planted) = session
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(true),
                Attribute::Verify(true),
                Attribute::EcParams(P256_PARAMS.to_vec()),
                Attribute::Id(id.clone()),
                Attribute::Label(label.as_bytes().to_vec()),
            ],
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
                Attribute::Sign(true),
                Attribute::Id(id),
                Attribute::Label(label.as_bytes().to_vec()),
            ],
        )
        .unwrap();
    // The attacker holds its value: anything signed with it would be forgeable.
    let value = session
        .get_attributes(planted, &[AttributeType::Value])
        .unwrap();
    assert!(matches!(value.as_slice(), [Attribute::Value(v)] if !v.is_empty()));

    let refused = |result: keyhold::Result<Vec<u8>>| match result {
        Err(Error::KeyObjectMismatch {
            backend,
            key,
            reason,
        }) => {
            assert_eq!(backend, HSM);
            assert_eq!(key, label);
            for differs in [
                "CKA_SENSITIVE",
                "CKA_ALWAYS_SENSITIVE",
                "CKA_NEVER_EXTRACTABLE",
            ] {
                assert!(reason.contains(differs), "{reason}");
            }
        }
        other => panic!("expected KeyObjectMismatch, got {other:?}"),
    };
    refused(t.ks.sign(&info.id, b"after", SignatureFormat::Der));
    refused(t.reopen().sign(&info.id, b"after", SignatureFormat::Der));
}

/// L8: a token chosen by label alone is refused when two tokens carry that label, naming both
/// serials, before any PIN is sent; its serial then picks it.
#[test]
fn two_tokens_with_one_label_are_refused_naming_both_serials() {
    let hsm = SoftHsm::new().unwrap();
    let module = support::pkcs11::module(SOFTHSM_MODULE);
    let free = module
        .get_all_slots()
        .unwrap()
        .into_iter()
        .find(|&s| {
            module
                .get_token_info(s)
                .is_ok_and(|i| !i.token_initialized())
        })
        .unwrap();
    let so_pin = SecretString::from(keyhold::testing::TEST_SO_PIN.to_owned());
    module.init_token(free, &so_pin, hsm.label()).unwrap();
    let serials: Vec<String> = module
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .filter_map(|s| module.get_token_info(s).ok())
        .filter(|i| i.label().trim_end() == hsm.label())
        .map(|i| i.serial_number().trim_end().to_owned())
        .collect();
    assert_eq!(serials.len(), 2, "{serials:?}");
    let delete_twin = || {
        let mut cmd = Command::new("softhsm2-util");
        cmd.args(["--delete-token", "--serial", &serials[1]])
            .env("SOFTHSM2_CONF", SoftHsm::conf_file().unwrap());
        let out = support::env::run_command(cmd, None);
        assert!(out.status.success(), "{out:?}");
    };

    let backend = Pkcs11Backend::new(HSM, &hsm.backend_config()).unwrap();
    let err = backend.capabilities().unwrap_err();
    match &err {
        Error::BackendUnavailable { backend, reason } => {
            assert_eq!(backend, HSM);
            assert!(
                reason.contains(&format!(
                    "2 tokens match the token labelled `{}`",
                    hsm.label()
                )),
                "{reason}"
            );
            for serial in &serials {
                assert!(reason.contains(&format!("`{serial}`")), "{reason}");
            }
        }
        other => panic!("expected BackendUnavailable, got {other:?}"),
    }
    // Generating on that backend (which would log in) is refused before any login.
    let spec = KeySpec::new(KeyType::EcdsaP256, None, None).unwrap();
    let generated = backend.generate(context(&spec, "tests/k"), &KeyOptions::new());
    assert!(
        matches!(&generated, Err(Error::BackendUnavailable { reason, .. }) if reason.contains("2 tokens match")),
        "{generated:?}"
    );
    assert_eq!(backend.login_attempts(), 0, "a PIN was sent");
    // Nor through the keystore.
    let t = HsmStore::on(&hsm);
    let created = t.create_in(Some(HSM), "k", KeyType::EcdsaP256, None);
    assert!(
        matches!(&created, Err(Error::BackendUnavailable { reason, .. }) if reason.contains("2 tokens match")),
        "{created:?}"
    );

    let mut by_serial = hsm.backend_config();
    by_serial.token_label = None;
    by_serial.token_serial = Some(serials[0].clone());
    let chosen = Pkcs11Backend::new(HSM, &by_serial).unwrap();
    assert!(chosen
        .capabilities()
        .unwrap()
        .supports(KeyType::EcdsaP256, Purpose::Sign));
    delete_twin();
}

#[test]
fn public_keys_are_spki_that_openssl_reads() {
    let hsm = SoftHsm::new().unwrap();
    let t = HsmStore::on(&hsm);
    for key_type in [
        KeyType::EcdsaP256,
        KeyType::EcdsaP384,
        KeyType::Ed25519,
        KeyType::Rsa2048,
    ] {
        let info = t.create(key_type.as_str(), key_type, None);
        assert_eq!(info.backend, HSM);
        let recorded = t.ks.public_key(&info.id).unwrap();
        assert_eq!(recorded, t.ks.backend_public_key(&info.id).unwrap());
        let pem = recorded.to_pem();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem}");
        assert_openssl_accepts_public_key(&pem, key_type);
        assert_der_matches_openssl(&pem, recorded.spki_der());
    }
}

/// OpenSSL re-encodes the PEM to the same DER: the SPKI is canonical.
fn assert_der_matches_openssl(pem: &str, der: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pub.pem"), pem).unwrap();
    let (ok, text) = support::openssl(
        dir.path(),
        &[
            "pkey", "-pubin", "-in", "pub.pem", "-outform", "DER", "-out", "pub.der",
        ],
    );
    assert!(ok, "{text}");
    assert_eq!(std::fs::read(dir.path().join("pub.der")).unwrap(), der);
}

#[test]
fn token_keys_work_after_reopening() {
    let hsm = SoftHsm::new().unwrap();
    let t = HsmStore::on(&hsm);
    let signer = t.create("signer", KeyType::EcdsaP256, None);
    let sealer_key = t.create("sealer", KeyType::Aes256Gcm, None);
    let macer = t.create("macer", KeyType::HmacSha256, None);
    let sig = t.ks.sign(&signer.id, b"m", SignatureFormat::Der).unwrap();
    let env = t.ks.encrypt(&sealer_key.id, b"plain", b"aad").unwrap();
    let tag = t.ks.mac(&macer.id, b"m").unwrap();
    let HsmStore {
        ks,
        path,
        config,
        _dir,
    } = t;
    drop(ks); // closes every session on the token

    let again = Keystore::open_with(&path, &sealer(PASSPHRASE), &config).unwrap();
    assert_eq!(again.list_keys(None).unwrap().len(), 3);
    again
        .verify(&signer.id, b"m", &sig, SignatureFormat::Der)
        .unwrap();
    let fresh = again.sign(&signer.id, b"m2", SignatureFormat::Der).unwrap();
    again
        .verify(&signer.id, b"m2", &fresh, SignatureFormat::Der)
        .unwrap();
    assert_eq!(
        again.backend_public_key(&signer.id).unwrap(),
        again.public_key(&signer.id).unwrap()
    );
    assert_eq!(
        again
            .decrypt(&sealer_key.id, &env, b"aad")
            .unwrap()
            .expose(),
        b"plain"
    );
    assert_eq!(again.mac(&macer.id, b"m").unwrap(), tag);
    for info in [&signer, &sealer_key, &macer] {
        assert_eq!(&again.key_info(&info.id).unwrap(), info);
    }
}

/// A key whose destruction is due while its token is away is destroyed all the same: nothing uses
/// it again (its ID says destroyed, not "unavailable"), `maintain` says what it could not finish,
/// and finishes once the token is back, removing every version's objects.
#[test]
fn a_destruction_due_while_the_token_is_away_is_finished_when_it_is_back() {
    let hsm = SoftHsm::new().unwrap();
    let t = HsmStore::on(&hsm);
    let key = t.create("doomed", KeyType::EcdsaP256, None);
    let rotated = t.ks.rotate_key(&key.id, None).unwrap();
    let locators: Vec<String> = rotated.versions.iter().map(|v| v.locator.clone()).collect();
    let session = raw_session(hsm.label());
    let on_token = |locator: &str| {
        session
            .find_objects(&[Attribute::Id(unhex(locator))])
            .unwrap()
            .len()
    };
    assert!(
        locators.iter().all(|l| on_token(l) == 2),
        "both halves of both versions"
    );
    let soon = keyhold::time::now() + 1;
    t.ks.schedule_destroy(&key.id, soon, None).unwrap();

    // Another process whose configuration names a token that is not there.
    let mut away = t.config.clone();
    let BackendConfig::Pkcs11(p) = away.backends.get_mut(HSM).unwrap() else {
        panic!("{HSM} is a PKCS#11 backend");
    };
    p.token_label = Some("keyhold-no-such-token".into());
    let elsewhere = Keystore::open_with(&t.path, &sealer(PASSPHRASE), &away).unwrap();
    while keyhold::time::now() < soon {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let err = elsewhere
        .sign(&key.id, b"m", SignatureFormat::Der)
        .unwrap_err();
    assert!(
        matches!(&err, Error::WrongState { state, .. } if state.starts_with("destroyed on ")),
        "{err}"
    );
    let report = elsewhere.maintain().unwrap();
    assert!(report.done.is_empty(), "{:?}", report.done);
    assert!(
        matches!(report.failed.as_slice(), [(key, Error::BackendUnavailable { .. })] if key == "tests/doomed"),
        "{:?}",
        report.failed
    );
    let tombstone = elsewhere.key_info(&key.id).unwrap();
    assert_eq!(tombstone.state, KeyState::Destroyed);
    assert_eq!(tombstone.destroyed_at, None, "erased without its token");
    assert!(
        locators.iter().all(|l| on_token(l) == 2),
        "objects went without the token"
    );

    // With the token: finished, every version's objects gone.
    let done = t.ks.maintain().unwrap().done;
    assert_eq!(done.len(), 1, "{done:?}");
    assert!(t.ks.key_info(&key.id).unwrap().destroyed_at.is_some());
    for locator in &locators {
        assert_eq!(
            on_token(locator),
            0,
            "version object {locator} is still on the token"
        );
    }
    assert!(t.ks.doctor().unwrap().orphans.is_empty());
}
