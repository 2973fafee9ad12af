//! Key ID → verified record: the ID's MAC, the record's MAC, and a cache of what verified.

use std::collections::HashMap;
use std::sync::Arc;

use aws_lc_rs::hmac;

use super::key_id::KeyIdFields;
use super::{KeyInfo, Keystore};
use crate::backend::{KeyContext, KeyRef};
use crate::error::{Error, Result};
use crate::key::{KeySpec, KeyState};
use crate::store::{KeyRecord, VersionRecord};

/// Keys resolved from their IDs, kept while nobody else has written to the store.
///
/// Resolving an ID means an HMAC over the ID, a database read and an HMAC over the record: more
/// than a token's signature costs. A record is cached only after both MACs verified, and the
/// whole cache is dropped when another process commits to the database (SQLite's
/// `data_version`, read at most every [`Keystore::OTHERS_SEEN_WITHIN`]) or this keystore writes to it; a resolution
/// that raced one of this keystore's writes is not cached. Cached records hold no key material in clear.
#[derive(Debug, Default)]
pub(super) struct ResolvedCache {
    data_version: i64,
    /// Bumped by every write of this keystore, so that a resolution that raced a write (whose
    /// commit `data_version` does not show on this connection) is not cached.
    generation: u64,
    /// When `data_version` was last read; `None` before the first read.
    checked_at: Option<std::time::Instant>,
    by_id: HashMap<String, Arc<Resolved>>,
}

/// How long a read of `data_version` is trusted (see [`Keystore::OTHERS_SEEN_WITHIN`]).
const FRESHNESS: std::time::Duration = Keystore::OTHERS_SEEN_WITHIN;

/// The most IDs kept resolved; past it the cache starts over.
const CACHE_LIMIT: usize = 4096;

/// What the cache says of a key ID while whether the store changed was asked within
/// [`FRESHNESS`].
enum Fresh {
    /// Its resolved key.
    Hit(Arc<Resolved>),
    /// Not held: the store's `data_version` and the keystore's generation it was asked at.
    Miss((i64, u64)),
    /// Not asked within [`FRESHNESS`].
    Stale,
}

/// A resolved key: its verified record, versions and parsed spec and state.
#[derive(Debug)]
pub(super) struct Resolved {
    pub(super) record: KeyRecord,
    pub(super) spec: KeySpec,
    /// `namespace/name`.
    pub(super) label: String,
    /// The state the record holds.
    pub(super) state: KeyState,
    /// Versions 2..=current, verified (none once the key's material is destroyed).
    pub(super) versions: Vec<VersionRecord>,
}

/// One version's material, as the backend finds it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Material<'a> {
    pub(super) version: u32,
    pub(super) locator: &'a str,
    pub(super) blob: Option<&'a [u8]>,
    pub(super) public_key: Option<&'a [u8]>,
    pub(super) attributes: &'a str,
    pub(super) created_at: i64,
}

impl Resolved {
    pub(super) fn label(&self) -> &str {
        &self.label
    }

    /// Whether the key's material is gone (a tombstone).
    pub(super) fn material_destroyed(&self) -> bool {
        self.record.destroyed_at.is_some()
    }

    /// Version `version`'s material, if the key has it.
    pub(super) fn material(&self, version: u32) -> Option<Material<'_>> {
        if self.material_destroyed() {
            return None;
        }
        if version == 1 {
            let r = &self.record;
            return Some(Material {
                version: 1,
                locator: &r.locator,
                blob: r.blob.as_deref(),
                public_key: r.public_key.as_deref(),
                attributes: &r.attributes,
                created_at: r.created_at,
            });
        }
        self.versions
            .iter()
            .find(|v| v.version == version)
            .map(|v| Material {
                version: v.version,
                locator: &v.locator,
                blob: v.blob.as_deref(),
                public_key: v.public_key.as_deref(),
                attributes: &v.attributes,
                created_at: v.created_at,
            })
    }

    /// Every version's material, oldest first.
    pub(super) fn materials(&self) -> impl Iterator<Item = Material<'_>> {
        (1..=self.record.version).filter_map(|v| self.material(v))
    }

    /// The newest version's material.
    pub(super) fn current(&self) -> Result<Material<'_>> {
        self.material(self.record.version)
            .ok_or_else(|| Error::Integrity {
                what: format!(
                    "the current version {} of `{}` is missing",
                    self.record.version, self.label
                ),
            })
    }
}

impl Keystore {
    /// MACs `record` in the current format (2).
    pub(super) fn seal_record(&self, record: &mut KeyRecord) {
        record.mac_format = 2;
        let input = record.mac_input(&self.store_id).unwrap_or_default();
        record.mac = hmac::sign(&self.record_mac, &input).as_ref().to_vec();
    }

    pub(super) fn sign_row(&self, input: &[u8]) -> Vec<u8> {
        hmac::sign(&self.record_mac, input).as_ref().to_vec()
    }

    pub(super) fn row_ok(&self, input: &[u8], mac: &[u8]) -> bool {
        super::root::mac_ok(&self.record_mac, input, mac)
    }

    pub(super) fn check_record(&self, record: &KeyRecord) -> Result<()> {
        if super::root::record_mac_ok(&self.record_mac, &self.store_id, record) {
            return Ok(());
        }
        Err(Error::Integrity {
            what: format!(
                "the record of key {} failed its MAC",
                crate::hex::encode(&record.uuid)
            ),
        })
    }

    pub(super) fn spec_of(record: &KeyRecord) -> Result<KeySpec> {
        KeySpec::from_names(&record.key_type, &record.purpose, &record.algorithm)
    }

    /// The key ID of `record` (whose MAC the caller checked), of type `spec`.
    pub(super) fn id_of(&self, r: &KeyRecord, spec: KeySpec) -> Result<String> {
        self.ids.encode(&KeyIdFields {
            store_id: self.store_id,
            uuid: r.uuid,
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            backend: r.backend.clone(),
            locator: r.locator.clone(),
            spec,
        })
    }

    pub(super) fn info(&self, resolved: &Resolved) -> Result<KeyInfo> {
        let r = &resolved.record;
        let id = self.id_of(r, resolved.spec)?;
        let attributes = serde_json::from_str(&r.attributes).map_err(|_| Error::Integrity {
            what: format!(
                "the record of `{}` has unreadable attributes",
                resolved.label()
            ),
        })?;
        Ok(KeyInfo {
            id,
            store_id: self.store_id(),
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            spec: resolved.spec,
            backend: r.backend.clone(),
            locator: r.locator.clone(),
            state: resolved.state,
            version: r.version,
            versions: resolved
                .materials()
                .map(|m| super::VersionInfo {
                    version: m.version,
                    created_at: m.created_at,
                    locator: m.locator.to_owned(),
                })
                .collect(),
            min_decrypt_version: r.min_decrypt_version,
            rotate_after: r.rotate_after,
            activate_at: r.activate_at,
            deactivate_at: r.deactivate_at,
            destroy_at: r.destroy_at,
            destroyed_at: r.destroyed_at,
            created_at: r.created_at,
            attributes,
        })
    }

    /// Checks a record's MAC and its versions' and decodes what they say; the one way records
    /// come out of the store.
    pub(super) fn verified(&self, record: KeyRecord) -> Result<Resolved> {
        self.check_record(&record)?;
        let versions = if record.version > 1 && record.destroyed_at.is_none() {
            self.store.versions(Some(&record.uuid))?
        } else {
            Vec::new()
        };
        self.verified_with(record, versions)
    }

    /// [`Self::verified`] with the versions already read (in a write transaction).
    pub(super) fn verified_with(
        &self,
        record: KeyRecord,
        versions: Vec<VersionRecord>,
    ) -> Result<Resolved> {
        self.check_record(&record)?;
        let spec = Self::spec_of(&record).map_err(|e| Error::Integrity {
            what: format!("an authenticated record names an unknown algorithm ({e})"),
        })?;
        let label = format!("{}/{}", record.namespace, record.name);
        let state: KeyState = record.state.parse().map_err(|_| Error::Integrity {
            what: format!("the record of `{label}` has an unknown state"),
        })?;
        let expected: Vec<u32> = if record.destroyed_at.is_some() {
            Vec::new()
        } else {
            (2..=record.version).collect()
        };
        let found: Vec<u32> = versions.iter().map(|v| v.version).collect();
        let forged = versions
            .iter()
            .find(|v| v.uuid != record.uuid || !self.row_ok(&v.mac_input(&self.store_id), &v.mac));
        if let Some(v) = forged {
            return Err(Error::Integrity {
                what: format!("version {} of `{label}` failed its MAC", v.version),
            });
        }
        if found != expected {
            return Err(Error::Integrity {
                what: format!(
                    "`{label}` is at version {} but the store holds versions {found:?} of it \
                     besides the first",
                    record.version
                ),
            });
        }
        Ok(Resolved {
            record,
            spec,
            label,
            state,
            versions,
        })
    }

    pub(super) fn cache(&self) -> std::sync::MutexGuard<'_, ResolvedCache> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets every resolved key (after this keystore changed the store).
    pub(super) fn invalidate(&self) {
        let mut cache = self.cache();
        cache.by_id.clear();
        cache.generation += 1;
    }

    /// Notes that the store is at `version` now (a changed version empties the cache): the
    /// cached key `id`, if any, and the keystore's generation.
    fn observed(&self, version: i64, id: &str) -> (Option<Arc<Resolved>>, u64) {
        let mut cache = self.cache();
        if cache.data_version != version {
            cache.by_id.clear();
            cache.data_version = version;
        }
        cache.checked_at = Some(std::time::Instant::now());
        (cache.by_id.get(id).map(Arc::clone), cache.generation)
    }

    /// What the cache says of `id` without asking the store.
    fn fresh(&self, id: &str) -> Fresh {
        let cache = self.cache();
        let fresh = cache.checked_at.is_some_and(|at| at.elapsed() < FRESHNESS);
        match (fresh, cache.by_id.get(id)) {
            (true, Some(hit)) => Fresh::Hit(Arc::clone(hit)),
            (true, None) => Fresh::Miss((cache.data_version, cache.generation)),
            (false, _) => Fresh::Stale,
        }
    }

    /// Authenticates `id` and loads its key's verified record, from the cache when the store has
    /// not changed since.
    pub(super) fn resolve(&self, id: &str) -> Result<Arc<Resolved>> {
        let mut fresh_version = match self.fresh(id) {
            Fresh::Hit(hit) => return Ok(hit),
            Fresh::Miss(seen) => Some(seen),
            Fresh::Stale => None,
        };
        if super::memory_only::in_scope() {
            // From memory only: whether the store changed, if that can be read at once; a key
            // the cache does not hold is read from the store, which may wait.
            if fresh_version.is_none() {
                // One call at a time asks, the others wait for its answer (a read that never
                // waits on the database) rather than find the connection in use and move.
                let _asking = self
                    .checking
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match self.fresh(id) {
                    // Asked meanwhile: its answer is this call's.
                    Fresh::Hit(hit) => return Ok(hit),
                    Fresh::Miss(seen) => fresh_version = Some(seen),
                    Fresh::Stale => match self.store.try_data_version()? {
                        Some(v) => {
                            if let (Some(hit), _) = self.observed(v, id) {
                                return Ok(hit);
                            }
                        }
                        None => super::memory_only::may_wait("read the store")?,
                    },
                }
            }
            super::memory_only::may_wait("read the key's record")?;
        }
        let (version, generation) = match fresh_version {
            Some(seen) => seen,
            None => {
                let v = self.store.data_version()?;
                match self.observed(v, id) {
                    (Some(hit), _) => return Ok(hit),
                    (None, generation) => (v, generation),
                }
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

    pub(super) fn resolve_uncached(&self, id: &str) -> Result<Resolved> {
        let fields = self.ids.decode(id)?;
        // The store as a whole, as far as this key goes: its rows are the committed ones.
        let record = self
            .store
            .checked_key(&fields.uuid)?
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
        Ok(resolved)
    }

    /// What the backend is handed to find and use one version of a resolved key.
    pub(super) fn key_ref<'a>(
        &'a self,
        resolved: &'a Resolved,
        material: Material<'a>,
    ) -> KeyRef<'a> {
        KeyRef {
            context: self.context(resolved),
            locator: material.locator,
            blob: material.blob,
        }
    }

    pub(super) fn context<'a>(&'a self, resolved: &'a Resolved) -> KeyContext<'a> {
        KeyContext {
            store_id: &self.store_id,
            uuid: &resolved.record.uuid,
            label: &resolved.label,
            spec: &resolved.spec,
        }
    }
}
