//! The proxy's HTTP/1.1 client against a raw TCP backend that answers with
//! canned bytes: every framing a backend may use, the malformed and
//! smuggling-shaped answers it must refuse, and when a backend connection is
//! used again.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use dynamicproxy_proxy::Config;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend that answers each request with the bytes its path names.
struct ScriptedBackend {
    addr: SocketAddr,
    /// Connections accepted.
    opened: Arc<AtomicUsize>,
}

/// What the backend does with the n-th request on a connection.
#[derive(Clone, Copy)]
enum Script {
    /// Answers `reply`, then keeps the connection (unless `close`).
    Reply { reply: &'static [u8], close: bool },
    /// Answers the first request of each connection with `reply`, and closes
    /// any later one unanswered (as a backend whose keep-alive timeout ran
    /// out as the request came).
    DropSecond { reply: &'static [u8] },
}

impl ScriptedBackend {
    async fn start(script: Script) -> ScriptedBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let opened = Arc::new(AtomicUsize::new(0));
        let counter = opened.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, script));
            }
        });
        ScriptedBackend { addr, opened }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn opened(&self) -> usize {
        self.opened.load(Ordering::SeqCst)
    }
}

async fn serve(mut stream: TcpStream, script: Script) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut served = 0;
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < end + 4 + length {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..end + 4 + length);
        served += 1;
        let (reply, close) = match script {
            Script::Reply { reply, close } => (reply, close),
            Script::DropSecond { .. } if served > 1 => return,
            Script::DropSecond { reply } => (reply, false),
        };
        if stream.write_all(reply).await.is_err() || close {
            return;
        }
    }
}

async fn proxy_to(backend: &ScriptedBackend) -> Proxy {
    let proxy = Proxy::start(Config { event_loops: 1, ..Config::default() }).await;
    proxy.set_route("foo", ".*", &backend.url()).await;
    proxy
}

/// The status and body a client gets, or the error that cut the body.
async fn fetch(proxy: &Proxy, method: &str, body: &'static str) -> (u16, Result<String, String>) {
    let request = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{}/", proxy.http))
        .header("host", "foo.toolforge.org")
        .header("user-agent", "t")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(body.as_bytes())))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), client().request(request))
        .await
        .expect("answer within 10 s")
        .expect("an answer");
    let status = response.status().as_u16();
    let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .expect("body within 10 s")
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .map_err(|e| format!("{e:?}"));
    (status, body)
}

#[tokio::test]
async fn a_chunked_answer_arrives_whole_and_its_connection_is_used_again() {
    let backend = ScriptedBackend::start(Script::Reply {
        reply: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=\"a b\"\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        close: false,
    })
    .await;
    let proxy = proxy_to(&backend).await;
    for _ in 0..3 {
        assert_eq!(fetch(&proxy, "GET", "").await, (200, Ok("hello world".to_owned())));
    }
    assert_eq!(backend.opened(), 1, "the connection was used for every request");
}

#[tokio::test]
async fn informational_answers_are_dropped_and_the_final_one_passes() {
    let backend = ScriptedBackend::start(Script::Reply {
        reply: b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        close: false,
    })
    .await;
    let proxy = proxy_to(&backend).await;
    assert_eq!(fetch(&proxy, "GET", "").await, (200, Ok("ok".to_owned())));
}

#[tokio::test]
async fn malformed_and_smuggling_shaped_answers_are_502() {
    let long_head: &'static [u8] = Box::leak(
        format!("HTTP/1.1 200 OK\r\nX-Long: {}\r\nContent-Length: 0\r\n\r\n", "a".repeat(9000))
            .into_bytes()
            .into_boxed_slice(),
    );
    for (what, reply) in [
        ("both framings", &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..]),
        ("two lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"),
        ("signed length", b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok"),
        ("not HTTP", b"SSH-2.0-OpenSSH_9.2\r\n\r\n"),
        ("bad status", b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n"),
        ("space before colon", b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok"),
        ("head over 8 KiB", long_head),
    ] {
        let backend = ScriptedBackend::start(Script::Reply { reply, close: true }).await;
        let proxy = proxy_to(&backend).await;
        let (status, _) = fetch(&proxy, "GET", "").await;
        assert_eq!(status, 502, "{what}");
    }
}

#[tokio::test]
async fn a_body_cut_short_or_badly_chunked_is_never_passed_on_as_whole() {
    for (what, reply) in [
        ("closed mid-length", &b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"[..]),
        ("bad chunk size", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"),
        ("no CRLF after data", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n"),
        ("closed mid-chunk", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"),
    ] {
        let backend = ScriptedBackend::start(Script::Reply { reply, close: true }).await;
        let proxy = proxy_to(&backend).await;
        let (status, body) = fetch(&proxy, "GET", "").await;
        assert_eq!(status, 200, "{what}");
        assert!(body.is_err(), "{what}: the client took a cut body as whole: {body:?}");
    }
}

#[tokio::test]
async fn an_answer_with_bytes_after_it_closes_its_connection() {
    let backend = ScriptedBackend::start(Script::Reply {
        reply: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged",
        close: false,
    })
    .await;
    let proxy = proxy_to(&backend).await;
    assert_eq!(fetch(&proxy, "GET", "").await, (200, Ok("ok".to_owned())));
    assert_eq!(fetch(&proxy, "GET", "").await, (200, Ok("ok".to_owned())), "the forged answer was not taken");
    assert_eq!(backend.opened(), 2);
}

#[tokio::test]
async fn an_answer_without_a_length_ends_when_the_backend_closes() {
    let backend = ScriptedBackend::start(Script::Reply {
        reply: b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end",
        close: true,
    })
    .await;
    let proxy = proxy_to(&backend).await;
    assert_eq!(fetch(&proxy, "GET", "").await, (200, Ok("until the end".to_owned())));
    assert_eq!(fetch(&proxy, "GET", "").await, (200, Ok("until the end".to_owned())));
    assert_eq!(backend.opened(), 2);
}

#[tokio::test]
async fn a_head_answer_has_no_body_whatever_its_length_says() {
    let backend =
        ScriptedBackend::start(Script::Reply { reply: b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", close: false })
            .await;
    let proxy = proxy_to(&backend).await;
    for _ in 0..2 {
        let (status, body) = fetch(&proxy, "HEAD", "").await;
        assert_eq!((status, body), (200, Ok(String::new())));
    }
    assert_eq!(backend.opened(), 1, "the connection was kept after a bodiless answer");
}

#[tokio::test]
async fn a_get_on_a_connection_closed_as_it_was_taken_goes_out_again_but_a_post_does_not() {
    let backend =
        ScriptedBackend::start(Script::DropSecond { reply: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" }).await;
    let proxy = proxy_to(&backend).await;
    assert_eq!(fetch(&proxy, "GET", "").await, (200, Ok("ok".to_owned())));
    // The backend closes the reused connection on this request unanswered:
    // the proxy sends it again on a new connection.
    assert_eq!(fetch(&proxy, "GET", "").await, (200, Ok("ok".to_owned())));
    assert_eq!(backend.opened(), 2);
    // A POST may have been acted on: it is not sent twice.
    let (status, _) = fetch(&proxy, "POST", "data").await;
    assert_eq!(status, 502);
    assert_eq!(backend.opened(), 2);
}
