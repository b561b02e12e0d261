//! Handshake inspection: judging WebSocket upgrade requests against the
//! policy of `[handshake]` on the stream the server will read.
//!
//! Pure policy, no I/O: `judge` (one request head in, a verdict out),
//! `streams` (connections' bytes in, actions out), `ticket` and `replay`.
//! I/O: `inspection` (kernel records, injection, cutting) and `destroy`.

pub mod destroy;
pub mod inspection;
pub mod judge;
pub mod replay;
pub mod streams;
pub mod ticket;

pub use judge::{
    Judgement, MissingOrigin, NonUpgrade, OriginPattern, PathPattern, Policy, Rejection,
    TicketPolicy, Verdict, judge, judge_request,
};
