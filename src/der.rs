//! The few DER encodings hardware backends need: SubjectPublicKeyInfo from a raw EC point or
//! Ed25519 key, and ECDSA signatures between r‖s and X9.62 DER. Encodings only: no cryptography.

use crate::error::{Error, Result};
use crate::key::KeyType;

/// `SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (65 bytes follow) }`.
const P256_SPKI_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// `SEQUENCE { SEQUENCE { id-ecPublicKey, secp384r1 }, BIT STRING (97 bytes follow) }`.
const P384_SPKI_PREFIX: &[u8] = &[
    0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b,
    0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00,
];
/// `SEQUENCE { SEQUENCE { id-Ed25519 }, BIT STRING (32 bytes follow) }`.
const ED25519_SPKI_PREFIX: &[u8] = &[
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The DER `OBJECT IDENTIFIER` of P-256 (for `CKA_EC_PARAMS`: these four are PKCS#11's alone).
#[cfg(feature = "pkcs11")]
pub const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// The DER `OBJECT IDENTIFIER` of P-384.
#[cfg(feature = "pkcs11")]
pub const P384_OID: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
/// The DER `OBJECT IDENTIFIER` of Ed25519 (RFC 8410).
#[cfg(feature = "pkcs11")]
pub const ED25519_OID: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

/// The DER `DigestInfo` prefix for SHA-256 (RFC 8017, section 9.2, note 1).
#[cfg(feature = "pkcs11")]
pub const SHA256_DIGEST_INFO_PREFIX: &[u8] = &[
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

fn bad(what: &str) -> Error {
    Error::Crypto {
        operation: match what {
            "point" => "decode a public key from the device",
            _ => "decode a signature from the device",
        },
    }
}

/// A SubjectPublicKeyInfo for an EC or Ed25519 public key given as the device returns it: the raw
/// point (`04‖x‖y`, or 32 bytes for Ed25519), or that wrapped in a DER OCTET STRING (`CKA_EC_POINT`).
///
/// # Errors
/// [`Error::Crypto`] if the bytes are not a point of the expected size.
pub fn spki_from_point(key_type: KeyType, point: &[u8]) -> Result<Vec<u8>> {
    let (prefix, len) = match key_type {
        KeyType::EcdsaP256 => (P256_SPKI_PREFIX, 65),
        KeyType::EcdsaP384 => (P384_SPKI_PREFIX, 97),
        KeyType::Ed25519 => (ED25519_SPKI_PREFIX, 32),
        _ => return Err(bad("point")),
    };
    let raw = if point.len() == len {
        point
    } else if point.len() == len + 2 && point[0] == 0x04 && usize::from(point[1]) == len {
        &point[2..]
    } else {
        return Err(bad("point"));
    };
    if key_type != KeyType::Ed25519 && raw[0] != 0x04 {
        return Err(bad("point"));
    }
    let mut spki = prefix.to_vec();
    spki.extend_from_slice(raw);
    Ok(spki)
}

/// A SubjectPublicKeyInfo for an RSA public key given as a device returns it: the modulus and
/// public exponent, big-endian.
///
/// # Errors
/// [`Error::Crypto`] if aws-lc refuses the components.
pub fn spki_from_rsa(n: &[u8], e: &[u8]) -> Result<Vec<u8>> {
    use aws_lc_rs::encoding::AsDer;
    Ok(aws_lc_rs::rsa::PublicKeyComponents { n, e }
        .as_der()
        .map_err(|_| Error::crypto("encode a device's RSA public key"))?
        .as_ref()
        .to_vec())
}

/// Encodes a fixed-width ECDSA signature `r‖s` as X9.62 DER `SEQUENCE { INTEGER r, INTEGER s }`.
///
/// # Errors
/// [`Error::Crypto`] if the signature has an odd or implausible length.
pub fn ecdsa_raw_to_der(raw: &[u8]) -> Result<Vec<u8>> {
    if raw.is_empty() || raw.len() % 2 != 0 || raw.len() > 132 {
        return Err(bad("signature"));
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let mut body = Vec::with_capacity(raw.len() + 6);
    for int in [r, s] {
        let first = int.iter().position(|&b| b != 0).unwrap_or(int.len() - 1);
        let int = &int[first..];
        let pad = int[0] & 0x80 != 0;
        body.push(0x02);
        body.push((int.len() + usize::from(pad)) as u8);
        if pad {
            body.push(0x00);
        }
        body.extend_from_slice(int);
    }
    let mut der = Vec::with_capacity(body.len() + 3);
    der.push(0x30);
    if body.len() >= 0x80 {
        der.push(0x81);
    }
    der.push(body.len() as u8);
    der.extend_from_slice(&body);
    Ok(der)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, UnparsedPublicKey};

    #[test]
    fn raw_to_der_matches_aws_lc() {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        for (fixed, asn1, verify) in [
            (
                &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                &signature::ECDSA_P256_SHA256_ASN1,
            ),
            (
                &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
                &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
                &signature::ECDSA_P384_SHA384_ASN1,
            ),
        ] {
            let pair = EcdsaKeyPair::generate(fixed).unwrap();
            let pkcs8 = pair.to_pkcs8v1().unwrap();
            let der_pair = EcdsaKeyPair::from_pkcs8(asn1, pkcs8.as_ref()).unwrap();
            let spki = der_pair.public_key().as_der().unwrap();
            // Many signatures, so that leading zeros and high bits in r and s all occur.
            for i in 0..300u32 {
                let msg = i.to_be_bytes();
                let raw = pair.sign(&rng, &msg).unwrap();
                let der = ecdsa_raw_to_der(raw.as_ref()).unwrap();
                UnparsedPublicKey::new(verify, spki.as_ref())
                    .verify(&msg, &der)
                    .unwrap();
            }
        }
    }

    #[test]
    fn spki_from_point_matches_aws_lc() {
        let pair = EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
        let point = pair.public_key().as_ref().to_vec();
        let expected = pair.public_key().as_der().unwrap();
        assert_eq!(
            spki_from_point(KeyType::EcdsaP256, &point).unwrap(),
            expected.as_ref()
        );
        let mut wrapped = vec![0x04, 65];
        wrapped.extend_from_slice(&point);
        assert_eq!(
            spki_from_point(KeyType::EcdsaP256, &wrapped).unwrap(),
            expected.as_ref()
        );
        let err = spki_from_point(KeyType::EcdsaP384, &point).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Crypto {
                    operation: "decode a public key from the device"
                }
            ),
            "{err:?}"
        );
        let ed = signature::Ed25519KeyPair::generate().unwrap();
        assert_eq!(
            spki_from_point(KeyType::Ed25519, ed.public_key().as_ref()).unwrap(),
            ed.public_key().as_der().unwrap().as_ref()
        );
    }
}
