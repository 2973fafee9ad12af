//! Reading the service's HTTP/1.1 answer on a connection: its head (httparse), and its body
//! as the head frames it (a length, chunks, or up to the connection's end).

use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::{receive, Failed, Link, KEEP_IDLE};

/// The largest answer read: a decryption of the largest input, in base64, is under a third of
/// it.
const MAX_ANSWER: usize = 256 << 20;

/// The longest head an answer may have (hyper's client read up to about 400 KiB).
const MAX_HEAD: usize = 64 * 1024;

/// The most header lines an answer's head may have.
const MAX_HEADERS: usize = 32;

/// The most read from the socket at once.
const READ_CHUNK: usize = 64 * 1024;

/// The most room made for a body before its bytes arrive: a Content-Length is the service's
/// word, and a larger body grows the buffer as it comes (doubling, so it is copied about once).
const MAX_RESERVE: usize = 8 << 20;

/// Makes room in `buf` for `more` bytes after those it holds, at least doubling it. It never
/// grows in place: a larger buffer is made and the bytes copied, and the old one zeroized as it
/// is dropped, so no reallocation leaves a copy of an answer behind.
fn reserve(buf: &mut Zeroizing<Vec<u8>>, more: usize) {
    let len = buf.len();
    if buf.capacity() - len < more {
        let mut larger = Zeroizing::new(Vec::with_capacity((len + more).max(2 * len).max(4096)));
        larger.extend_from_slice(buf);
        *buf = larger;
    }
}

/// Reads more of the answer into `link.read`: false at the end of the stream.
fn read_more(link: &mut Link, deadline: Instant) -> std::result::Result<bool, Failed> {
    let start = link.read.len();
    if start >= MAX_ANSWER {
        return Err(Failed::Lost(std::io::Error::other(format!(
            "the answer is larger than {} MiB",
            MAX_ANSWER >> 20
        ))));
    }
    reserve(&mut link.read, 1);
    let chunk = (link.read.capacity() - start).min(READ_CHUNK);
    link.read.resize(start + chunk, 0);
    let Link {
        stream,
        timeout,
        read,
        ..
    } = link;
    let got = receive(stream, timeout, deadline, &mut read[start..]);
    read.truncate(start + *got.as_ref().unwrap_or(&0));
    got.map(|n| n > 0)
}

/// Reads an HTTP/1.1 answer on `link`: its status, body, and whether the connection may be
/// kept (not if the service closes it, or the answer's length is the connection's).
pub(super) fn read_answer(
    link: &mut Link,
    deadline: Instant,
) -> std::result::Result<(u16, Zeroizing<Vec<u8>>, bool), Failed> {
    let malformed = |what: String| Failed::Lost(std::io::Error::other(what));
    loop {
        // The head: a 1xx answer is skipped, as HTTP/1.1 says.
        let (status, head_len, length, keep) = loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut answer = httparse::Response::new(&mut headers);
            match answer.parse(&link.read) {
                Ok(httparse::Status::Complete(head_len)) => {
                    let status = answer.code.unwrap_or(0);
                    let (length, keep, keep_idle) = framing(&answer).map_err(malformed)?;
                    link.keep_idle = keep_idle;
                    break (status, head_len, length, keep);
                }
                Ok(httparse::Status::Partial) if link.read.len() > MAX_HEAD => {
                    return Err(malformed(format!(
                        "the service's answer has a head of more than {} KiB",
                        MAX_HEAD >> 10
                    )));
                }
                Ok(httparse::Status::Partial) => {
                    if !read_more(link, deadline)? {
                        return Err(malformed(
                            "the service closed the connection before it answered".into(),
                        ));
                    }
                }
                Err(e) => return Err(malformed(format!("the service's answer: {e}"))),
            }
        };
        link.read.drain(..head_len);
        if (100..200).contains(&status) {
            continue;
        }
        let body = match length {
            Length::Known(n) => {
                // Room for the whole body at once (up to MAX_RESERVE): no copy for every
                // doubling of a large one.
                let missing = n.saturating_sub(link.read.len());
                reserve(&mut link.read, missing.min(MAX_RESERVE));
                while link.read.len() < n {
                    if !read_more(link, deadline)? {
                        return Err(malformed("the service's answer was cut short".into()));
                    }
                }
                if link.read.len() == n {
                    // The body is all that was read: taken as it is, not copied.
                    Zeroizing::new(std::mem::take(&mut *link.read))
                } else {
                    let body = Zeroizing::new(link.read[..n].to_vec());
                    link.read.drain(..n);
                    body
                }
            }
            Length::Chunked => read_chunked(link, deadline)?,
            Length::ToEnd => {
                while read_more(link, deadline)? {}
                Zeroizing::new(std::mem::take(&mut *link.read))
            }
        };
        // Anything left over was not asked for: the connection is not used again.
        let keep = keep && length != Length::ToEnd && link.read.is_empty();
        return Ok((status, body, keep));
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Length {
    Known(usize),
    Chunked,
    ToEnd,
}

/// How an answer's body is delimited, and whether the service keeps the connection (RFC 9112
/// §6.3, §9.3): strictly, as a request smuggled into an answer would need it lenient. A
/// Content-Length must be digits, the same in every header that gives one; one beside a
/// Transfer-Encoding is ignored and the connection closed after the answer; `close` in any
/// Connection header closes it. Also how long the connection may then wait unused and still be
/// used: half of what `Keep-Alive: timeout=N` says the service waits (so that a request does not
/// cross the service's close), and at most [`KEEP_IDLE`].
fn framing(
    answer: &httparse::Response<'_, '_>,
) -> std::result::Result<(Length, bool, Duration), String> {
    let mut known: Option<usize> = None;
    let mut chunked = false;
    let (mut close, mut keep_alive) = (false, false);
    let mut keep_idle = KEEP_IDLE;
    for header in answer.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or("").trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            let n = Some(value)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or_else(|| format!("the service's answer has a Content-Length of `{value}`"))?;
            if known.is_some_and(|k| k != n) {
                return Err("the service's answer has two different Content-Lengths".into());
            }
            if n > MAX_ANSWER {
                return Err(format!(
                    "the service's answer is {n} bytes, more than {} MiB",
                    MAX_ANSWER >> 20
                ));
            }
            known = Some(n);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked || !value.eq_ignore_ascii_case("chunked") {
                return Err(format!(
                    "the service's answer has a Transfer-Encoding of `{value}`"
                ));
            }
            chunked = true;
        } else if header.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                close |= token.eq_ignore_ascii_case("close");
                keep_alive |= token.eq_ignore_ascii_case("keep-alive");
            }
        } else if header.name.eq_ignore_ascii_case("keep-alive") {
            for (name, secs) in value.split(',').filter_map(|param| param.split_once('=')) {
                if let (true, Ok(secs)) = (
                    name.trim().eq_ignore_ascii_case("timeout"),
                    secs.trim().parse::<u64>(),
                ) {
                    keep_idle = keep_idle.min(Duration::from_secs(secs) / 2);
                }
            }
        }
    }
    let keep = !close && (answer.version == Some(1) || keep_alive) && !(chunked && known.is_some());
    let length = if matches!(answer.code, Some(204 | 304)) {
        Length::Known(0)
    } else if chunked {
        Length::Chunked
    } else {
        known.map_or(Length::ToEnd, Length::Known)
    };
    Ok((length, keep, keep_idle))
}

/// A chunked body (RFC 9112 §7.1), its trailer skipped.
fn read_chunked(
    link: &mut Link,
    deadline: Instant,
) -> std::result::Result<Zeroizing<Vec<u8>>, Failed> {
    let malformed = |what: &str| Failed::Lost(std::io::Error::other(what.to_owned()));
    let mut body = Zeroizing::new(Vec::new());
    loop {
        let (start, size) = loop {
            // httparse reads a size line without digits as 0: the end, were it believed.
            if link.read.first().is_some_and(|b| !b.is_ascii_hexdigit()) {
                return Err(malformed("the service's answer has a malformed chunk"));
            }
            match httparse::parse_chunk_size(&link.read) {
                Ok(httparse::Status::Complete(found)) => break found,
                Ok(httparse::Status::Partial) if link.read.len() > MAX_HEAD => {
                    return Err(malformed(
                        "the service's answer has a chunk size line too long",
                    ));
                }
                Ok(httparse::Status::Partial) => {
                    if !read_more(link, deadline)? {
                        return Err(malformed("the service's answer was cut short"));
                    }
                }
                Err(_) => return Err(malformed("the service's answer has a malformed chunk")),
            }
        };
        let size = usize::try_from(size)
            .ok()
            .filter(|n| body.len().saturating_add(*n) <= MAX_ANSWER)
            .ok_or_else(|| malformed("the service's answer is too large"))?;
        link.read.drain(..start);
        if size == 0 {
            // The trailer: header lines up to an empty one, at most MAX_HEAD bytes, each byte
            // looked at about once.
            let mut from = 0;
            loop {
                let end = if link.read.starts_with(b"\r\n") {
                    Some(2)
                } else {
                    link.read[from..]
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map(|at| from + at + 4)
                };
                if end.unwrap_or(link.read.len()) > MAX_HEAD {
                    return Err(malformed("the service's answer has a trailer too long"));
                }
                if let Some(end) = end {
                    link.read.drain(..end);
                    return Ok(body);
                }
                from = link.read.len().saturating_sub(3);
                if !read_more(link, deadline)? {
                    return Err(malformed("the service's answer was cut short"));
                }
            }
        }
        while link.read.len() < size + 2 {
            if !read_more(link, deadline)? {
                return Err(malformed("the service's answer was cut short"));
            }
        }
        if &link.read[size..size + 2] != b"\r\n" {
            return Err(malformed("the service's answer has a malformed chunk"));
        }
        reserve(&mut body, size);
        body.extend_from_slice(&link.read[..size]);
        link.read.drain(..size + 2);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write as _;
    use std::os::unix::net::UnixStream;

    /// The answer read from a connection on which the service sent `bytes` and closed: its
    /// status, body and whether the connection is kept, or why it was refused.
    fn answer_of(bytes: &[u8]) -> std::result::Result<(u16, Vec<u8>, bool), String> {
        let (mut service, ours) = UnixStream::pair().unwrap();
        service.write_all(bytes).unwrap();
        drop(service);
        let mut link = Link::on_unix(ours, Duration::from_secs(5)).unwrap();
        match read_answer(&mut link, Instant::now() + Duration::from_secs(5)) {
            Ok((status, body, keep)) => Ok((status, body.to_vec(), keep)),
            Err(Failed::Lost(e) | Failed::Unsent(e)) => Err(e.to_string()),
            Err(Failed::TimedOut) => Err("timed out".into()),
        }
    }

    /// A connection whose socket timeout an earlier call left shorter than this call's time (a
    /// slow connect sets it to what was left then): the answer is read until the call's own
    /// deadline, not given up at the socket's timeout.
    #[test]
    fn a_socket_timeout_shorter_than_the_call_does_not_end_it() {
        let (mut service, ours) = UnixStream::pair().unwrap();
        let mut link = Link::on_unix(ours, Duration::from_millis(100)).unwrap();
        let answering = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(350));
            service
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .unwrap();
            service
        });
        let started = Instant::now();
        let read = read_answer(&mut link, started + Duration::from_secs(2));
        let (status, body, _) = read.map_err(|_| "not read").unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"ok"[..]));
        assert!(started.elapsed() >= Duration::from_millis(300));
        // At the deadline itself, the call ends: none of the answer comes.
        let _service = answering.join().unwrap();
        let started = Instant::now();
        let read = read_answer(&mut link, started + Duration::from_millis(250));
        assert!(matches!(read, Err(Failed::TimedOut)));
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(250), "{took:?}");
        assert!(took < Duration::from_millis(1500), "{took:?}");
    }

    #[test]
    fn an_answer_is_kept_only_if_nothing_says_close() {
        let ok = |connection: &str| {
            answer_of(
                format!("HTTP/1.1 200 OK\r\n{connection}content-length: 2\r\n\r\nok").as_bytes(),
            )
        };
        assert_eq!(ok(""), Ok((200, b"ok".to_vec(), true)));
        assert!(ok("connection: keep-alive\r\n").unwrap().2);
        // `close` in any Connection header, whatever comes after it.
        assert!(
            !ok("connection: close\r\nconnection: keep-alive\r\n")
                .unwrap()
                .2
        );
        assert!(!ok("connection: keep-alive, close\r\n").unwrap().2);
        // HTTP/1.0: kept only when it says keep-alive.
        let old = |connection: &str| {
            answer_of(
                format!("HTTP/1.0 200 OK\r\n{connection}content-length: 2\r\n\r\nok").as_bytes(),
            )
            .unwrap()
            .2
        };
        assert!(!old(""));
        assert!(!old("connection: te\r\n"));
        assert!(old("connection: keep-alive\r\n"));
    }

    #[test]
    fn a_connection_is_used_idle_for_half_what_the_service_says_it_waits() {
        let idle = |keep_alive: &str| {
            let head = format!("HTTP/1.1 200 OK\r\n{keep_alive}content-length: 0\r\n\r\n");
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut answer = httparse::Response::new(&mut headers);
            answer.parse(head.as_bytes()).unwrap();
            framing(&answer).unwrap().2
        };
        let s = Duration::from_secs;
        assert_eq!(idle(""), KEEP_IDLE, "nothing said");
        assert_eq!(idle("keep-alive: timeout=10\r\n"), s(5));
        assert_eq!(
            idle("keep-alive: timeout=3\r\n"),
            Duration::from_millis(1500)
        );
        assert_eq!(
            idle("keep-alive: max=100, timeout=1\r\n"),
            Duration::from_millis(500)
        );
        assert_eq!(idle("keep-alive: timeout=0\r\n"), Duration::ZERO);
        assert_eq!(idle("keep-alive: timeout=600\r\n"), KEEP_IDLE, "never more");
        assert_eq!(
            idle("keep-alive: timeout=soon\r\n"),
            KEEP_IDLE,
            "not a number"
        );
    }

    #[test]
    fn a_content_length_must_be_digits_and_agree_with_any_other() {
        let with =
            |lengths: &str| answer_of(format!("HTTP/1.1 200 OK\r\n{lengths}\r\nok").as_bytes());
        assert_eq!(
            with("content-length: 2\r\ncontent-length: 2\r\n")
                .unwrap()
                .1,
            b"ok"
        );
        for bad in [
            "content-length: 2\r\ncontent-length: 1\r\n",
            "content-length: +2\r\n",
            "content-length: 2, 2\r\n",
            "content-length: \r\n",
        ] {
            let refused = with(bad).unwrap_err();
            assert!(refused.contains("Content-Length"), "{bad:?}: {refused}");
        }
    }

    #[test]
    fn a_length_beside_chunks_is_ignored_and_the_connection_closed() {
        let answer = answer_of(
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n\
              2\r\nok\r\n0\r\n\r\n",
        );
        assert_eq!(answer, Ok((200, b"ok".to_vec(), false)));
    }

    #[test]
    fn a_chunk_size_without_digits_is_refused_not_read_as_the_end() {
        // A bare CRLF where the next size belongs, then what would be an empty trailer: read as
        // the last chunk, the body would end there, accepted and the connection kept.
        let answer =
            answer_of(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n\r\n\r\n");
        assert!(answer.unwrap_err().contains("malformed chunk"));
        // With its digits, the same answer is read.
        let answer =
            answer_of(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n");
        assert_eq!(answer, Ok((200, b"ok".to_vec(), true)));
    }

    #[test]
    fn a_trailer_counts_against_the_head_limit() {
        let mut bytes =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n".to_vec();
        // Short lines, each taken off as it is read: the whole trailer still counts.
        while bytes.len() < 2 * MAX_HEAD {
            bytes.extend_from_slice(b"x-filler: 0123456789\r\n");
        }
        bytes.extend_from_slice(b"\r\n");
        assert!(answer_of(&bytes).unwrap_err().contains("trailer too long"));
        // A trailer of a few lines is read past.
        let answer = answer_of(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-a: 1\r\nx-b: 2\r\n\r\n",
        );
        assert_eq!(answer, Ok((200, b"ok".to_vec(), true)));
    }
}
