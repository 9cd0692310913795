//! The last-known-good route table on disk (`[proxy] snapshot_file`): a
//! proxy that starts while Redis is unreachable serves it instead of
//! nothing, until the first full load from Redis replaces it.
//!
//! File format, version 1: one header line
//! `dynamicproxy-route-snapshot 1 <written-unix-secs> <body-bytes> <crc32-hex>`
//! then the body, one JSON object per tool and line
//! (`{"tool":…,"redirect":…,"has_routes":…,"routes":[[pattern,backend],…]}`).
//! The length and checksum make a truncated or damaged file fail as a
//! whole: a partial table would silently route some tools and not others.
//! Written to a temporary file in the same directory, fsynced, renamed over
//! the old one and the directory fsynced, so a crash leaves either copy
//! whole, never a mix.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dynamicproxy_redis::{BackendUrl, Route, RouteCache, RoutePattern, ToolName, ToolRoutes};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// First word of the header: what the file is.
const MAGIC: &str = "dynamicproxy-route-snapshot";
/// Format version written and understood.
const VERSION: u32 = 1;
/// Largest snapshot read: far above any real table (Toolforge has a few
/// thousand tools of a few hundred bytes each), small enough to read at once.
const MAX_BODY_BYTES: u64 = 256 << 20;
/// Shortest time between two writes. A burst of registrations (a grid
/// restart, kube-sync's relist) makes one write, not hundreds; the file is
/// at most this much behind Redis, which is fine for a table whose use is
/// to start when Redis is down.
pub const MIN_WRITE_INTERVAL: Duration = Duration::from_secs(5);

/// Why a snapshot file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file could not be read (absent, permissions).
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a whole, intact snapshot of a known version.
    #[error("{path} is not a valid route snapshot: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong (bad header, truncated, checksum mismatch, bad line).
        reason: String,
    },
}

/// A snapshot read back from disk.
pub struct Snapshot {
    /// When it was written (the table matched Redis then).
    pub written_at: SystemTime,
    /// Every tool's routes.
    pub tools: Vec<(ToolName, ToolRoutes)>,
}

#[derive(Serialize, Deserialize)]
struct Line {
    tool: String,
    redirect: bool,
    has_routes: bool,
    routes: Vec<(String, String)>,
}

/// Reads and checks `path`.
pub fn read(path: &Path) -> Result<Snapshot, SnapshotError> {
    let invalid = |reason: String| SnapshotError::Invalid { path: path.to_path_buf(), reason };
    let bytes = std::fs::read(path).map_err(|source| SnapshotError::Read { path: path.to_path_buf(), source })?;
    let newline = bytes.iter().position(|&b| b == b'\n').ok_or_else(|| invalid("no header line".into()))?;
    let header = std::str::from_utf8(&bytes[..newline]).map_err(|_| invalid("header is not UTF-8".into()))?;
    let fields: Vec<&str> = header.split(' ').collect();
    let [magic, version, written, length, crc] = fields.as_slice() else {
        return Err(invalid(format!("header has {} fields, not 5", fields.len())));
    };
    if *magic != MAGIC {
        return Err(invalid("not a dynamicproxy route snapshot".into()));
    }
    if version.parse::<u32>().ok() != Some(VERSION) {
        return Err(invalid(format!("format version {version}, this proxy reads {VERSION}")));
    }
    let written: u64 = written.parse().map_err(|_| invalid("bad time in header".into()))?;
    let length: u64 = length.parse().map_err(|_| invalid("bad length in header".into()))?;
    let crc = u32::from_str_radix(crc, 16).map_err(|_| invalid("bad checksum in header".into()))?;
    let body = &bytes[newline + 1..];
    if length > MAX_BODY_BYTES || body.len() as u64 != length {
        return Err(invalid(format!("truncated: {} body bytes, header says {length}", body.len())));
    }
    if crc32fast::hash(body) != crc {
        return Err(invalid("checksum mismatch".into()));
    }
    let text = std::str::from_utf8(body).map_err(|_| invalid("body is not UTF-8".into()))?;
    let mut tools = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let bad = |what: String| invalid(format!("line {}: {what}", number + 2));
        let line: Line = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let tool = ToolName::parse(&line.tool).map_err(|e| bad(e.to_string()))?;
        let mut routes = Vec::with_capacity(line.routes.len());
        for (pattern, backend) in &line.routes {
            // The table was valid when written; a pattern this build refuses is skipped as Redis's would be.
            if let (Ok(pattern), Ok(backend)) = (RoutePattern::parse(pattern), BackendUrl::parse(backend)) {
                routes.push(Route { pattern, backend });
            }
        }
        tools.push((tool, ToolRoutes::new(routes, line.has_routes, line.redirect)));
    }
    Ok(Snapshot { written_at: UNIX_EPOCH + Duration::from_secs(written), tools })
}

/// Writes the cache's whole table to `path` atomically.
pub fn write(path: &Path, cache: &RouteCache) -> std::io::Result<usize> {
    let mut entries = cache.entries();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut body = Vec::new();
    for (tool, routes) in &entries {
        let line = Line {
            tool: tool.to_string(),
            redirect: routes.canonical_redirect(),
            has_routes: routes.has_routes_key(),
            routes: routes.routes().iter().map(|r| (r.pattern.to_string(), r.backend.to_string())).collect(),
        };
        serde_json::to_writer(&mut body, &line)?;
        body.push(b'\n');
    }
    let written = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let header = format!("{MAGIC} {VERSION} {written} {} {:08x}\n", body.len(), crc32fast::hash(&body));

    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "snapshot".into());
    let temp = dir.join(format!(".{name}.tmp"));
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(header.as_bytes())?;
    file.write_all(&body)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, path)?;
    // The rename itself must reach the disk too.
    std::fs::File::open(dir)?.sync_all()?;
    Ok(entries.len())
}

/// Loads `path` into a cache that has not loaded from Redis yet, logging
/// the outcome in one line. A missing file is normal (first start); an
/// invalid one is refused whole and the proxy starts empty.
pub fn restore(path: &Path, cache: &RouteCache) {
    match read(path) {
        Ok(snapshot) => {
            let tools = snapshot.tools.len();
            let age = SystemTime::now().duration_since(snapshot.written_at).unwrap_or_default().as_secs();
            if cache.restore_snapshot(snapshot.tools, snapshot.written_at) {
                info!(file = %path.display(), tools, age_secs = age,
                    "serving the route snapshot until Redis answers");
            }
        }
        Err(SnapshotError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            info!(file = %path.display(), "no route snapshot yet; starting empty");
        }
        Err(error) => warn!(%error, "route snapshot refused; starting empty"),
    }
}

/// Rewrites `path` after the cache changes, at most every `min_interval`,
/// once the cache has loaded from Redis (a snapshot is never rewritten from
/// itself), until `shutdown`.
pub async fn run_writer(path: PathBuf, cache: RouteCache, min_interval: Duration, shutdown: CancellationToken) {
    let changes = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&changes);
    cache.on_change(Arc::new(move |_, _, _| {
        counter.fetch_add(1, Ordering::Relaxed);
    }));
    let mut written: Option<(u64, u64)> = None; // (changes, full loads) at the last write
    let mut tick = tokio::time::interval(min_interval.min(Duration::from_secs(1)));
    let mut last_write = tokio::time::Instant::now() - min_interval;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let status = cache.status();
        if status.full_loads == 0 || last_write.elapsed() < min_interval {
            continue;
        }
        let now = (changes.load(Ordering::Relaxed), status.full_loads);
        // The first load is always written, so the file's time says when it last matched Redis.
        if written.is_some_and(|(c, _)| c == now.0) {
            continue;
        }
        let (file, table) = (path.clone(), cache.clone());
        match tokio::task::spawn_blocking(move || write(&file, &table)).await {
            Ok(Ok(tools)) => debug!(tools, "route snapshot written"),
            Ok(Err(error)) => warn!(file = %path.display(), %error, "cannot write the route snapshot"),
            Err(error) => warn!(%error, "route snapshot writer failed"),
        }
        written = Some(now);
        last_write = tokio::time::Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_damaged_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        for (bytes, reason) in [
            (&b""[..], "no header"),
            (b"garbage\n", "fields"),
            (b"dynamicproxy-route-snapshot 2 0 0 00000000\n", "version"),
            (b"dynamicproxy-route-snapshot 1 0 5 00000000\nabc", "truncated"),
            (b"dynamicproxy-route-snapshot 1 0 3 00000000\nabc", "checksum"),
        ] {
            std::fs::write(&path, bytes).unwrap();
            let Err(error) = read(&path) else { panic!("accepted {bytes:?}") };
            assert!(error.to_string().contains(reason), "{error}");
        }
    }
}
