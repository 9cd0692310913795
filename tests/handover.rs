//! Replacing a running proxy under load through `[proxy] handover_socket`:
//! the real binary (and a copy of it at another path, as after a package
//! upgrade), real Redis, real backends, and a strict HTTP/1.1 client that
//! counts every failed request and every reset.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dynamicproxy_test_support::{RedisServer, eventually, free_port};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const WAIT: Duration = Duration::from_secs(20);
/// Keep-alive connections held open through the replacement.
const KEEPALIVE_CLIENTS: usize = 64;
/// Clients opening a new connection for every request.
const NEW_CONNECTION_CLIENTS: usize = 4;
/// How long the slow tool takes to answer.
const SLOW: Duration = Duration::from_secs(5);

/// A running proxy process, killed on drop; its log goes to a file.
struct Proxy {
    child: Child,
    log: PathBuf,
}

impl Proxy {
    fn start(binary: &Path, args: &[String], log: PathBuf) -> Self {
        Self::start_with_env(binary, args, log, &[])
    }

    fn start_with_env(binary: &Path, args: &[String], log: PathBuf, env: &[(&str, &Path)]) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(binary)
            .args(args)
            .envs(env.iter().copied())
            .env_remove("DYNAMICPROXY_REDIS_URL")
            // The test backends listen on loopback, which the proxy refuses by default.
            .env("DYNAMICPROXY_PROXY_DENIED_BACKEND_NETWORKS", "[]")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .expect("start dynamicproxy");
        Proxy { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn exited(&mut self) -> Option<i32> {
        self.child.try_wait().unwrap().map(|status| status.code().unwrap_or(-1))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the load generator saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    resets: AtomicU64,
    stop: AtomicBool,
}

impl Tally {
    fn count(&self, result: &Result<Answer, std::io::Error>) {
        match result {
            Ok(answer) if answer.status == 200 && answer.body == "ok" => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(answer) => {
                eprintln!("unexpected answer: {} {:?}", answer.status, answer.body);
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                eprintln!("request failed: {error}");
                if error.kind() == std::io::ErrorKind::ConnectionReset {
                    self.resets.fetch_add(1, Ordering::Relaxed);
                }
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

struct Answer {
    status: u16,
    body: String,
    close: bool,
}

/// One HTTP/1.1 request on `conn`, read strictly: an early close, a reset or
/// a missing Content-Length is an error, never retried.
async fn request(conn: &mut BufReader<TcpStream>, host: &str, path: &str) -> Result<Answer, std::io::Error> {
    let head = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: handover-test\r\n\r\n");
    conn.get_mut().write_all(head.as_bytes()).await?;
    let mut status_line = String::new();
    if conn.read_line(&mut status_line).await? == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before the response"));
    }
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (mut length, mut close) = (None, false);
    loop {
        let mut line = String::new();
        if conn.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed in the response head"));
        }
        let line = line.trim_end().to_ascii_lowercase();
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.strip_prefix("content-length:") {
            length = v.trim().parse::<usize>().ok();
        }
        close |= line == "connection: close";
    }
    let length = length.ok_or_else(|| std::io::Error::other("response without Content-Length"))?;
    let mut body = vec![0; length];
    conn.read_exact(&mut body).await?;
    Ok(Answer { status, body: String::from_utf8_lossy(&body).into_owned(), close })
}

async fn connect(port: u16) -> Result<BufReader<TcpStream>, std::io::Error> {
    Ok(BufReader::new(TcpStream::connect(("127.0.0.1", port)).await?))
}

/// Requests on one connection for as long as the server keeps it open
/// (`Connection: close` → a new one), until the load stops.
async fn keepalive_client(port: u16, tally: Arc<Tally>) {
    let mut conn = None;
    while !tally.stop.load(Ordering::Relaxed) {
        let result = match conn.as_mut() {
            Some(c) => tokio::time::timeout(WAIT, request(c, "demo.toolforge.org", "/"))
                .await
                .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"))),
            None => match connect(port).await {
                Ok(c) => {
                    conn = Some(c);
                    continue;
                }
                Err(e) => Err(e),
            },
        };
        if result.as_ref().map_or(true, |a| a.close) {
            conn = None;
        }
        tally.count(&result);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A new connection for every request, until the load stops.
async fn new_connection_client(port: u16, tally: Arc<Tally>) {
    while !tally.stop.load(Ordering::Relaxed) {
        let result = tokio::time::timeout(WAIT, async {
            let mut conn = connect(port).await?;
            request(&mut conn, "demo.toolforge.org", "/").await
        })
        .await
        .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time")));
        tally.count(&result);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The tools' backends: `/` answers at once, `/slow` after [`SLOW`]; and a WebSocket echo.
async fn backends() -> (u16, u16) {
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_port = http.local_addr().unwrap().port();
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" })).route(
        "/slow",
        axum::routing::get(|| async {
            tokio::time::sleep(SLOW).await;
            "slow done"
        }),
    );
    tokio::spawn(async move { axum::serve(http, app).await });
    let ws = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_port = ws.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = ws.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else { return };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (http_port, ws_port)
}

/// Routes the tools `demo` and `ws` to `backend` and `ws_backend`.
fn add_routes(redis: &RedisServer, backend: u16, ws_backend: u16) {
    let mut r = redis.client();
    for (tool, port) in [("demo", backend), ("ws", ws_backend)] {
        let _: () = redis::cmd("HSET")
            .arg(format!("prefix:{tool}"))
            .arg(".*")
            .arg(format!("http://127.0.0.1:{port}"))
            .query(&mut r)
            .unwrap();
    }
}

/// `dynamicproxy proxy` on loopback with its hand-over socket in `dir` and a 15 s grace.
fn proxy_args(redis: &RedisServer, http: u16, dir: &Path) -> Vec<String> {
    let mut args = vec!["proxy".to_string(), "--redis-url".into(), redis.url()];
    for (flag, port) in [("--http-listen", http), ("--list-listen", free_port()), ("--admin-listen", free_port())] {
        args.extend([flag.to_string(), format!("127.0.0.1:{port}")]);
    }
    args.extend(["--handover-socket".to_string(), dir.join("handover.sock").display().to_string()]);
    args.extend(["--shutdown-grace-secs".to_string(), "15".into()]);
    args
}

async fn serves_demo(http: u16) -> Option<()> {
    let mut conn = connect(http).await.ok()?;
    request(&mut conn, "demo.toolforge.org", "/").await.ok().filter(|a| a.status == 200 && a.body == "ok").map(|_| ())
}

/// Starts a proxy from `first`, puts it under load with a slow request and a
/// WebSocket open, replaces it by each binary of `successors` in turn, and
/// checks that nothing failed.
async fn replace_under_load(first: &Path, successors: &[&Path]) {
    let redis = RedisServer::start();
    let (backend, ws_backend) = backends().await;
    add_routes(&redis, backend, ws_backend);
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let args = proxy_args(&redis, http, dir.path());

    let mut old = Proxy::start(first, &args, dir.path().join("proxy-0.log"));
    eventually(WAIT, "the first proxy serves the tool", || serves_demo(http)).await;

    let tally = Arc::new(Tally::default());
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..KEEPALIVE_CLIENTS {
        load.spawn(keepalive_client(http, tally.clone()));
    }
    for _ in 0..NEW_CONNECTION_CLIENTS {
        load.spawn(new_connection_client(http, tally.clone()));
    }

    for (n, binary) in successors.iter().enumerate() {
        // Started on the process about to be replaced: a slow response and a WebSocket.
        let slow = tokio::spawn(async move {
            let mut conn = connect(http).await?;
            request(&mut conn, "demo.toolforge.org", "/slow").await
        });
        let mut ws_request = "ws://ws.toolforge.org/".into_client_request().unwrap();
        ws_request.headers_mut().insert("user-agent", "handover-test".parse().unwrap());
        let (mut ws, _) =
            tokio_tungstenite::client_async(ws_request, TcpStream::connect(("127.0.0.1", http)).await.unwrap())
                .await
                .expect("WebSocket through the proxy");
        ws.send(Message::text("before")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("before"));
        // An idle keep-alive connection whose client sends again only after the hand-over.
        let mut idle = connect(http).await.unwrap();
        let first = request(&mut idle, "demo.toolforge.org", "/").await.unwrap();
        assert!(first.status == 200 && !first.close);
        let before = tally.ok.load(Ordering::Relaxed);
        eventually(WAIT, "load flowing", || async { (tally.ok.load(Ordering::Relaxed) > before + 200).then_some(()) })
            .await;

        let mut new = Proxy::start(binary, &args, dir.path().join(format!("proxy-{}.log", n + 1)));
        eventually(WAIT, "the successor took the listeners over", || async {
            new.log().contains("listeners taken over").then_some(())
        })
        .await;
        eventually(WAIT, "the old process drains", || async {
            old.log().contains("listeners handed over; draining").then_some(())
        })
        .await;

        // The idle connection was not closed under its client: the old process answers, and says close.
        let late = request(&mut idle, "demo.toolforge.org", "/").await.expect("idle keep-alive connection still open");
        assert_eq!((late.status, late.body.as_str(), late.close), (200, "ok", true));
        drop(idle);

        // The WebSocket still works on the draining process, and keeps it alive.
        ws.send(Message::text("after")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("after"));
        assert_eq!(old.exited(), None, "the old process left while a WebSocket was open");
        let slow = slow.await.unwrap().expect("the slow response completes");
        assert_eq!((slow.status, slow.body.as_str()), (200, "slow done"));
        ws.close(None).await.unwrap();
        drop(ws);

        let old_exit = std::sync::Mutex::new(&mut old);
        // Well before the end of the grace (15 s): nothing is left open on it.
        let code = eventually(Duration::from_secs(8), "the old process exits once drained", || async {
            old_exit.lock().unwrap().exited()
        })
        .await;
        assert_eq!(code, 0, "{}", old.log());
        assert_eq!(new.exited(), None, "{}", new.log());
        // The successor now serves everything, new connections and reconnected keep-alive clients alike.
        let after = tally.ok.load(Ordering::Relaxed);
        eventually(WAIT, "load served by the successor", || async {
            (tally.ok.load(Ordering::Relaxed) > after + 500).then_some(())
        })
        .await;
        old = new;
    }

    tally.stop.store(true, Ordering::Relaxed);
    while load.join_next().await.is_some() {}
    let (ok, failed, resets) =
        (tally.ok.load(Ordering::Relaxed), tally.failed.load(Ordering::Relaxed), tally.resets.load(Ordering::Relaxed));
    eprintln!("requests answered: {ok}, failed: {failed}, resets: {resets}");
    if std::env::var_os("HANDOVER_TEST_LOGS").is_some() {
        for n in 0..=successors.len() {
            eprintln!(
                "--- proxy-{n}.log\n{}",
                std::fs::read_to_string(dir.path().join(format!("proxy-{n}.log"))).unwrap_or_default()
            );
        }
    }
    assert_eq!((failed, resets), (0, 0), "failed requests or resets during the hand-over; answered: {ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_hands_the_listeners_over_without_a_failed_request() {
    let binary = Path::new(env!("CARGO_BIN_EXE_dynamicproxy"));
    // Twice: the successor listens for its own successor.
    replace_under_load(binary, &[binary, binary]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_to_a_binary_at_another_path_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let upgraded = dir.path().join("dynamicproxy-upgraded");
    std::fs::copy(env!("CARGO_BIN_EXE_dynamicproxy"), &upgraded).unwrap();
    replace_under_load(Path::new(env!("CARGO_BIN_EXE_dynamicproxy")), &[&upgraded]).await;
}

/// Kills a process that is not this test's child (a successor started by the proxy) on drop.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-KILL", &self.0.to_string()]).status();
    }
}

/// The `MAINPID=` of the next message on systemd's notification socket.
async fn next_main_pid(notify: &tokio::net::UnixDatagram) -> u32 {
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(WAIT, notify.recv(&mut buf)).await.expect("a notification").unwrap();
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(message.lines().any(|l| l == "READY=1"), "{message}");
    message.lines().find_map(|l| l.strip_prefix("MAINPID=")).and_then(|p| p.parse().ok()).expect("MAINPID=")
}

#[tokio::test]
async fn sigusr2_starts_a_successor_that_systemd_is_told_to_follow() {
    let redis = RedisServer::start();
    let (backend, ws_backend) = backends().await;
    add_routes(&redis, backend, ws_backend);
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let notify_path = dir.path().join("notify");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).unwrap();

    let binary = Path::new(env!("CARGO_BIN_EXE_dynamicproxy"));
    let args = proxy_args(&redis, http, dir.path());
    let mut old =
        Proxy::start_with_env(binary, &args, dir.path().join("proxy.log"), &[("NOTIFY_SOCKET", &notify_path)]);
    assert_eq!(next_main_pid(&notify).await, old.child.id());
    eventually(WAIT, "the proxy serves the tool", || serves_demo(http)).await;

    // What `systemctl kill --kill-whom=main -s SIGUSR2 dynamicproxy-proxy` does.
    let status = Command::new("kill").args(["-USR2", &old.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let successor = next_main_pid(&notify).await;
    let _successor = KillOnDrop(successor);
    assert_ne!(successor, old.child.id());

    let old_exit = std::sync::Mutex::new(&mut old);
    let code = eventually(WAIT, "the old process exits", || async { old_exit.lock().unwrap().exited() }).await;
    assert_eq!(code, 0, "{}", old.log());
    assert!(old.log().contains(&format!("successor.pid={successor}")), "{}", old.log());
    eventually(WAIT, "the successor serves the tool", || serves_demo(http)).await;
}
