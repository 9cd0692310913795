//! `allowed_clients` (and any network list key) as configured from an
//! environment variable: one comma-separated string, checked by
//! `Config::validate`, then asked about one address.
//!
//! Input: a flag byte (bit 0: IPv6), 16 address bytes, then the value.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use dynamicproxy_redis::NetworkList;
use dynamicproxy_registrar::Config;
use dynamicproxy_registrar::clients::AllowedClients;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 17 {
        return;
    }
    let (head, value) = data.split_at(17);
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&head[1..17]);
    let v4 = Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]);
    let addr = if head[0] & 1 == 1 { IpAddr::V6(Ipv6Addr::from(octets)) } else { IpAddr::V4(v4) };
    let Ok(value) = std::str::from_utf8(value) else { return };
    let entries: Vec<String> = value.split(',').map(str::to_string).collect();

    let config = Config { allowed_clients: entries.clone(), ..Config::default() };
    let non_blank: Vec<&str> = entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()).collect();
    let parsed = NetworkList::parse(&non_blank);
    match config.validate() {
        Ok(()) => {
            let networks = parsed.expect("validate accepted a list that does not parse");
            let clients = AllowedClients::new(networks.clone());
            if networks.is_empty() {
                assert!(clients.allows(addr), "an empty allowed_clients must allow everyone");
            }
            // A dual-stack listener sees IPv4 clients as IPv4-mapped addresses.
            assert_eq!(clients.allows(IpAddr::V4(v4)), clients.allows(IpAddr::V6(v4.to_ipv6_mapped())));
        }
        Err(e) => {
            assert!(parsed.is_err(), "validate refused a list that parses: {e}");
            assert_eq!(e.key, "allowed_clients");
            assert!(e.to_string().starts_with("invalid [registrar] allowed_clients = "));
        }
    }
});
