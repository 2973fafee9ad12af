//! `keyhold store verify`: every record's MAC, the audit chain and every key's material in its
//! backend, checked to the end and reported as a whole, where opening a store stops at the first
//! failure. Verifying reads; it never writes to the store, the audit log or a device.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use aws_lc_rs::hmac;

use super::root::{meta_format, record_mac_ok, unseal_unchecked};
use super::Keystore;
use crate::backend::software::SoftwareBackend;
use crate::backend::{KeyContext, KeyRef};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::key::KeyState;
use crate::sealer::Sealer;
use crate::store::{CounterRecord, EventRecord, KeyRecord, Store, VersionRecord};

mod periodic;
mod report;

pub use periodic::PeriodicVerify;
pub use report::{CheckKind, Finding, KeyName, Section, Status, VerifyProgress, VerifyReport};

/// How often progress is told: often enough for a bar, rarely enough to cost nothing.
const PROGRESS_EVERY: u64 = 256;

/// A version, history or counter row that fails its MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FailingRow {
    Version { uuid: [u8; 16], version: u32 },
    Event { uuid: [u8; 16], seq: u32 },
    Counter { uuid: [u8; 16], version: u32 },
}

impl FailingRow {
    fn uuid(&self) -> &[u8; 16] {
        match self {
            Self::Version { uuid, .. } | Self::Event { uuid, .. } | Self::Counter { uuid, .. } => {
                uuid
            }
        }
    }

    fn version(&self) -> Option<u32> {
        match self {
            Self::Version { version, .. } | Self::Counter { version, .. } => Some(*version),
            Self::Event { .. } => None,
        }
    }

    /// What the row is, without its key (`version 2`, `history entry 3`, …).
    fn what(&self) -> String {
        match self {
            Self::Version { version, .. } => format!("version {version}"),
            Self::Event { seq, .. } => format!("history entry {seq}"),
            Self::Counter { version, .. } => format!("the AES-GCM counter of version {version}"),
        }
    }
}

impl std::fmt::Display for FailingRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of key {}",
            self.what(),
            crate::hex::encode(self.uuid())
        )
    }
}

/// The version, history and counter rows that fail their MAC under `key` (the record-MAC key)
/// for store `store_id`, in that order; shared by the check at open and `store verify`.
pub(super) fn failing_rows(
    key: &hmac::Key,
    store_id: &[u8; 16],
    versions: &[VersionRecord],
    events: &[EventRecord],
    counters: &[CounterRecord],
) -> Vec<FailingRow> {
    let failing = |input: Vec<u8>, mac: &[u8], row: FailingRow| {
        (!super::root::mac_ok(key, &input, mac)).then_some(row)
    };
    let versions = versions.iter().filter_map(|v| {
        let row = FailingRow::Version {
            uuid: v.uuid,
            version: v.version,
        };
        failing(v.mac_input(store_id), &v.mac, row)
    });
    let events = events.iter().filter_map(|e| {
        let row = FailingRow::Event {
            uuid: e.uuid,
            seq: e.seq,
        };
        failing(e.mac_input(store_id), &e.mac, row)
    });
    let counters = counters.iter().filter_map(|c| {
        let row = FailingRow::Counter {
            uuid: c.uuid,
            version: c.version,
        };
        failing(c.mac_input(store_id), &c.mac, row)
    });
    versions.chain(events).chain(counters).collect()
}

/// Every row of the store, as read for one verification. A table whose rows cannot be decoded is
/// a finding, not an error: the rest is still checked.
struct Rows {
    keys: Vec<KeyRecord>,
    versions: Vec<VersionRecord>,
    events: Vec<EventRecord>,
    counters: Vec<CounterRecord>,
    clients: Vec<crate::store::ClientRecord>,
    /// The committed state and the keys' digests, read with the rows (a finding in
    /// `commitment_unreadable` if they cannot be).
    state: Option<crate::store::StoreState>,
    digests: std::collections::BTreeMap<[u8; 16], crate::store::Sum>,
    commitment_unreadable: Vec<Finding>,
    unreadable: Vec<Finding>,
}

impl Rows {
    fn read(store: &Store) -> Result<Self> {
        let all = store.all_rows()?;
        let mut unreadable = Vec::new();
        let keys = table(all.keys, "key records", &mut unreadable)?;
        let versions = table(all.versions, "key versions", &mut unreadable)?;
        let events = table(all.events, "history entries", &mut unreadable)?;
        let counters = table(all.counters, "AES-GCM counters", &mut unreadable)?;
        let clients = table(all.clients, "token clients", &mut unreadable)?;
        let mut commitment_unreadable = Vec::new();
        let mut unreadable_commitment = |e: Error| match e {
            Error::Storage { .. } | Error::Io { .. } => Err(e),
            other => {
                commitment_unreadable.push(Finding {
                    status: Status::Failed,
                    key: None,
                    what: describe(&other),
                });
                Ok(())
            }
        };
        let state = match all.state {
            Ok(state) => state,
            Err(e) => {
                unreadable_commitment(e)?;
                None
            }
        };
        let digests = match all.digests {
            Ok(digests) => digests,
            Err(e) => {
                unreadable_commitment(e)?;
                std::collections::BTreeMap::new()
            }
        };
        Ok(Self {
            keys,
            versions,
            events,
            counters,
            clients,
            state,
            digests,
            commitment_unreadable,
            unreadable,
        })
    }
}

/// A table's rows, or none and a finding if they cannot all be decoded (changed outside keyhold).
fn table<T>(rows: Result<Vec<T>>, what: &str, unreadable: &mut Vec<Finding>) -> Result<Vec<T>> {
    match rows {
        Ok(rows) => Ok(rows),
        Err(Error::Integrity { what: why }) => {
            unreadable.push(Finding {
                status: Status::Failed,
                key: None,
                what: format!("the {what} cannot all be read: {why}"),
            });
            Ok(Vec::new())
        }
        Err(other) => Err(other),
    }
}

/// A key record as verification sees it: whether it authenticated, and its versions.
struct Checked<'a> {
    record: &'a KeyRecord,
    authenticated: bool,
    versions: Vec<&'a VersionRecord>,
}

impl Checked<'_> {
    fn label(&self) -> String {
        format!("{}/{}", self.record.namespace, self.record.name)
    }
}

/// The message of a finding made from `e`: what failed, without the advice every integrity
/// error repeats (the report gives it once).
fn describe(e: &Error) -> String {
    match e {
        Error::Integrity { what } => what.clone(),
        Error::KeyObjectMismatch { reason, .. } => {
            format!("its device object does not match its record: {reason}")
        }
        other => other.to_string(),
    }
}

/// Whether `e` says the device could not be asked (the key is unchecked), not that the key
/// failed.
fn is_unreachable(e: &Error) -> bool {
    matches!(
        e,
        Error::BackendUnavailable { .. }
            | Error::BackendLogin { .. }
            | Error::Timeout { .. }
            | Error::NotBuilt { .. }
    )
}

impl Keystore {
    /// Opens the store in `dir` and verifies it whole ([`Self::verify_store`]), where opening it for
    /// use ([`Self::open_with`]) refuses it at the first record that fails: every record that
    /// fails is reported, with the store's sealer metadata and, when no record at all
    /// authenticates, that the sealed root secret may have been replaced.
    ///
    /// The store is opened for this verification alone, nothing else can be done with it, and
    /// nothing is written: not the store, not the audit log (whose recording is off for it),
    /// not a device. (A store of an older schema is migrated at open, as by every command.)
    ///
    /// # Errors
    /// [`Error::StoreNotFound`], [`Error::StoreUnusable`]; [`Error::Unseal`] if the sealer is not
    /// the store's or does not unseal it; storage errors. What fails a check is in the report.
    pub fn open_and_verify(
        dir: &Path,
        sealer: &dyn Sealer,
        config: &Config,
        progress: &dyn Fn(VerifyProgress),
    ) -> Result<VerifyReport> {
        let store = Store::open(dir)?;
        let (_root, keys) = unseal_unchecked(&store, sealer)?;
        let meta = store.meta();
        let mut opening = Vec::new();
        if meta_format(&keys, meta).is_none() {
            opening.push(Finding {
                status: Status::Failed,
                key: None,
                what: format!(
                    "the store's sealer metadata (sealer `{}`, its parameters such as PCRs, SRK \
                     Name and recovery seal) {}",
                    meta.sealed_root.sealer,
                    if meta.mac.is_empty() {
                        "carries no MAC"
                    } else {
                        "fails its MAC"
                    }
                ),
            });
        }
        // The TPM counter the store is (or would be) anchored in, read and never advanced.
        let counter = super::anchor::counter_for(&store, Some(sealer), config, &keys)?;
        let mut config = config.clone();
        // Verifying writes nothing, not even an audit entry.
        config.audit.enabled = false;
        let ks = Self::with_root(store, &keys, &config)?;
        ks.verify_store_with(opening, counter.as_deref(), progress)
    }

    /// Verifies the whole store: every record's MAC (key records, later versions, history
    /// entries, AES-GCM counters), the audit log's MACs and chain, and every key version's
    /// material in its backend ([`crate::Backend::check_key`]). Every problem is reported, each
    /// naming its key; keys whose backend is unavailable or not configured are reported
    /// unchecked, not failed. Nothing is written (but the key uses this keystore buffered for
    /// the audit log, which are written first so that the log is verified whole).
    ///
    /// The store's sealer metadata was checked when this keystore opened; [`Self::open_and_verify`]
    /// checks it too.
    ///
    /// # Errors
    /// Storage errors that stop the reading of the store. What fails a check is in the report.
    pub fn verify_store(&self, progress: &dyn Fn(VerifyProgress)) -> Result<VerifyReport> {
        self.verify_store_with(Vec::new(), None, progress)
    }

    fn verify_store_with(
        &self,
        opening: Vec<Finding>,
        counter: Option<&dyn crate::store::Counter>,
        progress: &dyn Fn(VerifyProgress),
    ) -> Result<VerifyReport> {
        // Before the rows: the anchor file is written after each commit, so rows read after it
        // are at least as new.
        let anchored = self
            .anchor
            .as_ref()
            .map(|a| (a.path().to_path_buf(), a.read()));
        let rows = Rows::read(&self.store)?;
        let (records, checked) = self.verify_records(&rows, opening, progress);
        let (commitment, committed_audit) = self.verify_commitment(&rows, anchored, counter)?;
        let objects = self.verify_objects(&checked, progress);
        let audit = self.verify_audit_log(committed_audit);
        Ok(VerifyReport {
            store_id: self.store_id(),
            keys: rows.keys.len(),
            sections: vec![records, commitment, objects, audit],
        })
    }

    /// The commitment section: the rows against the committed set, the state's MAC, the
    /// generation against the anchor file and the TPM counter (read, never advanced); with the
    /// last audit entry the state records, if its MAC verifies.
    fn verify_commitment(
        &self,
        rows: &Rows,
        anchored: Option<(std::path::PathBuf, Result<Option<u64>>)>,
        counter: Option<&dyn crate::store::Counter>,
    ) -> Result<(Section, Option<crate::audit::Head>)> {
        let report = super::root::check_commitment(
            self.store.meta(),
            &self.commit_keys,
            self.meta_format,
            anchored,
            super::root::CommitInputs {
                state: rows.state.clone(),
                digests: &rows.digests,
                keys: &rows.keys,
                versions: &rows.versions,
                events: &rows.events,
                counters: &rows.counters,
                clients: &rows.clients,
            },
        );
        let label_of = |uuid: &[u8; 16]| {
            let key = rows.keys.iter().find(|r| &r.uuid == uuid);
            let client = rows.clients.iter().find(|c| &c.uuid == uuid);
            key.map(|r| format!("{}/{}", r.namespace, r.name))
                .or_else(|| client.map(|c| format!("token client {}", c.name)))
                .unwrap_or_default()
        };
        let mut findings: Vec<Finding> = rows.commitment_unreadable.clone();
        findings.extend(
            super::clients::failing_clients(&self.record_mac, &self.store_id, &rows.clients)
                .into_iter()
                .map(|what| Finding {
                    status: Status::Failed,
                    key: None,
                    what,
                }),
        );
        findings.extend(report.problems.into_iter().map(|(uuid, what)| Finding {
            status: Status::Failed,
            key: uuid.map(|uuid| KeyName {
                label: label_of(&uuid),
                uuid: crate::hex::encode(&uuid),
                id: None,
                backend: None,
                version: None,
                authenticated: false,
            }),
            what,
        }));
        let mut summary = report.summary;
        if let (None, Some(binding)) = (
            counter.or(self.store.counter()),
            report
                .state
                .as_ref()
                .and_then(|s| s.counter)
                .filter(|b| b.offset.is_some()),
        ) {
            findings.push(Finding {
                status: Status::Unchecked,
                key: None,
                what: format!(
                    "the store is anchored in {}, which is not reachable from here (not \
                     configured, or not this store's sealer): not checked",
                    binding.at
                ),
            });
        }
        let judged = match counter {
            // A counter of this verification's own: read with the state under the lock that
            // changes hold from their commit to their counter's increment.
            Some(counter) => Some(self.store.dir_lock().and_then(|_lock| {
                let value = counter.read()?;
                let state = self.store.state_as_stored()?;
                Ok((
                    state
                        .as_ref()
                        .map(|state| crate::store::judge_counter(value, counter, state)),
                    counter.describe(),
                ))
            })),
            // The store's own, bound at open: read with the state under the writers' lock.
            None => match self.store.counter_and_state() {
                Ok(Some((check, state))) => Some(Ok((
                    state.map(|_| check),
                    self.store
                        .counter()
                        .map(|c| c.describe())
                        .unwrap_or_default(),
                ))),
                Ok(None) => None,
                Err(e) => Some(Err(e)),
            },
        };
        let described = |r: &Result<(Option<crate::store::CounterCheck>, String)>| match r {
            Ok((_, d)) => d.clone(),
            Err(_) => String::new(),
        };
        if let (Some(judged), Some(state)) = (judged, &report.state) {
            let name = described(&judged);
            if state.counter.is_some() {
                match judged.map(|(check, _)| check.unwrap_or(crate::store::CounterCheck::InStep)) {
                    Ok(crate::store::CounterCheck::InStep) => {
                        summary.push_str(&format!("; {name} in step"));
                    }
                    Ok(crate::store::CounterCheck::OneBehind) => summary.push_str(&format!(
                        "; {name} one behind (a change interrupted before its increment: the next \
                         change or open advances it)"
                    )),
                    Ok(crate::store::CounterCheck::Refused(what)) => findings.push(Finding {
                        status: Status::Failed,
                        key: None,
                        what,
                    }),
                    Err(e) => findings.push(Finding {
                        status: Status::Unchecked,
                        key: None,
                        what: format!("the store's TPM counter was not checked: {e}"),
                    }),
                }
            }
        }
        let committed_audit = report.state.as_ref().and_then(|s| s.audit);
        Ok((
            Section::new(CheckKind::Commitment, summary, findings),
            committed_audit,
        ))
    }

    /// The records section, and each key record with whether it authenticated and its versions.
    fn verify_records<'r>(
        &self,
        rows: &'r Rows,
        opening: Vec<Finding>,
        progress: &dyn Fn(VerifyProgress),
    ) -> (Section, Vec<Checked<'r>>) {
        let mut findings = opening;
        findings.extend(rows.unreadable.iter().cloned());
        let total = rows.keys.len() as u64;
        let tell = |done: u64| {
            progress(VerifyProgress {
                check: CheckKind::Records,
                done,
                total,
            })
        };
        tell(0);
        let mut versions_of: HashMap<[u8; 16], Vec<&VersionRecord>> = HashMap::new();
        for v in &rows.versions {
            versions_of.entry(v.uuid).or_default().push(v);
        }
        let mut checked = Vec::with_capacity(rows.keys.len());
        for (n, record) in rows.keys.iter().enumerate() {
            let authenticated = record_mac_ok(&self.record_mac, &self.store_id, record);
            checked.push(Checked {
                record,
                authenticated,
                versions: versions_of.remove(&record.uuid).unwrap_or_default(),
            });
            if (n as u64 + 1) % PROGRESS_EVERY == 0 {
                tell(n as u64 + 1);
            }
        }
        tell(total);
        let by_uuid: HashMap<&[u8; 16], &Checked<'_>> =
            checked.iter().map(|c| (&c.record.uuid, c)).collect();
        for c in checked.iter().filter(|c| !c.authenticated) {
            findings.push(Finding {
                status: Status::Failed,
                key: Some(self.key_name(c, None)),
                what: "its key record fails its MAC: it was changed outside keyhold (its name \
                       and fields are as the changed record says)"
                    .into(),
            });
        }
        if !checked.is_empty() && checked.iter().all(|c| !c.authenticated) {
            findings.push(Finding {
                status: Status::Failed,
                key: None,
                what: format!(
                    "none of the store's {} key records verifies under the root secret the \
                     `{}` sealer gave back: every record was changed, or the sealed root secret \
                     was replaced; do not create keys in this store",
                    checked.len(),
                    self.sealer_kind
                ),
            });
        }
        let failing = failing_rows(
            &self.record_mac,
            &self.store_id,
            &rows.versions,
            &rows.events,
            &rows.counters,
        );
        for row in &failing {
            findings.push(Finding {
                status: Status::Failed,
                key: Some(match by_uuid.get(row.uuid()) {
                    Some(c) => self.key_name(c, row.version()),
                    None => Self::unknown_key(row.uuid(), row.version()),
                }),
                what: format!(
                    "{} fails its MAC: it was changed outside keyhold",
                    row.what()
                ),
            });
        }
        // Rows whose key record is gone: keyhold never deletes a key record (a destroyed key
        // keeps its record as a tombstone), so the record was deleted outside keyhold.
        let orphans = rows
            .versions
            .iter()
            .map(|v| (v.uuid, Some(v.version), "version"))
            .chain(rows.events.iter().map(|e| (e.uuid, None, "history entry")))
            .chain(
                rows.counters
                    .iter()
                    .map(|c| (c.uuid, Some(c.version), "AES-GCM counter")),
            )
            .filter(|(uuid, _, _)| !by_uuid.contains_key(uuid));
        let mut orphaned: BTreeMap<[u8; 16], (Option<u32>, Vec<&str>)> = BTreeMap::new();
        for (uuid, version, what) in orphans {
            let entry = orphaned.entry(uuid).or_insert((version, Vec::new()));
            if !entry.1.contains(&what) {
                entry.1.push(what);
            }
        }
        for (uuid, (_, kinds)) in &orphaned {
            findings.push(Finding {
                status: Status::Failed,
                key: Some(Self::unknown_key(uuid, None)),
                what: format!(
                    "its rows ({}) belong to no key record: the key's record was deleted outside \
                     keyhold",
                    kinds.join(", ")
                ),
            });
        }
        // An authenticated record whose versions are all authentic must also be whole: the
        // versions it counts, a known algorithm and state.
        for c in checked.iter().filter(|c| c.authenticated) {
            if failing.iter().any(|row| row.uuid() == &c.record.uuid) {
                continue;
            }
            let versions = c.versions.iter().map(|v| (*v).clone()).collect();
            if let Err(e) = self.verified_with(c.record.clone(), versions) {
                findings.push(Finding {
                    status: Status::Failed,
                    key: Some(self.key_name(c, None)),
                    what: describe(&e),
                });
            }
        }
        let summary = format!(
            "{} key records, {} later versions, {} history entries, {} AES-GCM counters",
            rows.keys.len(),
            rows.versions.len(),
            rows.events.len(),
            rows.counters.len()
        );
        (Section::new(CheckKind::Records, summary, findings), checked)
    }

    /// The objects section: every version of every key whose material is not destroyed, checked
    /// by its backend. A backend that cannot be reached is asked once, not once per key.
    fn verify_objects(
        &self,
        checked: &[Checked<'_>],
        progress: &dyn Fn(VerifyProgress),
    ) -> Section {
        let live: Vec<&Checked<'_>> = checked
            .iter()
            // A key being destroyed may already lack its objects: that is no loss.
            .filter(|c| {
                c.record.destroyed_at.is_none() && c.record.state != KeyState::Destroyed.as_str()
            })
            .collect();
        let total: u64 = live.iter().map(|c| 1 + c.versions.len() as u64).sum();
        let tell = |done: u64| {
            progress(VerifyProgress {
                check: CheckKind::Objects,
                done,
                total,
            })
        };
        tell(0);
        let mut findings = Vec::new();
        let mut unreachable: HashMap<&str, String> = HashMap::new();
        let (mut done, mut passed, mut changed) = (0u64, 0u64, 0u64);
        for c in live {
            let spec = match Self::spec_of(c.record) {
                Ok(spec) => spec,
                Err(e) => {
                    findings.push(Finding {
                        status: Status::Failed,
                        key: Some(self.key_name(c, None)),
                        what: format!("its record names an unknown algorithm ({e})"),
                    });
                    done += 1 + c.versions.len() as u64;
                    continue;
                }
            };
            let label = c.label();
            let r = c.record;
            let first = (
                1,
                r.locator.as_str(),
                r.blob.as_deref(),
                r.public_key.as_deref(),
            );
            let materials = std::iter::once(first).chain(c.versions.iter().map(|v| {
                (
                    v.version,
                    v.locator.as_str(),
                    v.blob.as_deref(),
                    v.public_key.as_deref(),
                )
            }));
            for (version, locator, blob, public_key) in materials {
                done += 1;
                if done % PROGRESS_EVERY == 0 {
                    tell(done);
                }
                let key = KeyRef {
                    context: KeyContext {
                        store_id: &self.store_id,
                        uuid: &r.uuid,
                        label: &label,
                        spec: &spec,
                    },
                    locator,
                    blob,
                };
                let outcome = self.check_material(&r.backend, &mut unreachable, key, public_key);
                match outcome {
                    None => passed += 1,
                    // A key rotated or destroyed by another process since the rows were read
                    // has lost this material for good reason: not a finding.
                    Some((Status::Failed, _)) if self.changed_since_read(r) => changed += 1,
                    Some((status, what)) => findings.push(Finding {
                        status,
                        key: Some(self.key_name(c, Some(version))),
                        what,
                    }),
                }
            }
        }
        tell(total);
        let unchecked = findings
            .iter()
            .filter(|f| f.status == Status::Unchecked)
            .count();
        let mut summary = format!(
            "{total} key versions: {passed} found as recorded, {} failed, {unchecked} unchecked",
            findings.len() - unchecked
        );
        if changed > 0 {
            summary.push_str(&format!(
                ", {changed} rotated or destroyed by another process meanwhile"
            ));
        }
        Section::new(CheckKind::Objects, summary, findings)
    }

    /// Whether the record `read` is no longer in the store as it was read.
    fn changed_since_read(&self, read: &KeyRecord) -> bool {
        !matches!(self.store.key(&read.uuid), Ok(Some(now)) if now == *read)
    }

    /// One version's check in backend `backend`: `None` if it passed, else its status and why.
    fn check_material<'b>(
        &self,
        backend: &'b str,
        unreachable: &mut HashMap<&'b str, String>,
        key: KeyRef<'_>,
        public_key: Option<&[u8]>,
    ) -> Option<(Status, String)> {
        if let Some(reason) = unreachable.get(backend) {
            return Some((Status::Unchecked, reason.clone()));
        }
        let Some(b) = self.backends.iter().find(|b| b.name() == backend) else {
            let reason = format!("not checked: backend `{backend}` is not in the configuration");
            unreachable.insert(backend, reason.clone());
            return Some((Status::Unchecked, reason));
        };
        let checked = b.check_key(key).and_then(|()| match public_key {
            // A key pair replaced whole by someone with the PIN (generated on the token, as
            // sensitive as keyhold's) matches every template: only its public key tells. A
            // software key's blob is bound to its record, which holds the public key too.
            Some(recorded) if backend != SoftwareBackend::NAME => {
                let device = b.public_key(key)?;
                if device.spki_der() == recorded {
                    Ok(())
                } else {
                    Err(Error::KeyObjectMismatch {
                        backend: backend.to_owned(),
                        key: key.context.label.to_owned(),
                        reason: "its public key on the device is not the one recorded: the key \
                                 pair was replaced"
                            .into(),
                    })
                }
            }
            _ => Ok(()),
        });
        match checked {
            Ok(()) => None,
            Err(e) if is_unreachable(&e) => {
                let reason = format!("not checked: {e}");
                unreachable.insert(backend, reason.clone());
                Some((Status::Unchecked, reason))
            }
            Err(e) => Some((Status::Failed, describe(&e))),
        }
    }

    /// The audit section: the log's MACs and chain.
    /// The audit section: the log's MACs and chain, through the last entry the state records
    /// (`committed`) and the anchor file's, if later. A log cut short of them is tampering.
    fn verify_audit_log(&self, committed: Option<crate::audit::Head>) -> Section {
        let verified = self
            .audit_sink()
            .flush()
            .and_then(|()| self.verify_audit_through(committed, self.anchor.as_ref()));
        match verified {
            Ok(v) => {
                let mut summary = format!(
                    "{} entries, head {}",
                    v.entries,
                    crate::hex::encode(&v.head)
                );
                if v.cut_short {
                    summary.push_str(
                        "; the last line was cut short by a crash mid-write (not an entry: the \
                         next write drops it)",
                    );
                }
                Section::new(CheckKind::Audit, summary, Vec::new())
            }
            Err(e) => Section::new(
                CheckKind::Audit,
                "the log does not verify".into(),
                vec![Finding {
                    status: Status::Failed,
                    key: None,
                    what: describe(&e),
                }],
            )
            .tampered(matches!(e, Error::StoreTampered { .. })),
        }
    }

    /// How a finding names the key of `checked` (its ID only if its record authenticates).
    fn key_name(&self, checked: &Checked<'_>, version: Option<u32>) -> KeyName {
        let r = checked.record;
        let id = if checked.authenticated {
            Self::spec_of(r)
                .ok()
                .and_then(|spec| self.id_of(r, spec).ok())
        } else {
            None
        };
        KeyName {
            label: checked.label(),
            uuid: crate::hex::encode(&r.uuid),
            id,
            backend: Some(r.backend.clone()),
            version,
            authenticated: checked.authenticated,
        }
    }

    /// A key known only by the uuid of a row whose key record is missing.
    fn unknown_key(uuid: &[u8; 16], version: Option<u32>) -> KeyName {
        KeyName {
            label: String::new(),
            uuid: crate::hex::encode(uuid),
            id: None,
            backend: None,
            version,
            authenticated: false,
        }
    }
}
