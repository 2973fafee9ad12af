//! Importing a key made outside the TPM (TPM2_Import under the SRK), for ECDSA and HMAC keys.
//!
//! TPM2_Import takes only duplicable objects: the public area has fixedTPM, fixedParent and
//! sensitiveDataOrigin clear (keys keyhold generates have all three set), and its unique field is
//! the key's public part (an ECC point; for an HMAC key, SHA-256 of the obfuscation seed and the
//! key). The sensitive area goes in as the "duplicate" with neither an inner nor an outer wrapper
//! (symmetricAlg NULL, no seed), which the TPM (swtpm here) accepts for an object without
//! encryptedDuplication: nothing of its own protects it on the way to the TPM — the material is
//! in this process's memory anyway, and a discrete TPM's bus is the residual exposure. What
//! TPM2_Import returns is a private part under the SRK like TPM2_Create's, so the key's blob and
//! every later use are those of a generated key.
//!
//! RSA keys are not imported: the TPM takes an RSA private key as one of its primes, and
//! aws-lc-rs gives no access to the primes of a PKCS#8 key.

use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::structures::{
    Auth, Digest, EccParameter, EccPoint, Private, Public, Sensitive, SensitiveBuffer,
    SensitiveData,
};
use tss_esapi::traits::Marshall;
use tss_esapi::{Error as TssError, WrapperErrorKind};

use super::templates;
use crate::error::{Error, Result};
use crate::key::{Algorithm, KeyType};
use crate::secret::SecretBytes;

/// What TPM2_Import is given: the public area and the unwrapped sensitive area.
pub(super) struct Prepared {
    pub(super) public: Public,
    pub(super) duplicate: Private,
}

/// The public and sensitive areas of the key `material` (PKCS#8 for ECDSA keys, the raw key for
/// HMAC) with the authValue `auth`.
///
/// # Errors
/// [`Error::Unsupported`] (with `backend`) for a type the TPM backend does not import; crypto
/// errors for material that does not parse (it was checked before).
pub(super) fn prepare(
    backend: &str,
    key_type: KeyType,
    algorithm: Algorithm,
    material: &SecretBytes,
    auth: &SecretBytes,
) -> Result<Prepared> {
    let unsupported = |why: &str| Error::Unsupported {
        backend: backend.to_owned(),
        what: format!("importing {key_type} keys: {why}"),
    };
    let tpm_failed = |_: TssError| Error::crypto("prepare a key for TPM2_Import");
    let template = templates::template(key_type, algorithm)
        .ok_or_else(|| unsupported("the TPM backend does not make them"))?
        .map_err(tpm_failed)?;
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(false)
        .with_fixed_parent(false)
        .with_sensitive_data_origin(false)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_sign_encrypt(true)
        .with_decrypt(false)
        .with_restricted(false)
        .build()
        .map_err(tpm_failed)?;
    let auth_value = Auth::try_from(auth.expose()).map_err(tpm_failed)?;
    let (public, sensitive) = match (algorithm, template) {
        (
            Algorithm::EcdsaP256Sha256 | Algorithm::EcdsaP384Sha384,
            Public::Ecc {
                name_hashing_algorithm,
                auth_policy,
                parameters,
                ..
            },
        ) => {
            let (scalar, point) = ecc_parts(key_type, material)?;
            let width = point.len() / 2;
            let unique = EccPoint::new(
                EccParameter::try_from(&point[..width]).map_err(tpm_failed)?,
                EccParameter::try_from(&point[width..]).map_err(tpm_failed)?,
            );
            (
                Public::Ecc {
                    object_attributes: attributes,
                    name_hashing_algorithm,
                    auth_policy,
                    parameters,
                    unique,
                },
                Sensitive::Ecc {
                    auth_value,
                    seed_value: Digest::default(),
                    sensitive: EccParameter::try_from(scalar.expose()).map_err(tpm_failed)?,
                },
            )
        }
        (
            Algorithm::HmacSha256,
            Public::KeyedHash {
                name_hashing_algorithm,
                auth_policy,
                parameters,
                ..
            },
        ) => {
            // A keyed-hash object's unique field commits to its key through a random seed
            // (TPM 2.0 Part 1 §27.2.3): SHA-256 (the name algorithm) of seed ‖ key.
            let mut seed = [0u8; 32];
            aws_lc_rs::rand::fill(&mut seed).map_err(|_| Error::crypto("make a seed"))?;
            let mut unique = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
            unique.update(&seed);
            unique.update(material.expose());
            (
                Public::KeyedHash {
                    object_attributes: attributes,
                    name_hashing_algorithm,
                    auth_policy,
                    parameters,
                    unique: Digest::try_from(unique.finish().as_ref()).map_err(tpm_failed)?,
                },
                Sensitive::Bits {
                    auth_value,
                    seed_value: Digest::try_from(&seed[..]).map_err(tpm_failed)?,
                    sensitive: SensitiveData::try_from(material.expose()).map_err(tpm_failed)?,
                },
            )
        }
        (Algorithm::RsaPssSha256 | Algorithm::RsaPkcs1Sha256 | Algorithm::RsaOaepSha256, _) => {
            return Err(unsupported(
                "the TPM takes an RSA private key as one of its primes, which keyhold cannot \
                 read from PKCS#8 (aws-lc-rs does not expose them): import RSA keys into \
                 software or a PKCS#11 token",
            ))
        }
        _ => {
            return Err(tpm_failed(TssError::WrapperError(
                WrapperErrorKind::InconsistentParams,
            )))
        }
    };
    let marshalled = zeroize::Zeroizing::new(
        SensitiveBuffer::try_from(sensitive)
            .and_then(|b| b.marshall())
            .map_err(tpm_failed)?,
    );
    let duplicate = Private::try_from(marshalled.as_slice()).map_err(tpm_failed)?;
    Ok(Prepared { public, duplicate })
}

/// The private scalar (big-endian, field width) and the public point (`x ‖ y`) of an ECDSA
/// PKCS#8 key.
fn ecc_parts(key_type: KeyType, material: &SecretBytes) -> Result<(SecretBytes, Vec<u8>)> {
    use aws_lc_rs::encoding::{AsBigEndian, EcPrivateKeyBin};
    use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair as _};
    let failed = || Error::crypto("read an ECDSA key for TPM2_Import");
    let alg = match key_type {
        KeyType::EcdsaP256 => &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        _ => &aws_lc_rs::signature::ECDSA_P384_SHA384_ASN1_SIGNING,
    };
    let pair = EcdsaKeyPair::from_pkcs8(alg, material.expose()).map_err(|_| failed())?;
    let scalar: EcPrivateKeyBin<'_> = pair.private_key().as_be_bytes().map_err(|_| failed())?;
    let scalar = SecretBytes::copy_from(scalar.as_ref());
    // The uncompressed point, 04 ‖ x ‖ y.
    let point = pair.public_key().as_ref();
    if point.first() != Some(&0x04) {
        return Err(failed());
    }
    Ok((scalar, point[1..].to_vec()))
}
