//! Who is asking: the client a request's bearer token names (see `token.rs`), else the client
//! its connection is (a Unix socket's peer credentials, a TLS client certificate). Decided once
//! per request, before any route, by the transport (`admit` in `listen.rs`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::api::ApiError;
use super::routes::State;
use super::token::{self, Limiter};
use crate::config::{ClientConfig, Config, Operation};
use crate::error::Result;
use crate::keystore::TokenClient;

/// How a connection came, as the kernel or the TLS handshake says; every request of the
/// connection carries it.
#[derive(Debug, Clone)]
pub enum Peer {
    /// A Unix-socket connection: its effective user ID (`SO_PEERCRED`), if the kernel gave one.
    Unix {
        /// The peer's user ID.
        uid: Option<u32>,
    },
    /// A TLS connection: the names of its client certificate, verified against `--client-ca`
    /// (subject alternative URIs and DNS names, then the subject's common name); none without a
    /// certificate.
    Tls {
        /// The certificate's names.
        names: Arc<[String]>,
        /// The peer's address, if known: where failed bearer tokens are counted.
        addr: Option<IpAddr>,
    },
}

/// The configured clients, by user ID and by certificate name; the rate limit of bearer tokens;
/// the concurrency gates of token clients, by name.
#[derive(Debug, Clone)]
pub struct Clients {
    by_uid: HashMap<u32, Arc<Client>>,
    by_tls_name: HashMap<String, Arc<Client>>,
    /// Every configured client's name: no token client may take one.
    configured: Arc<std::collections::HashSet<String>>,
    pub(super) limiter: Arc<Limiter>,
    /// A token client's gate outlives the request that made it: its `max_concurrent` holds
    /// across requests. One per token client name seen, so bounded by the store's clients.
    token_gates: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
}

impl Clients {
    /// The clients of `config` (`[clients.NAME]`); [`Self::for_service`] adds the store's token
    /// clients and refuses a service without any client.
    ///
    /// # Errors
    /// None yet: kept fallible for the clients that the configuration will name otherwise.
    pub fn from_config(config: &Config) -> Result<Self> {
        let mut by_uid = HashMap::new();
        let mut by_tls_name = HashMap::new();
        for (name, c) in &config.clients {
            let client = Arc::new(Client::new(name.clone(), c.clone()));
            if let Some(uid) = c.uid {
                by_uid.insert(uid, Arc::clone(&client));
            }
            if let Some(tls_name) = &c.tls_name {
                by_tls_name.insert(tls_name.clone(), client);
            }
        }
        Ok(Self {
            by_uid,
            by_tls_name,
            configured: Arc::new(config.clients.keys().cloned().collect()),
            limiter: Arc::new(Limiter::new(token::Limits::default())),
            token_gates: Arc::default(),
        })
    }

    /// Whether `name` is a configured client's.
    pub(super) fn is_configured(&self, name: &str) -> bool {
        self.configured.contains(name)
    }

    /// Whether the configuration names no client a connection can be.
    pub(super) fn no_connection_clients(&self) -> bool {
        self.by_uid.is_empty() && self.by_tls_name.is_empty()
    }

    /// The client a connection is, if it is one. A certificate whose names are two different
    /// clients is none of them: which one it meant is not for the service to guess.
    pub(super) fn identify(&self, peer: &Peer) -> Option<Arc<Client>> {
        match peer {
            Peer::Unix { uid } => uid.and_then(|uid| self.by_uid.get(&uid)).cloned(),
            Peer::Tls { names, .. } => {
                let mut found = names.iter().filter_map(|n| self.by_tls_name.get(n));
                let first = found.next()?;
                if found.all(|other| Arc::ptr_eq(first, other)) {
                    Some(Arc::clone(first))
                } else {
                    tracing::warn!(?names, "a client certificate names two clients");
                    None
                }
            }
        }
    }

    /// The token client `name` with `grant`, sharing its concurrency gate with its other
    /// requests.
    pub(super) fn token_client(&self, name: String, grant: ClientConfig) -> Client {
        let busy = {
            let mut gates = self
                .token_gates
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            Arc::clone(
                gates
                    .entry(name.clone())
                    .or_insert_with(|| Arc::new(Semaphore::new(grant.concurrency()))),
            )
        };
        Client::with_gate(name, grant, busy)
    }

    /// The configured clients and the token clients `tokens` as `GET /v1/clients` lists them, by
    /// name: how each authenticates (`uid`, `tls_name`, `token`), its uid and certificate name,
    /// namespaces, operations (`null`: every one but `Operation::BY_NAME_ONLY`), and when a
    /// token client was added. Never a token or its hash: the store gives neither.
    pub fn to_json(&self, tokens: &[TokenClient]) -> serde_json::Value {
        let mut clients: Vec<&Arc<Client>> = self
            .by_uid
            .values()
            .chain(self.by_tls_name.values())
            .collect();
        clients.sort_by(|a, b| a.name.cmp(&b.name));
        clients.dedup_by(|a, b| Arc::ptr_eq(a, b));
        let mut all: Vec<(&str, serde_json::Value)> = clients
            .into_iter()
            .map(|c| (c.name.as_str(), c.to_json()))
            .collect();
        all.extend(tokens.iter().map(|t| {
            let json = serde_json::json!({
                "name": t.name,
                "authenticates_by": ["token"],
                "uid": null,
                "tls_name": null,
                "namespaces": t.grant.namespaces,
                "operations": operation_names(t.grant.operations.as_deref()),
                "added": crate::time::format_utc(t.created_at),
            });
            (t.name.as_str(), json)
        }));
        // Stable: a token client named as a configured one (refused, see token.rs) comes after it.
        all.sort_by(|a, b| a.0.cmp(b.0));
        serde_json::Value::Array(all.into_iter().map(|(_, json)| json).collect())
    }
}

/// A client, authenticated for this request.
#[derive(Debug)]
pub struct Client {
    /// Its name in the configuration (or the store's, for a token client).
    pub name: String,
    /// The name, shared by the audit entries and metrics of its requests (made once, not per
    /// request).
    label: Arc<str>,
    grant: ClientConfig,
    /// Its requests in flight hold one permit each (`max_concurrent`).
    pub(super) busy: Arc<Semaphore>,
}

impl Client {
    /// A client of its own, with a gate of its own.
    pub(super) fn new(name: String, grant: ClientConfig) -> Self {
        let busy = Arc::new(Semaphore::new(grant.concurrency()));
        Self::with_gate(name, grant, busy)
    }

    /// A client whose requests share the gate `busy`.
    fn with_gate(name: String, grant: ClientConfig, busy: Arc<Semaphore>) -> Self {
        let label = Arc::from(name.as_str());
        Self {
            name,
            label,
            grant,
            busy,
        }
    }

    /// `Ok` if the client may do `operation`, else 403 naming it.
    pub fn may(&self, operation: Operation) -> std::result::Result<(), ApiError> {
        if self.grant.may(operation) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "client `{}` may not {}",
                self.name,
                operation.as_str()
            )))
        }
    }

    /// Whether the client sees the keys of `namespace`.
    pub fn sees(&self, namespace: &str) -> bool {
        self.grant.sees(namespace)
    }

    /// The namespaces it sees.
    pub fn namespaces(&self) -> &[String] {
        &self.grant.namespaces
    }

    /// A configured client as `GET /v1/clients` lists it.
    fn to_json(&self) -> serde_json::Value {
        let by: Vec<&str> = [
            self.grant.uid.map(|_| "uid"),
            self.grant.tls_name.as_ref().map(|_| "tls_name"),
        ]
        .into_iter()
        .flatten()
        .collect();
        serde_json::json!({
            "name": self.name,
            "authenticates_by": by,
            "uid": self.grant.uid,
            "tls_name": self.grant.tls_name,
            "namespaces": self.grant.namespaces,
            "operations": operation_names(self.grant.operations.as_deref()),
            "added": null,
        })
    }
}

/// The names of `operations` (`None`: the default grant, said `null`).
fn operation_names(operations: Option<&[Operation]>) -> Option<Vec<&'static str>> {
    operations.map(|ops| ops.iter().map(|op| op.as_str()).collect())
}

/// A client's turn: one of its `max_concurrent` permits, held by its request until the work it
/// asked for has ended (also when the client went away before the answer).
#[derive(Debug, Clone)]
pub struct Turn {
    /// Held for its drop: the permit returns when the last holder lets go.
    _permit: Arc<OwnedSemaphorePermit>,
}

impl Turn {
    pub(super) fn new(permit: OwnedSemaphorePermit) -> Self {
        Self {
            _permit: Arc::new(permit),
        }
    }
}

/// The caller of a request, authenticated by the service's transport before any route (which
/// answers 401 for a request that is no client's): 401 if it was not. Derefs to its client.
#[derive(Debug, Clone)]
pub struct Caller {
    client: Arc<Client>,
    turn: Option<Turn>,
}

impl Caller {
    /// `client`, admitted with `turn`: what the routes are handed (a request's one extension).
    pub(super) fn admitted(client: Arc<Client>, turn: Turn) -> Self {
        Self {
            client,
            turn: Some(turn),
        }
    }

    /// Its turn, for the work that outlives the request's future.
    pub(super) fn turn(&self) -> Option<Turn> {
        self.turn.clone()
    }

    /// The same caller with one more of its client's `max_concurrent` turns, for work of its
    /// request beside the work its own turn holds (a batch's runs at once): taken only if free
    /// now (never waited for), and only while more than half of the client's turns are free.
    /// Held until that work ends, it leaves the client's other requests the rest. (The count is
    /// read, then a turn taken: another request of the client taking one at that instant leaves
    /// it one past the half.)
    pub(super) fn spare_turn(&self) -> Option<Self> {
        let busy = &self.client.busy;
        if busy.available_permits() <= self.client.grant.concurrency() / 2 {
            return None;
        }
        let permit = Arc::clone(busy).try_acquire_owned().ok()?;
        Some(Self {
            client: Arc::clone(&self.client),
            turn: Some(Turn::new(permit)),
        })
    }

    /// Its client, shared: for work that checks what the client sees after the request's
    /// future gave it away.
    pub(super) fn client(&self) -> Arc<Client> {
        Arc::clone(&self.client)
    }

    /// Its name, shared.
    pub(super) fn name_arc(&self) -> Arc<str> {
        Arc::clone(&self.client.label)
    }
}

impl std::ops::Deref for Caller {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl FromRequestParts<State> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &State,
    ) -> std::result::Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Self>()
            .cloned()
            .ok_or_else(ApiError::unauthenticated)
    }
}
