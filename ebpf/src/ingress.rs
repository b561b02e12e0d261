//! The XDP verdict: allow list, deny list, bans, SYN cookies, per-source
//! buckets, concurrency, global buckets, in that order.

use aya_ebpf::{bindings::xdp_action, macros::map, maps::ProgramArray, programs::XdpContext};
use aya_log_ebpf::info;
use wsguard_common::{
    Ban, Event, Reason, Settings, SourceKey, SourceState, bucket::take_shared,
    cookie::CookieSettings,
};

use crate::{
    clock,
    cookies::{self, Belongs},
    maps::{
        BANS, CONNECTIONS, GLOBAL, GLOBAL_SHARES, ban_epoch, bump_ban_epoch, cookie_settings,
        count, emit, handshake_settings, inspection_full, is_allow_listed, is_deny_listed, now_ns,
        settings,
    },
    parse::{Frame, Parsed, TcpSegment, parse},
    sources::{self, Slot},
    users,
};

#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let Some(settings) = settings() else {
        return xdp_action::XDP_PASS;
    };
    let frame = Frame {
        data: ctx.data(),
        end: ctx.data_end(),
    };
    let reason = match parse(&frame, &settings.protected_ports) {
        Parsed::Other | Parsed::Unprotected => return xdp_action::XDP_PASS,
        Parsed::Tcp(segment) if segment.incomplete_header => malformed(settings, &segment.source),
        Parsed::Tcp(segment) => judge_segment(ctx, &frame, settings, &segment),
        Parsed::Fragment(source) => {
            let key = settings.tracking_key(&source);
            source_rules(&source, &key, clock::now_ns(settings)).unwrap_or(Reason::PassedFragment)
        }
        Parsed::Malformed(source) => malformed(settings, &source),
    };
    finish(settings, reason, frame.len())
}

/// Counts the verdict and turns it into an XDP action.
#[inline(always)]
fn finish(settings: &Settings, reason: Reason, len: u64) -> u32 {
    if !reason.is_drop() {
        count(reason, len, false);
        return xdp_action::XDP_PASS;
    }
    // A family in dry-run only counts what it would have dropped.
    let dry_run = settings.is_dry_run(reason);
    count(reason, len, dry_run);
    if dry_run {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// A segment we cannot judge: malformed, unless its source is allow-listed.
#[inline(always)]
fn malformed(settings: &Settings, source: &SourceKey) -> Reason {
    if is_allow_listed(source, clock::now_ns(settings)) {
        Reason::AllowListed
    } else {
        Reason::Malformed
    }
}

/// The allow list, then the deny list, on the full address. `None` means
/// neither decided.
#[inline(always)]
fn list_rules(source: &SourceKey, now: u64) -> Option<Reason> {
    if is_allow_listed(source, now) {
        return Some(Reason::AllowListed);
    }
    if is_deny_listed(source, now) {
        return Some(Reason::DenyList);
    }
    None
}

/// Rules that depend only on the source, for a fragment (which has no
/// entry of its own to vouch for its ban state): the lists, then a ban on
/// its tracking key. `None` means none of them decided.
#[inline(always)]
fn source_rules(source: &SourceKey, key: &SourceKey, now: u64) -> Option<Reason> {
    list_rules(source, now).or_else(|| is_banned(key, now).then_some(Reason::Banned))
}

/// Bans, looked up in the ban map only when the source's own entry did
/// not read it at the current ban epoch. The entry then caches what the
/// map said; a banned source without an entry gets one for it (only bans
/// the kernel or the agent wrote do that, so spoofed sources cannot).
#[inline(always)]
fn ban_rule(key: &SourceKey, slot: Option<Slot>, now: u64) -> Option<Reason> {
    // Read before the lookup: a ban written since has changed the epoch.
    let epoch = ban_epoch();
    let Some(slot) = slot else {
        return is_banned(key, now).then_some(Reason::Banned);
    };
    if let Some(state) = slot.state() {
        // SAFETY: a map value pointer, valid for the duration of the program.
        let state = unsafe { &*state };
        if epoch != 0 && state.ban_epoch == epoch {
            return (now < state.banned_until_ns).then_some(Reason::Banned);
        }
    }
    let until_ns = ban_until(key, now);
    if until_ns != 0 || slot.state().is_some() {
        // SAFETY: as above.
        let state = unsafe { &mut *slot.state_or_insert(key, now) };
        state.ban_epoch = epoch;
        state.banned_until_ns = until_ns;
    }
    (until_ns != 0).then_some(Reason::Banned)
}

/// When the source's ban ends, or 0 for none; the first packet after it
/// ends lifts it.
#[inline(always)]
fn ban_until(key: &SourceKey, now: u64) -> u64 {
    let Some(ban) = BANS.get_ptr(key) else {
        return 0;
    };
    let until_ns = unsafe { (*ban).until_ns };
    if now < until_ns {
        return until_ns;
    }
    let _ = BANS.remove(key);
    0
}

/// Whether a ban holds the source now.
#[inline(always)]
fn is_banned(key: &SourceKey, now: u64) -> bool {
    ban_until(key, now) != 0
}

/// SYN cookies apply unless they are off, or a dry run covers the limits
/// (a dry run must not answer for the server).
#[inline(always)]
fn cookies_active(settings: &Settings) -> bool {
    settings.syn_cookies != 0 && !settings.is_dry_run(Reason::SynCookieFailed)
}

#[inline(always)]
fn judge_segment(
    ctx: &XdpContext,
    frame: &Frame,
    settings: &Settings,
    segment: &TcpSegment,
) -> Reason {
    let now = clock::now_ns(settings);
    if let Some(reason) = list_rules(&segment.source, now) {
        return reason;
    }
    let key = settings.tracking_key(&segment.source);
    let cookies = cookies_active(settings);
    if cookies && segment.opens_connection() {
        // A SYN is answered with a cookie and charges no budget: its
        // source's entry is of no use, only a ban can stop it (the SYN of
        // a spoofed flood costs no lookup in the per-source map).
        if is_banned(&key, now) {
            return Reason::Banned;
        }
        // In its own program (a tail call), so that this one stays small
        // enough to verify; it returns for good.
        unsafe { COOKIE_PROGRAMS.tail_call(ctx, COOKIE_SYN) };
        return Reason::SynCookieFailed;
    }
    // Looked up once, for the ban shortcut and the budgets; created only
    // once the source has a budget to be charged (after the cookie check).
    let slot = sources::find(settings, &key, now);
    if let Some(reason) = ban_rule(&key, slot, now) {
        return reason;
    }
    if cookies {
        // A segment of no connection must return a cookie (a tail call,
        // like the SYN's).
        if let Belongs::Nothing = cookies::belongs(ctx.ctx as *mut _, frame, segment) {
            unsafe { COOKIE_PROGRAMS.tail_call(ctx, COOKIE_CHECK) };
            return Reason::SynCookieFailed;
        }
    }
    // A connection bound to a user is charged to the user's budget, not
    // the source's (a SYN is never bound).
    if let Some(reason) = users::charge(frame, settings, segment, now) {
        if reason != Reason::Passed {
            return reason;
        }
        return global_limits(settings, false, now, frame.len()).unwrap_or(Reason::Passed);
    }
    let budgets = Budgets {
        key: &key,
        slot,
        opens_connection: segment.opens_connection(),
        now,
        len: frame.len(),
    };
    judge_budgets(ctx, settings, segment, budgets)
}

/// What both cookie programs start from. `None` (settings gone since the
/// tail call) drops the packet: nothing passes unjudged.
#[inline(always)]
fn cookie_program_start(
    ctx: &XdpContext,
) -> Option<(&'static Settings, &'static CookieSettings, Frame)> {
    let frame = Frame {
        data: ctx.data(),
        end: ctx.data_end(),
    };
    Some((settings()?, cookie_settings()?, frame))
}

/// `wsguard_cookie_syn`, reached from `wsguard_ingress` for a SYN from a
/// source no list or ban decided: answers it with a SYN cookie.
#[inline(always)]
pub fn answer_syn(ctx: &XdpContext) -> u32 {
    let Some((settings, cookies, frame)) = cookie_program_start(ctx) else {
        return xdp_action::XDP_DROP;
    };
    let len = frame.len();
    let answered = match parse(&frame, &settings.protected_ports) {
        Parsed::Tcp(segment) if segment.flags() & TcpSegment::RST == 0 => {
            cookies::answer_syn(ctx, &segment, cookies, now_ns()).is_ok()
        }
        _ => false,
    };
    if answered {
        count(Reason::SynCookieSent, len, false);
        xdp_action::XDP_TX
    } else {
        finish(settings, Reason::SynCookieFailed, len)
    }
}

/// `wsguard_cookie_check`, reached from `wsguard_ingress` for a segment
/// that belongs to no connection: it must return a valid cookie, and then
/// it opens a connection, charged to the budgets like a SYN without cookies.
#[inline(always)]
pub fn check_cookie(ctx: &XdpContext) -> u32 {
    let Some((settings, cookies, frame)) = cookie_program_start(ctx) else {
        return xdp_action::XDP_DROP;
    };
    let len = frame.len();
    let Parsed::Tcp(segment) = parse(&frame, &settings.protected_ports) else {
        return finish(settings, Reason::SynCookieFailed, len);
    };
    let now = now_ns();
    if !cookies::check_ack(ctx, &frame, &segment, cookies, now) {
        return finish(settings, Reason::SynCookieFailed, len);
    }
    count(Reason::SynCookieValidated, 0, false);
    let key = settings.tracking_key(&segment.source);
    let budgets = Budgets {
        key: &key,
        slot: sources::find(settings, &key, now),
        opens_connection: true,
        now,
        len,
    };
    let mut reason = judge_budgets(ctx, settings, &segment, budgets);
    if reason == Reason::Passed && cookies::mark_admitted(ctx, &segment).is_err() {
        reason = Reason::SynCookieFailed;
    }
    finish(settings, reason, len)
}

/// Where `wsguard_ingress` tail-calls the cookie programs (set by the agent).
#[map(name = "WSG_COOKIE_PROGS")]
pub static COOKIE_PROGRAMS: ProgramArray = ProgramArray::with_max_entries(2, 0);
const COOKIE_SYN: u32 = wsguard_common::cookie::PROGRAM_SYN;
const COOKIE_CHECK: u32 = wsguard_common::cookie::PROGRAM_CHECK;

/// What the budgets charge, and to whom.
struct Budgets<'a> {
    key: &'a SourceKey,
    /// Where the source's entry is, or would go.
    slot: Option<Slot>,
    opens_connection: bool,
    now: u64,
    len: u64,
}

/// Inspection room, per-source limits, then global limits, for a segment
/// from a source no list or ban decided.
#[inline(always)]
fn judge_budgets(
    ctx: &XdpContext,
    settings: &Settings,
    segment: &TcpSegment,
    budgets: Budgets,
) -> Reason {
    let Budgets {
        key,
        slot,
        opens_connection,
        now,
        len,
    } = budgets;
    // A new connection to an inspected port is refused while inspection
    // has no room for it: it would go unjudged.
    if opens_connection
        && settings.inspected_ports.contains(segment.destination_port)
        && handshake_settings().is_some_and(inspection_full)
    {
        return Reason::InspectFull;
    }
    if let Some(slot) = slot {
        let state = slot.state_or_insert(key, now);
        // SAFETY: a map value pointer, valid for the duration of the program.
        let state = unsafe { &mut *state };
        state.total_packets += 1;
        state.total_bytes += len;
        state.count_second(now, opens_connection, len);
        if let Some(reason) = per_source_limits(settings, opens_connection, key, state, now, len) {
            match reason {
                Reason::ConnectionRate => state.drops_connection_rate += 1,
                Reason::ByteRate => state.drops_byte_rate += 1,
                _ => state.drops_concurrency += 1,
            }
            record_limit_drop(ctx, settings, key, state, now);
            return reason;
        }
    }
    // Per-source limits first, so a flooding source is charged to itself
    // before it can use up the budget shared by everyone.
    global_limits(settings, opens_connection, now, len).unwrap_or(Reason::Passed)
}

#[inline(always)]
fn per_source_limits(
    settings: &Settings,
    opens_connection: bool,
    key: &SourceKey,
    state: &mut SourceState,
    now: u64,
    len: u64,
) -> Option<Reason> {
    if opens_connection {
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

/// The global buckets: this CPU spends its share, and takes the next
/// share from the buckets all CPUs share only when it runs out.
#[inline(always)]
fn global_limits(
    settings: &Settings,
    opens_connection: bool,
    now: u64,
    len: u64,
) -> Option<Reason> {
    let shares = GLOBAL_SHARES.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it.
    let shares = unsafe { &mut *shares };
    let shared = GLOBAL.get_ptr_mut(0)?;
    // SAFETY: array value pointer, shared by all CPUs and updated without a
    // lock: two CPUs taking a share at the same instant can both get it
    // (see the README's "Global limits").
    let shared = unsafe { &mut *shared };
    if opens_connection
        && !take_shared(
            &mut shares.connections,
            &mut shared.connections,
            &settings.global_connections,
            settings.global_connections_share,
            now,
            1,
        )
    {
        return Some(Reason::GlobalConnectionRate);
    }
    if !take_shared(
        &mut shares.bytes,
        &mut shared.bytes,
        &settings.global_bytes,
        settings.global_bytes_share,
        now,
        len,
    ) {
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
        // Every source's "no ban at this epoch" is void now, this one's
        // included, also on a CPU that checks it at this very moment.
        bump_ban_epoch();
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
