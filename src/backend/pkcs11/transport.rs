//! Key transport with a token: importing material that came from outside (its export is in
//! `export.rs`).
//!
//! Import: the material is wrapped in this process (RFC 5649) under a fresh AES key that keyhold
//! puts into the token as a session object, and `C_UnwrapKey` (`CKM_AES_KEY_WRAP_PAD`) makes the
//! key from it: so the token itself parses the PKCS#8 of a private key, and the key's value is
//! never an attribute in a template. The session key is destroyed right after.

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType as CkKeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use zeroize::Zeroize;

use super::template::{Expected, STAGES};
use super::{Pkcs11Backend, IMPORTED_BLOB};
use crate::backend::software::Fresh;
use crate::backend::{Backend as _, GeneratedKey, KeyContext, KeyOptions, KeyRef};
use crate::error::{Error, Result};
use crate::key::{Algorithm, KeyType, SignatureFormat};
use crate::secret::SecretBytes;

/// What a consistency check of an imported key signs, MACs or encrypts.
const CHECK_MESSAGE: &[u8] = b"keyhold PKCS#11 imported-key check";

/// Destroys the session wrapping key however the import ends.
struct SessionKey<'s> {
    session: &'s Session,
    handle: ObjectHandle,
}

impl Drop for SessionKey<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.session.destroy_object(self.handle) {
            tracing::debug!("could not destroy the session wrapping key: {e}");
        }
    }
}

impl Pkcs11Backend {
    /// Imports `material` (checked and put in canonical form by the caller) as the key `id`.
    pub(super) fn import_objects(
        &self,
        context: KeyContext<'_>,
        fresh: &Fresh,
        id: &[u8],
    ) -> Result<ObjectHandle> {
        let (material, public) = (&fresh.material, fresh.public.as_ref());
        let spec = context.spec;
        let expected = Expected::imported(spec);
        let (class, key_type) = match spec.key_type() {
            KeyType::EcdsaP256 | KeyType::EcdsaP384 => (ObjectClass::PRIVATE_KEY, CkKeyType::EC),
            KeyType::Ed25519 => (ObjectClass::PRIVATE_KEY, CkKeyType::EC_EDWARDS),
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
                (ObjectClass::PRIVATE_KEY, CkKeyType::RSA)
            }
            KeyType::Aes256Gcm => (ObjectClass::SECRET_KEY, CkKeyType::AES),
            KeyType::HmacSha256 => (ObjectClass::SECRET_KEY, CkKeyType::GENERIC_SECRET),
        };
        let secret_extra = vec![Attribute::Class(class), Attribute::KeyType(key_type)];
        let (public_template, secret_template) =
            expected.templates(id, context.label.as_bytes(), Vec::new(), secret_extra);
        let public_template = match public_attributes(spec.key_type(), material, public)? {
            Some(mut attrs) => {
                attrs.extend(public_template.at(STAGES - 1));
                attrs.extend([
                    Attribute::Class(ObjectClass::PUBLIC_KEY),
                    Attribute::KeyType(key_type),
                ]);
                Some(attrs)
            }
            None => None,
        };
        let mut transit = SecretBytes::zeroed(32);
        aws_lc_rs::rand::fill(transit.expose_mut())
            .map_err(|_| Error::crypto("make a transport key"))?;
        let wrapped = crate::backend::wrap::kwp_wrap(transit.expose(), material.expose())?;
        let (iv, encrypted) = cbc_pad_encrypt(transit.expose(), material.expose())?;
        let made = self.run(
            "import a key (C_UnwrapKey, CKM_AES_KEY_WRAP_PAD or CKM_AES_CBC_PAD)",
            |_, session| {
                let mut kek_template = vec![
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(CkKeyType::AES),
                    Attribute::Token(false),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Unwrap(true),
                    Attribute::Value(transit.expose().to_vec()),
                ];
                let created = session.create_object(&kek_template);
                // The template's copy of the transport key goes now, not when the allocator reuses it.
                for attr in &mut kek_template {
                    if let Attribute::Value(v) = attr {
                        v.zeroize();
                    }
                }
                let kek = SessionKey {
                    session,
                    handle: created?,
                };
                // The required attributes only, in one try: SoftHSM 2.6 answers a template it
                // refuses in C_UnwrapKey (CKA_COPYABLE, CKA_DESTROYABLE, CKA_VALUE_LEN, explicit
                // `false` usages) with CKR_ATTRIBUTE_READ_ONLY *and leaves a token object behind*
                // with neither CKA_ID nor label, which nothing can find again. Usages the token adds
                // are cleared afterwards, as for generated keys (`Expected::inspect`).
                let template = secret_template.at(STAGES - 1);
                // RFC 5649 where the token has it; else AES-CBC with PKCS#7 padding, which
                // openCryptoki 3.8 has (the transport key is fresh and used once, and the key
                // made is checked against its material right after: no integrity is lost).
                let secret = match session.unwrap_key(
                    &Mechanism::AesKeyWrapPad,
                    kek.handle,
                    &wrapped,
                    &template,
                ) {
                    Err(CkError::Pkcs11(RvError::MechanismInvalid, _)) => session.unwrap_key(
                        &Mechanism::AesCbcPad(iv),
                        kek.handle,
                        &encrypted,
                        &template,
                    )?,
                    other => other?,
                };
                // openCryptoki 3.8 makes an unwrapped key neither sensitive nor unextractable
                // whatever the template says: set what is not so (a one-way change tokens allow;
                // SoftHSM refuses to set either again once it is so).
                let wanted = [Attribute::Sensitive(true), Attribute::Extractable(false)];
                let kinds = [AttributeType::Sensitive, AttributeType::Extractable];
                let now = session.get_attributes(secret, &kinds)?;
                let unset: Vec<Attribute> =
                    wanted.into_iter().filter(|w| !now.contains(w)).collect();
                if !unset.is_empty() {
                    session.update_attributes(secret, &unset)?;
                }
                // The public half as a generated key has it: `key pubkey` reads it back, and
                // `doctor` finds both halves.
                if let Some(public) = &public_template {
                    session.create_object(public)?;
                }
                Ok(secret)
            },
        );
        let handle = made.map_err(|e| match e {
            Error::Backend { ref source, .. } if lacks_mechanism(source.as_ref()) => {
                Error::Unsupported {
                    backend: self.name.clone(),
                    what: format!(
                        "importing keys: {} lacks both CKM_AES_KEY_WRAP_PAD and CKM_AES_CBC_PAD \
                         for C_UnwrapKey, which keyhold imports with",
                        self.token_name()
                    ),
                }
            }
            // The token had the mechanism and the wrapping key but would not make this key
            // from it (SoftHSM 2.6 unwraps no Ed25519 PKCS#8).
            Error::Backend { ref source, .. } if unwrap_refused(source.as_ref()) => {
                Error::Unsupported {
                    backend: self.name.clone(),
                    what: format!(
                        "importing {} keys: {} refused to unwrap one (C_UnwrapKey: \
                         CKR_FUNCTION_FAILED)",
                        spec.key_type(),
                        self.token_name()
                    ),
                }
            }
            other => other,
        })?;
        // Not cached: the check that follows finds the key as every later use will.
        Ok(handle)
    }

    /// Uses the imported key once on the token and checks the result in software against the
    /// material it came from: the token holds that key, with the usage keyhold needs.
    pub(super) fn check_imported(
        &self,
        key: KeyRef<'_>,
        material: &SecretBytes,
        public: Option<&crate::public_key::PublicKey>,
    ) -> Result<()> {
        let spec = key.context.spec;
        let failed = || Error::ConsistencyTest {
            key_type: spec.key_type().as_str(),
        };
        match (spec.algorithm(), public) {
            (Algorithm::HmacSha256, _) => {
                let tag = self.mac(key, CHECK_MESSAGE)?;
                let hkey =
                    aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, material.expose());
                aws_lc_rs::hmac::verify(&hkey, CHECK_MESSAGE, &tag).map_err(|_| failed())
            }
            (Algorithm::Aes256Gcm, _) => {
                let sealed = self.encrypt(key, CHECK_MESSAGE, b"check")?;
                let software =
                    crate::backend::software::aes_open(material.expose(), &sealed, b"check")
                        .map_err(|_| failed())?;
                if software.expose() == CHECK_MESSAGE {
                    Ok(())
                } else {
                    Err(failed())
                }
            }
            (Algorithm::RsaOaepSha256, Some(public)) => {
                let handle = self.with_key(&key, "find the imported key", |_, h| Ok(h))?;
                self.check_oaep(spec, public, handle)
            }
            (_, Some(public)) => {
                let sig = self.sign(key, CHECK_MESSAGE, SignatureFormat::Der)?;
                public
                    .verify(CHECK_MESSAGE, &sig, SignatureFormat::Der)
                    .map_err(|_| failed())
            }
            (_, None) => Err(failed()),
        }
    }

    /// Imports, checks and describes a key; on any failure nothing is left on the token.
    pub(super) fn import(
        &self,
        context: KeyContext<'_>,
        material: &SecretBytes,
        options: &KeyOptions,
    ) -> Result<GeneratedKey> {
        let spec = context.spec;
        if options.extractable {
            return Err(Error::Unsupported {
                backend: self.name.clone(),
                what: "exportable imported keys: a key imported into a token stays in it (import \
                       it into software to keep it exportable)"
                    .into(),
            });
        }
        self.capabilities()?
            .require(&self.name, spec.key_type(), spec.purpose())?;
        let fresh = crate::backend::software::imported_material(
            spec.key_type(),
            spec.algorithm(),
            material.expose(),
        )?;
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&context.store_id[..8]);
        aws_lc_rs::rand::fill(&mut id[8..]).map_err(|_| Error::crypto("make a CKA_ID"))?;
        let locator = crate::hex::encode(&id);
        let made = self
            .import_objects(context, &fresh, &id)
            .and_then(|handle| {
                let key = KeyRef {
                    context,
                    locator: &locator,
                    blob: Some(IMPORTED_BLOB),
                };
                self.check_imported(key, &fresh.material, fresh.public.as_ref())?;
                if let Some(public) = &fresh.public {
                    if &self.public_key(key)? != public {
                        return Err(Error::ConsistencyTest {
                            key_type: spec.key_type().as_str(),
                        });
                    }
                }
                let expected = Expected::imported(spec);
                let inspection = self
                    .run("read key attributes (C_GetAttributeValue)", |_, s| {
                        expected.inspect(s, None, handle)
                    })?;
                if let Some(problem) = inspection.problem {
                    return Err(Error::Unsupported {
                        backend: self.name.clone(),
                        what: format!(
                            "imported {} keys as keyhold needs them: {} made one whose {problem}",
                            spec.key_type(),
                            self.token_name()
                        ),
                    });
                }
                Ok(inspection.attributes)
            });
        match made {
            Ok(attributes) => Ok(GeneratedKey {
                locator,
                blob: Some(IMPORTED_BLOB.to_vec()),
                public_key: fresh.public,
                attributes,
            }),
            Err(e) => {
                // Leave nothing half-made on the token.
                if let Err(cleanup) = self.destroy_objects(&id) {
                    tracing::error!(backend = %self.name, "could not remove a half-imported key: {cleanup}");
                }
                Err(e)
            }
        }
    }
}

/// `material` encrypted with AES-256-CBC and PKCS#7 padding under `key`, with a random IV.
fn cbc_pad_encrypt(key: &[u8], material: &[u8]) -> Result<([u8; 16], Vec<u8>)> {
    use aws_lc_rs::cipher::{PaddedBlockEncryptingKey, UnboundCipherKey, AES_256};
    let failed = || Error::crypto("AES-CBC encryption of a key for import");
    let cipher = UnboundCipherKey::new(&AES_256, key)
        .and_then(PaddedBlockEncryptingKey::cbc_pkcs7)
        .map_err(|_| failed())?;
    // Room for the padding up front: the buffer must not reallocate and leave a plaintext copy.
    let mut buf = zeroize::Zeroizing::new(Vec::with_capacity(material.len() + 16));
    buf.extend_from_slice(material);
    let context = cipher.encrypt(&mut *buf).map_err(|_| failed())?;
    let iv: &[u8] = (&context).try_into().map_err(|_| failed())?;
    let iv: [u8; 16] = iv.try_into().map_err(|_| failed())?;
    Ok((iv, buf.to_vec()))
}

/// The attributes of the public key object of an imported private key (`material`, PKCS#8,
/// whose public key is `public`), or `None` for a secret key.
fn public_attributes(
    key_type: KeyType,
    material: &SecretBytes,
    public: Option<&crate::public_key::PublicKey>,
) -> Result<Option<Vec<Attribute>>> {
    use aws_lc_rs::signature::KeyPair as _;
    let failed = || Error::crypto("read the public half of an imported key");
    let (oid, len) = match key_type {
        KeyType::EcdsaP256 => (crate::der::P256_OID, 65),
        KeyType::EcdsaP384 => (crate::der::P384_OID, 97),
        KeyType::Ed25519 => (crate::der::ED25519_OID, 32),
        KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
            let pair =
                aws_lc_rs::rsa::KeyPair::from_pkcs8(material.expose()).map_err(|_| failed())?;
            let components =
                aws_lc_rs::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public_key());
            return Ok(Some(vec![
                Attribute::Modulus(components.n),
                Attribute::PublicExponent(components.e),
            ]));
        }
        KeyType::Aes256Gcm | KeyType::HmacSha256 => return Ok(None),
    };
    // The SPKI of an EC or Ed25519 key ends with the raw point, which CKA_EC_POINT holds as a
    // DER OCTET STRING (shorter than 128 bytes: one length byte).
    let spki = public.ok_or_else(failed)?.spki_der();
    let raw = spki
        .get(spki.len().saturating_sub(len)..)
        .ok_or_else(failed)?;
    if crate::der::spki_from_point(key_type, raw)? != spki {
        return Err(failed());
    }
    let mut point = vec![0x04, u8::try_from(len).map_err(|_| failed())?];
    point.extend_from_slice(raw);
    Ok(Some(vec![
        Attribute::EcParams(oid.to_vec()),
        Attribute::EcPoint(point),
    ]))
}

/// Whether a device error is `C_UnwrapKey` failing without a reason.
fn unwrap_refused(e: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    use cryptoki::context::Function;
    use cryptoki::error::{Error as CkError, RvError};
    matches!(
        e.downcast_ref::<CkError>(),
        Some(CkError::Pkcs11(
            RvError::FunctionFailed,
            Function::UnwrapKey
        ))
    )
}

/// Whether a device error says the token does not have the mechanism asked for.
fn lacks_mechanism(e: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    use cryptoki::error::{Error as CkError, RvError};
    matches!(
        e.downcast_ref::<CkError>(),
        Some(CkError::Pkcs11(
            RvError::MechanismInvalid | RvError::MechanismParamInvalid,
            _
        ))
    )
}
