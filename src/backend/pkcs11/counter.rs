//! A store's generation counter on a PKCS#11 token: the best a token allows, and less than a TPM.
//!
//! PKCS#11 has no counter an application can advance and nobody can wind back (its
//! `CKH_MONOTONIC_COUNTER` hardware feature is the token's own, read-only). So the count is kept
//! in private data objects (`CKO_DATA`, `CKA_TOKEN`, `CKA_PRIVATE`), labelled after the store ID,
//! each holding a count and an HMAC-SHA256 of it under a key derived from the store's root
//! secret: only keyhold with the root secret makes a value that reads as the store's. An increment
//! makes an object for the next count before it destroys the older ones, so a crash between the
//! two leaves both, and the highest valid count is the counter's value.
//!
//! What it stops: a store directory put back from a copy (a backup, a VM or disk snapshot) while
//! the token kept counting — the token's objects are not in the store directory (on a hardware
//! token, not on the machine's disk at all). What it does not: anyone who can log in to the token
//! (the user PIN, which keyhold reads on the same machine) can destroy the newer objects and
//! put an older value back, since the objects are private, not monotonic; and a software token
//! (SoftHSM2, openCryptoki's soft token) keeps its objects in files that a copy of the machine's
//! disk takes along.

use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::Pkcs11Backend;
use crate::error::Result;
use crate::secret::SecretBytes;
use crate::store::{Counter, CounterAt, CounterValue};

/// A count's object: 8 bytes of count (big-endian), then the 32-byte MAC.
const VALUE_LEN: usize = 8 + 32;

/// `CKA_APPLICATION` of the objects.
const APPLICATION: &[u8] = b"keyhold";

/// The store's counter on the token of `backend`.
pub struct TokenCounter {
    backend: std::sync::Arc<Pkcs11Backend>,
    label: String,
    store_id: [u8; 16],
    mac: aws_lc_rs::hmac::Key,
}

impl std::fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCounter")
            .field("backend", &self.backend.name)
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl TokenCounter {
    /// The counter of store `store_id` on `backend`'s token, its counts MAC'd under `mac_key`.
    pub fn new(
        backend: std::sync::Arc<Pkcs11Backend>,
        store_id: &[u8; 16],
        mac_key: &SecretBytes,
    ) -> Self {
        Self {
            backend,
            label: format!("keyhold counter {}", crate::hex::encode(store_id)),
            store_id: *store_id,
            mac: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, mac_key.expose()),
        }
    }

    /// The object value for `count`.
    fn value(&self, count: u64) -> Vec<u8> {
        let mut value = count.to_be_bytes().to_vec();
        value.extend_from_slice(aws_lc_rs::hmac::sign(&self.mac, &self.signed(count)).as_ref());
        value
    }

    /// The count `value` holds, if keyhold made it for this store.
    fn count_of(&self, value: &[u8]) -> Option<u64> {
        if value.len() != VALUE_LEN {
            return None;
        }
        let (count, tag) = value.split_at(8);
        let count = u64::from_be_bytes(count.try_into().ok()?);
        aws_lc_rs::hmac::verify(&self.mac, &self.signed(count), tag)
            .ok()
            .map(|()| count)
    }

    /// What a count's MAC covers.
    fn signed(&self, count: u64) -> Vec<u8> {
        let mut input = b"keyhold v1 token counter\0".to_vec();
        input.extend_from_slice(&self.store_id);
        input.extend_from_slice(&count.to_be_bytes());
        input
    }

    /// What finds the counter's objects, and what each is made with (with its value). Private:
    /// a public object under the label, which anyone may make without logging in, is not one.
    fn template(&self) -> Vec<Attribute> {
        vec![
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Label(self.label.as_bytes().to_vec()),
            Attribute::Application(APPLICATION.to_vec()),
        ]
    }

    /// Every object of the counter, with the count it holds if keyhold made it.
    fn objects(
        &self,
        session: &Session,
    ) -> std::result::Result<Vec<(ObjectHandle, Option<u64>)>, cryptoki::error::Error> {
        use cryptoki::object::AttributeType;
        let mut out = Vec::new();
        for handle in session.find_objects(&self.template())? {
            let attributes = session.get_attributes(handle, &[AttributeType::Value])?;
            let count = attributes.iter().find_map(|a| match a {
                Attribute::Value(v) => self.count_of(v),
                _ => None,
            });
            out.push((handle, count));
        }
        Ok(out)
    }

    /// Makes the object for `count`.
    fn make(
        &self,
        session: &Session,
        count: u64,
    ) -> std::result::Result<(), cryptoki::error::Error> {
        let mut template = self.template();
        template.push(Attribute::Value(self.value(count)));
        session.create_object(&template).map(|_| ())
    }
}

impl Counter for TokenCounter {
    fn describe(&self) -> String {
        format!(
            "the counter object `{}` on {} (backend `{}`)",
            self.label,
            self.backend.token_name(),
            self.backend.name
        )
    }

    fn at(&self) -> CounterAt {
        CounterAt::Token
    }

    fn gone_how(&self) -> &'static str {
        "its objects were destroyed by someone logged in to the token, or the token was \
         initialised again"
    }

    fn foreign_how(&self) -> &'static str {
        "objects under its label that keyhold did not make for this store: no valid MAC under \
         the store's root"
    }

    fn read(&self) -> Result<CounterValue> {
        let objects = self
            .backend
            .run("read the store's counter (C_FindObjects)", |_, session| {
                self.objects(session)
            })?;
        Ok(match objects.iter().filter_map(|(_, c)| *c).max() {
            Some(count) => CounterValue::Count(count),
            None if objects.is_empty() => CounterValue::Absent,
            // Objects under the label, none of them keyhold's for this store.
            None => CounterValue::Foreign,
        })
    }

    fn create(&self) -> Result<()> {
        self.backend
            .run("make the store's counter (C_CreateObject)", |_, session| {
                self.make(session, 0)
            })
    }

    fn increment(&self) -> Result<()> {
        let CounterValue::Count(count) = self.read()? else {
            return Err(crate::Error::StoreTampered {
                what: format!("{} vanished or was replaced", self.describe()),
            });
        };
        let next = count
            .checked_add(1)
            .ok_or_else(|| crate::Error::StoreTampered {
                what: format!("{} is at the largest count there is", self.describe()),
            })?;
        // The next count first, then the older ones: a crash in between leaves both, and the
        // higher is the value. Done again after a lost session, the same count is made twice,
        // which reads the same.
        self.backend.run(
            "advance the store's counter (C_CreateObject)",
            |_, session| {
                self.make(session, next)?;
                for (handle, held) in self.objects(session)? {
                    if held.is_some_and(|c| c < next) {
                        session.destroy_object(handle)?;
                    }
                }
                Ok(())
            },
        )
    }
}
