//! One suite, every backend: each key type and purpose a backend claims is taken through its whole
//! life (create, public key, use, cross-check with OpenSSL, destroy); each one it does not claim is
//! asserted to be refused. The macro instantiates the same tests for every backend, as rustls does
//! for its crypto providers.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use keyhold::config::Config;
#[cfg(feature = "tpm")]
use keyhold::testing::Swtpm;
#[cfg(feature = "pkcs11")]
use keyhold::testing::{OpenCryptoki, SoftHsm};
use keyhold::{
    Algorithm, Error, KeyInfo, KeyRequest, KeySpec, KeyState, KeyType, Keystore, Purpose,
    RsaPadding, SignatureFormat, UseOptions,
};
use support::{assert_openssl_accepts_public_key, openssl_verifies, sealer, PASSPHRASE};
use tempfile::TempDir;

/// A keystore with the backend under test. Fields drop in declaration order: the keystore goes
/// before the token it uses, and the token before the directory.
struct Fixture {
    ks: Keystore,
    /// The backend keys are created in, as `KeyInfo::backend` names it.
    backend: &'static str,
    /// What `KeyRequest::backend` says (`None` for the default, software).
    requested: Option<&'static str>,
    /// The pairs this backend is known not to support, with a word its refusal must contain.
    refused: &'static [(KeyType, Purpose, &'static str)],
    /// The namespace keys are made in (unique per fixture on a token shared between tests).
    namespace: String,
    /// The configuration the store was opened with, and the store, to reopen it with fallback
    /// (which only device backends have).
    #[cfg_attr(not(any(feature = "pkcs11", feature = "tpm")), allow(dead_code))]
    config: Config,
    #[cfg_attr(not(any(feature = "pkcs11", feature = "tpm")), allow(dead_code))]
    store: std::path::PathBuf,
    /// The token or TPM fixture (a `SoftHsm`, `OpenCryptoki` or `Swtpm`), if any.
    _device: Option<Box<dyn std::any::Any>>,
    _dir: TempDir,
}

/// SoftHSM 2.6 decrypts RSA-OAEP with SHA-1 only; keyhold's RSA decryption keys are OAEP-SHA-256.
#[cfg(feature = "pkcs11")]
const SOFTHSM_REFUSES: &[(KeyType, Purpose, &str)] = &[
    (KeyType::Rsa2048, Purpose::Decrypt, "OAEP"),
    (KeyType::Rsa3072, Purpose::Decrypt, "OAEP"),
    (KeyType::Rsa4096, Purpose::Decrypt, "OAEP"),
];

/// openCryptoki 3.8.1's soft token (Debian 12), as its mechanism list and keyhold's OAEP probe
/// say: no EC mechanisms at all (`CKM_EC_KEY_PAIR_GEN`, `CKM_EC_EDWARDS_KEY_PAIR_GEN`), no
/// `CKM_AES_GCM`. Measured, not assumed: a token that gains or loses a type fails this table.
#[cfg(feature = "pkcs11")]
const OPENCRYPTOKI_REFUSES: &[(KeyType, Purpose, &str)] = &[
    (KeyType::EcdsaP256, Purpose::Sign, "CKM_EC_KEY_PAIR_GEN"),
    (KeyType::EcdsaP384, Purpose::Sign, "CKM_EC_KEY_PAIR_GEN"),
    (
        KeyType::Ed25519,
        Purpose::Sign,
        "CKM_EC_EDWARDS_KEY_PAIR_GEN",
    ),
    (KeyType::Aes256Gcm, Purpose::Encrypt, "CKM_AES_GCM"),
];

/// What the TPM backend does not make yet (Ed25519, AES-GCM and RSA-4096 are beyond most TPMs;
/// RSA-3072 and OAEP decryption are not implemented yet), each with a word of its refusal.
#[cfg(feature = "tpm")]
const SWTPM_REFUSES: &[(KeyType, Purpose, &str)] = &[
    (KeyType::Ed25519, Purpose::Sign, "Ed25519"),
    (KeyType::Rsa4096, Purpose::Sign, "4096-bit RSA"),
    (KeyType::Rsa4096, Purpose::Decrypt, "4096-bit RSA"),
    (KeyType::Aes256Gcm, Purpose::Encrypt, "AES-GCM"),
];

impl Fixture {
    /// A plain store: the built-in software backend.
    fn software() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let ks = Keystore::create(&store, &sealer(PASSPHRASE)).unwrap();
        Self {
            ks,
            backend: "software",
            requested: None,
            refused: &[],
            namespace: "conformance".into(),
            config: Config::default(),
            store,
            _device: None,
            _dir: dir,
        }
    }

    /// A store with a fresh SoftHSM2 token as the backend `hsm`.
    #[cfg(feature = "pkcs11")]
    fn pkcs11() -> Self {
        let hsm = SoftHsm::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let config = hsm.config("hsm");
        let ks = Keystore::create_with(&store, &sealer(PASSPHRASE), &config).unwrap();
        Self {
            ks,
            backend: "hsm",
            requested: Some("hsm"),
            refused: SOFTHSM_REFUSES,
            namespace: "conformance".into(),
            config,
            store,
            _device: Some(Box::new(hsm)),
            _dir: dir,
        }
    }

    /// A store whose backend `ock` is openCryptoki's soft token, set up by the fixture if this
    /// machine has not yet (root and the `opencryptoki` package needed: without them this fails).
    #[cfg(feature = "pkcs11")]
    fn opencryptoki() -> Self {
        let ock = OpenCryptoki::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let config = ock.config("ock");
        let ks = Keystore::create_with(&store, &sealer(PASSPHRASE), &config).unwrap();
        Self {
            ks,
            backend: "ock",
            requested: Some("ock"),
            refused: OPENCRYPTOKI_REFUSES,
            namespace: ock.namespace().to_owned(),
            config,
            store,
            _device: Some(Box::new(ock)),
            _dir: dir,
        }
    }

    /// A store whose `tpm` backend is a fresh swtpm.
    #[cfg(feature = "tpm")]
    fn tpm() -> Self {
        let tpm = Swtpm::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let config = tpm.config("tpm");
        let ks = Keystore::create_with(&store, &sealer(PASSPHRASE), &config).unwrap();
        Self {
            ks,
            backend: "tpm",
            requested: Some("tpm"),
            refused: SWTPM_REFUSES,
            namespace: "conformance".into(),
            config,
            store,
            _device: Some(Box::new(tpm)),
            _dir: dir,
        }
    }

    fn request(&self, name: &str, spec: KeySpec) -> KeyRequest {
        KeyRequest {
            namespace: self.namespace.clone(),
            name: name.into(),
            spec,
            backend: self.requested.map(str::to_owned),
        }
    }

    /// `Some(word)` if the backend must refuse `key_type` with `purpose`.
    fn refusal(&self, key_type: KeyType, purpose: Purpose) -> Option<&'static str> {
        self.refused
            .iter()
            .find(|(t, p, _)| *t == key_type && *p == purpose)
            .map(|(_, _, word)| *word)
    }

    /// Reopens the store with every device backend set to `fallback = "software"`.
    #[cfg(any(feature = "pkcs11", feature = "tpm"))]
    fn reopen_with_software_fallback(&mut self) {
        use keyhold::config::{BackendConfig, Fallback};
        let mut config = self.config.clone();
        for backend in config.backends.values_mut() {
            match backend {
                BackendConfig::Pkcs11(p) => p.fallback = Fallback::Software,
                BackendConfig::Tpm(t) => t.fallback = Fallback::Software,
                other => panic!("no fallback setting for {other:?}"),
            }
        }
        // swtpm serves one client at a time: the old keystore lets go of it (replaced by a
        // software-only one) before the new one connects.
        self.ks = Keystore::create(&self._dir.path().join("interim"), &sealer(PASSPHRASE)).unwrap();
        self.ks = Keystore::open_with(&self.store, &sealer(PASSPHRASE), &config).unwrap();
    }

    fn capabilities(&self) -> keyhold::backend::Capabilities {
        self.ks
            .backends()
            .find(|b| b.name() == self.backend)
            .unwrap_or_else(|| panic!("no backend `{}` in the keystore", self.backend))
            .capabilities()
            .unwrap()
    }
}

/// One key to exercise: type, purpose and (for RSA signing keys) padding.
type Case = (KeyType, Purpose, Option<RsaPadding>);

/// The cases, grouped one group per test. RSA-3072 and RSA-4096 are one group each, so that each
/// backend generates those slow keys in one test only.
mod cases {
    use super::*;

    pub const ECDSA_P256: &[Case] = &[(KeyType::EcdsaP256, Purpose::Sign, None)];
    pub const ECDSA_P384: &[Case] = &[(KeyType::EcdsaP384, Purpose::Sign, None)];
    pub const ED25519: &[Case] = &[(KeyType::Ed25519, Purpose::Sign, None)];
    pub const RSA2048_PSS: &[Case] = &[(KeyType::Rsa2048, Purpose::Sign, Some(RsaPadding::Pss))];
    pub const RSA2048_PKCS1: &[Case] =
        &[(KeyType::Rsa2048, Purpose::Sign, Some(RsaPadding::Pkcs1v15))];
    pub const RSA2048_DECRYPT: &[Case] = &[(KeyType::Rsa2048, Purpose::Decrypt, None)];
    pub const RSA3072: &[Case] = &[
        (KeyType::Rsa3072, Purpose::Sign, Some(RsaPadding::Pss)),
        (KeyType::Rsa3072, Purpose::Decrypt, None),
    ];
    pub const RSA4096: &[Case] = &[
        (KeyType::Rsa4096, Purpose::Sign, Some(RsaPadding::Pkcs1v15)),
        (KeyType::Rsa4096, Purpose::Decrypt, None),
    ];
    pub const AES256GCM: &[Case] = &[(KeyType::Aes256Gcm, Purpose::Encrypt, None)];
    pub const HMAC_SHA256: &[Case] = &[(KeyType::HmacSha256, Purpose::Mac, None)];

    /// Every group; each has a test in `conformance_tests!`.
    pub const ALL: &[&[Case]] = &[
        ECDSA_P256,
        ECDSA_P384,
        ED25519,
        RSA2048_PSS,
        RSA2048_PKCS1,
        RSA2048_DECRYPT,
        RSA3072,
        RSA4096,
        AES256GCM,
        HMAC_SHA256,
    ];
}

/// Instantiates the suite for one backend: `conformance_tests!(module_name, fixture_expression)`.
macro_rules! conformance_tests {
    ($backend:ident, $fixture:expr) => {
        mod $backend {
            use super::*;

            fn fixture() -> Fixture {
                $fixture
            }

            #[test]
            fn capabilities_are_as_expected() {
                checks::capabilities(&fixture());
            }

            #[test]
            fn ecdsa_p256() {
                checks::exercise(&fixture(), cases::ECDSA_P256);
            }

            #[test]
            fn ecdsa_p384() {
                checks::exercise(&fixture(), cases::ECDSA_P384);
            }

            #[test]
            fn ed25519() {
                checks::exercise(&fixture(), cases::ED25519);
            }

            #[test]
            fn rsa2048_pss() {
                checks::exercise(&fixture(), cases::RSA2048_PSS);
            }

            #[test]
            fn rsa2048_pkcs1() {
                checks::exercise(&fixture(), cases::RSA2048_PKCS1);
            }

            #[test]
            fn rsa2048_decrypt() {
                checks::exercise(&fixture(), cases::RSA2048_DECRYPT);
            }

            #[test]
            fn rsa3072() {
                checks::exercise(&fixture(), cases::RSA3072);
            }

            #[test]
            fn rsa4096() {
                checks::exercise(&fixture(), cases::RSA4096);
            }

            #[test]
            fn aes256gcm() {
                checks::exercise(&fixture(), cases::AES256GCM);
            }

            #[test]
            fn hmac_sha256() {
                checks::exercise(&fixture(), cases::HMAC_SHA256);
            }
        }
    };
}

conformance_tests!(software, Fixture::software());
#[cfg(feature = "pkcs11")]
conformance_tests!(pkcs11, Fixture::pkcs11());
#[cfg(feature = "pkcs11")]
conformance_tests!(opencryptoki, Fixture::opencryptoki());
#[cfg(feature = "tpm")]
conformance_tests!(tpm, Fixture::tpm());

/// A device backend allowed to fall back makes in software what it refuses, and in itself what
/// it can. (Not for `software`: it refuses nothing, so there is nothing to fall back from.)
#[cfg(any(feature = "pkcs11", feature = "tpm"))]
mod refused_types_fall_back_when_allowed {
    use super::*;

    #[cfg(feature = "pkcs11")]
    #[test]
    fn pkcs11() {
        checks::fallback(Fixture::pkcs11());
    }

    #[cfg(feature = "pkcs11")]
    #[test]
    fn opencryptoki() {
        checks::fallback(Fixture::opencryptoki());
    }

    #[cfg(feature = "tpm")]
    #[test]
    fn tpm() {
        checks::fallback(Fixture::tpm());
    }
}

#[test]
fn the_cases_cover_every_type_and_purpose() {
    let all: Vec<Case> = cases::ALL.iter().flat_map(|g| g.iter().copied()).collect();
    for key_type in KeyType::ALL {
        for &purpose in key_type.purposes() {
            assert!(
                all.iter().any(|(t, p, _)| *t == key_type && *p == purpose),
                "no conformance case for {key_type} with purpose {purpose}"
            );
        }
    }
    for padding in [RsaPadding::Pss, RsaPadding::Pkcs1v15] {
        assert!(
            all.iter().any(|(_, _, p)| *p == Some(padding)),
            "no conformance case for RSA {padding:?}"
        );
    }
}

/// The checks themselves, the same for every backend.
mod checks {
    use super::*;

    const MESSAGE: &[u8] = b"keyhold conformance: the same bytes for every backend";

    /// The backend claims exactly the pairs it should, and says why it lacks the others.
    pub fn capabilities(fx: &Fixture) {
        let caps = fx.capabilities();
        for key_type in KeyType::ALL {
            for &purpose in key_type.purposes() {
                match fx.refusal(key_type, purpose) {
                    None => assert!(
                        caps.supports(key_type, purpose),
                        "`{}` does not claim {key_type} with purpose {purpose}: {:?}",
                        fx.backend,
                        caps.missing(key_type, purpose)
                    ),
                    // What only trying tells (a token's RSA-OAEP hash) is learned by trying.
                    Some(word) if caps.supports(key_type, purpose) => {
                        let spec = KeySpec::new(key_type, Some(purpose), None).unwrap();
                        let request = fx.request(&format!("{key_type}-{purpose}-tried"), spec);
                        assert_refused(fx, &request, word);
                    }
                    Some(word) => {
                        let why = caps.missing(key_type, purpose).unwrap_or_else(|| {
                            panic!("no reason given for refusing {key_type} {purpose}")
                        });
                        assert!(why.contains(word), "{key_type} {purpose}: {why}");
                    }
                }
            }
        }
        for (key_type, purpose) in caps.iter() {
            assert!(
                key_type.purposes().contains(&purpose),
                "`{}` claims {key_type} with purpose {purpose}, which keyhold does not define",
                fx.backend
            );
        }
    }

    /// With `fallback = "software"`, each refused pair is made in software and recorded as a
    /// fallback (and works); a supported pair is still made in the backend.
    #[cfg(any(feature = "pkcs11", feature = "tpm"))]
    pub fn fallback(mut fx: Fixture) {
        assert!(!fx.refused.is_empty(), "{} refuses nothing", fx.backend);
        fx.reopen_with_software_fallback();
        let ks = &fx.ks;
        for &(key_type, purpose, _) in fx.refused {
            let spec = KeySpec::new(key_type, Some(purpose), None).unwrap();
            let info = ks
                .create_key(&fx.request(&format!("fallback-{key_type}-{purpose}"), spec))
                .unwrap();
            assert_eq!(info.backend, "software", "{info:?}");
            assert_eq!(
                info.attributes.get("fallback_for").map(String::as_str),
                Some(fx.backend),
                "{info:?}"
            );
            assert_eq!(ks.key_info(&info.id).unwrap(), info);
            match purpose {
                Purpose::Sign => {
                    let sig = ks.sign(&info.id, MESSAGE, SignatureFormat::Der).unwrap();
                    ks.verify(&info.id, MESSAGE, &sig, SignatureFormat::Der)
                        .unwrap();
                }
                Purpose::Decrypt | Purpose::Encrypt => {
                    let env = ks.encrypt(&info.id, MESSAGE, b"").unwrap();
                    assert_eq!(ks.decrypt(&info.id, &env, b"").unwrap().expose(), MESSAGE);
                }
                Purpose::Mac => {
                    let tag = ks.mac(&info.id, MESSAGE).unwrap();
                    ks.verify_mac(&info.id, MESSAGE, &tag).unwrap();
                }
                other => panic!("no fallback check for purpose {other}"),
            }
            ks.destroy_key(&info.id).unwrap();
        }
        let supported = KeyType::ALL
            .iter()
            .flat_map(|&t| t.purposes().iter().map(move |&p| (t, p)))
            .find(|&(t, p)| fx.refusal(t, p).is_none() && t != KeyType::Rsa4096)
            .unwrap();
        let spec = KeySpec::new(supported.0, Some(supported.1), None).unwrap();
        let info = ks.create_key(&fx.request("not-a-fallback", spec)).unwrap();
        assert_eq!(info.backend, fx.backend, "{info:?}");
        assert!(!info.attributes.contains_key("fallback_for"), "{info:?}");
        ks.destroy_key(&info.id).unwrap();
    }

    /// Creating `request` is refused with a reason containing `word`, leaves no record, and the
    /// backend's capabilities say so afterwards (whether it knew before or learned by trying).
    fn assert_refused(fx: &Fixture, request: &KeyRequest, word: &str) {
        let (key_type, purpose) = (request.spec.key_type(), request.spec.purpose());
        let err = fx.ks.create_key(request).unwrap_err();
        assert!(
            matches!(&err, Error::Unsupported { backend, .. } if backend == fx.backend),
            "{key_type} {purpose} in `{}`: expected Unsupported, got {err:?}",
            fx.backend
        );
        assert!(err.to_string().contains(word), "{err}");
        let left = fx.ks.list_keys(None).unwrap();
        assert!(
            left.iter().all(|k| k.name != request.name),
            "a refused key left a record"
        );
        let caps = fx.capabilities();
        assert!(
            !caps.supports(key_type, purpose),
            "`{}` still claims {key_type} {purpose} after refusing it",
            fx.backend
        );
        let why = caps.missing(key_type, purpose).unwrap_or_default();
        assert!(why.contains(word), "{key_type} {purpose}: {why}");
    }

    /// Each case: its whole life if the backend supports it, an asserted refusal if not.
    pub fn exercise(fx: &Fixture, cases: &[Case]) {
        let caps = fx.capabilities();
        for &(key_type, purpose, padding) in cases {
            let spec = KeySpec::new(key_type, Some(purpose), padding).unwrap();
            let name = format!("{key_type}-{purpose}-{}", spec.algorithm());
            let request = fx.request(&name, spec);
            match fx.refusal(key_type, purpose) {
                Some(word) => assert_refused(fx, &request, word),
                None => {
                    assert!(
                        caps.supports(key_type, purpose),
                        "`{}` does not claim {key_type} {purpose}",
                        fx.backend
                    );
                    let info = fx.ks.create_key(&request).unwrap();
                    assert_eq!(info.backend, fx.backend, "{name} was made elsewhere");
                    assert_eq!(info.spec, spec);
                    assert!(!info.attributes.contains_key("fallback_for"), "{info:?}");
                    assert_eq!(fx.ks.key_info(&info.id).unwrap(), info);
                    match purpose {
                        Purpose::Sign => sign(fx, &info),
                        Purpose::Decrypt => oaep(fx, &info),
                        Purpose::Encrypt => aead(fx, &info),
                        Purpose::Mac => mac(fx, &info),
                        other => panic!("no conformance check for purpose {other}"),
                    }
                    other_purposes_refused(fx, &info);
                    rotate(fx, &info);
                    destroy(fx, &info);
                }
            }
        }
    }

    /// The recorded public key is the backend's, and OpenSSL reads it as the right type.
    fn public_key(fx: &Fixture, info: &KeyInfo) -> keyhold::PublicKey {
        let recorded = fx.ks.public_key(&info.id).unwrap();
        assert_eq!(recorded, fx.ks.backend_public_key(&info.id).unwrap());
        assert_eq!(recorded.key_type(), info.spec.key_type());
        assert_openssl_accepts_public_key(&recorded.to_pem(), info.spec.key_type());
        recorded
    }

    fn sign(fx: &Fixture, info: &KeyInfo) {
        let id = &info.id;
        let algorithm = info.spec.algorithm();
        let public = public_key(fx, info);
        let pem = public.to_pem();

        let sig = fx.ks.sign(id, MESSAGE, SignatureFormat::Der).unwrap();
        fx.ks
            .verify(id, MESSAGE, &sig, SignatureFormat::Der)
            .unwrap();
        public.verify(MESSAGE, &sig, SignatureFormat::Der).unwrap();
        let err = fx
            .ks
            .verify(id, b"another message", &sig, SignatureFormat::Der)
            .unwrap_err();
        assert!(matches!(err, Error::VerificationFailed { .. }), "{err}");
        let mut bent = sig.clone();
        let last = bent.len() - 1;
        bent[last] ^= 1;
        let err = fx
            .ks
            .verify(id, MESSAGE, &bent, SignatureFormat::Der)
            .unwrap_err();
        assert!(matches!(err, Error::VerificationFailed { .. }), "{err}");

        assert!(
            openssl_verifies(&pem, algorithm, MESSAGE, &sig),
            "openssl refused a {algorithm} signature from `{}`",
            fx.backend
        );
        assert!(
            !openssl_verifies(&pem, algorithm, b"another message", &sig),
            "openssl accepted a {algorithm} signature over the wrong message"
        );

        match algorithm {
            Algorithm::EcdsaP256Sha256 | Algorithm::EcdsaP384Sha384 => {
                let width = if algorithm == Algorithm::EcdsaP256Sha256 {
                    64
                } else {
                    96
                };
                let raw = fx.ks.sign(id, MESSAGE, SignatureFormat::Raw).unwrap();
                assert_eq!(raw.len(), width, "{algorithm} raw signature width");
                fx.ks
                    .verify(id, MESSAGE, &raw, SignatureFormat::Raw)
                    .unwrap();
                let err = fx
                    .ks
                    .verify(id, MESSAGE, &raw, SignatureFormat::Der)
                    .unwrap_err();
                assert!(
                    matches!(err, Error::VerificationFailed { .. }),
                    "{algorithm}: {err:?}"
                );
            }
            Algorithm::Ed25519 | Algorithm::RsaPkcs1Sha256 => {
                // Deterministic schemes: the same message gives the same signature.
                assert_eq!(
                    fx.ks.sign(id, MESSAGE, SignatureFormat::Der).unwrap(),
                    sig,
                    "{algorithm} is deterministic"
                );
            }
            Algorithm::RsaPssSha256 => {}
            other => panic!("{other} does not sign"),
        }
        if let Some(bits) = info.spec.key_type().rsa_bits() {
            assert_eq!(sig.len(), bits / 8, "RSA signature length");
        }
        if algorithm == Algorithm::Ed25519 {
            assert_eq!(sig.len(), 64, "Ed25519 signature length");
        }

        let err = fx.ks.sign(id, b"", SignatureFormat::Der).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidInput(m) if m == "input is empty: nothing to sign"),
            "{err}"
        );
    }

    fn oaep(fx: &Fixture, info: &KeyInfo) {
        let id = &info.id;
        let public = public_key(fx, info);
        let plaintext = b"a data key, say".as_slice();
        let env = fx.ks.encrypt(id, plaintext, b"context").unwrap();
        let again = fx.ks.encrypt(id, plaintext, b"context").unwrap();
        assert_ne!(env, again, "OAEP is randomised");
        assert_eq!(
            fx.ks.decrypt(id, &env, b"context").unwrap().expose(),
            plaintext
        );
        let err = fx.ks.decrypt(id, &env, b"other context").unwrap_err();
        assert!(matches!(err, Error::DecryptionFailed { .. }), "{err}");
        let mut bent = env.clone();
        let last = bent.len() - 1;
        bent[last] ^= 1;
        let err = fx.ks.decrypt(id, &bent, b"context").unwrap_err();
        assert!(matches!(err, Error::DecryptionFailed { .. }), "{err}");

        let max = public.oaep_max_plaintext().unwrap();
        fx.ks.encrypt(id, &vec![7u8; max], b"").unwrap();
        let err = fx.ks.encrypt(id, &vec![7u8; max + 1], b"").unwrap_err();
        let limit = format!("at most {max} bytes");
        assert!(
            matches!(&err, Error::InvalidInput(m) if m.contains(&limit)),
            "{err}"
        );
    }

    fn no_public_key(fx: &Fixture, info: &KeyInfo) {
        for err in [
            fx.ks.public_key(&info.id).unwrap_err(),
            fx.ks.backend_public_key(&info.id).unwrap_err(),
        ] {
            assert!(
                matches!(&err, Error::InvalidInput(m) if m.ends_with("it has no public key")),
                "{err}"
            );
        }
    }

    fn aead(fx: &Fixture, info: &KeyInfo) {
        let id = &info.id;
        no_public_key(fx, info);
        let plaintext = vec![0x5a; 4096];
        let env = fx.ks.encrypt(id, &plaintext, b"row 17").unwrap();
        let again = fx.ks.encrypt(id, &plaintext, b"row 17").unwrap();
        assert_ne!(env, again, "each encryption takes a fresh nonce");
        assert_eq!(
            fx.ks.decrypt(id, &env, b"row 17").unwrap().expose(),
            plaintext.as_slice()
        );
        assert_eq!(
            fx.ks.decrypt(id, &again, b"row 17").unwrap().expose(),
            plaintext.as_slice()
        );
        let err = fx.ks.decrypt(id, &env, b"row 18").unwrap_err();
        assert!(matches!(err, Error::DecryptionFailed { .. }), "{err:?}");
        let err = fx.ks.decrypt(id, &env, b"").unwrap_err();
        assert!(matches!(err, Error::DecryptionFailed { .. }), "{err}");
        for at in [env.len() - 1, env.len() - 20, env.len() / 2] {
            let mut bent = env.clone();
            bent[at] ^= 0x80;
            let err = fx.ks.decrypt(id, &bent, b"row 17").unwrap_err();
            assert!(
                matches!(err, Error::DecryptionFailed { .. }),
                "byte {at}: {err}"
            );
        }
        let err = fx
            .ks
            .decrypt(id, &env[..env.len() - 1], b"row 17")
            .unwrap_err();
        assert!(matches!(err, Error::DecryptionFailed { .. }), "{err}");
    }

    fn mac(fx: &Fixture, info: &KeyInfo) {
        let id = &info.id;
        no_public_key(fx, info);
        let tag = fx.ks.mac(id, MESSAGE).unwrap();
        assert_eq!(tag.len(), 32);
        assert_eq!(
            fx.ks.mac(id, MESSAGE).unwrap(),
            tag,
            "HMAC is deterministic"
        );
        assert_ne!(fx.ks.mac(id, b"another message").unwrap(), tag);
        fx.ks.verify_mac(id, MESSAGE, &tag).unwrap();
        let err = fx.ks.verify_mac(id, b"another message", &tag).unwrap_err();
        assert!(matches!(err, Error::VerificationFailed { .. }), "{err}");
        let mut bent = tag.clone();
        bent[0] ^= 1;
        let err = fx.ks.verify_mac(id, MESSAGE, &bent).unwrap_err();
        assert!(matches!(err, Error::VerificationFailed { .. }), "{err}");
        let err = fx.ks.verify_mac(id, MESSAGE, &tag[..31]).unwrap_err();
        assert!(matches!(err, Error::VerificationFailed { .. }), "{err}");
    }

    /// Rotation makes version 2 in the same backend under the same ID: version 1's outputs still
    /// verify and decrypt (and say so), new ones are version 2's.
    fn rotate(fx: &Fixture, info: &KeyInfo) {
        let id = &info.id;
        let options = UseOptions::new();
        let purpose = info.spec.purpose();
        // Something made by version 1, and how to check it.
        let made: Vec<u8> = match purpose {
            Purpose::Sign => fx.ks.sign(id, MESSAGE, SignatureFormat::Der).unwrap(),
            Purpose::Decrypt | Purpose::Encrypt => fx.ks.encrypt(id, MESSAGE, b"v1").unwrap(),
            Purpose::Mac => fx.ks.mac(id, MESSAGE).unwrap(),
            other => panic!("no conformance check for purpose {other}"),
        };
        let old_public = fx.ks.public_key(id).ok();
        let rotated = fx.ks.rotate_key(id, Some("conformance")).unwrap();
        assert_eq!(rotated.id, info.id, "rotation changed the key ID");
        assert_eq!((rotated.version, rotated.versions.len()), (2, 2));
        assert_eq!(rotated.backend, fx.backend, "version 2 was made elsewhere");
        // A software key's locator is its uuid (its material is the version's blob); a device's
        // versions are objects of their own.
        if fx.backend != "software" {
            assert_ne!(
                rotated.versions[0].locator, rotated.versions[1].locator,
                "version 2 is not a new object"
            );
        }
        if let Some(old) = &old_public {
            assert_ne!(&fx.ks.public_key(id).unwrap(), old, "same public key");
            assert_eq!(&fx.ks.public_key_version(id, Some(1)).unwrap(), old);
            assert_eq!(
                fx.ks.public_key(id).unwrap(),
                fx.ks.backend_public_key(id).unwrap()
            );
        }
        let old_version = |used: u32, what: &str| assert_eq!(used, 1, "{what} of version 1");
        match purpose {
            Purpose::Sign => {
                let v = fx
                    .ks
                    .verify_with(id, MESSAGE, &made, SignatureFormat::Der, &options)
                    .unwrap();
                old_version(v.version, "signature");
                let new = fx
                    .ks
                    .sign_with(id, MESSAGE, SignatureFormat::Der, &options)
                    .unwrap();
                assert_eq!(new.version, 2);
                let v = fx
                    .ks
                    .verify_with(id, MESSAGE, &new.output, SignatureFormat::Der, &options)
                    .unwrap();
                assert_eq!(v.version, 2);
            }
            Purpose::Decrypt | Purpose::Encrypt => {
                let d = fx.ks.decrypt_with(id, &made, b"v1", &options).unwrap();
                old_version(d.version, "envelope");
                assert_eq!(d.output.expose(), MESSAGE);
                let new = fx.ks.encrypt_with(id, MESSAGE, b"v2", &options).unwrap();
                assert_eq!(new.version, 2);
                let d = fx
                    .ks
                    .decrypt_with(id, &new.output, b"v2", &options)
                    .unwrap();
                assert_eq!((d.version, d.output.expose()), (2, MESSAGE));
                let again = fx.ks.rewrap(id, &made, b"v1", &options).unwrap();
                assert_eq!(again.version, 2);
                let d = fx
                    .ks
                    .decrypt_with(id, &again.output, b"v1", &options)
                    .unwrap();
                assert_eq!((d.version, d.output.expose()), (2, MESSAGE));
            }
            Purpose::Mac => {
                let v = fx.ks.verify_mac_with(id, MESSAGE, &made, &options).unwrap();
                old_version(v.version, "tag");
                let new = fx.ks.mac_with(id, MESSAGE, &options).unwrap();
                assert_eq!(new.version, 2);
                assert_ne!(new.output, made, "version 2 computes the same tag");
            }
            other => panic!("no conformance check for purpose {other}"),
        }
        // Devices hold both versions, and nothing else of the key.
        let doctor = fx.ks.doctor().unwrap();
        assert!(
            doctor.missing.is_empty() && doctor.orphans.is_empty(),
            "{:?} {:?}",
            doctor.missing,
            doctor.orphans
        );
    }

    /// A key does its one job only.
    fn other_purposes_refused(fx: &Fixture, info: &KeyInfo) {
        let id = &info.id;
        let purpose = info.spec.purpose();
        let wrong = |what: &str, result: keyhold::Result<()>| {
            let err = result.unwrap_err();
            assert!(
                matches!(err, Error::WrongPurpose { .. }),
                "{what} with a {purpose} key: {err:?}"
            );
        };
        if purpose != Purpose::Sign {
            wrong(
                "sign",
                fx.ks.sign(id, MESSAGE, SignatureFormat::Der).map(drop),
            );
            wrong(
                "verify",
                fx.ks.verify(id, MESSAGE, &[0u8; 64], SignatureFormat::Der),
            );
        }
        if purpose != Purpose::Mac {
            wrong("mac", fx.ks.mac(id, MESSAGE).map(drop));
        }
        if !matches!(purpose, Purpose::Encrypt | Purpose::Decrypt) {
            wrong("encrypt", fx.ks.encrypt(id, MESSAGE, b"").map(drop));
        }
    }

    /// After `destroy_key`, the same ID names a tombstone: every use is refused with the date
    /// of destruction, the key is not listed, and its info says destroyed.
    fn destroy(fx: &Fixture, info: &KeyInfo) {
        let id = &info.id;
        let destroyed = fx.ks.destroy_key(id).unwrap();
        assert_eq!(destroyed.id, info.id);
        assert_eq!(destroyed.state, KeyState::Destroyed);
        assert!(destroyed.destroyed_at.is_some() && destroyed.versions.is_empty());
        let label = format!("{}/{}", info.namespace, info.name);
        let gone = |what: &str, result: keyhold::Result<()>| {
            let err = result.unwrap_err();
            match &err {
                Error::WrongState { key, state, .. } => {
                    assert_eq!(key, &label, "{what}");
                    assert!(state.starts_with("destroyed on "), "{what}: {err}");
                }
                other => panic!("{what} after destroy_key: expected WrongState, got {other:?}"),
            }
        };
        match info.spec.purpose() {
            Purpose::Sign => gone(
                "sign",
                fx.ks.sign(id, MESSAGE, SignatureFormat::Der).map(drop),
            ),
            Purpose::Decrypt => gone("decrypt", fx.ks.decrypt(id, &[1u8; 300], b"").map(drop)),
            Purpose::Encrypt => gone("encrypt", fx.ks.encrypt(id, MESSAGE, b"").map(drop)),
            Purpose::Mac => gone("mac", fx.ks.mac(id, MESSAGE).map(drop)),
            other => panic!("no conformance check for purpose {other}"),
        }
        assert_eq!(fx.ks.key_info(id).unwrap().state, KeyState::Destroyed);
        gone("destroy_key", fx.ks.destroy_key(id).map(drop));
        assert!(
            fx.ks.list_keys(None).unwrap().iter().all(|k| k.id != *id),
            "a destroyed key is still listed"
        );
        // Every version's objects are gone from the device: none is left as an orphan.
        let doctor = fx.ks.doctor().unwrap();
        assert!(doctor.orphans.is_empty(), "{:?}", doctor.orphans);
    }
}
