//! What ties the store's committed state to something outside it: binding a monotonic counter
//! (a TPM NV counter or a token object) or a file anchor, and checking the state against it; the
//! lock that keeps a change's commit and its counter increment together across processes; a
//! generation restarted (after a restore); and the first state of a store made before
//! commitments existed (`adopt`).

use std::fs;
use std::sync::atomic::Ordering;

use super::anchor::{foreign, foreign_text};
use super::commit::{self, tampered, Recomputed};
use super::state::{next_generation, pending_of, put_digest, put_meta, read_state};
use super::{
    compare_counter, CommitKeys, Counter, CounterAt, CounterBinding, CounterCheck, CounterValue,
    FileAnchor, Store, StoreState,
};
use crate::error::{Error, Result};

impl Store {
    /// Checks the store's generation against `counter` (which the keystore made for the index
    /// the state names, or for a new binding) and keeps it: every change from now on is checked
    /// against it first and advances it after. A state not yet bound to a counter is bound now
    /// (the counter is made if absent); a crash while binding is finished here.
    ///
    /// # Errors
    /// [`Error::StoreTampered`] for a store older than the counter (restored from a copy), a
    /// counter behind the store by more than one change, gone, or not keyhold's; the counter's
    /// device errors; storage errors.
    pub fn bind_counter(&mut self, counter: Box<dyn Counter>) -> Result<()> {
        self.counter = Some(counter);
        let _lock = self.counter_lock()?;
        // Read again under the lock: another process may have changed the store (and advanced
        // the counter) since it was opened.
        let state = {
            let conn = self.conn();
            let (_, state) = self.current_state(&conn)?;
            state
        };
        if state.counter.is_some_and(|b| b.offset.is_some()) {
            return self.check_counter(&state);
        }
        let Some(counter) = self.counter.take() else {
            return Ok(());
        };
        // Asked first: a counter that cannot be reached, or an index someone else holds, changes
        // nothing, not even the state.
        let first = counter.read()?;
        if first == CounterValue::Foreign {
            // Someone else holds the counter's place (a TPM index, which takes the owner's
            // authorisation; objects under the label on a token, which take its PIN): the
            // store cannot be anchored there. Not fatal for a store never bound (the anchor file
            // still guards it), but said.
            tracing::warn!(
                "{}: the store's generation stays anchored in its anchor file only",
                foreign_text(counter.as_ref())
            );
            return Ok(());
        }
        if let (None, CounterValue::Count(count)) = (state.counter, first) {
            // The counter exists, with this store's authorisation: the store was bound to it
            // before. A state that knows nothing of it is from before (or had its binding cut
            // out, which its MAC forbids): an older copy.
            return Err(tampered(format!(
                "{} has counted this store's changes (it is at {count}), but the store does not \
                 know it: it is an older copy, from before it was anchored in that counter; if \
                 you put it back on purpose, `keyhold store reanchor --yes` accepts it",
                counter.describe()
            )));
        }
        let at = counter.at();
        self.counter = Some(counter);
        let bound = match state.counter {
            // Pending at this counter: a binding interrupted, to finish.
            Some(binding) if binding.at == at => binding,
            // Pending at another counter, or not begun.
            _ => {
                // Say which counter first, so that a crash before the binding is complete leaves
                // a state that names it: the next open finishes the binding rather than finding
                // a counter the store does not know of.
                let pending = CounterBinding { at, offset: None };
                self.transact(|_| Ok(()), |_| Ok(Some(pending)))?;
                pending
            }
        };
        let counter = self.counter.as_deref().ok_or_else(|| Error::Integrity {
            what: "the counter vanished while it was being bound (a keyhold bug)".into(),
        })?;
        let count = match first {
            CounterValue::Count(count) => count,
            CounterValue::Absent => {
                counter.create()?;
                match counter.read()? {
                    CounterValue::Count(count) => count,
                    _ => {
                        return Err(tampered(format!(
                            "{} was made but does not read back as keyhold's",
                            counter.describe()
                        )))
                    }
                }
            }
            CounterValue::Foreign => return Err(foreign(counter)),
        };
        tracing::info!(counter = %counter.describe(), "the store's generation is now anchored in a counter");
        self.transact(
            |_| Ok(()),
            |current| {
                // The change being made takes the generation to current + 1 and then advances the
                // counter from `count`: so `count = current + offset`.
                Ok(Some(CounterBinding {
                    at: bound.at,
                    offset: Some(count.wrapping_sub(current.generation)),
                }))
            },
        )
    }

    /// The state against its counter: equal; one behind (a crash between a commit and the
    /// counter's increment: repaired); anything else refused.
    pub(super) fn check_counter(&self, state: &StoreState) -> Result<()> {
        let Some(counter) = self.counter.as_deref() else {
            return Ok(());
        };
        match compare_counter(counter, state)? {
            CounterCheck::InStep => Ok(()),
            CounterCheck::OneBehind => {
                tracing::info!(
                    counter = %counter.describe(),
                    "the store is one change ahead of its counter (interrupted after a change): \
                     advancing the counter"
                );
                counter.increment()
            }
            CounterCheck::Refused(what) => Err(tampered(what)),
        }
    }

    /// The counter this store's generation is bound to in this process, if any.
    pub fn counter(&self) -> Option<&dyn Counter> {
        self.counter.as_deref()
    }

    /// Records this store's generations in `anchor` from now on.
    pub fn set_anchor(&mut self, anchor: FileAnchor) {
        self.anchor = Some(anchor);
    }

    /// The anchor this store records its generations in, if any.
    pub fn anchor(&self) -> Option<&FileAnchor> {
        self.anchor.as_ref()
    }

    /// Gives a store made before the commitment its first state, computed by the keystore from
    /// rows it has just verified: writes every digest, the state at generation 1 and the metadata
    /// MAC `meta_mac` (format 2), in one transaction. Returns the state; if another process
    /// adopted the store meanwhile, returns `None` (the caller opens the store again).
    ///
    /// # Errors
    /// Storage errors; nothing is changed then.
    pub(crate) fn adopt(
        &mut self,
        keys: &CommitKeys,
        rows: &Recomputed,
        meta_mac: &[u8],
    ) -> Result<Option<StoreState>> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| Error::storage("begin adopting the store", e))?;
        if read_state(&tx, &self.dir)?.is_some() {
            return Ok(None);
        }
        for (uuid, digest) in rows.digests() {
            put_digest(&tx, &uuid, digest)?;
        }
        let total = rows.total(keys);
        let state = keys.state(1, total, None, None, meta_mac);
        put_meta(&tx, commit::STATE_ENTRY, &state.encode())?;
        put_meta(&tx, "meta_mac", meta_mac)?;
        tx.commit()
            .map_err(|e| Error::storage("commit adopting the store", e))?;
        drop(conn);
        self.meta.mac = meta_mac.to_vec();
        Ok(Some(state))
    }

    /// With a counter bound: the lock that keeps a change's commit and its counter increment
    /// together, across threads and processes, so that no one reads the counter between the two
    /// (it would take the missing increment for a crash and add one too many). An exclusive
    /// `flock` on the store directory (never on the database file: closing another descriptor of
    /// it would drop SQLite's own locks), waited for at most the store's busy timeout. `None`
    /// without a counter.
    pub(super) fn counter_lock(&self) -> Result<Option<fs::File>> {
        if self.counter.is_none() {
            return Ok(None);
        }
        self.dir_lock().map(Some)
    }

    /// The exclusive lock on the store directory that changes of a counter-bound store hold from
    /// before their transaction to after their counter's increment (see `counter_lock`).
    ///
    /// # Errors
    /// I/O errors, and another process holding it for 10 s.
    pub(crate) fn dir_lock(&self) -> Result<fs::File> {
        let dir = fs::File::open(&self.dir)
            .map_err(|e| Error::io(format!("open {}", self.dir.display()), e))?;
        crate::audit::lock_exclusive(&dir, std::time::Duration::from_secs(10)).map_err(|e| {
            Error::io(
                format!(
                    "lock {} (another keyhold process held it for 10 s)",
                    self.dir.display()
                ),
                e,
            )
        })?;
        Ok(dir)
    }

    /// The counter's value and the committed state read together, under the counter lock (so
    /// that no change is between its commit and its increment), for `store verify`. `None`
    /// without a counter bound in this process.
    ///
    /// # Errors
    /// The counter's device errors; storage errors.
    pub fn counter_and_state(&self) -> Result<Option<(CounterCheck, Option<StoreState>)>> {
        let Some(counter) = self.counter.as_deref() else {
            return Ok(None);
        };
        let _lock = self.counter_lock()?;
        let state = read_state(&self.conn(), &self.dir)?;
        let check = match &state {
            Some(state) => compare_counter(counter, state)?,
            None => CounterCheck::InStep,
        };
        Ok(Some((check, state)))
    }

    /// Takes the store's generation to at least `at_least` (and one past the current), dropping
    /// its counter binding: a store restored from a backup must not be older than its anchor,
    /// and is anchored afresh. No row changes.
    ///
    /// # Errors
    /// As [`Self::write`].
    ///
    /// `rebind_at`: the NV index a counter should be bound at by the next bind (a pending
    /// binding), whatever the state says; else a binding the state has becomes pending.
    pub(crate) fn restart_generation(
        &self,
        at_least: u64,
        rebind_at: Option<CounterAt>,
    ) -> Result<u64> {
        let _lock = self.dir_lock()?;
        self.transact_inner(
            |_| Ok(()),
            |state| {
                Ok((
                    next_generation(state)?.max(at_least),
                    pending_of(state, rebind_at),
                ))
            },
            true,
        )?;
        Ok(self.seen.load(Ordering::SeqCst))
    }
}
