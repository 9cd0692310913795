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
use futures::StreamExt;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend that answers each request with the bytes its path names.
struct ScriptedBackend {
    addr: SocketAddr,
    /// Connections accepted.
    opened: Arc<AtomicUsize>,
    /// Request heads received.
    requests: Arc<AtomicUsize>,
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
    /// Answers `reply` after 300 ms, but closes the connection unanswered on
    /// a request for `/crash` (a backend that crashes on it).
    CrashOnOnePath { reply: &'static [u8] },
    /// Sends `103 Early Hints` as soon as a head has come, then reads the
    /// body and answers how many bytes it got.
    EarlyHintsThenCount,
}

impl ScriptedBackend {
    async fn start(script: Script) -> ScriptedBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (opened, requests) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (counter, heads) = (opened.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, script, heads.clone()));
            }
        });
        ScriptedBackend { addr, opened, requests }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn opened(&self) -> usize {
        self.opened.load(Ordering::SeqCst)
    }
}

async fn serve(mut stream: TcpStream, script: Script, requests: Arc<AtomicUsize>) {
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
        requests.fetch_add(1, Ordering::SeqCst);
        if matches!(script, Script::CrashOnOnePath { .. }) {
            if head.starts_with("get /crash ") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        if matches!(script, Script::EarlyHintsThenCount)
            && stream.write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n").await.is_err()
        {
            return;
        }
        while buf.len() < end + 4 + length {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..end + 4 + length);
        served += 1;
        let counted;
        let (reply, close) = match script {
            Script::Reply { reply, close } => (reply, close),
            Script::DropSecond { .. } if served > 1 => return,
            Script::DropSecond { reply } | Script::CrashOnOnePath { reply } => (reply, false),
            Script::EarlyHintsThenCount => {
                let text = format!("got {length} bytes");
                counted = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}", text.len()).into_bytes();
                (&counted[..], false)
            }
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
    fetch_at(proxy, method, "/", body).await
}

/// As [`fetch`], for `path`.
async fn fetch_at(proxy: &Proxy, method: &str, path: &str, body: &'static str) -> (u16, Result<String, String>) {
    let request = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", proxy.http))
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

#[tokio::test]
async fn a_get_is_sent_again_once_only() {
    let backend =
        ScriptedBackend::start(Script::CrashOnOnePath { reply: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" })
            .await;
    let proxy = proxy_to(&backend).await;
    // Four requests at once leave four idle connections in the pool.
    let answers = futures::future::join_all((0..4).map(|_| fetch(&proxy, "GET", ""))).await;
    assert!(answers.iter().all(|answer| answer.0 == 200), "{answers:?}");
    assert_eq!(backend.opened(), 4);
    // The backend closes on this request every time: it goes out on one
    // idle connection and then on one new one, not on every idle one.
    let (status, _) = fetch_at(&proxy, "GET", "/crash", "").await;
    assert_eq!(status, 502);
    assert_eq!(backend.requests(), 4 + 2, "the failing request went out twice, no more");
}

#[tokio::test]
async fn early_hints_during_an_upload_do_not_stop_it() {
    let backend = ScriptedBackend::start(Script::EarlyHintsThenCount).await;
    let proxy = proxy_to(&backend).await;
    // The body comes in two parts, the second well after the backend's 103.
    let parts = Box::pin(futures::stream::iter([b"01234", b"56789"]).then(|part| async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from_static(part)))
    }));
    let request = hyper::Request::post(format!("http://{}/upload", proxy.http))
        .header("host", "foo.toolforge.org")
        .header("user-agent", "t")
        .header("content-length", "10")
        .body(http_body_util::StreamBody::new(parts))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .expect("answer within 10 s")
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"got 10 bytes");
}
