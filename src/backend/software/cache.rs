//! The software backend's kept keys (`[software] key_cache_secs`): signing and AES-GCM keys
//! loaded once and used again until they idle out, each under an ID of its record, its sealed
//! blob and its use, so that a changed blob is never served from here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use aws_lc_rs::aead::RandomizedNonceKey;

use super::SigningPair;
use crate::backend::KeyRef;
use crate::error::Result;
use crate::key::SignatureFormat;

/// The most loaded keys kept at once.
const CACHE_LIMIT: usize = 256;

/// Loaded keys, each kept until `idle` has passed since its last use.
pub(super) struct KeyCache {
    idle: Duration,
    pub(super) entries: Mutex<HashMap<[u8; 32], Cached>>,
}

pub(super) struct Cached {
    key: Arc<Loaded>,
    used: Instant,
}

/// A key loaded for one use, as [`KeyCache`] keeps it.
pub(super) enum Loaded {
    Signing(SigningPair),
    Aes(RandomizedNonceKey),
}

/// What a kept key is loaded for: part of its place in the cache.
#[derive(Clone, Copy)]
pub(super) enum Use {
    Sign(SignatureFormat),
    Aes,
}

#[cfg(test)]
thread_local! {
    /// How far this thread's cache clock runs ahead of the real one.
    pub(super) static CLOCK_AHEAD: std::cell::Cell<Duration> =
        const { std::cell::Cell::new(Duration::ZERO) };
}

/// The cache's clock: the monotonic clock, which a unit test moves forward instead of sleeping.
#[cfg(not(test))]
fn cache_now() -> Instant {
    Instant::now()
}

#[cfg(test)]
fn cache_now() -> Instant {
    Instant::now() + CLOCK_AHEAD.with(std::cell::Cell::get)
}

/// Which kept key serves `key` for `the_use`: its record, its sealed blob and the use.
pub(super) fn id(key: &KeyRef<'_>, blob: &[u8], the_use: Use) -> [u8; 32] {
    let mut d = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    d.update(b"keyhold software key in use\0");
    d.update(key.context.store_id);
    d.update(key.context.uuid);
    d.update(key.context.spec.algorithm().as_str().as_bytes());
    d.update(&match the_use {
        Use::Sign(format) => [0, u8::from(format == SignatureFormat::Der)],
        Use::Aes => [1, 0],
    });
    d.update(blob);
    let mut id = [0u8; 32];
    id.copy_from_slice(d.finish().as_ref());
    id
}

impl KeyCache {
    /// Keys kept for `idle` after their last use.
    pub(super) fn new(idle: Duration) -> Self {
        Self {
            idle,
            entries: Mutex::default(),
        }
    }

    /// The key for `id`, loaded by `load` unless a fresh one is kept.
    pub(super) fn get_or_load(
        &self,
        id: [u8; 32],
        load: impl FnOnce() -> Result<Loaded>,
    ) -> Result<Arc<Loaded>> {
        let now = cache_now();
        {
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            entries.retain(|_, c| now.duration_since(c.used) < self.idle);
            if let Some(hit) = entries.get_mut(&id) {
                hit.used = now;
                return Ok(Arc::clone(&hit.key));
            }
        }
        // Loaded outside the lock: other threads' keys need not wait for this one.
        let key = Arc::new(load()?);
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= CACHE_LIMIT {
            entries.clear();
        }
        entries.insert(
            id,
            Cached {
                key: Arc::clone(&key),
                used: now,
            },
        );
        Ok(key)
    }

    /// Drops every kept copy of `key` (its blob `blob`), whatever it was loaded for.
    pub(super) fn forget(&self, key: &KeyRef<'_>, blob: &[u8]) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        for the_use in [
            Use::Sign(SignatureFormat::Der),
            Use::Sign(SignatureFormat::Raw),
            Use::Aes,
        ] {
            entries.remove(&id(key, blob, the_use));
        }
    }
}
