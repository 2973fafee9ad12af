//! The PKCS#11 backend: keys generated and used inside a token; they never leave it.
//!
//! Keys are token objects with `CKA_ID` = 8 bytes of the store ID then 8 random bytes (the
//! locator, in hex) and `CKA_LABEL` = `namespace/name`, private and sensitive, not extractable
//! unless asked for at creation (then only under trusted wrapping keys), with one usage each. Messages are
//! hashed in software and signed with the raw mechanisms (`CKM_ECDSA`, `CKM_RSA_PKCS_PSS`,
//! `CKM_RSA_PKCS` over a DigestInfo), which every token has, including SoftHSM 2.6 that lacks
//! `CKM_ECDSA_SHA256`.

mod errors;
mod module;
mod pool;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use aws_lc_rs::digest;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType as CkKeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use self::pool::{Disposition, Pool};
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

/// A PKCS#11 token as a keyhold backend.
pub struct Pkcs11Backend {
    name: String,
    module_path: std::path::PathBuf,
    pool: Pool,
    capabilities: OnceLock<Capabilities>,
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

/// Which object class holds a key's private or secret half.
fn secret_class(algorithm: Algorithm) -> ObjectClass {
    match algorithm {
        Algorithm::Aes256Gcm | Algorithm::HmacSha256 => ObjectClass::SECRET_KEY,
        _ => ObjectClass::PRIVATE_KEY,
    }
}

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
            capabilities: OnceLock::new(),
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
                        Disposition::Fail => {
                            lease.discard();
                            drop(lease);
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

    /// The handle of the object with `id` and `class`, from the cache or `C_FindObjects`;
    /// `None` when the token has no such object.
    fn find(
        &self,
        session: &Session,
        id: &[u8],
        class: ObjectClass,
    ) -> std::result::Result<Option<ObjectHandle>, cryptoki::error::Error> {
        let key = (id.to_vec(), class_key(class));
        if let Some(&h) = self.handles().get(&key) {
            return Ok(Some(h));
        }
        // Only an object the token generated itself (CKA_LOCAL) counts, and only if it is the one
        // such object with this CKA_ID: a key imported or planted under the same ID by someone
        // with the PIN is never used in its place.
        let found = session.find_objects(&[
            Attribute::Id(id.to_vec()),
            Attribute::Class(class),
            Attribute::Local(true),
        ])?;
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
        absent: &std::cell::Cell<bool>,
    ) -> std::result::Result<ObjectHandle, cryptoki::error::Error> {
        use cryptoki::context::Function;
        use cryptoki::error::{Error as CkError, RvError};
        use cryptoki::session::SessionState;
        if let Some(handle) = self.find(session, id, class)? {
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
        self.with_object(
            &id,
            secret_class(key.context.spec.algorithm()),
            operation,
            op,
        )
    }

    /// Runs `op` on the object `id` of `class`; a missing object is reported as such, or as the
    /// token having gone when it has.
    fn with_object<T>(
        &self,
        id: &[u8],
        class: ObjectClass,
        operation: &str,
        mut op: impl FnMut(&Session, ObjectHandle) -> std::result::Result<T, cryptoki::error::Error>,
    ) -> Result<T> {
        // Set when the token has no object for the key (not merely a stale cached handle).
        let absent = std::cell::Cell::new(false);
        let result = self.run(operation, |me, session| {
            let handle = me.find_required(session, id, class, &absent)?;
            op(session, handle)
        });
        match result {
            Err(Error::Backend { .. }) if absent.get() => {
                if !self.pool.token_present() {
                    return Err(self.gone());
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

    fn compute_capabilities(&self) -> Result<Capabilities> {
        let slot = self.pool.slot()?;
        let module = self.pool.module();
        let mechanisms = module
            .get_mechanism_list(slot)
            .map_err(|e| errors::map(&self.name, "list mechanisms (C_GetMechanismList)", e))?;
        let has = |m: MechanismType| mechanisms.contains(&m);
        let token = module
            .get_token_info(slot)
            .map(|i| {
                format!(
                    "token `{}` ({})",
                    i.label().trim_end(),
                    i.model().trim_end()
                )
            })
            .unwrap_or_else(|_| "the token".into());
        let rsa_range = module
            .get_mechanism_info(slot, MechanismType::RSA_PKCS_KEY_PAIR_GEN)
            .ok()
            .map(|i| (i.min_key_size(), i.max_key_size()));
        let oaep_sha256 = has(MechanismType::RSA_PKCS_OAEP) && self.probe_oaep_sha256()?;

        let mut supported = Vec::new();
        let mut missing = Vec::new();
        for key_type in KeyType::ALL {
            for &purpose in key_type.purposes() {
                let need: Result<(), String> = match (key_type, purpose) {
                    (KeyType::EcdsaP256 | KeyType::EcdsaP384, _) => require(
                        &has,
                        &[MechanismType::ECC_KEY_PAIR_GEN, MechanismType::ECDSA],
                    ),
                    (KeyType::Ed25519, _) => require(
                        &has,
                        &[
                            MechanismType::ECC_EDWARDS_KEY_PAIR_GEN,
                            MechanismType::EDDSA,
                        ],
                    ),
                    (KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096, purpose) => {
                        let bits = key_type.rsa_bits().unwrap_or(0);
                        let size_ok = rsa_range.is_some_and(|(lo, hi)| lo <= bits && bits <= hi);
                        let mechs: &[MechanismType] = if purpose == Purpose::Sign {
                            &[
                                MechanismType::RSA_PKCS_KEY_PAIR_GEN,
                                MechanismType::RSA_PKCS_PSS,
                                MechanismType::RSA_PKCS,
                            ]
                        } else {
                            &[
                                MechanismType::RSA_PKCS_KEY_PAIR_GEN,
                                MechanismType::RSA_PKCS_OAEP,
                            ]
                        };
                        require(&has, mechs).and_then(|()| {
                            if !size_ok {
                                Err(format!("{bits}-bit RSA keys"))
                            } else if purpose == Purpose::Decrypt && !oaep_sha256 {
                                Err(
                                    "CKM_RSA_PKCS_OAEP with SHA-256 (it does OAEP with SHA-1 only)"
                                        .into(),
                                )
                            } else {
                                Ok(())
                            }
                        })
                    }
                    (KeyType::Aes256Gcm, _) => {
                        require(&has, &[MechanismType::AES_KEY_GEN, MechanismType::AES_GCM])
                    }
                    (KeyType::HmacSha256, _) => require(
                        &has,
                        &[
                            MechanismType::GENERIC_SECRET_KEY_GEN,
                            MechanismType::SHA256_HMAC,
                        ],
                    ),
                };
                match need {
                    Ok(()) => supported.push((key_type, purpose)),
                    Err(what) => missing.push((key_type, purpose, format!("{token} lacks {what}"))),
                }
            }
        }
        Ok(Capabilities::new(supported).with_missing(missing))
    }

    /// Whether the token decrypts RSA-OAEP with SHA-256 (SoftHSM 2.6 does SHA-1 only): tried once
    /// with a throwaway session key, since no mechanism flag tells.
    fn probe_oaep_sha256(&self) -> Result<bool> {
        self.run("probe RSA-OAEP-SHA256 support", |_, session| {
            let (public, private) = session.generate_key_pair(
                &Mechanism::RsaPkcsKeyPairGen,
                &[
                    Attribute::Token(false),
                    Attribute::Encrypt(true),
                    Attribute::ModulusBits(2048.into()),
                    Attribute::PublicExponent(vec![1, 0, 1]),
                ],
                &[
                    Attribute::Token(false),
                    Attribute::Decrypt(true),
                    Attribute::Sensitive(true),
                ],
            )?;
            let params = PkcsOaepParams::new(
                MechanismType::SHA256,
                PkcsMgfType::MGF1_SHA256,
                PkcsOaepSource::empty(),
            );
            let result = session.decrypt(&Mechanism::RsaPkcsOaep(params), private, &[0u8; 256]);
            let _ = session.destroy_object(public);
            let _ = session.destroy_object(private);
            Ok(match result {
                Ok(_) => true,
                Err(cryptoki::error::Error::Pkcs11(
                    rv,
                    cryptoki::context::Function::DecryptInit,
                )) => {
                    tracing::debug!("RSA-OAEP-SHA256 refused at C_DecryptInit: {rv:?}");
                    false
                }
                // Init accepted the parameters; the garbage ciphertext then failed, as it should.
                Err(_) => true,
            })
        })
    }

    /// Makes the key's objects; returns the public key and what the token reports about the key.
    fn generate_objects(
        &self,
        context: &KeyContext<'_>,
        id: &[u8],
        extractable: bool,
    ) -> Result<Made> {
        let spec = context.spec;
        let label = context.label.as_bytes().to_vec();
        let purpose = spec.purpose();
        // Every usage is set explicitly, false unless it is the key's one purpose: tokens' defaults
        // (SoftHSM gives a new private key decrypt, sign and unwrap) must not add a second one.
        let secret_usages = [
            Attribute::Sign(matches!(purpose, Purpose::Sign | Purpose::Mac)),
            Attribute::Decrypt(matches!(purpose, Purpose::Decrypt | Purpose::Encrypt)),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
        ];
        let common_private = |mut extra: Vec<Attribute>| {
            let mut attrs = vec![
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(extractable),
                // An extractable key may be wrapped only under keys the SO marked trusted: any
                // user-made wrapping key would otherwise export it in effect in clear.
                Attribute::WrapWithTrusted(extractable),
                Attribute::Id(id.to_vec()),
                Attribute::Label(label.clone()),
            ];
            attrs.extend(secret_usages.iter().cloned());
            attrs.append(&mut extra);
            attrs
        };
        let common_public = |extra: Vec<Attribute>| {
            let mut attrs = vec![
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Id(id.to_vec()),
                Attribute::Label(label.clone()),
                Attribute::Verify(purpose == Purpose::Sign),
                Attribute::Encrypt(purpose == Purpose::Decrypt),
                Attribute::Wrap(false),
                Attribute::Derive(false),
            ];
            attrs.extend(extra);
            attrs
        };
        let handles = self.run(
            "generate a key (C_GenerateKey/C_GenerateKeyPair)",
            |_, session| match spec.algorithm() {
                Algorithm::EcdsaP256Sha256 | Algorithm::EcdsaP384Sha384 | Algorithm::Ed25519 => {
                    let (mechanism, oid) = match spec.key_type() {
                        KeyType::EcdsaP256 => (Mechanism::EccKeyPairGen, der::P256_OID),
                        KeyType::EcdsaP384 => (Mechanism::EccKeyPairGen, der::P384_OID),
                        _ => (Mechanism::EccEdwardsKeyPairGen, der::ED25519_OID),
                    };
                    let (public, private) = session.generate_key_pair(
                        &mechanism,
                        &common_public(vec![Attribute::EcParams(oid.to_vec())]),
                        &common_private(Vec::new()),
                    )?;
                    Ok((Some(public), private))
                }
                Algorithm::RsaPssSha256 | Algorithm::RsaPkcs1Sha256 | Algorithm::RsaOaepSha256 => {
                    let bits = spec.key_type().rsa_bits().unwrap_or(2048) as u64;
                    let (public, private) = session.generate_key_pair(
                        &Mechanism::RsaPkcsKeyPairGen,
                        &common_public(vec![
                            Attribute::ModulusBits(bits.into()),
                            Attribute::PublicExponent(vec![1, 0, 1]),
                        ]),
                        &common_private(Vec::new()),
                    )?;
                    Ok((Some(public), private))
                }
                Algorithm::Aes256Gcm | Algorithm::HmacSha256 => {
                    let (mechanism, key_type) = if spec.algorithm() == Algorithm::Aes256Gcm {
                        (Mechanism::AesKeyGen, CkKeyType::AES)
                    } else {
                        (Mechanism::GenericSecretKeyGen, CkKeyType::GENERIC_SECRET)
                    };
                    let attrs = common_private(vec![
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(key_type),
                        Attribute::ValueLen(32.into()),
                        Attribute::Verify(purpose == Purpose::Mac),
                        Attribute::Encrypt(purpose == Purpose::Encrypt),
                        Attribute::Wrap(false),
                    ]);
                    Ok((None, session.generate_key(&mechanism, &attrs)?))
                }
            },
        )?;
        let (public_handle, secret_handle) = handles;
        let class = secret_class(spec.algorithm());
        // Keep both handles: finding the public key again would scan every object on the token.
        let mut cache = self.handles();
        cache.insert((id.to_vec(), class_key(class)), secret_handle);
        if let Some(public) = public_handle {
            cache.insert((id.to_vec(), class_key(ObjectClass::PUBLIC_KEY)), public);
        }
        drop(cache);

        // Read back what the token says about the key and record it.
        let flags = self.run("read key attributes (C_GetAttributeValue)", |_, session| {
            session.get_attributes(
                secret_handle,
                &[
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                ],
            )
        })?;
        let mut attributes = Vec::new();
        for attr in flags {
            match attr {
                Attribute::AlwaysSensitive(v) => {
                    attributes.push(("always_sensitive".into(), v.to_string()))
                }
                Attribute::NeverExtractable(v) => {
                    attributes.push(("never_extractable".into(), v.to_string()))
                }
                _ => {}
            }
        }
        let public = if spec.key_type().is_asymmetric() {
            Some(self.read_public_key(spec.key_type(), spec.algorithm(), id)?)
        } else {
            None
        };
        Ok(Made { public, attributes })
    }

    fn read_public_key(
        &self,
        key_type: KeyType,
        algorithm: Algorithm,
        id: &[u8],
    ) -> Result<PublicKey> {
        let attrs = self.with_object(
            id,
            ObjectClass::PUBLIC_KEY,
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
        .get_all_slots()
        .map_err(|e| ck("list slots (C_GetSlotList)", e))?
        .into_iter()
        .find(|&s| {
            module
                .get_token_info(s)
                .is_ok_and(|info| !info.token_initialized())
        })
        .ok_or_else(|| Error::BackendUnavailable {
            backend: NAME.into(),
            reason: format!("{} offers no free slot", module_path.display()),
        })?;
    module
        .init_token(slot, so_pin, label)
        .map_err(|e| ck("C_InitToken", e))?;
    let session = module
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
    attributes: Vec<(String, String)>,
}

fn require(
    has: &impl Fn(MechanismType) -> bool,
    mechanisms: &[MechanismType],
) -> Result<(), String> {
    let missing: Vec<String> = mechanisms
        .iter()
        .filter(|m| !has(**m))
        .map(|m| format!("{m}"))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join(" and "))
    }
}

impl Backend for Pkcs11Backend {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Result<Capabilities> {
        if let Some(c) = self.capabilities.get() {
            return Ok(c.clone());
        }
        let computed = self.compute_capabilities()?;
        Ok(self.capabilities.get_or_init(|| computed).clone())
    }

    fn generate(&self, context: KeyContext<'_>, options: &KeyOptions) -> Result<GeneratedKey> {
        let (key_type, purpose) = (context.spec.key_type(), context.spec.purpose());
        self.capabilities()?
            .require(&self.name, key_type, purpose)?;
        // CKA_ID = the store's first 8 ID bytes, then 8 random bytes: a token shared by several
        // stores (or applications) still tells which objects belong to which store.
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&context.store_id[..8]);
        aws_lc_rs::rand::fill(&mut id[8..]).map_err(|_| Error::crypto("make a CKA_ID"))?;
        match self.generate_objects(&context, &id, options.extractable) {
            Ok(made) => Ok(GeneratedKey {
                locator: crate::hex::encode(&id),
                blob: None,
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
            spec.key_type(),
            spec.algorithm(),
            &locator_bytes(key.locator)?,
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
        if let Ok(info) = module.get_library_info() {
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
            .get_token_info(slot)
            .map_err(|e| errors::map(&self.name, "read token info (C_GetTokenInfo)", e))?;
        details.push((
            "token".into(),
            format!(
                "`{}` serial {} ({} {})",
                info.label().trim_end(),
                info.serial_number().trim_end(),
                info.manufacturer_id().trim_end(),
                info.model().trim_end()
            ),
        ));
        let limit = |l: cryptoki::slot::Limit| match l {
            cryptoki::slot::Limit::Max(n) => n.to_string(),
            cryptoki::slot::Limit::Infinite => "unlimited".into(),
            cryptoki::slot::Limit::Unavailable => "not reported".into(),
        };
        details.push((
            "sessions".into(),
            format!(
                "token allows {}, keyhold opens at most {}",
                limit(info.max_session_count()),
                self.pool.effective_max(slot)
            ),
        ));
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
        ] {
            if flag {
                pin.push(text);
            }
        }
        details.push(("user PIN".into(), pin.join(", ")));
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
