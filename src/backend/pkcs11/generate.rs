//! Making a key's objects: tiered templates, what the token holds read back, the RSA-OAEP check on
//! the new key, and its public key.

use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType as CkKeyType, ObjectClass, ObjectHandle};

use super::objects::class_key;
use super::pool::{self, Disposition};
use super::template::{self, Expected, STAGES};
use super::Pkcs11Backend;
use crate::der;
use crate::error::{Error, Result};
use crate::key::{Algorithm, KeyType, Purpose};
use crate::public_key::PublicKey;

/// What the OAEP consistency check decrypts.
pub(super) const CHECK_MESSAGE: &[u8] = b"keyhold PKCS#11 new-key check";

/// What generating a key's objects produced.
pub(super) struct Made {
    pub(super) public: Option<PublicKey>,
    /// The private or secret object.
    pub(super) secret: ObjectHandle,
    pub(super) attributes: Vec<(String, String)>,
}

impl Pkcs11Backend {
    /// Makes the key's objects; returns their handles and what the token holds for them.
    pub(super) fn generate_objects(
        &self,
        expected: &Expected,
        spec: &crate::key::KeySpec,
        id: &[u8],
        label: &str,
    ) -> Result<Made> {
        let (mechanism, public_extra, secret_extra) = match spec.algorithm() {
            Algorithm::EcdsaP256Sha256 | Algorithm::EcdsaP384Sha384 | Algorithm::Ed25519 => {
                let (mechanism, oid) = match spec.key_type() {
                    KeyType::EcdsaP256 => (Mechanism::EccKeyPairGen, der::P256_OID),
                    KeyType::EcdsaP384 => (Mechanism::EccKeyPairGen, der::P384_OID),
                    _ => (Mechanism::EccEdwardsKeyPairGen, der::ED25519_OID),
                };
                (
                    mechanism,
                    Some(vec![Attribute::EcParams(oid.to_vec())]),
                    Vec::new(),
                )
            }
            Algorithm::RsaPssSha256 | Algorithm::RsaPkcs1Sha256 | Algorithm::RsaOaepSha256 => {
                let bits = spec.key_type().rsa_bits().unwrap_or(2048) as u64;
                (
                    Mechanism::RsaPkcsKeyPairGen,
                    Some(vec![
                        Attribute::ModulusBits(bits.into()),
                        Attribute::PublicExponent(vec![1, 0, 1]),
                    ]),
                    Vec::new(),
                )
            }
            Algorithm::Aes256Gcm | Algorithm::HmacSha256 => {
                let (mechanism, key_type) = if spec.algorithm() == Algorithm::Aes256Gcm {
                    (Mechanism::AesKeyGen, CkKeyType::AES)
                } else {
                    (Mechanism::GenericSecretKeyGen, CkKeyType::GENERIC_SECRET)
                };
                (
                    mechanism,
                    None,
                    vec![
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(key_type),
                        Attribute::ValueLen(32.into()),
                    ],
                )
            }
        };
        let is_pair = public_extra.is_some();
        let (public_template, secret_template) = expected.templates(
            id,
            label.as_bytes(),
            public_extra.unwrap_or_default(),
            secret_extra,
        );
        let public_template = is_pair.then_some(&public_template);
        let generated = self.run(
            "generate a key (C_GenerateKey/C_GenerateKeyPair)",
            |me, session| {
                let mut stage = 0;
                loop {
                    let made = template::generate_at(
                        session,
                        &mechanism,
                        public_template,
                        &secret_template,
                        stage,
                    );
                    match made {
                        Err(e) if template::is_template_refusal(&e) && stage + 1 < STAGES => {
                            // A token may leave half a pair behind: nothing else carries this
                            // fresh CKA_ID.
                            for handle in session.find_objects(&[Attribute::Id(id.to_vec())])? {
                                session.destroy_object(handle)?;
                            }
                            stage += 1;
                            tracing::debug!(
                                backend = %me.name,
                                "the token refused the key template ({e:?}); trying again without {}",
                                secret_template.dropped_at(stage)
                            );
                        }
                        // The required attributes refused: the token cannot make this key as
                        // keyhold must (CKR_GENERAL_ERROR is left to `run`: it may be a token
                        // that has gone).
                        Err(e @ cryptoki::error::Error::Pkcs11(rv, _))
                            if template::is_template_refusal(&e)
                                && rv != cryptoki::error::RvError::GeneralError =>
                        {
                            return Ok(Err(rv));
                        }
                        other => return other.map(Ok),
                    }
                }
            },
        )?;
        let (public_handle, secret_handle) = generated.map_err(|rv| Error::Unsupported {
            backend: self.name.clone(),
            what: format!(
                "{} keys with purpose {}{}: {} refused even the required template ({rv:?})",
                spec.key_type(),
                spec.purpose(),
                if expected.is_extractable() {
                    ", extractable only under trusted keys (CKA_WRAP_WITH_TRUSTED)"
                } else {
                    ""
                },
                self.token_name()
            ),
        })?;
        // Keep both handles: finding the public key again would scan every object on the token.
        let mut cache = self.handles();
        cache.insert(
            (id.to_vec(), class_key(expected.secret_class())),
            secret_handle,
        );
        if let Some(public) = public_handle {
            cache.insert((id.to_vec(), class_key(ObjectClass::PUBLIC_KEY)), public);
        }
        drop(cache);

        let inspection = self.run("read key attributes (C_GetAttributeValue)", |_, session| {
            expected.inspect(session, public_handle, secret_handle)
        })?;
        if let Some(problem) = inspection.problem {
            return Err(Error::Unsupported {
                backend: self.name.clone(),
                what: format!(
                    "{} keys with purpose {} as keyhold makes them: {} made one whose {problem}",
                    spec.key_type(),
                    spec.purpose(),
                    self.token_name()
                ),
            });
        }
        let public = if spec.key_type().is_asymmetric() {
            Some(self.read_public_key(spec, expected, id, label)?)
        } else {
            None
        };
        Ok(Made {
            public,
            secret: secret_handle,
            attributes: inspection.attributes,
        })
    }

    /// Decrypts, on the token, a message encrypted to the new key in software exactly as keyhold
    /// encrypts to it: no mechanism flag tells whether a token does RSA-OAEP with SHA-256 and a
    /// label, so this learns it on the real key. A refusal marks RSA decryption unsupported on
    /// this token (and only that); the caller then destroys the key.
    pub(super) fn check_oaep(
        &self,
        spec: &crate::key::KeySpec,
        public: &PublicKey,
        secret: ObjectHandle,
    ) -> Result<()> {
        let label = crate::keystore::oaep_label(CHECK_MESSAGE);
        let ciphertext = public.encrypt_oaep(CHECK_MESSAGE, &label)?;
        let outcome = self.run(
            "check the new key (C_Decrypt, CKM_RSA_PKCS_OAEP)",
            |_, session| {
                let params = PkcsOaepParams::new(
                    MechanismType::SHA256,
                    PkcsMgfType::MGF1_SHA256,
                    PkcsOaepSource::data_specified(&label),
                );
                match session.decrypt(&Mechanism::RsaPkcsOaep(params), secret, &ciphertext) {
                    Ok(plain) => Ok(Ok(zeroize::Zeroizing::new(plain))),
                    // The token's answer to the mechanism itself, not a lost session or token.
                    Err(e) if pool::disposition(&e) == Disposition::Fail => Ok(Err(e)),
                    Err(e) => Err(e),
                }
            },
        )?;
        match outcome {
            Ok(plain) if plain.as_slice() == CHECK_MESSAGE => Ok(()),
            Ok(_) => Err(Error::ConsistencyTest {
                key_type: spec.key_type().as_str(),
            }),
            Err(e) => {
                let why = match &e {
                    cryptoki::error::Error::Pkcs11(rv, f) => format!("{f}: {rv:?}"),
                    other => other.to_string(),
                };
                let lacks = format!(
                    "{} lacks CKM_RSA_PKCS_OAEP with SHA-256 and a label (it refused a new key's \
                     check, {why})",
                    self.token_name()
                );
                tracing::info!(backend = %self.name, "{lacks}");
                let mut learned = self.learned();
                for key_type in KeyType::ALL {
                    if key_type.rsa_bits().is_some()
                        && !learned
                            .iter()
                            .any(|(t, p, _)| *t == key_type && *p == Purpose::Decrypt)
                    {
                        learned.push((key_type, Purpose::Decrypt, lacks.clone()));
                    }
                }
                drop(learned);
                Err(Error::Unsupported {
                    backend: self.name.clone(),
                    what: format!(
                        "{} keys with purpose {}: {lacks}",
                        spec.key_type(),
                        spec.purpose()
                    ),
                })
            }
        }
    }

    pub(super) fn read_public_key(
        &self,
        spec: &crate::key::KeySpec,
        expected: &Expected,
        id: &[u8],
        label: &str,
    ) -> Result<PublicKey> {
        let (key_type, algorithm) = (spec.key_type(), spec.algorithm());
        let attrs = self.with_object(
            id,
            ObjectClass::PUBLIC_KEY,
            expected,
            label,
            "read the public key (C_GetAttributeValue)",
            |session, handle| {
                session.get_attributes(
                    handle,
                    &[
                        AttributeType::EcPoint,
                        AttributeType::Modulus,
                        AttributeType::PublicExponent,
                    ],
                )
            },
        )?;
        let mut point = None;
        let mut modulus = None;
        let mut exponent = None;
        for attr in attrs {
            match attr {
                Attribute::EcPoint(p) => point = Some(p),
                Attribute::Modulus(n) => modulus = Some(n),
                Attribute::PublicExponent(e) => exponent = Some(e),
                _ => {}
            }
        }
        let spki = match (key_type, point, modulus, exponent) {
            (KeyType::EcdsaP256 | KeyType::EcdsaP384 | KeyType::Ed25519, Some(point), _, _) => {
                der::spki_from_point(key_type, &point)?
            }
            (KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096, _, Some(n), Some(e)) => {
                der::spki_from_rsa(&n, &e)?
            }
            _ => return Err(Error::crypto("read a public key from the token")),
        };
        Ok(PublicKey::from_spki_der(key_type, algorithm, spki))
    }
}
