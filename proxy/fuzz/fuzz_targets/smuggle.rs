//! The request-smuggling guard (`SniffIo`) reads every byte a client sends
//! on HTTP/1. Whatever the bytes, it never panics, and its verdicts (which
//! requests carried both `Content-Length` and `Transfer-Encoding`) and its
//! message boundary do not depend on how the bytes were cut into reads.
//!
//! The first byte picks the read size of the chunked pass (1 to 256 bytes).

#![no_main]

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use dynamicproxy_proxy::sniff::{SmuggleFlags, SniffIo};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};

/// A client whose bytes arrive `chunk` at a time.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

/// Reads all of `data` through the guard; returns the verdict of each of
/// the first 64 requests and whether the input ended at a message boundary.
fn sniff(data: &[u8], chunk: usize) -> (Vec<bool>, bool) {
    let flags = Arc::new(SmuggleFlags::default());
    let mut io = SniffIo::new(Chunked { data, chunk }, flags.clone());
    let mut cx = Context::from_waker(Waker::noop());
    let mut space = [0u8; 4096];
    loop {
        let mut buf = ReadBuf::new(&mut space);
        match Pin::new(&mut io).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => break,
            Poll::Ready(Ok(())) => {}
            other => panic!("a slice never fails or waits: {other:?}"),
        }
    }
    let verdicts = (0..64).map(|_| flags.next_request_is_ambiguous()).collect();
    (verdicts, io.at_message_boundary())
}

fuzz_target!(|data: &[u8]| {
    let Some((&size, data)) = data.split_first() else { return };
    let whole = sniff(data, usize::MAX);
    assert_eq!(sniff(data, usize::from(size) + 1), whole, "depends on read sizes");
});
