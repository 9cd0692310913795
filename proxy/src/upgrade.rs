//! Which protocol upgrades cross the proxy: WebSocket only (SPEC §3).
//!
//! An upgraded connection is a raw tunnel: nothing after the 101 goes through
//! the protection checks, the rate limit, the access log or the header
//! rewriting. `Upgrade: h2c` is the classic way to smuggle requests past an
//! edge (h2csmuggler): the client upgrades to cleartext HTTP/2 with the
//! backend and then speaks to it directly. Any other token is forwarded
//! without the upgrade, and a backend that switches protocols anyway is not
//! tunnelled.

use http::HeaderMap;
use http::header::{self, HeaderValue};

/// The one upgrade token that is tunnelled.
const WEBSOCKET: &str = "websocket";

/// The `Upgrade` value to forward: `Some` only when the client asks for a
/// WebSocket (`Connection: upgrade` and `Upgrade: websocket`, case-insensitive).
pub fn tunnelled_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut upgrades = headers.get_all(header::UPGRADE).iter();
    let upgrade = upgrades.next()?;
    if upgrades.next().is_some() {
        return None;
    }
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let websocket = upgrade.to_str().is_ok_and(|v| v.trim().eq_ignore_ascii_case(WEBSOCKET));
    (asks && websocket).then(|| upgrade.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_static(v));
        }
        map
    }

    #[test]
    fn only_websocket_is_tunnelled() {
        assert!(tunnelled_upgrade(&headers(&[("connection", "Upgrade"), ("upgrade", "websocket")])).is_some());
        assert!(
            tunnelled_upgrade(&headers(&[("connection", "keep-alive, upgrade"), ("upgrade", "WebSocket")])).is_some()
        );
        for refused in [
            &[("connection", "Upgrade, HTTP2-Settings"), ("upgrade", "h2c")][..],
            &[("connection", "upgrade"), ("upgrade", "websocket, h2c")],
            &[("connection", "upgrade"), ("upgrade", "TLS/1.2")],
            &[("connection", "upgrade"), ("upgrade", "websocket"), ("upgrade", "h2c")],
            &[("upgrade", "websocket")],
            &[("connection", "upgrade")],
        ] {
            assert!(tunnelled_upgrade(&headers(refused)).is_none(), "{refused:?}");
        }
    }
}
