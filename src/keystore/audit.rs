//! The keystore's audit log (`STORE_DIR/audit.log`): what each operation records, and reading
//! the log back. The log itself, its chain and its durability window are [`crate::audit`]'s.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use super::resolve::Resolved;
use super::root::DerivedKeys;
use super::{KeyRequest, Keystore};
use crate::audit::{self, AuditLog, AuditSink, Caller, KeyUse, Record};
use crate::config::AuditConfig;
use crate::error::{Error, Result};

/// The most keys whose shared ID and namespace are kept; past it the map starts over.
const NAMES_LIMIT: usize = 4096;

/// The sink, a reader of the same log (which reads even with recording turned off), and each
/// used key's ID and namespace as shared strings, so that recording a use neither re-issues the
/// ID (an HMAC) nor copies it.
#[derive(Debug)]
pub(super) struct KeystoreAudit {
    sink: AuditSink,
    reader: AuditLog,
    names: RwLock<HashMap<[u8; 16], Names>>,
}

#[derive(Debug, Clone)]
struct Names {
    id: Arc<str>,
    namespace: Arc<str>,
}

impl KeystoreAudit {
    /// The audit log of the store in `dir`, MAC'd under the root-derived audit key.
    pub(super) fn new(
        dir: &Path,
        keys: &DerivedKeys,
        config: &AuditConfig,
        anchor: Option<crate::store::FileAnchor>,
    ) -> Self {
        let path = dir.join(audit::FILE);
        let sink = if config.enabled {
            AuditSink::open_anchored(
                AuditLog::new(&path, &keys.audit_mac),
                Caller::this_process(),
                Duration::from_millis(config.flush_ms),
                anchor,
            )
        } else {
            AuditSink::disabled()
        };
        Self {
            sink,
            reader: AuditLog::new(&path, &keys.audit_mac),
            names: RwLock::new(HashMap::new()),
        }
    }
}

/// The audit log's name of a key's history event: what was done, as the operations are named.
fn lifecycle_name(event: &'static str) -> &'static str {
    match event {
        "created" => "create",
        "imported" => "import",
        "rotated" => "rotate",
        "suspended" => "suspend",
        "resumed" => "resume",
        "deactivated" => "deactivate",
        "compromised" => "compromise",
        "activated" => "activate",
        "expired" => "expire",
        "policy-changed" => "set-policy",
        "destroy-scheduled" => "schedule-destroy",
        "destroy-cancelled" => "cancel-destroy",
        "destroying" => "begin-destroy",
        "destroyed" => "destroy",
        other => other,
    }
}

/// The audit log's name of a keystore operation (the keystore names some for its messages).
fn operation_name(operation: &'static str) -> &'static str {
    match operation {
        "compute a MAC" => "mac",
        "check a MAC" => "mac-verify",
        "make a data key" => "datakey",
        "make a wrapped data key" => "datakey-wrapped",
        other => other,
    }
}

impl Keystore {
    /// Checks the whole audit log (after writing the key uses this keystore buffered): every
    /// entry's MAC, and the chain.
    ///
    /// # Errors
    /// [`Error::Integrity`] naming the first line that fails; [`Error::Io`].
    ///
    /// The log must hold the entries recorded outside it: the last lifecycle change's entry, in
    /// the store's committed state (anchored like the store's generation), and the last entry
    /// written, in the anchor file (a tripwire). A log whose end was cut off is refused
    /// ([`Error::StoreTampered`]).
    pub fn verify_audit(&self) -> Result<audit::Verified> {
        self.audit_sink().flush()?;
        let committed = self.store.committed_audit_head()?;
        self.verify_audit_through(committed, self.store.anchor())
    }

    /// The audit log verified through `committed` (the last entry the store's state records)
    /// and, where it records a later one, through the last entry `anchor` records: a log whose
    /// end was cut off is refused ([`Error::StoreTampered`]).
    pub(super) fn verify_audit_through(
        &self,
        committed: Option<audit::Head>,
        anchor: Option<&crate::store::FileAnchor>,
    ) -> Result<audit::Verified> {
        let verified = self.audit.reader.verify_through(committed)?;
        let anchored = anchor
            .and_then(|a| a.read_audit().ok().flatten())
            .filter(|a| committed.is_none_or(|c| a.seq > c.seq));
        if anchored.is_some() {
            return self.audit.reader.verify_through(anchored);
        }
        Ok(verified)
    }

    /// Every entry of the audit log, in order, each checked by its MAC (after writing the key
    /// uses this keystore buffered). [`Self::verify_audit`] checks the chain.
    ///
    /// # Errors
    /// As [`Self::verify_audit`].
    pub fn audit_entries(&self) -> Result<Vec<audit::Entry>> {
        self.audit.sink.flush()?;
        self.audit.reader.entries()
    }

    /// The entries of the key `id` (a genuine ID: it is authenticated first, but the key may be
    /// gone), in order.
    ///
    /// # Errors
    /// [`Error::KeyIdAuthentication`]; as [`Self::audit_entries`].
    pub fn audit_entries_of_key(&self, id: &str) -> Result<Vec<audit::Entry>> {
        self.ids.decode(id)?;
        let mut entries = self.audit_entries()?;
        entries.retain(|e| e.key_id.as_deref() == Some(id));
        Ok(entries)
    }

    /// Records a change of the store as a whole (`store-backup`, `store-restore`, `store-reseal`,
    /// `store-recover`, `store-reanchor`), synchronously.
    ///
    /// # Errors
    /// As [`AuditSink::lifecycle`].
    pub(super) fn audit_store_event(&self, operation: &'static str) -> Result<()> {
        self.audit
            .sink
            .lifecycle(Record {
                operation,
                key_id: None,
                version: None,
                namespace: None,
                outcome: "ok",
                client: crate::audit::current_client().as_deref(),
            })
            .map(drop)
    }

    /// The sink lifecycle changes are recorded through.
    pub(crate) fn audit_sink(&self) -> &AuditSink {
        &self.audit.sink
    }

    /// Records a use of `resolved` with `version` (buffered: see [`AuditSink::key_use`]).
    pub(super) fn audit_use(
        &self,
        resolved: &Resolved,
        operation: &'static str,
        version: Option<u32>,
        outcome: &'static str,
    ) {
        if !self.audit.sink.is_enabled() {
            return;
        }
        let names = self.names_of(resolved);
        self.audit.sink.key_use(KeyUse {
            operation: operation_name(operation),
            key_id: names.as_ref().map(|n| Arc::clone(&n.id)),
            version,
            namespace: names.map(|n| n.namespace),
            outcome,
            client: crate::audit::current_client(),
        });
    }

    /// Records that a service refused its client `operation` on the key `id` before anything
    /// about the key was looked up (`outcome`: the refusal's code, `forbidden`, `no_such_key`,
    /// …), buffered as key uses are. The key's ID and namespace are written only if the ID is
    /// genuine. Runs on behalf of the client ([`crate::audit::on_behalf_of`]), who is named.
    pub fn audit_refusal(&self, operation: &'static str, id: &str, outcome: &'static str) {
        if !self.audit.sink.is_enabled() {
            return;
        }
        let genuine = self.ids.decode(id).ok();
        self.audit.sink.key_use(KeyUse {
            operation,
            key_id: genuine.as_ref().map(|_| Arc::from(id)),
            version: None,
            namespace: genuine.map(|f| Arc::from(f.namespace.as_str())),
            outcome,
            client: crate::audit::current_client(),
        });
    }

    /// Records that a service refused its client the making of a key (`operation`: `create` or
    /// `import`) in `namespace` before the keystore was asked (`outcome`: the refusal's code),
    /// as [`Self::audit_refusal`] records a refused use.
    pub fn audit_new_key_refusal(
        &self,
        operation: &'static str,
        namespace: &str,
        outcome: &'static str,
    ) {
        if !self.audit.sink.is_enabled() {
            return;
        }
        let namespace = crate::key::validate_name("namespace", namespace)
            .ok()
            .map(|()| Arc::from(namespace));
        self.audit.sink.key_use(KeyUse {
            operation,
            key_id: None,
            version: None,
            namespace,
            outcome,
            client: crate::audit::current_client(),
        });
    }

    /// Whether the audit log's backlog is such that the next key use may be written by its
    /// caller ([`crate::audit::AuditSink::backlogged`]).
    pub(super) fn audit_backlogged(&self) -> bool {
        self.audit.sink.backlogged()
    }

    /// Records a use of `operation` that went nowhere because `id` did not resolve: with the
    /// key's ID only if the ID is genuine (one that failed authentication is never written).
    pub(super) fn audit_refused(&self, id: &str, operation: &'static str, error: &Error) {
        if !self.audit.sink.is_enabled() {
            return;
        }
        let genuine = self.ids.decode(id).ok();
        self.audit.sink.key_use(KeyUse {
            operation: operation_name(operation),
            key_id: genuine.as_ref().map(|_| Arc::from(id)),
            version: None,
            namespace: genuine.map(|f| Arc::from(f.namespace.as_str())),
            outcome: error.kind(),
            client: crate::audit::current_client(),
        });
    }

    /// Records a lifecycle change of `changed` (the key as it now is), synchronously: the caller
    /// writes it before committing the change, so that no change the log does not show is made.
    pub(super) fn audit_lifecycle(
        &self,
        changed: &Resolved,
        event: &'static str,
    ) -> Result<Option<audit::Head>> {
        if !self.audit.sink.is_enabled() {
            return Ok(None);
        }
        let names = self.names_of(changed);
        self.audit.sink.lifecycle(Record {
            operation: lifecycle_name(event),
            key_id: names.as_ref().map(|n| &*n.id),
            version: Some(changed.record.version),
            namespace: Some(&changed.record.namespace),
            outcome: "ok",
            client: crate::audit::current_client().as_deref(),
        })
    }

    /// Records a creation that failed.
    pub(super) fn audit_create_failed(&self, request: &KeyRequest, error: &Error) {
        self.audit_new_key_failed("create", request, error);
    }

    /// Records a creation or import (`operation`) that failed.
    pub(super) fn audit_new_key_failed(
        &self,
        operation: &'static str,
        request: &KeyRequest,
        error: &Error,
    ) {
        let namespace = crate::key::validate_name("namespace", &request.namespace)
            .ok()
            .map(|()| request.namespace.as_str());
        self.record_failure(operation, None, namespace, error);
    }

    /// Records a lifecycle command on the key `id` that failed as `operation`.
    pub(super) fn audit_lifecycle_failed(&self, id: &str, operation: &'static str, error: &Error) {
        let genuine = self.ids.decode(id).ok();
        let namespace = genuine.as_ref().map(|f| f.namespace.as_str());
        self.record_failure(operation, genuine.as_ref().map(|_| id), namespace, error);
    }

    /// Records a lifecycle change that failed (the failure is what the caller gets; a log that
    /// cannot record it is reported, not returned instead).
    fn record_failure(
        &self,
        operation: &'static str,
        key_id: Option<&str>,
        namespace: Option<&str>,
        error: &Error,
    ) {
        let recorded = self.audit.sink.lifecycle(Record {
            operation,
            key_id,
            version: None,
            namespace,
            outcome: error.kind(),
            client: crate::audit::current_client().as_deref(),
        });
        if let Err(e) = recorded {
            tracing::error!("the audit log could not record a failed {operation}: {e}");
        }
    }

    /// The shared ID and namespace of `resolved`'s key, issuing the ID on first use.
    fn names_of(&self, resolved: &Resolved) -> Option<Names> {
        let uuid = resolved.record.uuid;
        let cached = self
            .audit
            .names
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&uuid)
            .cloned();
        if cached.is_some() {
            return cached;
        }
        let names = Names {
            id: Arc::from(self.info(resolved).ok()?.id),
            namespace: Arc::from(resolved.record.namespace.as_str()),
        };
        let mut map = self
            .audit
            .names
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if map.len() >= NAMES_LIMIT {
            map.clear();
        }
        map.insert(uuid, names.clone());
        Some(names)
    }
}
