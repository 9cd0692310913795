//! Test helpers shared by every crate's tests: a real `redis-server` per
//! test on a free port, and polling with a deadline instead of sleeps.
//!
//! # Layout
//!
//! - [`RedisServer`]: starts `redis-server`, kills it on drop, can stop and restart on the same port.
//! - [`eventually`]: polls an async condition until it holds or a deadline passes.
//! - [`free_port`]: a currently unused TCP port on 127.0.0.1, below the ephemeral range.
//! - [`sentinel`]: [`SentinelGroup`], a master, a replica and three Sentinels that fail over in seconds.

use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod sentinel;
pub use sentinel::SentinelGroup;

/// A TCP port on 127.0.0.1 that was free a moment ago, for a server a test
/// starts itself (a daemon, `redis-server`) and that must be named before it
/// binds.
///
/// It is taken below the kernel's ephemeral range (`ip_local_port_range`),
/// where no outgoing connection lands. `bind(0)` hands out ports in that
/// range, and a test running beside this one could take the port for a
/// connection of its own before the server bound it: a daemon then failed to
/// start, about once in four full runs. Each process starts at its own place
/// in the range and moves on at each call, so two calls never return the
/// same port and two processes rarely meet.
pub fn free_port() -> u16 {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};
    static START: OnceLock<u32> = OnceLock::new();
    static CALLS: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral <= LOWEST + 1_000 {
        return TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind 127.0.0.1:0");
    }
    let span = ephemeral - LOWEST;
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        std::process::id().wrapping_mul(7_919).wrapping_add(nanos)
    });
    for _ in 0..span {
        let port = LOWEST + start.wrapping_add(CALLS.fetch_add(1, Ordering::Relaxed)) % span;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free port on 127.0.0.1 between {LOWEST} and {ephemeral}")
}

/// A `redis-server` owned by one test. Killed on drop.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts a fresh, empty server on a free port and waits until it answers.
    pub fn start() -> Self {
        for _ in 0..5 {
            let port = free_port();
            let mut server = RedisServer { port, child: None, dir: scratch_dir(port) };
            if server.spawn() {
                return server;
            }
        }
        panic!("could not start redis-server (is it installed? `apt-get install -y redis-server`)");
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A synchronous client connection, for setting up and inspecting data.
    pub fn client(&self) -> redis::Connection {
        redis::Client::open(self.url()).and_then(|c| c.get_connection()).expect("connect to test redis")
    }

    /// Kills the server (SIGKILL, no save): clients see the connection drop.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts an empty server again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn() {
            assert!(Instant::now() < deadline, "redis-server did not restart on port {}", self.port);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn spawn(&mut self) -> bool {
        let _ = std::fs::create_dir_all(&self.dir);
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(mut child) = child else { return false };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false; // exited: port taken
            }
            let ready = redis::Client::open(self.url())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if ready.is_ok() {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn scratch_dir(port: u16) -> PathBuf {
    std::env::temp_dir().join(format!("dynamicproxy-test-redis-{}-{port}", std::process::id()))
}

/// Polls `check` every 10 ms until it returns `Some`, or panics with `what`
/// after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
