//! Exact count of established connections per source (sock_ops).
//!
//! Why sock_ops rather than a flow table across XDP and TC: the kernel calls
//! us when a connection is really established (after the handshake, so
//! spoofed SYNs never count) and when it really closes (FIN, RST, timeout or
//! abort alike), so the count cannot drift the way one guessed from packets
//! can. Only sockets we counted get the state callback (the flag is set on
//! them alone), which pairs every decrement with exactly one increment.

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    ptr::{addr_of, read_volatile},
};

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE,
    },
    programs::SockOpsContext,
};
use wsguard_common::{Reason, SourceKey};

use crate::maps::{CONNECTIONS, count, is_allow_listed, is_protected_port, now_ns, settings};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const BPF_NOEXIST: u64 = 1;

#[inline(always)]
pub fn run(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => opened(ctx),
        BPF_SOCK_OPS_STATE_CB => {
            let (old_state, new_state) = (ctx.arg(0), ctx.arg(1));
            if new_state == BPF_TCP_CLOSE && old_state != BPF_TCP_CLOSE {
                closed(ctx);
            }
        }
        _ => {}
    }
}

/// The peer's address. Every context field is loaded up front, before any
/// branch: the verifier only accepts context loads at a constant offset from
/// the context pointer, and loads inside the branches get merged by the
/// compiler into one load at a computed offset.
#[inline(always)]
fn remote_source(ctx: &SockOpsContext) -> Option<SourceKey> {
    let ops = ctx.ops;
    macro_rules! field {
        ($($f:tt)*) => { unsafe { read_volatile(addr_of!((*ops).$($f)*)) } };
    }
    let family = field!(family);
    let v4 = field!(remote_ip4).to_ne_bytes();
    let (a, b, c, d) = (
        field!(remote_ip6[0]).to_ne_bytes(),
        field!(remote_ip6[1]).to_ne_bytes(),
        field!(remote_ip6[2]).to_ne_bytes(),
        field!(remote_ip6[3]).to_ne_bytes(),
    );
    // Addresses are in network byte order, so the native bytes are the octets.
    match family {
        AF_INET => Some(SourceKey::from_v4(v4)),
        AF_INET6 => Some(SourceKey::from_v6([
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ])),
        _ => None,
    }
}

#[inline(always)]
fn opened(ctx: &SockOpsContext) {
    let Some(settings) = settings() else { return };
    // local_port is in host byte order for sock_ops.
    if !is_protected_port(ctx.local_port() as u16) {
        return;
    }
    let Some(source) = remote_source(ctx) else {
        return;
    };
    // Allow-listed sources are exempt from limits and need no entry.
    if is_allow_listed(&source, now_ns()) {
        return;
    }
    let key = settings.tracking_key(&source);
    if !increment(&key) {
        count(Reason::ConnectionUntracked, 0, false);
        return;
    }
    count(Reason::ConnectionOpened, 0, false);
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

#[inline(always)]
fn increment(key: &SourceKey) -> bool {
    for _ in 0..2 {
        if let Some(open) = CONNECTIONS.get_ptr_mut(key) {
            // BPF atomic add; its result is unused, so any BPF CPU version has it.
            unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(open, 1) };
            return true;
        }
        // Another CPU may insert the same key first: then BPF_NOEXIST fails
        // and the second round adds to its entry.
        if CONNECTIONS.insert(key, &1, BPF_NOEXIST).is_ok() {
            return true;
        }
    }
    false
}

#[inline(always)]
fn closed(ctx: &SockOpsContext) {
    let _ = ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    let Some(settings) = settings() else { return };
    let Some(source) = remote_source(ctx) else {
        return;
    };
    let key = settings.tracking_key(&source);
    let Some(open) = CONNECTIONS.get_ptr_mut(&key) else {
        return;
    };
    // Adding 2^64 - 1 is subtracting one, with the same atomic add.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(open, u64::MAX) };
    count(Reason::ConnectionClosed, 0, false);
    // Drop the entry at zero so idle sources leave the map. A connection
    // opened on another CPU in between can lose its count here; the limit then
    // errs by one towards letting a connection through, never towards blocking.
    if unsafe { core::ptr::read_volatile(open) } == 0 {
        let _ = CONNECTIONS.remove(&key);
    }
}
