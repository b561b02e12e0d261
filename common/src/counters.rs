//! Per-reason counters kept by the kernel programs in a per-CPU array.

use crate::assert_size;

/// Packets and frame bytes (from the Ethernet header) counted under one reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
assert_size!(Counter, 16);

macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident = $index:expr, $name:expr, $drop:expr;)*) => {
        /// Why a packet was passed or dropped, or which kernel event happened.
        /// The discriminant is the index into the counters map.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $($(#[$doc])* $variant = $index,)*
        }

        impl Reason {
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            /// Stable snake_case name, used in status output and metrics labels.
            pub const fn name(self) -> &'static str {
                match self { $(Reason::$variant => $name,)* }
            }

            /// Whether packets counted under this reason were dropped.
            pub const fn is_drop(self) -> bool {
                match self { $(Reason::$variant => $drop,)* }
            }
        }
    };
}

reasons! {
    /// Protected traffic within every limit.
    Passed = 0, "passed", false;
    /// Protected traffic from an allow-listed source (exempt from limits).
    AllowListed = 1, "allow_listed", false;
    /// A non-first IP fragment: its ports are unknown, so only source-based
    /// rules (allow, deny, ban) apply before it passes.
    PassedFragment = 2, "passed_fragment", false;
    DenyList = 3, "deny_list", true;
    Banned = 4, "banned", true;
    ConnectionRate = 5, "connection_rate", true;
    ByteRate = 6, "byte_rate", true;
    Concurrency = 7, "concurrency", true;
    GlobalConnectionRate = 8, "global_connection_rate", true;
    GlobalByteRate = 9, "global_byte_rate", true;
    /// A TCP segment whose headers are cut short or inconsistent, or an IPv6
    /// extension chain longer than the parser walks.
    Malformed = 10, "malformed", true;
    /// Event: a source earned a ban (packets only).
    BanStarted = 11, "ban_started", false;
    /// Event: a ban could not be recorded because the ban map is full.
    BanMapFull = 12, "ban_map_full", false;
    /// Event: an established connection could not be counted because the
    /// connection-count map is full.
    ConnectionUntracked = 13, "connection_untracked", false;
    /// Event: a connection from a tracked source was established (sock_ops).
    ConnectionOpened = 14, "connection_opened", false;
    /// Event: a counted connection closed (sock_ops).
    ConnectionClosed = 15, "connection_closed", false;
    /// Event: an event record did not fit in the ring buffer (the agent is
    /// behind or down).
    EventsLost = 16, "events_lost", false;
    /// Stream bytes of a connection whose handshake the agent rejected,
    /// dropped before the application reads them.
    FlowRejected = 17, "flow_rejected", true;
    /// Stream bytes of an inspected connection handed to the agent for its
    /// verdict instead of to the application (which gets them only after an
    /// accepting verdict).
    HandedToAgent = 18, "handed_to_agent", false;
    /// A SYN to an inspected port refused because the table of connections
    /// awaiting a verdict, or of inspected connections, is full.
    InspectFull = 19, "inspect_full", true;
    /// Event: stream bytes that could not be handed to the agent (its ring
    /// buffer was full), or a connection that could not enter inspection;
    /// the connection is cut, never served unjudged.
    InspectLost = 20, "inspect_lost", false;
    /// A SYN answered with a SYN cookie (XDP_TX) instead of being passed:
    /// the source gets no state until it returns the cookie.
    SynCookieSent = 21, "syn_cookie_sent", false;
    /// Event: an ACK returned a valid cookie; its connection goes on to
    /// the per-source and global connection budgets (packets only).
    SynCookieValidated = 22, "syn_cookie_validated", false;
    /// A segment to a protected port that belongs to no connection and
    /// returns no valid cookie (wrong, stale or from another tuple), or a
    /// SYN that cannot be answered (IP options, IPv6 extension headers).
    SynCookieFailed = 23, "syn_cookie_failed", true;
    /// Bytes of a connection bound to a user (a version 2 ticket) over that
    /// user's byte budget: dropped, so the sender's TCP holds and resends them.
    UserByteRate = 24, "user_byte_rate", true;
    /// Bytes of a connection bound to a banned user.
    UserBanned = 25, "user_banned", true;
}

/// Slots per set of counters; the map holds two sets: what was done, then
/// (from `REASONS` on) what dry-run would have done.
pub const REASONS: u32 = 26;
const _: () = assert!(Reason::ALL.len() as u32 == REASONS);
/// Number of slots in the counters map.
pub const COUNTER_SLOTS: u32 = 2 * REASONS;

impl Reason {
    /// Counter slot of this reason, in the dry-run set when `dry_run`.
    #[inline(always)]
    pub const fn slot(self, dry_run: bool) -> u32 {
        self as u32 + if dry_run { REASONS } else { 0 }
    }
}
