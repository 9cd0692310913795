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

use crate::backend_conn::{BackendConn, BodyReader};
use crate::clock;

/// Idle connections per backend, with their limits.
pub struct IdlePool {
    /// foldhash, seeded per process: backends are named by tools.
    lists: Mutex<HashMap<BackendUrl, Vec<IdleConnection>, RandomState>>,
    max_per_backend: usize,
    idle_timeout: Duration,
}

struct IdleConnection {
    conn: Box<BackendConn>,
    since: Instant,
}

impl IdlePool {
    /// An empty pool keeping at most `max_per_backend` idle connections per
    /// backend, each for at most `idle_timeout`.
    pub fn new(max_per_backend: usize, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(IdlePool { lists: Mutex::new(HashMap::default()), max_per_backend, idle_timeout })
    }

    /// The most recently used idle connection to `backend` that is still
    /// open; stale ones met on the way are closed.
    pub fn take(&self, backend: &BackendUrl) -> Option<Box<BackendConn>> {
        let mut lists = self.lists();
        let list = lists.get_mut(backend)?;
        let now = clock::now();
        while let Some(mut idle) = list.pop() {
            if now.duration_since(idle.since) < self.idle_timeout && idle.conn.is_open_and_idle() {
                return Some(idle.conn);
            }
        }
        None
    }

    /// Puts a connection whose exchange is over back for the next request.
    /// One over the per-backend limit is dropped (which closes it).
    pub fn put(&self, backend: BackendUrl, conn: Box<BackendConn>) {
        if self.max_per_backend == 0 {
            return;
        }
        let mut lists = self.lists();
        let list = lists.entry(backend).or_default();
        if list.len() < self.max_per_backend {
            list.push(IdleConnection { conn, since: clock::now() });
        }
    }

    /// Closes connections idle for longer than the timeout or closed by
    /// their backend, and forgets backends with none left.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.lists().retain(|_, list| {
            list.retain_mut(|idle| now.duration_since(idle.since) < self.idle_timeout && idle.conn.is_open_and_idle());
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

/// Where a lent connection goes back to when its response has been read to
/// its end.
pub struct Lease {
    pool: Arc<IdlePool>,
    backend: BackendUrl,
}

impl Lease {
    /// A connection to `backend`, lent out of `pool`.
    pub fn new(pool: Arc<IdlePool>, backend: BackendUrl) -> Self {
        Lease { pool, backend }
    }
}

/// A backend's response body. At its end the connection goes back to the
/// pool; dropped before its end, the connection closes with it (the rest of
/// the body is never read).
pub struct UpstreamBody {
    reader: BodyReader,
    lease: Option<Lease>,
}

impl UpstreamBody {
    /// The body `reader` reads, returning its connection under `lease` at
    /// its end (at once when it is empty).
    pub fn new(reader: BodyReader, lease: Option<Lease>) -> Self {
        let mut body = UpstreamBody { reader, lease };
        if body.reader.is_end() {
            body.release();
        }
        body
    }

    fn release(&mut self) {
        if let Some(lease) = self.lease.take()
            && let Some(conn) = self.reader.take_reusable()
        {
            lease.pool.put(lease.backend, conn);
        }
    }

    /// The backend's side of a `101 Switching Protocols`, for the tunnel.
    pub fn into_tunnel(self) -> Option<Box<BackendConn>> {
        self.reader.into_tunnel()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        let polled = this.reader.poll_data(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.reader.is_end() => this.release(),
            // A broken body leaves the connection in an unknown state.
            Poll::Ready(Some(Err(_))) => this.lease = None,
            _ => {}
        }
        polled.map(|data| data.map(|data| data.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.reader.is_end()
    }

    fn size_hint(&self) -> SizeHint {
        self.reader.size_hint()
    }
}
