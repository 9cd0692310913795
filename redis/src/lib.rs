//! The route table: the Redis schema of SPEC §2 behind typed reads and writes,
//! and the in-memory cache the proxy serves from, kept fresh by Redis.
//!
//! This crate is the only code that knows Redis key names and value encodings.
//!
//! # Layout
//!
//! - [`types`]: tool names, route patterns and backend URLs that validate themselves.
//! - [`endpoint`]: where Redis is (`redis://` or `redis+sentinel://`) and how to connect.
//! - [`networks`]: [`NetworkList`], networks a route's destination may not be in.
//! - [`keys`]: key names and set-member encodings (private to the crate's API).
//! - [`provenance`]: [`RouteSource`], who writes a route; [`Provenance`] and [`AuditEntry`], what was recorded.
//! - [`store`]: [`RouteStore`], typed reads and writes for the CLI, registrar and kube-sync.
//! - [`guarded_delete`]: a route removed only while it still names a given backend (dead registrations).
//! - [`lock`]: [`RedisLock`], one holder at a time among processes sharing Redis, with an expiry.
//! - [`table`]: [`ToolRoutes`], one tool's compiled routes in match order.
//! - `lookup`: the one-pass search of a tool's routes, built with its [`ToolRoutes`].
//! - `literals`: many literal patterns found in one pass (Aho-Corasick).
//! - `regex_dfa`: many regex patterns found in one pass (a DFA built at load).
//! - [`cache`]: [`RouteCache`], the shared in-memory table and its freshness status.
//! - [`origin`]: [`CacheOrigin`], which server (or snapshot) the cache's table comes from.
//! - [`sentinel_watch`]: follows `+switch-master`, so no connection outlives its master's reign.
//! - [`sync`]: the background task that loads the cache and applies invalidations.
//! - [`error`]: [`RouteTableError`], what went wrong.

#![forbid(unsafe_code)]

pub mod cache;
pub mod endpoint;
pub mod error;
pub mod guarded_delete;
mod keys;
mod literals;
pub mod lock;
mod lookup;
pub mod networks;
pub mod origin;
pub mod provenance;
mod regex_dfa;
pub mod sentinel_watch;
pub mod store;
pub mod sync;
pub mod table;
pub mod types;

pub use cache::{CacheStatus, RouteCache};
pub use endpoint::RedisEndpoint;
pub use error::RouteTableError;
pub use guarded_delete::GuardedDelete;
pub use lock::RedisLock;
pub use networks::{DEFAULT_DENIED_NETWORKS, InvalidNetwork, NetworkList};
pub use origin::{CacheOrigin, OriginState};
pub use provenance::{AUDIT_MAXLEN, AuditAction, AuditEntry, Provenance, RouteSource, Writer};
pub use store::{OwnedDelete, OwnedServiceRoute, OwnedWrite, RouteStore, ToolEntry};
pub use sync::{CacheSyncConfig, run_cache_sync};
pub use table::{MAX_ROUTES_PER_TOOL, Route, ToolRoutes, regex_routes_fit};
pub use types::{BackendUrl, InvalidInput, RoutePattern, Scheme, ToolName};
