//! The clients of `keyhold serve` (`[clients.NAME]`): who a connection is, and what it may do.
//!
//! ```toml
//! [clients.web]
//! uid = 1001                 # connections over the Unix socket from this user are `web`
//! tls_name = "web.example"   # and TLS connections whose client certificate names it
//! namespaces = ["web"]       # the keys it may see and use: those of these namespaces
//! operations = ["sign", "pubkey", "show", "list"]   # default: all but those by name only
//! ```

use serde::Deserialize;

/// One client of the service.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The Unix user whose connections to the service's socket are this client (its peer
    /// credentials, `SO_PEERCRED`).
    #[serde(default)]
    pub uid: Option<u32>,
    /// The name a TLS client certificate (verified against `--client-ca`) gives in its subject
    /// alternative names (DNS or URI) or its subject common name, for this client.
    #[serde(default)]
    pub tls_name: Option<String>,
    /// How many of the client's requests are served at once; more are refused with 429 `busy`
    /// (default [`ClientConfig::DEFAULT_MAX_CONCURRENT`]).
    #[serde(default)]
    pub max_concurrent: Option<usize>,
    /// The namespaces whose keys the client sees and uses; a key of any other namespace is, to
    /// it, a key that does not exist.
    pub namespaces: Vec<String>,
    /// The operations the client may ask for; when absent, every one but
    /// [`Operation::BY_NAME_ONLY`].
    #[serde(default)]
    pub operations: Option<Vec<Operation>>,
}

impl ClientConfig {
    /// The requests one client has in flight at most, unless it says otherwise.
    pub const DEFAULT_MAX_CONCURRENT: usize = 64;

    /// How many of its requests are served at once.
    pub fn concurrency(&self) -> usize {
        self.max_concurrent.unwrap_or(Self::DEFAULT_MAX_CONCURRENT)
    }

    /// Whether the client may do `operation`: one of its `operations`, or, when it has no such
    /// list, any but [`Operation::BY_NAME_ONLY`].
    pub fn may(&self, operation: Operation) -> bool {
        match &self.operations {
            Some(allowed) => allowed.contains(&operation),
            None => !Operation::BY_NAME_ONLY.contains(&operation),
        }
    }

    /// Whether the client sees the keys of `namespace`.
    pub fn sees(&self, namespace: &str) -> bool {
        self.namespaces.iter().any(|n| n == namespace)
    }
}

/// What a client asks the service to do.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Operation {
    /// Make a key.
    Create,
    /// List keys.
    List,
    /// Show one key.
    Show,
    /// Read a key's public key.
    Pubkey,
    /// Sign.
    Sign,
    /// Verify a signature.
    Verify,
    /// Encrypt.
    Encrypt,
    /// Decrypt.
    Decrypt,
    /// Random bytes.
    Random,
    /// Compute a MAC.
    Mac,
    /// Check a MAC.
    MacVerify,
    /// Re-encrypt an envelope under the key's newest version.
    Rewrap,
    /// Make a data key and have it both in plaintext and wrapped (envelope encryption).
    Datakey,
    /// Make a data key and have it wrapped only: the plaintext never leaves the service.
    DatakeyWrapped,
    /// Rotate a key.
    Rotate,
    /// Suspend, resume, deactivate or mark compromised a key.
    State,
    /// Schedule, cancel or carry out a key's destruction.
    Destroy,
    /// Change a key's schedule or version policy.
    Policy,
    /// Read a key's history.
    History,
    /// Export an exportable key, wrapped (under a key the client sees, to a public key, or
    /// under a token's trusted wrapping key).
    Export,
    /// Bring a key in: wrapped (unwrapped with a key the client sees), or a private key or raw
    /// secret.
    Import,
    /// Read and verify the audit log, and verify the whole store (every namespace's records).
    Audit,
    /// Run the work every key's schedule makes due (in every namespace).
    Maintain,
    /// Read the service's metrics.
    Metrics,
    /// List the service's clients.
    Admin,
}

impl Operation {
    /// The operations a client without an `operations` list is not granted: those that see or
    /// act past its namespaces (`audit`, `maintain`, `metrics`, `admin`) and those that move
    /// keys in or out (`export`: an exportable key wrapped to a public key of the client's
    /// choosing is the key in its hands; `import`).
    pub const BY_NAME_ONLY: [Self; 6] = [
        Self::Export,
        Self::Import,
        Self::Audit,
        Self::Maintain,
        Self::Metrics,
        Self::Admin,
    ];

    /// Every operation, in the order of the documentation.
    pub const ALL: [Self; 25] = [
        Self::Create,
        Self::List,
        Self::Show,
        Self::Pubkey,
        Self::Sign,
        Self::Verify,
        Self::Encrypt,
        Self::Decrypt,
        Self::Random,
        Self::Mac,
        Self::MacVerify,
        Self::Rewrap,
        Self::Datakey,
        Self::DatakeyWrapped,
        Self::Rotate,
        Self::State,
        Self::Destroy,
        Self::Policy,
        Self::History,
        Self::Export,
        Self::Import,
        Self::Audit,
        Self::Maintain,
        Self::Metrics,
        Self::Admin,
    ];

    /// The name used in the configuration and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::List => "list",
            Self::Show => "show",
            Self::Pubkey => "pubkey",
            Self::Sign => "sign",
            Self::Verify => "verify",
            Self::Encrypt => "encrypt",
            Self::Decrypt => "decrypt",
            Self::Random => "random",
            Self::Mac => "mac",
            Self::MacVerify => "mac-verify",
            Self::Rewrap => "rewrap",
            Self::Datakey => "datakey",
            Self::DatakeyWrapped => "datakey-wrapped",
            Self::Rotate => "rotate",
            Self::State => "state",
            Self::Destroy => "destroy",
            Self::Policy => "policy",
            Self::History => "history",
            Self::Export => "export",
            Self::Import => "import",
            Self::Audit => "audit",
            Self::Maintain => "maintain",
            Self::Metrics => "metrics",
            Self::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Operation {
    type Err = crate::error::Error;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|op| op.as_str() == text)
            .ok_or_else(|| {
                let all: Vec<&str> = Self::ALL.iter().map(|op| op.as_str()).collect();
                crate::error::Error::InvalidInput(format!(
                    "no operation `{text}`: the operations are {}",
                    all.join(", ")
                ))
            })
    }
}

/// What is wrong with the clients' tables, if anything: a client without namespaces, two
/// clients for one user or one certificate name, a limit of no request.
pub(super) fn problems(
    clients: &std::collections::BTreeMap<String, ClientConfig>,
) -> Option<(String, &'static str, String)> {
    let mut by_uid = std::collections::BTreeMap::new();
    let mut by_tls_name = std::collections::BTreeMap::new();
    for (name, client) in clients {
        if client.max_concurrent == Some(0) {
            return Some((
                name.clone(),
                "max_concurrent",
                "a client is served at least one request at a time: give 1 or more".into(),
            ));
        }
        if let Some(tls_name) = &client.tls_name {
            if tls_name.is_empty() {
                return Some((
                    name.clone(),
                    "tls_name",
                    "give the name its client certificate carries (a DNS or URI subject \
                     alternative name, or the subject's common name)"
                        .into(),
                ));
            }
            if let Some(other) = by_tls_name.insert(tls_name.as_str(), name) {
                return Some((
                    name.clone(),
                    "tls_name",
                    format!("`{tls_name}` is client `{other}` already: one client per name"),
                ));
            }
        }
        if client.namespaces.is_empty() {
            return Some((
                name.clone(),
                "namespaces",
                "a client needs at least one namespace (the keys it may use)".into(),
            ));
        }
        if let Some(uid) = client.uid {
            if let Some(other) = by_uid.insert(uid, name) {
                return Some((
                    name.clone(),
                    "uid",
                    format!("uid {uid} is client `{other}` already: one client per user"),
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod operation_tests {
    use super::Operation;

    /// Its place in [`Operation::ALL`]: a match over every variant, so that a new one that is
    /// not listed there does not compile.
    fn place(op: Operation) -> usize {
        match op {
            Operation::Create => 0,
            Operation::List => 1,
            Operation::Show => 2,
            Operation::Pubkey => 3,
            Operation::Sign => 4,
            Operation::Verify => 5,
            Operation::Encrypt => 6,
            Operation::Decrypt => 7,
            Operation::Random => 8,
            Operation::Mac => 9,
            Operation::MacVerify => 10,
            Operation::Rewrap => 11,
            Operation::Datakey => 12,
            Operation::DatakeyWrapped => 13,
            Operation::Rotate => 14,
            Operation::State => 15,
            Operation::Destroy => 16,
            Operation::Policy => 17,
            Operation::History => 18,
            Operation::Export => 19,
            Operation::Import => 20,
            Operation::Audit => 21,
            Operation::Maintain => 22,
            Operation::Metrics => 23,
            Operation::Admin => 24,
        }
    }

    #[test]
    fn every_operation_is_listed_once_and_its_name_reads_back_in_the_configuration_too() {
        for (i, op) in Operation::ALL.into_iter().enumerate() {
            assert_eq!(place(op), i, "{op:?}");
            assert_eq!(op.as_str().parse::<Operation>().unwrap(), op);
            let toml: Operation =
                serde_json::from_value(serde_json::Value::String(op.as_str().into())).unwrap();
            assert_eq!(toml, op);
        }
    }
}
