//! The `pkcs11` sealer: the root secret is encrypted with AES-256-GCM inside a token, under a
//! non-extractable AES key that never leaves it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::backend::pkcs11::Pkcs11Backend;
use crate::backend::{Backend, KeyContext, KeyOptions, KeyRef, Sealed};
use crate::error::{Error, Result};
use crate::key::{KeySpec, KeyType};
use crate::sealer::{RootSecret, SealedRoot, Sealer};

const KIND: &str = "pkcs11";
const AAD_DOMAIN: &[u8] = b"keyhold root secret v1\0";
const NONCE_LEN: usize = 12;

/// Which token key seals the root secret (public; authenticated by the seal).
#[derive(Debug, Serialize, Deserialize)]
struct StoredParams {
    /// The backend name in the configuration.
    backend: String,
    /// The AES key's locator (its `CKA_ID`, hex).
    locator: String,
    /// The identifier the key was generated under.
    uuid: String,
}

/// Seals the root secret with a non-extractable AES-256 key in a PKCS#11 token.
#[derive(Debug)]
pub struct Pkcs11Sealer {
    backend: Arc<Pkcs11Backend>,
}

impl Pkcs11Sealer {
    /// A sealer using `backend`'s token.
    pub fn new(backend: Arc<Pkcs11Backend>) -> Self {
        Self { backend }
    }

    /// The backend name a `pkcs11`-sealed root secret needs, read from the store's parameters.
    ///
    /// # Errors
    /// [`Error::Unseal`] if the parameters are damaged.
    pub fn backend_of(sealed: &SealedRoot) -> Result<String> {
        Ok(parse_params(sealed)?.backend)
    }

    /// The token key's locator, so that `doctor` does not report it as an orphan.
    ///
    /// # Errors
    /// [`Error::Unseal`] if the parameters are damaged.
    pub fn locator_of(sealed: &SealedRoot) -> Result<String> {
        Ok(parse_params(sealed)?.locator)
    }
}

fn parse_params(sealed: &SealedRoot) -> Result<StoredParams> {
    serde_json::from_slice(&sealed.params).map_err(|_| Error::Unseal {
        reason: "the store's pkcs11 seal parameters are damaged".into(),
    })
}

fn aad(store_id: &[u8; 16], params: &[u8]) -> Vec<u8> {
    let mut aad = AAD_DOMAIN.to_vec();
    aad.extend_from_slice(store_id);
    aad.extend_from_slice(KIND.as_bytes());
    aad.push(0);
    aad.extend_from_slice(params);
    aad
}

fn spec() -> Result<KeySpec> {
    KeySpec::new(KeyType::Aes256Gcm, None, None)
}

impl Sealer for Pkcs11Sealer {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn pkcs11(&self) -> Option<Arc<Pkcs11Backend>> {
        Some(Arc::clone(&self.backend))
    }

    fn seal(&self, root: &RootSecret, store_id: &[u8; 16]) -> Result<SealedRoot> {
        let spec = spec()?;
        let mut uuid = [0u8; 16];
        aws_lc_rs::rand::fill(&mut uuid).map_err(|_| Error::crypto("make a key uuid"))?;
        let label = format!("keyhold-root-secret/{}", crate::hex::encode(store_id));
        let context = KeyContext {
            store_id,
            uuid: &uuid,
            label: &label,
            spec: &spec,
        };
        let made = self.backend.generate(context, &KeyOptions::default())?;
        let params = serde_json::to_vec(&StoredParams {
            backend: self.backend.name().to_owned(),
            locator: made.locator.clone(),
            uuid: crate::hex::encode(&uuid),
        })
        .map_err(|_| Error::crypto("encode parameters"))?;
        let key = KeyRef {
            context,
            locator: &made.locator,
            blob: made.blob.as_deref(),
        };
        let sealed = self
            .backend
            .encrypt(key, root.expose(), &aad(store_id, &params))?;
        let mut blob = sealed.nonce;
        blob.extend_from_slice(&sealed.ciphertext);
        Ok(SealedRoot {
            sealer: KIND.into(),
            params,
            blob,
        })
    }

    fn unseal(&self, sealed: &SealedRoot, store_id: &[u8; 16]) -> Result<RootSecret> {
        let params = parse_params(sealed)?;
        if params.backend != self.backend.name() {
            return Err(Error::Unseal {
                reason: format!(
                    "the store is sealed by backend `{}`, not `{}`",
                    params.backend,
                    self.backend.name()
                ),
            });
        }
        let uuid: [u8; 16] = crate::hex::decode(&params.uuid)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| Error::Unseal {
                reason: "the store's pkcs11 seal parameters are damaged".into(),
            })?;
        if sealed.blob.len() <= NONCE_LEN {
            return Err(Error::Unseal {
                reason: "the store's sealed root secret is damaged (length)".into(),
            });
        }
        let spec = spec()?;
        let label = format!("keyhold-root-secret/{}", crate::hex::encode(store_id));
        let key = KeyRef {
            context: KeyContext {
                store_id,
                uuid: &uuid,
                label: &label,
                spec: &spec,
            },
            locator: &params.locator,
            blob: None,
        };
        let (nonce, ciphertext) = sealed.blob.split_at(NONCE_LEN);
        let opened = self
            .backend
            .decrypt(
                key,
                &Sealed {
                    nonce: nonce.to_vec(),
                    ciphertext: ciphertext.to_vec(),
                },
                &aad(store_id, &sealed.params),
            )
            .map_err(|e| match e {
                Error::DecryptionFailed { .. } => Error::Unseal {
                    reason: "the token's key does not open the sealed root secret \
                             (another token, or the store was modified)"
                        .into(),
                },
                other => other,
            })?;
        RootSecret::from_bytes(opened)
    }
}
