//! Backends' response heads (`backend_conn::parse_final_head`): whatever
//! the bytes, parsing never panics, a parsed head only ever takes bytes off
//! the front of the buffer, and an incomplete head takes none.

#![no_main]

use bytes::BytesMut;
use dynamicproxy_proxy::backend_conn::parse_final_head;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else { return };
    let mut buf = BytesMut::from(bytes);
    match parse_final_head(&mut buf, flags & 1 == 1) {
        Ok(Some(parts)) => {
            assert!(buf.len() < bytes.len(), "a head took no bytes");
            assert!(bytes.ends_with(&buf), "a head took bytes from elsewhere than the front");
            assert!(parts.status.as_u16() >= 200 || parts.status.as_u16() == 101);
        }
        Ok(None) => assert!(bytes.ends_with(&buf)),
        Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::InvalidData),
    }
});
