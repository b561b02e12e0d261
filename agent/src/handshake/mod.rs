//! Handshake policy: judging WebSocket upgrade requests against the policy
//! of `[handshake]`. Pure, no I/O: `judge` (one request head in, a verdict
//! out), `streams` (connections' bytes in, actions out), `ticket` and
//! `replay`. The I/O around it (kernel records, injection, cutting) is
//! `crate::inspection`.

pub mod judge;
pub mod replay;
pub mod streams;
pub mod ticket;

pub use judge::{
    AllowOrReject, Judgement, OriginPattern, PathPattern, Policy, Rejection, TicketPolicy, Verdict,
    judge, judge_request,
};
