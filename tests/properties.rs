//! Property tests: any change to a key ID, or to any byte of a stored record, is refused.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use keyhold::{Error, KeyType, SignatureFormat};
use proptest::prelude::*;
use support::TestStore;

const COLUMNS: [&str; 15] = [
    "uuid",
    "namespace",
    "name",
    "key_type",
    "purpose",
    "algorithm",
    "backend",
    "locator",
    "state",
    "version",
    "created_at",
    "updated_at",
    "blob",
    "public_key",
    "mac",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Replacing any one character of an ID with any other ID-alphabet character is refused as an
    /// authentication failure (never "no such key", never accepted).
    #[test]
    fn any_changed_id_character_is_refused(pos in any::<prop::sample::Index>(), c in "[A-Za-z0-9_-]") {
        let t = store();
        let id = &t.1;
        let pos = pos.index(id.len());
        let c = c.chars().next().unwrap();
        prop_assume!(id.as_bytes()[pos] as char != c);
        let mut changed = id.clone();
        changed.replace_range(pos..=pos, &c.to_string());
        let err = t.0.ks.sign(&changed, b"m", SignatureFormat::Der).unwrap_err();
        prop_assert!(matches!(err, Error::KeyIdAuthentication { .. }), "{}", err);
    }

    /// Truncating or extending an ID is refused too.
    #[test]
    fn truncated_or_extended_ids_are_refused(cut in 0usize..200, extra in "[A-Za-z0-9_-]{1,8}") {
        let t = store();
        let id = &t.1;
        let cut = cut % id.len();
        let err = t.0.ks.sign(&id[..cut], b"m", SignatureFormat::Der).unwrap_err();
        prop_assert!(matches!(err, Error::KeyIdAuthentication { .. }), "{}", err);
        let err = t.0.ks.sign(&format!("{id}{extra}"), b"m", SignatureFormat::Der).unwrap_err();
        prop_assert!(matches!(err, Error::KeyIdAuthentication { .. }), "{}", err);
    }
}

proptest! {
    // Each case creates a store (Argon2 at 19 MiB, 2 passes): fewer cases, every column still
    // covered.
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Flipping any bit of any byte of any column of a stored record makes the key unusable with an
    /// integrity error (or, for its MAC or uuid, the store refused as tampered with).
    #[test]
    fn any_modified_record_byte_is_refused(
        column in 0usize..COLUMNS.len(),
        pos in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let t = TestStore::new();
        let key = t.create("k", KeyType::EcdsaP256, None);
        let column = COLUMNS[column];
        let conn = rusqlite::Connection::open(t.db()).unwrap();
        // Work on the column's bytes whatever its type, and write back the same type.
        let (bytes, kind): (Vec<u8>, String) = conn.query_row(
            &format!("SELECT CAST({column} AS BLOB), typeof({column}) FROM keys"),
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        ).unwrap();
        let mut bytes = bytes;
        let i = pos.index(bytes.len());
        bytes[i] ^= 1 << bit;
        let written = match kind.as_str() {
            "blob" => conn.execute(&format!("UPDATE keys SET {column} = ?1"), [&bytes]),
            "text" => match String::from_utf8(bytes) {
                Ok(s) => conn.execute(&format!("UPDATE keys SET {column} = ?1"), [&s]),
                // Invalid UTF-8 cannot be a TEXT value, and a BLOB is refused by the STRICT table:
                // this byte change cannot be made to a stored record, so the case is discarded.
                Err(_) => {
                    prop_assume!(false);
                    unreachable!("prop_assume!(false) returns")
                }
            },
            "integer" => {
                // An INTEGER column holds a number: flip one of its low 32 bits instead.
                let n: i64 = conn
                    .query_row(&format!("SELECT {column} FROM keys"), [], |r| r.get(0))
                    .unwrap();
                let flipped = n ^ (1i64 << (u32::from(bit) + 8 * (i as u32 % 4)));
                conn.execute(&format!("UPDATE keys SET {column} = ?1"), [flipped])
            }
            other => panic!("unexpected column type {other}"),
        };
        written.unwrap();
        drop(conn);
        // The store no longer opens (every record is checked at open); the keystore that was
        // open before the change refuses the record when it is used.
        let reopened = t.reopen();
        prop_assert!(
            matches!(reopened, Err(Error::Integrity { .. })),
            "{} byte {} bit {}: reopened: {:?}", column, i, bit, reopened.err()
        );
        let err = t.ks.sign(&key.id, b"m", SignatureFormat::Der).unwrap_err();
        let ok = match &err {
            Error::Integrity { .. } => true,
            Error::NoSuchKey { .. } => column == "uuid",
            // The record's MAC and uuid are what the store's commitment counts: checked first at
            // each use, the key's rows are no longer the ones committed.
            Error::StoreTampered { .. } => column == "uuid" || column == "mac",
            _ => false,
        };
        prop_assert!(ok, "{} byte {} bit {}: {}", column, i, bit, err);
    }
}

fn store() -> (TestStore, String) {
    let t = TestStore::new();
    let id = t.create("k", KeyType::HmacSha256, None).id;
    (t, id)
}
