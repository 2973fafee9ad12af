//! The client's connections: blocking sockets, each used by one call at a time on the caller's
//! own thread and kept for the next call, reached over the Unix socket or TCP with TLS 1.3. A
//! call writes its request and reads the answer; no runtime, no poller, no other thread.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use zeroize::{Zeroize as _, Zeroizing};

use super::{Remote, RemoteKeystore};
use crate::error::{Error, Result};

mod answer;

use answer::read_answer;

/// How long a connection may wait unused and still be used: well below the service's default
/// idle limit (its header timeout, 10 s), so that the service does not close it as a request
/// goes out on it (a request that crosses the close is lost, and never sent again).
const KEEP_IDLE: Duration = Duration::from_secs(5);

/// A connection to the service, kept between calls.
pub(super) struct Conn {
    /// None until the first call connects, and after a failed exchange.
    pub(super) link: Option<Link>,
    /// When its last call ended.
    last_used: Instant,
}

impl Conn {
    pub(super) fn new() -> Self {
        Self {
            link: None,
            last_used: Instant::now(),
        }
    }
}

/// One HTTP/1.1 connection and what was read on it.
pub(super) struct Link {
    stream: Stream,
    /// The timeout set on the socket (reads and writes), changed only when a call's deadline
    /// comes closer than it.
    timeout: Duration,
    /// What was read and not yet taken: zeroized, as an answer may hold a plaintext.
    read: Zeroizing<Vec<u8>>,
}

enum Stream {
    Unix(UnixStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn socket(&self) -> BorrowedFd<'_> {
        match self {
            Self::Unix(s) => s.as_fd(),
            Self::Tls(s) => s.sock.as_fd(),
        }
    }

    fn set_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        let timeout = Some(timeout.max(Duration::from_millis(1)));
        match self {
            Self::Unix(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            Self::Tls(s) => {
                s.sock.set_read_timeout(timeout)?;
                s.sock.set_write_timeout(timeout)
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            // Without SIGPIPE on a socket the service closed (a program embedding the client
            // may not ignore it); std's TcpStream already sends so.
            Self::Unix(s) => rustix::net::send(s, buf, rustix::net::SendFlags::NOSIGNAL)
                .map_err(std::io::Error::from),
            Self::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Unix(_) => Ok(()),
            Self::Tls(s) => s.flush(),
        }
    }
}

/// Whether a kept connection is still open: nothing to read on it, without waiting. The
/// service sends nothing unasked; a close (or anything else) means it is not to be used.
fn still_open(stream: &Stream) -> bool {
    use rustix::net::RecvFlags;
    let mut probe = [0u8; 1];
    matches!(
        rustix::net::recv(
            stream.socket(),
            &mut probe,
            RecvFlags::PEEK | RecvFlags::DONTWAIT
        ),
        Err(rustix::io::Errno::AGAIN)
    )
}

/// Why an exchange failed.
enum Failed {
    /// Nothing of the request was written: it may go on a new connection.
    Unsent(std::io::Error),
    /// It was sent, or may have been: it is never sent again (a second sign is still a sign).
    Lost(std::io::Error),
    /// The call's time ran out.
    TimedOut,
}

impl RemoteKeystore {
    /// Sends `request` (a whole HTTP/1.1 request) on `conn`, or on a new connection if it has
    /// none or the service closed it, and reads the whole answer, within the call's timeout:
    /// its status and body.
    pub(super) fn exchange_on(
        &self,
        conn: &mut Conn,
        request: &[u8],
    ) -> Result<(u16, Zeroizing<Vec<u8>>)> {
        let deadline = Instant::now() + self.timeout;
        if conn.last_used.elapsed() > KEEP_IDLE
            || conn.link.as_ref().is_some_and(|l| !still_open(&l.stream))
        {
            // Idle this long, the service may be closing it as the request goes out; closed,
            // it is of no use: a new one rather than a request lost in the crossing.
            conn.link = None;
        }
        let done = loop {
            let fresh = conn.link.is_none();
            let link = match &mut conn.link {
                Some(link) => link,
                None => conn.link.insert(self.connect(deadline)?),
            };
            match exchange(link, request, deadline) {
                Err(Failed::Unsent(_)) if !fresh => conn.link = None,
                Err(Failed::Unsent(e) | Failed::Lost(e)) => {
                    break Err(Error::io(format!("ask the service at {}", self.remote), e))
                }
                Err(Failed::TimedOut) => break Err(self.timed_out()),
                Ok((status, body, keep)) => {
                    if !keep {
                        conn.link = None;
                    }
                    break Ok((status, body));
                }
            }
        };
        match &mut conn.link {
            // What was read may hold a plaintext: cleared, not left for the next call.
            Some(link) if done.is_ok() => link.read.zeroize(),
            // It may be mid-answer: not used again.
            _ => conn.link = None,
        }
        conn.last_used = Instant::now();
        done
    }

    fn timed_out(&self) -> Error {
        Error::Timeout {
            backend: format!("keyhold serve at {}", self.remote),
            waited: self.timeout,
            what: "its answer".into(),
        }
    }

    fn connect(&self, deadline: Instant) -> Result<Link> {
        let stream = match &self.remote {
            Remote::Unix(path) => Stream::Unix(UnixStream::connect(path).map_err(|e| {
                Error::io(
                    format!(
                        "connect to keyhold serve at {}: is it running, and may this user reach \
                         its socket?",
                        self.remote
                    ),
                    e,
                )
            })?),
            Remote::Https { host, port } => {
                Stream::Tls(Box::new(self.connect_tls(host, *port, deadline)?))
            }
        };
        let timeout = left(deadline).ok_or_else(|| self.timed_out())?;
        stream
            .set_timeout(timeout)
            .map_err(|e| Error::io("set the connection's timeout", e))?;
        Ok(Link {
            stream,
            timeout,
            read: Zeroizing::new(Vec::with_capacity(4096)),
        })
    }

    /// A TCP connection to `host:port` and a TLS 1.3 handshake on it, the service's certificate
    /// verified for `host`.
    fn connect_tls(
        &self,
        host: &str,
        port: u16,
        deadline: Instant,
    ) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
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
        let unreachable = |e| {
            Error::io(
                format!(
                    "connect to keyhold serve at {}: is it running, and listening on TCP port \
                     {port} of {host}?",
                    self.remote
                ),
                e,
            )
        };
        let mut tcp = None;
        let mut last = std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("`{host}` has no address"),
        );
        for address in (host, port).to_socket_addrs().map_err(unreachable)? {
            let Some(time) = left(deadline) else {
                return Err(self.timed_out());
            };
            match TcpStream::connect_timeout(&address, time) {
                Ok(stream) => {
                    tcp = Some(stream);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let mut tcp = tcp.ok_or_else(|| unreachable(last))?;
        // A request is a few small writes and then a wait for the answer: Nagle's algorithm
        // would hold the last one back until the service acknowledged the first (delayed ACK).
        tcp.set_nodelay(true)
            .map_err(|e| Error::io("set TCP_NODELAY", e))?;
        let time = left(deadline).ok_or_else(|| self.timed_out())?;
        tcp.set_read_timeout(Some(time))
            .and_then(|()| tcp.set_write_timeout(Some(time)))
            .map_err(|e| Error::io("set the connection's timeout", e))?;
        let mut connection = rustls::ClientConnection::new(tls.config(), name)
            .map_err(|e| Error::io("start a TLS handshake", std::io::Error::other(e)))?;
        while connection.is_handshaking() {
            connection
                .complete_io(&mut tcp)
                .map_err(|e| tls_refused(&self.remote, host, e, false))?;
        }
        if tls.shows_certificate() {
            verdict(&mut connection, &mut tcp)
                .map_err(|e| tls_refused(&self.remote, host, e, true))?;
        }
        Ok(rustls::StreamOwned::new(connection, tcp))
    }
}

/// The time left until `deadline`, if any.
fn left(deadline: Instant) -> Option<Duration> {
    Some(deadline.saturating_duration_since(Instant::now())).filter(|d| !d.is_zero())
}

/// Whether an I/O error is a socket timeout.
fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Writes `request` on `link` and reads the answer: its status, its body, and whether the
/// connection may be used again.
fn exchange(
    link: &mut Link,
    request: &[u8],
    deadline: Instant,
) -> std::result::Result<(u16, Zeroizing<Vec<u8>>, bool), Failed> {
    link.read.clear();
    let mut written = 0;
    while written < request.len() {
        narrow_timeout(link, deadline)?;
        match link.stream.write(&request[written..]) {
            Ok(0) => {
                let e =
                    std::io::Error::new(std::io::ErrorKind::WriteZero, "the socket took nothing");
                return Err(if written == 0 {
                    Failed::Unsent(e)
                } else {
                    Failed::Lost(e)
                });
            }
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => return Err(Failed::TimedOut),
            Err(e) if written == 0 => return Err(Failed::Unsent(e)),
            Err(e) => return Err(Failed::Lost(e)),
        }
    }
    narrow_timeout(link, deadline)?;
    link.stream.flush().map_err(|e| {
        if timed_out(&e) {
            Failed::TimedOut
        } else {
            Failed::Lost(e)
        }
    })?;
    read_answer(link, deadline)
}

/// Sets the socket's timeout to the time left, where that is less than it.
fn narrow_timeout(link: &mut Link, deadline: Instant) -> std::result::Result<(), Failed> {
    let time = left(deadline).ok_or(Failed::TimedOut)?;
    if time < link.timeout {
        link.stream.set_timeout(time).map_err(Failed::Lost)?;
        link.timeout = time;
    }
    Ok(())
}

/// How long [`verdict`] waits for the service's answer to this client's certificate before it
/// takes the certificate as accepted.
const VERDICT_WAIT: Duration = Duration::from_secs(5);

/// The service's answer to the certificate this client showed. In TLS 1.3 the client finishes
/// its handshake first: a service that refuses its certificate says so (an alert) only once the
/// handshake is over here, and the first request would then meet a closed connection, saying
/// only that. So the answer is read before the connection is used: the service's session tickets
/// (rustls sends them once it has accepted the client's Finished, certificate included) or its
/// alert. A service that sends neither within [`VERDICT_WAIT`] is taken to have accepted (the
/// request then finds out).
fn verdict(connection: &mut rustls::ClientConnection, tcp: &mut TcpStream) -> std::io::Result<()> {
    let deadline = Instant::now() + VERDICT_WAIT;
    let before = tcp.read_timeout()?;
    let answer = loop {
        if connection.tls13_tickets_received() > 0 {
            break Ok(());
        }
        let Some(time) = left(deadline) else {
            break Ok(());
        };
        tcp.set_read_timeout(Some(time))?;
        match connection.read_tls(tcp) {
            Ok(0) => {
                break Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the service closed the connection after the handshake",
                ))
            }
            // Records read: any plaintext stays in rustls for the next read of the stream.
            Ok(_) => {
                if let Err(e) = connection.process_new_packets() {
                    break Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
                }
            }
            Err(e) if timed_out(&e) => break Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    tcp.set_read_timeout(before)?;
    answer
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
