//! The PKCS#11 backend recovers by itself, without a restart: when the token forgets its login
//! (another session of the same application calls `C_Logout`, which logs out every session,
//! PKCS#11 v2.40 section 5.6), and when the token goes away and comes back. Its session pool stays
//! within its bound however many threads use it. `C_Login` and `C_OpenSession` calls are counted
//! where they arrive, at the module, by pkcs11-spy (each test runs again in a child process whose
//! keyhold reaches SoftHSM2 through the spy; see `support/pkcs11.rs`).
#![cfg(feature = "pkcs11")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::path::PathBuf;
use std::sync::{Arc, Barrier};

use cryptoki::session::SessionState;
use keyhold::config::{BackendConfig, Config};
use keyhold::testing::SoftHsm;
use keyhold::{Error, KeyInfo, KeyRequest, KeySpec, KeyType, Keystore, SignatureFormat};
use support::pkcs11::{is_token_gone, module_under_test, raw_session, spied};
use support::{sealer, PASSPHRASE};
use tempfile::TempDir;

/// A configuration with `hsm`'s token as the backend `hsm`, through the module under test (the
/// spy in a spied child), with at most `max_sessions` sessions if given.
fn config(hsm: &SoftHsm, max_sessions: Option<usize>) -> Config {
    let mut backend = hsm.backend_config();
    backend.module = PathBuf::from(module_under_test());
    backend.max_sessions = max_sessions;
    let mut config = Config::default();
    config
        .backends
        .insert("hsm".into(), BackendConfig::Pkcs11(backend));
    config
}

/// A store on `config` with one P-256 key in the token `hsm`.
fn store_with_key(config: &Config) -> (TempDir, Keystore, KeyInfo) {
    let dir = tempfile::tempdir().unwrap();
    let ks = Keystore::create_with(&dir.path().join("s"), &sealer(PASSPHRASE), config).unwrap();
    let key = ks.create_key(&p256_in_token("k")).unwrap();
    (dir, ks, key)
}

/// A request for a P-256 key `name` in the token `hsm`.
fn p256_in_token(name: &str) -> KeyRequest {
    KeyRequest {
        namespace: "default".into(),
        name: name.into(),
        spec: KeySpec::new(KeyType::EcdsaP256, None, None).unwrap(),
        backend: Some("hsm".into()),
    }
}

#[test]
fn a_logout_behind_keyholds_back_is_recovered_from() {
    if let Some(spy) = spied("a_logout_behind_keyholds_back_is_recovered_from") {
        // The first login, then exactly one more after the logout.
        assert_eq!(spy.returned("C_Login"), ["CKR_OK", "CKR_OK"]);
        return;
    }
    let hsm = SoftHsm::new().unwrap();
    let (_dir, ks, key) = store_with_key(&config(&hsm, None));
    ks.sign(&key.id, b"before", SignatureFormat::Der).unwrap();

    // The same module, as another part of this application would use it (not through the spy).
    let session = raw_session(hsm.label());
    // keyhold is logged in, so this session is too; logging it out logs out keyhold's sessions.
    session.logout().unwrap();
    let state = session.get_session_info().unwrap().session_state();
    assert_eq!(
        state,
        SessionState::RwPublic,
        "the logout reached every session"
    );

    // keyhold sees CKR_USER_NOT_LOGGED_IN, logs in again once, and carries on.
    let sig = ks.sign(&key.id, b"after", SignatureFormat::Der).unwrap();
    ks.verify(&key.id, b"after", &sig, SignatureFormat::Der)
        .unwrap();
}

/// README: "A token that disappears gives a "backend unavailable" error (exit 7) and works again
/// once it is back." The token is deleted under a keystore that is using it, then a token with
/// its label is made again in this process; the same keystore, never reopened, finds it in its
/// new slot, logs in to it once more, and makes and uses a key on it.
///
/// What is not provoked here: the same device, with its keys, coming back. SoftHSM2 2.6.1 never
/// takes a token back once its files went away while the process ran (moving them back leaves
/// that slot's C_GetTokenInfo at CKR_GENERAL_ERROR; copying them into a new token fails at
/// C_FindObjectsInit, its objects being encrypted under the old token's key), and openCryptoki's
/// one token is shared by the machine's tests: it cannot be taken away. So the old key is
/// checked to give the documented typed error on the token that came back, and a new key shows
/// the token working again.
#[test]
fn a_token_that_comes_back_is_used_again_without_a_restart() {
    if let Some(spy) = spied("a_token_that_comes_back_is_used_again_without_a_restart") {
        assert_eq!(
            spy.returned("C_Login"),
            ["CKR_OK", "CKR_OK"],
            "one login before, one after"
        );
        return;
    }
    let hsm = SoftHsm::new().unwrap();
    let config = config(&hsm, None);
    let (_dir, ks, key) = store_with_key(&config);
    ks.sign(&key.id, b"before", SignatureFormat::Der).unwrap();

    hsm.delete_token().unwrap();
    for attempt in 1..=2 {
        let away = ks.sign(&key.id, b"while away", SignatureFormat::Der);
        assert!(is_token_gone(&away, "hsm"), "attempt {attempt}: {away:?}");
    }

    hsm.init_again().unwrap();
    match ks.sign(&key.id, b"after", SignatureFormat::Der) {
        Err(Error::BackendUnavailable { backend, reason }) => {
            assert_eq!(backend, "hsm");
            assert!(
                reason.contains("is not on the token (was the token re-initialised?)"),
                "{reason}"
            );
        }
        other => panic!("the old key on the new token: expected BackendUnavailable, got {other:?}"),
    }
    let fresh = ks.create_key(&p256_in_token("after")).unwrap();
    assert_eq!(fresh.backend, "hsm");
    let sig = ks.sign(&fresh.id, b"after", SignatureFormat::Der).unwrap();
    ks.public_key(&fresh.id)
        .unwrap()
        .verify(b"after", &sig, SignatureFormat::Der)
        .unwrap();
}

/// README: "a bounded pool of sessions". Sixteen threads sign through a backend configured for
/// at most three sessions: every signature is made and verifies, and no more than three
/// `C_OpenSession` calls reach the token in the whole run (so never more than three open at
/// once). Counted by pkcs11-spy because no token here counts sessions for us: SoftHSM2 reports
/// ulSessionCount as CK_UNAVAILABLE_INFORMATION, and openCryptoki's token is shared by the
/// machine's tests. The pool's unit tests (`backend::pkcs11::pool`) show a caller beyond the
/// bound waiting for a returned session, which no timing here could.
#[test]
fn sixteen_threads_share_three_sessions() {
    const MAX: usize = 3;
    const THREADS: usize = 16;
    if let Some(spy) = spied("sixteen_threads_share_three_sessions") {
        let opened = spy.count("C_OpenSession");
        // Opened over the whole run, so never more than that open at once.
        assert!((1..=MAX).contains(&opened), "{opened} sessions opened");
        assert_eq!(spy.count("C_Login"), 1);
        return;
    }
    let hsm = SoftHsm::new().unwrap();
    let (_dir, ks, key) = store_with_key(&config(&hsm, Some(MAX)));
    let ks = Arc::new(ks);
    let start = Arc::new(Barrier::new(THREADS));
    let workers: Vec<_> = (0..THREADS)
        .map(|thread| {
            let (ks, start, id) = (Arc::clone(&ks), Arc::clone(&start), key.id.clone());
            std::thread::spawn(move || {
                start.wait();
                (0..50)
                    .map(|i| {
                        let message = format!("{thread}/{i}").into_bytes();
                        let sig = ks.sign(&id, &message, SignatureFormat::Der).unwrap();
                        (message, sig)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let public = ks.public_key(&key.id).unwrap();
    let mut signed = 0;
    for worker in workers {
        for (message, sig) in worker.join().unwrap() {
            public.verify(&message, &sig, SignatureFormat::Der).unwrap();
            signed += 1;
        }
    }
    assert_eq!(signed, THREADS * 50);
}
