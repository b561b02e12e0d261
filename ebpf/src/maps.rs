//! Map definitions. Sizes here are placeholders where the agent sets the real
//! size from the config before loading (`tracking.max_sources`, `max_bans`).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf, SockHash, SockMap, lpm_trie},
};
use wsguard_common::{
    Ban, Counter, HandshakeSettings, ListEntry, ListKey, LpmKey, Reason, Release, Settings,
    SourceKey, SourceSet, Stream, StreamPeers, UserBudget, UserKey, UserState,
    cookie::CookieSettings,
    counters::COUNTER_SLOTS,
    maps::{
        EVENTS_BYTES, GlobalShares, GlobalState, LIST_CAPACITY, STREAM_RECORDS_BYTES,
        USER_BUDGET_SLOTS, list_search, shortcuts,
    },
};

use crate::inspect::DataRecord;

#[map(name = "WSG_SETTINGS")]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Allow and deny lists in use, ban epoch (`wsguard_common::maps::shortcuts`).
#[map(name = "WSG_SHORTCUTS")]
pub static SHORTCUTS: Array<u64> = Array::with_max_entries(shortcuts::SLOTS, 0);

#[map(name = "WSG_ALLOW")]
pub static ALLOW: LpmTrie<LpmKey, ListEntry> = LpmTrie::with_max_entries(LIST_CAPACITY, 0);

#[map(name = "WSG_DENY")]
pub static DENY: LpmTrie<LpmKey, ListEntry> = LpmTrie::with_max_entries(LIST_CAPACITY, 0);

/// The same lists by (prefix length, masked address), probed instead of
/// the tries while a list uses few prefix lengths (`list_search`).
#[map(name = "WSG_ALLOW_EXACT")]
pub static ALLOW_EXACT: HashMap<ListKey, ListEntry> =
    HashMap::with_max_entries(LIST_CAPACITY, BPF_F_NO_PREALLOC);

#[map(name = "WSG_DENY_EXACT")]
pub static DENY_EXACT: HashMap<ListKey, ListEntry> =
    HashMap::with_max_entries(LIST_CAPACITY, BPF_F_NO_PREALLOC);

/// Buckets per source, in sets of `SOURCE_WAYS` (`sources.rs`): when a
/// set is full, its least recently seen source is forgotten (and starts
/// again with a full burst if it comes back).
#[map(name = "WSG_SOURCES")]
// Mappable: the agent reads the per-second counts of every source each
// second (the fleet's limits) from memory rather than a syscall per set.
pub static SOURCES: Array<SourceSet> = Array::with_max_entries(256, BPF_F_MMAPABLE);

/// Entries created in `SOURCES`, per CPU (its fill level for `status` and
/// metrics, read without walking the map).
#[map(name = "WSG_SOURCES_NEW")]
pub static SOURCES_CREATED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Active bans. A plain hash, not LRU, so a flood of new sources cannot evict them.
#[map(name = "WSG_BANS")]
pub static BANS: HashMap<SourceKey, Ban> = HashMap::with_max_entries(1024, BPF_F_NO_PREALLOC);

/// Established connections per source, maintained by the sock_ops program.
#[map(name = "WSG_CONNS")]
pub static CONNECTIONS: HashMap<SourceKey, u64> =
    HashMap::with_max_entries(1024, BPF_F_NO_PREALLOC);

#[map(name = "WSG_GLOBAL")]
pub static GLOBAL: Array<GlobalState> = Array::with_max_entries(1, 0);

/// Each CPU's unspent share of the global buckets.
#[map(name = "WSG_GLOBAL_SHARES")]
pub static GLOBAL_SHARES: PerCpuArray<GlobalShares> = PerCpuArray::with_max_entries(1, 0);

/// Records for the agent (bans started); bounded, so a flood of events
/// loses records (counted) rather than memory.
#[map(name = "WSG_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Sockets of inspected connections, by socket cookie; the stream verdict
/// program is attached to this map. Sized by the agent.
#[map(name = "WSG_INSPECTED")]
pub static INSPECTED: SockHash<u64> = SockHash::with_max_entries(1024, 0);

/// Inspected connections, by socket cookie (kernel-written). Sized by the agent.
#[map(name = "WSG_STREAMS")]
pub static STREAMS: HashMap<u64, Stream> = HashMap::with_max_entries(1024, 0);

/// The agent's verdicts, by socket cookie (agent-written). Sized by the agent.
#[map(name = "WSG_RELEASES")]
pub static RELEASES: HashMap<u64, Release> = HashMap::with_max_entries(1024, 0);

/// Inspected connections open now.
#[map(name = "WSG_INSPECTED_N")]
pub static INSPECTED_COUNT: Array<u64> = Array::with_max_entries(1, 0);

/// Records for the agent's inspection: connections opened, refused and
/// closed, and their stream bytes until the verdict.
#[map(name = "WSG_RECORDS")]
pub static STREAM_RECORDS: RingBuf = RingBuf::with_byte_size(STREAM_RECORDS_BYTES, 0);

/// Where a DATA record is assembled before it is copied to the ring buffer.
#[map(name = "WSG_SCRATCH")]
pub static RECORD_SCRATCH: PerCpuArray<DataRecord> = PerCpuArray::with_max_entries(1, 0);

/// The agent's injection socket, whose sk_msg program puts judged bytes into
/// an inspected socket.
#[map(name = "WSG_INJECTOR")]
pub static INJECTOR: SockMap = SockMap::with_max_entries(1, 0);

/// The socket cookie the agent is injecting into now.
#[map(name = "WSG_INJECT_TO")]
pub static INJECT_TARGET: Array<u64> = Array::with_max_entries(1, 0);

#[map(name = "WSG_HANDSHAKE")]
pub static HANDSHAKE: Array<HandshakeSettings> = Array::with_max_entries(1, 0);

/// SYN-cookie settings and key (agent-written; the key is kept across
/// restarts in the pinned map).
#[map(name = "WSG_SYN_COOKIES")]
pub static SYN_COOKIES: Array<CookieSettings> = Array::with_max_entries(1, 0);

/// Users with a budget or a ban (agent-created; sized by
/// `limits.per_user.max_users`). A plain hash, not LRU: a flood cannot
/// evict a user's budget or ban.
#[map(name = "WSG_USERS")]
pub static USERS: HashMap<UserKey, UserState> = HashMap::with_max_entries(1024, BPF_F_NO_PREALLOC);

/// Connections bound to a user, by both ends (agent-written when it accepts
/// a handshake with a version 2 ticket; removed by sock_ops when the
/// connection closes). Sized like the inspection maps.
#[map(name = "WSG_USER_FLOWS")]
pub static USER_FLOWS: HashMap<StreamPeers, UserKey> = HashMap::with_max_entries(1024, 0);

/// Byte budgets by class index (agent-written on every (re)load).
#[map(name = "WSG_USER_BUDGETS")]
pub static USER_BUDGETS: Array<UserBudget> = Array::with_max_entries(USER_BUDGET_SLOTS, 0);

#[map(name = "WSG_COUNTERS")]
pub static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Hands an event to the agent, counting it as lost when the buffer is full.
#[inline(always)]
pub fn emit(event: &wsguard_common::Event) {
    if EVENTS.output::<wsguard_common::Event>(event, 0).is_err() {
        count(Reason::EventsLost, 0, false);
    }
}

#[inline(always)]
pub fn settings() -> Option<&'static Settings> {
    match SETTINGS.get(0) {
        Some(s) if s.enabled != 0 => Some(s),
        _ => None,
    }
}

/// The SYN-cookie settings, when cookies are on.
#[inline(always)]
pub fn cookie_settings() -> Option<&'static CookieSettings> {
    match SYN_COOKIES.get(0) {
        Some(c) if c.enabled != 0 => Some(c),
        _ => None,
    }
}

#[inline(always)]
pub fn handshake_settings() -> Option<&'static HandshakeSettings> {
    match HANDSHAKE.get(0) {
        Some(h) if h.enabled != 0 => Some(h),
        _ => None,
    }
}

/// Whether new connections to inspected ports are refused now: the agent's
/// table of connections awaiting a verdict is full, or so is inspection.
#[inline(always)]
pub fn inspection_full(handshake: &HandshakeSettings) -> bool {
    if handshake.pending_full != 0 {
        return true;
    }
    matches!(INSPECTED_COUNT.get(0), Some(open) if *open >= handshake.max_connections)
}

/// The LPM trie's key (`prefix_len`, then the address) laid out for word
/// stores: aya's `lpm_trie::Key` is packed, which makes the compiler build
/// it one byte at a time.
#[repr(C, align(8))]
struct WordLpmKey {
    prefix_len: u32,
    address: [u32; 4],
}

/// One list, searched the way its shortcut slot says (`list_search`).
struct List {
    trie: &'static LpmTrie<LpmKey, ListEntry>,
    exact: &'static HashMap<ListKey, ListEntry>,
    search_slot: u32,
}

static ALLOW_LIST: List = List {
    trie: &ALLOW,
    exact: &ALLOW_EXACT,
    search_slot: shortcuts::ALLOW_SEARCH,
};

static DENY_LIST: List = List {
    trie: &DENY,
    exact: &DENY_EXACT,
    search_slot: shortcuts::DENY_SEARCH,
};

/// Longest-prefix match of the full address. A runtime entry past its TTL
/// no longer applies (the agent removes it soon after); it does not fall
/// back to a shorter prefix, which errs towards not matching.
#[inline(always)]
fn list_contains(list: &List, source: &SourceKey, now_ns: u64) -> bool {
    let search = shortcut(list.search_slot);
    if search == list_search::EMPTY {
        return false;
    }
    let entry = if search == list_search::TRIE {
        trie_match(list.trie, source)
    } else {
        exact_match(list.exact, search, source)
    };
    match entry {
        Some(entry) => entry.applies(now_ns),
        None => false,
    }
}

/// The longest entry holding `source`, by one hash probe per prefix length
/// the list uses, longest first.
#[inline(always)]
fn exact_match(
    exact: &'static HashMap<ListKey, ListEntry>,
    search: u64,
    source: &SourceKey,
) -> Option<&'static ListEntry> {
    for i in 0..list_search::MAX_PROBES {
        let prefix_len = list_search::probe(search, i)?;
        // SAFETY: a map value, valid for the duration of the program.
        if let Some(entry) = unsafe { exact.get(&ListKey::of(source, prefix_len)) } {
            return Some(entry);
        }
    }
    None
}

#[inline(always)]
fn trie_match(
    trie: &'static LpmTrie<LpmKey, ListEntry>,
    source: &SourceKey,
) -> Option<&'static ListEntry> {
    // SAFETY: 16 plain bytes either way.
    let address = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(source.addr) };
    let key = WordLpmKey {
        prefix_len: 128,
        address,
    };
    // SAFETY: the same 20 bytes as Key<LpmKey> (packed, so alignment 1);
    // the map reads its key size from the pointer.
    let key = unsafe { &*(&key as *const WordLpmKey).cast::<lpm_trie::Key<LpmKey>>() };
    trie.get(key)
}

/// A shortcut slot (`shortcuts::*`); a missing slot reads as "no shortcut".
#[inline(always)]
pub fn shortcut(slot: u32) -> u64 {
    SHORTCUTS.get(slot).copied().unwrap_or(u64::MAX)
}

/// Allow-list match on the full (unaggregated) address.
#[inline(always)]
pub fn is_allow_listed(source: &SourceKey, now_ns: u64) -> bool {
    list_contains(&ALLOW_LIST, source, now_ns)
}

#[inline(always)]
pub fn is_deny_listed(source: &SourceKey, now_ns: u64) -> bool {
    list_contains(&DENY_LIST, source, now_ns)
}

/// The ban epoch now (0: the shortcut is off).
#[inline(always)]
pub fn ban_epoch() -> u64 {
    match SHORTCUTS.get(shortcuts::BAN_EPOCH) {
        Some(epoch) => *epoch,
        None => 0,
    }
}

/// Moves the ban epoch on after the kernel wrote a ban (an atomic add, so
/// no CPU's bump is lost; user space's own bumps only ever change it too).
#[inline(always)]
pub fn bump_ban_epoch() {
    if let Some(epoch) = SHORTCUTS.get_ptr_mut(shortcuts::BAN_EPOCH) {
        // SAFETY: an array value pointer; BPF atomic add.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(epoch, 1) };
    }
}

/// CLOCK_MONOTONIC at the last timer tick (1–10 ms behind the precise
/// clock, by the kernel's HZ), the clock user space reads to show ban
/// expiry: for the programs other than `wsguard_ingress`, whose own clock
/// (`clock::now_ns`) costs no helper call.
#[inline(always)]
pub fn now_ns() -> u64 {
    unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() }
}

/// Counts a packet (or an event) under `reason`, in the dry-run set when the
/// verdict was only counted.
#[inline(always)]
pub fn count(reason: Reason, bytes: u64, dry_run: bool) {
    if let Some(c) = COUNTERS.get_ptr_mut(reason.slot(dry_run)) {
        // Per-CPU slot: no other CPU writes it.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}
