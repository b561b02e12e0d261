//! Handshake inspection on the stream the application will read.
//!
//! The kernel's TCP stack reassembles and validates every inspected
//! connection (checksums, windows, PAWS, overlaps, fragments, urgent data);
//! only then do these programs see its bytes, so no wire-level trick can make
//! what the agent judges differ from what the server reads:
//!
//! - sock_ops ([`admit`], [`closed`]): a connection to an inspected port
//!   that completed its TCP handshake enters `WSG_INSPECTED` (a sockhash
//!   keyed by socket cookie) and gets a [`Stream`] entry; the agent learns of
//!   it through an OPENED record.
//! - [`stream_verdict`] (sk_skb on `WSG_INSPECTED`): every byte the socket
//!   receives passes here before the application can read it. Until the
//!   agent accepts the connection, the bytes are handed to the agent (DATA
//!   records, with their stream offset) and never queued for the
//!   application. A rejected connection's bytes are dropped.
//! - [`inject`] (sk_msg on the agent's injection socket): after accepting,
//!   the agent writes the very bytes it judged, and they are put into the
//!   server socket's receive queue (`BPF_F_INGRESS`).
//!
//! Fail closed: bytes that cannot be handed over mark the stream lost (the
//! agent cuts it); a socket in the map without a stream entry gets nothing.

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_xadd},
    mem::size_of,
};

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, bpf_sock_ops, sk_action},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_skb_load_bytes},
    programs::{SkBuffContext, SkMsgContext, SockOpsContext},
};
use wsguard_common::{
    HandshakeSettings, Reason, RecordHeader, Release, Stream, StreamPeers,
    maps::{RECORD_DATA_BYTES, RECORDS_PER_SEGMENT},
};

use crate::maps::{
    INJECT_TARGET, INSPECTED, INSPECTED_COUNT, RECORD_SCRATCH, RELEASES, STREAM_RECORDS, STREAMS,
    USER_FLOWS, count, now_ns,
};

const BPF_NOEXIST: u64 = 1;
const SK_PASS: u32 = sk_action::SK_PASS;
const SK_DROP: u32 = sk_action::SK_DROP;

/// A DATA record as written to the ring buffer: the header, then up to
/// [`RECORD_DATA_BYTES`] of stream data (only the used part is sent).
#[repr(C)]
pub struct DataRecord {
    pub header: RecordHeader,
    pub data: [u8; RECORD_DATA_BYTES],
}

/// An OPENED or REFUSED record.
#[repr(C)]
struct PeersRecord {
    header: RecordHeader,
    peers: StreamPeers,
}

fn emit_peers(kind: u32, cookie: u64, peers: &StreamPeers) -> bool {
    let record = PeersRecord {
        header: RecordHeader {
            kind,
            len: 0,
            cookie,
            offset: 0,
        },
        peers: *peers,
    };
    if STREAM_RECORDS.output::<PeersRecord>(&record, 0).is_err() {
        count(Reason::InspectLost, 0, false);
        return false;
    }
    true
}

/// Whether the connection's socket lives in the agent's network namespace
/// (sock_ops runs for every socket of the cgroup, whatever its namespace).
#[inline(always)]
pub fn is_ours(ctx: &SockOpsContext, handshake: &HandshakeSettings) -> bool {
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops as *mut c_void) };
    netns == handshake.netns_cookie
}

/// A connection to an inspected port was established: put its socket under
/// inspection. Returns whether it is inspected (and needs the close callback).
#[inline(always)]
pub fn admit(ctx: &SockOpsContext, peers: &StreamPeers, counted: bool) -> bool {
    let ops: *mut bpf_sock_ops = ctx.ops;
    let cookie = unsafe { bpf_get_socket_cookie(ops as *mut c_void) };
    // Into the sockhash first: from here on the application gets no byte
    // that the stream verdict has not released.
    if INSPECTED
        .update(cookie, unsafe { &mut *ops }, BPF_NOEXIST)
        .is_err()
    {
        // Not inspected: the agent cuts it as soon as it reads this record.
        count(Reason::InspectLost, 0, false);
        emit_peers(RecordHeader::REFUSED, cookie, peers);
        return false;
    }
    let stream = Stream {
        handed: 0,
        opened_ns: now_ns(),
        peers: *peers,
        lost: 0,
        passing: 0,
        counted: u32::from(counted),
    };
    if STREAMS.insert(&cookie, &stream, BPF_NOEXIST).is_err() {
        // In the sockhash without a stream entry, the verdict program hands
        // nothing on: the connection is held, and the agent cuts it.
        count(Reason::InspectLost, 0, false);
        emit_peers(RecordHeader::REFUSED, cookie, peers);
        return false;
    }
    if let Some(open) = INSPECTED_COUNT.get_ptr_mut(0) {
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(open, 1) };
    }
    // A lost OPENED record is noticed from the first DATA record (or the
    // stream's deadline): the agent still holds the connection's bytes.
    emit_peers(RecordHeader::OPENED, cookie, peers);
    true
}

/// An inspected connection closed. Returns `Some(counted)` for an inspected
/// connection (whether it also counts towards the concurrency limit), `None`
/// for any other.
#[inline(always)]
pub fn closed(ctx: &SockOpsContext) -> Option<bool> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    let stream = STREAMS.get_ptr(&cookie)?;
    let counted = unsafe { (*stream).counted } != 0;
    // A connection bound to a user leaves the user's budget with it.
    let _ = USER_FLOWS.remove(unsafe { &(*stream).peers });
    let _ = STREAMS.remove(&cookie);
    if let Some(open) = INSPECTED_COUNT.get_ptr_mut(0) {
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(open, u64::MAX) };
    }
    let header = RecordHeader {
        kind: RecordHeader::CLOSED,
        len: 0,
        cookie,
        offset: 0,
    };
    if STREAM_RECORDS.output::<RecordHeader>(&header, 0).is_err() {
        count(Reason::InspectLost, 0, false);
    }
    Some(counted)
}

/// The stream verdict: every byte an inspected socket receives, in order,
/// before the application can read it.
#[inline(always)]
pub fn stream_verdict(ctx: &SkBuffContext) -> u32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut c_void) };
    let len = ctx.len() as u64;
    let Some(stream) = STREAMS.get_ptr_mut(&cookie) else {
        count(Reason::InspectLost, len, false);
        return SK_DROP;
    };
    // SAFETY: a map value pointer; this program runs once at a time per socket.
    let stream = unsafe { &mut *stream };
    // An upgraded connection: one lookup per segment, not two.
    if stream.passing != 0 {
        return SK_PASS;
    }
    if let Some(release) = RELEASES.get_ptr(&cookie) {
        let release = unsafe { *release };
        if release.state == Release::REJECTED {
            count(Reason::FlowRejected, len, false);
            return SK_DROP;
        }
        // Everything handed over has been put back: the agent is done with
        // this connection, and new bytes go straight to the application.
        if release.state == Release::ACCEPTED && release.upto == stream.handed {
            stream.passing = 1;
            return SK_PASS;
        }
    }
    if stream.lost == 0 && !hand_over(ctx, cookie, stream.handed, len) {
        stream.lost = 1;
        count(Reason::InspectLost, len, false);
    }
    stream.handed += len;
    count(Reason::HandedToAgent, len, false);
    SK_DROP
}

/// Copies the segment's bytes into DATA records. False when any part did not
/// fit (the ring buffer is full, or the segment is longer than a pending
/// connection can legitimately send at once).
#[inline(always)]
fn hand_over(ctx: &SkBuffContext, cookie: u64, offset: u64, len: u64) -> bool {
    if len > (RECORD_DATA_BYTES * RECORDS_PER_SEGMENT) as u64 {
        return false;
    }
    let Some(record) = RECORD_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU scratch space, ours for this run.
    let record = unsafe { &mut *record };
    let len = len as u32;
    let mut done: u32 = 0;
    for _ in 0..RECORDS_PER_SEGMENT {
        if done >= len {
            break;
        }
        let n = len - done;
        // Read back so the compiler cannot drop the check below: the
        // verifier needs to see 0 < n <= RECORD_DATA_BYTES here.
        let n = unsafe { core::ptr::read_volatile(&n) };
        if n == 0 {
            break;
        }
        let n = if n > RECORD_DATA_BYTES as u32 {
            RECORD_DATA_BYTES as u32
        } else {
            n
        };
        let loaded = unsafe {
            bpf_skb_load_bytes(
                ctx.skb.skb as *const c_void,
                done,
                record.data.as_mut_ptr() as *mut c_void,
                n,
            )
        };
        if loaded != 0 {
            return false;
        }
        record.header = RecordHeader {
            kind: RecordHeader::DATA,
            len: n,
            cookie,
            offset: offset + done as u64,
        };
        let size = size_of::<RecordHeader>() + n as usize;
        // SAFETY: `size` is at most the size of the record.
        let bytes =
            unsafe { core::slice::from_raw_parts(record as *const DataRecord as *const u8, size) };
        if STREAM_RECORDS.output::<[u8]>(bytes, 0).is_err() {
            return false;
        }
        done += n;
    }
    done >= len
}

/// The agent's injection socket: whatever the agent writes goes into the
/// receive queue of the connection named in `WSG_INJECT_TO`.
#[inline(always)]
pub fn inject(ctx: &SkMsgContext) -> u32 {
    let Some(target) = INJECT_TARGET.get(0) else {
        return SK_DROP;
    };
    let mut cookie = *target;
    INSPECTED.redirect_msg(ctx, &mut cookie, BPF_F_INGRESS as u64) as u32
}
