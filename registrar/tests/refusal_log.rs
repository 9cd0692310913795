//! SPEC §5 point 4: every refusal is logged with the client address, tool,
//! command, route and destination. Alone in its binary: it installs the
//! process-wide log subscriber and reads what it wrote.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::{Harness, exchange_from, user};
use dynamicproxy_registrar::Config;
use dynamicproxy_registrar::connection::{CLIENT_NOT_ALLOWED, DESTINATION_NOT_ALLOWED, TOO_MANY_ROUTES};
use tokio::net::TcpSocket;

/// Everything the registrar logged, as text.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// The log line about the exchange from `client`, which must exist.
    fn line_for(&self, client: &str) -> String {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        let needle = format!("client={client} ");
        text.lines()
            .find(|l| l.contains("registration refused") && l.contains(&needle))
            .unwrap_or_else(|| panic!("no refusal logged for {client} in:\n{text}"))
            .to_string()
    }
}

/// Sends `request` from a socket whose address is returned with the reply.
async fn send_from(h: &Harness, request: &str) -> (String, String) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let client = socket.local_addr().unwrap().to_string();
    (client, exchange_from(socket, h.addr, request.as_bytes(), false).await)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_refusal_is_logged_with_client_tool_command_route_and_destination() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_env_filter("info")
        .with_writer(move || writer.clone())
        .try_init()
        .expect("the only subscriber of this test binary");

    let h = Harness::start(user("tools.evil"), |c| {
        c.denied_destination_networks = Config::default().denied_destination_networks;
        c.max_routes_per_tool = 1;
    })
    .await;
    let (client, reply) = send_from(&h, "register\n.*\nhttp://127.0.0.1:9631\n").await;
    assert_eq!(reply, DESTINATION_NOT_ALLOWED);
    let line = captured.line_for(&client);
    for field in [
        "tool=\"evil\"",
        "command=\"register\"",
        "route=\".*\"",
        "destination=\"http://127.0.0.1:9631\"",
        "result=\"denied_destination\"",
        "denied network 127.0.0.0/8",
    ] {
        assert!(line.contains(field), "{field} not in {line}");
    }

    assert_eq!(send_from(&h, "register\n/a.*\nhttp://172.16.0.5:8000\n").await.1, "ok");
    let (client, reply) = send_from(&h, "registerCanonical\n/b.*\nhttp://172.16.0.5:8001\n").await;
    assert_eq!(reply, TOO_MANY_ROUTES);
    let line = captured.line_for(&client);
    for field in [
        "tool=\"evil\"",
        "command=\"registerCanonical\"",
        "route=\"/b.*\"",
        "destination=\"http://172.16.0.5:8001\"",
        "result=\"too_many_routes\"",
        "max_routes_per_tool",
    ] {
        assert!(line.contains(field), "{field} not in {line}");
    }

    let h = Harness::start(user("tools.evil"), |c| c.allowed_clients = vec!["10.0.0.0/8".into()]).await;
    let (client, reply) = send_from(&h, "register\n.*\nhttp://172.16.0.5:8000\n").await;
    assert_eq!(reply, CLIENT_NOT_ALLOWED);
    let line = captured.line_for(&client);
    for field in ["tool=\"-\"", "command=\"none\"", "result=\"client_not_allowed\"", "allowed_clients"] {
        assert!(line.contains(field), "{field} not in {line}");
    }
}
