//! No route reaches the edge itself (SPEC §7): a tool that points its route at
//! an admin API gets 403 from it, whatever it asks; operators keep their
//! admin API on loopback, probes keep working on the pod address, and a token
//! lets an operator change things from elsewhere.
//!
//! The proxy runs with `denied_backend_networks = []` here, so these tests
//! show the admin API's own defence, not the proxy's destination denylist.

use std::io::Read;
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dynamicproxy_test_support::{RedisServer, eventually, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(15);
const PROXIED: &str = "admin API: refused a request that came through a proxy (X-Forwarded-For)";
const FOREIGN_HOST: &str = "admin API: refused a request whose Host is not this listener's address";
const TOKEN: &str = "Zm9yLXRoZS1hZG1pbi1hcGktb25seQ==";

/// A running `dynamicproxy` process, killed on drop.
struct Daemon {
    child: Child,
}

impl Daemon {
    fn start(args: &[String], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_dynamicproxy"));
        command.args(args).env_remove("DYNAMICPROXY_REDIS_URL").env_remove("DYNAMICPROXY_ADMIN_TOKEN");
        // The admin API's own defence, independent of the proxy's destination denylist.
        command.env("DYNAMICPROXY_PROXY_DENIED_BACKEND_NETWORKS", "[]");
        let child = command.envs(env.iter().copied()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn();
        Daemon { child: child.expect("start dynamicproxy") }
    }

    /// Sends SIGTERM and returns everything logged.
    fn terminate(mut self) -> String {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        let mut log = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = err.read_to_string(&mut log);
        }
        log
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `dynamicproxy <sub>` with the proxy's listeners on loopback and the admin API on `admin`.
fn args(sub: &str, redis_url: &str, http: u16, admin: &str) -> Vec<String> {
    let list = format!("127.0.0.1:{}", free_port());
    [sub, "--redis-url", redis_url, "--http-listen", &format!("127.0.0.1:{http}"), "--list-listen", &list]
        .into_iter()
        .chain(["--admin-listen", admin])
        .map(String::from)
        .collect()
}

/// Writes a route with the operator CLI, as the reproduction does.
fn route(redis: &RedisServer, tool: &str, url: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_dynamicproxy"))
        .args(["routes", "--redis-url", &redis.url(), "set", tool, ".*", url])
        .output()
        .expect("run dynamicproxy routes");
    assert!(out.status.success(), "routes set: {}", String::from_utf8_lossy(&out.stderr));
}

/// An address of this host that is not loopback (`hostname -I`), when it has one.
fn non_loopback_ipv4() -> Option<Ipv4Addr> {
    let out = Command::new("hostname").arg("-I").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|a| a.parse::<Ipv4Addr>().ok())
        .find(|ip| !ip.is_loopback() && !ip.is_link_local() && !ip.is_unspecified())
}

/// A plain HTTP backend standing for a tool.
async fn backend() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let app = axum::Router::new().fallback(|| async { "hello from the tool" });
        axum::serve(listener, app).await.unwrap();
    });
    port
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().user_agent("x").timeout(Duration::from_secs(5)).build().unwrap()
}

/// Sends a request and returns its status and body; `None` when it could not be sent.
async fn send(request: reqwest::RequestBuilder) -> Option<(u16, String)> {
    let response = request.send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// Waits until `tool` is routed through the proxy on `http` and answers 200.
async fn wait_routed(client: &reqwest::Client, http: u16, tool: &str) {
    let url = format!("http://127.0.0.1:{http}/");
    let host = format!("{tool}.toolforge.org");
    eventually(WAIT, "the tool's route served", || async {
        send(client.get(&url).header("Host", &host)).await.filter(|(s, _)| *s == 200)
    })
    .await;
}

#[tokio::test]
async fn a_route_to_the_proxys_own_admin_api_cannot_switch_maintenance_or_read_metrics() {
    let redis = RedisServer::start();
    let (http, admin) = (free_port(), free_port());
    // The reproduction: a tool points its route at the proxy's admin API.
    route(&redis, "evil", &format!("http://127.0.0.1:{admin}"));
    route(&redis, "demo", &format!("http://127.0.0.1:{}", backend().await));
    let daemon = Daemon::start(&args("proxy", &redis.url(), http, &format!("127.0.0.1:{admin}")), &[]);
    let client = client();
    wait_routed(&client, http, "demo").await;

    let through = |method: reqwest::Method, path: &str| {
        client.request(method, format!("http://127.0.0.1:{http}{path}")).header("Host", "evil.toolforge.org")
    };
    let (status, body) = send(through(reqwest::Method::POST, "/maintenance?enabled=true")).await.unwrap();
    assert_eq!((status, body.trim()), (403, PROXIED));
    // Explain reads who wrote every route: a read endpoint, and guarded as the others.
    for path in ["/metrics", "/server_info", "/ready", "/explain?url=https://demo.toolforge.org/"] {
        let (status, body) = send(through(reqwest::Method::GET, path)).await.unwrap();
        assert_eq!((status, body.trim()), (403, PROXIED), "GET {path}");
    }
    let (status, body) = send(through(reqwest::Method::POST, "/logging?level=trace")).await.unwrap();
    assert_eq!((status, body.trim()), (403, PROXIED));

    // Maintenance is still off: other tools answer.
    let demo = client.get(format!("http://127.0.0.1:{http}/")).header("Host", "demo.toolforge.org");
    assert_eq!(send(demo).await.unwrap(), (200, "hello from the tool".to_string()));
    // The operator sees the refusals counted.
    let (_, metrics) = send(client.get(format!("http://127.0.0.1:{admin}/metrics"))).await.unwrap();
    assert!(metrics.contains("dynamicproxy_admin_refused_requests_total{reason=\"proxied\"} 6"), "{metrics}");
    // The operator's own explain works.
    let url = format!("http://127.0.0.1:{admin}/explain?url=https://demo.toolforge.org/");
    let (status, explained) = send(client.get(url)).await.unwrap();
    assert_eq!(status, 200, "{explained}");
    assert!(explained.contains("decision: proxy to http://127.0.0.1:"), "{explained}");
    let log = daemon.terminate();
    assert_eq!(log.matches(PROXIED).count(), 6, "one warning per refusal: {log}");
}

#[tokio::test]
async fn an_admin_api_on_all_addresses_refuses_the_proxy_and_still_answers_probes() {
    let redis = RedisServer::start();
    let (http, admin) = (free_port(), free_port());
    // kube-sync's manifest listens on 0.0.0.0 for its probes; `all` serves the same admin API.
    let host_ip = non_loopback_ipv4();
    let target = host_ip.unwrap_or(Ipv4Addr::LOCALHOST);
    route(&redis, "evil", &format!("http://{target}:{admin}"));
    let mut args = args("all", &redis.url(), http, &format!("0.0.0.0:{admin}"));
    args.extend(["--listen", &format!("127.0.0.1:{}", free_port()), "--kubeconfig", "/nonexistent"].map(String::from));
    let daemon = Daemon::start(&args, &[]);
    let client = client();
    let direct = format!("http://{target}:{admin}");
    eventually(WAIT, "probe answers ready", || async {
        send(client.get(format!("{direct}/ready"))).await.filter(|(s, _)| *s == 200)
    })
    .await;

    let proxied = |method: reqwest::Method, path: &str| {
        client.request(method, format!("http://127.0.0.1:{http}{path}")).header("Host", "evil.toolforge.org")
    };
    let (status, body) = send(proxied(reqwest::Method::GET, "/ready")).await.unwrap();
    assert_eq!((status, body.trim()), (403, PROXIED));
    let (status, body) = send(proxied(reqwest::Method::POST, "/maintenance?enabled=true")).await.unwrap();
    assert_eq!((status, body.trim()), (403, PROXIED));

    // The kubelet's probe: Host is the pod address and port, the peer is not loopback.
    let (status, body) = send(client.get(format!("{direct}/ready"))).await.unwrap();
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    // A request addressed to another name is refused, on any address.
    let (status, body) =
        send(client.get(format!("{direct}/metrics")).header("Host", "tools.example.org")).await.unwrap();
    assert_eq!((status, body.trim()), (403, FOREIGN_HOST));
    match host_ip {
        Some(ip) => {
            // A change from a non-loopback peer needs a token, and none is configured.
            let (status, body) =
                send(client.post(format!("http://{ip}:{admin}/maintenance?enabled=true"))).await.unwrap();
            assert_eq!(status, 403, "{body}");
            assert!(body.contains("non-loopback peer"), "{body}");
        }
        None => eprintln!("no non-loopback address on this host: the 0.0.0.0 listener was reached on 127.0.0.1"),
    }
    // Maintenance is still off.
    let (status, _) =
        send(client.get(format!("http://127.0.0.1:{http}/")).header("Host", "evil.toolforge.org")).await.unwrap();
    assert_eq!(status, 403, "the evil route still reaches only the refusal, not the maintenance page");
    daemon.terminate();
}

/// Sends raw bytes and returns the status code of the answer.
async fn raw_status(port: u16, request: &str) -> u16 {
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    socket.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status in {answer:?}"))
}

#[tokio::test]
async fn operators_on_loopback_keep_their_admin_api_but_foreign_hosts_and_forwarded_requests_are_refused() {
    let redis = RedisServer::start();
    let (http, admin, registrar_admin) = (free_port(), free_port(), free_port());
    route(&redis, "demo", &format!("http://127.0.0.1:{}", backend().await));
    let proxy = Daemon::start(&args("proxy", &redis.url(), http, &format!("127.0.0.1:{admin}")), &[]);
    let registrar = Daemon::start(
        &[
            "registrar",
            "--redis-url",
            &redis.url(),
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--admin-listen",
            &format!("[::1]:{registrar_admin}"),
        ]
        .map(String::from),
        &[],
    );
    let client = client();
    wait_routed(&client, http, "demo").await;
    let base = format!("http://127.0.0.1:{admin}");

    // curl from the host itself, by address or as localhost.
    let (status, metrics) = send(client.get(format!("{base}/metrics"))).await.unwrap();
    assert_eq!(status, 200);
    assert!(metrics.contains("dynamicproxy_proxy_routes_in_cache"), "{metrics}");
    let (status, _) = send(client.get(format!("http://localhost:{admin}/server_info"))).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(raw_status(admin, "GET /ready HTTP/1.0\r\n\r\n").await, 200, "HTTP/1.0 without Host");
    let (status, body) = send(client.post(format!("{base}/maintenance?enabled=true"))).await.unwrap();
    assert_eq!((status, body.as_str()), (200, "maintenance on\n"));
    let tool = || client.get(format!("http://127.0.0.1:{http}/")).header("Host", "demo.toolforge.org");
    assert_eq!(send(tool()).await.unwrap().0, 503);
    let (status, _) = send(client.post(format!("{base}/maintenance?enabled=false"))).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(send(tool()).await.unwrap().0, 200);

    // Another name, or a forwarding header, is refused for reads and changes alike.
    let (status, body) =
        send(client.get(format!("{base}/metrics")).header("Host", "evil.toolforge.org")).await.unwrap();
    assert_eq!((status, body.trim()), (403, FOREIGN_HOST));
    let other_port = client.post(format!("{base}/maintenance?enabled=true")).header("Host", "127.0.0.1:80");
    assert_eq!(send(other_port).await.unwrap().0, 403);
    let forwarded = client.post(format!("{base}/maintenance?enabled=true")).header("X-Forwarded-For", "192.0.2.7");
    let (status, body) = send(forwarded).await.unwrap();
    assert_eq!((status, body.trim()), (403, PROXIED));
    for (name, shown) in
        [("Forwarded", "Forwarded"), ("X-Real-IP", "X-Real-IP"), ("X-Forwarded-Host", "X-Forwarded-Host")]
    {
        let (status, body) = send(client.get(format!("{base}/ready")).header(name, "192.0.2.7")).await.unwrap();
        assert_eq!(status, 403, "{name}");
        assert!(body.contains(&format!("({shown})")), "{name}: {body}");
    }
    assert_eq!(
        raw_status(
            admin,
            "GET http://evil.toolforge.org/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .await,
        403,
        "absolute target"
    );
    assert_eq!(send(tool()).await.unwrap().0, 200, "maintenance stayed off");

    // The registrar's admin API (here on IPv6 loopback) follows the same rules.
    let registrar_base = format!("http://[::1]:{registrar_admin}");
    let (status, _) =
        eventually(WAIT, "registrar admin API", || send(client.get(format!("{registrar_base}/ready")))).await;
    assert_eq!(status, 200);
    let (status, _) = send(client.get(format!("{registrar_base}/ready")).header("Host", "localhost")).await.unwrap();
    assert_eq!(status, 200);
    let (status, body) =
        send(client.get(format!("{registrar_base}/metrics")).header("X-Forwarded-For", "192.0.2.7")).await.unwrap();
    assert_eq!((status, body.trim()), (403, PROXIED));
    let (status, _) = send(client.get(format!("{registrar_base}/metrics")).header("Host", "[::2]")).await.unwrap();
    assert_eq!(status, 403);
    drop(registrar);
    proxy.terminate();
}

#[tokio::test]
async fn with_a_token_an_operator_may_change_things_from_another_address() {
    let Some(ip) = non_loopback_ipv4() else {
        eprintln!("no non-loopback address on this host: the token rule is shown by admin_guard's unit tests");
        return;
    };
    let redis = RedisServer::start();
    let (http, admin) = (free_port(), free_port());
    route(&redis, "demo", &format!("http://127.0.0.1:{}", backend().await));
    let daemon = Daemon::start(
        &args("proxy", &redis.url(), http, &format!("0.0.0.0:{admin}")),
        &[("DYNAMICPROXY_ADMIN_TOKEN", TOKEN)],
    );
    let client = client();
    wait_routed(&client, http, "demo").await;
    let switch = |on: bool| client.post(format!("http://{ip}:{admin}/maintenance?enabled={on}"));
    let tool = || client.get(format!("http://127.0.0.1:{http}/")).header("Host", "demo.toolforge.org");

    for wrong in [None, Some("Bearer not-the-token-at-all-000"), Some(&*format!("Basic {TOKEN}"))] {
        let request = match wrong {
            Some(value) => switch(true).header("Authorization", value),
            None => switch(true),
        };
        let (status, body) = send(request).await.unwrap();
        assert_eq!(status, 403, "{wrong:?}: {body}");
        assert!(body.contains("Authorization: Bearer"), "{body}");
    }
    assert_eq!(send(tool()).await.unwrap().0, 200, "maintenance stayed off");

    let (status, body) = send(switch(true).bearer_auth(TOKEN)).await.unwrap();
    assert_eq!((status, body.as_str()), (200, "maintenance on\n"));
    assert_eq!(send(tool()).await.unwrap().0, 503);
    let (status, _) = send(switch(false).bearer_auth(TOKEN)).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(send(tool()).await.unwrap().0, 200);
    let log = daemon.terminate();
    assert!(!log.contains(TOKEN), "the token is never logged: {log}");
}

#[test]
fn kubernetes_probes_address_the_admin_api_by_pod_ip() {
    let config = include_str!("../deploy/kubernetes/configmap.yaml");
    let deployment = include_str!("../deploy/kubernetes/deployment.yaml");
    assert!(config.contains("admin_listen = \"0.0.0.0:9632\""), "{config}");
    assert!(deployment.contains("containerPort: 9632"), "{deployment}");
    // Probes without headers send Host <pod-ip>:9632, the listener's own address, which the
    // admin API accepts (shown on a 0.0.0.0 listener above); a Host override would be refused.
    assert_eq!(deployment.matches("port: admin").count(), 2, "{deployment}");
    assert!(!deployment.contains("httpHeaders"), "probes must not override Host: {deployment}");
}

#[test]
fn the_admin_token_is_checked_at_start_and_never_echoed() {
    let check = |token: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_dynamicproxy"))
            .args(["all", "--check"])
            .env("DYNAMICPROXY_ADMIN_TOKEN", token)
            .output()
            .expect("run dynamicproxy");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // Taken verbatim: a token of digits stays a string, leading zeros included.
    assert_eq!(check("0012345678901234").0, Some(0));
    assert_eq!(check(TOKEN).0, Some(0));
    for bad in ["tooshort12", "with spaces is not a bearer token"] {
        let (code, err) = check(bad);
        assert_eq!(code, Some(64), "{err}");
        assert!(err.contains("[admin] token") && !err.contains(bad), "{err}");
    }
}
