//! Public keys: export (SPKI DER, PEM, JWK) and the public operations keyhold does in software.
//!
//! Verification and RSA encryption need no secret, so they run here on the recorded public key,
//! whatever backend holds the private half.

use aws_lc_rs::rsa::{OaepPublicEncryptingKey, PublicEncryptingKey, OAEP_SHA256_MGF1SHA256};
use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use base64::Engine as _;

use crate::error::{Error, Result};
use crate::key::{Algorithm, KeyType, SignatureFormat};

/// The public half of an asymmetric key, as a DER SubjectPublicKeyInfo.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    key_type: KeyType,
    algorithm: Algorithm,
    spki_der: Vec<u8>,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey")
            .field("key_type", &self.key_type)
            .field("algorithm", &self.algorithm)
            .field("spki_der_len", &self.spki_der.len())
            .finish()
    }
}

impl PublicKey {
    /// Wraps a DER SubjectPublicKeyInfo for a key of `key_type` used with `algorithm`.
    pub fn from_spki_der(key_type: KeyType, algorithm: Algorithm, spki_der: Vec<u8>) -> Self {
        Self {
            key_type,
            algorithm,
            spki_der,
        }
    }

    /// The key type.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// The algorithm the key is used with.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The SubjectPublicKeyInfo as PEM (`-----BEGIN PUBLIC KEY-----`), as OpenSSL writes it.
    pub fn to_pem(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(&self.spki_der);
        let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            // base64 output is ASCII, so every chunk is valid UTF-8.
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END PUBLIC KEY-----\n");
        pem
    }

    /// The key as a JSON Web Key (RFC 7517/7518/8037), with `alg` and `use` set from the algorithm.
    ///
    /// # Errors
    /// [`Error::Crypto`] if the recorded SPKI cannot be taken apart (it was checked when recorded).
    pub fn to_jwk(&self) -> Result<serde_json::Value> {
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let der = &self.spki_der;
        let bad = || Error::crypto("decode the recorded public key");
        let (alg, usage) = match self.algorithm {
            Algorithm::EcdsaP256Sha256 => ("ES256", "sig"),
            Algorithm::EcdsaP384Sha384 => ("ES384", "sig"),
            Algorithm::Ed25519 => ("EdDSA", "sig"),
            Algorithm::RsaPssSha256 => ("PS256", "sig"),
            Algorithm::RsaPkcs1Sha256 => ("RS256", "sig"),
            Algorithm::RsaOaepSha256 => ("RSA-OAEP-256", "enc"),
            Algorithm::Aes256Gcm | Algorithm::HmacSha256 => return Err(bad()),
        };
        let jwk = match self.key_type {
            KeyType::EcdsaP256 | KeyType::EcdsaP384 => {
                // The SPKI ends with the BIT STRING holding the uncompressed point 04‖x‖y.
                let (crv, coord) = if self.key_type == KeyType::EcdsaP256 {
                    ("P-256", 32)
                } else {
                    ("P-384", 48)
                };
                let point = der.get(der.len().checked_sub(1 + 2 * coord).ok_or_else(bad)?..);
                let point = point.filter(|p| p[0] == 0x04).ok_or_else(bad)?;
                serde_json::json!({
                    "kty": "EC", "crv": crv,
                    "x": b64(&point[1..1 + coord]), "y": b64(&point[1 + coord..]),
                    "alg": alg, "use": usage,
                })
            }
            KeyType::Ed25519 => {
                let raw = der.get(der.len().checked_sub(32).ok_or_else(bad)?..);
                serde_json::json!({
                    "kty": "OKP", "crv": "Ed25519", "x": b64(raw.ok_or_else(bad)?),
                    "alg": alg, "use": usage,
                })
            }
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
                let key = aws_lc_rs::rsa::PublicKey::from_der(der).map_err(|_| bad())?;
                serde_json::json!({
                    "kty": "RSA",
                    "n": b64(key.modulus().big_endian_without_leading_zero()),
                    "e": b64(key.exponent().big_endian_without_leading_zero()),
                    "alg": alg, "use": usage,
                })
            }
            KeyType::Aes256Gcm | KeyType::HmacSha256 => return Err(bad()),
        };
        Ok(jwk)
    }

    /// Checks `signature` over `message`.
    ///
    /// # Errors
    /// [`Error::VerificationFailed`] for any invalid signature, with no further detail.
    pub fn verify(&self, message: &[u8], sig: &[u8], format: SignatureFormat) -> Result<()> {
        let algorithm: &'static dyn VerificationAlgorithm = match (self.algorithm, format) {
            (Algorithm::EcdsaP256Sha256, SignatureFormat::Der) => {
                &signature::ECDSA_P256_SHA256_ASN1
            }
            (Algorithm::EcdsaP256Sha256, SignatureFormat::Raw) => {
                &signature::ECDSA_P256_SHA256_FIXED
            }
            (Algorithm::EcdsaP384Sha384, SignatureFormat::Der) => {
                &signature::ECDSA_P384_SHA384_ASN1
            }
            (Algorithm::EcdsaP384Sha384, SignatureFormat::Raw) => {
                &signature::ECDSA_P384_SHA384_FIXED
            }
            (Algorithm::Ed25519, _) => &signature::ED25519,
            (Algorithm::RsaPssSha256, _) => &signature::RSA_PSS_2048_8192_SHA256,
            (Algorithm::RsaPkcs1Sha256, _) => &signature::RSA_PKCS1_2048_8192_SHA256,
            (Algorithm::RsaOaepSha256 | Algorithm::Aes256Gcm | Algorithm::HmacSha256, _) => {
                return Err(Error::InvalidInput(format!(
                    "a {} key does not make signatures",
                    self.algorithm
                )))
            }
        };
        UnparsedPublicKey::new(algorithm, &self.spki_der)
            .verify(message, sig)
            .map_err(|_| Error::VerificationFailed { what: "signature" })
    }

    /// The most plaintext bytes RSA-OAEP-SHA256 can encrypt to this key.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if this is not an RSA-OAEP key.
    pub fn oaep_max_plaintext(&self) -> Result<usize> {
        Ok(self.oaep_key()?.max_plaintext_size(&OAEP_SHA256_MGF1SHA256))
    }

    /// Encrypts `plaintext` with RSA-OAEP (SHA-256, MGF1-SHA-256) and `label`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if this is not an RSA-OAEP key or the plaintext is too long.
    pub fn encrypt_oaep(&self, plaintext: &[u8], label: &[u8]) -> Result<Vec<u8>> {
        let key = self.oaep_key()?;
        let max = key.max_plaintext_size(&OAEP_SHA256_MGF1SHA256);
        if plaintext.len() > max {
            return Err(Error::InvalidInput(format!(
                "{} RSA-OAEP-SHA256 encrypts at most {max} bytes and the input is {} bytes: \
                 encrypt data with an aes-256-gcm key instead",
                self.key_type,
                plaintext.len()
            )));
        }
        let mut out = vec![0u8; key.ciphertext_size()];
        let len = key
            .encrypt(&OAEP_SHA256_MGF1SHA256, plaintext, &mut out, Some(label))
            .map_err(|_| Error::crypto("RSA-OAEP encryption"))?
            .len();
        out.truncate(len);
        Ok(out)
    }

    fn oaep_key(&self) -> Result<OaepPublicEncryptingKey> {
        if self.algorithm != Algorithm::RsaOaepSha256 {
            return Err(Error::InvalidInput(format!(
                "a {} key does not do RSA-OAEP encryption",
                self.algorithm
            )));
        }
        let public = PublicEncryptingKey::from_der(&self.spki_der)
            .map_err(|_| Error::crypto("decode the recorded RSA public key"))?;
        OaepPublicEncryptingKey::new(public).map_err(|_| Error::crypto("prepare RSA-OAEP"))
    }
}
