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

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use aws_lc_rs::{constant_time, digest, hmac};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::secret::SecretBytes;

/// The audit log's file name in the store directory.
pub const FILE: &str = "audit.log";

/// Appends write this much at a time (a batch of a busy second is tens of megabytes).
const WRITE_CHUNK: usize = 1 << 20;

/// How long an append waits for another process's append to end: less than the store's busy
/// timeout (10 s), so that a lifecycle change waiting here gives up (and is rolled back) before
/// other processes waiting for the store do.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(8);

/// Takes `file`'s exclusive lock, waiting at most `wait`.
fn lock_exclusive(file: &File, wait: std::time::Duration) -> std::io::Result<()> {
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
#[derive(Deserialize)]
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
    /// Whether the file ends in a line cut short by a crash mid-write, after the entries: not an
    /// entry (nothing in it is trusted), dropped by the next append. The end of the log is not
    /// protected anyway (see the module's documentation): cutting it short says nothing more.
    pub cut_short: bool,
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
    }

    /// [`Self::append_batch`] of an iterator, encoding into `out` (cleared first; its capacity
    /// kept for the next call) and writing it a megabyte at a time.
    fn append_events<'e>(
        &self,
        events: impl Iterator<Item = (Event<'e>, i64)>,
        out: &mut Vec<u8>,
    ) -> Result<u64> {
        let mut events = events.peekable();
        let Some((first, first_time)) = events.peek().map(|(e, t)| (e.caller, *t)) else {
            return Ok(0);
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
        Ok(seq)
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
        let mut verified = Verified {
            entries: 0,
            head: [0u8; 32],
            cut_short: false,
        };
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

/// A lifecycle change, as the keystore states it to [`AuditSink::lifecycle`]: the sink adds who
/// and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// `create`, `destroy`, …
    pub operation: &'static str,
    /// The key's ID; `None` when there is no genuine one (never an ID that failed
    /// authentication).
    pub key_id: Option<&'a str>,
    /// The key version made or changed, if any.
    pub version: Option<u32>,
    /// The key's namespace, if known.
    pub namespace: Option<&'a str>,
    /// `ok`, or the error's kind ([`Error::kind`]).
    pub outcome: &'static str,
}

/// A key use, as the keystore states it to [`AuditSink::key_use`]: owned and small, so that
/// buffering it costs a move (the strings are shared, not copied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUse {
    /// `sign`, `verify`, `encrypt`, `decrypt`, `mac`.
    pub operation: &'static str,
    /// The key's ID; `None` when there is no genuine one.
    pub key_id: Option<Arc<str>>,
    /// The key version used, if known.
    pub version: Option<u32>,
    /// The key's namespace, if known.
    pub namespace: Option<Arc<str>>,
    /// `ok`, or the error's kind ([`Error::kind`]).
    pub outcome: &'static str,
}

/// How long key uses may wait in memory before they are written, unless configured otherwise.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(1);

/// Buffered key uses past this many wake the writer before its window is up.
const EARLY_FLUSH: usize = 10_000;

/// Buffered key uses past this many are written by the caller that adds one (back-pressure when
/// the writer cannot keep up), and while writing fails, the oldest past it are dropped (and
/// counted in the error log): memory stays bounded whatever happens to the disk.
const MAX_PENDING: usize = 100_000;

/// Where the audit log is written from: lifecycle changes at once, key uses in batches.
///
/// Key uses are the hot path (every signature, every encryption): [`Self::key_use`] only adds a
/// small owned struct to a buffer under a mutex. A writer thread turns the buffer into one
/// batch ([`AuditLog::append_batch`]: one lock, one write, one `fsync`) every window (default
/// [`DEFAULT_WINDOW`]), sooner when it grows past 10 000 entries; the caller that finds 100 000
/// waiting writes them itself. [`Self::lifecycle`] writes what is buffered and then its own
/// entry, synchronously, so the log keeps the order in which things happened.
///
/// **Durability window**: key uses made in the last window before the process dies without
/// dropping the sink (a crash, `SIGKILL`, `std::process::exit`) may be missing from the log.
/// Lifecycle changes never are: [`Self::lifecycle`] returns only once its entry is on disk.
/// Dropping the sink (and so the [`crate::Keystore`]) writes everything and stops the thread.
///
/// A write that fails in the background is reported with `tracing::error!` (the log's path and
/// the I/O error, nothing else) and its entries are kept for the next try, up to 100 000.
#[derive(Debug)]
pub struct AuditSink {
    inner: Option<Enabled>,
}

#[derive(Debug)]
struct Enabled {
    shared: Arc<Shared>,
    writer: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    log: AuditLog,
    caller: Caller,
    window: Duration,
    /// Key uses not yet written, and whether the sink is going away.
    pending: Mutex<Pending>,
    /// Wakes the writer thread early (sink dropped, buffer large).
    wake: Condvar,
    /// Held while a batch is taken from `pending` and written: batches reach the file in the
    /// order they were taken, so entries keep the order of the calls that made them. Holds the
    /// buffers a write reuses.
    writing: Mutex<Scratch>,
}

/// What one write leaves for the next, so that a busy sink does not allocate (and fault in)
/// megabytes every window.
#[derive(Debug, Default)]
struct Scratch {
    /// The encoded lines.
    out: Vec<u8>,
    /// An empty buffer with the capacity of the last batch, swapped in for the one taken.
    spare: VecDeque<(i64, KeyUse)>,
}

#[derive(Debug, Default)]
struct Pending {
    uses: VecDeque<(i64, KeyUse)>,
    stop: bool,
    /// Whether the last write failed: the callers then leave retries to the writer thread.
    failing: bool,
    /// Key uses dropped since the last successful write (writes failing, buffer full).
    dropped: u64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // What the mutexes guard stays consistent if a holder panicked: a vector and flags.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AuditSink {
    /// A sink writing to `log` for `caller`, buffering key uses for at most `window`; starts the
    /// writer thread (`keyhold-audit`).
    ///
    /// A window of zero is taken as 1 ms.
    pub fn open(log: AuditLog, caller: Caller, window: Duration) -> Self {
        let shared = Arc::new(Shared {
            log,
            caller,
            window: window.max(Duration::from_millis(1)),
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            writing: Mutex::new(Scratch::default()),
        });
        let worker = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("keyhold-audit".into())
            .spawn(move || worker.run())
            .map_err(|e| {
                // Without the thread, key uses are written when the buffer fills, at lifecycle
                // changes and on drop: later, but not lost.
                tracing::error!("cannot start the audit log writer thread: {e}");
            })
            .ok();
        Self {
            inner: Some(Enabled { shared, writer }),
        }
    }

    /// A sink that records nothing (`[audit] enabled = false`).
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// Whether entries are recorded.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The log written to, if enabled.
    pub fn log(&self) -> Option<&AuditLog> {
        self.inner.as_ref().map(|e| &e.shared.log)
    }

    /// Writes the buffered key uses, then `record`, stamped with the caller and the time, and
    /// flushes them to disk; returns the record's `seq` (0 when disabled).
    ///
    /// # Errors
    /// As [`AuditLog::append_batch`]; the key uses are then kept for the next write.
    pub fn lifecycle(&self, record: Record<'_>) -> Result<u64> {
        let Some(enabled) = &self.inner else {
            return Ok(0);
        };
        let shared = &enabled.shared;
        let event = Event {
            operation: record.operation,
            key_id: record.key_id,
            version: record.version,
            namespace: record.namespace,
            outcome: record.outcome,
            caller: shared.caller,
        };
        shared.write(Some((event, crate::time::now())))
    }

    /// Records a key use: buffered, written within the window (see the type's documentation).
    pub fn key_use(&self, key_use: KeyUse) {
        let Some(enabled) = &self.inner else {
            return;
        };
        let shared = &enabled.shared;
        let time = crate::time::now();
        let len = {
            let mut pending = lock(&shared.pending);
            if pending.failing && pending.uses.len() >= MAX_PENDING {
                // Writing fails: keep the newest, and count what is lost.
                pending.uses.pop_front();
                pending.dropped += 1;
            }
            pending.uses.push_back((time, key_use));
            if pending.failing {
                return;
            }
            pending.uses.len()
        };
        if len >= MAX_PENDING {
            if let Err(e) = shared.write(None) {
                shared.report(&e);
            }
        } else if len == EARLY_FLUSH {
            shared.wake.notify_one();
        }
    }

    /// Writes the buffered key uses now.
    ///
    /// # Errors
    /// As [`AuditLog::append_batch`]; the key uses are then kept for the next write.
    pub fn flush(&self) -> Result<()> {
        match &self.inner {
            Some(enabled) => enabled.shared.write(None).map(drop),
            None => Ok(()),
        }
    }

    /// The shared state, to see that the writer thread let go of it.
    #[cfg(test)]
    fn shared(&self) -> Option<std::sync::Weak<Shared>> {
        self.inner.as_ref().map(|e| Arc::downgrade(&e.shared))
    }
}

impl Drop for AuditSink {
    fn drop(&mut self) {
        let Some(enabled) = &mut self.inner else {
            return;
        };
        lock(&enabled.shared.pending).stop = true;
        enabled.shared.wake.notify_one();
        if let Some(writer) = enabled.writer.take() {
            // A panicked writer has nothing more to say; what it left is written below.
            let _ = writer.join();
        }
        if let Err(e) = enabled.shared.write(None) {
            enabled.shared.report(&e);
        }
    }
}

impl Shared {
    /// The writer thread: a batch every window, or sooner when woken, until the sink drops.
    fn run(&self) {
        loop {
            {
                let pending = lock(&self.pending);
                if pending.stop {
                    return;
                }
                let (pending, _) = self
                    .wake
                    .wait_timeout(pending, self.window)
                    .unwrap_or_else(PoisonError::into_inner);
                if pending.stop {
                    // The sink's drop writes what is left, after this thread is gone.
                    return;
                }
            }
            if let Err(e) = self.write(None) {
                self.report(&e);
            }
        }
    }

    /// Takes every buffered key use, adds `last` (a lifecycle entry) after them, and appends
    /// them as one batch. On failure the key uses go back to the front of the buffer.
    fn write(&self, last: Option<(Event<'_>, i64)>) -> Result<u64> {
        let mut scratch = lock(&self.writing);
        let scratch = &mut *scratch;
        let (mut uses, dropped) = {
            let mut pending = lock(&self.pending);
            let spare = std::mem::take(&mut scratch.spare);
            (
                std::mem::replace(&mut pending.uses, spare),
                std::mem::take(&mut pending.dropped),
            )
        };
        if uses.is_empty() && last.is_none() {
            return Ok(0);
        }
        if dropped > 0 {
            tracing::error!(
                "{dropped} key uses could not be written to the audit log {} and were dropped",
                self.log.path.display()
            );
        }
        let events = uses.iter().map(|(time, u)| {
            let event = Event {
                operation: u.operation,
                key_id: u.key_id.as_deref(),
                version: u.version,
                namespace: u.namespace.as_deref(),
                outcome: u.outcome,
                caller: self.caller,
            };
            (event, *time)
        });
        let written = self.log.append_events(events.chain(last), &mut scratch.out);
        let mut pending = lock(&self.pending);
        match &written {
            Ok(_) => {
                pending.failing = false;
                drop(pending);
                uses.clear();
                if uses.capacity() <= MAX_PENDING {
                    scratch.spare = uses;
                }
            }
            Err(_) => {
                pending.failing = true;
                // Back in front of what came in meanwhile, the oldest dropped past the bound.
                let newer = std::mem::replace(&mut pending.uses, uses);
                pending.uses.extend(newer);
                let excess = pending.uses.len().saturating_sub(MAX_PENDING);
                if excess > 0 {
                    pending.uses.drain(..excess);
                    pending.dropped += excess as u64;
                }
            }
        }
        written
    }

    fn report(&self, e: &Error) {
        let pending = lock(&self.pending).uses.len();
        tracing::error!("cannot write {pending} key uses to the audit log (kept, retried): {e}");
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
    fn key_use(operation: &'static str, id: &Arc<str>) -> KeyUse {
        KeyUse {
            operation,
            key_id: Some(Arc::clone(id)),
            version: Some(1),
            namespace: Some(Arc::from("default")),
            outcome: "ok",
        }
    }

    /// A sink whose window is far longer than any test: only flushes, lifecycle changes and drops
    /// write.
    fn sink_of(log: AuditLog) -> AuditSink {
        AuditSink::open(log, Caller::this_process(), Duration::from_secs(3600))
    }

    #[test]
    fn a_lifecycle_change_comes_after_the_uses_before_it() {
        let (dir, log) = log_of(0);
        let sink = sink_of(log);
        let id: Arc<str> = Arc::from("kh1_a");
        for _ in 0..3 {
            sink.key_use(key_use("sign", &id));
        }
        let reader = AuditLog::new(&dir.path().join("audit.log"), &key(1));
        assert_eq!(reader.verify().unwrap().entries, 0, "uses are buffered");
        let seq = sink
            .lifecycle(Record {
                operation: "destroy",
                key_id: Some("kh1_a"),
                version: Some(1),
                namespace: Some("default"),
                outcome: "ok",
            })
            .unwrap();
        assert_eq!(seq, 4, "written after the three uses");
        let entries = reader.entries().unwrap();
        let ops: Vec<&str> = entries.iter().map(|e| e.operation.as_str()).collect();
        assert_eq!(ops, ["sign", "sign", "sign", "destroy"]);
        assert_eq!(entries[3].caller, Caller::this_process());
        assert_eq!(reader.verify().unwrap().entries, 4);
    }

    #[test]
    fn a_batch_chains_to_what_is_there_and_verifies() {
        let (_dir, log) = log_of(2);
        let events: Vec<(Event<'_>, i64)> = (0..5)
            .map(|i| {
                (
                    event("mac", if i % 2 == 0 { "ok" } else { "wrong_purpose" }),
                    i,
                )
            })
            .collect();
        assert_eq!(log.append_batch(&events).unwrap(), 7);
        assert_eq!(log.append_batch(&[]).unwrap(), 0, "nothing to write");
        assert_eq!(log.append(&event("sign", "ok"), 9).unwrap(), 8);
        let verified = log.verify().unwrap();
        assert_eq!(verified.entries, 8);
        let entries = log.entries().unwrap();
        assert_eq!(entries[3].outcome, "wrong_purpose");
        assert_eq!(entries[6].time, 4);
        // Each entry of the batch chains to the one before it, the first to the old last line.
        let all = lines(&log);
        for i in 2..7 {
            assert_eq!(
                entries[i].prev,
                crate::hex::encode(&line_hash(all[i - 1].as_bytes()))
            );
        }
    }

    #[test]
    fn dropping_the_sink_writes_the_uses_and_stops_its_thread() {
        let (dir, log) = log_of(0);
        let sink = sink_of(log);
        let shared = sink.shared().unwrap();
        let id: Arc<str> = Arc::from("kh1_b");
        for _ in 0..5 {
            sink.key_use(key_use("encrypt", &id));
        }
        assert_eq!(shared.strong_count(), 2, "the sink and its writer thread");
        drop(sink);
        assert_eq!(
            shared.strong_count(),
            0,
            "the writer thread is gone with the sink"
        );
        let reader = AuditLog::new(&dir.path().join("audit.log"), &key(1));
        assert_eq!(reader.verify().unwrap().entries, 5);
        assert!(reader
            .entries()
            .unwrap()
            .iter()
            .all(|e| e.operation == "encrypt"
                && e.key_id.as_deref() == Some("kh1_b")
                && e.caller.pid == std::process::id()));
    }

    /// The writer thread writes by itself, within its window (the wait is bounded generously:
    /// its window is 10 ms).
    #[test]
    fn the_writer_thread_writes_within_its_window() {
        let (dir, log) = log_of(0);
        let sink = AuditSink::open(log, Caller::this_process(), Duration::from_millis(10));
        sink.key_use(key_use("verify", &Arc::from("kh1_c")));
        let reader = AuditLog::new(&dir.path().join("audit.log"), &key(1));
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while reader.verify().unwrap().entries == 0 {
            assert!(std::time::Instant::now() < deadline, "nothing written");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(reader.entries().unwrap()[0].operation, "verify");
        drop(sink);
    }

    #[test]
    fn uses_from_eight_threads_all_land_in_one_chain() {
        let (dir, log) = log_of(0);
        let sink = Arc::new(AuditSink::open(
            log,
            Caller::this_process(),
            Duration::from_millis(2),
        ));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let sink = Arc::clone(&sink);
                std::thread::spawn(move || {
                    let id: Arc<str> = Arc::from(format!("kh1_thread{t}"));
                    for i in 0..500 {
                        sink.key_use(key_use("sign", &id));
                        if i % 100 == 0 {
                            sink.lifecycle(Record {
                                operation: "create",
                                key_id: Some(&id),
                                version: Some(1),
                                namespace: None,
                                outcome: "ok",
                            })
                            .unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(Arc::into_inner(sink).expect("the threads are done"));
        let reader = AuditLog::new(&dir.path().join("audit.log"), &key(1));
        assert_eq!(reader.verify().unwrap().entries, 8 * 500 + 8 * 5);
        let entries = reader.entries().unwrap();
        for t in 0..8 {
            let id = format!("kh1_thread{t}");
            let mine: Vec<&Entry> = entries
                .iter()
                .filter(|e| e.key_id.as_deref() == Some(&id))
                .collect();
            assert_eq!(mine.iter().filter(|e| e.operation == "sign").count(), 500);
            // Each thread's entries are in the order it made them: a create every 100 uses.
            let ops: Vec<&str> = mine.iter().map(|e| e.operation.as_str()).collect();
            for (k, chunk) in ops.chunks(101).enumerate() {
                assert_eq!(chunk[0], "sign", "thread {t} chunk {k}");
                assert_eq!(chunk[1], "create", "thread {t} chunk {k}");
            }
        }
    }

    /// A failed write keeps the uses, and the next one writes them, in order, before what came
    /// after.
    #[test]
    fn uses_a_failed_write_could_not_write_are_kept_for_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let blocked = dir.path().join("sub");
        // A directory where the log's parent should be: opening the log fails.
        let log = AuditLog::new(&blocked.join("audit.log"), &key(1));
        std::fs::write(&blocked, b"not a directory").unwrap();
        let sink = sink_of(log);
        let id: Arc<str> = Arc::from("kh1_d");
        sink.key_use(key_use("sign", &id));
        let err = sink.flush().unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
        sink.key_use(key_use("decrypt", &id));
        std::fs::remove_file(&blocked).unwrap();
        std::fs::create_dir(&blocked).unwrap();
        sink.flush().unwrap();
        let reader = AuditLog::new(&blocked.join("audit.log"), &key(1));
        let ops: Vec<String> = reader
            .entries()
            .unwrap()
            .into_iter()
            .map(|e| e.operation)
            .collect();
        assert_eq!(ops, ["sign", "decrypt"]);
        assert_eq!(reader.verify().unwrap().entries, 2);
    }

    #[test]
    fn a_disabled_sink_records_nothing() {
        let sink = AuditSink::disabled();
        assert!(!sink.is_enabled());
        sink.key_use(key_use("sign", &Arc::from("kh1_e")));
        assert_eq!(
            sink.lifecycle(Record {
                operation: "create",
                key_id: None,
                version: None,
                namespace: None,
                outcome: "ok",
            })
            .unwrap(),
            0
        );
        sink.flush().unwrap();
        assert!(sink.log().is_none());
    }
}
