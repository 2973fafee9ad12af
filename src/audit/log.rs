//! The log file: its line format, appends (chained, MAC'd, under a file lock) and reading back.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use aws_lc_rs::{constant_time, digest, hmac};
use serde::{Deserialize, Serialize};

use super::{Caller, Entry, Event, Head, Verified};
use crate::error::{Error, Result};
use crate::secret::SecretBytes;

/// Appends write this much at a time (a batch of a busy second is tens of megabytes).
const WRITE_CHUNK: usize = 1 << 20;

/// How long an append waits for another process's append to end: less than the store's busy
/// timeout (10 s), so that a lifecycle change waiting here gives up (and is rolled back) before
/// other processes waiting for the store do.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(8);

/// Takes `file`'s exclusive lock, waiting at most `wait`.
pub(crate) fn lock_exclusive(file: &File, wait: std::time::Duration) -> std::io::Result<()> {
    let until = std::time::Instant::now() + wait;
    loop {
        match rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(()),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK && std::time::Instant::now() < until => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The longest line [`AuditLog`] reads: far above any entry it writes.
const MAX_LINE: usize = 16 * 1024;

/// A line: the entry's exact bytes and their MAC.
#[derive(Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    entry: &'a serde_json::value::RawValue,
    mac: String,
}

/// An append-only audit log file.
#[derive(Debug)]
pub struct AuditLog {
    pub(super) path: PathBuf,
    mac: hmac::Key,
}

pub(super) fn line_hash(line: &[u8]) -> [u8; 32] {
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
        self.append_batch(std::slice::from_ref(&(event.clone(), time)))
    }

    /// Appends `events` (each with its time) as the next entries, in order, with one lock, one
    /// write and one flush to disk; returns the last one's `seq` (0 for no events: nothing is
    /// written).
    ///
    /// A last line cut short (a write interrupted by a crash or `SIGKILL`: the kernel may stop a
    /// write between pages) is dropped first, and an `audit-repair` entry with outcome
    /// `cut_short_line_dropped` says so before the new entries: such a line never held a whole
    /// entry, so nothing is lost that was acknowledged, and the drop stays on the record.
    ///
    /// # Errors
    /// As [`Self::append`]; on an error none of the entries is in the log (what was written is
    /// cut off again; after a crash in the write, a cut line the next append drops).
    pub fn append_batch(&self, events: &[(Event<'_>, i64)]) -> Result<u64> {
        self.append_events(events.iter().cloned(), &mut Vec::new())
            .map(|head| head.map_or(0, |h| h.seq))
    }

    /// [`Self::append_batch`] of an iterator, encoding into `out` (cleared first; its capacity
    /// kept for the next call) and writing it a megabyte at a time.
    pub(super) fn append_events<'e>(
        &self,
        events: impl Iterator<Item = (Event<'e>, i64)>,
        out: &mut Vec<u8>,
    ) -> Result<Option<Head>> {
        let mut events = events.peekable();
        let Some((first, first_time)) = events.peek().map(|(e, t)| (e.caller, *t)) else {
            return Ok(None);
        };
        out.clear();
        let io = |what: &str, e| Error::io(format!("{what} {}", self.path.display()), e);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(|e| io("open the audit log", e))?;
        // Held until the file is closed, at the end of this call. Waited for a bounded time: a
        // lifecycle change writes its entry while it holds the store's write lock, which other
        // processes wait for only so long (the store's busy timeout).
        lock_exclusive(&file, LOCK_WAIT).map_err(|e| {
            io(
                &format!(
                    "another process held the lock of the audit log for {}s:",
                    LOCK_WAIT.as_secs()
                ),
                e,
            )
        })?;
        let tail = read_tail(&mut file).map_err(|e| io("read the audit log", e))?;
        let mut repair = None;
        let mut dropped_line = None;
        let last = match tail.unterminated {
            None => tail.last,
            // Whole but for its newline: the write stopped just before it.
            Some((_, line)) if self.check_line(&line, 0).is_ok() => {
                out.push(b'\n');
                Some(line)
            }
            Some((start, line)) if line.len() <= MAX_LINE => {
                file.set_len(start)
                    .map_err(|e| io("drop the cut last line of the audit log", e))?;
                dropped_line = Some(line);
                tracing::warn!(
                    "the audit log {} ended in a line cut short (a write interrupted by a crash): \
                     it was dropped, and an audit-repair entry records that",
                    self.path.display()
                );
                repair = Some((
                    Event {
                        operation: "audit-repair",
                        key_id: None,
                        version: None,
                        namespace: None,
                        outcome: "cut_short_line_dropped",
                        caller: first,
                        client: None,
                    },
                    first_time,
                ));
                tail.last
            }
            Some(_) => {
                return Err(Error::Integrity {
                    what: format!(
                        "audit log the last line: it is longer than {MAX_LINE} bytes: not a line \
                         this log wrote"
                    ),
                })
            }
        };
        let (mut seq, mut prev) = match last {
            None => (0, [0u8; 32]),
            Some(line) => {
                let entry = self.check_line(&line, 0)?;
                (entry.seq, line_hash(&line))
            }
        };
        let end = file
            .seek(SeekFrom::End(0))
            .map_err(|e| io("read the audit log", e))?;
        let written = (|| {
            for (event, time) in repair.into_iter().chain(events) {
                seq += 1;
                let start = out.len();
                self.encode_line(out, seq, time, &event, &prev)?;
                prev = line_hash(&out[start..]);
                out.push(b'\n');
                if out.len() >= WRITE_CHUNK {
                    // Flushed chunk by chunk: another file's fsync on the same filesystem (the
                    // store's own commits) may have to wait for this file's unflushed data.
                    file.write_all(out)
                        .and_then(|()| file.sync_data())
                        .map_err(|e| io("append to the audit log", e))?;
                    out.clear();
                }
            }
            file.write_all(out)
                .and_then(|()| file.sync_data())
                .map_err(|e| io("append to the audit log", e))
        })();
        out.clear();
        if let Err(e) = written {
            // All or nothing: a retry must not write entries twice.
            let restored = file.set_len(end).and_then(|()| match &dropped_line {
                Some(line) => file.write_all(line),
                None => Ok(()),
            });
            if let Err(undo) = restored {
                tracing::error!(
                    "could not cut a failed append off the audit log {}: {undo}",
                    self.path.display()
                );
            }
            return Err(e);
        }
        Ok(Some(Head { seq, hash: prev }))
    }

    /// Writes the line of entry `seq` (without its newline) at the end of `out`.
    fn encode_line(
        &self,
        out: &mut Vec<u8>,
        seq: u64,
        time: i64,
        event: &Event<'_>,
        prev: &[u8; 32],
    ) -> Result<()> {
        // Borrowed, in `Entry`'s field order: no copy of the strings per entry.
        #[derive(Serialize)]
        struct EntryRef<'a> {
            seq: u64,
            time: i64,
            operation: &'a str,
            key_id: Option<&'a str>,
            version: Option<u32>,
            namespace: Option<&'a str>,
            outcome: &'a str,
            caller: &'a Caller,
            #[serde(skip_serializing_if = "Option::is_none")]
            client: Option<&'a str>,
            prev: &'a str,
        }
        let prev = crate::hex::encode(prev);
        let entry = EntryRef {
            seq,
            time,
            operation: event.operation,
            key_id: event.key_id,
            version: event.version,
            namespace: event.namespace,
            outcome: event.outcome,
            caller: &event.caller,
            client: event.client,
            prev: &prev,
        };
        // Encoding keyhold's own plain structs cannot fail; the error is mapped all the same.
        let encode = |_| Error::crypto("encode an audit entry");
        out.extend_from_slice(b"{\"entry\":");
        let start = out.len();
        serde_json::to_writer(&mut *out, &entry).map_err(encode)?;
        let mac = hmac::sign(&self.mac, &out[start..]);
        out.extend_from_slice(b",\"mac\":\"");
        out.extend_from_slice(crate::hex::encode(mac.as_ref()).as_bytes());
        out.extend_from_slice(b"\"}");
        Ok(())
    }

    /// Checks every line: its MAC, that `seq` counts up from 1 and that `prev` is the hash of
    /// the line before. A missing log is an empty one.
    ///
    /// # Errors
    /// [`Error::Integrity`] naming the first line that fails, and how; [`Error::Io`].
    pub fn verify(&self) -> Result<Verified> {
        self.verify_through(None)
    }

    /// [`Self::verify`], checking too that the log holds `anchored` (an entry an anchor outside
    /// the log recorded: its `seq` and line hash): a log cut before it, even if written on
    /// since, is refused.
    ///
    /// # Errors
    /// As [`Self::verify`]; [`Error::StoreTampered`] for a log without the anchored entry.
    pub fn verify_through(&self, anchored: Option<Head>) -> Result<Verified> {
        let mut verified = Verified {
            entries: 0,
            head: [0u8; 32],
            cut_short: false,
        };
        let mut found = None;
        verified.cut_short = self.for_each(|number, line, entry| {
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
            if anchored.is_some_and(|a| a.seq == entry.seq) {
                found = Some(verified.head);
            }
            Ok(())
        })?;
        if let Some(anchored) = anchored {
            match found {
                Some(hash) if hash == anchored.hash => {}
                Some(_) => {
                    return Err(Error::StoreTampered {
                        what: format!(
                            "entry {} of the audit log {} is not the one keyhold wrote (its \
                             anchor recorded another): the log was cut and written on since",
                            anchored.seq,
                            self.path.display()
                        ),
                    })
                }
                None => {
                    return Err(Error::StoreTampered {
                        what: format!(
                            "the audit log {} ends at entry {}, but keyhold wrote entry {} and \
                             recorded it outside the log: its end was cut off",
                            self.path.display(),
                            verified.entries,
                            anchored.seq
                        ),
                    })
                }
            }
        }
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

    /// Visits every whole line; whether the file ends in a line cut short by a crash (a last
    /// line without its newline, within the longest line written), which is not visited.
    fn for_each(&self, mut visit: impl FnMut(u64, &[u8], Entry) -> Result<()>) -> Result<bool> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => {
                return Err(Error::io(
                    format!("open the audit log {}", self.path.display()),
                    e,
                ))
            }
        };
        // Shared with other readers; appends (exclusive) wait, so no half-written batch is read.
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockShared).map_err(|e| {
            Error::io(
                format!("lock the audit log {}", self.path.display()),
                e.into(),
            )
        })?;
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
                return Ok(false);
            }
            number += 1;
            if line.pop() != Some(b'\n') {
                let at_end = reader
                    .fill_buf()
                    .map_err(|e| {
                        Error::io(format!("read the audit log {}", self.path.display()), e)
                    })?
                    .is_empty();
                if at_end && read <= MAX_LINE {
                    return Ok(true);
                }
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

/// The end of the log, as an append finds it.
struct Tail {
    /// The last line ended by a newline (without it), if any.
    last: Option<Vec<u8>>,
    /// Bytes after that line's newline, where the file ends without one: where they start, and
    /// the bytes (at most one line and a byte).
    unterminated: Option<(u64, Vec<u8>)>,
}

/// Reads the end of the log (the last complete line, and an unterminated rest); the file is left
/// at its end.
fn read_tail(file: &mut File) -> std::io::Result<Tail> {
    let len = file.seek(SeekFrom::End(0))?;
    // Room for an unterminated line and the whole line before it.
    let start = len.saturating_sub(2 * (MAX_LINE as u64 + 1));
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    file.seek(SeekFrom::End(0))?;
    let (complete, unterminated) = match tail.iter().rposition(|&b| b == b'\n') {
        _ if tail.is_empty() => (&tail[..0], None),
        Some(at) if at + 1 == tail.len() => (&tail[..at], None),
        Some(at) => (
            &tail[..at],
            Some((start + at as u64 + 1, tail[at + 1..].to_vec())),
        ),
        // No newline: one unterminated line from the start, or one too long to be ours.
        None => (&tail[..0], Some((start, tail.clone()))),
    };
    let last = match complete.iter().rposition(|&b| b == b'\n') {
        _ if complete.is_empty() && (tail.first() != Some(&b'\n')) => None,
        Some(at) => Some(complete[at + 1..].to_vec()),
        None => Some(complete.to_vec()),
    };
    Ok(Tail { last, unterminated })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::super::test_support::*;
    use super::*;

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

    /// Waiting for another append's lock is bounded: a holder that never lets go makes the
    /// append fail (and the lifecycle change that wrote it roll back), not hang.
    #[test]
    fn the_wait_for_another_appends_lock_is_bounded() {
        let (_dir, log) = log_of(1);
        let holder = File::open(&log.path).unwrap();
        rustix::fs::flock(&holder, rustix::fs::FlockOperation::LockExclusive).unwrap();
        let other = File::open(&log.path).unwrap();
        let started = std::time::Instant::now();
        let err = lock_exclusive(&other, std::time::Duration::from_millis(100)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock, "{err}");
        assert!(started.elapsed() >= std::time::Duration::from_millis(100));
        drop(holder);
        lock_exclusive(&other, std::time::Duration::from_millis(100)).unwrap();
    }

    /// A write interrupted by a crash leaves a cut last line: `verify` verifies the entries
    /// before it and says the file ends cut short (the end of a log is not protected anyway), and
    /// the next append drops it and records that it did, so the log goes on after a crash.
    #[test]
    fn a_cut_last_line_is_found_and_the_next_append_drops_it_on_the_record() {
        let (_dir, log) = log_of(3);
        let whole = log.verify().unwrap();
        assert!(!whole.cut_short);
        let mut text = std::fs::read(&log.path).unwrap();
        text.truncate(text.len() - 10);
        std::fs::write(&log.path, &text).unwrap();
        let cut = log.verify().unwrap();
        assert_eq!((cut.entries, cut.cut_short), (2, true));
        assert_eq!(log.entries().unwrap().len(), 2);
        assert_eq!(log.append(&event("sign", "ok"), 1).unwrap(), 4);
        let entries = log.entries().unwrap();
        let ops: Vec<(&str, &str)> = entries
            .iter()
            .map(|e| (e.operation.as_str(), e.outcome.as_str()))
            .collect();
        assert_eq!(
            ops,
            [
                ("sign", "ok"),
                ("sign", "ok"),
                ("audit-repair", "cut_short_line_dropped"),
                ("sign", "ok")
            ]
        );
        assert_eq!(log.verify().unwrap().entries, 4);
    }

    /// A reader waits for an append in progress (which holds the file's exclusive lock), so that
    /// it never reads half a batch and reports a cut line that is still being written.
    #[test]
    fn a_reader_waits_for_an_append_in_progress() {
        let (_dir, log) = log_of(2);
        let writer = File::open(&log.path).unwrap();
        rustix::fs::flock(&writer, rustix::fs::FlockOperation::LockExclusive).unwrap();
        let log = Arc::new(log);
        let (done, finished) = std::sync::mpsc::channel();
        let reader = Arc::clone(&log);
        let thread = std::thread::spawn(move || done.send(reader.verify().map(|v| v.entries)));
        assert!(
            finished.recv_timeout(Duration::from_millis(200)).is_err(),
            "verify read the log while it was locked for an append"
        );
        drop(writer);
        assert_eq!(finished.recv().unwrap().unwrap(), 2);
        thread.join().unwrap().unwrap();
    }

    /// A last line whole but for its newline (the write stopped just before it) is kept.
    #[test]
    fn a_last_line_without_its_newline_is_kept() {
        let (_dir, log) = log_of(2);
        let mut text = std::fs::read(&log.path).unwrap();
        assert_eq!(text.pop(), Some(b'\n'));
        std::fs::write(&log.path, &text).unwrap();
        assert_eq!(log.append(&event("mac", "ok"), 1).unwrap(), 3);
        assert_eq!(log.verify().unwrap().entries, 3);
        assert_eq!(lines(&log).len(), 3);
    }

    /// What no crash leaves: a last line longer than any entry is not cut away.
    #[test]
    fn a_last_line_too_long_to_be_an_entry_stops_appending() {
        let (_dir, log) = log_of(1);
        let mut text = std::fs::read(&log.path).unwrap();
        text.extend(std::iter::repeat_n(b'x', MAX_LINE + 1));
        std::fs::write(&log.path, &text).unwrap();
        let err = log.append(&event("sign", "ok"), 1).unwrap_err();
        assert!(
            matches!(&err, Error::Integrity { what } if what.contains("longer than 16384 bytes")),
            "{err:?}"
        );
        assert_eq!(std::fs::read(&log.path).unwrap(), text, "nothing cut");
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
