//! The application-facing keystore: creates keys, resolves authenticated key IDs, enforces each
//! key's one purpose, and calls the backend that holds the key.

mod audit;
mod doctor;
mod envelope;
mod key_id;
mod registry;
mod resolve;
mod root;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::{constant_time, hmac};

use crate::backend::software::SoftwareBackend;
use crate::backend::{Backend, KeyContext, KeyOptions, KeyRef, Sealed};
use crate::config::{Config, Fallback};
use crate::error::{Error, Result};
use crate::key::{validate_name, Algorithm, KeySpec, KeyState, Purpose, SignatureFormat};
use crate::public_key::PublicKey;
use crate::sealer::{RootSecret, Sealer};
use crate::secret::SecretBytes;
use crate::store::{KeyRecord, Store, StoreMeta};

pub use doctor::{BackendHealth, Doctor, MissingKey, Orphan, UncheckedKey};
pub(crate) use envelope::oaep_label;
use key_id::KeyIdCodec;
pub use key_id::{KeyIdFields, PREFIX as KEY_ID_PREFIX};
use registry::build_backends;
use resolve::{Resolved, ResolvedCache};
use root::{derive_keys, meta_mac, unseal_root, DerivedKeys};

/// The most bytes any single operation takes as input: 64 MiB.
pub const MAX_INPUT: usize = 64 * 1024 * 1024;

/// The largest envelope `decrypt` takes: one holding [`MAX_INPUT`] bytes of plaintext, plus room
/// for the header, nonce and tag (or an RSA-4096 ciphertext).
pub const MAX_ENVELOPE: usize = MAX_INPUT + 1024;

/// The most random bytes [`random_bytes`] returns at once.
pub const MAX_RANDOM: usize = 65536;

/// The namespace used when none is given.
pub const DEFAULT_NAMESPACE: &str = "default";

/// What to create.
#[derive(Debug, Clone)]
pub struct KeyRequest {
    /// The namespace.
    pub namespace: String,
    /// The name, unique in the namespace.
    pub name: String,
    /// Type, purpose and algorithm.
    pub spec: KeySpec,
    /// The backend instance; `None` means `software`.
    pub backend: Option<String>,
}

/// What the keystore tells about a key: everything but its material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The authenticated key ID applications hold.
    pub id: String,
    /// The store's identity, hex.
    pub store_id: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Type, purpose and algorithm.
    pub spec: KeySpec,
    /// Backend instance.
    pub backend: String,
    /// Where the backend finds the key.
    pub locator: String,
    /// Lifecycle state.
    pub state: KeyState,
    /// Key version.
    pub version: u32,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: i64,
    /// What the backend reported about the key (`never_extractable`, …) and, for a software key
    /// made in place of a hardware backend's, `fallback_for`.
    pub attributes: BTreeMap<String, String>,
}

/// An open, unsealed keystore. `Send + Sync`: share it between threads behind an `Arc`.
#[derive(Debug)]
pub struct Keystore {
    store: Store,
    store_id: [u8; 16],
    ids: KeyIdCodec,
    record_mac: hmac::Key,
    backends: Vec<Arc<dyn Backend>>,
    fallbacks: HashMap<String, Fallback>,
    sealer_kind: String,
    cache: Mutex<ResolvedCache>,
    audit: audit::KeystoreAudit,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Refuses empty and oversized input before any key is touched.
fn check_input(data: &[u8], operation: &str) -> Result<()> {
    check_size(data, operation, MAX_INPUT)
}

fn check_size(data: &[u8], operation: &str, limit: usize) -> Result<()> {
    if data.is_empty() {
        return Err(Error::InvalidInput(format!(
            "input is empty: nothing to {operation}"
        )));
    }
    if data.len() > limit {
        return Err(Error::InvalidInput(format!(
            "input is larger than the 64 MiB limit ({} bytes)",
            data.len()
        )));
    }
    Ok(())
}

/// `n` random bytes from the system CSPRNG through aws-lc.
///
/// # Errors
/// [`Error::InvalidInput`] unless `1 <= n <= MAX_RANDOM`; [`Error::Crypto`] if the RNG fails.
pub fn random_bytes(n: usize) -> Result<Vec<u8>> {
    if n == 0 || n > MAX_RANDOM {
        return Err(Error::InvalidInput(format!(
            "ask for between 1 and {MAX_RANDOM} random bytes, not {n}"
        )));
    }
    let mut out = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut out).map_err(|_| Error::crypto("random generation"))?;
    Ok(out)
}

/// A key made in software because the backend asked for could not make it.
struct FellBack<'a> {
    /// The backend asked for.
    from: &'a str,
    /// What it lacks.
    what: String,
}

impl Keystore {
    /// A change another process (or another `Keystore` on the same store) commits is seen by this
    /// one within this window: resolved key IDs are cached, and whether the database changed is
    /// asked at most this often, since asking costs a read transaction (about 10 µs of locking
    /// syscalls), as much as a token's HMAC. This keystore's own writes are seen at once.
    pub const OTHERS_SEEN_WITHIN: std::time::Duration = std::time::Duration::from_millis(1);

    /// Creates a store in `dir`, sealing a fresh root secret with `sealer`.
    ///
    /// The process is left as it is: an application that wants no core dumps of its secrets calls
    /// [`crate::secret::harden_process`] itself (the `keyhold` command does).
    ///
    /// # Errors
    /// [`Error::StoreExists`] if there is already a store; sealer, I/O and storage errors.
    pub fn create(dir: &Path, sealer: &dyn Sealer) -> Result<Self> {
        Self::create_with(dir, sealer, &Config::default())
    }

    /// Creates a store in `dir` with the backends of `config`.
    ///
    /// # Errors
    /// As [`Self::create`]. A configured backend that cannot be set up does not stop the store
    /// from being created: using it reports why ([`Error::BackendUnavailable`]).
    pub fn create_with(dir: &Path, sealer: &dyn Sealer, config: &Config) -> Result<Self> {
        if dir.join(crate::store::DB_FILE).exists() {
            return Err(Error::StoreExists {
                path: dir.to_path_buf(),
            });
        }
        let mut store_id = [0u8; 16];
        aws_lc_rs::rand::fill(&mut store_id).map_err(|_| Error::crypto("make a store ID"))?;
        let root = RootSecret::generate()?;
        let sealed_root = sealer.seal(&root, &store_id)?;
        let keys = derive_keys(&root, &store_id)?;
        let mut meta = StoreMeta {
            store_id,
            sealed_root,
            created_at: now(),
            mac: Vec::new(),
        };
        meta.mac = meta_mac(&keys, &meta);
        let store = Store::create(dir, &meta)?;
        tracing::info!(store = %dir.display(), sealer = sealer.kind(), "created store");
        Self::with_root(store, &keys, config)
    }

    /// Opens the store in `dir` and unseals its root secret with `sealer`.
    ///
    /// `sealer` is the caller's statement of how the store is sealed: a store that records
    /// another kind is refused. Once unsealed, the store's metadata and every key record are
    /// checked under the root secret. The process is left as it is (see
    /// [`crate::secret::harden_process`]).
    ///
    /// # Errors
    /// [`Error::StoreNotFound`]; [`Error::StoreUnusable`] (also for a store directory or database
    /// another user owns or others may write); [`Error::Unseal`] (also for a store that records
    /// another sealer kind, or whose sealed root secret was replaced); [`Error::Integrity`] for
    /// metadata or records changed outside keyhold.
    pub fn open(dir: &Path, sealer: &dyn Sealer) -> Result<Self> {
        Self::open_with(dir, sealer, &Config::default())
    }

    /// Opens the store in `dir` with the backends of `config`.
    ///
    /// # Errors
    /// As [`Self::open`]. A configured backend that cannot be set up does not stop the store from
    /// opening: its keys report why they cannot be used ([`Error::BackendUnavailable`]), and
    /// [`Self::doctor`] shows it.
    pub fn open_with(dir: &Path, sealer: &dyn Sealer, config: &Config) -> Result<Self> {
        let store = Store::open(dir)?;
        let (_root, keys) = unseal_root(&store, sealer)?;
        Self::with_root(store, &keys, config)
    }

    /// Re-seals the root secret of the store in `dir`: unseals it with `unsealer`, builds the new
    /// sealer with `resealer`, seals with it, checks that it unseals the new seal, and only then
    /// replaces the old one (in one transaction). Keys, records and key IDs are unchanged. Used to
    /// re-bind a TPM seal to PCRs after an intended change, or to move a store to another sealer.
    ///
    /// The store's metadata and records are checked under the unsealed root before anything is
    /// sealed: parameters changed behind keyhold's back (a PCR list) are refused, never re-sealed
    /// to. `resealer` is given the old seal from that authenticated metadata, read in the same
    /// open: whatever the new seal keeps of the old one (its PCR list, its recovery seal) must come
    /// from there, never from an earlier read of the store, which someone who can write the store
    /// may have answered differently. It returns the new sealer and what the caller wants to know
    /// of the old seal (returned once the new seal is in place).
    ///
    /// # Errors
    /// As [`Self::open`] for the unsealing; the errors of `resealer`; sealer errors;
    /// [`Error::Unseal`] if the new seal does not unseal (nothing is changed then); storage errors.
    pub fn reseal<S: Sealer, T>(
        dir: &Path,
        unsealer: &dyn Sealer,
        resealer: impl FnOnce(&crate::sealer::SealedRoot) -> Result<(S, T)>,
    ) -> Result<T> {
        let mut store = Store::open(dir)?;
        let (root, keys) = unseal_root(&store, unsealer)?;
        let meta = store.meta().clone();
        let (resealer, told) = resealer(&meta.sealed_root)?;
        let sealed = resealer.seal(&root, &meta.store_id)?;
        let check = resealer.unseal(&sealed, &meta.store_id)?;
        if constant_time::verify_slices_are_equal(check.expose(), root.expose()).is_err() {
            return Err(Error::Unseal {
                reason: "the new seal did not give back the root secret: nothing was changed"
                    .into(),
            });
        }
        let new_meta = StoreMeta {
            sealed_root: sealed,
            ..meta
        };
        store.replace_sealed_root(&new_meta.sealed_root, &meta_mac(&keys, &new_meta))?;
        tracing::info!(store = %dir.display(), sealer = resealer.kind(), "re-sealed the store");
        Ok(told)
    }

    fn with_root(store: Store, keys: &DerivedKeys, config: &Config) -> Result<Self> {
        let store_id = store.meta().store_id;
        let configured = build_backends(config, keys);
        let software: Arc<dyn Backend> =
            Arc::new(SoftwareBackend::new(&keys.software_kek)?.with_key_cache(
                std::time::Duration::from_secs(config.software.key_cache_secs),
            ));
        let mut backends = vec![software];
        backends.extend(configured.backends);
        Ok(Self {
            audit: audit::KeystoreAudit::new(store.dir(), keys, &config.audit),
            ids: KeyIdCodec::new(store_id, keys.key_id_mac.expose()),
            record_mac: hmac::Key::new(hmac::HMAC_SHA256, keys.record_mac.expose()),
            sealer_kind: store.meta().sealed_root.sealer.clone(),
            store,
            store_id,
            backends,
            fallbacks: configured.fallbacks,
            cache: Mutex::new(ResolvedCache::default()),
        })
    }

    /// The kind of sealer protecting this store's root secret.
    pub fn sealer_kind(&self) -> &str {
        &self.sealer_kind
    }

    /// The store's identity, hex.
    pub fn store_id(&self) -> String {
        crate::hex::encode(&self.store_id)
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        self.store.dir()
    }

    /// The configured backends, `software` first.
    pub fn backends(&self) -> impl Iterator<Item = &dyn Backend> {
        self.backends.iter().map(|b| b.as_ref())
    }

    fn backend(&self, name: &str) -> Result<&Arc<dyn Backend>> {
        self.backends
            .iter()
            .find(|b| b.name() == name)
            .ok_or_else(|| Error::NoSuchBackend {
                name: name.to_owned(),
                available: self
                    .backends
                    .iter()
                    .map(|b| b.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Resolves `id`, checks that its purpose is `purpose`, and runs `op` with its backend.
    fn use_key<T>(
        &self,
        id: &str,
        purpose: Purpose,
        operation: &'static str,
        op: impl FnOnce(&dyn Backend, KeyRef<'_>, &Resolved) -> Result<T>,
    ) -> Result<T> {
        let resolved = self.resolve_audited(id, operation)?;
        self.use_resolved(&resolved, purpose, operation, op)
    }

    /// [`Self::use_key`] for a key already resolved.
    fn use_resolved<T>(
        &self,
        resolved: &Resolved,
        purpose: Purpose,
        operation: &'static str,
        op: impl FnOnce(&dyn Backend, KeyRef<'_>, &Resolved) -> Result<T>,
    ) -> Result<T> {
        let result = self.use_resolved_unaudited(resolved, purpose, operation, op);
        self.audit_use(resolved, operation, audit::outcome(&result));
        result
    }

    fn use_resolved_unaudited<T>(
        &self,
        resolved: &Resolved,
        purpose: Purpose,
        operation: &'static str,
        op: impl FnOnce(&dyn Backend, KeyRef<'_>, &Resolved) -> Result<T>,
    ) -> Result<T> {
        if resolved.spec.purpose() != purpose {
            return Err(Error::WrongPurpose {
                key: resolved.label().to_owned(),
                purpose: resolved.spec.purpose().as_str(),
                operation,
            });
        }
        let backend = self.backend(&resolved.record.backend)?;
        op(backend.as_ref(), self.key_ref(resolved), resolved)
    }

    /// Creates a key in its backend and records it; returns its info with the key ID.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a bad name, [`Error::KeyExists`], [`Error::Unsupported`] if the
    /// backend cannot make that type, backend and storage errors.
    pub fn create_key(&self, request: &KeyRequest) -> Result<KeyInfo> {
        self.create_key_with(request, &KeyOptions::default())
    }

    /// [`Self::create_key`] with creation options (e.g. an extractable token key).
    ///
    /// # Errors
    /// As [`Self::create_key`].
    pub fn create_key_with(&self, request: &KeyRequest, options: &KeyOptions) -> Result<KeyInfo> {
        let created = self.create_key_unaudited(request, options);
        self.audit_created(request, created)
    }

    fn create_key_unaudited(&self, request: &KeyRequest, options: &KeyOptions) -> Result<KeyInfo> {
        validate_name("namespace", &request.namespace)?;
        validate_name("key name", &request.name)?;
        let asked = request.backend.as_deref().unwrap_or(SoftwareBackend::NAME);
        let spec = request.spec;
        let (mut backend, mut fallback) = self.choose_backend(asked, &spec)?;
        let mut uuid = [0u8; 16];
        aws_lc_rs::rand::fill(&mut uuid).map_err(|_| Error::crypto("make a key uuid"))?;
        let label = format!("{}/{}", request.namespace, request.name);
        let context = KeyContext {
            store_id: &self.store_id,
            uuid: &uuid,
            label: &label,
            spec: &spec,
        };
        let generated = match backend.generate(context, options) {
            // Some limits show only when the device tries (a token's RSA-OAEP hash): the
            // fallback applies to those as to any the capabilities told.
            Err(Error::Unsupported { what, .. })
                if fallback.is_none() && self.may_fall_back(asked) =>
            {
                let (software, fell_back) = self.fall_back(asked, what)?;
                backend = software;
                fallback = Some(fell_back);
                backend.generate(context, options)?
            }
            other => other?,
        };
        let mut attributes: BTreeMap<String, String> = generated.attributes.into_iter().collect();
        if options.extractable {
            attributes.insert("extractable".into(), "true".into());
        }
        if let Some(FellBack { from, what }) = fallback {
            // Recorded (under the record MAC) so that `key show` can say why, not only where.
            attributes.insert("fallback_for".into(), from.to_owned());
            attributes.insert("fallback_reason".into(), what);
        }
        let attributes =
            serde_json::to_string(&attributes).map_err(|_| Error::crypto("encode attributes"))?;
        let created_at = now();
        let mut record = KeyRecord {
            uuid,
            namespace: request.namespace.clone(),
            name: request.name.clone(),
            key_type: spec.key_type().as_str().to_owned(),
            purpose: spec.purpose().as_str().to_owned(),
            algorithm: spec.algorithm().as_str().to_owned(),
            backend: backend.name().to_owned(),
            locator: generated.locator.clone(),
            state: KeyState::Active.as_str().to_owned(),
            version: 1,
            created_at,
            updated_at: created_at,
            blob: generated.blob,
            public_key: generated.public_key.map(|p| p.spki_der().to_vec()),
            attributes,
            mac: Vec::new(),
        };
        self.seal_record(&mut record);
        let inserted = self.store.insert_key(&record);
        self.invalidate();
        if let Err(e) = inserted {
            // Never leave a key in the backend that no record points to.
            let key = KeyRef {
                context,
                locator: &record.locator,
                blob: record.blob.as_deref(),
            };
            if let Err(cleanup) = backend.destroy(key) {
                tracing::error!(
                    backend = backend.name(),
                    locator = %record.locator,
                    "could not destroy a key whose record was not stored: {cleanup}"
                );
            }
            return Err(e);
        }
        tracing::info!(
            namespace = %record.namespace, name = %record.name,
            key_type = %spec.key_type(), backend = %record.backend, "created key"
        );
        self.info(&Resolved {
            record,
            spec,
            label,
        })
    }

    /// The backend to create a `spec` key in when `asked` was asked for: `asked` itself if it can,
    /// else the software backend (with `asked` and what it lacks) if `asked` is configured to fall
    /// back, else an error naming what the device lacks.
    fn choose_backend<'a>(
        &'a self,
        asked: &'a str,
        spec: &KeySpec,
    ) -> Result<(&'a Arc<dyn Backend>, Option<FellBack<'a>>)> {
        let backend = self.backend(asked)?;
        let capabilities = backend.capabilities()?;
        if capabilities.supports(spec.key_type(), spec.purpose()) {
            return Ok((backend, None));
        }
        let what = capabilities
            .missing(spec.key_type(), spec.purpose())
            .map_or_else(
                || format!("{} keys with purpose {}", spec.key_type(), spec.purpose()),
                |why| {
                    format!(
                        "{} keys with purpose {}: {why}",
                        spec.key_type(),
                        spec.purpose()
                    )
                },
            );
        if !self.may_fall_back(asked) {
            return Err(Error::Unsupported {
                backend: asked.to_owned(),
                what,
            });
        }
        let (software, fell_back) = self.fall_back(asked, what)?;
        Ok((software, Some(fell_back)))
    }

    /// Whether backend `asked` is configured to let software make what it cannot.
    fn may_fall_back(&self, asked: &str) -> bool {
        matches!(self.fallbacks.get(asked), Some(Fallback::Software))
    }

    /// The software backend, making a key `asked` cannot (`what` it lacks), said in the log.
    fn fall_back<'a>(
        &'a self,
        asked: &'a str,
        what: String,
    ) -> Result<(&'a Arc<dyn Backend>, FellBack<'a>)> {
        tracing::info!(backend = asked, "{what}; creating the key in software");
        Ok((
            self.backend(SoftwareBackend::NAME)?,
            FellBack { from: asked, what },
        ))
    }

    /// How this store's device objects begin: the hex of the store ID's first 8 bytes (backends
    /// that keep objects put it at the start of their identifiers).
    fn object_prefix(&self) -> String {
        crate::hex::encode(&self.store_id[..8])
    }

    /// The backend and locator of the token key sealing the root secret, if any.
    #[cfg(feature = "pkcs11")]
    fn sealer_key_locator(&self) -> Option<(String, String)> {
        let sealed = &self.store.meta().sealed_root;
        if sealed.sealer != "pkcs11" {
            return None;
        }
        let backend = crate::sealer::Pkcs11Sealer::backend_of(sealed).ok()?;
        let locator = crate::sealer::Pkcs11Sealer::locator_of(sealed).ok()?;
        Some((backend, locator))
    }

    /// None: without the `pkcs11` feature no store sealed by a token opens, so none is open here.
    #[cfg(not(feature = "pkcs11"))]
    fn sealer_key_locator(&self) -> Option<(String, String)> {
        None
    }

    /// The info of the key `id`.
    ///
    /// # Errors
    /// [`Error::KeyIdAuthentication`], [`Error::NoSuchKey`], [`Error::Integrity`].
    pub fn key_info(&self, id: &str) -> Result<KeyInfo> {
        let resolved = self.resolve(id)?;
        self.info(&resolved)
    }

    /// The info (with the key ID) of the key named `name` in `namespace`, or `None` if there is
    /// none. The record's MAC is verified before anything it says is used.
    ///
    /// A name is weaker than a key ID: whoever can write the store can destroy a key and create
    /// another of the same name (another type, purpose or backend), while an ID is authenticated
    /// and pins all of them. Names are for people; applications should hold IDs.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a bad name, [`Error::Integrity`] if the record fails its MAC.
    pub fn key_info_by_name(&self, namespace: &str, name: &str) -> Result<Option<KeyInfo>> {
        validate_name("namespace", namespace)?;
        validate_name("key name", name)?;
        let found = self
            .store
            .keys(Some(namespace))?
            .into_iter()
            .find(|record| record.name == name);
        match found {
            Some(record) => Ok(Some(self.info(&self.verified(record)?)?)),
            None => Ok(None),
        }
    }

    /// Every key of `namespace` (or of every namespace), sorted by namespace and name.
    ///
    /// # Errors
    /// [`Error::Integrity`] if any record fails its MAC: a listing never shows forged keys.
    pub fn list_keys(&self, namespace: Option<&str>) -> Result<Vec<KeyInfo>> {
        self.store
            .keys(namespace)?
            .into_iter()
            .map(|record| self.info(&self.verified(record)?))
            .collect()
    }

    /// The recorded public key of the asymmetric key `id`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a symmetric key; resolution errors.
    pub fn public_key(&self, id: &str) -> Result<PublicKey> {
        let resolved = self.resolve(id)?;
        Self::recorded_public_key(&resolved)
    }

    fn recorded_public_key(resolved: &Resolved) -> Result<PublicKey> {
        let der = resolved.record.public_key.clone().ok_or_else(|| {
            Error::InvalidInput(format!(
                "key `{}` is a {} secret key: it has no public key",
                resolved.label(),
                resolved.spec.key_type()
            ))
        })?;
        Ok(PublicKey::from_spki_der(
            resolved.spec.key_type(),
            resolved.spec.algorithm(),
            der,
        ))
    }

    /// Asks the key's backend for its public key (the recorded one is what [`Self::public_key`]
    /// returns); for consistency checks.
    ///
    /// # Errors
    /// Resolution and backend errors.
    pub fn backend_public_key(&self, id: &str) -> Result<PublicKey> {
        let resolved = self.resolve(id)?;
        let backend = self.backend(&resolved.record.backend)?;
        backend.public_key(self.key_ref(&resolved))
    }

    /// Signs `message` with the signing key `id`.
    ///
    /// # Errors
    /// [`Error::WrongPurpose`], [`Error::InvalidInput`] for empty or oversized input, resolution
    /// and backend errors.
    pub fn sign(&self, id: &str, message: &[u8], format: SignatureFormat) -> Result<Vec<u8>> {
        self.use_key(id, Purpose::Sign, "sign", |backend, key, _| {
            check_input(message, "sign")?;
            backend.sign(key, message, format)
        })
    }

    /// Checks `signature` over `message` with the public half of the signing key `id`.
    ///
    /// # Errors
    /// [`Error::VerificationFailed`] for an invalid signature; [`Error::WrongPurpose`]; resolution
    /// errors.
    pub fn verify(
        &self,
        id: &str,
        message: &[u8],
        signature: &[u8],
        format: SignatureFormat,
    ) -> Result<()> {
        self.use_key(id, Purpose::Sign, "verify", |_, _, resolved| {
            check_input(message, "verify")?;
            Self::recorded_public_key(resolved)?.verify(message, signature, format)
        })
    }

    /// Encrypts `plaintext` to the key `id`: AES-256-GCM in the backend for `encrypt` keys,
    /// RSA-OAEP on the public key for RSA `decrypt` keys. Returns an envelope.
    ///
    /// # Errors
    /// [`Error::WrongPurpose`], [`Error::InvalidInput`] (empty, oversized, or too long for OAEP).
    pub fn encrypt(&self, id: &str, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        let resolved = self.resolve_audited(id, "encrypt")?;
        let header = |algorithm| envelope::Header {
            algorithm,
            uuid: resolved.record.uuid,
            version: resolved.record.version,
        };
        match resolved.spec.algorithm() {
            Algorithm::RsaOaepSha256 => {
                let sealed = (|| {
                    check_input(plaintext, "encrypt")?;
                    let header = header(Algorithm::RsaOaepSha256);
                    let body = Self::recorded_public_key(&resolved)?
                        .encrypt_oaep(plaintext, &oaep_label(&header.aad(aad)))?;
                    Ok(envelope::encode(header, &[], &body))
                })();
                self.audit_use(&resolved, "encrypt", audit::outcome(&sealed));
                sealed
            }
            _ => self.use_resolved(&resolved, Purpose::Encrypt, "encrypt", |backend, key, _| {
                check_input(plaintext, "encrypt")?;
                let header = header(Algorithm::Aes256Gcm);
                let sealed = backend.encrypt(key, plaintext, &header.aad(aad))?;
                Ok(envelope::encode_into(
                    header,
                    &sealed.nonce,
                    sealed.ciphertext,
                ))
            }),
        }
    }

    /// Decrypts an envelope made by [`Self::encrypt`] for the key `id`, with the same `aad`.
    ///
    /// # Errors
    /// [`Error::DecryptionFailed`] for anything that does not authenticate (deliberately
    /// undetailed); [`Error::WrongPurpose`].
    pub fn decrypt(&self, id: &str, input: &[u8], aad: &[u8]) -> Result<SecretBytes> {
        let resolved = self.resolve_audited(id, "decrypt")?;
        let purpose = match resolved.spec.algorithm() {
            Algorithm::RsaOaepSha256 => Purpose::Decrypt,
            _ => Purpose::Encrypt,
        };
        self.use_resolved(&resolved, purpose, "decrypt", |backend, key, resolved| {
            check_size(input, "decrypt", MAX_ENVELOPE)?;
            let env = envelope::decode(input)?;
            if env.header.uuid != resolved.record.uuid
                || env.header.algorithm != resolved.spec.algorithm()
            {
                return Err(Error::DecryptionFailed {
                    reason: "the envelope was made for another key",
                });
            }
            let sealed = Sealed {
                nonce: env.nonce.to_vec(),
                ciphertext: env.body.to_vec(),
            };
            let binding = env.header.aad(aad);
            match resolved.spec.algorithm() {
                Algorithm::RsaOaepSha256 => backend.decrypt(key, &sealed, &oaep_label(&binding)),
                _ => backend.decrypt(key, &sealed, &binding),
            }
        })
    }

    /// Computes the HMAC-SHA256 tag of `data` with the MAC key `id`.
    ///
    /// # Errors
    /// [`Error::WrongPurpose`], [`Error::InvalidInput`]; resolution and backend errors.
    pub fn mac(&self, id: &str, data: &[u8]) -> Result<Vec<u8>> {
        self.use_key(id, Purpose::Mac, "compute a MAC", |backend, key, _| {
            check_input(data, "mac")?;
            backend.mac(key, data)
        })
    }

    /// Checks `tag` over `data` in constant time.
    ///
    /// # Errors
    /// [`Error::VerificationFailed`] for a wrong tag; as [`Self::mac`] otherwise.
    pub fn verify_mac(&self, id: &str, data: &[u8], tag: &[u8]) -> Result<()> {
        let expected = self.mac(id, data)?;
        constant_time::verify_slices_are_equal(&expected, tag)
            .map_err(|_| Error::VerificationFailed { what: "tag" })
    }

    /// Destroys the key `id` in its backend and deletes its record; its ID then gives
    /// [`Error::NoSuchKey`].
    ///
    /// # Errors
    /// Resolution, backend and storage errors.
    pub fn destroy_key(&self, id: &str) -> Result<KeyInfo> {
        let destroyed = self.destroy_key_unaudited(id);
        self.audit_destroyed(id, destroyed)
    }

    fn destroy_key_unaudited(&self, id: &str) -> Result<KeyInfo> {
        let resolved = self.resolve(id)?;
        let info = self.info(&resolved)?;
        let backend = self.backend(&resolved.record.backend)?;
        backend.destroy(self.key_ref(&resolved))?;
        let deleted = self.store.delete_key(&resolved.record.uuid);
        self.invalidate();
        deleted?;
        tracing::info!(namespace = %info.namespace, name = %info.name, "destroyed key");
        Ok(info)
    }
}
