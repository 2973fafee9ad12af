//! Key storage: one SQLite database (`keyhold.db`) in a private directory.
//!
//! The store keeps bytes; it does not judge them. The keystore computes and checks every record's
//! MAC, and the sealer authenticates the sealed root secret. Opening a store never writes to it
//! unless its schema must be migrated, so a failed command leaves the file byte-for-byte unchanged.

mod anchor;
mod binding;
mod commit;
mod files;
mod read;
mod record;
mod rows;
mod schema;
mod staged;
mod state;
mod tx;

use std::cell::RefCell;
use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OpenFlags};

use crate::error::{Error, Result};
use crate::sealer::SealedRoot;

/// How long a statement waits for another process's lock on the database before it fails.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub use anchor::{compare_counter, judge_counter, Counter, CounterCheck, CounterValue, FileAnchor};
use commit::Change;
pub(crate) use commit::{tampered, Mismatch, Recomputed, RowKind, Sum};
pub use commit::{CommitKeys, CounterAt, CounterBinding, StoreState};
use files::{check_private, make_private_dir, secure_delete};
pub use read::AllRows;
use read::{query, read_client, read_key};
pub use record::KeyRecord;
pub use rows::{ClientRecord, CounterRecord, EventRecord, VersionRecord};
pub use staged::Staged;
use state::{
    delete_digest, key_rows_sum, next_generation, pending_of, put_digest, put_meta,
    read_data_version, read_digest, read_digests, read_meta, read_state,
};
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
        conn.busy_timeout(BUSY_TIMEOUT)
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
        read_data_version(&self.conn())
    }

    /// [`Self::data_version`] if it can be read without waiting: `None` if this process's
    /// connection is in use, another process holds a lock that keeps it from being read, or the
    /// read fails (nothing waited then).
    ///
    /// # Errors
    /// Storage errors setting the connection's busy timeout.
    pub fn try_data_version(&self) -> Result<Option<i64>> {
        let conn = match self.conn.try_lock() {
            Ok(conn) => conn,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(None),
        };
        let configure = |e| Error::storage("set the database's busy timeout", e);
        conn.busy_timeout(std::time::Duration::ZERO)
            .map_err(configure)?;
        let read = read_data_version(&conn);
        conn.busy_timeout(BUSY_TIMEOUT).map_err(configure)?;
        // Locked by another process, or anything else: read again where waiting is allowed,
        // and any error said there.
        Ok(read.ok())
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

/// [`Store::totalled`] before the digests were added up.
const NOT_TOTALLED: i64 = i64::MIN;

/// What a database image holds, read in the transaction that took it.
#[derive(Debug)]
pub(crate) struct ImageFacts {
    pub(crate) generation: u64,
    pub(crate) keys: usize,
    pub(crate) sealed_root: SealedRoot,
}
