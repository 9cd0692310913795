//! Where Redis is: a direct `redis://host:port/db` or a Sentinel group
//! `redis+sentinel://host:port,host:port/MASTERNAME/db`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{AsyncConnectionConfig, Client, IntoConnectionInfo, ProtocolVersion, RedisConnectionInfo};

use crate::error::{RouteTableError, is_too_old};
use crate::sentinel_watch::{MasterSwitches, watch_switches};

/// How long to wait for a TCP connection to Redis (or a Sentinel).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to wait for any single Redis reply.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A parsed `--redis-url`.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisEndpoint {
    /// One Redis server.
    Direct {
        /// The URL as given, passed to the redis client.
        url: String,
    },
    /// A Sentinel group; the master is resolved at every (re)connect, so a
    /// failover is followed.
    Sentinel {
        /// `host:port` of each Sentinel.
        sentinels: Vec<String>,
        /// The monitored master's name.
        master: String,
        /// Database number.
        db: i64,
    },
}

impl FromStr for RedisEndpoint {
    type Err = RouteTableError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| RouteTableError::InvalidUrl { url: url.into(), reason: reason.into() };
        if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            let mut parts = rest.splitn(3, '/');
            let hosts = parts.next().unwrap_or_default();
            let master = parts.next().filter(|m| !m.is_empty()).ok_or_else(|| invalid("missing master name"))?;
            let db = match parts.next() {
                None | Some("") => 0,
                Some(db) => db.parse().map_err(|_| invalid("database must be a number"))?,
            };
            let sentinels: Vec<String> = hosts.split(',').map(str::to_string).collect();
            if sentinels.iter().any(|h| h.is_empty() || !h.contains(':')) {
                return Err(invalid("sentinels must be host:port[,host:port...]"));
            }
            Ok(RedisEndpoint::Sentinel { sentinels, master: master.into(), db })
        } else if url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://") {
            url.into_connection_info().map_err(|e| invalid(&e.to_string()))?;
            Ok(RedisEndpoint::Direct { url: url.into() })
        } else {
            Err(invalid("must start with redis:// or redis+sentinel://"))
        }
    }
}

impl RedisEndpoint {
    /// A client for the current master, speaking RESP3 when `resp3` is set
    /// (needed to receive invalidation pushes).
    pub async fn client(&self, resp3: bool) -> Result<Client, RouteTableError> {
        let protocol = if resp3 { ProtocolVersion::RESP3 } else { ProtocolVersion::RESP2 };
        match self {
            RedisEndpoint::Direct { url } => {
                let info = url.as_str().into_connection_info()?;
                let settings = info.redis_settings().clone().set_protocol(protocol);
                Ok(Client::open(info.set_redis_settings(settings))?)
            }
            RedisEndpoint::Sentinel { sentinels, master, db } => {
                let node = SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(RedisConnectionInfo::default().set_db(*db).set_protocol(protocol));
                let urls: Vec<String> = sentinels.iter().map(|s| format!("redis://{s}")).collect();
                let mut sentinel = SentinelClient::build(urls, master.clone(), Some(node), SentinelServerType::Master)?;
                tokio::time::timeout(CONNECT_TIMEOUT, sentinel.async_get_client())
                    .await
                    .map_err(|_| RouteTableError::Timeout(CONNECT_TIMEOUT))?
                    .map_err(RouteTableError::from)
            }
        }
    }

    /// A multiplexed connection with the crate's timeouts, optionally with a
    /// push sender (which requires `resp3`), and the server it reaches
    /// (`host:port`; for a Sentinel group, the master it resolved to). An
    /// old server's refusal of `HELLO 3` comes back as
    /// [`RouteTableError::TooOld`].
    pub(crate) async fn connect_to(
        &self,
        resp3: bool,
        push: Option<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
    ) -> Result<(MultiplexedConnection, String), RouteTableError> {
        let client = self.client(resp3).await?;
        let server = client.get_connection_info().addr().to_string();
        let mut config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        if let Some(push) = push {
            config = config.set_push_sender(push);
        }
        match client.get_multiplexed_async_connection_with_config(&config).await {
            Ok(conn) => Ok((conn, server)),
            Err(e) if is_too_old(&e) => Err(RouteTableError::TooOld(e)),
            Err(e) => Err(e.into()),
        }
    }

    /// For a Sentinel group, a watch of its `+switch-master` announcements
    /// (spawns the subscriptions; they end when the receiver is dropped).
    /// `None` for a direct URL. Needs a Tokio runtime.
    pub fn watch_switches(&self) -> Option<MasterSwitches> {
        match self {
            RedisEndpoint::Direct { .. } => None,
            RedisEndpoint::Sentinel { sentinels, master, .. } => Some(watch_switches(sentinels, master)),
        }
    }

    /// True for a Sentinel group, whose master can change under a connection.
    pub fn is_sentinel(&self) -> bool {
        matches!(self, RedisEndpoint::Sentinel { .. })
    }
}

impl fmt::Display for RedisEndpoint {
    /// Shows where Redis is, without any password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisEndpoint::Direct { url } => match url.split_once('@') {
                Some((scheme_and_user, host)) => {
                    let scheme = scheme_and_user.split("://").next().unwrap_or("redis");
                    write!(f, "{scheme}://***@{host}")
                }
                None => f.write_str(url),
            },
            RedisEndpoint::Sentinel { sentinels, master, db } => {
                write!(f, "redis+sentinel://{}/{master}/{db}", sentinels.join(","))
            }
        }
    }
}

impl fmt::Debug for RedisEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_direct_and_sentinel() {
        assert_eq!(
            "redis://127.0.0.1:6379/0".parse::<RedisEndpoint>().unwrap(),
            RedisEndpoint::Direct { url: "redis://127.0.0.1:6379/0".into() }
        );
        assert_eq!(
            "redis+sentinel://a:26379,b:26379/mymaster/2".parse::<RedisEndpoint>().unwrap(),
            RedisEndpoint::Sentinel {
                sentinels: vec!["a:26379".into(), "b:26379".into()],
                master: "mymaster".into(),
                db: 2
            }
        );
        assert_eq!(
            "redis+sentinel://a:1/m".parse::<RedisEndpoint>().unwrap(),
            RedisEndpoint::Sentinel { sentinels: vec!["a:1".into()], master: "m".into(), db: 0 }
        );
    }

    #[test]
    fn refuses_bad_urls() {
        for bad in [
            "",
            "http://x",
            "localhost:6379",
            "redis+sentinel://a:1",
            "redis+sentinel://a:1/m/x",
            "redis+sentinel:///m",
        ] {
            let err = bad.parse::<RedisEndpoint>().unwrap_err();
            assert!(err.to_string().contains("invalid redis url"), "{bad}: {err}");
        }
    }

    #[test]
    fn display_hides_password() {
        let e: RedisEndpoint = "redis://:secret@h:1/0".parse().unwrap();
        assert!(!e.to_string().contains("secret"));
    }
}
