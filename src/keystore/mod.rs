//! The application-facing keystore: creates keys, resolves authenticated key IDs, enforces each
//! key's one purpose, and calls the backend that holds the key.

mod anchor;
mod audit;
mod backup;
mod clients;
mod doctor;
mod envelope;
mod info;
mod key_id;
mod lifecycle;
mod memory_only;
mod ops;
mod registry;
mod reseal;
mod resolve;
mod root;
mod rotation;
mod service;
mod transport;
mod verify;

use crate::time::now;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use aws_lc_rs::hmac;

use crate::backend::software::SoftwareBackend;
use crate::backend::{Backend, KeyContext, KeyOptions, KeyRef};
use crate::config::{Config, Fallback};
use crate::error::{Error, Result};
use crate::key::{validate_name, KeySpec, KeyState, KeyUse};
use crate::public_key::PublicKey;
use crate::sealer::{RootSecret, Sealer};
use crate::store::{KeyRecord, Store, StoreMeta};

pub use anchor::Reanchored;
pub use backup::{Backup, BackupInfo, Restored, RootSource, EXTENSION as BACKUP_EXTENSION};
pub use clients::{ClientGrant, ClientToken, TokenClient, TOKEN_PREFIX};
pub use doctor::{BackendHealth, Doctor, MissingKey, Orphan, UncheckedKey};
pub(crate) use envelope::oaep_label;
use key_id::KeyIdCodec;
pub use key_id::{KeyIdFields, PREFIX as KEY_ID_PREFIX};
pub use lifecycle::{Done, KeyEvent, Maintenance, PolicyChange, PolicyText, Transition};
#[cfg(feature = "serve")]
pub(crate) use memory_only::from_memory_only;
pub(crate) use memory_only::in_scope as in_memory_only_scope;
#[cfg(any(feature = "pkcs11", feature = "tpm"))]
pub(crate) use memory_only::may_wait;
#[cfg(any(feature = "serve", feature = "pkcs11"))]
pub(crate) use memory_only::would_wait;
pub use ops::{UseOptions, Used};
use registry::build_backends;
use resolve::ResolvedCache;
use root::{derive_keys, initial_state, meta_mac, unseal_root, DerivedKeys};
use rotation::Reservations;
pub use service::{KeyService, StoreAdmin};
pub use transport::ExportTo;
pub use verify::{
    CheckKind, Finding, KeyName, PeriodicVerify, Section, Status, VerifyProgress, VerifyReport,
};

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

impl KeyRequest {
    /// The backend the key is asked of: the one named, else `software` (a backend configured
    /// with `fallback = "software"` may still have it made in software).
    pub fn backend_name(&self) -> &str {
        self.backend.as_deref().unwrap_or(SoftwareBackend::NAME)
    }
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
    /// The current (newest) version.
    pub version: u32,
    /// Every version the key has, oldest first (none once destroyed).
    pub versions: Vec<VersionInfo>,
    /// The oldest version that still decrypts and verifies.
    pub min_decrypt_version: u32,
    /// Rotate when the current version is this many seconds old.
    pub rotate_after: Option<i64>,
    /// Pre-activation until this time.
    pub activate_at: Option<i64>,
    /// Deactivated from this time.
    pub deactivate_at: Option<i64>,
    /// Destruction scheduled for this time (or, for a destroyed key, when it was due).
    pub destroy_at: Option<i64>,
    /// When its material was destroyed.
    pub destroyed_at: Option<i64>,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: i64,
    /// What the backend reported about the key (`never_extractable`, …) and, for a software key
    /// made in place of a hardware backend's, `fallback_for`.
    pub attributes: BTreeMap<String, String>,
}

/// One version of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// Its number, from 1.
    pub version: u32,
    /// When it was made.
    pub created_at: i64,
    /// Where the backend finds it.
    pub locator: String,
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
    /// Held by the one call at a time that asks, from memory only, whether the store changed
    /// (see `Keystore::resolve`).
    checking: Mutex<()>,
    /// AES-GCM invocations this process has reserved, per key version.
    reservations: Mutex<Reservations>,
    /// The most AES-GCM invocations per key version (`[lifecycle] gcm_invocation_limit`).
    gcm_limit: u64,
    audit: audit::KeystoreAudit,
    /// The key backups are encrypted under.
    backup_key: crate::secret::SecretBytes,
    /// What `store verify` checks the commitment with: its keys, the metadata MAC's format at
    /// open, and the anchor file the configuration names.
    commit_keys: crate::store::CommitKeys,
    meta_format: Option<u8>,
    anchor: Option<crate::store::FileAnchor>,
    /// What the service's bearer tokens are hashed with.
    client_tokens: clients::TokenHasher,
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
    check_not_oversized(data.len(), limit)
}

/// Refuses `len` bytes of input over `limit`. The service's client checks this before it sends
/// anything: an input the service would refuse is not uploaded first.
pub(crate) fn check_not_oversized(len: usize, limit: usize) -> Result<()> {
    if len > limit {
        return Err(Error::InvalidInput(format!(
            "input is larger than the 64 MiB limit ({len} bytes)"
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

/// A new key's schedule, checked.
struct Schedule {
    rotate_after: Option<i64>,
}

/// A key just made or imported, for [`Keystore::record_new_key`] to record.
struct Made<'a> {
    backend: &'a dyn Backend,
    context: KeyContext<'a>,
    generated: crate::backend::GeneratedKey,
    /// Attributes the keystore records beside the backend's.
    extra: BTreeMap<String, String>,
    /// The history event (`created`, `imported`).
    event: &'static str,
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
            state: None,
        };
        meta.mac = meta_mac(&keys, &meta);
        let state = initial_state(&keys, store_id, &meta.mac);
        meta.state = Some(state.clone());
        let mut store = Store::create(dir, &meta)?;
        let anchor = config
            .store
            .anchor_dir()
            .map(|d| crate::store::FileAnchor::new(&d, &store_id));
        if let Some(anchor) = &anchor {
            if let Err(e) = anchor.advance(state.generation) {
                tracing::warn!(error = %e, "cannot write the store's anchor file");
            }
        }
        store.attach(keys.commit_keys(store_id), &state, anchor, None);
        anchor::bind(&mut store, Some(sealer), config, &keys)?;
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
        let mut store = Store::open(dir)?;
        let (_root, keys) = unseal_root(&mut store, sealer, config.store.anchor_dir().as_deref())?;
        anchor::bind(&mut store, Some(sealer), config, &keys)?;
        Self::with_root(store, &keys, config)
    }

    /// Test builds only: the root secret of the store in `dir` and the material of the current
    /// version of its software key `id` (see `keyhold::testing::reveal_software_key`).
    #[cfg(feature = "testing")]
    pub(crate) fn reveal_software_key(
        dir: &Path,
        sealer: &dyn Sealer,
        id: &str,
    ) -> Result<(crate::secret::SecretBytes, crate::secret::SecretBytes)> {
        let mut store = Store::open(dir)?;
        let anchor_dir = crate::store::FileAnchor::default_dir();
        let (root, keys) = unseal_root(&mut store, sealer, anchor_dir.as_deref())?;
        let ks = Self::with_root(store, &keys, &Config::default())?;
        let resolved = ks.resolve(id)?;
        if resolved.record.backend != SoftwareBackend::NAME {
            return Err(Error::InvalidInput(format!(
                "key `{}` is not a software key: its material is not in the store",
                resolved.label
            )));
        }
        let software = SoftwareBackend::new(&keys.software_kek)?;
        let material = software.reveal(&ks.key_ref(&resolved, resolved.current()?))?;
        Ok((
            crate::secret::SecretBytes::copy_from(root.expose()),
            material,
        ))
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
            audit: audit::KeystoreAudit::new(
                store.dir(),
                keys,
                &config.audit,
                store.anchor().cloned(),
            ),
            backup_key: crate::secret::SecretBytes::copy_from(keys.backup_key.expose()),
            commit_keys: keys.commit_keys(store_id),
            meta_format: root::meta_format(keys, store.meta()),
            anchor: config
                .store
                .anchor_dir()
                .map(|d| crate::store::FileAnchor::new(&d, &store_id)),
            ids: KeyIdCodec::new(store_id, keys.key_id_mac.expose()),
            record_mac: hmac::Key::new(hmac::HMAC_SHA256, keys.record_mac.expose()),
            client_tokens: clients::TokenHasher::new(keys.client_token.expose()),
            sealer_kind: store.meta().sealed_root.sealer.clone(),
            store,
            store_id,
            backends,
            fallbacks: configured.fallbacks,
            cache: Mutex::new(ResolvedCache::default()),
            checking: Mutex::new(()),
            reservations: Mutex::new(Reservations::default()),
            gcm_limit: config.lifecycle.gcm_limit(),
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
        if let Err(e) = &created {
            self.audit_create_failed(request, e);
        }
        created
    }

    fn create_key_unaudited(&self, request: &KeyRequest, options: &KeyOptions) -> Result<KeyInfo> {
        validate_name("namespace", &request.namespace)?;
        validate_name("key name", &request.name)?;
        let schedule = Self::check_schedule(options)?;
        let asked = request.backend_name();
        let spec = request.spec;
        let (mut backend, mut fallback) = self.choose_backend(asked, &spec)?;
        let (uuid, label) = Self::new_identity(request)?;
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
        let mut extra = BTreeMap::new();
        if let Some(FellBack { from, what }) = fallback {
            // Recorded (under the record MAC) so that `key show` can say why, not only where.
            extra.insert(info::FALLBACK_FOR.into(), from.to_owned());
            extra.insert(info::FALLBACK_REASON.into(), what);
        }
        let made = Made {
            backend: backend.as_ref(),
            context,
            generated,
            extra,
            event: "created",
        };
        self.record_new_key(request, options, &schedule, made)
    }

    /// A new key's record identifier (random) and its `namespace/name` label.
    fn new_identity(request: &KeyRequest) -> Result<([u8; 16], String)> {
        let mut uuid = [0u8; 16];
        aws_lc_rs::rand::fill(&mut uuid).map_err(|_| Error::crypto("make a key uuid"))?;
        Ok((uuid, format!("{}/{}", request.namespace, request.name)))
    }

    /// Records a key just made (or imported) in `made.backend`: its record and the first entry
    /// of its history, in one transaction, written to the audit log before the commit. A key
    /// whose record could not be stored is destroyed in the backend.
    fn record_new_key(
        &self,
        request: &KeyRequest,
        options: &KeyOptions,
        schedule: &Schedule,
        made: Made<'_>,
    ) -> Result<KeyInfo> {
        let Made {
            backend,
            context,
            generated,
            extra,
            event,
        } = made;
        let spec = *context.spec;
        let uuid = *context.uuid;
        let mut attributes: BTreeMap<String, String> = generated.attributes.into_iter().collect();
        if options.extractable {
            attributes.insert("extractable".into(), "true".into());
        }
        attributes.extend(extra);
        let attributes =
            serde_json::to_string(&attributes).map_err(|_| Error::crypto("encode attributes"))?;
        let created_at = now();
        let state = match options.activate_at {
            Some(at) if at > created_at => KeyState::PreActivation,
            _ => KeyState::Active,
        };
        let mut record = KeyRecord {
            uuid,
            namespace: request.namespace.clone(),
            name: request.name.clone(),
            key_type: spec.key_type().as_str().to_owned(),
            purpose: spec.purpose().as_str().to_owned(),
            algorithm: spec.algorithm().as_str().to_owned(),
            backend: backend.name().to_owned(),
            locator: generated.locator.clone(),
            state: state.as_str().to_owned(),
            version: 1,
            created_at,
            updated_at: created_at,
            blob: generated.blob,
            public_key: generated.public_key.map(|p| p.spki_der().to_vec()),
            attributes,
            mac: Vec::new(),
            mac_format: 2,
            min_decrypt_version: 1,
            rotate_after: schedule.rotate_after,
            activate_at: (state == KeyState::PreActivation)
                .then_some(options.activate_at)
                .flatten(),
            deactivate_at: options.deactivate_at,
            destroy_at: None,
            destroyed_at: None,
        };
        self.seal_record(&mut record);
        // The record and the first entry of its history, in one transaction.
        let inserted = self.store.write(|tx| {
            tx.insert_key(&record)?;
            let none = KeyRecord {
                state: lifecycle::NO_STATE.into(),
                ..record.clone()
            };
            self.record_event(tx, &none, &record, event, None)?;
            // Written before the commit: a key the log cannot show is never made.
            let head =
                self.audit_lifecycle(&self.verified_with(record.clone(), Vec::new())?, event)?;
            tx.note_audit(head);
            Ok(())
        });
        self.invalidate();
        if let Err(e) = inserted {
            Self::discard(
                backend,
                KeyRef {
                    context,
                    locator: &record.locator,
                    blob: record.blob.as_deref(),
                },
            );
            return Err(e);
        }
        tracing::info!(
            namespace = %record.namespace, name = %record.name,
            key_type = %spec.key_type(), backend = %record.backend, "created key"
        );
        let resolved = self.verified_with(record, Vec::new())?;
        self.info(&resolved)
    }

    /// Destroys a key (or version) just made whose record was not stored: never leave one in
    /// the backend that no record names. A failure is logged (doctor then lists the orphan).
    fn discard(backend: &dyn Backend, key: KeyRef<'_>) {
        if let Err(cleanup) = backend.destroy(key) {
            tracing::error!(
                backend = backend.name(),
                locator = %key.locator,
                "could not destroy a key that was made but not recorded: {cleanup}"
            );
        }
    }

    /// Every key's record, verified (with its versions).
    fn all_verified(&self) -> Result<Vec<resolve::Resolved>> {
        self.store
            .keys(None)?
            .into_iter()
            .map(|r| self.verified(r))
            .collect()
    }

    /// Checks a new key's schedule before anything is made.
    fn check_schedule(options: &KeyOptions) -> Result<Schedule> {
        for (at, what) in [
            (options.activate_at, "the activation time"),
            (options.deactivate_at, "the deactivation time"),
        ] {
            if let Some(at) = at {
                crate::time::check_instant(at, what)?;
            }
        }
        let rotate_after = match options.rotate_after {
            Some(d) if d.as_secs() == 0 => {
                return Err(Error::InvalidInput(
                    "--rotate-after must be at least one second".into(),
                ))
            }
            Some(d) => Some(crate::time::duration_secs(d)?),
            None => None,
        };
        if options.deactivate_at.is_some_and(|off| off <= now()) {
            return Err(Error::InvalidInput(
                "the deactivation time is past: give a time to come".into(),
            ));
        }
        if let (Some(on), Some(off)) = (options.activate_at, options.deactivate_at) {
            if off <= on {
                return Err(Error::InvalidInput(
                    "the deactivation time must come after the activation time".into(),
                ));
            }
        }
        Ok(Schedule { rotate_after })
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

    /// The fields of `id`, an ID this store issued, authenticated (its MAC checked) without
    /// reading the store: which namespace a key is in, before anything about it is looked up.
    /// An ID that checked out before is remembered (up to 4096), and answered without its MAC.
    ///
    /// # Errors
    /// [`Error::KeyIdAuthentication`] for an ID that is malformed, changed, or another store's.
    pub fn authenticate_id(&self, id: &str) -> Result<Arc<KeyIdFields>> {
        self.ids.decode(id)
    }

    /// The info of the key `id`, after the work its schedule makes due now (so that it tells the
    /// key as it is: activated, expired, rotated or destroyed on time).
    ///
    /// # Errors
    /// [`Error::KeyIdAuthentication`], [`Error::NoSuchKey`], [`Error::Integrity`]; the errors of
    /// due work (a destruction whose device is away).
    pub fn key_info(&self, id: &str) -> Result<KeyInfo> {
        // Like every command on a key, showing it first runs the work its schedule makes due.
        let resolved = self.resolve_current(id)?;
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
        // A live key of that name, else the newest destroyed one (so that the name says when).
        let found = self
            .store
            .keys(Some(namespace))?
            .into_iter()
            .filter(|record| record.name == name)
            .max_by_key(|record| {
                (
                    record.state != KeyState::Destroyed.as_str(),
                    record.created_at,
                )
            });
        match found {
            Some(record) => Ok(Some(self.info(&self.verified(record)?)?)),
            None => Ok(None),
        }
    }

    /// Every key of `namespace` (or of every namespace) but destroyed ones, sorted by namespace
    /// and name.
    ///
    /// # Errors
    /// [`Error::Integrity`] if any record fails its MAC: a listing never shows forged keys.
    pub fn list_keys(&self, namespace: Option<&str>) -> Result<Vec<KeyInfo>> {
        let mut keys = self.list_all_keys(namespace)?;
        keys.retain(|k| k.state != KeyState::Destroyed);
        Ok(keys)
    }

    /// Every key of `namespace` (or of every namespace), destroyed ones (tombstones) too.
    ///
    /// # Errors
    /// As [`Self::list_keys`].
    pub fn list_all_keys(&self, namespace: Option<&str>) -> Result<Vec<KeyInfo>> {
        self.store
            .keys(namespace)?
            .into_iter()
            .map(|record| self.info(&self.verified(record)?))
            .collect()
    }

    /// The recorded public key of the asymmetric key `id` (its current version's).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a symmetric key; resolution errors.
    pub fn public_key(&self, id: &str) -> Result<PublicKey> {
        self.public_key_version(id, None)
    }

    /// The recorded public key of one version (`None`: the current one) of the key `id`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a symmetric key or a version the key does not have;
    /// [`Error::WrongState`] for a destroyed key; resolution errors.
    pub fn public_key_version(&self, id: &str, version: Option<u32>) -> Result<PublicKey> {
        let resolved = self.resolve_current(id)?;
        if resolved.material_destroyed() {
            return Err(self.wrong_state(&resolved, "give its public key", KeyUse::Process));
        }
        let version = version.unwrap_or(resolved.record.version);
        let material = resolved.material(version).ok_or_else(|| {
            Error::InvalidInput(format!(
                "key `{}` has versions 1 to {}, not {version}",
                resolved.label, resolved.record.version
            ))
        })?;
        Self::public_key_of(&resolved, material)
    }

    /// Asks the key's backend for the public key of its current version (the recorded one is
    /// what [`Self::public_key`] returns); for consistency checks.
    ///
    /// # Errors
    /// Resolution and backend errors.
    pub fn backend_public_key(&self, id: &str) -> Result<PublicKey> {
        let resolved = self.resolve_current(id)?;
        let backend = self.backend(&resolved.record.backend)?;
        backend.public_key(self.key_ref(&resolved, resolved.current()?))
    }
}
