//! The configuration's backends, built once per keystore, with a placeholder for any that cannot
//! be set up (module missing, TPM unreachable, feature not built) so that it takes no other
//! backend down with it.

use std::collections::HashMap;
use std::sync::Arc;

use super::root::DerivedKeys;
use crate::backend::{
    Backend, BackendReport, Capabilities, KeyContext, KeyOptions, KeyRef, Sealed,
};
use crate::config::{BackendConfig, Config, Fallback, Pkcs11Config, TpmConfig};
use crate::error::{Error, Result};
use crate::key::SignatureFormat;
use crate::public_key::PublicKey;
use crate::secret::SecretBytes;

/// Backends built from a configuration, with their fallback policies.
pub(super) struct Configured {
    pub(super) backends: Vec<Arc<dyn Backend>>,
    pub(super) fallbacks: HashMap<String, Fallback>,
}

pub(super) fn build_backends(config: &Config, keys: &DerivedKeys) -> Configured {
    let mut configured = Configured {
        backends: Vec::new(),
        fallbacks: HashMap::new(),
    };
    for (name, backend) in &config.backends {
        // A backend that cannot be set up (module missing, PIN source unset, TPM unreachable) must
        // not take the software keys down with it: its keys report why they cannot be used, and
        // `doctor` shows it.
        let (built, fallback): (Result<Arc<dyn Backend>>, Fallback) = match backend {
            BackendConfig::Pkcs11(p) => (pkcs11_backend(name, p), p.fallback),
            BackendConfig::Tpm(t) => (tpm_backend(name, t, &keys.tpm_auth_kek), t.fallback),
        };
        let built = built.unwrap_or_else(|e| {
            tracing::warn!(backend = %name, "backend unavailable: {e}");
            Arc::new(Unavailable {
                name: name.clone(),
                reason: e.to_string(),
            })
        });
        configured.backends.push(built);
        configured.fallbacks.insert(name.clone(), fallback);
    }
    configured
}

#[cfg(feature = "pkcs11")]
fn pkcs11_backend(name: &str, config: &Pkcs11Config) -> Result<Arc<dyn Backend>> {
    crate::backend::pkcs11::Pkcs11Backend::new(name, config)
        .map(|b| Arc::new(b) as Arc<dyn Backend>)
}

/// A build without PKCS#11 still reads the configuration (one file serves every build); its
/// PKCS#11 backends become [`Unavailable`], saying what to rebuild with.
#[cfg(not(feature = "pkcs11"))]
fn pkcs11_backend(_name: &str, _config: &Pkcs11Config) -> Result<Arc<dyn Backend>> {
    Err(Error::not_built("pkcs11"))
}

#[cfg(feature = "tpm")]
fn tpm_backend(name: &str, config: &TpmConfig, auth_kek: &SecretBytes) -> Result<Arc<dyn Backend>> {
    let device = crate::backend::tpm::device(&config.tcti(), config.settings()?)?;
    crate::backend::tpm::TpmBackend::with_device(name, device, auth_kek)
        .map(|b| Arc::new(b) as Arc<dyn Backend>)
}

/// As [`pkcs11_backend`] without PKCS#11. The TPM auth KEK is derived in every build all the
/// same: the store's keys do not depend on what keyhold was built with.
#[cfg(not(feature = "tpm"))]
fn tpm_backend(
    _name: &str,
    _config: &TpmConfig,
    _auth_kek: &SecretBytes,
) -> Result<Arc<dyn Backend>> {
    Err(Error::not_built("tpm"))
}

/// A configured backend that could not be set up; every use reports why.
#[derive(Debug)]
struct Unavailable {
    name: String,
    reason: String,
}

impl Unavailable {
    fn error(&self) -> Error {
        Error::BackendUnavailable {
            backend: self.name.clone(),
            reason: self.reason.clone(),
        }
    }
}

impl Backend for Unavailable {
    fn name(&self) -> &str {
        &self.name
    }
    fn capabilities(&self) -> Result<Capabilities> {
        Err(self.error())
    }
    fn generate(&self, _: KeyContext<'_>, _: &KeyOptions) -> Result<crate::backend::GeneratedKey> {
        Err(self.error())
    }
    fn public_key(&self, _: KeyRef<'_>) -> Result<PublicKey> {
        Err(self.error())
    }
    fn sign(&self, _: KeyRef<'_>, _: &[u8], _: SignatureFormat) -> Result<Vec<u8>> {
        Err(self.error())
    }
    fn encrypt(&self, _: KeyRef<'_>, _: &[u8], _: &[u8]) -> Result<Sealed> {
        Err(self.error())
    }
    fn decrypt(&self, _: KeyRef<'_>, _: &Sealed, _: &[u8]) -> Result<SecretBytes> {
        Err(self.error())
    }
    fn mac(&self, _: KeyRef<'_>, _: &[u8]) -> Result<Vec<u8>> {
        Err(self.error())
    }
    fn report(&self) -> Result<BackendReport> {
        Err(self.error())
    }
    fn check_key(&self, _: KeyRef<'_>) -> Result<()> {
        Err(self.error())
    }
    fn destroy_object(&self, _: &str) -> Result<()> {
        Err(self.error())
    }
    fn destroy(&self, _: KeyRef<'_>) -> Result<()> {
        Err(self.error())
    }
    fn wrap_key(&self, _: KeyRef<'_>, _: crate::backend::Wrapping<'_>) -> Result<Vec<u8>> {
        Err(self.error())
    }
    fn unwrap_key(&self, _: KeyRef<'_>, _: &[u8]) -> Result<SecretBytes> {
        Err(self.error())
    }
    fn import_key(
        &self,
        _: KeyContext<'_>,
        _: &SecretBytes,
        _: &KeyOptions,
    ) -> Result<crate::backend::GeneratedKey> {
        Err(self.error())
    }
}
