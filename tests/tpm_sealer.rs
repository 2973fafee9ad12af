//! The TPM sealer and TPM-backed stores through the keystore, against real swtpm instances: PCR
//! binding, recovery and reseal, a fresh TPM, a restarted TPM, the software fallback, the
//! persistent SRK (and an owner password), dictionary-attack lockout, the root secret on the bus,
//! the sealed object's attributes.
#![cfg(feature = "tpm")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::sync::Arc;

use keyhold::backend::tpm::device::{DeviceSettings, TpmDevice};
use keyhold::config::{BackendConfig, Config, Fallback, TpmConfig};
use keyhold::testing::Swtpm;
use keyhold::{
    Error, KeyRequest, KeySpec, KeyType, Keystore, PassphraseSealer, Purpose, Sealer,
    SignatureFormat, TpmSealer,
};
use secrecy::SecretString;
use support::tpm::{
    assert_in_lockout, drive_into_lockout, flags, holds_any_part_of, loaded_attributes, make_srk,
    seal_and_unseal_in_clear, tpm2_ok, Tap, CC_CREATE, CC_UNSEAL,
};
use support::{sealer, PASSPHRASE};

const MESSAGE: &[u8] = b"keyhold TPM sealer test";
/// An operating-system PCR: extendable from locality 0 on swtpm, and not resettable (keyhold
/// refuses the resettable 16 and 23), so each test extends it on its own fresh swtpm.
const PCR: u8 = 8;

fn device(tpm: &Swtpm) -> Arc<TpmDevice> {
    keyhold::backend::tpm::device(&tpm.tcti(), DeviceSettings::default()).unwrap()
}

/// A fresh swtpm, and a store path in a temp dir of its own (where tpm2-tools can work too).
struct Setup {
    tpm: Swtpm,
    dir: tempfile::TempDir,
    store: std::path::PathBuf,
}

impl Setup {
    fn new() -> Self {
        let tpm = Swtpm::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        Self { tpm, dir, store }
    }
}

/// A TPM sealer on `tpm` that records the backend `tpm` of [`config`].
fn named_sealer(tpm: &Swtpm) -> TpmSealer {
    TpmSealer::new(device(tpm), Some("tpm".into()))
}

fn config(tpm: &Swtpm, fallback: Fallback) -> Config {
    let mut config = Config::default();
    let mut t = TpmConfig::with_tcti(tpm.tcti());
    t.fallback = fallback;
    config.backends.insert("tpm".into(), BackendConfig::Tpm(t));
    config
}

fn request(name: &str, key_type: KeyType, purpose: Option<Purpose>) -> KeyRequest {
    KeyRequest {
        namespace: "sealer".into(),
        name: name.into(),
        spec: KeySpec::new(key_type, purpose, None).unwrap(),
        backend: Some("tpm".into()),
    }
}

fn recovery() -> PassphraseSealer {
    sealer(PASSPHRASE)
}

/// Extends [`PCR`] with a connection of its own: no keyhold object may hold the TPM meanwhile
/// (swtpm serves one connection at a time).
fn extend_pcr(tpm: &Swtpm) {
    device(tpm).extend_pcr(PCR, b"a new boot loader").unwrap();
}

/// A store sealed to [`PCR`] with a recovery passphrase, holding one TPM ECDSA key; its ID.
fn pcr_bound_store(tpm: &Swtpm, store: &std::path::Path, config: &Config) -> String {
    let sealer = TpmSealer::new(device(tpm), Some("tpm".into()))
        .with_pcrs(&[PCR])
        .unwrap()
        .with_recovery(recovery());
    let ks = Keystore::create_with(store, &sealer, config).unwrap();
    ks.create_key(&request("ec", KeyType::EcdsaP384, None))
        .unwrap()
        .id
}

fn sign_works(ks: &Keystore, id: &str) {
    let sig = ks.sign(id, MESSAGE, SignatureFormat::Der).unwrap();
    ks.verify(id, MESSAGE, &sig, SignatureFormat::Der).unwrap();
}

fn unseal_reason(err: Error) -> String {
    match err {
        Error::Unseal { reason } => reason,
        other => panic!("expected Error::Unseal, got {other:?}"),
    }
}

/// A store sealed by the TPM (no PCRs) opens again, and its TPM and fallback keys work.
#[test]
fn a_tpm_sealed_store_opens_again_with_its_keys() {
    let Setup {
        tpm,
        dir: _dir,
        store,
    } = Setup::new();
    let config = config(&tpm, Fallback::Software);
    let (ec, aes) = {
        let tpm_sealer = named_sealer(&tpm);
        let ks = Keystore::create_with(&store, &tpm_sealer, &config).unwrap();
        assert_eq!(ks.sealer_kind(), "tpm");
        let ec = ks
            .create_key(&request("ec", KeyType::EcdsaP256, None))
            .unwrap();
        assert_eq!(ec.backend, "tpm");
        let aes = ks
            .create_key(&request("aes", KeyType::Aes256Gcm, None))
            .unwrap();
        // AES-GCM is not a TPM 2.0 algorithm: made in software, sealed by the TPM's root.
        assert_eq!(aes.backend, "software");
        assert_eq!(aes.attributes.get("fallback_for").unwrap(), "tpm");
        (ec.id, aes.id)
    };
    let sealed = keyhold::store::Store::open(&store)
        .unwrap()
        .meta()
        .sealed_root
        .clone();
    assert_eq!(sealed.sealer, "tpm");
    assert_eq!(TpmSealer::pcrs_of(&sealed).unwrap(), Vec::<u8>::new());
    assert_eq!(TpmSealer::recovery_of(&sealed).unwrap(), None);
    // The root secret is not in the store in clear: it is the TPM's sealed object.
    let tpm_sealer = named_sealer(&tpm);
    let ks = Keystore::open_with(&store, &tpm_sealer, &config).unwrap();
    sign_works(&ks, &ec);
    let env = ks.encrypt(&aes, MESSAGE, b"aad").unwrap();
    assert_eq!(ks.decrypt(&aes, &env, b"aad").unwrap().expose(), MESSAGE);
    // A passphrase does not open it.
    drop(ks);
    let err = Keystore::open_with(&store, &sealer(PASSPHRASE), &config).unwrap_err();
    let reason = unseal_reason(err);
    assert!(reason.contains("records a `tpm` seal"), "{reason}");
}

/// `--pcrs`: once the PCR changes the TPM refuses, the recovery passphrase re-binds the seal to
/// the new value, and every key ID still works.
#[test]
fn a_pcr_bound_seal_breaks_on_change_and_reseal_rebinds_it() {
    let Setup {
        tpm,
        dir: _dir,
        store,
    } = Setup::new();
    let config = config(&tpm, Fallback::Refuse);
    let id = pcr_bound_store(&tpm, &store, &config);
    // Unchanged PCRs: it opens.
    {
        let sealer = named_sealer(&tpm);
        sign_works(&Keystore::open_with(&store, &sealer, &config).unwrap(), &id);
    }
    let before = support::snapshot(&store);
    extend_pcr(&tpm);
    let plain = || named_sealer(&tpm);
    let reason = unseal_reason(Keystore::open_with(&store, &plain(), &config).unwrap_err());
    assert!(reason.contains("PCRs 8 "), "{reason}");
    assert!(reason.contains("keyhold reseal"), "{reason}");
    // Refusing changed nothing.
    assert_eq!(support::snapshot(&store), before);

    // A wrong recovery passphrase: refused, nothing changed.
    let wrong = plain().with_recovery_prompt(Box::new(|| Ok(SecretString::from("wrong"))));
    // The new seal keeps the recovery seal of the old one, as `reseal` authenticated it.
    let resealer = |sealed: &keyhold::sealer::SealedRoot| {
        let recovery = TpmSealer::recovery_of(sealed)?;
        Ok((plain().with_pcrs(&[PCR])?.keeping_recovery(recovery), ()))
    };
    let reason = unseal_reason(Keystore::reseal(&store, &wrong, resealer).unwrap_err());
    assert!(reason.contains("wrong passphrase"), "{reason}");
    assert_eq!(support::snapshot(&store), before);

    // The right one re-binds to the PCR's new value.
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let right = {
        let asked = Arc::clone(&asked);
        plain().with_recovery_prompt(Box::new(move || {
            asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(SecretString::from(PASSPHRASE))
        }))
    };
    Keystore::reseal(&store, &right, resealer).unwrap();
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
    let ks = Keystore::open_with(&store, &plain(), &config).unwrap();
    sign_works(&ks, &id);
    drop(ks);
    // The recovery seal was kept: the next change can be recovered too.
    let sealed = keyhold::store::Store::open(&store)
        .unwrap()
        .meta()
        .sealed_root
        .clone();
    assert!(TpmSealer::recovery_of(&sealed).unwrap().is_some());
    assert_eq!(TpmSealer::pcrs_of(&sealed).unwrap(), vec![PCR]);

    // While the PCRs still match, reseal needs no passphrase (here: drop the PCR binding).
    let never = plain().with_recovery_prompt(Box::new(|| panic!("the passphrase was asked for")));
    Keystore::reseal(&store, &never, |_| Ok((plain(), ()))).unwrap();
    extend_pcr(&tpm);
    sign_works(
        &Keystore::open_with(&store, &plain(), &config).unwrap(),
        &id,
    );
}

/// Sealed to PCRs without a recovery passphrase: a change is final, and the error says so.
#[test]
fn without_recovery_a_pcr_change_is_final_and_says_so() {
    let Setup {
        tpm,
        dir: _dir,
        store,
    } = Setup::new();
    {
        let sealer = TpmSealer::new(device(&tpm), None)
            .with_pcrs(&[PCR])
            .unwrap();
        Keystore::create_with(&store, &sealer, &Config::default()).unwrap();
    }
    extend_pcr(&tpm);
    let sealer = TpmSealer::new(device(&tpm), None).with_recovery_prompt(Box::new(|| {
        panic!("there is no recovery seal to use it on")
    }));
    let reason = unseal_reason(Keystore::open(&store, &sealer).unwrap_err());
    assert!(reason.contains("no recovery passphrase"), "{reason}");
}

/// A store sealed by one TPM, opened against another (or a cleared one): a clear refusal.
#[test]
fn a_store_opened_against_a_fresh_tpm_is_refused_clearly() {
    let first = Swtpm::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tpm_sealed = dir.path().join("tpm-sealed");
    let pass_sealed = dir.path().join("pass-sealed");
    let key = {
        let tpm_sealer = TpmSealer::new(device(&first), None);
        Keystore::create_with(&tpm_sealed, &tpm_sealer, &Config::default()).unwrap();
        let ks = Keystore::create_with(
            &pass_sealed,
            &sealer(PASSPHRASE),
            &config(&first, Fallback::Refuse),
        )
        .unwrap();
        ks.create_key(&request("ec", KeyType::EcdsaP256, None))
            .unwrap()
            .id
    };
    let fresh = Swtpm::new().unwrap();
    let tpm_sealer = TpmSealer::new(device(&fresh), None);
    // The SRK Name pinned at init is compared with the Name computed from the public area the
    // other TPM returns before any session is salted to that key.
    let salted = keyhold::backend::tpm::salted_sessions();
    let reason = unseal_reason(Keystore::open(&tpm_sealed, &tpm_sealer).unwrap_err());
    assert!(
        reason.contains("pinned")
            && reason.contains("another TPM")
            && reason.contains("cleared")
            && reason.contains("no session was salted"),
        "{reason}"
    );
    assert_eq!(
        keyhold::backend::tpm::salted_sessions(),
        salted,
        "a session was salted to an SRK that is not the pinned one"
    );
    drop(tpm_sealer);
    // The passphrase-sealed store's generation is anchored in the first TPM's counter, which a
    // fresh (or cleared) TPM does not have: refused, saying so.
    let err = Keystore::open_with(
        &pass_sealed,
        &sealer(PASSPHRASE),
        &config(&fresh, Fallback::Refuse),
    )
    .unwrap_err();
    assert!(matches!(err, Error::StoreTampered { .. }), "{err:?}");
    assert!(err.to_string().contains("the TPM was cleared"), "{err}");
    let _ = key;
}

/// The sealed root secret names its store: a seal copied into another store does not open it.
#[test]
fn a_seal_copied_to_another_store_is_refused() {
    let tpm = Swtpm::new().unwrap();
    let tpm_sealer = TpmSealer::new(device(&tpm), None);
    let root = keyhold::sealer::RootSecret::generate().unwrap();
    let sealed = tpm_sealer.seal(&root, &[1; 16]).unwrap();
    tpm_sealer.unseal(&sealed, &[1; 16]).unwrap();
    let reason = unseal_reason(tpm_sealer.unseal(&sealed, &[2; 16]).unwrap_err());
    assert!(reason.contains("another store"), "{reason}");
}

/// swtpm restarted between operations on a live keystore: every key works on, without reopening.
#[test]
fn a_live_keystore_survives_a_tpm_restart() {
    let mut tpm = Swtpm::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let tpm_sealer = named_sealer(&tpm);
    let ks = Keystore::create_with(&store, &tpm_sealer, &config(&tpm, Fallback::Refuse)).unwrap();
    let ids: Vec<String> = [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Rsa2048]
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            ks.create_key(&request(&format!("k{i}"), t, None))
                .unwrap()
                .id
        })
        .collect();
    let mac = ks
        .create_key(&request("mac", KeyType::HmacSha256, None))
        .unwrap()
        .id;
    let tag = ks.mac(&mac, MESSAGE).unwrap();
    for round in 0..3 {
        tpm.restart().unwrap();
        for id in &ids {
            sign_works(&ks, id);
        }
        assert_eq!(ks.mac(&mac, MESSAGE).unwrap(), tag, "round {round}");
    }
}

/// `srk_handle`: the SRK is persisted at 0x81000001 once and found there afterwards; it is the
/// same key as the transient SRK (same Name), so keys made either way load under it.
#[test]
fn the_srk_can_live_at_a_persistent_handle() {
    let Setup { tpm, dir, store } = Setup::new();
    let mut config = config(&tpm, Fallback::Refuse);
    let transient_key = {
        let ks = Keystore::create_with(&store, &sealer(PASSPHRASE), &config).unwrap();
        ks.create_key(&request("transient", KeyType::EcdsaP256, None))
            .unwrap()
            .id
    };
    let Some(BackendConfig::Tpm(t)) = config.backends.get_mut("tpm") else {
        panic!("no tpm backend")
    };
    t.srk_handle = Some(0x8100_0001);
    let mut persistent_keys = Vec::new();
    for round in 0..2 {
        let ks = Keystore::open_with(&store, &sealer(PASSPHRASE), &config).unwrap();
        sign_works(&ks, &transient_key);
        let id = ks
            .create_key(&request(
                &format!("persistent{round}"),
                KeyType::EcdsaP256,
                None,
            ))
            .unwrap()
            .id;
        sign_works(&ks, &id);
        persistent_keys.push(id);
    }
    let listed = support::tpm::tpm2_tool(
        &tpm.tcti(),
        dir.path(),
        &["tpm2_getcap", "handles-persistent"],
    );
    assert_eq!(listed.trim(), "- 0x81000001");
    // And back: keys made under the persistent SRK work with the derived one.
    let derived = self::config(&tpm, Fallback::Refuse);
    let ks = Keystore::open_with(&store, &sealer(PASSPHRASE), &derived).unwrap();
    for id in &persistent_keys {
        sign_works(&ks, id);
    }
}

/// README: on a TPM whose owner hierarchy has a password, keyhold cannot derive its SRK and says
/// so; "make the SRK once with tpm2-tools (`tpm2_createprimary -C o -P OWNERPW -G ecc256:aes128cfb
/// -g sha256 -a '…' -c srk.ctx`, then `tpm2_evictcontrol -C o -P OWNERPW -c srk.ctx 0x81000001`)
/// and set `srk_handle`". Done here as written: keys made before the password was set work again.
#[test]
fn with_an_owner_password_the_readme_srk_recipe_works() {
    let Setup { tpm, dir, store } = Setup::new();
    let mut config = config(&tpm, Fallback::Refuse);
    let key = Keystore::create_with(&store, &sealer(PASSPHRASE), &config)
        .unwrap()
        .create_key(&request("ec", KeyType::EcdsaP256, None))
        .unwrap()
        .id;
    let (tcti, tools) = (tpm.tcti(), dir.path());
    const OWNER: &str = "the owner's password";
    tpm2_ok(&tcti, tools, &["tpm2_changeauth", "-c", "o", OWNER]);
    // The store's generation is anchored in this TPM's counter: it does not open while keyhold
    // cannot reach the TPM, and says what to do.
    match Keystore::open_with(&store, &sealer(PASSPHRASE), &config).unwrap_err() {
        Error::BackendLogin { reason, .. } => assert!(
            reason.contains("owner hierarchy has a password") && reason.contains("srk_handle"),
            "{reason}"
        ),
        other => panic!("expected BackendLogin, got {other:?}"),
    }
    make_srk(&tcti, tools, Some(OWNER));
    tpm2_ok(
        &tcti,
        tools,
        &[
            "tpm2_evictcontrol",
            "-C",
            "o",
            "-P",
            OWNER,
            "-c",
            "srk.ctx",
            "0x81000001",
        ],
    );
    let Some(BackendConfig::Tpm(t)) = config.backends.get_mut("tpm") else {
        panic!("no tpm backend")
    };
    t.srk_handle = Some(0x8100_0001);
    let ks = Keystore::open_with(&store, &sealer(PASSPHRASE), &config).unwrap();
    sign_works(&ks, &key);
    let made = ks
        .create_key(&request("made-after", KeyType::EcdsaP256, None))
        .unwrap()
        .id;
    sign_works(&ks, &made);
}

/// Another program's key at the configured SRK handle is never adopted.
#[test]
fn a_foreign_object_at_the_srk_handle_is_refused() {
    let tpm = Swtpm::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| support::tpm::tpm2_tool(&tpm.tcti(), dir.path(), args);
    // An RSA primary (not keyhold's ECC SRK template) persisted at 0x81000001.
    run(&[
        "tpm2_createprimary",
        "-C",
        "o",
        "-G",
        "rsa2048",
        "-c",
        "primary.ctx",
    ]);
    run(&[
        "tpm2_evictcontrol",
        "-C",
        "o",
        "-c",
        "primary.ctx",
        "0x81000001",
    ]);
    let settings = DeviceSettings {
        srk_handle: Some(0x8100_0001),
        ..DeviceSettings::default()
    };
    let device = keyhold::backend::tpm::device(&tpm.tcti(), settings).unwrap();
    let err = device.srk_name("tpm").unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("0x81000001") && text.contains("tpm2_evictcontrol"),
        "{text}"
    );
}

/// The store's sealer metadata failed its MAC (exit 6).
fn assert_metadata_refused(err: &Error) {
    assert!(
        matches!(err, Error::Integrity { what }
            if what.contains("sealer metadata") && what.contains("failed its MAC")),
        "{err:?}"
    );
}

/// M2: the PCR list in the store is changed (to a PCR the intruder controls); the TPM then
/// refuses the seal, and the user is told to run `reseal`, which unseals with the recovery
/// passphrase. The metadata MAC, checked right after the unseal, refuses the store before
/// anything is re-sealed: nothing in the store changes, and it still opens once the list is back.
#[test]
fn seal_parameters_changed_behind_keyholds_back_are_refused_before_resealing() {
    let Setup {
        tpm,
        dir: _dir,
        store,
    } = Setup::new();
    let config = config(&tpm, Fallback::Refuse);
    let id = pcr_bound_store(&tpm, &store, &config);
    let plain = || named_sealer(&tpm);
    let original = support::edit_seal_params(&store, |p| p["pcrs"] = serde_json::json!([9]));
    let before = support::snapshot(&store);
    // What `keyhold reseal` does: the old seal's (doctored) PCR list, the recovery passphrase.
    let unsealer = plain().with_recovery_prompt(Box::new(|| Ok(SecretString::from(PASSPHRASE))));
    let resealer = plain().with_pcrs(&[9]).unwrap();
    let err = Keystore::reseal(&store, &unsealer, |_| Ok((resealer, ()))).unwrap_err();
    assert_metadata_refused(&err);
    assert_eq!(support::snapshot(&store), before, "something was re-sealed");
    let err = Keystore::open_with(&store, &unsealer, &config).unwrap_err();
    assert_metadata_refused(&err);
    // The recovery seal and the SRK Name are covered too.
    support::set_seal_params(&store, &original);
    sign_works(
        &Keystore::open_with(&store, &plain(), &config).unwrap(),
        &id,
    );
    support::edit_seal_params(&store, |p| p["recovery"] = serde_json::Value::Null);
    let err = Keystore::open_with(&store, &plain(), &config).unwrap_err();
    assert_metadata_refused(&err);
}

/// M2 (reseal race): `keyhold reseal` used to take the old seal's PCR list and recovery seal from
/// one read of the store and authenticate another. Someone who can write the store showed the
/// first read a seal with no PCRs and no recovery seal and put the genuine one back for the
/// second: the store was re-sealed unbound, and MAC'd under the genuine root. Now the new sealer
/// is built from the metadata `Keystore::reseal` authenticated, in its one open of the store. Here
/// the intruder rewrites the seal parameters while `reseal` runs (while it asks for the recovery
/// passphrase, after it read the store): the new sealer still gets the genuine PCR list and
/// recovery seal, and the store stays bound to the PCR.
#[test]
fn a_reseal_builds_the_new_seal_only_from_the_metadata_it_authenticated() {
    let Setup {
        tpm,
        dir: _dir,
        store,
    } = Setup::new();
    let config = config(&tpm, Fallback::Refuse);
    let id = pcr_bound_store(&tpm, &store, &config);
    let plain = || named_sealer(&tpm);
    extend_pcr(&tpm);
    let swapped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let unsealer = {
        let (store, swapped) = (store.clone(), Arc::clone(&swapped));
        plain().with_recovery_prompt(Box::new(move || {
            support::edit_seal_params(&store, |p| {
                p["pcrs"] = serde_json::json!([]);
                p["recovery"] = serde_json::Value::Null;
            });
            swapped.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(SecretString::from(PASSPHRASE))
        }))
    };
    let (old_pcrs, kept_recovery) = Keystore::reseal(&store, &unsealer, |verified| {
        let pcrs = TpmSealer::pcrs_of(verified)?;
        let recovery = TpmSealer::recovery_of(verified)?;
        let kept = recovery.is_some();
        Ok((
            plain().with_pcrs(&pcrs)?.keeping_recovery(recovery),
            (pcrs, kept),
        ))
    })
    .unwrap();
    assert!(swapped.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(
        old_pcrs,
        vec![PCR],
        "the new seal was built from unauthenticated metadata"
    );
    assert!(
        kept_recovery,
        "the new seal was built from unauthenticated metadata"
    );
    let sealed = keyhold::store::Store::open(&store)
        .unwrap()
        .meta()
        .sealed_root
        .clone();
    assert_eq!(TpmSealer::pcrs_of(&sealed).unwrap(), vec![PCR]);
    assert!(TpmSealer::recovery_of(&sealed).unwrap().is_some());
    sign_works(
        &Keystore::open_with(&store, &plain(), &config).unwrap(),
        &id,
    );
    // Still bound: the next change of the PCR is refused again.
    extend_pcr(&tpm);
    let reason = unseal_reason(Keystore::open_with(&store, &plain(), &config).unwrap_err());
    assert!(reason.contains("keyhold reseal"), "{reason}");
}

/// The library refuses a store that records another sealer kind than the one the caller passes,
/// before unsealing anything.
#[test]
fn a_store_is_opened_only_with_the_sealer_kind_the_caller_passes() {
    let Setup {
        tpm,
        dir: _dir,
        store,
    } = Setup::new();
    Keystore::create(&store, &sealer(PASSPHRASE)).unwrap();
    let reason =
        unseal_reason(Keystore::open(&store, &TpmSealer::new(device(&tpm), None)).unwrap_err());
    assert!(
        reason.contains("records a `passphrase` seal") && reason.contains("expects a `tpm` seal"),
        "{reason}"
    );
}

/// M1 in the library: a passphrase store whose sealed root secret was replaced by a TPM seal of a
/// root the intruder chose, with a metadata MAC forged under that root. A caller that passes its
/// passphrase sealer is refused (another kind); a caller that passes a TPM sealer (as a user
/// talked into stating `tpm` would) is refused too, because no record verifies under the new root.
#[test]
fn a_sealed_root_replaced_by_a_tpm_seal_of_a_known_root_is_refused() {
    let Setup {
        tpm,
        dir: _dir,
        store,
    } = Setup::new();
    let id = {
        let ks = Keystore::create(&store, &sealer(PASSPHRASE)).unwrap();
        ks.create_key(&KeyRequest {
            namespace: "m1".into(),
            name: "k".into(),
            spec: KeySpec::new(KeyType::HmacSha256, None, None).unwrap(),
            backend: None,
        })
        .unwrap()
        .id
    };
    let original = support::snapshot(&store);
    support::replace_root_with_tpm_seal(&store, &tpm.tcti(), None);
    let err = Keystore::open(&store, &sealer(PASSPHRASE)).unwrap_err();
    assert!(unseal_reason(err).contains("records a `tpm` seal"));
    let reason =
        unseal_reason(Keystore::open(&store, &TpmSealer::new(device(&tpm), None)).unwrap_err());
    assert!(
        reason.contains("sealed root secret was replaced") && reason.contains("1 key records"),
        "{reason}"
    );
    // Put the original back: the key is intact.
    support::restore(&store, &original);
    let ks = Keystore::open(&store, &sealer(PASSPHRASE)).unwrap();
    ks.mac(&id, b"intact").unwrap();
}

/// L1: a man-in-the-middle between keyhold and the TPM answers TPM2_CreatePrimary with a key of
/// its own (here: the TPM's endorsement-hierarchy key of the SRK template, standing in for a key
/// the intruder holds) and TPM2_ReadPublic of that handle with the genuine SRK. ESAPI salts
/// sessions to the key CreatePrimary returned, so the SRK Name pinned at init must be compared
/// with the Name of that key: the store is refused before any session is salted. The relay passes
/// everything through first, to show that the refusal comes from the forgery.
#[test]
fn a_man_in_the_middle_answering_create_primary_with_its_own_key_gets_no_session() {
    let Setup {
        tpm,
        dir: _dir,
        store,
    } = Setup::new();
    drop(
        Keystore::create_with(
            &store,
            &TpmSealer::new(device(&tpm), None),
            &Config::default(),
        )
        .unwrap(),
    );
    let relay = mitm::Relay::start(tpm.port());
    let through_relay = || {
        TpmSealer::new(
            keyhold::backend::tpm::device(&relay.tcti(), DeviceSettings::default()).unwrap(),
            None,
        )
    };
    drop(Keystore::open(&store, &through_relay()).unwrap());

    relay.forge(true);
    let salted = keyhold::backend::tpm::salted_sessions();
    let reason = unseal_reason(Keystore::open(&store, &through_relay()).unwrap_err());
    assert!(
        relay.forged() > 0,
        "the relay never saw a TPM2_CreatePrimary to answer"
    );
    assert_eq!(
        keyhold::backend::tpm::salted_sessions(),
        salted,
        "a session was salted to the man-in-the-middle's key ({reason})"
    );
    assert!(
        reason.contains("pinned") && reason.contains("no session was salted"),
        "{reason}"
    );
}

/// README: keyhold's SRK, keys and sealed root secret are noDA, so "a lockout that other programs
/// caused does not stop keyhold (checked on a swtpm in lockout: keys sign, the store unseals)".
///
/// A password guesser drives swtpm into dictionary-attack lockout (wrong passwords for a
/// DA-protected NV index until the TPM answers TPM_RC_LOCKOUT); the lockout is shown to be in
/// effect (the right password and a DA-protected signing key are refused with TPM_RC_LOCKOUT).
/// Then a TPM-sealed store and a PCR-bound one unseal, every kind of TPM key works (in a
/// passphrase-sealed store too), a new key is made, and the TPM is still in lockout afterwards:
/// all of it happened during the lockout.
#[test]
fn keys_work_and_stores_unseal_while_the_tpm_is_in_lockout() {
    let Setup { tpm, dir, store } = Setup::new();
    let config = config(&tpm, Fallback::Refuse);
    let pcr_store = dir.path().join("pcr-store");
    let (ids, pcr_key) = {
        let ks = Keystore::create_with(&store, &named_sealer(&tpm), &config).unwrap();
        let ids: Vec<String> = [
            ("ec", KeyType::EcdsaP256, None),
            ("rsa", KeyType::Rsa2048, Some(Purpose::Sign)),
            ("oaep", KeyType::Rsa2048, Some(Purpose::Decrypt)),
            ("mac", KeyType::HmacSha256, None),
        ]
        .into_iter()
        .map(|(name, t, p)| ks.create_key(&request(name, t, p)).unwrap().id)
        .collect();
        (ids, pcr_bound_store(&tpm, &pcr_store, &config))
    };
    // A passphrase-sealed store's TPM keys are the same kind of key: they work in lockout too.
    let pass_store = dir.path().join("pass-store");
    let pass_key = Keystore::create_with(&pass_store, &sealer(PASSPHRASE), &config)
        .unwrap()
        .create_key(&request("ec", KeyType::EcdsaP384, None))
        .unwrap()
        .id;
    let tools = tempfile::tempdir().unwrap();
    drive_into_lockout(&tpm.tcti(), tools.path());
    assert_in_lockout(&tpm.tcti(), tools.path());
    {
        let ks = Keystore::open_with(&store, &named_sealer(&tpm), &config).unwrap();
        let [ec, rsa, oaep, mac] = &ids[..] else {
            panic!("{ids:?}")
        };
        sign_works(&ks, ec);
        sign_works(&ks, rsa);
        let envelope = ks.encrypt(oaep, MESSAGE, b"aad").unwrap();
        assert_eq!(
            ks.decrypt(oaep, &envelope, b"aad").unwrap().expose(),
            MESSAGE
        );
        let tag = ks.mac(mac, MESSAGE).unwrap();
        ks.verify_mac(mac, MESSAGE, &tag).unwrap();
        let made = ks
            .create_key(&request("made-in-lockout", KeyType::EcdsaP256, None))
            .unwrap()
            .id;
        sign_works(&ks, &made);
        let pcr_ks = Keystore::open_with(&pcr_store, &named_sealer(&tpm), &config).unwrap();
        sign_works(&pcr_ks, &pcr_key);
        let pass_ks = Keystore::open_with(&pass_store, &sealer(PASSPHRASE), &config).unwrap();
        sign_works(&pass_ks, &pass_key);
    }
    // keyhold neither ended the lockout nor was it over meanwhile.
    assert_in_lockout(&tpm.tcti(), tools.path());
}

/// README: the root secret is "unsealed at every open through a salted session with parameter
/// encryption, so the secret crosses the bus encrypted". A tap between keyhold and swtpm records
/// each direction while a known root secret is sealed (TPM2_Create) and unsealed (TPM2_Unseal),
/// without PCRs and bound to a PCR (whose policy session is another path): no 16-byte run of the
/// root secret crosses either way. The control: the same tap does see a secret sealed and unsealed
/// without parameter encryption, both ways.
#[test]
fn the_root_secret_crosses_the_bus_encrypted_on_seal_and_unseal() {
    let tpm = Swtpm::new().unwrap();
    let tap = Tap::new(tpm.port());
    let root_bytes = *b"keyhold root secret on the bus!!";
    let store_id = [0x5a; 16];
    for pcrs in [&[][..], &[PCR]] {
        let sealer = TpmSealer::new(
            keyhold::backend::tpm::device(&tap.tcti(), DeviceSettings::default()).unwrap(),
            None,
        )
        .with_pcrs(pcrs)
        .unwrap();
        let root = keyhold::sealer::RootSecret::from_bytes(
            keyhold::secret::SecretBytes::copy_from(&root_bytes),
        )
        .unwrap();
        tap.clear();
        let sealed = sealer.seal(&root, &store_id).unwrap();
        assert!(tap.commands().contains(&CC_CREATE), "no TPM2_Create seen");
        for (way, seen) in [("to", tap.sent()), ("from", tap.answered())] {
            assert!(
                !holds_any_part_of(&seen, &root_bytes),
                "PCRs {pcrs:?}: the root secret crossed the bus {way} the TPM in clear at seal"
            );
        }
        tap.clear();
        sealer.unseal(&sealed, &store_id).unwrap();
        assert!(tap.commands().contains(&CC_UNSEAL), "no TPM2_Unseal seen");
        for (way, seen) in [("to", tap.sent()), ("from", tap.answered())] {
            assert!(
                !holds_any_part_of(&seen, &root_bytes),
                "PCRs {pcrs:?}: the root secret crossed the bus {way} the TPM in clear at unseal"
            );
        }
    }

    // The control, once keyhold's connection is closed (swtpm serves one at a time).
    tap.clear();
    assert_eq!(
        seal_and_unseal_in_clear(&tap.tcti(), &root_bytes),
        root_bytes
    );
    assert!(
        holds_any_part_of(&tap.sent(), &root_bytes),
        "the tap does not see a secret sealed in clear"
    );
    assert!(
        holds_any_part_of(&tap.answered(), &root_bytes),
        "the tap does not see a secret unsealed in clear"
    );
}

/// README: "the sealed root secret [is] noDA". The store's sealed object is loaded from what the
/// store keeps by tpm2-tools under keyhold's SRK and read back with tpm2_readpublic: fixedTPM,
/// fixedParent, noDA, and userWithAuth only without PCRs (with PCRs only the policy unseals it).
/// Not sensitiveDataOrigin: the data is the root secret keyhold supplies.
#[test]
fn the_sealed_root_secret_is_fixed_tpm_fixed_parent_and_no_da() {
    let Setup { tpm, dir, store } = Setup::new();
    let config = config(&tpm, Fallback::Refuse);
    let pcr_store = dir.path().join("pcr-store");
    drop(Keystore::create_with(&store, &named_sealer(&tpm), &config).unwrap());
    pcr_bound_store(&tpm, &pcr_store, &config);
    let tools = tempfile::tempdir().unwrap();
    for (store, expected) in [
        (&store, "fixedtpm|fixedparent|userwithauth|noda"),
        (&pcr_store, "fixedtpm|fixedparent|noda"),
    ] {
        let sealed = keyhold::store::Store::open(store)
            .unwrap()
            .meta()
            .sealed_root
            .clone();
        let params: serde_json::Value = serde_json::from_slice(&sealed.params).unwrap();
        let srk_name = support::unhex(params["srk_name"].as_str().unwrap());
        let public = support::unhex(params["public"].as_str().unwrap());
        let attributes =
            loaded_attributes(&tpm.tcti(), tools.path(), &srk_name, &public, &sealed.blob);
        assert_eq!(attributes, flags(expected), "{}", store.display());
    }
}

/// A TCP relay in front of swtpm's command and control ports that can forge answers to
/// TPM2_CreatePrimary (owner hierarchy) and to TPM2_ReadPublic of the key it made instead.
mod mitm {
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    const CREATE_PRIMARY: u32 = 0x131;
    const READ_PUBLIC: u32 = 0x173;
    const FLUSH_CONTEXT: u32 = 0x165;
    const RH_OWNER: u32 = 0x4000_0001;
    const RH_ENDORSEMENT: u32 = 0x4000_000b;

    #[derive(Default)]
    struct State {
        forging: AtomicBool,
        forged: AtomicUsize,
        /// The forged key's handle and the genuine SRK's TPM2_ReadPublic response.
        substitute: Mutex<Option<(u32, Vec<u8>)>>,
    }

    pub struct Relay {
        port: u16,
        state: Arc<State>,
    }

    impl Relay {
        /// Listens on two consecutive loopback ports and relays them to `upstream` and the port
        /// after it (swtpm's command and control ports).
        pub fn start(upstream: u16) -> Self {
            let (data, ctrl) = (0..20)
                .find_map(|_| {
                    let data = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).ok()?;
                    let port = data.local_addr().ok()?.port();
                    let ctrl =
                        TcpListener::bind((Ipv4Addr::LOCALHOST, port.checked_add(1)?)).ok()?;
                    Some((data, ctrl))
                })
                .expect("two free consecutive ports");
            let port = data.local_addr().unwrap().port();
            let state = Arc::new(State::default());
            let shared = Arc::clone(&state);
            std::thread::spawn(move || {
                for client in data.incoming().flatten() {
                    let state = Arc::clone(&shared);
                    std::thread::spawn(move || commands(client, upstream, &state));
                }
            });
            std::thread::spawn(move || {
                for client in ctrl.incoming().flatten() {
                    let Ok(server) = TcpStream::connect((Ipv4Addr::LOCALHOST, upstream + 1)) else {
                        continue;
                    };
                    pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                    pipe(server, client);
                }
            });
            Self { port, state }
        }

        pub fn tcti(&self) -> String {
            format!("swtpm:host=127.0.0.1,port={}", self.port)
        }

        pub fn forge(&self, on: bool) {
            self.state.forging.store(on, Ordering::SeqCst);
        }

        /// How many TPM2_CreatePrimary answers were forged.
        pub fn forged(&self) -> usize {
            self.state.forged.load(Ordering::SeqCst)
        }
    }

    fn pipe(mut from: TcpStream, mut to: TcpStream) {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Both);
        });
    }

    fn u32_at(buf: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(buf[at..at + 4].try_into().unwrap())
    }

    /// One command or response: a 10-byte header whose bytes 2..6 give the whole size.
    fn frame(stream: &mut TcpStream) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 10];
        stream.read_exact(&mut buf).ok()?;
        let size = usize::try_from(u32_at(&buf, 2)).ok()?;
        buf.resize(size.max(10), 0);
        stream.read_exact(&mut buf[10..]).ok()?;
        Some(buf)
    }

    fn ask(server: &mut TcpStream, command: &[u8]) -> Option<Vec<u8>> {
        server.write_all(command).ok()?;
        frame(server)
    }

    /// A command with no sessions and one handle.
    fn on_handle(code: u32, handle: u32) -> Vec<u8> {
        let mut c = Vec::with_capacity(14);
        c.extend_from_slice(&0x8001u16.to_be_bytes());
        c.extend_from_slice(&14u32.to_be_bytes());
        c.extend_from_slice(&code.to_be_bytes());
        c.extend_from_slice(&handle.to_be_bytes());
        c
    }

    /// Relays one command connection until either side closes it.
    fn commands(mut client: TcpStream, upstream: u16, state: &State) -> Option<()> {
        let mut server = TcpStream::connect((Ipv4Addr::LOCALHOST, upstream)).ok()?;
        while let Some(mut command) = frame(&mut client) {
            let code = u32_at(&command, 6);
            let handle = (command.len() >= 14).then(|| u32_at(&command, 10));
            let forging = state.forging.load(Ordering::SeqCst);
            let response = if forging && code == CREATE_PRIMARY && handle == Some(RH_OWNER) {
                // The genuine SRK, to answer TPM2_ReadPublic with; then the forged key.
                let genuine = ask(&mut server, &command)?;
                if u32_at(&genuine, 6) == 0 {
                    let srk = u32_at(&genuine, 10);
                    let public = ask(&mut server, &on_handle(READ_PUBLIC, srk))?;
                    ask(&mut server, &on_handle(FLUSH_CONTEXT, srk))?;
                    command[10..14].copy_from_slice(&RH_ENDORSEMENT.to_be_bytes());
                    let forged = ask(&mut server, &command)?;
                    if u32_at(&forged, 6) == 0 {
                        *state.substitute.lock().unwrap() = Some((u32_at(&forged, 10), public));
                        state.forged.fetch_add(1, Ordering::SeqCst);
                    }
                    forged
                } else {
                    genuine
                }
            } else {
                let substitute = state.substitute.lock().unwrap().clone();
                match substitute {
                    Some((forged, public))
                        if forging && code == READ_PUBLIC && handle == Some(forged) =>
                    {
                        public
                    }
                    _ => ask(&mut server, &command)?,
                }
            };
            client.write_all(&response).ok()?;
        }
        Some(())
    }
}
