//! Errors: what went wrong with one request (and which side caused it), and
//! why the proxy could not start.

use std::io;

use http::StatusCode;

use crate::pages::Page;

/// Why the proxy could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration does not work.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A certificate or key could not be loaded.
    #[error("cannot load TLS certificate {path}: {reason}")]
    Tls {
        /// The file that failed.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An error page file could not be read.
    #[error("cannot read error page {path}")]
    ErrorPage {
        /// The file that failed.
        path: String,
        /// The read error.
        #[source]
        source: io::Error,
    },
    /// The access log could not be opened.
    #[error("cannot open access log {path}")]
    AccessLog {
        /// The file that failed.
        path: String,
        /// The open error.
        #[source]
        source: io::Error,
    },
}

/// Why one request was not proxied normally. Each variant says which side
/// failed; [`ProxyError::status`] is the one place that maps them to status codes.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The client sent something we refuse to interpret (bad Host, bad encoding, smuggling).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The client's address is in a banned network.
    #[error("client banned")]
    Banned,
    /// The request has no User-Agent.
    #[error("no user agent")]
    NoUserAgent,
    /// User-Agent or Referer matched a block list.
    #[error("blocked user agent or referer")]
    Blocked,
    /// The client exceeded its rate limit.
    #[error("rate limited")]
    RateLimited,
    /// Maintenance mode is on.
    #[error("maintenance mode")]
    Maintenance,
    /// The request body exceeded the configured maximum.
    #[error("request body too large")]
    BodyTooLarge,
    /// No route and no default backend.
    #[error("no webservice")]
    NoWebservice,
    /// The backend refused the connection or broke it.
    #[error("upstream unreachable")]
    UpstreamUnreachable(#[source] BoxError),
    /// The backend did not connect or answer in time.
    #[error("upstream timed out")]
    UpstreamTimeout(#[source] BoxError),
    /// The client went away or its body broke while we forwarded it.
    #[error("client body error")]
    ClientBody(#[source] BoxError),
    /// The backend already has `max_connections_per_backend` requests in
    /// flight and no slot freed within `backend_queue_timeout_ms`.
    #[error("backend over capacity")]
    OverCapacity,
}

/// A boxed error source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl ProxyError {
    /// The status code the client sees.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) | ProxyError::ClientBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::Banned | ProxyError::NoUserAgent | ProxyError::Blocked => StatusCode::FORBIDDEN,
            ProxyError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Maintenance | ProxyError::OverCapacity => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::NoWebservice => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The page shown with the status, if any (plain text otherwise).
    pub fn page(&self) -> Option<Page> {
        match self {
            ProxyError::Banned => Some(Page::Banned),
            ProxyError::RateLimited => Some(Page::RateLimit),
            ProxyError::Maintenance | ProxyError::OverCapacity => Some(Page::TechnicalIssues),
            ProxyError::NoWebservice => Some(Page::NoWebservice),
            ProxyError::UpstreamUnreachable(_) => Some(Page::Unreachable),
            ProxyError::UpstreamTimeout(_) => Some(Page::Timeout),
            _ => None,
        }
    }

    /// The plain-text body sent when there is no page.
    pub fn text(&self) -> &'static str {
        match self {
            ProxyError::NoUserAgent => "Requests must have a user agent",
            ProxyError::Blocked => "Forbidden\n",
            ProxyError::BodyTooLarge => "Request body too large\n",
            _ => "Bad request\n",
        }
    }

    /// True when the upstream side failed (worth a warning in the log).
    pub fn is_upstream(&self) -> bool {
        matches!(self, ProxyError::UpstreamUnreachable(_) | ProxyError::UpstreamTimeout(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mapping_is_pinned() {
        let io = || -> BoxError { Box::new(io::Error::other("x")) };
        let cases = [
            (ProxyError::BadRequest("x"), 400, None),
            (ProxyError::ClientBody(io()), 400, None),
            (ProxyError::BodyTooLarge, 413, None),
            (ProxyError::Banned, 403, Some(Page::Banned)),
            (ProxyError::NoUserAgent, 403, None),
            (ProxyError::Blocked, 403, None),
            (ProxyError::RateLimited, 429, Some(Page::RateLimit)),
            (ProxyError::Maintenance, 503, Some(Page::TechnicalIssues)),
            (ProxyError::NoWebservice, 503, Some(Page::NoWebservice)),
            (ProxyError::OverCapacity, 503, Some(Page::TechnicalIssues)),
            (ProxyError::UpstreamUnreachable(io()), 502, Some(Page::Unreachable)),
            (ProxyError::UpstreamTimeout(io()), 504, Some(Page::Timeout)),
        ];
        for (error, status, page) in cases {
            assert_eq!(error.status().as_u16(), status, "{error}");
            assert_eq!(error.page(), page, "{error}");
        }
    }
}
