//! The client's connections: each driven on the calling thread by a runtime of its own, kept
//! for the next call, reached over the Unix socket or TCP with TLS 1.3.

use std::future::Future;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use zeroize::Zeroizing;

use super::{Remote, RemoteKeystore};
use crate::error::{Error, Result};

/// How long a connection may wait unused and still be used: well below the service's default
/// idle limit (its header timeout, 10 s), so that the service does not close it as a request
/// goes out on it (a request that crosses the close is lost, and never sent again).
const KEEP_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

/// A connection to the service and the runtime that drives it: a current-thread runtime, run by
/// whichever caller holds it (callers take one each from the pool), so that the request, the
/// answer and the socket are all handled on the caller's thread.
pub(super) struct Conn {
    /// Always there until the connection is dropped ([`Drop`] takes it).
    runtime: Option<tokio::runtime::Runtime>,
    /// None until the first call connects, and after a failed exchange.
    pub(super) link: Option<Link>,
    /// When its last call ended.
    last_used: std::time::Instant,
}

impl Conn {
    pub(super) fn new() -> Result<Self> {
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
pub(super) struct Link {
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
    /// [`Self::exchange`] on `conn`, driven on this thread, within the call's timeout.
    pub(super) fn exchange_on(
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
