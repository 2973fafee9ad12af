//! keyhold: a hardware-backed keystore.
//!
//! Applications use keys without holding them. A [`Keystore`] creates keys inside a [`Backend`]
//! (a PKCS#11 token through `backend::pkcs11`, a TPM 2.0 through `backend::tpm`, each behind the
//! cargo feature of that name, both default; or the encrypted [`backend::software`] backend) and
//! hands out authenticated key IDs: strings that name a key, hold no secret, and are refused if
//! changed in any way. Operations take a key ID and input and return output; key material never
//! leaves the backend.
//!
//! ```no_run
//! use keyhold::{KeyRequest, KeySpec, KeyType, Keystore, PassphraseSealer, SignatureFormat};
//! use secrecy::SecretString;
//!
//! # fn main() -> Result<(), keyhold::Error> {
//! let sealer = PassphraseSealer::new(SecretString::from("a long passphrase".to_owned()));
//! let ks = Keystore::create(std::path::Path::new("/tmp/store"), &sealer)?;
//! let key = ks.create_key(&KeyRequest {
//!     namespace: "default".into(),
//!     name: "web".into(),
//!     spec: KeySpec::new(KeyType::EcdsaP256, None, None)?,
//!     backend: None,
//! })?;
//! let sig = ks.sign(&key.id, b"hello", SignatureFormat::Der)?;
//! ks.verify(&key.id, b"hello", &sig, SignatureFormat::Der)?;
//! # Ok(())
//! # }
//! ```

pub mod audit;
pub mod backend;
pub mod config;
// DER encodings of what devices return (EC points, raw ECDSA signatures).
#[cfg(any(feature = "pkcs11", feature = "tpm"))]
mod der;
mod error;
pub mod hex;
mod key;
mod keystore;
mod public_key;
pub mod sealer;
pub mod secret;
#[cfg(feature = "serve")]
pub mod service;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod time;

pub use backend::{Backend, KeyOptions};
pub use error::{Error, Result};
pub use key::{
    validate_name, Algorithm, KeySpec, KeyState, KeyType, KeyUse, Purpose, RsaPadding,
    SignatureFormat,
};
pub use keystore::ExportTo;
pub use keystore::{
    random_bytes, BackendHealth, Backup, BackupInfo, ClientGrant, ClientToken, Doctor, Done,
    KeyEvent, KeyIdFields, KeyInfo, KeyRequest, KeyService, Keystore, Maintenance, MissingKey,
    Orphan, PolicyChange, PolicyText, Reanchored, Restored, RootSource, StoreAdmin, TokenClient,
    Transition, UncheckedKey, UseOptions, Used, VersionInfo, BACKUP_EXTENSION, DEFAULT_NAMESPACE,
    KEY_ID_PREFIX, MAX_ENVELOPE, MAX_INPUT, MAX_RANDOM, TOKEN_PREFIX,
};
/// `keyhold store verify`'s report, and its periodic run.
pub mod verify {
    pub use crate::keystore::{
        CheckKind, Finding, KeyName, PeriodicVerify, Section, Status, VerifyProgress, VerifyReport,
    };
}
pub use public_key::PublicKey;
#[cfg(feature = "pkcs11")]
pub use sealer::Pkcs11Sealer;
#[cfg(feature = "tpm")]
pub use sealer::TpmSealer;
pub use sealer::{Argon2Params, PassphraseSealer, Sealer};

/// The README's Rust example is compiled as a doctest, so it cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
