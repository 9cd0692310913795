//! Where the proxy may connect: a backend name is resolved (through the
//! [`BackendResolver`] cache), then every address is checked against
//! `[proxy] denied_backend_networks` before it is tried. The check runs on
//! every new connection, after resolution, because a tool controls both its
//! route and (often) the DNS its route names: a name that resolved to a
//! tool's address yesterday may resolve to 127.0.0.1 today.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use dynamicproxy_redis::NetworkList;
use ipnet::IpNet;
use tokio::net::TcpStream;

use crate::resolver::BackendResolver;

/// A backend address refused because it is in a denied network; carried
/// inside the connector's `io::Error` up to the error page.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "backend {host} resolves to {addr}, which is in the denied network {network}; \
     the proxy never connects there (to allow it, change [proxy] denied_backend_networks)"
)]
pub struct DeniedBackend {
    /// The backend host as the route names it.
    pub host: String,
    /// The refused address.
    pub addr: IpAddr,
    /// The denied network it falls in.
    pub network: IpNet,
}

/// The connect policy shared by every upstream pool.
#[derive(Debug, Clone)]
pub struct Egress {
    denied: Arc<NetworkList>,
    resolver: BackendResolver,
}

impl Egress {
    /// A policy refusing `denied` and resolving names with `resolver`.
    pub fn new(denied: NetworkList, resolver: BackendResolver) -> Self {
        Egress { denied: Arc::new(denied), resolver }
    }

    /// Resolves `host`, drops denied addresses, and connects to the first
    /// allowed address that accepts. When every address is denied the
    /// error carries a [`DeniedBackend`] (kind `PermissionDenied`); nothing
    /// was sent anywhere.
    pub async fn connect(&self, host: &str, port: u16) -> io::Result<TcpStream> {
        let addrs: Arc<[IpAddr]> = match host.parse::<IpAddr>() {
            Ok(ip) => Arc::new([ip]),
            Err(_) => self.resolver.resolve(host).await.map_err(|e| io::Error::new(io::ErrorKind::NotFound, e))?,
        };
        let mut denied = None;
        let mut last = None;
        for &addr in addrs.iter() {
            if let Some(network) = self.denied.matching(addr) {
                denied.get_or_insert(DeniedBackend { host: host.to_string(), addr, network });
                continue;
            }
            match TcpStream::connect(SocketAddr::new(addr, port)).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(e),
            }
        }
        Err(match (last, denied) {
            (Some(error), _) => error,
            (None, Some(denied)) => io::Error::new(io::ErrorKind::PermissionDenied, denied),
            (None, None) => io::Error::new(io::ErrorKind::NotFound, "backend name resolves to no address"),
        })
    }
}

/// The [`DeniedBackend`] inside a connector error, if that is why it failed.
pub fn denied_cause(error: &io::Error) -> Option<&DeniedBackend> {
    error.get_ref().and_then(|inner| inner.downcast_ref::<DeniedBackend>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn denied_address_is_never_connected() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let egress = Egress::new(NetworkList::default_denied(), BackendResolver::new(&[]));
        let error = egress.connect("127.0.0.1", port).await.unwrap_err();
        let denied = denied_cause(&error).unwrap();
        assert_eq!(denied.network, "127.0.0.0/8".parse::<IpNet>().unwrap());
        assert!(error.to_string().contains("[proxy] denied_backend_networks"), "{error}");
        let accepted = tokio::time::timeout(std::time::Duration::from_millis(100), listener.accept()).await;
        assert!(accepted.is_err(), "the backend saw a connection");

        let open = Egress::new(NetworkList::default(), BackendResolver::new(&[]));
        assert!(open.connect("127.0.0.1", port).await.is_ok());
    }

    #[tokio::test]
    async fn mapped_ipv6_loopback_is_denied() {
        let egress = Egress::new(NetworkList::default_denied(), BackendResolver::new(&[]));
        let error = egress.connect("::ffff:127.0.0.1", 9).await.unwrap_err();
        assert!(denied_cause(&error).is_some(), "{error}");
    }
}
