//! Reading the store: records, versions, history, counters, token clients, and all of them in
//! one transaction. The store does not judge what it reads: the caller checks every MAC.

use std::collections::BTreeMap;

use rusqlite::{params, Connection, OptionalExtension};

use super::{
    read_data_version, read_digests, read_meta, read_state, record, rows, ClientRecord,
    CounterRecord, EventRecord, KeyRecord, Store, StoreMeta, StoreState, Sum, VersionRecord,
};
use crate::error::{Error, Result};

impl Store {
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
            clients: query(
                &tx,
                &format!("SELECT {} FROM clients ORDER BY name", rows::CLIENT_COLUMNS),
                [],
                rows::client_from_row,
            ),
            state: read_state(&tx, &self.dir),
            digests: read_digests(&tx),
            data_version: read_data_version(&tx),
            meta: read_meta(&tx, &self.dir),
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
    /// Every token client, by name.
    pub clients: Result<Vec<ClientRecord>>,
    /// The committed state, as read (its MAC not checked).
    pub state: Result<Option<StoreState>>,
    /// Every key's digest, as stored.
    pub(crate) digests: Result<BTreeMap<[u8; 16], Sum>>,
    /// SQLite's `data_version` in that read.
    pub(crate) data_version: Result<i64>,
    /// The metadata (seal, MAC) in that read.
    pub meta: Result<StoreMeta>,
}

pub(super) fn query<T, P: rusqlite::Params>(
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

pub(super) fn read_key(conn: &Connection, uuid: &[u8; 16]) -> Result<Option<KeyRecord>> {
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

/// The token client whose `column` (`name` or `token_hash`, both unique) is `value`.
pub(super) fn read_client(
    conn: &Connection,
    column: &str,
    value: &dyn rusqlite::ToSql,
) -> Result<Option<ClientRecord>> {
    let sql = format!(
        "SELECT {} FROM clients WHERE {column} = ?1",
        rows::CLIENT_COLUMNS
    );
    Ok(query(conn, &sql, params![value], rows::client_from_row)?.pop())
}
