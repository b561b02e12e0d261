//! Types shared by the kernel programs (`ebpf/`) and the agent (`agent/`).
//!
//! Everything here is `#[repr(C)]`, free of padding and size-asserted, because
//! the same bytes are written by one side and read by the other through BPF maps.
#![no_std]

pub mod bucket;
pub mod cookie;
pub mod counters;
pub mod maps;
pub mod source;

pub use bucket::{BucketParams, TokenBucket};
pub use counters::{Counter, Reason};
pub use maps::{
    Ban, Event, HandshakeSettings, ListEntry, ListKey, LpmKey, PortSet, RecordHeader, Release,
    Settings, SourceSet, SourceState, Stream, StreamPeers, UserBudget, UserKey, UserState,
};
pub use source::SourceKey;

/// Asserts at compile time that a shared type has exactly the expected size,
/// which (with field sizes chosen as multiples of their alignment) rules out
/// hidden padding.
#[macro_export]
macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], padding-free, and valid for any bit pattern.
    unsafe impl aya::Pod for SourceKey {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for SourceState {}
    unsafe impl aya::Pod for SourceSet {}
    unsafe impl aya::Pod for maps::ClockSample {}
    unsafe impl aya::Pod for Ban {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for ListEntry {}
    unsafe impl aya::Pod for ListKey {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for Stream {}
    unsafe impl aya::Pod for StreamPeers {}
    unsafe impl aya::Pod for Release {}
    unsafe impl aya::Pod for HandshakeSettings {}
    unsafe impl aya::Pod for maps::GlobalState {}
    unsafe impl aya::Pod for maps::GlobalShares {}
    unsafe impl aya::Pod for cookie::CookieSettings {}
    unsafe impl aya::Pod for UserState {}
    unsafe impl aya::Pod for UserBudget {}
}
