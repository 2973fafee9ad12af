//! The one error type of keyhold.
//!
//! Every variant names something the caller can act on. Messages are lowercase, never contain key
//! material, passphrases or plaintext, and say what to do next where there is something to do.

use std::path::PathBuf;

/// A boxed foreign error kept as a source, never part of the public API.
type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result type of keyhold.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in keyhold.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A key ID was modified, malformed, or issued by another store. Never used for a genuine ID.
    #[error("key ID failed authentication: {reason}")]
    KeyIdAuthentication {
        /// Why the ID was refused.
        reason: &'static str,
    },

    /// A genuine key ID whose key no longer exists in this store.
    #[error("no such key: `{namespace}/{name}` is not in this store (it was destroyed)")]
    NoSuchKey {
        /// The key's namespace.
        namespace: String,
        /// The key's name.
        name: String,
    },

    /// The store's root secret could not be unsealed.
    #[error("cannot unseal the store: {reason}")]
    Unseal {
        /// Why, and what to do.
        reason: String,
    },

    /// A stored record failed its MAC or could not be decoded: the store was changed outside keyhold.
    #[error("integrity check failed: {what}: the store was modified outside keyhold; restore it from a backup")]
    Integrity {
        /// What failed the check.
        what: String,
    },

    /// The store's rows are not the ones keyhold committed (a row deleted, put back from an older
    /// copy, duplicated or added), or the whole store is older than its anchor (the TPM's counter
    /// or the anchor file): it was restored from a copy. Every row may still pass its own MAC.
    #[error(
        "the store was tampered with: {what}; keyhold changed nothing: restore it from a backup"
    )]
    StoreTampered {
        /// What was found, naming the keys where the store can tell.
        what: String,
    },

    /// A key's object on a device is not the one keyhold made: it was replaced or altered by
    /// someone holding the device's PIN (e.g. a same-`CKA_ID` key that is extractable or not
    /// sensitive). keyhold never uses such an object.
    #[error(
        "backend `{backend}`: the device object of key `{key}` does not match its record \
         ({reason}): it was replaced or altered outside keyhold and will not be used"
    )]
    KeyObjectMismatch {
        /// The backend's name.
        backend: String,
        /// `namespace/name` of the key.
        key: String,
        /// What differs.
        reason: String,
    },

    /// There is no store at the given path.
    #[error("no keyhold store at {}: run `keyhold init` first, or pass --store", path.display())]
    StoreNotFound {
        /// The path that was looked at.
        path: PathBuf,
    },

    /// `init` was asked to create a store where one already exists.
    #[error("a keyhold store already exists at {}: refusing to overwrite it", path.display())]
    StoreExists {
        /// The existing store.
        path: PathBuf,
    },

    /// The store exists but cannot be read as a keyhold store.
    #[error("the store at {} is unusable: {reason}", path.display())]
    StoreUnusable {
        /// The store's path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
        /// The underlying error, if any.
        #[source]
        source: Option<Source>,
    },

    /// A key with this name already exists in the namespace.
    #[error("a key named `{namespace}/{name}` already exists: choose another name")]
    KeyExists {
        /// The namespace.
        namespace: String,
        /// The name.
        name: String,
    },

    /// The operation is not allowed by the key's purpose.
    #[error("key `{key}` has purpose {purpose}: it cannot {operation}")]
    WrongPurpose {
        /// `namespace/name` of the key.
        key: String,
        /// The key's purpose.
        purpose: &'static str,
        /// What was asked.
        operation: &'static str,
    },

    /// The key's lifecycle state (NIST SP 800-57 Part 1 §7) does not allow the operation: a
    /// suspended, deactivated or compromised key only decrypts and verifies, a pre-activation key
    /// does nothing yet, a destroyed key nothing ever again.
    #[error("key `{key}` is {state}: it cannot {operation}{hint}")]
    WrongState {
        /// `namespace/name` of the key.
        key: String,
        /// The state, with its date where it has one (`destroyed on 2026-12-01T10:00:00Z`).
        state: String,
        /// What was asked.
        operation: &'static str,
        /// What the state allows and how to leave it, starting with `; ` (or empty).
        hint: String,
    },

    /// A backend cannot do what was asked.
    #[error("backend `{backend}` does not support {what}")]
    Unsupported {
        /// The backend's name.
        backend: String,
        /// What it lacks.
        what: String,
    },

    /// A backend or sealer this build of keyhold leaves out (cargo features `pkcs11`, `tpm`): the
    /// configuration or store names it, and keyhold must be rebuilt to use it.
    #[error(
        "keyhold was built without the `{feature}` feature: rebuild it with `cargo build \
         --features {feature}`"
    )]
    NotBuilt {
        /// The cargo feature that is missing.
        feature: &'static str,
    },

    /// The backend's device is gone (token removed, TPM unreachable). Retry once it is back:
    /// keyhold reconnects by itself.
    #[error("backend `{backend}` is unavailable: {reason}")]
    BackendUnavailable {
        /// The backend's name.
        backend: String,
        /// What happened, and what to check.
        reason: String,
    },

    /// A backend stayed busy longer than its configured wait (a TPM serves one command at a time).
    /// Nothing was done; try again, or raise the backend's `timeout_secs`.
    #[error(
        "backend `{backend}` is busy: waited {waited:?} for {what}; nothing was done: try again, \
         or raise `timeout_secs` in its configuration"
    )]
    Timeout {
        /// The backend's name.
        backend: String,
        /// How long the caller waited.
        waited: std::time::Duration,
        /// What it waited for.
        what: String,
    },

    /// Logging in to a backend failed. keyhold never retries a login by itself: tokens lock PINs.
    #[error("cannot log in to backend `{backend}`: {reason}")]
    BackendLogin {
        /// The backend's name.
        backend: String,
        /// Why, and what to do.
        reason: String,
    },

    /// A backend's device returned an error keyhold does not handle itself.
    #[error("backend `{backend}`: {operation} failed")]
    Backend {
        /// The backend's name.
        backend: String,
        /// What keyhold asked of it.
        operation: String,
        /// The device library's error.
        #[source]
        source: Source,
    },

    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(String),

    /// No backend of that name is configured.
    #[error("no backend named `{name}`: configured backends: {available}")]
    NoSuchBackend {
        /// The requested name.
        name: String,
        /// The configured names, comma separated.
        available: String,
    },

    /// The caller's input was refused before any key was touched.
    #[error("{0}")]
    InvalidInput(String),

    /// A signature or MAC tag did not verify. Deliberately undetailed.
    #[error("{what} invalid")]
    VerificationFailed {
        /// `signature` or `tag`.
        what: &'static str,
    },

    /// Decryption failed. Deliberately undetailed beyond format problems: no padding or tag oracle.
    #[error("decryption failed: {reason}")]
    DecryptionFailed {
        /// A fixed description.
        reason: &'static str,
    },

    /// The cryptographic library failed where it should not have.
    #[error("cryptographic operation failed: {operation}")]
    Crypto {
        /// The operation.
        operation: &'static str,
    },

    /// A generated key failed its pairwise consistency test; it was discarded.
    #[error("the generated {key_type} key failed its pairwise consistency test and was discarded")]
    ConsistencyTest {
        /// The key type.
        key_type: &'static str,
    },

    /// The key-storage database failed.
    #[error("key storage: {context}")]
    Storage {
        /// What keyhold was doing.
        context: &'static str,
        /// The database error.
        #[source]
        source: Source,
    },

    /// A file or device could not be used.
    #[error("{context}")]
    Io {
        /// What keyhold was doing, with the path.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// `keyhold serve` refused or failed a request: its error as the service said it.
    #[error("{message}")]
    Remote {
        /// The error's kind as the service named it ([`Error::kind`] of the error it had, one of
        /// [`Error::KINDS`]; `remote` for one this build does not know).
        kind: &'static str,
        /// The HTTP status.
        status: u16,
        /// The service's message.
        message: String,
    },
}

impl Error {
    /// Every [`Error::kind`] there is.
    pub const KINDS: [&'static str; 27] = [
        "key_id_authentication",
        "no_such_key",
        "unseal",
        "integrity",
        "store_tampered",
        "key_object_mismatch",
        "store_not_found",
        "store_exists",
        "store_unusable",
        "key_exists",
        "wrong_purpose",
        "wrong_state",
        "unsupported",
        "not_built",
        "backend_unavailable",
        "timeout",
        "backend_login",
        "backend",
        "config",
        "no_such_backend",
        "invalid_input",
        "verification_failed",
        "decryption_failed",
        "crypto",
        "storage",
        "io",
        "remote",
    ];

    /// The error the service answered: `code` is its kind (a kind this build does not know
    /// becomes `remote`).
    pub fn remote(code: &str, status: u16, message: String) -> Self {
        let kind = Self::KINDS
            .iter()
            .find(|k| **k == code)
            .copied()
            .unwrap_or("remote");
        Self::Remote {
            kind,
            status,
            message,
        }
    }

    /// Wraps an I/O error with what was being done.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// Wraps a database error with what was being done.
    pub(crate) fn storage(
        context: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Storage {
            context,
            source: Box::new(source),
        }
    }

    /// A failure of the cryptographic library.
    pub(crate) fn crypto(operation: &'static str) -> Self {
        Self::Crypto { operation }
    }

    /// A stable machine-readable name of the variant (`no_such_key`, `integrity`, …): the `kind`
    /// of the command line's JSON errors (docs/cli.md) and the outcome the audit log records. It
    /// names what failed, never with what: no message, ID or input.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::KeyIdAuthentication { .. } => "key_id_authentication",
            Self::NoSuchKey { .. } => "no_such_key",
            Self::Unseal { .. } => "unseal",
            Self::Integrity { .. } => "integrity",
            Self::StoreTampered { .. } => "store_tampered",
            Self::KeyObjectMismatch { .. } => "key_object_mismatch",
            Self::StoreNotFound { .. } => "store_not_found",
            Self::StoreExists { .. } => "store_exists",
            Self::StoreUnusable { .. } => "store_unusable",
            Self::KeyExists { .. } => "key_exists",
            Self::WrongPurpose { .. } => "wrong_purpose",
            Self::WrongState { .. } => "wrong_state",
            Self::Unsupported { .. } => "unsupported",
            Self::NotBuilt { .. } => "not_built",
            Self::BackendUnavailable { .. } => "backend_unavailable",
            Self::Timeout { .. } => "timeout",
            Self::BackendLogin { .. } => "backend_login",
            Self::Backend { .. } => "backend",
            Self::Config(_) => "config",
            Self::NoSuchBackend { .. } => "no_such_backend",
            Self::InvalidInput(_) => "invalid_input",
            Self::VerificationFailed { .. } => "verification_failed",
            Self::DecryptionFailed { .. } => "decryption_failed",
            Self::Crypto { .. } | Self::ConsistencyTest { .. } => "crypto",
            Self::Storage { .. } => "storage",
            Self::Io { .. } => "io",
            Self::Remote { kind, .. } => kind,
        }
    }

    /// [`Error::NotBuilt`] for the cargo feature `feature`.
    pub fn not_built(feature: &'static str) -> Self {
        Self::NotBuilt { feature }
    }
}
