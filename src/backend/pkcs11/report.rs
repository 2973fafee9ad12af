//! What `keyhold doctor` shows of a token.

use cryptoki::object::{Attribute, AttributeType, ObjectClass};

use super::{errors, Pkcs11Backend, OAEP_UNKNOWN};
use crate::backend::{BackendReport, DeviceObject};
use crate::error::Result;
use crate::key::Purpose;

impl Pkcs11Backend {
    /// What `doctor` shows: module, token, sessions, PIN flags, and the key objects on the token.
    pub(super) fn describe(&self) -> Result<BackendReport> {
        let module = self.pool.module();
        let mut details = vec![("module".to_owned(), self.module_path.display().to_string())];
        if let Ok(info) = module.pkcs11().get_library_info() {
            details.push((
                "library".into(),
                format!(
                    "{} ({}), PKCS#11 {}",
                    info.library_description().trim_end(),
                    info.manufacturer_id().trim_end(),
                    info.cryptoki_version()
                ),
            ));
        }
        let slot = self.pool.slot()?;
        let info = module
            .token_info(slot)
            .map_err(|e| errors::map(&self.name, "read token info (C_GetTokenInfo)", e))?;
        details.push((
            "token".into(),
            format!(
                "`{}` serial {} ({} {})",
                info.label, info.serial, info.manufacturer, info.model
            ),
        ));
        details.push((
            "sessions".into(),
            format!(
                "token allows {}, keyhold opens at most {}",
                info.max_sessions,
                self.pool.effective_max(slot)
            ),
        ));
        if let Ok((supported, _)) = self.mechanism_capabilities() {
            let learned = self.learned();
            let oaep = match learned.iter().find(|(_, p, _)| *p == Purpose::Decrypt) {
                Some((_, _, why)) => Some(why.clone()),
                None => supported
                    .iter()
                    .any(|(_, p)| *p == Purpose::Decrypt)
                    .then(|| OAEP_UNKNOWN.to_owned()),
            };
            drop(learned);
            if let Some(oaep) = oaep {
                details.push(("RSA-OAEP with SHA-256".into(), oaep));
            }
        }
        let mut pin = Vec::new();
        for (flag, text) in [
            (info.user_pin_initialized(), "initialised"),
            (
                info.user_pin_count_low(),
                "COUNT_LOW (a wrong PIN was entered)",
            ),
            (
                info.user_pin_final_try(),
                "FINAL_TRY (one more wrong PIN locks it)",
            ),
            (info.user_pin_locked(), "LOCKED (unlock with the SO PIN)"),
            (info.user_pin_to_be_changed(), "TO_BE_CHANGED"),
            (
                info.protected_authentication_path(),
                "PROTECTED_AUTHENTICATION_PATH (entered on the device)",
            ),
        ] {
            if flag {
                pin.push(text);
            }
        }
        details.push(("user PIN".into(), pin.join(", ")));
        if let Some(clock) = info.clock() {
            // Kept as the token gives it: openCryptoki's is not the YYYYMMDDhhmmss00 it should be.
            details.push(("token clock".into(), clock));
        }
        let raw = self.run("list objects (C_FindObjects)", |_, session| {
            let mut found = Vec::new();
            for handle in session.find_objects(&[])? {
                let wanted = [
                    AttributeType::Id,
                    AttributeType::Label,
                    AttributeType::Class,
                ];
                // One object the token cannot read whole (SoftHSM 2.6 leaves one half-written
                // when a process is killed while it rewrites the object's file) must not hide
                // the others: it is listed with what can be read of it, its ID if anything.
                let attrs = match session.get_attributes(handle, &wanted) {
                    Ok(attrs) => attrs,
                    Err(e) => {
                        let id = session
                            .get_attributes(handle, &[AttributeType::Id])
                            .unwrap_or_default();
                        let mut attrs = id;
                        attrs.push(Attribute::Label(format!("(unreadable: {e})").into_bytes()));
                        attrs
                    }
                };
                let (mut id, mut label, mut class) = (Vec::new(), String::new(), String::new());
                for attr in attrs {
                    match attr {
                        Attribute::Id(v) => id = v,
                        Attribute::Label(v) => label = String::from_utf8_lossy(&v).into_owned(),
                        Attribute::Class(c) => {
                            class = if c == ObjectClass::PRIVATE_KEY {
                                "private key".into()
                            } else if c == ObjectClass::PUBLIC_KEY {
                                "public key".into()
                            } else if c == ObjectClass::SECRET_KEY {
                                "secret key".into()
                            } else {
                                format!("{c}")
                            }
                        }
                        _ => {}
                    }
                }
                found.push((crate::hex::encode(&id), label, class));
            }
            Ok(found)
        });
        details.push((
            "logins by this backend".into(),
            self.login_attempts().to_string(),
        ));
        let raw = match raw {
            Ok(raw) => raw,
            Err(e) => {
                // Token facts need no login: show them even when listing objects failed.
                let source = std::error::Error::source(&e)
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default();
                details.push((
                    "key objects".into(),
                    format!("cannot be listed: {e}{source}"),
                ));
                return Ok(BackendReport {
                    kind: "pkcs11".into(),
                    details,
                    objects: None,
                });
            }
        };
        let mut objects: Vec<DeviceObject> = Vec::new();
        for (locator, label, kind) in raw {
            match objects.iter_mut().find(|o| o.locator == locator) {
                Some(o) => {
                    o.kind.push_str(", ");
                    o.kind.push_str(&kind);
                }
                None => objects.push(DeviceObject {
                    locator,
                    label,
                    kind,
                }),
            }
        }
        objects.sort_by(|a, b| a.label.cmp(&b.label).then(a.locator.cmp(&b.locator)));
        Ok(BackendReport {
            kind: "pkcs11".into(),
            details,
            objects: Some(objects),
        })
    }
}
