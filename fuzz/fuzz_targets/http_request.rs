//! Any bytes a client sends to the VMM's API socket: parsing never panics, and whatever parses
//! yields a response that serialises.
#![no_main]

use cove_vmm::http::{parse_request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_request(data) {
        Ok(Some(request)) => {
            assert!(request.path.starts_with('/'));
            assert!(request.body.len() <= cove_vmm::http::MAX_BODY_BYTES);
        }
        Ok(None) => assert!(data.len() <= cove_vmm::http::MAX_HEAD_BYTES + cove_vmm::http::MAX_BODY_BYTES + 4),
        Err(error) => {
            let bytes = Response::error(error.status(), &error).to_bytes();
            assert!(bytes.starts_with(b"HTTP/1.1 4") || bytes.starts_with(b"HTTP/1.1 5"));
        }
    }
});
