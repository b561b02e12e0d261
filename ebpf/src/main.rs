//! wsguard kernel programs.
//!
//! - `wsguard_ingress` (XDP, every protected interface): per-source and global
//!   flood limits, allow/deny lists and bans on the protected TCP ports.
//! - `wsguard_connections` (sock_ops, cgroup v2 root): exact count of
//!   established connections per source, read by the XDP program to enforce
//!   the concurrency limit.
//! - `wsguard_egress` (TC egress): holds the server's answer back until the
//!   handshake's verdict, and drops rejected connections.
//! - `wsguard_capture` (socket filter): hands the agent the request heads of
//!   connections awaiting a verdict.
//! - `wsguard_floor` (XDP): returns XDP_PASS, a baseline for benchmarks.
#![no_std]
#![no_main]
// Atomic add on map values: the BPF target has no core::sync::atomic RMW types.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod capture;
mod connections;
mod egress;
mod ingress;
mod maps;
mod parse;

use aya_ebpf::{
    macros::{classifier, sock_ops, socket_filter, xdp},
    programs::{SkBuffContext, SockOpsContext, TcContext, XdpContext},
};

#[xdp]
pub fn wsguard_ingress(ctx: XdpContext) -> u32 {
    ingress::run(&ctx)
}

#[sock_ops]
pub fn wsguard_connections(ctx: SockOpsContext) -> u32 {
    connections::run(&ctx);
    // sock_ops programs return 1 for "handled"; the value has no effect on
    // the callbacks we use.
    1
}

#[classifier]
pub fn wsguard_egress(ctx: TcContext) -> i32 {
    egress::run(&ctx)
}

#[socket_filter]
pub fn wsguard_capture(ctx: SkBuffContext) -> i64 {
    capture::run(&ctx)
}

/// Returns XDP_PASS and does nothing else: the floor the benchmarks measure
/// `wsguard_ingress` against. The agent never loads or attaches it.
#[xdp]
pub fn wsguard_floor(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in verified code: the verifier rejects programs that can panic.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
