//! A key record as stored, and the canonical bytes its MAC covers.

use crate::error::Error;

/// The columns of `keys`, in the order [`from_row`] reads them.
pub(super) const COLUMNS: &str = "uuid, namespace, name, key_type, purpose, algorithm, backend, \
     locator, state, version, created_at, updated_at, blob, public_key, attributes, mac";

/// One key as the store holds it. Every field but `mac` is covered by `mac`.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Random record identifier.
    pub uuid: [u8; 16],
    /// Namespace.
    pub namespace: String,
    /// Name, unique in the namespace.
    pub name: String,
    /// Key type name.
    pub key_type: String,
    /// Purpose name.
    pub purpose: String,
    /// Algorithm name.
    pub algorithm: String,
    /// Backend instance name.
    pub backend: String,
    /// Where the backend finds the key.
    pub locator: String,
    /// Lifecycle state name.
    pub state: String,
    /// Key version (1 until rotation exists).
    pub version: u32,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: i64,
    /// Last change, seconds since the Unix epoch.
    pub updated_at: i64,
    /// The backend's opaque blob (the software backend's sealed key).
    pub blob: Option<Vec<u8>>,
    /// The DER SubjectPublicKeyInfo of an asymmetric key.
    pub public_key: Option<Vec<u8>>,
    /// A JSON object of strings: what the backend reported (`never_extractable`, …) and how the
    /// key came to be where it is (`fallback_for`).
    pub attributes: String,
    /// HMAC-SHA256 over [`KeyRecord::mac_input`].
    pub mac: Vec<u8>,
}

impl std::fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRecord")
            .field("uuid", &crate::hex::encode(&self.uuid))
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("key_type", &self.key_type)
            .field("purpose", &self.purpose)
            .field("algorithm", &self.algorithm)
            .field("backend", &self.backend)
            .field("locator", &self.locator)
            .field("state", &self.state)
            .field("version", &self.version)
            .field("blob_len", &self.blob.as_ref().map(Vec::len))
            .field("attributes", &self.attributes)
            .finish_non_exhaustive()
    }
}

impl KeyRecord {
    /// The canonical bytes the record MAC covers: a domain string, the store ID, then every field
    /// length-prefixed (`u32` big-endian; absent optional fields as `0xffffffff`), so no two records
    /// share an encoding.
    pub fn mac_input(&self, store_id: &[u8; 16]) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + self.blob.as_ref().map_or(0, Vec::len));
        out.extend_from_slice(b"keyhold key record v1\0");
        out.extend_from_slice(store_id);
        let mut field = |bytes: Option<&[u8]>| match bytes {
            Some(b) => {
                // Fields are far below 4 GiB (inputs are capped at 64 MiB).
                out.extend_from_slice(&(b.len() as u32).to_be_bytes());
                out.extend_from_slice(b);
            }
            None => out.extend_from_slice(&u32::MAX.to_be_bytes()),
        };
        field(Some(&self.uuid));
        for text in [
            &self.namespace,
            &self.name,
            &self.key_type,
            &self.purpose,
            &self.algorithm,
            &self.backend,
            &self.locator,
            &self.state,
        ] {
            field(Some(text.as_bytes()));
        }
        field(Some(&self.version.to_be_bytes()));
        field(Some(&self.created_at.to_be_bytes()));
        field(Some(&self.updated_at.to_be_bytes()));
        field(self.blob.as_deref());
        field(self.public_key.as_deref());
        field(Some(self.attributes.as_bytes()));
        out
    }
}

pub(super) fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRecord> {
    let uuid: Vec<u8> = row.get(0)?;
    let uuid: [u8; 16] = uuid.try_into().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Blob,
            "uuid is not 16 bytes".into(),
        )
    })?;
    Ok(KeyRecord {
        uuid,
        namespace: row.get(1)?,
        name: row.get(2)?,
        key_type: row.get(3)?,
        purpose: row.get(4)?,
        algorithm: row.get(5)?,
        backend: row.get(6)?,
        locator: row.get(7)?,
        state: row.get(8)?,
        version: row.get(9)?,
        created_at: row.get(10)?,
        updated_at: row.get(11)?,
        blob: row.get(12)?,
        public_key: row.get(13)?,
        attributes: row.get(14)?,
        mac: row.get(15)?,
    })
}

/// A row that cannot be read back is a record that was changed outside keyhold.
pub(super) fn decode_error(e: rusqlite::Error) -> Error {
    match e {
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::Utf8Error(..) => Error::Integrity {
            what: format!("a key record cannot be decoded ({e})"),
        },
        other => Error::storage("read key records", other),
    }
}
