//! The PKCS#11 backend: keys generated and used inside a token; they never leave it.
//!
//! Keys are token objects with `CKA_ID` = 8 bytes of the store ID then 8 random bytes (the
//! locator, in hex) and `CKA_LABEL` = `namespace/name`, private and sensitive, not extractable
//! unless asked for at creation (then wrapped only under keys the token's security officer
//! marked trusted: `export.rs`), with one usage each. Messages are hashed in software and signed
//! with the raw mechanisms (`CKM_ECDSA`, `CKM_RSA_PKCS_PSS`, `CKM_RSA_PKCS` over a DigestInfo),
//! which every token has, including SoftHSM 2.6 that lacks `CKM_ECDSA_SHA256`.
//!
//! Any conformant token should do, not only SoftHSM2: token info is read without failing on odd
//! fields (`token_info.rs`), capabilities come from what the token says of its mechanisms
//! (`capabilities.rs`), and templates degrade from hardened to required-only when a token refuses
//! attributes, recording what it made (`template.rs`).

mod capabilities;
mod check;
mod counter;
pub use counter::TokenCounter;
mod errors;
mod export;
mod ffi;
mod generate;
mod module;
mod objects;
mod pool;
mod report;
mod template;
mod token_info;
mod transport;

#[cfg(feature = "testing")]
pub(crate) use module::fault;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use aws_lc_rs::digest;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;

use self::capabilities::Mechanisms;
use self::objects::{expected, locator_bytes};
use self::pool::{Disposition, Pool};
use self::template::Expected;
use crate::backend::{
    Backend, BackendReport, Capabilities, GeneratedKey, KeyContext, KeyOptions, KeyRef, Sealed,
    Wrapping,
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
pub(super) const EXTRACTABLE_BLOB: &[u8] = b"keyhold-pkcs11:extractable";

/// The blob recorded for a key imported into the token (`key import`): lookups of it do not
/// insist on `CKA_LOCAL` or `CKA_ALWAYS_SENSITIVE`, which an imported key cannot have.
pub(super) const IMPORTED_BLOB: &[u8] = b"keyhold-pkcs11:imported";

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
                        // (The failing key's cached handle is dropped by `with_object`; other
                        // keys' handles stay: a wrong GCM tag is such a failure, and any caller
                        // can provoke one.)
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
        // Asking takes the module's turn, which other processes share: not from memory only
        // ([`crate::keystore::may_wait`]). The call is then made again where it may wait.
        if let Err(stop) = crate::keystore::may_wait("ask whether the token is still there") {
            return stop;
        }
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
    let _turn = module.turn();
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

/// Why a token's RSA decryption is not known to work until a key is made.
pub(super) const OAEP_UNKNOWN: &str =
    "not known until an RSA decrypt key is made (no mechanism flag tells; \
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
        self.describe()
    }

    fn check_key(&self, key: KeyRef<'_>) -> Result<()> {
        self.check_objects(&key)
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

    fn wrap_key(&self, key: KeyRef<'_>, wrapping: Wrapping<'_>) -> Result<Vec<u8>> {
        self.export(&key, wrapping)
    }

    fn unwrap_key(&self, _unwrapping: KeyRef<'_>, _wrapped: &[u8]) -> Result<SecretBytes> {
        Err(Error::Unsupported {
            backend: self.name.clone(),
            what: "unwrapping into this process: a token does not hand out what it unwraps; \
                   unwrap with a software key (`--unwrap-with` a software aes-256-gcm or RSA \
                   decrypt key)"
                .into(),
        })
    }

    fn import_key(
        &self,
        context: KeyContext<'_>,
        material: &SecretBytes,
        options: &KeyOptions,
    ) -> Result<GeneratedKey> {
        self.import(context, material, options)
    }
}
