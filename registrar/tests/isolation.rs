//! End-to-end: what a tool may not register and who may not connect
//! (SPEC §5 point 3): denied destination networks, the per-tool route cap,
//! and the client allow-list checked before any ident query.

mod common;

use std::collections::HashMap;

use common::{Harness, exchange_from, user};
use dynamicproxy_registrar::Config;
use dynamicproxy_registrar::connection::{CLIENT_NOT_ALLOWED, DESTINATION_NOT_ALLOWED, TOO_MANY_ROUTES};
use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;

fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The harness with the registrar's own default denied networks.
fn default_denied(config: &mut Config) {
    config.denied_destination_networks = Config::default().denied_destination_networks;
}

#[tokio::test(flavor = "multi_thread")]
async fn destinations_in_denied_networks_are_refused_by_default() {
    let h = Harness::start(user("tools.evil"), default_denied).await;
    for destination in [
        "http://127.0.0.1:9631",
        "http://127.1.2.3:80",
        "http://[::1]:9631",
        "http://[::ffff:127.0.0.1]:9631",
        "http://169.254.169.254:80",
        "http://[fe80::1]:80",
        "http://0.0.0.0:9631",
        "https://[::]:443",
        "http://localhost:9631",
        "http://LOCALHOST:9631",
    ] {
        for command in ["register", "registerCanonical"] {
            let reply = h.send(format!("{command}\n.*\n{destination}\n").as_bytes()).await;
            assert_eq!(reply, DESTINATION_NOT_ALLOWED, "{command} {destination}");
        }
    }
    assert!(h.keys().is_empty(), "{:?}", h.keys());
    let text = h.metrics_text();
    assert!(text.contains(r#"registrar_commands_total{command="register",result="denied_destination"} 10"#), "{text}");
    assert!(
        text.contains(r#"registrar_commands_total{command="registerCanonical",result="denied_destination"} 10"#),
        "{text}"
    );

    // Grid hosts and Kubernetes services are elsewhere, and stay allowed.
    assert_eq!(h.send(b"register\n.*\nhttp://172.16.0.5:8000\n").await, "ok");
    assert_eq!(h.send(b"registerCanonical\n/api.*\nhttp://[2001:db8::5]:8000\n").await, "ok");
    // A name that cannot be resolved is accepted: the proxy checks its
    // addresses again on every connection.
    assert_eq!(h.send(b"register\n/x.*\nhttp://no-such-host.invalid:8000\n").await, "ok");
    assert_eq!(
        h.hash("prefix:evil"),
        map(&[
            (".*", "http://172.16.0.5:8000"),
            ("/api.*", "http://[2001:db8::5]:8000"),
            ("/x.*", "http://no-such-host.invalid:8000")
        ])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denied_destination_cannot_replace_an_existing_route() {
    let h = Harness::start(user("tools.foo"), default_denied).await;
    assert_eq!(h.send(b"registerCanonical\n.*\nhttp://172.16.0.5:8000\n").await, "ok");
    assert_eq!(h.send(b"registerCanonical\n.*\nhttp://127.0.0.1:9631\n").await, DESTINATION_NOT_ALLOWED);
    assert_eq!(h.hash("prefix:foo"), map(&[(".*", "http://172.16.0.5:8000")]));
}

#[tokio::test(flavor = "multi_thread")]
async fn configured_denied_networks_replace_the_default() {
    let h = Harness::start(user("tools.foo"), |c| c.denied_destination_networks = vec!["10.0.0.0/8".into()]).await;
    assert_eq!(h.send(b"register\n.*\nhttp://10.1.2.3:80\n").await, DESTINATION_NOT_ALLOWED);
    assert_eq!(h.send(b"register\n.*\nhttp://127.0.0.1:80\n").await, "ok");
    assert_eq!(h.hash("prefix:foo"), map(&[(".*", "http://127.0.0.1:80")]));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_denied_list_allows_every_destination() {
    let h = Harness::start(user("tools.foo"), |c| c.denied_destination_networks = Vec::new()).await;
    assert_eq!(h.send(b"register\n.*\nhttp://127.0.0.1:9631\n").await, "ok");
    assert_eq!(h.send(b"register\n/l.*\nhttp://localhost:9631\n").await, "ok");
    assert_eq!(h.hash("prefix:foo").len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_beyond_the_cap_are_refused_and_replacing_stays_allowed() {
    let h = Harness::start(user("tools.foo"), |c| c.max_routes_per_tool = 3).await;
    for route in ["/a.*", "/b.*", "/c.*"] {
        assert_eq!(h.send(format!("register\n{route}\nhttp://h:1\n").as_bytes()).await, "ok", "{route}");
    }
    assert_eq!(h.send(b"register\n/d.*\nhttp://h:1\n").await, TOO_MANY_ROUTES);
    assert_eq!(h.send(b"registerCanonical\n/e.*\nhttp://h:1\n").await, TOO_MANY_ROUTES);
    assert_eq!(h.keys(), ["prefix:foo"], "a refused registerCanonical must not write its redirect");
    // Replacing an existing route does not add one.
    assert_eq!(h.send(b"register\n/a.*\nhttp://h:2\n").await, "ok");
    assert_eq!(h.send(b"registerCanonical\n/b.*\nhttp://h:2\n").await, "ok");
    assert_eq!(h.hash("prefix:foo"), map(&[("/a.*", "http://h:2"), ("/b.*", "http://h:2"), ("/c.*", "http://h:1")]));
    assert_eq!(h.hash("redirect:foo"), map(&[("/b.*", "foo.toolforge.example")]));
    // Room again after an unregister.
    assert_eq!(h.send(b"unregister\n/c.*\n").await, "ok");
    assert_eq!(h.send(b"register\n/d.*\nhttp://h:1\n").await, "ok");
    let text = h.metrics_text();
    assert!(text.contains(r#"registrar_commands_total{command="register",result="too_many_routes"} 1"#), "{text}");
    assert!(
        text.contains(r#"registrar_commands_total{command="registerCanonical",result="too_many_routes"} 1"#),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_regex_route_the_proxy_would_drop_for_the_tools_dfa_budget_is_refused() {
    let h = Harness::start(user("tools.foo"), |_| {}).await;
    // Each alone fits the tool's 256 KiB DFA budget; the two together do not,
    // and the proxy would drop the second when loading the tool.
    assert_eq!(h.send(b"register\nx[xy]{10}\nhttp://h:1\n").await, "ok");
    assert_eq!(h.send(b"register\ny[xy]{10}\nhttp://h:1\n").await, TOO_MANY_ROUTES);
    assert_eq!(h.send(b"registerCanonical\ny[xy]{10}\nhttp://h:1\n").await, TOO_MANY_ROUTES);
    assert_eq!(h.keys(), ["prefix:foo"], "a refused registerCanonical must not write its redirect");
    assert_eq!(h.hash("prefix:foo"), map(&[("x[xy]{10}", "http://h:1")]));
    // Literal routes take nothing from the budget, and replacing a route does not add one.
    assert_eq!(h.send(b"register\n/docs.*\nhttp://h:1\n").await, "ok");
    assert_eq!(h.send(b"register\nx[xy]{10}\nhttp://h:2\n").await, "ok");
    // Room again after an unregister.
    assert_eq!(h.send(b"unregister\nx[xy]{10}\n").await, "ok");
    assert_eq!(h.send(b"register\ny[xy]{10}\nhttp://h:1\n").await, "ok");
    assert_eq!(h.hash("prefix:foo"), map(&[("/docs.*", "http://h:1"), ("y[xy]{10}", "http://h:1")]));
    let text = h.metrics_text();
    assert!(text.contains(r#"registrar_commands_total{command="register",result="too_many_routes"} 1"#), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_default_cap_is_the_proxy_loaders_64() {
    let h = Harness::start(user("tools.foo"), |_| {}).await;
    for i in 0..64 {
        assert_eq!(h.send(format!("register\n/r{i}.*\nhttp://h:1\n").as_bytes()).await, "ok", "route {i}");
    }
    assert_eq!(h.send(b"register\n/r64.*\nhttp://h:1\n").await, TOO_MANY_ROUTES);
    assert_eq!(h.hash("prefix:foo").len(), 64);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_registrations_never_exceed_the_cap() {
    const CAP: usize = 5;
    const CLIENTS: usize = 40;
    let h = Harness::start(user("tools.foo"), |c| c.max_routes_per_tool = CAP).await;
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        let addr = h.addr;
        clients.spawn(async move {
            common::exchange(addr, format!("register\n/r{i}.*\nhttp://h:1\n").as_bytes(), false).await
        });
    }
    let mut replies = HashMap::<String, usize>::new();
    while let Some(reply) = clients.join_next().await {
        *replies.entry(reply.unwrap()).or_default() += 1;
    }
    assert_eq!(replies, HashMap::from([("ok".to_string(), CAP), (TOO_MANY_ROUTES.to_string(), CLIENTS - CAP)]));
    assert_eq!(h.hash("prefix:foo").len(), CAP);
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_outside_allowed_clients_are_refused_before_ident() {
    let h =
        Harness::start(user("tools.foo"), |c| c.allowed_clients = vec!["10.0.0.0/8".into(), "2001:db8::/32".into()])
            .await;
    assert_eq!(h.send(b"register\n.*\nhttp://h:1\n").await, CLIENT_NOT_ALLOWED);
    assert_eq!(h.send(b"unregister\n.*\n").await, CLIENT_NOT_ALLOWED);
    // Not even one connection to the ident server.
    assert!(h.ident.sources.lock().unwrap().is_empty(), "ident was asked");
    assert!(h.ident.queries.lock().unwrap().is_empty());
    assert!(h.keys().is_empty());
    let text = h.metrics_text();
    assert!(text.contains(r#"registrar_commands_total{command="none",result="client_not_allowed"} 2"#), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_inside_allowed_clients_are_served() {
    let h = Harness::start(user("tools.foo"), |c| c.allowed_clients = vec!["10.0.0.0/8".into(), "127.0.0.0/8".into()])
        .await;
    assert_eq!(h.send(b"register\n.*\nhttp://h:1\n").await, "ok");
    assert_eq!(h.ident.queries.lock().unwrap().len(), 1);
    assert_eq!(h.hash("prefix:foo"), map(&[(".*", "http://h:1")]));
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv4_clients_of_a_dual_stack_listener_match_ipv4_networks() {
    if std::net::TcpListener::bind("[::]:0").is_err() {
        eprintln!("skipped: no IPv6 on this host");
        return;
    }
    // The peer is seen as ::ffff:127.0.0.1; it must match 127.0.0.1/32.
    let h = Harness::start_on("::", user("tools.foo"), |c| c.allowed_clients = vec!["127.0.0.1/32".into()]).await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], h.addr.port()));
    let reply = exchange_from(TcpSocket::new_v4().unwrap(), addr, b"register\n.*\nhttp://h:1\n", false).await;
    assert_eq!(reply, "ok");

    let h = Harness::start_on("::", user("tools.foo"), |c| c.allowed_clients = vec!["10.0.0.0/8".into()]).await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], h.addr.port()));
    let reply = exchange_from(TcpSocket::new_v4().unwrap(), addr, b"register\n.*\nhttp://h:1\n", false).await;
    assert_eq!(reply, CLIENT_NOT_ALLOWED);
    assert!(h.ident.sources.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_clients_do_not_take_serving_slots() {
    let h = Harness::start(user("tools.foo"), |c| {
        c.allowed_clients = vec!["127.0.0.1/32".into()];
        c.max_connections = 1;
    })
    .await;
    // An outsider (from 127.0.0.2) reads its refusal and keeps the
    // connection open, so the registrar is still lingering on it.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut outsider = socket.connect(h.addr).await.unwrap();
    let mut refusal = vec![0u8; CLIENT_NOT_ALLOWED.len()];
    tokio::time::timeout(common::CLIENT_DEADLINE, outsider.read_exact(&mut refusal)).await.unwrap().unwrap();
    assert_eq!(refusal, CLIENT_NOT_ALLOWED.as_bytes());

    // The only serving slot is still free for a grid host.
    assert_eq!(h.send(b"register\n.*\nhttp://h:1\n").await, "ok");
    assert_eq!(h.ident.queries.lock().unwrap().len(), 1);
    drop(outsider);
}
