//! The file as written: one struct per TOML table, with its defaults.
//! Values keep their place in the file (`Spanned`) for validation errors.

use super::*;

/// XDP attach mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode where the driver supports it, generic otherwise.
    #[default]
    Auto,
    /// Driver mode only; attaching fails where the driver lacks it.
    Native,
    /// Generic (skb) mode: works on every interface, costs more per packet.
    Skb,
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XdpMode::Auto => "auto",
            XdpMode::Native => "native",
            XdpMode::Skb => "skb",
        })
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    pub(in crate::config) interfaces: Spanned<Vec<String>>,
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// Where maps are pinned (a versioned directory is created below it).
    #[serde(default = "default_pin_path")]
    pub pin_path: PathBuf,
    /// The cgroup v2 directory the connection counter attaches to; by default
    /// the root of the first cgroup v2 mount.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// Fail-closed: leave the programs attached (through their pinned links)
    /// when the agent exits, so enforcement goes on while it is down.
    #[serde(default)]
    pub keep_enforcing_on_exit: bool,
    /// Count and report everything, drop nothing.
    #[serde(default)]
    pub dry_run: bool,
}

fn default_pin_path() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/wsguard")
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Protect {
    pub ports: Spanned<Vec<Spanned<i64>>>,
    #[serde(default = "default_ipv4_prefix")]
    pub ipv4_prefix: Spanned<u8>,
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix: Spanned<u8>,
}

fn default_ipv4_prefix() -> Spanned<u8> {
    unplaced(32)
}
fn default_ipv6_prefix() -> Spanned<u8> {
    unplaced(64)
}

/// A default: a value with no place in the file.
fn unplaced<T>(value: T) -> Spanned<T> {
    Spanned::new(0..0, value)
}

fn per_second<Q>(amount: Q) -> Rate<Q> {
    Rate::Per {
        amount,
        period: Period::Second,
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceLimits {
    pub new_connections: Spanned<ConnectionRate>,
    pub new_connections_burst: Spanned<u64>,
    pub bytes: Spanned<ByteRate>,
    pub bytes_burst: Spanned<ByteSize>,
    /// 0 disables the limit.
    pub concurrent_connections: u32,
}

impl Default for SourceLimits {
    fn default() -> Self {
        SourceLimits {
            new_connections: unplaced(per_second(Count(20))),
            new_connections_burst: unplaced(40),
            bytes: unplaced(per_second(ByteSize(1 << 20))),
            bytes_burst: unplaced(ByteSize(4 << 20)),
            concurrent_connections: 64,
        }
    }
}

/// Global limits. Bursts default to one second (or one minute, for "/m"
/// rates) of the rate.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GlobalLimits {
    pub new_connections: Spanned<ConnectionRate>,
    pub new_connections_burst: Option<Spanned<u64>>,
    pub bytes: Spanned<ByteRate>,
    pub bytes_burst: Option<Spanned<ByteSize>>,
}

impl Default for GlobalLimits {
    fn default() -> Self {
        GlobalLimits {
            new_connections: unplaced(per_second(Count(5000))),
            new_connections_burst: None,
            bytes: unplaced(per_second(ByteSize(1 << 30))),
            bytes_burst: None,
        }
    }
}

/// `[limits.per_user]`: budgets of a user named by a version 2 ticket,
/// across all the user's connections and addresses.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UserLimitKeys {
    pub bytes: Spanned<ByteRate>,
    pub bytes_burst: Spanned<ByteSize>,
    /// 0 disables the limit.
    pub concurrent_connections: u32,
    pub new_connections: Spanned<ConnectionRate>,
    pub new_connections_burst: Spanned<u64>,
    pub over_budget_timeout: Spanned<HumanDuration>,
    /// Users with a budget or a ban held at once (sizes the kernel's map).
    pub max_users: Spanned<u32>,
}

impl Default for UserLimitKeys {
    fn default() -> Self {
        UserLimitKeys {
            bytes: unplaced(per_second(ByteSize(1 << 20))),
            bytes_burst: unplaced(ByteSize(4 << 20)),
            concurrent_connections: 16,
            new_connections: unplaced(per_second(Count(5))),
            new_connections_burst: unplaced(10),
            over_budget_timeout: unplaced(HumanDuration(std::time::Duration::from_secs(30))),
            max_users: unplaced(65_536),
        }
    }
}

/// `[limits.class.NAME]`: what a class changes of `[limits.per_user]`
/// (a key left out keeps the `per_user` value).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassLimitKeys {
    pub bytes: Option<Spanned<ByteRate>>,
    pub bytes_burst: Option<Spanned<ByteSize>>,
    pub concurrent_connections: Option<u32>,
    pub new_connections: Option<Spanned<ConnectionRate>>,
    pub new_connections_burst: Option<Spanned<u64>>,
    pub over_budget_timeout: Option<Spanned<HumanDuration>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Count what the limits (and the bans they earn) would drop; drop nothing for them.
    pub dry_run: bool,
    pub per_source: SourceLimits,
    pub global: GlobalLimits,
    pub per_user: UserLimitKeys,
    pub class: std::collections::BTreeMap<Spanned<String>, ClassLimitKeys>,
    pub fleet: FleetLimitKeys,
}

/// `[limits.fleet]`: limits on a source's total over every host of the
/// fleet (needs `[fleet]`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetLimitKeys {
    pub per_source: FleetSourceLimitKeys,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetSourceLimitKeys {
    pub new_connections: Option<Spanned<ConnectionRate>>,
    pub bytes: Option<Spanned<ByteRate>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ban {
    /// Limit drops within `window` that earn a ban; 0 disables bans.
    pub after_drops: u32,
    pub(in crate::config) window: Spanned<HumanDuration>,
    pub(in crate::config) duration: Spanned<HumanDuration>,
    /// Refuse the tickets of a user cut for staying over budget, for `duration`.
    pub users: bool,
}

impl Default for Ban {
    fn default() -> Self {
        Ban {
            users: false,
            after_drops: 200,
            window: unplaced(HumanDuration(std::time::Duration::from_secs(10))),
            duration: unplaced(HumanDuration(std::time::Duration::from_secs(300))),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Lists {
    /// Count what the deny list would drop; drop nothing for it.
    pub dry_run: bool,
    pub allow: Vec<Spanned<String>>,
    pub deny: Vec<Spanned<String>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tracking {
    /// Sources with live buckets (the least recently seen of a full set is
    /// forgotten).
    pub max_sources: Spanned<u32>,
    /// Bans held at once.
    pub max_bans: Spanned<u32>,
}

impl Default for Tracking {
    fn default() -> Self {
        Tracking {
            max_sources: unplaced(1_000_000),
            max_bans: unplaced(100_000),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// Address for Prometheus text exposition at /metrics; "" turns it off.
    pub listen: Spanned<String>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            listen: unplaced("127.0.0.1:9464".to_string()),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Events {
    /// "stdout", or the path of a file to append JSON lines to.
    pub output: Spanned<String>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            output: unplaced("stdout".to_string()),
        }
    }
}

/// `[handshake.ticket]` as written. `secret_file` has no default, so the
/// other defaults are per key.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketKeys {
    #[serde(default)]
    pub required: bool,
    pub secret_file: Spanned<PathBuf>,
    #[serde(default = "TicketKeys::default_query_param")]
    pub query_param: String,
    #[serde(default = "TicketKeys::default_max_age")]
    pub max_age: Spanned<HumanDuration>,
    #[serde(default = "TicketKeys::yes")]
    pub bind_to_source_ip: bool,
    #[serde(default = "TicketKeys::yes")]
    pub single_use: bool,
    #[serde(default = "TicketKeys::default_replay_cache")]
    pub replay_cache_size: Spanned<u32>,
}

impl TicketKeys {
    fn default_query_param() -> String {
        "ticket".into()
    }
    fn default_max_age() -> Spanned<HumanDuration> {
        unplaced(HumanDuration(std::time::Duration::from_secs(60)))
    }
    fn yes() -> bool {
        true
    }
    fn default_replay_cache() -> Spanned<u32> {
        unplaced(100_000)
    }
}

pub use crate::handshake::AllowOrReject;

/// `[handshake]` as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandshakeKeys {
    pub inspect_ports: Spanned<Vec<Spanned<i64>>>,
    pub allowed_origins: Vec<Spanned<String>>,
    pub missing_origin: AllowOrReject,
    pub allowed_hosts: Vec<String>,
    pub allowed_paths: Vec<Spanned<String>>,
    pub max_request_bytes: Spanned<ByteSize>,
    pub deadline: Spanned<HumanDuration>,
    pub non_upgrade_requests: AllowOrReject,
    pub failures_before_ban: u32,
    pub dry_run: bool,
    /// Removed keys, kept only to say why they are refused.
    pub verdict_timeout: Option<Spanned<toml::Value>>,
    pub on_verdict_timeout: Option<Spanned<toml::Value>>,
    pub max_pending: Spanned<u32>,
    pub max_connections: Spanned<u32>,
    pub ticket: Option<TicketKeys>,
}

impl Default for HandshakeKeys {
    fn default() -> Self {
        HandshakeKeys {
            inspect_ports: unplaced(vec![]),
            allowed_origins: vec![],
            missing_origin: AllowOrReject::Reject,
            allowed_hosts: vec![],
            allowed_paths: vec![],
            max_request_bytes: unplaced(ByteSize(8192)),
            deadline: unplaced(HumanDuration(std::time::Duration::from_secs(5))),
            non_upgrade_requests: AllowOrReject::Allow,
            failures_before_ban: 5,
            dry_run: false,
            verdict_timeout: None,
            on_verdict_timeout: None,
            max_pending: unplaced(4096),
            max_connections: unplaced(65536),
            ticket: None,
        }
    }
}

/// Validated handshake inspection settings; `ports` empty means off.
#[derive(Clone, Debug)]
pub struct HandshakeConfig {
    pub ports: Vec<u16>,
    pub policy: crate::handshake::Policy,
    pub deadline: std::time::Duration,
    pub failures_before_ban: u32,
    pub max_pending: u32,
    /// Inspected connections open at once (sizes the inspection maps).
    pub max_connections: u32,
    pub dry_run: bool,
    /// Capacity of the single-use ticket cache; `None` when tickets are not
    /// required or not single-use.
    pub replay_cache_size: Option<u32>,
}

/// Where event records go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventsOutput {
    Stdout,
    File(PathBuf),
}

/// `[syn_cookies]`: answer SYNs to protected ports from XDP with a SYN
/// cookie, so that only sources that prove they are real get state.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SynCookies {
    /// On by default: a spoofed SYN then costs one SYN-ACK and nothing else.
    pub enabled: bool,
}

impl Default for SynCookies {
    fn default() -> Self {
        SynCookies { enabled: true }
    }
}

/// `[fleet]`: bans and runtime list entries shared with the other hosts
/// of a fleet through Redis (or Valkey).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetKeys {
    /// `redis://HOST:PORT[/DB]`, `rediss://` (TLS) or `unix:///PATH`.
    pub redis_url: Spanned<String>,
    /// A Redis ACL user (with `password_file`).
    #[serde(default)]
    pub username: Option<Spanned<String>>,
    /// A file holding the password (its first line).
    #[serde(default)]
    pub password_file: Option<Spanned<PathBuf>>,
    /// PEM file of the CA certificates to trust for `rediss://` instead of
    /// the system's (a fleet's own CA).
    #[serde(default)]
    pub ca_file: Option<Spanned<PathBuf>>,
    #[serde(default = "default_key_prefix")]
    pub key_prefix: Spanned<String>,
    /// This host's name in the fleet; the hostname by default.
    #[serde(default)]
    pub host_id: Option<Spanned<String>>,
    /// Apply allow-list entries other hosts share (off: an allow entry
    /// from the fleet could open every host to whoever wrote it).
    #[serde(default)]
    pub accept_allow: bool,
    /// Decisions kept while Redis cannot be reached.
    #[serde(default = "default_outbox_size")]
    pub outbox_size: Spanned<i64>,
}

fn default_key_prefix() -> Spanned<String> {
    unplaced("wsguard".to_string())
}

fn default_outbox_size() -> Spanned<i64> {
    unplaced(10_000)
}

/// The file as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) agent: Agent,
    pub(super) protect: Protect,
    #[serde(default)]
    pub(super) limits: Limits,
    #[serde(default)]
    pub(super) ban: Ban,
    #[serde(default)]
    pub(super) lists: Lists,
    #[serde(default)]
    pub(super) tracking: Tracking,
    #[serde(default)]
    pub(super) metrics: Metrics,
    #[serde(default)]
    pub(super) events: Events,
    #[serde(default)]
    pub(super) handshake: HandshakeKeys,
    #[serde(default)]
    pub(super) syn_cookies: SynCookies,
    #[serde(default)]
    pub(super) fleet: Option<FleetKeys>,
}

/// A rule family that its table's `dry_run` key puts in dry run on its own.
pub struct DryRunFamily {
    /// The kernel's bit for it (`Settings::DRY_RUN_*`).
    pub bit: u32,
    /// How `check-config` and the agent's summary name it.
    pub name: &'static str,
    /// Whether the file as written puts it in dry run.
    pub(super) on: fn(&RawConfig) -> bool,
}

/// Every family with its own `dry_run` key: the settings the kernel reads
/// and the summary are both made from this table (`agent.dry_run` covers
/// them all).
pub const DRY_RUN_FAMILIES: [DryRunFamily; 3] = [
    DryRunFamily {
        bit: Settings::DRY_RUN_LIMITS,
        name: "limits and bans",
        on: |raw| raw.limits.dry_run,
    },
    DryRunFamily {
        bit: Settings::DRY_RUN_LISTS,
        name: "deny list",
        on: |raw| raw.lists.dry_run,
    },
    DryRunFamily {
        bit: Settings::DRY_RUN_HANDSHAKE,
        name: "handshake verdicts",
        on: |raw| raw.handshake.dry_run,
    },
];
