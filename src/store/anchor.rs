//! The store's generation, kept outside the store: a copy of the whole store put back (every row
//! and the commitment together, all genuine) is older than what was seen here before.
//!
//! The anchor file lives in the user's state directory (`$XDG_STATE_HOME/keyhold/anchors`, else
//! `~/.local/state/keyhold/anchors`), one file per store, named by the store's ID. Whoever can
//! write the store directory can usually write there too: it is a tripwire that catches a restored
//! copy, a mistake or a careless intruder, not a guarantee. (A TPM's counter is the guarantee.)

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{tampered, StoreState};
use crate::audit::Head;
use crate::error::{Error, Result};

/// What a counter outside the store shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterValue {
    /// There is none.
    Absent,
    /// Something is there, but not keyhold's counter for this store.
    Foreign,
    /// keyhold's counter, at this count.
    Count(u64),
}

/// A monotonic counter outside the store that follows its generation: a TPM NV counter. Only
/// keyhold with the store's root can advance it (its authorisation is derived from the root).
pub trait Counter: Send + Sync + std::fmt::Debug {
    /// How messages name it (`the TPM NV counter 0x01234567 of TPM `tpm``).
    fn describe(&self) -> String;
    /// Where it is, as the store's state records it.
    fn at(&self) -> crate::store::CounterAt;
    /// How a counter of this kind can be gone (`it was deleted with …`), for messages.
    fn gone_how(&self) -> &'static str;
    /// What else its place can hold (`other attributes, or …`), for messages.
    fn foreign_how(&self) -> &'static str;
    /// What it shows now.
    ///
    /// # Errors
    /// Device errors.
    fn read(&self) -> Result<CounterValue>;
    /// Makes it (it then reads as a count: wherever the device's counters have got to).
    ///
    /// # Errors
    /// Device errors.
    fn create(&self) -> Result<()>;
    /// Adds one.
    ///
    /// # Errors
    /// Device errors.
    fn increment(&self) -> Result<()>;
}

/// How a store's state and its counter compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CounterCheck {
    /// The counter is where the state says (or the state is not bound to it yet).
    InStep,
    /// One behind: a crash between a change and the counter's increment; the next change or open
    /// advances it.
    OneBehind,
    /// Anything else, and why.
    Refused(String),
}

/// Reads `counter` and compares it with `state` (nothing is written).
///
/// # Errors
/// The counter's device errors.
pub fn compare_counter(counter: &dyn Counter, state: &StoreState) -> Result<CounterCheck> {
    Ok(judge_counter(counter.read()?, counter, state))
}

/// How `value`, read from `counter`, compares with `state`.
pub fn judge_counter(
    value: CounterValue,
    counter: &dyn Counter,
    state: &StoreState,
) -> CounterCheck {
    let Some(expected) = state.counter.and_then(|b| b.expected(state.generation)) else {
        return CounterCheck::InStep;
    };
    match value {
        CounterValue::Count(count) if count == expected => CounterCheck::InStep,
        CounterValue::Count(count) if count.wrapping_add(1) == expected => CounterCheck::OneBehind,
        CounterValue::Count(count) if count > expected => CounterCheck::Refused(format!(
            "the store is older than {}: it is at generation {}, for which the counter should be \
             at {expected}, but it is at {count}: it was restored from a copy",
            counter.describe(),
            state.generation
        )),
        CounterValue::Count(count) => CounterCheck::Refused(format!(
            "{} is at {count}, {} behind the store (at generation {}, for which it should be at \
             {expected}): it is not the counter this store was anchored in",
            counter.describe(),
            expected.wrapping_sub(count),
            state.generation
        )),
        CounterValue::Absent => CounterCheck::Refused(format!(
            "{} that anchors this store is gone: {}",
            counter.describe(),
            counter.gone_how()
        )),
        CounterValue::Foreign => CounterCheck::Refused(foreign_text(counter)),
    }
}

pub(super) fn foreign_text(counter: &dyn Counter) -> String {
    format!(
        "{} holds something other than keyhold's counter for this store ({})",
        counter.describe(),
        counter.foreign_how()
    )
}

pub(super) fn foreign(counter: &dyn Counter) -> Error {
    tampered(foreign_text(counter))
}

/// How long an update waits for another process's update of the same anchor.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(8);

/// The file's first line.
const HEADER: &str = "keyhold store anchor v1";

/// One store's anchor file.
#[derive(Debug, Clone)]
pub struct FileAnchor {
    path: PathBuf,
}

impl FileAnchor {
    /// The directory anchors live in when the configuration names none: `$XDG_STATE_HOME/keyhold/
    /// anchors`, else `$HOME/.local/state/keyhold/anchors`; `None` without either variable.
    pub fn default_dir() -> Option<PathBuf> {
        let absolute = |v: std::ffi::OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
        let base = std::env::var_os("XDG_STATE_HOME")
            .and_then(absolute)
            .or_else(|| {
                std::env::var_os("HOME")
                    .and_then(absolute)
                    .map(|home| home.join(".local/state"))
            })?;
        Some(base.join("keyhold").join("anchors"))
    }

    /// The anchor of the store `store_id` in `dir`.
    pub fn new(dir: &Path, store_id: &[u8; 16]) -> Self {
        Self {
            path: dir.join(crate::hex::encode(store_id)),
        }
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The generation recorded, if there is a readable anchor.
    ///
    /// # Errors
    /// I/O errors other than the file's absence. A file that does not parse reads as absent (a
    /// torn write after a crash): it is rewritten at the next change.
    pub fn read(&self) -> Result<Option<u64>> {
        Ok(self.read_all()?.generation)
    }

    /// The audit log's last entry recorded, if any.
    ///
    /// # Errors
    /// As [`Self::read`].
    pub fn read_audit(&self) -> Result<Option<Head>> {
        Ok(self.read_all()?.audit)
    }

    fn read_all(&self) -> Result<Recorded> {
        match fs::read_to_string(&self.path) {
            Ok(text) => Ok(parse(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Recorded::default()),
            Err(e) => Err(Error::io(format!("read {}", self.path.display()), e)),
        }
    }

    /// Records `generation` unless the file already holds a later one (two processes may finish
    /// their changes in either order).
    ///
    /// # Errors
    /// I/O errors.
    pub fn advance(&self, generation: u64) -> Result<()> {
        self.update(|recorded| {
            if recorded.generation.is_some_and(|g| g >= generation) {
                return false;
            }
            recorded.generation = Some(generation);
            true
        })
    }

    /// Records `head` as the audit log's last entry unless a later one is recorded.
    ///
    /// # Errors
    /// I/O errors.
    pub fn record_audit(&self, head: Head) -> Result<()> {
        self.update(|recorded| {
            if recorded.audit.is_some_and(|a| a.seq >= head.seq) {
                return false;
            }
            recorded.audit = Some(head);
            true
        })
    }

    /// Records `head` as the audit log's last entry, replacing any later one: for a log put back
    /// on purpose (a restore), whose end is earlier than what the file recorded.
    ///
    /// # Errors
    /// I/O errors.
    pub fn set_audit(&self, head: Head) -> Result<()> {
        self.update(|recorded| {
            recorded.audit = Some(head);
            true
        })
    }

    /// Reads the file under its lock, lets `change` change what it records, and writes it back
    /// if `change` says so.
    fn update(&self, change: impl FnOnce(&mut Recorded) -> bool) -> Result<()> {
        let io = |what: &str, e: std::io::Error| {
            Error::io(
                format!("{what} the store anchor {}", self.path.display()),
                e,
            )
        };
        if let Some(dir) = self.path.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| io("create the directory of", e))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&self.path)
            .map_err(|e| io("open", e))?;
        crate::audit::lock_exclusive(&file, LOCK_WAIT).map_err(|e| io("lock", e))?;
        let mut text = String::new();
        // Unreadable content is replaced (see `read`).
        let _ = file.read_to_string(&mut text);
        let mut recorded = parse(&text);
        if !change(&mut recorded) {
            return Ok(());
        }
        write_whole(&mut file, &recorded.render()).map_err(|e| io("write", e))
    }
}

/// Not flushed to disk: after a power loss the file may lag behind the store or read as torn,
/// and either only makes the next open accept the store and rewrite the file (a store is refused
/// for being older than its anchor, never for being newer). An fsync here would cost every change
/// of the store a second flush.
fn write_whole(file: &mut File, text: &str) -> std::io::Result<()> {
    file.set_len(0)?;
    file.rewind()?;
    file.write_all(text.as_bytes())
}

/// What an anchor file records: the store's generation (line 2) and the audit log's last entry
/// (line 3, `audit SEQ HASH`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Recorded {
    generation: Option<u64>,
    audit: Option<Head>,
}

impl Recorded {
    fn render(&self) -> String {
        let mut text = format!("{HEADER}\n{}\n", self.generation.unwrap_or_default());
        if let Some(head) = self.audit {
            text.push_str(&format!(
                "audit {} {}\n",
                head.seq,
                crate::hex::encode(&head.hash)
            ));
        }
        text
    }
}

fn parse(text: &str) -> Recorded {
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Recorded::default();
    }
    // A generation no store reaches (2^62 changes) is a forged file: read as absent, so that it
    // can neither wrap a store's generation around nor keep it refused for good.
    let generation = lines
        .next()
        .and_then(|l| l.trim().parse::<u64>().ok())
        .filter(|g| *g < 1 << 62);
    let audit = lines.next().and_then(|l| {
        let mut parts = l.strip_prefix("audit ")?.split(' ');
        let seq = parts.next()?.parse().ok()?;
        let hash = crate::hex::decode(parts.next()?)?.try_into().ok()?;
        Some(Head { seq, hash })
    });
    Recorded { generation, audit }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn advances_only_forward_and_survives_a_torn_file() {
        let dir = tempfile::tempdir().unwrap();
        let anchor = FileAnchor::new(&dir.path().join("a/b"), &[7; 16]);
        assert_eq!(anchor.read().unwrap(), None);
        anchor.advance(5).unwrap();
        assert_eq!(anchor.read().unwrap(), Some(5));
        anchor.advance(3).unwrap();
        assert_eq!(
            anchor.read().unwrap(),
            Some(5),
            "an earlier generation never lowers it"
        );
        anchor.advance(6).unwrap();
        assert_eq!(anchor.read().unwrap(), Some(6));
        fs::write(anchor.path(), "keyhold store anch").unwrap();
        assert_eq!(anchor.read().unwrap(), None, "a torn file reads as absent");
        anchor.advance(2).unwrap();
        assert_eq!(anchor.read().unwrap(), Some(2));
        let head = |seq| Head {
            seq,
            hash: [seq as u8; 32],
        };
        anchor.record_audit(head(4)).unwrap();
        anchor.record_audit(head(3)).unwrap();
        anchor.advance(3).unwrap();
        assert_eq!(
            anchor.read().unwrap(),
            Some(3),
            "the audit line kept the generation"
        );
        assert_eq!(
            anchor.read_audit().unwrap(),
            Some(head(4)),
            "kept by the generation's update, never lowered"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(anchor.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
