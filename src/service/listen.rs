//! The service's transport: listeners (Unix sockets, TCP with TLS, sockets systemd passed),
//! one HTTP/1 connection loop for all of them, and the bounds a client cannot escape: connections
//! at once, time to send a request's head and body, requests in flight per client, and a drain
//! deadline after SIGTERM.
//!
//! Each listener's accept loop and each connection is a task; a `watch` channel says "stop" to
//! all of them, and each connection holds a sender of an `mpsc` channel whose closing says the
//! drain is over.

use std::collections::BTreeSet;
use std::fs::File;
use std::future::Future;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use super::api::ApiError;
use super::auth::{Caller, Clients, Peer, Turn};
use super::metrics::{Connection, Metrics};
use super::token::{self, Source};
use super::{io_error, routes, tls, Limits, Listen, Settings};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::keystore::Keystore;

/// The first file descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// The sockets systemd passed this process (socket activation: `LISTEN_PID` is this process,
/// `LISTEN_FDS` their count, from file descriptor 3), as listeners to serve.
pub fn inherited_sockets() -> Vec<Listen> {
    let var = |name| std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok());
    match (var("LISTEN_PID"), var("LISTEN_FDS")) {
        (Some(pid), Some(count)) if pid == std::process::id() => (0..count)
            .filter_map(|i| i32::try_from(i).ok())
            .map(|i| Listen::Inherited(LISTEN_FDS_START + i))
            .collect(),
        _ => Vec::new(),
    }
}

/// The service made ready before the store is unsealed: its clients and TLS configuration read,
/// its socket paths locked, the sockets systemd passed taken. Everything that can be refused is
/// refused here, so a mistake costs no passphrase or PIN.
pub struct Prepared {
    clients: Clients,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    planned: Vec<Planned>,
    /// `[store] verify_interval`: the whole store verified this often while the service runs.
    verify_interval: Option<Duration>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("clients", &self.clients)
            .field("tls", &self.tls.is_some())
            .field("limits", &self.limits)
            .field("planned", &self.planned)
            .finish()
    }
}

/// A listener to make, or one made already.
#[derive(Debug)]
enum Planned {
    /// A socket at this path, made by this service, under its lock (`PATH.lock`, held to exit).
    Unix {
        path: PathBuf,
        _lock: File,
    },
    Tcp(std::net::SocketAddr),
    /// systemd's: served as it is, never removed.
    InheritedUnix(std::os::unix::net::UnixListener),
    InheritedTcp(std::net::TcpListener),
}

impl Prepared {
    /// Checks `settings` against `config` and takes what the service will hold.
    ///
    /// # Errors
    /// [`Error::Config`] without clients; [`Error::InvalidInput`] for TCP without TLS, TLS files
    /// that cannot be used, a socket path another service holds, a passed descriptor that is no
    /// listening socket; [`Error::Io`] for a lock file that cannot be made.
    pub fn new(config: &Config, settings: &Settings) -> Result<Self> {
        settings.check()?;
        let clients = Clients::from_config(config)?;
        let mut planned = Vec::with_capacity(settings.listen.len());
        for listen in &settings.listen {
            planned.push(match listen {
                Listen::Unix(path) => Planned::Unix {
                    _lock: lock_socket_path(path)?,
                    path: path.clone(),
                },
                Listen::Tcp(addr) => Planned::Tcp(*addr),
                Listen::Inherited(fd) => take_inherited(*fd)?,
            });
        }
        let tcp = planned
            .iter()
            .any(|p| matches!(p, Planned::Tcp(_) | Planned::InheritedTcp(_)));
        if tcp && settings.tls.is_none() {
            return Err(Error::InvalidInput(
                "systemd passed a TCP socket, and TCP is served with TLS only: give --tls-cert \
                 and --tls-key"
                    .into(),
            ));
        }
        let tls = match &settings.tls {
            Some(files) => Some(TlsAcceptor::from(files.server_config()?)),
            None => None,
        };
        Ok(Self {
            clients,
            tls,
            limits: settings.limits,
            planned,
            verify_interval: config.store.verify_interval,
        })
    }
}

/// Serves `keystore` as `prepared` says until SIGTERM or SIGINT, then stops accepting, lets
/// requests in flight finish for at most the drain timeout, removes the sockets it made and
/// returns. `ready` is called once every listener accepts connections, with where they are
/// (`tcp:…:0` as the port bound).
///
/// # Errors
/// [`Error::InvalidInput`] for a socket path that is not a socket or that a running service
/// answers; [`Error::Io`] if a socket cannot be made or the runtime cannot start.
pub fn serve(prepared: Prepared, keystore: Keystore, ready: impl FnOnce(&[Listen])) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("keyhold-serve")
        .build()
        .map_err(|e| io_error("start the service's runtime", e))?;
    let Prepared {
        clients,
        tls,
        limits,
        planned,
        verify_interval,
    } = prepared;
    let keystore = Arc::new(keystore);
    // Integrity verified periodically (each run logged, and its outcome in /v1/health); stopped
    // when the service ends.
    let verified = Arc::new(std::sync::Mutex::new(None));
    let _periodic = match verify_interval {
        Some(interval) => {
            let record = Arc::clone(&verified);
            Some(keystore.spawn_periodic_verify(interval, move |report| {
                let outcome = routes::Verified::of(report);
                *record
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(outcome);
            })?)
        }
        None => None,
    };
    let served_keystore = Arc::clone(&keystore);
    let served = runtime.block_on(async move {
        let keystore = served_keystore;
        // Before any socket accepts: a signal from then on is a clean stop, never a kill.
        let stop_signal = stop_signal()?;
        let mut bound = Vec::with_capacity(planned.len());
        let mut locks = Vec::new();
        for plan in planned {
            bound.push(bind(plan, &mut locks)?);
        }
        ready(&bound.iter().map(Bound::listen).collect::<Vec<_>>());
        let state = routes::State::new(Arc::clone(&keystore), clients, verified);
        let metrics = Arc::clone(state.metrics());
        let router = routes::router(state.clone());
        let shared = Arc::new(Shared {
            router,
            state,
            metrics,
            tls,
            limits,
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            keep_alive: keep_alive_header(limits.header_timeout),
        });
        let (stop, stopped) = watch::channel(false);
        let (alive, mut drained) = mpsc::channel::<()>(1);
        let mut loops = tokio::task::JoinSet::new();
        let mut made = Vec::new();
        for b in bound {
            if let Bound::Unix { made: Some(m), .. } = &b {
                made.push(m.clone());
            }
            loops.spawn(accept_loop(
                b,
                Arc::clone(&shared),
                stopped.clone(),
                alive.clone(),
            ));
        }
        drop(alive);
        stop_signal.await;
        tracing::info!("stopping: no new connections, finishing requests in flight");
        let _ = stop.send(true);
        while loops.join_next().await.is_some() {}
        for socket in &made {
            socket.remove_if_ours();
        }
        if tokio::time::timeout(limits.drain_timeout, drained.recv())
            .await
            .is_err()
        {
            tracing::warn!(
                "requests still in flight {} after SIGTERM: their connections are dropped",
                humantime::format_duration(limits.drain_timeout)
            );
        }
        drop(locks);
        Ok(())
    });
    // What the keystore buffered for the audit log is written now: a call still running past
    // the drain keeps the keystore alive, and with it the buffer its drop would write.
    if let Err(e) = keystore.audit_sink().flush() {
        tracing::error!("the audit log could not be written at exit: {e}");
    }
    // Connections left past the drain deadline are dropped with the runtime; a keystore call on
    // the blocking pool is given a moment to return, not waited for.
    runtime.shutdown_timeout(Duration::from_secs(1));
    served
}

/// What every connection shares.
struct Shared {
    router: axum::Router,
    /// What [`admit`] decides by.
    state: routes::State,
    /// The router's metrics, which count connections too.
    metrics: Arc<Metrics>,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    connections: Arc<Semaphore>,
    /// Every answer's `Keep-Alive`: how long the service keeps an idle connection.
    keep_alive: axum::http::HeaderValue,
}

/// `Keep-Alive: timeout=N` (whole seconds, rounded down): a connection that waits this long for
/// a request is closed ([`Limits::header_timeout`]: hyper times an idle connection's next head).
/// keyhold's client uses a connection idle for at most half of it, so that its next request
/// does not cross the service's close.
fn keep_alive_header(header_timeout: Duration) -> axum::http::HeaderValue {
    // Digits and `timeout=` are always a header value: the fallback is never taken.
    axum::http::HeaderValue::from_str(&format!("timeout={}", header_timeout.as_secs()))
        .unwrap_or_else(|_| axum::http::HeaderValue::from_static("timeout=0"))
}

/// A listener that accepts.
#[derive(Debug)]
enum Bound {
    Unix {
        listener: UnixListener,
        at: Listen,
        made: Option<MadeSocket>,
    },
    Tcp {
        listener: TcpListener,
        at: Listen,
    },
}

impl Bound {
    fn listen(&self) -> Listen {
        match self {
            Self::Unix { at, .. } | Self::Tcp { at, .. } => at.clone(),
        }
    }
}

/// A socket file this service made: removed at exit if it is still the same file.
#[derive(Debug, Clone)]
struct MadeSocket {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl MadeSocket {
    fn remove_if_ours(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.dev() == self.dev && meta.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!("could not remove {}: {e}", self.path.display());
                }
            }
            Ok(_) => tracing::warn!(
                "{} is no longer the socket this service made: left as it is",
                self.path.display()
            ),
            Err(_) => {}
        }
    }
}

fn bind(plan: Planned, locks: &mut Vec<File>) -> Result<Bound> {
    let tokio_unix = |l: std::os::unix::net::UnixListener| {
        l.set_nonblocking(true)
            .and_then(|()| UnixListener::from_std(l))
            .map_err(|e| io_error("serve the socket systemd passed", e))
    };
    let tokio_tcp = |l: std::net::TcpListener| {
        l.set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(l))
            .map_err(|e| io_error("serve the TCP socket", e))
    };
    Ok(match plan {
        Planned::Unix { path, _lock } => {
            locks.push(_lock);
            let (listener, made) = bind_unix(&path)?;
            Bound::Unix {
                listener,
                at: Listen::Unix(path),
                made: Some(made),
            }
        }
        Planned::Tcp(addr) => {
            let listener = std::net::TcpListener::bind(addr)
                .map_err(|e| io_error(&format!("listen on tcp:{addr}"), e))?;
            let at = Listen::Tcp(listener.local_addr().unwrap_or(addr));
            Bound::Tcp {
                listener: tokio_tcp(listener)?,
                at,
            }
        }
        Planned::InheritedUnix(l) => {
            let at = l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_path_buf))
                .map_or(Listen::Inherited(LISTEN_FDS_START), Listen::Unix);
            Bound::Unix {
                listener: tokio_unix(l)?,
                at,
                made: None,
            }
        }
        Planned::InheritedTcp(l) => {
            let at = l
                .local_addr()
                .map_or(Listen::Inherited(LISTEN_FDS_START), Listen::Tcp);
            Bound::Tcp {
                listener: tokio_tcp(l)?,
                at,
            }
        }
    })
}

/// Holds `PATH.lock` (an exclusive `flock`) for the service's life, so that a second service on
/// the same path is refused instead of replacing the first one's socket. The lock file stays.
fn lock_socket_path(path: &Path) -> Result<File> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        // Not through a symbolic link: one planted beside the socket would have the service
        // lock (and hold open) whatever file it names.
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&lock_path)
        .map_err(|e| io_error(&format!("make the lock {}", lock_path.display()), e))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(Error::InvalidInput(format!(
            "{} is served by another keyhold serve (it holds {}): stop it, or listen elsewhere",
            path.display(),
            lock_path.display()
        ))),
        Err(e) => Err(io_error(&format!("lock {}", lock_path.display()), e.into())),
    }
}

/// Listens on a new socket at `path`: a socket left by a service that ended is replaced; one
/// that answers is another service's (one that holds no lock), and refused. The socket is 0666:
/// connecting to a Unix socket takes write permission on it, and every connection is
/// authenticated by its peer credentials (its user must be a configured client), not by the
/// file's mode. It is made under the command's umask (0077), so it is never more open than that
/// before the chmod.
fn bind_unix(path: &Path) -> Result<(UnixListener, MadeSocket)> {
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
    let listener = UnixListener::bind(path).map_err(|e| io_error("make the socket", e))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| io_error("read the socket made", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| io_error("open the socket to every local user (0666)", e))?;
    let made = MadeSocket {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    Ok((listener, made))
}

/// Takes the listening socket systemd passed as `fd`, once. Only descriptors `LISTEN_FDS`
/// announces to this process are taken: nothing else in the process owns them.
fn take_inherited(fd: i32) -> Result<Planned> {
    static TAKEN: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());
    let announced = inherited_sockets().contains(&Listen::Inherited(fd));
    if !announced
        || !TAKEN
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(fd)
    {
        return Err(Error::InvalidInput(format!(
            "file descriptor {fd} is no socket systemd passed to this process (LISTEN_FDS), or \
             it is served already"
        )));
    }
    // SAFETY: systemd's socket activation protocol gives this process descriptors
    // LISTEN_FDS_START.. (LISTEN_PID is this process, checked above), open and owned by no one
    // else in it; TAKEN makes sure each is owned once.
    #[allow(unsafe_code)]
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Not handed on to anything this process runs.
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)
        .map_err(|e| io_error(&format!("take file descriptor {fd}"), e.into()))?;
    let tcp = std::net::TcpListener::from(owned);
    if tcp.local_addr().is_ok() {
        return Ok(Planned::InheritedTcp(tcp));
    }
    let unix = std::os::unix::net::UnixListener::from(OwnedFd::from(tcp));
    match unix.local_addr() {
        Ok(_) => Ok(Planned::InheritedUnix(unix)),
        Err(e) => Err(Error::InvalidInput(format!(
            "file descriptor {fd} from systemd is neither a TCP nor a Unix socket ({e}): give \
             the socket unit ListenStream= only"
        ))),
    }
}

/// Resolves once the service stops (at once if it has).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error is the sender gone: the service is ending either way.
    let _ = stop.wait_for(|s| *s).await;
}

/// Resolves at SIGTERM or SIGINT; the handlers are in place when this returns.
fn stop_signal() -> Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| io_error("handle SIGTERM", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| io_error("handle SIGINT", e))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// A connection accepted, before TLS.
enum Accepted {
    Unix(UnixStream),
    Tcp(TcpStream, std::net::SocketAddr),
}

async fn accept_loop(
    listener: Bound,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    alive: mpsc::Sender<()>,
) {
    loop {
        // At most max_connections at once: the next one waits in the listen queue.
        let permit = tokio::select! {
            biased;
            _ = stopped(&mut stop) => return,
            permit = Arc::clone(&shared.connections).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            biased;
            _ = stopped(&mut stop) => return,
            accepted = accept(&listener) => accepted,
        };
        match accepted {
            Ok(connection) => {
                // A Unix connection is served from here on: counted before the next is accepted,
                // so that the metrics count connections in the order they came. A TCP one is
                // counted once its TLS handshake is done.
                let counted =
                    matches!(connection, Accepted::Unix(_)).then(|| shared.metrics.connection());
                tokio::spawn(connection_task(
                    connection,
                    Arc::clone(&shared),
                    stop.clone(),
                    (alive.clone(), permit, counted),
                ));
            }
            Err(e) => {
                // Out of descriptors or memory, a connection reset before it was accepted: the
                // listener is fine, and the next accept may work once a connection ends.
                tracing::warn!("accepting a connection on {}: {e}", listener.listen());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn accept(listener: &Bound) -> std::io::Result<Accepted> {
    match listener {
        Bound::Unix { listener, .. } => listener.accept().await.map(|(s, _)| Accepted::Unix(s)),
        Bound::Tcp { listener, .. } => {
            let (stream, addr) = listener.accept().await?;
            stream.set_nodelay(true)?;
            Ok(Accepted::Tcp(stream, addr))
        }
    }
}

/// One connection, from its TLS handshake (on TCP) to its end. `_held` is its place among the
/// connections served and in the drain, and its count in the metrics (Unix).
async fn connection_task(
    connection: Accepted,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    _held: (mpsc::Sender<()>, OwnedSemaphorePermit, Option<Connection>),
) {
    match connection {
        Accepted::Unix(stream) => {
            let uid = stream.peer_cred().ok().map(|c| c.uid());
            serve_http(stream, Peer::Unix { uid }, &shared, stop).await;
        }
        Accepted::Tcp(stream, addr) => {
            let Some(acceptor) = &shared.tls else {
                return;
            };
            let handshake = tokio::select! {
                handshake = tokio::time::timeout(
                    shared.limits.header_timeout,
                    acceptor.accept(stream),
                ) => handshake,
                _ = stopped(&mut stop) => return,
            };
            let stream = match handshake {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::info!("TLS handshake with {addr} refused: {e}");
                    return;
                }
                Err(_) => {
                    tracing::info!("TLS handshake with {addr} did not finish in time");
                    return;
                }
            };
            let _counted = shared.metrics.connection();
            let names = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(<[_]>::first)
                .map(|cert| tls::certificate_names(cert))
                .unwrap_or_default();
            serve_http(
                stream,
                Peer::Tls {
                    names: names.into(),
                    addr: Some(addr.ip()),
                },
                &shared,
                stop,
            )
            .await;
        }
    }
}

/// Serves HTTP/1 on `io` until the client closes it, a timeout ends it, or the service stops
/// (then the request in flight, if any, is finished first).
async fn serve_http<I>(io: I, peer: Peer, shared: &Shared, mut stop: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (router, state) = (shared.router.clone(), shared.state.clone());
    let body_timeout = shared.limits.body_timeout;
    let keep_alive = shared.keep_alive.clone();
    // Each request is admitted, routed and its answer finished here, with no middleware or
    // router around the routes: each such layer is a boxed service cloned and called per
    // request. Without the two there were (the admission as a `from_fn` middleware, a router
    // around the routes for the answer's `Allow`), and with the body's timer made only for a
    // body that is waited for, a `GET /v1/health` at 16 clients took 41 us of CPU instead of 49
    // (client and service together; the serve bench's `http` side sending that request).
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let request = request.map(|body| axum::body::Body::new(TimedBody::new(body, body_timeout)));
        let answered = admit(state.clone(), peer.clone(), request, router.clone());
        let keep_alive = keep_alive.clone();
        async move {
            let mut response = answered.await;
            routes::allow_on_405_only(&mut response);
            response.headers_mut().insert(
                axum::http::header::HeaderName::from_static("keep-alive"),
                keep_alive,
            );
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.header_timeout);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        _ = stopped(&mut stop) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = ended {
        if e.is_timeout() {
            tracing::info!(
                "closed a connection that sent no whole request head in {}",
                humantime::format_duration(shared.limits.header_timeout)
            );
        } else {
            tracing::debug!("connection ended: {e}");
        }
    }
}

/// Who a request is, decided once, before any route: the client its connection is (401 if
/// none), holding one of the client's `max_concurrent` permits while `router` serves it (429
/// `busy` when it has none left: refused at once, not queued, so that one client's flood cannot
/// hold others' connections or memory).
async fn admit(
    state: routes::State,
    peer: Peer,
    mut request: Request,
    mut router: axum::Router,
) -> Response {
    let client = match request.headers().get(axum::http::header::AUTHORIZATION) {
        // A bearer token decides alone: a wrong one is 401 whoever the peer is.
        Some(header) => token::authenticate(&state, Source::of(Some(&peer)), header).await,
        None => state.clients.identify(&peer).ok_or_else(|| {
            if REFUSALS.due() {
                tracing::warn!(
                    ?peer,
                    "refused a request from no configured client (and any others in the \
                         next {}s)",
                    WARN_EVERY.as_secs()
                );
            }
            ApiError::unauthenticated()
        }),
    };
    let client = match client {
        Ok(client) => client,
        Err(e) => return unauthenticated(request, e).await,
    };
    let Ok(permit) = Arc::clone(&client.busy).try_acquire_owned() else {
        let busy = ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "busy",
            format!(
                "client `{}` has its max_concurrent requests in flight: retry when one is \
                 answered",
                client.name
            ),
        );
        return routes::refuse(request, busy).await.into_response();
    };
    // The turn is held until the answer, and by the work the request starts until that ends
    // (which may be later: a client that went away does not end its work).
    let turn = Turn::new(permit);
    request
        .extensions_mut()
        .insert(Caller::admitted(client, turn.clone()));
    let response = match tower_service::Service::call(&mut router, request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    drop(turn);
    response
}

/// What of a body the service reads for a request it does not know the sender of: enough that
/// a small request gets its answer rather than a reset, and no more.
const UNAUTHENTICATED_BODY: usize = 64 * 1024;

/// How often the refusal of an unknown peer is logged at most.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// When an unknown peer's refusal was last logged.
static REFUSALS: Throttle = Throttle::new();

/// `e` for a request from no client: its body read up to [`UNAUTHENTICATED_BODY`], and the
/// connection closed after the answer (a larger body is not read for a stranger).
async fn unauthenticated(request: Request, e: ApiError) -> Response {
    let whole = routes::drain(request, UNAUTHENTICATED_BODY).await;
    let mut response = e.into_response();
    if !whole {
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}

/// Lets something happen at most once per [`WARN_EVERY`].
struct Throttle {
    /// Milliseconds since the process's first use of it, when it last let through (+1; 0 never).
    last: std::sync::atomic::AtomicU64,
}

impl Throttle {
    const fn new() -> Self {
        Self {
            last: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether it may happen now (and, if so, it is counted as happened).
    fn due(&self) -> bool {
        use std::sync::atomic::Ordering;
        static START: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
        let start = *START.get_or_init(tokio::time::Instant::now);
        let now = u64::try_from(start.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let last = self.last.load(Ordering::Relaxed);
        let every = u64::try_from(WARN_EVERY.as_millis()).unwrap_or(u64::MAX);
        (last == 0 || now.saturating_sub(last) >= every)
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// A request body that must arrive whole within a time from the request's head: a client that
/// stalls its body is answered 400 and its connection closed, instead of holding it.
struct TimedBody {
    inner: Incoming,
    /// When the request's head was read.
    since: tokio::time::Instant,
    /// The timer, made the first time the body is waited for: a body read at once (almost
    /// every one) never makes one.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    limit: Duration,
}

impl TimedBody {
    fn new(inner: Incoming, limit: Duration) -> Self {
        Self {
            inner,
            since: tokio::time::Instant::now(),
            deadline: None,
            limit,
        }
    }
}

/// The error of a body that did not arrive in time.
#[derive(Debug)]
struct BodyTimeout(Duration);

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body did not arrive within {}",
            humantime::format_duration(self.0)
        )
    }
}

impl std::error::Error for BodyTimeout {}

impl hyper::body::Body for TimedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                let (since, limit) = (this.since, this.limit);
                let deadline = this.deadline.get_or_insert_with(|| {
                    // A limit past what an instant holds never ends, as `sleep`'s.
                    Box::pin(match since.checked_add(limit) {
                        Some(at) => tokio::time::sleep_until(at),
                        None => tokio::time::sleep(limit),
                    })
                });
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyTimeout(limit).into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
