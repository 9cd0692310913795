//! The registrar: the TCP server on port 8282 where grid webservices,
//! authenticated by ident (RFC 1413), register and unregister their routes.
//!
//! # Layout
//!
//! - [`config`]: [`Config`] (`[registrar]`) and its command-line [`Flags`].
//! - [`server`]: [`run`], the accept loop with bounded concurrency and drain.
//! - [`connection`]: one exchange, from ident to reply.
//! - [`ident`]: the RFC 1413 client and its reply parser.
//! - [`protocol`]: the line protocol decoder (no I/O).
//! - [`allow`]: the optional allow-list of destinations.
//! - [`destination`]: the denied networks no destination may be in.
//! - [`clients`]: which client addresses may connect at all.
//! - [`metrics`]: [`Metrics`], commands by result.
//! - [`error`]: [`Error`], why the registrar cannot run.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod allow;
pub mod clients;
pub mod config;
pub mod connection;
pub mod destination;
pub mod error;
pub mod ident;
pub mod metrics;
pub mod protocol;
pub mod server;

pub use config::{Config, ConfigError, Flags};
pub use error::Error;
pub use metrics::Metrics;
pub use server::run;
