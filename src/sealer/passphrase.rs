//! The `passphrase` sealer: Argon2id derives a key that seals the root secret with AES-256-GCM.

use aws_lc_rs::aead::{Aad, Nonce, RandomizedNonceKey, AES_256_GCM, NONCE_LEN};
use base64::Engine as _;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sealer::{RootSecret, SealedRoot, Sealer};
use crate::secret::SecretBytes;

const KIND: &str = "passphrase";
const AAD_DOMAIN: &[u8] = b"keyhold root secret v1\0";
const SALT_LEN: usize = 16;
/// Bounds on parameters read back from a store, so a doctored store cannot make `open` allocate
/// without limit or spin for hours.
const MAX_MEMORY_MIB: u32 = 4096;
const MAX_ITERATIONS: u32 = 64;
const MAX_PARALLELISM: u32 = 64;

/// Argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Params {
    /// Memory in MiB (at least 8).
    pub memory_mib: u32,
    /// Passes over memory (at least 1).
    pub iterations: u32,
    /// Lanes (at least 1).
    pub parallelism: u32,
}

impl Default for Argon2Params {
    /// RFC 9106, section 4, second recommended option: 64 MiB, 3 passes, 4 lanes.
    fn default() -> Self {
        Self {
            memory_mib: 64,
            iterations: 3,
            parallelism: 4,
        }
    }
}

impl Argon2Params {
    /// Checks the parameters against keyhold's floor and ceiling.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the parameter out of range.
    pub fn validate(&self) -> Result<()> {
        let check = |name: &str, value: u32, min: u32, max: u32| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(Error::InvalidInput(format!(
                    "argon2 {name} must be between {min} and {max}, not {value}"
                )))
            }
        };
        check("memory (MiB)", self.memory_mib, 8, MAX_MEMORY_MIB)?;
        check("iterations", self.iterations, 1, MAX_ITERATIONS)?;
        check("parallelism", self.parallelism, 1, MAX_PARALLELISM)
    }
}

/// What the store records about a passphrase seal (all public).
#[derive(Debug, Serialize, Deserialize)]
struct StoredParams {
    kdf: String,
    memory_kib: u32,
    iterations: u32,
    parallelism: u32,
    salt: String,
}

/// Seals the root secret under a passphrase.
pub struct PassphraseSealer {
    passphrase: SecretString,
    params: Argon2Params,
}

impl std::fmt::Debug for PassphraseSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PassphraseSealer")
            .field("passphrase", &"[REDACTED]")
            .field("params", &self.params)
            .finish()
    }
}

impl PassphraseSealer {
    /// A sealer for `passphrase` with the default Argon2id parameters (used when sealing; unsealing
    /// reads the parameters from the store).
    pub fn new(passphrase: SecretString) -> Self {
        Self {
            passphrase,
            params: Argon2Params::default(),
        }
    }

    /// Sets the Argon2id parameters used when sealing.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if they are out of range.
    pub fn with_params(mut self, params: Argon2Params) -> Result<Self> {
        params.validate()?;
        self.params = params;
        Ok(self)
    }

    fn derive(&self, stored: &StoredParams, salt: &[u8]) -> Result<RandomizedNonceKey> {
        let params = argon2::Params::new(
            stored.memory_kib,
            stored.iterations,
            stored.parallelism,
            Some(32),
        )
        .map_err(|e| Error::Unseal {
            reason: format!("the store's argon2 parameters are invalid: {e}"),
        })?;
        let kdf = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut kek = SecretBytes::zeroed(32);
        kdf.hash_password_into(
            self.passphrase.expose_secret().as_bytes(),
            salt,
            kek.expose_mut(),
        )
        .map_err(|_| Error::crypto("argon2id key derivation"))?;
        RandomizedNonceKey::new(&AES_256_GCM, kek.expose())
            .map_err(|_| Error::crypto("load the passphrase-derived key"))
    }
}

fn aad(store_id: &[u8; 16], params: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_DOMAIN.len() + 16 + KIND.len() + 1 + params.len());
    aad.extend_from_slice(AAD_DOMAIN);
    aad.extend_from_slice(store_id);
    aad.extend_from_slice(KIND.as_bytes());
    aad.push(0);
    aad.extend_from_slice(params);
    aad
}

impl Sealer for PassphraseSealer {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn seal(&self, root: &RootSecret, store_id: &[u8; 16]) -> Result<SealedRoot> {
        if self.passphrase.expose_secret().is_empty() {
            return Err(Error::InvalidInput(
                "the passphrase is empty: choose a long one".into(),
            ));
        }
        let mut salt = [0u8; SALT_LEN];
        aws_lc_rs::rand::fill(&mut salt).map_err(|_| Error::crypto("generate a salt"))?;
        let stored = StoredParams {
            kdf: "argon2id-v19".into(),
            memory_kib: self.params.memory_mib * 1024,
            iterations: self.params.iterations,
            parallelism: self.params.parallelism,
            salt: base64::engine::general_purpose::STANDARD.encode(salt),
        };
        let params = serde_json::to_vec(&stored).map_err(|_| Error::crypto("encode parameters"))?;
        let key = self.derive(&stored, &salt)?;
        let mut buf = Vec::with_capacity(RootSecret::LEN + 16);
        buf.extend_from_slice(root.expose());
        let nonce = key
            .seal_in_place_append_tag(Aad::from(aad(store_id, &params)), &mut buf)
            .map_err(|_| Error::crypto("seal the root secret"))?;
        let mut blob = nonce.as_ref().to_vec();
        blob.extend_from_slice(&buf);
        Ok(SealedRoot {
            sealer: KIND.into(),
            params,
            blob,
        })
    }

    fn unseal(&self, sealed: &SealedRoot, store_id: &[u8; 16]) -> Result<RootSecret> {
        let damaged = |what: &str| Error::Unseal {
            reason: format!("the store's sealed root secret is damaged ({what})"),
        };
        if sealed.sealer != KIND {
            return Err(Error::Unseal {
                reason: format!(
                    "the store is sealed by `{}`, not by a passphrase",
                    sealed.sealer
                ),
            });
        }
        let stored: StoredParams =
            serde_json::from_slice(&sealed.params).map_err(|_| damaged("parameters"))?;
        if stored.kdf != "argon2id-v19" {
            return Err(damaged("unknown KDF"));
        }
        Argon2Params {
            memory_mib: stored.memory_kib / 1024,
            iterations: stored.iterations,
            parallelism: stored.parallelism,
        }
        .validate()
        .map_err(|_| damaged("argon2 parameters out of range"))?;
        let salt = base64::engine::general_purpose::STANDARD
            .decode(&stored.salt)
            .ok()
            .filter(|s| s.len() == SALT_LEN)
            .ok_or_else(|| damaged("salt"))?;
        if sealed.blob.len() != NONCE_LEN + RootSecret::LEN + 16 {
            return Err(damaged("length"));
        }
        let key = self.derive(&stored, &salt)?;
        let (nonce, ciphertext) = sealed.blob.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| damaged("nonce"))?;
        let mut buf = SecretBytes::copy_from(ciphertext);
        let opened = key
            .open_in_place(
                nonce,
                Aad::from(aad(store_id, &sealed.params)),
                buf.expose_mut(),
            )
            .map_err(|_| Error::Unseal {
                reason: "wrong passphrase (or the sealed root secret was modified)".into(),
            })?;
        RootSecret::from_bytes(SecretBytes::copy_from(opened))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Argon2Params = Argon2Params {
        memory_mib: 8,
        iterations: 1,
        parallelism: 1,
    };

    fn sealer(pass: &str) -> PassphraseSealer {
        PassphraseSealer::new(SecretString::from(pass.to_owned()))
            .with_params(FAST)
            .unwrap()
    }

    #[test]
    fn seals_and_unseals() {
        let root = RootSecret::generate().unwrap();
        let sealed = sealer("correct horse").seal(&root, &[1; 16]).unwrap();
        let back = sealer("correct horse").unseal(&sealed, &[1; 16]).unwrap();
        assert_eq!(back.expose(), root.expose());
        assert!(!format!("{sealed:?}").contains("correct"));
    }

    #[test]
    fn refuses_wrong_passphrase_store_or_params() {
        let root = RootSecret::generate().unwrap();
        let sealed = sealer("correct horse").seal(&root, &[1; 16]).unwrap();
        let err = sealer("wrong horse").unseal(&sealed, &[1; 16]).unwrap_err();
        assert!(err.to_string().contains("wrong passphrase"), "{err}");
        assert!(sealer("correct horse").unseal(&sealed, &[2; 16]).is_err());
        let mut doctored = sealed.clone();
        doctored.params = String::from_utf8(sealed.params.clone())
            .unwrap()
            .replace("\"iterations\":1", "\"iterations\":2")
            .into_bytes();
        assert_ne!(doctored.params, sealed.params);
        assert!(sealer("correct horse").unseal(&doctored, &[1; 16]).is_err());
    }

    #[test]
    fn refuses_empty_passphrase_and_bad_params() {
        let root = RootSecret::generate().unwrap();
        assert!(sealer("").seal(&root, &[1; 16]).is_err());
        let weak = Argon2Params {
            memory_mib: 1,
            ..FAST
        };
        assert!(PassphraseSealer::new(SecretString::from("x".to_owned()))
            .with_params(weak)
            .is_err());
    }
}
