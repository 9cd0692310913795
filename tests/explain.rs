//! Explain and provenance end to end: routes written by the registrar (over
//! its wire protocol, with an ident server), by kube-sync (from a fake
//! Kubernetes API server) and by the `routes` CLI, then explained by the
//! proxy's `GET /explain`, by `dynamicproxy routes explain`, by
//! `routes history` and by `/list?detail=1`, all through the real binary.

#[path = "../kube-sync/tests/fake_apiserver/mod.rs"]
mod fake_apiserver;

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use dynamicproxy_test_support::{RedisServer, eventually, free_port};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(20);

/// An ident server (RFC 1413) that names every connection `tools.<tool>`.
async fn ident_server(user: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                let mut query = String::new();
                if stream.read_line(&mut query).await.is_ok() {
                    let reply = format!("{} : USERID : UNIX : {user}\r\n", query.trim());
                    let _ = stream.get_mut().write_all(reply.as_bytes()).await;
                }
            });
        }
    });
    port
}

/// `dynamicproxy all` with a registrar, kube-sync on the fake API server, and loopback listeners.
struct All {
    child: Child,
    admin: u16,
    list: u16,
    registrar: u16,
    _dir: tempfile::TempDir,
}

impl All {
    fn start(redis: &RedisServer, ident_port: u16, kubeconfig: &str) -> All {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig_file = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig_file, kubeconfig).unwrap();
        let (admin, list, registrar) = (free_port(), free_port(), free_port());
        let mut args: Vec<String> = vec!["all".into(), "--redis-url".into(), redis.url()];
        for (flag, port) in [
            ("--http-listen", free_port()),
            ("--list-listen", list),
            ("--admin-listen", admin),
            ("--listen", registrar),
        ] {
            args.extend([flag.to_string(), format!("127.0.0.1:{port}")]);
        }
        args.extend(["--ident-port".into(), ident_port.to_string()]);
        args.extend(["--kubeconfig".into(), kubeconfig_file.display().to_string()]);
        let child = Command::new(env!("CARGO_BIN_EXE_dynamicproxy"))
            .args(&args)
            .env_remove("DYNAMICPROXY_REDIS_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dynamicproxy all");
        All { child, admin, list, registrar, _dir: dir }
    }

    /// Sends one registrar request and returns its reply.
    async fn register(&self, request: &str) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.registrar)).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut reply = String::new();
        tokio::time::timeout(WAIT, stream.read_to_string(&mut reply)).await.unwrap().unwrap();
        reply
    }
}

impl Drop for All {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn routes(redis: &RedisServer, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dynamicproxy"))
        .arg("routes")
        .args(args)
        .args(["--redis-url", &redis.url()])
        .env_remove("DYNAMICPROXY_REDIS_URL")
        .env("SUDO_USER", "alice")
        .output()
        .expect("run dynamicproxy routes")
}

fn stdout(output: &Output) -> String {
    assert!(output.status.success(), "{:?}: {}", output.status, String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn explain(client: &reqwest::Client, admin: u16, url: &str) -> String {
    let response = client
        .get(format!("http://127.0.0.1:{admin}/explain"))
        .query(&[("url", url)])
        .send()
        .await
        .expect("admin API answers");
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

/// Waits until the proxy's explanation of `url` contains `expected`, and returns it.
async fn explained(client: &reqwest::Client, admin: u16, url: &str, expected: &str) -> String {
    let mut last = String::new();
    let found = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(response) =
                client.get(format!("http://127.0.0.1:{admin}/explain")).query(&[("url", url)]).send().await
                && let Ok(text) = response.text().await
            {
                if text.contains(expected) {
                    return text;
                }
                last = text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("explain {url} never said {expected:?}; last:\n{last}"))
}

/// Lines of an explanation without the one that depends on the second it was asked.
fn stable(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.starts_with("written at:")).collect()
}

#[tokio::test]
async fn explain_and_history_name_each_writer() {
    let redis = RedisServer::start();
    let ident = ident_server("tools.gridtool").await;
    let api = fake_apiserver::FakeApiServer::start().await;
    api.apply(fake_apiserver::service("tool-kubetool", "kubetool", "10.96.0.7", &[("http", 8000)]));
    let all = All::start(&redis, ident, &api.kubeconfig());
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();

    // The registrar: a grid webservice registers over the wire protocol.
    let reply = eventually(WAIT, "registrar answers", || async {
        let stream = TcpStream::connect(("127.0.0.1", all.registrar)).await.ok()?;
        drop(stream);
        Some(all.register("register\n.*\nhttp://10.0.0.5:8000\n").await)
    })
    .await;
    assert_eq!(reply, "ok");
    // The CLI, run through sudo by alice.
    stdout(&routes(&redis, &["set", "clitool", "/api.*", "http://10.0.0.9:80"]));

    let grid = explained(&client, all.admin, "https://gridtool.toolforge.org/page", "decision: proxy to").await;
    for line in [
        "host form: tool subdomain",
        "tool: gridtool",
        "table: prefix:gridtool: 1 valid route(s)",
        "tried: prefix:gridtool `.*` in /page -> http://10.0.0.5:8000: MATCH",
        "decision: proxy to http://10.0.0.5:8000 (route `.*` of prefix:gridtool)",
        "written by: registrar (tools.gridtool from 127.0.0.1:",
        "written at: 20",
    ] {
        assert!(grid.contains(line), "missing {line:?} in:\n{grid}");
    }
    let kube = explained(&client, all.admin, "https://kubetool.toolforge.org/", "decision: proxy to").await;
    assert!(kube.contains("written by: kube-sync (Service tool-kubetool/kubetool)"), "{kube}");
    let cli = explained(&client, all.admin, "http://tools.wmflabs.org/clitool/api/v1?x=1", "decision: proxy to").await;
    for line in [
        "host form: legacy path",
        "tool: clitool",
        "tried: prefix:clitool `/api.*` in /api/v1 -> http://10.0.0.9:80: MATCH",
        "written by: cli (operator alice)",
    ] {
        assert!(cli.contains(line), "missing {line:?} in:\n{cli}");
    }

    // The CLI explains the same way, from Redis.
    let from_cli = stdout(&routes(&redis, &["explain", "http://tools.wmflabs.org/clitool/api/v1?x=1"]));
    assert_eq!(stable(&from_cli), stable(&cli));

    // No match, unknown tool, redirect: each fallback says why.
    let miss = explain(&client, all.admin, "https://clitool.toolforge.org/other").await;
    for line in [
        "tried: prefix:clitool `/api.*` in /other -> http://10.0.0.9:80: no match",
        "decision: 503 \"no webservice\" page (X-Dynamicproxy-Reason: no-route)",
        "reason: no route of prefix:clitool matched and no prefix:admin route matched, and no [proxy] default_backend",
    ] {
        assert!(miss.contains(line), "missing {line:?} in:\n{miss}");
    }
    let unknown = explain(&client, all.admin, "https://nosuch.toolforge.org/").await;
    assert!(unknown.contains("table: prefix:nosuch: absent (no routes in Redis)"), "{unknown}");
    assert!(unknown.contains("reason: the tool has no routes (prefix:nosuch does not exist)"), "{unknown}");
    assert!(!unknown.contains("tried:"), "{unknown}");
    assert_eq!(all.register("registerCanonical\n/canon.*\nhttp://10.0.0.5:8001\n").await, "ok");
    let moved =
        explained(&client, all.admin, "https://tools.wmflabs.org/gridtool/x?q=1", "decision: 307 redirect").await;
    assert!(moved.contains("decision: 307 redirect to https://gridtool.toolforge.org/x?q=1"), "{moved}");
    assert!(moved.contains("redirect written by: registrar (tools.gridtool from 127.0.0.1:"), "{moved}");

    // JSON for scripts.
    let json: serde_json::Value = client
        .get(format!("http://127.0.0.1:{}/explain", all.admin))
        .query(&[("url", "https://kubetool.toolforge.org/")])
        .header("Accept", "application/json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(json["decision"]["via"], "tool-host");
    assert_eq!(json["route"]["writer"], "kube-sync");

    // /list is what it always was; /list?detail=1 adds each route's source and age.
    let list = client.get(format!("http://127.0.0.1:{}/list", all.list)).send().await.unwrap();
    assert_eq!(list.headers()["content-type"], "application/json");
    assert_eq!(
        list.text().await.unwrap(),
        r#"{"clitool": {"status": "active"}, "gridtool": {"status": "active"}, "kubetool": {"status": "active"}}"#
    );
    let detail: serde_json::Value =
        client.get(format!("http://127.0.0.1:{}/list?detail=1", all.list)).send().await.unwrap().json().await.unwrap();
    let grid_routes = detail["gridtool"]["routes"].as_array().unwrap();
    assert_eq!(detail["gridtool"]["status"], "active");
    assert_eq!(grid_routes.len(), 2);
    assert!(grid_routes.iter().all(|r| r["writer"] == "registrar" && r["age_seconds"].as_u64().is_some()), "{detail}");
    assert_eq!(detail["kubetool"]["routes"][0]["written_by"], "kube-sync (Service tool-kubetool/kubetool)");
    assert_eq!(detail["clitool"]["routes"][0]["written_by"], "cli (operator alice)");

    // History: every write, oldest last, with its writer; deletes too.
    stdout(&routes(&redis, &["delete", "clitool", "/api.*"]));
    let history = stdout(&routes(&redis, &["history", "clitool"]));
    let lines: Vec<&str> = history.lines().collect();
    assert_eq!(lines.len(), 3, "{history}");
    assert!(lines[0].starts_with("TIME") && lines[0].contains("WRITER"), "{history}");
    for (line, action) in lines[1..].iter().zip(["set", "delete"]) {
        let columns: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(columns[1..5], [action, "/api.*", "http://10.0.0.9:80", "cli"], "{history}");
        assert!(line.ends_with("cli (operator alice)"), "{history}");
    }
    let grid_history = stdout(&routes(&redis, &["history", "gridtool"]));
    assert!(grid_history.contains("set-canonical  /canon.*"), "{grid_history}");
    let kube_history = stdout(&routes(&redis, &["history", "kubetool"]));
    assert!(kube_history.contains("kube-sync (Service tool-kubetool/kubetool)"), "{kube_history}");
    let gone = explained(&client, all.admin, "http://tools.wmflabs.org/clitool/api/v1", "absent").await;
    assert!(gone.contains("table: prefix:clitool: absent"), "{gone}");
    assert!(gone.contains("delete `/api.*` -> http://10.0.0.9:80 by cli (operator alice)"), "{gone}");
    assert!(gone.lines().any(|l| l.starts_with("last change: 20")), "{gone}");
}
