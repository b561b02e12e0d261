//! wsguard kernel programs.
//!
//! - `wsguard_ingress` (XDP, every protected interface): per-source and global
//!   flood limits, allow/deny lists and bans on the protected TCP ports.
//! - `wsguard_connections` (sock_ops, cgroup v2 root): exact count of
//!   established connections per source, read by the XDP program to enforce
//!   the concurrency limit.
#![no_std]
#![no_main]
// Atomic add on map values: the BPF target has no core::sync::atomic RMW types.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod connections;
mod ingress;
mod maps;
mod parse;

use aya_ebpf::{
    macros::{sock_ops, xdp},
    programs::{SockOpsContext, XdpContext},
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in verified code: the verifier rejects programs that can panic.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
