//! The same request head in any segmentation, in order or reversed, with
//! retransmissions: the reassembling inspector gives the verdict it gives
//! the head in one segment, never panics, and holds no more than its bound.
#![no_main]

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use libfuzzer_sys::fuzz_target;
use wsguard::handshake::{
    capture::Segment,
    inspector::{Inspector, Outcome},
};

#[path = "common.rs"]
mod common;

const LIMIT: usize = 2048;

fn run(pieces: &[(u32, &[u8])]) -> Vec<Outcome> {
    let mut inspector = Inspector::new(common::policy(LIMIT), Duration::from_secs(5), 8);
    let client = SocketAddr::from(([198, 18, 0, 7], 40000));
    let server = SocketAddr::from(([198, 18, 0, 1], 8080));
    let now = Instant::now();
    let segment = |seq, syn, payload: &[u8]| Segment {
        client,
        server,
        seq,
        syn,
        fin_or_rst: false,
        payload: payload.to_vec(),
    };
    let mut out: Vec<Outcome> = inspector
        .on_segment(segment(999, true, b""), now, 1_800_000_000)
        .into_iter()
        .map(|(_, o)| o)
        .collect();
    for (seq, bytes) in pieces {
        out.extend(
            inspector
                .on_segment(segment(*seq, false, bytes), now, 1_800_000_000)
                .into_iter()
                .map(|(_, o)| o),
        );
    }
    assert!(inspector.pending() <= 1);
    out
}

fuzz_target!(|data: &[u8]| {
    // First byte: how many cuts; the next ones: where; the rest: the head.
    let (&n, rest) = match data.split_first() {
        Some(x) => x,
        None => return,
    };
    let cuts = (n % 8) as usize;
    if rest.len() < cuts {
        return;
    }
    let (points, head) = rest.split_at(cuts);
    if head.is_empty() {
        return;
    }
    let mut bounds: Vec<usize> = points
        .iter()
        .map(|p| *p as usize * head.len() / 256)
        .collect();
    bounds.push(0);
    bounds.push(head.len());
    bounds.sort_unstable();
    bounds.dedup();
    let pieces: Vec<(u32, &[u8])> = bounds
        .windows(2)
        .map(|w| (1000 + w[0] as u32, &head[w[0]..w[1]]))
        .collect();

    let whole = run(&[(1000, head)]);
    let in_order = run(&pieces);
    let mut with_repeats = Vec::new();
    for piece in &pieces {
        with_repeats.push(*piece);
        with_repeats.push(*piece);
    }
    let repeated = run(&with_repeats);
    let reversed: Vec<_> = pieces.iter().rev().copied().collect();
    let reversed = run(&reversed);
    // Within the bound, the verdict does not depend on how the bytes came.
    // Past it, order can decide which bound is hit first; any verdict then
    // is a rejection for size or nothing.
    if head.len() <= LIMIT {
        assert_eq!(in_order, whole, "segmented in order");
        assert_eq!(repeated, whole, "with retransmissions");
        assert_eq!(reversed, whole, "reversed");
    }
    for verdicts in [&whole, &in_order, &repeated, &reversed] {
        assert!(
            verdicts.len() <= 1,
            "more than one verdict for one connection: {verdicts:?}"
        );
    }
});
