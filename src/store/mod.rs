//! Key storage: one SQLite database (`keyhold.db`) in a private directory.
//!
//! The store keeps bytes; it does not judge them. The keystore computes and checks every record's
//! MAC, and the sealer authenticates the sealed root secret. Opening a store never writes to it
//! unless its schema must be migrated, so a failed command leaves the file byte-for-byte unchanged.

mod anchor;
mod commit;
mod files;
mod read;
mod record;
mod rows;
mod schema;
mod staged;
mod tx;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::error::{Error, Result};
use crate::sealer::SealedRoot;

pub use anchor::{compare_counter, judge_counter, Counter, CounterCheck, CounterValue, FileAnchor};
use anchor::{foreign, foreign_text};
use commit::Change;
pub(crate) use commit::{tampered, Mismatch, Recomputed, RowKind, Sum};
pub use commit::{CommitKeys, CounterAt, CounterBinding, StoreState};
use files::{check_private, make_private_dir, secure_delete};
pub use read::AllRows;
use read::{query, read_client, read_key};
pub use record::KeyRecord;
pub use rows::{ClientRecord, CounterRecord, EventRecord, VersionRecord};
pub use staged::Staged;
pub use tx::Tx;

/// The database file's name inside the store directory.
pub const DB_FILE: &str = "keyhold.db";

/// What the store knows about itself.
#[derive(Debug, Clone)]
pub struct StoreMeta {
    /// The store's random identity, bound into every key ID and record MAC.
    pub store_id: [u8; 16],
    /// The sealed root secret.
    pub sealed_root: SealedRoot,
    /// When the store was created (seconds since the Unix epoch).
    pub created_at: i64,
    /// HMAC-SHA256 over [`StoreMeta::mac_input`] under a key derived from the root secret: the
    /// sealer's kind and parameters (PCRs, SRK Name, recovery seal, KDF settings) are checked
    /// once the root is unsealed. Empty when the store holds none.
    pub mac: Vec<u8>,
    /// The generation and commitment (absent in a store made before them, until the keystore
    /// adopts it).
    pub state: Option<StoreState>,
}

impl StoreMeta {
    /// The canonical bytes [`StoreMeta::mac`] covers in `format`: every metadata entry but the
    /// MAC itself, each length-prefixed so that no two different metadata give the same bytes.
    ///
    /// Format 2 is format 1 under another domain string: its MAC says "this store has a committed
    /// state", so that deleting the state cannot pass the store off as one made before it.
    pub fn mac_input(&self, format: u8) -> Vec<u8> {
        let sealed = &self.sealed_root;
        let mut out =
            Vec::with_capacity(64 + sealed.sealer.len() + sealed.params.len() + sealed.blob.len());
        out.extend_from_slice(if format >= 2 {
            b"keyhold store metadata v2\0"
        } else {
            b"keyhold store metadata v1\0"
        });
        out.extend_from_slice(&self.store_id);
        for field in [sealed.sealer.as_bytes(), &sealed.params, &sealed.blob] {
            // Metadata entries are far below 4 GiB.
            out.extend_from_slice(&(field.len() as u32).to_be_bytes());
            out.extend_from_slice(field);
        }
        out.extend_from_slice(&self.created_at.to_be_bytes());
        out
    }
}

/// An open store.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    conn: Mutex<Connection>,
    meta: StoreMeta,
    /// The commitment's keys, once the keystore has unsealed the root: no write without them.
    commit: Option<CommitKeys>,
    /// The latest generation this process has seen: a write refuses a state older than it.
    seen: AtomicU64,
    /// The `data_version` at which this process last found every key's digest adding up to the
    /// state's total ([`NOT_TOTALLED`]: none): once another connection has written (another
    /// keyhold process, or anyone with sqlite3), key uses and writes add them up again.
    totalled: AtomicI64,
    anchor: Option<FileAnchor>,
    /// The counter that follows the generation (a TPM's), once the state is bound to one.
    counter: Option<Box<dyn Counter>>,
}

impl Store {
    /// Creates a new store in `dir` (made 0700 if absent) holding `meta`.
    ///
    /// The database is built under a temporary name and linked into place only when complete, so a
    /// failed or concurrent `init` never leaves a half-made store or overwrites one.
    ///
    /// # Errors
    /// [`Error::StoreExists`] if `dir` already holds a store; I/O and storage errors.
    pub fn create(dir: &Path, meta: &StoreMeta) -> Result<Self> {
        let db_path = dir.join(DB_FILE);
        if db_path.exists() {
            return Err(Error::StoreExists {
                path: dir.to_path_buf(),
            });
        }
        make_private_dir(dir)?;
        let tmp_path = dir.join(format!(".{DB_FILE}.init-{}", std::process::id()));
        let built = Self::build(&tmp_path, meta);
        let linked = built.and_then(|()| {
            fs::hard_link(&tmp_path, &db_path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Error::StoreExists {
                        path: dir.to_path_buf(),
                    }
                } else {
                    Error::io(format!("create {}", db_path.display()), e)
                }
            })
        });
        let _ = fs::remove_file(&tmp_path);
        linked?;
        Self::open(dir)
    }

    fn build(path: &Path, meta: &StoreMeta) -> Result<()> {
        // Create the file 0600 ourselves: SQLite gives its journal the database file's mode.
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
        let mut conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| Error::storage("open the new database", e))?;
        secure_delete(&conn).map_err(|e| Error::storage("configure the new database", e))?;
        schema::migrate(&mut conn)?;
        let tx = conn
            .transaction()
            .map_err(|e| Error::storage("begin writing store metadata", e))?;
        let put = |key: &str, value: &[u8]| {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)",
                params![key, value],
            )
            .map_err(|e| Error::storage("write store metadata", e))
        };
        put("store_id", &meta.store_id)?;
        put("sealer", meta.sealed_root.sealer.as_bytes())?;
        put("sealer_params", &meta.sealed_root.params)?;
        put("sealed_root", &meta.sealed_root.blob)?;
        put("created_at", meta.created_at.to_string().as_bytes())?;
        put("meta_mac", &meta.mac)?;
        if let Some(state) = &meta.state {
            put(commit::STATE_ENTRY, &state.encode())?;
        }
        tx.commit()
            .map_err(|e| Error::storage("commit store metadata", e))?;
        conn.close()
            .map_err(|(_, e)| Error::storage("close the new database", e))
    }

    /// Opens the store in `dir`, migrating its schema if it is older than this keyhold.
    ///
    /// # Errors
    /// [`Error::StoreNotFound`] if there is none; [`Error::StoreUnusable`] if the file is not a
    /// keyhold database, is damaged, or comes from a newer keyhold.
    pub fn open(dir: &Path) -> Result<Self> {
        let db_path = dir.join(DB_FILE);
        if !db_path.is_file() {
            return Err(Error::StoreNotFound {
                path: dir.to_path_buf(),
            });
        }
        check_private(dir, dir, "store directory", "700")?;
        check_private(dir, &db_path, "store database", "600")?;
        let unusable = |reason: &str, e: rusqlite::Error| Error::StoreUnusable {
            path: dir.to_path_buf(),
            reason: reason.to_owned(),
            source: Some(Box::new(e)),
        };
        let mut conn = Connection::open_with_flags(
            &db_path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| unusable("cannot open the database", e))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| unusable("cannot configure the database", e))?;
        schema::check_and_migrate(&mut conn, dir)?;
        secure_delete(&conn).map_err(|e| unusable("cannot configure the database", e))?;
        let meta = read_meta(&conn, dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            conn: Mutex::new(conn),
            meta,
            commit: None,
            seen: AtomicU64::new(0),
            totalled: AtomicI64::new(NOT_TOTALLED),
            anchor: None,
            counter: None,
        })
    }

    /// Lets this store be written: `keys` are the commitment's, `state` the state the keystore
    /// verified at open (its generation is the oldest any later write accepts), `anchor` where
    /// each change's generation is recorded outside the store, `totalled` the `data_version` of
    /// the read in which the keystore found every digest adding up to the state's total, if it
    /// did.
    pub fn attach(
        &mut self,
        keys: CommitKeys,
        state: &StoreState,
        anchor: Option<FileAnchor>,
        totalled: Option<i64>,
    ) {
        self.seen.store(state.generation, Ordering::SeqCst);
        self.totalled
            .store(totalled.unwrap_or(NOT_TOTALLED), Ordering::SeqCst);
        self.meta.state = Some(state.clone());
        self.commit = Some(keys);
        self.anchor = anchor;
    }

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
    fn check_counter(&self, state: &StoreState) -> Result<()> {
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

    /// The audit entry of the last change, as the committed state holds it now (read, and its MAC
    /// checked, under a read lock).
    ///
    /// # Errors
    /// [`Error::StoreTampered`] for a state missing or failing its MAC; storage errors.
    pub fn committed_audit_head(&self) -> Result<Option<crate::audit::Head>> {
        let Some(keys) = &self.commit else {
            return Ok(None);
        };
        let conn = self.conn();
        let state = read_state(&conn, &self.dir)?
            .ok_or_else(|| tampered("the store's committed state was deleted".into()))?;
        if !keys.state_ok(&state, &self.meta.mac) {
            return Err(tampered(
                "the store's committed state (its generation and commitment) fails its MAC".into(),
            ));
        }
        Ok(state.audit)
    }

    /// The record with identifier `uuid`, if any, for a use of its key (the caller checks its
    /// MAC), read with what vouches for it, in one read transaction: the committed state (its
    /// MAC, and not older than this process has seen); every key's digest against the state's
    /// total, whenever another connection has written since this one last added them up
    /// (SQLite's `data_version`); and the key's rows against its digest. A process that keeps
    /// the store open so finds a key's rows deleted or put back (with its digest or without), or
    /// the store put back whole, at the key's next use, not only at its next open. Without the
    /// commitment's keys, the record alone.
    ///
    /// # Errors
    /// [`Error::StoreTampered`] naming the key; storage errors; [`Error::Integrity`] if the row
    /// cannot be decoded.
    pub fn checked_key(&self, uuid: &[u8; 16]) -> Result<Option<KeyRecord>> {
        self.checked_read(
            |conn| Ok((*uuid, read_key(conn, uuid)?)),
            |uuid| format!("key record {}", crate::hex::encode(uuid)),
        )
    }

    /// The token client whose token hashes to `token_hash`, if any (the caller checks its MAC),
    /// read with what vouches for it as [`Self::checked_key`] reads a key: the committed state,
    /// the digests against the total, and the client's row against its digest. So a client
    /// removed and its row put back (from an older copy of the store) is refused at its
    /// token's next use.
    ///
    /// # Errors
    /// [`Error::StoreTampered`] naming the client; storage errors; [`Error::Integrity`] if the
    /// row cannot be decoded.
    pub fn checked_client(&self, token_hash: &[u8]) -> Result<Option<ClientRecord>> {
        self.checked_read(
            |conn| {
                let client = read_client(conn, "token_hash", &token_hash)?;
                Ok((client.as_ref().map(|c| c.uuid).unwrap_or_default(), client))
            },
            |uuid| format!("token client {}", crate::hex::encode(uuid)),
        )
    }

    /// `read` (a row and the uuid it is committed under) in one read transaction with the checks
    /// [`Self::checked_key`] describes; `what` names the uuid in the error.
    fn checked_read<T>(
        &self,
        read: impl FnOnce(&Connection) -> Result<([u8; 16], Option<T>)>,
        what: impl FnOnce(&[u8; 16]) -> String,
    ) -> Result<Option<T>> {
        let Some(keys) = &self.commit else {
            return Ok(read(&self.conn())?.1);
        };
        let mut conn = self.conn();
        let tx = conn
            .transaction()
            .map_err(|e| Error::storage("begin reading the store", e))?;
        let (_, state) = self.current_state(&tx)?;
        self.check_total(&tx, keys, &state)?;
        let (uuid, row) = read(&tx)?;
        let stored = read_digest(&tx, &uuid)?;
        let present = key_rows_sum(&tx, keys, &uuid)?;
        tx.commit()
            .map_err(|e| Error::storage("end reading the store", e))?;
        // A uuid without rows has no digest (the zero uuid of a token no client has, too).
        if stored.unwrap_or_default() != present {
            return Err(tampered(format!(
                "{}: its rows are not the ones committed (one deleted, put back from an older \
                 copy, or duplicated)",
                what(&uuid)
            )));
        }
        Ok(row)
    }

    /// Every token client, by name (the caller checks their MACs).
    ///
    /// # Errors
    /// Storage errors; [`Error::Integrity`] if a row cannot be decoded.
    pub fn clients(&self) -> Result<Vec<ClientRecord>> {
        let sql = format!("SELECT {} FROM clients ORDER BY name", rows::CLIENT_COLUMNS);
        query(&self.conn(), &sql, [], rows::client_from_row)
    }

    /// Every key's digest against `state`'s total, unless this process found them adding up at
    /// this generation already: a key's rows put back together with its digest change the sum.
    fn check_total(&self, tx: &Connection, keys: &CommitKeys, state: &StoreState) -> Result<()> {
        let version = read_data_version(tx)?;
        if self.totalled.load(Ordering::SeqCst) == version {
            return Ok(());
        }
        if keys.total_of(&read_digests(tx)?) != state.total_sum() {
            return Err(tampered(
                "the keys' digests do not add up to the committed total (a key's rows and digest \
                 put back together from an older copy): the store cannot tell which key; \
                 `keyhold store verify` reports the keys as they are"
                    .into(),
            ));
        }
        // This connection's own commits leave `data_version` as it is: each changes every digest
        // it touches and the total by the same amounts, so the digests still add up after them.
        self.totalled.store(version, Ordering::SeqCst);
        Ok(())
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

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The store's metadata, read at open.
    pub fn meta(&self) -> &StoreMeta {
        &self.meta
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave the connection half-written: every write is
        // one statement or one transaction, which SQLite rolls back.
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces the sealed root secret and the metadata MAC `mac` that covers it (after
    /// `keyhold reseal`), in one transaction: the old seal stays in place until the new one is
    /// committed. The state's counter binding is dropped with it (the caller anchors the store
    /// again, to the new sealer's TPM or the configuration's).
    ///
    /// # Errors
    /// Storage errors; nothing is changed then.
    pub fn replace_sealed_root(&mut self, sealed: &SealedRoot, mac: &[u8]) -> Result<()> {
        let lock = self.dir_lock()?;
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| Error::storage("begin replacing the sealed root secret", e))?;
        let (keys, state) = self.current_state(&tx)?;
        // The state's MAC covers the metadata MAC: the new seal and the next generation go in
        // together.
        self.check_counter(&state)?;
        // The new seal may come with another TPM (or none): a binding becomes pending, and the
        // keystore completes it right after, with the new sealer's TPM or the configuration's.
        let next = keys.state(
            next_generation(&state)?,
            state.total_sum(),
            pending_of(&state, None),
            state.audit,
            mac,
        );
        for (key, value) in [
            ("sealer", sealed.sealer.as_bytes()),
            ("sealer_params", sealed.params.as_slice()),
            ("sealed_root", sealed.blob.as_slice()),
        ] {
            let changed = tx
                .execute(
                    "UPDATE meta SET value = ?2 WHERE key = ?1",
                    params![key, value],
                )
                .map_err(|e| Error::storage("write the sealed root secret", e))?;
            if changed != 1 {
                return Err(Error::StoreUnusable {
                    path: self.dir.clone(),
                    reason: format!("its metadata entry `{key}` is missing"),
                    source: None,
                });
            }
        }
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('meta_mac', ?1)",
            params![mac],
        )
        .map_err(|e| Error::storage("write the metadata MAC", e))?;
        put_meta(&tx, commit::STATE_ENTRY, &next.encode())?;
        tx.commit()
            .map_err(|e| Error::storage("commit the sealed root secret", e))?;
        drop(conn);
        self.meta.sealed_root = sealed.clone();
        self.meta.mac = mac.to_vec();
        self.meta.state = Some(next.clone());
        self.committed(&next);
        drop(lock);
        self.counter = None;
        Ok(())
    }

    /// Under a write transaction: the commitment's keys and the state as stored, checked (its
    /// MAC, and that it is not older than a state this process has seen).
    fn current_state(&self, tx: &Connection) -> Result<(&CommitKeys, StoreState)> {
        let Some(keys) = &self.commit else {
            return Err(Error::Integrity {
                what: "the store was about to be changed before its root secret was unsealed and \
                       its commitment checked (a keyhold bug: nothing was written)"
                    .into(),
            });
        };
        let state = read_state(tx, &self.dir)?.ok_or_else(|| {
            tampered(
                "the store's committed state (its generation and commitment) was deleted while \
                 keyhold had it open"
                    .into(),
            )
        })?;
        if !keys.state_ok(&state, &self.meta.mac) {
            return Err(tampered(
                "the store's committed state (its generation and commitment) fails its MAC: it \
                 was changed while keyhold had it open"
                    .into(),
            ));
        }
        let seen = self.seen.load(Ordering::SeqCst);
        if state.generation < seen {
            return Err(tampered(format!(
                "the store went back from generation {seen} to {} while keyhold had it open: an \
                 older copy was put in its place",
                state.generation
            )));
        }
        Ok((keys, state))
    }

    /// After a commit: remembers the generation and records it in the anchor. A failure to write
    /// the anchor is logged, not returned: the change is made, and the next open accepts a store
    /// ahead of its anchor file and brings the file up to date.
    fn committed(&self, state: &StoreState) {
        self.seen.fetch_max(state.generation, Ordering::SeqCst);
        if state.counter.is_some_and(|b| b.offset.is_some()) {
            if let Some(counter) = &self.counter {
                #[cfg(feature = "testing")]
                crate::testing::fault_point("after-commit-before-counter");
                if let Err(e) = counter.increment() {
                    tracing::warn!(
                        error = %e,
                        "could not advance the store's counter after a change: the next change or \
                         open does"
                    );
                }
            }
        }
        if let Some(anchor) = &self.anchor {
            if let Err(e) = anchor.advance(state.generation) {
                tracing::warn!(error = %e, "could not record the store's generation in its anchor");
            }
        }
    }

    /// The whole database as one consistent image (a read transaction around SQLite's
    /// serialisation), for a backup, with what it holds.
    ///
    /// # Errors
    /// Storage errors.
    pub(crate) fn image(&self) -> Result<(Vec<u8>, ImageFacts)> {
        let mut conn = self.conn();
        let read = |e| Error::storage("read the store for a backup", e);
        conn.execute_batch("BEGIN DEFERRED").map_err(read)?;
        // The first read takes the shared lock: no writer commits until the image is taken.
        let facts = (|| -> Result<ImageFacts> {
            let meta = read_meta(&conn, &self.dir)?;
            let keys = conn
                .query_row("SELECT count(*) FROM keys", [], |r| r.get::<_, i64>(0))
                .map_err(read)?;
            Ok(ImageFacts {
                generation: meta.state.map_or(0, |s| s.generation),
                keys: usize::try_from(keys).unwrap_or_default(),
                sealed_root: meta.sealed_root,
            })
        })();
        let image = facts.and_then(|facts| {
            let image = conn.serialize(rusqlite::MAIN_DB).map_err(read)?.to_vec();
            Ok((image, facts))
        });
        let ended = conn.execute_batch("COMMIT");
        let image = image?;
        ended.map_err(read)?;
        Ok(image)
    }

    /// SQLite's `data_version`: changes whenever another connection (another process) commits a
    /// change to the database. Lets the keystore keep verified records cached safely.
    ///
    /// # Errors
    /// Storage errors.
    pub fn data_version(&self) -> Result<i64> {
        self.conn()
            .pragma_query_value(None, "data_version", |r| r.get(0))
            .map_err(|e| Error::storage("read the database's data version", e))
    }

    /// Runs `f` in one write transaction (taken at once, so that what `f` reads is what it
    /// changes: another process waits): all of its changes are committed, or none.
    ///
    /// # Errors
    /// `f`'s error (nothing is changed then); storage errors.
    ///
    /// Before `f` runs, the committed state is read under the lock and checked; the rows `f`
    /// changes update their keys' digests and the total, and the state goes to the next
    /// generation, in the same transaction.
    pub fn write<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        let _lock = self.counter_lock()?;
        self.transact(f, |state| Ok(state.counter))
    }

    /// With a counter bound: the lock that keeps a change's commit and its counter increment
    /// together, across threads and processes, so that no one reads the counter between the two
    /// (it would take the missing increment for a crash and add one too many). An exclusive
    /// `flock` on the store directory (never on the database file: closing another descriptor of
    /// it would drop SQLite's own locks), waited for at most the store's busy timeout. `None`
    /// without a counter.
    fn counter_lock(&self) -> Result<Option<fs::File>> {
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

    /// Takes `meta` as the store's metadata: written under the same root by another process
    /// since this one first read it (the keystore checked its MAC).
    pub(crate) fn replace_meta(&mut self, meta: StoreMeta) {
        self.meta = meta;
    }

    /// Reads the committed state again, its MAC checked, into [`Self::meta`]: after changes
    /// this process made through `&self` (a restart of the generation), whose binding the
    /// keystore decides by.
    ///
    /// # Errors
    /// [`Error::StoreTampered`] for a state that fails its MAC; storage errors.
    pub(crate) fn reload_state(&mut self) -> Result<()> {
        let state = {
            let conn = self.conn();
            self.current_state(&conn)?.1
        };
        self.meta.state = Some(state);
        Ok(())
    }

    /// The committed state as stored now, its MAC not checked (the caller checks it).
    ///
    /// # Errors
    /// Storage errors; [`Error::StoreTampered`] for a malformed state.
    pub fn state_as_stored(&self) -> Result<Option<StoreState>> {
        read_state(&self.conn(), &self.dir)
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

    /// [`Self::write`], with the next state's counter binding chosen by `binding` from the
    /// current state.
    fn transact<T>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> Result<T>,
        binding: impl FnOnce(&StoreState) -> Result<Option<CounterBinding>>,
    ) -> Result<T> {
        self.transact_inner(
            f,
            |state| Ok((next_generation(state)?, binding(state)?)),
            false,
        )
    }

    /// [`Self::write`], with the next state's generation and counter binding chosen by `next`.
    /// `admin`: a change that re-anchors the store (restore, reanchor), allowed where this
    /// process has no counter for a state bound to one.
    fn transact_inner<T>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> Result<T>,
        next: impl FnOnce(&StoreState) -> Result<(u64, Option<CounterBinding>)>,
        admin: bool,
    ) -> Result<T> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| Error::storage("begin a change of the store", e))?;
        let (keys, state) = self.current_state(&tx)?;
        if !admin && self.counter.is_none() && state.counter.is_some_and(|b| b.offset.is_some()) {
            // Bound by another process since this one opened the store: a change here would
            // neither be checked against the counter nor advance it.
            return Err(Error::StoreUnusable {
                path: self.dir.clone(),
                reason: "another keyhold process anchored it in a TPM counter after this one \
                         opened it: open it again to change it"
                    .into(),
                source: None,
            });
        }
        self.check_counter(&state)?;
        self.check_total(&tx, keys, &state)?;
        let writer = Tx {
            tx: &tx,
            changes: RefCell::new(Vec::new()),
            audit: std::cell::Cell::new(None),
        };
        let out = f(&writer)?;
        let audit = writer.audit.get().or(state.audit);
        let changes = writer.changes.into_inner();
        let (digests, total) = commit::apply(keys, &changes, state.total_sum(), |uuid| {
            read_digest(&tx, uuid)
        })?;
        for (uuid, digest) in digests {
            // Before every write: the rows of each key it changes are exactly those committed,
            // plus this change (a row deleted or put back before it would otherwise be carried
            // into the new commitment's digest of that key, and found only at the next open).
            if key_rows_sum(&tx, keys, &uuid)? != digest.unwrap_or_default() {
                return Err(tampered(format!(
                    "key record {}: its rows are not the ones committed (one deleted, put back \
                     from an older copy, or duplicated); nothing was changed",
                    crate::hex::encode(&uuid)
                )));
            }
            match digest {
                Some(digest) => put_digest(&tx, &uuid, digest)?,
                None => delete_digest(&tx, &uuid)?,
            }
        }
        let (generation, counter) = next(&state)?;
        let next = keys.state(generation, total, counter, audit, &self.meta.mac);
        put_meta(&tx, commit::STATE_ENTRY, &next.encode())?;
        tx.commit()
            .map_err(|e| Error::storage("commit a change of the store", e))?;
        drop(conn);
        self.committed(&next);
        Ok(out)
    }
}

fn insert_key(conn: &Connection, rec: &KeyRecord) -> Result<()> {
    let result = conn.execute(
        &format!(
            "INSERT INTO keys ({}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, \
             ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23)",
            record::COLUMNS
        ),
        params![
            rec.uuid,
            rec.namespace,
            rec.name,
            rec.key_type,
            rec.purpose,
            rec.algorithm,
            rec.backend,
            rec.locator,
            rec.state,
            rec.version,
            rec.created_at,
            rec.updated_at,
            rec.blob,
            rec.public_key,
            rec.attributes,
            rec.mac,
            rec.mac_format,
            rec.min_decrypt_version,
            rec.rotate_after,
            rec.activate_at,
            rec.deactivate_at,
            rec.destroy_at,
            rec.destroyed_at,
        ],
    );
    match result {
        Ok(_) => Ok(()),
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
        {
            Err(Error::KeyExists {
                namespace: rec.namespace.clone(),
                name: rec.name.clone(),
            })
        }
        Err(e) => Err(Error::storage("insert a key record", e)),
    }
}

/// The generation after `state`'s.
fn next_generation(state: &StoreState) -> Result<u64> {
    state.generation.checked_add(1).ok_or_else(|| {
        tampered("its generation is at the largest number there is: it was forged".into())
    })
}

/// `state`'s binding made pending (bound again at the next bind), at `at` if given.
fn pending_of(state: &StoreState, at: Option<CounterAt>) -> Option<CounterBinding> {
    at.or(state.counter.map(|b| b.at))
        .map(|at| CounterBinding { at, offset: None })
}

fn read_state(conn: &Connection, dir: &Path) -> Result<Option<StoreState>> {
    let value = conn
        .query_row(
            "SELECT value FROM meta WHERE key = ?1",
            params![commit::STATE_ENTRY],
            |row| row.get::<_, Vec<u8>>(0),
        )
        .optional()
        .map_err(|e| Error::StoreUnusable {
            path: dir.to_path_buf(),
            reason: format!("its metadata entry `{}` is damaged", commit::STATE_ENTRY),
            source: Some(Box::new(e)),
        })?;
    value
        .map(|bytes| {
            StoreState::decode(&bytes).ok_or_else(|| {
                tampered(
                    "the store's committed state (its generation and commitment) is malformed"
                        .into(),
                )
            })
        })
        .transpose()
}

/// The digest of the rows of key `uuid` as they are now.
fn key_rows_sum(conn: &Connection, keys: &CommitKeys, uuid: &[u8; 16]) -> Result<Sum> {
    let mut rows = Recomputed::default();
    for (kind, table) in [
        (RowKind::Key, "keys"),
        (RowKind::Version, "key_versions"),
        (RowKind::Event, "key_events"),
        (RowKind::Counter, "gcm_counters"),
        (RowKind::Client, "clients"),
    ] {
        let macs = query(
            conn,
            &format!("SELECT mac FROM {table} WHERE uuid = ?1"),
            params![uuid.as_slice()],
            |r| r.get::<_, Vec<u8>>(0),
        )?;
        for mac in macs {
            rows.add(keys, kind, uuid, &mac);
        }
    }
    let digest = rows.digests().next().map(|(_, digest)| digest);
    Ok(digest.unwrap_or_default())
}

/// [`Store::totalled`] before the digests were added up.
const NOT_TOTALLED: i64 = i64::MIN;

fn read_data_version(conn: &Connection) -> Result<i64> {
    conn.pragma_query_value(None, "data_version", |r| r.get(0))
        .map_err(|e| Error::storage("read the store's data version", e))
}

fn read_digests(conn: &Connection) -> Result<BTreeMap<[u8; 16], Sum>> {
    let mut stmt = conn
        .prepare("SELECT uuid, digest FROM key_digests")
        .map_err(|e| Error::storage("read the store's digests", e))?;
    let rows = stmt
        .query_map([], |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
        })
        .map_err(|e| Error::storage("read the store's digests", e))?;
    let mut out = BTreeMap::new();
    for row in rows {
        let (uuid, digest) = row.map_err(|e| Error::storage("read the store's digests", e))?;
        let (Ok(uuid), Some(digest)) = (<[u8; 16]>::try_from(uuid), Sum::from_bytes(&digest))
        else {
            return Err(tampered("a row of `key_digests` is malformed".into()));
        };
        out.insert(uuid, digest);
    }
    Ok(out)
}

fn read_digest(conn: &Connection, uuid: &[u8; 16]) -> Result<Option<Sum>> {
    let digest = conn
        .query_row(
            "SELECT digest FROM key_digests WHERE uuid = ?1",
            params![uuid.as_slice()],
            |r| r.get::<_, Vec<u8>>(0),
        )
        .optional()
        .map_err(|e| Error::storage("read a key's digest", e))?;
    digest
        .map(|d| {
            Sum::from_bytes(&d).ok_or_else(|| {
                tampered(format!(
                    "the digest of key {} is malformed",
                    crate::hex::encode(uuid)
                ))
            })
        })
        .transpose()
}

fn put_digest(conn: &Connection, uuid: &[u8; 16], digest: Sum) -> Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO key_digests (uuid, digest) VALUES (?1, ?2)",
        params![uuid.as_slice(), digest.to_bytes().as_slice()],
    )
    .map_err(|e| Error::storage("write a key's digest", e))?;
    Ok(())
}

fn delete_digest(conn: &Connection, uuid: &[u8; 16]) -> Result<()> {
    conn.execute(
        "DELETE FROM key_digests WHERE uuid = ?1",
        params![uuid.as_slice()],
    )
    .map_err(|e| Error::storage("delete a client's digest", e))?;
    Ok(())
}

fn put_meta(conn: &Connection, key: &str, value: &[u8]) -> Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
        params![key, value],
    )
    .map_err(|e| Error::storage("write the store's metadata", e))?;
    Ok(())
}

fn read_meta(conn: &Connection, dir: &Path) -> Result<StoreMeta> {
    let get = |key: &str| -> Result<Vec<u8>> {
        conn.query_row(
            "SELECT value FROM meta WHERE key = ?1",
            params![key],
            |row| row.get::<_, Vec<u8>>(0),
        )
        .map_err(|e| Error::StoreUnusable {
            path: dir.to_path_buf(),
            reason: format!("its metadata entry `{key}` is missing or damaged"),
            source: Some(Box::new(e)),
        })
    };
    let damaged = |what: &str| Error::StoreUnusable {
        path: dir.to_path_buf(),
        reason: format!("its metadata entry `{what}` is damaged"),
        source: None,
    };
    let store_id: [u8; 16] = get("store_id")?
        .try_into()
        .map_err(|_| damaged("store_id"))?;
    let sealer = String::from_utf8(get("sealer")?).map_err(|_| damaged("sealer"))?;
    let created_at = String::from_utf8(get("created_at")?)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| damaged("created_at"))?;
    // A missing MAC reads as empty: the keystore refuses it once it can say why.
    let mac = conn
        .query_row("SELECT value FROM meta WHERE key = 'meta_mac'", [], |row| {
            row.get::<_, Vec<u8>>(0)
        })
        .optional()
        .map_err(|e| Error::StoreUnusable {
            path: dir.to_path_buf(),
            reason: "its metadata entry `meta_mac` is damaged".into(),
            source: Some(Box::new(e)),
        })?
        .unwrap_or_default();
    Ok(StoreMeta {
        store_id,
        sealed_root: SealedRoot {
            sealer,
            params: get("sealer_params")?,
            blob: get("sealed_root")?,
        },
        created_at,
        mac,
        state: read_state(conn, dir)?,
    })
}

/// What a database image holds, read in the transaction that took it.
#[derive(Debug)]
pub(crate) struct ImageFacts {
    pub(crate) generation: u64,
    pub(crate) keys: usize,
    pub(crate) sealed_root: SealedRoot,
}
