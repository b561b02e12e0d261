//! The policy the targets judge with: every check on, tickets required.

use wsguard::handshake::{
    AllowOrReject, OriginPattern, PathPattern, Policy, TicketPolicy,
};

pub const SECRET: &[u8] = b"a fuzzing secret that is long enough to use";

pub fn policy(max_request_bytes: usize) -> Policy {
    Policy {
        allowed_origins: ["https://app.example.com", "https://*.example.com"]
            .iter()
            .map(|o| OriginPattern::parse(o).unwrap())
            .collect(),
        missing_origin: AllowOrReject::Reject,
        allowed_hosts: vec!["chat.example.com".into()],
        allowed_paths: ["/ws", "/live/*"]
            .iter()
            .map(|p| PathPattern::parse(p).unwrap())
            .collect(),
        max_request_bytes,
        non_upgrade_requests: AllowOrReject::Reject,
        ticket: Some(TicketPolicy {
            required: true,
            secret: SECRET.to_vec(),
            query_param: "ticket".into(),
            max_age_secs: 60,
            bind_to_source_ip: true,
        }),
    }
}
