//! The bytes a TPM key leaves in its record: the TPM-wrapped key and its sealed authValue.
//!
//! ```text
//! version (2) | u16 len | SRK Name | u16 len | TPMT_PUBLIC | u16 len | TPM2B_PRIVATE contents
//!             | nonce (12) | sealed auth (48)
//! ```
//!
//! The SRK Name says which storage key the key was made under, so a key used on a cleared or
//! another TPM gets a clear error before the TPM is asked to load it. The public and private parts
//! are what TPM2_Create returned: the private part is already
//! encrypted and integrity-protected by the TPM under the SRK. The key's authValue is not: anyone
//! with the record and this TPM could use the key with it. It is therefore sealed with AES-256-GCM
//! under a key derived from the store's root secret, with AAD binding the store, the key's record,
//! its algorithm and the TPM parts, so a record moved, edited or spliced with another key's parts
//! does not decrypt.

use aws_lc_rs::aead::{Aad, Nonce, RandomizedNonceKey, NONCE_LEN};
use aws_lc_rs::digest;

use crate::backend::KeyContext;
use crate::error::{Error, Result};
use crate::secret::SecretBytes;

const VERSION: u8 = 2;
const AUTH_LEN: usize = 32;
const TAG_LEN: usize = 16;
/// The sealed authValue at the end of every blob.
pub(super) const SEALED_AUTH_LEN: usize = NONCE_LEN + AUTH_LEN + TAG_LEN;
const AAD_DOMAIN: &[u8] = b"keyhold tpm key auth v1\0";

/// A key blob taken apart; the authValue is still sealed.
#[derive(Debug)]
pub(super) struct KeyBlob<'a> {
    pub srk_name: &'a [u8],
    pub public: &'a [u8],
    pub private: &'a [u8],
    sealed_auth: &'a [u8],
}

fn damaged(why: &str) -> Error {
    Error::Integrity {
        what: format!("TPM key record: {why}"),
    }
}

fn aad(context: &KeyContext<'_>, srk_name: &[u8], public: &[u8], private: &[u8]) -> Vec<u8> {
    let algorithm = context.spec.algorithm().as_str().as_bytes();
    let mut parts = digest::Context::new(&digest::SHA256);
    for part in [srk_name, public, private] {
        parts.update(&(part.len() as u64).to_be_bytes());
        parts.update(part);
    }
    let parts = parts.finish();
    let mut aad = Vec::with_capacity(AAD_DOMAIN.len() + 33 + algorithm.len() + 32);
    aad.extend_from_slice(AAD_DOMAIN);
    aad.extend_from_slice(context.store_id);
    aad.extend_from_slice(context.uuid);
    // Algorithm names are short constants; the length byte keeps the encoding unambiguous.
    aad.push(algorithm.len() as u8);
    aad.extend_from_slice(algorithm);
    aad.extend_from_slice(parts.as_ref());
    aad
}

fn push_part(blob: &mut Vec<u8>, part: &[u8]) -> Result<()> {
    let len = u16::try_from(part.len()).map_err(|_| Error::crypto("encode a TPM key blob"))?;
    blob.extend_from_slice(&len.to_be_bytes());
    blob.extend_from_slice(part);
    Ok(())
}

/// Encodes a new key's blob, sealing `auth` under `kek`.
pub(super) fn seal(
    kek: &RandomizedNonceKey,
    context: &KeyContext<'_>,
    srk_name: &[u8],
    public: &[u8],
    private: &[u8],
    auth: &SecretBytes,
) -> Result<Vec<u8>> {
    if auth.len() != AUTH_LEN {
        return Err(Error::crypto("seal a TPM key's authValue"));
    }
    // Room for the tag up front: the buffer must not reallocate and leave a copy of the auth.
    let mut sealed = SecretBytes::zeroed(AUTH_LEN + TAG_LEN);
    sealed.expose_mut()[..AUTH_LEN].copy_from_slice(auth.expose());
    let (body, tag) = sealed.expose_mut().split_at_mut(AUTH_LEN);
    let nonce = kek
        .seal_in_place_separate_tag(Aad::from(aad(context, srk_name, public, private)), body)
        .map(|(nonce, t)| {
            tag.copy_from_slice(t.as_ref());
            nonce
        })
        .map_err(|_| Error::crypto("seal a TPM key's authValue"))?;
    let mut blob =
        Vec::with_capacity(1 + 6 + srk_name.len() + public.len() + private.len() + SEALED_AUTH_LEN);
    blob.push(VERSION);
    push_part(&mut blob, srk_name)?;
    push_part(&mut blob, public)?;
    push_part(&mut blob, private)?;
    blob.extend_from_slice(nonce.as_ref());
    blob.extend_from_slice(sealed.expose());
    Ok(blob)
}

/// Takes a blob apart without decrypting anything.
pub(super) fn parse(blob: &[u8]) -> Result<KeyBlob<'_>> {
    let (&version, rest) = blob
        .split_first()
        .ok_or_else(|| damaged("empty key blob"))?;
    if version != VERSION {
        return Err(damaged(&format!(
            "unknown TPM key blob version {version} (this keyhold reads version {VERSION})"
        )));
    }
    fn take(rest: &[u8]) -> Option<(&[u8], &[u8])> {
        let len = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
        let part = rest.get(2..2 + len)?;
        Some((part, &rest[2 + len..]))
    }
    let truncated = || damaged("the key blob is truncated");
    let (srk_name, rest) = take(rest).ok_or_else(truncated)?;
    let (public, rest) = take(rest).ok_or_else(truncated)?;
    let (private, rest) = take(rest).ok_or_else(truncated)?;
    if rest.len() != SEALED_AUTH_LEN {
        return Err(truncated());
    }
    Ok(KeyBlob {
        srk_name,
        public,
        private,
        sealed_auth: rest,
    })
}

impl KeyBlob<'_> {
    /// Decrypts the key's authValue into a locked buffer.
    pub(super) fn auth(
        &self,
        kek: &RandomizedNonceKey,
        context: &KeyContext<'_>,
    ) -> Result<SecretBytes> {
        let refused =
            || damaged("the key's authorisation value does not decrypt under this store's key");
        let (nonce, sealed) = self.sealed_auth.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| refused())?;
        let mut buf = SecretBytes::copy_from(sealed);
        let len = kek
            .open_in_place(
                nonce,
                Aad::from(aad(context, self.srk_name, self.public, self.private)),
                buf.expose_mut(),
            )
            .map_err(|_| refused())?
            .len();
        Ok(SecretBytes::copy_from(&buf.expose()[..len]))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::key::{KeySpec, KeyType};
    use aws_lc_rs::aead::AES_256_GCM;

    fn kek() -> RandomizedNonceKey {
        RandomizedNonceKey::new(&AES_256_GCM, &[7u8; 32]).unwrap()
    }

    #[test]
    fn round_trip_and_tamper() {
        let spec = KeySpec::new(KeyType::EcdsaP256, None, None).unwrap();
        let (store, uuid, other) = ([1u8; 16], [2u8; 16], [3u8; 16]);
        let ctx = KeyContext {
            store_id: &store,
            uuid: &uuid,
            label: "a/b",
            spec: &spec,
        };
        let auth = SecretBytes::copy_from(&[0xa5; 32]);
        let kek = kek();
        let blob = seal(&kek, &ctx, b"srk", b"public part", b"private part", &auth).unwrap();
        assert!(
            !blob.windows(32).any(|w| w == auth.expose()),
            "auth in clear"
        );
        let parsed = parse(&blob).unwrap();
        assert_eq!(parsed.srk_name, b"srk");
        assert_eq!(parsed.public, b"public part");
        assert_eq!(parsed.private, b"private part");
        assert_eq!(parsed.auth(&kek, &ctx).unwrap().expose(), auth.expose());

        let moved = KeyContext {
            uuid: &other,
            ..ctx
        };
        let refused = |e: Error| {
            matches!(&e, Error::Integrity { what }
                if what.contains("does not decrypt under this store's key"))
        };
        let err = parse(&blob).unwrap().auth(&kek, &moved).unwrap_err();
        assert!(refused(err));
        // Byte 1 is the SRK Name's length: the blob no longer parses. The others are in the SRK
        // Name and the sealed authValue: it parses, and the authValue does not decrypt.
        let err = parse(&{
            let mut bent = blob.clone();
            bent[1] ^= 1;
            bent
        })
        .unwrap_err();
        assert!(
            matches!(&err, Error::Integrity { what } if what.contains("truncated")),
            "{err:?}"
        );
        for at in [5, blob.len() - 30, blob.len() - 1] {
            let mut bent = blob.clone();
            bent[at] ^= 1;
            let err = parse(&bent).unwrap().auth(&kek, &ctx).unwrap_err();
            assert!(refused(err), "byte {at}");
        }
        let err = parse(&blob[..blob.len() - 1]).unwrap_err();
        assert!(
            matches!(&err, Error::Integrity { what } if what.contains("truncated")),
            "{err:?}"
        );
        let err = parse(&[2]).unwrap_err();
        assert!(
            matches!(&err, Error::Integrity { what } if what.contains("truncated")),
            "{err:?}"
        );
        let err = parse(&[1, 0, 0]).unwrap_err();
        assert!(
            matches!(&err, Error::Integrity { what } if what.contains("unknown TPM key blob version 1")),
            "{err:?}"
        );
        let err = parse(&[]).unwrap_err();
        assert!(
            matches!(&err, Error::Integrity { what } if what.contains("empty key blob")),
            "{err:?}"
        );
    }
}
