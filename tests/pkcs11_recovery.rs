//! The PKCS#11 backend recovers by itself when the token forgets its login: another session of the
//! same application calls `C_Logout`, which logs out every session (PKCS#11 v2.40, section 5.6).
#![cfg(feature = "pkcs11")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::SessionState;
use keyhold::testing::{SoftHsm, SOFTHSM_MODULE};
use keyhold::{
    Argon2Params, KeyRequest, KeySpec, KeyType, Keystore, PassphraseSealer, SignatureFormat,
};
use secrecy::SecretString;

#[test]
fn a_logout_behind_keyholds_back_is_recovered_from() {
    let hsm = SoftHsm::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sealer = PassphraseSealer::new(SecretString::from("recovery".to_owned()))
        .with_params(Argon2Params {
            memory_mib: 19,
            iterations: 2,
            parallelism: 1,
        })
        .unwrap();
    let ks = Keystore::create_with(&dir.path().join("s"), &sealer, &hsm.config("hsm")).unwrap();
    let key = ks
        .create_key(&KeyRequest {
            namespace: "default".into(),
            name: "k".into(),
            spec: KeySpec::new(KeyType::EcdsaP256, None, None).unwrap(),
            backend: Some("hsm".into()),
        })
        .unwrap();
    ks.sign(&key.id, b"before", SignatureFormat::Der).unwrap();

    // The same module, as another part of this application would use it.
    let raw = Pkcs11::new(SOFTHSM_MODULE).unwrap();
    match raw.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("C_Initialize: {e}"),
    }
    let slot = raw
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|&s| raw.get_token_info(s).unwrap().label().trim_end() == hsm.label())
        .unwrap();
    let session = raw.open_ro_session(slot).unwrap();
    // keyhold is logged in, so this session is too; logging it out logs out keyhold's sessions.
    session.logout().unwrap();
    let state = session.get_session_info().unwrap().session_state();
    assert_eq!(
        state,
        SessionState::RoPublic,
        "the logout reached every session"
    );

    // keyhold sees CKR_USER_NOT_LOGGED_IN, logs in again once, and carries on.
    let sig = ks.sign(&key.id, b"after", SignatureFormat::Der).unwrap();
    ks.verify(&key.id, b"after", &sig, SignatureFormat::Der)
        .unwrap();
}
