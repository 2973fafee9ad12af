//! `keyhold serve`: cryptography as a service. Applications hold key IDs and a credential, never a
//! key or the root secret, and ask this process, which holds the keystore open, to do the
//! cryptography, over HTTP/JSON (`/v1/…`, see docs/service.md) on Unix sockets and on TCP with
//! TLS 1.3, several at once.
//!
//! Who a connection is comes from how it came (`auth::Peer`): a Unix socket's peer credentials
//! (`SO_PEERCRED`) or a TLS client certificate verified against `--client-ca`. The
//! configuration's `[clients.NAME]` tables map user IDs and certificate names to clients, each
//! granted namespaces and operations. A key outside a client's namespaces does not exist for it
//! (404, as a key that does not exist). Keystore calls block (devices, the store's writes), so
//! they run on tokio's blocking pool, never on the threads that serve connections; only a quick
//! use of a key held in memory (a software key, not RSA) runs where its request was read, from
//! memory only, as it costs less than the hand-over to another thread and back; if it would have
//! to wait, it runs on the pool instead (`routes::Placement`). The
//! transport (`listen`) bounds what a client can hold: connections, time to send a request,
//! requests in flight per client, and SIGTERM's drain.

mod api;
mod auth;
mod client;
mod listen;
mod metrics;
mod ops;
mod routes;
mod tls;
mod token;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};

pub use auth::{Clients, Peer};
pub use client::{Remote, RemoteKeystore};
pub use listen::{inherited_sockets, serve, Prepared};
pub use tls::{certificate_names, ClientTls, TlsFiles};

/// The largest request body: an operation's input ([`crate::MAX_INPUT`]) in base64, and room.
pub const MAX_BODY: usize = crate::MAX_INPUT / 3 * 4 + 64 * 1024;

/// Where the service listens.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Listen {
    /// A Unix socket at this path (its directory must exist).
    Unix(PathBuf),
    /// A TCP address, served with TLS only.
    Tcp(SocketAddr),
    /// A listening socket this process was given (systemd socket activation, `LISTEN_FDS`): its
    /// file descriptor.
    Inherited(i32),
}

impl Listen {
    /// Parses `unix:PATH` or `tcp:ADDR:PORT` (an IP address: `tcp:127.0.0.1:8443`,
    /// `tcp:[::]:8443`).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for anything else.
    pub fn parse(text: &str) -> Result<Self> {
        match text.split_once(':') {
            Some(("unix", path)) if !path.is_empty() => Ok(Self::Unix(PathBuf::from(path))),
            Some(("tcp", addr)) => addr.parse().map(Self::Tcp).map_err(|_| {
                Error::InvalidInput(format!(
                    "--listen {text}: give tcp:IP:PORT (tcp:127.0.0.1:8443, tcp:[::]:8443)"
                ))
            }),
            _ => Err(Error::InvalidInput(format!(
                "--listen {text}: give unix:PATH (a Unix socket) or tcp:IP:PORT (with TLS)"
            ))),
        }
    }

    /// The default: `$XDG_RUNTIME_DIR/keyhold.sock`, else `/run/keyhold/keyhold.sock`.
    pub fn default_path() -> Self {
        let dir = std::env::var_os("XDG_RUNTIME_DIR")
            .filter(|d| !d.is_empty())
            .map_or_else(|| PathBuf::from("/run/keyhold"), PathBuf::from);
        Self::Unix(dir.join("keyhold.sock"))
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp(addr) => write!(f, "tcp:{addr}"),
            Self::Inherited(fd) => write!(f, "fd:{fd}"),
        }
    }
}

/// How the service listens, and what it bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Where it listens (at least one).
    pub listen: Vec<Listen>,
    /// TLS for TCP listeners; required when there is one.
    pub tls: Option<TlsFiles>,
    /// Time and count bounds.
    pub limits: Limits,
}

/// What the transport bounds: how long a client may take, how many connections are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// From the moment a connection waits for a request (a new one, or a kept-alive one between
    /// requests) until the request's whole head has arrived; a TLS handshake too. It is also the
    /// keep-alive idle timeout: hyper times both with one timer.
    pub header_timeout: Duration,
    /// From a request's head to the last byte of its body.
    pub body_timeout: Duration,
    /// After SIGTERM or SIGINT, how long requests in flight have to finish before their
    /// connections are dropped.
    pub drain_timeout: Duration,
    /// Connections served at once; more wait in the listen queue.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
            max_connections: 512,
        }
    }
}

impl Settings {
    /// Refuses what cannot be served: no listener, TCP without TLS, TLS without TCP.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the flag to give.
    pub fn check(&self) -> Result<()> {
        if self.listen.is_empty() {
            return Err(Error::InvalidInput(
                "give --listen unix:PATH or tcp:IP:PORT".into(),
            ));
        }
        let tcp = self.listen.iter().any(|l| matches!(l, Listen::Tcp(_)));
        // A socket systemd passes may be TCP: Prepared::new knows once it has taken it.
        let maybe_tcp = tcp
            || self
                .listen
                .iter()
                .any(|l| matches!(l, Listen::Inherited(_)));
        match (tcp, maybe_tcp, &self.tls) {
            (true, _, None) => Err(Error::InvalidInput(
                "TCP is served with TLS only: give --tls-cert and --tls-key (and --client-ca for \
                 client certificates)"
                    .into(),
            )),
            (_, false, Some(_)) => Err(Error::InvalidInput(
                "--tls-cert is for TCP: give --listen tcp:IP:PORT too".into(),
            )),
            _ => Ok(()),
        }
    }
}

fn io_error(what: &str, e: std::io::Error) -> Error {
    Error::Io {
        context: format!("keyhold serve: {what}"),
        source: e,
    }
}
