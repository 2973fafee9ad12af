//! Who is asking: how a connection came (a Unix socket's peer credentials, a TLS client
//! certificate), mapped to a configured client.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use tokio::sync::Semaphore;

use super::api::ApiError;
use super::routes::State;
use crate::config::{ClientConfig, Config, Operation};
use crate::error::{Error, Result};

/// How a connection came, as the kernel or the TLS handshake says; every request of the
/// connection carries it (as axum's `ConnectInfo<Peer>`).
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
    },
}

/// The configured clients, by user ID and by certificate name.
#[derive(Debug, Clone)]
pub struct Clients {
    by_uid: HashMap<u32, Arc<Client>>,
    by_tls_name: HashMap<String, Arc<Client>>,
}

impl Clients {
    /// The clients of `config` (`[clients.NAME]`).
    ///
    /// # Errors
    /// [`Error::Config`] when there is none that a connection can be: the service would refuse
    /// everyone.
    pub fn from_config(config: &Config) -> Result<Self> {
        let mut by_uid = HashMap::new();
        let mut by_tls_name = HashMap::new();
        for (name, c) in &config.clients {
            let client = Arc::new(Client {
                name: name.clone(),
                grant: c.clone(),
                busy: Arc::new(Semaphore::new(c.concurrency())),
            });
            if let Some(uid) = c.uid {
                by_uid.insert(uid, Arc::clone(&client));
            }
            if let Some(tls_name) = &c.tls_name {
                by_tls_name.insert(tls_name.clone(), client);
            }
        }
        if by_uid.is_empty() && by_tls_name.is_empty() {
            return Err(Error::Config(
                "keyhold serve answers configured clients only, and the configuration has none \
                 with a uid or a tls_name: add a [clients.NAME] table with uid = N (or \
                 tls_name = \"...\") and namespaces = [...]"
                    .into(),
            ));
        }
        Ok(Self {
            by_uid,
            by_tls_name,
        })
    }

    /// The client a connection is, if it is one. A certificate whose names are two different
    /// clients is none of them: which one it meant is not for the service to guess.
    pub(super) fn identify(&self, peer: &Peer) -> Option<Arc<Client>> {
        match peer {
            Peer::Unix { uid } => uid.and_then(|uid| self.by_uid.get(&uid)).cloned(),
            Peer::Tls { names } => {
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
}

/// A client, authenticated for this request.
#[derive(Debug)]
pub struct Client {
    /// Its name in the configuration.
    pub name: String,
    grant: ClientConfig,
    /// Its requests in flight hold permits of this (`max_concurrent`).
    pub(super) busy: Arc<Semaphore>,
}

impl Client {
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

/// The caller of a request, authenticated by the service's transport before any route (which
/// answers 401 for a connection that is no configured client): 401 if it did not.
#[derive(Debug)]
pub struct Caller(pub Arc<Client>);

impl FromRequestParts<State> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &State,
    ) -> std::result::Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Arc<Client>>()
            .map(|client| Self(Arc::clone(client)))
            .ok_or_else(ApiError::unauthenticated)
    }
}
