//! The access log (SPEC §8): one line per request, written by a background
//! task so a slow disk never stalls requests (lines are dropped instead).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

use crate::error::Error;

/// Lines buffered before new ones are dropped.
const QUEUE: usize = 16 * 1024;

/// A handle to the access log writer.
#[derive(Clone)]
pub struct AccessLog {
    tx: mpsc::Sender<String>,
    dropped: Arc<AtomicU64>,
}

/// One request, as logged.
pub struct Entry<'a> {
    /// Client address.
    pub client: SocketAddr,
    /// Host as normalised (or `-`).
    pub host: &'a str,
    /// Request method.
    pub method: &'a str,
    /// Request URI.
    pub uri: &'a str,
    /// Status sent.
    pub status: u16,
    /// Body bytes, when known from the headers.
    pub bytes: Option<u64>,
    /// Backend used.
    pub upstream: Option<&'a dyn std::fmt::Display>,
    /// Time the backend took to its response head.
    pub upstream_time: Option<Duration>,
    /// Time from request to response head.
    pub total_time: Duration,
    /// The tool the request was about.
    pub tool: Option<&'a str>,
    /// The W3C trace id sent to the backend in `traceparent`.
    pub trace_id: Option<&'a str>,
}

impl AccessLog {
    /// Opens the log named by `spec` (`off`, `stdout` or a path) and spawns its writer.
    pub fn open(spec: &str) -> Result<Option<AccessLog>, Error> {
        let writer: Box<dyn AsyncWrite + Send + Unpin> = match spec.trim() {
            "" | "off" => return Ok(None),
            "stdout" | "-" => Box::new(tokio::io::stdout()),
            path => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| Error::AccessLog { path: path.into(), source })?;
                Box::new(tokio::fs::File::from_std(file))
            }
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_lines(rx, BufWriter::new(writer)));
        Ok(Some(AccessLog { tx, dropped: Arc::new(AtomicU64::new(0)) }))
    }

    /// Queues one line.
    pub fn log(&self, entry: &Entry<'_>) {
        let mut line = String::with_capacity(160);
        let _ = writeln!(
            line,
            "{} {} \"{} {}\" {} {} upstream={} upstream_time={} time={:.3} trace_id={} tool={}",
            entry.client.ip(),
            entry.host,
            entry.method,
            entry.uri.escape_debug(),
            entry.status,
            entry.bytes.map_or("-".to_string(), |b| b.to_string()),
            entry.upstream.map_or("-".to_string(), |u| u.to_string()),
            entry.upstream_time.map_or("-".to_string(), |t| format!("{:.3}", t.as_secs_f64())),
            entry.total_time.as_secs_f64(),
            entry.trace_id.unwrap_or("-"),
            entry.tool.unwrap_or("-"),
        );
        if self.tx.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn write_lines(mut rx: mpsc::Receiver<String>, mut out: BufWriter<Box<dyn AsyncWrite + Send + Unpin>>) {
    while let Some(line) = rx.recv().await {
        if out.write_all(line.as_bytes()).await.is_err() {
            continue;
        }
        while let Ok(line) = rx.try_recv() {
            let _ = out.write_all(line.as_bytes()).await;
        }
        if let Err(error) = out.flush().await {
            tracing::warn!(%error, "cannot write the access log");
        }
    }
    let _ = out.flush().await;
}
