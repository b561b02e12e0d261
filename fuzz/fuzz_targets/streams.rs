//! The same stream in any cutting into records: the stream engine gives the
//! verdict it gives the stream in one record, never panics, and never puts
//! back a byte before the request it belongs to was accepted: what it puts
//! back is always a prefix of the stream.
#![no_main]

use std::{net::SocketAddr, time::{Duration, Instant}};

use libfuzzer_sys::fuzz_target;
use wsguard::handshake::{
    Rejection,
    streams::{Action, Settings, Streams},
};

#[path = "common.rs"]
mod common;

const LIMIT: usize = 2048;

/// The verdict (`None`: still pending, `Some(None)`: accepted) and the
/// bytes put back.
fn run(stream: &[u8], cuts: &[usize]) -> (Option<Option<Rejection>>, Vec<u8>) {
    let mut streams = Streams::new(Settings {
        policy: common::policy(LIMIT),
        deadline: Duration::from_secs(5),
        max_pending: 8,
        dry_run: false,
        replay_capacity: Some(16),
    });
    let peers = (
        SocketAddr::from(([198, 18, 0, 7], 40000)),
        SocketAddr::from(([198, 18, 0, 1], 8080)),
    );
    let now = Instant::now();
    assert!(streams.opened(1, peers, now).is_empty());
    let mut never = |_: std::net::IpAddr| false;
    let (mut verdict, mut put_back, mut accepted) = (None, Vec::new(), false);
    for w in cuts.windows(2) {
        let Some(actions) = streams.data(1, w[0] as u64, &stream[w[0]..w[1]], now, 1_800_000_000, &mut never)
        else {
            break; // rejected: the connection is gone
        };
        for action in actions {
            match action {
                Action::Accepted { upgrade, .. } => {
                    accepted = true;
                    if upgrade {
                        verdict = Some(None);
                    }
                }
                Action::Inject { bytes, .. } => {
                    assert!(accepted, "bytes put back before any request was accepted");
                    put_back.extend_from_slice(&bytes);
                }
                Action::Reject { reason, .. } => verdict = Some(Some(reason)),
                Action::Release { upto, .. } => assert_eq!(upto as usize, w[1]),
            }
        }
    }
    assert!(stream.starts_with(&put_back), "put back bytes that were not sent");
    assert!(streams.pending() <= 1);
    (verdict, put_back)
}

fuzz_target!(|data: &[u8]| {
    // First byte: how many cuts; the next ones: where; the rest: the stream.
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let cuts = (n % 8) as usize;
    if rest.len() < cuts {
        return;
    }
    let (points, stream) = rest.split_at(cuts);
    if stream.is_empty() {
        return;
    }
    let mut bounds: Vec<usize> = points
        .iter()
        .map(|p| *p as usize * stream.len() / 256)
        .collect();
    bounds.push(0);
    bounds.push(stream.len());
    bounds.sort_unstable();
    bounds.dedup();
    let whole = run(stream, &[0, stream.len()]);
    let cut = run(stream, &bounds);
    // Within the bound the verdict does not depend on how the bytes came;
    // past it, where a cut falls can decide which bound is hit first.
    if stream.len() <= LIMIT {
        assert_eq!(cut.0, whole.0, "verdict with cuts at {bounds:?}");
    }
});
