//! The cryptographer: the [`Backend`] trait and its implementations, one module each.
//!
//! A backend generates keys and uses them; it never hands key material to the keystore. What it
//! needs to find a key again is a *locator* (a string, bound into the key ID) and, optionally, an
//! opaque *blob* that the keystore stores in the key's record under the record MAC (the software
//! backend's encrypted key; a TPM's wrapped key). Backends keep no key records of their own.

#[cfg(feature = "pkcs11")]
pub mod pkcs11;
pub mod software;
#[cfg(feature = "tpm")]
pub mod tpm;
pub mod tpm_settings;
pub(crate) mod wrap;

use std::fmt;

use crate::error::Result;
use crate::key::{KeySpec, KeyType, Purpose, SignatureFormat};
use crate::public_key::PublicKey;
use crate::secret::SecretBytes;

/// Which key types, with which purposes, a backend can create and use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    supported: Vec<(KeyType, Purpose)>,
    missing: Vec<(KeyType, Purpose, String)>,
    /// Supported pairs whose support no flag tells: known only once a key is made (a token's
    /// RSA-OAEP hash). Creating one is tried; the backend refuses it then if it must.
    unknown: Vec<(KeyType, Purpose, String)>,
}

impl Capabilities {
    /// Capabilities from an explicit list.
    pub fn new(supported: Vec<(KeyType, Purpose)>) -> Self {
        Self {
            supported,
            missing: Vec::new(),
            unknown: Vec::new(),
        }
    }

    /// Marks supported pairs as not known until tried, with why (for `doctor`).
    pub fn with_unknown(mut self, unknown: Vec<(KeyType, Purpose, String)>) -> Self {
        self.unknown = unknown;
        self
    }

    /// Why support for `key_type` with `purpose` is not known until a key is made, if it is not.
    pub fn unknown(&self, key_type: KeyType, purpose: Purpose) -> Option<&str> {
        self.unknown
            .iter()
            .find(|(t, p, _)| *t == key_type && *p == purpose)
            .map(|(_, _, why)| why.as_str())
    }

    /// Adds, for unsupported pairs, what the device lacks (for error messages and `doctor`).
    pub fn with_missing(mut self, missing: Vec<(KeyType, Purpose, String)>) -> Self {
        self.missing = missing;
        self
    }

    /// What the device lacks for `key_type` with `purpose`, if that is known.
    pub fn missing(&self, key_type: KeyType, purpose: Purpose) -> Option<&str> {
        self.missing
            .iter()
            .find(|(t, p, _)| *t == key_type && *p == purpose)
            .map(|(_, _, why)| why.as_str())
    }

    /// Whether keys of `key_type` with `purpose` are supported (or, for those [`Self::unknown`],
    /// worth trying).
    pub fn supports(&self, key_type: KeyType, purpose: Purpose) -> bool {
        self.supported.contains(&(key_type, purpose))
    }

    /// `Ok` if `key_type` with `purpose` is supported, else [`crate::Error::Unsupported`] naming
    /// `backend` and what its device lacks.
    ///
    /// # Errors
    /// [`crate::Error::Unsupported`].
    pub fn require(&self, backend: &str, key_type: KeyType, purpose: Purpose) -> Result<()> {
        if self.supports(key_type, purpose) {
            return Ok(());
        }
        Err(crate::Error::Unsupported {
            backend: backend.to_owned(),
            what: self
                .missing(key_type, purpose)
                .unwrap_or("this key type")
                .to_owned(),
        })
    }

    /// Every supported pair.
    pub fn iter(&self) -> impl Iterator<Item = (KeyType, Purpose)> + '_ {
        self.supported.iter().copied()
    }
}

/// The identity of a key as the keystore knows it, handed to the backend with every call.
///
/// The backend binds its material to these fields (the software backend uses them as AEAD AAD), so a
/// blob moved to another record is refused.
#[derive(Debug, Clone, Copy)]
pub struct KeyContext<'a> {
    /// The store's identity.
    pub store_id: &'a [u8; 16],
    /// The key's record identifier.
    pub uuid: &'a [u8; 16],
    /// `namespace/name`, for devices that label their objects (`CKA_LABEL`).
    pub label: &'a str,
    /// Type, purpose and algorithm.
    pub spec: &'a KeySpec,
}

/// Choices made when a key is created. Backends read only [`KeyOptions::extractable`]; the rest
/// is the keystore's schedule for the key (changeable later with `Keystore::set_policy`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyOptions {
    /// Let the key leave its device wrapped under another key (`CKA_EXTRACTABLE`). Off by
    /// default: keys never leave. Never in clear: extractable token keys stay sensitive.
    pub extractable: bool,
    /// Start in pre-activation, becoming active at this time (seconds since the epoch).
    pub activate_at: Option<i64>,
    /// Become deactivated at this time.
    pub deactivate_at: Option<i64>,
    /// Rotate when the current version is this old.
    pub rotate_after: Option<std::time::Duration>,
}

impl KeyOptions {
    /// The defaults: a key that never leaves its backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`KeyOptions::extractable`].
    pub fn extractable(mut self, extractable: bool) -> Self {
        self.extractable = extractable;
        self
    }

    /// Sets [`KeyOptions::activate_at`].
    pub fn activate_at(mut self, at: Option<i64>) -> Self {
        self.activate_at = at;
        self
    }

    /// Sets [`KeyOptions::deactivate_at`].
    pub fn deactivate_at(mut self, at: Option<i64>) -> Self {
        self.deactivate_at = at;
        self
    }

    /// Sets [`KeyOptions::rotate_after`].
    pub fn rotate_after(mut self, after: Option<std::time::Duration>) -> Self {
        self.rotate_after = after;
        self
    }
}

/// A key as stored: its identity plus what the backend returned when it was generated.
#[derive(Debug, Clone, Copy)]
pub struct KeyRef<'a> {
    /// The key's identity.
    pub context: KeyContext<'a>,
    /// Where the backend finds the key.
    pub locator: &'a str,
    /// The backend's opaque blob, if it returned one.
    pub blob: Option<&'a [u8]>,
}

/// What [`Backend::generate`] returns for the keystore to record.
#[derive(Debug)]
pub struct GeneratedKey {
    /// Where the backend finds the key again.
    pub locator: String,
    /// Opaque, backend-protected bytes the keystore stores with the record.
    pub blob: Option<Vec<u8>>,
    /// The public key, for asymmetric types.
    pub public_key: Option<PublicKey>,
    /// What the device reports about the key (e.g. `never_extractable`), recorded with it.
    pub attributes: Vec<(String, String)>,
}

/// The error every backend gives when asked for the public key of a secret (symmetric) key.
pub(crate) fn no_public_key(key_type: KeyType) -> crate::Error {
    crate::Error::InvalidInput(format!("a {key_type} key is secret: it has no public key"))
}

/// What `keyhold doctor` shows about a backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendReport {
    /// The kind of backend (`software`, `pkcs11`).
    pub kind: String,
    /// Facts worth showing, in order (module, token, session limits, PIN state, …).
    pub details: Vec<(String, String)>,
    /// The key objects the device holds, for devices that hold them (`None` for software).
    pub objects: Option<Vec<DeviceObject>>,
}

/// A key object found on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceObject {
    /// The locator keyhold would record for it.
    pub locator: String,
    /// Its label on the device.
    pub label: String,
    /// What it is (`private key`, `public key`, `secret key`), comma-joined when several objects
    /// share the locator.
    pub kind: String,
}

/// Spare capacity a backend may leave in [`Sealed::ciphertext`] so that the keystore can put the
/// envelope's header and nonce in front without a new buffer (at least 25 + 1 + 12 bytes).
pub const ENVELOPE_ROOM: usize = 64;

/// An AEAD ciphertext as the backend makes or takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The nonce the backend chose.
    pub nonce: Vec<u8>,
    /// Ciphertext with the tag appended.
    pub ciphertext: Vec<u8>,
}

/// A backend: somewhere keys are generated and used without leaving it.
///
/// Every method blocks until the operation is done (hardware backends wait for the device).
/// Implementations are `Send + Sync`: one backend serves every thread of a keystore. The keystore
/// checks purposes and input sizes before calling; backends check only what their device needs.
pub trait Backend: Send + Sync + fmt::Debug {
    /// The backend instance's name, as recorded in key records and IDs (`software`, `hsm1`, …).
    fn name(&self) -> &str;

    /// The key types and purposes this backend can create (asking the device the first time).
    ///
    /// # Errors
    /// [`crate::Error::BackendUnavailable`] if the device cannot be reached.
    fn capabilities(&self) -> Result<Capabilities>;

    /// Whether this backend's key operations are computation on material held in this process's
    /// memory, with no device, file or lock of another process to wait for (the software
    /// backend): a caller serving many requests may then run a short one (not RSA's private
    /// operations, not key generation) where it is instead of handing it to another thread.
    /// Backends with a device answer `false`, the default.
    fn computes_in_process(&self) -> bool {
        false
    }

    /// Creates a key inside the backend.
    ///
    /// # Errors
    /// [`crate::Error::Unsupported`] for a type the backend cannot make; a backend error otherwise.
    fn generate(&self, context: KeyContext<'_>, options: &KeyOptions) -> Result<GeneratedKey>;

    /// Reads the public key back from the backend (the keystore normally uses the recorded copy).
    ///
    /// # Errors
    /// A backend error; [`crate::Error::InvalidInput`] for a symmetric key.
    fn public_key(&self, key: KeyRef<'_>) -> Result<PublicKey>;

    /// Signs `message` (the backend hashes it as the key's algorithm says).
    ///
    /// # Errors
    /// A backend error.
    fn sign(&self, key: KeyRef<'_>, message: &[u8], format: SignatureFormat) -> Result<Vec<u8>>;

    /// Encrypts with a symmetric key; `aad` is authenticated, not encrypted.
    ///
    /// # Errors
    /// A backend error.
    fn encrypt(&self, key: KeyRef<'_>, plaintext: &[u8], aad: &[u8]) -> Result<Sealed>;

    /// Decrypts: AEAD for symmetric keys (`sealed.nonce` set), RSA-OAEP for asymmetric ones (empty
    /// nonce, `aad` is the OAEP label).
    ///
    /// # Errors
    /// [`crate::Error::DecryptionFailed`] for any ciphertext that does not authenticate.
    fn decrypt(&self, key: KeyRef<'_>, sealed: &Sealed, aad: &[u8]) -> Result<SecretBytes>;

    /// Computes a MAC tag over `data`.
    ///
    /// # Errors
    /// A backend error.
    fn mac(&self, key: KeyRef<'_>, data: &[u8]) -> Result<Vec<u8>>;

    /// Describes the backend and lists the key objects on its device.
    ///
    /// # Errors
    /// [`crate::Error::BackendUnavailable`] and device errors.
    fn report(&self) -> Result<BackendReport>;

    /// Checks, for `keyhold store verify`, that the key's material is where its record says and
    /// is what keyhold made: a token's objects present with the attributes they were made with, a
    /// TPM blob that loads under the store's key, a software blob that authenticates under the
    /// store's key. The key is used for nothing, and no material is kept or logged.
    ///
    /// # Errors
    /// [`crate::Error::KeyObjectMismatch`] or [`crate::Error::Integrity`] if the material is
    /// missing, differs from its record or does not authenticate: a failure of the key.
    /// [`crate::Error::BackendUnavailable`], [`crate::Error::BackendLogin`] and
    /// [`crate::Error::Timeout`] if the device could not be asked: the key is unchecked.
    fn check_key(&self, key: KeyRef<'_>) -> Result<()>;

    /// Destroys every object with `locator` on the device, whether or not a record names it (for
    /// objects left behind by a crash between generation and recording).
    ///
    /// # Errors
    /// Device errors; [`crate::Error::InvalidInput`] for a backend without device objects.
    fn destroy_object(&self, locator: &str) -> Result<()>;

    /// Destroys the key in the backend. Destroying a key that is already gone succeeds.
    ///
    /// # Errors
    /// A backend error.
    fn destroy(&self, key: KeyRef<'_>) -> Result<()>;

    /// Wraps the key's material for transport, inside the backend, under `wrapping` (see
    /// [`Wrapping`] for the formats). The keystore has checked that the key is exportable and
    /// that its state allows the export; the material never leaves the backend in clear.
    ///
    /// # Errors
    /// [`crate::Error::Unsupported`] with the reason when the backend cannot wrap this key under
    /// that key; backend errors.
    fn wrap_key(&self, key: KeyRef<'_>, wrapping: Wrapping<'_>) -> Result<Vec<u8>>;

    /// Unwraps `wrapped` with the key `unwrapping` of this backend (an AES-256 key: RFC 5649;
    /// an RSA decrypt key: `CKM_RSA_AES_KEY_WRAP`) into this process, for
    /// [`Backend::import_key`] into whichever backend is to hold it.
    ///
    /// # Errors
    /// [`crate::Error::DecryptionFailed`] for anything that does not unwrap (a wrong key and
    /// changed data look the same); [`crate::Error::Unsupported`] for a backend that keeps what
    /// it unwraps.
    fn unwrap_key(&self, unwrapping: KeyRef<'_>, wrapped: &[u8]) -> Result<SecretBytes>;

    /// Makes a key in the backend from material that came from outside it (PKCS#8 DER for a
    /// private key, the raw 32 bytes for AES and HMAC keys), checked against `context.spec`
    /// and tested once before it is returned. The key is recorded as imported, never as
    /// always sensitive.
    ///
    /// # Errors
    /// [`crate::Error::InvalidInput`] for material that is not a key of the spec's type;
    /// [`crate::Error::Unsupported`] with the reason when the backend cannot hold it. Nothing
    /// is left in the backend on failure.
    fn import_key(
        &self,
        context: KeyContext<'_>,
        material: &SecretBytes,
        options: &KeyOptions,
    ) -> Result<GeneratedKey>;
}

/// What [`Backend::wrap_key`] wraps a key under.
#[derive(Debug, Clone, Copy)]
pub enum Wrapping<'a> {
    /// An AES-256 key of the same backend (the key-encryption key): RFC 5649 AES key wrap with
    /// padding (`CKM_AES_KEY_WRAP_PAD`).
    Kek(KeyRef<'a>),
    /// An RSA public key (SPKI DER) of whoever receives the key: `CKM_RSA_AES_KEY_WRAP` with
    /// RSA-OAEP-SHA256 and an ephemeral AES-256 key.
    RsaPublic(&'a [u8]),
    /// The AES-256 key labelled so (`CKA_LABEL`) on the key's own token, which the token's
    /// security officer marked trusted (`CKA_TRUSTED`): RFC 5649 inside the token
    /// (`C_WrapKey`, `CKM_AES_KEY_WRAP_PAD`). Only token keys are wrapped so: an exportable
    /// token key is wrappable under trusted keys only (`CKA_WRAP_WITH_TRUSTED`).
    Trusted(&'a str),
}
