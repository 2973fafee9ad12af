//! A write transaction's operations ([`super::Store::write`]): every row it inserts, updates or
//! deletes, each change noted for the commitment the transaction ends with.

use std::cell::RefCell;

use rusqlite::params;

use super::*;

/// A write transaction of [`Store::write`].
#[derive(Debug)]
pub struct Tx<'a> {
    pub(super) tx: &'a rusqlite::Transaction<'a>,
    /// The rows changed so far, for the commitment.
    pub(super) changes: RefCell<Vec<Change>>,
    /// The audit entry this change wrote, for the next state.
    pub(super) audit: std::cell::Cell<Option<crate::audit::Head>>,
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
        insert_key(self.tx, rec)?;
        self.changed(RowKind::Key, &rec.uuid, None, Some(&rec.mac));
        Ok(())
    }

    /// Notes the audit log entry that records this change (written before the commit): the
    /// committed state keeps it, so that a log cut before it is refused.
    pub fn note_audit(&self, head: Option<crate::audit::Head>) {
        if head.is_some() {
            self.audit.set(head);
        }
    }

    /// Notes a changed row for the commitment.
    fn changed(&self, kind: RowKind, uuid: &[u8; 16], old: Option<Vec<u8>>, new: Option<&[u8]>) {
        self.changes.borrow_mut().push(Change {
            kind,
            uuid: *uuid,
            old,
            new: new.map(<[u8]>::to_vec),
        });
    }

    /// The MACs of the rows `sql` selects (`mac` of a table, by uuid and more).
    fn macs<P: rusqlite::Params>(&self, sql: &str, params: P) -> Result<Vec<Vec<u8>>> {
        query(self.tx, sql, params, |r| r.get::<_, Vec<u8>>(0))
    }

    /// Replaces the record with `rec.uuid`.
    ///
    /// # Errors
    /// Storage errors; [`Error::Integrity`] if there is no such record (it was deleted under us).
    pub fn update_key(&self, rec: &KeyRecord) -> Result<()> {
        let old = self
            .macs(
                "SELECT mac FROM keys WHERE uuid = ?1",
                params![rec.uuid.as_slice()],
            )?
            .pop();
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
        self.changed(RowKind::Key, &rec.uuid, old, Some(&rec.mac));
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
        self.changed(RowKind::Version, &v.uuid, None, Some(&v.mac));
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
        for (kind, table) in [
            (RowKind::Version, "key_versions"),
            (RowKind::Counter, "gcm_counters"),
        ] {
            let macs = self.macs(
                &format!("SELECT mac FROM {table} WHERE uuid = ?1"),
                params![uuid.as_slice()],
            )?;
            self.tx
                .execute(
                    &format!("DELETE FROM {table} WHERE uuid = ?1"),
                    params![uuid.as_slice()],
                )
                .map_err(|e| Error::storage("erase a key's versions", e))?;
            for mac in macs {
                self.changed(kind, uuid, Some(mac), None);
            }
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
        self.changed(RowKind::Event, &e.uuid, None, Some(&e.mac));
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
        let old = self
            .macs(
                "SELECT mac FROM gcm_counters WHERE uuid = ?1 AND version = ?2",
                params![c.uuid.as_slice(), c.version],
            )?
            .pop();
        self.tx
            .execute(
                &format!(
                    "INSERT OR REPLACE INTO gcm_counters ({}) VALUES (?1, ?2, ?3, ?4)",
                    rows::COUNTER_COLUMNS
                ),
                params![c.uuid.as_slice(), c.version, c.reserved, c.mac],
            )
            .map_err(|e| Error::storage("reserve AES-GCM invocations", e))?;
        self.changed(RowKind::Counter, &c.uuid, old, Some(&c.mac));
        Ok(())
    }

    /// The token client named `name`, under the write lock. The caller checks its MAC.
    ///
    /// # Errors
    /// Storage errors; [`Error::Integrity`] if the row cannot be decoded.
    pub fn client(&self, name: &str) -> Result<Option<ClientRecord>> {
        read_client(self.tx, "name", &name)
    }

    /// Adds a token client.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if a client of that name exists; storage errors.
    pub fn insert_client(&self, c: &ClientRecord) -> Result<()> {
        let inserted = self.tx.execute(
            &format!(
                "INSERT INTO clients ({}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                rows::CLIENT_COLUMNS
            ),
            params![
                c.uuid.as_slice(),
                c.name,
                c.token_hash,
                c.namespaces,
                c.operations,
                c.created_at,
                c.mac
            ],
        );
        match inserted {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
            {
                return Err(Error::InvalidInput(format!(
                    "a token client named `{}` exists already: choose another name, or `keyhold \
                     client remove {}` first",
                    c.name, c.name
                )));
            }
            Err(e) => return Err(Error::storage("insert a token client", e)),
        }
        self.changed(RowKind::Client, &c.uuid, None, Some(&c.mac));
        Ok(())
    }

    /// Deletes the token client `c` (as read under this lock).
    ///
    /// # Errors
    /// Storage errors; [`Error::Integrity`] if it is not there any more.
    pub fn delete_client(&self, c: &ClientRecord) -> Result<()> {
        let n = self
            .tx
            .execute(
                "DELETE FROM clients WHERE uuid = ?1",
                params![c.uuid.as_slice()],
            )
            .map_err(|e| Error::storage("remove a token client", e))?;
        if n != 1 {
            return Err(Error::Integrity {
                what: format!("token client `{}` vanished while it was removed", c.name),
            });
        }
        self.changed(RowKind::Client, &c.uuid, Some(c.mac.clone()), None);
        Ok(())
    }
}
