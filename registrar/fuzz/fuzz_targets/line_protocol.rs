//! The registrar's line protocol decoder and the validation that follows it,
//! including the denied-networks check of a literal destination address.
//!
//! The first byte picks where the input is cut, as if it arrived in two
//! reads: a request seen early must be the request seen at the end.

#![no_main]

use dynamicproxy_redis::{BackendUrl, NetworkList, RoutePattern};
use dynamicproxy_registrar::allow::{AllowList, AllowRule};
use dynamicproxy_registrar::destination::{DeniedDestinations, Verdict};
use dynamicproxy_registrar::protocol::{MAX_LINE_LEN, Request, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else { return };
    let cut = (cut as usize * data.len()) / 255;
    let whole = decode(data, false);
    match decode(&data[..cut], false) {
        Ok(None) => {}
        early => assert_eq!(early, whole, "decoding in two reads changed the result"),
    }
    let at_eof = decode(data, true);
    if let Ok(Some(request)) = &whole {
        assert_eq!(at_eof.as_ref().ok().and_then(Option::as_ref), Some(request));
    }
    let Ok(Some(request)) = at_eof else { return };
    let (route, destination) = match &request {
        Request::Register { route, destination } | Request::RegisterCanonical { route, destination } => {
            (route.as_str(), Some(destination.as_str()))
        }
        Request::Unregister { route } => (route.as_str(), None),
        Request::Unknown => return,
    };
    assert!(route.len() <= MAX_LINE_LEN && !route.contains('\n'));
    let _ = RoutePattern::parse(route);
    if let Some(destination) = destination {
        if let Ok(backend) = BackendUrl::parse_strict(destination) {
            let allow = AllowList::new(
                ["10.0.0.0/8", "fd00::/8", "wmcloud.org"].iter().filter_map(|e| AllowRule::parse(e)).collect(),
            );
            let _ = allow.allows(backend.host());
            assert!(backend.port() != 0);
            check_denied(backend.host());
        }
    }
});

/// The default denied networks against a destination host as parsed: a
/// literal loopback, link-local or unspecified address (IPv4-mapped ones
/// included) is always denied, anything else is never denied by address.
fn check_denied(host: &str) {
    let denied = DeniedDestinations::new(NetworkList::default_denied());
    let Some(address) = DeniedDestinations::literal(host) else { return };
    assert_eq!(address, address.to_canonical(), "literal addresses are canonical");
    let must_deny = match address {
        std::net::IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local() || v4.octets()[0] == 0,
        std::net::IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80,
    };
    let verdict = denied.check_addresses([address]);
    assert_eq!(matches!(verdict, Verdict::Denied { .. }), must_deny, "{host}: {verdict:?}");
    if let Verdict::Denied { address: seen, network } = verdict {
        assert_eq!(seen, address);
        assert!(network.contains(&address));
    }
}
