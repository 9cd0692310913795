//! Host and `:authority` normalisation: whatever a client sends, the result
//! is a lower-case host without port or trailing dot, normalising it again
//! changes nothing, and the HTTP/2 `host`/`:authority` comparison agrees
//! with it.
//!
//! The first byte picks where the input is cut into a `host` header and an
//! `:authority`.

#![no_main]

use dynamicproxy_proxy::host::{normalize_host, same_host};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else { return };
    let cut = (cut as usize * data.len()) / 255;
    let (host_header, authority) = data.split_at(cut);
    let Ok(authority) = std::str::from_utf8(authority) else {
        return;
    };
    if let Ok(normal) = normalize_host(authority) {
        assert!(!normal.is_empty());
        assert!(normal.len() <= authority.len());
        assert!(!normal.bytes().any(|b| b.is_ascii_uppercase()), "{normal:?}");
        assert!(!normal.ends_with('.'), "{normal:?}");
        if !normal.starts_with('[') {
            assert!(!normal.contains(':'), "port left in {normal:?}");
        }
        assert_eq!(normalize_host(&normal).as_deref(), Ok(&*normal), "not idempotent");
        assert!(same_host(authority.as_bytes(), authority));
        assert!(same_host(normal.as_bytes(), authority));
    } else {
        assert!(!same_host(authority.as_bytes(), authority));
    }
    // The comparison is symmetric and never panics on arbitrary bytes.
    if let Ok(header) = std::str::from_utf8(host_header) {
        assert_eq!(same_host(host_header, authority), same_host(authority.as_bytes(), header));
    } else {
        assert!(!same_host(host_header, authority));
    }
});
