//! A Sentinel group on ephemeral ports: a master, a replica and three
//! `redis-server --sentinel` processes with short timeouts, so a failover
//! converges in a few seconds; all killed on drop.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::free_port;

/// The name the Sentinels monitor the master under.
pub const MASTER_NAME: &str = "mymaster";
/// Sentinels' `down-after-milliseconds`: how long a silent master is trusted.
const DOWN_AFTER_MS: u64 = 1000;
/// Sentinels' `failover-timeout`.
const FAILOVER_TIMEOUT_MS: u64 = 3000;

/// One `redis-server` process (data node or Sentinel).
struct Node {
    port: u16,
    child: Child,
}

impl Node {
    fn client(&self) -> redis::Connection {
        client_on(self.port)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // A stopped process must be continued before it can die of SIGKILL cleanly.
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill").args(["-CONT", &self.child.id().to_string()]).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client_on(port: u16) -> redis::Connection {
    try_client_on(port).expect("connect to test redis")
}

fn try_client_on(port: u16) -> redis::RedisResult<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}/0"))
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
}

fn answers(port: u16) -> bool {
    redis::Client::open(format!("redis://127.0.0.1:{port}/0"))
        .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
        .is_ok()
}

fn spawn_data_node(dir: &Path, replica_of: Option<u16>) -> Node {
    for _ in 0..5 {
        let port = free_port();
        let data = dir.join(format!("node-{port}"));
        let _ = std::fs::create_dir_all(&data);
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&data);
        if let Some(master) = replica_of {
            command.args(["--replicaof", "127.0.0.1", &master.to_string()]);
        }
        let Ok(child) = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn() else { continue };
        let mut node = Node { port, child };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = node.child.try_wait() {
                break; // port taken
            }
            if answers(port) {
                return node;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = node.child.kill();
    }
    panic!("could not start redis-server");
}

fn spawn_sentinel(dir: &Path, master_port: u16) -> Node {
    for _ in 0..5 {
        let port = free_port();
        let work = dir.join(format!("sentinel-{port}"));
        let _ = std::fs::create_dir_all(&work);
        let conf = work.join("sentinel.conf");
        let text = format!(
            "port {port}\nbind 127.0.0.1\ndir {dir}\n\
             sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n\
             sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n\
             sentinel parallel-syncs {MASTER_NAME} 1\n",
            dir = work.display()
        );
        std::fs::write(&conf, text).expect("write sentinel.conf");
        let Ok(child) = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        else {
            continue;
        };
        let mut node = Node { port, child };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = node.child.try_wait() {
                break;
            }
            if answers(port) {
                return node;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = node.child.kill();
    }
    panic!("could not start redis-server --sentinel");
}

/// A master, one replica and three Sentinels (quorum 2).
pub struct SentinelGroup {
    master: Option<Node>,
    replica: Option<Node>,
    sentinels: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl SentinelGroup {
    /// Starts the group and waits until the Sentinels know each other and the
    /// replica, and the replica is in sync: only then can a failover happen.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let master = spawn_data_node(dir.path(), None);
        let replica = spawn_data_node(dir.path(), Some(master.port));
        let sentinels: Vec<Node> = (0..3).map(|_| spawn_sentinel(dir.path(), master.port)).collect();
        let group = SentinelGroup { master: Some(master), replica: Some(replica), sentinels, _dir: dir };
        group.wait_until_ready();
        group
    }

    fn wait_until_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let linked = self
                .replica
                .as_ref()
                .map(|r| info(&mut r.client(), "replication").contains("master_link_status:up"))
                .unwrap_or(false);
            let known = self.sentinels.iter().all(|s| {
                let mut c = s.client();
                let peers: Vec<redis::Value> =
                    redis::cmd("SENTINEL").arg("sentinels").arg(MASTER_NAME).query(&mut c).unwrap_or_default();
                let replicas: Vec<redis::Value> =
                    redis::cmd("SENTINEL").arg("replicas").arg(MASTER_NAME).query(&mut c).unwrap_or_default();
                peers.len() == 2 && replicas.len() == 1
            });
            if linked && known {
                return;
            }
            assert!(Instant::now() < deadline, "sentinel group did not converge (linked {linked}, known {known})");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `redis+sentinel://` URL naming all three Sentinels.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.sentinels.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();
        format!("redis+sentinel://{}/{MASTER_NAME}/0", hosts.join(","))
    }

    /// Ports of the Sentinels.
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    /// Port of the first master.
    pub fn master_port(&self) -> u16 {
        self.master.as_ref().map(|n| n.port).expect("master")
    }

    /// Port of the first replica.
    pub fn replica_port(&self) -> u16 {
        self.replica.as_ref().map(|n| n.port).expect("replica")
    }

    /// A client on the first master.
    pub fn master_client(&self) -> redis::Connection {
        client_on(self.master_port())
    }

    /// A client on the first master, or `None` when it does not take one
    /// now: a master being turned into a replica resets new connections.
    pub fn try_master_client(&self) -> Option<redis::Connection> {
        try_client_on(self.master_port()).ok()
    }

    /// A client on the first replica.
    pub fn replica_client(&self) -> redis::Connection {
        client_on(self.replica_port())
    }

    /// `host:port` of the master as the first live Sentinel names it now.
    pub fn current_master(&self) -> String {
        for sentinel in &self.sentinels {
            let addr: redis::RedisResult<Vec<String>> =
                redis::cmd("SENTINEL").arg("get-master-addr-by-name").arg(MASTER_NAME).query(&mut sentinel.client());
            if let Ok(addr) = addr
                && addr.len() == 2
            {
                return format!("{}:{}", addr[0], addr[1]);
            }
        }
        panic!("no sentinel named a master");
    }

    /// Waits until the master has replicated everything written so far to the replica.
    pub fn wait_replicated(&self) {
        let acked: i64 = redis::cmd("WAIT").arg(1).arg(5000).query(&mut self.master_client()).expect("WAIT");
        assert_eq!(acked, 1, "replica did not acknowledge");
    }

    /// Kills the first master with SIGKILL: no goodbye to anyone.
    pub fn kill_master(&mut self) {
        if let Some(mut master) = self.master.take() {
            let _ = master.child.kill();
            let _ = master.child.wait();
        }
    }

    /// Sends SIGSTOP (`true`) or SIGCONT (`false`) to the first master: a hung, not dead, server.
    pub fn pause_master(&self, paused: bool) {
        let master = self.master.as_ref().expect("master");
        let signal = if paused { "-STOP" } else { "-CONT" };
        let status = Command::new("kill").args([signal, &master.child.id().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill {signal}");
    }

    /// Asks the Sentinels for a failover while the master is healthy: the old
    /// master is demoted and keeps answering, read-only.
    pub fn manual_failover(&self) {
        let _: () = redis::cmd("SENTINEL")
            .arg("failover")
            .arg(MASTER_NAME)
            .query(&mut self.sentinels[0].client())
            .expect("SENTINEL FAILOVER");
    }

    /// Subscribes to `+switch-master` on the first Sentinel; each promotion is
    /// sent with the moment it was received and the event's text.
    pub fn switch_events(&self) -> mpsc::Receiver<(Instant, String)> {
        let (tx, rx) = mpsc::channel();
        let port = self.sentinels[0].port;
        let (subscribed_tx, subscribed_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut conn = client_on(port);
            let mut pubsub = conn.as_pubsub();
            if pubsub.subscribe("+switch-master").is_err() {
                return;
            }
            let _ = subscribed_tx.send(());
            while let Ok(message) = pubsub.get_message() {
                let text: String = message.get_payload().unwrap_or_default();
                if tx.send((Instant::now(), text)).is_err() {
                    return;
                }
            }
        });
        subscribed_rx.recv_timeout(Duration::from_secs(5)).expect("subscribed to +switch-master");
        rx
    }
}

fn info(conn: &mut redis::Connection, section: &str) -> String {
    redis::cmd("INFO").arg(section).query(conn).unwrap_or_default()
}
