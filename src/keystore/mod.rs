//! The application-facing keystore: creates keys, resolves authenticated key IDs, enforces each
//! key's one purpose, and calls the backend that holds the key.

mod doctor;
mod envelope;
mod key_id;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::{constant_time, hkdf, hmac};

use crate::backend::software::SoftwareBackend;
use crate::backend::{
    Backend, BackendReport, Capabilities, KeyContext, KeyOptions, KeyRef, Sealed,
};
use crate::config::{BackendConfig, Config, Fallback, Pkcs11Config, TpmConfig};
use crate::error::{Error, Result};
use crate::key::{validate_name, Algorithm, KeySpec, KeyState, Purpose, SignatureFormat};
use crate::public_key::PublicKey;
use crate::sealer::{RootSecret, Sealer};
use crate::secret::SecretBytes;
use crate::store::{KeyRecord, Store, StoreMeta};

pub use doctor::{BackendHealth, Doctor, MissingKey, Orphan, UncheckedKey};
use key_id::KeyIdCodec;
pub use key_id::{KeyIdFields, PREFIX as KEY_ID_PREFIX};

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
}

/// Keys resolved from their IDs, kept while nobody else has written to the store.
///
/// Resolving an ID means an HMAC over the ID, a database read and an HMAC over the record: more
/// than a token's signature costs. A record is cached only after both MACs verified, and the
/// whole cache is dropped when another process commits to the database (SQLite's
/// `data_version`, read at most every [`FRESHNESS`]) or this keystore writes to it; a resolution
/// that raced one of this keystore's writes is not cached. Cached records hold no key material in clear.
#[derive(Debug, Default)]
struct ResolvedCache {
    data_version: i64,
    /// Bumped by every write of this keystore, so that a resolution that raced a write (whose
    /// commit `data_version` does not show on this connection) is not cached.
    generation: u64,
    /// When `data_version` was last read; `None` before the first read.
    checked_at: Option<std::time::Instant>,
    by_id: HashMap<String, Arc<Resolved>>,
}

/// How long a read of `data_version` is trusted. Asking SQLite costs a read transaction (about
/// 10 µs of locking syscalls), as much as a token's HMAC; a change committed by another process
/// is therefore seen here within this window. This keystore's own writes are seen at once.
const FRESHNESS: std::time::Duration = std::time::Duration::from_millis(1);

/// The most IDs kept resolved; past it the cache starts over.
const CACHE_LIMIT: usize = 4096;

/// Keys derived from the root secret, each for one job (HKDF-SHA256, salt = store ID).
struct DerivedKeys {
    key_id_mac: SecretBytes,
    record_mac: SecretBytes,
    software_kek: SecretBytes,
    tpm_auth_kek: SecretBytes,
    meta_mac: SecretBytes,
}

fn derive_keys(root: &RootSecret, store_id: &[u8; 16]) -> Result<DerivedKeys> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, store_id).extract(root.expose());
    let expand = |info: &'static [u8]| -> Result<SecretBytes> {
        let mut out = SecretBytes::zeroed(32);
        prk.expand(&[info], hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(out.expose_mut()))
            .map_err(|_| Error::crypto("derive the store's keys"))?;
        Ok(out)
    };
    Ok(DerivedKeys {
        key_id_mac: expand(b"keyhold v1 key-id mac")?,
        record_mac: expand(b"keyhold v1 record mac")?,
        software_kek: expand(b"keyhold v1 software kek")?,
        tpm_auth_kek: expand(b"keyhold v1 tpm auth kek")?,
        meta_mac: expand(b"keyhold v1 store meta mac")?,
    })
}

/// The MAC of a store's metadata under the key derived for it.
fn meta_mac(keys: &DerivedKeys, meta: &StoreMeta) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, keys.meta_mac.expose());
    hmac::sign(&key, &meta.mac_input()).as_ref().to_vec()
}

/// Checks, right after unsealing and before anything is written or re-sealed, that the root
/// secret is the one the store's records were made under and that the metadata (sealer kind and
/// parameters: PCRs, SRK Name, recovery seal, KDF settings) is what keyhold wrote.
///
/// Whoever can write the store directory can put in a seal of a root they chose, and a MAC under
/// it: the metadata MAC alone cannot tell that seal from ours. The records can: they were MAC'd
/// under the old root, so under a replaced one none of them verifies. Every record is checked
/// (an HMAC each), and any failure refuses the store: a replaced root with one record forged
/// under it must not open either, or new keys would be made under a key-encryption key the
/// intruder knows. (A replaced root in a store whose records were all deleted cannot be told
/// from a new store; the sealer the user states, not the store, is the defence there.)
fn check_store(store: &Store, keys: &DerivedKeys) -> Result<()> {
    let meta = store.meta();
    let record_mac = hmac::Key::new(hmac::HMAC_SHA256, keys.record_mac.expose());
    let records = store.keys(None)?;
    let failed: Vec<&KeyRecord> = records
        .iter()
        .filter(|r| {
            let expected = hmac::sign(&record_mac, &r.mac_input(&meta.store_id));
            constant_time::verify_slices_are_equal(expected.as_ref(), &r.mac).is_err()
        })
        .collect();
    // Every record failing means a root the records were not made under, unless the seal is one
    // only the user's secret opens: a passphrase seal that opened is genuine, so its records
    // were changed.
    if !records.is_empty()
        && failed.len() == records.len()
        && meta.sealed_root.sealer != crate::sealer::PassphraseSealer::KIND
    {
        return Err(Error::Unseal {
            reason: format!(
                "none of the store's {} key records verifies under the root secret the `{}` \
                 sealer gave back: its sealed root secret was replaced (someone who can write \
                 the store directory and use the device put in a seal of their own), or every \
                 record was changed; do not create keys in this store, and restore it from a \
                 backup",
                records.len(),
                meta.sealed_root.sealer
            ),
        });
    }
    let expected = meta_mac(keys, meta);
    if meta.mac.is_empty() || constant_time::verify_slices_are_equal(&expected, &meta.mac).is_err()
    {
        return Err(Error::Integrity {
            what: format!(
                "the store's sealer metadata (sealer `{}`, its parameters such as PCRs, SRK Name \
                 and recovery seal) {}; nothing was re-sealed",
                meta.sealed_root.sealer,
                if meta.mac.is_empty() {
                    "carries no MAC (stores made by development builds before the metadata MAC \
                     lack one and do not open with this version; a store made since always has \
                     one, so a missing MAC was removed)"
                } else {
                    "failed its MAC"
                }
            ),
        });
    }
    if let Some(first) = failed.first() {
        return Err(Error::Integrity {
            what: format!(
                "{} of the store's {} key records fail their MAC (the first: key {}): they were \
                 changed outside keyhold, or the sealed root secret was replaced and records \
                 were added under it",
                failed.len(),
                records.len(),
                crate::hex::encode(&first.uuid)
            ),
        });
    }
    Ok(())
}

/// Unseals `store`'s root secret with `sealer`, which must be the kind that sealed it, and checks
/// the store against it ([`check_store`]).
///
/// The caller's sealer is the expectation the store cannot forge: a store that records another
/// kind is refused before anything is unsealed, whatever its metadata says.
fn unseal_root(store: &Store, sealer: &dyn Sealer) -> Result<(RootSecret, DerivedKeys)> {
    let meta = store.meta();
    if meta.sealed_root.sealer != sealer.kind() {
        return Err(Error::Unseal {
            reason: format!(
                "the store records a `{}` seal, but the caller expects a `{}` seal: keyhold does \
                 not follow a change of sealer it did not make (`keyhold reseal` makes one); if \
                 nobody changed it, its sealed root secret was replaced",
                meta.sealed_root.sealer,
                sealer.kind()
            ),
        });
    }
    let root = sealer.unseal(&meta.sealed_root, &meta.store_id)?;
    let keys = derive_keys(&root, &meta.store_id)?;
    check_store(store, &keys)?;
    Ok((root, keys))
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

/// The RSA-OAEP label of an envelope whose header and AAD are `binding`:
/// `"KHL1:" ‖ base64url(SHA-256(binding)) ‖ 0x00`, 49 bytes.
///
/// Not `binding` itself: a TPM takes a label only if it ends in 0x00 and fits in 64 bytes, and the
/// label must be the same whichever backend holds the key. The digest binds the header and AAD as
/// firmly as the whole would.
pub(crate) fn oaep_label(binding: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, binding);
    let mut label = b"KHL1:".to_vec();
    label.extend_from_slice(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(digest.as_ref())
            .as_bytes(),
    );
    label.push(0);
    label
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

/// A resolved key: its verified record and parsed spec.
#[derive(Debug)]
struct Resolved {
    record: KeyRecord,
    spec: KeySpec,
    /// `namespace/name`.
    label: String,
}

impl Resolved {
    fn label(&self) -> &str {
        &self.label
    }
}

/// A key made in software because the backend asked for could not make it.
struct FellBack<'a> {
    /// The backend asked for.
    from: &'a str,
    /// What it lacks.
    what: String,
}

impl Keystore {
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

    fn seal_record(&self, record: &mut KeyRecord) {
        let tag = hmac::sign(&self.record_mac, &record.mac_input(&self.store_id));
        record.mac = tag.as_ref().to_vec();
    }

    fn check_record(&self, record: &KeyRecord) -> Result<()> {
        let expected = hmac::sign(&self.record_mac, &record.mac_input(&self.store_id));
        constant_time::verify_slices_are_equal(expected.as_ref(), &record.mac).map_err(|_| {
            Error::Integrity {
                what: format!(
                    "the record of key {} failed its MAC",
                    crate::hex::encode(&record.uuid)
                ),
            }
        })
    }

    fn spec_of(record: &KeyRecord) -> Result<KeySpec> {
        KeySpec::from_names(&record.key_type, &record.purpose, &record.algorithm)
    }

    fn info(&self, resolved: &Resolved) -> Result<KeyInfo> {
        let r = &resolved.record;
        let id = self.ids.encode(&KeyIdFields {
            store_id: self.store_id,
            uuid: r.uuid,
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            backend: r.backend.clone(),
            locator: r.locator.clone(),
            spec: resolved.spec,
        })?;
        Ok(KeyInfo {
            id,
            store_id: self.store_id(),
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            spec: resolved.spec,
            backend: r.backend.clone(),
            locator: r.locator.clone(),
            state: r.state.parse()?,
            version: r.version,
            created_at: r.created_at,
            attributes: serde_json::from_str(&r.attributes).map_err(|_| Error::Integrity {
                what: format!(
                    "the record of `{}` has unreadable attributes",
                    resolved.label()
                ),
            })?,
        })
    }

    /// Checks a record's MAC and decodes what it says; the one way records come out of the store.
    fn verified(&self, record: KeyRecord) -> Result<Resolved> {
        self.check_record(&record)?;
        let spec = Self::spec_of(&record).map_err(|e| Error::Integrity {
            what: format!("an authenticated record names an unknown algorithm ({e})"),
        })?;
        let label = format!("{}/{}", record.namespace, record.name);
        Ok(Resolved {
            record,
            spec,
            label,
        })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, ResolvedCache> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets every resolved key (after this keystore changed the store).
    fn invalidate(&self) {
        let mut cache = self.cache();
        cache.by_id.clear();
        cache.generation += 1;
    }

    /// Authenticates `id` and loads its key's verified record, from the cache when the store has
    /// not changed since.
    fn resolve(&self, id: &str) -> Result<Arc<Resolved>> {
        let fresh_version = {
            let cache = self.cache();
            let fresh = cache.checked_at.is_some_and(|at| at.elapsed() < FRESHNESS);
            match (fresh, cache.by_id.get(id)) {
                (true, Some(hit)) => return Ok(Arc::clone(hit)),
                (true, None) => Some((cache.data_version, cache.generation)),
                (false, _) => None,
            }
        };
        let (version, generation) = match fresh_version {
            Some(seen) => seen,
            None => {
                let v = self.store.data_version()?;
                let mut cache = self.cache();
                if cache.data_version != v {
                    cache.by_id.clear();
                    cache.data_version = v;
                }
                cache.checked_at = Some(std::time::Instant::now());
                if let Some(hit) = cache.by_id.get(id) {
                    return Ok(Arc::clone(hit));
                }
                (v, cache.generation)
            }
        };
        let resolved = Arc::new(self.resolve_uncached(id)?);
        let mut cache = self.cache();
        // Cache only if nothing was written in between (by this keystore, or seen from others).
        if cache.data_version == version && cache.generation == generation {
            if cache.by_id.len() >= CACHE_LIMIT {
                cache.by_id.clear();
            }
            cache.by_id.insert(id.to_owned(), Arc::clone(&resolved));
        }
        Ok(resolved)
    }

    fn resolve_uncached(&self, id: &str) -> Result<Resolved> {
        let fields = self.ids.decode(id)?;
        let record = self
            .store
            .key(&fields.uuid)?
            .ok_or_else(|| Error::NoSuchKey {
                namespace: fields.namespace.clone(),
                name: fields.name.clone(),
            })?;
        let resolved = self.verified(record)?;
        let r = &resolved.record;
        let same = r.namespace == fields.namespace
            && r.name == fields.name
            && r.backend == fields.backend
            && r.locator == fields.locator
            && resolved.spec == fields.spec;
        if !same {
            return Err(Error::Integrity {
                what: "the key's record does not match its key ID".into(),
            });
        }
        let state: KeyState = r.state.parse().map_err(|_| Error::Integrity {
            what: format!("the record of `{}` has an unknown state", resolved.label()),
        })?;
        match state {
            KeyState::Active => Ok(resolved),
        }
    }

    /// What the backend is handed to find and use a resolved key.
    fn key_ref<'a>(&'a self, resolved: &'a Resolved) -> KeyRef<'a> {
        KeyRef {
            context: KeyContext {
                store_id: &self.store_id,
                uuid: &resolved.record.uuid,
                label: &resolved.label,
                spec: &resolved.spec,
            },
            locator: &resolved.record.locator,
            blob: resolved.record.blob.as_deref(),
        }
    }

    /// Resolves `id`, checks that its purpose is `purpose`, and runs `op` with its backend.
    fn use_key<T>(
        &self,
        id: &str,
        purpose: Purpose,
        operation: &'static str,
        op: impl FnOnce(&dyn Backend, KeyRef<'_>, &Resolved) -> Result<T>,
    ) -> Result<T> {
        let resolved = self.resolve(id)?;
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
                if fallback.is_none()
                    && matches!(self.fallbacks.get(asked), Some(Fallback::Software)) =>
            {
                tracing::info!(backend = asked, "{what}; creating the key in software");
                backend = self.backend(SoftwareBackend::NAME)?;
                fallback = Some(FellBack { from: asked, what });
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
        match self.fallbacks.get(asked) {
            Some(Fallback::Software) => {
                tracing::info!(backend = asked, "{what}; creating the key in software");
                Ok((
                    self.backend(SoftwareBackend::NAME)?,
                    Some(FellBack { from: asked, what }),
                ))
            }
            _ => Err(Error::Unsupported {
                backend: asked.to_owned(),
                what,
            }),
        }
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
        let resolved = self.resolve(id)?;
        let header = |algorithm| envelope::Header {
            algorithm,
            uuid: resolved.record.uuid,
            version: resolved.record.version,
        };
        match resolved.spec.algorithm() {
            Algorithm::RsaOaepSha256 => {
                check_input(plaintext, "encrypt")?;
                let header = header(Algorithm::RsaOaepSha256);
                let body = Self::recorded_public_key(&resolved)?
                    .encrypt_oaep(plaintext, &oaep_label(&header.aad(aad)))?;
                Ok(envelope::encode(header, &[], &body))
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
        let resolved = self.resolve(id)?;
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

/// Backends built from a configuration, with their fallback policies.
struct Configured {
    backends: Vec<Arc<dyn Backend>>,
    fallbacks: HashMap<String, Fallback>,
}

fn build_backends(config: &Config, keys: &DerivedKeys) -> Configured {
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
    fn destroy_object(&self, _: &str) -> Result<()> {
        Err(self.error())
    }
    fn destroy(&self, _: KeyRef<'_>) -> Result<()> {
        Err(self.error())
    }
}
