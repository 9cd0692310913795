//! Errors of the route table crate.

use std::time::Duration;

/// Why a route table operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RouteTableError {
    /// Redis answered with an error or the connection broke.
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer within the command timeout.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// The Redis URL could not be understood.
    #[error("invalid redis url {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given (credentials included only if the operator typed them).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A connection attempt failed moments ago; not retried yet, so a crowd
    /// of callers does not each open a connection to a Redis that is away.
    #[error("{0}")]
    Unreachable(String),
    /// The push channel that carries invalidations closed: the connection is gone.
    #[error("redis connection closed")]
    Disconnected,
}

impl RouteTableError {
    /// True when the error means Redis could not be reached or did not answer,
    /// as opposed to Redis refusing a command.
    pub fn is_unavailable(&self) -> bool {
        match self {
            RouteTableError::Redis(e) => {
                e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
            }
            RouteTableError::Timeout(_) | RouteTableError::Disconnected | RouteTableError::Unreachable(_) => true,
            RouteTableError::InvalidUrl { .. } => false,
        }
    }
}
