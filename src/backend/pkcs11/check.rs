//! `store verify`'s look at one key's objects: present, one of each, and as keyhold made them.

use cryptoki::object::ObjectClass;

use super::objects::{expected, locator_bytes};
use super::Pkcs11Backend;
use crate::backend::KeyRef;
use crate::error::{Error, Result};

/// What `store verify` calls each object class.
fn class_name(class: ObjectClass) -> &'static str {
    if class == ObjectClass::PRIVATE_KEY {
        "private key"
    } else if class == ObjectClass::SECRET_KEY {
        "secret key"
    } else {
        "public key"
    }
}

impl Pkcs11Backend {
    /// Looks for each object the key needs (both halves of a key pair, the one secret object
    /// otherwise) with the template every use insists on (`Expected::find_template`): exactly
    /// one must match. Asked of the token afresh, never from the handle cache, which would still
    /// hold the handle of an object deleted behind keyhold's back.
    pub(super) fn check_objects(&self, key: &KeyRef<'_>) -> Result<()> {
        let id = locator_bytes(key.locator)?;
        let expected = expected(key)?;
        let classes: &[ObjectClass] = if key.context.spec.key_type().is_asymmetric() {
            &[ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY]
        } else {
            &[ObjectClass::SECRET_KEY]
        };
        let counts = self.run("check the key's objects (C_FindObjects)", |_, session| {
            classes
                .iter()
                .map(|&class| {
                    session
                        .find_objects(&expected.find_template(&id, class))
                        .map(|found| found.len())
                })
                .collect::<std::result::Result<Vec<usize>, _>>()
        })?;
        let mut problems = Vec::new();
        for (&class, count) in classes.iter().zip(counts) {
            match count {
                1 => {}
                0 => problems.push(match self.mismatch(&id, class, &expected)? {
                    Some(reason) => format!("its {}: {reason}", class_name(class)),
                    None => format!("its {} object is not on the token", class_name(class)),
                }),
                several => problems.push(format!(
                    "{several} {} objects match its CKA_ID {}: keyhold uses none of them",
                    class_name(class),
                    crate::hex::encode(&id)
                )),
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(Error::KeyObjectMismatch {
            backend: self.name.clone(),
            key: key.context.label.to_owned(),
            reason: problems.join("; "),
        })
    }
}
