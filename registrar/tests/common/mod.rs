//! Test harness: a real redis-server, a scriptable ident server and the
//! registrar itself, all on 127.0.0.1 ephemeral ports.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dynamicproxy_redis::RouteStore;
use dynamicproxy_registrar::{Config, Metrics};
use dynamicproxy_test_support::RedisServer;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Safety net for a test client: far above any configured timeout, it only
/// turns a hang into a failure.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(30);

/// How the test ident server answers `(client_port, server_port)`: the
/// reply line, or `None` to stay silent until the asker hangs up.
pub type IdentScript = Arc<dyn Fn(u16, u16) -> Option<String> + Send + Sync>;

/// Answers every query with `USERID : UNIX : <user>` for the asked ports.
pub fn user(name: &str) -> IdentScript {
    let name = name.to_string();
    Arc::new(move |c, s| Some(format!("{c} , {s} : USERID : UNIX : {name}\r\n")))
}

/// Answers every query with a fixed line.
pub fn fixed(reply: &str) -> IdentScript {
    let reply = reply.to_string();
    Arc::new(move |_, _| Some(reply.clone()))
}

/// Never answers.
pub fn silent() -> IdentScript {
    Arc::new(|_, _| None)
}

/// Answers with the user registered for the client port in `users`.
pub fn by_port(users: Arc<Mutex<HashMap<u16, String>>>) -> IdentScript {
    Arc::new(move |c, s| {
        let user = users.lock().unwrap().get(&c).cloned();
        Some(match user {
            Some(user) => format!("{c},{s}:USERID:UNIX:{user}\r\n"),
            None => format!("{c},{s}:ERROR:NO-USER\r\n"),
        })
    })
}

/// A scriptable RFC 1413 server on 127.0.0.1.
pub struct IdentServer {
    /// Its port, to configure as `ident_port`.
    pub port: u16,
    /// Every query line received, as sent.
    pub queries: Arc<Mutex<Vec<String>>>,
    /// The address each query came from, in order of connection.
    pub sources: Arc<Mutex<Vec<SocketAddr>>>,
    task: JoinHandle<()>,
}

impl IdentServer {
    /// Starts the server with `script`.
    pub async fn start(script: IdentScript) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let queries = Arc::new(Mutex::new(Vec::new()));
        let sources = Arc::new(Mutex::new(Vec::new()));
        let (log, seen) = (queries.clone(), sources.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, from)) = listener.accept().await else { continue };
                seen.lock().unwrap().push(from);
                tokio::spawn(answer(stream, script.clone(), log.clone()));
            }
        });
        IdentServer { port, queries, sources, task }
    }
}

impl Drop for IdentServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(mut stream: TcpStream, script: IdentScript, log: Arc<Mutex<Vec<String>>>) {
    let mut query = Vec::new();
    let mut byte = [0u8; 1];
    while !query.ends_with(b"\n") && query.len() < 1024 {
        match tokio::time::timeout(CLIENT_DEADLINE, stream.read(&mut byte)).await {
            Ok(Ok(1)) => query.push(byte[0]),
            _ => return,
        }
    }
    let query = String::from_utf8_lossy(&query).into_owned();
    log.lock().unwrap().push(query.clone());
    let ports: Vec<u16> = query.trim().split(',').filter_map(|p| p.trim().parse().ok()).collect();
    let reply = match ports[..] {
        [client, server] => script(client, server),
        _ => Some("0,0:ERROR:INVALID-PORT\r\n".to_string()),
    };
    match reply {
        Some(reply) => {
            let _ = stream.write_all(reply.as_bytes()).await;
        }
        None => {
            // Silent: hold the connection until the asker gives up.
            let mut sink = [0u8; 64];
            let _ = tokio::time::timeout(CLIENT_DEADLINE, stream.read(&mut sink)).await;
        }
    }
}

/// A registrar running in-process against its own Redis and ident server.
pub struct Harness {
    /// The route table's Redis.
    pub redis: RedisServer,
    /// The ident server the registrar asks.
    pub ident: IdentServer,
    /// Where the registrar listens.
    pub addr: SocketAddr,
    /// The registry its metrics are in.
    pub registry: Arc<Mutex<Registry>>,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    /// Cancelling stops it.
    pub shutdown: CancellationToken,
    /// The `run` task.
    pub task: Option<JoinHandle<Result<(), dynamicproxy_registrar::Error>>>,
}

impl Harness {
    /// A registrar on 127.0.0.1 with test-friendly timeouts, adjusted by `tweak`.
    pub async fn start(script: IdentScript, tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_on("127.0.0.1", script, tweak).await
    }

    /// Like [`Harness::start`], the registrar listening on `ip` (the ident
    /// server stays on 127.0.0.1).
    pub async fn start_on(ip: &str, script: IdentScript, tweak: impl FnOnce(&mut Config)) -> Self {
        let redis = RedisServer::start();
        let ident = IdentServer::start(script).await;
        let mut config = Config {
            ident_port: ident.port,
            ident_timeout: Duration::from_millis(500),
            exchange_timeout: Duration::from_secs(2),
            canonical_domain: "toolforge.example".into(),
            // Tests register 127.0.0.1 destinations; the denied networks have tests of their own.
            denied_destination_networks: Vec::new(),
            ..Config::default()
        };
        tweak(&mut config);
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let store = Arc::new(RouteStore::new(redis.url().parse().unwrap()));
        let shutdown = CancellationToken::new();
        let task =
            tokio::spawn(dynamicproxy_registrar::run(config, listener, store, metrics.clone(), shutdown.clone()));
        Harness { redis, ident, addr, registry: Arc::new(Mutex::new(registry)), metrics, shutdown, task: Some(task) }
    }

    /// Sends `request` like the deployed client (connect, send, read until
    /// the server closes) and returns the reply.
    pub async fn send(&self, request: &[u8]) -> String {
        exchange(self.addr, request, false).await
    }

    /// Like [`Harness::send`], then half-closes: the server sees the end of the stream.
    pub async fn send_and_close(&self, request: &[u8]) -> String {
        exchange(self.addr, request, true).await
    }

    /// `HGETALL key`.
    pub fn hash(&self, key: &str) -> HashMap<String, String> {
        redis::cmd("HGETALL").arg(key).query(&mut self.redis.client()).unwrap()
    }

    /// Every key in Redis but the provenance side keys.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut self.redis.client()).unwrap();
        // Who wrote each route (`route_source:<tool>`, `route_audit`) is kept apart from the table.
        keys.retain(|k| !k.starts_with("route_source:") && k != "route_audit");
        keys.sort();
        keys
    }

    /// The metrics in Prometheus text format.
    pub fn metrics_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry.lock().unwrap()).unwrap();
        text
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// One client exchange with a safety deadline.
pub async fn exchange(addr: SocketAddr, request: &[u8], half_close: bool) -> String {
    let socket = TcpSocket::new_v4().unwrap();
    exchange_from(socket, addr, request, half_close).await
}

/// One client exchange from an already bound socket.
pub async fn exchange_from(socket: TcpSocket, addr: SocketAddr, request: &[u8], half_close: bool) -> String {
    let work = async {
        let mut stream = socket.connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        if half_close {
            stream.shutdown().await.unwrap();
        }
        let mut reply = Vec::new();
        // A reset after the reply was read is fine; the reply is what counts.
        let _ = stream.read_to_end(&mut reply).await;
        String::from_utf8_lossy(&reply).into_owned()
    };
    tokio::time::timeout(CLIENT_DEADLINE, work).await.expect("registrar never closed the connection")
}
