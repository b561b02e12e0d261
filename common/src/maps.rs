//! Map names and the values stored in them.

use crate::{BucketParams, SourceKey, TokenBucket, assert_size};

/// Names of the maps, as declared by the kernel programs.
pub mod names {
    pub const SETTINGS: &str = "WSG_SETTINGS";
    /// What lets the XDP program skip a lookup (see [`super::shortcuts`]).
    pub const SHORTCUTS: &str = "WSG_SHORTCUTS";
    pub const ALLOW: &str = "WSG_ALLOW";
    pub const DENY: &str = "WSG_DENY";
    pub const ALLOW_EXACT: &str = "WSG_ALLOW_EXACT";
    pub const DENY_EXACT: &str = "WSG_DENY_EXACT";
    pub const SOURCES: &str = "WSG_SOURCES";
    /// Entries the kernel created in `WSG_SOURCES`, per CPU (PERCPU_ARRAY,
    /// one `u64`): its fill level without a walk of the map.
    pub const SOURCES_CREATED: &str = "WSG_SOURCES_NEW";
    pub const BANS: &str = "WSG_BANS";
    pub const CONNECTIONS: &str = "WSG_CONNS";
    pub const GLOBAL: &str = "WSG_GLOBAL";
    /// Each CPU's share of the global buckets (PERCPU_ARRAY).
    pub const GLOBAL_SHARES: &str = "WSG_GLOBAL_SHARES";
    pub const COUNTERS: &str = "WSG_COUNTERS";
    pub const EVENTS: &str = "WSG_EVENTS";
    pub const HANDSHAKE: &str = "WSG_HANDSHAKE";
    /// Sockets of inspected connections (SOCKHASH by cookie).
    pub const INSPECTED: &str = "WSG_INSPECTED";
    pub const STREAMS: &str = "WSG_STREAMS";
    pub const RELEASES: &str = "WSG_RELEASES";
    pub const STREAM_RECORDS: &str = "WSG_RECORDS";
    /// Inspected connections open now (one u64, kept by sock_ops).
    pub const INSPECTED_COUNT: &str = "WSG_INSPECTED_N";
    /// The agent's injection socket (SOCKMAP, one slot).
    pub const INJECTOR: &str = "WSG_INJECTOR";
    /// The cookie of the connection the agent is putting bytes into.
    pub const INJECT_TARGET: &str = "WSG_INJECT_TO";
    /// SYN-cookie settings and key (one [`crate::cookie::CookieSettings`]).
    pub const SYN_COOKIES: &str = "WSG_SYN_COOKIES";
    /// The SYN-cookie programs the XDP program tail-calls (PROG_ARRAY).
    pub const COOKIE_PROGRAMS: &str = "WSG_COOKIE_PROGS";
    /// Users with a budget or a ban ([`super::UserState`] by [`super::UserKey`]).
    pub const USERS: &str = "WSG_USERS";
    /// Connections bound to a user ([`super::StreamPeers`] to [`super::UserKey`]).
    pub const USER_FLOWS: &str = "WSG_USER_FLOWS";
    /// Byte budgets by class index ([`super::UserBudget`]; 0 is `[limits.per_user]`).
    pub const USER_BUDGETS: &str = "WSG_USER_BUDGETS";
    /// One [`super::ClockSample`], written by the clock program.
    pub const CLOCK: &str = "WSG_CLOCK";
}

/// Names of the programs.
pub mod programs {
    pub const INGRESS: &str = "wsguard_ingress";
    pub const CONNECTION_TRACKER: &str = "wsguard_connections";
    /// sk_skb stream verdict on inspected sockets: hands their bytes to the
    /// agent until the verdict.
    pub const STREAM_VERDICT: &str = "wsguard_stream";
    /// sk_msg on the agent's injection socket: puts judged bytes into an
    /// inspected socket's receive queue.
    pub const INJECT: &str = "wsguard_inject";
    /// XDP, tail-called: answers a SYN with a SYN cookie.
    pub const COOKIE_SYN: &str = "wsguard_cookie_syn";
    /// XDP, tail-called: checks the cookie a segment of no connection returns.
    pub const COOKIE_CHECK: &str = "wsguard_cookie_check";
    /// TC ingress: hands a connection whose cookie XDP validated to the
    /// TCP stack as a request socket (`bpf_sk_assign_tcp_reqsk`).
    pub const COOKIE_ACK: &str = "wsguard_cookie_ack";
    /// XDP_PASS and nothing else: the benchmarks' floor, never attached.
    pub const FLOOR: &str = "wsguard_floor";
    /// XDP, never attached: reads the kernel's tick count and coarse clock
    /// together, for the agent to set the XDP program's clock
    /// ([`super::Settings::clock`]); run through BPF_PROG_TEST_RUN.
    pub const CLOCK: &str = "wsguard_clock";
}

/// Slots of `WSG_SHORTCUTS`, one `u64` each, written by user space (the
/// agent and the CLI) and read by the XDP program to skip lookups that
/// cannot match. Each slot is written on its own, so two writers never
/// overwrite each other's slot.
pub mod shortcuts {
    /// How the XDP program searches the allow list ([`super::list_search`]):
    /// not at all while it is empty, by one hash probe per prefix length
    /// while it holds few lengths, else its LPM trie. Written by every
    /// writer of the list after its change, from what the list holds.
    pub const ALLOW_SEARCH: u32 = 0;
    /// The same for the deny list.
    pub const DENY_SEARCH: u32 = 1;
    /// Changed after every ban written or lifted: by user space after its
    /// insert or delete, by the kernel with an atomic add after its own
    /// insert. A source entry whose `ban_epoch` equals it read the ban map
    /// at that epoch (`banned_until_ns`), so its ban lookup is skipped; 0
    /// turns the shortcut off. (The kernel's own removal of an expired ban
    /// needs no change: what an entry cached has expired too.)
    pub const BAN_EPOCH: u32 = 2;
    /// Non-zero while some connection may be bound to a user: 0 lets the
    /// program skip the `WSG_USER_FLOWS` lookup. Set by the agent before it
    /// binds the first connection; never cleared while it runs.
    pub const USERS_BOUND: u32 = 3;
    pub const SLOTS: u32 = 4;
}
/// How the XDP program searches a list (`shortcuts::ALLOW_SEARCH`, …).
///
/// Each list is held twice, with the same entries: in an LPM trie, and in
/// a hash of (prefix length, masked address) (`WSG_ALLOW_EXACT`, …). A
/// trie lookup walks nodes (a cache miss each in a large list); a hash
/// probe costs the same whatever the list's size. So while a list uses at
/// most [`MAX_PROBES`](list_search::MAX_PROBES) prefix lengths, the program
/// probes the hash once per length, longest first, and the first entry it
/// finds is the longest match, as the trie's would be.
pub mod list_search {
    /// The list is empty: nothing to search.
    pub const EMPTY: u64 = 0;
    /// The list uses more prefix lengths than the probes: search the trie.
    pub const TRIE: u64 = u64::MAX;
    /// The most prefix lengths searched by hash probes.
    pub const MAX_PROBES: usize = 3;

    /// The search for a list whose entries use `lengths` (prefix lengths in
    /// the 128-bit key space; any order, repeats allowed).
    pub fn encode(lengths: impl IntoIterator<Item = u32>) -> u64 {
        let mut distinct = [0u32; MAX_PROBES];
        let mut count = 0;
        for length in lengths {
            if distinct[..count].contains(&length) {
                continue;
            }
            if count == MAX_PROBES {
                return TRIE;
            }
            distinct[count] = length;
            count += 1;
        }
        let distinct = &mut distinct[..count];
        distinct.sort_unstable_by(|a, b| b.cmp(a));
        // One byte per probe, longest first: the length plus one (so that
        // a /0 entry is a probe too), then zeros.
        distinct
            .iter()
            .enumerate()
            .fold(EMPTY, |search, (i, &length)| {
                search | u64::from(length.min(128) + 1) << (8 * i)
            })
    }

    /// The prefix length of probe `i`, if the search has one.
    #[inline(always)]
    pub fn probe(search: u64, i: usize) -> Option<u32> {
        let byte = (search >> (8 * i)) as u8;
        (byte != 0).then(|| u32::from(byte) - 1)
    }
}

/// Key of the allow and deny hashes (`WSG_ALLOW_EXACT`, …): a prefix
/// length in the 128-bit key space and the address masked to it.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListKey {
    pub prefix_len: u32,
    pub _pad: u32,
    pub addr: crate::SourceKey,
}
assert_size!(ListKey, 24);

impl ListKey {
    /// The key of the `prefix_len` prefix holding `source`.
    #[inline(always)]
    pub fn of(source: &crate::SourceKey, prefix_len: u32) -> ListKey {
        ListKey {
            prefix_len,
            _pad: 0,
            addr: source.masked(&crate::source::prefix_mask(prefix_len)),
        }
    }
}

/// Capacity of each CIDR list. Entries are allocated as they are used; a
/// list's hash allocates its buckets whole (16 bytes each: 4 MiB).
pub const LIST_CAPACITY: u32 = 1 << 18;

/// Value of an allow or deny list entry: where it came from and, for an
/// entry added at run time with a TTL, when it expires.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListEntry {
    /// Bit set of [`ListEntry::FROM_CONFIG`] and [`ListEntry::FROM_RUNTIME`].
    pub origin: u32,
    pub _pad: u32,
    /// CLOCK_MONOTONIC ns after which a runtime-only entry no longer applies; 0 = never.
    pub expires_ns: u64,
}
assert_size!(ListEntry, 16);

impl ListEntry {
    pub const FROM_CONFIG: u32 = 1;
    pub const FROM_RUNTIME: u32 = 2;

    /// Whether the entry applies at `now_ns`: config entries always do,
    /// runtime entries until they expire.
    #[inline(always)]
    pub fn applies(&self, now_ns: u64) -> bool {
        self.origin & Self::FROM_CONFIG != 0 || self.expires_ns == 0 || now_ns < self.expires_ns
    }
}

/// Key of the allow and deny LPM tries: a prefix of the 16-byte key space
/// (IPv4 prefixes are offset by 96 bits into `::ffff:0:0/96`).
pub type LpmKey = [u8; 16];

/// A set of TCP ports, one bit each: a membership test is one load.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PortSet {
    pub bits: [u64; 1024],
}
assert_size!(PortSet, 8192);

impl PortSet {
    pub const EMPTY: PortSet = PortSet { bits: [0; 1024] };

    #[inline(always)]
    pub fn contains(&self, port: u16) -> bool {
        // port >> 6 < 1024: no bounds check survives.
        (self.bits[(port >> 6) as usize] >> (port & 63)) & 1 != 0
    }

    pub fn insert(&mut self, port: u16) {
        self.bits[(port >> 6) as usize] |= 1 << (port & 63);
    }

    pub fn of(ports: impl IntoIterator<Item = u16>) -> PortSet {
        let mut set = PortSet::EMPTY;
        for port in ports {
            set.insert(port);
        }
        set
    }
}

impl Default for PortSet {
    fn default() -> PortSet {
        PortSet::EMPTY
    }
}

impl core::fmt::Debug for PortSet {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_set()
            .entries((0..=u16::MAX).filter(|p| self.contains(*p)))
            .finish()
    }
}

/// Everything the kernel programs need from the configuration, in one array
/// slot that user space rewrites on (re)load: the XDP program reads it once
/// per packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Non-zero once user space has written the settings; until then every
    /// program passes everything.
    pub enabled: u32,
    /// Concurrent established connections allowed per source; 0 = no limit.
    pub max_concurrent: u32,
    /// Masks applied to a source address before it is used as a key (the
    /// 16 bytes as two native-order words, see `source::prefix_mask`).
    pub ipv4_mask: [u64; 2],
    pub ipv6_mask: [u64; 2],
    pub source_connections: BucketParams,
    pub source_bytes: BucketParams,
    pub global_connections: BucketParams,
    pub global_bytes: BucketParams,
    /// Drops within `ban_window_ns` that earn a ban; 0 = bans off.
    pub ban_after_drops: u32,
    /// Rule families in dry-run ([`Settings::DRY_RUN_LIMITS`], …): their
    /// drops are counted as would-drop and the packet passes.
    pub dry_run: u32,
    pub ban_window_ns: u64,
    pub ban_duration_ns: u64,
    /// Non-zero when SYN cookies are on (the key and options are in
    /// `WSG_SYN_COOKIES`, which the cookie programs read).
    pub syn_cookies: u32,
    /// Sets in `WSG_SOURCES` (its max_entries; set when the settings are
    /// written).
    pub source_sets: u32,
    /// Scaled units a CPU takes from the shared global buckets at a time
    /// (`BucketParams::share`, for the machine's CPUs; set when the
    /// settings are written).
    pub global_connections_share: u64,
    pub global_bytes_share: u64,
    /// Key of the hash that picks a source's set in `WSG_SOURCES`
    /// ([`crate::SourceKey::set_index`]): random, and kept for as long as
    /// the pinned settings are, so a restart finds every source again.
    pub source_hash_key: [u64; 2],
    /// The XDP program's clock (set when the settings are written).
    pub clock: TickClock,
    /// The protected ports (`protect.ports`).
    pub protected_ports: PortSet,
    /// The ports whose handshakes are inspected (`handshake.ports`).
    pub inspected_ports: PortSet,
}
assert_size!(
    Settings,
    8 + 32 + 4 * 32 + 8 + 16 + 8 + 16 + 16 + 16 + 2 * 8192
);

impl Settings {
    /// Limits, concurrency, and the bans they earn.
    pub const DRY_RUN_LIMITS: u32 = 1;
    /// Allow/deny lists.
    pub const DRY_RUN_LISTS: u32 = 2;
    /// Malformed-packet drops.
    pub const DRY_RUN_MALFORMED: u32 = 4;
    /// Handshake verdicts (rejected flows, refused connections).
    pub const DRY_RUN_HANDSHAKE: u32 = 8;
    /// Everything (`agent.dry_run`).
    pub const DRY_RUN_ALL: u32 = 0xff;

    /// Whether a drop for `reason` is only counted, under the dry-run flags.
    #[inline(always)]
    pub fn is_dry_run(&self, reason: crate::Reason) -> bool {
        use crate::Reason::*;
        let family = match reason {
            DenyList => Self::DRY_RUN_LISTS,
            Malformed => Self::DRY_RUN_MALFORMED,
            FlowRejected | InspectFull => Self::DRY_RUN_HANDSHAKE,
            _ => Self::DRY_RUN_LIMITS,
        };
        self.dry_run & family != 0
    }

    /// The key a source is tracked under: its address aggregated to the
    /// configured IPv4 or IPv6 prefix.
    #[inline(always)]
    pub fn tracking_key(&self, source: &crate::SourceKey) -> crate::SourceKey {
        if source.is_v4() {
            source.masked(&self.ipv4_mask)
        } else {
            source.masked(&self.ipv6_mask)
        }
    }
}

/// CLOCK_MONOTONIC as the XDP program reads it on every packet: the
/// kernel's tick count (`bpf_jiffies64`, which the verifier turns into one
/// load) times the tick's length, plus an offset the agent measures. That
/// is the coarse monotonic clock (CLOCK_MONOTONIC at the last tick) to
/// within a tick, without the cost of a helper call. `tick_ns == 0`
/// (never set) reads `bpf_ktime_get_coarse_ns` instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TickClock {
    pub tick_ns: u64,
    /// Added with wrapping arithmetic (it is negative in effect: the tick
    /// count does not start at 0 at boot).
    pub offset_ns: u64,
}
assert_size!(TickClock, 16);

impl TickClock {
    /// The clock that maps `sample` onto CLOCK_MONOTONIC, for ticks of
    /// `tick_ns`.
    pub fn from_sample(sample: &ClockSample, tick_ns: u64) -> TickClock {
        TickClock {
            tick_ns,
            offset_ns: sample
                .coarse_ns
                .wrapping_sub(sample.jiffies.wrapping_mul(tick_ns)),
        }
    }

    #[inline(always)]
    pub fn at(&self, jiffies: u64) -> u64 {
        jiffies
            .wrapping_mul(self.tick_ns)
            .wrapping_add(self.offset_ns)
    }
}

/// The tick count and the coarse clock read together by the clock program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockSample {
    pub jiffies: u64,
    pub coarse_ns: u64,
}
assert_size!(ClockSample, 16);

/// Ways in each set of the per-source table (`WSG_SOURCES`): a source
/// lives in one of the `SOURCE_WAYS` ways of the set its key hashes to.
pub const SOURCE_WAYS: usize = 4;

/// One set of the per-source table, an ARRAY map of `SourceSet`s that the
/// XDP program manages itself: a lookup is one inlined array access, a
/// hash of two words and up to four key compares, where an LRU hash map
/// costs a helper call, a jhash and a memcmp. A new source takes an empty
/// way, or else the way least recently seen (an earned ban is in
/// `WSG_BANS`, which nothing evicts).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceSet {
    /// The ways' tracking keys, side by side: one cache line to search.
    pub keys: [SourceKey; SOURCE_WAYS],
    /// When each way was last seen (the kernel's coarse CLOCK_MONOTONIC);
    /// 0 = empty.
    pub seen_ns: [u64; SOURCE_WAYS],
    pub states: [SourceState; SOURCE_WAYS],
}
assert_size!(SourceSet, 64 + 32 + 4 * 128);

impl SourceSet {
    /// The sources this set holds.
    pub fn sources(&self) -> impl Iterator<Item = (SourceKey, SourceState)> + '_ {
        (0..SOURCE_WAYS)
            .filter(|&way| self.seen_ns[way] != 0)
            .map(|way| (self.keys[way], self.states[way]))
    }
}

/// Sets for a table that holds at least `sources` sources.
pub const fn source_sets(sources: u32) -> u32 {
    sources.div_ceil(SOURCE_WAYS as u32)
}

/// Per-source state, kept in a way of a [`SourceSet`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceState {
    pub connections: TokenBucket,
    pub bytes: TokenBucket,
    /// Start of the current ban-counting window.
    pub window_start_ns: u64,
    /// Limit drops seen in the current window.
    pub window_drops: u32,
    /// The second (of 2^30 ns, about 1.07 s, by the XDP program's clock)
    /// that `second_*` count; `previous_*` count the one before, which the
    /// agent reads for the fleet's limits ([`SourceState::last_second`]).
    pub second: u32,
    pub second_connections: u32,
    pub previous_connections: u32,
    pub second_bytes: u64,
    pub previous_bytes: u64,
    /// Totals for `wsguard top` (updated without atomics: approximate when
    /// several CPUs serve one source at once).
    pub total_packets: u64,
    pub total_bytes: u64,
    pub drops_connection_rate: u64,
    pub drops_byte_rate: u64,
    pub drops_concurrency: u64,
    /// The ban epoch (`WSG_SHORTCUTS`) at which the XDP program last read
    /// the ban map for this source, and the ban it found there (0: none):
    /// while the epoch is unchanged, the program skips the ban lookup.
    /// 0 = not read yet.
    pub ban_epoch: u64,
    pub banned_until_ns: u64,
}
assert_size!(SourceState, 128);

/// Nanoseconds in a "second" of the per-second counts: 2^30, so that the
/// kernel finds the second with a shift.
pub const COUNT_SECOND_SHIFT: u32 = 30;

impl SourceState {
    /// Counts a segment (a new connection, or not) in the current second.
    #[inline(always)]
    pub fn count_second(&mut self, now_ns: u64, opens_connection: bool, bytes: u64) {
        let second = (now_ns >> COUNT_SECOND_SHIFT) as u32;
        if second != self.second {
            let just_before = second == self.second.wrapping_add(1);
            self.previous_connections = if just_before {
                self.second_connections
            } else {
                0
            };
            self.previous_bytes = if just_before { self.second_bytes } else { 0 };
            self.second_connections = 0;
            self.second_bytes = 0;
            self.second = second;
        }
        self.second_connections = self
            .second_connections
            .saturating_add(u32::from(opens_connection));
        self.second_bytes = self.second_bytes.saturating_add(bytes);
    }

    /// New connections and bytes in the last complete second at `now_ns`.
    pub fn last_second(&self, now_ns: u64) -> (u32, u64) {
        let second = (now_ns >> COUNT_SECOND_SHIFT) as u32;
        if self.second == second {
            (self.previous_connections, self.previous_bytes)
        } else if self.second.wrapping_add(1) == second {
            (self.second_connections, self.second_bytes)
        } else {
            (0, 0)
        }
    }
}

/// An active ban. Expiry is enforced by the kernel on lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ban {
    pub since_ns: u64,
    pub until_ns: u64,
}
assert_size!(Ban, 16);

/// A record the kernel hands to the agent through the events ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// One of the `Event::*` kinds.
    pub kind: u32,
    /// Non-zero when dry run only counted it (a ban not imposed).
    pub dry_run: u32,
    pub source: SourceKey,
    pub until_ns: u64,
}
assert_size!(Event, 32);

impl Event {
    pub const BAN_STARTED: u32 = 1;
}

/// An inspected connection as the kernel tracks it, keyed by its socket
/// cookie in `WSG_STREAMS`. Written by the kernel programs only: sock_ops
/// creates it when the connection is established and removes it when it
/// closes; the stream verdict program counts the bytes it hands over.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stream {
    /// Stream bytes handed to the agent so far (the offset of the next byte).
    pub handed: u64,
    /// When the connection was established (CLOCK_MONOTONIC ns).
    pub opened_ns: u64,
    pub peers: StreamPeers,
    /// Non-zero once a byte could not be handed over: the stream the agent
    /// holds has a hole, so the connection can only be cut.
    pub lost: u16,
    /// Non-zero once the agent's release covered everything handed over:
    /// from then on bytes pass without a look at `WSG_RELEASES` (a verdict
    /// is never taken back once it released the stream).
    pub passing: u16,
    /// Non-zero when the connection also counts towards the concurrency limit.
    pub counted: u32,
}
assert_size!(Stream, 16 + 40 + 8);

/// Both ends of an inspected connection, addresses in the 16-byte key space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StreamPeers {
    pub client: [u8; 16],
    pub server: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
    pub _pad: u32,
}
assert_size!(StreamPeers, 40);

/// The agent's verdict on an inspected connection, keyed by socket cookie
/// in `WSG_RELEASES`. Written by the agent only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Release {
    /// [`Release::ACCEPTED`] or [`Release::REJECTED`].
    pub state: u32,
    pub _pad: u32,
    /// With `ACCEPTED`: the stream bytes the agent has put into the socket.
    /// The kernel passes new bytes straight to the application only while
    /// everything it handed over has been put back (`handed == upto`), so
    /// no byte overtakes an earlier one.
    pub upto: u64,
}
assert_size!(Release, 16);

impl Release {
    pub const ACCEPTED: u32 = 1;
    pub const REJECTED: u32 = 2;
}

/// Header of a record in the inspection ring buffer (`WSG_STREAM_RECORDS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordHeader {
    /// One of the `RecordHeader::*` kinds.
    pub kind: u32,
    /// Bytes of stream data after the header (`DATA`).
    pub len: u32,
    /// The connection's socket cookie.
    pub cookie: u64,
    /// Offset of the first data byte in the stream (`DATA`).
    pub offset: u64,
}
assert_size!(RecordHeader, 24);

impl RecordHeader {
    /// A connection entered inspection; [`StreamPeers`] follow.
    pub const OPENED: u32 = 1;
    /// Stream bytes follow.
    pub const DATA: u32 = 2;
    /// An inspected connection closed.
    pub const CLOSED: u32 = 3;
    /// A connection to an inspected port that could not be inspected (a
    /// map was full); [`StreamPeers`] follow. The agent cuts it.
    pub const REFUSED: u32 = 4;
    /// From XDP: a user (its key in `cookie`) stayed over its byte budget
    /// past its class's `over_budget_timeout`, or a banned user's
    /// connection sent bytes. The agent cuts the user's connections.
    pub const USER: u32 = 5;
}

/// Stream bytes per DATA record.
pub const RECORD_DATA_BYTES: usize = 2048;
/// DATA records one segment may take; a longer segment of a connection
/// awaiting its verdict is never legitimate for a request head (and marks
/// the stream lost).
pub const RECORDS_PER_SEGMENT: usize = 32;
/// Size of the inspection ring buffer.
pub const STREAM_RECORDS_BYTES: u32 = 8 * 1024 * 1024;

/// Handshake inspection settings the kernel programs read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandshakeSettings {
    /// Non-zero when inspection is on (some port is inspected).
    pub enabled: u32,
    /// Non-zero while the agent's table of connections awaiting a verdict is
    /// full: new connections to inspected ports are refused.
    pub pending_full: u32,
    /// Inspected connections open at once; beyond it new connections to
    /// inspected ports are refused.
    pub max_connections: u64,
    /// The agent's network namespace (its cookie): only servers there are
    /// inspected by this agent; another agent may own another namespace.
    pub netns_cookie: u64,
}
assert_size!(HandshakeSettings, 24);

/// Size of the events ring buffer (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Global buckets, shared by all non-allow-listed sources and all CPUs
/// (one array slot). CPUs take from them a share at a time
/// ([`GlobalShares`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalState {
    pub connections: TokenBucket,
    pub bytes: TokenBucket,
}
assert_size!(GlobalState, 32);

/// One CPU's unspent share of the global buckets, in scaled units (a
/// per-CPU slot: only its CPU writes it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalShares {
    pub connections: u64,
    pub bytes: u64,
}
assert_size!(GlobalShares, 16);

/// A user's key in `WSG_USERS`: the first 8 bytes of
/// SHA-256(`"wsguard-user\0"` ‖ user id), little-endian (see the agent's
/// `users` module). Ids are signed into tickets by the application, so a
/// collision needs 2^32 users; the entry holds the id, which is compared.
pub type UserKey = u64;

/// Longest user id (bytes of UTF-8) and class name a ticket may carry.
pub const USER_ID_BYTES: usize = 64;
pub const USER_CLASS_BYTES: usize = 32;

/// Byte budget of a class of users, in `WSG_USER_BUDGETS` by class index.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserBudget {
    pub bytes: BucketParams,
    /// How long a user may stay over `bytes` before the kernel tells the
    /// agent (a USER record), which cuts the user's connections.
    pub over_budget_timeout_ns: u64,
}
assert_size!(UserBudget, 40);

/// Classes a config may name (index 0 is `[limits.per_user]` itself).
pub const USER_BUDGET_SLOTS: u32 = 64;

/// A user's state, keyed by [`UserKey`] in `WSG_USERS` (a plain hash, so a
/// flood cannot evict a user with a live budget or ban). The agent creates
/// the entry when it binds the user's first connection (or bans the user),
/// and removes it once the user has no connection, no ban and a full
/// bucket; the XDP program charges the bytes of every bound connection to
/// it and keeps the over-budget clock.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserState {
    /// Bytes of all the user's connections, whatever their address.
    pub bytes: TokenBucket,
    /// Index into `WSG_USER_BUDGETS` (agent-written).
    pub class: u32,
    /// Non-zero once the kernel told the agent (a USER record) of this
    /// spell over budget, or of the ban: it tells once; a new spell, or the
    /// agent's cut, clears it.
    pub signalled: u32,
    /// Since when the user has been over budget: from a drop until its
    /// bucket holds a quarter of its burst again; 0 = within budget.
    pub over_since_ns: u64,
    /// The last drop for this user's budget.
    pub last_drop_ns: u64,
    /// CLOCK_MONOTONIC ns until which the user's tickets are refused and
    /// its bound connections' bytes dropped; 0 = not banned.
    pub banned_until_ns: u64,
    /// Totals (updated without atomics: approximate when several CPUs serve
    /// one user at once).
    pub total_bytes: u64,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
    pub id_len: u32,
    pub class_len: u32,
    pub id: [u8; USER_ID_BYTES],
    pub class_name: [u8; USER_CLASS_BYTES],
}
assert_size!(
    UserState,
    16 + 8 + 6 * 8 + 8 + USER_ID_BYTES + USER_CLASS_BYTES
);

impl Default for UserState {
    fn default() -> UserState {
        UserState {
            bytes: TokenBucket::default(),
            class: 0,
            signalled: 0,
            over_since_ns: 0,
            last_drop_ns: 0,
            banned_until_ns: 0,
            total_bytes: 0,
            dropped_packets: 0,
            dropped_bytes: 0,
            id_len: 0,
            class_len: 0,
            id: [0; USER_ID_BYTES],
            class_name: [0; USER_CLASS_BYTES],
        }
    }
}

impl UserState {
    /// The user is back within budget once its bucket holds this share of
    /// its burst again (1/4): a sender held back by its budget keeps the
    /// bucket near empty, whatever its TCP does to the rate.
    pub const WITHIN_BUDGET_SHARE: u64 = 4;

    /// Records a drop for the budget at `now`: the first starts a spell
    /// over budget.
    #[inline(always)]
    pub fn record_drop(&mut self, now_ns: u64, len: u64) {
        if self.over_since_ns == 0 {
            self.over_since_ns = now_ns;
            self.signalled = 0;
        }
        self.last_drop_ns = now_ns;
        self.dropped_packets += 1;
        self.dropped_bytes += len;
    }

    /// Records bytes the budget took: a bucket refilled to a quarter of
    /// its burst ends the spell over budget.
    #[inline(always)]
    pub fn record_pass(&mut self, budget: &BucketParams) {
        if self.over_since_ns != 0
            && self.bytes.tokens >= budget.capacity / Self::WITHIN_BUDGET_SHARE
        {
            self.over_since_ns = 0;
        }
    }

    /// How long the user has been over budget at `now` (0: within budget,
    /// or its bucket has refilled to a quarter of its burst since).
    pub fn over_budget_ns(&self, budget: &BucketParams, now_ns: u64) -> u64 {
        if self.over_since_ns == 0
            || self.bytes.level(budget, now_ns) >= budget.capacity / Self::WITHIN_BUDGET_SHARE
        {
            return 0;
        }
        now_ns.saturating_sub(self.over_since_ns)
    }

    pub fn is_banned(&self, now_ns: u64) -> bool {
        now_ns < self.banned_until_ns
    }
}

/// Version of the map layout above; pins live under `<pin_path>/v<LAYOUT_VERSION>`
/// so that a new layout never reads maps pinned by an older one.
pub const LAYOUT_VERSION: u32 = 7;

/// Per-CPU scratch space the kernel programs alone use (a record being
/// assembled, a TCP option walk, the way of the per-source table chosen); user space never opens these.
pub const KERNEL_ONLY_MAPS: [&str; 3] = ["WSG_SCRATCH", "WSG_TCP_OPTIONS", "WSG_SOURCE_WAY"];

/// Maps that count the entries of another: (counter, counted). The
/// counter starts again whenever the counted map is created anew.
pub const ENTRY_COUNTERS: [(&str, &str); 1] = [(names::SOURCES_CREATED, names::SOURCES)];

/// How many entries a map holds: a fixed number, or a size the config sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capacity {
    Fixed(u32),
    /// `tracking.max_sources`.
    Sources,
    /// Sets of [`SOURCE_WAYS`] for `tracking.max_sources` ([`source_sets`]).
    SourceSets,
    /// `tracking.max_bans`.
    Bans,
    /// Twice `handshake.max_connections` (see the agent's
    /// `inspected_capacity`).
    Inspected,
    /// `limits.per_user.max_users`.
    Users,
}

/// What user space must know about one map: its name, key and value sizes,
/// capacity, and whether it is pinned (its state outlives the agent).
#[derive(Clone, Copy, Debug)]
pub struct MapFact {
    pub name: &'static str,
    pub key_size: u32,
    pub value_size: u32,
    pub capacity: Capacity,
    pub pinned: bool,
}

const fn fact(
    name: &'static str,
    key_size: usize,
    value_size: usize,
    capacity: Capacity,
) -> MapFact {
    MapFact {
        name,
        key_size: key_size as u32,
        value_size: value_size as u32,
        capacity,
        pinned: true,
    }
}

const LPM_KEY: usize = 4 + 16;
const SOURCE_KEY: usize = size_of::<crate::SourceKey>();

/// Every map of the kernel programs. The agent sizes and checks pins with
/// it; a test compares it with the compiled object.
pub const MAP_FACTS: [MapFact; 28] = {
    use Capacity::*;
    [
        fact(names::SETTINGS, 4, size_of::<Settings>(), Fixed(1)),
        fact(names::SHORTCUTS, 4, 8, Fixed(shortcuts::SLOTS)),
        fact(
            names::ALLOW,
            LPM_KEY,
            size_of::<ListEntry>(),
            Fixed(LIST_CAPACITY),
        ),
        fact(
            names::DENY,
            LPM_KEY,
            size_of::<ListEntry>(),
            Fixed(LIST_CAPACITY),
        ),
        fact(
            names::ALLOW_EXACT,
            size_of::<ListKey>(),
            size_of::<ListEntry>(),
            Fixed(LIST_CAPACITY),
        ),
        fact(
            names::DENY_EXACT,
            size_of::<ListKey>(),
            size_of::<ListEntry>(),
            Fixed(LIST_CAPACITY),
        ),
        fact(names::SOURCES, 4, size_of::<SourceSet>(), SourceSets),
        fact(names::CLOCK, 4, size_of::<ClockSample>(), Fixed(1)),
        fact(names::SOURCES_CREATED, 4, 8, Fixed(1)),
        fact(names::BANS, SOURCE_KEY, size_of::<crate::Ban>(), Bans),
        fact(names::CONNECTIONS, SOURCE_KEY, 8, Sources),
        fact(names::GLOBAL, 4, size_of::<GlobalState>(), Fixed(1)),
        fact(names::GLOBAL_SHARES, 4, size_of::<GlobalShares>(), Fixed(1)),
        fact(
            names::COUNTERS,
            4,
            size_of::<crate::Counter>(),
            Fixed(crate::counters::COUNTER_SLOTS),
        ),
        fact(names::EVENTS, 0, 0, Fixed(EVENTS_BYTES)),
        fact(names::INSPECTED, 8, 4, Inspected),
        fact(names::STREAMS, 8, size_of::<Stream>(), Inspected),
        fact(names::RELEASES, 8, size_of::<Release>(), Inspected),
        fact(names::INSPECTED_COUNT, 4, 8, Fixed(1)),
        fact(names::STREAM_RECORDS, 0, 0, Fixed(STREAM_RECORDS_BYTES)),
        fact(
            names::HANDSHAKE,
            4,
            size_of::<HandshakeSettings>(),
            Fixed(1),
        ),
        // Pinned so that its entries outlive the agent with the XDP link (a
        // program array is emptied when no one holds it).
        fact(names::COOKIE_PROGRAMS, 4, 4, Fixed(2)),
        fact(
            names::SYN_COOKIES,
            4,
            size_of::<crate::cookie::CookieSettings>(),
            Fixed(1),
        ),
        fact(
            names::USERS,
            size_of::<UserKey>(),
            size_of::<UserState>(),
            Users,
        ),
        fact(
            names::USER_FLOWS,
            size_of::<StreamPeers>(),
            size_of::<UserKey>(),
            Inspected,
        ),
        fact(
            names::USER_BUDGETS,
            4,
            size_of::<UserBudget>(),
            Fixed(USER_BUDGET_SLOTS),
        ),
        // The agent's own injection socket and target: nothing to keep.
        MapFact {
            pinned: false,
            ..fact(names::INJECTOR, 4, 4, Fixed(1))
        },
        MapFact {
            pinned: false,
            ..fact(names::INJECT_TARGET, 4, 8, Fixed(1))
        },
    ]
};

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::list_search::{self, EMPTY, MAX_PROBES, TRIE};

    fn probes(search: u64) -> Vec<u32> {
        (0..MAX_PROBES)
            .map_while(|i| list_search::probe(search, i))
            .collect()
    }

    #[test]
    fn a_list_search_probes_each_length_once_longest_first() {
        assert_eq!(list_search::encode([]), EMPTY);
        assert_eq!(
            probes(list_search::encode([120, 128, 120, 0])),
            [128, 120, 0]
        );
        assert_eq!(
            probes(list_search::encode([0])),
            [0],
            "a /0 entry is a probe"
        );
        assert_eq!(list_search::encode([128, 120, 112, 104]), TRIE);
        assert_eq!(probes(EMPTY), Vec::<u32>::new());
    }
}
