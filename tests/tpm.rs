//! The TPM backend against a real swtpm, through the `Backend` trait: each test starts its own
//! swtpm (cargo-nextest runs each test in its own process).
#![cfg(feature = "tpm")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyhold::backend::tpm::fixture::Swtpm;
use keyhold::backend::tpm::{TpmBackend, MAX_HMAC_INPUT};
use keyhold::backend::{GeneratedKey, KeyContext, KeyOptions, KeyRef};
use keyhold::secret::SecretBytes;
use keyhold::{Algorithm, Backend, Error, KeySpec, KeyType, Purpose, RsaPadding, SignatureFormat};
use support::openssl_verifies;
use support::tpm::{flags, holds_any_part_of, loaded_attributes, srk_attributes, Tap, CC_HMAC};

const MESSAGE: &[u8] = b"keyhold TPM backend test message";
const STORE: [u8; 16] = [0x51; 16];
/// How long a call may take before the test calls it a hang: far more than any TPM command takes
/// on swtpm, even on a loaded 2-core machine running ten test processes.
const HANG: Duration = Duration::from_secs(60);

fn kek() -> SecretBytes {
    SecretBytes::copy_from(&[0x4b; 32])
}

fn backend(tpm: &Swtpm) -> TpmBackend {
    TpmBackend::new("tpm", &tpm.tcti(), &kek()).unwrap()
}

/// A key as the keystore would hold it: its context's fields plus what `generate` returned.
struct Key {
    uuid: [u8; 16],
    spec: KeySpec,
    generated: GeneratedKey,
}

impl Key {
    fn context(&self) -> KeyContext<'_> {
        KeyContext {
            store_id: &STORE,
            uuid: &self.uuid,
            label: "test/key",
            spec: &self.spec,
        }
    }

    fn at(&self) -> KeyRef<'_> {
        KeyRef {
            context: self.context(),
            locator: &self.generated.locator,
            blob: self.generated.blob.as_deref(),
        }
    }

    fn with_blob<'a>(&'a self, blob: &'a [u8]) -> KeyRef<'a> {
        KeyRef {
            blob: Some(blob),
            ..self.at()
        }
    }
}

fn create(
    backend: &TpmBackend,
    key_type: KeyType,
    purpose: Purpose,
    padding: Option<RsaPadding>,
) -> Key {
    let spec = KeySpec::new(key_type, Some(purpose), padding).unwrap();
    let mut uuid = [0u8; 16];
    aws_lc_rs::rand::fill(&mut uuid).unwrap();
    let context = KeyContext {
        store_id: &STORE,
        uuid: &uuid,
        label: "test/key",
        spec: &spec,
    };
    let generated = backend.generate(context, &KeyOptions::new()).unwrap();
    assert_eq!(generated.locator.len(), 32, "{}", generated.locator);
    assert!(generated.blob.is_some());
    Key {
        uuid,
        spec,
        generated,
    }
}

/// Signs, verifies with aws-lc-rs and with openssl, and checks the raw form of ECDSA.
fn sign_and_verify(backend: &TpmBackend, key: &Key) {
    let algorithm = key.spec.algorithm();
    let public = key.generated.public_key.clone().unwrap();
    assert_eq!(backend.public_key(key.at()).unwrap(), public);
    let sig = backend
        .sign(key.at(), MESSAGE, SignatureFormat::Der)
        .unwrap();
    public.verify(MESSAGE, &sig, SignatureFormat::Der).unwrap();
    let err = public
        .verify(b"another message", &sig, SignatureFormat::Der)
        .unwrap_err();
    assert!(
        matches!(err, Error::VerificationFailed { what: "signature" }),
        "{err:?}"
    );
    assert!(
        openssl_verifies(&public.to_pem(), algorithm, MESSAGE, &sig),
        "openssl refused a {algorithm} signature from the TPM"
    );
    assert!(!openssl_verifies(
        &public.to_pem(),
        algorithm,
        b"another message",
        &sig
    ));
    match algorithm {
        Algorithm::EcdsaP256Sha256 | Algorithm::EcdsaP384Sha384 => {
            let width = if algorithm == Algorithm::EcdsaP256Sha256 {
                64
            } else {
                96
            };
            let raw = backend
                .sign(key.at(), MESSAGE, SignatureFormat::Raw)
                .unwrap();
            assert_eq!(raw.len(), width);
            public.verify(MESSAGE, &raw, SignatureFormat::Raw).unwrap();
        }
        Algorithm::RsaPkcs1Sha256 => {
            assert_eq!(sig.len(), 256);
            let again = backend
                .sign(key.at(), MESSAGE, SignatureFormat::Der)
                .unwrap();
            assert_eq!(again, sig, "PKCS#1 v1.5 is deterministic");
        }
        Algorithm::RsaPssSha256 => assert_eq!(sig.len(), 256),
        other => panic!("{other} does not sign"),
    }
}

#[test]
fn ecdsa_p256_signs_and_verifies() {
    let tpm = Swtpm::new().unwrap();
    let backend = backend(&tpm);
    let key = create(&backend, KeyType::EcdsaP256, Purpose::Sign, None);
    sign_and_verify(&backend, &key);
}

#[test]
fn ecdsa_p384_signs_and_verifies() {
    let tpm = Swtpm::new().unwrap();
    let backend = backend(&tpm);
    let key = create(&backend, KeyType::EcdsaP384, Purpose::Sign, None);
    sign_and_verify(&backend, &key);
}

#[test]
fn rsa2048_pss_signs_and_verifies() {
    let tpm = Swtpm::new().unwrap();
    let backend = backend(&tpm);
    let key = create(
        &backend,
        KeyType::Rsa2048,
        Purpose::Sign,
        Some(RsaPadding::Pss),
    );
    sign_and_verify(&backend, &key);
}

#[test]
fn rsa2048_pkcs1_signs_and_verifies() {
    let tpm = Swtpm::new().unwrap();
    let backend = backend(&tpm);
    let key = create(
        &backend,
        KeyType::Rsa2048,
        Purpose::Sign,
        Some(RsaPadding::Pkcs1v15),
    );
    sign_and_verify(&backend, &key);
}

#[test]
fn hmac_is_deterministic_per_key_and_limited_to_1024_bytes() {
    let tpm = Swtpm::new().unwrap();
    let backend = backend(&tpm);
    let a = create(&backend, KeyType::HmacSha256, Purpose::Mac, None);
    let b = create(&backend, KeyType::HmacSha256, Purpose::Mac, None);
    assert!(a.generated.public_key.is_none());
    let err = backend.public_key(a.at()).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput(m) if m.ends_with("secret: it has no public key")),
        "{err}"
    );

    let data = vec![0x3c; MAX_HMAC_INPUT];
    let tag = backend.mac(a.at(), &data).unwrap();
    assert_eq!(tag.len(), 32);
    assert_eq!(backend.mac(a.at(), &data).unwrap(), tag, "deterministic");
    assert_ne!(backend.mac(b.at(), &data).unwrap(), tag, "keys differ");
    assert_ne!(backend.mac(a.at(), &data[1..]).unwrap(), tag);
    assert_eq!(backend.mac(a.at(), b"").unwrap().len(), 32);

    let err = backend
        .mac(a.at(), &vec![0x3c; MAX_HMAC_INPUT + 1])
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("1024") && text.contains("TPM2_HMAC"),
        "{text}"
    );
}

#[test]
fn capabilities_name_what_the_tpm_backend_lacks() {
    let tpm = Swtpm::new().unwrap();
    let backend = backend(&tpm);
    let caps = backend.capabilities().unwrap();
    let supported = [
        (KeyType::EcdsaP256, Purpose::Sign),
        (KeyType::EcdsaP384, Purpose::Sign),
        (KeyType::Rsa2048, Purpose::Sign),
        (KeyType::Rsa2048, Purpose::Decrypt),
        (KeyType::Rsa3072, Purpose::Sign),
        (KeyType::Rsa3072, Purpose::Decrypt),
        (KeyType::HmacSha256, Purpose::Mac),
    ];
    for key_type in KeyType::ALL {
        for &purpose in key_type.purposes() {
            if supported.contains(&(key_type, purpose)) {
                assert!(caps.supports(key_type, purpose), "{key_type} {purpose}");
            } else {
                assert!(!caps.supports(key_type, purpose), "{key_type} {purpose}");
                assert!(
                    caps.missing(key_type, purpose).is_some(),
                    "no reason for {key_type} {purpose}"
                );
            }
        }
    }
    // What it refuses, it refuses with the reason, so the keystore can fall back.
    let spec = KeySpec::new(KeyType::Ed25519, None, None).unwrap();
    let uuid = [9u8; 16];
    let context = KeyContext {
        store_id: &STORE,
        uuid: &uuid,
        label: "test/ed",
        spec: &spec,
    };
    let err = backend.generate(context, &KeyOptions::new()).unwrap_err();
    match &err {
        Error::Unsupported { backend, what } => {
            assert_eq!(backend, "tpm");
            assert!(what.contains("Ed25519"), "{what}");
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    let spec = KeySpec::new(KeyType::EcdsaP256, None, None).unwrap();
    let context = KeyContext {
        spec: &spec,
        ..context
    };
    let err = backend
        .generate(context, &KeyOptions::new().extractable(true))
        .unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported { what, .. } if what.contains("fixedTPM")),
        "{err:?}"
    );
}

/// A record refused before the TPM is asked: its sealed authValue does not decrypt.
fn assert_auth_refused(err: &Error, case: &str) {
    assert!(
        matches!(err, Error::Integrity { what } if what.contains("does not decrypt under this store's key")),
        "{case}: {err:?}"
    );
}

#[test]
fn the_auth_value_is_sealed_to_the_store_and_the_record() {
    let tpm = Swtpm::new().unwrap();
    let backend = backend(&tpm);
    let key = create(&backend, KeyType::EcdsaP256, Purpose::Sign, None);
    let blob = key.generated.blob.clone().unwrap();
    // The sealed authValue (nonce, 32 bytes, tag) ends the blob: damage anywhere in it is refused
    // before the TPM is asked.
    for from_end in [1, 17, 30, 47, 60] {
        let mut bent = blob.clone();
        let at = bent.len() - from_end;
        bent[at] ^= 0x01;
        let err = backend
            .sign(key.with_blob(&bent), MESSAGE, SignatureFormat::Der)
            .unwrap_err();
        assert_auth_refused(&err, &format!("byte -{from_end}"));
    }
    // The TPM parts are bound too.
    let mut bent = blob.clone();
    bent[10] ^= 0x01;
    let err = backend
        .sign(key.with_blob(&bent), MESSAGE, SignatureFormat::Der)
        .unwrap_err();
    assert_auth_refused(&err, "a bent SRK Name");
    // Another record, another store key: refused.
    let moved = Key {
        uuid: [0xee; 16],
        spec: key.spec,
        generated: GeneratedKey {
            locator: key.generated.locator.clone(),
            blob: Some(blob.clone()),
            public_key: None,
            attributes: Vec::new(),
        },
    };
    let err = backend
        .sign(moved.at(), MESSAGE, SignatureFormat::Der)
        .unwrap_err();
    assert_auth_refused(&err, "another record");
    // The untouched record still works.
    backend
        .sign(key.at(), MESSAGE, SignatureFormat::Der)
        .unwrap();
    // Without a resource manager there is one context per TPM: close this one first.
    drop(backend);
    let other_store =
        TpmBackend::new("tpm", &tpm.tcti(), &SecretBytes::copy_from(&[1; 32])).unwrap();
    let err = other_store
        .sign(key.at(), MESSAGE, SignatureFormat::Der)
        .unwrap_err();
    assert_auth_refused(&err, "another store's key");
}

/// The most transient objects keyhold leaves in the TPM between operations: the SRK and the
/// default LRU of two loaded keys.
const MAX_TRANSIENT: usize = 3;

#[test]
fn no_handle_leaks_after_1000_operations() {
    let tpm = Swtpm::new().unwrap();
    let backend = backend(&tpm);
    // Four keys for an LRU of two: every round evicts and reloads.
    let keys = [
        create(&backend, KeyType::EcdsaP256, Purpose::Sign, None),
        create(&backend, KeyType::EcdsaP384, Purpose::Sign, None),
        create(&backend, KeyType::HmacSha256, Purpose::Mac, None),
        create(&backend, KeyType::Rsa2048, Purpose::Sign, None),
    ];
    let before = backend.transient_handles().unwrap();
    assert_eq!(before, MAX_TRANSIENT, "the SRK and two cached keys");
    let mut high = 0;
    for i in 0..1000u32 {
        let key = &keys[(i as usize / 3) % keys.len()];
        if key.spec.key_type() == KeyType::HmacSha256 {
            backend.mac(key.at(), &i.to_be_bytes()).unwrap();
        } else {
            backend
                .sign(key.at(), &i.to_be_bytes(), SignatureFormat::Der)
                .unwrap();
        }
        if i % 100 == 0 {
            high = high.max(backend.transient_handles().unwrap());
        }
    }
    // Refused records never reach the TPM (the flush after a TPM error is a unit test).
    let mut bent = keys[0].generated.blob.clone().unwrap();
    bent[12] ^= 1;
    for _ in 0..5 {
        let err = backend
            .sign(keys[0].with_blob(&bent), MESSAGE, SignatureFormat::Der)
            .unwrap_err();
        assert_auth_refused(&err, "a bent record");
    }
    assert!(high <= MAX_TRANSIENT, "{high} transient objects mid-run");
    assert_eq!(backend.transient_handles().unwrap(), before);
    let report = backend.report().unwrap();
    assert_eq!(report.kind, "tpm");
    assert!(report.objects.is_none());
    let detail = |name: &str| {
        report
            .details
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no `{name}` in {:?}", report.details))
    };
    assert_eq!(detail("transient handles"), MAX_TRANSIENT.to_string());
    assert_eq!(detail("tcti"), tpm.tcti());
    assert_eq!(
        detail("SRK name"),
        keyhold::hex::encode(&backend.srk_name().unwrap())
    );
    // swtpm reports IBM's manufacturer code.
    assert_eq!(detail("manufacturer"), "IBM", "{:?}", report.details);

    // Closing the backend flushes everything: tpm2-tools (its own connection, which swtpm
    // serves once keyhold's is closed) finds no transient object left.
    drop(backend);
    let listed = support::tpm::tpm2_tool(
        &tpm.tcti(),
        tpm.state_dir(),
        &["tpm2_getcap", "handles-transient"],
    );
    assert_eq!(listed.trim(), "", "transient objects left behind: {listed}");
}

#[test]
fn keys_survive_a_tpm_restart() {
    let mut tpm = Swtpm::new().unwrap();
    let backend = backend(&tpm);
    let ec = create(&backend, KeyType::EcdsaP384, Purpose::Sign, None);
    let hmac = create(&backend, KeyType::HmacSha256, Purpose::Mac, None);
    let tag = backend.mac(hmac.at(), MESSAGE).unwrap();
    let srk = backend.srk_name().unwrap();
    tpm.restart().unwrap();
    // The first call finds the connection dead, reconnects and reloads the blob.
    let sig = backend
        .sign(ec.at(), MESSAGE, SignatureFormat::Der)
        .unwrap();
    ec.generated
        .public_key
        .as_ref()
        .unwrap()
        .verify(MESSAGE, &sig, SignatureFormat::Der)
        .unwrap();
    assert_eq!(backend.mac(hmac.at(), MESSAGE).unwrap(), tag);
    assert_eq!(backend.srk_name().unwrap(), srk);
    // The SRK and the two keys, reloaded after the reset.
    assert_eq!(backend.transient_handles().unwrap(), 3);
}

#[test]
fn a_killed_tpm_is_unavailable_then_recovers() {
    let mut tpm = Swtpm::new().unwrap();
    let backend = Arc::new(backend(&tpm));
    let key = Arc::new(create(&backend, KeyType::EcdsaP256, Purpose::Sign, None));
    tpm.kill().unwrap();

    // Bounded: the call runs on another thread and must answer, not hang. The bound is generous
    // (a loaded 2-core machine running ten test processes meets it every time); a hang never does.
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let (backend, key) = (Arc::clone(&backend), Arc::clone(&key));
        std::thread::spawn(move || {
            let _ = tx.send(backend.sign(key.at(), MESSAGE, SignatureFormat::Der));
        });
    }
    let result = rx
        .recv_timeout(HANG)
        .expect("no answer from a killed TPM: the call hangs");
    let err = result.unwrap_err();
    assert!(
        matches!(&err, Error::BackendUnavailable { backend, .. } if backend == "tpm"),
        "{err:?}"
    );
    assert!(err.to_string().contains(&tpm.tcti()), "{err}");
    // Still down: still unavailable.
    let err = backend
        .sign(key.at(), MESSAGE, SignatureFormat::Der)
        .unwrap_err();
    assert!(matches!(err, Error::BackendUnavailable { .. }), "{err:?}");
    assert!(matches!(
        backend.report().unwrap_err(),
        Error::BackendUnavailable { .. }
    ));

    tpm.restart().unwrap();
    let sig = backend
        .sign(key.at(), MESSAGE, SignatureFormat::Der)
        .unwrap();
    key.generated
        .public_key
        .as_ref()
        .unwrap()
        .verify(MESSAGE, &sig, SignatureFormat::Der)
        .unwrap();
    assert_eq!(
        backend.transient_handles().unwrap(),
        2,
        "the SRK and the key"
    );
}

/// swtpm killed while it works on a command (an RSA-3072 key generation): the caller gets
/// "unavailable", not a hang, and the backend recovers once it is back. The backend reaches the
/// TPM through a tap, which shows the TPM2_Create sent and not yet answered when the kill comes;
/// the generation takes the TPM tens of milliseconds at least, the check and the kill
/// microseconds, and the test checks afterwards that no answer slipped in between.
#[test]
fn a_tpm_killed_mid_command_is_unavailable_not_a_hang() {
    let mut tpm = Swtpm::new().unwrap();
    let tap = support::tpm::Tap::new(tpm.port());
    let backend = Arc::new(TpmBackend::new("tpm", &tap.tcti(), &kek()).unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let backend = Arc::clone(&backend);
        std::thread::spawn(move || {
            let spec = KeySpec::new(KeyType::Rsa3072, None, None).unwrap();
            let context = KeyContext {
                store_id: &STORE,
                uuid: &[7; 16],
                label: "test/rsa",
                spec: &spec,
            };
            let _ = tx.send(backend.generate(context, &KeyOptions::new()));
        });
    }
    let deadline = std::time::Instant::now() + HANG;
    while tap.in_flight() != Some(support::tpm::CC_CREATE) {
        assert!(
            std::time::Instant::now() < deadline,
            "no TPM2_Create was sent: {:x?}",
            tap.commands()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let answers = tap.answers();
    tpm.kill().unwrap();
    let result = rx
        .recv_timeout(HANG)
        .expect("no answer from a TPM killed mid-command: the call hangs");
    assert_eq!(
        tap.answers(),
        answers,
        "the TPM answered the TPM2_Create before it was killed: not mid-command"
    );
    let err = result.err();
    assert!(
        matches!(err, Some(Error::BackendUnavailable { .. })),
        "{err:?}"
    );
    tpm.restart().unwrap();
    let key = create(&backend, KeyType::EcdsaP256, Purpose::Sign, None);
    sign_and_verify(&backend, &key);
}

#[test]
fn a_cleared_tpm_is_refused_clearly() {
    let mut tpm = Swtpm::new().unwrap();
    let backend = backend(&tpm);
    let key = create(&backend, KeyType::EcdsaP256, Purpose::Sign, None);
    // Restart so that the backend's connection is dead and tpm2_clear can connect.
    tpm.restart().unwrap();
    support::tpm::tpm2_tool(&tpm.tcti(), tpm.state_dir(), &["tpm2_clear", "-c", "p"]);
    let err = backend
        .sign(key.at(), MESSAGE, SignatureFormat::Der)
        .unwrap_err();
    support::assert_tpm_replaced(&err);
}

#[test]
fn four_threads_times_200_signatures_without_an_error() {
    let tpm = Swtpm::new().unwrap();
    let backend = Arc::new(backend(&tpm));
    let keys = Arc::new([
        create(&backend, KeyType::EcdsaP256, Purpose::Sign, None),
        create(&backend, KeyType::EcdsaP384, Purpose::Sign, None),
        create(&backend, KeyType::Rsa2048, Purpose::Sign, None),
    ]);
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let (backend, keys) = (Arc::clone(&backend), Arc::clone(&keys));
            std::thread::spawn(move || {
                let mut errors = 0;
                for i in 0..200u8 {
                    // Threads on different keys, so the LRU evicts while others wait.
                    let key = &keys[(usize::from(t) + usize::from(i)) % keys.len()];
                    let public = key.generated.public_key.clone().unwrap();
                    let message = [t, i];
                    match backend.sign(key.at(), &message, SignatureFormat::Raw) {
                        Ok(sig) => public.verify(&message, &sig, SignatureFormat::Raw).unwrap(),
                        Err(e) => {
                            eprintln!("thread {t}, signature {i}: {e}");
                            errors += 1;
                        }
                    }
                }
                errors
            })
        })
        .collect();
    let errors: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(errors, 0);
    assert!(backend.transient_handles().unwrap() <= MAX_TRANSIENT);
}

/// A caller waits at most the timeout for its turn. Another caller holds the device (the test
/// hook stands in for a long command such as an RSA-3072 key generation) for as long as the test
/// likes: the signature must come back with `Timeout` on its own, however long the TPM or the
/// machine takes for anything, and work once the device is free.
#[test]
fn a_caller_waits_a_bounded_time_for_its_turn() {
    use keyhold::backend::tpm::device::DeviceSettings;
    let tpm = Swtpm::new().unwrap();
    let settings = DeviceSettings {
        timeout: Duration::from_millis(300),
        ..DeviceSettings::default()
    };
    let device = keyhold::backend::tpm::device(&tpm.tcti(), settings).unwrap();
    let backend = Arc::new(TpmBackend::with_device("tpm", Arc::clone(&device), &kek()).unwrap());
    let key = Arc::new(create(&backend, KeyType::EcdsaP256, Purpose::Sign, None));
    let hold = device.hold("another caller").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let (backend, key) = (Arc::clone(&backend), Arc::clone(&key));
        std::thread::spawn(move || {
            let started = Instant::now();
            let result = backend.sign(key.at(), MESSAGE, SignatureFormat::Der);
            let _ = tx.send((result, started.elapsed()));
        });
    }
    // The device stays held until the answer is in: only the timeout can end the wait.
    let (result, waited_for) = rx
        .recv_timeout(HANG)
        .expect("the caller waited without bound for a held TPM");
    match result {
        Err(Error::Timeout {
            backend, waited, ..
        }) => {
            assert_eq!(backend, "tpm");
            assert_eq!(waited, Duration::from_millis(300));
            assert!(waited_for >= waited, "gave up early: {waited_for:?}");
        }
        other => panic!("expected Error::Timeout, got {other:?}"),
    }
    drop(hold);
    let sig = backend
        .sign(key.at(), MESSAGE, SignatureFormat::Der)
        .unwrap();
    key.generated
        .public_key
        .as_ref()
        .unwrap()
        .verify(MESSAGE, &sig, SignatureFormat::Der)
        .unwrap();
}

#[test]
fn a_unix_socket_tcti_is_refused() {
    let err = TpmBackend::new("tpm", "swtpm:path=/run/swtpm/sock", &kek()).unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(err.to_string().contains("swtpm:host="), "{err}");
}

#[test]
fn nothing_listening_is_unavailable_until_the_tpm_appears() {
    let mut tpm = Swtpm::new().unwrap();
    let tcti = tpm.tcti();
    tpm.kill().unwrap();
    // The backend is made without the TPM (a store opens while its TPM is down)...
    let backend = TpmBackend::new("tpm", &tcti, &kek()).unwrap();
    let err = backend.capabilities().unwrap_err();
    assert!(matches!(err, Error::BackendUnavailable { .. }), "{err:?}");
    // ...and picks it up once it is there, in the same process.
    tpm.restart().unwrap();
    let key = create(&backend, KeyType::EcdsaP256, Purpose::Sign, None);
    sign_and_verify(&backend, &key);
}

#[test]
fn destroy_keeps_nothing_in_the_tpm() {
    let tpm = Swtpm::new().unwrap();
    let backend = backend(&tpm);
    let key = create(&backend, KeyType::EcdsaP256, Purpose::Sign, None);
    sign_and_verify(&backend, &key);
    assert_eq!(
        backend.transient_handles().unwrap(),
        2,
        "the SRK and the key kept loaded for its next use"
    );
    backend.destroy(key.at()).unwrap();
    let err = backend.destroy_object(&key.generated.locator).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput(m) if m.contains("keeps no key objects in the TPM")),
        "{err:?}"
    );
    assert_eq!(
        backend.transient_handles().unwrap(),
        1,
        "the destroyed key is still loaded: only the SRK should be"
    );
}

#[test]
fn secrets_cross_the_bus_encrypted() {
    let tpm = Swtpm::new().unwrap();
    let tap = Tap::new(tpm.port());
    let backend = TpmBackend::new("tpm", &tap.tcti(), &kek()).unwrap();
    let key = create(&backend, KeyType::HmacSha256, Purpose::Mac, None);
    let marker: Vec<u8> = b"plaintext on the TPM bus! "
        .iter()
        .copied()
        .cycle()
        .take(MAX_HMAC_INPUT)
        .collect();
    tap.clear();
    let tag = backend.mac(key.at(), &marker).unwrap();
    // TPM2_HMAC went through the tap...
    assert!(
        tap.commands().contains(&CC_HMAC),
        "the tap saw no TPM2_HMAC"
    );
    // ...but neither its input nor its result crossed in clear, either way.
    for (way, seen) in [("to", tap.sent()), ("from", tap.answered())] {
        assert!(
            !holds_any_part_of(&seen, &marker),
            "HMAC input crossed the bus {way} the TPM in clear"
        );
        assert!(
            !holds_any_part_of(&seen, &tag),
            "the HMAC result crossed the bus {way} the TPM in clear"
        );
    }
}

/// README: "Keys are fixedTPM and fixedParent" and noDA. Every kind of key the backend makes is
/// loaded from its blob by tpm2-tools, under the SRK tpm2-tools makes from the template the README
/// gives (the same Name as keyhold's), and tpm2_readpublic reports its attributes: exactly these.
/// The TPM loads a public area only together with the private part it was made with, so these are
/// the key's own. The SRK is read back the same way.
#[test]
fn every_key_type_is_fixed_tpm_fixed_parent_and_no_da() {
    let tpm = Swtpm::new().unwrap();
    let backend = backend(&tpm);
    let srk_name = backend.srk_name().unwrap();
    let signing = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|sign";
    let decrypting = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|decrypt";
    let kinds = [
        (KeyType::EcdsaP256, Purpose::Sign, None, signing),
        (KeyType::EcdsaP384, Purpose::Sign, None, signing),
        (
            KeyType::Rsa2048,
            Purpose::Sign,
            Some(RsaPadding::Pss),
            signing,
        ),
        (
            KeyType::Rsa2048,
            Purpose::Sign,
            Some(RsaPadding::Pkcs1v15),
            signing,
        ),
        (KeyType::Rsa2048, Purpose::Decrypt, None, decrypting),
        (KeyType::Rsa3072, Purpose::Sign, None, signing),
        (KeyType::Rsa3072, Purpose::Decrypt, None, decrypting),
        (KeyType::HmacSha256, Purpose::Mac, None, signing),
    ];
    let keys: Vec<(Key, &str)> = kinds
        .into_iter()
        .map(|(t, p, padding, expected)| (create(&backend, t, p, padding), expected))
        .collect();
    // tpm2-tools needs the TPM to itself.
    drop(backend);
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        srk_attributes(&tpm.tcti(), dir.path()),
        flags("fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|restricted|decrypt"),
        "the SRK"
    );
    for (key, expected) in keys {
        let what = format!("{} {:?}", key.spec.key_type(), key.spec.algorithm());
        let blob = key.generated.blob.as_deref().unwrap();
        let (made_under, public, private) = keyhold::backend::tpm::key_blob_parts(blob).unwrap();
        assert_eq!(made_under, srk_name, "{what}");
        let attributes = loaded_attributes(&tpm.tcti(), dir.path(), &srk_name, &public, &private);
        assert_eq!(attributes, flags(expected), "{what}");
    }
}

/// README: "If other programs fill the TPM, keyhold flushes its own keys and tries once more,
/// then fails with exit 7, "out of object memory", naming the resource manager as the cure."
///
/// swtpm holds three transient objects. tpm2-tools, as another program, leaves the primary key it
/// makes loaded. With one slot taken, keyhold's SRK and one cached key fill the TPM; loading a
/// second key fails with TPM_RC_OBJECT_MEMORY, and keyhold flushes its cached key and loads again
/// (the retry is counted). With two slots taken there is nothing of keyhold's to flush: the error
/// says what to do. keyhold never flushes the other program's objects.
#[test]
fn keyhold_flushes_its_own_keys_and_retries_when_others_fill_the_tpm() {
    let tpm = Swtpm::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = {
        let backend = backend(&tpm);
        (
            create(&backend, KeyType::EcdsaP256, Purpose::Sign, None),
            create(&backend, KeyType::EcdsaP384, Purpose::Sign, None),
        )
    };
    let transient = || {
        support::tpm::tpm2_tool(
            &tpm.tcti(),
            dir.path(),
            &["tpm2_getcap", "handles-transient"],
        )
        .lines()
        .count()
    };
    let other_program = |name: &str| {
        support::tpm::tpm2_tool(
            &tpm.tcti(),
            dir.path(),
            &["tpm2_createprimary", "-C", "o", "-c", name],
        );
    };
    other_program("other1.ctx");
    assert_eq!(transient(), 1, "the other program's object");

    let keyhold = backend(&tpm);
    let signs = |key: &Key| {
        let sig = keyhold
            .sign(key.at(), MESSAGE, SignatureFormat::Der)
            .unwrap();
        let public = key.generated.public_key.as_ref().unwrap();
        public.verify(MESSAGE, &sig, SignatureFormat::Der).unwrap();
    };
    let retries = keyhold::backend::tpm::object_memory_retries();
    signs(&a);
    assert_eq!(keyhold.transient_handles().unwrap(), 3, "the TPM is full");
    assert_eq!(keyhold::backend::tpm::object_memory_retries(), retries);
    signs(&b);
    assert_eq!(
        keyhold::backend::tpm::object_memory_retries(),
        retries + 1,
        "the second key loaded without the TPM running out of object memory"
    );
    signs(&a);
    assert_eq!(keyhold::backend::tpm::object_memory_retries(), retries + 2);
    assert_eq!(keyhold.transient_handles().unwrap(), 3);
    drop(keyhold);
    assert_eq!(transient(), 1, "keyhold flushed another program's object");

    other_program("other2.ctx");
    let keyhold = backend(&tpm);
    let err = keyhold
        .sign(a.at(), MESSAGE, SignatureFormat::Der)
        .unwrap_err();
    match &err {
        Error::BackendUnavailable { backend, reason } => {
            assert_eq!(backend, "tpm");
            assert!(
                reason.contains("out of object memory")
                    && reason.contains("resource manager")
                    && reason.contains("tpm2_flushcontext"),
                "{reason}"
            );
        }
        other => panic!("expected BackendUnavailable, got {other:?}"),
    }
    assert_eq!(keyhold::backend::tpm::object_memory_retries(), retries + 2);
}

/// README: "at most `max_loaded` keys (2 by default) stay loaded between operations, least
/// recently used flushed first". The default is checked by `no_handle_leaks_after_1000_operations`;
/// here `max_loaded = 1`: after every operation the TPM holds the SRK and one key, and keyhold
/// made the room itself (it never ran the TPM out of object memory).
#[test]
fn max_loaded_bounds_the_keys_kept_loaded() {
    use keyhold::backend::tpm::device::DeviceSettings;
    let tpm = Swtpm::new().unwrap();
    let settings = DeviceSettings {
        max_loaded: 1,
        ..DeviceSettings::default()
    };
    let device = keyhold::backend::tpm::device(&tpm.tcti(), settings).unwrap();
    let backend = TpmBackend::with_device("tpm", device, &kek()).unwrap();
    let keys = [
        create(&backend, KeyType::EcdsaP256, Purpose::Sign, None),
        create(&backend, KeyType::EcdsaP384, Purpose::Sign, None),
        create(&backend, KeyType::HmacSha256, Purpose::Mac, None),
    ];
    let retries = keyhold::backend::tpm::object_memory_retries();
    for round in 0..3 {
        for key in &keys {
            if key.spec.key_type() == KeyType::HmacSha256 {
                backend.mac(key.at(), MESSAGE).unwrap();
            } else {
                backend
                    .sign(key.at(), MESSAGE, SignatureFormat::Der)
                    .unwrap();
            }
            assert_eq!(
                backend.transient_handles().unwrap(),
                2,
                "round {round}: the SRK and one key"
            );
        }
    }
    assert_eq!(keyhold::backend::tpm::object_memory_retries(), retries);
}
