//! Any bytes as a request head: the judge never panics, and only a head that
//! parses as a complete upgrade is accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsguard::handshake::{Verdict, judge};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let policy = common::policy(4096);
    let verdict = judge(&policy, data, "198.18.0.7".parse().unwrap(), 1_800_000_000);
    if verdict == Verdict::Accept {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        assert!(
            matches!(request.parse(data), Ok(httparse::Status::Complete(_))),
            "accepted an incomplete head"
        );
        assert_eq!(request.method, Some("GET"));
    }
});
