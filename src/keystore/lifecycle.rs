//! The key lifecycle (NIST SP 800-57 Part 1 §7): state transitions, schedules (activation,
//! expiry, rotation, destruction), the key's history, and the due work that every command runs
//! for the key it touches and `maintain` runs for all.
//!
//! Every change is one write transaction that re-reads and re-verifies the record under the
//! write lock, changes it, and appends to the key's history: it happens whole or not at all,
//! and two processes changing one key take turns. Destruction is the one change in three steps,
//! each safe to repeat: the record becomes `destroyed` (from then on nothing uses the key, and
//! nothing can cancel), the backend destroys every version's objects, and the record's material
//! is erased (SQLite `secure_delete` overwrites it), leaving a tombstone. A crash between steps
//! leaves a destroyed key whose material `maintain` (or the next command on it) finishes erasing.

use std::sync::Arc;
use std::time::Duration;

use super::resolve::Resolved;
use super::{KeyInfo, Keystore};
use crate::error::{Error, Result};
use crate::key::{KeyState, KeyUse};
use crate::store::{EventRecord, KeyRecord, Tx};
use crate::time::format_utc;

/// A state change asked for by hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transition {
    /// Active → suspended: processes only, until resumed.
    Suspend,
    /// Suspended → active.
    Resume,
    /// Pre-activation, active or suspended → deactivated, for good.
    Deactivate,
    /// Any state but destroyed → compromised, for good.
    Compromise,
}

impl Transition {
    fn target(self) -> KeyState {
        match self {
            Self::Suspend => KeyState::Suspended,
            Self::Resume => KeyState::Active,
            Self::Deactivate => KeyState::Deactivated,
            Self::Compromise => KeyState::Compromised,
        }
    }

    fn allowed_from(self, state: KeyState) -> bool {
        match self {
            Self::Suspend => state == KeyState::Active,
            Self::Resume => state == KeyState::Suspended,
            Self::Deactivate => matches!(
                state,
                KeyState::PreActivation | KeyState::Active | KeyState::Suspended
            ),
            Self::Compromise => !matches!(state, KeyState::Compromised | KeyState::Destroyed),
        }
    }

    fn event(self) -> &'static str {
        match self {
            Self::Suspend => "suspended",
            Self::Resume => "resumed",
            Self::Deactivate => "deactivated",
            Self::Compromise => "compromised",
        }
    }

    /// The audit log's name of the command.
    fn operation(self) -> &'static str {
        match self {
            Self::Suspend => "suspend",
            Self::Resume => "resume",
            Self::Deactivate => "deactivate",
            Self::Compromise => "compromise",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Self::Suspend => "be suspended",
            Self::Resume => "be resumed",
            Self::Deactivate => "be deactivated",
            Self::Compromise => "be marked compromised",
        }
    }
}

/// Changes to a key's schedule and version policy; `None` leaves a setting as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PolicyChange {
    /// Rotate when the current version is this old (`Some(None)` stops automatic rotation).
    pub rotate_after: Option<Option<Duration>>,
    /// Activate at this time (only for a key in pre-activation; `Some(None)` activates now).
    pub activate_at: Option<Option<i64>>,
    /// Deactivate at this time (`Some(None)` removes the expiry).
    pub deactivate_at: Option<Option<i64>>,
    /// The oldest version that may still decrypt and verify.
    pub min_decrypt_version: Option<u32>,
}

impl PolicyChange {
    /// No change.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`PolicyChange::rotate_after`].
    pub fn rotate_after(mut self, after: Option<Duration>) -> Self {
        self.rotate_after = Some(after);
        self
    }

    /// Sets [`PolicyChange::activate_at`].
    pub fn activate_at(mut self, at: Option<i64>) -> Self {
        self.activate_at = Some(at);
        self
    }

    /// Sets [`PolicyChange::deactivate_at`].
    pub fn deactivate_at(mut self, at: Option<i64>) -> Self {
        self.deactivate_at = Some(at);
        self
    }

    /// Sets [`PolicyChange::min_decrypt_version`].
    pub fn min_decrypt_version(mut self, version: u32) -> Self {
        self.min_decrypt_version = Some(version);
        self
    }
}

/// A [`PolicyChange`] as text, as `keyhold key set` and the service take it: each setting absent
/// (left as it is) or its text.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyText {
    /// `DURATION` (`90d`) or `never`.
    pub rotate_after: Option<String>,
    /// An RFC 3339 UTC time, `+DURATION` from now, or `never`.
    pub deactivate_at: Option<String>,
    /// An RFC 3339 UTC time, `+DURATION` from now, or `now`.
    pub activate_at: Option<String>,
    /// From 1 to the key's current version.
    pub min_decrypt_version: Option<u32>,
}

impl PolicyText {
    /// The change, with times counted from `now`, and how to say each part of it (empty: nothing
    /// to change).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a duration or time that cannot be read.
    pub fn parse(&self, now: i64) -> Result<(PolicyChange, Vec<String>)> {
        /// `never` for the settings that can be turned off, else what `parse` makes of the text.
        fn or_never<T>(text: &str, parse: impl FnOnce(&str) -> Result<T>) -> Result<Option<T>> {
            if text.trim() == "never" {
                Ok(None)
            } else {
                parse(text).map(Some)
            }
        }
        let instant = |t: &str| crate::time::parse_instant(t, now);
        let mut policy = PolicyChange::new();
        let mut said = Vec::new();
        if let Some(text) = &self.rotate_after {
            let after = or_never(text, crate::time::parse_duration)?;
            // Checked to fit the store's seconds, and said as they will be kept.
            let secs = after.map(crate::time::duration_secs).transpose()?;
            let said_after = match secs.and_then(|s| u64::try_from(s).ok()) {
                Some(s) => humantime::format_duration(Duration::from_secs(s)).to_string(),
                None => "never".into(),
            };
            said.push(format!("rotate after {said_after}"));
            policy = policy.rotate_after(after);
        }
        if let Some(text) = &self.deactivate_at {
            let at = or_never(text, instant)?;
            said.push(format!(
                "deactivate at {}",
                at.map_or("never".into(), format_utc)
            ));
            policy = policy.deactivate_at(at);
        }
        if let Some(text) = &self.activate_at {
            let at = if text.trim() == "now" {
                None
            } else {
                Some(instant(text)?)
            };
            said.push(format!(
                "activate at {}",
                at.map_or("now".into(), format_utc)
            ));
            policy = policy.activate_at(at);
        }
        if let Some(min) = self.min_decrypt_version {
            said.push(format!("min decrypt version {min}"));
            policy = policy.min_decrypt_version(min);
        }
        Ok((policy, said))
    }
}

/// The state a key's first history entry is stored as coming from: it had none.
pub(super) const NO_STATE: &str = "none";

/// One entry of a key's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEvent {
    /// Its place in the history, from 1.
    pub seq: u32,
    /// When, seconds since the Unix epoch.
    pub at: i64,
    /// What happened: `created`, `rotated`, `suspended`, `resumed`, `deactivated`, `expired`,
    /// `activated`, `compromised`, `destroy-scheduled`, `destroy-cancelled`, `destroying`,
    /// `destroyed`, `policy-changed`.
    pub event: String,
    /// The state before; `None` for the entry that made the key (`created`, `imported`).
    pub from: Option<String>,
    /// The state after.
    pub to: String,
    /// The current version after it.
    pub version: u32,
    /// Why: the operator's words, or what keyhold did on its own (`rotate-after reached`).
    pub reason: Option<String>,
}

impl KeyEvent {
    /// The entry as JSON (docs/cli.md, `key history --json`), its time in UTC.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "seq": self.seq,
            "at": format_utc(self.at),
            "event": self.event,
            "from": self.from,
            "to": self.to,
            "version": self.version,
            "reason": self.reason,
        })
    }
}

/// Something [`Keystore::maintain`] (or a command's due work) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    /// The key's `namespace/name`.
    pub key: String,
    /// What was done (`activated`, `expired`, `rotated to version 3`, `destroyed`).
    pub action: String,
}

/// What [`Keystore::maintain`] did and what it could not do.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Maintenance {
    /// What was done, key by key.
    pub done: Vec<Done>,
    /// Keys whose due work failed (`namespace/name`, why): a device away, a failed rotation.
    pub failed: Vec<(String, Error)>,
}

/// Work a key's schedule makes due at a given time, in the order it is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    /// A destruction begun and not finished (a crash, or a device that was away).
    FinishDestruction,
    Destroy,
    Activate,
    Expire,
    Rotate,
}

/// The longest free text a reason may be.
const MAX_REASON: usize = 1024;

fn check_reason(reason: Option<&str>) -> Result<Option<String>> {
    let Some(reason) = reason else {
        return Ok(None);
    };
    if reason.len() > MAX_REASON || reason.chars().any(char::is_control) {
        return Err(Error::InvalidInput(format!(
            "a reason is at most {MAX_REASON} bytes of text without control characters"
        )));
    }
    Ok(Some(reason.to_owned()))
}

impl Keystore {
    /// Resolves `id` and runs whatever its schedule makes due now; the key as it then is.
    pub(super) fn resolve_current(&self, id: &str) -> Result<Arc<Resolved>> {
        let resolved = self.resolve(id)?;
        if Self::due(&resolved, crate::time::now()).is_none() {
            return Ok(resolved);
        }
        super::memory_only::may_wait("run the key's due work")?;
        match self.run_due(resolved, &mut Vec::new(), false) {
            Ok(current) => Ok(current),
            Err(e) => {
                // A destruction begun whose device is away: the key is destroyed all the same
                // (nothing uses it again), and the next command or `maintain` finishes erasing it.
                let now = Arc::new(self.resolve_uncached(id)?);
                if now.state != KeyState::Destroyed {
                    return Err(e);
                }
                tracing::warn!(key = %now.label, "the destroyed key's material is not all erased yet: {e}");
                Ok(now)
            }
        }
    }

    /// The first work due for `r` at `now`, if any.
    fn due(r: &Resolved, now: i64) -> Option<Due> {
        let rec = &r.record;
        if r.state == KeyState::Destroyed {
            return rec.destroyed_at.is_none().then_some(Due::FinishDestruction);
        }
        if rec.destroy_at.is_some_and(|at| at <= now) {
            return Some(Due::Destroy);
        }
        if r.state == KeyState::PreActivation && rec.activate_at.is_none_or(|at| at <= now) {
            return Some(Due::Activate);
        }
        let live = matches!(
            r.state,
            KeyState::PreActivation | KeyState::Active | KeyState::Suspended
        );
        if live && rec.deactivate_at.is_some_and(|at| at <= now) {
            return Some(Due::Expire);
        }
        if r.state == KeyState::Active && rec.destroy_at.is_none() {
            if let (Some(after), Ok(current)) = (rec.rotate_after, r.current()) {
                if now.saturating_sub(current.created_at) >= after {
                    return Some(Due::Rotate);
                }
            }
        }
        None
    }

    /// Runs every piece of work due for `r`, noting each in `done`; the key as it then is. Each
    /// step decides again, under the write lock, from the record as it is then: a schedule
    /// cancelled or moved meanwhile (by another process, or after `maintain` read every record)
    /// is not acted on. A failed automatic rotation is an error when `strict` (maintenance, which
    /// must say so), else said and left for the next command (a use goes on with the current
    /// version).
    fn run_due(
        &self,
        mut r: Arc<Resolved>,
        done: &mut Vec<Done>,
        strict: bool,
    ) -> Result<Arc<Resolved>> {
        // Each step changes what is due; a handful of steps covers every schedule (activation,
        // expiry, one rotation, destruction).
        for _ in 0..6 {
            let Some(due) = Self::due(&r, crate::time::now()) else {
                break;
            };
            let key = r.label.clone();
            let before = (r.state, r.record.version);
            r = Arc::new(match due {
                Due::FinishDestruction | Due::Destroy => self.destroy_now(&r, None, false)?,
                Due::Activate => self.scheduled_state(
                    &r,
                    due,
                    KeyState::Active,
                    "activated",
                    "activation time reached",
                )?,
                Due::Expire => self.scheduled_state(
                    &r,
                    due,
                    KeyState::Deactivated,
                    "expired",
                    "deactivation time reached",
                )?,
                Due::Rotate => match self.rotate_resolved(&r, Some("rotate-after reached")) {
                    Ok(rotated) => rotated,
                    Err(e) if strict => return Err(e),
                    Err(e) => {
                        tracing::warn!(key = %key, "automatic rotation failed: {e}");
                        break;
                    }
                },
            });
            let action = match (due, r.state) {
                (Due::FinishDestruction | Due::Destroy, KeyState::Destroyed) => "destroyed".into(),
                (Due::Activate, KeyState::Active) if before.0 != KeyState::Active => {
                    "activated".into()
                }
                (Due::Expire, KeyState::Deactivated) if before.0 != KeyState::Deactivated => {
                    "expired (deactivated)".into()
                }
                (Due::Rotate, _) if r.record.version > before.1 => {
                    format!("rotated to version {}", r.record.version)
                }
                // No longer due when looked at under the lock: nothing was done.
                _ => break,
            };
            tracing::info!(key = %key, "{action}");
            done.push(Done { key, action });
        }
        Ok(r)
    }

    /// Moves the key to `to` if, under the write lock, `due` is still what its schedule makes
    /// due.
    fn scheduled_state(
        &self,
        r: &Resolved,
        due: Due,
        to: KeyState,
        event: &'static str,
        reason: &str,
    ) -> Result<Resolved> {
        self.change(&r.record.uuid, event, Some(reason), |_, now| {
            if Self::due(now, crate::time::now()) != Some(due) {
                return Ok(None);
            }
            let mut rec = now.record.clone();
            rec.state = to.as_str().to_owned();
            Ok(Some(rec))
        })
    }

    /// Runs the work every key's schedule makes due now (activations, expiries, rotations,
    /// destructions): what was done, key by key, and each key whose work failed, with why (the
    /// other keys' work is done all the same). Run it from a timer (docs/cli.md shows a systemd
    /// timer); every command also runs it for the key it touches.
    ///
    /// # Errors
    /// [`Error::Integrity`] if a record fails its MAC (nothing is done then); storage errors.
    pub fn maintain(&self) -> Result<Maintenance> {
        self.maintain_observed(|_| {})
    }

    /// [`Self::maintain`], calling `before_each` with each due key's `namespace/name` before
    /// its work: tests use it to change a key between maintenance's first read and its work.
    #[cfg(any(test, feature = "testing"))]
    #[doc(hidden)]
    pub fn maintain_then(&self, before_each: impl FnMut(&str)) -> Result<Maintenance> {
        self.maintain_observed(before_each)
    }

    fn maintain_observed(&self, mut before_each: impl FnMut(&str)) -> Result<Maintenance> {
        let records = self.all_verified()?;
        let now = crate::time::now();
        let mut report = Maintenance::default();
        for r in records {
            if Self::due(&r, now).is_none() {
                continue;
            }
            let key = r.label.clone();
            before_each(&key);
            if let Err(e) = self.run_due(Arc::new(r), &mut report.done, true) {
                tracing::error!(key = %key, "due lifecycle work failed: {e}");
                report.failed.push((key, e));
            }
        }
        Ok(report)
    }

    /// Runs the lifecycle command `operation` on the key `id`; a failure is recorded in the audit
    /// log (a success is recorded by the change itself).
    pub(super) fn audited<T>(
        &self,
        id: &str,
        operation: &'static str,
        command: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let result = command();
        if let Err(e) = &result {
            self.audit_lifecycle_failed(id, operation, e);
        }
        result
    }

    /// The error for a use the key's state forbids.
    pub(super) fn wrong_state(
        &self,
        r: &Resolved,
        operation: &'static str,
        key_use: KeyUse,
    ) -> Error {
        let rec = &r.record;
        let (state, hint) = match r.state {
            KeyState::PreActivation => (
                match rec.activate_at {
                    Some(at) => format!("in pre-activation until {}", format_utc(at)),
                    None => "in pre-activation".to_owned(),
                },
                String::new(),
            ),
            KeyState::Suspended => (
                "suspended".to_owned(),
                "; a suspended key only decrypts and verifies: `keyhold key resume` makes it \
                 active again"
                    .to_owned(),
            ),
            KeyState::Deactivated => (
                "deactivated".to_owned(),
                "; a deactivated key only decrypts and verifies, for good: create or rotate to \
                 a new key"
                    .to_owned(),
            ),
            KeyState::Compromised => (
                "compromised".to_owned(),
                if key_use == KeyUse::Process {
                    "; pass --allow-compromised to decrypt or verify with it anyway".to_owned()
                } else {
                    "; a compromised key never signs, encrypts or computes MACs again".to_owned()
                },
            ),
            KeyState::Destroyed => (
                match rec.destroyed_at.or(rec.destroy_at) {
                    Some(at) => format!("destroyed on {}", format_utc(at)),
                    None => "destroyed".to_owned(),
                },
                String::new(),
            ),
            KeyState::Active => ("active".to_owned(), String::new()),
        };
        Error::WrongState {
            key: r.label.clone(),
            state,
            operation,
            hint,
        }
    }

    /// Applies `change` to the key `uuid` in one write transaction: reads and verifies the
    /// record and its versions under the write lock, lets `change` make the new record (and write
    /// what else it needs), MACs and stores it, and appends `event` to the key's history.
    /// `change` returning `None` changes nothing.
    pub(super) fn change(
        &self,
        uuid: &[u8; 16],
        event: &'static str,
        reason: Option<&str>,
        change: impl FnOnce(&Tx<'_>, &Resolved) -> Result<Option<KeyRecord>>,
    ) -> Result<Resolved> {
        let reason = check_reason(reason)?;
        let result = self.store.write(|tx| {
            let record = tx.key(uuid)?.ok_or_else(|| Error::Integrity {
                what: format!(
                    "the record of key {} vanished while it was being changed",
                    crate::hex::encode(uuid)
                ),
            })?;
            let versions = if record.version > 1 && record.destroyed_at.is_none() {
                tx.versions(uuid)?
            } else {
                Vec::new()
            };
            let before = self.verified_with(record, versions)?;
            let Some(mut after) = change(tx, &before)? else {
                return Ok(before);
            };
            after.updated_at = crate::time::now();
            self.seal_record(&mut after);
            tx.update_key(&after)?;
            self.record_event(tx, &before.record, &after, event, reason.clone())?;
            let versions = if after.version > 1 && after.destroyed_at.is_none() {
                tx.versions(uuid)?
            } else {
                Vec::new()
            };
            let changed = self.verified_with(after, versions)?;
            // Written before the commit: no change is made that the log does not show.
            tx.note_audit(self.audit_lifecycle(&changed, event)?);
            Ok(changed)
        });
        self.invalidate();
        result
    }

    /// Appends one entry to a key's history (in the caller's transaction).
    pub(super) fn record_event(
        &self,
        tx: &Tx<'_>,
        before: &KeyRecord,
        after: &KeyRecord,
        event: &'static str,
        reason: Option<String>,
    ) -> Result<()> {
        let mut row = EventRecord {
            uuid: after.uuid,
            seq: tx.next_event_seq(&after.uuid)?,
            at: after.updated_at,
            event: event.to_owned(),
            from_state: before.state.clone(),
            to_state: after.state.clone(),
            version: after.version,
            reason,
            mac: Vec::new(),
        };
        row.mac = self.sign_row(&row.mac_input(&self.store_id));
        tx.insert_event(&row)
    }

    /// Suspends, resumes, deactivates or marks compromised the key `id`, with an optional
    /// reason recorded in its history.
    ///
    /// # Errors
    /// [`Error::WrongState`] if the key's state does not allow the transition; resolution and
    /// storage errors.
    pub fn change_state(
        &self,
        id: &str,
        transition: Transition,
        reason: Option<&str>,
    ) -> Result<KeyInfo> {
        self.audited(id, transition.operation(), || {
            self.change_state_unaudited(id, transition, reason)
        })
    }

    fn change_state_unaudited(
        &self,
        id: &str,
        transition: Transition,
        reason: Option<&str>,
    ) -> Result<KeyInfo> {
        let r = self.resolve_current(id)?;
        let changed = self.change(&r.record.uuid, transition.event(), reason, |_, now| {
            if !transition.allowed_from(now.state) {
                return Err(self.cannot(now, transition.verb()));
            }
            let mut rec = now.record.clone();
            rec.state = transition.target().as_str().to_owned();
            Ok(Some(rec))
        })?;
        tracing::info!(key = %changed.label, "{}", transition.event());
        self.info(&changed)
    }

    /// [`Error::WrongState`] for a lifecycle change the key's state does not allow.
    fn cannot(&self, r: &Resolved, what: &'static str) -> Error {
        let state = match (r.state, r.record.destroyed_at) {
            (KeyState::Destroyed, Some(at)) => format!("destroyed on {}", format_utc(at)),
            (state, _) => state.as_str().to_owned(),
        };
        Error::WrongState {
            key: r.label.clone(),
            state,
            operation: what,
            hint: String::new(),
        }
    }

    /// Changes the key's schedule or version policy ([`PolicyChange`]).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a `min_decrypt_version` outside 1..=current version, an
    /// activation time for a key already active; [`Error::WrongState`] for a destroyed key;
    /// resolution and storage errors.
    pub fn set_policy(
        &self,
        id: &str,
        policy: &PolicyChange,
        reason: Option<&str>,
    ) -> Result<KeyInfo> {
        self.audited(id, "set-policy", || {
            self.set_policy_unaudited(id, policy, reason)
        })
    }

    fn set_policy_unaudited(
        &self,
        id: &str,
        policy: &PolicyChange,
        reason: Option<&str>,
    ) -> Result<KeyInfo> {
        for (at, what) in [
            (policy.activate_at.flatten(), "the activation time"),
            (policy.deactivate_at.flatten(), "the deactivation time"),
        ] {
            if let Some(at) = at {
                crate::time::check_instant(at, what)?;
            }
        }
        let r = self.resolve_current(id)?;
        let changed = self.change(&r.record.uuid, "policy-changed", reason, |_, now| {
            if now.state == KeyState::Destroyed {
                return Err(self.cannot(now, "change its policy"));
            }
            let mut rec = now.record.clone();
            if let Some(after) = policy.rotate_after {
                rec.rotate_after = after
                    .map(|d| {
                        if d.as_secs() == 0 {
                            return Err(Error::InvalidInput(
                                "--rotate-after must be at least one second".into(),
                            ));
                        }
                        crate::time::duration_secs(d)
                    })
                    .transpose()?;
            }
            if let Some(at) = policy.activate_at {
                if now.state != KeyState::PreActivation {
                    return Err(Error::InvalidInput(format!(
                        "key `{}` is {}: only a key in pre-activation has an activation time",
                        now.label, now.state
                    )));
                }
                rec.activate_at = at;
            }
            if let Some(at) = policy.deactivate_at {
                rec.deactivate_at = at;
            }
            if let Some(min) = policy.min_decrypt_version {
                if min == 0 || min > rec.version {
                    return Err(Error::InvalidInput(format!(
                        "key `{}` has versions 1 to {}: --min-decrypt-version must be one of them",
                        now.label, rec.version
                    )));
                }
                rec.min_decrypt_version = min;
            }
            Ok(Some(rec))
        })?;
        // A time now past (`--activate-at now`, an expiry in the past) takes effect at once.
        let changed = self.run_due(Arc::new(changed), &mut Vec::new(), false)?;
        self.info(&changed)
    }

    /// Schedules the destruction of the key `id` at `at` (seconds since the epoch); until then
    /// it only decrypts and verifies, and [`Self::cancel_destroy`] keeps it. A time not in the
    /// future destroys it now.
    ///
    /// # Errors
    /// [`Error::WrongState`] for a destroyed key; resolution, backend and storage errors.
    pub fn schedule_destroy(&self, id: &str, at: i64, reason: Option<&str>) -> Result<KeyInfo> {
        // A time past what can be kept is refused; one before now (even before 1970) is now.
        if at > crate::time::LAST_INSTANT {
            crate::time::check_instant(at, "the destruction time")?;
        }
        self.audited(id, "schedule-destroy", || {
            self.schedule_destroy_unaudited(id, at, reason)
        })
    }

    fn schedule_destroy_unaudited(
        &self,
        id: &str,
        at: i64,
        reason: Option<&str>,
    ) -> Result<KeyInfo> {
        let r = self.resolve_current(id)?;
        if at <= crate::time::now() && r.state != KeyState::Destroyed {
            // Due now: no schedule to record, the destruction itself is.
            let destroyed = self.destroy_now(&r, reason, true)?;
            return self.info(&destroyed);
        }
        let scheduled = self.change(&r.record.uuid, "destroy-scheduled", reason, |_, now| {
            if now.state == KeyState::Destroyed {
                return Err(self.cannot(now, "be destroyed again"));
            }
            let mut rec = now.record.clone();
            rec.destroy_at = Some(at);
            Ok(Some(rec))
        })?;
        tracing::info!(key = %scheduled.label, at = %format_utc(at), "destruction scheduled");
        let r = self.run_due(Arc::new(scheduled), &mut Vec::new(), false)?;
        self.info(&r)
    }

    /// Destroys the key `id` now: its material in the backend (every version) and in the store;
    /// its record stays as a tombstone, so its ID answers "destroyed on DATE".
    ///
    /// # Errors
    /// [`Error::WrongState`] for a key already destroyed; resolution, backend and storage errors.
    pub fn destroy_key(&self, id: &str) -> Result<KeyInfo> {
        self.audited(id, "destroy", || {
            self.schedule_destroy_unaudited(id, crate::time::now(), None)
        })
    }

    /// Cancels the scheduled destruction of the key `id`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if none is scheduled; [`Error::WrongState`] once destruction has
    /// begun; resolution and storage errors.
    pub fn cancel_destroy(&self, id: &str, reason: Option<&str>) -> Result<KeyInfo> {
        self.audited(id, "cancel-destroy", || {
            self.cancel_destroy_unaudited(id, reason)
        })
    }

    fn cancel_destroy_unaudited(&self, id: &str, reason: Option<&str>) -> Result<KeyInfo> {
        let r = self.resolve_current(id)?;
        let changed = self.change(&r.record.uuid, "destroy-cancelled", reason, |_, now| {
            if now.state == KeyState::Destroyed {
                return Err(self.cannot(now, "be kept: its destruction has begun"));
            }
            if now.record.destroy_at.is_none() {
                return Err(Error::InvalidInput(format!(
                    "key `{}` is not scheduled for destruction: nothing to cancel",
                    now.label
                )));
            }
            let mut rec = now.record.clone();
            rec.destroy_at = None;
            Ok(Some(rec))
        })?;
        tracing::info!(key = %changed.label, "destruction cancelled");
        self.info(&changed)
    }

    /// Destroys a key whose destruction is due (or was begun): marks it destroyed, destroys
    /// every version's objects in the backend, then erases its material from the store.
    /// `immediate`: asked for now (`destroy_key`); otherwise only if, under the write lock, the
    /// key's scheduled destruction is still due (it may have been cancelled meanwhile). A key
    /// whose destruction began is finished either way.
    fn destroy_now(&self, r: &Resolved, reason: Option<&str>, immediate: bool) -> Result<Resolved> {
        let marked = self.change(&r.record.uuid, "destroying", reason, |_, now| {
            let due = now
                .record
                .destroy_at
                .is_some_and(|at| at <= crate::time::now());
            if now.state == KeyState::Destroyed || !(immediate || due) {
                return Ok(None);
            }
            let mut rec = now.record.clone();
            rec.state = KeyState::Destroyed.as_str().to_owned();
            rec.destroy_at = Some(rec.destroy_at.unwrap_or_else(crate::time::now));
            Ok(Some(rec))
        })?;
        if marked.state != KeyState::Destroyed || marked.material_destroyed() {
            return Ok(marked);
        }
        let backend = self.backend(&marked.record.backend)?;
        for material in marked.materials() {
            backend.destroy(self.key_ref(&marked, material))?;
        }
        let erased = self.change(&marked.record.uuid, "destroyed", None, |tx, now| {
            if now.material_destroyed() {
                return Ok(None);
            }
            tx.delete_material(&now.record.uuid)?;
            let mut rec = now.record.clone();
            rec.blob = None;
            rec.destroyed_at = Some(crate::time::now());
            Ok(Some(rec))
        })?;
        tracing::info!(key = %erased.label, "destroyed key");
        Ok(erased)
    }

    /// The history of the key `id`, oldest first, each entry's MAC checked.
    ///
    /// # Errors
    /// [`Error::Integrity`] if an entry fails its MAC or the sequence has a gap; resolution
    /// errors.
    pub fn history(&self, id: &str) -> Result<Vec<KeyEvent>> {
        let r = self.resolve_current(id)?;
        let rows = self.store.events(Some(&r.record.uuid))?;
        let mut events = Vec::with_capacity(rows.len());
        for (i, row) in rows.into_iter().enumerate() {
            if !self.row_ok(&row.mac_input(&self.store_id), &row.mac) || row.seq as usize != i + 1 {
                return Err(Error::Integrity {
                    what: format!(
                        "entry {} of the history of `{}` failed its MAC or is out of sequence",
                        i + 1,
                        r.label
                    ),
                });
            }
            events.push(KeyEvent {
                seq: row.seq,
                at: row.at,
                event: row.event,
                // Stored as `none` (under the row's MAC): no state, said as such.
                from: Some(row.from_state).filter(|s| s != NO_STATE),
                to: row.to_state,
                version: row.version,
                reason: row.reason,
            });
        }
        Ok(events)
    }
}
