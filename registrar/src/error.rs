//! Errors of the registrar crate.

use crate::config::ConfigError;

/// Why the registrar could not run. Per-connection problems are never
/// errors here: they are answered on the connection and logged.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The `[registrar]` settings do not validate.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The listener handed to [`crate::run`] has no local address.
    #[error("registrar listener has no local address: {0}")]
    ListenerAddress(#[source] std::io::Error),
}
