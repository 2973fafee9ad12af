//! What a key is: its type, its one purpose, its algorithm, its state, and the names it goes by.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The key types every backend is measured against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyType {
    /// ECDSA on NIST P-256.
    EcdsaP256,
    /// ECDSA on NIST P-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
    /// RSA with a 2048-bit modulus.
    Rsa2048,
    /// RSA with a 3072-bit modulus.
    Rsa3072,
    /// RSA with a 4096-bit modulus.
    Rsa4096,
    /// A 256-bit AES key used with GCM.
    Aes256Gcm,
    /// A 256-bit HMAC-SHA256 key.
    HmacSha256,
}

impl KeyType {
    /// Every key type, in the order they are documented.
    pub const ALL: [KeyType; 8] = [
        Self::EcdsaP256,
        Self::EcdsaP384,
        Self::Ed25519,
        Self::Rsa2048,
        Self::Rsa3072,
        Self::Rsa4096,
        Self::Aes256Gcm,
        Self::HmacSha256,
    ];

    /// The name used on the command line, in records and in key IDs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcdsaP256 => "ecdsa-p256",
            Self::EcdsaP384 => "ecdsa-p384",
            Self::Ed25519 => "ed25519",
            Self::Rsa2048 => "rsa-2048",
            Self::Rsa3072 => "rsa-3072",
            Self::Rsa4096 => "rsa-4096",
            Self::Aes256Gcm => "aes-256-gcm",
            Self::HmacSha256 => "hmac-sha256",
        }
    }

    /// The purposes a key of this type may have; the first is the default.
    pub fn purposes(self) -> &'static [Purpose] {
        match self {
            Self::EcdsaP256 | Self::EcdsaP384 | Self::Ed25519 => &[Purpose::Sign],
            Self::Rsa2048 | Self::Rsa3072 | Self::Rsa4096 => &[Purpose::Sign, Purpose::Decrypt],
            Self::Aes256Gcm => &[Purpose::Encrypt],
            Self::HmacSha256 => &[Purpose::Mac],
        }
    }

    /// The purpose a key of this type gets when none is asked for.
    pub fn default_purpose(self) -> Purpose {
        self.purposes()[0]
    }

    /// Whether keys of this type are asymmetric (have a public key).
    pub fn is_asymmetric(self) -> bool {
        !matches!(self, Self::Aes256Gcm | Self::HmacSha256)
    }

    /// The RSA modulus size in bits, for RSA types.
    pub fn rsa_bits(self) -> Option<usize> {
        match self {
            Self::Rsa2048 => Some(2048),
            Self::Rsa3072 => Some(3072),
            Self::Rsa4096 => Some(4096),
            _ => None,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|t| t.as_str()).collect();
                Error::InvalidInput(format!(
                    "unknown key type `{s}`: known types are {}",
                    known.join(", ")
                ))
            })
    }
}

/// The one job a key does. A key never has two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Purpose {
    /// Make signatures (verification is public).
    Sign,
    /// Decrypt with an asymmetric private key (encryption is public).
    Decrypt,
    /// Encrypt and decrypt with a symmetric key.
    Encrypt,
    /// Compute and check MAC tags.
    Mac,
}

impl Purpose {
    /// Every purpose.
    pub const ALL: [Purpose; 4] = [Self::Sign, Self::Decrypt, Self::Encrypt, Self::Mac];

    /// The name used on the command line, in records and in key IDs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sign => "sign",
            Self::Decrypt => "decrypt",
            Self::Encrypt => "encrypt",
            Self::Mac => "mac",
        }
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Purpose {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "unknown purpose `{s}`: known purposes are sign, decrypt, encrypt, mac"
                ))
            })
    }
}

/// The exact algorithm a key is used with, fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Algorithm {
    /// ECDSA P-256 with SHA-256.
    EcdsaP256Sha256,
    /// ECDSA P-384 with SHA-384.
    EcdsaP384Sha384,
    /// Ed25519 (pure).
    Ed25519,
    /// RSASSA-PSS with SHA-256, MGF1-SHA-256, 32-byte salt.
    RsaPssSha256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RsaPkcs1Sha256,
    /// RSAES-OAEP with SHA-256 and MGF1-SHA-256.
    RsaOaepSha256,
    /// AES-256-GCM with a random 96-bit nonce.
    Aes256Gcm,
    /// HMAC-SHA256.
    HmacSha256,
}

impl Algorithm {
    const ALL: [Algorithm; 8] = [
        Self::EcdsaP256Sha256,
        Self::EcdsaP384Sha384,
        Self::Ed25519,
        Self::RsaPssSha256,
        Self::RsaPkcs1Sha256,
        Self::RsaOaepSha256,
        Self::Aes256Gcm,
        Self::HmacSha256,
    ];

    /// The name used in records and key IDs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcdsaP256Sha256 => "ecdsa-p256-sha256",
            Self::EcdsaP384Sha384 => "ecdsa-p384-sha384",
            Self::Ed25519 => "ed25519",
            Self::RsaPssSha256 => "rsa-pss-sha256",
            Self::RsaPkcs1Sha256 => "rsa-pkcs1v15-sha256",
            Self::RsaOaepSha256 => "rsa-oaep-sha256",
            Self::Aes256Gcm => "aes-256-gcm",
            Self::HmacSha256 => "hmac-sha256",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Algorithm {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| Error::InvalidInput(format!("unknown algorithm `{s}`")))
    }
}

/// RSA signature padding, chosen when an RSA signing key is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RsaPadding {
    /// RSASSA-PSS (the default).
    #[default]
    Pss,
    /// RSASSA-PKCS1-v1_5, for verifiers that need it.
    Pkcs1v15,
}

/// A validated description of a key to create: type, purpose and the algorithm they imply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySpec {
    key_type: KeyType,
    purpose: Purpose,
    algorithm: Algorithm,
}

impl KeySpec {
    /// Checks that `purpose` (or the type's default) suits `key_type` and picks the algorithm.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if the purpose does not suit the type, or a padding is given for a key
    /// that is not an RSA signing key.
    pub fn new(
        key_type: KeyType,
        purpose: Option<Purpose>,
        padding: Option<RsaPadding>,
    ) -> Result<Self> {
        let purpose = purpose.unwrap_or_else(|| key_type.default_purpose());
        if !key_type.purposes().contains(&purpose) {
            let allowed: Vec<&str> = key_type.purposes().iter().map(|p| p.as_str()).collect();
            return Err(Error::InvalidInput(format!(
                "a {key_type} key cannot have purpose {purpose}: allowed: {}",
                allowed.join(", ")
            )));
        }
        let is_rsa_sign = key_type.rsa_bits().is_some() && purpose == Purpose::Sign;
        if padding.is_some() && !is_rsa_sign {
            return Err(Error::InvalidInput(format!(
                "--padding applies to RSA signing keys only, not to a {key_type} key with purpose {purpose}"
            )));
        }
        let algorithm = match (key_type, purpose) {
            (KeyType::EcdsaP256, _) => Algorithm::EcdsaP256Sha256,
            (KeyType::EcdsaP384, _) => Algorithm::EcdsaP384Sha384,
            (KeyType::Ed25519, _) => Algorithm::Ed25519,
            (KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096, Purpose::Decrypt) => {
                Algorithm::RsaOaepSha256
            }
            (KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096, _) => {
                match padding.unwrap_or_default() {
                    RsaPadding::Pss => Algorithm::RsaPssSha256,
                    RsaPadding::Pkcs1v15 => Algorithm::RsaPkcs1Sha256,
                }
            }
            (KeyType::Aes256Gcm, _) => Algorithm::Aes256Gcm,
            (KeyType::HmacSha256, _) => Algorithm::HmacSha256,
        };
        Ok(Self {
            key_type,
            purpose,
            algorithm,
        })
    }

    /// Rebuilds a spec from stored names, checking that they agree with each other.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if a name is unknown or the three do not belong together.
    pub fn from_names(key_type: &str, purpose: &str, algorithm: &str) -> Result<Self> {
        let key_type: KeyType = key_type.parse()?;
        let purpose: Purpose = purpose.parse()?;
        let algorithm: Algorithm = algorithm.parse()?;
        let padding = match algorithm {
            Algorithm::RsaPkcs1Sha256 => Some(RsaPadding::Pkcs1v15),
            Algorithm::RsaPssSha256 => Some(RsaPadding::Pss),
            _ => None,
        };
        let spec = Self::new(key_type, Some(purpose), padding)?;
        if spec.algorithm != algorithm {
            return Err(Error::InvalidInput(format!(
                "algorithm {algorithm} does not belong to a {key_type} key with purpose {purpose}"
            )));
        }
        Ok(spec)
    }

    /// The key type.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// The key's one purpose.
    pub fn purpose(&self) -> Purpose {
        self.purpose
    }

    /// The algorithm the key is used with.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

/// Where a key is in its life (NIST SP 800-57 Part 1 §7).
///
/// A key *protects* (signs, encrypts, computes MACs) only when active; it *processes* (verifies,
/// decrypts, checks MACs) when active, suspended, deactivated, or compromised when the caller
/// says so. A key scheduled for destruction is not a state of its own: it keeps its state and
/// only processes until then.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum KeyState {
    /// Made, not yet to be used (until its activation time).
    PreActivation,
    /// In use.
    Active,
    /// Taken out of use for a while: processes only, until resumed.
    Suspended,
    /// Retired (by hand or at its expiry time): processes only.
    Deactivated,
    /// Known or suspected to be in someone else's hands: processes only when the caller accepts
    /// it, and every use says so.
    Compromised,
    /// Its material is gone; the record remains so the ID says when.
    Destroyed,
}

/// What a use of a key does to data, for the state rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyUse {
    /// Makes something new: signs, encrypts, computes a MAC.
    Protect,
    /// Checks or opens something already made: verifies, decrypts, checks a MAC.
    Process,
}

impl KeyState {
    /// Every state, in lifecycle order.
    pub const ALL: [KeyState; 6] = [
        KeyState::PreActivation,
        KeyState::Active,
        KeyState::Suspended,
        KeyState::Deactivated,
        KeyState::Compromised,
        KeyState::Destroyed,
    ];

    /// The name used in records and output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PreActivation => "pre-activation",
            Self::Active => "active",
            Self::Suspended => "suspended",
            Self::Deactivated => "deactivated",
            Self::Compromised => "compromised",
            Self::Destroyed => "destroyed",
        }
    }

    /// Whether a key in this state may be used so (compromised keys process only when
    /// `allow_compromised`).
    pub fn allows(self, key_use: KeyUse, allow_compromised: bool) -> bool {
        match (self, key_use) {
            (Self::Active, _) => true,
            (Self::Suspended | Self::Deactivated, KeyUse::Process) => true,
            (Self::Compromised, KeyUse::Process) => allow_compromised,
            _ => false,
        }
    }
}

impl FromStr for KeyState {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                Error::InvalidInput(format!("unknown key state `{}`", s.escape_default()))
            })
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Signature encoding for ECDSA; other algorithms have one encoding and ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SignatureFormat {
    /// X9.62 DER `SEQUENCE { r, s }` (what OpenSSL reads).
    #[default]
    Der,
    /// Fixed-width r‖s (JOSE, IEEE P1363).
    Raw,
}

/// Checks a key or namespace name: 1–64 of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.
///
/// # Errors
/// [`Error::InvalidInput`] naming the rule that was broken.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    let ok_start = !name.starts_with('.') && !name.starts_with('-');
    if name.is_empty() || name.len() > 64 || !ok_chars || !ok_start {
        return Err(Error::InvalidInput(format!(
            "invalid {what} `{}`: use 1-64 characters from A-Z a-z 0-9 . _ -, not starting with . or -",
            name.escape_default()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for t in KeyType::ALL {
            assert_eq!(t.as_str().parse::<KeyType>().unwrap(), t);
            for &p in t.purposes() {
                let spec = KeySpec::new(t, Some(p), None).unwrap();
                let back =
                    KeySpec::from_names(t.as_str(), p.as_str(), spec.algorithm().as_str()).unwrap();
                assert_eq!(back, spec);
            }
        }
    }

    #[test]
    fn purposes_are_enforced() {
        let err = KeySpec::new(KeyType::Ed25519, Some(Purpose::Decrypt), None).unwrap_err();
        assert!(err.to_string().contains("cannot have purpose decrypt"));
        let err = KeySpec::new(KeyType::Aes256Gcm, None, Some(RsaPadding::Pss)).unwrap_err();
        assert!(err.to_string().contains("--padding"));
        let spec = KeySpec::new(KeyType::Rsa3072, None, Some(RsaPadding::Pkcs1v15)).unwrap();
        assert_eq!(spec.algorithm(), Algorithm::RsaPkcs1Sha256);
        let err = KeySpec::from_names("rsa-2048", "decrypt", "rsa-pss-sha256").unwrap_err();
        assert!(
            matches!(&err, Error::InvalidInput(m) if m.starts_with("--padding applies to RSA signing keys only")),
            "{err:?}"
        );
        let err = KeySpec::from_names("ecdsa-p256", "sign", "ed25519").unwrap_err();
        assert!(
            matches!(&err, Error::InvalidInput(m) if m.contains("does not belong")),
            "{err:?}"
        );
    }

    #[test]
    fn names_are_checked() {
        for good in ["a", "web-1", "A.b_c", &"x".repeat(64)] {
            validate_name("name", good).unwrap();
        }
        for bad in ["", "-a", ".a", "a/b", "../x", "é", &"x".repeat(65), "a b"] {
            let err = validate_name("name", bad).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidInput(m) if m.starts_with("invalid name `")
                    && m.ends_with("`: use 1-64 characters from A-Z a-z 0-9 . _ -, not starting with . or -")),
                "{bad:?}: {err:?}"
            );
        }
    }
}
