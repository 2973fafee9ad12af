//! The service's token clients (`keyhold client add`): a client that authenticates with a bearer
//! token, granted namespaces and operations as a configured `[clients.NAME]` is.
//!
//! A token is 256 random bits from aws-lc's CSPRNG, shown once (`kht1_` and base64url). The store
//! keeps only its HMAC-SHA256 under a key derived from the root secret: a copy of the store
//! gives no token, and without the root nobody can compute the hash of a token of their own
//! choosing to put in. Each client's row carries a MAC over its grant (a changed grant is an
//! integrity failure) and is counted in the store's commitment under its own uuid, so a removed
//! client put back from an older copy is refused as tampering.

use aws_lc_rs::{constant_time, hmac};
use base64::Engine;
use zeroize::Zeroizing;

use super::Keystore;
use crate::audit::Record;
use crate::config::Operation;
use crate::error::{Error, Result};
use crate::key::validate_name;
use crate::store::ClientRecord;

/// How every token begins: keyhold's token, format 1 (key IDs begin `kh1_`; the two are told
/// apart at a glance).
pub const TOKEN_PREFIX: &str = "kht1_";

/// The token's random bytes.
const TOKEN_BYTES: usize = 32;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// A bearer token, as `keyhold client add` prints it once. Zeroized on drop; its `Debug` shows
/// nothing of it.
pub struct ClientToken(Zeroizing<String>);

impl std::fmt::Debug for ClientToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientToken(<redacted>)")
    }
}

impl ClientToken {
    /// The token's text, to give to the client once.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// What a token client may do: the keys of its namespaces, and its operations (when `None`,
/// every one but `Operation::BY_NAME_ONLY`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientGrant {
    /// The namespaces whose keys it sees (at least one).
    pub namespaces: Vec<String>,
    /// The operations it may ask for; `None`: every one but `Operation::BY_NAME_ONLY`.
    pub operations: Option<Vec<Operation>>,
}

/// A token client, its row verified (never its token or the token's hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClient {
    /// Its name, unique among token clients.
    pub name: String,
    /// What it may do.
    pub grant: ClientGrant,
    /// When it was added, seconds since the Unix epoch.
    pub created_at: i64,
}

/// Hashes presented tokens under the root-derived token key.
#[derive(Debug)]
pub(super) struct TokenHasher(hmac::Key);

impl TokenHasher {
    pub(super) fn new(key: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, key))
    }

    fn hash(&self, secret: &[u8; TOKEN_BYTES]) -> hmac::Tag {
        hmac::sign(&self.0, secret)
    }
}

/// The random bytes of `text`, if it has a token's form (prefix, base64url, 32 bytes).
fn parse_token(text: &str) -> Option<Zeroizing<[u8; TOKEN_BYTES]>> {
    let body = text.strip_prefix(TOKEN_PREFIX)?;
    if body.len() != 43 {
        return None;
    }
    let decoded = Zeroizing::new(B64.decode(body).ok()?);
    let mut secret = Zeroizing::new([0u8; TOKEN_BYTES]);
    if decoded.len() != TOKEN_BYTES {
        return None;
    }
    secret.copy_from_slice(&decoded);
    Some(secret)
}

/// A new token: 256 bits from aws-lc's CSPRNG.
fn new_token() -> Result<(ClientToken, Zeroizing<[u8; TOKEN_BYTES]>)> {
    let mut secret = Zeroizing::new([0u8; TOKEN_BYTES]);
    aws_lc_rs::rand::fill(secret.as_mut()).map_err(|_| Error::crypto("make a client token"))?;
    let mut text = Zeroizing::new(String::with_capacity(TOKEN_PREFIX.len() + 43));
    text.push_str(TOKEN_PREFIX);
    B64.encode_string(secret.as_ref(), &mut text);
    Ok((ClientToken(text), secret))
}

/// The descriptions of the token client rows of `clients` that fail their MAC under `key` (the
/// record-MAC key) for store `store_id`; shared by the check at open and `store verify`.
pub(super) fn failing_clients(
    key: &hmac::Key,
    store_id: &[u8; 16],
    clients: &[ClientRecord],
) -> Vec<String> {
    clients
        .iter()
        .filter(|c| !super::root::mac_ok(key, &c.mac_input(store_id), &c.mac))
        .map(|c| {
            format!(
                "token client {} fails its MAC (its name, grant or token hash was changed outside \
                 keyhold)",
                crate::hex::encode(&c.uuid)
            )
        })
        .collect()
}

impl ClientGrant {
    /// The grant checked: valid namespace names, at least one namespace, at least one
    /// operation when they are listed; duplicates dropped.
    fn checked(&self) -> Result<Self> {
        if self.namespaces.is_empty() {
            return Err(Error::InvalidInput(
                "a client needs at least one namespace (the keys it may use): give --namespace NS"
                    .into(),
            ));
        }
        let mut namespaces = Vec::with_capacity(self.namespaces.len());
        for ns in &self.namespaces {
            validate_name("namespace", ns)?;
            if !namespaces.contains(ns) {
                namespaces.push(ns.clone());
            }
        }
        let operations = match &self.operations {
            Some(ops) if ops.is_empty() => {
                return Err(Error::InvalidInput(
                    "--operations lists no operation: give at least one, or leave it out for \
                     the default grant (every operation but export, import, audit, maintain, \
                     metrics and admin)"
                        .into(),
                ))
            }
            Some(ops) => {
                let mut unique = Vec::with_capacity(ops.len());
                for op in ops {
                    if !unique.contains(op) {
                        unique.push(*op);
                    }
                }
                Some(unique)
            }
            None => None,
        };
        Ok(Self {
            namespaces,
            operations,
        })
    }
}

impl Keystore {
    /// Adds the token client `name` with `grant`: makes its token, stores only the token's keyed
    /// hash with the grant (under a MAC, counted in the store's commitment), records
    /// `client-add` in the audit log, and returns the token, which nothing keeps.
    ///
    /// The configuration's `[clients.NAME]` are not the store's: the caller keeps the names apart.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a bad name or grant, or a token client of that name; storage
    /// and audit errors.
    pub fn add_client(
        &self,
        name: &str,
        grant: &ClientGrant,
    ) -> Result<(TokenClient, ClientToken)> {
        let added = self.add_client_unaudited(name, grant);
        if let Err(e) = &added {
            self.audit_client_failed("client-add", e);
        }
        added
    }

    fn add_client_unaudited(
        &self,
        name: &str,
        grant: &ClientGrant,
    ) -> Result<(TokenClient, ClientToken)> {
        validate_name("client name", name)?;
        let grant = grant.checked()?;
        let (token, secret) = new_token()?;
        let mut uuid = [0u8; 16];
        aws_lc_rs::rand::fill(&mut uuid).map_err(|_| Error::crypto("make a client uuid"))?;
        let operations = grant
            .operations
            .as_ref()
            .map(|ops| ops.iter().map(|op| op.as_str()).collect::<Vec<_>>());
        let mut record = ClientRecord {
            uuid,
            name: name.to_owned(),
            token_hash: self.client_tokens.hash(&secret).as_ref().to_vec(),
            namespaces: to_json(&grant.namespaces)?,
            operations: operations.as_ref().map(to_json).transpose()?,
            created_at: crate::time::now(),
            mac: Vec::new(),
        };
        record.mac = hmac::sign(&self.record_mac, &record.mac_input(&self.store_id))
            .as_ref()
            .to_vec();
        self.store.write(|tx| {
            tx.insert_client(&record)?;
            // Written before the commit: a client the log cannot show is never added.
            tx.note_audit(self.audit_client("client-add", "ok")?);
            Ok(())
        })?;
        tracing::info!(client = %name, "added a token client");
        let client = TokenClient {
            name: record.name,
            grant,
            created_at: record.created_at,
        };
        Ok((client, token))
    }

    /// Removes the token client `name`: its token is refused from the next request on (a
    /// running service looks every token up in the store). Recorded as `client-remove`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if there is no token client of that name; [`Error::Integrity`] if
    /// its row fails its MAC; storage and audit errors.
    pub fn remove_client(&self, name: &str) -> Result<TokenClient> {
        let removed = self.store.write(|tx| {
            let Some(record) = tx.client(name)? else {
                return Err(Error::InvalidInput(format!(
                    "there is no token client named `{name}`: `keyhold client list` shows them \
                     (a [clients.NAME] of the configuration is removed from the configuration)"
                )));
            };
            let client = self.verified_client(&record)?;
            tx.delete_client(&record)?;
            tx.note_audit(self.audit_client("client-remove", "ok")?);
            Ok(client)
        });
        match &removed {
            Ok(_) => tracing::info!(client = %name, "removed a token client"),
            Err(e) => self.audit_client_failed("client-remove", e),
        }
        removed
    }

    /// Every token client, by name, each row's MAC verified.
    ///
    /// # Errors
    /// [`Error::Integrity`] if any row fails its MAC; storage errors.
    pub fn clients(&self) -> Result<Vec<TokenClient>> {
        self.store
            .clients()?
            .iter()
            .map(|record| self.verified_client(record))
            .collect()
    }

    /// The token client whose token is `token`, if any: the token's keyed hash finds its row
    /// (checked against the store's commitment), the stored hash is compared in constant time,
    /// and the row's MAC is verified. Anything that is not a token of this store is `None`.
    ///
    /// Looking the row up by the hash leaks, at most, how much of a *hash* matched: without
    /// the root-derived key, that says nothing about any token.
    ///
    /// # Errors
    /// [`Error::StoreTampered`] for a client's row that is not the committed one (a removed
    /// client put back); [`Error::Integrity`] for a row that fails its MAC (a changed grant);
    /// storage errors.
    pub fn client_by_token(&self, token: &str) -> Result<Option<TokenClient>> {
        let Some(secret) = parse_token(token) else {
            return Ok(None);
        };
        let hash = self.client_tokens.hash(&secret);
        let Some(record) = self.store.checked_client(hash.as_ref())? else {
            return Ok(None);
        };
        if constant_time::verify_slices_are_equal(&record.token_hash, hash.as_ref()).is_err() {
            return Ok(None);
        }
        self.verified_client(&record).map(Some)
    }

    /// `record` as a client, once its MAC verifies.
    fn verified_client(&self, record: &ClientRecord) -> Result<TokenClient> {
        if !super::root::mac_ok(
            &self.record_mac,
            &record.mac_input(&self.store_id),
            &record.mac,
        ) {
            return Err(Error::Integrity {
                what: format!(
                    "token client {} fails its MAC (its name, grant or token hash was changed)",
                    crate::hex::encode(&record.uuid)
                ),
            });
        }
        let damaged = |what: &str| Error::Integrity {
            what: format!(
                "token client `{}` carries its MAC but its {what} cannot be read (a keyhold bug)",
                record.name
            ),
        };
        let namespaces: Vec<String> =
            serde_json::from_str(&record.namespaces).map_err(|_| damaged("namespaces"))?;
        let operations = match &record.operations {
            None => None,
            Some(text) => {
                let names: Vec<String> =
                    serde_json::from_str(text).map_err(|_| damaged("operations"))?;
                let parsed: Result<Vec<Operation>> = names.iter().map(|n| n.parse()).collect();
                Some(parsed.map_err(|_| damaged("operations"))?)
            }
        };
        Ok(TokenClient {
            name: record.name.clone(),
            grant: ClientGrant {
                namespaces,
                operations,
            },
            created_at: record.created_at,
        })
    }

    /// Records a change of the token clients (`client-add`, `client-remove`) synchronously.
    /// Entries have no free-form field: the client's name is not in it, and never its token.
    fn audit_client(
        &self,
        operation: &'static str,
        outcome: &'static str,
    ) -> Result<Option<crate::audit::Head>> {
        self.audit_sink().lifecycle(Record {
            operation,
            key_id: None,
            version: None,
            namespace: None,
            outcome,
            client: crate::audit::current_client().as_deref(),
        })
    }

    /// Records a change of the token clients that failed (the failure is what the caller gets).
    fn audit_client_failed(&self, operation: &'static str, error: &Error) {
        if let Err(e) = self.audit_client(operation, error.kind()) {
            tracing::error!("the audit log could not record a failed {operation}: {e}");
        }
    }
}

/// A list of the grant as JSON text, for the store.
fn to_json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|_| Error::crypto("encode a client's grant"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::sealer::{Argon2Params, PassphraseSealer};
    use secrecy::SecretString;

    fn keystore() -> (tempfile::TempDir, Keystore) {
        let dir = tempfile::tempdir().unwrap();
        let cheap = Argon2Params {
            memory_mib: 19,
            iterations: 2,
            parallelism: 1,
        };
        let sealer = PassphraseSealer::new(SecretString::from("tokens".to_owned()))
            .with_params(cheap)
            .unwrap();
        let ks = Keystore::create(&dir.path().join("store"), &sealer).unwrap();
        (dir, ks)
    }

    fn grant(namespaces: &[&str]) -> ClientGrant {
        ClientGrant {
            namespaces: namespaces.iter().map(|n| (*n).to_owned()).collect(),
            operations: Some(vec![Operation::Sign]),
        }
    }

    /// The lookup path: the token itself finds its client; a token one bit away, another
    /// well-formed token, the stored hash presented as a token, and malformed text find none.
    #[test]
    fn a_token_finds_its_client_and_nothing_else_does() {
        let (_dir, ks) = keystore();
        let (client, token) = ks.add_client("web", &grant(&["web", "web"])).unwrap();
        assert_eq!(client.grant, grant(&["web"]), "duplicates are dropped");
        assert!(token.expose().starts_with(TOKEN_PREFIX));
        assert_eq!(token.expose().len(), TOKEN_PREFIX.len() + 43);
        assert_eq!(ks.client_by_token(token.expose()).unwrap(), Some(client));

        let secret = parse_token(token.expose()).unwrap();
        let mut flipped = *secret;
        flipped[31] ^= 1;
        let near = format!("{TOKEN_PREFIX}{}", B64.encode(flipped));
        assert_eq!(ks.client_by_token(&near).unwrap(), None, "one bit off");
        let (other, _) = new_token().unwrap();
        assert_eq!(ks.client_by_token(other.expose()).unwrap(), None);
        let stored = ks.store.clients().unwrap().pop().unwrap().token_hash;
        assert_ne!(
            stored,
            secret.to_vec(),
            "the store holds a hash, not the token"
        );
        let as_token = format!("{TOKEN_PREFIX}{}", B64.encode(&stored));
        assert_eq!(ks.client_by_token(&as_token).unwrap(), None, "the hash");
        for malformed in [
            "",
            TOKEN_PREFIX,
            &token.expose()[1..],
            &token.expose()[..token.expose().len() - 1],
            &format!("{}A", token.expose()),
            &token.expose().replace(TOKEN_PREFIX, "kh1_"),
        ] {
            assert_eq!(ks.client_by_token(malformed).unwrap(), None, "{malformed}");
        }
        assert_eq!(format!("{token:?}"), "ClientToken(<redacted>)");

        ks.remove_client("web").unwrap();
        assert_eq!(ks.client_by_token(token.expose()).unwrap(), None, "removed");
        assert!(ks.clients().unwrap().is_empty());
    }

    #[test]
    fn names_and_grants_are_checked() {
        let (_dir, ks) = keystore();
        ks.add_client("web", &grant(&["web"])).unwrap();
        let again = ks.add_client("web", &grant(&["other"])).unwrap_err();
        assert!(again.to_string().contains("exists already"), "{again}");
        assert!(ks.add_client("no spaces", &grant(&["web"])).is_err());
        assert!(ks.add_client("empty", &grant(&[])).is_err());
        let none = ClientGrant {
            namespaces: vec!["web".into()],
            operations: Some(Vec::new()),
        };
        assert!(ks.add_client("none", &none).is_err());
        let missing = ks.remove_client("nobody").unwrap_err();
        assert!(missing
            .to_string()
            .contains("no token client named `nobody`"));
        assert_eq!(ks.clients().unwrap().len(), 1);
    }
}
