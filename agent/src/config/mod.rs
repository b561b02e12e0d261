//! The TOML configuration: parsing, validation with file/line/reason errors,
//! and the translation into what the kernel programs read. `schema.rs` is
//! the file as written (tables, defaults), `validate.rs` turns it into a
//! [`Config`] (the model the rest of the agent uses, here), `summary.rs`
//! says what a config enforces, `units.rs` reads rates, sizes and durations.
//!
//! Every key is documented in the README ("Configuration"). Unknown keys are
//! errors, never ignored.

mod schema;
mod summary;
mod units;
mod validate;

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
    BucketParams, PortSet, Settings,
    source::{V4_MAPPED_BITS, prefix_mask},
};

pub use schema::*;
pub use units::{ByteRate, ByteSize, ConnectionRate, Count, HumanDuration, Period, Quantity, Rate};
pub use validate::parse_cidr;
use validate::validate;

/// What a user may do: `[limits.per_user]`, or a class's version of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserLimits {
    /// Bytes per second over all the user's connections (kernel-enforced).
    pub bytes: BucketParams,
    /// Connections open at once; 0 = no limit (judged at the handshake).
    pub concurrent_connections: u32,
    /// New connections (judged at the handshake).
    pub new_connections: BucketParams,
    /// How long a user may stay over its byte budget before its
    /// connections are cut.
    pub over_budget_timeout: std::time::Duration,
}

/// The validated per-user settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserPolicy {
    pub per_user: UserLimits,
    /// By class name, in name order; a class's index in the kernel's budget
    /// table is its place in this order plus one (0 is `per_user`).
    pub classes: std::collections::BTreeMap<String, UserLimits>,
    pub max_users: u32,
    /// `ban.users`: a user cut for staying over budget is banned for `ban.duration`.
    pub ban_users: bool,
}

impl UserPolicy {
    /// The class index (0: `per_user`, for no class or an unknown one) and
    /// the limits of a user of class `class`.
    pub fn limits(&self, class: Option<&str>) -> (u32, &UserLimits) {
        class
            .and_then(|name| {
                self.classes
                    .iter()
                    .position(|(n, _)| n == name)
                    .map(|i| (i as u32 + 1, &self.classes[name]))
            })
            .unwrap_or((0, &self.per_user))
    }

    /// The byte budget of each class index, for the kernel's table.
    pub fn budgets(&self) -> Vec<wsguard_common::UserBudget> {
        std::iter::once(&self.per_user)
            .chain(self.classes.values())
            .map(|l| wsguard_common::UserBudget {
                bytes: l.bytes,
                over_budget_timeout_ns: l.over_budget_timeout.as_nanos() as u64,
            })
            .collect()
    }
}

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

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub file: PathBuf,
    /// The `[agent]` table; its `interfaces` are [`Config::interfaces`].
    pub agent: Agent,
    /// The interfaces to protect (`agent.interfaces`).
    pub interfaces: Vec<String>,
    pub ports: Vec<u16>,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// As written, for the summary; the kernel reads them from `settings`.
    pub(in crate::config) limits: Limits,
    pub(in crate::config) ban: Ban,
    /// How long rejections are counted towards a ban (`ban.window`).
    pub ban_window: std::time::Duration,
    /// How long a ban lasts (`ban.duration`).
    pub ban_duration: std::time::Duration,
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
    pub max_sources: u32,
    pub max_bans: u32,
    /// Where /metrics is served; `None` when off.
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub events_output: EventsOutput,
    pub handshake: HandshakeConfig,
    pub syn_cookies: SynCookies,
    /// Budgets of users named by version 2 tickets.
    pub users: UserPolicy,
    /// `[fleet]`, when this host shares its decisions.
    pub fleet: Option<FleetConfig>,
    /// What the kernel programs read, derived once here.
    pub settings: Settings,
}

/// `[fleet]`, validated (see the README's "A fleet of hosts").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetConfig {
    pub redis_url: String,
    pub username: Option<String>,
    /// Read from `password_file` when the config is loaded.
    pub password: Option<String>,
    /// The CA certificates (PEM) read from `ca_file` when the config is
    /// loaded; `None`: the system's.
    pub ca_pem: Option<Vec<u8>>,
    pub key_prefix: String,
    pub host_id: String,
    pub accept_allow: bool,
    pub outbox_size: usize,
    /// `[limits.fleet.per_source]`: a source over either, summed over the
    /// fleet, is banned on every host.
    pub limits: FleetLimits,
    /// `ban.duration`, for the bans the fleet's limits earn.
    pub ban_duration: std::time::Duration,
}

/// `[limits.fleet.per_source]`, per second.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FleetLimits {
    pub new_connections: Option<f64>,
    pub bytes: Option<f64>,
}

impl Eq for FleetLimits {}

impl FleetLimits {
    pub fn any(&self) -> bool {
        self.new_connections.is_some() || self.bytes.is_some()
    }
}

impl FleetConfig {
    /// The URL with any password in it hidden, for logs and status.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.redis_url)
    }
}

/// `scheme://user:secret@host` as `scheme://user:***@host`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((credentials, host)) => match credentials.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => format!("{scheme}://***@{host}"),
        },
        None => url.to_string(),
    }
}

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

impl Config {
    /// The settings that differ between `self` and `new` and take effect only
    /// on restart (they size or place kernel objects, or open the agent's
    /// outputs): a reload that changes one is refused.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let (old, new) = (self, new);
        [
            ("agent.interfaces", old.interfaces != new.interfaces),
            ("agent.xdp_mode", old.agent.xdp_mode != new.agent.xdp_mode),
            ("agent.pin_path", old.agent.pin_path != new.agent.pin_path),
            ("agent.cgroup", old.agent.cgroup != new.agent.cgroup),
            ("tracking.max_sources", old.max_sources != new.max_sources),
            ("tracking.max_bans", old.max_bans != new.max_bans),
            (
                "limits.per_user.max_users",
                old.users.max_users != new.users.max_users,
            ),
            (
                "handshake.max_connections",
                old.handshake.max_connections != new.handshake.max_connections,
            ),
            ("metrics.listen", old.metrics_listen != new.metrics_listen),
            ("events.output", old.events_output != new.events_output),
            ("fleet", old.fleet != new.fleet),
            (
                "handshake.inspect_ports (turning inspection on or off)",
                old.handshake.ports.is_empty() != new.handshake.ports.is_empty(),
            ),
            (
                "limits.per_source.concurrent_connections (turning it on or off)",
                (old.settings.max_concurrent == 0) != (new.settings.max_concurrent == 0),
            ),
        ]
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(key, _)| key)
        .collect()
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

#[cfg(test)]
mod tests;
