//! `doctor`: where the store and the devices disagree, and what could not be checked.

use crate::backend::{BackendReport, Capabilities, DeviceObject};
use crate::error::{Error, Result};
use crate::key::{Algorithm, KeyState};

use super::resolve::Resolved;
use super::{KeyInfo, Keystore};

/// How many bytes a keyhold locator of a device object decodes to: 8 bytes of the store ID, then
/// 8 random bytes (`CKA_ID`).
const LOCATOR_BYTES: usize = 16;

/// What `doctor` found: each backend's state, and where the store and the devices disagree.
#[derive(Debug)]
pub struct Doctor {
    /// Every backend, `software` first.
    pub backends: Vec<BackendHealth>,
    /// Key objects of this store on a device that no record names: left by a crash between
    /// generation and recording. Remove them with [`Keystore::remove_orphan`].
    pub orphans: Vec<Orphan>,
    /// Objects on the devices that belong to other stores or applications (never touched).
    pub foreign_objects: usize,
    /// Records some of whose key objects are not on their device (token re-initialised or
    /// objects deleted).
    pub missing: Vec<MissingKey>,
    /// Records whose objects could not be looked for: their backend is not in the configuration,
    /// is unavailable, or could not list its objects. Not known to be fine.
    pub unchecked: Vec<UncheckedKey>,
}

impl Doctor {
    /// Whether a configured backend could not be reached or could not say what it can make.
    pub fn backend_unavailable(&self) -> bool {
        self.backends
            .iter()
            .any(|b| b.report.is_err() || b.capabilities.is_err())
    }

    /// Whether the store and the devices disagree: objects missing or orphaned.
    pub fn disagrees(&self) -> bool {
        !self.missing.is_empty() || !self.orphans.is_empty()
    }

    /// Whether everything was checked and found as recorded.
    pub fn healthy(&self) -> bool {
        !self.disagrees() && !self.backend_unavailable() && self.unchecked.is_empty()
    }
}

/// One backend as `doctor` sees it.
#[derive(Debug)]
pub struct BackendHealth {
    /// The backend's name.
    pub name: String,
    /// Its report, or why there is none.
    pub report: Result<BackendReport>,
    /// What it can create, or why that is unknown.
    pub capabilities: Result<Capabilities>,
}

/// A device object no record names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    /// The backend holding it.
    pub backend: String,
    /// Its locator.
    pub locator: String,
    /// Its label on the device.
    pub label: String,
}

/// A recorded key one of whose versions lacks some of the objects it needs on its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingKey {
    /// The key.
    pub key: KeyInfo,
    /// The version whose objects are absent.
    pub version: u32,
    /// The object classes it needs that are not on the device (`private key`, `public key`,
    /// `secret key`).
    pub absent: Vec<&'static str>,
}

/// A recorded key whose objects `doctor` could not look for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UncheckedKey {
    /// The key.
    pub key: KeyInfo,
    /// Why it was not checked.
    pub reason: String,
}

/// The object classes a key of `algorithm` needs on its device: both halves of a key pair (the
/// public half gives the public key and verification), the one secret object otherwise.
fn needed_objects(algorithm: Algorithm) -> &'static [&'static str] {
    match algorithm {
        Algorithm::Aes256Gcm | Algorithm::HmacSha256 => &["secret key"],
        _ => &["private key", "public key"],
    }
}

/// Whether a locator is written exactly as keyhold writes it: lowercase hex of
/// [`LOCATOR_BYTES`] bytes. Anything else (uppercase digits, other lengths) would name the same
/// object under another spelling and slip past a string comparison.
fn canonical_locator(locator: &str) -> Option<Vec<u8>> {
    let bytes = crate::hex::decode(locator)?;
    (bytes.len() == LOCATOR_BYTES && crate::hex::encode(&bytes) == locator).then_some(bytes)
}

/// Whether two locators name the same object: equal bytes, whatever the spelling.
fn same_object(a: &str, b: &str) -> bool {
    match (crate::hex::decode(a), crate::hex::decode(b)) {
        (Some(a), Some(b)) => a == b,
        _ => a == b,
    }
}

impl Keystore {
    /// Checks every backend and compares the store's records with what the devices hold: a key
    /// pair needs its private and public objects, a symmetric key its secret object. Keys whose
    /// backend is not configured, unavailable, or cannot list its objects are reported as
    /// unchecked.
    ///
    /// # Errors
    /// [`Error::Integrity`] if a record fails its MAC; backend failures are reported per backend.
    pub fn doctor(&self) -> Result<Doctor> {
        let records = self.all_verified()?;
        let sealer_key = self.sealer_key_locator();
        let mut doctor = Doctor {
            backends: Vec::new(),
            orphans: Vec::new(),
            foreign_objects: 0,
            missing: Vec::new(),
            unchecked: Vec::new(),
        };
        let ours = self.object_prefix();
        for backend in &self.backends {
            let name = backend.name();
            let report = backend.report();
            // Tombstones have nothing left to check.
            let of_backend = || {
                records
                    .iter()
                    .filter(|r| r.record.backend == name && !r.material_destroyed())
            };
            match &report {
                Ok(BackendReport {
                    objects: Some(objects),
                    ..
                }) => {
                    // Whatever backend a record names: two configured backends may be the same
                    // token (one per PIN source), and a locator (store prefix + 8 random bytes)
                    // names one object of this store wherever it is reached from.
                    let recorded = |locator: &str| {
                        records
                            .iter()
                            .flat_map(Resolved::materials)
                            .any(|m| same_object(m.locator, locator))
                            || sealer_key
                                .as_ref()
                                .is_some_and(|(_, l)| same_object(l, locator))
                    };
                    doctor.foreign_objects += objects
                        .iter()
                        .filter(|o| !o.locator.starts_with(&ours))
                        .count();
                    let orphans = objects
                        .iter()
                        .filter(|o| o.locator.starts_with(&ours) && !recorded(&o.locator));
                    for object in orphans {
                        doctor.orphans.push(Orphan {
                            backend: name.to_owned(),
                            locator: object.locator.clone(),
                            label: object.label.clone(),
                        });
                    }
                    // A key being destroyed may already lack objects: that is no loss.
                    let live = of_backend().filter(|r| r.state != KeyState::Destroyed);
                    for r in live {
                        for material in r.materials() {
                            let absent = absent_objects(r, material.locator, objects);
                            if !absent.is_empty() {
                                doctor.missing.push(MissingKey {
                                    key: self.info(r)?,
                                    version: material.version,
                                    absent,
                                });
                            }
                        }
                    }
                }
                // A token that holds keys but could not list them says so in its details.
                Ok(report) if report.kind == "pkcs11" => {
                    for r in of_backend() {
                        doctor.unchecked.push(UncheckedKey {
                            key: self.info(r)?,
                            reason: format!("backend `{name}` could not list its objects"),
                        });
                    }
                }
                // Software and TPM keys live in their records: nothing on a device to miss.
                Ok(_) => {}
                Err(e) => {
                    for r in of_backend() {
                        doctor.unchecked.push(UncheckedKey {
                            key: self.info(r)?,
                            reason: format!("backend unavailable: {e}"),
                        });
                    }
                }
            }
            doctor.backends.push(BackendHealth {
                name: name.to_owned(),
                capabilities: backend.capabilities(),
                report,
            });
        }
        for r in records.iter().filter(|r| !r.material_destroyed()) {
            let backend = &r.record.backend;
            if !self.backends.iter().any(|b| b.name() == backend) {
                doctor.unchecked.push(UncheckedKey {
                    key: self.info(r)?,
                    reason: format!("backend `{backend}` is not in the configuration"),
                });
            }
        }
        Ok(doctor)
    }

    /// Destroys the device objects at `locator` in `backend`, which no record may name.
    /// `locator` must be written as `doctor` lists it (32 lowercase hex digits).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if `locator` is not canonical, not of this store, or a record (or
    /// the sealer) uses that object; backend errors.
    pub fn remove_orphan(&self, backend: &str, locator: &str) -> Result<()> {
        let Some(bytes) = canonical_locator(locator) else {
            return Err(Error::InvalidInput(format!(
                "`{locator}` is not a locator as keyhold writes them ({} lowercase hex digits): \
                 copy it from `keyhold doctor`",
                LOCATOR_BYTES * 2
            )));
        };
        if !locator.starts_with(&self.object_prefix()) {
            return Err(Error::InvalidInput(format!(
                "object {locator} in backend `{backend}` does not belong to this store: \
                 keyhold removes only its own objects"
            )));
        }
        // Compared as bytes: a record's locator in another spelling is still the same object.
        // And whatever backend the record or the sealer names: two configured backends may reach
        // the same token, and a locator names one object of this store wherever it is.
        let names = |recorded: &str| crate::hex::decode(recorded).is_some_and(|r| r == bytes);
        if self.sealer_key_locator().is_some_and(|(_, l)| names(&l)) {
            return Err(Error::InvalidInput(format!(
                "object {locator} in backend `{backend}` is the key sealing this store's root \
                 secret: it is not an orphan, and destroying it would lose the whole store"
            )));
        }
        let versions = self.store.versions(None)?;
        let used = self
            .store
            .keys(None)?
            .into_iter()
            .filter(|r| r.destroyed_at.is_none())
            .any(|r| names(&r.locator))
            || versions.iter().any(|v| names(&v.locator));
        if used {
            return Err(Error::InvalidInput(format!(
                "object {locator} in backend `{backend}` belongs to a key of this store: \
                 it is not an orphan"
            )));
        }
        self.backend(backend)?.destroy_object(locator)?;
        tracing::info!(backend, locator, "removed an orphaned device object");
        Ok(())
    }
}

/// The object classes the version of `record` at `locator` needs that `objects` lack.
fn absent_objects(record: &Resolved, locator: &str, objects: &[DeviceObject]) -> Vec<&'static str> {
    let present: Vec<&str> = objects
        .iter()
        .filter(|o| same_object(&o.locator, locator))
        .flat_map(|o| o.kind.split(", "))
        .collect();
    needed_objects(record.spec.algorithm())
        .iter()
        .copied()
        .filter(|class| !present.contains(class))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_locators_are_accepted() {
        let canonical = "0123456789abcdef0123456789abcdef";
        assert!(canonical_locator(canonical).is_some());
        for other in [
            "0123456789ABCDEF0123456789abcdef",
            "0123456789abcdef0123456789abcdeF",
            "0123456789abcdef0123456789abcd",
            "0123456789abcdef0123456789abcdef00",
            "",
            "+123456789abcdef0123456789abcdef",
        ] {
            assert_eq!(canonical_locator(other), None, "{other}");
        }
        assert!(same_object(canonical, &canonical.to_uppercase()));
    }
}
