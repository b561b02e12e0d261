//! wsguard kernel programs.
//!
//! - `wsguard_ingress` (XDP, every protected interface): per-source and global
//!   flood limits, allow/deny lists and bans on the protected TCP ports.
//! - `wsguard_cookie_ack` (TC ingress, every protected interface): hands a
//!   connection whose SYN cookie XDP validated to the TCP stack (`cookies.rs`).
//! - `wsguard_connections` (sock_ops, cgroup v2 root): exact count of
//!   established connections per source, read by the XDP program to enforce
//!   the concurrency limit.
//!   It also puts connections to inspected ports under inspection.
//! - `wsguard_stream` (sk_skb stream verdict on inspected sockets) and
//!   `wsguard_inject` (sk_msg on the agent's injection socket): handshake
//!   inspection on the stream the application will read (`inspect.rs`).
//! - `wsguard_floor` (XDP): returns XDP_PASS, a baseline for benchmarks.
//! - `wsguard_clock` (XDP, run by the agent through BPF_PROG_TEST_RUN):
//!   reads the kernel's clocks for the agent to set the XDP program's own.
#![no_std]
#![no_main]
// Atomic add on map values: the BPF target has no core::sync::atomic RMW types.
#![feature(core_intrinsics)]
#![allow(internal_features)]
// Index loops and explicit borrows of map keys are kept on purpose: the
// verifier follows a bounded index more reliably than an iterator, and the
// map helpers take pointers to the key either way.
#![allow(clippy::needless_range_loop, clippy::needless_borrows_for_generic_args)]

mod clock;
mod connections;
mod cookies;
mod ingress;
mod inspect;
mod maps;
mod parse;
mod sources;
mod users;

use aya_ebpf::{
    macros::{classifier, sk_msg, sock_ops, stream_verdict, xdp},
    programs::{SkBuffContext, SkMsgContext, SockOpsContext, TcContext, XdpContext},
};

#[xdp]
pub fn wsguard_ingress(ctx: XdpContext) -> u32 {
    ingress::run(&ctx)
}

/// Tail-called by `wsguard_ingress`: answers a SYN with a SYN cookie.
#[xdp]
pub fn wsguard_cookie_syn(ctx: XdpContext) -> u32 {
    ingress::answer_syn(&ctx)
}

/// Tail-called by `wsguard_ingress`: a segment of no connection must
/// return a valid cookie.
#[xdp]
pub fn wsguard_cookie_check(ctx: XdpContext) -> u32 {
    ingress::check_cookie(&ctx)
}

#[classifier]
pub fn wsguard_cookie_ack(ctx: TcContext) -> i32 {
    match (maps::settings(), maps::cookie_settings()) {
        (Some(settings), Some(cookies)) => {
            cookies::assign(&ctx, &settings.protected_ports, cookies)
        }
        _ => aya_ebpf::bindings::TC_ACT_UNSPEC,
    }
}

#[sock_ops]
pub fn wsguard_connections(ctx: SockOpsContext) -> u32 {
    connections::run(&ctx);
    // sock_ops programs return 1 for "handled"; the value has no effect on
    // the callbacks we use.
    1
}

#[stream_verdict]
pub fn wsguard_stream(ctx: SkBuffContext) -> u32 {
    inspect::stream_verdict(&ctx)
}

#[sk_msg]
pub fn wsguard_inject(ctx: SkMsgContext) -> u32 {
    inspect::inject(&ctx)
}

/// Returns XDP_PASS and does nothing else: the floor the benchmarks measure
/// `wsguard_ingress` against. The agent never loads or attaches it.
#[xdp]
pub fn wsguard_floor(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

/// Reads the tick count and the coarse clock together (`clock.rs`); never
/// attached.
#[xdp]
pub fn wsguard_clock(_ctx: XdpContext) -> u32 {
    clock::sample()
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
