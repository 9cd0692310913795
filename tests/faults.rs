//! Fault injection against the real `dynamicproxy proxy` binary (issue 11,
//! point 5): a backend that dies mid-response, one that never answers, one
//! that answers garbage, a hung Redis and a full access-log disk. Each test
//! ends by showing the proxy still serves a normal request.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dynamicproxy_test_support::{RedisServer, eventually, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(10);

/// `dynamicproxy proxy` on loopback ports, configured from a TOML file; killed on drop.
struct ProxyProcess {
    child: Child,
    http: u16,
    admin: u16,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// Starts the proxy with `[proxy]` keys `extra` added and waits until it
    /// has loaded the route table (so routes seeded before are routable).
    async fn start(redis: &RedisServer, extra: &str) -> ProxyProcess {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("proxy.toml");
        // The test backends listen on loopback, which the default policy refuses.
        std::fs::write(&config, format!("[proxy]\ndenied_backend_networks = []\n{extra}\n")).unwrap();
        let (http, admin) = (free_port(), free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_dynamicproxy"))
            .args(["proxy", "--config", config.to_str().unwrap(), "--redis-url", &redis.url()])
            .args(["--http-listen", &format!("127.0.0.1:{http}")])
            .args(["--list-listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .env_remove("DYNAMICPROXY_REDIS_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dynamicproxy proxy");
        let client = reqwest::Client::builder().user_agent("faults-test/1").build().unwrap();
        let proxy = ProxyProcess { child, http, admin, client, _dir: dir };
        let ready = format!("http://127.0.0.1:{admin}/ready");
        eventually(WAIT, "the proxy is ready", || {
            let request = proxy.client.get(&ready);
            async move { (request.send().await.ok()?.status() == 200).then_some(()) }
        })
        .await;
        proxy
    }

    /// A request for `path` on `<tool>.toolforge.org`.
    fn get(&self, tool: &str, path: &str) -> reqwest::RequestBuilder {
        self.client
            .get(format!("http://127.0.0.1:{}{path}", self.http))
            .header("host", format!("{tool}.toolforge.org"))
            .timeout(Duration::from_secs(30))
    }

    /// GETs and reads the whole body: (status, body).
    async fn fetch(&self, tool: &str, path: &str) -> (u16, String) {
        let response = self.get(tool, path).send().await.expect("response");
        let status = response.status().as_u16();
        (status, response.text().await.expect("whole body"))
    }

    /// `GET /metrics` from the admin listener.
    async fn metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.admin);
        self.client.get(url).send().await.unwrap().text().await.unwrap()
    }

    /// The route cache's age from `GET /server_info`, in seconds.
    async fn cache_age(&self) -> f64 {
        let url = format!("http://127.0.0.1:{}/server_info", self.admin);
        let info: serde_json::Value = self.client.get(url).send().await.unwrap().json().await.unwrap();
        info["route_cache"]["age_seconds"].as_f64().unwrap_or_else(|| panic!("no cache age in {info}"))
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn set_route(redis: &RedisServer, tool: &str, backend: SocketAddr) {
    redis::cmd("HSET")
        .arg(format!("prefix:{tool}"))
        .arg(".*")
        .arg(format!("http://{backend}"))
        .query::<()>(&mut redis.client())
        .unwrap();
}

/// A backend speaking raw TCP: `serve` gets each accepted connection and its
/// number (0, 1, …), so tests can write bytes no HTTP library would.
async fn raw_backend<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream, n));
            n += 1;
        }
    });
    addr
}

/// Reads one request head; `None` once the peer has closed.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// The path of a request head (`GET /path HTTP/1.1`).
fn path_of(head: &str) -> &str {
    head.split(' ').nth(1).unwrap_or("")
}

/// Answers `ok` to every request on a keep-alive connection.
async fn answer_ok(mut stream: TcpStream) {
    while read_head(&mut stream).await.is_some() {
        if !reply_ok(&mut stream).await {
            return;
        }
    }
}

/// Writes one `200 ok` response; false once the peer is gone.
async fn reply_ok(stream: &mut TcpStream) -> bool {
    let reply = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n";
    stream.write_all(reply).await.is_ok()
}

/// A backend process dies while its response is on the wire (a webservice
/// OOM-killed mid-download). Killing a process closes its sockets; here the
/// task that owns the backend's socket drops it at the same point. The client
/// must see the transfer fail (short Content-Length body, or a chunked body
/// without its last chunk) promptly, never a hang, and never a body that looks
/// complete; the next request to the restarted backend succeeds.
#[tokio::test]
async fn backend_killed_mid_response_truncates_the_transfer_and_the_next_request_succeeds() {
    let kill = Arc::new(tokio::sync::Notify::new());
    let k = kill.clone();
    let backend = raw_backend(move |mut stream, _| {
        let kill = k.clone();
        async move {
            let Some(head) = read_head(&mut stream).await else { return };
            let start: &[u8] = match path_of(&head) {
                "/length" => {
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n"
                }
                "/chunked" => {
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                }
                _ => {
                    if reply_ok(&mut stream).await {
                        answer_ok(stream).await;
                    }
                    return;
                }
            };
            let chunked = path_of(&head) == "/chunked";
            let _ = stream.write_all(start).await;
            let part = vec![b'x'; 4096];
            if chunked {
                let _ = stream.write_all(format!("{:x}\r\n", part.len()).as_bytes()).await;
                let _ = stream.write_all(&part).await;
                let _ = stream.write_all(b"\r\n").await;
            } else {
                let _ = stream.write_all(&part).await;
            }
            kill.notified().await;
            drop(stream);
        }
    })
    .await;
    let redis = RedisServer::start();
    set_route(&redis, "dying", backend);
    let proxy = ProxyProcess::start(&redis, "").await;

    for path in ["/length", "/chunked"] {
        let mut response = proxy.get("dying", path).send().await.expect("the response head");
        assert_eq!(response.status(), 200, "{path}");
        let first = response.chunk().await.expect("the first bytes").expect("some body");
        assert!(!first.is_empty(), "{path}");
        kill.notify_one();
        let started = Instant::now();
        let rest = tokio::time::timeout(Duration::from_secs(10), async {
            let mut received = first.len();
            loop {
                match response.chunk().await {
                    Ok(Some(bytes)) => received += bytes.len(),
                    Ok(None) => return Ok(received),
                    Err(e) => return Err((received, e)),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{path}: the client hangs after the backend died"));
        let (received, error) = match rest {
            Ok(received) => panic!("{path}: a truncated body of {received} bytes looked complete"),
            Err(failure) => failure,
        };
        assert_eq!(received, 4096, "{path}: {error}");
        assert!(started.elapsed() < Duration::from_secs(5), "{path}: took {:?}", started.elapsed());
    }
    assert_eq!(proxy.fetch("dying", "/").await, (200, "ok\n".into()));
}

/// A backend that accepts the connection and never answers gets a 504 at
/// `read_timeout_secs`, not a hang; the proxy then serves others normally.
#[tokio::test]
async fn silent_backend_gets_504_at_the_read_timeout() {
    let silent = raw_backend(|mut stream, _| async move {
        // Hold the connection open, read what comes, never answer.
        let mut sink = [0u8; 1024];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
    let fine = raw_backend(|stream, _| answer_ok(stream)).await;
    let redis = RedisServer::start();
    set_route(&redis, "silent", silent);
    set_route(&redis, "fine", fine);
    let proxy = ProxyProcess::start(&redis, "read_timeout_secs = 2").await;

    let started = Instant::now();
    let response = proxy.get("silent", "/").send().await.expect("a response, not a hang");
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 504);
    assert_eq!(response.headers()["x-dynamicproxy-reason"], "backend-timeout");
    assert!(elapsed >= Duration::from_millis(1900) && elapsed < Duration::from_secs(6), "504 after {elapsed:?}");
    assert_eq!(proxy.fetch("fine", "/").await, (200, "ok\n".into()));
}

/// A backend answering bytes that are not HTTP gets the client a 502 page,
/// and the proxy drops that backend connection: the next request reaches the
/// backend on a new connection (a reused one would read the garbage's tail
/// as its own response).
#[tokio::test]
async fn malformed_backend_response_is_a_502_and_its_connection_is_not_reused() {
    const MALFORMED: [&[u8]; 4] = [
        b"this is not http\r\n\r\n",
        b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nno colon here\r\nContent-Length: 0\r\n\r\n",
    ];
    // (path, connection number) of every request the backend read.
    let seen: Arc<Mutex<Vec<(String, usize)>>> = Arc::default();
    let s = seen.clone();
    let backend = raw_backend(move |mut stream, conn| {
        let seen = s.clone();
        async move {
            while let Some(head) = read_head(&mut stream).await {
                let path = path_of(&head).to_owned();
                seen.lock().unwrap().push((path.clone(), conn));
                let reply: Vec<u8> = match path.strip_prefix("/bad/").and_then(|i| i.parse::<usize>().ok()) {
                    Some(i) => MALFORMED[i].to_vec(),
                    None => {
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\nconn={conn}", 5 + conn.to_string().len())
                            .into_bytes()
                    }
                };
                // Keep the connection open after garbage too: closing it is the proxy's job.
                if stream.write_all(&reply).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let redis = RedisServer::start();
    set_route(&redis, "garbled", backend);
    let proxy = ProxyProcess::start(&redis, "").await;

    // Keep-alive to the backend works, so "a new connection" below means something.
    let (first, second) = (proxy.fetch("garbled", "/good").await, proxy.fetch("garbled", "/good").await);
    assert_eq!((first.0, second.0), (200, 200));
    assert_eq!(first.1, second.1, "the proxy reuses an idle backend connection");

    for i in 0..MALFORMED.len() {
        let response = proxy.get("garbled", &format!("/bad/{i}")).send().await.expect("response");
        assert_eq!(response.status(), 502, "malformed #{i}");
        assert_eq!(response.headers()["x-dynamicproxy-reason"], "backend-unreachable", "malformed #{i}");
        let page = response.text().await.unwrap();
        assert!(page.contains("garbled"), "the page names the tool: {page}");
        let (status, body) = proxy.fetch("garbled", "/good").await;
        assert_eq!(status, 200, "after malformed #{i}");
        let seen = seen.lock().unwrap().clone();
        let bad_conn = seen.iter().rev().find(|(p, _)| p.starts_with("/bad/")).map(|(_, c)| *c).unwrap();
        let (_, good_conn) = seen.last().unwrap();
        assert_ne!(*good_conn, bad_conn, "malformed #{i}: the connection was reused; backend saw {seen:?}");
        assert_eq!(body, format!("conn={good_conn}"));
    }
}

/// The process id of a `redis-server`, from `INFO server`.
fn redis_pid(redis: &RedisServer) -> String {
    let info: String = redis::cmd("INFO").arg("server").query(&mut redis.client()).unwrap();
    info.lines().find_map(|l| l.strip_prefix("process_id:")).unwrap().trim().to_owned()
}

fn signal(pid: &str, sig: &str) {
    assert!(Command::new("kill").args([sig, pid]).status().unwrap().success(), "kill {sig} {pid}");
}

/// Resumes a SIGSTOPped process even when the test fails half-way.
struct Continue(String);

impl Drop for Continue {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0]).status();
    }
}

/// Redis hung (SIGSTOP) for 30 s, the figure: the TCP connection
/// stays up but nothing answers. Requests are served from the cache as fast
/// as before, the cache's age in `/server_info` grows, and after SIGCONT a
/// route written to Redis is routable and the age is fresh again.
#[tokio::test]
async fn redis_stopped_for_30_s_serving_goes_on_and_resumes() {
    let backend = raw_backend(|stream, _| answer_ok(stream)).await;
    let redis = RedisServer::start();
    set_route(&redis, "steady", backend);
    let proxy = ProxyProcess::start(&redis, "").await;

    let mut before = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(proxy.fetch("steady", "/").await, (200, "ok\n".into()));
        before.push(started.elapsed());
    }

    let pid = redis_pid(&redis);
    signal(&pid, "-STOP");
    let resume = Continue(pid);
    let stopped = Instant::now();
    let mut during = Vec::new();
    while stopped.elapsed() < Duration::from_secs(30) {
        let started = Instant::now();
        assert_eq!(proxy.fetch("steady", "/").await, (200, "ok\n".into()), "after {:?}", stopped.elapsed());
        during.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let age = proxy.cache_age().await;
    drop(resume);

    before.sort();
    during.sort();
    let median = |v: &[Duration]| v[v.len() / 2];
    let slowest = *during.last().unwrap();
    let report = format!(
        "median before {:?}, during {:?}; slowest before {:?}, during {slowest:?}; {} requests during",
        median(&before),
        median(&during),
        before.last().unwrap(),
        during.len()
    );
    assert!(slowest < Duration::from_secs(1), "a request waited on Redis: {report}");
    assert!(median(&during) <= median(&before) * 2 + Duration::from_millis(20), "slower than usual: {report}");
    assert!(age >= 25.0, "the cache age did not grow while Redis was stopped: {age} s");

    let later = raw_backend(|stream, _| answer_ok(stream)).await;
    set_route(&redis, "after", later);
    eventually(WAIT, "a route written after SIGCONT is routable", || {
        let request = proxy.get("after", "/");
        async move { (request.send().await.ok()?.status() == 200).then_some(()) }
    })
    .await;
    eventually(WAIT, "the cache age is fresh again", || async { (proxy.cache_age().await < 5.0).then_some(()) }).await;
    assert_eq!(proxy.fetch("steady", "/").await, (200, "ok\n".into()));
}

/// A tmpfs of `size` mounted on a fresh directory; unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` when this process may not mount (not root, or no CAP_SYS_ADMIN).
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?.keep();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        Some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The value of the lost access-log lines counter in a Prometheus scrape.
fn lost_lines(metrics: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with("dynamicproxy_proxy_access_log_lost_lines_total "))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no lost-lines counter in the scrape:\n{metrics}"))
}

/// The access log's disk fills up while requests are proxied: every request
/// still gets its answer, the lines that could not be written are counted in
/// `/metrics`, and once space is freed lines are written again. On a real
/// small tmpfs when the test may mount one (root); otherwise on `/dev/full`,
/// which fails every write with ENOSPC the same way, without the recovery.
/// (`proxy/tests/access_log.rs` counts lost lines in-process on `/dev/full`.)
#[tokio::test]
async fn access_log_disk_full_requests_go_on_and_lost_lines_are_counted() {
    let backend = raw_backend(|stream, _| answer_ok(stream)).await;
    let redis = RedisServer::start();
    set_route(&redis, "logged", backend);
    // Larger than the 200 lines below, so freeing the filler leaves room for all of them.
    let tmpfs = Tmpfs::mount("256k");
    let log = tmpfs.as_ref().map_or_else(|| PathBuf::from("/dev/full"), |t| t.0.join("access.log"));
    let filler = tmpfs.as_ref().map(|t| t.0.join("filler"));
    let proxy = ProxyProcess::start(&redis, &format!("access_log = {:?}", log.display().to_string())).await;

    if let Some(filler) = &filler {
        // The disk fills up behind the proxy's back (another writer).
        assert_eq!(proxy.fetch("logged", "/before-full").await.0, 200);
        eventually(WAIT, "the first line written", || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            async move { text.contains("/before-full").then_some(()) }
        })
        .await;
        fill(filler);
    }
    for i in 0..200 {
        assert_eq!(proxy.fetch("logged", &format!("/while-full/{i}")).await, (200, "ok\n".into()));
    }
    // Every line is either written (tmpfs pages have slack) or counted lost; waiting for all
    // 200 keeps a batch still queued from landing after the space is freed and filling it again.
    let lost = eventually(WAIT, "every line written or counted lost", || async {
        let lost = lost_lines(&proxy.metrics().await);
        // Reading /dev/full would never end; nothing lands there.
        let written = match &tmpfs {
            Some(_) => std::fs::read_to_string(&log).unwrap_or_default().matches("/while-full/").count() as u64,
            None => 200,
        };
        (lost > 0 && lost + written >= 200).then_some(lost)
    })
    .await;
    assert!(lost <= 200, "{lost} lost lines for 200 requests");

    if let Some(filler) = &filler {
        std::fs::remove_file(filler).unwrap();
        eventually(WAIT, "lines written again once space is freed", || async {
            assert_eq!(proxy.fetch("logged", "/after-free").await.0, 200);
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains("/after-free").then_some(())
        })
        .await;
    }
    assert_eq!(proxy.fetch("logged", "/").await, (200, "ok\n".into()));
}

/// Writes to `path` until the filesystem is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let block = [0u8; 1024];
    while file.write_all(&block).and_then(|()| file.flush()).is_ok() {}
}
