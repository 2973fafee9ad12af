//! What `store verify` reports: a section per check, each finding naming its key.

use serde::{Deserialize, Serialize};

/// A kind of check `store verify` makes: one section of its report each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CheckKind {
    /// Every row's MAC: key records, later versions, history entries, AES-GCM counters (and,
    /// when the store is opened to be verified, its sealer metadata).
    Records,
    /// Every key version's material in its backend: token objects, TPM blobs, software blobs.
    Objects,
    /// The audit log: every line's MAC and the hash chain.
    Audit,
    /// The store-wide commitment over the records (deleted, put back, duplicated or added rows),
    /// the state's MAC, and the store's generation against its anchors outside the store (the
    /// anchor file and the TPM NV counter).
    Commitment,
}

impl CheckKind {
    /// The name in reports and JSON (`records`, `objects`, `audit`, `commitment`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Records => "records",
            Self::Objects => "objects",
            Self::Audit => "audit",
            Self::Commitment => "commitment",
        }
    }

    /// What the check covers, for the text report.
    pub fn title(self) -> &'static str {
        match self {
            Self::Records => "records (MACs of keys, versions, history, counters)",
            Self::Objects => "key material in its backends",
            Self::Audit => "audit log (MACs and hash chain)",
            Self::Commitment => "commitment, generation and anchor",
        }
    }
}

/// How a check, or the whole report, came out; ordered from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Everything was checked and found as recorded.
    Passed,
    /// Nothing was found wrong, but something could not be checked (a backend unavailable or
    /// not configured): not known to be fine.
    Unchecked,
    /// Something failed its check.
    Failed,
}

impl Status {
    /// `passed`, `unchecked`, `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passed => "passed",
            Self::Unchecked => "unchecked",
            Self::Failed => "failed",
        }
    }
}

/// The key a finding is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyName {
    /// `namespace/name`, as the record says (see [`KeyName::authenticated`]); empty for a row
    /// whose key record is missing.
    pub label: String,
    /// The key record's identifier, hex.
    pub uuid: String,
    /// The key ID, when the record authenticates (an ID is never made from forged fields).
    pub id: Option<String>,
    /// The backend the record names.
    pub backend: Option<String>,
    /// The key version the finding is about, if one.
    pub version: Option<u32>,
    /// Whether the record the label comes from passed its MAC.
    pub authenticated: bool,
}

/// One problem, or one thing that could not be checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// [`Status::Failed`] or [`Status::Unchecked`].
    pub status: Status,
    /// The key it is about, if it is about one.
    pub key: Option<KeyName>,
    /// What was found, and what it means.
    pub what: String,
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    /// Which check.
    pub kind: CheckKind,
    /// The worst of its findings ([`Status::Passed`] with none).
    pub status: Status,
    /// What was checked (`120 key records, 4 versions, …`).
    pub summary: String,
    /// Every problem found, and everything left unchecked.
    pub findings: Vec<Finding>,
    /// Whether what failed says the store was tampered with or rolled back (`store verify`
    /// exits 10): every failure of the commitment, an audit log cut short. In the JSON only
    /// when true (a service's report carries it to its client).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    tampered: bool,
}

impl Section {
    /// A section of `kind` with `findings`, its status theirs.
    pub fn new(kind: CheckKind, summary: String, findings: Vec<Finding>) -> Self {
        let status = findings
            .iter()
            .map(|f| f.status)
            .max()
            .unwrap_or(Status::Passed);
        Self {
            kind,
            status,
            summary,
            findings,
            tampered: kind == CheckKind::Commitment && status == Status::Failed,
        }
    }

    /// This section, marked as saying the store was tampered with if `yes` and it failed.
    pub(super) fn tampered(mut self, yes: bool) -> Self {
        self.tampered |= yes && self.status == Status::Failed;
        self
    }

    /// Whether it failed in a way that says the store was tampered with or rolled back.
    pub fn is_tampered(&self) -> bool {
        self.tampered
    }
}

/// What `store verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// The store's identity, hex.
    pub store_id: String,
    /// How many key records the store holds.
    pub keys: usize,
    /// One per check, in the order they ran.
    pub sections: Vec<Section>,
}

impl VerifyReport {
    /// The report as `keyhold store verify --json` and the service's `POST /v1/store/verify`
    /// give it: its fields, with `status` (the worst section's) and `healthy` (every check
    /// passed).
    pub fn to_json(&self) -> serde_json::Value {
        let status = self.status();
        serde_json::json!({
            "store_id": self.store_id,
            "keys": self.keys,
            "sections": self.sections,
            "status": status.as_str(),
            "healthy": status == Status::Passed,
        })
    }

    /// A report as [`Self::to_json`] gives it (a service's answer).
    ///
    /// # Errors
    /// [`crate::Error::InvalidInput`] for JSON that is not a report.
    pub fn from_json(value: &serde_json::Value) -> crate::Result<Self> {
        #[derive(Deserialize)]
        struct ReportJson {
            store_id: String,
            keys: usize,
            sections: Vec<Section>,
        }
        let r = ReportJson::deserialize(value)
            .map_err(|e| crate::Error::InvalidInput(format!("not a store's report: {e}")))?;
        Ok(Self {
            store_id: r.store_id,
            keys: r.keys,
            sections: r.sections,
        })
    }

    /// The worst status of any section.
    pub fn status(&self) -> Status {
        self.sections
            .iter()
            .map(|s| s.status)
            .max()
            .unwrap_or(Status::Passed)
    }

    /// The section of `kind`, if the report has one.
    pub fn section(&self, kind: CheckKind) -> Option<&Section> {
        self.sections.iter().find(|s| s.kind == kind)
    }

    /// Every finding of every section, with its section's kind.
    pub fn findings(&self) -> impl Iterator<Item = (CheckKind, &Finding)> {
        self.sections
            .iter()
            .flat_map(|s| s.findings.iter().map(move |f| (s.kind, f)))
    }
}

/// How far a verification has come, for a progress bar: `done` of `total` items of `check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyProgress {
    /// The check running.
    pub check: CheckKind,
    /// Items done.
    pub done: u64,
    /// Items in all.
    pub total: u64,
}
