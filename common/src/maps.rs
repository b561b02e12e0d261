//! Map names and the values stored in them.

use crate::{BucketParams, SourceKey, TokenBucket, assert_size};

/// Names of the maps, as declared by the kernel programs.
pub mod names {
    pub const SETTINGS: &str = "WSG_SETTINGS";
    pub const PORTS: &str = "WSG_PORTS";
    pub const ALLOW: &str = "WSG_ALLOW";
    pub const DENY: &str = "WSG_DENY";
    pub const SOURCES: &str = "WSG_SOURCES";
    pub const BANS: &str = "WSG_BANS";
    pub const CONNECTIONS: &str = "WSG_CONNS";
    pub const GLOBAL: &str = "WSG_GLOBAL";
    pub const COUNTERS: &str = "WSG_COUNTERS";
    pub const EVENTS: &str = "WSG_EVENTS";
    pub const INSPECT: &str = "WSG_INSPECT";
    pub const FLOWS: &str = "WSG_FLOWS";
    pub const HANDSHAKE: &str = "WSG_HANDSHAKE";
}

/// Names of the programs.
pub mod programs {
    pub const INGRESS: &str = "wsguard_ingress";
    pub const CONNECTION_TRACKER: &str = "wsguard_connections";
    pub const CAPTURE: &str = "wsguard_capture";
    pub const EGRESS: &str = "wsguard_egress";
    /// XDP_PASS and nothing else: the benchmarks' floor, never attached.
    pub const FLOOR: &str = "wsguard_floor";
}

/// Entries in the port array: one per TCP port, non-zero when protected.
pub const PORT_SLOTS: u32 = 65536;
/// Capacity of each CIDR list (LPM tries allocate per entry, so a large bound
/// costs nothing until used).
pub const LIST_CAPACITY: u32 = 1 << 20;

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

/// Everything the kernel programs need from the configuration, in one array
/// slot that user space rewrites on (re)load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Non-zero once user space has written the settings; until then every
    /// program passes everything.
    pub enabled: u32,
    /// Concurrent established connections allowed per source; 0 = no limit.
    pub max_concurrent: u32,
    /// Masks applied to a source address before it is used as a key.
    pub ipv4_mask: [u8; 16],
    pub ipv6_mask: [u8; 16],
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
}
assert_size!(Settings, 8 + 32 + 4 * 32 + 8 + 16);

impl Settings {
    /// Limits, concurrency, and the bans they earn.
    pub const DRY_RUN_LIMITS: u32 = 1;
    /// Allow/deny lists.
    pub const DRY_RUN_LISTS: u32 = 2;
    /// Malformed-packet drops.
    pub const DRY_RUN_MALFORMED: u32 = 4;
    /// Handshake verdicts (rejected flows, held responses).
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
            FlowRejected | ResponseHeld | VerdictTimeout => Self::DRY_RUN_HANDSHAKE,
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

/// Per-source state, kept in an LRU map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceState {
    pub connections: TokenBucket,
    pub bytes: TokenBucket,
    /// Start of the current ban-counting window.
    pub window_start_ns: u64,
    /// Limit drops seen in the current window.
    pub window_drops: u32,
    pub _pad: u32,
    /// Totals for `wsguard top` (updated without atomics: approximate when
    /// several CPUs serve one source at once).
    pub total_packets: u64,
    pub total_bytes: u64,
    pub drops_connection_rate: u64,
    pub drops_byte_rate: u64,
    pub drops_concurrency: u64,
}
assert_size!(SourceState, 88);

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

/// A TCP connection to an inspected port, from the client's side.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client: [u8; 16],
    pub server: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
    pub _pad: u32,
}
assert_size!(FlowKey, 40);

/// Where a connection's handshake stands.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// [`Flow::PENDING`], [`Flow::ACCEPTED`] or [`Flow::REJECTED`].
    pub state: u32,
    pub _pad: u32,
    /// When the SYN was seen (CLOCK_MONOTONIC ns).
    pub since_ns: u64,
}
assert_size!(Flow, 16);

impl Flow {
    /// SYN seen, no verdict yet: the capture hands its segments to the agent
    /// and the egress program holds the server's answer back.
    pub const PENDING: u32 = 1;
    pub const ACCEPTED: u32 = 2;
    pub const REJECTED: u32 = 3;
}

/// Handshake inspection settings the kernel programs read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandshakeSettings {
    /// Non-zero when inspection is on (some port is inspected).
    pub enabled: u32,
    /// Non-zero: drop the server's answer when no verdict came in time
    /// (fail-closed); zero: let it through (fail-open).
    pub fail_closed: u32,
    /// How long the server's answer is held back waiting for a verdict.
    pub verdict_timeout_ns: u64,
}
assert_size!(HandshakeSettings, 16);

/// Size of the events ring buffer (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Global buckets, shared by all non-allow-listed sources.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalState {
    pub connections: TokenBucket,
    pub bytes: TokenBucket,
}
assert_size!(GlobalState, 32);

/// Version of the map layout above; pins live under `<pin_path>/v<LAYOUT_VERSION>`
/// so that a new layout never reads maps pinned by an older one.
pub const LAYOUT_VERSION: u32 = 1;
