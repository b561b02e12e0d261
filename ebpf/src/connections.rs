//! Exact count of established connections per source (sock_ops).
//!
//! Why sock_ops rather than a flow table across XDP and TC: the kernel calls
//! us when a connection is really established (after the handshake, so
//! spoofed SYNs never count) and when it really closes (FIN, RST, timeout or
//! abort alike), so the count cannot drift the way one guessed from packets
//! can. Only sockets we counted or inspect get the state callback (the flag
//! is set on them alone), which pairs every decrement with exactly one
//! increment.
//!
//! The same callbacks put connections to inspected ports under handshake
//! inspection (`inspect.rs`).

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
use wsguard_common::{Reason, SourceKey, StreamPeers};

use crate::{
    inspect,
    maps::{CONNECTIONS, count, handshake_settings, is_allow_listed, now_ns, settings},
};

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

/// Both ends of the connection. Every context field is loaded up front,
/// before any branch: the verifier only accepts context loads at a constant
/// offset from the context pointer, and loads inside the branches get merged
/// by the compiler into one load at a computed offset.
#[inline(always)]
fn peers(ctx: &SockOpsContext) -> Option<StreamPeers> {
    let ops = ctx.ops;
    macro_rules! field {
        ($($f:tt)*) => { unsafe { read_volatile(addr_of!((*ops).$($f)*)) } };
    }
    let family = field!(family);
    let remote4 = field!(remote_ip4).to_ne_bytes();
    let local4 = field!(local_ip4).to_ne_bytes();
    let remote6 = [
        field!(remote_ip6[0]),
        field!(remote_ip6[1]),
        field!(remote_ip6[2]),
        field!(remote_ip6[3]),
    ];
    let local6 = [
        field!(local_ip6[0]),
        field!(local_ip6[1]),
        field!(local_ip6[2]),
        field!(local_ip6[3]),
    ];
    // remote_port holds the port in network byte order in its upper 16 bits
    // (on little-endian hosts); local_port is in host byte order.
    let remote_port = u16::from_be((field!(remote_port) >> 16) as u16);
    let local_port = field!(local_port) as u16;
    // Addresses are in network byte order, so the native bytes are the octets.
    let (client, server) = match family {
        AF_INET => (SourceKey::from_v4(remote4), SourceKey::from_v4(local4)),
        AF_INET6 => (
            SourceKey::from_v6(v6_octets(remote6)),
            SourceKey::from_v6(v6_octets(local6)),
        ),
        _ => return None,
    };
    Some(StreamPeers {
        client: client.addr,
        server: server.addr,
        client_port: remote_port,
        server_port: local_port,
        _pad: 0,
    })
}

#[inline(always)]
fn v6_octets(words: [u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (
        words[0].to_ne_bytes(),
        words[1].to_ne_bytes(),
        words[2].to_ne_bytes(),
        words[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

#[inline(always)]
fn opened(ctx: &SockOpsContext) {
    let Some(settings) = settings() else { return };
    // local_port is in host byte order for sock_ops.
    let port = ctx.local_port() as u16;
    if !settings.protected_ports.contains(port) {
        return;
    }
    let Some(peers) = peers(ctx) else {
        return;
    };
    let source = SourceKey { addr: peers.client };
    // Allow-listed sources are exempt from limits and inspection.
    if is_allow_listed(&source, now_ns()) {
        return;
    }
    let counted = settings.max_concurrent != 0 && count_open(settings.tracking_key(&source));
    let inspected = handshake_settings().is_some_and(|h| inspect::is_ours(ctx, h))
        && settings.inspected_ports.contains(port)
        && inspect::admit(ctx, &peers, counted);
    if counted || inspected {
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
}

/// Counts an established connection towards its source's concurrency.
#[inline(always)]
fn count_open(key: SourceKey) -> bool {
    if !increment(&key) {
        count(Reason::ConnectionUntracked, 0, false);
        return false;
    }
    count(Reason::ConnectionOpened, 0, false);
    true
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
    // Sockets outside inspection have the callback only because they were counted.
    let counted = inspect::closed(ctx).unwrap_or(true);
    if !counted {
        return;
    }
    let Some(settings) = settings() else { return };
    let Some(peers) = peers(ctx) else {
        return;
    };
    let key = settings.tracking_key(&SourceKey { addr: peers.client });
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
