//! `traceparent` parsing: whatever a client sends, the parser never panics,
//! and an accepted value has non-zero ids and prints back as a version-00
//! value that parses to the same trace.

#![no_main]

use dynamicproxy_proxy::trace_context::parse_traceparent;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(parsed) = parse_traceparent(data) {
        assert_ne!(parsed.trace_id, [0; 16]);
        assert_ne!(parsed.parent_id, [0; 8]);
        let printed = parsed.to_string();
        assert_eq!(printed.len(), 55);
        assert!(printed.starts_with("00-"));
        assert_eq!(parse_traceparent(printed.as_bytes()), Ok(parsed));
        if data.starts_with(b"00-") {
            assert_eq!(printed.as_bytes(), data, "version 00 round-trips exactly");
        }
    }
});
