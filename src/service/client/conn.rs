//! The client's connections: blocking sockets, each used by one call at a time on the caller's
//! own thread and kept for the next call, reached over the Unix socket or TCP with TLS 1.3. A
//! call writes its request and reads the answer; no runtime, no poller, no other thread.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use zeroize::{Zeroize as _, Zeroizing};

use super::{Remote, RemoteKeystore};
use crate::error::{Error, Result};

mod answer;
mod lookup;

use answer::read_answer;
pub(super) use lookup::Lookups;

/// How long a connection may wait unused and still be used: well below the service's default
/// idle limit (its header timeout, 10 s), so that the service does not close it as a request
/// goes out on it (a request that crosses the close is lost, and never sent again). A service
/// that says it closes sooner (`Keep-Alive: timeout=N`) has its connections used for half that.
const KEEP_IDLE: Duration = Duration::from_secs(5);

/// A connection to the service, kept between calls.
pub(super) struct Conn {
    /// None until the first call connects, and after a failed exchange.
    link: Option<Link>,
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
struct Link {
    stream: Stream,
    /// The timeout set on the socket (reads and writes): a call's whole time, narrowed as its
    /// deadline nears (see [`narrow_timeout`]) and widened again by the next call.
    timeout: Duration,
    /// What was read and not yet taken: zeroized, as an answer may hold a plaintext.
    read: Zeroizing<Vec<u8>>,
    /// How long it may wait unused and still be used: [`KEEP_IDLE`], or less if the service's
    /// last answer said it closes idle connections sooner (`Keep-Alive: timeout=N`, read with its
    /// framing).
    keep_idle: Duration,
}

enum Stream {
    Unix(UnixStream),
    Tls(Box<Tls>),
}

#[cfg(test)]
impl Link {
    /// A link on `stream` whose socket calls time out after `timeout`, as an earlier call may
    /// have left them.
    fn on_unix(stream: UnixStream, timeout: Duration) -> std::io::Result<Self> {
        let stream = Stream::Unix(stream);
        stream.set_timeout(timeout)?;
        Ok(Self {
            stream,
            timeout,
            read: Zeroizing::new(Vec::new()),
            keep_idle: KEEP_IDLE,
        })
    }
}

/// A TLS connection: rustls' state, and the socket its records cross (read and written here,
/// each socket call within the deadline: see [`send`] and [`receive`]).
struct Tls {
    conn: rustls::ClientConnection,
    sock: TcpStream,
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

/// Whether a kept connection is still open: nothing to read on it, without waiting. The
/// service sends nothing unasked; a close (or anything else) means it is not to be used.
fn still_open(stream: &mut Stream) -> bool {
    use rustix::net::RecvFlags;
    if let Stream::Tls(s) = stream {
        // Nor anything rustls already holds: plaintext, or the service's close_notify.
        match s.conn.process_new_packets() {
            Ok(state) if state.plaintext_bytes_to_read() == 0 && !state.peer_has_closed() => {}
            _ => return false,
        }
    }
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
        // A timeout too long to add is no deadline at all: a year stands for it.
        let deadline = Instant::now()
            .checked_add(self.timeout)
            .or_else(|| Instant::now().checked_add(Duration::from_secs(365 * 86_400)))
            .unwrap_or_else(Instant::now);
        let keep_idle = conn.link.as_ref().map_or(KEEP_IDLE, |l| l.keep_idle);
        if conn.last_used.elapsed() > keep_idle
            || conn
                .link
                .as_mut()
                .is_some_and(|l| !still_open(&mut l.stream))
        {
            // Idle this long, the service may be closing it as the request goes out; closed,
            // it is of no use: a new one rather than a request lost in the crossing.
            conn.link = None;
        }
        let done = loop {
            let fresh = conn.link.is_none();
            let link = match &mut conn.link {
                Some(link) => link,
                // Connecting (and a TLS handshake) never waits longer than a call by default,
                // whatever the call's own deadline.
                None => conn.link.insert(
                    self.connect(
                        Instant::now()
                            .checked_add(super::DEFAULT_TIMEOUT)
                            .map_or(deadline, |by| deadline.min(by)),
                    )?,
                ),
            };
            match exchange(link, request, deadline) {
                Err(Failed::Unsent(_)) if !fresh => conn.link = None,
                Err(Failed::Unsent(e) | Failed::Lost(e)) => {
                    break Err(Error::io(format!("ask the service at {}", self.remote), e))
                }
                Err(Failed::TimedOut) => break Err(self.call_timed_out()),
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

    fn call_timed_out(&self) -> Error {
        Error::Timeout {
            backend: format!("keyhold serve at {}", self.remote),
            waited: self.timeout,
            what: "its answer".into(),
        }
    }

    fn connect(&self, deadline: Instant) -> Result<Link> {
        let stream = match &self.remote {
            Remote::Unix(path) => Stream::Unix(self.connect_unix(path, deadline)?),
            Remote::Https { host, port } => {
                Stream::Tls(Box::new(self.connect_tls(host, *port, deadline)?))
            }
        };
        let timeout = left(deadline).ok_or_else(|| self.call_timed_out())?;
        stream
            .set_timeout(timeout)
            .map_err(|e| Error::io("set the connection's timeout", e))?;
        Ok(Link {
            stream,
            timeout,
            read: Zeroizing::new(Vec::with_capacity(4096)),
            keep_idle: KEEP_IDLE,
        })
    }

    /// A connection to the socket at `path`, within the deadline: a connect to a service whose
    /// queue of connections to accept is full waits, and would otherwise wait for ever.
    fn connect_unix(&self, path: &std::path::Path, deadline: Instant) -> Result<UnixStream> {
        use rustix::net::{sockopt, AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
        let refused = |e: std::io::Error| {
            Error::io(
                format!(
                    "connect to keyhold serve at {}: is it running, and may this user reach its \
                     socket?",
                    self.remote
                ),
                e,
            )
        };
        let address = SocketAddrUnix::new(path).map_err(|e| refused(e.into()))?;
        let socket = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| refused(e.into()))?;
        loop {
            // Linux bounds a blocking connect of a Unix socket by its send timeout: what is
            // left of the call's time, again after a signal interrupted the wait.
            let time = left(deadline).ok_or_else(|| self.call_timed_out())?;
            sockopt::set_socket_timeout(&socket, sockopt::Timeout::Send, Some(time))
                .map_err(|e| refused(e.into()))?;
            match rustix::net::connect(&socket, &address) {
                Ok(()) => return Ok(UnixStream::from(socket)),
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => return Err(self.call_timed_out()),
                Err(e) => return Err(refused(e.into())),
            }
        }
    }

    /// The addresses of `host` (an IP address as it is; a name looked up on a thread of its
    /// own, waited for until the deadline: a resolver that does not answer does not hold the
    /// call past it, and one lookup serves every call that waits while it runs: [`Lookups`]).
    fn addresses(
        &self,
        host: &str,
        port: u16,
        deadline: Instant,
    ) -> Result<std::io::Result<Vec<std::net::SocketAddr>>> {
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return Ok(Ok(vec![std::net::SocketAddr::new(ip, port)]));
        }
        self.lookups
            .addresses(host, port, deadline)
            .map_err(|e| Error::io("start a name lookup", e))?
            .ok_or_else(|| self.call_timed_out())
    }

    /// A TCP connection to `host:port` and a TLS 1.3 handshake on it, the service's certificate
    /// verified for `host`.
    fn connect_tls(&self, host: &str, port: u16, deadline: Instant) -> Result<Tls> {
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
        let none = std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("`{host}` has no address"),
        );
        let addresses = self.addresses(host, port, deadline)?.map_err(unreachable)?;
        let mut tcp = match connect_first(&addresses, deadline, none) {
            Ok(tcp) => tcp,
            Err(Some(e)) => return Err(unreachable(e)),
            Err(None) => return Err(self.call_timed_out()),
        };
        // A request is a few small writes and then a wait for the answer: Nagle's algorithm
        // would hold the last one back until the service acknowledged the first (delayed ACK).
        tcp.set_nodelay(true)
            .map_err(|e| Error::io("set TCP_NODELAY", e))?;
        let mut connection = rustls::ClientConnection::new(tls.config(), name)
            .map_err(|e| Error::io("start a TLS handshake", std::io::Error::other(e)))?;
        while connection.is_handshaking() {
            // Each of its reads and writes within what is left of the call's time.
            match connection.complete_io(&mut Bounded {
                tcp: &tcp,
                deadline,
            }) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if timed_out(&e) => return Err(self.call_timed_out()),
                Err(e) => return Err(tls_refused(&self.remote, host, e, false)),
            }
        }
        if tls.shows_certificate() {
            let until = deadline.min(Instant::now() + VERDICT_WAIT);
            verdict(&mut connection, &mut tcp, until)
                .map_err(|e| tls_refused(&self.remote, host, e, true))?;
        }
        Ok(Tls {
            conn: connection,
            sock: tcp,
        })
    }
}

/// The least time an address of several is given to accept a connection (unless less is left).
const MIN_ATTEMPT: Duration = Duration::from_secs(2);

/// A TCP connection to the first of `addresses` that accepts one by `deadline`. Each is given an
/// equal share of the time left, at least [`MIN_ATTEMPT`]: an address that never answers (a host
/// whose IPv6 route drops packets) does not take the time in which the next would connect.
/// `Err(None)` if the deadline passed before an address could be tried; else the last
/// address's error (`none` if there is no address).
fn connect_first(
    addresses: &[std::net::SocketAddr],
    deadline: Instant,
    none: std::io::Error,
) -> std::result::Result<TcpStream, Option<std::io::Error>> {
    let mut last = none;
    for (tried, address) in addresses.iter().enumerate() {
        let time = left(deadline).ok_or(None)?;
        match TcpStream::connect_timeout(address, attempt_time(time, addresses.len() - tried)) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(Some(last))
}

/// The time one of `untried` addresses is given, of `left`.
fn attempt_time(left: Duration, untried: usize) -> Duration {
    if untried <= 1 {
        return left;
    }
    let share = left / u32::try_from(untried).unwrap_or(u32::MAX);
    share.max(MIN_ATTEMPT).min(left)
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
    // The socket's timeout back to this call's time, where an earlier call narrowed it.
    let time = left(deadline).ok_or(Failed::TimedOut)?;
    if link.timeout < time - time / 8 {
        link.stream.set_timeout(time).map_err(Failed::Lost)?;
        link.timeout = time;
    }
    match send(link, request, deadline) {
        Ok(()) => read_answer(link, deadline),
        // Refused before it read the whole request (a wrong token, with a large body): the
        // service may have answered and closed; its answer, if there, says why.
        Err(Failed::Lost(e)) if closed_by_peer(&e) => match read_answer(link, deadline) {
            Ok((status, body, _)) if status >= 400 => Ok((status, body, false)),
            _ => Err(Failed::Lost(e)),
        },
        Err(failed) => Err(failed),
    }
}

/// A TCP socket whose reads and writes each wait only what is left until `deadline` (the
/// TLS handshake's, which rustls drives through many of them), and whose writes raise no
/// SIGPIPE.
struct Bounded<'a> {
    tcp: &'a TcpStream,
    deadline: Instant,
}

impl Bounded<'_> {
    fn time(&self) -> std::io::Result<Duration> {
        left(self.deadline).ok_or_else(|| std::io::ErrorKind::TimedOut.into())
    }
}

impl std::io::Read for Bounded<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.tcp.set_read_timeout(Some(self.time()?))?;
        (&mut &*self.tcp).read(buf)
    }
}

impl std::io::Write for Bounded<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tcp.set_write_timeout(Some(self.time()?))?;
        NoSignal(self.tcp.as_fd()).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes to a socket with send(MSG_NOSIGNAL), one buffer at a time: a write (or std's
/// vectored write, writev, which rustls uses) would raise SIGPIPE on a connection the service
/// closed, in a program that does not ignore it.
struct NoSignal<'a>(BorrowedFd<'a>);

impl std::io::Write for NoSignal<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        rustix::net::send(self.0, buf, rustix::net::SendFlags::NOSIGNAL).map_err(Into::into)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether a write failed because the service closed the connection.
fn closed_by_peer(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::BrokenPipe | K::ConnectionReset | K::ConnectionAborted
    )
}

/// Writes `request` on `link`: [`Failed::Unsent`] if none of its bytes reached the socket.
fn send(link: &mut Link, request: &[u8], deadline: Instant) -> std::result::Result<(), Failed> {
    let mut sent = false;
    let failed = |e: std::io::Error, sent: bool| {
        if timed_out(&e) {
            Failed::TimedOut
        } else if sent {
            Failed::Lost(e)
        } else {
            Failed::Unsent(e)
        }
    };
    let mut taken = 0;
    loop {
        let tls_pending = match &link.stream {
            Stream::Unix(_) => false,
            Stream::Tls(s) => s.conn.wants_write(),
        };
        if taken == request.len() && !tls_pending {
            return Ok(());
        }
        narrow_timeout(link, deadline)?;
        let wrote = match &mut link.stream {
            Stream::Unix(s) => NoSignal(s.as_fd())
                .write(&request[taken..])
                .inspect(|&n| taken += n),
            // The request into rustls (as much as its buffer takes), then its records out.
            Stream::Tls(s) => {
                if taken < request.len() {
                    taken += s
                        .conn
                        .writer()
                        .write(&request[taken..])
                        .map_err(|e| failed(e, sent))?;
                }
                // There are records to write: those of what rustls just took, or those that
                // kept it from taking more (or, all taken, those the loop found waiting).
                s.conn.write_tls(&mut NoSignal(s.sock.as_fd()))
            }
        };
        match wrote {
            Ok(0) => {
                let e =
                    std::io::Error::new(std::io::ErrorKind::WriteZero, "the socket took nothing");
                return Err(failed(e, sent));
            }
            Ok(_) => sent = true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // As in `receive`: a socket timeout before the deadline is not the call's.
            Err(e) if timed_out(&e) && left(deadline).is_some() => {}
            Err(e) => return Err(failed(e, sent)),
        }
    }
}

/// Reads what the service sent into `buf`, within the deadline however many socket reads it
/// takes: 0 at the end of the stream.
fn receive(
    stream: &mut Stream,
    timeout: &mut Duration,
    deadline: Instant,
    buf: &mut [u8],
) -> std::result::Result<usize, Failed> {
    loop {
        if let Stream::Tls(s) = stream {
            match s.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                // No plaintext yet: more records to read.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // Closed without close_notify, or anything else.
                Err(e) => return Err(Failed::Lost(e)),
            }
        }
        narrow(stream, timeout, deadline)?;
        let got = match stream {
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.conn.read_tls(&mut s.sock).and_then(|n| {
                // At the end (n = 0), rustls' reader says how: close_notify or cut short.
                s.conn
                    .process_new_packets()
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                Ok(n)
            }),
        };
        match got {
            Ok(n) if matches!(stream, Stream::Unix(_)) => return Ok(n),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // The socket's timeout, set for an earlier call, may end a read before this call's
            // deadline: read on until the deadline itself.
            Err(e) if timed_out(&e) && left(deadline).is_some() => {}
            Err(e) if timed_out(&e) => return Err(Failed::TimedOut),
            Err(e) => return Err(Failed::Lost(e)),
        }
    }
}

/// Sets the socket's timeout to the time left, where that is well less than it (by more than
/// an eighth: a socket call then ends at most a seventh of the time left past the deadline, and
/// a call that is quick sets no timeout at all).
fn narrow_timeout(link: &mut Link, deadline: Instant) -> std::result::Result<(), Failed> {
    narrow(&link.stream, &mut link.timeout, deadline)
}

fn narrow(
    stream: &Stream,
    timeout: &mut Duration,
    deadline: Instant,
) -> std::result::Result<(), Failed> {
    let time = left(deadline).ok_or(Failed::TimedOut)?;
    if time < *timeout - *timeout / 8 {
        stream.set_timeout(time).map_err(Failed::Lost)?;
        *timeout = time;
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
/// alert. A service that sends neither within [`VERDICT_WAIT`] (or by `deadline`, the call's,
/// if sooner) is taken to have accepted (the request then finds out).
fn verdict(
    connection: &mut rustls::ClientConnection,
    tcp: &mut TcpStream,
    deadline: Instant,
) -> std::io::Result<()> {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::net::{SocketAddr, TcpListener};

    /// As `answer::tests::a_socket_timeout_shorter_than_the_call_does_not_end_it`, for the
    /// request: a write the socket's timeout ends before the deadline goes on.
    #[test]
    fn a_request_is_written_past_a_socket_timeout_shorter_than_the_call() {
        use std::io::Read as _;
        let (mut service, ours) = UnixStream::pair().unwrap();
        let mut link = Link::on_unix(ours, Duration::from_millis(100)).unwrap();
        // More than the socket's buffers hold: the write waits for the service to read.
        let request = vec![b'x'; 4 << 20];
        let reading = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(350));
            let mut got = Vec::new();
            service.read_to_end(&mut got).unwrap();
            got.len()
        });
        let started = Instant::now();
        let sent = send(&mut link, &request, started + Duration::from_secs(5));
        assert!(sent.is_ok(), "not written whole");
        assert!(started.elapsed() >= Duration::from_millis(300));
        drop(link);
        assert_eq!(reading.join().unwrap(), request.len());
    }

    #[test]
    fn several_addresses_share_the_time_left() {
        let s = Duration::from_secs;
        assert_eq!(attempt_time(s(120), 1), s(120), "the last gets all");
        assert_eq!(attempt_time(s(120), 2), s(60));
        assert_eq!(attempt_time(s(3), 2), MIN_ATTEMPT, "at least MIN_ATTEMPT");
        assert_eq!(
            attempt_time(Duration::from_millis(500), 3),
            Duration::from_millis(500)
        );
    }

    /// A listener whose queue of connections waiting to be accepted is full, and a connection
    /// to it that waits: the kernel drops its SYN, as a route that drops packets does. `None` where
    /// the network stack does not.
    fn silent_address() -> Option<(TcpListener, Vec<TcpStream>, SocketAddr)> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        for _ in 0..1000 {
            match TcpStream::connect_timeout(&address, Duration::from_millis(200)) {
                Ok(stream) => queued.push(stream),
                Err(e) if timed_out(&e) => return Some((listener, queued, address)),
                Err(_) => return None,
            }
        }
        None
    }

    #[test]
    fn an_address_that_never_answers_leaves_time_for_the_next() {
        // This machine kind's stack (and Linux's) drops it: a test that skipped here would pass
        // without the fallback being tried.
        let (_full, _queued, silent) =
            silent_address().expect("a full listener accepted 1000 connections: no silent address");
        let open = TcpListener::bind("127.0.0.1:0").unwrap();
        let reachable = open.local_addr().unwrap();
        let started = Instant::now();
        let deadline = started + Duration::from_secs(5);
        let none = std::io::Error::other("no address");
        let stream = connect_first(&[silent, reachable], deadline, none).unwrap();
        assert_eq!(stream.peer_addr().unwrap(), reachable);
        // The silent address had half the time, 2.5 s: the next was tried after it.
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(2), "took {took:?}");
        assert!(took < Duration::from_secs(4), "took {took:?}");
    }
}
