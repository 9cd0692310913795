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
    /// The server reached through a Sentinel group is no longer its master
    /// (a demoted master still answering); the value is what `ROLE` said.
    #[error("redis server is no longer the master (role {0})")]
    NotMaster(String),
    /// The server does not speak RESP3 or lacks `CLIENT TRACKING`: Redis
    /// older than 6.0, which the route cache cannot follow.
    #[error("redis server is too old: {0} (dynamicproxy needs Redis 6.0 or newer: HELLO 3 and CLIENT TRACKING)")]
    TooOld(#[source] redis::RedisError),
}

/// Replies of a server that is not (yet) a usable master: `READONLY` (a
/// demoted master or a replica), `LOADING` (a restarted server reading its
/// data), `MASTERDOWN` (a replica that lost its master), `TRYAGAIN`. Scripts
/// wrap the code in their own error text, hence the look at the message too.
fn is_not_master(e: &redis::RedisError) -> bool {
    const CODES: [&str; 4] = ["READONLY", "LOADING", "MASTERDOWN", "TRYAGAIN"];
    if e.code().is_some_and(|code| CODES.contains(&code)) {
        return true;
    }
    let text = e.to_string();
    CODES.iter().any(|code| text.contains(&format!("{code} ")) || text.starts_with(code))
}

/// True when `e` is an old server's answer to `HELLO 3` or `CLIENT TRACKING`
/// (`ERR unknown command 'HELLO'`, `ERR Unknown subcommand or wrong number
/// of arguments for 'TRACKING'`).
pub(crate) fn is_too_old(e: &redis::RedisError) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    (text.contains("unknown command") && text.contains("hello"))
        || (text.contains("unknown subcommand") && text.contains("tracking"))
}

impl RouteTableError {
    /// True when the error means Redis could not be reached, did not answer,
    /// or is not the writable master it should be, as opposed to Redis
    /// refusing a command. Callers drop their connection on it: the next one
    /// re-resolves the master through the Sentinels.
    pub fn is_unavailable(&self) -> bool {
        match self {
            RouteTableError::Redis(e) => {
                e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
                    || is_not_master(e)
            }
            RouteTableError::Timeout(_)
            | RouteTableError::Disconnected
            | RouteTableError::Unreachable(_)
            | RouteTableError::NotMaster(_) => true,
            RouteTableError::InvalidUrl { .. } | RouteTableError::TooOld(_) => false,
        }
    }
}
