//! Key storage: one SQLite database (`keyhold.db`) in a private directory.
//!
//! The store keeps bytes; it does not judge them. The keystore computes and checks every record's
//! MAC, and the sealer authenticates the sealed root secret. Opening a store never writes to it
//! unless its schema must be migrated, so a failed command leaves the file byte-for-byte unchanged.

mod record;
mod rows;
mod schema;

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::error::{Error, Result};
use crate::sealer::SealedRoot;

pub use record::KeyRecord;
pub use rows::{CounterRecord, EventRecord, VersionRecord};

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
}

impl StoreMeta {
    /// The canonical bytes [`StoreMeta::mac`] covers: every metadata entry but the MAC itself,
    /// each length-prefixed so that no two different metadata give the same bytes.
    pub fn mac_input(&self) -> Vec<u8> {
        let sealed = &self.sealed_root;
        let mut out =
            Vec::with_capacity(64 + sealed.sealer.len() + sealed.params.len() + sealed.blob.len());
        out.extend_from_slice(b"keyhold store metadata v1\0");
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
        })
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
    /// committed.
    ///
    /// # Errors
    /// Storage errors; nothing is changed then.
    pub fn replace_sealed_root(&mut self, sealed: &SealedRoot, mac: &[u8]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| Error::storage("begin replacing the sealed root secret", e))?;
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
        tx.commit()
            .map_err(|e| Error::storage("commit the sealed root secret", e))?;
        drop(conn);
        self.meta.sealed_root = sealed.clone();
        self.meta.mac = mac.to_vec();
        Ok(())
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

    /// Adds a key record.
    ///
    /// # Errors
    /// [`Error::KeyExists`] if the namespace already has a key of that name; storage errors.
    pub fn insert_key(&self, rec: &KeyRecord) -> Result<()> {
        insert_key(&self.conn(), rec)
    }

    /// Runs `f` in one write transaction (taken at once, so that what `f` reads is what it
    /// changes: another process waits): all of its changes are committed, or none.
    ///
    /// # Errors
    /// `f`'s error (nothing is changed then); storage errors.
    pub fn write<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| Error::storage("begin a change of the store", e))?;
        let out = f(&Tx { tx: &tx })?;
        tx.commit()
            .map_err(|e| Error::storage("commit a change of the store", e))?;
        Ok(out)
    }

    /// The record with identifier `uuid`, if any. The caller checks its MAC.
    ///
    /// # Errors
    /// Storage errors; [`Error::Integrity`] if the row cannot be decoded.
    pub fn key(&self, uuid: &[u8; 16]) -> Result<Option<KeyRecord>> {
        read_key(&self.conn(), uuid)
    }

    /// Every record, or those of one namespace, ordered by namespace and name.
    ///
    /// # Errors
    /// Storage errors; [`Error::Integrity`] if a row cannot be decoded.
    pub fn keys(&self, namespace: Option<&str>) -> Result<Vec<KeyRecord>> {
        let conn = self.conn();
        let sql = format!(
            "SELECT {} FROM keys WHERE ?1 IS NULL OR namespace = ?1 ORDER BY namespace, name",
            record::COLUMNS
        );
        query(&conn, &sql, params![namespace], record::from_row)
    }

    /// The versions (from 2) of the key `uuid`, or of every key, in order. The caller checks
    /// their MACs.
    ///
    /// # Errors
    /// Storage errors; [`Error::Integrity`] if a row cannot be decoded.
    pub fn versions(&self, uuid: Option<&[u8; 16]>) -> Result<Vec<VersionRecord>> {
        let sql = format!(
            "SELECT {} FROM key_versions WHERE ?1 IS NULL OR uuid = ?1 ORDER BY uuid, version",
            rows::VERSION_COLUMNS
        );
        query(
            &self.conn(),
            &sql,
            params![uuid.map(<[u8; 16]>::as_slice)],
            rows::version_from_row,
        )
    }

    /// The history of the key `uuid`, or of every key, in order. The caller checks the MACs.
    ///
    /// # Errors
    /// Storage errors; [`Error::Integrity`] if a row cannot be decoded.
    pub fn events(&self, uuid: Option<&[u8; 16]>) -> Result<Vec<EventRecord>> {
        let sql = format!(
            "SELECT {} FROM key_events WHERE ?1 IS NULL OR uuid = ?1 ORDER BY uuid, seq",
            rows::EVENT_COLUMNS
        );
        query(
            &self.conn(),
            &sql,
            params![uuid.map(<[u8; 16]>::as_slice)],
            rows::event_from_row,
        )
    }

    /// Every AES-GCM invocation counter. The caller checks the MACs.
    ///
    /// # Errors
    /// Storage errors; [`Error::Integrity`] if a row cannot be decoded.
    pub fn counters(&self) -> Result<Vec<CounterRecord>> {
        let sql = format!("SELECT {} FROM gcm_counters", rows::COUNTER_COLUMNS);
        query(&self.conn(), &sql, [], rows::counter_from_row)
    }

    /// Deletes the record `uuid`; returns whether there was one.
    ///
    /// # Errors
    /// Storage errors.
    pub fn delete_key(&self, uuid: &[u8; 16]) -> Result<bool> {
        let conn = self.conn();
        let n = conn
            .execute("DELETE FROM keys WHERE uuid = ?1", params![uuid.as_slice()])
            .map_err(|e| Error::storage("delete a key record", e))?;
        Ok(n > 0)
    }

    /// Every key record, version, history entry and AES-GCM counter, read in one transaction:
    /// one state of the store, even while other processes write to it (for `store verify`,
    /// which would otherwise see a rotation half: the record before, its versions after). Each
    /// table comes back on its own, so that rows that cannot be decoded hide no other table.
    ///
    /// # Errors
    /// Storage errors beginning or ending the read.
    pub fn all_rows(&self) -> Result<AllRows> {
        let mut conn = self.conn();
        let tx = conn
            .transaction()
            .map_err(|e| Error::storage("begin reading the store", e))?;
        let rows = AllRows {
            keys: query(
                &tx,
                &format!(
                    "SELECT {} FROM keys ORDER BY namespace, name",
                    record::COLUMNS
                ),
                [],
                record::from_row,
            ),
            versions: query(
                &tx,
                &format!(
                    "SELECT {} FROM key_versions ORDER BY uuid, version",
                    rows::VERSION_COLUMNS
                ),
                [],
                rows::version_from_row,
            ),
            events: query(
                &tx,
                &format!(
                    "SELECT {} FROM key_events ORDER BY uuid, seq",
                    rows::EVENT_COLUMNS
                ),
                [],
                rows::event_from_row,
            ),
            counters: query(
                &tx,
                &format!("SELECT {} FROM gcm_counters", rows::COUNTER_COLUMNS),
                [],
                rows::counter_from_row,
            ),
        };
        tx.commit()
            .map_err(|e| Error::storage("end reading the store", e))?;
        Ok(rows)
    }
}

/// What [`Store::all_rows`] read, table by table (the caller checks every MAC).
#[derive(Debug)]
pub struct AllRows {
    /// The key records, ordered by namespace and name.
    pub keys: Result<Vec<KeyRecord>>,
    /// Every later version, by key and version.
    pub versions: Result<Vec<VersionRecord>>,
    /// Every history entry, by key and sequence.
    pub events: Result<Vec<EventRecord>>,
    /// Every AES-GCM counter.
    pub counters: Result<Vec<CounterRecord>>,
}

/// A write transaction of [`Store::write`].
#[derive(Debug)]
pub struct Tx<'a> {
    tx: &'a rusqlite::Transaction<'a>,
}

impl Tx<'_> {
    /// The record `uuid` as it is now, under the write lock. The caller checks its MAC.
    ///
    /// # Errors
    /// Storage errors; [`Error::Integrity`] if the row cannot be decoded.
    pub fn key(&self, uuid: &[u8; 16]) -> Result<Option<KeyRecord>> {
        read_key(self.tx, uuid)
    }

    /// Adds a key record.
    ///
    /// # Errors
    /// [`Error::KeyExists`]; storage errors.
    pub fn insert_key(&self, rec: &KeyRecord) -> Result<()> {
        insert_key(self.tx, rec)
    }

    /// Replaces the record with `rec.uuid`.
    ///
    /// # Errors
    /// Storage errors; [`Error::Integrity`] if there is no such record (it was deleted under us).
    pub fn update_key(&self, rec: &KeyRecord) -> Result<()> {
        let n = self
            .tx
            .execute(
                "UPDATE keys SET state = ?2, version = ?3, updated_at = ?4, blob = ?5, \
                 public_key = ?6, attributes = ?7, mac = ?8, mac_format = ?9, \
                 min_decrypt_version = ?10, rotate_after = ?11, activate_at = ?12, \
                 deactivate_at = ?13, destroy_at = ?14, destroyed_at = ?15 WHERE uuid = ?1",
                params![
                    rec.uuid.as_slice(),
                    rec.state,
                    rec.version,
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
            )
            .map_err(|e| Error::storage("update a key record", e))?;
        if n != 1 {
            return Err(Error::Integrity {
                what: format!(
                    "the record of key {} vanished while it was being changed",
                    crate::hex::encode(&rec.uuid)
                ),
            });
        }
        Ok(())
    }

    /// Adds a version.
    ///
    /// # Errors
    /// Storage errors (also if the version exists).
    pub fn insert_version(&self, v: &VersionRecord) -> Result<()> {
        self.tx
            .execute(
                &format!(
                    "INSERT INTO key_versions ({}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    rows::VERSION_COLUMNS
                ),
                params![
                    v.uuid.as_slice(),
                    v.version,
                    v.locator,
                    v.blob,
                    v.public_key,
                    v.attributes,
                    v.created_at,
                    v.mac
                ],
            )
            .map_err(|e| Error::storage("insert a key version", e))?;
        Ok(())
    }

    /// The versions (from 2) of the key `uuid`, in order, under the write lock.
    ///
    /// # Errors
    /// Storage errors; [`Error::Integrity`] if a row cannot be decoded.
    pub fn versions(&self, uuid: &[u8; 16]) -> Result<Vec<VersionRecord>> {
        let sql = format!(
            "SELECT {} FROM key_versions WHERE uuid = ?1 ORDER BY version",
            rows::VERSION_COLUMNS
        );
        query(
            self.tx,
            &sql,
            params![uuid.as_slice()],
            rows::version_from_row,
        )
    }

    /// Deletes every version row and counter of the key `uuid` (their blobs are overwritten:
    /// `secure_delete`).
    ///
    /// # Errors
    /// Storage errors.
    pub fn delete_material(&self, uuid: &[u8; 16]) -> Result<()> {
        for sql in [
            "DELETE FROM key_versions WHERE uuid = ?1",
            "DELETE FROM gcm_counters WHERE uuid = ?1",
        ] {
            self.tx
                .execute(sql, params![uuid.as_slice()])
                .map_err(|e| Error::storage("erase a key's versions", e))?;
        }
        Ok(())
    }

    /// The next free place in the key's history.
    ///
    /// # Errors
    /// Storage errors.
    pub fn next_event_seq(&self, uuid: &[u8; 16]) -> Result<u32> {
        self.tx
            .query_row(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM key_events WHERE uuid = ?1",
                params![uuid.as_slice()],
                |r| r.get(0),
            )
            .map_err(|e| Error::storage("read a key's history", e))
    }

    /// Adds an entry to a key's history.
    ///
    /// # Errors
    /// Storage errors.
    pub fn insert_event(&self, e: &EventRecord) -> Result<()> {
        self.tx
            .execute(
                &format!(
                    "INSERT INTO key_events ({}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    rows::EVENT_COLUMNS
                ),
                params![
                    e.uuid.as_slice(),
                    e.seq,
                    e.at,
                    e.event,
                    e.from_state,
                    e.to_state,
                    e.version,
                    e.reason,
                    e.mac
                ],
            )
            .map_err(|e| Error::storage("record a key's history", e))?;
        Ok(())
    }

    /// The invocation counter of one key version, if any. The caller checks its MAC.
    ///
    /// # Errors
    /// Storage errors; [`Error::Integrity`] if the row cannot be decoded.
    pub fn counter(&self, uuid: &[u8; 16], version: u32) -> Result<Option<CounterRecord>> {
        let sql = format!(
            "SELECT {} FROM gcm_counters WHERE uuid = ?1 AND version = ?2",
            rows::COUNTER_COLUMNS
        );
        Ok(query(
            self.tx,
            &sql,
            params![uuid.as_slice(), version],
            rows::counter_from_row,
        )?
        .pop())
    }

    /// Writes the invocation counter of one key version.
    ///
    /// # Errors
    /// Storage errors.
    pub fn put_counter(&self, c: &CounterRecord) -> Result<()> {
        self.tx
            .execute(
                &format!(
                    "INSERT OR REPLACE INTO gcm_counters ({}) VALUES (?1, ?2, ?3, ?4)",
                    rows::COUNTER_COLUMNS
                ),
                params![c.uuid.as_slice(), c.version, c.reserved, c.mac],
            )
            .map_err(|e| Error::storage("reserve AES-GCM invocations", e))?;
        Ok(())
    }
}

fn query<T, P: rusqlite::Params>(
    conn: &Connection,
    sql: &str,
    params: P,
    row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>> {
    let mut stmt = conn
        .prepare_cached(sql)
        .map_err(|e| Error::storage("read the store", e))?;
    let rows = stmt
        .query_map(params, row)
        .map_err(|e| Error::storage("read the store", e))?;
    rows.map(|r| r.map_err(record::decode_error)).collect()
}

fn read_key(conn: &Connection, uuid: &[u8; 16]) -> Result<Option<KeyRecord>> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {} FROM keys WHERE uuid = ?1",
            record::COLUMNS
        ))
        .map_err(|e| Error::storage("read a key record", e))?;
    stmt.query_row(params![uuid.as_slice()], record::from_row)
        .optional()
        .map_err(record::decode_error)
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
    })
}

/// Destroyed keys' sealed blobs must not linger in the file's free pages, where a copy of the
/// file (a backup, a stolen disk) would still hold them: SQLite overwrites deleted content with
/// zeros. Set on every connection, as SQLite keeps it per connection.
fn secure_delete(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "secure_delete", "ON")
}

/// Makes `dir` the store's private directory: created 0700 by one `mkdir` (its parents as usual),
/// or, if it already exists, accepted only when it is a real directory of this user and empty,
/// then made 0700.
///
/// One `mkdir` of the final directory, not a check followed by a create: under a shared parent,
/// someone else could create the directory in between and own it.
fn make_private_dir(dir: &Path) -> Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("create {}", parent.display()), e))?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(Error::io(
                format!("create store directory {}", dir.display()),
                e,
            ))
        }
    }
    let meta =
        fs::symlink_metadata(dir).map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
    if !meta.is_dir() {
        return Err(Error::io(
            format!("{} exists and is not a directory", dir.display()),
            std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        ));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(Error::InvalidInput(format!(
            "{} belongs to uid {}, not to you (uid {me}): give init a directory of your own",
            dir.display(),
            meta.uid()
        )));
    }
    // Only an empty directory becomes a store (and private): `init --store ~` must not change
    // the permissions of a directory that holds other things.
    let empty = fs::read_dir(dir)
        .map_err(|e| Error::io(format!("read {}", dir.display()), e))?
        .next()
        .is_none();
    if !empty {
        return Err(Error::InvalidInput(format!(
            "{} is not empty: give init a new or empty directory for the store",
            dir.display()
        )));
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("make {} private", dir.display()), e))
}

/// Refuses a store directory or database that another user owns or that group or others may
/// write: whoever can write them can replace the sealed root secret or the records.
fn check_private(dir: &Path, path: &Path, what: &str, mode: &str) -> Result<()> {
    let meta = fs::metadata(path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    let me = rustix::process::geteuid().as_raw();
    let reason = if meta.uid() != me {
        format!(
            "the {what} {} belongs to uid {}, not to you (uid {me}): run keyhold as its owner, \
             or `chown {me} {}` if the store is yours",
            path.display(),
            meta.uid(),
            path.display()
        )
    } else if meta.mode() & 0o022 != 0 {
        format!(
            "the {what} {} is writable by group or others (mode {:o}): anyone who can write it \
             can replace the store's keys; run `chmod {mode} {}`",
            path.display(),
            meta.mode() & 0o7777,
            path.display()
        )
    } else {
        return Ok(());
    };
    Err(Error::StoreUnusable {
        path: dir.to_path_buf(),
        reason,
        source: None,
    })
}
