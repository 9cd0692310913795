//! The RFC 1413 reply parser. The first four bytes are the ports asked about.

#![no_main]

use dynamicproxy_registrar::ident::parse_reply;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let client = u16::from_be_bytes([data[0], data[1]]);
    let server = u16::from_be_bytes([data[2], data[3]]);
    let reply = &data[4..];
    if let Ok(parsed) = parse_reply(reply, client, server) {
        assert!(!parsed.user.is_empty());
        assert!(!parsed.user.contains(['\r', '\n', '\0']));
        assert!(!parsed.os.is_empty());
        assert!(reply.len() <= 1024);
    }
    // The spaced form of a reply the parser accepted must be accepted too.
    let spaced = format!("{client} , {server} : USERID : UNIX : tools.x\r\n");
    assert!(client == 0 || server == 0 || parse_reply(spaced.as_bytes(), client, server).is_ok());
});
