//! Prometheus as its ecosystem expects (SPEC §7, §8): text 0.0.4 by default
//! that promtool accepts, OpenMetrics on request, alert rules that promtool
//! accepts, and every metric the alerts and the dashboard name present in a
//! real scrape of the real binary.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dynamicproxy_test_support::{RedisServer, eventually, free_port};

const WAIT: Duration = Duration::from_secs(15);

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A Kubernetes API server with no Services: lists are empty, watches stay
/// open without events. Enough for kube-sync to complete a sync.
async fn empty_api_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().fallback(|uri: axum::http::Uri| async move {
        if uri.query().unwrap_or("").contains("watch=") {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        (
            [("content-type", "application/json")],
            r#"{"kind":"ServiceList","apiVersion":"v1","metadata":{"resourceVersion":"1"},"items":[]}"#,
        )
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

/// `dynamicproxy all` on loopback ports with a certificate, a kubeconfig
/// naming [`empty_api_server`], and an access log; killed on drop.
struct All {
    child: Child,
    admin: u16,
    https: u16,
    registrar: u16,
    cert: PathBuf,
    _dir: tempfile::TempDir,
}

impl All {
    async fn start(redis: &RedisServer) -> All {
        let api_server = empty_api_server().await;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let made = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "30",
            ])
            .args(["-subj", "/CN=metrics.test", "-addext", "subjectAltName=DNS:metrics.test"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null())
            .status()
            .expect("run openssl");
        assert!(made.success());
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"http://127.0.0.1:{}\"}}}}]\n\
                 users: [{{name: u, user: {{token: t}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\n\
                 current-context: x\n",
                api_server
            ),
        )
        .unwrap();
        let (admin, https, registrar) = (free_port(), free_port(), free_port());
        let mut args: Vec<String> = vec!["all".into(), "--redis-url".into(), redis.url()];
        for (flag, port) in [
            ("--http-listen", free_port()),
            ("--https-listen", https),
            ("--list-listen", free_port()),
            ("--admin-listen", admin),
            ("--listen", registrar),
        ] {
            args.extend([flag.to_string(), format!("127.0.0.1:{port}")]);
        }
        for (flag, path) in [("--tls-cert", &cert), ("--tls-key", &key), ("--kubeconfig", &kubeconfig)] {
            args.extend([flag.to_string(), path.display().to_string()]);
        }
        args.extend(["--access-log".into(), dir.path().join("access.log").display().to_string()]);
        let child = Command::new(env!("CARGO_BIN_EXE_dynamicproxy"))
            .args(&args)
            .env_remove("DYNAMICPROXY_REDIS_URL")
            // The backend that fails in these tests is on loopback.
            .env("DYNAMICPROXY_PROXY_DENIED_BACKEND_NETWORKS", "[]")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dynamicproxy all");
        All { child, admin, https, registrar, cert, _dir: dir }
    }

    /// `GET /metrics` with `accept`, once the route cache has loaded: (content type, body).
    async fn scrape(&self, accept: Option<&str>) -> (String, String) {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
        let url = format!("http://127.0.0.1:{}/metrics", self.admin);
        eventually(WAIT, "a scrape after the route table loaded", || {
            let mut request = client.get(&url);
            if let Some(accept) = accept {
                request = request.header("accept", accept);
            }
            async move {
                let response = request.send().await.ok()?;
                let content_type = response.headers().get("content-type")?.to_str().ok()?.to_string();
                let body = response.text().await.ok()?;
                body.contains("dynamicproxy_proxy_redis_connected 1").then_some((content_type, body))
            }
        })
        .await
    }
}

impl Drop for All {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs promtool with `args`, feeding `stdin`; returns (success, output).
fn promtool(args: &[&str], stdin: &str) -> (bool, String) {
    use std::io::Write as _;
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (Debian package `prometheus`; scripts/test.sh installs it)");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let rules = repo("deploy/prometheus/alerts.yml");
    let (ok, out) = promtool(&["check", "rules", &rules.display().to_string()], "");
    assert!(ok, "{out}");
}

#[tokio::test]
async fn metrics_are_prometheus_text_unless_openmetrics_is_asked_for() {
    let redis = RedisServer::start();
    let all = All::start(&redis).await;

    let (content_type, text) = all.scrape(None).await;
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "{text}");
    assert!(text.contains("# TYPE dynamicproxy_proxy_requests_total counter\n"), "{text}");
    let (ok, out) = promtool(&["check", "metrics"], &text);
    assert!(ok && out.trim().is_empty(), "promtool check metrics: {out}\n{text}");

    let (content_type, _) = all.scrape(Some("text/plain;version=0.0.4")).await;
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");

    // What Prometheus itself sends.
    let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,\
                      text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (content_type, openmetrics) = all.scrape(Some(prometheus)).await;
    assert_eq!(content_type, "application/openmetrics-text; version=1.0.0; charset=utf-8");
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    assert!(openmetrics.contains("# TYPE dynamicproxy_proxy_requests counter\n"), "{openmetrics}");
}

/// Every `dynamicproxy_…` metric name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("dynamicproxy_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[tokio::test]
async fn every_metric_the_alerts_and_dashboard_name_is_scraped() {
    let redis = RedisServer::start();
    let all = All::start(&redis).await;
    all.scrape(None).await;
    // Labelled families appear once a label is used: one upstream failure and
    // one registrar exchange.
    let closed = free_port();
    let _: () = redis::cmd("HSET")
        .arg("prefix:gone")
        .arg(".*")
        .arg(format!("http://127.0.0.1:{closed}"))
        .query(&mut redis.client())
        .unwrap();
    // Over HTTPS: with a certificate configured, plain HTTP only redirects.
    let client = reqwest::Client::builder()
        .user_agent("dynamicproxy-tests")
        .danger_accept_invalid_certs(true)
        .resolve("gone.toolforge.org", ([127, 0, 0, 1], all.https).into())
        .build()
        .unwrap();
    let tool = format!("https://gone.toolforge.org:{}/", all.https);
    eventually(WAIT, "a 502 from a backend that is gone", || {
        let request = client.get(&tool);
        async move { (request.send().await.ok()?.status() == 502).then_some(()) }
    })
    .await;
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut registrar = tokio::net::TcpStream::connect(("127.0.0.1", all.registrar)).await.unwrap();
        registrar.write_all(b"nonsense\n").await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(WAIT, registrar.read_to_end(&mut answer)).await;
    }
    let (_, text) = all.scrape(None).await;
    // A family is present when it has samples or its TYPE line.
    let scraped: BTreeSet<String> = text
        .lines()
        .filter_map(|line| match line.strip_prefix("# TYPE ") {
            Some(typed) => typed.split(' ').next(),
            None if !line.starts_with('#') => line.split(['{', ' ']).next(),
            None => None,
        })
        .map(str::to_owned)
        .collect();

    for file in ["deploy/prometheus/alerts.yml", "deploy/grafana/dynamicproxy.json"] {
        let named = metric_names(&std::fs::read_to_string(repo(file)).unwrap());
        assert!(named.len() >= 8, "{file} names only {named:?}");
        let missing: Vec<&String> = named.iter().filter(|n| !scraped.contains(*n)).collect();
        assert!(missing.is_empty(), "{file} names metrics that /metrics lacks: {missing:?}\n{text}");
    }

    // The certificate's expiry is exported as openssl reads it.
    let enddate = Command::new("openssl").args(["x509", "-noout", "-enddate", "-in"]).arg(&all.cert).output().unwrap();
    let enddate = String::from_utf8_lossy(&enddate.stdout).trim().trim_start_matches("notAfter=").to_string();
    let epoch = Command::new("date").args(["-u", "+%s", "-d", &enddate]).output().unwrap();
    let epoch = String::from_utf8_lossy(&epoch.stdout).trim().to_string();
    let sample =
        format!("dynamicproxy_proxy_certificate_not_after_seconds{{path=\"{}\"}} {epoch}\n", all.cert.display());
    assert!(text.contains(&sample), "expected {sample}in\n{text}");
}
