//! The benchmark's fast backend: `200 ok\n` for everything, HTTP/1.1 keep-alive.
//! `bench_backend 127.0.0.1:9000 [threads] [body bytes]` (a body size other than
//! the default answers that many bytes instead, for slow-reader runs).

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9000".into());
    let threads: usize = args.next().and_then(|t| t.parse().ok()).unwrap_or(1);
    // A large body is binary, so that the proxy never gzips it.
    let (body, content_type) = match args.next().and_then(|b| b.parse::<usize>().ok()) {
        Some(size) => (Bytes::from(vec![b'x'; size]), "application/octet-stream"),
        None => (Bytes::from_static(b"ok\n"), "text/plain"),
    };
    tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            let body = body.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        let mut r = Response::new(Full::new(body));
                        r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static(content_type));
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    })
}
