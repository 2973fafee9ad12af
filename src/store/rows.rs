//! The lifecycle's rows: a key's later versions, its history, and its AES-GCM invocation
//! counters. Each is MAC'd by the keystore like a key record, under its own domain string, so a row
//! of one kind never verifies as another.

use super::record::Canonical;

/// Version 2 or later of a key (version 1 lives in the key's own record).
#[derive(Clone, PartialEq, Eq)]
pub struct VersionRecord {
    /// The key's record identifier.
    pub uuid: [u8; 16],
    /// The version number, from 2.
    pub version: u32,
    /// Where the backend finds this version.
    pub locator: String,
    /// The backend's opaque blob for this version.
    pub blob: Option<Vec<u8>>,
    /// The DER SubjectPublicKeyInfo of an asymmetric key's version.
    pub public_key: Option<Vec<u8>>,
    /// What the backend reported about this version (JSON object of strings).
    pub attributes: String,
    /// When the version was made.
    pub created_at: i64,
    /// HMAC-SHA256 over [`VersionRecord::mac_input`].
    pub mac: Vec<u8>,
}

impl std::fmt::Debug for VersionRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VersionRecord")
            .field("uuid", &crate::hex::encode(&self.uuid))
            .field("version", &self.version)
            .field("locator", &self.locator)
            .field("blob_len", &self.blob.as_ref().map(Vec::len))
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

impl VersionRecord {
    /// The canonical bytes its MAC covers.
    pub fn mac_input(&self, store_id: &[u8; 16]) -> Vec<u8> {
        let mut c = Canonical::new(b"keyhold key version v1\0", store_id);
        c.field(Some(&self.uuid))
            .int(i64::from(self.version))
            .text(&self.locator)
            .field(self.blob.as_deref())
            .field(self.public_key.as_deref())
            .text(&self.attributes)
            .int(self.created_at);
        c.into_bytes()
    }
}

/// One entry of a key's history: a state change, a rotation, a scheduled or cancelled
/// destruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// The key's record identifier.
    pub uuid: [u8; 16],
    /// Its place in the key's history, from 1.
    pub seq: u32,
    /// When, seconds since the Unix epoch.
    pub at: i64,
    /// What happened (`created`, `rotated`, `suspended`, …).
    pub event: String,
    /// The state before.
    pub from_state: String,
    /// The state after.
    pub to_state: String,
    /// The key's current version after the event.
    pub version: u32,
    /// Why, as the operator said (free text), or what keyhold did on its own.
    pub reason: Option<String>,
    /// HMAC-SHA256 over [`EventRecord::mac_input`].
    pub mac: Vec<u8>,
}

impl EventRecord {
    /// The canonical bytes its MAC covers.
    pub fn mac_input(&self, store_id: &[u8; 16]) -> Vec<u8> {
        let mut c = Canonical::new(b"keyhold key event v1\0", store_id);
        c.field(Some(&self.uuid))
            .int(i64::from(self.seq))
            .int(self.at)
            .text(&self.event)
            .text(&self.from_state)
            .text(&self.to_state)
            .int(i64::from(self.version))
            .field(self.reason.as_deref().map(str::as_bytes));
        c.into_bytes()
    }
}

/// How many AES-GCM invocations of one key version are reserved (used or skipped): the
/// counter NIST SP 800-38D §8.3 bounds for random nonces. Reserved in blocks before use, so a crash
/// skips values and never reuses them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterRecord {
    /// The key's record identifier.
    pub uuid: [u8; 16],
    /// The version counted.
    pub version: u32,
    /// Invocations reserved so far.
    pub reserved: i64,
    /// HMAC-SHA256 over [`CounterRecord::mac_input`].
    pub mac: Vec<u8>,
}

impl CounterRecord {
    /// The canonical bytes its MAC covers.
    pub fn mac_input(&self, store_id: &[u8; 16]) -> Vec<u8> {
        let mut c = Canonical::new(b"keyhold gcm counter v1\0", store_id);
        c.field(Some(&self.uuid))
            .int(i64::from(self.version))
            .int(self.reserved);
        c.into_bytes()
    }
}

/// A client of the service that authenticates with a bearer token (`keyhold client add`): the
/// token's keyed hash, never the token, and what the client is granted.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientRecord {
    /// Random record identifier: the client's place in the commitment.
    pub uuid: [u8; 16],
    /// The client's name, unique among token clients.
    pub name: String,
    /// HMAC-SHA256 of the token under a key derived from the root secret.
    pub token_hash: Vec<u8>,
    /// The namespaces granted, a JSON array of strings.
    pub namespaces: String,
    /// The operations granted, a JSON array of strings; `None`: the default grant.
    pub operations: Option<String>,
    /// When the client was added.
    pub created_at: i64,
    /// HMAC-SHA256 over [`ClientRecord::mac_input`].
    pub mac: Vec<u8>,
}

impl std::fmt::Debug for ClientRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the token's hash: it is what a presented token is looked up by.
        f.debug_struct("ClientRecord")
            .field("uuid", &crate::hex::encode(&self.uuid))
            .field("name", &self.name)
            .field("namespaces", &self.namespaces)
            .field("operations", &self.operations)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

impl ClientRecord {
    /// The canonical bytes its MAC covers.
    pub fn mac_input(&self, store_id: &[u8; 16]) -> Vec<u8> {
        let mut c = Canonical::new(b"keyhold token client v1\0", store_id);
        c.field(Some(&self.uuid))
            .text(&self.name)
            .field(Some(&self.token_hash))
            .text(&self.namespaces)
            .field(self.operations.as_deref().map(str::as_bytes))
            .int(self.created_at);
        c.into_bytes()
    }
}

pub(super) fn uuid_at(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<[u8; 16]> {
    let uuid: Vec<u8> = row.get(i)?;
    uuid.try_into().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Blob,
            "uuid is not 16 bytes".into(),
        )
    })
}

pub(super) const VERSION_COLUMNS: &str =
    "uuid, version, locator, blob, public_key, attributes, created_at, mac";

pub(super) fn version_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<VersionRecord> {
    Ok(VersionRecord {
        uuid: uuid_at(row, 0)?,
        version: row.get(1)?,
        locator: row.get(2)?,
        blob: row.get(3)?,
        public_key: row.get(4)?,
        attributes: row.get(5)?,
        created_at: row.get(6)?,
        mac: row.get(7)?,
    })
}

pub(super) const EVENT_COLUMNS: &str =
    "uuid, seq, at, event, from_state, to_state, version, reason, mac";

pub(super) fn event_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<EventRecord> {
    Ok(EventRecord {
        uuid: uuid_at(row, 0)?,
        seq: row.get(1)?,
        at: row.get(2)?,
        event: row.get(3)?,
        from_state: row.get(4)?,
        to_state: row.get(5)?,
        version: row.get(6)?,
        reason: row.get(7)?,
        mac: row.get(8)?,
    })
}

pub(super) const COUNTER_COLUMNS: &str = "uuid, version, reserved, mac";

pub(super) fn counter_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<CounterRecord> {
    Ok(CounterRecord {
        uuid: uuid_at(row, 0)?,
        version: row.get(1)?,
        reserved: row.get(2)?,
        mac: row.get(3)?,
    })
}

pub(super) const CLIENT_COLUMNS: &str =
    "uuid, name, token_hash, namespaces, operations, created_at, mac";

pub(super) fn client_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ClientRecord> {
    Ok(ClientRecord {
        uuid: uuid_at(row, 0)?,
        name: row.get(1)?,
        token_hash: row.get(2)?,
        namespaces: row.get(3)?,
        operations: row.get(4)?,
        created_at: row.get(5)?,
        mac: row.get(6)?,
    })
}
