//! Who is asking: a bearer token's client (see `token.rs`), else the connection's peer
//! credentials, mapped to a configured client.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::serve::IncomingStream;
use tokio::net::UnixListener;

use super::api::ApiError;
use super::routes::State;
use super::token::{self, Limiter, Source};
use crate::config::{ClientConfig, Config, Operation};
use crate::error::Result;

/// The other end of a Unix-socket connection, as the kernel says (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// Its effective user ID, if the kernel gave one.
    uid: Option<u32>,
}

impl Connected<IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        Self {
            uid: stream.io().peer_cred().ok().map(|c| c.uid()),
        }
    }
}

/// The configured clients, by user ID, and the rate limit of bearer tokens.
#[derive(Debug, Clone)]
pub struct Clients {
    pub(super) by_uid: HashMap<u32, Arc<Client>>,
    pub(super) limiter: Arc<Limiter>,
}

impl Clients {
    /// The clients of `config` (`[clients.NAME]`); [`Self::for_service`] adds the store's token
    /// clients and refuses a service without any client.
    ///
    /// # Errors
    /// None yet: kept fallible for the clients that the configuration will name otherwise.
    pub fn from_config(config: &Config) -> Result<Self> {
        let by_uid: HashMap<u32, Arc<Client>> = config
            .clients
            .iter()
            .filter_map(|(name, c)| {
                c.uid.map(|uid| {
                    (
                        uid,
                        Arc::new(Client {
                            name: name.clone(),
                            grant: c.clone(),
                        }),
                    )
                })
            })
            .collect();
        Ok(Self {
            by_uid,
            limiter: Arc::new(Limiter::new(token::Limits::default())),
        })
    }
}

impl Clients {
    /// The clients as `GET /v1/clients` lists them: name, how it is known, namespaces and
    /// operations (`null`: every one but `admin` and `metrics`).
    pub fn to_json(&self) -> serde_json::Value {
        let mut clients: Vec<(&u32, &Arc<Client>)> = self.by_uid.iter().collect();
        clients.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        serde_json::Value::Array(
            clients
                .into_iter()
                .map(|(uid, c)| {
                    serde_json::json!({
                        "name": c.name,
                        "uid": uid,
                        "namespaces": c.grant.namespaces,
                        "operations": c.grant.operations.as_ref().map(|ops| {
                            ops.iter().map(|op| op.as_str()).collect::<Vec<_>>()
                        }),
                    })
                })
                .collect(),
        )
    }
}

/// A client, authenticated for this request.
#[derive(Debug)]
pub struct Client {
    /// Its name in the configuration.
    pub name: String,
    grant: ClientConfig,
}

impl Client {
    /// The client `name` with `grant`.
    pub(super) fn new(name: String, grant: ClientConfig) -> Self {
        Self { name, grant }
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
}

/// The caller of a request: the client its bearer token names (a wrong token is 401 whoever
/// the peer is), else the configured client of its peer credentials, else 401.
#[derive(Debug)]
pub struct Caller(pub Arc<Client>);

impl FromRequestParts<State> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &State,
    ) -> std::result::Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<Peer>>()
            .map(|ConnectInfo(peer)| *peer);
        let uid = peer.and_then(|p| p.uid);
        if let Some(header) = parts.headers.get(axum::http::header::AUTHORIZATION) {
            return token::authenticate(state, Source::of_uid(uid), header)
                .await
                .map(Self);
        }
        match uid.and_then(|uid| state.clients.by_uid.get(&uid)) {
            Some(client) => Ok(Self(Arc::clone(client))),
            None => {
                tracing::warn!(uid = ?uid, "refused a connection from no configured client");
                Err(ApiError::unauthenticated())
            }
        }
    }
}
