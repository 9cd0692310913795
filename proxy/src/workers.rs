//! Single-threaded event loops, one per core but one. The accept loops hand each new
//! connection to the next loop in turn; the connection, its requests and the
//! backend connections they use then stay on that loop's thread, with that
//! loop's own upstream pool. Measured on 2 cores: a work-stealing runtime
//! moved a request and its backend connection between threads, and the
//! wake-ups across threads cost more than the proxying itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, warn};

use crate::clock::PollClock;
use crate::handler::Shared;
use crate::metrics::Metrics;
use crate::server::{ServeSettings, Slot, serve_tcp};
use crate::tls::TlsAcceptor;
use crate::upstream::{UpstreamClient, UpstreamSettings};

/// A connection on its way from an accept loop to an event loop.
pub(crate) struct Accepted {
    pub stream: std::net::TcpStream,
    pub client: SocketAddr,
    pub tls: Option<TlsAcceptor>,
    /// Held for the connection's life (`max_connections`, `max_connections_per_client`).
    pub slot: Slot,
    pub span: Span,
}

/// The event loops. With none (a thread or runtime could not be created),
/// connections are served on the caller's runtime with `fallback`'s pool.
pub(crate) struct Workers {
    queues: Vec<mpsc::UnboundedSender<Accepted>>,
    next: AtomicUsize,
    fallback: Arc<UpstreamClient>,
    shared: Arc<Shared>,
    settings: Arc<ServeSettings>,
}

impl Workers {
    /// Starts `count` event loops; they serve until `stop` is cancelled.
    pub fn start(
        count: usize,
        shared: Arc<Shared>,
        settings: ServeSettings,
        upstream: UpstreamSettings,
        stop: CancellationToken,
    ) -> Self {
        // One copy for every connection: each used to clone the settings'
        // tokens and handles (160 bytes, and a lock per token).
        let settings = Arc::new(settings);
        let mut queues = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(crate::loop_turn::slept)
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    warn!(%error, "cannot create an event loop; serving on the main runtime");
                    break;
                }
            };
            let (tx, rx) = mpsc::unbounded_channel();
            let (shared, settings, stop, upstream) = (shared.clone(), settings.clone(), stop.clone(), upstream.clone());
            let spawned = thread::Builder::new()
                .name(format!("proxy-loop-{index}"))
                .spawn(move || event_loop(runtime, rx, shared, settings, upstream, stop));
            match spawned {
                Ok(_) => queues.push(tx),
                Err(error) => {
                    warn!(%error, "cannot start an event loop thread; serving on the main runtime");
                    break;
                }
            }
        }
        Workers {
            queues,
            next: AtomicUsize::new(0),
            fallback: Arc::new(UpstreamClient::new(upstream)),
            shared,
            settings,
        }
    }

    /// Hands a connection to the next event loop (round robin, so long-lived
    /// connections spread evenly), or serves it here when there is none.
    pub fn dispatch(&self, mut job: Accepted) {
        if !self.queues.is_empty() {
            let index = self.next.fetch_add(1, Ordering::Relaxed) % self.queues.len();
            match self.queues[index].send(job) {
                Ok(()) => return,
                Err(mpsc::error::SendError(back)) => job = back,
            }
        }
        match TcpStream::from_std(job.stream) {
            Ok(stream) => {
                let (shared, settings, pool) = (self.shared.clone(), self.settings.clone(), self.fallback.clone());
                self.settings.tracker.spawn(
                    PollClock::new(serve(stream, job.client, job.tls, job.slot, shared, settings, pool))
                        .instrument(job.span),
                );
            }
            Err(error) => debug!(%error, "cannot register the connection"),
        }
    }
}

/// One event loop's thread: takes connections until the accept loops are
/// gone, then keeps serving the open ones until `stop`.
fn event_loop(
    runtime: tokio::runtime::Runtime,
    mut queue: mpsc::UnboundedReceiver<Accepted>,
    shared: Arc<Shared>,
    settings: Arc<ServeSettings>,
    upstream: UpstreamSettings,
    stop: CancellationToken,
) {
    runtime.block_on(async {
        // Built inside the loop so its connection tasks and timers live here.
        // Shared by reference: a copy of the client per connection cost about
        // 1 KiB of each idle connection's memory.
        let pool = Arc::new(UpstreamClient::new(upstream));
        loop {
            let job = tokio::select! {
                _ = stop.cancelled() => return,
                job = queue.recv() => job,
            };
            let Some(job) = job else { break };
            let stream = match TcpStream::from_std(job.stream) {
                Ok(stream) => stream,
                Err(error) => {
                    debug!(%error, "cannot register the connection");
                    continue;
                }
            };
            let task = serve(stream, job.client, job.tls, job.slot, shared.clone(), settings.clone(), pool.clone());
            settings.tracker.spawn(PollClock::new(task).instrument(job.span));
        }
        stop.cancelled().await;
    });
    // Blocking tasks (name lookups) must not hold the thread past shutdown.
    runtime.shutdown_timeout(Duration::from_secs(1));
}

/// Serves one connection, counted as open from here until it closes.
///
/// Not an async fn: one would keep its arguments in the task beside the
/// copies `serve_tcp`'s future holds, for the connection's whole life.
fn serve(
    stream: TcpStream,
    client: SocketAddr,
    tls: Option<TlsAcceptor>,
    slot: Slot,
    shared: Arc<Shared>,
    settings: Arc<ServeSettings>,
    pool: Arc<UpstreamClient>,
) -> impl Future<Output = ()> + Send {
    let open = OpenConnection::count(shared.metrics.clone());
    let serving = serve_tcp(stream, client, shared, settings, tls, pool, slot);
    async move {
        serving.await;
        drop(open);
    }
}

/// A connection counted as open in the metrics until this is dropped, even
/// when its task is dropped before it ends (a hard stop).
struct OpenConnection(Arc<Metrics>);

impl OpenConnection {
    fn count(metrics: Arc<Metrics>) -> Self {
        metrics.connection_opened();
        OpenConnection(metrics)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}
