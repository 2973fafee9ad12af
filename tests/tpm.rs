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

const MESSAGE: &[u8] = b"keyhold TPM backend test message";
const STORE: [u8; 16] = [0x51; 16];

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
    assert!(public
        .verify(b"another message", &sig, SignatureFormat::Der)
        .is_err());
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
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");

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
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
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
        assert!(
            matches!(err, Error::Integrity { .. }),
            "byte -{from_end}: {err:?}"
        );
    }
    // The TPM parts are bound too.
    let mut bent = blob.clone();
    bent[10] ^= 0x01;
    let err = backend
        .sign(key.with_blob(&bent), MESSAGE, SignatureFormat::Der)
        .unwrap_err();
    assert!(matches!(err, Error::Integrity { .. }), "{err:?}");
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
    assert!(matches!(err, Error::Integrity { .. }), "{err:?}");
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
    assert!(matches!(err, Error::Integrity { .. }), "{err:?}");
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
        backend
            .sign(keys[0].with_blob(&bent), MESSAGE, SignatureFormat::Der)
            .unwrap_err();
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
    let listed = support::tpm2_tool(
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

    // Bounded: the call runs on another thread and must answer within a few seconds.
    let (tx, rx) = std::sync::mpsc::channel();
    let started = Instant::now();
    {
        let (backend, key) = (Arc::clone(&backend), Arc::clone(&key));
        std::thread::spawn(move || {
            let _ = tx.send(backend.sign(key.at(), MESSAGE, SignatureFormat::Der));
        });
    }
    let result = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("no answer within 5 s from a killed TPM");
    let err = result.unwrap_err();
    assert!(
        matches!(&err, Error::BackendUnavailable { backend, .. } if backend == "tpm"),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(err.to_string().contains(&tpm.tcti()), "{err}");
    // Still down: still unavailable, quickly.
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
/// "unavailable" within a bounded time, not a hang, and the backend recovers once it is back.
#[test]
fn a_tpm_killed_mid_command_is_unavailable_within_seconds() {
    let mut tpm = Swtpm::new().unwrap();
    let backend = Arc::new(backend(&tpm));
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let backend = Arc::clone(&backend);
        std::thread::spawn(move || {
            let spec = KeySpec::new(KeyType::Rsa3072, None, None).unwrap();
            // Key generations back to back until one fails: nearly all of the TPM's time goes
            // to them, so the kill almost always lands inside one (between two, it is the
            // killed-TPM case above, with the same expected outcome).
            for n in 0u8..=255 {
                let uuid = [n; 16];
                let context = KeyContext {
                    store_id: &STORE,
                    uuid: &uuid,
                    label: "test/rsa",
                    spec: &spec,
                };
                if let Err(e) = backend.generate(context, &KeyOptions::new()) {
                    let _ = tx.send((e, Instant::now()));
                    return;
                }
            }
        });
    }
    std::thread::sleep(Duration::from_millis(400));
    let killed = Instant::now();
    tpm.kill().unwrap();
    let (err, failed) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("no answer within 10 s from a TPM killed mid-command");
    assert!(matches!(err, Error::BackendUnavailable { .. }), "{err:?}");
    assert!(
        failed.duration_since(killed) < Duration::from_secs(5),
        "{:?}",
        failed.duration_since(killed)
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
    support::tpm2_tool(&tpm.tcti(), tpm.state_dir(), &["tpm2_clear", "-c", "p"]);
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

#[test]
fn a_caller_waits_a_bounded_time_for_its_turn() {
    use keyhold::backend::tpm::device::DeviceSettings;
    let tpm = Swtpm::new().unwrap();
    let settings = DeviceSettings {
        timeout: Duration::from_millis(300),
        ..DeviceSettings::default()
    };
    let device = keyhold::backend::tpm::device(&tpm.tcti(), settings).unwrap();
    let backend = Arc::new(TpmBackend::with_device("tpm", device, &kek()).unwrap());
    let key = Arc::new(create(&backend, KeyType::EcdsaP256, Purpose::Sign, None));
    // One thread generates RSA-3072 keys (often seconds each on swtpm) while this one signs,
    // until a signature has timed out (or ten keys were made, which would fail the test).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let generator = {
        let (backend, stop) = (Arc::clone(&backend), Arc::clone(&stop));
        std::thread::spawn(move || {
            for _ in 0..10 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                create(&backend, KeyType::Rsa3072, Purpose::Sign, None);
            }
        })
    };
    let mut timeouts = 0;
    let mut signed = 0;
    while !generator.is_finished() && timeouts == 0 {
        let started = Instant::now();
        match backend.sign(key.at(), MESSAGE, SignatureFormat::Der) {
            Ok(_) => signed += 1,
            Err(Error::Timeout {
                backend, waited, ..
            }) => {
                assert_eq!(backend, "tpm");
                assert_eq!(waited, Duration::from_millis(300));
                // The wait is bounded: the timeout, plus scheduling slack.
                assert!(
                    started.elapsed() < Duration::from_secs(2),
                    "{:?}",
                    started.elapsed()
                );
                timeouts += 1;
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    generator.join().unwrap();
    assert!(
        timeouts > 0,
        "no timeout while RSA-3072 keys were generated ({signed} signed)"
    );
    backend
        .sign(key.at(), MESSAGE, SignatureFormat::Der)
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
    backend.destroy(key.at()).unwrap();
    let err = backend.destroy_object(&key.generated.locator).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    assert_eq!(
        backend.transient_handles().unwrap(),
        2,
        "the SRK and the cached key"
    );
}

/// A relay between the TPM client and swtpm that records every byte on the command port, both
/// ways: what someone probing the TPM bus would see.
mod tap {
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};

    pub struct Tap {
        pub port: u16,
        pub seen: Arc<Mutex<Vec<u8>>>,
    }

    fn relay(mut from: TcpStream, mut to: TcpStream, seen: Option<Arc<Mutex<Vec<u8>>>>) {
        let mut buf = [0u8; 4096];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Some(seen) = &seen {
                        seen.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    }

    fn serve(listener: TcpListener, target: u16, seen: Option<Arc<Mutex<Vec<u8>>>>) {
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect((Ipv4Addr::LOCALHOST, target)) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (seen_up, seen_down) = (seen.clone(), seen.clone());
                std::thread::spawn(move || relay(client, server, seen_up));
                std::thread::spawn(move || relay(s2, c2, seen_down));
            }
        });
    }

    /// A relay on two free consecutive ports in front of the swtpm on `target` and `target + 1`.
    pub fn new(target: u16) -> Tap {
        for _ in 0..50 {
            let first = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            let port = first.local_addr().unwrap().port();
            let Ok(second) = TcpListener::bind((Ipv4Addr::LOCALHOST, port + 1)) else {
                continue;
            };
            let seen = Arc::new(Mutex::new(Vec::new()));
            serve(first, target, Some(Arc::clone(&seen)));
            serve(second, target + 1, None);
            return Tap { port, seen };
        }
        panic!("no two free consecutive ports for the tap");
    }
}

#[test]
fn secrets_cross_the_bus_encrypted() {
    let tpm = Swtpm::new().unwrap();
    let tap = tap::new(tpm.port());
    let backend = TpmBackend::new(
        "tpm",
        &format!("swtpm:host=127.0.0.1,port={}", tap.port),
        &kek(),
    )
    .unwrap();
    let key = create(&backend, KeyType::HmacSha256, Purpose::Mac, None);
    let marker: Vec<u8> = b"plaintext on the TPM bus! "
        .iter()
        .copied()
        .cycle()
        .take(MAX_HMAC_INPUT)
        .collect();
    tap.seen.lock().unwrap().clear();
    let tag = backend.mac(key.at(), &marker).unwrap();
    let seen = tap.seen.lock().unwrap().clone();
    // TPM2_HMAC (command code 0x155) went through the tap...
    assert!(
        seen.windows(4).any(|w| w == [0, 0, 1, 0x55]),
        "the tap saw no TPM2_HMAC"
    );
    // ...but neither its input nor its result crossed in clear.
    assert!(
        !seen.windows(16).any(|w| marker.windows(16).any(|m| m == w)),
        "HMAC input crossed the bus in clear"
    );
    assert!(
        !seen.windows(16).any(|w| w == &tag[..16]),
        "the HMAC result crossed the bus in clear"
    );
}
