//! Using keys: sign, verify, encrypt, decrypt, MAC, rewrap — each through one gate that resolves
//! the ID, runs the key's due lifecycle work, checks purpose and state, picks the version, and
//! records the use.

use aws_lc_rs::constant_time;

use super::envelope;
use super::oaep_label;
use super::resolve::{Material, Resolved};
use super::{check_input, check_size, Keystore, MAX_ENVELOPE};
use crate::backend::Sealed;
use crate::error::{Error, Result};
use crate::key::{Algorithm, KeyState, KeyUse, Purpose, SignatureFormat};
use crate::public_key::PublicKey;
use crate::secret::SecretBytes;

/// The bytes of a data key ([`Keystore::data_key_with`]): AES-256.
const DATA_KEY_BYTES: usize = 32;

/// How a caller wants a key used, beyond the operation itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct UseOptions {
    /// Let a compromised key decrypt and verify (it never signs, encrypts or computes MACs).
    pub allow_compromised: bool,
    /// Verify (a signature or tag) with this version only, instead of every version not below
    /// the key's `min_decrypt_version`, newest first.
    pub version: Option<u32>,
}

impl UseOptions {
    /// The defaults: compromised keys refused, every allowed version tried.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`UseOptions::allow_compromised`].
    pub fn allow_compromised(mut self, allow: bool) -> Self {
        self.allow_compromised = allow;
        self
    }

    /// Sets [`UseOptions::version`].
    pub fn version(mut self, version: Option<u32>) -> Self {
        self.version = version;
        self
    }
}

/// What a use of a key gave, with which version and in which state.
#[derive(Debug)]
#[non_exhaustive]
pub struct Used<T> {
    /// The result (signature, envelope, plaintext, tag; `()` for checks).
    pub output: T,
    /// The key version that was used.
    pub version: u32,
    /// The key's state when used: [`KeyState::Compromised`] must be flagged to whoever sees the
    /// output.
    pub state: KeyState,
}

/// What an operation needs of the key.
#[derive(Debug, Clone, Copy)]
pub(super) struct Need {
    /// The purpose; `None` for envelopes, whose purpose depends on the key (see
    /// [`envelope_purpose`]).
    pub(super) purpose: Option<Purpose>,
    pub(super) key_use: KeyUse,
    pub(super) operation: &'static str,
}

impl Need {
    const fn new(purpose: Purpose, key_use: KeyUse, operation: &'static str) -> Self {
        Self {
            purpose: Some(purpose),
            key_use,
            operation,
        }
    }

    /// An envelope operation (`encrypt`, `decrypt`).
    const fn envelope(key_use: KeyUse, operation: &'static str) -> Self {
        Self {
            purpose: None,
            key_use,
            operation,
        }
    }
}

/// The purpose envelopes need of a key: `decrypt` for an RSA-OAEP key (which encrypts with its
/// public half), `encrypt` otherwise.
fn envelope_purpose(resolved: &Resolved) -> Purpose {
    match resolved.spec.algorithm() {
        Algorithm::RsaOaepSha256 => Purpose::Decrypt,
        _ => Purpose::Encrypt,
    }
}

impl Keystore {
    /// The one gate of every key use: resolves `id`, runs the key's due lifecycle work, checks
    /// purpose and state, runs `op` (which returns its output and the version it used) and
    /// records the use in the audit log, whatever its outcome.
    pub(super) fn act<T>(
        &self,
        id: &str,
        need: Need,
        options: &UseOptions,
        op: impl FnOnce(&Resolved) -> Result<(T, u32)>,
    ) -> Result<Used<T>> {
        let resolved = match self.resolve_current(id) {
            Ok(resolved) => resolved,
            Err(e) => {
                if !super::memory_only::would_wait() {
                    self.audit_refused(id, need.operation, &e);
                }
                return Err(e);
            }
        };
        if super::memory_only::in_scope() && self.audit_backlogged() {
            // Its entry would be written by this call, with the log's backlog.
            super::memory_only::may_wait("write the audit log's backlog")?;
        }
        let result = self
            .permit(&resolved, need, options)
            .and_then(|()| op(&resolved));
        if super::memory_only::would_wait() {
            // Stopped before the key was used: nothing to audit.
            return Err(result.err().unwrap_or_else(|| Error::Crypto {
                operation: "answer from memory only",
            }));
        }
        let (outcome, version) = match &result {
            Ok((_, version)) => ("ok", Some(*version)),
            Err(e) => (e.kind(), None),
        };
        self.audit_use(&resolved, need.operation, version, outcome);
        let (output, version) = result?;
        tracing::debug!(key = %resolved.label, operation = need.operation, version, "used key");
        if resolved.state == KeyState::Compromised {
            tracing::warn!(key = %resolved.label, "used a compromised key ({})", need.operation);
        }
        Ok(Used {
            output,
            version,
            state: resolved.state,
        })
    }

    /// Whether the resolved key may be used as `need` says: its purpose, its state, and a pending
    /// destruction (which leaves only processing).
    fn permit(&self, resolved: &Resolved, need: Need, options: &UseOptions) -> Result<()> {
        let purpose = need.purpose.unwrap_or_else(|| envelope_purpose(resolved));
        if resolved.spec.purpose() != purpose {
            return Err(Error::WrongPurpose {
                key: resolved.label().to_owned(),
                purpose: resolved.spec.purpose().as_str(),
                operation: need.operation,
            });
        }
        let state = resolved.state;
        if !state.allows(need.key_use, options.allow_compromised) {
            return Err(self.wrong_state(resolved, need.operation, need.key_use));
        }
        if let (Some(at), KeyUse::Protect) = (resolved.record.destroy_at, need.key_use) {
            return Err(Error::WrongState {
                key: resolved.label.clone(),
                state: format!(
                    "scheduled for destruction on {}",
                    crate::time::format_utc(at)
                ),
                operation: need.operation,
                hint: "; until then it only decrypts and verifies (`keyhold key cancel-destroy` \
                       keeps it)"
                    .into(),
            });
        }
        Ok(())
    }

    /// Signs `message` with the signing key `id`.
    ///
    /// # Errors
    /// [`Error::WrongPurpose`], [`Error::WrongState`], [`Error::InvalidInput`] for empty or
    /// oversized input, resolution and backend errors.
    pub fn sign(&self, id: &str, message: &[u8], format: SignatureFormat) -> Result<Vec<u8>> {
        Ok(self
            .sign_with(id, message, format, &UseOptions::default())?
            .output)
    }

    /// [`Self::sign`], saying which version signed.
    ///
    /// # Errors
    /// As [`Self::sign`].
    pub fn sign_with(
        &self,
        id: &str,
        message: &[u8],
        format: SignatureFormat,
        options: &UseOptions,
    ) -> Result<Used<Vec<u8>>> {
        let need = Need::new(Purpose::Sign, KeyUse::Protect, "sign");
        self.act(id, need, options, |resolved| {
            check_input(message, "sign")?;
            let current = resolved.current()?;
            let backend = self.backend(&resolved.record.backend)?;
            let signature = backend.sign(self.key_ref(resolved, current), message, format)?;
            Ok((signature, current.version))
        })
    }

    /// Checks `signature` over `message` with the public half of the signing key `id`.
    ///
    /// # Errors
    /// [`Error::VerificationFailed`] for an invalid signature; [`Error::WrongPurpose`],
    /// [`Error::WrongState`]; resolution errors.
    pub fn verify(
        &self,
        id: &str,
        message: &[u8],
        signature: &[u8],
        format: SignatureFormat,
    ) -> Result<()> {
        self.verify_with(id, message, signature, format, &UseOptions::default())
            .map(|_| ())
    }

    /// [`Self::verify`], saying which version verified: [`UseOptions::version`], else every
    /// version not below the key's `min_decrypt_version`, newest first.
    ///
    /// # Errors
    /// As [`Self::verify`].
    pub fn verify_with(
        &self,
        id: &str,
        message: &[u8],
        signature: &[u8],
        format: SignatureFormat,
        options: &UseOptions,
    ) -> Result<Used<()>> {
        let need = Need::new(Purpose::Sign, KeyUse::Process, "verify");
        self.act(id, need, options, |resolved| {
            check_input(message, "verify")?;
            self.first_that_verifies(resolved, options, "signature", |material| {
                Self::public_key_of(resolved, material)?.verify(message, signature, format)
            })
        })
    }

    /// Runs `check` with each version a check may use ([`UseOptions::version`], else newest to
    /// `min_decrypt_version`) until one passes; the last failure if none does.
    fn first_that_verifies(
        &self,
        resolved: &Resolved,
        options: &UseOptions,
        what: &'static str,
        mut check: impl FnMut(Material<'_>) -> Result<()>,
    ) -> Result<((), u32)> {
        let versions: Vec<u32> = match options.version {
            Some(v) => vec![self.processing_version(resolved, v, "verify")?.version],
            None => (resolved.record.min_decrypt_version..=resolved.record.version)
                .rev()
                .collect(),
        };
        // A version that could not be checked (a device away) must not read as "invalid": its
        // error wins over another version's mismatch.
        let mut failure = None;
        for version in versions {
            let Some(material) = resolved.material(version) else {
                continue;
            };
            match check(material) {
                Ok(()) => return Ok(((), version)),
                Err(Error::VerificationFailed { .. }) => {}
                // Stopped where it would have waited: no other version is tried from memory.
                Err(e) if super::memory_only::would_wait() => return Err(e),
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        Err(failure.unwrap_or(Error::VerificationFailed { what }))
    }

    /// The material of `version` for processing: refused below `min_decrypt_version`.
    fn processing_version<'a>(
        &self,
        resolved: &'a Resolved,
        version: u32,
        operation: &'static str,
    ) -> Result<Material<'a>> {
        let min = resolved.record.min_decrypt_version;
        if version < min && version >= 1 {
            return Err(Error::WrongState {
                key: resolved.label.clone(),
                state: format!("retired below version {min}"),
                operation,
                hint: format!(
                    " with version {version}; `keyhold key set --min-decrypt-version {version}` \
                     would allow it again"
                ),
            });
        }
        resolved.material(version).ok_or_else(|| match operation {
            "decrypt" => Error::DecryptionFailed {
                reason: "the envelope names a version the key does not have",
            },
            _ => Error::InvalidInput(format!(
                "key `{}` has versions 1 to {}, not {version}",
                resolved.label, resolved.record.version
            )),
        })
    }

    /// The recorded public key of one version of an asymmetric key.
    pub(super) fn public_key_of(resolved: &Resolved, material: Material<'_>) -> Result<PublicKey> {
        let der = material.public_key.ok_or_else(|| {
            Error::InvalidInput(format!(
                "key `{}` is a {} secret key: it has no public key",
                resolved.label(),
                resolved.spec.key_type()
            ))
        })?;
        Ok(PublicKey::from_spki_der(
            resolved.spec.key_type(),
            resolved.spec.algorithm(),
            der.to_vec(),
        ))
    }

    /// Encrypts `plaintext` to the key `id`: AES-256-GCM in the backend for `encrypt` keys,
    /// RSA-OAEP on the public key for RSA `decrypt` keys. Returns an envelope naming the version.
    ///
    /// # Errors
    /// [`Error::WrongPurpose`], [`Error::WrongState`], [`Error::InvalidInput`] (empty, oversized,
    /// or too long for OAEP).
    pub fn encrypt(&self, id: &str, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        Ok(self
            .encrypt_with(id, plaintext, aad, &UseOptions::default())?
            .output)
    }

    /// [`Self::encrypt`], saying which version encrypted.
    ///
    /// # Errors
    /// As [`Self::encrypt`].
    pub fn encrypt_with(
        &self,
        id: &str,
        plaintext: &[u8],
        aad: &[u8],
        options: &UseOptions,
    ) -> Result<Used<Vec<u8>>> {
        // An RSA `decrypt` key encrypts with its public half: the purpose check is decrypt's.
        let need = Need::envelope(KeyUse::Protect, "encrypt");
        self.act(id, need, options, |resolved| {
            check_input(plaintext, "encrypt")?;
            self.encrypt_resolved(resolved, plaintext, aad)
        })
    }

    /// A fresh data key (AES-256, 32 bytes from aws-lc's generator) and its envelope under the
    /// key `id`, with `aad` (envelope encryption, as AWS KMS's `GenerateDataKey`): the key is
    /// checked as for [`Self::encrypt_with`], and the use is audited as `datakey`, or as
    /// `datakey-wrapped` when `wrapped_only` says the caller keeps the envelope only.
    ///
    /// # Errors
    /// As [`Self::encrypt`].
    pub fn data_key_with(
        &self,
        id: &str,
        aad: &[u8],
        wrapped_only: bool,
        options: &UseOptions,
    ) -> Result<Used<(SecretBytes, Vec<u8>)>> {
        // The names of the service's operations, which the audit log takes as they are (and a
        // refused data key says "it cannot make a data key").
        let operation = if wrapped_only {
            "make a wrapped data key"
        } else {
            "make a data key"
        };
        let need = Need::envelope(KeyUse::Protect, operation);
        self.act(id, need, options, |resolved| {
            let mut key = SecretBytes::zeroed(DATA_KEY_BYTES);
            aws_lc_rs::rand::fill(key.expose_mut())
                .map_err(|_| Error::crypto("make a data key"))?;
            let (envelope, version) = self.encrypt_resolved(resolved, key.expose(), aad)?;
            Ok(((key, envelope), version))
        })
    }

    /// Encrypts under the current version of an authorised key; returns the envelope and version.
    fn encrypt_resolved(
        &self,
        resolved: &Resolved,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<(Vec<u8>, u32)> {
        let header = |algorithm, version| envelope::Header {
            algorithm,
            uuid: resolved.record.uuid,
            version,
        };
        if resolved.spec.algorithm() == Algorithm::RsaOaepSha256 {
            let current = resolved.current()?;
            let header = header(Algorithm::RsaOaepSha256, current.version);
            let body = Self::public_key_of(resolved, current)?
                .encrypt_oaep(plaintext, &oaep_label(&header.aad(aad)))?;
            return Ok((envelope::encode(header, &[], &body), current.version));
        }
        // AES-GCM with random nonces: each encryption takes one of the version's invocations
        // (NIST SP 800-38D §8.3); when they run out the key rotates and the new version encrypts.
        let rotated;
        let resolved = match self.take_invocation(resolved)? {
            true => resolved,
            false => {
                rotated = self.rotate_exhausted(resolved)?;
                rotated.as_ref()
            }
        };
        let current = resolved.current()?;
        let header = header(Algorithm::Aes256Gcm, current.version);
        let backend = self.backend(&resolved.record.backend)?;
        let sealed =
            backend.encrypt(self.key_ref(resolved, current), plaintext, &header.aad(aad))?;
        Ok((
            envelope::encode_into(header, &sealed.nonce, sealed.ciphertext),
            current.version,
        ))
    }

    /// Decrypts an envelope made by [`Self::encrypt`] for the key `id`, with the same `aad`.
    ///
    /// # Errors
    /// [`Error::DecryptionFailed`] for anything that does not authenticate (deliberately
    /// undetailed); [`Error::WrongPurpose`]; [`Error::WrongState`] (also for a version below the
    /// key's `min_decrypt_version`).
    pub fn decrypt(&self, id: &str, input: &[u8], aad: &[u8]) -> Result<SecretBytes> {
        Ok(self
            .decrypt_with(id, input, aad, &UseOptions::default())?
            .output)
    }

    /// [`Self::decrypt`], saying which version decrypted.
    ///
    /// # Errors
    /// As [`Self::decrypt`].
    pub fn decrypt_with(
        &self,
        id: &str,
        input: &[u8],
        aad: &[u8],
        options: &UseOptions,
    ) -> Result<Used<SecretBytes>> {
        let need = Need::envelope(KeyUse::Process, "decrypt");
        self.act(id, need, options, |resolved| {
            self.decrypt_resolved(resolved, input, aad)
        })
    }

    fn decrypt_resolved(
        &self,
        resolved: &Resolved,
        input: &[u8],
        aad: &[u8],
    ) -> Result<(SecretBytes, u32)> {
        check_size(input, "decrypt", MAX_ENVELOPE)?;
        let env = envelope::decode(input)?;
        if env.header.uuid != resolved.record.uuid
            || env.header.algorithm != resolved.spec.algorithm()
        {
            return Err(Error::DecryptionFailed {
                reason: "the envelope was made for another key",
            });
        }
        let material = self.processing_version(resolved, env.header.version, "decrypt")?;
        let sealed = Sealed {
            nonce: env.nonce.to_vec(),
            ciphertext: env.body.to_vec(),
        };
        let binding = env.header.aad(aad);
        let backend = self.backend(&resolved.record.backend)?;
        let key = self.key_ref(resolved, material);
        let plaintext = match resolved.spec.algorithm() {
            Algorithm::RsaOaepSha256 => backend.decrypt(key, &sealed, &oaep_label(&binding)),
            _ => backend.decrypt(key, &sealed, &binding),
        }?;
        Ok((plaintext, material.version))
    }

    /// Re-encrypts an envelope of the key `id` under its newest version, with the same `aad`: the
    /// plaintext never leaves this process (it is zeroized once re-encrypted).
    ///
    /// # Errors
    /// As [`Self::decrypt`], then as [`Self::encrypt`] (the key must be active to re-encrypt).
    pub fn rewrap(
        &self,
        id: &str,
        input: &[u8],
        aad: &[u8],
        options: &UseOptions,
    ) -> Result<Used<Vec<u8>>> {
        let plaintext = self.decrypt_with(id, input, aad, options)?;
        self.encrypt_with(id, plaintext.output.expose(), aad, options)
    }

    /// Computes the HMAC-SHA256 tag of `data` with the MAC key `id`.
    ///
    /// # Errors
    /// [`Error::WrongPurpose`], [`Error::WrongState`], [`Error::InvalidInput`]; resolution and
    /// backend errors.
    pub fn mac(&self, id: &str, data: &[u8]) -> Result<Vec<u8>> {
        Ok(self.mac_with(id, data, &UseOptions::default())?.output)
    }

    /// [`Self::mac`], saying which version computed the tag.
    ///
    /// # Errors
    /// As [`Self::mac`].
    pub fn mac_with(&self, id: &str, data: &[u8], options: &UseOptions) -> Result<Used<Vec<u8>>> {
        let need = Need::new(Purpose::Mac, KeyUse::Protect, "compute a MAC");
        self.act(id, need, options, |resolved| {
            check_input(data, "mac")?;
            let current = resolved.current()?;
            let backend = self.backend(&resolved.record.backend)?;
            Ok((
                backend.mac(self.key_ref(resolved, current), data)?,
                current.version,
            ))
        })
    }

    /// Checks `tag` over `data` in constant time.
    ///
    /// # Errors
    /// [`Error::VerificationFailed`] for a wrong tag; as [`Self::mac`] otherwise.
    pub fn verify_mac(&self, id: &str, data: &[u8], tag: &[u8]) -> Result<()> {
        self.verify_mac_with(id, data, tag, &UseOptions::default())
            .map(|_| ())
    }

    /// [`Self::verify_mac`], saying which version's tag matched ([`UseOptions::version`], else
    /// every version not below `min_decrypt_version`, newest first).
    ///
    /// # Errors
    /// As [`Self::verify_mac`].
    pub fn verify_mac_with(
        &self,
        id: &str,
        data: &[u8],
        tag: &[u8],
        options: &UseOptions,
    ) -> Result<Used<()>> {
        let need = Need::new(Purpose::Mac, KeyUse::Process, "check a MAC");
        self.act(id, need, options, |resolved| {
            check_input(data, "mac")?;
            let backend = self.backend(&resolved.record.backend)?;
            self.first_that_verifies(resolved, options, "tag", |material| {
                let expected = backend.mac(self.key_ref(resolved, material), data)?;
                constant_time::verify_slices_are_equal(&expected, tag)
                    .map_err(|_| Error::VerificationFailed { what: "tag" })
            })
        })
    }
}
