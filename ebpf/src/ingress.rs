//! The XDP verdict: allow list, deny list, bans, per-source buckets,
//! concurrency, global buckets, in that order.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use aya_log_ebpf::info;
use wsguard_common::{Ban, Event, Reason, Settings, SourceKey, SourceState};

use crate::{
    maps::{
        BANS, CONNECTIONS, GLOBAL, SOURCES, count, emit, handshake_settings, inspection_full,
        is_allow_listed, is_deny_listed, is_inspected_port, is_protected_port, now_ns, settings,
    },
    parse::{Frame, Parsed, TcpSegment, parse},
};

const BPF_NOEXIST: u64 = 1;

#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let Some(settings) = settings() else {
        return xdp_action::XDP_PASS;
    };
    let frame = Frame {
        data: ctx.data(),
        end: ctx.data_end(),
    };
    let reason = match parse(&frame) {
        Parsed::Other => return xdp_action::XDP_PASS,
        Parsed::Tcp(segment) if !is_protected_port(segment.destination_port) => {
            return xdp_action::XDP_PASS;
        }
        Parsed::Tcp(segment) if segment.incomplete_header => malformed(&segment.source),
        Parsed::Tcp(segment) => {
            // A new connection to an inspected port is refused while
            // inspection has no room for it: it would go unjudged.
            let refused = segment.opens_connection
                && handshake_settings().is_some_and(|h| {
                    is_inspected_port(segment.destination_port) && inspection_full(h)
                });
            judge_segment(ctx, settings, &segment, frame.len(), refused)
        }
        Parsed::Fragment(source) => {
            let key = settings.tracking_key(&source);
            source_rules(&source, &key, now_ns()).unwrap_or(Reason::PassedFragment)
        }
        Parsed::Malformed(source) => malformed(&source),
    };
    if !reason.is_drop() {
        count(reason, frame.len(), false);
        return xdp_action::XDP_PASS;
    }
    // A family in dry-run only counts what it would have dropped.
    let dry_run = settings.is_dry_run(reason);
    count(reason, frame.len(), dry_run);
    if dry_run {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// A segment we cannot judge: malformed, unless its source is allow-listed.
#[inline(always)]
fn malformed(source: &SourceKey) -> Reason {
    if is_allow_listed(source, now_ns()) {
        Reason::AllowListed
    } else {
        Reason::Malformed
    }
}

/// Rules that depend only on the source: allow list and deny list on the
/// full address, ban on its tracking key. `None` means none of them decided.
#[inline(always)]
fn source_rules(source: &SourceKey, key: &SourceKey, now: u64) -> Option<Reason> {
    if is_allow_listed(source, now) {
        return Some(Reason::AllowListed);
    }
    if is_deny_listed(source, now) {
        return Some(Reason::DenyList);
    }
    if is_banned(key, now) {
        return Some(Reason::Banned);
    }
    None
}

/// A ban holds until `until_ns`; the first packet after that lifts it.
#[inline(always)]
fn is_banned(key: &SourceKey, now: u64) -> bool {
    let Some(ban) = BANS.get_ptr(key) else {
        return false;
    };
    if now < unsafe { (*ban).until_ns } {
        return true;
    }
    let _ = BANS.remove(key);
    false
}

#[inline(always)]
fn judge_segment(
    ctx: &XdpContext,
    settings: &Settings,
    segment: &TcpSegment,
    len: u64,
    inspection_refused: bool,
) -> Reason {
    let now = now_ns();
    let key = settings.tracking_key(&segment.source);
    if let Some(reason) = source_rules(&segment.source, &key, now) {
        return reason;
    }
    if inspection_refused {
        return Reason::InspectFull;
    }
    if let Some(state) = source_state(&key) {
        // SAFETY: a map value pointer, valid for the duration of the program.
        let state = unsafe { &mut *state };
        state.total_packets += 1;
        state.total_bytes += len;
        if let Some(reason) = per_source_limits(settings, segment, &key, state, now, len) {
            match reason {
                Reason::ConnectionRate => state.drops_connection_rate += 1,
                Reason::ByteRate => state.drops_byte_rate += 1,
                _ => state.drops_concurrency += 1,
            }
            record_limit_drop(ctx, settings, &key, state, now);
            return reason;
        }
    }
    // Per-source limits first, so a flooding source is charged to itself
    // before it can use up the budget shared by everyone.
    global_limits(settings, segment, now, len).unwrap_or(Reason::Passed)
}

/// The source's state, created with full buckets on first sight. `None` only
/// if the LRU map cannot take an entry, in which case per-source limits are
/// skipped for this packet and the global limits still apply.
#[inline(always)]
fn source_state(key: &SourceKey) -> Option<*mut SourceState> {
    if let Some(state) = SOURCES.get_ptr_mut(key) {
        return Some(state);
    }
    let _ = SOURCES.insert(key, &SourceState::default(), BPF_NOEXIST);
    SOURCES.get_ptr_mut(key)
}

#[inline(always)]
fn per_source_limits(
    settings: &Settings,
    segment: &TcpSegment,
    key: &SourceKey,
    state: &mut SourceState,
    now: u64,
    len: u64,
) -> Option<Reason> {
    if segment.opens_connection {
        if settings.max_concurrent != 0 {
            if let Some(open) = CONNECTIONS.get_ptr(key) {
                if unsafe { *open } >= settings.max_concurrent as u64 {
                    return Some(Reason::Concurrency);
                }
            }
        }
        if !state.connections.take(&settings.source_connections, now, 1) {
            return Some(Reason::ConnectionRate);
        }
    }
    if !state.bytes.take(&settings.source_bytes, now, len) {
        return Some(Reason::ByteRate);
    }
    None
}

#[inline(always)]
fn global_limits(settings: &Settings, segment: &TcpSegment, now: u64, len: u64) -> Option<Reason> {
    let global = GLOBAL.get_ptr_mut(0)?;
    // SAFETY: array value pointer. Shared by all CPUs and updated without a
    // lock: a race can lose an update and let a packet or two through.
    let global = unsafe { &mut *global };
    if segment.opens_connection
        && !global
            .connections
            .take(&settings.global_connections, now, 1)
    {
        return Some(Reason::GlobalConnectionRate);
    }
    if !global.bytes.take(&settings.global_bytes, now, len) {
        return Some(Reason::GlobalByteRate);
    }
    None
}

/// Counts a per-source limit drop in the source's window and bans the source
/// once the window holds `ban_after_drops` drops.
#[inline(always)]
fn record_limit_drop(
    ctx: &XdpContext,
    settings: &Settings,
    key: &SourceKey,
    state: &mut SourceState,
    now: u64,
) {
    if settings.ban_after_drops == 0 {
        return;
    }
    if now.saturating_sub(state.window_start_ns) >= settings.ban_window_ns {
        state.window_start_ns = now;
        state.window_drops = 0;
    }
    state.window_drops += 1;
    if state.window_drops < settings.ban_after_drops {
        return;
    }
    state.window_drops = 0;
    let until_ns = now + settings.ban_duration_ns;
    // In dry run the ban is only announced, never written.
    let dry_run = settings.is_dry_run(Reason::Banned);
    if !dry_run {
        let ban = Ban {
            since_ns: now,
            until_ns,
        };
        if BANS.insert(key, &ban, 0).is_err() {
            count(Reason::BanMapFull, 0, false);
            return;
        }
        info!(
            ctx,
            "ban started: source {:i} for {} s",
            key.addr,
            settings.ban_duration_ns / 1_000_000_000
        );
    }
    count(Reason::BanStarted, 0, dry_run);
    emit(&Event {
        kind: Event::BAN_STARTED,
        dry_run: u32::from(dry_run),
        source: *key,
        until_ns,
    });
}
