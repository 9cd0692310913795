//! Backend names to addresses, through a cache: every grid registration
//! names a host (`tools-webgrid-lighttpd-1205.tools.eqiad.wmflabs`), and a
//! blocking `getaddrinfo` per new backend connection would tie up a thread
//! and hit DNS on every one.
//!
//! - Answers are kept for their TTL (capped at [`MAX_TTL`]).
//! - Failures are kept for [`NEGATIVE_TTL`], so a name that does not resolve
//!   costs one query per few seconds, not one per request.
//! - While DNS does not answer (timeout, refused, server failure), the last
//!   answer is served for up to [`STALE_WINDOW`] after its TTL ran out: tools
//!   keep working through a short DNS outage. A name DNS says does not exist
//!   (NXDOMAIN, no address) is not served stale: it was removed on purpose.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use tokio::time::Instant;
use tracing::{info, warn};

/// How long a failed lookup is remembered. Short: a tool whose name just
/// appeared in DNS should not wait long, but a burst of requests for a
/// broken name must not become a burst of queries.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// How long after its TTL an answer is still used while DNS does not answer.
/// Five minutes covers a resolver restart or a short network partition; a
/// backend that really moved during an outage is unreachable either way.
pub const STALE_WINDOW: Duration = Duration::from_secs(300);
/// Longest time an answer is trusted, whatever its TTL says.
pub const MAX_TTL: Duration = Duration::from_secs(3600);
/// Longest wait for DNS on one lookup: past it the stale answer (if any) is
/// used. Well under the backend connect timeout, so a DNS outage does not
/// turn every new connection into a 504.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// Names remembered at most; beyond it expired entries are dropped first.
const MAX_ENTRIES: usize = 65_536;

/// Why a backend name has no address.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    /// DNS says the name does not exist or has no address.
    #[error("{name} does not resolve: {reason}")]
    NoAddress {
        /// The backend name.
        name: String,
        /// What DNS answered.
        reason: String,
    },
    /// DNS did not answer and no earlier answer is recent enough.
    #[error("cannot resolve {name}: {reason}")]
    Unavailable {
        /// The backend name.
        name: String,
        /// Why the lookup failed.
        reason: String,
    },
}

/// One cached name.
#[derive(Debug, Clone)]
struct Entry {
    /// The last good answer, if any.
    addrs: Option<Arc<[IpAddr]>>,
    /// Until then `addrs` is served without asking DNS.
    fresh_until: Instant,
    /// Until then `addrs` is served when DNS fails.
    stale_until: Instant,
    /// Set after a failure: until then DNS is not asked again.
    failed: Option<(Instant, ResolveError)>,
}

/// Where answers come from.
#[derive(Clone)]
enum Source {
    /// hickory over the configured or system name servers.
    Dns(Box<TokioResolver>),
    /// The system resolver (`getaddrinfo` on the blocking pool), used only
    /// when no name server could be configured; its TTL is unknown.
    System,
}

/// The right to query DNS for one name, held by one lookup at a time.
type Turn = Arc<tokio::sync::Mutex<()>>;

/// The shared caching resolver; cheap to clone.
#[derive(Clone)]
pub struct BackendResolver {
    source: Source,
    cache: Arc<Mutex<HashMap<Box<str>, Entry>>>,
    /// One lookup per name at a time: when a popular backend's answer
    /// expires, the connections opened meanwhile wait for that one query
    /// instead of each sending their own. (hickory also shares identical
    /// queries in flight; this holds for the getaddrinfo fallback too, and
    /// keeps one writer per cache entry.)
    inflight: Arc<Mutex<HashMap<Box<str>, Turn>>>,
}

impl std::fmt::Debug for BackendResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendResolver").finish_non_exhaustive()
    }
}

/// TTL assumed for answers of the system resolver.
const SYSTEM_TTL: Duration = Duration::from_secs(30);

impl BackendResolver {
    /// A resolver asking `servers` (UDP, then TCP), or the name servers of
    /// `/etc/resolv.conf` when `servers` is empty; `/etc/hosts` is read too.
    pub fn new(servers: &[SocketAddr]) -> Self {
        let builder = if servers.is_empty() {
            match TokioResolver::builder_tokio() {
                Ok(builder) => builder,
                Err(error) => {
                    warn!(%error, "cannot read the system DNS configuration; using getaddrinfo without a TTL");
                    return BackendResolver { source: Source::System, cache: Arc::default(), inflight: Arc::default() };
                }
            }
        } else {
            let mut config = ResolverConfig::from_parts(None, Vec::new(), Vec::new());
            for server in servers {
                let mut ns = NameServerConfig::udp_and_tcp(server.ip());
                for connection in &mut ns.connections {
                    connection.port = server.port();
                }
                config.add_name_server(ns);
            }
            TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        };
        let mut builder = builder;
        let options: &mut ResolverOpts = builder.options_mut();
        options.timeout = QUERY_TIMEOUT / 2;
        options.attempts = 2;
        options.negative_max_ttl = Some(NEGATIVE_TTL);
        options.positive_max_ttl = Some(MAX_TTL);
        match builder.build() {
            Ok(resolver) => {
                info!(servers = ?servers, "backend names resolved through the DNS cache");
                BackendResolver {
                    source: Source::Dns(Box::new(resolver)),
                    cache: Arc::default(),
                    inflight: Arc::default(),
                }
            }
            Err(error) => {
                warn!(%error, "cannot build the DNS resolver; using getaddrinfo without a TTL");
                BackendResolver { source: Source::System, cache: Arc::default(), inflight: Arc::default() }
            }
        }
    }

    /// The addresses of `name`, from the cache when fresh; see the module
    /// docs for failures and stale answers.
    pub async fn resolve(&self, name: &str) -> Result<Arc<[IpAddr]>, ResolveError> {
        if let Some(cached) = self.cached(name) {
            return cached;
        }
        let turn = self.inflight.lock().unwrap_or_else(|p| p.into_inner()).entry(name.into()).or_default().clone();
        let _turn = turn.lock().await;
        // Whoever held the turn before may have answered for us.
        if let Some(cached) = self.cached(name) {
            return cached;
        }
        let result = self.lookup(name).await;
        self.inflight.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
        result
    }

    /// The cached answer (or remembered failure) while it still holds.
    fn cached(&self, name: &str) -> Option<Result<Arc<[IpAddr]>, ResolveError>> {
        let now = Instant::now();
        let cache = self.lock();
        let entry = cache.get(name)?;
        if let Some(addrs) = &entry.addrs
            && now < entry.fresh_until
        {
            return Some(Ok(addrs.clone()));
        }
        let (until, error) = entry.failed.as_ref()?;
        if now >= *until {
            return None;
        }
        Some(match &entry.addrs {
            Some(addrs) if now < entry.stale_until => Ok(addrs.clone()),
            _ => Err(error.clone()),
        })
    }

    /// Asks DNS and records the outcome: a new answer, or a failure that
    /// keeps the previous answer for the stale window.
    async fn lookup(&self, name: &str) -> Result<Arc<[IpAddr]>, ResolveError> {
        let cached = self.lock().get(name).cloned();
        let answer = self.query(name).await;
        let now = Instant::now();
        let mut cache = self.lock();
        if cache.len() >= MAX_ENTRIES {
            cache.retain(|_, e| now < e.stale_until || e.failed.as_ref().is_some_and(|(until, _)| now < *until));
            if cache.len() >= MAX_ENTRIES {
                cache.clear();
            }
        }
        match answer {
            Ok((addrs, ttl)) => {
                let fresh_until = now + ttl.min(MAX_TTL);
                let entry = Entry {
                    addrs: Some(addrs.clone()),
                    fresh_until,
                    stale_until: fresh_until + STALE_WINDOW,
                    failed: None,
                };
                cache.insert(name.into(), entry);
                Ok(addrs)
            }
            Err(error) => {
                let previous = cached.filter(|_| matches!(error, ResolveError::Unavailable { .. }));
                let stale = previous.as_ref().and_then(|e| e.addrs.clone().filter(|_| now < e.stale_until));
                let entry = Entry {
                    addrs: stale.clone(),
                    fresh_until: now,
                    stale_until: previous.map_or(now, |e| e.stale_until),
                    failed: Some((now + NEGATIVE_TTL, error.clone())),
                };
                cache.insert(name.into(), entry);
                match stale {
                    Some(addrs) => {
                        warn!(name, %error, "DNS failed; using the last answer");
                        Ok(addrs)
                    }
                    None => Err(error),
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Entry>> {
        // A panic while holding the lock leaves a consistent map: use it.
        self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Asks the source once, bounded by [`QUERY_TIMEOUT`].
    async fn query(&self, name: &str) -> Result<(Arc<[IpAddr]>, Duration), ResolveError> {
        let unavailable = |reason: String| ResolveError::Unavailable { name: name.to_string(), reason };
        let no_address = |reason: String| ResolveError::NoAddress { name: name.to_string(), reason };
        match &self.source {
            Source::Dns(resolver) => {
                let lookup = tokio::time::timeout(QUERY_TIMEOUT, resolver.lookup_ip(name))
                    .await
                    .map_err(|_| unavailable("DNS did not answer in time".into()))?;
                match lookup {
                    Ok(lookup) => {
                        let addrs: Arc<[IpAddr]> = lookup.iter().collect();
                        if addrs.is_empty() {
                            return Err(no_address("no address".into()));
                        }
                        let valid = lookup.valid_until();
                        let ttl = valid.saturating_duration_since(std::time::Instant::now());
                        Ok((addrs, ttl))
                    }
                    Err(error) if error.is_no_records_found() => Err(no_address(error.to_string())),
                    Err(error) => Err(unavailable(error.to_string())),
                }
            }
            Source::System => {
                let lookup = tokio::time::timeout(QUERY_TIMEOUT, tokio::net::lookup_host((name, 0)))
                    .await
                    .map_err(|_| unavailable("getaddrinfo did not answer in time".into()))?;
                match lookup {
                    Ok(addrs) => {
                        let addrs: Arc<[IpAddr]> = addrs.map(|a| a.ip()).collect();
                        if addrs.is_empty() {
                            return Err(no_address("no address".into()));
                        }
                        Ok((addrs, SYSTEM_TTL))
                    }
                    Err(error) if error.kind() == io::ErrorKind::NotFound => Err(no_address(error.to_string())),
                    Err(error) => Err(unavailable(error.to_string())),
                }
            }
        }
    }
}
