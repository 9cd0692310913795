//! The daemons as operators run them: the real binary, real Redis, real HTTP.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dynamicproxy_test_support::{RedisServer, eventually, free_port};

const WAIT: Duration = Duration::from_secs(20);

/// A running `dynamicproxy` process, killed on drop.
struct Daemon {
    child: Child,
}

impl Daemon {
    fn start(args: &[String]) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_dynamicproxy"))
            .args(args)
            .env_remove("DYNAMICPROXY_REDIS_URL")
            // The test backends listen on loopback, which the proxy refuses by default.
            .env("DYNAMICPROXY_PROXY_DENIED_BACKEND_NETWORKS", "[]")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dynamicproxy");
        Daemon { child }
    }

    /// Sends SIGTERM and returns the exit code and everything logged.
    fn terminate(mut self) -> (Option<i32>, String) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let status = self.child.wait().expect("wait for dynamicproxy");
        let mut log = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = err.read_to_string(&mut log);
        }
        (status.code(), log)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `dynamicproxy proxy` on loopback ports.
fn proxy_args(redis_url: &str, http: u16, list: u16, admin: u16) -> Vec<String> {
    let mut args = vec!["proxy".to_string(), "--redis-url".into(), redis_url.into()];
    for (flag, port) in [("--http-listen", http), ("--list-listen", list), ("--admin-listen", admin)] {
        args.extend([flag.to_string(), format!("127.0.0.1:{port}")]);
    }
    args
}

fn run_to_exit(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dynamicproxy"))
        .args(args)
        .env_remove("DYNAMICPROXY_REDIS_URL")
        .output()
        .expect("run dynamicproxy");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
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

#[tokio::test]
async fn proxy_starts_without_redis_then_serves_and_stops_cleanly() {
    let mut redis = RedisServer::start();
    redis.stop();
    let (http, list, admin) = (free_port(), free_port(), free_port());
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_port = backend.local_addr().unwrap().port();
    tokio::spawn(async move {
        let app = axum::Router::new().fallback(|| async { "hello from the tool" });
        axum::serve(backend, app).await.unwrap();
    });

    let daemon = Daemon::start(&proxy_args(&redis.url(), http, list, admin));
    let client =
        reqwest::Client::builder().user_agent("dynamicproxy-tests").timeout(Duration::from_secs(5)).build().unwrap();
    let admin_url = format!("http://127.0.0.1:{admin}");

    // Up without Redis: healthy, not ready, no routes.
    let healthz = format!("http://127.0.0.1:{http}/.well-known/healthz");
    let (status, body) = eventually(WAIT, "healthz", || get(&client, &healthz, None)).await;
    assert_eq!((status, body.as_str()), (200, "proxy ok!"));
    let (status, body) = get(&client, &format!("{admin_url}/ready"), None).await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("route table not loaded"), "{body}");

    // Redis arrives with a route: the proxy picks it up by itself.
    redis.restart();
    let _: () = redis::cmd("HSET")
        .arg("prefix:demo")
        .arg(".*")
        .arg(format!("http://127.0.0.1:{backend_port}"))
        .query(&mut redis.client())
        .unwrap();
    let tool_url = format!("http://127.0.0.1:{http}/");
    eventually(WAIT, "route served", || async {
        get(&client, &tool_url, Some("demo.toolforge.org"))
            .await
            .filter(|(s, b)| *s == 200 && b == "hello from the tool")
    })
    .await;
    let (status, _) = get(&client, &format!("{admin_url}/ready"), None).await.unwrap();
    assert_eq!(status, 200);
    let (_, info) = get(&client, &format!("{admin_url}/server_info"), None).await.unwrap();
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["component"], "proxy");
    assert_eq!(info["route_cache"]["redis_connected"], true);
    assert_eq!(info["route_cache"]["routes"], 1);
    let metrics_url = format!("{admin_url}/metrics");
    eventually(WAIT, "cache gauges in /metrics", || async {
        let (_, metrics) = get(&client, &metrics_url, None).await?;
        (metrics.contains("dynamicproxy_proxy_routes_in_cache 1")
            && metrics.contains("dynamicproxy_proxy_redis_connected 1"))
        .then_some(())
    })
    .await;
    let (_, listed) = get(&client, &format!("http://127.0.0.1:{list}/list"), None).await.unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&listed).unwrap(),
        serde_json::json!({"demo": {"status": "active"}})
    );

    // Runtime switches.
    let post = |path: String| client.post(format!("{admin_url}{path}")).send();
    assert_eq!(post("/maintenance?enabled=true".into()).await.unwrap().status(), 200);
    let (status, _) = get(&client, &tool_url, Some("demo.toolforge.org")).await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(post("/maintenance?enabled=false".into()).await.unwrap().status(), 200);
    let (status, _) = get(&client, &tool_url, Some("demo.toolforge.org")).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(post("/maintenance?enabled=maybe".into()).await.unwrap().status(), 400);
    assert_eq!(post("/logging?level=debug".into()).await.unwrap().status(), 200);
    assert_eq!(post("/logging?level=no=such=filter[".into()).await.unwrap().status(), 400);

    let (code, log) = daemon.terminate();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("shutting down"), "{log}");
}

#[tokio::test]
async fn port_in_use_fails_with_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (code, err) = run_to_exit(&[
        "proxy",
        "--http-listen",
        &format!("127.0.0.1:{port}"),
        "--list-listen",
        &format!("127.0.0.1:{}", free_port()),
        "--admin-listen",
        &format!("127.0.0.1:{}", free_port()),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("cannot listen on 127.0.0.1:{port} ([proxy] http_listen)")), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn bad_daemon_configuration_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    for (sub, text, expected) in [
        ("proxy", "[proxy]\nhttp_listen = \"nowhere\"\n", "[proxy] http_listen"),
        ("proxy", "[proxy]\nno_such_key = 1\n", "no_such_key"),
        ("registrar", "[registrar]\nlisten = 8282\n", "[registrar] listen"),
        ("kube-sync", "[kube_sync]\nlabel_selector = 5\n", "[kube_sync] label_selector"),
    ] {
        std::fs::write(&file, text).unwrap();
        let (code, err) = run_to_exit(&[sub, "--config", file.to_str().unwrap()]);
        assert_eq!(code, Some(64), "{sub} {text}: {err}");
        assert!(err.contains(expected) && err.lines().count() == 1, "{sub} {text}: {err}");
    }
    // Env beats the file for daemon settings too.
    let (code, err) = Command::new(env!("CARGO_BIN_EXE_dynamicproxy"))
        .args(["proxy"])
        .env("DYNAMICPROXY_PROXY_HTTP_LISTEN", "bogus")
        .output()
        .map(|o| (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned()))
        .unwrap();
    assert_eq!(code, Some(64));
    assert!(err.contains("[proxy] http_listen") && err.contains("environment"), "{err}");
}

#[tokio::test]
async fn admin_listen_before_or_after_the_subcommand() {
    let client = reqwest::Client::new();
    for before in [true, false] {
        let admin = free_port();
        let admin_flag = ["--admin-listen".to_string(), format!("127.0.0.1:{admin}")];
        let mut args: Vec<String> = if before { admin_flag.to_vec() } else { Vec::new() };
        args.extend(["registrar".into(), "--listen".into(), format!("127.0.0.1:{}", free_port())]);
        if !before {
            args.extend(admin_flag);
        }
        args.extend(["--redis-url".into(), format!("redis://127.0.0.1:{}/0", free_port())]);
        let daemon = Daemon::start(&args);
        let url = format!("http://127.0.0.1:{admin}/server_info");
        let (status, body) = eventually(WAIT, "admin API", || get(&client, &url, None)).await;
        assert_eq!(status, 200);
        assert!(body.contains("\"component\":\"registrar\""), "{body}");
        let (code, log) = daemon.terminate();
        assert_eq!(code, Some(0), "{log}");
    }
}

#[test]
fn check_flag_validates_without_serving() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let out = Command::new(env!("CARGO_BIN_EXE_dynamicproxy"))
        .args(["proxy", "--check", "--http-listen", &listen])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "configuration ok\n");
    assert!(std::net::TcpListener::bind(&listen).is_ok(), "--check must not bind");
    let (code, err) = run_to_exit(&["registrar", "--check", "--listen", "nonsense"]);
    assert_eq!(code, Some(2), "a flag that does not parse is a usage error: {err}");
}

#[test]
fn a_flag_given_twice_takes_the_last_value() {
    let (a, b) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let (code, err) = run_to_exit(&["proxy", "--check", "--http-listen", &a, "--http-listen", &b]);
    assert_eq!(code, Some(0), "{err}");
    // Which one counts shows where validation depends on it: the last one.
    let (code, err) =
        run_to_exit(&["proxy", "--check", "--canonical-domain", "not a domain", "--canonical-domain", "toolforge.org"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, err) =
        run_to_exit(&["proxy", "--check", "--canonical-domain", "toolforge.org", "--canonical-domain", "not a domain"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("canonical_domain") && err.contains("not a domain"), "{err}");
    // Every subcommand, global flags included, before and after the subcommand.
    let redis = format!("redis://127.0.0.1:{}/0", free_port());
    let (c, d) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    for args in [
        vec!["registrar", "--check", "--listen", &a, "--listen", &b],
        vec!["kube-sync", "--check", "--namespace", "a", "--namespace", "b"],
        vec!["all", "--check", "--listen", &a, "--listen", &b, "--http-listen", &c, "--http-listen", &d],
        vec!["--log-format", "text", "proxy", "--check", "--log-format", "json", "--log-format", "text"],
        vec!["--redis-url", &redis, "routes", "--check", "--redis-url", &redis, "list"],
    ] {
        let (code, err) = run_to_exit(&args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
    }
}

#[test]
fn example_configuration_is_valid_for_every_daemon() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/dynamicproxy.example.toml");
    for sub in ["proxy", "registrar", "kube-sync", "all"] {
        let (code, err) = run_to_exit(&[sub, "--check", "--config", example]);
        assert_eq!(code, Some(0), "{sub}: {err}");
    }
}

#[tokio::test]
async fn sighup_does_not_stop_the_proxy() {
    let (http, list, admin) = (free_port(), free_port(), free_port());
    let daemon = Daemon::start(&proxy_args(&format!("redis://127.0.0.1:{}/0", free_port()), http, list, admin));
    let client = reqwest::Client::builder().user_agent("dynamicproxy-tests").build().unwrap();
    let healthz = format!("http://127.0.0.1:{http}/.well-known/healthz");
    eventually(WAIT, "healthz", || get(&client, &healthz, None)).await;
    let _ = Command::new("kill").args(["-HUP", &daemon.child.id().to_string()]).status();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _) = get(&client, &healthz, None).await.expect("still serving after SIGHUP");
    assert_eq!(status, 200);
    let (code, log) = daemon.terminate();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("SIGHUP received"), "{log}");
}

#[test]
fn kubernetes_configmap_configuration_is_valid() {
    let manifest = include_str!("../deploy/kubernetes/configmap.yaml");
    // The file's block scalar: every line after `dynamicproxy.toml: |`, four spaces in.
    let toml: String = manifest
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("dynamicproxy.toml: |"))
        .skip(1)
        .map(|l| l.strip_prefix("    ").unwrap_or(l.trim()))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(toml.contains("[kube_sync]"), "{toml}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dynamicproxy.toml");
    std::fs::write(&file, toml).unwrap();
    let (code, err) = run_to_exit(&["kube-sync", "--check", "--config", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
}

#[tokio::test]
async fn all_runs_every_daemon_from_flags() {
    let redis = RedisServer::start();
    let (http, list, admin, registrar) = (free_port(), free_port(), free_port(), free_port());
    let mut args = proxy_args(&redis.url(), http, list, admin);
    args[0] = "all".into();
    args.extend(["--listen".into(), format!("127.0.0.1:{registrar}"), "--kubeconfig".into(), "/nonexistent".into()]);
    let daemon = Daemon::start(&args);
    let client = reqwest::Client::builder().user_agent("dynamicproxy-tests").build().unwrap();
    let info_url = format!("http://127.0.0.1:{admin}/server_info");
    let (_, info) = eventually(WAIT, "admin API", || get(&client, &info_url, None)).await;
    assert!(info.contains("\"component\":\"all\""), "{info}");
    let healthz = format!("http://127.0.0.1:{http}/.well-known/healthz");
    assert_eq!(get(&client, &healthz, None).await.map(|(s, _)| s), Some(200));
    // The registrar answers on its port (no ident service here: the refusal is its answer).
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", registrar)).await.expect("registrar listening");
    tokio::io::AsyncWriteExt::write_all(&mut socket, b"register\n.*\nhttp://127.0.0.1:1\n").await.unwrap();
    let mut reply = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut socket, &mut reply).await.unwrap();
    assert_eq!(reply, "Identd authentication failed. Please contact an administrator");
    let (code, log) = daemon.terminate();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("kube-sync disabled"), "{log}");
}

#[tokio::test]
async fn a_route_to_the_edge_itself_is_refused_and_the_log_names_the_setting() {
    let redis = RedisServer::start();
    let (http, list, admin) = (free_port(), free_port(), free_port());
    // issue 10's reproduction: a tool's route to the proxy's own admin API.
    let _: () = redis::cmd("HSET")
        .arg("prefix:evil")
        .arg(".*")
        .arg(format!("http://127.0.0.1:{admin}"))
        .query(&mut redis.client())
        .unwrap();
    let mut args = proxy_args(&redis.url(), http, list, admin);
    // The flag wins over the harness's development environment: back to the default list.
    for net in ["127.0.0.0/8", "::1/128", "169.254.0.0/16"] {
        args.extend(["--denied-backend-network".to_string(), net.to_string()]);
    }
    let daemon = Daemon::start(&args);
    let client =
        reqwest::Client::builder().user_agent("dynamicproxy-tests").timeout(Duration::from_secs(5)).build().unwrap();
    let attack = format!("http://127.0.0.1:{http}/maintenance?enabled=true");
    let (status, reason) = eventually(WAIT, "route loaded", || async {
        let response = client.post(&attack).header("Host", "evil.toolforge.org").send().await.ok()?;
        let reason = response.headers().get("x-dynamicproxy-reason")?.to_str().ok()?.to_string();
        (reason != "no-route").then_some((response.status().as_u16(), reason))
    })
    .await;
    assert_eq!((status, reason.as_str()), (502, "denied-backend"));
    let (code, log) = daemon.terminate();
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains("maintenance mode changed"), "the admin API was reached: {log}");
    assert!(log.contains("[proxy] denied_backend_networks") && log.contains("127.0.0.0/8"), "{log}");
}
