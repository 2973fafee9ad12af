//! Sealers protect the store's root secret at rest.
//!
//! The root secret is 32 random bytes made once at `init`. Everything else is derived from it (key-ID
//! MAC key, record MAC key, software KEK), so the sealer is the one thing standing between a copy of
//! the store and its keys. Sealers: `passphrase` (Argon2id), `pkcs11` (a non-extractable AES key
//! in a token) and `tpm` (a TPM sealed-data object, optionally bound to PCRs).

pub mod passphrase;
#[cfg(feature = "pkcs11")]
pub mod pkcs11;
pub mod shares;
#[cfg(feature = "tpm")]
pub mod tpm;

use std::fmt;

use crate::error::{Error, Result};
use crate::secret::SecretBytes;

pub use passphrase::{Argon2Params, PassphraseSealer};
#[cfg(feature = "pkcs11")]
pub use pkcs11::Pkcs11Sealer;
#[cfg(feature = "tpm")]
pub use tpm::TpmSealer;

/// The store's root secret: 32 random bytes, in a locked, zeroizing buffer.
#[derive(Debug)]
pub struct RootSecret(SecretBytes);

impl RootSecret {
    /// The length of a root secret in bytes.
    pub const LEN: usize = 32;

    /// A fresh root secret from the system's CSPRNG (through aws-lc).
    ///
    /// # Errors
    /// [`Error::Crypto`] if the RNG fails.
    pub fn generate() -> Result<Self> {
        let mut bytes = SecretBytes::zeroed(Self::LEN);
        aws_lc_rs::rand::fill(bytes.expose_mut())
            .map_err(|_| Error::crypto("generate the root secret"))?;
        Ok(Self(bytes))
    }

    /// Wraps unsealed bytes, checking their length.
    ///
    /// # Errors
    /// [`Error::Integrity`] if `bytes` is not 32 bytes long.
    pub fn from_bytes(bytes: SecretBytes) -> Result<Self> {
        if bytes.len() != Self::LEN {
            return Err(Error::Integrity {
                what: "the unsealed root secret has the wrong length".into(),
            });
        }
        Ok(Self(bytes))
    }

    /// The secret bytes. Used only to derive the store's keys.
    pub(crate) fn expose(&self) -> &[u8] {
        self.0.expose()
    }
}

/// The sealed root secret as the store keeps it.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedRoot {
    /// Which sealer made it (`passphrase`, `tpm`, `pkcs11`).
    pub sealer: String,
    /// The sealer's public parameters (KDF settings, salt, key handles), authenticated by the seal.
    pub params: Vec<u8>,
    /// The sealed secret.
    pub blob: Vec<u8>,
}

impl fmt::Debug for SealedRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedRoot")
            .field("sealer", &self.sealer)
            .field("params", &String::from_utf8_lossy(&self.params))
            .field("blob_len", &self.blob.len())
            .finish()
    }
}

/// Something that can seal and unseal a store's root secret.
pub trait Sealer: Send + Sync + fmt::Debug {
    /// The sealer's kind, as recorded in the store (`passphrase`, …).
    fn kind(&self) -> &'static str;

    /// Seals `root` for the store `store_id`.
    ///
    /// # Errors
    /// A sealer-specific error; nothing is written.
    fn seal(&self, root: &RootSecret, store_id: &[u8; 16]) -> Result<SealedRoot>;

    /// Unseals the root secret of the store `store_id`.
    ///
    /// # Errors
    /// [`Error::Unseal`] when the secret cannot be recovered (wrong passphrase, changed blob).
    fn unseal(&self, sealed: &SealedRoot, store_id: &[u8; 16]) -> Result<RootSecret>;

    /// The TPM this sealer uses, and its name for messages: a TPM-sealed store anchors its
    /// generation in that TPM's NV counter.
    #[cfg(feature = "tpm")]
    fn tpm(&self) -> Option<SealerTpm> {
        None
    }

    /// The token this sealer uses: a token-sealed store without a TPM anchors its generation in
    /// a counter object there.
    #[cfg(feature = "pkcs11")]
    fn pkcs11(&self) -> Option<std::sync::Arc<crate::backend::pkcs11::Pkcs11Backend>> {
        None
    }
}

/// What [`Sealer::tpm`] gives: the TPM, and the name of its configured backend for messages.
#[cfg(feature = "tpm")]
pub type SealerTpm = (
    std::sync::Arc<crate::backend::tpm::device::TpmDevice>,
    String,
);

/// A borrowed sealer seals as the sealer does: `Keystore::reseal` takes the new sealer by value,
/// and a caller holding a `Box<dyn Sealer>` (chosen at run time) passes `&*boxed`.
impl<T: Sealer + ?Sized> Sealer for &T {
    fn kind(&self) -> &'static str {
        (**self).kind()
    }

    fn seal(&self, root: &RootSecret, store_id: &[u8; 16]) -> Result<SealedRoot> {
        (**self).seal(root, store_id)
    }

    fn unseal(&self, sealed: &SealedRoot, store_id: &[u8; 16]) -> Result<RootSecret> {
        (**self).unseal(sealed, store_id)
    }

    #[cfg(feature = "tpm")]
    fn tpm(&self) -> Option<SealerTpm> {
        (**self).tpm()
    }

    #[cfg(feature = "pkcs11")]
    fn pkcs11(&self) -> Option<std::sync::Arc<crate::backend::pkcs11::Pkcs11Backend>> {
        (**self).pkcs11()
    }
}
