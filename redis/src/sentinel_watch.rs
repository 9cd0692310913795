//! Follows a Sentinel group's `+promoted-slave` and `+switch-master` announcements, so connections
//! to a master that was just replaced are dropped at once instead of when
//! the old server is finally demoted (until then it still accepts writes,
//! which replication would then discard).
//!
//! Every Sentinel is subscribed: each announces the switch when it learns of
//! it, and the first to speak wins. The watch carries the newest master
//! address; connections compare it with the one they were opened on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::watch;
use tracing::{debug, info};

use crate::endpoint::CONNECT_TIMEOUT;

/// Pause before subscribing again to a Sentinel that went away.
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(500);

/// How long after a switch a connection to the replaced master is refused
/// even when a Sentinel names it: Sentinels that have not heard of the
/// switch yet (they gossip every 2 s) still name the old master, which
/// accepts writes until it is demoted. Afterwards the client's own `ROLE`
/// check refuses a demoted server anyway.
const CONVERGENCE: Duration = Duration::from_secs(30);

/// The newest master change announced for one group (`None` before any).
pub type MasterSwitches = watch::Receiver<Option<Switch>>;

/// One announced master change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switch {
    /// `host:port` of the new master.
    pub new: String,
    /// `host:port` of the master it replaced.
    pub old: String,
    /// When the announcement arrived.
    pub at: Instant,
}

impl Switch {
    /// True when a connection to `server` opened at `opened` must not be
    /// used: it reaches the replaced master and was opened before the
    /// switch, or so soon after it that a Sentinel may not know yet.
    pub fn refuses(&self, server: &str, opened: Instant) -> bool {
        server == self.old && (opened < self.at || self.at.elapsed() < CONVERGENCE)
    }
}

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

async fn follow(sentinel: String, master: String, tx: Arc<watch::Sender<Option<Switch>>>) {
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
    tx: &watch::Sender<Option<Switch>>,
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
            ("+switch-master", [name, old_ip, old_port, ip, port]) => Some((*name, *old_ip, *old_port, *ip, *port)),
            // `slave <ip:port> <ip> <port> @ <name> <master-ip> <master-port>`: the replica
            // took over, and Sentinels already name it; the old master may still take writes.
            ("+promoted-slave", ["slave", _, ip, port, "@", name, old_ip, old_port]) => {
                Some((*name, *old_ip, *old_port, *ip, *port))
            }
            _ => None,
        };
        if let Some((name, old_ip, old_port, ip, port)) = promoted
            && name == master
        {
            let address = format!("{ip}:{port}");
            let changed = tx.send_if_modified(|current| {
                if current.as_ref().is_some_and(|s| s.new == address) {
                    return false;
                }
                *current =
                    Some(Switch { new: address.clone(), old: format!("{old_ip}:{old_port}"), at: Instant::now() });
                true
            });
            if changed {
                info!(sentinel, master, new_master = address, "sentinel announced a new master");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_replaced_master_is_refused_and_only_while_sentinels_converge() {
        let now = Instant::now();
        let switch = Switch { new: "10.0.0.2:6379".into(), old: "10.0.0.1:6379".into(), at: now };
        // Opened before the switch: on the old master, never used again.
        assert!(switch.refuses("10.0.0.1:6379", now - Duration::from_secs(60)));
        // Opened just after: a Sentinel that has not heard yet named the old master.
        assert!(switch.refuses("10.0.0.1:6379", now + Duration::from_millis(1)));
        assert!(!switch.refuses("10.0.0.2:6379", now - Duration::from_secs(60)));
        // Long after the switch the old address may be a master again (a later failover).
        let long_ago = Switch { at: now - CONVERGENCE - Duration::from_secs(1), ..switch };
        assert!(!long_ago.refuses("10.0.0.1:6379", now));
    }
}
