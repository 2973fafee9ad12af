//! Authenticated key IDs: what applications hold instead of keys.
//!
//! An ID is `kh1_` followed by unpadded base64url of
//! `version u8 | store id [16] | key uuid [16] | 7 length-prefixed fields | tag [16]`, where the
//! fields are namespace, name, backend, backend locator, key type, purpose and algorithm, each a
//! `u8` length and UTF-8 bytes, and the tag is HMAC-SHA256 (truncated to 128 bits) under a key
//! derived from the store's root secret over everything before it. The ID holds no secret; it binds
//! everything that decides which key is used and how, so any change to it is refused before the
//! store is even looked up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use aws_lc_rs::{constant_time, hmac};
use base64::Engine as _;

use crate::error::{Error, Result};
use crate::key::KeySpec;

/// The prefix of every keyhold key ID of format version 1.
pub const PREFIX: &str = "kh1_";
const FORMAT_VERSION: u8 = 1;
const TAG_LEN: usize = 16;
const DOMAIN: &[u8] = b"keyhold key id v1\0";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The most checked IDs remembered; past it the memory starts over.
const CHECKED_LIMIT: usize = 4096;

/// The fields a key ID binds. Produced only by `KeyIdCodec::decode` after the tag checked out, or
/// by the keystore from a verified record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyIdFields {
    /// The store that issued the ID.
    pub store_id: [u8; 16],
    /// The key's record identifier.
    pub uuid: [u8; 16],
    /// The key's namespace.
    pub namespace: String,
    /// The key's name.
    pub name: String,
    /// The backend instance holding the key.
    pub backend: String,
    /// Where the backend finds the key.
    pub locator: String,
    /// Type, purpose and algorithm.
    pub spec: KeySpec,
}

/// Issues and checks the key IDs of one store, and remembers the IDs whose tag checked out.
///
/// A service checks the ID of every request before anything else (a base64 decoding, an HMAC and
/// the fields' allocations: a few microseconds); an ID is a string, so one equal to an ID that
/// checked out is that genuine ID, and its fields are the remembered ones. Only genuine IDs are
/// remembered: a changed ID is looked up, not found, and checked (and refused) in full.
pub(crate) struct KeyIdCodec {
    store_id: [u8; 16],
    key: hmac::Key,
    checked: Mutex<HashMap<Box<str>, Arc<KeyIdFields>>>,
}

impl std::fmt::Debug for KeyIdCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyIdCodec").finish_non_exhaustive()
    }
}

impl KeyIdCodec {
    /// A codec for the store `store_id` with its derived key-ID MAC key.
    pub(crate) fn new(store_id: [u8; 16], mac_key: &[u8]) -> Self {
        Self {
            store_id,
            key: hmac::Key::new(hmac::HMAC_SHA256, mac_key),
            checked: Mutex::new(HashMap::new()),
        }
    }

    /// Encodes and authenticates `fields`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if a field is longer than 255 bytes.
    pub(crate) fn encode(&self, fields: &KeyIdFields) -> Result<String> {
        let mut body = Vec::with_capacity(128);
        body.push(FORMAT_VERSION);
        body.extend_from_slice(&fields.store_id);
        body.extend_from_slice(&fields.uuid);
        for field in [
            fields.namespace.as_str(),
            fields.name.as_str(),
            fields.backend.as_str(),
            fields.locator.as_str(),
            fields.spec.key_type().as_str(),
            fields.spec.purpose().as_str(),
            fields.spec.algorithm().as_str(),
        ] {
            let len = u8::try_from(field.len()).map_err(|_| {
                Error::InvalidInput(format!(
                    "a key ID field is {} bytes long; the limit is 255",
                    field.len()
                ))
            })?;
            body.push(len);
            body.extend_from_slice(field.as_bytes());
        }
        let tag = self.tag(&body);
        body.extend_from_slice(&tag);
        Ok(format!("{PREFIX}{}", B64.encode(&body)))
    }

    /// Checks an ID's tag and returns the fields it binds (remembered, for an ID that checked
    /// out before).
    ///
    /// # Errors
    /// [`Error::KeyIdAuthentication`] for anything but a genuine ID issued by this store.
    pub(crate) fn decode(&self, id: &str) -> Result<Arc<KeyIdFields>> {
        let remembered = || self.checked.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(fields) = remembered().get(id) {
            return Ok(Arc::clone(fields));
        }
        let fields = Arc::new(self.check(id)?);
        let mut checked = remembered();
        if checked.len() >= CHECKED_LIMIT {
            checked.clear();
        }
        checked.insert(id.into(), Arc::clone(&fields));
        Ok(fields)
    }

    /// [`Self::decode`] in full: the encoding, the store and the tag.
    fn check(&self, id: &str) -> Result<KeyIdFields> {
        let refuse = |reason| Error::KeyIdAuthentication { reason };
        let encoded = id
            .strip_prefix(PREFIX)
            .ok_or(refuse("not a keyhold key ID (they start with `kh1_`)"))?;
        let raw = B64
            .decode(encoded)
            .map_err(|_| refuse("the ID is not valid base64url: it was modified or truncated"))?;
        // base64 can hide changes in the unused bits of the last character: insist on the one
        // canonical spelling so that every changed character is a changed ID.
        if B64.encode(&raw) != encoded {
            return Err(refuse("the ID is not canonically encoded: it was modified"));
        }
        if raw.len() < 1 + 16 + 16 + 7 + TAG_LEN {
            return Err(refuse("the ID is too short: it was truncated"));
        }
        let (body, tag) = raw.split_at(raw.len() - TAG_LEN);
        if body[0] != FORMAT_VERSION {
            return Err(refuse("unknown key ID format version: it was modified"));
        }
        if body[1..17] != self.store_id {
            return Err(refuse("the ID was issued by another store (or modified)"));
        }
        let expected = self.tag(body);
        constant_time::verify_slices_are_equal(&expected, tag)
            .map_err(|_| refuse("the ID's tag does not match: it was modified"))?;
        // From here on the bytes are genuine, so a parse failure is a bug, not an attack.
        parse_body(body).ok_or(refuse("the ID's fields cannot be parsed"))
    }

    fn tag(&self, body: &[u8]) -> [u8; TAG_LEN] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(DOMAIN);
        ctx.update(body);
        let full = ctx.sign();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&full.as_ref()[..TAG_LEN]);
        tag
    }
}

fn parse_body(body: &[u8]) -> Option<KeyIdFields> {
    let store_id: [u8; 16] = body.get(1..17)?.try_into().ok()?;
    let uuid: [u8; 16] = body.get(17..33)?.try_into().ok()?;
    let mut rest = body.get(33..)?;
    let mut fields = Vec::with_capacity(7);
    for _ in 0..7 {
        let (&len, tail) = rest.split_first()?;
        let (field, tail) = tail.split_at_checked(usize::from(len))?;
        fields.push(std::str::from_utf8(field).ok()?.to_owned());
        rest = tail;
    }
    if !rest.is_empty() {
        return None;
    }
    let spec = KeySpec::from_names(&fields[4], &fields[5], &fields[6]).ok()?;
    let mut fields = fields.into_iter();
    Some(KeyIdFields {
        store_id,
        uuid,
        namespace: fields.next()?,
        name: fields.next()?,
        backend: fields.next()?,
        locator: fields.next()?,
        spec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{KeyType, Purpose};

    fn sample() -> (KeyIdCodec, KeyIdFields) {
        let codec = KeyIdCodec::new([7; 16], &[9; 32]);
        let fields = KeyIdFields {
            store_id: [7; 16],
            uuid: [1; 16],
            namespace: "default".into(),
            name: "web".into(),
            backend: "software".into(),
            locator: "0101".into(),
            spec: KeySpec::new(KeyType::EcdsaP256, Some(Purpose::Sign), None).unwrap(),
        };
        (codec, fields)
    }

    #[test]
    fn round_trip() {
        let (codec, fields) = sample();
        let id = codec.encode(&fields).unwrap();
        assert!(id.starts_with("kh1_"));
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
        assert_eq!(*codec.decode(&id).unwrap(), fields);
        // Remembered the second time: the same fields.
        assert_eq!(*codec.decode(&id).unwrap(), fields);
    }

    #[test]
    fn remembered_ids_are_bounded_and_still_checked_after() {
        let (codec, mut fields) = sample();
        let first = codec.encode(&fields).unwrap();
        codec.decode(&first).unwrap();
        for n in 0..=CHECKED_LIMIT {
            fields.name = format!("k{n}");
            codec.decode(&codec.encode(&fields).unwrap()).unwrap();
        }
        let held = codec.checked.lock().unwrap().len();
        assert!((1..=CHECKED_LIMIT).contains(&held), "{held} remembered");
        assert!(!codec.checked.lock().unwrap().contains_key(first.as_str()));
        // Forgotten, it is checked again in full, and still genuine.
        assert_eq!(codec.decode(&first).unwrap().name, "web");
    }

    #[test]
    fn every_changed_character_is_refused() {
        let (codec, fields) = sample();
        let id = codec.encode(&fields).unwrap();
        // The genuine ID is remembered: no change to it passes as it.
        codec.decode(&id).unwrap();
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        for pos in 0..id.len() {
            for &c in alphabet {
                let mut bytes = id.clone().into_bytes();
                if bytes[pos] == c {
                    continue;
                }
                bytes[pos] = c;
                let changed = String::from_utf8(bytes).unwrap();
                let err = codec.decode(&changed).unwrap_err();
                assert!(
                    matches!(err, Error::KeyIdAuthentication { .. }),
                    "{changed} gave {err}"
                );
            }
        }
    }

    #[test]
    fn another_store_or_key_is_refused() {
        let (codec, fields) = sample();
        let id = codec.encode(&fields).unwrap();
        let other_store = KeyIdCodec::new([8; 16], &[9; 32]);
        let err = other_store.decode(&id).unwrap_err();
        assert!(
            matches!(&err, Error::KeyIdAuthentication { reason } if reason.contains("another store")),
            "{err:?}"
        );
        let other_key = KeyIdCodec::new([7; 16], &[10; 32]);
        let err = other_key.decode(&id).unwrap_err();
        assert!(err.to_string().contains("tag does not match"), "{err}");
        for cut in [&id[..id.len() - 1], ""] {
            let err = codec.decode(cut).unwrap_err();
            assert!(
                matches!(&err, Error::KeyIdAuthentication { .. }),
                "{cut:?}: {err:?}"
            );
        }
    }
}
