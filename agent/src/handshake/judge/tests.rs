use super::*;
use crate::handshake::ticket;

const SECRET: &[u8] = b"a test secret that is long enough to use";
const NOW: u64 = 1_800_000_000;

fn policy() -> Policy {
    Policy {
        allowed_origins: ["https://app.example.com", "https://*.example.com"]
            .iter()
            .map(|o| OriginPattern::parse(o).unwrap())
            .collect(),
        missing_origin: AllowOrReject::Reject,
        allowed_hosts: vec![],
        allowed_paths: ["/ws", "/live/*"]
            .iter()
            .map(|p| PathPattern::parse(p).unwrap())
            .collect(),
        max_request_bytes: 8192,
        non_upgrade_requests: AllowOrReject::Allow,
        ticket: None,
    }
}

fn request(target: &str, extra: &[&str]) -> Vec<u8> {
    let mut head = format!(
        "GET {target} HTTP/1.1\r\nHost: chat.example.com\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for h in extra {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head.into_bytes()
}

fn source() -> IpAddr {
    "198.18.0.7".parse().unwrap()
}

/// The verdict on `request(target, extra)` from [`source`] at [`NOW`].
fn judged(policy: &Policy, target: &str, extra: &[&str]) -> Verdict {
    judge(policy, &request(target, extra), source(), NOW)
}

#[test]
fn a_valid_upgrade_from_an_allowed_origin_is_accepted() {
    let p = policy();
    assert_eq!(
        judged(&p, "/ws", &["Origin: https://app.example.com"]),
        Verdict::Accept
    );
    assert_eq!(
        judged(
            &p,
            "/live/prices?x=1",
            &["Origin: https://eu.app.example.com"]
        ),
        Verdict::Accept
    );
    assert_eq!(
        judged(&p, "/ws", &["Origin: HTTPS://APP.EXAMPLE.COM:443"]),
        Verdict::Accept
    );
}

#[test]
fn origins_match_exactly_or_by_subdomain_never_by_suffix() {
    let p = policy();
    for bad in [
        "https://evil-example.com",
        "https://example.com.evil.net",
        "https://example.com",
        "http://app.example.com",
        "https://app.example.com:8443",
        "null",
        "https://app.example.com/",
    ] {
        assert_eq!(
            judged(&p, "/ws", &[&format!("Origin: {bad}")]),
            Verdict::Reject(Rejection::BadOrigin),
            "{bad}"
        );
    }
    assert_eq!(
        judged(&p, "/ws", &[]),
        Verdict::Reject(Rejection::MissingOrigin)
    );
    let allow_missing = Policy {
        missing_origin: AllowOrReject::Allow,
        ..policy()
    };
    assert_eq!(judged(&allow_missing, "/ws", &[]), Verdict::Accept);
}

#[test]
fn paths_and_hosts_follow_the_policy() {
    let p = policy();
    for bad in ["/", "/wss", "/live", "/lively", "/ws/x"] {
        assert_eq!(
            judged(&p, bad, &["Origin: https://app.example.com"]),
            Verdict::Reject(Rejection::BadPath),
            "{bad}"
        );
    }
    let hosts = Policy {
        allowed_hosts: vec!["chat.example.com".into()],
        ..policy()
    };
    assert_eq!(
        judged(&hosts, "/ws", &["Origin: https://app.example.com"]),
        Verdict::Accept
    );
    let other = Policy {
        allowed_hosts: vec!["other.example.com".into()],
        ..policy()
    };
    assert_eq!(
        judged(&other, "/ws", &["Origin: https://app.example.com"]),
        Verdict::Reject(Rejection::BadHost)
    );
}

#[test]
fn the_rfc_6455_request_checks() {
    let p = policy();
    let origin = "Origin: https://app.example.com";
    let head = |text: &str| format!("{text}\r\n\r\n").into_bytes();
    let bad_version = head(
        "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: https://app.example.com",
    );
    assert_eq!(
        judge(&p, &bad_version, source(), NOW),
        Verdict::Reject(Rejection::BadVersion)
    );
    let bad_key = head(
        "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: c2hvcnQ=\r\nOrigin: https://app.example.com",
    );
    assert_eq!(
        judge(&p, &bad_key, source(), NOW),
        Verdict::Reject(Rejection::BadKey)
    );
    let no_upgrade = head(&format!("GET /ws HTTP/1.1\r\nHost: h\r\n{origin}"));
    assert_eq!(
        judge(&p, &no_upgrade, source(), NOW),
        Verdict::AcceptPlainHttp
    );
    let strict = Policy {
        non_upgrade_requests: AllowOrReject::Reject,
        ..policy()
    };
    assert_eq!(
        judge(&strict, &no_upgrade, source(), NOW),
        Verdict::Reject(Rejection::NotAnUpgrade)
    );
    let post = head("POST /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade");
    assert_eq!(
        judge(&strict, &post, source(), NOW),
        Verdict::Reject(Rejection::NotAnUpgrade)
    );
    // A TLS hello (binary) is refused at once, before any line ends.
    assert_eq!(
        judge(&strict, b"\x16\x03\x01\x02\x00 TLS hello", source(), NOW),
        Verdict::Reject(Rejection::ControlCharacter)
    );
    assert_eq!(
        judge(&strict, b"NOT HTTP AT ALL\r\n", source(), NOW),
        Verdict::Reject(Rejection::NotAnUpgrade)
    );
}

#[test]
fn heads_are_judged_only_when_complete_and_within_size() {
    let p = policy();
    let full = request("/ws", &["Origin: https://app.example.com"]);
    for cut in [1, 10, full.len() / 2, full.len() - 1] {
        assert_eq!(
            judge(&p, &full[..cut], source(), NOW),
            Verdict::Incomplete,
            "cut at {cut}"
        );
    }
    let big = request(
        "/ws",
        &[
            "Origin: https://app.example.com",
            &format!("X-Pad: {}", "a".repeat(9000)),
        ],
    );
    assert_eq!(
        judge(&p, &big, source(), NOW),
        Verdict::Reject(Rejection::TooLarge)
    );
    assert_eq!(
        judge(&p, &big[..8500], source(), NOW),
        Verdict::Reject(Rejection::TooLarge),
        "an unfinished head past the limit"
    );
}

#[test]
fn tickets_are_required_and_checked() {
    let p = Policy {
        ticket: Some(TicketPolicy {
            required: true,
            secret: SECRET.to_vec(),
            query_param: "ticket".into(),
            max_age_secs: 60,
            bind_to_source_ip: true,
        }),
        ..policy()
    };
    let origin = "Origin: https://app.example.com";
    let with = |t: &str| request(&format!("/ws?room=1&ticket={t}"), &[origin]);
    let good = ticket::mint(SECRET, NOW + 30, Some(source()));
    assert_eq!(judge(&p, &with(&good), source(), NOW), Verdict::Accept);
    assert_eq!(
        judged(&p, "/ws", &[origin]),
        Verdict::Reject(Rejection::TicketMissing)
    );
    assert_eq!(
        judge(
            &p,
            &with(&ticket::mint(SECRET, NOW - 1, Some(source()))),
            source(),
            NOW
        ),
        Verdict::Reject(Rejection::TicketExpired)
    );
    assert_eq!(
        judge(
            &p,
            &with(&ticket::mint(
                SECRET,
                NOW + 30,
                Some("198.18.0.9".parse().unwrap())
            )),
            source(),
            NOW
        ),
        Verdict::Reject(Rejection::TicketWrongIp)
    );
    let mut tampered = good.clone();
    tampered.replace_range(3..4, if &good[3..4] == "A" { "B" } else { "A" });
    assert_eq!(
        judge(&p, &with(&tampered), source(), NOW),
        Verdict::Reject(Rejection::TicketBadSignature)
    );
    // Origin is checked before the ticket: a hijack from another site never gets as far.
    assert_eq!(
        judged(
            &p,
            &format!("/ws?ticket={good}"),
            &["Origin: https://evil.net"]
        ),
        Verdict::Reject(Rejection::BadOrigin)
    );
}

#[test]
fn patterns_refuse_what_they_cannot_mean() {
    for bad in [
        "app.example.com",
        "https://",
        "https://*.",
        "https://a.*.com",
        "https://x.com/path",
        "ftp://x.com",
    ] {
        assert!(OriginPattern::parse(bad).is_err(), "{bad}");
    }
    for bad in ["ws", "/a*/b", "/*/x"] {
        assert!(PathPattern::parse(bad).is_err(), "{bad}");
    }
    assert!(
        OriginPattern::parse("http://localhost:8080")
            .unwrap()
            .matches("http://localhost:8080")
    );
    assert!(
        OriginPattern::parse("http://[::1]:8080")
            .unwrap()
            .matches("http://[::1]:8080")
    );
}

/// Requests two conforming parsers could read differently are rejected,
/// each with its own reason.
#[test]
fn ambiguous_requests_are_rejected_with_their_own_reason() {
    let p = policy();
    let ok = "Origin: https://app.example.com";
    let cases: &[(&[u8], Rejection)] = &[
        (b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", Rejection::DuplicateHeader),
        (b"GET /ws HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", Rejection::DuplicateHeader),
        (b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: keep-alive Upgrade\r\n\r\n", Rejection::BadConnectionHeader),
        (b"GET /ws HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", Rejection::ObsFold),
        (b"GET /ws HTTP/1.1\r\nHost : a\r\n\r\n", Rejection::SpaceBeforeColon),
        (b"GET /ws HTTP/1.1\r\nHost: a\x00b\r\n\r\n", Rejection::ControlCharacter),
        (b"GET /ws HTTP/1.1\r\nHost: a\rb\r\n\r\n", Rejection::ControlCharacter),
        (b"GET /ws HTTP/1.1\nHost: a\n\n", Rejection::BareLf),
        (b"GET /ws HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", Rejection::BareLf),
        (b"GET http://evil.example/ws HTTP/1.1\r\nHost: a\r\n\r\n", Rejection::HostMismatch),
        (b"GET /live/../admin HTTP/1.1\r\nHost: a\r\n\r\n", Rejection::AmbiguousPath),
        (b"GET /live/%2e%2e/admin HTTP/1.1\r\nHost: a\r\n\r\n", Rejection::AmbiguousPath),
        (b"GET /live%2fadmin HTTP/1.1\r\nHost: a\r\n\r\n", Rejection::AmbiguousPath),
        (b"GET /live\\admin HTTP/1.1\r\nHost: a\r\n\r\n", Rejection::AmbiguousPath),
        (b"GET /live/a%00 HTTP/1.1\r\nHost: a\r\n\r\n", Rejection::AmbiguousPath),
        (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", Rejection::AmbiguousFraming),
        (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\n", Rejection::AmbiguousFraming),
    ];
    for (head, reason) in cases {
        assert_eq!(
            judge(&p, head, source(), NOW),
            Verdict::Reject(*reason),
            "{}",
            String::from_utf8_lossy(head)
        );
    }
    // Two Origin headers, the second allowed: servers that take either one
    // would disagree, so neither is trusted.
    assert_eq!(
        judged(&p, "/ws", &["Origin: https://evil.net", ok]),
        Verdict::Reject(Rejection::DuplicateHeader)
    );
    // An upgrade in any form a lenient server might accept is judged as one.
    assert_eq!(
        judge(
            &p,
            b"GET /ws HTTP/1.1\r\nHost: a\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: https://evil.net\r\n\r\n",
            source(),
            NOW
        ),
        Verdict::Reject(Rejection::NotAnUpgrade)
    );
    // Unreserved characters are decoded before matching; others are not.
    assert_eq!(judged(&p, "/live/%61bc", &[ok]), Verdict::Accept);
    assert_eq!(judged(&p, "/%77s", &[ok]), Verdict::Accept);
    assert_eq!(
        judged(&p, "/live%2Fx", &[ok]),
        Verdict::Reject(Rejection::AmbiguousPath)
    );
    assert_eq!(
        judged(&p, "/admin", &[ok]),
        Verdict::Reject(Rejection::BadPath)
    );
}
