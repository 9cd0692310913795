//! Redis Sentinel failover under load, end to end: a master, a replica and
//! three Sentinels; `dynamicproxy all` (proxy, registrar, kube-sync) on the
//! `redis+sentinel://` URL; a load generator on the proxy; then the master
//! is killed (SIGKILL) or hung (SIGSTOP).

#[path = "../kube-sync/tests/fake_apiserver/mod.rs"]
mod fake_apiserver;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dynamicproxy_test_support::{SentinelGroup, eventually, free_port};
use fake_apiserver::{FakeApiServer, service};
use redis::Commands;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);
/// The promise: the registrar answers `ok`, and a new route is served, this
/// soon after Sentinel promoted the replica.
const AFTER_PROMOTION: Duration = Duration::from_secs(1);

/// A running `dynamicproxy`, logging to a file; killed on drop.
struct Daemon {
    child: Child,
    log: std::path::PathBuf,
}

impl Daemon {
    fn start(args: &[String], log: std::path::PathBuf) -> Self {
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_dynamicproxy"))
            .args(args)
            .env_remove("DYNAMICPROXY_REDIS_URL")
            // Test backends and registrations are on loopback, which is refused by default.
            .env("DYNAMICPROXY_PROXY_DENIED_BACKEND_NETWORKS", "[]")
            .env("DYNAMICPROXY_REGISTRAR_DENIED_DESTINATION_NETWORKS", "[]")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start dynamicproxy");
        Daemon { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A backend answering every request with `body`; returns its port.
async fn backend(body: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let app = axum::Router::new().fallback(move || async move { body });
        axum::serve(listener, app).await.unwrap();
    });
    port
}

/// An ident (RFC 1413) server naming the user registered for each client port in `users`.
async fn ident_server(users: Arc<Mutex<HashMap<u16, String>>>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let users = users.clone();
            tokio::spawn(async move {
                let mut socket = BufReader::new(socket);
                let mut query = String::new();
                if socket.read_line(&mut query).await.is_err() {
                    return;
                }
                let query = query.trim().to_string();
                let client_port = query.split(',').next().and_then(|p| p.trim().parse::<u16>().ok());
                let user = client_port.and_then(|p| users.lock().unwrap().get(&p).cloned());
                let reply = match user {
                    Some(user) => format!("{query} : USERID : UNIX : {user}\r\n"),
                    None => format!("{query} : ERROR : NO-USER\r\n"),
                };
                let _ = socket.get_mut().write_all(reply.as_bytes()).await;
            });
        }
    });
    port
}

/// Registers `tool` (as ident user `tools.<tool>`) with route `.*` → `backend`;
/// returns the registrar's reply.
async fn register(registrar: u16, users: &Mutex<HashMap<u16, String>>, tool: &str, backend: u16) -> String {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    users.lock().unwrap().insert(port, format!("tools.{tool}"));
    let exchange = async {
        let mut stream = socket.connect(([127, 0, 0, 1], registrar).into()).await.ok()?;
        stream.write_all(format!("register\n.*\nhttp://127.0.0.1:{backend}\n").as_bytes()).await.ok()?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.ok()?;
        Some(reply)
    };
    tokio::time::timeout(Duration::from_secs(15), exchange).await.ok().flatten().unwrap_or_default()
}

/// Requests through the proxy by several keep-alive clients until stopped;
/// every answer must be the tool's page.
struct Load {
    ok: Arc<AtomicU64>,
    failed: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(http: u16, host: &'static str, expected: &'static str) -> Self {
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let tasks = (0..8)
            .map(|_| {
                let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
                tokio::spawn(async move {
                    let client = reqwest::Client::builder()
                        .user_agent("dynamicproxy-failover-test")
                        .timeout(Duration::from_secs(5))
                        .build()
                        .unwrap();
                    let url = format!("http://127.0.0.1:{http}/");
                    while !stop.is_cancelled() {
                        let result = client.get(&url).header("Host", host).send().await;
                        let outcome = match result {
                            Ok(r) => {
                                let status = r.status().as_u16();
                                let reason = r
                                    .headers()
                                    .get("x-dynamicproxy-reason")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_string();
                                match r.text().await {
                                    Ok(body) if status == 200 && body == expected => Ok(()),
                                    Ok(body) => Err(format!("{status} {reason} {body:.60}")),
                                    Err(e) => Err(format!("{status} body: {e}")),
                                }
                            }
                            Err(e) => Err(e.to_string()),
                        };
                        match outcome {
                            Ok(()) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failed.lock().unwrap().push(e),
                        }
                    }
                })
            })
            .collect();
        Load { ok, failed, stop, tasks }
    }

    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
        (self.ok.load(Ordering::Relaxed), self.failed.lock().unwrap().clone())
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder().user_agent("dynamicproxy-tests").timeout(Duration::from_secs(5)).build().unwrap()
}

async fn get(client: &reqwest::Client, url: &str, host: Option<&str>) -> Option<(u16, String)> {
    let mut request = client.get(url);
    if let Some(host) = host {
        request = request.header("Host", host);
    }
    let response = request.send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// Tools the registrar answered `ok` for, with when.
type Answered = Arc<Mutex<Vec<(String, Instant)>>>;

/// The pieces every failover test needs, started and serving.
struct Stack {
    group: SentinelGroup,
    daemon: Daemon,
    http: u16,
    admin: u16,
    registrar: u16,
    users: Arc<Mutex<HashMap<u16, String>>>,
    api: Option<FakeApiServer>,
    _dir: tempfile::TempDir,
}

impl Stack {
    async fn start(with_kube: bool) -> Self {
        let group = SentinelGroup::start();
        let tool_port = backend("hello from demo").await;
        let _: () = group.master_client().hset("prefix:demo", ".*", format!("http://127.0.0.1:{tool_port}")).unwrap();
        group.wait_replicated();
        let users = Arc::new(Mutex::new(HashMap::new()));
        let ident = ident_server(users.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let (http, list, admin, registrar) = (free_port(), free_port(), free_port(), free_port());
        let mut args = vec!["all".to_string(), "--redis-url".into(), group.url()];
        for (flag, port) in
            [("--http-listen", http), ("--list-listen", list), ("--admin-listen", admin), ("--listen", registrar)]
        {
            args.extend([flag.to_string(), format!("127.0.0.1:{port}")]);
        }
        args.extend(["--ident-port".into(), ident.to_string()]);
        let api = if with_kube {
            let api = FakeApiServer::start().await;
            let kube_port = backend("hello from kube").await;
            api.apply(service("tool-kubeone", "kubeone", "127.0.0.1", &[("http", kube_port)]));
            let kubeconfig = dir.path().join("kubeconfig");
            std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
            args.extend(["--kubeconfig".into(), kubeconfig.display().to_string()]);
            Some(api)
        } else {
            args.extend(["--kubeconfig".into(), "/nonexistent".into()]);
            None
        };
        let daemon = Daemon::start(&args, dir.path().join("dynamicproxy.log"));
        let stack = Stack { group, daemon, http, admin, registrar, users, api, _dir: dir };
        let client = http_client();
        let ready = format!("http://127.0.0.1:{admin}/ready");
        let log = || stack.daemon.log();
        eventually(WAIT, "ready", || async { get(&client, &ready, None).await.filter(|(s, _)| *s == 200) }).await;
        stack.wait_served("demo", "hello from demo", WAIT).await;
        if with_kube {
            stack.wait_served("kubeone", "hello from kube", WAIT).await;
        }
        assert!(log().contains("dynamicproxy started"), "{}", log());
        stack
    }

    /// Waits until `tool` answers `body` through the proxy; returns when.
    async fn wait_served(&self, tool: &str, body: &str, within: Duration) -> Instant {
        let client = http_client();
        let url = format!("http://127.0.0.1:{}/", self.http);
        let host = format!("{tool}.toolforge.org");
        eventually(within, &format!("{tool} served"), || async {
            get(&client, &url, Some(&host)).await.filter(|(s, b)| *s == 200 && b == body).map(|_| Instant::now())
        })
        .await
    }

    async fn server_info(&self) -> serde_json::Value {
        let (_, body) =
            get(&http_client(), &format!("http://127.0.0.1:{}/server_info", self.admin), None).await.unwrap();
        serde_json::from_str(&body).unwrap()
    }

    /// The value of the unlabelled sample `name` in a scrape of `/metrics`.
    async fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = get(&http_client(), &format!("http://127.0.0.1:{}/metrics", self.admin), None).await?;
        body.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// Registers a fresh tool every 50 ms, each attempt on its own
    /// connection so a hung one does not hold up the next; returns the tools
    /// the registrar said `ok` to, with when.
    fn registrations(&self, backend: u16) -> (CancellationToken, Answered) {
        let stop = CancellationToken::new();
        let oks = Arc::new(Mutex::new(Vec::new()));
        let (registrar, users, stopped, done) = (self.registrar, self.users.clone(), stop.clone(), oks.clone());
        tokio::spawn(async move {
            for n in 0.. {
                if stopped.is_cancelled() {
                    return;
                }
                let (users, done) = (users.clone(), done.clone());
                tokio::spawn(async move {
                    let tool = format!("reg{n}");
                    if register(registrar, &users, &tool, backend).await == "ok" {
                        done.lock().unwrap().push((tool, Instant::now()));
                    }
                });
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        (stop, oks)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn master_killed_under_load_fails_no_request() {
    let mut stack = Stack::start(true).await;
    let old_master = format!("127.0.0.1:{}", stack.group.master_port());
    let new_master = format!("127.0.0.1:{}", stack.group.replica_port());
    let load = Load::start(stack.http, "demo.toolforge.org", "hello from demo");
    let load_ok = load.ok.clone();
    eventually(WAIT, "load running", || async { (load_ok.load(Ordering::Relaxed) > 50).then_some(()) }).await;
    let registered_port = backend("hello from a registered tool").await;
    let switches = stack.group.switch_events();
    assert_eq!(stack.metric("dynamicproxy_proxy_redis_server_changes_total").await, Some(0.0));

    let killed = Instant::now();
    stack.group.kill_master();
    let (stop_registering, oks) = stack.registrations(registered_port);
    // kube-sync sees a new Service while there is no master to write it to.
    let kube_port = backend("hello from kube two").await;
    stack.api.as_ref().unwrap().apply(service("tool-kubetwo", "kubetwo", "127.0.0.1", &[("http", kube_port)]));

    let (promoted, event) =
        tokio::task::spawn_blocking(move || switches.recv_timeout(Duration::from_secs(30)).expect("+switch-master"))
            .await
            .unwrap();
    assert!(event.ends_with(&new_master.replace(':', " ")), "{event}");
    let (first_tool, first_ok) =
        eventually(WAIT, "a registration after the failover", || async { oks.lock().unwrap().first().cloned() }).await;
    stop_registering.cancel();
    let ok_after = first_ok.saturating_duration_since(promoted);
    eprintln!(
        "promotion {:?} after SIGKILL; registrar ok {:?} after +switch-master",
        promoted - killed,
        first_ok.checked_duration_since(promoted).map_or(0.0, |d| d.as_secs_f64()),
    );
    assert!(ok_after <= AFTER_PROMOTION, "registrar ok {ok_after:?} after the promotion");

    // A route written after the failover is served within a second.
    let served = stack.wait_served(&first_tool, "hello from a registered tool", WAIT).await;
    eprintln!("route of {first_tool} served {:?} after its registration", served - first_ok);
    assert!(served - first_ok <= AFTER_PROMOTION, "route served {:?} after it was written", served - first_ok);
    let written = Instant::now();
    assert_eq!(register(stack.registrar, &stack.users, "later", registered_port).await, "ok");
    let served = stack.wait_served("later", "hello from a registered tool", WAIT).await;
    eprintln!("a later registration served {:?} after it was sent", served - written);
    assert!(served - written <= AFTER_PROMOTION, "later route served {:?} after it was sent", served - written);

    // kube-sync catches up with what it saw during the outage.
    stack.wait_served("kubetwo", "hello from kube two", WAIT).await;

    let (ok, failed) = load.finish().await;
    eprintln!("load: {ok} requests answered, {} failed", failed.len());
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok + failed.len() as u64,
        &failed[..failed.len().min(5)]
    );

    let (status, body) = get(&http_client(), &format!("http://127.0.0.1:{}/ready", stack.admin), None).await.unwrap();
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let info = stack.server_info().await;
    let cache = &info["route_cache"];
    assert_eq!(cache["redis_server"], new_master.as_str(), "{info}");
    assert_eq!(cache["redis_server_changes"], 1, "{info}");
    assert_eq!(cache["last_server_change"]["from"], old_master.as_str(), "{info}");
    assert_eq!(cache["redis_connected"], true, "{info}");
    let log = stack.daemon.log();
    assert!(log.contains("route cache now follows another Redis server (failover)"), "{log}");
    // The switch in /metrics, for alerts and dashboards (the counter follows within a second).
    eventually(WAIT, "server change counted in /metrics", || async {
        (stack.metric("dynamicproxy_proxy_redis_server_changes_total").await == Some(1.0)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hung_master_is_replaced_and_never_written_again() {
    let stack = Stack::start(false).await;
    let new_master = format!("127.0.0.1:{}", stack.group.replica_port());
    let load = Load::start(stack.http, "demo.toolforge.org", "hello from demo");
    let load_ok = load.ok.clone();
    eventually(WAIT, "load running", || async { (load_ok.load(Ordering::Relaxed) > 50).then_some(()) }).await;
    let registered_port = backend("hello from a registered tool").await;
    let switches = stack.group.switch_events();

    let stopped = Instant::now();
    stack.group.pause_master(true);
    let (stop_registering, oks) = stack.registrations(registered_port);
    let (promoted, _) =
        tokio::task::spawn_blocking(move || switches.recv_timeout(Duration::from_secs(30)).expect("+switch-master"))
            .await
            .unwrap();
    let first_ok = eventually(WAIT, "a registration after the failover", || async {
        oks.lock().unwrap().first().map(|(_, at)| *at)
    })
    .await;
    eprintln!(
        "promotion {:?} after SIGSTOP; registrar ok {:?} after +switch-master",
        promoted - stopped,
        first_ok.saturating_duration_since(promoted)
    );
    assert!(first_ok.saturating_duration_since(promoted) <= AFTER_PROMOTION);

    // The master stays hung for 30 s; serving goes on from the cache.
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(stopped.elapsed())).await;
    stack.group.pause_master(false);
    eventually(WAIT, "the old master is demoted", || async {
        let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut stack.group.try_master_client()?).ok()?;
        format!("{role:?}").contains("slave").then_some(())
    })
    .await;
    stop_registering.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Every registration that was answered `ok` is in the table, on the new master.
    let mut new = redis::Client::open(format!("redis://{new_master}/0")).unwrap().get_connection().unwrap();
    let answered: Vec<String> = oks.lock().unwrap().iter().map(|(tool, _)| tool.clone()).collect();
    assert!(!answered.is_empty());
    for tool in &answered {
        let route: Option<String> = new.hget(format!("prefix:{tool}"), ".*").unwrap();
        assert!(route.is_some(), "{tool} was answered ok but is not on the master");
    }
    let written = Instant::now();
    assert_eq!(register(stack.registrar, &stack.users, "afterwards", registered_port).await, "ok");
    let served = stack.wait_served("afterwards", "hello from a registered tool", WAIT).await;
    assert!(served - written <= AFTER_PROMOTION, "route served {:?} after it was sent", served - written);

    let (ok, failed) = load.finish().await;
    eprintln!("load: {ok} requests answered, {} failed, {} registrations ok", failed.len(), answered.len());
    assert!(failed.is_empty(), "{} requests failed: {:?}", failed.len(), &failed[..failed.len().min(5)]);
    let info = stack.server_info().await;
    assert_eq!(info["route_cache"]["redis_server"], new_master.as_str(), "{info}");
}
