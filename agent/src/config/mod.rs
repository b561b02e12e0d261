//! The TOML configuration: parsing, validation with file/line/reason errors,
//! and the translation into what the kernel programs read.
//!
//! Every key is documented in the README ("Configuration"). Unknown keys are
//! errors, never ignored.

mod units;

use std::{
    collections::BTreeSet,
    fmt,
    ops::Range,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;
use wsguard_common::{
    BucketParams, Settings,
    source::{V4_MAPPED_BITS, prefix_mask},
};

pub use units::{ByteRate, ByteSize, ConnectionRate, Count, HumanDuration, Period, Quantity, Rate};

/// A configuration error, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line and column, when the error points at a place in the file.
    pub position: Option<(usize, usize)>,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, column)) => write!(
                f,
                "{}:{line}:{column}: {}",
                self.file.display(),
                self.reason
            ),
            None => write!(f, "{}: {}", self.file.display(), self.reason),
        }
    }
}

impl std::error::Error for ConfigError {}

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
struct RawConfig {
    agent: Agent,
    protect: Protect,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    ban: Ban,
    #[serde(default)]
    lists: Lists,
    #[serde(default)]
    tracking: Tracking,
    #[serde(default)]
    metrics: Metrics,
    #[serde(default)]
    events: Events,
    #[serde(default)]
    handshake: HandshakeKeys,
    #[serde(default)]
    syn_cookies: SynCookies,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub file: PathBuf,
    pub agent: Agent,
    pub ports: Vec<u16>,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    pub limits: Limits,
    pub ban: Ban,
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
    pub max_sources: u32,
    pub max_bans: u32,
    /// Where /metrics is served; `None` when off.
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub events_output: EventsOutput,
    pub handshake: HandshakeConfig,
    pub syn_cookies: SynCookies,
    /// What the kernel programs read, derived once here.
    pub settings: Settings,
}

/// Largest map sizes accepted, to keep a typo from asking the kernel for
/// gigabytes of memory.
const MAX_TRACKED_SOURCES: u32 = 16 << 20;
const MAX_BANS: u32 = 4 << 20;

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            position: None,
            reason: format!("cannot read the config file: {e}"),
        })?;
        Config::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let located = |span: Option<Range<usize>>, reason: String| ConfigError {
            file: path.to_owned(),
            position: span
                .filter(|s| !(s.start == 0 && s.end == 0))
                .map(|s| line_column(text, s.start)),
            reason,
        };
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| located(e.span(), e.message().to_owned()))?;
        validate(raw, path).map_err(|(span, reason)| located(span, reason))
    }
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

type Invalid = (Option<Range<usize>>, String);

fn at<T>(value: &Spanned<T>, reason: impl Into<String>) -> Invalid {
    (Some(value.span()), reason.into())
}

fn validate(raw: RawConfig, file: &Path) -> Result<Config, Invalid> {
    let RawConfig {
        agent,
        protect,
        limits,
        ban,
        lists,
        tracking,
        metrics,
        events,
        handshake,
        syn_cookies,
    } = raw;

    if agent.interfaces.get_ref().is_empty() {
        return Err(at(
            &agent.interfaces,
            "agent.interfaces is empty: name at least one interface to protect",
        ));
    }
    let mut seen = BTreeSet::new();
    for name in agent.interfaces.get_ref() {
        if name.is_empty()
            || name.len() > 15
            || name.contains('/')
            || name.contains(char::is_whitespace)
        {
            return Err(at(
                &agent.interfaces,
                format!("\"{name}\" is not a valid interface name"),
            ));
        }
        if !seen.insert(name) {
            return Err(at(
                &agent.interfaces,
                format!("interface \"{name}\" is listed twice"),
            ));
        }
    }
    if !agent.pin_path.is_absolute() {
        return Err((
            None,
            format!(
                "agent.pin_path \"{}\" must be an absolute path",
                agent.pin_path.display()
            ),
        ));
    }

    let ports = validate_ports(&protect.ports)?;
    let ipv4_prefix = *protect.ipv4_prefix.get_ref();
    if !(1..=32).contains(&ipv4_prefix) {
        return Err(at(
            &protect.ipv4_prefix,
            format!("protect.ipv4_prefix must be 1 to 32, not {ipv4_prefix}"),
        ));
    }
    let ipv6_prefix = *protect.ipv6_prefix.get_ref();
    if !(1..=128).contains(&ipv6_prefix) {
        return Err(at(
            &protect.ipv6_prefix,
            format!("protect.ipv6_prefix must be 1 to 128, not {ipv6_prefix}"),
        ));
    }

    let source = &limits.per_source;
    let spanned = |b: &Spanned<u64>| (b.span(), *b.get_ref());
    let spanned_size = |b: &Spanned<ByteSize>| (b.span(), b.get_ref().0);
    let count = |n: u64| n.to_string();
    let size = |n: u64| ByteSize(n).to_string();
    let source_connections = bucket(
        &source.new_connections,
        Some(spanned(&source.new_connections_burst)),
        "limits.per_source.new_connections_burst",
        count,
    )?;
    let source_bytes = bucket(
        &source.bytes,
        Some(spanned_size(&source.bytes_burst)),
        "limits.per_source.bytes_burst",
        size,
    )?;
    let global = &limits.global;
    let global_connections = bucket(
        &global.new_connections,
        global.new_connections_burst.as_ref().map(spanned),
        "limits.global.new_connections_burst",
        count,
    )?;
    let global_bytes = bucket(
        &global.bytes,
        global.bytes_burst.as_ref().map(spanned_size),
        "limits.global.bytes_burst",
        size,
    )?;

    if ban.window.get_ref().0.is_zero() {
        return Err(at(&ban.window, "ban.window must be longer than zero"));
    }
    if ban.duration.get_ref().0.is_zero() {
        return Err(at(&ban.duration, "ban.duration must be longer than zero"));
    }

    let allow = parse_cidrs(&lists.allow, "lists.allow")?;
    let deny = parse_cidrs(&lists.deny, "lists.deny")?;

    let max_sources = *tracking.max_sources.get_ref();
    if !(1..=MAX_TRACKED_SOURCES).contains(&max_sources) {
        return Err(at(
            &tracking.max_sources,
            format!("tracking.max_sources must be 1 to {MAX_TRACKED_SOURCES}, not {max_sources}"),
        ));
    }
    let max_bans = *tracking.max_bans.get_ref();
    if !(1..=MAX_BANS).contains(&max_bans) {
        return Err(at(
            &tracking.max_bans,
            format!("tracking.max_bans must be 1 to {MAX_BANS}, not {max_bans}"),
        ));
    }

    let listen = metrics.listen.get_ref().trim();
    let metrics_listen = if listen.is_empty() {
        None
    } else {
        Some(listen.parse::<std::net::SocketAddr>().map_err(|_| {
            at(&metrics.listen, format!("metrics.listen \"{listen}\" is not an address:port such as \"127.0.0.1:9464\" (\"\" turns metrics off)"))
        })?)
    };
    let events_output = match events.output.get_ref().as_str() {
        "stdout" => EventsOutput::Stdout,
        path if Path::new(path).is_absolute() => EventsOutput::File(PathBuf::from(path)),
        other => {
            return Err(at(
                &events.output,
                format!("events.output \"{other}\" must be \"stdout\" or an absolute file path"),
            ));
        }
    };

    let handshake = validate_handshake(handshake, &ports)?;

    let settings = Settings {
        enabled: 1,
        max_concurrent: source.concurrent_connections,
        ipv4_mask: prefix_mask(V4_MAPPED_BITS + ipv4_prefix as u32),
        ipv6_mask: prefix_mask(ipv6_prefix as u32),
        source_connections,
        source_bytes,
        global_connections,
        global_bytes,
        ban_after_drops: ban.after_drops,
        dry_run: if agent.dry_run {
            Settings::DRY_RUN_ALL
        } else {
            (if limits.dry_run {
                Settings::DRY_RUN_LIMITS
            } else {
                0
            }) | (if lists.dry_run {
                Settings::DRY_RUN_LISTS
            } else {
                0
            }) | (if handshake.dry_run {
                Settings::DRY_RUN_HANDSHAKE
            } else {
                0
            })
        },
        ban_window_ns: ban.window.get_ref().nanos(),
        ban_duration_ns: ban.duration.get_ref().nanos(),
    };
    Ok(Config {
        file: file.to_owned(),
        agent,
        ports,
        ipv4_prefix,
        ipv6_prefix,
        limits,
        ban,
        allow,
        deny,
        max_sources,
        max_bans,
        metrics_listen,
        events_output,
        handshake,
        syn_cookies,
        settings,
    })
}

fn validate_handshake(keys: HandshakeKeys, protected: &[u16]) -> Result<HandshakeConfig, Invalid> {
    use crate::handshake::{
        MissingOrigin, NonUpgrade, OriginPattern, PathPattern, Policy, TicketPolicy, ticket,
    };
    let mut ports = Vec::new();
    for port in keys.inspect_ports.get_ref() {
        let n = *port.get_ref();
        let Some(p) = u16::try_from(n).ok().filter(|p| protected.contains(p)) else {
            return Err(at(
                port,
                format!("handshake.inspect_ports: {n} is not one of protect.ports"),
            ));
        };
        if ports.contains(&p) {
            return Err(at(
                port,
                format!("handshake.inspect_ports: {p} is listed twice"),
            ));
        }
        ports.push(p);
    }
    let allowed_origins = keys
        .allowed_origins
        .iter()
        .map(|o| {
            OriginPattern::parse(o.get_ref())
                .map_err(|e| at(o, format!("handshake.allowed_origins: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let allowed_paths = keys
        .allowed_paths
        .iter()
        .map(|p| {
            PathPattern::parse(p.get_ref())
                .map_err(|e| at(p, format!("handshake.allowed_paths: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let max_request = keys.max_request_bytes.get_ref().0;
    if !(256..=1 << 20).contains(&max_request) {
        return Err(at(
            &keys.max_request_bytes,
            "handshake.max_request_bytes must be 256B to 1MiB",
        ));
    }
    for (removed, key) in [
        (&keys.verdict_timeout, "verdict_timeout"),
        (&keys.on_verdict_timeout, "on_verdict_timeout"),
    ] {
        if let Some(value) = removed {
            return Err(at(
                value,
                format!(
                    "handshake.{key} is no longer a setting: the server now reads a request only after its verdict, so there is no answer to hold back or release (remove the key)"
                ),
            ));
        }
    }
    if keys.deadline.get_ref().0.is_zero() {
        return Err(at(
            &keys.deadline,
            "handshake.deadline must be longer than zero",
        ));
    }
    if !(1..=4_194_304).contains(keys.max_connections.get_ref()) {
        return Err(at(
            &keys.max_connections,
            "handshake.max_connections must be 1 to 4194304",
        ));
    }
    if *keys.max_pending.get_ref() == 0 {
        return Err(at(
            &keys.max_pending,
            "handshake.max_pending must be at least 1",
        ));
    }
    let mut replay_cache_size = None;
    let ticket = match keys.ticket {
        None => None,
        Some(t) => {
            let secret = if t.required {
                ticket::read_secret(t.secret_file.get_ref()).map_err(|e| {
                    at(
                        &t.secret_file,
                        format!("handshake.ticket.secret_file: {e:#}"),
                    )
                })?
            } else {
                Vec::new()
            };
            if t.max_age.get_ref().0.is_zero() {
                return Err(at(
                    &t.max_age,
                    "handshake.ticket.max_age must be longer than zero",
                ));
            }
            if !(1..=10_000_000).contains(t.replay_cache_size.get_ref()) {
                return Err(at(
                    &t.replay_cache_size,
                    "handshake.ticket.replay_cache_size must be 1 to 10000000",
                ));
            }
            if t.required && t.single_use {
                replay_cache_size = Some(*t.replay_cache_size.get_ref());
            }
            Some(TicketPolicy {
                required: t.required,
                secret,
                query_param: t.query_param,
                max_age_secs: t.max_age.get_ref().0.as_secs().max(1),
                bind_to_source_ip: t.bind_to_source_ip,
            })
        }
    };
    Ok(HandshakeConfig {
        ports,
        policy: Policy {
            allowed_origins,
            missing_origin: match keys.missing_origin {
                AllowOrReject::Allow => MissingOrigin::Allow,
                AllowOrReject::Reject => MissingOrigin::Reject,
            },
            allowed_hosts: keys
                .allowed_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            allowed_paths,
            max_request_bytes: max_request as usize,
            non_upgrade_requests: match keys.non_upgrade_requests {
                AllowOrReject::Allow => NonUpgrade::Allow,
                AllowOrReject::Reject => NonUpgrade::Reject,
            },
            ticket,
        },
        deadline: keys.deadline.get_ref().0,
        failures_before_ban: keys.failures_before_ban,
        max_pending: *keys.max_pending.get_ref(),
        max_connections: *keys.max_connections.get_ref(),
        dry_run: keys.dry_run,
        replay_cache_size,
    })
}

fn validate_ports(ports: &Spanned<Vec<Spanned<i64>>>) -> Result<Vec<u16>, Invalid> {
    if ports.get_ref().is_empty() {
        return Err(at(
            ports,
            "protect.ports is empty: name at least one TCP port",
        ));
    }
    let mut out = Vec::new();
    for port in ports.get_ref() {
        let n = *port.get_ref();
        let Ok(p) = u16::try_from(n) else {
            return Err(at(port, format!("port {n} is out of range (1 to 65535)")));
        };
        if p == 0 {
            return Err(at(port, "port 0 is out of range (1 to 65535)"));
        }
        if out.contains(&p) {
            return Err(at(port, format!("port {p} is listed twice")));
        }
        out.push(p);
    }
    Ok(out)
}

/// Bucket parameters for a rate; `burst` (span and amount) defaults to one
/// period's worth and must hold at least one second of the rate.
fn bucket<Q: Quantity>(
    rate_at: &Spanned<Rate<Q>>,
    burst: Option<(Range<usize>, u64)>,
    burst_key: &str,
    show: fn(u64) -> String,
) -> Result<BucketParams, Invalid> {
    let rate = *rate_at.get_ref();
    let Rate::Per { amount, period } = rate else {
        return Ok(BucketParams::UNLIMITED);
    };
    let burst_value = burst.as_ref().map_or(amount.amount(), |b| b.1);
    let minimum = rate.per_second_ceil().unwrap_or(1);
    if let Some((span, _)) = burst {
        if burst_value < minimum {
            return Err((
                Some(span),
                format!(
                    "{burst_key} ({}) is below the rate ({rate}); it must hold at least one second of it ({})",
                    show(burst_value),
                    show(minimum)
                ),
            ));
        }
    }
    BucketParams::new(amount.amount(), period.nanos(), burst_value).ok_or_else(|| {
        at(rate_at, format!(
            "rate {rate} with burst {} is beyond what the kernel's arithmetic holds (at most 4GiB of burst for a per-second byte rate)",
            show(burst_value)
        ))
    })
}

/// A CIDR or a plain address (a /32 or /128). Host bits must be zero:
/// "10.0.0.1/24" is probably a typo for "10.0.0.0/24", and silently widening
/// it would be wrong.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    let net = match text.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => match text.parse::<std::net::IpAddr>() {
            Ok(addr) => IpNet::from(addr),
            Err(_) => {
                return Err(format!(
                    "\"{text}\" is not a CIDR (such as 198.51.100.0/24 or 2001:db8::/32) or an address"
                ));
            }
        },
    };
    if net.trunc() != net {
        return Err(format!(
            "\"{text}\" has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

fn parse_cidrs(entries: &[Spanned<String>], key: &str) -> Result<Vec<IpNet>, Invalid> {
    entries
        .iter()
        .map(|entry| parse_cidr(entry.get_ref()).map_err(|e| at(entry, format!("{key}: {e}"))))
        .collect()
}

impl Config {
    /// A human summary of what is enforced, printed at start and by `check-config`.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let l = &self.limits;
        let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
        let _ = writeln!(
            s,
            "  interfaces: {} (xdp mode {})",
            self.agent.interfaces.get_ref().join(", "),
            self.agent.xdp_mode
        );
        let _ = writeln!(s, "  tcp ports: {}", ports.join(", "));
        let _ = writeln!(
            s,
            "  per source (IPv4 /{}, IPv6 /{}): new connections {} (burst {}), bytes {} (burst {}), concurrent connections {}",
            self.ipv4_prefix,
            self.ipv6_prefix,
            l.per_source.new_connections.get_ref(),
            self.settings.source_connections.burst(),
            l.per_source.bytes.get_ref(),
            ByteSize(self.settings.source_bytes.burst()),
            match l.per_source.concurrent_connections {
                0 => "unlimited".to_string(),
                n => n.to_string(),
            },
        );
        let _ = writeln!(
            s,
            "  global: new connections {} (burst {}), bytes {} (burst {})",
            l.global.new_connections.get_ref(),
            self.settings.global_connections.burst(),
            l.global.bytes.get_ref(),
            ByteSize(self.settings.global_bytes.burst()),
        );
        if self.ban.after_drops == 0 {
            let _ = writeln!(s, "  bans: off");
        } else {
            let _ = writeln!(
                s,
                "  bans: {} limit drops within {} ban a source for {}",
                self.ban.after_drops,
                self.ban.window.get_ref(),
                self.ban.duration.get_ref()
            );
        }
        let list = |v: &[IpNet]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.iter()
                    .map(IpNet::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let _ = writeln!(
            s,
            "  syn cookies: {}",
            match (
                self.syn_cookies.enabled,
                self.agent.dry_run || self.limits.dry_run
            ) {
                (false, _) => "off (SYNs go straight to the connection budgets)",
                (true, false) => "on (a source gets state only once it returns its cookie)",
                (true, true) => "off while the limits are in dry run",
            }
        );
        let _ = writeln!(s, "  allow: {}", list(&self.allow));
        let _ = writeln!(s, "  deny: {}", list(&self.deny));
        let _ = writeln!(
            s,
            "  tracking: up to {} sources, {} bans",
            self.max_sources, self.max_bans
        );
        if self.handshake.ports.is_empty() {
            let _ = writeln!(s, "  handshake inspection: off");
        } else {
            let ports: Vec<String> = self.handshake.ports.iter().map(u16::to_string).collect();
            let p = &self.handshake.policy;
            let _ = writeln!(
                s,
                "  handshake inspection on ports {}: {} allowed origins, {} allowed paths, tickets {}, deadline {}, up to {} pending and {} inspected connections (fail-closed)",
                ports.join(", "),
                p.allowed_origins.len(),
                if p.allowed_paths.is_empty() {
                    "any".to_string()
                } else {
                    p.allowed_paths.len().to_string()
                },
                match (
                    p.ticket.as_ref().is_some_and(|t| t.required),
                    self.handshake.replay_cache_size
                ) {
                    (false, _) => "not required",
                    (true, Some(_)) => "required, single-use",
                    (true, None) => "required, reusable",
                },
                HumanDuration(self.handshake.deadline),
                self.handshake.max_pending,
                self.handshake.max_connections,
            );
        }
        let dry = self.settings.dry_run;
        let mode = if dry == 0 {
            "enforcing".to_string()
        } else if dry == Settings::DRY_RUN_ALL {
            "dry run: everything counted as would-drop, nothing dropped".to_string()
        } else {
            let families: Vec<&str> = [
                (Settings::DRY_RUN_LIMITS, "limits and bans"),
                (Settings::DRY_RUN_LISTS, "deny list"),
                (Settings::DRY_RUN_HANDSHAKE, "handshake verdicts"),
            ]
            .iter()
            .filter(|(bit, _)| dry & bit != 0)
            .map(|(_, name)| *name)
            .collect();
            format!(
                "dry run for {} (counted as would-drop), enforcing the rest",
                families.join(" and ")
            )
        };
        let _ = write!(s, "  mode: {mode}");
        s
    }
}

#[cfg(test)]
mod tests;
