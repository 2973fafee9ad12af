//! Key templates for TPM2_Create, and public areas turned into keyhold public keys.
//!
//! Every key is an unrestricted signing, HMAC or decryption key with a fixed scheme, so a key can
//! only ever be used with the one algorithm its record names. Attributes:
//!
//! - fixedTPM, fixedParent: the key never leaves this TPM (no duplication);
//! - sensitiveDataOrigin: the TPM generated the secret;
//! - userWithAuth: its random 32-byte authValue authorises use;
//! - noDA: that authValue cannot be guessed, so dictionary-attack counting protects nothing, and a
//!   damaged record must not lock out every other user of the TPM.

use tss_esapi::attributes::{ObjectAttributes, ObjectAttributesBuilder};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::structures::{
    Digest, EccPoint, EccScheme, HashScheme, KeyedHashScheme, Public, PublicBuilder,
    PublicEccParametersBuilder, PublicKeyRsa, PublicKeyedHashParameters, PublicRsaParameters,
    PublicRsaParametersBuilder, RsaExponent, RsaScheme,
};

use crate::der;
use crate::error::{Error, Result};
use crate::key::{Algorithm, KeyType};
use crate::public_key::PublicKey;

/// - sign (signing and HMAC keys) or decrypt (RSA-OAEP keys), never both.
fn attributes(decrypt: bool) -> tss_esapi::Result<ObjectAttributes> {
    ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_sign_encrypt(!decrypt)
        .with_decrypt(decrypt)
        .with_restricted(false)
        .build()
}

/// RSA signing parameters of `bits` with a NULL scheme (for TPM2_TestParms).
pub(super) fn rsa_parameters(bits: RsaKeyBits) -> tss_esapi::Result<PublicRsaParameters> {
    PublicRsaParametersBuilder::new_unrestricted_signing_key(
        RsaScheme::Null,
        bits,
        RsaExponent::default(),
    )
    .build()
}

/// The template for a key of `key_type` and `algorithm`, or `None` if the TPM backend does not
/// make it.
pub(super) fn template(
    key_type: KeyType,
    algorithm: Algorithm,
) -> Option<tss_esapi::Result<Public>> {
    let bits = match key_type {
        KeyType::Rsa2048 => RsaKeyBits::Rsa2048,
        KeyType::Rsa3072 => RsaKeyBits::Rsa3072,
        _ => RsaKeyBits::Rsa2048,
    };
    let ecc = |curve, hash| -> tss_esapi::Result<Public> {
        PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attributes(false)?)
            .with_ecc_parameters(
                PublicEccParametersBuilder::new_unrestricted_signing_key(
                    EccScheme::EcDsa(HashScheme::new(hash)),
                    curve,
                )
                .build()?,
            )
            .with_ecc_unique_identifier(EccPoint::default())
            .build()
    };
    let rsa = |scheme, decrypt: bool| -> tss_esapi::Result<Public> {
        PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Rsa)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attributes(decrypt)?)
            .with_rsa_parameters(
                PublicRsaParametersBuilder::new()
                    .with_scheme(scheme)
                    .with_key_bits(bits)
                    .with_exponent(RsaExponent::default())
                    .with_is_signing_key(!decrypt)
                    .with_is_decryption_key(decrypt)
                    .with_restricted(false)
                    .build()?,
            )
            .with_rsa_unique_identifier(PublicKeyRsa::default())
            .build()
    };
    if !matches!(
        key_type,
        KeyType::EcdsaP256
            | KeyType::EcdsaP384
            | KeyType::Rsa2048
            | KeyType::Rsa3072
            | KeyType::HmacSha256
    ) {
        return None;
    }
    let sha256 = HashScheme::new(HashingAlgorithm::Sha256);
    Some(match algorithm {
        Algorithm::EcdsaP256Sha256 => ecc(EccCurve::NistP256, HashingAlgorithm::Sha256),
        Algorithm::EcdsaP384Sha384 => ecc(EccCurve::NistP384, HashingAlgorithm::Sha384),
        // The TPM's PSS salt is the hash length for 2048- and 3072-bit keys
        // (`CryptRsaPssSaltSize`): 32 bytes, as keyhold's RSA-PSS-SHA256 specifies.
        Algorithm::RsaPssSha256 => rsa(RsaScheme::RsaPss(sha256), false),
        Algorithm::RsaPkcs1Sha256 => rsa(RsaScheme::RsaSsa(sha256), false),
        Algorithm::RsaOaepSha256 => rsa(RsaScheme::Oaep(sha256), true),
        Algorithm::HmacSha256 => PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::KeyedHash)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(match attributes(false) {
                Ok(a) => a,
                Err(e) => return Some(Err(e)),
            })
            .with_keyed_hash_parameters(PublicKeyedHashParameters::new(
                KeyedHashScheme::HMAC_SHA_256,
            ))
            .with_keyed_hash_unique_identifier(Digest::default())
            .build(),
        _ => return None,
    })
}

fn left_pad(value: &[u8], width: usize) -> Option<Vec<u8>> {
    let pad = width.checked_sub(value.len())?;
    let mut out = vec![0u8; pad];
    out.extend_from_slice(value);
    Some(out)
}

/// The field width in bytes of the curve `key_type` uses.
pub(super) fn field_len(key_type: KeyType) -> Option<usize> {
    match key_type {
        KeyType::EcdsaP256 => Some(32),
        KeyType::EcdsaP384 => Some(48),
        _ => None,
    }
}

/// The keyhold public key of a TPM public area, checked against the type the record names.
pub(super) fn public_key(
    public: &Public,
    key_type: KeyType,
    algorithm: Algorithm,
) -> Result<PublicKey> {
    let bad = || Error::crypto("read a public key from the TPM");
    let spki = match public {
        Public::Ecc {
            unique, parameters, ..
        } => {
            let (curve, width) = match key_type {
                KeyType::EcdsaP256 => (EccCurve::NistP256, 32),
                KeyType::EcdsaP384 => (EccCurve::NistP384, 48),
                _ => return Err(bad()),
            };
            if parameters.ecc_curve() != curve {
                return Err(bad());
            }
            // Some TPMs strip leading zero bytes from x and y.
            let mut point = vec![0x04];
            point.extend(left_pad(unique.x().value(), width).ok_or_else(bad)?);
            point.extend(left_pad(unique.y().value(), width).ok_or_else(bad)?);
            der::spki_from_point(key_type, &point)?
        }
        Public::Rsa {
            unique, parameters, ..
        } => {
            let bits = key_type.rsa_bits().ok_or_else(bad)?;
            if unique.value().len() != bits / 8 {
                return Err(bad());
            }
            // An exponent of zero means the default, 65537.
            let e = match parameters.exponent().value() {
                0 => 65537u32,
                e => e,
            };
            let e: Vec<u8> = e
                .to_be_bytes()
                .into_iter()
                .skip_while(|&b| b == 0)
                .collect();
            crate::der::spki_from_rsa(unique.value(), &e)?
        }
        _ => return Err(bad()),
    };
    Ok(PublicKey::from_spki_der(key_type, algorithm, spki))
}
