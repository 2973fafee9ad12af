//! The store's own rows: its committed state (generation and commitment), each key's digest,
//! and the metadata entries (store ID, sealed root, its MAC), read and written in a transaction
//! the caller holds.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use super::commit::{
    self, tampered, CommitKeys, CounterAt, CounterBinding, Recomputed, RowKind, StoreState, Sum,
};
use super::read::query;
use super::StoreMeta;
use crate::error::{Error, Result};
use crate::sealer::SealedRoot;

/// The generation after `state`'s.
pub(super) fn next_generation(state: &StoreState) -> Result<u64> {
    state.generation.checked_add(1).ok_or_else(|| {
        tampered("its generation is at the largest number there is: it was forged".into())
    })
}

/// `state`'s binding made pending (bound again at the next bind), at `at` if given.
pub(super) fn pending_of(state: &StoreState, at: Option<CounterAt>) -> Option<CounterBinding> {
    at.or(state.counter.map(|b| b.at))
        .map(|at| CounterBinding { at, offset: None })
}

pub(super) fn read_state(conn: &Connection, dir: &Path) -> Result<Option<StoreState>> {
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
pub(super) fn key_rows_sum(conn: &Connection, keys: &CommitKeys, uuid: &[u8; 16]) -> Result<Sum> {
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

/// `PRAGMA data_version`, through the connection's statement cache: the keystore reads it often
/// (at most every millisecond), and preparing it each time was a third of its cost (a profile
/// of the serve bench).
pub(super) fn read_data_version(conn: &Connection) -> Result<i64> {
    conn.prepare_cached("PRAGMA data_version")
        .and_then(|mut statement| statement.query_row([], |r| r.get(0)))
        .map_err(|e| Error::storage("read the store's data version", e))
}

pub(super) fn read_digests(conn: &Connection) -> Result<BTreeMap<[u8; 16], Sum>> {
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

pub(super) fn read_digest(conn: &Connection, uuid: &[u8; 16]) -> Result<Option<Sum>> {
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

pub(super) fn put_digest(conn: &Connection, uuid: &[u8; 16], digest: Sum) -> Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO key_digests (uuid, digest) VALUES (?1, ?2)",
        params![uuid.as_slice(), digest.to_bytes().as_slice()],
    )
    .map_err(|e| Error::storage("write a key's digest", e))?;
    Ok(())
}

pub(super) fn delete_digest(conn: &Connection, uuid: &[u8; 16]) -> Result<()> {
    conn.execute(
        "DELETE FROM key_digests WHERE uuid = ?1",
        params![uuid.as_slice()],
    )
    .map_err(|e| Error::storage("delete a client's digest", e))?;
    Ok(())
}

pub(super) fn put_meta(conn: &Connection, key: &str, value: &[u8]) -> Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
        params![key, value],
    )
    .map_err(|e| Error::storage("write the store's metadata", e))?;
    Ok(())
}

pub(super) fn read_meta(conn: &Connection, dir: &Path) -> Result<StoreMeta> {
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
