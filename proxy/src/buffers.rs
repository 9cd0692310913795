//! Buffer, window and stream limits of the client and backend connections:
//! what one connection may hold in memory, whatever its peer does.
//!
//! The budget is under 64 KiB per busy connection (1,000 slow readers add at
//! most 64 MiB) and a few KiB per idle one. Data moves through the proxy
//! without being copied into growing buffers: a backend's body is read in
//! chunks of at most [`UPSTREAM_MAX_BUF`], queued for the client (writev,
//! no flattening copy) until [`CLIENT_WRITE_BUF`] bytes wait, and only then
//! is the backend read again, so a client that stops reading stops the
//! backend read (backpressure) instead of filling memory.

/// Largest HTTP/1 request head accepted (431 beyond), and the HTTP/2 header
/// list size: nginx's default budget (`large_client_header_buffers 4 8k`),
/// which the nginx edge this proxy replaces enforced. It also sizes the
/// HTTP/1 write buffer (see [`CLIENT_WRITE_BUF`]), so it is kept small.
pub const MAX_HEAD_BYTES: usize = 32 * 1024;

/// hyper's HTTP/1 server `max_buf_size`: it bounds the request head (so it is
/// [`MAX_HEAD_BYTES`]) and also how much response data is queued for a client
/// before the backend is read again.
pub const CLIENT_WRITE_BUF: usize = MAX_HEAD_BYTES;

/// hyper's HTTP/1 client `max_buf_size`: the read buffer of a backend
/// connection, and so the largest backend response head (502 beyond).
/// hyper's default (about 400 KiB) made each slow reader cost about 1 MiB;
/// 8 KiB is hyper's minimum and at least nginx's `proxy_buffer_size` default
/// (one page), which the nginx edge this proxy replaces enforced. A slow
/// reader holds at most two such chunks (one being written, one queued) and
/// the buffer being read into: 16 KiB held about 40 KiB per reader.
pub const UPSTREAM_MAX_BUF: usize = 8 * 1024;

/// rustls' buffer of encrypted bytes not yet taken by the socket (rustls'
/// default: 64 KiB). One backend chunk's worth ([`UPSTREAM_MAX_BUF`]): a
/// client that does not read stops the proxy after 8 KiB instead of 64, and
/// a reading client still gets every chunk in one write.
pub const TLS_SEND_BUF: usize = 8 * 1024;

/// HTTP/2 streams a client may open at once (hyper's default is 200; RFC
/// 9113 suggests at least 100, as nginx's `http2_max_concurrent_streams`).
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 100;

/// HTTP/2 per-stream receive window: request body bytes a client may send
/// before the proxy has forwarded them. The RFC's initial 64 KiB, as
/// nginx's `http2_body_preread_size`; hyper's default is 1 MiB.
pub const H2_STREAM_WINDOW: u32 = 64 * 1024;

/// HTTP/2 connection receive window: all streams of a connection together
/// (hyper's default: 1 MiB). Four streams uploading at full window at once.
pub const H2_CONNECTION_WINDOW: u32 = 256 * 1024;

/// HTTP/2 per-stream send buffer (hyper's default: about 400 KiB): response
/// bytes queued for a stream before its backend is read again.
pub const H2_MAX_SEND_BUF: usize = 32 * 1024;

/// HTTP/2 streams a client may reset before the proxy has even accepted them
/// (the rapid reset attack, CVE-2023-44487); beyond it the connection gets
/// GOAWAY. h2's default, stated here so it cannot silently change.
pub const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;

/// HTTP/2 streams the proxy may reset because of the client's protocol
/// errors before closing the connection with GOAWAY (hyper's default: 1024).
/// A correct client causes none.
pub const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 32;
