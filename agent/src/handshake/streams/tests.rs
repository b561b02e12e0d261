use std::time::{Duration, Instant};

use super::*;
use crate::handshake::{AllowOrReject, OriginPattern, TicketPolicy, ticket};

const SECRET: &[u8] = b"a test secret that is long enough to use";
const NOW: u64 = 1_800_000_000;

fn settings(max_pending: u32, single_use: bool) -> Settings {
    Settings {
        policy: Policy {
            allowed_origins: vec![OriginPattern::parse("https://app.example.com").unwrap()],
            missing_origin: AllowOrReject::Reject,
            allowed_hosts: vec![],
            allowed_paths: vec![],
            max_request_bytes: 1024,
            non_upgrade_requests: AllowOrReject::Allow,
            ticket: Some(TicketPolicy {
                required: true,
                secret: SECRET.to_vec(),
                query_param: "ticket".into(),
                max_age_secs: 60,
                bind_to_source_ip: false,
            }),
        },
        deadline: Duration::from_secs(5),
        max_pending,
        dry_run: false,
        replay_capacity: single_use.then_some(100),
    }
}

fn peers() -> Peers {
    (
        "198.18.0.7:40000".parse().unwrap(),
        "198.18.0.1:8080".parse().unwrap(),
    )
}

fn upgrade(origin: &str, ticket: &str) -> Vec<u8> {
    format!(
        "GET /ws?ticket={ticket} HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: {origin}\r\n\r\n"
    )
    .into_bytes()
}

fn never(_: std::net::IpAddr) -> bool {
    false
}

fn feed(s: &mut Streams, cookie: u64, offset: u64, bytes: &[u8]) -> Vec<Action> {
    s.data(cookie, offset, bytes, Instant::now(), NOW, &mut never)
        .expect("known connection")
}

fn injected(actions: &[Action]) -> Vec<u8> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Inject { bytes, .. } => Some(bytes.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn rejection(actions: &[Action]) -> Option<Rejection> {
    actions.iter().find_map(|a| match a {
        Action::Reject { reason, .. } => Some(*reason),
        _ => None,
    })
}

#[test]
fn nothing_is_put_back_before_the_request_is_judged_and_then_exactly_what_was_judged() {
    let mut s = Streams::new(settings(4, true));
    s.opened(1, peers(), Instant::now());
    let t = ticket::mint(SECRET, NOW + 30, None);
    let mut bytes = upgrade("https://app.example.com", &t);
    bytes.extend_from_slice(b"first frame");
    let (a, b) = bytes.split_at(20);
    assert!(feed(&mut s, 1, 0, a).is_empty());
    let actions = feed(&mut s, 1, a.len() as u64, b);
    assert_eq!(injected(&actions), bytes, "the head and what followed it");
    assert!(actions.contains(&Action::Release {
        cookie: 1,
        upto: bytes.len() as u64
    }));
    assert_eq!(s.pending(), 0);
    // Bytes the kernel handed over before it saw the release go on too.
    let later = feed(&mut s, 1, bytes.len() as u64, b"late");
    assert_eq!(injected(&later), b"late");
}

#[test]
fn every_keep_alive_request_is_judged_before_it_is_put_back() {
    let mut s = Streams::new(settings(4, false));
    s.opened(1, peers(), Instant::now());
    let plain = b"GET /health HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nbody";
    let mut bytes = plain.to_vec();
    bytes.extend_from_slice(&upgrade("https://evil.net", "x"));
    let actions = feed(&mut s, 1, 0, plain);
    assert_eq!(injected(&actions), plain, "the plain request and its body");
    // The next request on the same connection is judged as well.
    let actions = feed(&mut s, 1, plain.len() as u64, &bytes[plain.len()..]);
    assert_eq!(rejection(&actions), Some(Rejection::BadOrigin));
    assert!(injected(&actions).is_empty());
}

#[test]
fn a_single_use_ticket_is_accepted_once() {
    let mut s = Streams::new(settings(4, true));
    let t = ticket::mint(SECRET, NOW + 30, None);
    s.opened(1, peers(), Instant::now());
    assert_eq!(
        rejection(&feed(&mut s, 1, 0, &upgrade("https://app.example.com", &t))),
        None
    );
    s.opened(2, peers(), Instant::now());
    assert_eq!(
        rejection(&feed(&mut s, 2, 0, &upgrade("https://app.example.com", &t))),
        Some(Rejection::TicketReplayed)
    );
    // Reusable tickets when single_use is off.
    let mut s = Streams::new(settings(4, false));
    for cookie in 1..=2 {
        s.opened(cookie, peers(), Instant::now());
        assert_eq!(
            rejection(&feed(
                &mut s,
                cookie,
                0,
                &upgrade("https://app.example.com", &t)
            )),
            None
        );
    }
}

#[test]
fn a_hole_in_the_stream_rejects_and_bounds_hold() {
    let mut s = Streams::new(settings(2, false));
    s.opened(1, peers(), Instant::now());
    assert_eq!(
        rejection(&feed(&mut s, 1, 5, b"GET")),
        Some(Rejection::InspectionLost)
    );
    // Two pending at most: a third is rejected, the older ones kept.
    let now = Instant::now();
    s.opened(2, peers(), now);
    s.opened(3, peers(), now);
    assert!(s.is_full());
    assert_eq!(
        rejection(&s.opened(4, peers(), now)),
        Some(Rejection::TooManyPending)
    );
    assert!(s.knows(2) && s.knows(3) && !s.knows(4));
    // The deadline.
    let expired = s.expire(now + Duration::from_secs(6), &mut never);
    assert_eq!(expired.len(), 2);
    assert!(
        expired
            .iter()
            .all(|a| rejection(std::slice::from_ref(a)) == Some(Rejection::Deadline))
    );
    assert_eq!(s.pending(), 0);
}

#[test]
fn dry_run_and_an_exempt_client_go_on_with_what_they_sent() {
    let mut settings = settings(4, false);
    settings.dry_run = true;
    let mut s = Streams::new(settings);
    s.opened(1, peers(), Instant::now());
    let bytes = upgrade("https://evil.net", "x");
    let actions = feed(&mut s, 1, 0, &bytes);
    assert!(matches!(
        actions[0],
        Action::Reject {
            reason: Rejection::BadOrigin,
            dry_run: true,
            ..
        }
    ));
    assert_eq!(injected(&actions), bytes);

    let mut s = Streams::new(self::settings(4, false));
    s.opened(1, peers(), Instant::now());
    let mut always = |_: std::net::IpAddr| true;
    let actions = s
        .data(1, 0, &bytes, Instant::now(), NOW, &mut always)
        .unwrap();
    assert_eq!(rejection(&actions), None);
    assert_eq!(injected(&actions), bytes);
}
