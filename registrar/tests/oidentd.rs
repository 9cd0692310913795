//! Against a real ident daemon: Debian's oidentd identifies a client that
//! runs as a real Unix user `tools.<name>`. Needs root (to create the user
//! and switch to it); skipped with a printed reason otherwise.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{CLIENT_DEADLINE, Harness, user};
use dynamicproxy_registrar::Config;
use dynamicproxy_registrar::connection::NOT_TOOL;
use dynamicproxy_test_support::{eventually, free_port};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

const TOOL: &str = "oidtest";

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|l| l.strip_prefix("Uid:")).map(|ids| ids.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

/// Creates the Unix user if it does not exist yet (another run may have made it).
async fn ensure_user(name: &str) {
    let exists = |name: &str| {
        let name = name.to_string();
        async move {
            Command::new("id")
                .arg("-u")
                .arg(name)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await
                .unwrap()
                .success()
        }
    };
    if exists(name).await {
        return;
    }
    let status = Command::new("useradd").args(["-M", "-s", "/usr/sbin/nologin", name]).status().await.unwrap();
    assert!(status.success() || exists(name).await, "useradd {name} failed: {status}");
}

/// oidentd in the foreground on `port`, killed when dropped.
struct Oidentd {
    port: u16,
    _child: Child,
}

impl Oidentd {
    async fn start() -> Self {
        let port = free_port();
        let child = Command::new("oidentd")
            .args(["-i", "-S", "-p", &port.to_string(), "-a", "127.0.0.1"])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("oidentd is not installed: apt-get install -y oidentd");
        eventually(Duration::from_secs(10), "oidentd to accept connections", || async move {
            TcpStream::connect(("127.0.0.1", port)).await.ok().map(drop)
        })
        .await;
        Oidentd { port, _child: child }
    }
}

/// Runs the deployed client's exchange from bash (`/dev/tcp`) as Unix user `as_user`.
async fn client(as_user: &str, port: u16, request: &str) -> String {
    client_to(as_user, "127.0.0.1", port, request).await
}

/// Like [`client`], to the registrar at `ip`.
async fn client_to(as_user: &str, ip: &str, port: u16, request: &str) -> String {
    let script = format!("exec 3<>/dev/tcp/{ip}/{port} && printf '%s' \"$1\" >&3 && cat <&3");
    let run = Command::new("runuser")
        .args(["-u", as_user, "--", "/bin/bash", "-c", &script, "client", request])
        .stderr(Stdio::inherit())
        .output();
    let output = tokio::time::timeout(CLIENT_DEADLINE, run).await.expect("client hung").unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The tool account and a running oidentd, or `None` (with the reason
/// printed) when not root: creating the user and running a client as it need root.
async fn real_ident() -> Option<(String, Oidentd)> {
    if !is_root() {
        eprintln!("skipped: creating the Unix user tools.{TOOL} and running a client as it needs root");
        return None;
    }
    let account = format!("tools.{TOOL}");
    ensure_user(&account).await;
    Some((account, Oidentd::start().await))
}

/// Points the registrar at the real daemon instead of the harness's scripted ident server.
fn use_daemon(config: &mut Config, oidentd: &Oidentd) {
    config.ident_port = oidentd.port;
    config.ident_timeout = Duration::from_secs(3);
    config.exchange_timeout = Duration::from_secs(6);
}

#[tokio::test(flavor = "multi_thread")]
async fn oidentd_identifies_a_real_tool_account() {
    let Some((account, oidentd)) = real_ident().await else { return };
    let h = Harness::start(user("unused"), |c| use_daemon(c, &oidentd)).await;
    let port = h.addr.port();

    assert_eq!(client(&account, port, "register\n.*\nhttp://web.example:8000\n").await, "ok");
    assert_eq!(h.hash(&format!("prefix:{TOOL}")).get(".*").map(String::as_str), Some("http://web.example:8000"));

    assert_eq!(client(&account, port, "unregister\n.*\n").await, "ok");
    assert!(h.keys().is_empty(), "{:?}", h.keys());

    // root is a real user too, but not a tool account.
    assert_eq!(client("root", port, "register\n.*\nhttp://web.example:8000\n").await, NOT_TOOL);
    assert!(h.keys().is_empty());
    assert!(h.ident.queries.lock().unwrap().is_empty(), "the scripted ident server was asked");
}

#[tokio::test(flavor = "multi_thread")]
async fn oidentd_identifies_a_client_of_a_second_address() {
    let Some((account, oidentd)) = real_ident().await else { return };
    // The registrar on 127.0.0.2, the client connecting from 127.0.0.1:
    // oidentd finds the connection only if asked from 127.0.0.2.
    let h = Harness::start_on("127.0.0.2", user("unused"), |c| use_daemon(c, &oidentd)).await;

    let reply = client_to(&account, "127.0.0.2", h.addr.port(), "register\n.*\nhttp://web.example:8000\n").await;

    assert_eq!(reply, "ok");
    assert_eq!(h.hash(&format!("prefix:{TOOL}")).get(".*").map(String::as_str), Some("http://web.example:8000"));
}
