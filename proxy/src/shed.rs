//! Load shedding at accept: a connection past `max_connections` or past its
//! client's `max_connections_per_client` is refused at once instead of
//! waiting in the backlog. On plain HTTP it gets a short answer (written
//! without reading the request, so it costs one `write`) and a lingering close
//! so the answer is not lost to a RST; on TLS it is simply closed, before the
//! handshake and its CPU.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::linger::Linger;

/// Refused connections lingering at once; past it they are closed outright,
/// so a flood of refusals cannot hold file descriptors for long.
pub const MAX_LINGERING_REFUSALS: usize = 1024;

/// Why a connection was refused at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The proxy serves `max_connections` already: 503 `over-capacity`.
    MaxConnections,
    /// The client's address (or IPv6 /64) has `max_connections_per_client`
    /// open: 429 `rate-limited`, the client's own doing, as SPEC §3's rate limit.
    PerClient,
}

impl Refusal {
    /// The `reason` label of `dynamicproxy_proxy_connections_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max-connections",
            Refusal::PerClient => "per-client",
        }
    }

    /// The whole HTTP/1.1 answer sent on plain HTTP.
    pub fn answer(self) -> &'static [u8] {
        match self {
            Refusal::MaxConnections => {
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
                  Content-Length: 41\r\nConnection: close\r\nRetry-After: 5\r\nCache-Control: no-store\r\n\
                  X-Dynamicproxy-Reason: over-capacity\r\n\r\nThe proxy is overloaded; try again soon.\n"
            }
            Refusal::PerClient => {
                b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain; charset=utf-8\r\n\
                  Content-Length: 45\r\nConnection: close\r\nRetry-After: 5\r\nCache-Control: no-store\r\n\
                  X-Dynamicproxy-Reason: rate-limited\r\n\r\nToo many open connections from your network.\n"
            }
        }
    }
}

/// Refuses `stream`: on plain HTTP the short answer and a lingering close
/// (spawned, bounded by `lingering`), on TLS an immediate close.
pub fn refuse(stream: TcpStream, refusal: Refusal, tls: bool, lingering: &Arc<Semaphore>) {
    if tls {
        return;
    }
    // The answer fits in an empty socket buffer: one non-blocking write
    // (tokio takes a freshly accepted socket as writable, so it is tried at once).
    if stream.try_write(refusal.answer()).is_err() {
        return;
    }
    let Ok(permit) = lingering.clone().try_acquire_owned() else { return };
    tokio::spawn(async move {
        let _permit = permit;
        let _ = Linger::new(stream).shutdown().await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_well_framed() {
        for refusal in [Refusal::MaxConnections, Refusal::PerClient] {
            let text = std::str::from_utf8(refusal.answer()).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let length: usize =
                head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).and_then(|v| v.parse().ok()).unwrap();
            assert_eq!(length, body.len(), "{text}");
        }
    }
}
