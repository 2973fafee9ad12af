//! Finding a key's objects on the token: only objects that still match how keyhold made them
//! (M4), cached handles re-checked after errors, and their removal.

use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::template::Expected;
use super::{Pkcs11Backend, EXTRACTABLE_BLOB, IMPORTED_BLOB};
use crate::backend::KeyRef;
use crate::error::{Error, Result};

pub(super) fn class_key(class: ObjectClass) -> u64 {
    if class == ObjectClass::PRIVATE_KEY {
        1
    } else if class == ObjectClass::SECRET_KEY {
        2
    } else {
        3
    }
}

pub(super) fn locator_bytes(locator: &str) -> Result<Vec<u8>> {
    crate::hex::decode(locator)
        .filter(|id| id.len() == 16)
        .ok_or_else(|| Error::Integrity {
            what: format!("PKCS#11 locator `{locator}` is not 32 hex digits"),
        })
}

/// How the objects of `key` must look on the token, from its spec and its recorded blob.
pub(super) fn expected(key: &KeyRef<'_>) -> Result<Expected> {
    let extractable = match key.blob {
        None => false,
        Some(EXTRACTABLE_BLOB) => true,
        Some(IMPORTED_BLOB) => return Ok(Expected::imported(key.context.spec)),
        Some(_) => {
            return Err(Error::Integrity {
                what: format!(
                    "the record of `{}` holds a blob the PKCS#11 backend did not write",
                    key.context.label
                ),
            })
        }
    };
    Ok(Expected::new(key.context.spec, extractable))
}

impl Pkcs11Backend {
    /// The handle of the object with `id` and `class` that matches what keyhold made (see
    /// [`Expected::find_template`]), from the cache or `C_FindObjects`; `None` when the token has
    /// no such object, or several.
    pub(super) fn find(
        &self,
        session: &Session,
        id: &[u8],
        class: ObjectClass,
        expected: &Expected,
    ) -> std::result::Result<Option<ObjectHandle>, cryptoki::error::Error> {
        let key = (id.to_vec(), class_key(class));
        if let Some(&h) = self.handles().get(&key) {
            return Ok(Some(h));
        }
        let found = session.find_objects(&expected.find_template(id, class))?;
        match found.as_slice() {
            [h] => {
                self.handles().insert(key, *h);
                Ok(Some(*h))
            }
            [] => Ok(None),
            several => {
                tracing::error!(
                    backend = %self.name,
                    locator = %crate::hex::encode(id),
                    count = several.len(),
                    "several token objects share this key's CKA_ID: using none of them"
                );
                Ok(None)
            }
        }
    }

    /// [`Self::find`] for an object that must exist: absence is reported as an invalid key handle
    /// (the PKCS#11 error for using a key that is not there), and flagged in `absent`.
    pub(super) fn find_required(
        &self,
        session: &Session,
        id: &[u8],
        class: ObjectClass,
        expected: &Expected,
        absent: &std::cell::Cell<bool>,
    ) -> std::result::Result<ObjectHandle, cryptoki::error::Error> {
        use cryptoki::context::Function;
        use cryptoki::error::{Error as CkError, RvError};
        use cryptoki::session::SessionState;
        if let Some(handle) = self.find(session, id, class, expected)? {
            absent.set(false);
            return Ok(handle);
        }
        // Private objects are invisible to a session that is no longer logged in (someone called
        // C_Logout): that is a lost login, to recover from, not a missing key.
        let state = session.get_session_info()?.session_state();
        if !matches!(state, SessionState::RoUser | SessionState::RwUser) {
            return Err(CkError::Pkcs11(
                RvError::UserNotLoggedIn,
                Function::FindObjects,
            ));
        }
        absent.set(true);
        Err(CkError::Pkcs11(
            RvError::KeyHandleInvalid,
            Function::FindObjects,
        ))
    }

    pub(super) fn with_key<T>(
        &self,
        key: &KeyRef<'_>,
        operation: &str,
        op: impl FnMut(&Session, ObjectHandle) -> std::result::Result<T, cryptoki::error::Error>,
    ) -> Result<T> {
        let id = locator_bytes(key.locator)?;
        let expected = expected(key)?;
        self.with_object(
            &id,
            expected.secret_class(),
            &expected,
            key.context.label,
            operation,
            op,
        )
    }

    /// Runs `op` on the object `id` of `class` (of the key labelled `label`); a missing object is
    /// reported as such, one that does not match its record as that, and either as the token
    /// having gone when it has.
    pub(super) fn with_object<T>(
        &self,
        id: &[u8],
        class: ObjectClass,
        expected: &Expected,
        label: &str,
        operation: &str,
        mut op: impl FnMut(&Session, ObjectHandle) -> std::result::Result<T, cryptoki::error::Error>,
    ) -> Result<T> {
        // Set when the token has no object for the key (not merely a stale cached handle).
        let absent = std::cell::Cell::new(false);
        let result = self.run(operation, |me, session| {
            let handle = me.find_required(session, id, class, expected, &absent)?;
            op(session, handle)
        });
        match result {
            Err(Error::Backend { .. }) if absent.get() => {
                // As in `failure`: asking takes the module's turn.
                crate::keystore::may_wait("ask whether the token is still there")?;
                if !self.pool.token_present() {
                    return Err(self.gone());
                }
                if let Some(reason) = self.mismatch(id, class, expected)? {
                    return Err(Error::KeyObjectMismatch {
                        backend: self.name.clone(),
                        key: label.to_owned(),
                        reason,
                    });
                }
                Err(Error::BackendUnavailable {
                    backend: self.name.clone(),
                    reason: format!(
                        "the key object {} is not on the token (was the token re-initialised?)",
                        crate::hex::encode(id)
                    ),
                })
            }
            // Stopped where it would have waited: the handle is as good as it was.
            Err(e) if crate::keystore::would_wait() => Err(e),
            Err(e) => {
                // Do not trust this key's cached handle after a failure: the next use finds (and
                // so checks) the object again.
                self.handles().retain(|(k, _), _| k != id);
                Err(e)
            }
            ok => ok,
        }
    }

    /// When no object matches what keyhold made: how the objects that carry the key's `CKA_ID`
    /// and class differ from it, if there are any.
    pub(super) fn mismatch(
        &self,
        id: &[u8],
        class: ObjectClass,
        expected: &Expected,
    ) -> Result<Option<String>> {
        let template = expected.find_template(id, class);
        let kinds: Vec<AttributeType> = template.iter().map(Attribute::attribute_type).collect();
        let found = self.run("check the key's objects (C_FindObjects)", |_, session| {
            let mut found = Vec::new();
            for handle in
                session.find_objects(&[Attribute::Id(id.to_vec()), Attribute::Class(class)])?
            {
                found.push(session.get_attributes(handle, &kinds)?);
            }
            Ok(found)
        })?;
        if found.is_empty() {
            return Ok(None);
        }
        if found.len() > 1 {
            return Ok(Some(format!(
                "{} objects carry its CKA_ID {}",
                found.len(),
                crate::hex::encode(id)
            )));
        }
        let differs: Vec<String> = template
            .iter()
            .filter(|want| !found[0].iter().any(|got| got == *want))
            .map(|want| format!("{}", want.attribute_type()))
            .collect();
        Ok(Some(format!(
            "the object with its CKA_ID {} differs in {}",
            crate::hex::encode(id),
            differs.join(", ")
        )))
    }

    pub(super) fn destroy_objects(&self, id: &[u8]) -> Result<()> {
        self.run("destroy key objects (C_DestroyObject)", |_, session| {
            for handle in session.find_objects(&[Attribute::Id(id.to_vec())])? {
                session.destroy_object(handle)?;
            }
            Ok(())
        })?;
        self.handles().retain(|(k, _), _| k != id);
        Ok(())
    }
}
