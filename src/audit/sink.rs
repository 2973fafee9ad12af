//! Where the keystore writes the log from: lifecycle changes at once, key uses buffered.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::{AuditLog, Caller, Event, Head};
use crate::error::{Error, Result};

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
    /// The service's client it was done for, if any ([`super::on_behalf_of`]).
    pub client: Option<&'a str>,
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
    /// The service's client it was done for, if any ([`super::on_behalf_of`]).
    pub client: Option<Arc<str>>,
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
    /// Where the head of every write is recorded outside the log, if anywhere.
    anchor: Option<crate::store::FileAnchor>,
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
        Self::open_anchored(log, caller, window, None)
    }

    /// [`Self::open`], recording the head of every write in `anchor` (a tripwire for a log whose
    /// end is cut off: see [`AuditLog::verify_through`]).
    pub fn open_anchored(
        log: AuditLog,
        caller: Caller,
        window: Duration,
        anchor: Option<crate::store::FileAnchor>,
    ) -> Self {
        let shared = Arc::new(Shared {
            log,
            caller,
            window: window.max(Duration::from_millis(1)),
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            writing: Mutex::new(Scratch::default()),
            anchor,
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
    /// flushes them to disk; returns the record's entry (`None` when disabled).
    ///
    /// # Errors
    /// As [`AuditLog::append_batch`]; the key uses are then kept for the next write.
    pub fn lifecycle(&self, record: Record<'_>) -> Result<Option<Head>> {
        let Some(enabled) = &self.inner else {
            return Ok(None);
        };
        let shared = &enabled.shared;
        let event = Event {
            operation: record.operation,
            key_id: record.key_id,
            version: record.version,
            namespace: record.namespace,
            outcome: record.outcome,
            caller: shared.caller,
            client: record.client,
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
        // A caller that must not wait (`keyhold serve`'s quick calls, which do not start past
        // `backlogged`) leaves the writing to the writer thread.
        if len >= MAX_PENDING && !crate::keystore::in_memory_only_scope() {
            if let Err(e) = shared.write(None) {
                shared.report(&e);
            }
        } else if len == EARLY_FLUSH || len >= MAX_PENDING {
            shared.wake.notify_one();
        }
    }

    /// Whether so many key uses wait to be written that the next ones may be written by their
    /// callers (`MAX_PENDING`, less a margin for callers adding theirs meanwhile).
    pub fn backlogged(&self) -> bool {
        const MARGIN: usize = 1024;
        self.inner
            .as_ref()
            .is_some_and(|enabled| lock(&enabled.shared.pending).uses.len() + MARGIN >= MAX_PENDING)
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
    fn write(&self, last: Option<(Event<'_>, i64)>) -> Result<Option<Head>> {
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
            return Ok(None);
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
                client: u.client.as_deref(),
            };
            (event, *time)
        });
        let written = self.log.append_events(events.chain(last), &mut scratch.out);
        let mut pending = lock(&self.pending);
        match &written {
            Ok(head) => {
                pending.failing = false;
                drop(pending);
                if let (Some(anchor), Some(head)) = (&self.anchor, head) {
                    if let Err(e) = anchor.record_audit(*head) {
                        tracing::warn!(error = %e, "cannot record the audit log's head in the anchor file");
                    }
                }
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

#[cfg(test)]
mod tests {
    use super::super::log::line_hash;
    use super::super::test_support::*;
    use super::super::Entry;
    use super::*;

    fn key_use(operation: &'static str, id: &Arc<str>) -> KeyUse {
        KeyUse {
            operation,
            key_id: Some(Arc::clone(id)),
            version: Some(1),
            namespace: Some(Arc::from("default")),
            outcome: "ok",
            client: None,
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
                client: None,
            })
            .unwrap();
        assert_eq!(seq.map(|h| h.seq), Some(4), "written after the three uses");
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
                                client: None,
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
                client: None,
            })
            .unwrap(),
            None
        );
        sink.flush().unwrap();
        assert!(sink.log().is_none());
    }
}
