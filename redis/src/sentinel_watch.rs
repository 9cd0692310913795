//! Follows a Sentinel group's `+promoted-slave` and `+switch-master` announcements, so connections
//! to a master that was just replaced are dropped at once instead of when
//! the old server is finally demoted (until then it still accepts writes,
//! which replication would then discard).
//!
//! Every Sentinel is subscribed: each announces the switch when it learns of
//! it, and the first to speak wins. The watch carries the newest master
//! address; connections compare it with the one they were opened on.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tracing::{debug, info};

use crate::endpoint::CONNECT_TIMEOUT;

/// Pause before subscribing again to a Sentinel that went away.
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(500);

/// The newest master address announced for one group (`None` before any switch).
pub type MasterSwitches = watch::Receiver<Option<String>>;

/// Subscribes to every Sentinel in `sentinels` (`host:port`) for switches of
/// `master`. The tasks end when every receiver is dropped.
pub(crate) fn watch_switches(sentinels: &[String], master: &str) -> MasterSwitches {
    let (tx, rx) = watch::channel(None);
    let tx = Arc::new(tx);
    for sentinel in sentinels {
        tokio::spawn(follow(sentinel.clone(), master.to_string(), Arc::clone(&tx)));
    }
    rx
}

async fn follow(sentinel: String, master: String, tx: Arc<watch::Sender<Option<String>>>) {
    loop {
        tokio::select! {
            _ = tx.closed() => return,
            result = subscribe_and_read(&sentinel, &master, &tx) => {
                debug!(sentinel, error = ?result.err(), "sentinel subscription ended; subscribing again");
            }
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(RESUBSCRIBE_DELAY) => {}
        }
    }
}

async fn subscribe_and_read(
    sentinel: &str,
    master: &str,
    tx: &watch::Sender<Option<String>>,
) -> redis::RedisResult<()> {
    let client = redis::Client::open(format!("redis://{sentinel}"))?;
    let mut pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
        .await
        .map_err(|_| redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))??;
    pubsub.subscribe(&["+switch-master", "+promoted-slave"]).await?;
    let mut messages = pubsub.into_on_message();
    while let Some(message) = messages.next().await {
        let Ok(text) = message.get_payload::<String>() else { continue };
        let fields: Vec<&str> = text.split(' ').collect();
        let promoted = match (message.get_channel_name(), fields.as_slice()) {
            // `<name> <old-ip> <old-port> <new-ip> <new-port>`: the failover is complete.
            ("+switch-master", [name, _, _, ip, port]) => Some((*name, *ip, *port)),
            // `slave <ip:port> <ip> <port> @ <name> <master-ip> <master-port>`: the replica
            // took over, and Sentinels already name it; the old master may still take writes.
            ("+promoted-slave", ["slave", _, ip, port, "@", name, _, _]) => Some((*name, *ip, *port)),
            _ => None,
        };
        if let Some((name, ip, port)) = promoted
            && name == master
        {
            let address = format!("{ip}:{port}");
            let changed = tx.send_if_modified(|current| {
                if current.as_deref() == Some(address.as_str()) {
                    return false;
                }
                *current = Some(address.clone());
                true
            });
            if changed {
                info!(sentinel, master, new_master = address, "sentinel announced a new master");
            }
        }
    }
    Ok(())
}
