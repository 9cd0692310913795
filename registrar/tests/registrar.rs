//! End-to-end: the registrar in-process, a real redis-server, a test ident
//! server, and clients speaking the deployed wire protocol.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Harness, IdentScript, by_port, exchange_from, fixed, silent, user};
use dynamicproxy_registrar::connection::{AUTH_FAILED, NOT_TOOL};
use dynamicproxy_test_support::eventually;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn register_sets_the_route() {
    let h = Harness::start(user("tools.foo"), |_| {}).await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let client_port = socket.local_addr().unwrap().port();

    let reply = exchange_from(socket, h.addr, b"register\n.*\nhttp://Tools-Webgrid-1.example:33555\n", false).await;

    assert_eq!(reply, "ok");
    assert_eq!(h.hash("prefix:foo"), map(&[(".*", "http://tools-webgrid-1.example:33555")]));
    assert_eq!(h.keys(), ["prefix:foo"]);
    // RFC 1413: the client's port first, then ours.
    assert_eq!(*h.ident.queries.lock().unwrap(), [format!("{client_port}, {}\r\n", h.addr.port())]);
}

#[tokio::test(flavor = "multi_thread")]
async fn ident_is_asked_from_the_address_the_client_connected_to() {
    // The registrar on 127.0.0.2, the client and its ident service on
    // 127.0.0.1: left to itself the kernel would send the query from
    // 127.0.0.1, and an ident daemon matching on the querier's address
    // would find no such connection.
    let h = Harness::start_on("127.0.0.2", user("tools.foo"), |_| {}).await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();

    let reply = exchange_from(socket, h.addr, b"register\n.*\nhttp://h:1\n", false).await;

    assert_eq!(reply, "ok");
    let sources = h.ident.sources.lock().unwrap().clone();
    assert_eq!(sources.len(), 1, "{sources:?}");
    assert_eq!(sources[0].ip(), h.addr.ip());
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv4_clients_of_a_dual_stack_listener_are_identified() {
    if std::net::TcpListener::bind("[::]:0").is_err() {
        eprintln!("skipped: no IPv6 on this host");
        return;
    }
    // Both ends are seen as IPv4-mapped IPv6 addresses; the ident query must
    // still go out over IPv4, from 127.0.0.1.
    let h = Harness::start_on("::", user("tools.foo"), |_| {}).await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], h.addr.port()));

    let reply = exchange_from(TcpSocket::new_v4().unwrap(), addr, b"register\n.*\nhttp://h:1\n", false).await;

    assert_eq!(reply, "ok");
    let sources = h.ident.sources.lock().unwrap().clone();
    assert_eq!(sources.iter().map(|s| s.ip().to_string()).collect::<Vec<_>>(), ["127.0.0.1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn register_accepts_crlf_and_overwrites() {
    let h = Harness::start(user("tools.foo"), |_| {}).await;
    assert_eq!(h.send(b"register\r\n/api.*\r\nhttp://10.0.0.1:8000\r\n").await, "ok");
    assert_eq!(h.send(b"register\n/api.*\nhttps://10.0.0.2:8443\n").await, "ok");
    assert_eq!(h.send(b"register\n.*\nhttp://10.0.0.3:80\n").await, "ok");
    assert_eq!(h.hash("prefix:foo"), map(&[("/api.*", "https://10.0.0.2:8443"), (".*", "http://10.0.0.3:80")]));
}

#[tokio::test(flavor = "multi_thread")]
async fn register_canonical_sets_route_and_redirect() {
    let h = Harness::start(user("tools.foo"), |_| {}).await;
    let reply = h.send(b"registerCanonical\n.*\nhttp://host.example:4000\n").await;
    assert_eq!(reply, "ok");
    assert_eq!(h.hash("prefix:foo"), map(&[(".*", "http://host.example:4000")]));
    assert_eq!(h.hash("redirect:foo"), map(&[(".*", "foo.toolforge.example")]));
}

#[tokio::test(flavor = "multi_thread")]
async fn unregister_removes_route_and_redirect() {
    let h = Harness::start(user("tools.foo"), |_| {}).await;
    assert_eq!(h.send(b"registerCanonical\n.*\nhttp://host.example:4000\n").await, "ok");
    assert_eq!(h.send(b"register\n/keep.*\nhttp://host.example:4001\n").await, "ok");

    assert_eq!(h.send(b"unregister\n.*\n").await, "ok");

    assert_eq!(h.hash("prefix:foo"), map(&[("/keep.*", "http://host.example:4001")]));
    assert_eq!(h.keys(), ["prefix:foo"]);
    // Unregistering what is not there is still ok, as the original did.
    assert_eq!(h.send(b"unregister\n/never.*\n").await, "ok");
    // A legacy pattern this regex engine refuses can still be removed.
    redis::cmd("HSET").arg("prefix:foo").arg("(?!x).*").arg("http://h:1").exec(&mut h.redis.client()).unwrap();
    assert_eq!(h.send(b"unregister\n(?!x).*\n").await, "ok");
    assert_eq!(h.hash("prefix:foo"), map(&[("/keep.*", "http://host.example:4001")]));
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_command_fails_and_writes_nothing() {
    let h = Harness::start(user("tools.foo"), |_| {}).await;
    for request in [&b"list\n"[..], b"Register\n.*\nhttp://h:1\n", b"\n", b"registercanonical\n.*\nhttp://h:1\n"] {
        assert_eq!(h.send(request).await, "fail", "{:?}", String::from_utf8_lossy(request));
    }
    assert!(h.keys().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_input_fails_with_reason_and_writes_nothing() {
    let h = Harness::start(user("tools.foo"), |_| {}).await;
    let long_route = format!("register\n/{}\nhttp://h:1\n", "a".repeat(1024));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"register\n(?!x)\nhttp://h:1\n".to_vec(), "fail: invalid route pattern \"(?!x)\": "),
        (b"register\n(\nhttp://h:1\n".to_vec(), "fail: invalid route pattern \"(\""),
        (b"register\n\nhttp://h:1\n".to_vec(), "fail: empty route"),
        (b"register\n.*\nh:1\n".to_vec(), "fail: invalid backend url \"h:1\": must start with http:// or https://"),
        (b"register\n.*\nhttp://h\n".to_vec(), "fail: invalid backend url \"http://h\": must name a port"),
        (b"register\n.*\nhttp://h:0\n".to_vec(), "fail: invalid backend url \"http://h:0\": port must be 1-65535"),
        (b"register\n.*\nhttp://h:65536\n".to_vec(), "fail: invalid backend url \"http://h:65536\": port must be"),
        (b"register\n.*\nftp://h:21\n".to_vec(), "fail: invalid backend url \"ftp://h:21\""),
        (b"register\n.*\nhttp://h:1/path\n".to_vec(), "fail: invalid backend url \"http://h:1/path\""),
        (b"registerCanonical\n.*\nhttp://a b:1\n".to_vec(), "fail: invalid backend url"),
        (b"unregister\n\n".to_vec(), "fail: empty route"),
        (long_route.into_bytes(), "fail: line longer than 1024 bytes"),
        (b"register\n\xff.*\nhttp://h:1\n".to_vec(), "fail: line is not valid UTF-8"),
    ];
    for (request, expected) in cases {
        let reply = h.send(&request).await;
        assert!(reply.starts_with(expected), "{:?}: got {reply:?}", String::from_utf8_lossy(&request));
    }
    assert!(h.keys().is_empty(), "{:?}", h.keys());
}

#[tokio::test(flavor = "multi_thread")]
async fn over_long_line_is_refused_without_waiting_for_its_end() {
    let h = Harness::start(user("tools.foo"), |c| c.exchange_timeout = Duration::from_secs(20)).await;
    // No newline ever comes: the answer must not wait for the 20 s exchange timeout.
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    stream.write_all(b"register\n").await.unwrap();
    stream.write_all(&[b'a'; 4000]).await.unwrap();
    let mut reply = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut reply);
    let _ = tokio::time::timeout(common::CLIENT_DEADLINE, read).await.expect("no answer");
    assert_eq!(String::from_utf8_lossy(&reply), "fail: line longer than 1024 bytes");
    assert!(h.keys().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_lines_fail_when_the_client_stops_sending() {
    let h = Harness::start(user("tools.foo"), |_| {}).await;
    assert_eq!(h.send_and_close(b"register\n.*\n").await, "fail: missing destination");
    assert_eq!(h.send_and_close(b"unregister\n").await, "fail: missing route");
    assert_eq!(h.send_and_close(b"").await, "fail: missing command");
    // The last line without its newline still counts, as with Python's readline.
    assert_eq!(h.send_and_close(b"register\n.*\nhttp://h:1").await, "ok");
    assert_eq!(h.keys(), ["prefix:foo"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_client_times_out() {
    let h = Harness::start(user("tools.foo"), |c| c.exchange_timeout = Duration::from_secs(1)).await;
    assert_eq!(h.send(b"").await, "fail: timeout");
    assert_eq!(h.send(b"register\n.*\nhttp://h").await, "fail: timeout");
    assert!(h.keys().is_empty());
    let text = h.metrics_text();
    assert!(text.contains(r#"registrar_commands_total{command="none",result="timeout"} 1"#), "{text}");
    assert!(text.contains(r#"registrar_commands_total{command="register",result="timeout"} 1"#), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn user_outside_the_project_is_refused() {
    for user_name in ["root", "tools", "toolsfoo", "project.foo"] {
        let h = Harness::start(user(user_name), |_| {}).await;
        assert_eq!(h.send(b"register\n.*\nhttp://h:1\n").await, NOT_TOOL, "{user_name}");
        assert!(h.keys().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn project_prefix_is_configurable() {
    let h = Harness::start(user("proj.bar"), |c| c.project_prefix = "proj.".into()).await;
    assert_eq!(h.send(b"register\n.*\nhttp://h:1\n").await, "ok");
    assert_eq!(h.keys(), ["prefix:bar"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_tool_name_is_refused() {
    for user_name in ["tools.", "tools.Foo", "tools.-x", "tools.a/b"] {
        let h = Harness::start(user(user_name), |_| {}).await;
        let reply = h.send(b"register\n.*\nhttp://h:1\n").await;
        assert!(reply.starts_with("fail: invalid tool name"), "{user_name}: {reply:?}");
        assert!(h.keys().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ident_failures_refuse_authentication() {
    let scripts = [
        ("error", fixed("1,2:ERROR:NO-USER\r\n")),
        (
            "error for the right ports",
            Arc::new(|c: u16, s: u16| Some(format!("{c} , {s} : ERROR : HIDDEN-USER\r\n"))) as IdentScript,
        ),
        ("garbage", fixed("hello, I am not an ident server\r\n")),
        ("binary garbage", fixed("\u{1}\u{2}\u{3}\r\n")),
        ("another connection's ports", fixed("1234, 8282 : USERID : UNIX : tools.foo\r\n")),
        ("empty reply", fixed("")),
        ("never answers", silent()),
    ];
    for (what, script) in scripts {
        let h = Harness::start(script, |c| c.ident_timeout = Duration::from_millis(300)).await;
        assert_eq!(h.send(b"register\n.*\nhttp://h:1\n").await, AUTH_FAILED, "{what}");
        assert!(h.keys().is_empty(), "{what}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_ident_service_refuses_authentication() {
    let closed_port = dynamicproxy_test_support::free_port();
    let h = Harness::start(user("tools.foo"), |c| c.ident_port = closed_port).await;
    assert_eq!(h.send(b"register\n.*\nhttp://h:1\n").await, AUTH_FAILED);
    assert!(h.keys().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn allow_list_restricts_destinations() {
    let h = Harness::start(user("tools.foo"), |c| {
        c.allowed_destinations = vec!["172.16.0.0/21".into(), "eqiad1.wikimedia.cloud".into()];
    })
    .await;
    for refused in ["http://172.16.8.1:80", "http://127.0.0.1:80", "http://evil.example:80", "http://[::1]:80"] {
        let reply = h.send(format!("register\n.*\n{refused}\n").as_bytes()).await;
        assert_eq!(reply, "fail: destination not allowed", "{refused}");
    }
    let reply = h.send(b"registerCanonical\n.*\nhttp://wikimedia.cloud:80\n").await;
    assert_eq!(reply, "fail: destination not allowed");
    assert!(h.keys().is_empty());

    assert_eq!(h.send(b"register\n/a.*\nhttp://172.16.1.2:8000\n").await, "ok");
    assert_eq!(h.send(b"register\n/b.*\nhttp://web-1.tools.eqiad1.wikimedia.cloud:8000\n").await, "ok");
    assert_eq!(h.hash("prefix:foo").len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_down_fails_and_the_server_stays_up() {
    let mut h = Harness::start(user("tools.foo"), |c| c.exchange_timeout = Duration::from_secs(2)).await;
    assert_eq!(h.send(b"register\n.*\nhttp://h:1\n").await, "ok");

    h.redis.stop();
    assert_eq!(h.send(b"register\n/x.*\nhttp://h:2\n").await, "fail: route table unavailable");
    assert_eq!(h.send(b"registerCanonical\n/x.*\nhttp://h:2\n").await, "fail: route table unavailable");
    assert_eq!(h.send(b"unregister\n.*\n").await, "fail: route table unavailable");

    h.redis.restart();
    // The store reconnects on the next command.
    let harness = &h;
    let reply = eventually(Duration::from_secs(10), "registration after redis restart", || async move {
        let reply = harness.send(b"register\n/y.*\nhttp://h:3\n").await;
        (reply == "ok").then_some(reply)
    })
    .await;
    assert_eq!(reply, "ok");
    assert_eq!(h.hash("prefix:foo"), map(&[("/y.*", "http://h:3")]));
    // At least the refusal above; retries while the store waits to reconnect may add more.
    assert!(h.metrics_text().contains(r#"registrar_commands_total{command="register",result="unavailable"} "#));
}

#[tokio::test(flavor = "multi_thread")]
async fn excess_connections_are_told_busy() {
    let h = Harness::start(user("tools.foo"), |c| {
        c.max_connections = 1;
        c.exchange_timeout = Duration::from_secs(20);
    })
    .await;
    // One client holds the only slot by saying nothing.
    let holder = TcpStream::connect(h.addr).await.unwrap();
    let metrics = &h.metrics;
    eventually(Duration::from_secs(10), "the first connection to be served", || async move {
        (metrics.connections.get() == 1).then_some(())
    })
    .await;

    assert_eq!(h.send(b"register\n.*\nhttp://h:1\n").await, "fail: busy");
    assert!(h.keys().is_empty());

    drop(holder);
    eventually(Duration::from_secs(10), "the slot to be free again", || async move {
        (metrics.connections.get() == 0).then_some(())
    })
    .await;
    assert_eq!(h.send(b"register\n.*\nhttp://h:1\n").await, "ok");
    assert!(h.metrics_text().contains(r#"registrar_commands_total{command="none",result="busy"} 1"#));
}

#[tokio::test(flavor = "multi_thread")]
async fn five_hundred_concurrent_registrations_all_land() {
    const TOOLS: usize = 500;
    let users = Arc::new(Mutex::new(HashMap::new()));
    let h = Harness::start(by_port(users.clone()), |c| {
        c.ident_timeout = Duration::from_secs(5);
        c.exchange_timeout = Duration::from_secs(10);
    })
    .await;
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..TOOLS {
        // Bind first so the ident server knows the port before the registrar asks.
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        users.lock().unwrap().insert(socket.local_addr().unwrap().port(), format!("tools.tool{i}"));
        let request = format!("register\n.*\nhttp://web-{i}.example:{}\n", 10000 + i);
        let addr = h.addr;
        clients.spawn(async move { (i, exchange_from(socket, addr, request.as_bytes(), false).await) });
    }
    while let Some(done) = clients.join_next().await {
        let (i, reply) = done.unwrap();
        assert_eq!(reply, "ok", "tool{i}");
    }
    let keys = h.keys();
    assert_eq!(keys.len(), TOOLS);
    for i in [0, 1, 250, 499] {
        assert_eq!(
            h.hash(&format!("prefix:tool{i}")),
            map(&[(".*", &format!("http://web-{i}.example:{}", 10000 + i))])
        );
    }
    assert!(
        h.metrics_text().contains(&format!(r#"registrar_commands_total{{command="register",result="ok"}} {TOOLS}"#))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_commands_by_result() {
    let h = Harness::start(user("tools.foo"), |_| {}).await;
    h.send(b"register\n.*\nhttp://h:1\n").await;
    h.send(b"registerCanonical\n.*\nhttp://h:1\n").await;
    h.send(b"unregister\n.*\n").await;
    h.send(b"nonsense\n").await;
    h.send(b"register\n(\nhttp://h:1\n").await;
    h.send_and_close(b"unregister\n").await;
    h.send(format!("registerCanonical\n{}\n", "a".repeat(2000)).as_bytes()).await;
    let text = h.metrics_text();
    for line in [
        r#"registrar_commands_total{command="register",result="ok"} 1"#,
        r#"registrar_commands_total{command="registerCanonical",result="ok"} 1"#,
        r#"registrar_commands_total{command="unregister",result="ok"} 1"#,
        r#"registrar_commands_total{command="unknown",result="unknown_command"} 1"#,
        r#"registrar_commands_total{command="register",result="invalid"} 1"#,
        // Refused before the request was whole, still under the command it named.
        r#"registrar_commands_total{command="unregister",result="invalid"} 1"#,
        r#"registrar_commands_total{command="registerCanonical",result="invalid"} 1"#,
    ] {
        assert!(text.contains(line), "{line} not in\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_stops_accepting_and_returns() {
    let mut h = Harness::start(user("tools.foo"), |_| {}).await;
    assert_eq!(h.send(b"register\n.*\nhttp://h:1\n").await, "ok");
    h.shutdown.cancel();
    let task = h.task.take().unwrap();
    let result = tokio::time::timeout(common::CLIENT_DEADLINE, task).await.expect("run did not return");
    assert!(matches!(result, Ok(Ok(()))));
    assert!(TcpStream::connect(h.addr).await.is_err(), "still accepting after shutdown");
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_lets_an_open_exchange_finish() {
    let mut h = Harness::start(user("tools.foo"), |c| c.exchange_timeout = Duration::from_secs(20)).await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    stream.write_all(b"register\n.*\n").await.unwrap();
    let metrics = &h.metrics;
    eventually(Duration::from_secs(10), "the connection to be served", || async move {
        (metrics.connections.get() == 1).then_some(())
    })
    .await;

    h.shutdown.cancel();
    let addr = h.addr;
    eventually(Duration::from_secs(10), "the listener to close", || async move {
        TcpStream::connect(addr).await.is_err().then_some(())
    })
    .await;
    stream.write_all(b"http://h:1\n").await.unwrap();
    let mut reply = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut reply);
    let _ = tokio::time::timeout(common::CLIENT_DEADLINE, read).await.expect("no answer");

    assert_eq!(String::from_utf8_lossy(&reply), "ok");
    assert_eq!(h.hash("prefix:foo"), map(&[(".*", "http://h:1")]));
    let task = h.task.take().unwrap();
    let result = tokio::time::timeout(common::CLIENT_DEADLINE, task).await.expect("run did not return");
    assert!(matches!(result, Ok(Ok(()))));
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_config_is_refused_by_run() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(dynamicproxy_registrar::Metrics::new(&mut registry));
    let store = Arc::new(dynamicproxy_redis::RouteStore::new("redis://127.0.0.1:1/0".parse().unwrap()));
    let config = dynamicproxy_registrar::Config { max_connections: 0, ..Default::default() };
    let err = dynamicproxy_registrar::run(config, listener, store, metrics, Default::default()).await.unwrap_err();
    assert_eq!(err.to_string(), "invalid [registrar] max_connections = 0: must be 1-1048576");
}
