//! Production edge rules over plain HTTP: protection, maintenance, pages,
//! response policy, gzip, host redirects, slow clients.

mod common;

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use dynamicproxy_proxy::Config;
use dynamicproxy_test_support::RedisServer;
use http_body_util::Full;
use hyper::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn with_backend(config: Config) -> (Backend, Proxy) {
    let backend = Backend::echo("b").await;
    let proxy = Proxy::start(config).await;
    proxy.set_route("foo", ".*", &backend.url()).await;
    (backend, proxy)
}

#[tokio::test]
async fn banned_ipv4_gets_banned_page() {
    let (backend, proxy) = with_backend(Config { banned_cidrs: vec!["127.0.0.0/8".into()], ..Config::default() }).await;
    let got = get(proxy.http, "foo.toolforge.org", "/", &[]).await;
    assert_eq!(got.status, 403);
    assert!(got.body.contains("Banned"), "{}", got.body);
    // Health checks are answered before any rule.
    assert_eq!(get(proxy.http, "foo.toolforge.org", "/.well-known/healthz", &[]).await.status, 200);
    assert_eq!(backend.hits(), 0);
}

#[tokio::test]
async fn banned_ipv6_gets_banned_page_and_other_v6_passes() {
    let backend = Backend::echo("b").await;
    let banned = Proxy::start_on(
        "[::1]:0",
        RedisServer::start(),
        Config { banned_cidrs: vec!["::1/128".into()], ..Config::default() },
        |_| {},
    )
    .await;
    banned.set_route("foo", ".*", &backend.url()).await;
    let got = get(banned.http, "foo.toolforge.org", "/", &[]).await;
    assert_eq!(got.status, 403);
    assert!(got.body.contains("Banned"));

    let other = Proxy::start_on(
        "[::1]:0",
        RedisServer::start(),
        Config { banned_cidrs: vec!["2001:db8::/32".into(), "10.0.0.0/8".into()], ..Config::default() },
        |_| {},
    )
    .await;
    other.set_route("foo", ".*", &backend.url()).await;
    let got = get(other.http, "foo.toolforge.org", "/", &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.echoed("x-forwarded-for"), Some("::1"));
}

#[tokio::test]
async fn user_agent_and_referer_rules() {
    let (backend, proxy) = with_backend(Config {
        blocked_user_agents: vec!["^evilbot".into()],
        blocked_referers: vec!["spam\\.example".into()],
        ..Config::default()
    })
    .await;
    let got = get(proxy.http, "foo.toolforge.org", "/", &[("user-agent", "")]).await;
    assert_eq!((got.status, got.body.as_str()), (403, "Requests must have a user agent"));
    let raw = raw(proxy.http, b"GET / HTTP/1.0\r\nHost: foo.toolforge.org\r\n\r\n").await;
    assert_eq!(status_of(&raw), 403, "missing User-Agent: {raw}");
    assert!(raw.ends_with("Requests must have a user agent"));
    assert_eq!(get(proxy.http, "foo.toolforge.org", "/", &[("user-agent", "EvilBot/2")]).await.status, 403);
    assert_eq!(
        get(proxy.http, "foo.toolforge.org", "/", &[("referer", "https://www.SPAM.example/x")]).await.status,
        403
    );
    assert_eq!(backend.hits(), 0);
    assert_eq!(get(proxy.http, "foo.toolforge.org", "/", &[("user-agent", "nice/1 evilbot")]).await.status, 200);
}

#[tokio::test]
async fn rate_limit_starts_at_the_configured_burst() {
    let (_backend, proxy) =
        with_backend(Config { rate_limit_per_second: 1, rate_limit_burst: 5, ..Config::default() }).await;
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(get(proxy.http, "foo.toolforge.org", "/", &[]).await.status);
    }
    // 1 at the rate + 5 of burst, then 429s (requests sent within well under a second).
    assert_eq!(&statuses[..6], &[200; 6], "{statuses:?}");
    assert!(statuses[6..].iter().all(|s| *s == 429), "{statuses:?}");
    let got = get(proxy.http, "foo.toolforge.org", "/", &[]).await;
    assert!(got.body.contains("Too many requests"), "{}", got.body);
}

#[tokio::test]
async fn maintenance_from_config_and_handle() {
    let (backend, proxy) = with_backend(Config { maintenance: true, ..Config::default() }).await;
    let got = get(proxy.http, "foo.toolforge.org", "/", &[]).await;
    assert_eq!(got.status, 503);
    assert!(got.body.contains("Technical issues"), "{}", got.body);
    assert_eq!(get(proxy.http, "x", "/.well-known/healthz", &[]).await.status, 200);
    proxy.handle.set_maintenance(false);
    assert_eq!(get(proxy.http, "foo.toolforge.org", "/", &[]).await.status, 200);
    proxy.handle.set_maintenance(true);
    assert_eq!(get(proxy.http, "foo.toolforge.org", "/", &[]).await.status, 503);
    assert_eq!(backend.hits(), 1);
}

#[tokio::test]
async fn error_pages_directory_overrides_builtins() {
    let dir = std::env::temp_dir().join(format!("proxy-pages-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (file, text) in [
        ("nowebservice.html", "custom no webservice"),
        ("unreachable.html", "custom unreachable"),
        ("technicalissues.html", "custom maintenance"),
        ("robots.txt", "custom robots"),
    ] {
        std::fs::write(dir.join(file), text).unwrap();
    }
    let proxy = Proxy::start(Config { error_pages: Some(dir.clone()), ..Config::default() }).await;
    let got = get(proxy.http, "none.toolforge.org", "/", &[]).await;
    assert_eq!((got.status, got.body.as_str()), (503, "custom no webservice"));
    proxy.set_route("down", ".*", "http://127.0.0.1:1").await;
    let got = get(proxy.http, "down.toolforge.org", "/", &[]).await;
    assert_eq!((got.status, got.body.as_str()), (502, "custom unreachable"));
    // Not overridden: built-in.
    proxy.handle.set_maintenance(true);
    assert_eq!(get(proxy.http, "x.toolforge.org", "/", &[]).await.body, "custom maintenance");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn extra_headers_replace_backend_copies() {
    let backend = Backend::start(Arc::new(|_req| {
        Box::pin(async move {
            Response::builder()
                .header("x-clacks-overhead", "backend value")
                .header("permissions-policy", "camera=()")
                .header("x-own", "kept")
                .body(Full::new(Bytes::from("hi")))
                .unwrap()
        })
    }))
    .await;
    let proxy = Proxy::start(Config::default()).await;
    proxy.set_route("foo", ".*", &backend.url()).await;
    let got = get(proxy.http, "foo.toolforge.org", "/", &[]).await;
    assert_eq!(got.headers.get_all("x-clacks-overhead").iter().collect::<Vec<_>>(), ["GNU Terry Pratchett"]);
    assert_eq!(got.headers.get_all("permissions-policy").iter().collect::<Vec<_>>(), ["browsing-topics=()"]);
    assert!(got.header("content-security-policy-report-only").unwrap().contains("report-uri"));
    assert_eq!(got.header("x-own"), Some("kept"));
    assert_eq!(got.header("strict-transport-security"), None, "no HSTS over plain HTTP");
    // The proxy's own answers carry them too, once.
    let page = get(proxy.http, "nothing-here.toolforge.org", "/", &[]).await;
    assert_eq!(page.status, 503);
    assert_eq!(page.headers.get_all("x-clacks-overhead").iter().collect::<Vec<_>>(), ["GNU Terry Pratchett"]);
    assert_eq!(page.headers.get_all("permissions-policy").iter().collect::<Vec<_>>(), ["browsing-topics=()"]);
    assert_eq!(page.headers.get_all("x-request-id").iter().count(), 1);
    // So do the answers hyper writes itself, for a head it cannot parse.
    let malformed = raw(proxy.http, b"GET / HTTP/1.1\r\nHost: foo.toolforge.org\r\nno colon here\r\n\r\n").await;
    assert_eq!(status_of(&malformed), 400, "{malformed}");
    assert_eq!(malformed.matches("x-clacks-overhead: GNU Terry Pratchett\r\n").count(), 1, "{malformed}");
}

#[tokio::test]
async fn gzip_only_for_text_when_accepted_and_not_already_encoded() {
    let page = "<html>".to_string() + &"hello world ".repeat(500) + "</html>";
    let body = Bytes::from(page.clone());
    let backend = Backend::start(Arc::new(move |req| {
        let body = body.clone();
        Box::pin(async move {
            let (ct, enc) = match req.uri().path() {
                "/html" => ("text/html; charset=utf-8", None),
                "/json" => ("application/json", None),
                "/png" => ("image/png", None),
                _ => ("text/html", Some("br")),
            };
            let mut r = Response::builder().header("content-type", ct);
            if let Some(enc) = enc {
                r = r.header("content-encoding", enc);
            }
            r.body(Full::new(body)).unwrap()
        })
    }))
    .await;
    let proxy = Proxy::start(Config::default()).await;
    proxy.set_route("foo", ".*", &backend.url()).await;
    let gz = [("accept-encoding", "gzip, deflate")];

    for path in ["/html", "/json"] {
        let response = raw_bytes(proxy.http, path, true).await;
        assert_eq!(response.0.get("content-encoding").map(String::as_str), Some("gzip"), "{path}");
        let mut decoded = String::new();
        flate2::read::GzDecoder::new(&response.1[..]).read_to_string(&mut decoded).unwrap();
        assert_eq!(decoded, page, "{path}");
        assert!(response.1.len() < page.len() / 5);
    }
    let got = get(proxy.http, "foo.toolforge.org", "/html", &[]).await;
    assert_eq!((got.header("content-encoding"), got.body.len()), (None, page.len()), "client did not ask");
    let got = get(proxy.http, "foo.toolforge.org", "/png", &gz).await;
    assert_eq!(got.header("content-encoding"), None, "not a text type");
    let got = get(proxy.http, "foo.toolforge.org", "/br", &gz).await;
    assert_eq!(got.header("content-encoding"), Some("br"), "backend's encoding untouched");
    assert_eq!(got.body.len(), page.len());
}

#[tokio::test]
async fn vary_accept_encoding_on_every_compressible_response_compressed_or_not() {
    let page = Bytes::from("<p>".to_string() + &"hello world ".repeat(100));
    let backend = Backend::start(Arc::new(move |req| {
        let body = page.clone();
        Box::pin(async move {
            let mut r = Response::builder();
            r = match req.uri().path() {
                "/png" => r.header("content-type", "image/png"),
                "/small" => r.header("content-type", "text/css"),
                "/cookie" => r.header("content-type", "text/html").header("vary", "Cookie"),
                "/already" => r.header("content-type", "text/html").header("vary", "accept-encoding"),
                _ => r.header("content-type", "text/html; charset=utf-8"),
            };
            let body = if req.uri().path() == "/small" { Bytes::from_static(b"a{}") } else { body };
            r.body(Full::new(body)).unwrap()
        })
    }))
    .await;
    let proxy = Proxy::start(Config::default()).await;
    proxy.set_route("foo", ".*", &backend.url()).await;
    let vary =
        |got: &Got| got.headers.get_all("vary").iter().map(|v| v.to_str().unwrap().to_string()).collect::<Vec<_>>();
    let gz = [("accept-encoding", "gzip")];

    // Gzipped for a client that accepts it, plain for one that does not: both say so.
    let got = get(proxy.http, "foo.toolforge.org", "/html", &gz).await;
    assert_eq!((got.header("content-encoding"), vary(&got)), (Some("gzip"), vec!["Accept-Encoding".to_string()]));
    let got = get(proxy.http, "foo.toolforge.org", "/html", &[]).await;
    assert_eq!((got.header("content-encoding"), vary(&got)), (None, vec!["Accept-Encoding".to_string()]));
    // A compressible type left plain because it is small still varies.
    let got = get(proxy.http, "foo.toolforge.org", "/small", &gz).await;
    assert_eq!((got.header("content-encoding"), vary(&got)), (None, vec!["Accept-Encoding".to_string()]));
    // The backend's own Vary is kept, and Accept-Encoding is not repeated.
    let got = get(proxy.http, "foo.toolforge.org", "/cookie", &[]).await;
    assert_eq!(vary(&got), ["Cookie", "Accept-Encoding"]);
    let got = get(proxy.http, "foo.toolforge.org", "/already", &gz).await;
    assert_eq!((got.header("content-encoding"), vary(&got)), (Some("gzip"), vec!["accept-encoding".to_string()]));
    // Types the proxy never compresses do not vary on it.
    let got = get(proxy.http, "foo.toolforge.org", "/png", &gz).await;
    assert!(vary(&got).is_empty(), "{:?}", vary(&got));
}

/// GET through the proxy, returning lower-cased headers and the raw body bytes.
async fn raw_bytes(
    addr: std::net::SocketAddr,
    path: &str,
    gzip: bool,
) -> (std::collections::HashMap<String, String>, Vec<u8>) {
    use http_body_util::BodyExt;
    let mut req = hyper::Request::get(format!("http://{addr}{path}"))
        .header("host", "foo.toolforge.org")
        .header("user-agent", "t");
    if gzip {
        req = req.header("accept-encoding", "gzip");
    }
    let response = client().request(req.body(Full::new(Bytes::new())).unwrap()).await.unwrap();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    (headers, response.into_body().collect().await.unwrap().to_bytes().to_vec())
}

#[tokio::test]
async fn host_redirect_rules() {
    let (backend, proxy) = with_backend(Config::default()).await;
    let got = get(proxy.http, "ru_monuments.toolforge.org", "/a/b?c=d", &[]).await;
    assert_eq!((got.status, got.header("location")), (301, Some("http://ru-monuments.toolforge.org/a/b?c=d")));
    let got = get(proxy.http, "ru_monuments.example.org", "/", &[]).await;
    assert_eq!((got.status, got.header("location")), (301, Some("http://ru-monuments.example.org/")));
    assert_eq!(backend.hits(), 0);
}

#[tokio::test]
async fn slowloris_is_cut_off_while_others_are_served() {
    let (_backend, proxy) = with_backend(Config { header_timeout_secs: 2, ..Config::default() }).await;
    let addr = proxy.http;
    let slow = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = b"GET / HTTP/1.1\r\nHost: foo.toolforge.org\r\nUser-Agent: slow\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        let started = std::time::Instant::now();
        for byte in head.iter() {
            if stream.write_all(&[*byte]).await.is_err() {
                return (started.elapsed(), true);
            }
            let mut buf = [0u8; 512];
            // A closed connection shows as EOF (or the 408 hyper may write first).
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await {
                let _ = n;
                return (started.elapsed(), true);
            }
        }
        (started.elapsed(), false)
    });
    // Meanwhile a normal client is served.
    for _ in 0..3 {
        assert_eq!(get(addr, "foo.toolforge.org", "/", &[]).await.status, 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (elapsed, cut) = slow.await.unwrap();
    assert!(cut, "the slow client was never cut off (sent the whole head in {elapsed:?})");
    eprintln!("slow client cut off after {elapsed:?}");
}
