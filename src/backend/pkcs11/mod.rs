//! The PKCS#11 backend: keys generated and used inside a token; they never leave it.
//!
//! Keys are token objects with `CKA_ID` = 8 bytes of the store ID then 8 random bytes (the
//! locator, in hex) and `CKA_LABEL` = `namespace/name`, private and sensitive, not extractable
//! unless asked for at creation (then only under trusted wrapping keys), with one usage each. Messages are
//! hashed in software and signed with the raw mechanisms (`CKM_ECDSA`, `CKM_RSA_PKCS_PSS`,
//! `CKM_RSA_PKCS` over a DigestInfo), which every token has, including SoftHSM 2.6 that lacks
//! `CKM_ECDSA_SHA256`.
//!
//! Any conformant token should do, not only SoftHSM2: token info is read without failing on odd
//! fields (`token_info.rs`), capabilities come from what the token says of its mechanisms
//! (`capabilities.rs`), and templates degrade from hardened to required-only when a token refuses
//! attributes, recording what it made (`template.rs`).

mod capabilities;
mod errors;
mod ffi;
mod module;
mod pool;
mod template;
mod token_info;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use aws_lc_rs::digest;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType as CkKeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use self::capabilities::Mechanisms;
use self::pool::{Disposition, Pool};
use self::template::{Expected, STAGES};
use crate::backend::{
    Backend, BackendReport, Capabilities, DeviceObject, GeneratedKey, KeyContext, KeyOptions,
    KeyRef, Sealed,
};
use crate::config::Pkcs11Config;
use crate::der;
use crate::error::{Error, Result};
use crate::key::{Algorithm, KeyType, Purpose, SignatureFormat};
use crate::public_key::PublicKey;
use crate::secret::SecretBytes;

/// The default bound on sessions per token.
const DEFAULT_MAX_SESSIONS: usize = 8;

/// The blob recorded (under the record's MAC) for a key made extractable: lookups of it do not
/// insist on `CKA_NEVER_EXTRACTABLE`. Keys that never leave the token record no blob.
const EXTRACTABLE_BLOB: &[u8] = b"keyhold-pkcs11:extractable";

/// A key type with a purpose, and why a token cannot make it.
type Missing = (KeyType, Purpose, String);

/// What a token's mechanisms allow, and what they lack.
type MechanismCapabilities = (Vec<(KeyType, Purpose)>, Vec<Missing>);

/// A PKCS#11 token as a keyhold backend.
pub struct Pkcs11Backend {
    name: String,
    module_path: std::path::PathBuf,
    pool: Pool,
    /// What the token's mechanisms allow, asked once.
    mechanisms: OnceLock<MechanismCapabilities>,
    /// Capabilities learned unsupported by trying them on a real key (RSA-OAEP with SHA-256).
    learned: Mutex<Vec<Missing>>,
    /// Object handles by (`CKA_ID`, class); valid for every session of this process.
    handles: Mutex<HashMap<(Vec<u8>, u64), ObjectHandle>>,
}

impl std::fmt::Debug for Pkcs11Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Backend")
            .field("name", &self.name)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

fn class_key(class: ObjectClass) -> u64 {
    if class == ObjectClass::PRIVATE_KEY {
        1
    } else if class == ObjectClass::SECRET_KEY {
        2
    } else {
        3
    }
}

fn locator_bytes(locator: &str) -> Result<Vec<u8>> {
    crate::hex::decode(locator)
        .filter(|id| id.len() == 16)
        .ok_or_else(|| Error::Integrity {
            what: format!("PKCS#11 locator `{locator}` is not 32 hex digits"),
        })
}

/// How the objects of `key` must look on the token, from its spec and its recorded blob.
fn expected(key: &KeyRef<'_>) -> Result<Expected> {
    let extractable = match key.blob {
        None => false,
        Some(EXTRACTABLE_BLOB) => true,
        Some(_) => {
            return Err(Error::Integrity {
                what: format!(
                    "the record of `{}` holds a blob the PKCS#11 backend did not write",
                    key.context.label
                ),
            })
        }
    };
    Ok(Expected::new(key.context.spec, extractable))
}

/// What the OAEP consistency check decrypts.
const CHECK_MESSAGE: &[u8] = b"keyhold PKCS#11 new-key check";

impl Pkcs11Backend {
    /// A backend for the token `config` selects. Loads (once per process) and initialises the
    /// module and reads the PIN; the token itself is first touched when a key is used.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad selector or PIN source; [`Error::BackendUnavailable`] if the
    /// module cannot be loaded.
    pub fn new(name: &str, config: &Pkcs11Config) -> Result<Self> {
        let selector = config.token_selector()?;
        let pin = config.pin()?;
        let module = module::module(name, &config.module)?;
        Ok(Self {
            name: name.to_owned(),
            module_path: config.module.clone(),
            pool: Pool::new(
                name.to_owned(),
                module,
                selector,
                pin,
                config.max_sessions.unwrap_or(DEFAULT_MAX_SESSIONS),
            ),
            mechanisms: OnceLock::new(),
            learned: Mutex::new(Vec::new()),
            handles: Mutex::new(HashMap::new()),
        })
    }

    /// How many times this backend has called `C_Login`.
    pub fn login_attempts(&self) -> u64 {
        self.pool.login_attempts()
    }

    fn handles(&self) -> std::sync::MutexGuard<'_, HashMap<(Vec<u8>, u64), ObjectHandle>> {
        self.handles
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn learned(&self) -> std::sync::MutexGuard<'_, Vec<Missing>> {
        self.learned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `op` on a leased session, recovering once from a lost session, a lost login or a stale
    /// handle, and turning a vanished token into [`Error::BackendUnavailable`].
    fn run<T>(
        &self,
        operation: &str,
        mut op: impl FnMut(&Self, &Session) -> std::result::Result<T, cryptoki::error::Error>,
    ) -> Result<T> {
        let mut last = None;
        for _attempt in 0..3 {
            let mut lease = self.pool.checkout()?;
            match op(self, lease.session()) {
                Ok(value) => return Ok(value),
                Err(e) => {
                    match pool::disposition(&e) {
                        // What killed this session (or the login) killed the idle ones too.
                        Disposition::NewSession => {
                            lease.discard();
                            self.pool.close_idle();
                        }
                        Disposition::Relogin => {
                            lease.discard();
                            self.pool.close_idle();
                            self.pool.forget_login();
                        }
                        Disposition::StaleHandle => self.handles().clear(),
                        Disposition::DeviceGone => {
                            lease.discard();
                            drop(lease);
                            self.handles().clear();
                            self.pool.device_gone();
                            return Err(errors::map(&self.name, operation, e));
                        }
                        // An unexpected failure can leave the session mid-operation (SoftHSM leaves
                        // a failed C_FindObjectsInit active): never hand that session out again.
                        // Nor trust a cached handle after it: the next use finds (and so checks)
                        // the object again.
                        Disposition::Fail => {
                            lease.discard();
                            drop(lease);
                            self.handles().clear();
                            return Err(self.failure(operation, e));
                        }
                    }
                    last = Some(e);
                }
            }
        }
        Err(match last {
            Some(e) => self.failure(operation, e),
            None => Error::crypto("PKCS#11 retry loop"),
        })
    }

    /// The error for a failed operation: "unavailable" if the token itself has gone (some modules
    /// say only `CKR_GENERAL_ERROR` then), the mapped PKCS#11 error otherwise.
    fn failure(&self, operation: &str, e: cryptoki::error::Error) -> Error {
        if self.pool.token_present() {
            return errors::map(&self.name, operation, e);
        }
        self.gone()
    }

    /// Forgets the token's slot, sessions and handles, and says so.
    fn gone(&self) -> Error {
        self.handles().clear();
        self.pool.device_gone();
        Error::BackendUnavailable {
            backend: self.name.clone(),
            reason: "the token is not there any more; keyhold reconnects once it is back".into(),
        }
    }

    /// The handle of the object with `id` and `class` that matches what keyhold made (see
    /// [`Expected::find_template`]), from the cache or `C_FindObjects`; `None` when the token has
    /// no such object, or several.
    fn find(
        &self,
        session: &Session,
        id: &[u8],
        class: ObjectClass,
        expected: &Expected,
    ) -> std::result::Result<Option<ObjectHandle>, cryptoki::error::Error> {
        let key = (id.to_vec(), class_key(class));
        if let Some(&h) = self.handles().get(&key) {
            return Ok(Some(h));
        }
        let found = session.find_objects(&expected.find_template(id, class))?;
        match found.as_slice() {
            [h] => {
                self.handles().insert(key, *h);
                Ok(Some(*h))
            }
            [] => Ok(None),
            several => {
                tracing::error!(
                    backend = %self.name,
                    locator = %crate::hex::encode(id),
                    count = several.len(),
                    "several token objects share this key's CKA_ID: using none of them"
                );
                Ok(None)
            }
        }
    }

    /// [`Self::find`] for an object that must exist: absence is reported as an invalid key handle
    /// (the PKCS#11 error for using a key that is not there), and flagged in `absent`.
    fn find_required(
        &self,
        session: &Session,
        id: &[u8],
        class: ObjectClass,
        expected: &Expected,
        absent: &std::cell::Cell<bool>,
    ) -> std::result::Result<ObjectHandle, cryptoki::error::Error> {
        use cryptoki::context::Function;
        use cryptoki::error::{Error as CkError, RvError};
        use cryptoki::session::SessionState;
        if let Some(handle) = self.find(session, id, class, expected)? {
            absent.set(false);
            return Ok(handle);
        }
        // Private objects are invisible to a session that is no longer logged in (someone called
        // C_Logout): that is a lost login, to recover from, not a missing key.
        let state = session.get_session_info()?.session_state();
        if !matches!(state, SessionState::RoUser | SessionState::RwUser) {
            return Err(CkError::Pkcs11(
                RvError::UserNotLoggedIn,
                Function::FindObjects,
            ));
        }
        absent.set(true);
        Err(CkError::Pkcs11(
            RvError::KeyHandleInvalid,
            Function::FindObjects,
        ))
    }

    fn with_key<T>(
        &self,
        key: &KeyRef<'_>,
        operation: &str,
        op: impl FnMut(&Session, ObjectHandle) -> std::result::Result<T, cryptoki::error::Error>,
    ) -> Result<T> {
        let id = locator_bytes(key.locator)?;
        let expected = expected(key)?;
        self.with_object(
            &id,
            expected.secret_class(),
            &expected,
            key.context.label,
            operation,
            op,
        )
    }

    /// Runs `op` on the object `id` of `class` (of the key labelled `label`); a missing object is
    /// reported as such, one that does not match its record as that, and either as the token
    /// having gone when it has.
    fn with_object<T>(
        &self,
        id: &[u8],
        class: ObjectClass,
        expected: &Expected,
        label: &str,
        operation: &str,
        mut op: impl FnMut(&Session, ObjectHandle) -> std::result::Result<T, cryptoki::error::Error>,
    ) -> Result<T> {
        // Set when the token has no object for the key (not merely a stale cached handle).
        let absent = std::cell::Cell::new(false);
        let result = self.run(operation, |me, session| {
            let handle = me.find_required(session, id, class, expected, &absent)?;
            op(session, handle)
        });
        match result {
            Err(Error::Backend { .. }) if absent.get() => {
                if !self.pool.token_present() {
                    return Err(self.gone());
                }
                if let Some(reason) = self.mismatch(id, class, expected)? {
                    return Err(Error::KeyObjectMismatch {
                        backend: self.name.clone(),
                        key: label.to_owned(),
                        reason,
                    });
                }
                Err(Error::BackendUnavailable {
                    backend: self.name.clone(),
                    reason: format!(
                        "the key object {} is not on the token (was the token re-initialised?)",
                        crate::hex::encode(id)
                    ),
                })
            }
            other => other,
        }
    }

    /// When no object matches what keyhold made: how the objects that carry the key's `CKA_ID`
    /// and class differ from it, if there are any.
    fn mismatch(
        &self,
        id: &[u8],
        class: ObjectClass,
        expected: &Expected,
    ) -> Result<Option<String>> {
        let template = expected.find_template(id, class);
        let kinds: Vec<AttributeType> = template.iter().map(Attribute::attribute_type).collect();
        let found = self.run("check the key's objects (C_FindObjects)", |_, session| {
            let mut found = Vec::new();
            for handle in
                session.find_objects(&[Attribute::Id(id.to_vec()), Attribute::Class(class)])?
            {
                found.push(session.get_attributes(handle, &kinds)?);
            }
            Ok(found)
        })?;
        if found.is_empty() {
            return Ok(None);
        }
        if found.len() > 1 {
            return Ok(Some(format!(
                "{} objects carry its CKA_ID {}",
                found.len(),
                crate::hex::encode(id)
            )));
        }
        let differs: Vec<String> = template
            .iter()
            .filter(|want| !found[0].iter().any(|got| got == *want))
            .map(|want| format!("{}", want.attribute_type()))
            .collect();
        Ok(Some(format!(
            "the object with its CKA_ID {} differs in {}",
            crate::hex::encode(id),
            differs.join(", ")
        )))
    }

    /// What the token's mechanisms allow and lack, asked once per backend.
    fn mechanism_capabilities(&self) -> Result<&MechanismCapabilities> {
        if let Some(c) = self.mechanisms.get() {
            return Ok(c);
        }
        let slot = self.pool.slot()?;
        let module = self.pool.module();
        let token = self.token_name();
        let info = module.token_info(slot).ok();
        let mechanisms = Mechanisms::read(module.pkcs11(), slot)
            .map_err(|e| errors::map(&self.name, "list mechanisms (C_GetMechanismList)", e))?;
        let mut supported = Vec::new();
        let mut missing = Vec::new();
        for key_type in KeyType::ALL {
            for &purpose in key_type.purposes() {
                let check = if info.as_ref().is_some_and(|i| i.write_protected()) {
                    Err("write access (it is write-protected)".to_owned())
                } else {
                    mechanisms.check(key_type, purpose)
                };
                match check {
                    Ok(()) => supported.push((key_type, purpose)),
                    Err(what) => missing.push((key_type, purpose, format!("{token} lacks {what}"))),
                }
            }
        }
        Ok(self.mechanisms.get_or_init(|| (supported, missing)))
    }

    /// "token `label` (model)", for messages; "the token" when its info cannot be read.
    fn token_name(&self) -> String {
        self.pool
            .slot()
            .ok()
            .and_then(|slot| self.pool.module().token_info(slot).ok())
            .map_or_else(
                || "the token".to_owned(),
                |i| format!("token `{}` ({})", i.label, i.model),
            )
    }

    /// Makes the key's objects; returns their handles and what the token holds for them.
    fn generate_objects(
        &self,
        expected: &Expected,
        spec: &crate::key::KeySpec,
        id: &[u8],
        label: &str,
    ) -> Result<Made> {
        let (mechanism, public_extra, secret_extra) = match spec.algorithm() {
            Algorithm::EcdsaP256Sha256 | Algorithm::EcdsaP384Sha384 | Algorithm::Ed25519 => {
                let (mechanism, oid) = match spec.key_type() {
                    KeyType::EcdsaP256 => (Mechanism::EccKeyPairGen, der::P256_OID),
                    KeyType::EcdsaP384 => (Mechanism::EccKeyPairGen, der::P384_OID),
                    _ => (Mechanism::EccEdwardsKeyPairGen, der::ED25519_OID),
                };
                (
                    mechanism,
                    Some(vec![Attribute::EcParams(oid.to_vec())]),
                    Vec::new(),
                )
            }
            Algorithm::RsaPssSha256 | Algorithm::RsaPkcs1Sha256 | Algorithm::RsaOaepSha256 => {
                let bits = spec.key_type().rsa_bits().unwrap_or(2048) as u64;
                (
                    Mechanism::RsaPkcsKeyPairGen,
                    Some(vec![
                        Attribute::ModulusBits(bits.into()),
                        Attribute::PublicExponent(vec![1, 0, 1]),
                    ]),
                    Vec::new(),
                )
            }
            Algorithm::Aes256Gcm | Algorithm::HmacSha256 => {
                let (mechanism, key_type) = if spec.algorithm() == Algorithm::Aes256Gcm {
                    (Mechanism::AesKeyGen, CkKeyType::AES)
                } else {
                    (Mechanism::GenericSecretKeyGen, CkKeyType::GENERIC_SECRET)
                };
                (
                    mechanism,
                    None,
                    vec![
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(key_type),
                        Attribute::ValueLen(32.into()),
                    ],
                )
            }
        };
        let is_pair = public_extra.is_some();
        let (public_template, secret_template) = expected.templates(
            id,
            label.as_bytes(),
            public_extra.unwrap_or_default(),
            secret_extra,
        );
        let public_template = is_pair.then_some(&public_template);
        let generated = self.run(
            "generate a key (C_GenerateKey/C_GenerateKeyPair)",
            |me, session| {
                let mut stage = 0;
                loop {
                    let made = template::generate_at(
                        session,
                        &mechanism,
                        public_template,
                        &secret_template,
                        stage,
                    );
                    match made {
                        Err(e) if template::is_template_refusal(&e) && stage + 1 < STAGES => {
                            // A token may leave half a pair behind: nothing else carries this
                            // fresh CKA_ID.
                            for handle in session.find_objects(&[Attribute::Id(id.to_vec())])? {
                                session.destroy_object(handle)?;
                            }
                            stage += 1;
                            tracing::debug!(
                                backend = %me.name,
                                "the token refused the key template ({e:?}); trying again without {}",
                                secret_template.dropped_at(stage)
                            );
                        }
                        // The required attributes refused: the token cannot make this key as
                        // keyhold must (CKR_GENERAL_ERROR is left to `run`: it may be a token
                        // that has gone).
                        Err(e @ cryptoki::error::Error::Pkcs11(rv, _))
                            if template::is_template_refusal(&e)
                                && rv != cryptoki::error::RvError::GeneralError =>
                        {
                            return Ok(Err(rv));
                        }
                        other => return other.map(Ok),
                    }
                }
            },
        )?;
        let (public_handle, secret_handle) = generated.map_err(|rv| Error::Unsupported {
            backend: self.name.clone(),
            what: format!(
                "{} keys with purpose {}{}: {} refused even the required template ({rv:?})",
                spec.key_type(),
                spec.purpose(),
                if expected.is_extractable() {
                    ", extractable only under trusted keys (CKA_WRAP_WITH_TRUSTED)"
                } else {
                    ""
                },
                self.token_name()
            ),
        })?;
        // Keep both handles: finding the public key again would scan every object on the token.
        let mut cache = self.handles();
        cache.insert(
            (id.to_vec(), class_key(expected.secret_class())),
            secret_handle,
        );
        if let Some(public) = public_handle {
            cache.insert((id.to_vec(), class_key(ObjectClass::PUBLIC_KEY)), public);
        }
        drop(cache);

        let inspection = self.run("read key attributes (C_GetAttributeValue)", |_, session| {
            expected.inspect(session, public_handle, secret_handle)
        })?;
        if let Some(problem) = inspection.problem {
            return Err(Error::Unsupported {
                backend: self.name.clone(),
                what: format!(
                    "{} keys with purpose {} as keyhold makes them: {} made one whose {problem}",
                    spec.key_type(),
                    spec.purpose(),
                    self.token_name()
                ),
            });
        }
        let public = if spec.key_type().is_asymmetric() {
            Some(self.read_public_key(spec, expected, id, label)?)
        } else {
            None
        };
        Ok(Made {
            public,
            secret: secret_handle,
            attributes: inspection.attributes,
        })
    }

    /// Decrypts, on the token, a message encrypted to the new key in software exactly as keyhold
    /// encrypts to it: no mechanism flag tells whether a token does RSA-OAEP with SHA-256 and a
    /// label, so this learns it on the real key. A refusal marks RSA decryption unsupported on
    /// this token (and only that); the caller then destroys the key.
    fn check_oaep(
        &self,
        spec: &crate::key::KeySpec,
        public: &PublicKey,
        secret: ObjectHandle,
    ) -> Result<()> {
        let label = crate::keystore::oaep_label(CHECK_MESSAGE);
        let ciphertext = public.encrypt_oaep(CHECK_MESSAGE, &label)?;
        let outcome = self.run(
            "check the new key (C_Decrypt, CKM_RSA_PKCS_OAEP)",
            |_, session| {
                let params = PkcsOaepParams::new(
                    MechanismType::SHA256,
                    PkcsMgfType::MGF1_SHA256,
                    PkcsOaepSource::data_specified(&label),
                );
                match session.decrypt(&Mechanism::RsaPkcsOaep(params), secret, &ciphertext) {
                    Ok(plain) => Ok(Ok(zeroize::Zeroizing::new(plain))),
                    // The token's answer to the mechanism itself, not a lost session or token.
                    Err(e) if pool::disposition(&e) == Disposition::Fail => Ok(Err(e)),
                    Err(e) => Err(e),
                }
            },
        )?;
        match outcome {
            Ok(plain) if plain.as_slice() == CHECK_MESSAGE => Ok(()),
            Ok(_) => Err(Error::ConsistencyTest {
                key_type: spec.key_type().as_str(),
            }),
            Err(e) => {
                let why = match &e {
                    cryptoki::error::Error::Pkcs11(rv, f) => format!("{f}: {rv:?}"),
                    other => other.to_string(),
                };
                let lacks = format!(
                    "{} lacks CKM_RSA_PKCS_OAEP with SHA-256 and a label (it refused a new key's \
                     check, {why})",
                    self.token_name()
                );
                tracing::info!(backend = %self.name, "{lacks}");
                let mut learned = self.learned();
                for key_type in KeyType::ALL {
                    if key_type.rsa_bits().is_some()
                        && !learned
                            .iter()
                            .any(|(t, p, _)| *t == key_type && *p == Purpose::Decrypt)
                    {
                        learned.push((key_type, Purpose::Decrypt, lacks.clone()));
                    }
                }
                drop(learned);
                Err(Error::Unsupported {
                    backend: self.name.clone(),
                    what: format!(
                        "{} keys with purpose {}: {lacks}",
                        spec.key_type(),
                        spec.purpose()
                    ),
                })
            }
        }
    }

    fn read_public_key(
        &self,
        spec: &crate::key::KeySpec,
        expected: &Expected,
        id: &[u8],
        label: &str,
    ) -> Result<PublicKey> {
        let (key_type, algorithm) = (spec.key_type(), spec.algorithm());
        let attrs = self.with_object(
            id,
            ObjectClass::PUBLIC_KEY,
            expected,
            label,
            "read the public key (C_GetAttributeValue)",
            |session, handle| {
                session.get_attributes(
                    handle,
                    &[
                        AttributeType::EcPoint,
                        AttributeType::Modulus,
                        AttributeType::PublicExponent,
                    ],
                )
            },
        )?;
        let mut point = None;
        let mut modulus = None;
        let mut exponent = None;
        for attr in attrs {
            match attr {
                Attribute::EcPoint(p) => point = Some(p),
                Attribute::Modulus(n) => modulus = Some(n),
                Attribute::PublicExponent(e) => exponent = Some(e),
                _ => {}
            }
        }
        let spki = match (key_type, point, modulus, exponent) {
            (KeyType::EcdsaP256 | KeyType::EcdsaP384 | KeyType::Ed25519, Some(point), _, _) => {
                der::spki_from_point(key_type, &point)?
            }
            (KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096, _, Some(n), Some(e)) => {
                use aws_lc_rs::encoding::AsDer;
                aws_lc_rs::rsa::PublicKeyComponents {
                    n: n.as_slice(),
                    e: e.as_slice(),
                }
                .as_der()
                .map_err(|_| Error::crypto("encode the token's RSA public key"))?
                .as_ref()
                .to_vec()
            }
            _ => return Err(Error::crypto("read a public key from the token")),
        };
        Ok(PublicKey::from_spki_der(key_type, algorithm, spki))
    }

    fn destroy_objects(&self, id: &[u8]) -> Result<()> {
        self.run("destroy key objects (C_DestroyObject)", |_, session| {
            for handle in session.find_objects(&[Attribute::Id(id.to_vec())])? {
                session.destroy_object(handle)?;
            }
            Ok(())
        })?;
        self.handles().retain(|(k, _), _| k != id);
        Ok(())
    }
}
/// Initialises a fresh token with `label` in the first free slot of the module at `module_path`,
/// sets its user PIN, and logs out again (for test fixtures).
///
/// # Errors
/// [`Error::BackendUnavailable`] if the module cannot be loaded or has no free slot; backend
/// errors from the token.
#[cfg(feature = "testing")]
pub(crate) fn init_token(
    module_path: &std::path::Path,
    label: &str,
    so_pin: &secrecy::SecretString,
    user_pin: &secrecy::SecretString,
) -> Result<()> {
    const NAME: &str = "token setup";
    let module = module::module(NAME, module_path)?;
    let ck = |what: &str, e: cryptoki::error::Error| errors::map(NAME, what, e);
    let slot = module
        .pkcs11()
        .get_all_slots()
        .map_err(|e| ck("list slots (C_GetSlotList)", e))?
        .into_iter()
        .find(|&s| module.token_info(s).is_ok_and(|info| !info.initialized()))
        .ok_or_else(|| Error::BackendUnavailable {
            backend: NAME.into(),
            reason: format!("{} offers no free slot", module_path.display()),
        })?;
    module
        .pkcs11()
        .init_token(slot, so_pin, label)
        .map_err(|e| ck("C_InitToken", e))?;
    let session = module
        .pkcs11()
        .open_rw_session(slot)
        .map_err(|e| ck("C_OpenSession", e))?;
    session
        .login(cryptoki::session::UserType::So, Some(so_pin))
        .map_err(|e| ck("C_Login (SO)", e))?;
    session.init_pin(user_pin).map_err(|e| ck("C_InitPIN", e))?;
    session.logout().map_err(|e| ck("C_Logout", e))?;
    Ok(())
}

/// Whether a device error is the token refusing a ciphertext (rather than failing otherwise).
fn is_decrypt_refusal(e: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    use cryptoki::context::Function;
    use cryptoki::error::{Error as CkError, RvError};
    matches!(
        e.downcast_ref::<CkError>(),
        Some(CkError::Pkcs11(
            RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange
                | RvError::GeneralError
                | RvError::FunctionFailed,
            Function::Decrypt
        ))
    )
}

/// What generating a key's objects produced.
struct Made {
    public: Option<PublicKey>,
    /// The private or secret object.
    secret: ObjectHandle,
    attributes: Vec<(String, String)>,
}

/// Why a token's RSA decryption is not known to work until a key is made.
const OAEP_UNKNOWN: &str = "not known until an RSA decrypt key is made (no mechanism flag tells; \
     keyhold checks each new key and falls back or refuses then)";

impl Backend for Pkcs11Backend {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Result<Capabilities> {
        let (supported, missing) = self.mechanism_capabilities()?;
        let learned = self.learned();
        let supported: Vec<(KeyType, Purpose)> = supported
            .iter()
            .filter(|(t, p)| !learned.iter().any(|(lt, lp, _)| lt == t && lp == p))
            .copied()
            .collect();
        let mut missing = missing.clone();
        missing.extend(learned.iter().cloned());
        // RSA decryption needs OAEP with SHA-256, which no mechanism flag tells: until a key
        // made here shows it (and `learned` records a refusal), it is unknown, not promised.
        let unknown = supported
            .iter()
            .filter(|(_, p)| *p == Purpose::Decrypt)
            .filter(|(t, p)| !learned.iter().any(|(lt, lp, _)| lt == t && lp == p))
            .map(|&(t, p)| (t, p, format!("RSA-OAEP with SHA-256: {OAEP_UNKNOWN}")))
            .collect();
        Ok(Capabilities::new(supported)
            .with_missing(missing)
            .with_unknown(unknown))
    }

    fn generate(&self, context: KeyContext<'_>, options: &KeyOptions) -> Result<GeneratedKey> {
        let spec = context.spec;
        self.capabilities()?
            .require(&self.name, spec.key_type(), spec.purpose())?;
        // CKA_ID = the store's first 8 ID bytes, then 8 random bytes: a token shared by several
        // stores (or applications) still tells which objects belong to which store.
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&context.store_id[..8]);
        aws_lc_rs::rand::fill(&mut id[8..]).map_err(|_| Error::crypto("make a CKA_ID"))?;
        let expected = Expected::new(spec, options.extractable);
        let made = self
            .generate_objects(&expected, spec, &id, context.label)
            .and_then(|made| {
                if let (Algorithm::RsaOaepSha256, Some(public)) = (spec.algorithm(), &made.public) {
                    self.check_oaep(spec, public, made.secret)?;
                }
                Ok(made)
            });
        match made {
            Ok(made) => Ok(GeneratedKey {
                locator: crate::hex::encode(&id),
                blob: options.extractable.then(|| EXTRACTABLE_BLOB.to_vec()),
                public_key: made.public,
                attributes: made.attributes,
            }),
            Err(e) => {
                // Leave nothing half-made on the token.
                if let Err(cleanup) = self.destroy_objects(&id) {
                    tracing::error!(backend = %self.name, "could not remove a half-made key: {cleanup}");
                }
                Err(e)
            }
        }
    }

    fn public_key(&self, key: KeyRef<'_>) -> Result<PublicKey> {
        let spec = key.context.spec;
        if !spec.key_type().is_asymmetric() {
            return Err(crate::backend::no_public_key(spec.key_type()));
        }
        self.read_public_key(
            spec,
            &expected(&key)?,
            &locator_bytes(key.locator)?,
            key.context.label,
        )
    }

    fn sign(&self, key: KeyRef<'_>, message: &[u8], format: SignatureFormat) -> Result<Vec<u8>> {
        let algorithm = key.context.spec.algorithm();
        let (mechanism, input): (Mechanism<'_>, Vec<u8>) = match algorithm {
            Algorithm::EcdsaP256Sha256 => (
                Mechanism::Ecdsa,
                digest::digest(&digest::SHA256, message).as_ref().to_vec(),
            ),
            Algorithm::EcdsaP384Sha384 => (
                Mechanism::Ecdsa,
                digest::digest(&digest::SHA384, message).as_ref().to_vec(),
            ),
            Algorithm::Ed25519 => (
                Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
                message.to_vec(),
            ),
            Algorithm::RsaPssSha256 => (
                Mechanism::RsaPkcsPss(PkcsPssParams {
                    hash_alg: MechanismType::SHA256,
                    mgf: PkcsMgfType::MGF1_SHA256,
                    s_len: 32.into(),
                }),
                digest::digest(&digest::SHA256, message).as_ref().to_vec(),
            ),
            Algorithm::RsaPkcs1Sha256 => {
                let mut info = der::SHA256_DIGEST_INFO_PREFIX.to_vec();
                info.extend_from_slice(digest::digest(&digest::SHA256, message).as_ref());
                (Mechanism::RsaPkcs, info)
            }
            _ => {
                return Err(Error::crypto(
                    "signing with a key whose algorithm does not sign",
                ))
            }
        };
        let sig = self.with_key(&key, "sign (C_Sign)", |session, handle| {
            session.sign(&mechanism, handle, &input)
        })?;
        match (algorithm, format) {
            (Algorithm::EcdsaP256Sha256 | Algorithm::EcdsaP384Sha384, SignatureFormat::Der) => {
                der::ecdsa_raw_to_der(&sig)
            }
            _ => Ok(sig),
        }
    }

    fn encrypt(&self, key: KeyRef<'_>, plaintext: &[u8], aad: &[u8]) -> Result<Sealed> {
        if key.context.spec.algorithm() != Algorithm::Aes256Gcm {
            return Err(Error::crypto("symmetric encryption with a non-AES key"));
        }
        let mut nonce = [0u8; 12];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| Error::crypto("make a GCM nonce"))?;
        let (iv, ciphertext) = self.with_key(
            &key,
            "encrypt (C_Encrypt, CKM_AES_GCM)",
            |session, handle| {
                let mut iv = nonce;
                let ciphertext = {
                    let params = GcmParams::new(&mut iv, aad, 128.into())?;
                    session.encrypt(&Mechanism::AesGcm(params), handle, plaintext)?
                };
                Ok((iv, ciphertext))
            },
        )?;
        // Tokens in FIPS mode make the IV themselves and write it back into the parameters:
        // the envelope must carry the IV that was used, whoever chose it.
        if iv != nonce {
            tracing::debug!(backend = %self.name, "the token chose the GCM IV");
        }
        Ok(Sealed {
            nonce: iv.to_vec(),
            ciphertext,
        })
    }

    fn decrypt(&self, key: KeyRef<'_>, sealed: &Sealed, aad: &[u8]) -> Result<SecretBytes> {
        let failed = || Error::DecryptionFailed {
            reason: "the ciphertext, its AAD or the key does not match",
        };
        let plaintext = match key.context.spec.algorithm() {
            Algorithm::Aes256Gcm => {
                if sealed.nonce.len() != 12 || sealed.ciphertext.len() < 16 {
                    return Err(failed());
                }
                self.with_key(
                    &key,
                    "decrypt (C_Decrypt, CKM_AES_GCM)",
                    |session, handle| {
                        let mut iv = sealed.nonce.clone();
                        let params = GcmParams::new(&mut iv, aad, 128.into())?;
                        session.decrypt(&Mechanism::AesGcm(params), handle, &sealed.ciphertext)
                    },
                )
            }
            Algorithm::RsaOaepSha256 => self.with_key(
                &key,
                "decrypt (C_Decrypt, CKM_RSA_PKCS_OAEP)",
                |session, handle| {
                    let params = PkcsOaepParams::new(
                        MechanismType::SHA256,
                        PkcsMgfType::MGF1_SHA256,
                        PkcsOaepSource::data_specified(aad),
                    );
                    session.decrypt(&Mechanism::RsaPkcsOaep(params), handle, &sealed.ciphertext)
                },
            ),
            _ => return Err(Error::crypto("decryption with a key that does not decrypt")),
        };
        match plaintext {
            Ok(bytes) => Ok(SecretBytes::from_zeroizing(zeroize::Zeroizing::new(bytes))),
            // The ways a token says "this does not decrypt" are one opaque failure to the caller
            // (no padding or tag oracle). SoftHSM answers a wrong GCM tag with CKR_GENERAL_ERROR
            // from C_Decrypt; other device errors (memory, parameters) stay what they are.
            Err(Error::Backend { source, .. }) if is_decrypt_refusal(source.as_ref()) => {
                Err(failed())
            }
            Err(other) => Err(other),
        }
    }

    fn mac(&self, key: KeyRef<'_>, data: &[u8]) -> Result<Vec<u8>> {
        if key.context.spec.algorithm() != Algorithm::HmacSha256 {
            return Err(Error::crypto("MAC with a non-HMAC key"));
        }
        self.with_key(&key, "mac (C_Sign, CKM_SHA256_HMAC)", |session, handle| {
            session.sign(&Mechanism::Sha256Hmac, handle, data)
        })
    }

    fn report(&self) -> Result<BackendReport> {
        let module = self.pool.module();
        let mut details = vec![("module".to_owned(), self.module_path.display().to_string())];
        if let Ok(info) = module.pkcs11().get_library_info() {
            details.push((
                "library".into(),
                format!(
                    "{} ({}), PKCS#11 {}",
                    info.library_description().trim_end(),
                    info.manufacturer_id().trim_end(),
                    info.cryptoki_version()
                ),
            ));
        }
        let slot = self.pool.slot()?;
        let info = module
            .token_info(slot)
            .map_err(|e| errors::map(&self.name, "read token info (C_GetTokenInfo)", e))?;
        details.push((
            "token".into(),
            format!(
                "`{}` serial {} ({} {})",
                info.label, info.serial, info.manufacturer, info.model
            ),
        ));
        details.push((
            "sessions".into(),
            format!(
                "token allows {}, keyhold opens at most {}",
                info.max_sessions,
                self.pool.effective_max(slot)
            ),
        ));
        if let Ok((supported, _)) = self.mechanism_capabilities() {
            let learned = self.learned();
            let oaep = match learned.iter().find(|(_, p, _)| *p == Purpose::Decrypt) {
                Some((_, _, why)) => Some(why.clone()),
                None => supported
                    .iter()
                    .any(|(_, p)| *p == Purpose::Decrypt)
                    .then(|| OAEP_UNKNOWN.to_owned()),
            };
            drop(learned);
            if let Some(oaep) = oaep {
                details.push(("RSA-OAEP with SHA-256".into(), oaep));
            }
        }
        let mut pin = Vec::new();
        for (flag, text) in [
            (info.user_pin_initialized(), "initialised"),
            (
                info.user_pin_count_low(),
                "COUNT_LOW (a wrong PIN was entered)",
            ),
            (
                info.user_pin_final_try(),
                "FINAL_TRY (one more wrong PIN locks it)",
            ),
            (info.user_pin_locked(), "LOCKED (unlock with the SO PIN)"),
            (info.user_pin_to_be_changed(), "TO_BE_CHANGED"),
            (
                info.protected_authentication_path(),
                "PROTECTED_AUTHENTICATION_PATH (entered on the device)",
            ),
        ] {
            if flag {
                pin.push(text);
            }
        }
        details.push(("user PIN".into(), pin.join(", ")));
        if let Some(clock) = info.clock() {
            // Kept as the token gives it: openCryptoki's is not the YYYYMMDDhhmmss00 it should be.
            details.push(("token clock".into(), clock));
        }
        let raw = self.run("list objects (C_FindObjects)", |_, session| {
            let mut found = Vec::new();
            for handle in session.find_objects(&[])? {
                let attrs = session.get_attributes(
                    handle,
                    &[
                        AttributeType::Id,
                        AttributeType::Label,
                        AttributeType::Class,
                    ],
                )?;
                let (mut id, mut label, mut class) = (Vec::new(), String::new(), String::new());
                for attr in attrs {
                    match attr {
                        Attribute::Id(v) => id = v,
                        Attribute::Label(v) => label = String::from_utf8_lossy(&v).into_owned(),
                        Attribute::Class(c) => {
                            class = if c == ObjectClass::PRIVATE_KEY {
                                "private key".into()
                            } else if c == ObjectClass::PUBLIC_KEY {
                                "public key".into()
                            } else if c == ObjectClass::SECRET_KEY {
                                "secret key".into()
                            } else {
                                format!("{c}")
                            }
                        }
                        _ => {}
                    }
                }
                found.push((crate::hex::encode(&id), label, class));
            }
            Ok(found)
        });
        details.push((
            "logins by this backend".into(),
            self.login_attempts().to_string(),
        ));
        let raw = match raw {
            Ok(raw) => raw,
            Err(e) => {
                // Token facts need no login: show them even when listing objects failed.
                details.push(("key objects".into(), format!("cannot be listed: {e}")));
                return Ok(BackendReport {
                    kind: "pkcs11".into(),
                    details,
                    objects: None,
                });
            }
        };
        let mut objects: Vec<DeviceObject> = Vec::new();
        for (locator, label, kind) in raw {
            match objects.iter_mut().find(|o| o.locator == locator) {
                Some(o) => {
                    o.kind.push_str(", ");
                    o.kind.push_str(&kind);
                }
                None => objects.push(DeviceObject {
                    locator,
                    label,
                    kind,
                }),
            }
        }
        objects.sort_by(|a, b| a.label.cmp(&b.label).then(a.locator.cmp(&b.locator)));
        Ok(BackendReport {
            kind: "pkcs11".into(),
            details,
            objects: Some(objects),
        })
    }

    fn destroy_object(&self, locator: &str) -> Result<()> {
        // A locator typed by a person, not read from a record: a bad one is bad input.
        let id = locator_bytes(locator).map_err(|_| {
            Error::InvalidInput(format!(
                "`{locator}` is not a locator of this store's objects"
            ))
        })?;
        self.destroy_objects(&id)
    }

    fn destroy(&self, key: KeyRef<'_>) -> Result<()> {
        self.destroy_objects(&locator_bytes(key.locator)?)
    }
}
