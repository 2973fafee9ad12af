//! A client of `keyhold serve`: [`RemoteKeystore`] does what a [`Keystore`](crate::Keystore)
//! does ([`KeyService`]) by asking the service, so an application holds key IDs and, at most, a
//! credential; never a key, a PIN or the root secret.
//!
//! Blocking, like the keystore: each call is one HTTP/1.1 request on a kept-alive connection
//! (one per concurrent caller, reused), driven on the caller's own thread: no thread is woken
//! to carry a request or its answer. The service's refusals come back as
//! [`Error::Remote`], whose kind is the service's error kind (so the command line exits as it
//! would have on the store itself).

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use base64::Engine as _;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::backend::KeyOptions;
use crate::error::{Error, Result};
use crate::key::{Algorithm, KeyState, KeyType, SignatureFormat};
use crate::keystore::{
    KeyEvent, KeyInfo, KeyRequest, KeyService, PolicyChange, Transition, UseOptions, Used,
};
use crate::public_key::PublicKey;
use crate::secret::SecretBytes;
use crate::time::format_utc;

/// Where a service is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remote {
    /// Its Unix socket.
    Unix(PathBuf),
    /// Its TCP listener, over TLS (`keyhold serve --listen tcp:… --tls-cert …`): the client
    /// needs [`RemoteKeystore::with_tls`].
    Https {
        /// A DNS name or an IP address (an IPv6 one without brackets): the service's certificate
        /// must name it.
        host: String,
        /// The TCP port.
        port: u16,
    },
}

/// The port of `https://HOST` without one, as for any https URL.
pub const DEFAULT_HTTPS_PORT: u16 = 443;

impl Remote {
    /// Parses `unix:PATH` or `https://HOST[:PORT]` (HOST a DNS name, an IPv4 address or an
    /// IPv6 one in brackets, `https://[::1]:8443`; PORT 443 if not given). `http://` is
    /// refused: the service speaks TCP with TLS only.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for anything else, and for an https remote with a path, a query,
    /// a fragment or a user.
    pub fn parse(text: &str) -> Result<Self> {
        let scheme = |prefix: &str| {
            text.get(..prefix.len())
                .filter(|s| s.eq_ignore_ascii_case(prefix))
                .map(|_| &text[prefix.len()..])
        };
        if let Some(rest) = scheme("https://") {
            return Self::parse_https(text, rest);
        }
        if scheme("http://").is_some() {
            return Err(Error::InvalidInput(format!(
                "remote `{text}`: plaintext HTTP over TCP is not offered (keyhold serve speaks \
                 TCP with TLS only, and a token or key would cross the network in the clear): \
                 give https://HOST:PORT, or unix:PATH for the service's local socket"
            )));
        }
        match text.split_once(':') {
            Some(("unix", path)) if !path.is_empty() => Ok(Self::Unix(PathBuf::from(path))),
            _ => Err(Error::InvalidInput(format!(
                "remote `{text}`: give unix:PATH, the socket of `keyhold serve`, or \
                 https://HOST:PORT, its TLS listener"
            ))),
        }
    }

    /// `HOST[:PORT]` of `https://HOST[:PORT]` (`rest`), `text` being the whole remote.
    fn parse_https(text: &str, rest: &str) -> Result<Self> {
        let bad = |why: String| {
            Error::InvalidInput(format!(
                "remote `{text}`: {why}: give https://HOST:PORT (HOST a DNS name or an IP \
                 address, an IPv6 one in brackets: https://[::1]:8443)"
            ))
        };
        // A lone trailing slash is the root path, as an address bar writes it: nothing else.
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#']) {
            return Err(bad(
                "no path, query or fragment: the service's paths are its own (/v1/…)".into(),
            ));
        }
        if authority.contains('@') {
            return Err(bad(
                "no user or password: a bearer token or a client certificate says who the client \
                 is"
                .into(),
            ));
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (address, after) = bracketed
                .split_once(']')
                .ok_or_else(|| bad("an IPv6 address's `[` is not closed".into()))?;
            let address: std::net::Ipv6Addr = address
                .parse()
                .map_err(|_| bad(format!("`{address}` is not an IPv6 address")))?;
            let port = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| bad(format!("`{after}` after the address")))?,
                ),
            };
            (address.to_string(), port)
        } else {
            let (host, port) = match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            };
            if host.contains(':') {
                return Err(bad("an IPv6 address goes in brackets".into()));
            }
            if host.is_empty() {
                return Err(bad("no host".into()));
            }
            // A DNS name or an IPv4 address, as a certificate can name it.
            if rustls::pki_types::ServerName::try_from(host.to_owned()).is_err() {
                return Err(bad(format!("`{host}` is not a host name or an IP address")));
            }
            (host.to_owned(), port)
        };
        let port = match port {
            None => DEFAULT_HTTPS_PORT,
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(format!("`{port}` is not a port (1 to 65535)")))?,
        };
        Ok(Self::Https { host, port })
    }
}

impl std::fmt::Display for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            // Always with its port, in brackets if IPv6: what `parse` reads back as the same.
            Self::Https { host, port } if host.contains(':') => {
                write!(f, "https://[{host}]:{port}")
            }
            Self::Https { host, port } => write!(f, "https://{host}:{port}"),
        }
    }
}

/// The keys of a `keyhold serve`, used through it.
pub struct RemoteKeystore {
    remote: Remote,
    /// `Authorization: Bearer TOKEN`, sent with every request if there is a token (else the
    /// service knows the caller by its peer credentials or certificate): made once, marked
    /// sensitive; `Err` for a token a header cannot carry, said at the first call.
    bearer: Option<std::result::Result<hyper::header::HeaderValue, ()>>,
    /// The TLS an https remote is reached with.
    tls: Option<super::tls::ClientTls>,
    /// Connections not in use, kept alive for the next call.
    idle: Mutex<Vec<Conn>>,
    /// How long a call may take, from sending to the whole answer.
    timeout: std::time::Duration,
}

impl std::fmt::Debug for RemoteKeystore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteKeystore")
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

/// The connections kept for reuse at most.
const MAX_IDLE: usize = 16;

/// How long a connection may wait unused and still be used: well below the service's default
/// idle limit (its header timeout, 10 s), so that the service does not close it as a request
/// goes out on it (a request that crosses the close is lost, and never sent again).
const KEEP_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a call may take unless [`RemoteKeystore::with_timeout`] says otherwise: above the
/// service's own body and drain timeouts, so that it is the service that says why.
pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// A connection to the service and the runtime that drives it: a current-thread runtime, run by
/// whichever caller holds it (callers take one each from the pool), so that the request, the
/// answer and the socket are all handled on the caller's thread.
struct Conn {
    /// Always there until the connection is dropped ([`Drop`] takes it).
    runtime: Option<tokio::runtime::Runtime>,
    /// None until the first call connects, and after a failed exchange.
    link: Option<Link>,
    /// When its last call ended.
    last_used: std::time::Instant,
}

impl Conn {
    fn new() -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| Error::io("start the client's runtime", e))?;
        Ok(Self {
            runtime: Some(runtime),
            link: None,
            last_used: std::time::Instant::now(),
        })
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Neither waits (for a name lookup still running, say) nor panics where a runtime may
        // not block (a client dropped inside an async task).
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// One HTTP/1.1 connection: where requests are sent, and the future that carries them (it runs
/// only while a call drives it; between calls the connection waits, kept alive, in the pool).
struct Link {
    sender: SendRequest<Full<Bytes>>,
    connection: Connection,
}

/// hyper's connection future, whatever the stream under it.
type Connection = std::pin::Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// Runs `work` while driving `connection`: `work`'s outcome.
async fn drive<T>(connection: &mut Connection, work: impl Future<Output = T>) -> T {
    let mut work = std::pin::pin!(work);
    tokio::select! {
        biased;
        done = &mut work => done,
        _ = connection.as_mut() => {
            // The connection ended first. Dropping it ends what it carried, so the work fails
            // now (or, its answer read whole, succeeds) rather than waiting on a dead link; the
            // sender is closed, so the link is not used again.
            *connection = Box::pin(std::future::pending());
            work.await
        }
    }
}

/// Lets a kept connection see what happened while no call drove it (the service closing it, for
/// one): a turn of the runtime's driver, then a poll. A closed one is dropped, which closes its
/// sender, so the call connects anew rather than sending on it.
async fn settle(connection: &mut Connection) {
    // A yield lets the driver read the socket's events without waiting.
    tokio::task::yield_now().await;
    std::future::poll_fn(|cx| {
        if connection.as_mut().poll(cx).is_ready() {
            *connection = Box::pin(std::future::pending());
        }
        std::task::Poll::Ready(())
    })
    .await;
}

/// Why a request on a kept connection failed.
enum Failed {
    /// hyper gave it back unsent: it may go on a new connection.
    Unsent(Box<Request<Full<Bytes>>>),
    /// It was sent, or may have been: it is never sent again.
    Lost(hyper::Error),
}

/// Sends `request` on `sender` and reads the whole answer.
async fn exchange(
    sender: &mut SendRequest<Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> std::result::Result<(u16, Zeroizing<Vec<u8>>), Failed> {
    if sender.ready().await.is_err() {
        return Err(Failed::Unsent(Box::new(request)));
    }
    let response = match sender.try_send_request(request).await {
        Ok(response) => response,
        Err(mut e) => {
            return Err(match e.take_message() {
                Some(unsent) => Failed::Unsent(Box::new(unsent)),
                None => Failed::Lost(e.into_error()),
            })
        }
    };
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.map_err(Failed::Lost)?;
    Ok((status, Zeroizing::new(body.to_bytes().to_vec())))
}

impl RemoteKeystore {
    /// A client of the service at `remote`. Nothing is sent until the first call.
    ///
    /// # Errors
    /// [`Error::Io`] if the client's runtime cannot start.
    pub fn new(remote: Remote) -> Result<Self> {
        // The first call's runtime, made now so that a client that cannot run says so here.
        let first = Conn::new()?;
        Ok(Self {
            remote,
            bearer: None,
            tls: None,
            idle: Mutex::new(vec![first]),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Sends `token` as `Authorization: Bearer` with every request (`keyhold client add` made
    /// it).
    #[must_use]
    pub fn with_token(mut self, token: SecretString) -> Self {
        let value = Zeroizing::new(format!("Bearer {}", token.expose_secret()));
        self.bearer = Some(
            hyper::header::HeaderValue::from_str(&value)
                .map(|mut value| {
                    value.set_sensitive(true);
                    value
                })
                .map_err(|_| ()),
        );
        self
    }

    /// Reaches an https remote with `tls`: the CA its certificate is verified against, and this
    /// client's certificate if any (an https remote without it is refused at the first call).
    #[must_use]
    pub fn with_tls(mut self, tls: super::tls::ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Gives up a call that takes longer than `timeout` ([`Error::Timeout`]); the service may
    /// still carry it out.
    #[must_use]
    pub fn with_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Where the service is.
    pub fn remote(&self) -> &Remote {
        &self.remote
    }

    /// Asks `GET /v1/health`: the client name the service knows this caller by.
    ///
    /// # Errors
    /// As every call: the service unreachable ([`Error::Io`]) or refusing ([`Error::Remote`]).
    pub fn health(&self) -> Result<String> {
        let answer = self.call(Method::GET, "/v1/health", None)?;
        Ok(text(&answer, "client")?.to_owned())
    }

    /// `METHOD path` with `body`: the JSON answer, or the service's error.
    fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        // The body may hold a plaintext: its bytes are zeroized once sent (hyper's copy of them
        // in its write buffer is not).
        let bytes = Zeroizing::new(match body {
            Some(body) => serde_json::to_vec(body)
                .map_err(|e| Error::InvalidInput(format!("a request's JSON: {e}")))?,
            None => Vec::new(),
        });
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "keyhold");
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        if let Some(bearer) = &self.bearer {
            let value = bearer.as_ref().map_err(|()| {
                Error::InvalidInput("the bearer token has characters a header cannot carry".into())
            })?;
            request = request.header(hyper::header::AUTHORIZATION, value.clone());
        }
        let request = request
            .body(Full::new(Bytes::copy_from_slice(&bytes)))
            .map_err(|e| Error::InvalidInput(format!("a request to the service: {e}")))?;
        let reused = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut conn = match reused {
            Some(conn) => conn,
            None => Conn::new()?,
        };
        let exchanged = if tokio::runtime::Handle::try_current().is_ok() {
            // On a thread of a tokio runtime (its blocking pool, or, misused, an async task),
            // whose context forbids running another runtime here: on a thread of its own.
            std::thread::scope(|scope| {
                scope
                    .spawn(|| self.exchange_on(&mut conn, request))
                    .join()
                    .unwrap_or_else(|_| {
                        Err(Error::io(
                            format!("ask the service at {}", self.remote),
                            std::io::Error::other("the client's thread panicked"),
                        ))
                    })
            })
        } else {
            self.exchange_on(&mut conn, request)
        };
        // A connection whose exchange failed or timed out may be mid-answer: it is not kept
        // (its runtime is, for the next call).
        if exchanged.is_err() {
            conn.link = None;
        }
        {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() < MAX_IDLE {
                idle.push(conn);
            }
        }
        let (status, answer) = exchanged?;
        let value: Value = if answer.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&answer).map_err(|e| {
                Error::InvalidInput(format!(
                    "the service at {} answered {status} with something that is not JSON: {e}",
                    self.remote
                ))
            })?
        };
        if status >= 400 {
            let code = value["error"]["code"].as_str().unwrap_or("remote");
            let message = value["error"]["message"]
                .as_str()
                .map_or_else(|| format!("the service answered {status}"), str::to_owned);
            return Err(Error::remote(code, status, message));
        }
        Ok(value)
    }

    /// [`Self::exchange`] on `conn`, driven on this thread, within the call's timeout.
    fn exchange_on(
        &self,
        conn: &mut Conn,
        request: Request<Full<Bytes>>,
    ) -> Result<(u16, Zeroizing<Vec<u8>>)> {
        if conn.link.is_some() && conn.last_used.elapsed() > KEEP_IDLE {
            // Idle this long, the service may be closing it as the request goes out: a new one
            // rather than a request lost in the crossing.
            conn.link = None;
        }
        let runtime = conn.runtime.take();
        let link = &mut conn.link;
        let done = match &runtime {
            Some(runtime) => runtime.block_on(async {
                tokio::time::timeout(self.timeout, self.exchange(link, request))
                    .await
                    .map_err(|_| Error::Timeout {
                        backend: format!("keyhold serve at {}", self.remote),
                        waited: self.timeout,
                        what: "its answer".into(),
                    })?
            }),
            None => Err(Error::io(
                "call the service",
                std::io::Error::other("the connection has no runtime"),
            )),
        };
        conn.runtime = runtime;
        conn.last_used = std::time::Instant::now();
        done
    }

    /// Sends `request` on `link` (or a new connection, if it has none or the service closed
    /// it) and reads the whole answer, driving the connection meanwhile.
    async fn exchange(
        &self,
        link: &mut Option<Link>,
        request: Request<Full<Bytes>>,
    ) -> Result<(u16, Zeroizing<Vec<u8>>)> {
        let lost = |e: hyper::Error| {
            Error::io(
                format!("ask the service at {}", self.remote),
                std::io::Error::other(e),
            )
        };
        // A kept connection may have been closed by the service since (its idle timeout): the
        // request then goes on a new one, which is safe only because hyper hands back a request
        // it did not send. One it sent is never sent again (a second sign is still a sign).
        if let Some(kept) = link {
            settle(&mut kept.connection).await;
        }
        let mut request = Some(request);
        let mut fresh = false;
        loop {
            let current = match link {
                Some(current) if !current.sender.is_closed() => current,
                _ => {
                    fresh = true;
                    link.insert(self.connect().await?)
                }
            };
            let Some(sending) = request.take() else {
                return Err(Error::InvalidInput(
                    "a request was lost before it was sent".into(),
                ));
            };
            let Link { sender, connection } = current;
            match drive(connection, exchange(sender, sending)).await {
                Ok(answer) => return Ok(answer),
                Err(Failed::Unsent(unsent)) if !fresh => {
                    *link = None;
                    request = Some(*unsent);
                }
                Err(Failed::Unsent(_)) => {
                    return Err(Error::io(
                        format!("ask the service at {}", self.remote),
                        std::io::Error::other(
                            "a new connection closed before the request was sent",
                        ),
                    ));
                }
                Err(Failed::Lost(e)) => return Err(lost(e)),
            }
        }
    }

    async fn connect(&self) -> Result<Link> {
        match &self.remote {
            Remote::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path).await.map_err(|e| {
                    Error::io(
                        format!(
                            "connect to keyhold serve at {}: is it running, and may this user \
                             reach its socket?",
                            self.remote
                        ),
                        e,
                    )
                })?;
                self.handshake(stream).await
            }
            Remote::Https { host, port } => {
                let stream = self.connect_tls(host, *port).await?;
                self.handshake(stream).await
            }
        }
    }

    /// A TCP connection to `host:port` and a TLS 1.3 handshake on it, the service's certificate
    /// verified for `host`.
    async fn connect_tls(
        &self,
        host: &str,
        port: u16,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let Some(tls) = &self.tls else {
            return Err(Error::InvalidInput(format!(
                "the service at {} is reached over TLS: give the CA its certificate is checked \
                 against (keyhold --remote-ca FILE; RemoteKeystore::with_tls)",
                self.remote
            )));
        };
        let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|_| {
            Error::InvalidInput(format!(
                "remote {}: `{host}` is not a host name or an IP address",
                self.remote
            ))
        })?;
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| {
                Error::io(
                    format!(
                        "connect to keyhold serve at {}: is it running, and listening on TCP \
                         port {port} of {host}?",
                        self.remote
                    ),
                    e,
                )
            })?;
        // A request is a few small writes and then a wait for the answer: Nagle's algorithm
        // would hold the last one back until the service acknowledged the first (delayed ACK).
        tcp.set_nodelay(true)
            .map_err(|e| Error::io("set TCP_NODELAY", e))?;
        let mut stream = tokio_rustls::TlsConnector::from(tls.config())
            .connect(name, tcp)
            .await
            .map_err(|e| tls_refused(&self.remote, host, e, false))?;
        if tls.shows_certificate() {
            verdict(&mut stream)
                .await
                .map_err(|e| tls_refused(&self.remote, host, e, true))?;
        }
        Ok(stream)
    }

    /// HTTP/1.1 on `stream`: the connection, which runs while a call drives it.
    async fn handshake<S>(&self, stream: S) -> Result<Link>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| {
                    Error::io(
                        format!("speak HTTP to {}", self.remote),
                        std::io::Error::other(e),
                    )
                })?;
        Ok(Link {
            sender,
            connection: Box::pin(connection),
        })
    }

    /// `POST /v1/keys/{id}/{action}` with `body`.
    fn act(&self, id: &str, action: &str, body: &Value) -> Result<Value> {
        check_id(id)?;
        self.call(Method::POST, &format!("/v1/keys/{id}/{action}"), Some(body))
    }

    /// A use's answer: its output in `field` (base64), version and state.
    fn used(&self, answer: &Value, field: &str) -> Result<Used<Vec<u8>>> {
        let (version, state) = use_of(answer)?;
        Ok(Used {
            output: unb64(answer, field)?,
            version,
            state,
        })
    }

    /// A check's answer: `valid` true is its version and state; false is `what` failing.
    fn checked(answer: &Value, what: &'static str) -> Result<Used<()>> {
        if answer["valid"] == Value::Bool(true) {
            let (version, state) = use_of(answer)?;
            Ok(Used {
                output: (),
                version,
                state,
            })
        } else {
            Err(Error::VerificationFailed { what })
        }
    }

    fn keys(&self, namespace: Option<&str>, all: bool) -> Result<Vec<KeyInfo>> {
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(ns) = namespace {
            query.push(("namespace", ns));
        }
        if all {
            query.push(("all", "true"));
        }
        let answer = self.call(Method::GET, &with_query("/v1/keys", &query)?, None)?;
        key_list(&answer)
    }
}

/// How long [`verdict`] waits for the service's answer to this client's certificate before it
/// takes the certificate as accepted.
const VERDICT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The service's answer to the certificate this client showed. In TLS 1.3 the client finishes
/// its handshake first: a service that refuses its certificate says so (an alert) only once the
/// handshake is over here, and the first request would then meet a closed connection, saying
/// only that. So the answer is read before the connection is used: the service's session tickets
/// (rustls sends them once it has accepted the client's Finished, certificate included) or its
/// alert. A service that sends neither within [`VERDICT_WAIT`] is taken to have accepted (the
/// request then finds out).
async fn verdict(
    stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> std::io::Result<()> {
    /// rustls reads records through `std::io::Read`: the socket's non-blocking read.
    struct TryRead<'a>(&'a tokio::net::TcpStream);
    impl std::io::Read for TryRead<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.0.try_read(buf)
        }
    }
    let answer = async {
        loop {
            let (tcp, connection) = stream.get_mut();
            if connection.tls13_tickets_received() > 0 {
                return Ok(());
            }
            tcp.readable().await?;
            match connection.read_tls(&mut TryRead(tcp)) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the service closed the connection after the handshake",
                    ))
                }
                // Records read: any plaintext stays in rustls for the next read of the stream.
                Ok(_) => {
                    connection
                        .process_new_packets()
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    };
    tokio::time::timeout(VERDICT_WAIT, answer)
        .await
        .unwrap_or(Ok(()))
}

/// A failed TLS handshake with the service at `remote` (`after`: the service's answer to this
/// client's certificate, see [`verdict`]), said in words where rustls knows why (its error
/// follows in the chain).
fn tls_refused(remote: &Remote, host: &str, e: std::io::Error, after: bool) -> Error {
    use rustls::CertificateError as C;
    let why = match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(C::UnknownIssuer)) => {
            ": its certificate is not issued by the CA this client trusts (--remote-ca)".to_owned()
        }
        Some(rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        )) => {
            format!(": its certificate is not for `{host}`; connect by a name or address it names")
        }
        Some(rustls::Error::AlertReceived(_)) if after => {
            ": the service refused this client's certificate (--remote-cert): is it issued by \
             the CA of the service's --client-ca, and still valid?"
                .to_owned()
        }
        Some(rustls::Error::AlertReceived(_)) => ": the service refused the handshake".to_owned(),
        _ => String::new(),
    };
    Error::io(
        format!("TLS handshake with keyhold serve at {remote} failed{why}"),
        e,
    )
}

/// Refuses, before anything is sent, an ID that could not be one (it would change the path).
fn check_id(id: &str) -> Result<()> {
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(Error::KeyIdAuthentication {
            reason: "not a key ID's characters",
        });
    }
    Ok(())
}

fn with_query(path: &str, query: &[(&str, &str)]) -> Result<String> {
    if query.is_empty() {
        return Ok(path.to_owned());
    }
    let encoded = serde_urlencoded::to_string(query)
        .map_err(|e| Error::InvalidInput(format!("a query: {e}")))?;
    Ok(format!("{path}?{encoded}"))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The service answered something other than its documented answer.
fn malformed(what: &str) -> Error {
    Error::InvalidInput(format!(
        "the service's answer has no valid `{what}`: is it a keyhold serve of this version?"
    ))
}

fn text<'a>(answer: &'a Value, field: &str) -> Result<&'a str> {
    answer[field].as_str().ok_or_else(|| malformed(field))
}

fn unb64(answer: &Value, field: &str) -> Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(text(answer, field)?)
        .map_err(|_| malformed(field))
}

fn use_of(answer: &Value) -> Result<(u32, KeyState)> {
    let version = answer["version"]
        .as_u64()
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| malformed("version"))?;
    let state = text(answer, "state")?.parse()?;
    Ok((version, state))
}

fn key_list(answer: &Value) -> Result<Vec<KeyInfo>> {
    answer
        .as_array()
        .ok_or_else(|| malformed("keys"))?
        .iter()
        .map(KeyInfo::from_json)
        .collect()
}

/// `{"reason"}`, or `{}`.
fn reason(reason: Option<&str>) -> Value {
    match reason {
        Some(r) => json!({ "reason": r }),
        None => json!({}),
    }
}

fn format_name(format: SignatureFormat) -> &'static str {
    match format {
        SignatureFormat::Der => "der",
        SignatureFormat::Raw => "raw",
    }
}

impl KeyService for RemoteKeystore {
    fn create_key_with(&self, request: &KeyRequest, options: &KeyOptions) -> Result<KeyInfo> {
        let spec = request.spec;
        let mut body = json!({
            "namespace": request.namespace,
            "name": request.name,
            "type": spec.key_type().as_str(),
            "purpose": spec.purpose().as_str(),
            "extractable": options.extractable,
        });
        let mut set = |field: &str, value: Option<String>| {
            if let Some(value) = value {
                body[field] = Value::String(value);
            }
        };
        set("backend", request.backend.clone());
        set(
            "padding",
            match spec.algorithm() {
                Algorithm::RsaPkcs1Sha256 => Some("pkcs1v15".to_owned()),
                Algorithm::RsaPssSha256 => Some("pss".to_owned()),
                _ => None,
            },
        );
        set(
            "rotate_after",
            options.rotate_after.map(|d| format!("{}s", d.as_secs())),
        );
        set("activate_at", options.activate_at.map(format_utc));
        set("deactivate_at", options.deactivate_at.map(format_utc));
        KeyInfo::from_json(&self.call(Method::POST, "/v1/keys", Some(&body))?)
    }

    fn key_info(&self, id: &str) -> Result<KeyInfo> {
        check_id(id)?;
        KeyInfo::from_json(&self.call(Method::GET, &format!("/v1/keys/{id}"), None)?)
    }

    fn key_info_by_name(&self, namespace: &str, name: &str) -> Result<Option<KeyInfo>> {
        let path = with_query("/v1/keys", &[("namespace", namespace), ("name", name)])?;
        Ok(key_list(&self.call(Method::GET, &path, None)?)?
            .into_iter()
            .next())
    }

    fn list_keys(&self, namespace: Option<&str>) -> Result<Vec<KeyInfo>> {
        self.keys(namespace, false)
    }

    fn list_all_keys(&self, namespace: Option<&str>) -> Result<Vec<KeyInfo>> {
        self.keys(namespace, true)
    }

    fn public_key_version(&self, id: &str, version: Option<u32>) -> Result<PublicKey> {
        check_id(id)?;
        let version = version.map(|v| v.to_string());
        let query: Vec<(&str, &str)> = version.iter().map(|v| ("version", v.as_str())).collect();
        let path = with_query(&format!("/v1/keys/{id}/public"), &query)?;
        let answer = self.call(Method::GET, &path, None)?;
        let key_type: KeyType = text(&answer, "type")?.parse()?;
        let algorithm: Algorithm = text(&answer, "algorithm")?.parse()?;
        Ok(PublicKey::from_spki_der(
            key_type,
            algorithm,
            unb64(&answer, "der")?,
        ))
    }

    fn sign_with(
        &self,
        id: &str,
        message: &[u8],
        format: SignatureFormat,
        _options: &UseOptions,
    ) -> Result<Used<Vec<u8>>> {
        let body = json!({ "data": b64(message), "format": format_name(format) });
        self.used(&self.act(id, "sign", &body)?, "signature")
    }

    fn verify_with(
        &self,
        id: &str,
        message: &[u8],
        signature: &[u8],
        format: SignatureFormat,
        options: &UseOptions,
    ) -> Result<Used<()>> {
        let body = json!({
            "data": b64(message),
            "signature": b64(signature),
            "format": format_name(format),
            "version": options.version,
            "allow_compromised": options.allow_compromised,
        });
        Self::checked(&self.act(id, "verify", &body)?, "signature")
    }

    fn encrypt_with(
        &self,
        id: &str,
        plaintext: &[u8],
        aad: &[u8],
        _options: &UseOptions,
    ) -> Result<Used<Vec<u8>>> {
        let body = json!({ "plaintext": b64(plaintext), "aad": b64(aad) });
        self.used(&self.act(id, "encrypt", &body)?, "envelope")
    }

    fn decrypt_with(
        &self,
        id: &str,
        input: &[u8],
        aad: &[u8],
        options: &UseOptions,
    ) -> Result<Used<SecretBytes>> {
        let body = json!({
            "envelope": b64(input),
            "aad": b64(aad),
            "allow_compromised": options.allow_compromised,
        });
        let answer = self.act(id, "decrypt", &body)?;
        let (version, state) = use_of(&answer)?;
        Ok(Used {
            output: SecretBytes::from_zeroizing(Zeroizing::new(unb64(&answer, "plaintext")?)),
            version,
            state,
        })
    }

    fn rewrap(
        &self,
        id: &str,
        input: &[u8],
        aad: &[u8],
        options: &UseOptions,
    ) -> Result<Used<Vec<u8>>> {
        let body = json!({
            "envelope": b64(input),
            "aad": b64(aad),
            "allow_compromised": options.allow_compromised,
        });
        self.used(&self.act(id, "rewrap", &body)?, "envelope")
    }

    fn mac_with(&self, id: &str, data: &[u8], _options: &UseOptions) -> Result<Used<Vec<u8>>> {
        self.used(&self.act(id, "mac", &json!({ "data": b64(data) }))?, "mac")
    }

    fn verify_mac_with(
        &self,
        id: &str,
        data: &[u8],
        tag: &[u8],
        options: &UseOptions,
    ) -> Result<Used<()>> {
        let body = json!({
            "data": b64(data),
            "mac": b64(tag),
            "version": options.version,
            "allow_compromised": options.allow_compromised,
        });
        Self::checked(&self.act(id, "mac-verify", &body)?, "tag")
    }

    fn rotate_key(&self, id: &str, why: Option<&str>) -> Result<KeyInfo> {
        KeyInfo::from_json(&self.act(id, "rotate", &reason(why))?)
    }

    fn change_state(&self, id: &str, transition: Transition, why: Option<&str>) -> Result<KeyInfo> {
        let action = match transition {
            Transition::Suspend => "suspend",
            Transition::Resume => "resume",
            Transition::Deactivate => "deactivate",
            Transition::Compromise => "compromise",
        };
        KeyInfo::from_json(&self.act(id, action, &reason(why))?)
    }

    fn schedule_destroy(&self, id: &str, at: i64, why: Option<&str>) -> Result<KeyInfo> {
        let mut body = reason(why);
        body["at"] = json!(at);
        KeyInfo::from_json(&self.act(id, "destroy", &body)?)
    }

    fn cancel_destroy(&self, id: &str, why: Option<&str>) -> Result<KeyInfo> {
        KeyInfo::from_json(&self.act(id, "cancel-destroy", &reason(why))?)
    }

    fn set_policy(&self, id: &str, policy: &PolicyChange, why: Option<&str>) -> Result<KeyInfo> {
        let mut body = reason(why);
        if let Some(after) = policy.rotate_after {
            body["rotate_after"] =
                json!(after.map_or("never".to_owned(), |d| format!("{}s", d.as_secs())));
        }
        if let Some(at) = policy.activate_at {
            body["activate_at"] = json!(at.map_or("now".to_owned(), format_utc));
        }
        if let Some(at) = policy.deactivate_at {
            body["deactivate_at"] = json!(at.map_or("never".to_owned(), format_utc));
        }
        if let Some(min) = policy.min_decrypt_version {
            body["min_decrypt_version"] = json!(min);
        }
        KeyInfo::from_json(&self.act(id, "policy", &body)?)
    }

    fn history(&self, id: &str) -> Result<Vec<KeyEvent>> {
        check_id(id)?;
        let answer = self.call(Method::GET, &format!("/v1/keys/{id}/history"), None)?;
        answer
            .as_array()
            .ok_or_else(|| malformed("history"))?
            .iter()
            .map(KeyEvent::from_json)
            .collect()
    }

    fn sealer_kind(&self) -> Result<String> {
        let answer = self.call(Method::GET, "/v1/health", None)?;
        Ok(text(&answer, "sealer")?.to_owned())
    }

    fn random(&self, n: usize) -> Result<Vec<u8>> {
        let answer = self.call(Method::POST, "/v1/random", Some(&json!({ "bytes": n })))?;
        unb64(&answer, "data")
    }
}
