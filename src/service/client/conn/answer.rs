//! Reading the service's HTTP/1.1 answer on a connection: its head (httparse), and its body
//! as the head frames it (a length, chunks, or up to the connection's end).

use std::time::Instant;

use zeroize::Zeroizing;

use super::{receive, Failed, Link};

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
                    let (length, keep) = framing(&answer).map_err(malformed)?;
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

/// How an answer's body is delimited, and whether the service keeps the connection.
fn framing(answer: &httparse::Response<'_, '_>) -> std::result::Result<(Length, bool), String> {
    let mut length = Length::ToEnd;
    let mut keep = answer.version == Some(1);
    for header in answer.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or("").trim();
        if header.name.eq_ignore_ascii_case("content-length") && length != Length::Chunked {
            let n: usize = value
                .parse()
                .map_err(|_| format!("the service's answer has a Content-Length of `{value}`"))?;
            if n > MAX_ANSWER {
                return Err(format!(
                    "the service's answer is {n} bytes, more than {} MiB",
                    MAX_ANSWER >> 20
                ));
            }
            length = Length::Known(n);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            if !value.eq_ignore_ascii_case("chunked") {
                return Err(format!(
                    "the service's answer has a Transfer-Encoding of `{value}`"
                ));
            }
            length = Length::Chunked;
        } else if header.name.eq_ignore_ascii_case("connection") {
            keep = !value
                .split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("close"));
        }
    }
    if matches!(answer.code, Some(204 | 304)) {
        length = Length::Known(0);
    }
    Ok((length, keep))
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
            match httparse::parse_chunk_size(&link.read) {
                Ok(httparse::Status::Complete(found)) => break found,
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
            // The trailer: header lines up to an empty one.
            loop {
                if let Some(end) = link.read.windows(2).position(|w| w == b"\r\n") {
                    link.read.drain(..end + 2);
                    if end == 0 {
                        return Ok(body);
                    }
                } else if !read_more(link, deadline)? {
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
