//! The access log (SPEC §8): one line per request, written by a background
//! task so a slow disk never stalls requests (lines are dropped instead).
//!
//! Fit for logrotate: SIGUSR1 (or [`crate::ProxyHandle::reopen_access_log`])
//! reopens the file by name, so a rotated file is let go of without a
//! restart. Lines that never reach the file (writer too far behind, disk full,
//! unwritable file) are counted in
//! `dynamicproxy_proxy_access_log_lost_lines_total`, since on a full disk
//! there is nowhere else to tell.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::Error;

/// Bytes of lines waiting for the writer before new ones are dropped: about
/// a second of a busy proxy's lines, ten times [`FLUSH_AFTER`].
const PENDING_BYTES: usize = 4 * 1024 * 1024;
/// Bytes of lines that make the writer take them before [`FLUSH_AFTER`], as
/// nginx's `access_log ... buffer=64k`. A busy proxy gathers 0.6 MiB in
/// 100 ms; written into at that size, the buffer pushed the route table and
/// the connections' state out of the event loop's cache: logging cost 14 to
/// 20 % more CPU per request, and 6.7 % with this (bench/ab.sh).
const FLUSH_BYTES: usize = 64 * 1024;
/// How long lines gather before one write, as nginx's `access_log ...
/// buffer= flush=`. Written as they came, each line cost two thread
/// hand-offs (waking the writer, then the blocking pool for the write) and a
/// write: 16 us per request, +46 % of the proxy's CPU per request in
/// `bench/ab.sh`. A crash loses the lines gathered since the last write:
/// normally no more than this, more only while the disk falls behind.
const FLUSH_AFTER: Duration = Duration::from_millis(100);

/// The shape of access log lines (`[proxy] access_log_format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `client host "METHOD URI" status bytes upstream=… upstream_time=… time=… tool=…`.
    #[default]
    Text,
    /// One JSON object per line, with an RFC 3339 `time`, for log shippers.
    Json,
}

/// A handle to the access log writer.
#[derive(Clone)]
pub struct AccessLog {
    pending: Arc<Pending>,
    format: Format,
    lost: Counter,
}

/// Lines formatted by the request path and not yet taken by the writer: one
/// buffer that every line is written straight into, with no allocation or
/// wake-up per line; the writer swaps it for an empty one every
/// [`FLUSH_AFTER`].
struct Pending {
    lines: Mutex<Lines>,
    limit: usize,
    /// Told once the lines reach [`FLUSH_BYTES`].
    full: Notify,
}

/// The buffer behind [`Pending`]'s lock.
#[derive(Default)]
struct Lines {
    bytes: Vec<u8>,
    /// Lines in `bytes`, counted as lost if their write fails.
    count: u64,
    /// The writer was told these lines fill a batch (once per batch).
    told: bool,
}

impl Pending {
    fn new(limit: usize) -> Pending {
        Pending { lines: Mutex::new(Lines::default()), limit, full: Notify::new() }
    }

    /// Appends one line written by `write`; false, with nothing appended, when
    /// the buffer is full or the line could not be formatted.
    fn push(&self, write: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>) -> bool {
        let mut lines = self.lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if lines.bytes.len() >= self.limit {
            return false;
        }
        let before = lines.bytes.len();
        if write(&mut lines.bytes).is_err() {
            lines.bytes.truncate(before);
            return false;
        }
        lines.count += 1;
        if lines.bytes.len() >= FLUSH_BYTES && !lines.told {
            lines.told = true;
            drop(lines);
            self.full.notify_one();
        }
        true
    }

    /// Swaps the lines gathered so far for `empty`; returns how many there were.
    fn take(&self, empty: &mut Vec<u8>) -> u64 {
        let mut lines = self.lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::swap(&mut lines.bytes, empty);
        lines.told = false;
        std::mem::take(&mut lines.count)
    }
}

/// One request, as logged.
pub struct Entry<'a> {
    /// The client's IP address as text (made once per connection).
    pub client: &'a str,
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
    /// The request's `X-Request-Id`.
    pub request_id: &'a str,
    /// The W3C trace id sent to the backend in `traceparent`.
    pub trace_id: Option<&'a str>,
}

/// The JSON form of an [`Entry`].
#[derive(Serialize)]
struct JsonLine<'a> {
    time: String,
    client: &'a str,
    host: &'a str,
    method: &'a str,
    uri: &'a str,
    status: u16,
    bytes: Option<u64>,
    upstream: Option<String>,
    upstream_time: Option<f64>,
    total_time: f64,
    trace_id: Option<&'a str>,
    tool: Option<&'a str>,
    request_id: &'a str,
}

impl AccessLog {
    /// Opens the log named by `spec` (`off`, `stdout` or a path) and spawns
    /// its writer. The writer reopens the file whenever `reopen` is notified;
    /// lines that cannot be written are counted in `lost`.
    pub fn open(spec: &str, format: Format, lost: Counter, reopen: Arc<Notify>) -> Result<Option<AccessLog>, Error> {
        let sink = match spec.trim() {
            "" | "off" => return Ok(None),
            "stdout" | "-" => Sink::Stdout(tokio::io::stdout()),
            path => {
                let path = PathBuf::from(path);
                let file = open_append(&path).map_err(|source| Error::AccessLog { path: spec.into(), source })?;
                Sink::File { path, file: Arc::new(file) }
            }
        };
        let pending = Arc::new(Pending::new(PENDING_BYTES));
        tokio::spawn(write_lines(pending.clone(), sink, reopen, lost.clone()));
        Ok(Some(AccessLog { pending, format, lost }))
    }

    /// Adds one line; counts it as lost when the writer is too far behind.
    pub fn log(&self, entry: &Entry<'_>) {
        let written = self.pending.push(|out| match self.format {
            Format::Text => text_line(out, entry),
            Format::Json => json_line(out, entry),
        });
        if !written {
            self.lost.inc();
        }
    }
}

fn text_line(out: &mut Vec<u8>, entry: &Entry<'_>) -> std::io::Result<()> {
    writeln!(
        out,
        "{} {} \"{} {}\" {} {} upstream={} upstream_time={} time={} trace_id={} tool={} request_id={}",
        entry.client,
        entry.host,
        entry.method,
        entry.uri.escape_debug(),
        entry.status,
        OrDash(entry.bytes),
        OrDash(entry.upstream),
        OrDash(entry.upstream_time.map(Seconds)),
        Seconds(entry.total_time),
        entry.trace_id.unwrap_or("-"),
        entry.tool.unwrap_or("-"),
        entry.request_id,
    )
}

/// A value, or `-` when there is none, written straight into the line.
struct OrDash<T>(Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(value) => value.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// A duration in seconds, to the millisecond (half a millisecond rounds up).
struct Seconds(Duration);

impl std::fmt::Display for Seconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // In integers: `{:.3}` of an `f64` took a quarter of a line's
        // formatting, twice per line.
        let millis = u64::try_from((self.0.as_nanos() + 500_000) / 1_000_000).unwrap_or(u64::MAX);
        write!(f, "{}.{:03}", millis / 1000, millis % 1000)
    }
}

fn json_line(out: &mut Vec<u8>, entry: &Entry<'_>) -> std::io::Result<()> {
    let json = JsonLine {
        time: jiff::Timestamp::now().to_string(),
        client: entry.client,
        host: entry.host,
        method: entry.method,
        uri: entry.uri,
        status: entry.status,
        bytes: entry.bytes,
        upstream: entry.upstream.map(|u| u.to_string()),
        upstream_time: entry.upstream_time.map(|t| t.as_secs_f64()),
        total_time: entry.total_time.as_secs_f64(),
        trace_id: entry.trace_id,
        tool: entry.tool,
        request_id: entry.request_id,
    };
    serde_json::to_writer(&mut *out, &json)?;
    out.push(b'\n');
    Ok(())
}

/// Where lines go.
enum Sink {
    Stdout(tokio::io::Stdout),
    /// A file opened for appending, reopened by name on request.
    File {
        path: PathBuf,
        file: Arc<std::fs::File>,
    },
}

impl Sink {
    /// Writes `batch` whole; a file is written on the blocking pool.
    async fn write(&mut self, batch: Vec<u8>) -> (Vec<u8>, std::io::Result<()>) {
        match self {
            Sink::Stdout(out) => {
                let result = async { out.write_all(&batch).await.and(out.flush().await) }.await;
                (batch, result)
            }
            Sink::File { file, .. } => {
                let file = file.clone();
                let written = tokio::task::spawn_blocking(move || {
                    let result = (&*file).write_all(&batch);
                    (batch, result)
                })
                .await;
                written.unwrap_or_else(|e| (Vec::new(), Err(std::io::Error::other(e))))
            }
        }
    }

    /// Opens the file again by name (after logrotate moved it); on failure
    /// the old file keeps receiving lines, so nothing is lost.
    fn reopen(&mut self) {
        let Sink::File { path, file } = self else { return };
        match open_append(path) {
            Ok(new) => {
                *file = Arc::new(new);
                info!(path = %path.display(), "access log reopened");
            }
            Err(error) => {
                warn!(path = %path.display(), %error, "cannot reopen the access log; still writing to the old file")
            }
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().create(true).append(true).open(path)
}

/// Writes what the request path gathered in `pending` every [`FLUSH_AFTER`],
/// until every [`AccessLog`] handle is gone (then once more, so the last lines
/// are not lost).
async fn write_lines(pending: Arc<Pending>, mut sink: Sink, reopen: Arc<Notify>, lost: Counter) {
    let mut batch = Vec::with_capacity(FLUSH_BYTES + 4 * 1024);
    // Whether the last write failed: the failure is logged once, not per line, on a full disk.
    let mut failing = false;
    loop {
        let reopening = tokio::select! {
            _ = reopen.notified() => true,
            _ = pending.full.notified() => false,
            _ = tokio::time::sleep(FLUSH_AFTER) => false,
        };
        // Checked before taking the lines, so none can come after the last write.
        let last = Arc::strong_count(&pending) == 1;
        // Lines gathered before a reopen go to the old file, the ones after it to the new one.
        let lines = pending.take(&mut batch);
        if lines > 0 {
            let (returned, result) = sink.write(std::mem::take(&mut batch)).await;
            batch = returned;
            match result {
                Ok(()) if failing => {
                    failing = false;
                    info!("access log writable again");
                }
                Ok(()) => {}
                Err(error) => {
                    // A partial write may have landed some of them; all are counted, as none can be trusted.
                    lost.inc_by(lines);
                    if !failing {
                        failing = true;
                        warn!(%error, "cannot write the access log; counting lost lines in access_log_lost_lines_total");
                    }
                }
            }
        }
        batch.clear();
        if last {
            return;
        }
        if reopening {
            sink.reopen();
        }
    }
}

/// Turns SIGUSR1 into access log reopen requests until `stop`. Installed
/// whether or not a log file is configured, so a stray logrotate signal
/// never kills the proxy (SIGUSR1's default action).
pub(crate) async fn reopen_on_sigusr1(reopen: Arc<Notify>, stop: CancellationToken) {
    let mut usr1 = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()) {
        Ok(signal) => signal,
        Err(error) => {
            warn!(%error, "cannot listen for SIGUSR1; the access log reopens only through the handle");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            got = usr1.recv() => {
                if got.is_none() {
                    return;
                }
                info!("SIGUSR1: reopening the access log");
                reopen.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// True when the writer has been called for a full batch (or is within 20 ms).
    async fn writer_called(pending: &Pending) -> bool {
        tokio::time::timeout(Duration::from_millis(20), pending.full.notified()).await.is_ok()
    }

    #[test]
    fn text_lines_keep_their_format_and_times_round_to_the_millisecond() {
        let upstream = "http://192.0.2.9:8000";
        let mut entry = Entry {
            client: "192.0.2.1",
            host: "foo.toolforge.org",
            method: "GET",
            uri: "/a?q=\"x\"",
            status: 200,
            bytes: Some(12),
            upstream: Some(&upstream),
            upstream_time: Some(Duration::from_micros(1_500)),
            total_time: Duration::from_nanos(61_234_500_000),
            tool: Some("foo"),
            request_id: "abc",
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
        };
        let mut out = Vec::new();
        text_line(&mut out, &entry).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "192.0.2.1 foo.toolforge.org \"GET /a?q=\\\"x\\\"\" 200 12 upstream=http://192.0.2.9:8000 upstream_time=0.002 \
             time=61.235 trace_id=4bf92f3577b34da6a3ce929d0e0e4736 tool=foo request_id=abc\n"
        );
        (entry.bytes, entry.upstream, entry.upstream_time, entry.tool, entry.trace_id) = (None, None, None, None, None);
        entry.total_time = Duration::from_nanos(499_999);
        let mut out = Vec::new();
        text_line(&mut out, &entry).unwrap();
        let line = String::from_utf8(out).unwrap();
        assert!(
            line.ends_with(" 200 - upstream=- upstream_time=- time=0.000 trace_id=- tool=- request_id=abc\n"),
            "{line}"
        );
        for (nanos, text) in
            [(0, "0.000"), (999_499_999, "0.999"), (999_500_000, "1.000"), (3_600_007_000_000, "3600.007")]
        {
            assert_eq!(Seconds(Duration::from_nanos(nanos)).to_string(), text);
        }
    }

    /// A line of 1 KiB.
    fn kib_line(out: &mut Vec<u8>) -> std::io::Result<()> {
        out.extend_from_slice(&[b'x'; 1023]);
        out.push(b'\n');
        Ok(())
    }

    #[tokio::test]
    async fn a_full_batch_calls_the_writer_before_the_flush_interval() {
        let pending = Pending::new(PENDING_BYTES);
        for _ in 0..FLUSH_BYTES / 1024 - 1 {
            assert!(pending.push(kib_line));
        }
        assert!(!writer_called(&pending).await, "called with less than a batch");
        assert!(pending.push(kib_line));
        assert!(writer_called(&pending).await, "not called with a full batch");
        let mut batch = Vec::new();
        assert_eq!(pending.take(&mut batch), (FLUSH_BYTES / 1024) as u64);
        // Each batch calls it again.
        for _ in 0..FLUSH_BYTES / 1024 {
            assert!(pending.push(kib_line));
        }
        assert!(writer_called(&pending).await, "not called for the second batch");
    }

    #[test]
    fn lines_past_the_limit_are_refused_whole_until_the_writer_takes_them() {
        let pending = Pending::new(10);
        assert!(pending.push(|out| writeln!(out, "first")));
        assert!(pending.push(|out| writeln!(out, "second")));
        // 13 bytes gathered: over the limit, so the third line is refused and not cut.
        assert!(!pending.push(|out| writeln!(out, "third")));
        let mut batch = Vec::new();
        assert_eq!(pending.take(&mut batch), 2);
        assert_eq!(batch, b"first\nsecond\n");
        // The writer took them: there is room again.
        assert!(pending.push(|out| writeln!(out, "third")));
        assert_eq!(pending.take(&mut Vec::new()), 1);
    }

    #[test]
    fn a_line_that_fails_to_format_leaves_nothing_behind() {
        let pending = Pending::new(1024);
        assert!(!pending.push(|out| {
            out.extend_from_slice(b"half a li");
            Err(std::io::Error::other("cannot format"))
        }));
        let mut batch = Vec::new();
        assert_eq!(pending.take(&mut batch), 0);
        assert!(batch.is_empty());
    }
}
