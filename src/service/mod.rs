//! `keyhold serve`: cryptography as a service. Applications hold key IDs and a credential, never a
//! key or the root secret, and ask this process, which holds the keystore open, to do the
//! cryptography, over HTTP/JSON on a Unix socket (`/v1/…`, see docs/service.md).
//!
//! Who a connection is comes from the socket's peer credentials (`SO_PEERCRED`): the
//! configuration's `[clients.NAME]` tables map user IDs to clients, each granted namespaces and
//! operations. A key outside a client's namespaces does not exist for it (404, as a key that does
//! not exist). Keystore calls block (devices, Argon2-free but not free), so each runs on tokio's
//! blocking pool, never on the threads that serve connections.

mod api;
mod auth;
mod client;
mod metrics;
mod ops;
mod routes;
mod token;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::keystore::Keystore;

pub use auth::Clients;
pub use client::{Remote, RemoteKeystore};

/// The largest request body: an operation's input ([`crate::MAX_INPUT`]) in base64, and room.
pub const MAX_BODY: usize = crate::MAX_INPUT / 3 * 4 + 64 * 1024;

/// Where the service listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket at this path (its directory must exist).
    Unix(PathBuf),
}

impl Listen {
    /// Parses `unix:PATH`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for anything else.
    pub fn parse(text: &str) -> Result<Self> {
        match text.split_once(':') {
            Some(("unix", path)) if !path.is_empty() => Ok(Self::Unix(PathBuf::from(path))),
            _ => Err(Error::InvalidInput(format!(
                "--listen {text}: give unix:PATH (a Unix socket)"
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
        }
    }
}

/// Serves `keystore` on `listen` until SIGTERM or SIGINT, then lets requests in flight finish.
/// `ready` is called once the socket accepts connections.
///
/// # Errors
/// [`Error::Config`] for a configuration without clients; [`Error::Io`] if the socket cannot be
/// made or the runtime cannot start.
pub fn serve(
    keystore: Keystore,
    config: &Config,
    listen: &Listen,
    ready: impl FnOnce(&Listen),
) -> Result<()> {
    let clients = Clients::for_service(config, &keystore)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("keyhold-serve")
        .build()
        .map_err(|e| io_error("start the service's runtime", e))?;
    let state = routes::State::new(Arc::new(keystore), clients);
    runtime.block_on(async move {
        let Listen::Unix(path) = listen;
        let listener = bind_unix(path)?;
        ready(listen);
        let app = routes::router(state).into_make_service_with_connect_info::<auth::Peer>();
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown())
            .await;
        let _ = std::fs::remove_file(path);
        served.map_err(|e| io_error("serve", e))
    })
}

/// Listens on a new socket at `path`: a socket left by a service that ended is replaced; one
/// that answers is another service's, and refused. The socket is 0666: connecting to a Unix
/// socket takes write permission on it, and every connection is authenticated by its peer
/// credentials (its user must be a configured client), not by the file's mode.
fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Error::InvalidInput(format!(
                "{} exists and is not a socket: keyhold serve does not replace it",
                path.display()
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::InvalidInput(format!(
                "{} is the socket of a service that is running: stop it, or listen elsewhere",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(|e| io_error("remove the old socket", e))?;
    }
    let listener =
        tokio::net::UnixListener::bind(path).map_err(|e| io_error("make the socket", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| io_error("open the socket to every local user (0666)", e))?;
    Ok(listener)
}

/// Resolves at SIGTERM or SIGINT.
async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        // Without signal handling, the service runs until it is killed.
        _ => std::future::pending::<()>().await,
    }
    tracing::info!("stopping: no new connections, finishing requests in flight");
}

fn io_error(what: &str, e: std::io::Error) -> Error {
    Error::Io {
        context: format!("keyhold serve: {what}"),
        source: e,
    }
}
