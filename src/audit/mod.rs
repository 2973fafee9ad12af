//! The audit log: one JSON line per lifecycle change or key use, hash-chained and MAC'd.
//!
//! Each line is `{"entry":{…},"mac":"…"}`. The entry carries its sequence number (from 1) and the
//! SHA-256 of the whole line before it (`prev`; 32 zero bytes for the first), and the MAC is
//! HMAC-SHA256 under a key derived from the store's root secret over the entry's exact bytes. So
//! [`AuditLog::verify`] finds an entry that was edited (its MAC fails), removed or reordered (its
//! `seq` or `prev` does not follow), or forged without the root (no MAC), and names its line.
//! What it cannot find alone is the end cut off: a log that lost its last entries is a shorter
//! valid log. Anchoring the head outside the log (a TPM counter, a state file) closes that.
//!
//! Lifecycle changes are written at once ([`AuditSink::lifecycle`] returns once its entry is on
//! disk); key uses, the hot path, are buffered by [`AuditSink::key_use`] and written in batches at
//! least every window (`[audit] flush_ms`, default 1 s). So the **durability window**: key uses
//! made in the last window before a crash or `SIGKILL` may be missing from the log; lifecycle
//! changes never are, and the log keeps the order in which things happened.
//!
//! A crash or `SIGKILL` in the middle of a write can leave the last line cut short: `verify`
//! names it, and the next append drops it and records an `audit-repair` entry saying so. Appends
//! hold the file's exclusive lock and readers a shared one, so no reader sees half a batch.
//!
//! Entries hold what was done, to which key, by whom and how it ended: never key material,
//! plaintext, PINs or passphrases. The types keep it that way: an [`Event`] has no free-form
//! field but the key's ID and namespace.

mod log;
mod sink;

use serde::{Deserialize, Serialize};

pub(crate) use log::lock_exclusive;
pub use log::AuditLog;
pub use sink::{AuditSink, KeyUse, Record, DEFAULT_WINDOW};

use std::cell::RefCell;
use std::sync::Arc;

thread_local! {
    /// The service's client this thread works for, if any (see [`on_behalf_of`]).
    static CLIENT: RefCell<Option<Arc<str>>> = const { RefCell::new(None) };
}

/// Runs `f` on behalf of the service's client `client`: every audit entry `f` makes on this
/// thread names it (`"client"`). The service runs each request's keystore calls so; the keystore
/// API stays free of who asks, and an entry made outside such a call names no client.
pub fn on_behalf_of<T>(client: &Arc<str>, f: impl FnOnce() -> T) -> T {
    /// Puts back what was there when dropped, also when `f` panics.
    struct Restore(Option<Arc<str>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let before = self.0.take();
            CLIENT.with(|c| *c.borrow_mut() = before);
        }
    }
    let before = CLIENT.with(|c| c.borrow_mut().replace(Arc::clone(client)));
    let _restore = Restore(before);
    f()
}

/// The client the current thread works for ([`on_behalf_of`]), if any.
pub(crate) fn current_client() -> Option<Arc<str>> {
    CLIENT.with(|c| c.borrow().clone())
}

/// The audit log's file name in the store directory.
pub const FILE: &str = "audit.log";

/// Who asked: the process, and for the service (later) its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    /// The real user ID of the process.
    pub uid: u32,
    /// Its process ID.
    pub pid: u32,
}

impl Caller {
    /// This process.
    pub fn this_process() -> Self {
        Self {
            uid: rustix::process::getuid().as_raw(),
            pid: std::process::id(),
        }
    }
}

/// What happened, as the caller of [`AuditLog::append`] states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    /// The operation: `key.create`, `sign`, `key.destroy`, …
    pub operation: &'static str,
    /// The key's ID, if the operation was on a key.
    pub key_id: Option<&'a str>,
    /// The key version used or made, if any.
    pub version: Option<u32>,
    /// The key's namespace, if any.
    pub namespace: Option<&'a str>,
    /// `ok`, or the error's kind (`wrong_purpose`, `no_such_key`, …).
    pub outcome: &'static str,
    /// Who asked.
    pub caller: Caller,
    /// The service's client it asked for, if it asked through `keyhold serve`.
    pub client: Option<&'a str>,
}

/// An entry as written and read back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Its place in the log, from 1.
    pub seq: u64,
    /// Seconds since the Unix epoch, UTC.
    pub time: i64,
    /// See [`Event::operation`].
    pub operation: String,
    /// See [`Event::key_id`].
    pub key_id: Option<String>,
    /// See [`Event::version`].
    pub version: Option<u32>,
    /// See [`Event::namespace`].
    pub namespace: Option<String>,
    /// See [`Event::outcome`].
    pub outcome: String,
    /// See [`Event::caller`].
    pub caller: Caller,
    /// See [`Event::client`]; absent from entries made outside the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Lowercase hex SHA-256 of the whole previous line (without its newline).
    pub prev: String,
}

/// An entry as an anchor outside the log records it: its `seq` and the SHA-256 of its line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// The entry's sequence number.
    pub seq: u64,
    /// SHA-256 of its whole line.
    pub hash: [u8; 32],
}

/// What a verified log holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// How many entries, all verified.
    pub entries: u64,
    /// SHA-256 of the last line (`prev` of the next entry): what an anchor outside the log
    /// records.
    pub head: [u8; 32],
    /// Whether the file ends in a line cut short by a crash mid-write, after the entries: not an
    /// entry (nothing in it is trusted), dropped by the next append. The end of the log is not
    /// protected anyway (see the module's documentation): cutting it short says nothing more.
    pub cut_short: bool,
}

impl Entry {
    /// The entry as `keyhold audit show --json` and the service's `GET /v1/audit` give it: its
    /// time in RFC 3339 UTC.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "seq": self.seq,
            "time": crate::time::format_utc(self.time),
            "operation": self.operation,
            "key_id": self.key_id,
            "version": self.version,
            "namespace": self.namespace,
            "outcome": self.outcome,
            "caller": { "uid": self.caller.uid, "pid": self.caller.pid },
            "client": self.client,
            "prev": self.prev,
        })
    }

    /// An entry as [`Self::to_json`] gives it (a service's answer).
    ///
    /// # Errors
    /// [`crate::Error::InvalidInput`] for JSON that is not such an entry.
    pub fn from_json(value: &serde_json::Value) -> crate::Result<Self> {
        let mut value = value.clone();
        let time = value["time"]
            .as_str()
            .and_then(|t| crate::time::parse_instant(t, 0).ok())
            .ok_or_else(|| crate::Error::InvalidInput("an audit entry without its time".into()))?;
        value["time"] = time.into();
        serde_json::from_value(value)
            .map_err(|e| crate::Error::InvalidInput(format!("an audit entry: {e}")))
    }
}

impl Verified {
    /// As `keyhold audit verify --json` and the service's `POST /v1/audit/verify` say it: the
    /// head in hex.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "entries": self.entries,
            "head": crate::hex::encode(&self.head),
            "cut_short": self.cut_short,
        })
    }

    /// A verification as [`Self::to_json`] gives it.
    ///
    /// # Errors
    /// [`crate::Error::InvalidInput`] for JSON that is not one.
    pub fn from_json(value: &serde_json::Value) -> crate::Result<Self> {
        let head = value["head"]
            .as_str()
            .and_then(crate::hex::decode)
            .and_then(|h| <[u8; 32]>::try_from(h).ok());
        match (
            value["entries"].as_u64(),
            head,
            value["cut_short"].as_bool(),
        ) {
            (Some(entries), Some(head), Some(cut_short)) => Ok(Self {
                entries,
                head,
                cut_short,
            }),
            _ => Err(crate::Error::InvalidInput(format!(
                "not an audit log's verification: {value}"
            ))),
        }
    }
}

/// Test helpers of the log's and the sink's tests.
#[cfg(test)]
mod test_support {
    use super::*;
    use crate::error::Error;
    use crate::secret::SecretBytes;

    pub(super) fn key(byte: u8) -> SecretBytes {
        SecretBytes::copy_from(&[byte; 32])
    }

    pub(super) fn event(operation: &'static str, outcome: &'static str) -> Event<'static> {
        Event {
            operation,
            key_id: Some("kh1_test"),
            version: Some(1),
            namespace: Some("default"),
            outcome,
            caller: Caller::this_process(),
            client: None,
        }
    }

    /// A log of `n` entries in a temp dir, and its lines.
    pub(super) fn log_of(n: u64) -> (tempfile::TempDir, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(&dir.path().join("audit.log"), &key(1));
        for i in 1..=n {
            assert_eq!(log.append(&event("sign", "ok"), 1_700_000_000).unwrap(), i);
        }
        (dir, log)
    }

    pub(super) fn lines(log: &AuditLog) -> Vec<String> {
        std::fs::read_to_string(&log.path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub(super) fn rewrite(log: &AuditLog, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(&log.path, text).unwrap();
    }

    pub(super) fn integrity(log: &AuditLog) -> String {
        match log.verify() {
            Err(Error::Integrity { what }) => what,
            other => panic!("expected an integrity failure, got {other:?}"),
        }
    }
}
