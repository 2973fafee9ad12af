//! Key versions: rotation (by hand, on schedule, and when AES-GCM invocations run out) and the
//! per-version AES-GCM invocation counter.
//!
//! A new version is made in the key's own backend (token, TPM or software) with the key's own
//! identity, so the key ID applications hold does not change; old versions stay for decrypting
//! and verifying down to the key's `min_decrypt_version`.
//!
//! AES-GCM with random 96-bit nonces must not encrypt more than 2^32 times under one key (NIST SP
//! 800-38D §8.3). Each version counts its encryptions: invocations are reserved in the store in
//! blocks before they are used (1, 2, 4, … up to [`MAX_BLOCK`] at a time, so a process that
//! encrypts once writes once and a busy one rarely), and a process starts from what is reserved,
//! never from what it used: a crash skips values, never reuses them. When the limit is reached
//! the key rotates and the new version encrypts.

use std::collections::HashMap;
use std::sync::Arc;

use super::resolve::Resolved;
use super::{KeyInfo, Keystore};
use crate::backend::KeyOptions;
use crate::error::{Error, Result};
use crate::key::KeyState;
use crate::store::{CounterRecord, VersionRecord};

/// The most invocations one reservation takes.
pub(super) const MAX_BLOCK: i64 = 1 << 16;

/// Invocations this process holds for one key version: `next..end` are reserved and unused.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Reservation {
    next: i64,
    end: i64,
    block: i64,
}

/// Reservations by key uuid and version.
pub(super) type Reservations = HashMap<([u8; 16], u32), Reservation>;

impl Keystore {
    /// Makes a new version of the key `id` in its backend; applications keep using the same ID.
    ///
    /// # Errors
    /// [`Error::WrongState`] unless the key is active; backend and storage errors (nothing is
    /// left in the backend then).
    pub fn rotate_key(&self, id: &str, reason: Option<&str>) -> Result<KeyInfo> {
        self.audited(id, "rotate", || {
            let r = self.resolve_current(id)?;
            let rotated = self.rotate_resolved(&r, reason)?;
            self.info(&rotated)
        })
    }

    /// Rotates a resolved key: generates the next version in the backend, then records it in
    /// one transaction with the key's new current version and a history entry. If another
    /// process rotated it meanwhile, the new object is destroyed and the other's version kept.
    pub(super) fn rotate_resolved(&self, r: &Resolved, reason: Option<&str>) -> Result<Resolved> {
        if let Some(at) = r.record.destroy_at {
            return Err(Error::WrongState {
                key: r.label.clone(),
                state: format!(
                    "scheduled for destruction on {}",
                    crate::time::format_utc(at)
                ),
                operation: "rotate",
                hint: "; `keyhold key cancel-destroy` keeps it".into(),
            });
        }
        if r.state != KeyState::Active {
            return Err(Error::WrongState {
                key: r.label.clone(),
                state: r.state.as_str().to_owned(),
                operation: "rotate",
                hint: "; only an active key makes new versions".into(),
            });
        }
        let backend = self.backend(&r.record.backend)?;
        let extractable = r.current()?.attributes.contains("\"extractable\":\"true\"");
        let generated =
            backend.generate(self.context(r), &KeyOptions::new().extractable(extractable))?;
        let version = r.record.version + 1;
        let created_at = crate::time::now();
        let mut row = VersionRecord {
            uuid: r.record.uuid,
            version,
            locator: generated.locator,
            blob: generated.blob,
            public_key: generated.public_key.map(|p| p.spki_der().to_vec()),
            attributes: attributes_json(generated.attributes, extractable)?,
            created_at,
            mac: Vec::new(),
        };
        row.mac = self.sign_row(&row.mac_input(&self.store_id));
        let recorded = self.change(&r.record.uuid, "rotated", reason, |tx, now| {
            // Another process rotated it, changed its state or scheduled its destruction
            // meanwhile: no new version then.
            if now.record.version != r.record.version
                || now.state != KeyState::Active
                || now.record.destroy_at.is_some()
            {
                return Ok(None);
            }
            tx.insert_version(&row)?;
            let mut rec = now.record.clone();
            rec.version = version;
            Ok(Some(rec))
        });
        // Ours if the version recorded is the one made here (a software key's versions share a
        // locator: their blobs differ).
        let won = matches!(&recorded, Ok(now) if now.record.version == version
        && now.material(version).is_some_and(|m| {
            m.locator == row.locator && m.blob == row.blob.as_deref()
        }));
        if !won {
            Self::discard(
                backend.as_ref(),
                crate::backend::KeyRef {
                    context: self.context(r),
                    locator: &row.locator,
                    blob: row.blob.as_deref(),
                },
            );
        }
        let recorded = recorded?;
        if won {
            tracing::info!(key = %recorded.label, version, "rotated key");
        }
        Ok(recorded)
    }

    /// Rotates a key whose current version has used its AES-GCM invocations (or takes the
    /// version another process made for the same reason).
    pub(super) fn rotate_exhausted(&self, r: &Resolved) -> Result<Arc<Resolved>> {
        let rotated =
            self.rotate_resolved(r, Some("AES-GCM invocation limit of the version reached"))?;
        let rotated = Arc::new(rotated);
        if !self.take_invocation(&rotated)? {
            return Err(Error::Crypto {
                operation: "reserve an AES-GCM invocation of a new key version",
            });
        }
        Ok(rotated)
    }

    /// Takes one AES-GCM invocation of the key's current version: from this process's
    /// reservation, else by reserving the next block in the store. `false` when the version has
    /// none left (the key must rotate).
    pub(super) fn take_invocation(&self, r: &Resolved) -> Result<bool> {
        let version = r.record.version;
        let slot = (r.record.uuid, version);
        let mut reservations = match self.reservations.try_lock() {
            Ok(reservations) => reservations,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            // Another thread holds it, perhaps while it reserves in the store.
            Err(std::sync::TryLockError::WouldBlock) => {
                super::memory_only::may_wait("the AES-GCM reservations")?;
                self.reservations
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            }
        };
        let held = reservations.entry(slot).or_default();
        if held.next < held.end {
            held.next += 1;
            return Ok(true);
        }
        super::memory_only::may_wait("reserve AES-GCM invocations in the store")?;
        let block = (held.block * 2).clamp(1, MAX_BLOCK);
        let limit = i64::try_from(self.gcm_limit).unwrap_or(i64::MAX);
        let reserved = self.store.write(|tx| {
            let stored = match tx.counter(&r.record.uuid, version)? {
                Some(c) if self.row_ok(&c.mac_input(&self.store_id), &c.mac) => c.reserved,
                Some(_) => {
                    return Err(Error::Integrity {
                        what: format!(
                            "the AES-GCM counter of version {version} of `{}` failed its MAC",
                            r.label
                        ),
                    })
                }
                None => 0,
            };
            if stored >= limit {
                return Ok(None);
            }
            let end = stored.saturating_add(block).min(limit);
            let mut row = CounterRecord {
                uuid: r.record.uuid,
                version,
                reserved: end,
                mac: Vec::new(),
            };
            row.mac = self.sign_row(&row.mac_input(&self.store_id));
            tx.put_counter(&row)?;
            Ok(Some((stored, end)))
        })?;
        let Some((start, end)) = reserved else {
            return Ok(false);
        };
        *held = Reservation {
            next: start + 1,
            end,
            block,
        };
        Ok(true)
    }
}

/// A version's attributes as the record keeps them (a JSON object of strings).
pub(super) fn attributes_json(
    reported: Vec<(String, String)>,
    extractable: bool,
) -> Result<String> {
    let mut attributes: std::collections::BTreeMap<String, String> = reported.into_iter().collect();
    if extractable {
        attributes.insert("extractable".into(), "true".into());
    }
    serde_json::to_string(&attributes).map_err(|_| Error::crypto("encode attributes"))
}
