//! Byte budgets per user: the bytes of a connection the agent bound to a
//! user (its handshake carried a version 2 ticket) are charged to that
//! user's bucket, across all the user's connections and addresses, instead
//! of to the source address's. Bytes over the budget are dropped, so the
//! sender's TCP holds and resends them: the queue the guidance asks for.
//! The agent cuts a user who stays over budget too long.

use wsguard_common::{
    Reason, RecordHeader, Settings, StreamPeers, UserKey, UserState, maps::shortcuts,
};

use crate::{
    maps::{STREAM_RECORDS, USER_BUDGETS, USER_FLOWS, USERS, count, shortcut},
    parse::{Frame, Packet, TcpSegment},
};

/// The connection's ends as sock_ops names them (the key of `WSG_USER_FLOWS`).
#[inline(always)]
fn peers(frame: &Frame, segment: &TcpSegment) -> Option<StreamPeers> {
    let l3 = segment.network_offset;
    let server = if segment.ipv4 {
        wsguard_common::SourceKey::from_v4(frame.read::<[u8; 4]>(l3 + 16)?).addr
    } else {
        frame.read::<[u8; 16]>(l3 + 24)?
    };
    let ports = frame.read::<[u8; 2]>(segment.transport_offset)?;
    Some(StreamPeers {
        client: segment.source.addr,
        server,
        client_port: u16::from_be_bytes(ports),
        server_port: segment.destination_port,
        _pad: 0,
    })
}

/// The verdict on a segment of a connection bound to a user: `Passed` when
/// the user's budget holds it (the global limits still apply), a drop
/// reason when not. `None` when the connection is bound to no user (or its
/// user's entry is gone): the per-source budgets judge it.
#[inline(always)]
pub fn charge(
    frame: &Frame,
    settings: &Settings,
    segment: &TcpSegment,
    now: u64,
) -> Option<Reason> {
    // The port first: a bit of the settings already read, where the
    // shortcut is a map lookup.
    if !settings.inspected_ports.contains(segment.destination_port)
        || shortcut(shortcuts::USERS_BOUND) == 0
    {
        return None;
    }
    let peers = peers(frame, segment)?;
    // SAFETY: a copy of the value, taken at once.
    let key = unsafe { *USER_FLOWS.get(&peers)? };
    let user = USERS.get_ptr_mut(&key)?;
    // SAFETY: a map value pointer, valid for the duration of the program.
    let user = unsafe { &mut *user };
    let len = frame.len();
    if user.is_banned(now) {
        user.dropped_packets += 1;
        user.dropped_bytes += len;
        signal_once(user, key);
        return Some(Reason::UserBanned);
    }
    let budget = match USER_BUDGETS.get(user.class) {
        Some(budget) => budget,
        None => USER_BUDGETS.get(0)?,
    };
    user.total_bytes += len;
    let reason = if user.bytes.take(&budget.bytes, now, len) {
        user.record_pass(&budget.bytes);
        Reason::Passed
    } else {
        user.record_drop(now, len);
        Reason::UserByteRate
    };
    // Checked on every packet: a sender whose TCP settled at the budget
    // after its drops is still held back.
    if user.over_since_ns != 0
        && now.saturating_sub(user.over_since_ns) >= budget.over_budget_timeout_ns
    {
        signal_once(user, key);
    }
    Some(reason)
}

/// Tells the agent, once per spell over budget (or ban), to cut the user.
/// A record that does not fit is counted; the agent's periodic sweep
/// finds the user then.
#[inline(always)]
fn signal_once(user: &mut UserState, key: UserKey) {
    if user.signalled != 0 {
        return;
    }
    user.signalled = 1;
    let record = RecordHeader {
        kind: RecordHeader::USER,
        len: 0,
        cookie: key,
        offset: 0,
    };
    if STREAM_RECORDS.output::<RecordHeader>(&record, 0).is_err() {
        count(Reason::InspectLost, 0, false);
    }
}
