//! Chunked response bodies from backends (`ChunkedDecoder`): whatever the
//! bytes, decoding never panics, never yields empty data nor more data than
//! it was given, and gives the same body, outcome and leftover bytes whether
//! the bytes come in one read or in two.
//!
//! The first byte picks where the rest is cut in two.

#![no_main]

use bytes::BytesMut;
use dynamicproxy_proxy::chunked::{Chunk, ChunkedDecoder, ChunkedError};
use libfuzzer_sys::fuzz_target;

/// What decoding some reads gave: the body so far, the last answer, and
/// what was left in the buffer.
type Outcome = (Vec<u8>, Result<Chunk, ChunkedError>, BytesMut);

/// Decodes `reads` one after the other, calling `decode` until it gives
/// something other than data; stops at an error.
fn decode(reads: &[&[u8]]) -> Outcome {
    let mut decoder = ChunkedDecoder::new();
    let mut buf = BytesMut::new();
    let mut body = Vec::new();
    let mut last = Ok(Chunk::NeedMore);
    for read in reads {
        buf.extend_from_slice(read);
        last = loop {
            match decoder.decode(&mut buf) {
                Ok(Chunk::Data(data)) => {
                    assert!(!data.is_empty(), "empty data");
                    body.extend_from_slice(&data);
                }
                other => break other,
            }
        };
        assert_eq!(decoder.is_done(), last == Ok(Chunk::End));
        if last.is_err() {
            break;
        }
    }
    (body, last, buf)
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else { return };
    let whole = decode(&[data]);
    assert!(whole.0.len() <= data.len(), "more data out than in");
    let (first, second) = data.split_at(usize::from(cut) * data.len() / 255);
    let (body, last, left) = decode(&[first, second]);
    assert_eq!(body, whole.0, "body depends on the cut");
    assert_eq!(last, whole.1, "outcome depends on the cut");
    if last.is_ok() {
        assert_eq!(left, whole.2, "leftover depends on the cut");
    }
});
