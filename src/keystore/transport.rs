//! Key transport: exporting an exportable key wrapped (RFC 5649 under a key of the store or, for
//! a token key, under a key its security officer marked trusted; or `CKM_RSA_AES_KEY_WRAP` to
//! an RSA public key), and importing a key — wrapped, or a private key or raw secret brought from
//! outside — into any backend that can hold it.
//!
//! The rules: only keys created or imported with `--exportable` leave, and only wrapped, by their
//! own backend. An export is a use of the key and of the wrapping key, each audited; both must be
//! active (a suspended, deactivated, compromised, pre-activation or destroyed key, or one whose
//! destruction is scheduled, is refused: an export hands out the power to protect with the key).
//! A token's trusted wrapping key is no key of the store: it has no state, and only the export
//! is audited.
//! An import unwraps with a key that may process (active, suspended or deactivated), goes through
//! the same recording path as a creation, and is recorded `origin: imported` (never always
//! sensitive). A failed import records nothing and leaves nothing in the backend.

use std::collections::BTreeMap;

use super::resolve::Resolved;
use super::{check_input, KeyInfo, KeyRequest, Keystore, Made};
use crate::backend::software::SoftwareBackend;
use crate::backend::{wrap, KeyContext, KeyOptions, Wrapping};
use crate::error::{Error, Result};
use crate::key::{validate_name, Algorithm, KeyUse, Purpose};
use crate::secret::SecretBytes;

/// What a key is exported to.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum ExportTo<'a> {
    /// Wrapped under this AES-256 key of the store (its key ID): RFC 5649 AES key wrap with
    /// padding, in the exported key's backend (which must hold both).
    Key(&'a str),
    /// Wrapped to this RSA public key (PEM `PUBLIC KEY` or SPKI DER) as `CKM_RSA_AES_KEY_WRAP`
    /// does: RSA-OAEP-SHA256 of a fresh AES-256 key, then RFC 5649 under it.
    Public(&'a [u8]),
    /// Wrapped inside the key's token under the AES-256 key with this label (`CKA_LABEL`) that
    /// the token's security officer marked trusted (`CKA_TRUSTED`): RFC 5649, as [`Self::Key`].
    /// For token keys only.
    Trusted(&'a str),
}

/// The attribute recorded for an imported key.
const ORIGIN: &str = "origin";

impl Keystore {
    /// Exports the current version of the exportable key `id`, wrapped as `to` says. The
    /// wrapped material is PKCS#8 DER (`PrivateKeyInfo`) for a private key and the raw 32
    /// bytes for an AES or HMAC key.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a key not created exportable, a wrapping key that is not an
    /// AES-256 key, a public key that is not RSA of at least 2048 bits, or a label that names
    /// no trusted wrapping key (or several) on the key's token; [`Error::WrongState`] unless
    /// both keys are active; [`Error::Unsupported`] when the key's backend cannot wrap it so (a
    /// token key under a store key or to a public key, a software key under a trusted label, a
    /// TPM key, a wrapping key in another backend, a token without RFC 5649); resolution errors.
    pub fn export_key(&self, id: &str, to: ExportTo<'_>) -> Result<Vec<u8>> {
        self.transport_use(id, "export", |key| self.export_resolved(key, to))
    }

    /// Resolves `id` and runs `op` on it (a use of the key in its current version), recording
    /// the use as `operation` in the audit log, whatever its outcome.
    fn transport_use<T>(
        &self,
        id: &str,
        operation: &'static str,
        op: impl FnOnce(&Resolved) -> Result<T>,
    ) -> Result<T> {
        let key = match self.resolve_current(id) {
            Ok(key) => key,
            Err(e) => {
                self.audit_refused(id, operation, &e);
                return Err(e);
            }
        };
        let result = op(&key);
        let (outcome, version) = match &result {
            Ok(_) => ("ok", Some(key.record.version)),
            Err(e) => (e.kind(), None),
        };
        self.audit_use(&key, operation, version, outcome);
        result
    }

    fn export_resolved(&self, key: &Resolved, to: ExportTo<'_>) -> Result<Vec<u8>> {
        self.permit_transport(key, "be exported", KeyUse::Protect)?;
        if !Self::is_exportable(key)? {
            return Err(Error::InvalidInput(format!(
                "key `{}` is not exportable: only keys created or imported with --exportable \
                 leave keyhold (wrapped); its public key travels freely (`keyhold key pubkey`)",
                key.label
            )));
        }
        match to {
            ExportTo::Public(public) => {
                let spki = match wrap::pem_block(public, "PUBLIC KEY")? {
                    Some(der) => der.expose().to_vec(),
                    None => public.to_vec(),
                };
                let backend = self.backend(&key.record.backend)?;
                backend.wrap_key(
                    self.key_ref(key, key.current()?),
                    Wrapping::RsaPublic(&spki),
                )
            }
            ExportTo::Key(kek_id) => {
                self.transport_use(kek_id, "wrap", |kek| self.wrap_under(key, kek))
            }
            ExportTo::Trusted(label) => {
                if label.is_empty() {
                    return Err(Error::InvalidInput(
                        "the trusted wrapping key's label is empty: give the CKA_LABEL the \
                         token's security officer gave it"
                            .into(),
                    ));
                }
                let backend = self.backend(&key.record.backend)?;
                backend.wrap_key(self.key_ref(key, key.current()?), Wrapping::Trusted(label))
            }
        }
    }

    /// Wraps the current version of `key` under the current version of `kek`, in their backend.
    fn wrap_under(&self, key: &Resolved, kek: &Resolved) -> Result<Vec<u8>> {
        if kek.spec.algorithm() != Algorithm::Aes256Gcm {
            return Err(Error::InvalidInput(format!(
                "key `{}` is a {} key: keys are wrapped under an aes-256-gcm key",
                kek.label,
                kek.spec.key_type()
            )));
        }
        self.permit_transport(kek, "wrap a key", KeyUse::Protect)?;
        if kek.record.uuid == key.record.uuid {
            return Err(Error::InvalidInput(format!(
                "key `{}` cannot wrap itself: choose another aes-256-gcm key",
                key.label
            )));
        }
        if kek.record.backend != key.record.backend {
            return Err(Error::Unsupported {
                backend: key.record.backend.clone(),
                what: format!(
                    "wrapping under a key of backend `{}`: a key is wrapped inside its own \
                     backend, under an aes-256-gcm key of the same backend (a token key: with \
                     --wrap-with-trusted LABEL, under an AES-256 key on its token that the \
                     token's security officer made with CKA_WRAP and CKA_TRUSTED true)",
                    kek.record.backend
                ),
            });
        }
        let backend = self.backend(&key.record.backend)?;
        backend.wrap_key(
            self.key_ref(key, key.current()?),
            Wrapping::Kek(self.key_ref(kek, kek.current()?)),
        )
    }

    /// Whether the key was created or imported exportable (an attribute under its record MAC).
    fn is_exportable(key: &Resolved) -> Result<bool> {
        let attributes: BTreeMap<String, String> = serde_json::from_str(&key.record.attributes)
            .map_err(|_| Error::Integrity {
                what: format!("the attributes of `{}` do not decode", key.label),
            })?;
        Ok(attributes.get("extractable").map(String::as_str) == Some("true"))
    }

    /// Whether `key`'s state allows a transport use (`key_use`), and no destruction is pending
    /// for a use that protects.
    fn permit_transport(
        &self,
        key: &Resolved,
        operation: &'static str,
        key_use: KeyUse,
    ) -> Result<()> {
        if !key.state.allows(key_use, false) {
            return Err(self.wrong_state(key, operation, key_use));
        }
        if let (Some(at), KeyUse::Protect) = (key.record.destroy_at, key_use) {
            return Err(Error::WrongState {
                key: key.label.clone(),
                state: format!(
                    "scheduled for destruction on {}",
                    crate::time::format_utc(at)
                ),
                operation,
                hint: "; `keyhold key cancel-destroy` keeps it".into(),
            });
        }
        Ok(())
    }

    /// Imports a key: `input` wrapped under (or to) the key `unwrap_with` of this store, else a
    /// private key (PKCS#8, PEM `PRIVATE KEY` or DER) or an AES or HMAC key's 32 raw bytes. It
    /// is made in `request.backend` (software when `None`) and recorded as a creation is, with
    /// `origin: imported`; `options.extractable` makes it exportable again.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for bad names or input that is not a key of `request.spec`'s type;
    /// [`Error::DecryptionFailed`] for wrapped input that does not unwrap (a wrong key, or
    /// changed data); [`Error::WrongPurpose`] for an unwrapping key that is neither an
    /// aes-256-gcm nor an RSA decrypt key; [`Error::WrongState`]; [`Error::Unsupported`] when
    /// the backend cannot hold the key; [`Error::KeyExists`]; backend and storage errors.
    pub fn import_key(
        &self,
        request: &KeyRequest,
        input: &[u8],
        unwrap_with: Option<&str>,
        options: &KeyOptions,
    ) -> Result<KeyInfo> {
        let imported = self.import_unaudited(request, input, unwrap_with, options);
        if let Err(e) = &imported {
            self.audit_new_key_failed("import", request, e);
        }
        imported
    }

    fn import_unaudited(
        &self,
        request: &KeyRequest,
        input: &[u8],
        unwrap_with: Option<&str>,
        options: &KeyOptions,
    ) -> Result<KeyInfo> {
        validate_name("namespace", &request.namespace)?;
        validate_name("key name", &request.name)?;
        check_input(input, "import")?;
        let schedule = Self::check_schedule(options)?;
        if self
            .store
            .keys(Some(&request.namespace))?
            .iter()
            .any(|r| r.name == request.name && r.state != crate::key::KeyState::Destroyed.as_str())
        {
            // Before anything is unwrapped or made: the store refuses it at insert time anyway.
            return Err(Error::KeyExists {
                namespace: request.namespace.clone(),
                name: request.name.clone(),
            });
        }
        let material = match unwrap_with {
            Some(id) => self.transport_use(id, "unwrap", |key| self.unwrap_resolved(key, input))?,
            None => Self::plain_material(input)?,
        };
        let asked = request.backend.as_deref().unwrap_or(SoftwareBackend::NAME);
        let spec = request.spec;
        let backend = self.backend(asked)?;
        backend
            .capabilities()?
            .require(asked, spec.key_type(), spec.purpose())?;
        let (uuid, label) = Self::new_identity(request)?;
        let context = KeyContext {
            store_id: &self.store_id,
            uuid: &uuid,
            label: &label,
            spec: &spec,
        };
        let generated = backend.import_key(context, &material, options)?;
        drop(material);
        let mut extra = BTreeMap::new();
        extra.insert(ORIGIN.to_owned(), "imported".to_owned());
        let made = Made {
            backend: backend.as_ref(),
            context,
            generated,
            extra,
            event: "imported",
        };
        let info = self.record_new_key(request, options, &schedule, made)?;
        tracing::info!(key = %label, backend = %info.backend, "imported key");
        Ok(info)
    }

    fn unwrap_resolved(&self, key: &Resolved, wrapped: &[u8]) -> Result<SecretBytes> {
        match (key.spec.purpose(), key.spec.algorithm()) {
            (Purpose::Encrypt, Algorithm::Aes256Gcm)
            | (Purpose::Decrypt, Algorithm::RsaOaepSha256) => {}
            (purpose, _) => {
                return Err(Error::WrongPurpose {
                    key: key.label.clone(),
                    purpose: purpose.as_str(),
                    operation: "unwrap a key (use an aes-256-gcm key or an RSA decrypt key)",
                })
            }
        }
        self.permit_transport(key, "unwrap a key", KeyUse::Process)?;
        let backend = self.backend(&key.record.backend)?;
        backend.unwrap_key(self.key_ref(key, key.current()?), wrapped)
    }

    /// A key brought in clear: the DER of a PEM `PRIVATE KEY` block, else the bytes as given
    /// (PKCS#8 DER, or an AES or HMAC key's raw bytes); other PEM keys are refused with how to
    /// convert them.
    fn plain_material(input: &[u8]) -> Result<SecretBytes> {
        if let Some(der) = wrap::pem_block(input, "PRIVATE KEY")? {
            return Ok(der);
        }
        for (label, hint) in [
            (
                "ENCRYPTED PRIVATE KEY",
                "decrypt it first (`openssl pkey -in FILE -out key.pem`), or wrap it for keyhold",
            ),
            (
                "EC PRIVATE KEY",
                "convert it to PKCS#8 (`openssl pkcs8 -topk8 -nocrypt -in FILE -out key.pem`)",
            ),
            (
                "RSA PRIVATE KEY",
                "convert it to PKCS#8 (`openssl pkcs8 -topk8 -nocrypt -in FILE -out key.pem`)",
            ),
        ] {
            if input
                .windows(label.len() + 11)
                .any(|w| w == format!("-----BEGIN {label}").as_bytes())
            {
                return Err(Error::InvalidInput(format!(
                    "the input is a PEM `{label}`: {hint}"
                )));
            }
        }
        Ok(SecretBytes::copy_from(input))
    }
}
