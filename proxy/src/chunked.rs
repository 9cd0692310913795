//! Incremental decoding of chunked response bodies from backends (RFC 9112
//! §7.1). Strict on purpose: anything that another parser on the path could
//! frame differently (bare LF, odd sizes, whitespace) is an error, not a guess.

use bytes::{Buf, Bytes, BytesMut};

/// Longest chunk-size line, size and extensions, without its CRLF.
const MAX_LINE: usize = 4096;
/// Largest trailer section: its field lines and the final empty line, CRLFs included.
const MAX_TRAILERS: usize = 16 * 1024;
/// Most hex digits in a chunk size: 16 already fill a `u64`.
const MAX_DIGITS: usize = 16;

/// Decodes a chunked body from the front of a read buffer, piece by piece.
///
/// The caller keeps one buffer per body: each call gets what earlier calls
/// left in it, with newly read bytes appended. After an error the body is
/// unusable and so is the connection it came on.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: State,
}

/// What `decode` took from the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk {
    /// Body bytes: at most what the buffer held of the current chunk, never past its end. Never empty.
    Data(Bytes),
    /// The last chunk and the trailer section (discarded) have been read: the body is complete.
    End,
    /// The buffer holds no complete piece: read more and call again.
    NeedMore,
}

/// Why a chunked body is malformed.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum ChunkedError {
    /// A chunk-size line does not start with a hex digit, or has junk after the size.
    #[error("bad chunk size")]
    BadSize,
    /// A chunk size has more than 16 hex digits.
    #[error("chunk size too large")]
    SizeTooLarge,
    /// A chunk-size line is longer than 4096 bytes.
    #[error("chunk-size line too long")]
    LineTooLong,
    /// A line ends in a bare LF or a CR not followed by LF, or chunk data is not followed by CRLF.
    #[error("missing CRLF")]
    MissingCrlf,
    /// A trailer line is not a field line (no colon, or a folded continuation).
    #[error("bad trailer line")]
    BadTrailer,
    /// The trailer section is longer than 16 KiB.
    #[error("trailer section too large")]
    TrailersTooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In a chunk-size line. The first `scanned` bytes of the buffer hold no
    /// CR or LF, so a line trickling in is searched once, not once per read.
    Size { scanned: usize },
    /// In a chunk's data, with this many bytes (never 0) still to come.
    Data(u64),
    /// After a chunk's data, which must be followed by CRLF.
    DataEnd,
    /// In the trailer section: `seen` bytes of complete lines already
    /// discarded; `scanned` as for `Size`, for the current line.
    Trailers { seen: usize, scanned: usize },
    /// The body is complete.
    Done,
}

/// Where the next line end is, if it is in the buffer.
enum LineEnd {
    /// The line (without its CRLF) is this long.
    At(usize),
    /// Not yet: the first this many bytes hold no CR or LF.
    Partial(usize),
}

impl ChunkedDecoder {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        ChunkedDecoder { state: State::Size { scanned: 0 } }
    }

    /// Takes the next piece from the front of `buf`, removing the bytes it
    /// consumed (framing and data). Data is split off `buf` without copying.
    /// After `End`, further calls return `End` and consume nothing: bytes
    /// after the body stay in `buf`, so the caller can see a backend that
    /// sent more than one message.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Chunk, ChunkedError> {
        // Framing alone is no answer: loop until data, the end, or a want of bytes.
        loop {
            match self.state {
                State::Size { scanned } => {
                    check_size_prefix(buf)?;
                    match find_line_end(buf, scanned, MAX_LINE)? {
                        LineEnd::Partial(scanned) if scanned > MAX_LINE => return Err(ChunkedError::LineTooLong),
                        LineEnd::Partial(scanned) => {
                            self.state = State::Size { scanned };
                            return Ok(Chunk::NeedMore);
                        }
                        LineEnd::At(len) => {
                            let size = parse_size_line(buf.get(..len).unwrap_or_default())?;
                            buf.advance(len + 2);
                            self.state = match size {
                                0 => State::Trailers { seen: 0, scanned: 0 },
                                size => State::Data(size),
                            };
                        }
                    }
                }
                State::Data(remaining) => {
                    if buf.is_empty() {
                        return Ok(Chunk::NeedMore);
                    }
                    let n = usize::try_from(remaining).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(n).freeze();
                    // n <= remaining, and usize -> u64 is lossless.
                    let left = remaining - n as u64;
                    self.state = if left == 0 { State::DataEnd } else { State::Data(left) };
                    return Ok(Chunk::Data(data));
                }
                State::DataEnd => match (buf.first(), buf.get(1)) {
                    (None, _) | (Some(b'\r'), None) => return Ok(Chunk::NeedMore),
                    (Some(b'\r'), Some(b'\n')) => {
                        buf.advance(2);
                        self.state = State::Size { scanned: 0 };
                    }
                    _ => return Err(ChunkedError::MissingCrlf),
                },
                State::Trailers { seen, scanned } => {
                    // A line fits only if it and its CRLF fit in what is left;
                    // with no room even for the empty line, the section cannot end.
                    let room = MAX_TRAILERS.checked_sub(seen + 2).ok_or(ChunkedError::TrailersTooLarge)?;
                    match find_line_end(buf, scanned, room)? {
                        LineEnd::Partial(scanned) if scanned > room => return Err(ChunkedError::TrailersTooLarge),
                        LineEnd::Partial(scanned) => {
                            self.state = State::Trailers { seen, scanned };
                            return Ok(Chunk::NeedMore);
                        }
                        LineEnd::At(0) => {
                            buf.advance(2);
                            self.state = State::Done;
                            return Ok(Chunk::End);
                        }
                        LineEnd::At(len) => {
                            check_trailer_line(buf.get(..len).unwrap_or_default())?;
                            buf.advance(len + 2);
                            self.state = State::Trailers { seen: seen + len + 2, scanned: 0 };
                        }
                    }
                }
                State::Done => return Ok(Chunk::End),
            }
        }
    }

    /// True once the body is complete.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

/// Finds the CRLF ending the line at the front of `buf`, searching no
/// further than a line of `max` bytes needs: `Partial(n)` with `n > max`
/// means the line is too long, for the caller to name in its own error.
/// The first `scanned` bytes are known to hold no CR or LF.
fn find_line_end(buf: &[u8], scanned: usize, max: usize) -> Result<LineEnd, ChunkedError> {
    // A CR at index `max` still ends a line of `max` bytes.
    let end = buf.len().min(max + 1);
    let start = scanned.min(end);
    let window = buf.get(start..end).unwrap_or_default();
    let Some(at) = memchr::memchr2(b'\r', b'\n', window).map(|i| start + i) else {
        return Ok(LineEnd::Partial(end));
    };
    match (buf.get(at), buf.get(at + 1)) {
        (Some(b'\r'), None) => Ok(LineEnd::Partial(at)),
        (Some(b'\r'), Some(b'\n')) => Ok(LineEnd::At(at)),
        _ => Err(ChunkedError::MissingCrlf),
    }
}

/// Rejects a chunk-size line from its first bytes, before its end arrives,
/// so junk is refused at once rather than after 4 KiB of it.
fn check_size_prefix(buf: &[u8]) -> Result<(), ChunkedError> {
    let digits = buf.iter().take(MAX_DIGITS + 1).take_while(|b| b.is_ascii_hexdigit()).count();
    if digits > MAX_DIGITS {
        return Err(ChunkedError::SizeTooLarge);
    }
    match buf.get(digits) {
        None => Ok(()),
        Some(_) if digits == 0 => Err(ChunkedError::BadSize),
        // CR and LF are judged by `find_line_end`, whitespace by `parse_size_line`.
        Some(b';' | b' ' | b'\t' | b'\r' | b'\n') => Ok(()),
        Some(_) => Err(ChunkedError::BadSize),
    }
}

/// The size from a complete chunk-size line (without its CRLF): 1 to 16
/// hex digits, then nothing or extensions. Extensions (`;name=value`, with
/// optional whitespace before the `;`) are skipped unread: a CR or LF in one
/// has already ended the line, so they cannot hide framing.
fn parse_size_line(line: &[u8]) -> Result<u64, ChunkedError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(ChunkedError::BadSize);
    }
    if digits > MAX_DIGITS {
        return Err(ChunkedError::SizeTooLarge);
    }
    let (size, rest) = line.split_at_checked(digits).ok_or(ChunkedError::BadSize)?;
    let after_space = rest.iter().position(|&b| b != b' ' && b != b'\t');
    match after_space.and_then(|i| rest.get(i)) {
        // Whitespace is allowed only before a `;`: a bare `5 ` is refused.
        None if rest.is_empty() => {}
        Some(b';') => {}
        _ => return Err(ChunkedError::BadSize),
    }
    size.iter().try_fold(0u64, |n, &b| {
        let digit = char::from(b).to_digit(16).ok_or(ChunkedError::BadSize)?;
        n.checked_mul(16).and_then(|n| n.checked_add(u64::from(digit))).ok_or(ChunkedError::SizeTooLarge)
    })
}

/// Trailer fields are discarded, but a line that is not a field line at all
/// (no colon, or an obsolete folded continuation) means the body is garbage.
fn check_trailer_line(line: &[u8]) -> Result<(), ChunkedError> {
    match line.first() {
        Some(b' ' | b'\t' | b':') | None => Err(ChunkedError::BadTrailer),
        Some(_) if memchr::memchr(b':', line).is_none() => Err(ChunkedError::BadTrailer),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body with extensions (plain, quoted, after whitespace) and trailers,
    /// followed by the start of a next response.
    const BODY: &[u8] = b"4;name=value\r\nWiki\r\n5 ;q=\"a;b\\\"c\"\r\npedia\r\nE\t;x\r\n in\r\n\r\nchunks.\r\n\
        0;last\r\nExpires: never\r\nX-Trailer: 1\r\n\r\n";
    const DECODED: &[u8] = b"Wikipedia in\r\n\r\nchunks.";
    const AFTER: &[u8] = b"HTTP/1.1 200 OK\r\n";

    /// Calls `decode` until it gives something other than data: the data
    /// (each piece checked non-empty) and that last answer.
    fn drain(decoder: &mut ChunkedDecoder, buf: &mut BytesMut, out: &mut Vec<u8>) -> Result<Chunk, ChunkedError> {
        loop {
            match decoder.decode(buf)? {
                Chunk::Data(data) => {
                    assert!(!data.is_empty(), "empty data");
                    out.extend_from_slice(&data);
                }
                other => return Ok(other),
            }
        }
    }

    /// Feeds `pieces` one after the other, even after the end (which must
    /// leave them in the buffer); stops at an error. Returns the data, the
    /// last answer and what is left in the buffer.
    fn feed(pieces: &[&[u8]]) -> (Vec<u8>, Result<Chunk, ChunkedError>, BytesMut) {
        let mut decoder = ChunkedDecoder::new();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut last = Ok(Chunk::NeedMore);
        for piece in pieces {
            buf.extend_from_slice(piece);
            last = drain(&mut decoder, &mut buf, &mut out);
            if last.is_err() {
                break;
            }
        }
        (out, last, buf)
    }

    fn whole(input: &[u8]) -> (Vec<u8>, Result<Chunk, ChunkedError>, BytesMut) {
        feed(&[input])
    }

    fn error(input: &[u8]) -> ChunkedError {
        let (_, last, _) = whole(input);
        let Err(e) = last else { panic!("{:?} was accepted: {last:?}", String::from_utf8_lossy(input)) };
        // However the bytes arrive, the verdict is the same.
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(feed(&bytes).1, Err(e), "byte by byte");
        e
    }

    #[test]
    fn every_split_decodes_the_same() {
        let input = [BODY, AFTER].concat();
        let expected = (DECODED.to_vec(), Ok(Chunk::End), BytesMut::from(AFTER));
        assert_eq!(whole(&input), expected);
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(feed(&bytes), expected, "byte by byte");
        for at in 0..=input.len() {
            let (a, b) = input.split_at(at);
            assert_eq!(feed(&[a, b]), expected, "split at {at}");
        }
    }

    #[test]
    fn data_is_handed_out_as_it_arrives_and_stops_at_the_chunk_end() {
        let mut decoder = ChunkedDecoder::new();
        let mut buf = BytesMut::from(&b"a\r\n0123"[..]);
        assert_eq!(decoder.decode(&mut buf), Ok(Chunk::Data(Bytes::from_static(b"0123"))));
        assert_eq!(decoder.decode(&mut buf), Ok(Chunk::NeedMore));
        buf.extend_from_slice(b"456789\r\n3\r\nabc\r\n0\r\n\r\n");
        assert_eq!(decoder.decode(&mut buf), Ok(Chunk::Data(Bytes::from_static(b"456789"))));
        assert_eq!(decoder.decode(&mut buf), Ok(Chunk::Data(Bytes::from_static(b"abc"))));
        assert!(!decoder.is_done());
        assert_eq!(decoder.decode(&mut buf), Ok(Chunk::End));
        assert!(decoder.is_done());
        assert!(buf.is_empty());
    }

    #[test]
    fn empty_buffer_needs_more() {
        let mut decoder = ChunkedDecoder::default();
        assert_eq!(decoder.decode(&mut BytesMut::new()), Ok(Chunk::NeedMore));
        assert!(!decoder.is_done());
    }

    #[test]
    fn empty_body() {
        let mut decoder = ChunkedDecoder::new();
        let mut buf = BytesMut::from(&b"0\r\n\r\n"[..]);
        assert_eq!(decoder.decode(&mut buf), Ok(Chunk::End));
        assert!(decoder.is_done());
        assert!(buf.is_empty());
    }

    #[test]
    fn after_the_end_nothing_is_consumed() {
        let mut decoder = ChunkedDecoder::new();
        let mut buf = BytesMut::from(&b"0\r\n\r\n1\r\nx\r\n"[..]);
        assert_eq!(decoder.decode(&mut buf), Ok(Chunk::End));
        assert_eq!(decoder.decode(&mut buf), Ok(Chunk::End));
        assert_eq!(&buf[..], b"1\r\nx\r\n");
    }

    #[test]
    fn extensions_and_trailers_are_skipped() {
        assert_eq!(
            whole(b"3;a=b;c\r\nabc\r\n0;z=\"y\"\r\nA: 1\r\nB:\r\n\r\n"),
            (b"abc".to_vec(), Ok(Chunk::End), BytesMut::new())
        );
        assert_eq!(whole(b"3 \t ;a\r\nabc\r\n0\r\n\r\n").1, Ok(Chunk::End));
    }

    #[test]
    fn sizes() {
        let (_, last, _) = whole(&[b"aB\r\n".as_slice(), &[b'x'; 0xab], b"\r\n0\r\n\r\n"].concat());
        assert_eq!(last, Ok(Chunk::End));
        // Sixteen digits are allowed, leading zeros included.
        assert_eq!(whole(b"ffffffffffffffff\r\nxy").0, b"xy");
        assert_eq!(whole(b"0000000000000001\r\nx\r\n0\r\n\r\n").1, Ok(Chunk::End));
    }

    #[test]
    fn bad_sizes() {
        assert_eq!(error(b"g\r\n"), ChunkedError::BadSize);
        assert_eq!(error(b"5g\r\n"), ChunkedError::BadSize);
        assert_eq!(error(b"0x5\r\n"), ChunkedError::BadSize);
        assert_eq!(error(b"-1\r\n"), ChunkedError::BadSize);
        assert_eq!(error(b"+1\r\n"), ChunkedError::BadSize);
        assert_eq!(error(b"\r\n"), ChunkedError::BadSize);
        assert_eq!(error(b";ext\r\n"), ChunkedError::BadSize);
        assert_eq!(error(b" 5\r\n"), ChunkedError::BadSize);
        assert_eq!(error(b"5 \r\n"), ChunkedError::BadSize);
        assert_eq!(error(b"5 6\r\n"), ChunkedError::BadSize);
        // Junk is refused before the line ends.
        assert_eq!(whole(b"5x").1, Err(ChunkedError::BadSize));
        assert_eq!(whole(b"x").1, Err(ChunkedError::BadSize));
    }

    #[test]
    fn sizes_too_large() {
        assert_eq!(error(b"00000000000000000\r\n"), ChunkedError::SizeTooLarge);
        assert_eq!(error(b"10000000000000000\r\n"), ChunkedError::SizeTooLarge);
        assert_eq!(error(b"fffffffffffffffffff\r\n"), ChunkedError::SizeTooLarge);
        assert_eq!(whole(b"10000000000000000").1, Err(ChunkedError::SizeTooLarge));
    }

    #[test]
    fn line_ends() {
        assert_eq!(error(b"5\nhello\r\n"), ChunkedError::MissingCrlf);
        assert_eq!(error(b"5;a\nhello\r\n"), ChunkedError::MissingCrlf);
        assert_eq!(error(b"5\rhello\r\n"), ChunkedError::MissingCrlf);
        assert_eq!(error(b"5;a\rb\r\nhello\r\n"), ChunkedError::MissingCrlf);
        assert_eq!(error(b"\n"), ChunkedError::BadSize);
    }

    #[test]
    fn after_data() {
        assert_eq!(error(b"3\r\nabc0\r\n\r\n"), ChunkedError::MissingCrlf);
        assert_eq!(error(b"3\r\nabcd\r\n0\r\n\r\n"), ChunkedError::MissingCrlf);
        assert_eq!(error(b"3\r\nabc\n0\r\n\r\n"), ChunkedError::MissingCrlf);
        assert_eq!(error(b"3\r\nabc\r0\r\n\r\n"), ChunkedError::MissingCrlf);
    }

    #[test]
    fn size_line_length() {
        let longest = [b"1;".as_slice(), &[b'a'; MAX_LINE - 2]].concat();
        let body = [&longest, b"\r\nx\r\n0\r\n\r\n".as_slice()].concat();
        assert_eq!(whole(&body), (b"x".to_vec(), Ok(Chunk::End), BytesMut::new()));
        // Its CR may arrive alone.
        assert_eq!(whole(&[&longest, b"\r".as_slice()].concat()).1, Ok(Chunk::NeedMore));
        // One byte more is too long, whether or not the line end has come.
        let too_long = [&longest, b"a".as_slice()].concat();
        assert_eq!(whole(&too_long).1, Err(ChunkedError::LineTooLong));
        assert_eq!(error(&[&too_long, b"\r\nx\r\n0\r\n\r\n".as_slice()].concat()), ChunkedError::LineTooLong);
        assert_eq!(whole(&[b"1;".as_slice(), &[b'a'; 100_000]].concat()).1, Err(ChunkedError::LineTooLong));
    }

    #[test]
    fn trailer_section_length() {
        // Fifteen field lines of 1024 bytes (CRLF included), one of 1022, the empty line: 16 KiB.
        let line = [b"X-Pad: ".as_slice(), &[b'p'; 1024 - 9], b"\r\n"].concat();
        let mut largest = b"0\r\n".to_vec();
        for _ in 0..15 {
            largest.extend_from_slice(&line);
        }
        largest.extend_from_slice(b"Y: ");
        largest.extend_from_slice(&[b'p'; 1024 - 3 - 2 - 2]);
        largest.extend_from_slice(b"\r\n\r\n");
        assert_eq!(largest.len() - 3, MAX_TRAILERS);
        assert_eq!(whole(&largest).1, Ok(Chunk::End));
        let mut too_large = largest.clone();
        too_large.insert(5, b'p');
        assert_eq!(error(&too_large), ChunkedError::TrailersTooLarge);
        // Detected before the section ends.
        let unfinished = &too_large[..too_large.len() - 2];
        assert_eq!(whole(unfinished).1, Err(ChunkedError::TrailersTooLarge));
        // And before a line that cannot fit ends.
        let endless = [b"0\r\nX: ".as_slice(), &[b'p'; MAX_TRAILERS]].concat();
        assert_eq!(whole(&endless).1, Err(ChunkedError::TrailersTooLarge));
    }

    #[test]
    fn bad_trailers() {
        assert_eq!(error(b"0\r\nX: 1\n\r\n"), ChunkedError::MissingCrlf);
        assert_eq!(error(b"0\r\n\n"), ChunkedError::MissingCrlf);
        assert_eq!(error(b"0\r\nX: 1\rY: 2\r\n\r\n"), ChunkedError::MissingCrlf);
        assert_eq!(error(b"0\r\nno colon\r\n\r\n"), ChunkedError::BadTrailer);
        assert_eq!(error(b"0\r\nX: 1\r\n folded\r\n\r\n"), ChunkedError::BadTrailer);
        assert_eq!(error(b"0\r\n: 1\r\n\r\n"), ChunkedError::BadTrailer);
    }

    #[test]
    fn errors_are_sticky() {
        let mut decoder = ChunkedDecoder::new();
        let mut buf = BytesMut::from(&b"3\r\nabcd"[..]);
        assert!(matches!(decoder.decode(&mut buf), Ok(Chunk::Data(_))));
        assert_eq!(decoder.decode(&mut buf), Err(ChunkedError::MissingCrlf));
        assert_eq!(decoder.decode(&mut buf), Err(ChunkedError::MissingCrlf));
    }
}
