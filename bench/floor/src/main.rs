//! The floor: an HTTP/1.1 relay with nothing on its path, to measure what
//! the kernel and tokio cost per proxied request on this box.
//!
//! Each client connection gets its own keep-alive connection to the one
//! backend. A request head is parsed (httparse) and sent on as it came; the
//! response head is parsed for its `Content-Length`, and head and body go
//! back in one write. Requests with bodies, chunked responses, pipelining and
//! every check the proxy makes are out of scope: this is a yardstick, not a
//! proxy, and it must never face anything but the benchmark.
//!
//! With `FLOOR=hyper` in the environment, the same relay goes through hyper
//! instead: hyper's HTTP/1 server, and a hyper client connection per client
//! connection, with no handler work between them. The difference between
//! the two is what hyper's machinery costs; the rest of the proxy's figure
//! is its own features.
//!
//! With `FLOOR=hyper-server`, hyper's server only: the request goes to the
//! backend as the proxy's own client sends it (its head written from the
//! header map, the answer's head parsed with httparse into one), so this one
//! has the proxy's architecture with none of its features. Its difference
//! from `floor` is what hyper's server and the header maps cost.
//!
//! Takes the proxy's command line (`proxy --http-listen A --default-backend
//! http://H:P ...`, the rest ignored), so bench/ab.sh can run it as a binary.

use std::io;
use std::net::SocketAddr;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BUF: usize = 8 * 1024;

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--check") {
        return Ok(());
    }
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let listen: SocketAddr = value("--http-listen")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| io::Error::other("--http-listen ADDR required"))?;
    let backend: SocketAddr = value("--default-backend")
        .and_then(|b| b.trim_start_matches("http://").trim_end_matches('/').parse().ok())
        .ok_or_else(|| io::Error::other("--default-backend http://IP:PORT required"))?;
    let mode = std::env::var("FLOOR").unwrap_or_default();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        loop {
            let (client, _) = listener.accept().await?;
            let mode = mode.clone();
            tokio::spawn(async move {
                match mode.as_str() {
                    "hyper" => drop(relay_through_hyper(client, backend).await),
                    "hyper-server" => drop(relay_through_hyper_server(client, backend).await),
                    _ => drop(relay(client, backend).await),
                }
            });
        }
    })
}

/// The same relay through hyper's server and client connections.
async fn relay_through_hyper(client: TcpStream, backend: SocketAddr) -> Result<(), hyper::Error> {
    let _ = client.set_nodelay(true);
    let upstream: Arc<Mutex<Option<SendRequest<Incoming>>>> = Arc::new(Mutex::new(None));
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let upstream = Arc::clone(&upstream);
        async move {
            let idle = upstream.lock().map_err(|_| io::Error::other("poisoned"))?.take();
            let mut sender = match idle {
                Some(sender) => sender,
                None => {
                    let tcp = TcpStream::connect(backend).await?;
                    tcp.set_nodelay(true)?;
                    let (sender, connection) =
                        hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(io::Error::other)?;
                    tokio::spawn(connection);
                    sender
                }
            };
            sender.ready().await.map_err(io::Error::other)?;
            let response: Response<Incoming> = sender.send_request(req).await.map_err(io::Error::other)?;
            *upstream.lock().map_err(|_| io::Error::other("poisoned"))? = Some(sender);
            Ok::<_, io::Error>(response)
        }
    });
    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(client), service).await
}

/// A backend connection between requests, with its read buffer.
type IdleBackend = (TcpStream, Vec<u8>);

/// The relay through hyper's server, with the backend exchange written by
/// hand as the proxy's client does it.
async fn relay_through_hyper_server(client: TcpStream, backend: SocketAddr) -> Result<(), hyper::Error> {
    let _ = client.set_nodelay(true);
    let upstream: Arc<Mutex<Option<IdleBackend>>> = Arc::new(Mutex::new(None));
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let upstream = Arc::clone(&upstream);
        async move {
            let idle = upstream.lock().map_err(|_| io::Error::other("poisoned"))?.take();
            let (mut tcp, mut buf) = match idle {
                Some(idle) => idle,
                None => {
                    let tcp = TcpStream::connect(backend).await?;
                    tcp.set_nodelay(true)?;
                    (tcp, vec![0u8; BUF])
                }
            };
            let (parts, _body) = req.into_parts();
            // Written as `Outgoing::new` in proxy/src/backend_conn.rs writes it:
            // copied, since the yardstick must not depend on the proxy.
            let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
            let mut out = Vec::with_capacity(64 + target.len() + parts.headers.len() * 32);
            out.extend_from_slice(parts.method.as_str().as_bytes());
            out.push(b' ');
            out.extend_from_slice(target.as_bytes());
            out.extend_from_slice(b" HTTP/1.1\r\n");
            for (name, value) in &parts.headers {
                out.extend_from_slice(name.as_str().as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(value.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"\r\n");
            tcp.write_all(&out).await?;
            let head = read_head(&mut tcp, &mut buf, true).await?.ok_or_else(|| io::Error::other("backend closed"))?;
            let total = read_body(&mut tcp, &mut buf, &head).await?;
            // One copy of the answer; the header values and the body share it,
            // as the proxy's do.
            let answer = Bytes::copy_from_slice(&buf[..total]);
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut parsed = httparse::Response::new(&mut headers);
            parsed.parse(&answer[..head.len]).map_err(io::Error::other)?;
            let mut response = Response::new(Full::new(answer.slice(head.len..total)));
            *response.status_mut() = hyper::StatusCode::from_u16(parsed.code.unwrap_or(502)).map_err(io::Error::other)?;
            let map = response.headers_mut();
            map.reserve(parsed.headers.len());
            for h in parsed.headers.iter() {
                if h.name.eq_ignore_ascii_case("connection") {
                    continue;
                }
                let value = answer.slice_ref(h.value);
                map.append(
                    hyper::header::HeaderName::from_bytes(h.name.as_bytes()).map_err(io::Error::other)?,
                    hyper::header::HeaderValue::from_maybe_shared(value).map_err(io::Error::other)?,
                );
            }
            *upstream.lock().map_err(|_| io::Error::other("poisoned"))? = Some((tcp, buf));
            Ok::<_, io::Error>(response)
        }
    });
    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(client), service).await
}

/// Serves one client connection until either side closes or misbehaves.
async fn relay(mut client: TcpStream, backend: SocketAddr) -> io::Result<()> {
    client.set_nodelay(true)?;
    let mut upstream = TcpStream::connect(backend).await?;
    upstream.set_nodelay(true)?;
    let mut request = vec![0u8; BUF];
    let mut response = vec![0u8; BUF];
    loop {
        let head = match read_head(&mut client, &mut request, false).await? {
            Some(head) => head,
            None => return Ok(()),
        };
        upstream.write_all(&request[..head.len]).await?;
        let head =
            read_head(&mut upstream, &mut response, true).await?.ok_or_else(|| io::Error::other("backend closed"))?;
        let total = read_body(&mut upstream, &mut response, &head).await?;
        client.write_all(&response[..total]).await?;
    }
}

/// Reads the rest of a response's body after `head` into `buf`; returns
/// where the whole response ends.
async fn read_body(io: &mut TcpStream, buf: &mut [u8], head: &Head) -> io::Result<usize> {
    let total = head.len + head.content_length;
    if total > buf.len() {
        return Err(io::Error::other("response larger than the buffer"));
    }
    let mut have = head.filled;
    while have < total {
        let n = io.read(&mut buf[have..total]).await?;
        if n == 0 {
            return Err(io::Error::other("backend closed mid-body"));
        }
        have += n;
    }
    Ok(total)
}

/// Where a message's head ends, what follows it in the buffer, and its body length.
struct Head {
    len: usize,
    filled: usize,
    content_length: usize,
}

/// Reads until `buf` holds a whole head; `None` when the peer closed first.
async fn read_head(io: &mut TcpStream, buf: &mut [u8], is_response: bool) -> io::Result<Option<Head>> {
    let mut filled = 0;
    loop {
        let n = io.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Ok(None);
        }
        filled += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let parsed = if is_response {
            let mut r = httparse::Response::new(&mut headers);
            match r.parse(&buf[..filled]) {
                Ok(httparse::Status::Complete(len)) => Ok(Some((len, content_length(r.headers)))),
                Ok(httparse::Status::Partial) => Ok(None),
                Err(e) => Err(e),
            }
        } else {
            let mut r = httparse::Request::new(&mut headers);
            match r.parse(&buf[..filled]) {
                Ok(httparse::Status::Complete(len)) => Ok(Some((len, 0))),
                Ok(httparse::Status::Partial) => Ok(None),
                Err(e) => Err(e),
            }
        };
        match parsed {
            Ok(Some((len, content_length))) => {
                return Ok(Some(Head { len, filled, content_length }));
            }
            Ok(None) if filled < buf.len() => continue,
            _ => return Err(io::Error::other("bad or oversized head")),
        }
    }
}

fn content_length(headers: &[httparse::Header<'_>]) -> usize {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
        .unwrap_or(0)
}
