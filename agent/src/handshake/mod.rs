//! Judging WebSocket upgrade requests: the policy of `[handshake]`, the
//! request-head checks of RFC 6455 §4.1, and signed tickets.
//!
//! This is the user-space half of handshake inspection; it decides on the
//! bytes of one request head and never touches the network.

pub mod capture;
pub mod destroy;
pub mod enforce;
pub mod inspector;
pub mod judge;
pub mod ticket;

pub use judge::{
    MissingOrigin, NonUpgrade, OriginPattern, PathPattern, Policy, Rejection, TicketPolicy,
    Verdict, judge,
};
