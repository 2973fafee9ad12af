//! The database schema and its migrations.
//!
//! `PRAGMA application_id` marks the file as keyhold's; `PRAGMA user_version` is the schema version.
//! Migrations run in order, each in one transaction with the version bump, so a store is always at
//! exactly one version. A store from a newer keyhold is refused rather than guessed at.

use std::path::Path;

use rusqlite::Connection;

use crate::error::{Error, Result};

/// `khld` in ASCII.
const APPLICATION_ID: i64 = 0x6b68_6c64;

/// Migration `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema. `version` and `state` left room for rotation and the SP 800-57 states;
    // `attributes` (a JSON object of strings) holds what a backend reports about a key.
    "CREATE TABLE meta (
        key   TEXT PRIMARY KEY NOT NULL,
        value BLOB NOT NULL
    ) STRICT;
    CREATE TABLE keys (
        uuid       BLOB PRIMARY KEY NOT NULL,
        namespace  TEXT NOT NULL,
        name       TEXT NOT NULL,
        key_type   TEXT NOT NULL,
        purpose    TEXT NOT NULL,
        algorithm  TEXT NOT NULL,
        backend    TEXT NOT NULL,
        locator    TEXT NOT NULL,
        state      TEXT NOT NULL,
        version    INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        blob       BLOB,
        public_key BLOB,
        attributes TEXT NOT NULL,
        mac        BLOB NOT NULL,
        UNIQUE (namespace, name)
    ) STRICT;",
    // 2: the key lifecycle. Records of schema 1 keep their MAC (format 1, which the new fields'
    // defaults leave valid); a record keyhold rewrites gets format 2, which covers them. A name
    // is unique among keys not destroyed: a destroyed key's record stays (a tombstone, so its ID
    // says when it was destroyed) and its name may be given to a new key.
    "CREATE TABLE keys_v2 (
        uuid                BLOB PRIMARY KEY NOT NULL,
        namespace           TEXT NOT NULL,
        name                TEXT NOT NULL,
        key_type            TEXT NOT NULL,
        purpose             TEXT NOT NULL,
        algorithm           TEXT NOT NULL,
        backend             TEXT NOT NULL,
        locator             TEXT NOT NULL,
        state               TEXT NOT NULL,
        version             INTEGER NOT NULL,
        created_at          INTEGER NOT NULL,
        updated_at          INTEGER NOT NULL,
        blob                BLOB,
        public_key          BLOB,
        attributes          TEXT NOT NULL,
        mac                 BLOB NOT NULL,
        mac_format          INTEGER NOT NULL DEFAULT 1,
        min_decrypt_version INTEGER NOT NULL DEFAULT 1,
        rotate_after        INTEGER,
        activate_at         INTEGER,
        deactivate_at       INTEGER,
        destroy_at          INTEGER,
        destroyed_at        INTEGER
    ) STRICT;
    INSERT INTO keys_v2 (uuid, namespace, name, key_type, purpose, algorithm, backend, locator,
        state, version, created_at, updated_at, blob, public_key, attributes, mac)
        SELECT uuid, namespace, name, key_type, purpose, algorithm, backend, locator, state,
        version, created_at, updated_at, blob, public_key, attributes, mac FROM keys;
    DROP TABLE keys;
    ALTER TABLE keys_v2 RENAME TO keys;
    CREATE UNIQUE INDEX keys_live_name ON keys (namespace, name) WHERE state != 'destroyed';
    CREATE TABLE key_versions (
        uuid       BLOB NOT NULL,
        version    INTEGER NOT NULL,
        locator    TEXT NOT NULL,
        blob       BLOB,
        public_key BLOB,
        attributes TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        mac        BLOB NOT NULL,
        PRIMARY KEY (uuid, version)
    ) STRICT;
    CREATE TABLE key_events (
        uuid       BLOB NOT NULL,
        seq        INTEGER NOT NULL,
        at         INTEGER NOT NULL,
        event      TEXT NOT NULL,
        from_state TEXT NOT NULL,
        to_state   TEXT NOT NULL,
        version    INTEGER NOT NULL,
        reason     TEXT,
        mac        BLOB NOT NULL,
        PRIMARY KEY (uuid, seq)
    ) STRICT;
    CREATE TABLE gcm_counters (
        uuid     BLOB NOT NULL,
        version  INTEGER NOT NULL,
        reserved INTEGER NOT NULL,
        mac      BLOB NOT NULL,
        PRIMARY KEY (uuid, version)
    ) STRICT;",
    // 3: the store as one authenticated whole (see commit.rs): each key's digest over its rows.
    // The generation and total live in the `store_state` metadata entry, written by the keystore
    // when it first opens the store under its root (it adopts a store made before this schema).
    "CREATE TABLE key_digests (
        uuid   BLOB PRIMARY KEY NOT NULL,
        digest BLOB NOT NULL
    ) STRICT;",
    // 4: the service's token clients (`keyhold client add`): a keyed hash of each token, never
    // the token, and its grant, under a MAC, each client's row in the commitment under its uuid
    // (its digest in `key_digests`, as a key's). `namespaces` and `operations` are JSON arrays
    // (`operations` NULL: the default grant, every operation but those granted by name only).
    "CREATE TABLE clients (
        uuid       BLOB PRIMARY KEY NOT NULL,
        name       TEXT NOT NULL UNIQUE,
        token_hash BLOB NOT NULL UNIQUE,
        namespaces TEXT NOT NULL,
        operations TEXT,
        created_at INTEGER NOT NULL,
        mac        BLOB NOT NULL
    ) STRICT;",
];

/// The schema version this keyhold writes.
pub const CURRENT_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings a brand-new, empty database to the current schema.
pub(super) fn migrate(conn: &mut Connection) -> Result<()> {
    conn.pragma_update(None, "application_id", APPLICATION_ID)
        .map_err(|e| Error::storage("mark the database as keyhold's", e))?;
    apply_from(conn, 0)
}

/// Checks that an existing database is a keyhold store this version can use, migrating it forward
/// if it is older. Reads only, unless a migration is due.
pub(super) fn check_and_migrate(conn: &mut Connection, dir: &Path) -> Result<()> {
    let unusable = |reason: String, source: Option<rusqlite::Error>| Error::StoreUnusable {
        path: dir.to_path_buf(),
        reason,
        source: source.map(|e| Box::new(e) as _),
    };
    let app_id: i64 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .map_err(|e| {
            unusable(
                "keyhold.db is not a readable SQLite database (damaged or not keyhold's)".into(),
                Some(e),
            )
        })?;
    if app_id != APPLICATION_ID {
        return Err(unusable(
            "keyhold.db is a SQLite database but not a keyhold store".into(),
            None,
        ));
    }
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| unusable("cannot read the schema version".into(), Some(e)))?;
    if version > CURRENT_VERSION {
        return Err(unusable(
            format!(
                "its schema version {version} is newer than this keyhold understands \
                 ({CURRENT_VERSION}): upgrade keyhold"
            ),
            None,
        ));
    }
    if version < 1 {
        return Err(unusable("its schema was never created".into(), None));
    }
    apply_from(conn, version)
}

fn apply_from(conn: &mut Connection, from: i64) -> Result<()> {
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(from as usize) {
        // IMMEDIATE takes the write lock up front, and the version is read again under it: two
        // processes opening an old store at once migrate it once, not twice.
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| Error::storage("begin a schema migration", e))?;
        let current: i64 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| Error::storage("read the schema version", e))?;
        if current > index as i64 {
            continue;
        }
        tx.execute_batch(sql)
            .map_err(|e| Error::storage("migrate the schema", e))?;
        tx.pragma_update(None, "user_version", index as i64 + 1)
            .map_err(|e| Error::storage("record the schema version", e))?;
        tx.commit()
            .map_err(|e| Error::storage("commit a schema migration", e))?;
    }
    Ok(())
}
