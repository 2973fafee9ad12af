//! A key record as stored, and the canonical bytes its MAC covers.

use crate::error::Error;

/// The columns of `keys`, in the order [`from_row`] reads them.
pub(super) const COLUMNS: &str = "uuid, namespace, name, key_type, purpose, algorithm, backend, \
     locator, state, version, created_at, updated_at, blob, public_key, attributes, mac, \
     mac_format, min_decrypt_version, rotate_after, activate_at, deactivate_at, destroy_at, \
     destroyed_at";

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
    /// The current (newest) version. Version 1's material is in this record (`locator`, `blob`,
    /// `public_key`); later versions are [`VersionRecord`](super::VersionRecord)s.
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
    /// Which canonical encoding `mac` covers: 1 for records written before the lifecycle fields
    /// existed (those fields must then hold their defaults), 2 since.
    pub mac_format: u8,
    /// The oldest version that may still decrypt and verify.
    pub min_decrypt_version: u32,
    /// Rotate when the current version is this many seconds old.
    pub rotate_after: Option<i64>,
    /// Pre-activation until this time, then active.
    pub activate_at: Option<i64>,
    /// Deactivated from this time on.
    pub deactivate_at: Option<i64>,
    /// Scheduled destruction: the key's material is destroyed at this time unless cancelled.
    pub destroy_at: Option<i64>,
    /// When the material was destroyed (the record is then a tombstone).
    pub destroyed_at: Option<i64>,
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
            .field("min_decrypt_version", &self.min_decrypt_version)
            .field("rotate_after", &self.rotate_after)
            .field("activate_at", &self.activate_at)
            .field("deactivate_at", &self.deactivate_at)
            .field("destroy_at", &self.destroy_at)
            .field("destroyed_at", &self.destroyed_at)
            .finish_non_exhaustive()
    }
}

/// Canonical, length-prefixed bytes: every field as `u32` big-endian length and bytes, absent
/// optional fields as `0xffffffff`, so no two different rows share an encoding.
#[derive(Debug, Default)]
pub(crate) struct Canonical(Vec<u8>);

impl Canonical {
    /// Starts with `domain` (which names the row kind and its format) and the store ID.
    pub(crate) fn new(domain: &[u8], store_id: &[u8; 16]) -> Self {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(domain);
        out.extend_from_slice(store_id);
        Self(out)
    }

    pub(crate) fn field(&mut self, bytes: Option<&[u8]>) -> &mut Self {
        match bytes {
            Some(b) => {
                // Fields are far below 4 GiB (inputs are capped at 64 MiB).
                self.0.extend_from_slice(&(b.len() as u32).to_be_bytes());
                self.0.extend_from_slice(b);
            }
            None => self.0.extend_from_slice(&u32::MAX.to_be_bytes()),
        }
        self
    }

    pub(crate) fn text(&mut self, text: &str) -> &mut Self {
        self.field(Some(text.as_bytes()))
    }

    pub(crate) fn int(&mut self, n: i64) -> &mut Self {
        self.field(Some(&n.to_be_bytes()))
    }

    pub(crate) fn opt_int(&mut self, n: Option<i64>) -> &mut Self {
        match n {
            Some(n) => self.int(n),
            None => self.field(None),
        }
    }

    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl KeyRecord {
    /// The canonical bytes the record MAC covers, in the record's [`KeyRecord::mac_format`]: a
    /// domain string naming the format, the store ID, then every field. Format 1 (records made
    /// before the lifecycle fields) is `None` unless those fields hold their defaults: a format-1
    /// record with any of them set was changed outside keyhold.
    pub fn mac_input(&self, store_id: &[u8; 16]) -> Option<Vec<u8>> {
        let v1 = self.mac_format == 1;
        if v1 && !self.has_default_lifecycle() {
            return None;
        }
        let domain: &[u8] = if v1 {
            b"keyhold key record v1\0"
        } else {
            b"keyhold key record v2\0"
        };
        let mut c = Canonical::new(domain, store_id);
        c.field(Some(&self.uuid));
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
            c.text(text);
        }
        c.field(Some(&self.version.to_be_bytes()));
        c.field(Some(&self.created_at.to_be_bytes()));
        c.field(Some(&self.updated_at.to_be_bytes()));
        c.field(self.blob.as_deref());
        c.field(self.public_key.as_deref());
        c.text(&self.attributes);
        if !v1 {
            c.int(i64::from(self.min_decrypt_version))
                .opt_int(self.rotate_after)
                .opt_int(self.activate_at)
                .opt_int(self.deactivate_at)
                .opt_int(self.destroy_at)
                .opt_int(self.destroyed_at);
        }
        Some(c.into_bytes())
    }

    fn has_default_lifecycle(&self) -> bool {
        self.min_decrypt_version == 1
            && self.rotate_after.is_none()
            && self.activate_at.is_none()
            && self.deactivate_at.is_none()
            && self.destroy_at.is_none()
            && self.destroyed_at.is_none()
    }
}

pub(super) fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRecord> {
    Ok(KeyRecord {
        uuid: super::rows::uuid_at(row, 0)?,
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
        mac_format: row.get(16)?,
        min_decrypt_version: row.get(17)?,
        rotate_after: row.get(18)?,
        activate_at: row.get(19)?,
        deactivate_at: row.get(20)?,
        destroy_at: row.get(21)?,
        destroyed_at: row.get(22)?,
    })
}

/// A row that cannot be read back is a record that was changed outside keyhold.
pub(super) fn decode_error(e: rusqlite::Error) -> Error {
    match e {
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::Utf8Error(..) => Error::Integrity {
            what: format!(
                "a key's record, version, history or counter row cannot be decoded ({e})"
            ),
        },
        other => Error::storage("read key records", other),
    }
}
