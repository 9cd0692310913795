//! One HTTP/1.1 connection to a backend, driven by the task of the request
//! that uses it: the request is written and the response head read there,
//! and the response body is read from the socket as the client takes it.
//!
//! hyper's client ran every backend connection as a task of its own, and
//! handed each request and response across channels between the two tasks:
//! two more wake-ups and task polls per request. Here nothing runs between
//! exchanges; an idle connection is a socket and its read buffer.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Version};
use http_body::{Body, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::body::LimitedBody;
use crate::buffers::UPSTREAM_MAX_BUF;
use crate::chunked::{Chunk, ChunkedDecoder};
use crate::error::BoxError;
use crate::upstream::{UpstreamError, UpstreamIo};

/// Header fields a backend's response head may carry (hyper's limit).
const MAX_HEADERS: usize = 100;

/// Header fields the proxy may add to a response before it goes out.
const ADDED_HEADERS: usize = 8;

/// An open connection to a backend, between exchanges or in one.
pub struct BackendConn {
    io: UpstreamIo,
    /// Bytes read from the backend and not yet taken: the rest of a head, or
    /// body bytes that came with it.
    buf: BytesMut,
    /// While a request's body goes out: whether the backend's bytes are
    /// still read, to see whether they say to stop sending.
    watching: bool,
}

/// A request as it goes on the wire: its head encoded once, so that it can
/// go out again on a new connection when a reused one turns out closed.
pub struct Outgoing {
    head: Vec<u8>,
    framing: RequestFraming,
    body: LimitedBody,
    /// A `HEAD` request: its response has no body, whatever its head says.
    is_head: bool,
    /// No body and a method the client may repeat (RFC 9110 §9.2.2): it may
    /// go out again when a reused connection fails before any answer.
    repeatable: bool,
}

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestFraming {
    /// No body.
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked, its length unknown in advance.
    Chunked,
}

/// How a response's body is delimited (RFC 9112 §6.3), and how far it has
/// been read.
#[derive(Debug)]
enum ResponseFraming {
    /// `Content-Length`: the bytes still to come.
    Length(u64),
    /// Chunked.
    Chunked(ChunkedDecoder),
    /// Until the backend closes: the connection cannot be used again.
    UntilClose,
    /// A `101 Switching Protocols`: what follows belongs to the tunnel.
    Upgraded,
    /// Read to its end (or there was none).
    Done,
}

/// How far a request went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// Head and body, whole.
    Whole,
    /// The backend answered (or closed) before the body was all sent.
    AnsweredEarly,
}

/// A failed exchange, and whether its request may go out again on a new
/// connection.
#[derive(Debug)]
pub struct Failed {
    /// What went wrong.
    pub error: UpstreamError,
    /// The backend answered nothing and the request is repeatable: a reused
    /// connection closed by its backend just as it was taken.
    pub retry: bool,
}

/// The response's body as it is read from its connection.
pub struct BodyReader {
    conn: Option<Box<BackendConn>>,
    framing: ResponseFraming,
    /// The connection may carry another exchange once the body is read.
    keep_alive: bool,
}

impl Outgoing {
    /// Encodes `req` (origin-form URI, HTTP/1.1) for the wire. Its framing
    /// follows hyper's client, which it replaces: the client's
    /// `Content-Length` when it sent one, the body's known length, nothing for
    /// a `GET`, `HEAD` or `CONNECT` of unknown length, chunked otherwise.
    /// `added` is header lines (`name: value\r\n`), written after the
    /// request's own.
    pub fn new(req: Request<LimitedBody>, added: &[u8]) -> Self {
        let (mut parts, body) = req.into_parts();
        let framing = if body.is_end_stream() {
            RequestFraming::Empty
        } else if let Some(length) = content_length(&parts.headers) {
            RequestFraming::Length(length)
        } else if let Some(exact) = body.size_hint().exact() {
            parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(exact));
            RequestFraming::Length(exact)
        } else if matches!(parts.method, Method::GET | Method::HEAD | Method::CONNECT) {
            RequestFraming::Empty
        } else {
            parts.headers.remove(header::CONTENT_LENGTH);
            parts.headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
            RequestFraming::Chunked
        };
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let mut head = Vec::with_capacity(64 + target.len() + parts.headers.len() * 32 + added.len());
        head.extend_from_slice(parts.method.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(target.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in &parts.headers {
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(added);
        head.extend_from_slice(b"\r\n");
        Outgoing {
            head,
            framing,
            body,
            is_head: parts.method == Method::HEAD,
            repeatable: framing == RequestFraming::Empty && parts.method.is_idempotent(),
        }
    }
}

/// The client's `Content-Length`, when it is one valid number (hyper checked
/// a client's; one set here by the proxy is valid too).
fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let length = parse_length(values.next()?.as_bytes())?;
    values.all(|v| parse_length(v.as_bytes()) == Some(length)).then_some(length)
}

/// A `Content-Length` value: digits only, or a list of one number repeated
/// (`5, 5`), which RFC 9110 §8.6 lets a recipient take as that number.
fn parse_length(value: &[u8]) -> Option<u64> {
    let mut length = None;
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        if length.is_some_and(|l| l != n) {
            return None;
        }
        length = Some(n);
    }
    length
}

/// An `InvalidData` error: the backend's answer is not HTTP/1.1 as it must be.
fn malformed(what: impl Into<BoxError>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl BackendConn {
    /// A connection with nothing read yet.
    pub fn new(io: UpstreamIo) -> Box<Self> {
        Box::new(BackendConn { io, buf: BytesMut::new(), watching: false })
    }

    /// Sends `out` and reads the response head. The body is read later, from
    /// the [`BodyReader`], as the client takes it.
    pub async fn exchange(
        mut self: Box<Self>,
        out: &mut Outgoing,
    ) -> Result<(http::response::Parts, BodyReader), Failed> {
        self.io.touch();
        let answered_early = match self.send(out).await {
            Ok(sent) => sent == Sent::AnsweredEarly,
            Err(UpstreamError::Exchange(error)) if out.framing != RequestFraming::Empty => {
                // The backend may have answered and closed as the body went
                // out: its answer is what the client needs, if it came.
                return match self.read_head(out.is_head).await {
                    Ok((parts, framing, _)) => Ok((parts, BodyReader::new(self, framing, false))),
                    Err(_) => Err(Failed { error: UpstreamError::Exchange(error), retry: false }),
                };
            }
            Err(error) => {
                let retry = out.repeatable && matches!(&error, UpstreamError::Exchange(e) if closed_by_peer(e));
                return Err(Failed { error, retry });
            }
        };
        match self.read_head(out.is_head).await {
            // A request whose body was cut short leaves the connection unusable.
            Ok((parts, framing, keep_alive)) => {
                Ok((parts, BodyReader::new(self, framing, keep_alive && !answered_early)))
            }
            Err((error, answered)) => {
                let retry = out.repeatable && !answered && closed_by_peer(&error);
                Err(Failed { error: UpstreamError::Exchange(error), retry })
            }
        }
    }

    /// Writes the head and the body, then flushes. The head waits for the
    /// body's first bytes when they are there at once, so that a body that
    /// fails at once (over the size limit) sends nothing, as with hyper's
    /// client, and a small body goes out with its head in one write.
    ///
    /// While the body goes out, the backend is read too: one that answers
    /// before it has the whole body (a 401, a 413) stops the upload, and its
    /// answer goes to the client (`Sent::AnsweredEarly`).
    async fn send(&mut self, out: &mut Outgoing) -> Result<Sent, UpstreamError> {
        if out.framing == RequestFraming::Empty {
            self.io.write_all(&out.head).await.map_err(UpstreamError::Exchange)?;
            self.io.flush().await.map_err(UpstreamError::Exchange)?;
            return Ok(Sent::Whole);
        }
        self.watching = true;
        let mut pending = out.head.clone();
        let mut sent = 0u64;
        let first = std::future::poll_fn(|cx| match Pin::new(&mut out.body).poll_frame(cx) {
            Poll::Pending => Poll::Ready(None),
            Poll::Ready(frame) => Poll::Ready(Some(frame)),
        })
        .await;
        let mut first = match first {
            Some(frame) => Some(frame),
            None => {
                if self.write_unless_answered(&pending).await.map_err(UpstreamError::Exchange)? {
                    return Ok(Sent::AnsweredEarly);
                }
                pending.clear();
                None
            }
        };
        loop {
            let frame = match first.take() {
                Some(frame) => frame,
                None => match self.next_frame_unless_answered(&mut out.body).await {
                    Some(frame) => frame,
                    None => return Ok(Sent::AnsweredEarly),
                },
            };
            let Some(frame) = frame else { break };
            let frame = frame.map_err(UpstreamError::ClientBody)?;
            // Trailers are dropped, as hyper's client did without a `Trailer` header.
            let Ok(data) = frame.into_data() else { continue };
            if data.is_empty() {
                continue;
            }
            sent += data.len() as u64;
            match out.framing {
                RequestFraming::Length(length) if sent > length => return Err(body_length_error()),
                RequestFraming::Chunked => {
                    pending.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                    pending.extend_from_slice(&data);
                    pending.extend_from_slice(b"\r\n");
                }
                _ => pending.extend_from_slice(&data),
            }
            if self.write_unless_answered(&pending).await.map_err(UpstreamError::Exchange)? {
                return Ok(Sent::AnsweredEarly);
            }
            pending.clear();
        }
        match out.framing {
            RequestFraming::Length(length) if sent != length => return Err(body_length_error()),
            RequestFraming::Chunked => pending.extend_from_slice(b"0\r\n\r\n"),
            _ => {}
        }
        if self.write_unless_answered(&pending).await.map_err(UpstreamError::Exchange)? {
            return Ok(Sent::AnsweredEarly);
        }
        self.io.flush().await.map_err(UpstreamError::Exchange)?;
        Ok(Sent::Whole)
    }

    /// Writes all of `bytes`, unless the backend sends something (or
    /// closes) first: then `true`, and what it sent is in the buffer.
    async fn write_unless_answered(&mut self, mut bytes: &[u8]) -> io::Result<bool> {
        while !bytes.is_empty() {
            let step = std::future::poll_fn(|cx| match Pin::new(&mut self.io).poll_write(cx, bytes) {
                Poll::Ready(written) => Poll::Ready(Some(written)),
                Poll::Pending => self.poll_answer(cx).map(|()| None),
            })
            .await;
            match step {
                Some(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Some(Ok(n)) => bytes = &bytes[n..],
                Some(Err(error)) => return Err(error),
                None => return Ok(true),
            }
        }
        Ok(false)
    }

    /// The body's next frame, unless the backend sends something (or
    /// closes) first: then `None`.
    async fn next_frame_unless_answered(
        &mut self,
        body: &mut LimitedBody,
    ) -> Option<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        std::future::poll_fn(|cx| match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(Some(frame)),
            Poll::Pending => self.poll_answer(cx).map(|()| None),
        })
        .await
    }

    /// Ready when the backend's answer, come while the request is still
    /// going out, says to stop sending: an error status, `Connection: close`,
    /// a `101`, a head that does not parse, or the backend closing or
    /// failing. Informational heads (a `103 Early Hints`) are dropped and the
    /// body goes on, as does a final head that says none of this (a backend
    /// that answers as it reads, as an echo does), which is then left for
    /// [`BackendConn::read_head`] with nothing more watched. The bytes stay
    /// in the buffer; an error or a close shows there again.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if !self.watching {
                return Poll::Pending;
            }
            match early_head(&mut self.buf) {
                Early::Nothing | Early::Partial => {}
                Early::Stops => return Poll::Ready(()),
                Early::GoesOn => {
                    self.watching = false;
                    return Poll::Pending;
                }
            }
            match self.poll_fill(cx) {
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Reads until a final response head has come (informational ones other
    /// than `101` are dropped, as hyper's client did). On failure, says
    /// whether the backend had sent anything.
    async fn read_head(
        &mut self,
        is_head: bool,
    ) -> Result<(http::response::Parts, ResponseFraming, bool), (io::Error, bool)> {
        let mut answered = !self.buf.is_empty();
        loop {
            if !self.buf.is_empty() {
                match parse_head(&mut self.buf, is_head).map_err(|e| (e, true))? {
                    Parsed::Partial => {}
                    Parsed::Informational => continue,
                    Parsed::Final(parts, framing, keep_alive) => return Ok((parts, framing, keep_alive)),
                }
                if self.buf.len() >= UPSTREAM_MAX_BUF {
                    return Err((malformed("response head too large"), true));
                }
            }
            let n = std::future::poll_fn(|cx| self.poll_fill(cx)).await.map_err(|e| (e, answered))?;
            if n == 0 {
                let error =
                    io::Error::new(io::ErrorKind::UnexpectedEof, "backend closed the connection before answering");
                return Err((error, answered));
            }
            answered = true;
        }
    }

    /// Reads what the backend has sent into the buffer, at most about
    /// [`UPSTREAM_MAX_BUF`] held at once; `0` when the backend closed.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < UPSTREAM_MAX_BUF / 4 {
            self.buf.reserve(UPSTREAM_MAX_BUF - self.buf.len().min(UPSTREAM_MAX_BUF / 2));
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    /// True when the connection, idle in its pool, can carry a request: the
    /// backend has neither closed it nor sent anything unasked. Costs a read
    /// only when the socket has become readable since its last one.
    pub fn is_open_and_idle(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        if self.io.poll_tcp_read_ready(&mut cx).is_pending() {
            return true;
        }
        let mut byte = [0u8; 1];
        let mut read = ReadBuf::new(&mut byte);
        matches!(Pin::new(&mut self.io).poll_read(&mut cx, &mut read), Poll::Pending)
    }
}

/// What the backend has sent so far while a request's body goes out.
#[derive(Debug, PartialEq, Eq)]
enum Early {
    /// Nothing.
    Nothing,
    /// Part of a head.
    Partial,
    /// A final head that lets the body go on.
    GoesOn,
    /// A head (or bytes) that means the body should stop.
    Stops,
}

/// Looks at the front of `buf` while a request's body goes out, dropping
/// complete informational heads (not `101`) as it goes.
fn early_head(buf: &mut BytesMut) -> Early {
    loop {
        if buf.is_empty() {
            return Early::Nothing;
        }
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut fields);
        let len = match response.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() < UPSTREAM_MAX_BUF => return Early::Partial,
            Ok(httparse::Status::Partial) | Err(_) => return Early::Stops,
        };
        let code = response.code.unwrap_or(0);
        if (100..200).contains(&code) && code != 101 {
            buf.advance(len);
            continue;
        }
        let close = response.headers.iter().any(|field| {
            field.name.eq_ignore_ascii_case("connection")
                && field.value.split(|&b| b == b',').any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
        });
        return if code >= 400 || code == 101 || close { Early::Stops } else { Early::GoesOn };
    }
}

/// Whether an I/O error means that the backend closed or reset the connection.
fn closed_by_peer(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

fn body_length_error() -> UpstreamError {
    UpstreamError::ClientBody(Box::new(io::Error::new(
        io::ErrorKind::InvalidData,
        "request body length differs from its Content-Length",
    )))
}

/// The final response head at the front of `buf`, informational heads
/// before it skipped: `None` while it is incomplete. The parser the client
/// runs on every backend answer, public for the fuzz target.
pub fn parse_final_head(buf: &mut BytesMut, is_head: bool) -> io::Result<Option<http::response::Parts>> {
    loop {
        match parse_head(buf, is_head)? {
            Parsed::Partial => return Ok(None),
            Parsed::Informational => {}
            Parsed::Final(parts, _, _) => return Ok(Some(parts)),
        }
    }
}

/// What [`parse_head`] found at the front of the buffer.
enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// An informational (1xx) head, taken from the buffer and dropped.
    Informational,
    /// The final head, taken from the buffer: its parts, its body's framing,
    /// and whether the backend keeps the connection open after it.
    Final(http::response::Parts, ResponseFraming, bool),
}

/// Parses a response head at the front of `buf`, taking it off when whole.
/// Header values share the head's bytes: nothing is copied but unknown names.
fn parse_head(buf: &mut BytesMut, is_head: bool) -> io::Result<Parsed> {
    let mut fields = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    // Where each name and value lies in the head, to slice them out of it
    // once it is split off the buffer.
    let mut spans = [[0u32; 4]; MAX_HEADERS];
    let (len, code, minor, count, reason) = {
        let mut response = httparse::Response::new(&mut []);
        let len =
            match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut response, buf, &mut fields)
            {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
                Err(error) => return Err(malformed(error)),
            };
        let base = buf.as_ptr() as usize;
        for (span, field) in spans.iter_mut().zip(response.headers.iter()) {
            let name = field.name.as_ptr() as usize - base;
            let value = field.value.as_ptr() as usize - base;
            *span = [name as u32, (name + field.name.len()) as u32, value as u32, (value + field.value.len()) as u32];
        }
        // Where the reason phrase lies in the head: one other than the
        // status's own is passed on, as hyper's client did.
        let reason = response.reason.filter(|r| !r.is_empty()).map(|r| (r.as_ptr() as usize - base, r.len()));
        (len, response.code.unwrap_or(0), response.version.unwrap_or(1), response.headers.len(), reason)
    };
    if (100..200).contains(&code) && code != 101 {
        buf.advance(len);
        return Ok(Parsed::Informational);
    }
    let status = StatusCode::from_u16(code).map_err(malformed)?;
    let head = buf.split_to(len).freeze();
    let span = |start: u32, end: u32| &head[start as usize..end as usize];
    // A 101's head goes to the client as it came: its `Upgrade` and
    // `Connection` are the switch itself. Any other head loses what never
    // reaches the client as it is read (`headers::dropped_from_response`),
    // which costs less than building those headers only to remove them.
    let passes_all = status == StatusCode::SWITCHING_PROTOCOLS;
    let (mut close, mut keep_alive) = (false, false);
    // The names `Connection` lists are hop-by-hop too (RFC 9110 §7.6.1).
    // Usually it lists none: nothing is allocated.
    let mut listed: Vec<&[u8]> = Vec::new();
    for &[name_start, name_end, value_start, value_end] in &spans[..count] {
        if !crate::headers::name_is(span(name_start, name_end), b"connection") {
            continue;
        }
        for token in span(value_start, value_end).split(|&b| b == b',') {
            let token = token.trim_ascii();
            close |= crate::headers::name_is(token, b"close");
            keep_alive |= crate::headers::name_is(token, b"keep-alive");
            if !token.is_empty() && !crate::headers::dropped_from_response(token) {
                listed.push(token);
            }
        }
    }
    // Room for what the proxy adds on the way out (`Vary`, the request id,
    // and over HTTP/2 the default `extra_headers` and HSTS): a map that
    // grows later moves every entry again.
    let mut headers = HeaderMap::with_capacity(count + ADDED_HEADERS);
    let mut length: Option<u64> = None;
    let (mut transfer_encoding, mut chunked) = (false, false);
    for &[name_start, name_end, value_start, value_end] in &spans[..count] {
        let raw_name = span(name_start, name_end);
        if crate::headers::name_is(raw_name, b"content-length") {
            let raw_value = span(value_start, value_end);
            let n = parse_length(raw_value).ok_or_else(|| malformed("bad Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(malformed("conflicting Content-Length values"));
            }
            if length.is_none() {
                // One value, as the number it means: `5, 5` goes on as `5`
                // (made anew only then: the usual value shares the head's bytes).
                let value = if raw_value.contains(&b',') {
                    HeaderValue::from(n)
                } else {
                    HeaderValue::from_maybe_shared(head.slice(value_start as usize..value_end as usize))
                        .map_err(malformed)?
                };
                headers.append(header::CONTENT_LENGTH, value);
            }
            length = Some(n);
            continue;
        }
        if crate::headers::name_is(raw_name, b"transfer-encoding") {
            transfer_encoding = true;
            // Only the last coding of the last field says whether it is chunked.
            chunked = span(value_start, value_end)
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
        if !passes_all
            && (crate::headers::dropped_from_response(raw_name)
                || listed.iter().any(|token| token.eq_ignore_ascii_case(raw_name)))
        {
            continue;
        }
        let name = HeaderName::from_bytes(raw_name).map_err(malformed)?;
        let value =
            HeaderValue::from_maybe_shared(head.slice(value_start as usize..value_end as usize)).map_err(malformed)?;
        headers.append(name, value);
    }
    if transfer_encoding && length.is_some() {
        // Both framings at once is how responses are smuggled (RFC 9112 §6.1).
        return Err(malformed("both Transfer-Encoding and Content-Length"));
    }
    if transfer_encoding && minor == 0 {
        // HTTP/1.0 has no transfer codings: its framing is faulty (RFC 9112 §6.1).
        return Err(malformed("Transfer-Encoding in an HTTP/1.0 response"));
    }
    let framing = if status == StatusCode::SWITCHING_PROTOCOLS {
        ResponseFraming::Upgraded
    } else if is_head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        ResponseFraming::Done
    } else if transfer_encoding {
        if chunked { ResponseFraming::Chunked(ChunkedDecoder::new()) } else { ResponseFraming::UntilClose }
    } else {
        match length {
            Some(0) => ResponseFraming::Done,
            Some(n) => ResponseFraming::Length(n),
            None => ResponseFraming::UntilClose,
        }
    };
    let version = if minor == 0 { Version::HTTP_10 } else { Version::HTTP_11 };
    let reusable = !close
        && (version == Version::HTTP_11 || keep_alive)
        && !matches!(framing, ResponseFraming::UntilClose | ResponseFraming::Upgraded);
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    if let Some((start, len)) = reason
        && status.canonical_reason().map(str::as_bytes) != head.get(start..start + len)
        && let Ok(reason) = hyper::ext::ReasonPhrase::try_from(head.slice(start..start + len))
    {
        parts.extensions.insert(reason);
    }
    Ok(Parsed::Final(parts, framing, reusable))
}

impl BodyReader {
    fn new(conn: Box<BackendConn>, framing: ResponseFraming, keep_alive: bool) -> Self {
        BodyReader { conn: Some(conn), framing, keep_alive }
    }

    /// The next piece of the body; `None` at its end.
    pub fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        let Some(conn) = self.conn.as_mut() else { return Poll::Ready(None) };
        loop {
            match &mut self.framing {
                ResponseFraming::Done | ResponseFraming::Upgraded => return Poll::Ready(None),
                ResponseFraming::Length(remaining) => {
                    if !conn.buf.is_empty() {
                        let n = conn.buf.len().min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                        *remaining -= n as u64;
                        if *remaining == 0 {
                            self.framing = ResponseFraming::Done;
                        }
                        return Poll::Ready(Some(Ok(conn.buf.split_to(n).freeze())));
                    }
                }
                ResponseFraming::Chunked(decoder) => match decoder.decode(&mut conn.buf) {
                    Ok(Chunk::Data(data)) => return Poll::Ready(Some(Ok(data))),
                    Ok(Chunk::End) => {
                        self.framing = ResponseFraming::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Chunk::NeedMore) => {}
                    Err(error) => {
                        self.keep_alive = false;
                        return Poll::Ready(Some(Err(malformed(error))));
                    }
                },
                ResponseFraming::UntilClose => {
                    if !conn.buf.is_empty() {
                        return Poll::Ready(Some(Ok(conn.buf.split().freeze())));
                    }
                }
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if matches!(self.framing, ResponseFraming::UntilClose) => {
                    self.framing = ResponseFraming::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    self.keep_alive = false;
                    let error = io::Error::new(io::ErrorKind::UnexpectedEof, "backend closed the connection mid-body");
                    return Poll::Ready(Some(Err(error)));
                }
                Ok(_) => {}
                Err(error) => {
                    self.keep_alive = false;
                    return Poll::Ready(Some(Err(error)));
                }
            }
        }
    }

    /// True once the whole body has been read.
    pub fn is_end(&self) -> bool {
        matches!(self.framing, ResponseFraming::Done | ResponseFraming::Upgraded)
    }

    /// What is known of the body's length.
    pub fn size_hint(&self) -> SizeHint {
        match self.framing {
            ResponseFraming::Length(remaining) => SizeHint::with_exact(remaining),
            ResponseFraming::Done | ResponseFraming::Upgraded => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }

    /// The connection, once the body has been read to its end and the
    /// backend keeps it open with nothing more sent: ready for the next
    /// exchange.
    pub fn take_reusable(&mut self) -> Option<Box<BackendConn>> {
        let done = matches!(self.framing, ResponseFraming::Done);
        let conn = self.conn.take_if(|conn| done && self.keep_alive && conn.buf.is_empty());
        if conn.is_none() {
            self.keep_alive = false;
        }
        conn
    }

    /// The connection of a `101 Switching Protocols`, for the tunnel, with
    /// any bytes the backend sent after the head.
    pub fn into_tunnel(mut self) -> Option<Box<BackendConn>> {
        matches!(self.framing, ResponseFraming::Upgraded).then(|| self.conn.take()).flatten()
    }
}

/// A tunnel's backend side: the bytes read past the `101` head come first.
impl AsyncRead for BackendConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.buf.is_empty() {
            let n = this.buf.len().min(buf.remaining());
            buf.put_slice(&this.buf[..n]);
            this.buf.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for BackendConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `bytes` as a whole answer to a GET (or HEAD), and says what
    /// is left in the buffer.
    fn parse(bytes: &[u8], is_head: bool) -> io::Result<(Parsed, BytesMut)> {
        let mut buf = BytesMut::from(bytes);
        let parsed = parse_head(&mut buf, is_head)?;
        Ok((parsed, buf))
    }

    /// The framing and reuse of a final head.
    fn final_head(bytes: &[u8], is_head: bool) -> (http::response::Parts, String, bool) {
        match parse(bytes, is_head).unwrap() {
            (Parsed::Final(parts, framing, reusable), _) => (parts, format!("{framing:?}"), reusable),
            (Parsed::Partial, _) => panic!("partial: {:?}", String::from_utf8_lossy(bytes)),
            (Parsed::Informational, _) => panic!("informational"),
        }
    }

    #[test]
    fn a_head_is_taken_off_the_buffer_and_its_values_kept() {
        let (parsed, rest) =
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\nX-A: 2\r\nETag: \"e\"\r\n\r\nok", false).unwrap();
        let Parsed::Final(parts, framing, reusable) = parsed else { panic!("not final") };
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(parts.version, Version::HTTP_11);
        assert_eq!(parts.headers.get_all("x-a").iter().collect::<Vec<_>>(), ["1", "2"]);
        assert_eq!(parts.headers["etag"], "\"e\"");
        assert!(matches!(framing, ResponseFraming::Length(2)));
        assert!(reusable);
        assert_eq!(&rest[..], b"ok");
    }

    #[test]
    fn a_partial_head_waits_and_an_informational_one_is_dropped() {
        assert!(matches!(parse(b"HTTP/1.1 200 OK\r\nContent-Le", false).unwrap().0, Parsed::Partial));
        let (parsed, rest) =
            parse(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", false).unwrap();
        assert!(matches!(parsed, Parsed::Informational));
        assert_eq!(&rest[..], b"HTTP/1.1 204 No Content\r\n\r\n");
    }

    #[test]
    fn a_head_loses_what_never_reaches_the_client_but_a_101_keeps_it() {
        let (parts, framing, reusable) = final_head(
            b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, X-Backend-Private\r\nKeep-Alive: timeout=5\r\n\
              x-backend-private: 1\r\nTransfer-Encoding: chunked\r\nService-Worker-Allowed: /\r\n\
              Content-Type: text/html\r\nProxy: only a client's is dropped\r\nconnection: x-two\r\nX-Two: 2\r\n\r\n",
            false,
        );
        let left: Vec<&str> = parts.headers.keys().map(|name| name.as_str()).collect();
        assert_eq!(left, ["content-type", "proxy"]);
        // Dropped, the headers still frame the body and say how the connection goes on.
        assert!(framing.starts_with("Chunked"), "{framing}");
        assert!(reusable);
        let (parts, _, reusable) =
            final_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\nETag: \"e\"\r\n\r\n", false);
        let left: Vec<&str> = parts.headers.keys().map(|name| name.as_str()).collect();
        assert_eq!(left, ["content-length", "etag"]);
        assert!(!reusable);

        let (parts, framing, _) =
            final_head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", false);
        assert_eq!(framing, "Upgraded");
        assert_eq!(parts.headers["upgrade"], "websocket");
        assert_eq!(parts.headers["connection"], "Upgrade");
    }

    #[test]
    fn framing_follows_rfc_9112() {
        for (head, is_head, framing, reusable) in [
            (&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"[..], false, "Chunked", true),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", false, "UntilClose", false),
            (b"HTTP/1.1 200 OK\r\n\r\n", false, "UntilClose", false),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false, "Done", true),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", false, "Length(5)", true),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true, "Done", true),
            (b"HTTP/1.1 204 No Content\r\n\r\n", false, "Done", true),
            (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", false, "Done", true),
            (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n", false, "Length(1)", false),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false, "Length(1)", false),
            (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 1\r\n\r\n", false, "Length(1)", true),
            (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", false, "Upgraded", false),
        ] {
            let (_, got, got_reusable) = final_head(head, is_head);
            let what = String::from_utf8_lossy(head);
            assert!(got.starts_with(framing), "{what}: {got}");
            assert_eq!(got_reusable, reusable, "{what}");
        }
    }

    #[test]
    fn malformed_heads_are_invalid_data() {
        let many = format!("HTTP/1.1 200 OK\r\n{}\r\n", "X: y\r\n".repeat(MAX_HEADERS + 1));
        for head in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            b"HTTP/1.1 099 Low\r\n\r\n",
            b"HTTP/2 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n",
            b"\x16\x03\x01\x02\x00",
            many.as_bytes(),
        ] {
            let error =
                parse(head, false).err().unwrap_or_else(|| panic!("accepted {:?}", String::from_utf8_lossy(head)));
            assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{:?}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn a_reason_of_its_own_is_kept_and_a_repeated_length_goes_on_as_one_number() {
        let (parts, _, _) = final_head(b"HTTP/1.1 200 Everything Fine\r\nContent-Length: 5, 5\r\n\r\n", false);
        let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>().expect("the reason is kept");
        assert_eq!(reason.as_bytes(), b"Everything Fine");
        assert_eq!(parts.headers.get_all("content-length").iter().collect::<Vec<_>>(), ["5"]);
        let (parts, _, _) = final_head(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", false);
        assert!(parts.extensions.get::<hyper::ext::ReasonPhrase>().is_none(), "the status's own reason is not stored");
    }

    #[test]
    fn what_a_backend_sends_during_an_upload_says_whether_to_stop() {
        for (bytes, early, rest) in [
            (&b""[..], Early::Nothing, &b""[..]),
            (b"HTTP/1.1 103 Early", Early::Partial, b"HTTP/1.1 103 Early"),
            (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", Early::Nothing, b""),
            (b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 200 OK\r\n\r\n", Early::GoesOn, b"HTTP/1.1 200 OK\r\n\r\n"),
            (b"HTTP/1.1 413 Too Large\r\n\r\n", Early::Stops, b"HTTP/1.1 413 Too Large\r\n\r\n"),
            (
                b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
                Early::Stops,
                b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
            ),
            (b"garbage\r\n\r\n", Early::Stops, b"garbage\r\n\r\n"),
        ] {
            let mut buf = BytesMut::from(bytes);
            assert_eq!(early_head(&mut buf), early, "{:?}", String::from_utf8_lossy(bytes));
            assert_eq!(&buf[..], rest);
        }
    }

    #[test]
    fn a_bodiless_request_head_is_written_as_the_map_holds_it_then_the_added_lines() {
        let mut request = Request::new(LimitedBody::empty());
        *request.uri_mut() = "/a/b?c=d".parse().unwrap();
        request.headers_mut().insert("host", HeaderValue::from_static("foo.toolforge.org"));
        request.headers_mut().insert("accept", HeaderValue::from_static("*/*"));
        let out = Outgoing::new(request, b"x-forwarded-for: 192.0.2.1\r\n");
        assert_eq!(
            String::from_utf8_lossy(&out.head),
            "GET /a/b?c=d HTTP/1.1\r\nhost: foo.toolforge.org\r\naccept: */*\r\nx-forwarded-for: 192.0.2.1\r\n\r\n"
        );
        assert_eq!(out.framing, RequestFraming::Empty);
        assert!(out.repeatable);
    }
}
