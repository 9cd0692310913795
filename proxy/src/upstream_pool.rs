//! Idle keep-alive connections to backends, one list per event loop.
//!
//! A request takes the most recently used idle connection to its backend,
//! and its response body puts the connection back when the backend's body
//! has been read to its end. The lists belong to one event loop, so the lock
//! is never contended, and a connection is never handed to another thread.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dynamicproxy_redis::BackendUrl;
use foldhash::fast::RandomState;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;

use crate::body::LimitedBody;
use crate::clock;

/// A connection's request side, as the pool keeps it.
pub type Sender = SendRequest<LimitedBody>;

/// Idle connections per backend, with their limits.
pub struct IdlePool {
    /// foldhash, seeded per process: backends are named by tools.
    lists: Mutex<HashMap<BackendUrl, Vec<IdleConnection>, RandomState>>,
    max_per_backend: usize,
    idle_timeout: Duration,
}

struct IdleConnection {
    sender: Sender,
    since: Instant,
}

impl IdlePool {
    /// An empty pool keeping at most `max_per_backend` idle connections per
    /// backend, each for at most `idle_timeout`.
    pub fn new(max_per_backend: usize, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(IdlePool { lists: Mutex::new(HashMap::default()), max_per_backend, idle_timeout })
    }

    /// The most recently used idle connection to `backend` that is still
    /// open and ready for a request; stale ones met on the way are closed.
    pub fn take(&self, backend: &BackendUrl) -> Option<Sender> {
        let mut lists = self.lists();
        let list = lists.get_mut(backend)?;
        let now = clock::now();
        while let Some(idle) = list.pop() {
            if idle.sender.is_ready() && now.duration_since(idle.since) < self.idle_timeout {
                return Some(idle.sender);
            }
        }
        None
    }

    /// Puts a connection whose exchange is over back for the next request.
    /// One the backend closed, or one over the per-backend limit, is dropped
    /// (which closes it).
    pub fn put(self: &Arc<Self>, backend: BackendUrl, sender: Sender) {
        if sender.is_ready() {
            self.insert(backend, sender);
        } else if !sender.is_closed() {
            // The connection's task has not yet taken in the end of the
            // response; it turns ready as soon as it runs.
            let pool = Arc::downgrade(self);
            tokio::spawn(async move {
                let mut sender = sender;
                if sender.ready().await.is_ok()
                    && let Some(pool) = pool.upgrade()
                {
                    pool.insert(backend, sender);
                }
            });
        }
    }

    fn insert(&self, backend: BackendUrl, sender: Sender) {
        if self.max_per_backend == 0 {
            return;
        }
        let mut lists = self.lists();
        let list = lists.entry(backend).or_default();
        if list.len() < self.max_per_backend {
            list.push(IdleConnection { sender, since: clock::now() });
        }
    }

    /// Closes connections idle for longer than the timeout or closed by
    /// their backend, and forgets backends with none left.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.lists().retain(|_, list| {
            list.retain(|idle| !idle.sender.is_closed() && now.duration_since(idle.since) < self.idle_timeout);
            !list.is_empty()
        });
    }

    fn lists(&self) -> MutexGuard<'_, HashMap<BackendUrl, Vec<IdleConnection>, RandomState>> {
        // A panic while holding the lock leaves only a list of connections behind.
        self.lists.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Sweeps `pool` until it is dropped: idle connections are closed on time
/// even when no request comes to notice them.
pub async fn sweep_until_dropped(pool: Weak<IdlePool>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match pool.upgrade() {
            Some(pool) => pool.sweep(),
            None => return,
        }
    }
}

/// A connection lent to one exchange, returned to its pool when the
/// response has been read to its end.
pub struct Lease {
    pool: Arc<IdlePool>,
    backend: BackendUrl,
    sender: Sender,
}

impl Lease {
    /// Lends `sender` (a connection to `backend`) out of `pool`.
    pub fn new(pool: Arc<IdlePool>, backend: BackendUrl, sender: Sender) -> Self {
        Lease { pool, backend, sender }
    }

    fn release(self) {
        self.pool.put(self.backend, self.sender);
    }
}

/// A backend's response body. At its end the connection goes back to the
/// pool; dropped before its end, the connection closes with it (the rest of
/// the body is never read).
pub struct UpstreamBody {
    incoming: Incoming,
    lease: Option<Lease>,
}

impl UpstreamBody {
    /// `incoming`, returning `lease` at its end (at once when it is empty).
    pub fn new(incoming: Incoming, lease: Option<Lease>) -> Self {
        let mut body = UpstreamBody { incoming, lease };
        if body.incoming.is_end_stream() {
            body.release();
        }
        body
    }

    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.incoming).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.incoming.is_end_stream() => this.release(),
            // A broken body leaves the connection in an unknown state.
            Poll::Ready(Some(Err(_))) => this.lease = None,
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}
