//! Request-smuggling guard for HTTP/1: hyper resolves a request carrying both
//! `Content-Length` and `Transfer-Encoding` by dropping the length (RFC 9112
//! §6.1) before the handler can see it, but such a request is an attack on
//! some hop and must be refused outright (as nginx does). This wrapper watches
//! the bytes hyper reads, follows message framing, and records which request
//! heads on the connection carried both headers.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes of a line kept for inspection: enough for the header names and
/// values we look at.
const KEEP: usize = 64;

/// What the guard learned about a connection, shared with the handler.
#[derive(Debug)]
pub struct SmuggleFlags {
    /// Index of the first request head with both framing headers, or `u64::MAX`.
    first_bad: AtomicU64,
    /// Requests handed to the handler so far.
    seen: AtomicU64,
}

impl Default for SmuggleFlags {
    fn default() -> Self {
        SmuggleFlags { first_bad: AtomicU64::new(u64::MAX), seen: AtomicU64::new(0) }
    }
}

impl SmuggleFlags {
    /// Called once per request, in order: true when this request's head
    /// carried both `Content-Length` and `Transfer-Encoding`.
    pub fn next_request_is_ambiguous(&self) -> bool {
        let index = self.seen.fetch_add(1, Ordering::Relaxed);
        self.first_bad.load(Ordering::Relaxed) == index
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a request head, line by line.
    Head,
    /// Skipping a body of known length.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Skipping chunk data, then its CRLF.
    ChunkData(u64),
    /// Skipping the line end after chunk data.
    ChunkEnd,
    /// Reading trailer lines until the empty one.
    Trailers,
    /// Framing we do not follow (upgrade, CONNECT, garbage): stop watching.
    Off,
}

/// `T`, with the bytes read fed to the framing tracker.
pub struct SniffIo<T> {
    inner: T,
    state: State,
    line: [u8; KEEP],
    line_len: usize,
    /// Request line of the current head already seen.
    in_headers: bool,
    has_length: bool,
    length: Option<u64>,
    has_te: bool,
    chunked: bool,
    upgrade: bool,
    connect: bool,
    heads: u64,
    flags: std::sync::Arc<SmuggleFlags>,
}

impl<T> SniffIo<T> {
    /// Wraps `inner`, reporting into `flags`.
    pub fn new(inner: T, flags: std::sync::Arc<SmuggleFlags>) -> Self {
        SniffIo {
            inner,
            state: State::Head,
            line: [0; KEEP],
            line_len: 0,
            in_headers: false,
            has_length: false,
            length: None,
            has_te: false,
            chunked: false,
            upgrade: false,
            connect: false,
            heads: 0,
            flags,
        }
    }

    /// The wrapped I/O object.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// True when the bytes read so far end exactly after a complete request
    /// (head and body): nothing of a next request has arrived yet.
    pub fn at_message_boundary(&self) -> bool {
        self.state == State::Head && !self.in_headers && self.line_len == 0
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Off => return,
                State::Body(n) => {
                    let take = (data.len() as u64).min(n);
                    data = &data[take as usize..];
                    self.state = if n == take { State::Head } else { State::Body(n - take) };
                }
                State::ChunkData(n) => {
                    let take = (data.len() as u64).min(n);
                    data = &data[take as usize..];
                    self.state = if n == take { State::ChunkEnd } else { State::ChunkData(n - take) };
                }
                State::Head | State::ChunkSize | State::ChunkEnd | State::Trailers => {
                    // memchr: a byte-by-byte search cost four instructions
                    // per byte of every request head.
                    match memchr::memchr(b'\n', data) {
                        None => {
                            self.keep(data);
                            return;
                        }
                        Some(i) => {
                            self.keep(&data[..i]);
                            data = &data[i + 1..];
                            self.end_of_line();
                        }
                    }
                }
            }
        }
    }

    fn keep(&mut self, bytes: &[u8]) {
        let room = KEEP - self.line_len;
        let take = bytes.len().min(room);
        self.line[self.line_len..self.line_len + take].copy_from_slice(&bytes[..take]);
        self.line_len += take;
    }

    fn end_of_line(&mut self) {
        let mut len = self.line_len;
        if len > 0 && self.line[len - 1] == b'\r' {
            len -= 1;
        }
        self.line_len = 0;
        let line = &self.line[..len];
        match self.state {
            State::Head if !self.in_headers => {
                if !line.is_empty() {
                    self.in_headers = true;
                    self.connect = line.starts_with(b"CONNECT ");
                }
            }
            State::Head if line.is_empty() => self.end_of_head(),
            State::Head => {
                let Some(colon) = line.iter().position(|b| *b == b':') else { return };
                let name = &line[..colon];
                let value = trim(&line[colon + 1..]);
                if name.eq_ignore_ascii_case(b"content-length") {
                    let parsed = std::str::from_utf8(value).ok().and_then(|v| v.parse::<u64>().ok());
                    if self.has_length && parsed != self.length {
                        self.length = None;
                    } else {
                        self.length = parsed;
                    }
                    self.has_length = true;
                } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                    self.has_te = true;
                    let last = value.rsplit(|b| *b == b',').next().map(trim).unwrap_or_default();
                    self.chunked = last.eq_ignore_ascii_case(b"chunked");
                } else if name.eq_ignore_ascii_case(b"upgrade") {
                    self.upgrade = true;
                }
            }
            State::ChunkSize => {
                let hex = line.split(|b| *b == b';').next().map(trim).unwrap_or_default();
                match std::str::from_utf8(hex).ok().and_then(|h| u64::from_str_radix(h, 16).ok()) {
                    Some(0) => self.state = State::Trailers,
                    Some(n) => self.state = State::ChunkData(n),
                    None => self.state = State::Off,
                }
            }
            State::ChunkEnd => self.state = State::ChunkSize,
            State::Trailers if line.is_empty() => self.state = State::Head,
            State::Trailers => {}
            State::Body(_) | State::ChunkData(_) | State::Off => {}
        }
    }

    fn end_of_head(&mut self) {
        if self.has_length && self.has_te {
            let _ = self.flags.first_bad.compare_exchange(u64::MAX, self.heads, Ordering::Relaxed, Ordering::Relaxed);
        }
        self.heads += 1;
        self.state = if self.upgrade || self.connect || (self.has_te && !self.chunked) {
            State::Off
        } else if self.has_te {
            State::ChunkSize
        } else if self.has_length {
            match self.length {
                Some(0) => State::Head,
                Some(n) => State::Body(n),
                None => State::Off,
            }
        } else {
            State::Head
        };
        self.in_headers = false;
        self.has_length = false;
        self.length = None;
        self.has_te = false;
        self.chunked = false;
        self.upgrade = false;
        self.connect = false;
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |e| e + 1);
    &bytes[start..end.max(start)]
}

impl<T: AsyncRead + Unpin> AsyncRead for SniffIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result
            && this.state != State::Off
        {
            this.feed(&buf.filled()[before..]);
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SniffIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn run(chunks: &[&[u8]]) -> (u64, u64) {
        let flags = Arc::new(SmuggleFlags::default());
        let mut sniff = SniffIo::new((), flags.clone());
        for chunk in chunks {
            sniff.feed(chunk);
        }
        (flags.first_bad.load(Ordering::Relaxed), sniff.heads)
    }

    #[test]
    fn follows_framing_across_requests() {
        let stream: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
            POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
            POST /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;ext\r\nabc\r\n0\r\nX-T: 1\r\n\r\n\
            GET /z HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(run(&[stream]), (3, 4));
        // Byte by byte gives the same answer.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(run(&bytes), (3, 4));
    }

    #[test]
    fn body_content_is_not_mistaken_for_headers() {
        let stream: &[u8] = b"POST / HTTP/1.1\r\nContent-Length: 49\r\n\r\n\
            Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n\
            GET / HTTP/1.1\r\n\r\n";
        assert_eq!(run(&[stream]), (u64::MAX, 2));
    }

    #[test]
    fn te_before_cl_is_caught() {
        let stream: &[u8] = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n";
        assert_eq!(run(&[stream]).0, 0);
    }
}
