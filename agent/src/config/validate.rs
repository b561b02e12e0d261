//! Validation: from the file as written to a [`Config`], or the first
//! problem with its place in the file.

use super::*;

/// Largest map sizes accepted, to keep a typo from asking the kernel for
/// gigabytes of memory.
const MAX_TRACKED_SOURCES: u32 = 16 << 20;
const MAX_BANS: u32 = 4 << 20;

type Invalid = (Option<Range<usize>>, String);

fn at<T>(value: &Spanned<T>, reason: impl Into<String>) -> Invalid {
    (Some(value.span()), reason.into())
}

pub(super) fn validate(raw: RawConfig, file: &Path) -> Result<Config, Invalid> {
    let dry_run = if raw.agent.dry_run {
        Settings::DRY_RUN_ALL
    } else {
        DRY_RUN_FAMILIES
            .iter()
            .filter(|family| (family.on)(&raw))
            .fold(0, |bits, family| bits | family.bit)
    };
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
        fleet,
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

    positive(&ban.window, "ban.window")?;
    positive(&ban.duration, "ban.duration")?;

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
    let fleet = validate_fleet_keys(fleet, &limits.fleet, ban.duration.get_ref().0)?;
    let users = validate_users(&limits, &ban)?;

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
        dry_run,
        ban_window_ns: ban.window.get_ref().nanos(),
        ban_duration_ns: ban.duration.get_ref().nanos(),
        syn_cookies: u32::from(syn_cookies.enabled),
        // The table's size and hash key, when the settings are written (apply).
        source_sets: 0,
        source_hash_key: [0; 2],
        clock: Default::default(),
        // For the machine's CPUs, when the settings are written (apply);
        // 0 takes exactly what each packet needs.
        global_connections_share: 0,
        global_bytes_share: 0,
        protected_ports: PortSet::of(ports.iter().copied()),
        inspected_ports: PortSet::of(handshake.ports.iter().copied()),
    };
    Ok(Config {
        file: file.to_owned(),
        interfaces: agent.interfaces.get_ref().clone(),
        ban_window: ban.window.get_ref().0,
        ban_duration: ban.duration.get_ref().0,
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
        users,
        fleet,
        settings,
    })
}

/// Largest `fleet.outbox_size`.
const MAX_OUTBOX: i64 = 1_000_000;

/// A name Redis keys and the fleet's reports carry: 1 to 64 of
/// `A-Z a-z 0-9 . _ -` (and `:` in a key prefix).
fn fleet_name(value: &Spanned<String>, key: &str, colon: bool) -> Result<String, Invalid> {
    let name = value.get_ref();
    let fits = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c) || (colon && c == ':');
    if name.is_empty() || name.len() > 64 || !name.chars().all(fits) {
        return Err(at(
            value,
            format!(
                "{key} \"{name}\" must be 1 to 64 letters, digits, '.', '_' or '-'{}",
                if colon { " (or ':')" } else { "" }
            ),
        ));
    }
    Ok(name.clone())
}

/// A rate per second, or `None` for unlimited.
fn per_second<Q: Quantity>(rate: &Rate<Q>) -> Option<f64> {
    match rate {
        Rate::Unlimited => None,
        Rate::Per { amount, period } => Some(amount.amount() as f64 * 1e9 / period.nanos() as f64),
    }
}

fn validate_fleet_keys(
    keys: Option<FleetKeys>,
    limits: &FleetLimitKeys,
    ban_duration: std::time::Duration,
) -> Result<Option<FleetConfig>, Invalid> {
    let per_source = &limits.per_source;
    let fleet_limits = FleetLimits {
        new_connections: per_source
            .new_connections
            .as_ref()
            .and_then(|r| per_second(r.get_ref())),
        bytes: per_source
            .bytes
            .as_ref()
            .and_then(|r| per_second(r.get_ref())),
    };
    let Some(keys) = keys else {
        if let Some(key) = &per_source.new_connections {
            return Err(at(key, "limits.fleet.per_source needs a [fleet] table"));
        }
        if let Some(key) = &per_source.bytes {
            return Err(at(key, "limits.fleet.per_source needs a [fleet] table"));
        }
        return Ok(None);
    };
    let mut fleet = validate_fleet(keys)?;
    fleet.limits = fleet_limits;
    fleet.ban_duration = ban_duration;
    Ok(Some(fleet))
}

/// `fleet.ca_file`: a PEM file with at least one certificate, for a
/// `rediss://` URL only (elsewhere it would be silently unused).
fn read_ca_file(path: &Spanned<PathBuf>, tls: bool) -> Result<Vec<u8>, Invalid> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let shown = path.get_ref().display();
    if !tls {
        return Err(at(
            path,
            "fleet.ca_file applies to a rediss:// (TLS) fleet.redis_url only",
        ));
    }
    let pem = std::fs::read(path.get_ref())
        .map_err(|e| at(path, format!("cannot read fleet.ca_file {shown}: {e}")))?;
    let certificates: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    match certificates {
        Ok(certificates) if !certificates.is_empty() => Ok(pem),
        Ok(_) => Err(at(
            path,
            format!("fleet.ca_file {shown} holds no PEM certificate"),
        )),
        Err(e) => Err(at(
            path,
            format!("fleet.ca_file {shown} is not valid PEM: {e}"),
        )),
    }
}

fn validate_fleet(keys: FleetKeys) -> Result<FleetConfig, Invalid> {
    let url = keys.redis_url.get_ref();
    let scheme = url.split_once("://").map(|(s, _)| s);
    if !matches!(scheme, Some("redis" | "rediss" | "unix" | "redis+unix")) {
        return Err(at(
            &keys.redis_url,
            format!(
                "fleet.redis_url \"{}\" must start with redis:// (rediss:// for TLS, unix:// for a socket)",
                redact_url(url)
            ),
        ));
    }
    if let Err(e) = redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
        return Err(at(
            &keys.redis_url,
            format!("fleet.redis_url \"{}\": {e}", redact_url(url)),
        ));
    }
    let password = match &keys.password_file {
        Some(path) => {
            let text = std::fs::read_to_string(path.get_ref()).map_err(|e| {
                at(
                    path,
                    format!(
                        "cannot read fleet.password_file {}: {e}",
                        path.get_ref().display()
                    ),
                )
            })?;
            let password = text.lines().next().unwrap_or("").to_string();
            if password.is_empty() {
                return Err(at(
                    path,
                    format!("fleet.password_file {} is empty", path.get_ref().display()),
                ));
            }
            Some(password)
        }
        None => None,
    };
    if let (Some(user), None) = (&keys.username, &password) {
        return Err(at(
            user,
            "fleet.username needs fleet.password_file (the ACL user's password)",
        ));
    }
    let ca_pem = match &keys.ca_file {
        Some(path) => Some(read_ca_file(path, scheme == Some("rediss"))?),
        None => None,
    };
    let host_id = match &keys.host_id {
        Some(id) => fleet_name(id, "fleet.host_id", false)?,
        None => {
            let name = hostname();
            fleet_name(
                &Spanned::new(0..0, name),
                "the hostname (set fleet.host_id)",
                false,
            )?
        }
    };
    let outbox = *keys.outbox_size.get_ref();
    if !(1..=MAX_OUTBOX).contains(&outbox) {
        return Err(at(
            &keys.outbox_size,
            format!("fleet.outbox_size must be 1 to {MAX_OUTBOX}, not {outbox}"),
        ));
    }
    Ok(FleetConfig {
        redis_url: url.clone(),
        ca_pem,
        username: keys.username.map(|u| u.into_inner()),
        password,
        key_prefix: fleet_name(&keys.key_prefix, "fleet.key_prefix", true)?,
        host_id,
        accept_allow: keys.accept_allow,
        outbox_size: outbox as usize,
        limits: FleetLimits::default(),
        ban_duration: std::time::Duration::ZERO,
    })
}

/// This machine's hostname.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// Largest `limits.per_user.max_users`.
const MAX_USERS: u32 = 4 << 20;

/// `[limits.per_user]`, `[limits.class.NAME]` and `ban.users`.
fn validate_users(limits: &Limits, ban: &Ban) -> Result<UserPolicy, Invalid> {
    let keys = &limits.per_user;
    let per_user = user_limits(keys, &ClassLimitKeys::default(), "limits.per_user")?;
    let max_users = *keys.max_users.get_ref();
    if !(1..=MAX_USERS).contains(&max_users) {
        return Err(at(
            &keys.max_users,
            format!("limits.per_user.max_users must be 1 to {MAX_USERS}, not {max_users}"),
        ));
    }
    if limits.class.len() >= wsguard_common::maps::USER_BUDGET_SLOTS as usize {
        return Err((
            None,
            format!(
                "[limits.class.*] names {} classes; at most {} fit",
                limits.class.len(),
                wsguard_common::maps::USER_BUDGET_SLOTS - 1
            ),
        ));
    }
    let mut classes = std::collections::BTreeMap::new();
    for (name, class) in &limits.class {
        if let Err(e) = crate::handshake::ticket::User::new("-", Some(name.get_ref())) {
            return Err(at(name, format!("[limits.class.{}]: {e}", name.get_ref())));
        }
        let limits = user_limits(keys, class, &format!("limits.class.{}", name.get_ref()))?;
        classes.insert(name.get_ref().clone(), limits);
    }
    Ok(UserPolicy {
        per_user,
        classes,
        max_users,
        ban_users: ban.users,
    })
}

/// A user's limits: `class`'s keys where it has them, `[limits.per_user]`'s
/// otherwise; `table` names the table in errors.
fn user_limits(
    keys: &UserLimitKeys,
    class: &ClassLimitKeys,
    table: &str,
) -> Result<UserLimits, Invalid> {
    let bytes = class.bytes.as_ref().unwrap_or(&keys.bytes);
    let bytes_burst = class.bytes_burst.as_ref().unwrap_or(&keys.bytes_burst);
    let connections = class
        .new_connections
        .as_ref()
        .unwrap_or(&keys.new_connections);
    let connections_burst = class
        .new_connections_burst
        .as_ref()
        .unwrap_or(&keys.new_connections_burst);
    let timeout = class
        .over_budget_timeout
        .as_ref()
        .unwrap_or(&keys.over_budget_timeout);
    Ok(UserLimits {
        bytes: bucket(
            bytes,
            Some((bytes_burst.span(), bytes_burst.get_ref().0)),
            &format!("{table}.bytes_burst"),
            |n| ByteSize(n).to_string(),
        )?,
        concurrent_connections: class
            .concurrent_connections
            .unwrap_or(keys.concurrent_connections),
        new_connections: bucket(
            connections,
            Some((connections_burst.span(), *connections_burst.get_ref())),
            &format!("{table}.new_connections_burst"),
            |n| n.to_string(),
        )?,
        over_budget_timeout: positive(timeout, &format!("{table}.over_budget_timeout"))?,
    })
}

/// A duration that must be longer than zero.
fn positive(value: &Spanned<HumanDuration>, key: &str) -> Result<std::time::Duration, Invalid> {
    let duration = value.get_ref().0;
    if duration.is_zero() {
        return Err(at(value, format!("{key} must be longer than zero")));
    }
    Ok(duration)
}

fn validate_handshake(keys: HandshakeKeys, protected: &[u16]) -> Result<HandshakeConfig, Invalid> {
    use crate::handshake::{OriginPattern, PathPattern, Policy, TicketPolicy, ticket};
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
    positive(&keys.deadline, "handshake.deadline")?;
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
            positive(&t.max_age, "handshake.ticket.max_age")?;
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
            missing_origin: keys.missing_origin,
            allowed_hosts: keys
                .allowed_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            allowed_paths,
            max_request_bytes: max_request as usize,
            non_upgrade_requests: keys.non_upgrade_requests,
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
            "rate {rate} with burst {} is beyond what the kernel's 64-bit arithmetic holds to a millionth of the rate (the burst is too large for so small a rate)",
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
    let capacity = wsguard_common::maps::LIST_CAPACITY as usize;
    if let Some(first_over) = entries.get(capacity) {
        return Err(at(
            first_over,
            format!(
                "{key} has {} entries; a list holds at most {capacity} (this is the first one over)",
                entries.len()
            ),
        ));
    }
    entries
        .iter()
        .map(|entry| parse_cidr(entry.get_ref()).map_err(|e| at(entry, format!("{key}: {e}"))))
        .collect()
}
