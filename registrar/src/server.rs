//! The accept loop: bounded concurrency, one task and one span per
//! connection, and a drain on shutdown.

use std::sync::Arc;
use std::time::Duration;

use dynamicproxy_redis::RouteStore;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::Config;
use crate::connection::{self, Shared};
use crate::error::Error;
use crate::metrics::Metrics;

/// First pause after a failed accept (e.g. out of file descriptors); doubles up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between failed accepts.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Time, beyond the exchange timeout, that the drain waits for the last
/// connections (their Redis write and reply) before giving up on them.
const DRAIN_EXTRA: Duration = Duration::from_secs(10);

/// Serves registrations on `listener` until `shutdown` is cancelled, then
/// stops accepting and lets open exchanges finish (bounded by the exchange
/// timeout plus a grace period).
///
/// Fails only on a configuration that does not validate; Redis being down
/// makes writes answer `fail: route table unavailable`, never stops the server.
pub async fn run(
    config: Config,
    listener: TcpListener,
    store: Arc<RouteStore>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    config.validate()?;
    let allow = config.allow_list()?;
    let denied = config.denied_destinations()?;
    let clients = config.allowed_clients()?;
    let local = listener.local_addr().map_err(Error::ListenerAddress)?;
    let drain_limit = config.exchange_timeout + DRAIN_EXTRA;
    let slots = Arc::new(Semaphore::new(config.max_connections));
    // Refusing takes a moment too (reply, linger): bound those tasks as well,
    // and past that drop excess connections outright.
    let refusals = Arc::new(Semaphore::new(config.max_connections));
    let shared = Arc::new(Shared { config, allow, denied, store, metrics });
    let tracker = TaskTracker::new();
    tracing::info!(listen = %local, "registrar listening");

    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff = ACCEPT_BACKOFF_MIN;
                accepted
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "accept failed");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let span = tracing::info_span!("registrar", client.addr = %peer, server.addr = %local);
        if !clients.allows(peer.ip()) {
            // Answered apart from the serving slots: outsiders cannot crowd out grid hosts.
            match refusals.clone().try_acquire_owned() {
                Ok(refusal) => {
                    let shared = shared.clone();
                    tracker.spawn(
                        async move {
                            connection::refuse_client(stream, peer, &shared.metrics).await;
                            drop(refusal);
                        }
                        .instrument(span),
                    );
                }
                Err(_) => {
                    shared.metrics.record(crate::protocol::Command::None, crate::metrics::Outcome::ClientNotAllowed);
                    span.in_scope(|| tracing::warn!(client = %peer, "client not allowed, dropped"));
                    drop(stream);
                }
            }
            continue;
        }
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let shared = shared.clone();
                tracker.spawn(
                    async move {
                        shared.metrics.connections.inc();
                        connection::serve(stream, peer, shared.clone()).await;
                        shared.metrics.connections.dec();
                        drop(slot);
                    }
                    .instrument(span),
                );
            }
            Err(_) => match refusals.clone().try_acquire_owned() {
                Ok(refusal) => {
                    let shared = shared.clone();
                    tracker.spawn(
                        async move {
                            connection::refuse_busy(stream, peer, &shared.metrics).await;
                            drop(refusal);
                        }
                        .instrument(span),
                    );
                }
                Err(_) => {
                    shared.metrics.record(crate::protocol::Command::None, crate::metrics::Outcome::Busy);
                    span.in_scope(|| tracing::warn!(client = %peer, "too many connections, dropped"));
                    drop(stream);
                }
            },
        }
    }

    drop(listener);
    tracker.close();
    tracing::info!(open = tracker.len(), "registrar draining");
    if tokio::time::timeout(drain_limit, tracker.wait()).await.is_err() {
        tracing::warn!(open = tracker.len(), "registrar drain timed out; abandoning open connections");
    }
    Ok(())
}
