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
    pub interfaces: Spanned<Vec<String>>,
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
    Spanned::new(0..0, 32)
}
fn default_ipv6_prefix() -> Spanned<u8> {
    Spanned::new(0..0, 64)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceLimits {
    #[serde(default = "d_source_connections")]
    pub new_connections: Spanned<ConnectionRate>,
    #[serde(default = "d_source_connections_burst")]
    pub new_connections_burst: Spanned<u64>,
    #[serde(default = "d_source_bytes")]
    pub bytes: Spanned<ByteRate>,
    #[serde(default = "d_source_bytes_burst")]
    pub bytes_burst: Spanned<ByteSize>,
    /// 0 disables the limit.
    #[serde(default = "d_concurrent")]
    pub concurrent_connections: u32,
}

fn d_source_connections() -> Spanned<ConnectionRate> {
    Spanned::new(
        0..0,
        Rate::Per {
            amount: Count(20),
            period: Period::Second,
        },
    )
}
fn d_source_connections_burst() -> Spanned<u64> {
    Spanned::new(0..0, 40)
}
fn d_source_bytes() -> Spanned<ByteRate> {
    Spanned::new(
        0..0,
        Rate::Per {
            amount: ByteSize(1 << 20),
            period: Period::Second,
        },
    )
}
fn d_source_bytes_burst() -> Spanned<ByteSize> {
    Spanned::new(0..0, ByteSize(4 << 20))
}
fn d_concurrent() -> u32 {
    64
}

impl Default for SourceLimits {
    fn default() -> Self {
        SourceLimits {
            new_connections: d_source_connections(),
            new_connections_burst: d_source_connections_burst(),
            bytes: d_source_bytes(),
            bytes_burst: d_source_bytes_burst(),
            concurrent_connections: d_concurrent(),
        }
    }
}

/// Global limits. Bursts default to one second (or one minute, for "/m"
/// rates) of the rate.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalLimits {
    #[serde(default = "d_global_connections")]
    pub new_connections: Spanned<ConnectionRate>,
    #[serde(default)]
    pub new_connections_burst: Option<Spanned<u64>>,
    #[serde(default = "d_global_bytes")]
    pub bytes: Spanned<ByteRate>,
    #[serde(default)]
    pub bytes_burst: Option<Spanned<ByteSize>>,
}

fn d_global_connections() -> Spanned<ConnectionRate> {
    Spanned::new(
        0..0,
        Rate::Per {
            amount: Count(5000),
            period: Period::Second,
        },
    )
}
fn d_global_bytes() -> Spanned<ByteRate> {
    Spanned::new(
        0..0,
        Rate::Per {
            amount: ByteSize(1 << 30),
            period: Period::Second,
        },
    )
}

impl Default for GlobalLimits {
    fn default() -> Self {
        GlobalLimits {
            new_connections: d_global_connections(),
            new_connections_burst: None,
            bytes: d_global_bytes(),
            bytes_burst: None,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Count what the limits (and the bans they earn) would drop; drop nothing for them.
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub per_source: SourceLimits,
    #[serde(default)]
    pub global: GlobalLimits,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ban {
    /// Limit drops within `window` that earn a ban; 0 disables bans.
    #[serde(default = "d_after_drops")]
    pub after_drops: u32,
    #[serde(default = "d_window")]
    pub window: Spanned<HumanDuration>,
    #[serde(default = "d_duration")]
    pub duration: Spanned<HumanDuration>,
}

fn d_after_drops() -> u32 {
    200
}
fn d_window() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(std::time::Duration::from_secs(10)))
}
fn d_duration() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(std::time::Duration::from_secs(300)))
}

impl Default for Ban {
    fn default() -> Self {
        Ban {
            after_drops: d_after_drops(),
            window: d_window(),
            duration: d_duration(),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lists {
    /// Count what the deny list would drop; drop nothing for it.
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub deny: Vec<Spanned<String>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tracking {
    /// Sources with live buckets (LRU beyond that).
    #[serde(default = "d_max_sources")]
    pub max_sources: Spanned<u32>,
    /// Bans held at once.
    #[serde(default = "d_max_bans")]
    pub max_bans: Spanned<u32>,
}

fn d_max_sources() -> Spanned<u32> {
    Spanned::new(0..0, 1_000_000)
}
fn d_max_bans() -> Spanned<u32> {
    Spanned::new(0..0, 100_000)
}

impl Default for Tracking {
    fn default() -> Self {
        Tracking {
            max_sources: d_max_sources(),
            max_bans: d_max_bans(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Address for Prometheus text exposition at /metrics; "" turns it off.
    #[serde(default = "d_metrics_listen")]
    pub listen: Spanned<String>,
}

fn d_metrics_listen() -> Spanned<String> {
    Spanned::new(0..0, "127.0.0.1:9464".to_string())
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            listen: d_metrics_listen(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Events {
    /// "stdout", or the path of a file to append JSON lines to.
    #[serde(default = "d_events_output")]
    pub output: Spanned<String>,
}

fn d_events_output() -> Spanned<String> {
    Spanned::new(0..0, "stdout".to_string())
}

impl Default for Events {
    fn default() -> Self {
        Events {
            output: d_events_output(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketKeys {
    #[serde(default)]
    pub required: bool,
    pub secret_file: Spanned<PathBuf>,
    #[serde(default = "d_query_param")]
    pub query_param: String,
    #[serde(default = "d_max_age")]
    pub max_age: Spanned<HumanDuration>,
    #[serde(default = "d_true")]
    pub bind_to_source_ip: bool,
    #[serde(default = "d_true")]
    pub single_use: bool,
    #[serde(default = "d_replay_cache")]
    pub replay_cache_size: Spanned<u32>,
}

fn d_replay_cache() -> Spanned<u32> {
    Spanned::new(0..0, 100_000)
}

fn d_query_param() -> String {
    "ticket".into()
}
fn d_max_age() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(std::time::Duration::from_secs(60)))
}
fn d_true() -> bool {
    true
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllowOrReject {
    #[default]
    Allow,
    Reject,
}

/// `[handshake]` as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandshakeKeys {
    #[serde(default = "d_no_ports")]
    pub inspect_ports: Spanned<Vec<Spanned<i64>>>,
    #[serde(default)]
    pub allowed_origins: Vec<Spanned<String>>,
    #[serde(default = "d_reject")]
    pub missing_origin: AllowOrReject,
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    #[serde(default)]
    pub allowed_paths: Vec<Spanned<String>>,
    #[serde(default = "d_max_request")]
    pub max_request_bytes: Spanned<ByteSize>,
    #[serde(default = "d_deadline")]
    pub deadline: Spanned<HumanDuration>,
    #[serde(default)]
    pub non_upgrade_requests: AllowOrReject,
    #[serde(default = "d_failures")]
    pub failures_before_ban: u32,
    #[serde(default)]
    pub dry_run: bool,
    /// Removed keys, kept only to say why they are refused.
    #[serde(default)]
    pub verdict_timeout: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub on_verdict_timeout: Option<Spanned<toml::Value>>,
    #[serde(default = "d_max_pending")]
    pub max_pending: Spanned<u32>,
    #[serde(default = "d_max_connections")]
    pub max_connections: Spanned<u32>,
    #[serde(default)]
    pub ticket: Option<TicketKeys>,
}

fn d_no_ports() -> Spanned<Vec<Spanned<i64>>> {
    Spanned::new(0..0, vec![])
}
fn d_reject() -> AllowOrReject {
    AllowOrReject::Reject
}
fn d_max_request() -> Spanned<ByteSize> {
    Spanned::new(0..0, ByteSize(8192))
}
fn d_deadline() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(std::time::Duration::from_secs(5)))
}
fn d_failures() -> u32 {
    5
}
fn d_max_pending() -> Spanned<u32> {
    Spanned::new(0..0, 4096)
}
fn d_max_connections() -> Spanned<u32> {
    Spanned::new(0..0, 65536)
}

impl Default for HandshakeKeys {
    fn default() -> Self {
        HandshakeKeys {
            inspect_ports: Spanned::new(0..0, vec![]),
            allowed_origins: vec![],
            missing_origin: d_reject(),
            allowed_hosts: vec![],
            allowed_paths: vec![],
            max_request_bytes: d_max_request(),
            deadline: d_deadline(),
            non_upgrade_requests: AllowOrReject::Allow,
            failures_before_ban: d_failures(),
            dry_run: false,
            verdict_timeout: None,
            on_verdict_timeout: None,
            max_pending: d_max_pending(),
            max_connections: d_max_connections(),
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
#[serde(deny_unknown_fields)]
pub struct SynCookies {
    /// On by default: a spoofed SYN then costs one SYN-ACK and nothing else.
    #[serde(default = "d_true")]
    pub enabled: bool,
}

impl Default for SynCookies {
    fn default() -> Self {
        SynCookies { enabled: true }
    }
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
}
