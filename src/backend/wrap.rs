//! Key transport formats, done with aws-lc-rs: AES key wrap with padding (RFC 5649, "KWP") and
//! `CKM_RSA_AES_KEY_WRAP` (PKCS#11 3.0 §2.1.21: RSA-OAEP with SHA-256, MGF1-SHA-256 and an empty
//! label over an ephemeral AES key, followed by the RFC 5649 wrap of the key under that AES key).
//!
//! What is wrapped is a key's material as the software backend keeps it: PKCS#8 DER
//! (`PrivateKeyInfo`) for private keys, the raw 32 bytes for AES and HMAC keys. Both formats are
//! what OpenSSL makes and takes (`openssl enc -id-aes256-wrap-pad -iv A65959A6`, `openssl pkeyutl
//! -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256`), and what a token's `C_WrapKey` and
//! `C_UnwrapKey` make and take with `CKM_AES_KEY_WRAP_PAD` and `CKM_RSA_AES_KEY_WRAP`.

use aws_lc_rs::key_wrap::{AesKek, KeyWrapPadded, AES_128, AES_256};
use aws_lc_rs::rsa::{
    OaepPrivateDecryptingKey, OaepPublicEncryptingKey, PrivateDecryptingKey, PublicEncryptingKey,
    OAEP_SHA256_MGF1SHA256,
};

use crate::error::{Error, Result};
use crate::secret::SecretBytes;

/// The one failure of every unwrap: a wrong key and changed data look the same (no oracle).
pub(crate) const UNWRAP_FAILED: Error = Error::DecryptionFailed {
    reason: "the wrapped key does not unwrap under this key: it was wrapped under another key, \
             or changed since",
};

/// The smallest RSA modulus keyhold wraps to, in bits.
const MIN_RSA_BITS: usize = 2048;

fn kek(key: &[u8]) -> Result<AesKek> {
    let cipher = match key.len() {
        16 => &AES_128,
        32 => &AES_256,
        _ => return Err(UNWRAP_FAILED),
    };
    AesKek::new(cipher, key).map_err(|_| Error::crypto("load an AES key-wrapping key"))
}

/// Wraps `material` under the AES key `kek` (RFC 5649).
///
/// # Errors
/// [`Error::Crypto`] if aws-lc fails.
pub(crate) fn kwp_wrap(kek_bytes: &[u8], material: &[u8]) -> Result<Vec<u8>> {
    // RFC 5649 output: the input padded to 8 bytes, plus the 8-byte integrity block.
    let mut out = vec![0u8; material.len() + 16];
    let len = kek(kek_bytes)?
        .wrap_with_padding(material, &mut out)
        .map_err(|_| Error::crypto("AES key wrap with padding"))?
        .len();
    out.truncate(len);
    Ok(out)
}

/// Unwraps RFC 5649 `wrapped` under the AES key `kek`.
///
/// # Errors
/// [`UNWRAP_FAILED`] for anything that does not authenticate.
pub(crate) fn kwp_unwrap(kek_bytes: &[u8], wrapped: &[u8]) -> Result<SecretBytes> {
    if wrapped.len() < 16 || wrapped.len() % 8 != 0 {
        return Err(UNWRAP_FAILED);
    }
    let mut out = SecretBytes::zeroed(wrapped.len());
    let len = kek(kek_bytes)?
        .unwrap_with_padding(wrapped, out.expose_mut())
        .map_err(|_| UNWRAP_FAILED)?
        .len();
    Ok(SecretBytes::copy_from(&out.expose()[..len]))
}

/// Wraps `material` to the RSA public key `spki_der` as `CKM_RSA_AES_KEY_WRAP` does: a fresh
/// AES-256 key, RSA-OAEP-SHA256 encrypted (empty label), then `material` wrapped under it.
///
/// # Errors
/// [`Error::InvalidInput`] for a key that is not RSA or shorter than 2048 bits.
pub(crate) fn rsa_aes_wrap(spki_der: &[u8], material: &[u8]) -> Result<Vec<u8>> {
    let public = PublicEncryptingKey::from_der(spki_der).map_err(|_| {
        Error::InvalidInput("the public key to wrap to is not an RSA public key".into())
    })?;
    if public.key_size_bits() < MIN_RSA_BITS {
        return Err(Error::InvalidInput(format!(
            "the RSA public key to wrap to has {} bits: keyhold wraps only to keys of at least \
             {MIN_RSA_BITS} bits",
            public.key_size_bits()
        )));
    }
    let oaep =
        OaepPublicEncryptingKey::new(public).map_err(|_| Error::crypto("prepare RSA-OAEP"))?;
    let mut ephemeral = SecretBytes::zeroed(32);
    aws_lc_rs::rand::fill(ephemeral.expose_mut())
        .map_err(|_| Error::crypto("make an ephemeral AES key"))?;
    let mut out = vec![0u8; oaep.ciphertext_size()];
    let len = oaep
        .encrypt(&OAEP_SHA256_MGF1SHA256, ephemeral.expose(), &mut out, None)
        .map_err(|_| Error::crypto("RSA-OAEP encryption"))?
        .len();
    out.truncate(len);
    out.extend_from_slice(&kwp_wrap(ephemeral.expose(), material)?);
    Ok(out)
}

/// Unwraps `CKM_RSA_AES_KEY_WRAP` bytes with the RSA private key `pkcs8`.
///
/// # Errors
/// [`UNWRAP_FAILED`] for anything that does not decrypt and authenticate.
pub(crate) fn rsa_aes_unwrap(pkcs8: &[u8], wrapped: &[u8]) -> Result<SecretBytes> {
    let private = PrivateDecryptingKey::from_pkcs8(pkcs8).map_err(|_| Error::Integrity {
        what: "software key material is not a valid RSA private key".into(),
    })?;
    let split = private.key_size_bytes();
    if wrapped.len() <= split {
        return Err(UNWRAP_FAILED);
    }
    let oaep =
        OaepPrivateDecryptingKey::new(private).map_err(|_| Error::crypto("prepare RSA-OAEP"))?;
    let mut ephemeral = SecretBytes::zeroed(split);
    let len = oaep
        .decrypt(
            &OAEP_SHA256_MGF1SHA256,
            &wrapped[..split],
            ephemeral.expose_mut(),
            None,
        )
        .map_err(|_| UNWRAP_FAILED)?
        .len();
    kwp_unwrap(&ephemeral.expose()[..len], &wrapped[split..])
}

/// The DER inside a PEM block labelled `label` in `text`, if `text` is PEM with that block.
///
/// # Errors
/// [`Error::InvalidInput`] for a block that is not valid base64.
pub(crate) fn pem_block(text: &[u8], label: &str) -> Result<Option<SecretBytes>> {
    use base64::Engine as _;
    let Ok(text) = std::str::from_utf8(text) else {
        return Ok(None);
    };
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let Some(start) = text.find(&begin) else {
        return Ok(None);
    };
    let body = &text[start + begin.len()..];
    let Some(stop) = body.find(&end) else {
        return Err(Error::InvalidInput(format!(
            "the PEM block `{label}` has no end line"
        )));
    };
    let b64: zeroize::Zeroizing<String> = zeroize::Zeroizing::new(
        body[..stop]
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect(),
    );
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64.as_bytes())
        .map_err(|_| Error::InvalidInput(format!("the PEM block `{label}` is not valid base64")))?;
    Ok(Some(SecretBytes::from_zeroizing(zeroize::Zeroizing::new(
        der,
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wrap unwraps under its key only, and a changed byte is refused (OpenSSL interop, in
    /// tests/cli_transport.rs, shows the format is RFC 5649's).
    #[test]
    fn kwp_round_trips_and_refuses_changes_and_other_keys() {
        let key = [0x5au8; 20];
        let k256 = [7u8; 32];
        let wrapped = kwp_wrap(&k256, &key).unwrap();
        assert_eq!(wrapped.len(), 32);
        assert_eq!(kwp_unwrap(&k256, &wrapped).unwrap().expose(), &key[..]);
        let mut bent = wrapped.clone();
        bent[3] ^= 1;
        assert!(matches!(
            kwp_unwrap(&k256, &bent),
            Err(Error::DecryptionFailed { .. })
        ));
        assert!(matches!(
            kwp_unwrap(&[8u8; 32], &wrapped),
            Err(Error::DecryptionFailed { .. })
        ));
    }

    #[test]
    fn rsa_aes_round_trip_and_refusals() {
        use aws_lc_rs::encoding::AsDer;
        let private = PrivateDecryptingKey::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let pkcs8 = private.as_der().unwrap();
        let spki = private.public_key().as_der().unwrap();
        let wrapped = rsa_aes_wrap(spki.as_ref(), b"thirty-two bytes of key material").unwrap();
        assert_eq!(wrapped.len(), 256 + 40);
        let back = rsa_aes_unwrap(pkcs8.as_ref(), &wrapped).unwrap();
        assert_eq!(back.expose(), b"thirty-two bytes of key material");
        let mut bent = wrapped.clone();
        bent[300 - 5] ^= 1;
        assert!(matches!(
            rsa_aes_unwrap(pkcs8.as_ref(), &bent),
            Err(Error::DecryptionFailed { .. })
        ));
        assert!(matches!(
            rsa_aes_unwrap(pkcs8.as_ref(), &wrapped[..200]),
            Err(Error::DecryptionFailed { .. })
        ));
    }
}
