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
//! Entries hold what was done, to which key, by whom and how it ended: never key material,
//! plaintext, PINs or passphrases. The types keep it that way: an [`Event`] has no free-form
//! field but the key's ID and namespace.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use aws_lc_rs::{constant_time, digest, hmac};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::secret::SecretBytes;

/// The longest line [`AuditLog`] reads: far above any entry it writes.
const MAX_LINE: usize = 16 * 1024;

/// Who asked: the process, and for the service (later) its client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Lowercase hex SHA-256 of the whole previous line (without its newline).
    pub prev: String,
}

/// A line: the entry's exact bytes and their MAC.
#[derive(Serialize, Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    entry: &'a serde_json::value::RawValue,
    mac: String,
}

/// What a verified log holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// How many entries, all verified.
    pub entries: u64,
    /// SHA-256 of the last line (`prev` of the next entry): what an anchor outside the log
    /// records.
    pub head: [u8; 32],
}

/// An append-only audit log file.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    mac: hmac::Key,
}

fn line_hash(line: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, line).as_ref());
    out
}

impl AuditLog {
    /// The log at `path` (made at the first append, mode 0600), MAC'd under `key` (32 bytes
    /// derived from the store's root secret for this purpose alone).
    pub fn new(path: &Path, key: &SecretBytes) -> Self {
        Self {
            path: path.to_owned(),
            mac: hmac::Key::new(hmac::HMAC_SHA256, key.expose()),
        }
    }

    /// Appends `event` as the next entry and flushes it to disk before returning.
    ///
    /// Appends from several processes take turns under an exclusive lock on the file; each reads
    /// the last line to chain to it.
    ///
    /// # Errors
    /// [`Error::Io`]; [`Error::Integrity`] if the last line is not one this log wrote.
    pub fn append(&self, event: &Event<'_>, time: i64) -> Result<u64> {
        let io = |what: &str, e| Error::io(format!("{what} {}", self.path.display()), e);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(|e| io("open the audit log", e))?;
        // Held until the file is closed, at the end of this call.
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io("lock the audit log", e.into()))?;
        let (seq, prev) = match last_line(&mut file).map_err(|e| io("read the audit log", e))? {
            None => (1, [0u8; 32]),
            Some(line) => {
                let entry = self.check_line(&line, 0)?;
                (entry.seq + 1, line_hash(&line))
            }
        };
        let entry = Entry {
            seq,
            time,
            operation: event.operation.to_owned(),
            key_id: event.key_id.map(str::to_owned),
            version: event.version,
            namespace: event.namespace.map(str::to_owned),
            outcome: event.outcome.to_owned(),
            caller: event.caller.clone(),
            prev: crate::hex::encode(&prev),
        };
        // Encoding keyhold's own plain structs cannot fail; the errors are mapped all the same.
        let entry =
            serde_json::to_string(&entry).map_err(|_| Error::crypto("encode an audit entry"))?;
        let raw = serde_json::value::RawValue::from_string(entry)
            .map_err(|_| Error::crypto("encode an audit entry"))?;
        let mac = crate::hex::encode(hmac::sign(&self.mac, raw.get().as_bytes()).as_ref());
        let mut line = serde_json::to_vec(&Line { entry: &raw, mac })
            .map_err(|_| Error::crypto("encode an audit line"))?;
        line.push(b'\n');
        file.write_all(&line)
            .and_then(|()| file.sync_data())
            .map_err(|e| io("append to the audit log", e))?;
        Ok(seq)
    }

    /// Checks every line: its MAC, that `seq` counts up from 1 and that `prev` is the hash of
    /// the line before. A missing log is an empty one.
    ///
    /// # Errors
    /// [`Error::Integrity`] naming the first line that fails, and how; [`Error::Io`].
    pub fn verify(&self) -> Result<Verified> {
        let mut verified = Verified {
            entries: 0,
            head: [0u8; 32],
        };
        self.for_each(|number, line, entry| {
            let fail = |what: String| Error::Integrity {
                what: format!("audit log line {number}: {what}"),
            };
            if entry.seq != verified.entries + 1 {
                return Err(fail(format!(
                    "entry {} where entry {} belongs: entries were removed, added or reordered",
                    entry.seq,
                    verified.entries + 1
                )));
            }
            if entry.prev != crate::hex::encode(&verified.head) {
                return Err(fail(
                    "it does not chain to the line before: a line was removed, replaced or \
                     reordered"
                        .into(),
                ));
            }
            verified.entries += 1;
            verified.head = line_hash(line);
            Ok(())
        })?;
        Ok(verified)
    }

    /// Every entry, in order, each checked by its MAC (the chain is [`Self::verify`]'s job).
    ///
    /// # Errors
    /// As [`Self::verify`].
    pub fn entries(&self) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        self.for_each(|_, _, entry| {
            out.push(entry);
            Ok(())
        })?;
        Ok(out)
    }

    fn for_each(&self, mut visit: impl FnMut(u64, &[u8], Entry) -> Result<()>) -> Result<()> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(Error::io(
                    format!("open the audit log {}", self.path.display()),
                    e,
                ))
            }
        };
        let mut reader = BufReader::new(file);
        let mut line = Vec::new();
        let mut number = 0u64;
        loop {
            line.clear();
            let read = reader
                .by_ref()
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
                .map_err(|e| Error::io(format!("read the audit log {}", self.path.display()), e))?;
            if read == 0 {
                return Ok(());
            }
            number += 1;
            if line.pop() != Some(b'\n') {
                return Err(Error::Integrity {
                    what: format!(
                        "audit log line {number}: it is cut short (or longer than {MAX_LINE} \
                         bytes)"
                    ),
                });
            }
            let entry = self.check_line(&line, number)?;
            visit(number, &line, entry)?;
        }
    }

    /// Parses a line and checks its MAC. `number` names it in errors (0: the last line).
    fn check_line(&self, line: &[u8], number: u64) -> Result<Entry> {
        let which = if number == 0 {
            "the last line".to_owned()
        } else {
            format!("line {number}")
        };
        let fail = |what: &str| Error::Integrity {
            what: format!("audit log {which}: {what}"),
        };
        let parsed: Line<'_> =
            serde_json::from_slice(line).map_err(|_| fail("it is not an audit line"))?;
        let tag = crate::hex::decode(&parsed.mac).ok_or_else(|| fail("its MAC is not hex"))?;
        let expected = hmac::sign(&self.mac, parsed.entry.get().as_bytes());
        constant_time::verify_slices_are_equal(expected.as_ref(), &tag).map_err(|_| {
            fail("it fails its MAC: it was changed, or written without the store's root")
        })?;
        serde_json::from_str(parsed.entry.get()).map_err(|_| fail("its entry cannot be read"))
    }
}

/// The file's last line (without its newline), if it has one; the file is left at its end.
fn last_line(file: &mut File) -> std::io::Result<Option<Vec<u8>>> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(None);
    }
    let start = len.saturating_sub(MAX_LINE as u64 + 1);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
    let line = match body.iter().rposition(|&b| b == b'\n') {
        Some(at) => &body[at + 1..],
        None => body,
    };
    file.seek(SeekFrom::End(0))?;
    Ok(Some(line.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SecretBytes {
        SecretBytes::copy_from(&[byte; 32])
    }

    fn event(operation: &'static str, outcome: &'static str) -> Event<'static> {
        Event {
            operation,
            key_id: Some("kh1_test"),
            version: Some(1),
            namespace: Some("default"),
            outcome,
            caller: Caller::this_process(),
        }
    }

    /// A log of `n` entries in a temp dir, and its lines.
    fn log_of(n: u64) -> (tempfile::TempDir, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(&dir.path().join("audit.log"), &key(1));
        for i in 1..=n {
            assert_eq!(log.append(&event("sign", "ok"), 1_700_000_000).unwrap(), i);
        }
        (dir, log)
    }

    fn lines(log: &AuditLog) -> Vec<String> {
        std::fs::read_to_string(&log.path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn rewrite(log: &AuditLog, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(&log.path, text).unwrap();
    }

    fn integrity(log: &AuditLog) -> String {
        match log.verify() {
            Err(Error::Integrity { what }) => what,
            other => panic!("expected an integrity failure, got {other:?}"),
        }
    }

    #[test]
    fn entries_chain_and_verify() {
        let (_dir, log) = log_of(5);
        let verified = log.verify().unwrap();
        assert_eq!(verified.entries, 5);
        let all = lines(&log);
        assert_eq!(verified.head, line_hash(all[4].as_bytes()));
        let entries = log.entries().unwrap();
        assert_eq!(entries[0].prev, crate::hex::encode(&[0u8; 32]));
        for pair in entries.windows(2) {
            assert_eq!(pair[1].seq, pair[0].seq + 1);
        }
        assert_eq!(
            entries[3].prev,
            crate::hex::encode(&line_hash(all[2].as_bytes()))
        );
        assert_eq!(entries[0].caller.pid, std::process::id());
        let mode = std::fs::metadata(&log.path).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        // A missing log is an empty one.
        let none = AuditLog::new(&log.path.with_extension("none"), &key(1));
        assert_eq!(none.verify().unwrap().entries, 0);
    }

    #[test]
    fn an_edited_entry_is_found_by_its_mac() {
        let (_dir, log) = log_of(4);
        let mut all = lines(&log);
        all[2] = all[2].replace("\"outcome\":\"ok\"", "\"outcome\":\"no_such_key\"");
        rewrite(&log, &all);
        assert_eq!(
            integrity(&log),
            "audit log line 3: it fails its MAC: it was changed, or written without the store's root"
        );
    }

    #[test]
    fn a_removed_entry_is_found_where_it_was() {
        let (_dir, log) = log_of(4);
        let mut all = lines(&log);
        all.remove(1);
        rewrite(&log, &all);
        assert_eq!(
            integrity(&log),
            "audit log line 2: entry 3 where entry 2 belongs: entries were removed, added or \
             reordered"
        );
    }

    #[test]
    fn reordered_entries_are_found() {
        let (_dir, log) = log_of(4);
        let mut all = lines(&log);
        all.swap(1, 2);
        rewrite(&log, &all);
        assert!(integrity(&log).starts_with("audit log line 2: entry 3 where entry 2 belongs"));
    }

    /// A line moved from another log under the same key, at the same place (so its MAC and
    /// `seq` are right), does not chain: the logs differ before it.
    #[test]
    fn a_line_from_another_log_does_not_chain() {
        let (_dir, log) = log_of(3);
        let other_dir = tempfile::tempdir().unwrap();
        let other = AuditLog::new(&other_dir.path().join("audit.log"), &key(1));
        other
            .append(&event("key.create", "ok"), 1_700_000_000)
            .unwrap();
        for _ in 0..2 {
            other.append(&event("sign", "ok"), 1_700_000_000).unwrap();
        }
        let mut all = lines(&log);
        all[2] = lines(&other)[2].clone();
        assert_ne!(all[2], lines(&log)[2]);
        rewrite(&log, &all);
        assert_eq!(
            integrity(&log),
            "audit log line 3: it does not chain to the line before: a line was removed, \
             replaced or reordered"
        );
    }

    #[test]
    fn entries_written_without_the_root_fail_their_mac() {
        let (_dir, log) = log_of(2);
        let forger = AuditLog::new(&log.path, &key(2));
        let err = forger.append(&event("key.destroy", "ok"), 1).unwrap_err();
        assert!(
            matches!(&err, Error::Integrity { what } if what.starts_with("audit log the last line: it fails its MAC")),
            "{err:?}"
        );
        assert_eq!(lines(&log).len(), 2, "nothing appended");
        assert!(integrity(&forger).starts_with("audit log line 1: it fails its MAC"));
    }

    #[test]
    fn a_cut_last_line_is_found_and_appending_stops() {
        let (_dir, log) = log_of(3);
        let mut text = std::fs::read(&log.path).unwrap();
        text.truncate(text.len() - 10);
        std::fs::write(&log.path, &text).unwrap();
        assert_eq!(
            integrity(&log),
            "audit log line 3: it is cut short (or longer than 16384 bytes)"
        );
        let err = log.append(&event("sign", "ok"), 1).unwrap_err();
        assert!(matches!(err, Error::Integrity { .. }), "{err:?}");
    }

    /// The limit the module documents: entries cut off at the end leave a shorter valid log.
    #[test]
    fn entries_cut_off_at_the_end_are_not_found_by_the_log_alone() {
        let (_dir, log) = log_of(3);
        let head = log.verify().unwrap().head;
        let mut all = lines(&log);
        all.pop();
        rewrite(&log, &all);
        let shorter = log.verify().unwrap();
        assert_eq!(shorter.entries, 2);
        assert_ne!(shorter.head, head, "an anchor holding the head sees it");
    }

    #[test]
    fn appends_from_many_threads_stay_one_chain() {
        let (_dir, log) = log_of(0);
        let log = std::sync::Arc::new(log);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let log = std::sync::Arc::clone(&log);
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        log.append(&event("mac", "ok"), 2).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(log.verify().unwrap().entries, 100);
    }
}
