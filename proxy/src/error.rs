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
    /// The CA file trusted for https backends could not be used.
    #[error("cannot load [proxy] backend_ca_file {}: {reason}", path.display())]
    BackendCa {
        /// The file that failed.
        path: std::path::PathBuf,
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
    /// An `https://` backend's certificate does not verify against the system
    /// roots and `[proxy] backend_ca_file`; nothing was sent.
    #[error("backend certificate not trusted")]
    UntrustedBackend(#[source] crate::backend_tls::UntrustedCertificate),
    /// Every address of the backend is in `[proxy] denied_backend_networks`; nothing was sent.
    #[error("backend refused by policy")]
    DeniedBackend(#[source] crate::egress::DeniedBackend),
    /// The backend answered 101 to a request that was forwarded without an
    /// upgrade: the connection is closed rather than tunnelled, so nothing
    /// can follow on it unchecked.
    #[error("backend switched protocols unasked")]
    UnaskedUpgrade,
    /// The backend is marked down after repeated failures: answered at once
    /// instead of waiting for another connect timeout.
    #[error("backend marked down")]
    BackendDown,
    /// The tool has `tool_max_concurrent_requests` in flight already (or its
    /// backend its connection cap): refused at once rather than queued.
    #[error("over capacity")]
    OverCapacity,
    /// The client went away or its body broke while we forwarded it.
    #[error("client body error")]
    ClientBody(#[source] BoxError),
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
            ProxyError::Maintenance => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::NoWebservice | ProxyError::OverCapacity => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamUnreachable(_)
            | ProxyError::UntrustedBackend(_)
            | ProxyError::DeniedBackend(_)
            | ProxyError::UnaskedUpgrade
            | ProxyError::BackendDown => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The `X-Dynamicproxy-Reason` code (SPEC §3) of the page the client gets.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) | ProxyError::ClientBody(_) | ProxyError::BodyTooLarge => "bad-request",
            ProxyError::Banned => "banned",
            ProxyError::NoUserAgent | ProxyError::Blocked => "blocked",
            ProxyError::RateLimited => "rate-limited",
            ProxyError::Maintenance => "maintenance",
            ProxyError::NoWebservice => "no-route",
            ProxyError::OverCapacity => "over-capacity",
            ProxyError::BackendDown => "backend-down",
            // SPEC §3 has no code of its own for a certificate that does not
            // verify: the backend could not be reached safely. The page's
            // hint says what exactly ([`ProxyError::hint`]).
            ProxyError::UpstreamUnreachable(_) | ProxyError::UntrustedBackend(_) | ProxyError::UnaskedUpgrade => {
                "backend-unreachable"
            }
            ProxyError::UpstreamTimeout(_) => "backend-timeout",
            ProxyError::DeniedBackend(_) => "denied-backend",
        }
    }

    /// True when the client connection must be closed after this answer:
    /// what follows on it cannot be trusted to be framed right, or the
    /// backend tried to take it over.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            ProxyError::BadRequest(_)
                | ProxyError::ClientBody(_)
                | ProxyError::BodyTooLarge
                | ProxyError::UnaskedUpgrade
        )
    }

    /// The page shown with the status, if any (plain text otherwise).
    pub fn page(&self) -> Option<Page> {
        match self {
            ProxyError::Banned => Some(Page::Banned),
            ProxyError::RateLimited => Some(Page::RateLimit),
            ProxyError::Maintenance => Some(Page::TechnicalIssues),
            ProxyError::NoWebservice => Some(Page::NoWebservice),
            ProxyError::OverCapacity => Some(Page::OverCapacity),
            ProxyError::BackendDown => Some(Page::BackendDown),
            ProxyError::UpstreamUnreachable(_) | ProxyError::UntrustedBackend(_) | ProxyError::UnaskedUpgrade => {
                Some(Page::Unreachable)
            }
            ProxyError::UpstreamTimeout(_) => Some(Page::Timeout),
            ProxyError::DeniedBackend(_) => Some(Page::DeniedBackend),
            _ => None,
        }
    }

    /// What the tool's maintainers can do, shown on the page: the hint of the
    /// reason code, or a more precise one when the code is shared by causes
    /// they fix differently.
    pub fn hint(&self) -> &'static str {
        match self {
            ProxyError::UntrustedBackend(_) => crate::reasons::UNTRUSTED_CERTIFICATE_HINT,
            _ => crate::reasons::hint(self.reason()),
        }
    }

    /// The plain-text body sent when there is no page.
    pub fn text(&self) -> &'static str {
        match self {
            ProxyError::NoUserAgent => "Requests must have a user agent",
            ProxyError::Blocked => "Forbidden: this user agent or referer is blocked\n",
            ProxyError::BodyTooLarge => "Bad request: request body too large\n",
            _ => "Bad request: the request is malformed\n",
        }
    }

    /// True when the upstream side failed (worth a warning in the log).
    pub fn is_upstream(&self) -> bool {
        matches!(
            self,
            ProxyError::UpstreamUnreachable(_)
                | ProxyError::UpstreamTimeout(_)
                | ProxyError::UntrustedBackend(_)
                | ProxyError::DeniedBackend(_)
                | ProxyError::UnaskedUpgrade
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mapping_is_pinned() {
        let io = || -> BoxError { Box::new(io::Error::other("x")) };
        let denied = crate::egress::DeniedBackend {
            host: "h".into(),
            addr: "127.0.0.1".parse().unwrap(),
            network: "127.0.0.0/8".parse().unwrap(),
        };
        let untrusted = crate::backend_tls::UntrustedCertificate {
            host: "h".into(),
            cause: rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        };
        let cases = [
            (ProxyError::BadRequest("x"), 400, None, "bad-request"),
            (ProxyError::ClientBody(io()), 400, None, "bad-request"),
            (ProxyError::BodyTooLarge, 413, None, "bad-request"),
            (ProxyError::Banned, 403, Some(Page::Banned), "banned"),
            (ProxyError::NoUserAgent, 403, None, "blocked"),
            (ProxyError::Blocked, 403, None, "blocked"),
            (ProxyError::RateLimited, 429, Some(Page::RateLimit), "rate-limited"),
            (ProxyError::Maintenance, 503, Some(Page::TechnicalIssues), "maintenance"),
            (ProxyError::NoWebservice, 503, Some(Page::NoWebservice), "no-route"),
            (ProxyError::OverCapacity, 503, Some(Page::OverCapacity), "over-capacity"),
            (ProxyError::BackendDown, 502, Some(Page::BackendDown), "backend-down"),
            (ProxyError::UpstreamUnreachable(io()), 502, Some(Page::Unreachable), "backend-unreachable"),
            (ProxyError::UnaskedUpgrade, 502, Some(Page::Unreachable), "backend-unreachable"),
            (ProxyError::UpstreamTimeout(io()), 504, Some(Page::Timeout), "backend-timeout"),
            (ProxyError::DeniedBackend(denied), 502, Some(Page::DeniedBackend), "denied-backend"),
            (ProxyError::UntrustedBackend(untrusted), 502, Some(Page::Unreachable), "backend-unreachable"),
        ];
        for (error, status, page, reason) in cases {
            assert_eq!(error.status().as_u16(), status, "{error}");
            assert_eq!(error.page(), page, "{error}");
            assert_eq!(error.reason(), reason, "{error}");
        }
    }
}
