//! Runtime control through the pinned maps: allow/deny list entries, bans,
//! and reload. These work whether or not the agent runs (except reload): the
//! kernel programs read the same maps.

use crate::kernel::Maps;
use std::{net::IpAddr, path::Path, time::Duration};

use anyhow::{Context, Result, bail};
use ipnet::IpNet;
use serde_json::json;
use wsguard_common::ListEntry;

use crate::{
    agent_file::AgentFile,
    config::{HumanDuration, parse_cidr},
    fleet::{
        decision::now_ms,
        spool::{self, Spooled},
    },
    kernel::{PinnedState, lists, monotonic_ns},
    users,
};

/// Bad operator input (exit code 2), as opposed to a failure to carry it out.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

pub fn cidr(text: &str) -> Result<IpNet> {
    parse_cidr(text).map_err(|e| InputError(e).into())
}

pub fn ttl(text: &str) -> Result<HumanDuration> {
    let ttl = HumanDuration::parse(text).map_err(|e| InputError(format!("--ttl: {e}")))?;
    if ttl.0.is_zero() {
        bail!(InputError("--ttl must be longer than zero".into()));
    }
    Ok(ttl)
}

fn list_name(allow: bool) -> &'static str {
    if allow { "allow" } else { "deny" }
}

pub fn list_add(
    state: &mut PinnedState,
    allow: bool,
    net: &IpNet,
    ttl: Option<HumanDuration>,
) -> Result<()> {
    let expires = ttl.map_or(0, |t| monotonic_ns() + t.nanos());
    state.with_list(allow, |list| lists::add_runtime(list, net, expires))?;
    spool::record(
        state.dir(),
        Spooled::Listed {
            allow,
            net: *net,
            until_ms: ttl.map_or(0, |t| now_ms() + t.0.as_millis() as u64),
        },
    );
    match ttl {
        Some(t) => println!("{} {net}: added for {t}", list_name(allow)),
        None => println!("{} {net}: added until removed", list_name(allow)),
    }
    Ok(())
}

pub fn list_del(state: &mut PinnedState, allow: bool, net: &IpNet) -> Result<()> {
    state.with_list(allow, |list| lists::remove_runtime(list, net))?;
    spool::record(state.dir(), Spooled::Unlisted { allow, net: *net });
    println!("{} {net}: removed", list_name(allow));
    Ok(())
}

pub fn list_print(state: &PinnedState, allow: bool, as_json: bool) -> Result<()> {
    let now = monotonic_ns();
    let rows: Vec<_> = state
        .list_entries(allow)?
        .into_iter()
        .filter(|(_, e)| e.applies(now))
        .map(|(net, e)| {
            let mut origin = Vec::new();
            if e.origin & ListEntry::FROM_CONFIG != 0 {
                origin.push("config");
            }
            if e.origin & ListEntry::FROM_RUNTIME != 0 {
                origin.push("runtime");
            }
            let remaining = (e.expires_ns != 0 && e.origin & ListEntry::FROM_RUNTIME != 0)
                .then(|| (e.expires_ns - now) as f64 / 1e9);
            (net, origin.join("+"), remaining)
        })
        .collect();
    if as_json {
        let doc: Vec<_> = rows
            .iter()
            .map(|(net, origin, remaining)| json!({"cidr": net.to_string(), "origin": origin, "expires_in_seconds": remaining}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        for (net, origin, remaining) in rows {
            match remaining {
                Some(s) => println!("{net}\t{origin}\texpires in {s:.0}s"),
                None => println!("{net}\t{origin}"),
            }
        }
    }
    Ok(())
}

/// Source bans, then user bans (a user ban without a TTL shows no
/// remaining time).
pub fn bans_print(state: &PinnedState, as_json: bool) -> Result<()> {
    let now = monotonic_ns();
    let mut bans: Vec<_> = state
        .bans()?
        .into_iter()
        .filter(|(_, b)| b.until_ns > now)
        .collect();
    bans.sort_by_key(|(_, b)| b.until_ns);
    let mut user_bans: Vec<(String, u64)> = state
        .users()?
        .into_iter()
        .filter(|(_, u)| u.is_banned(now))
        .map(|(_, u)| (users::id_of(&u), u.banned_until_ns))
        .collect();
    user_bans.sort();
    let remaining = |until: u64| (until != u64::MAX).then(|| (until - now) as f64 / 1e9);
    if as_json {
        let mut doc: Vec<_> = bans
            .iter()
            .map(|(k, b)| {
                json!({
                    "source": IpAddr::from(*k).to_string(),
                    "banned_for_seconds": (now.saturating_sub(b.since_ns)) as f64 / 1e9,
                    "remaining_seconds": (b.until_ns - now) as f64 / 1e9,
                })
            })
            .collect();
        doc.extend(
            user_bans
                .iter()
                .map(|(user, until)| json!({"user": user, "remaining_seconds": remaining(*until)})),
        );
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        for (k, b) in bans {
            println!(
                "{}\t{:.0}s left",
                IpAddr::from(k),
                (b.until_ns - now) as f64 / 1e9
            );
        }
        for (user, until) in user_bans {
            match remaining(until) {
                Some(left) => println!("user {user}\t{left:.0}s left"),
                None => println!("user {user}\tuntil lifted"),
            }
        }
    }
    Ok(())
}

/// A user id as the CLI takes it (the rules a ticket's user id follows).
pub fn user_id(text: &str) -> Result<String> {
    crate::handshake::ticket::User::new(text, None)
        .map(|u| u.id)
        .map_err(|e| InputError(format!("--user: {e}")).into())
}

/// Bans a user: its tickets are refused and its bound connections' bytes
/// dropped at once; the running agent cuts its connections.
pub fn bans_add_user(
    state: &mut PinnedState,
    user: &str,
    ttl: Option<HumanDuration>,
) -> Result<()> {
    let until = ttl.map_or(u64::MAX, |t| monotonic_ns() + t.nanos());
    ban_user(state, user, until)?;
    // The fleet shares bans with an end: one without lasts a year there.
    let fleet_until = now_ms() + ttl.map_or(365 * 24 * 3600 * 1000, |t| t.0.as_millis() as u64);
    spool::record(
        state.dir(),
        Spooled::UserBanned {
            user: user.to_string(),
            until_ms: fleet_until,
        },
    );
    match ttl {
        Some(t) => println!("user {user}: banned for {t}"),
        None => println!("user {user}: banned until lifted"),
    }
    Ok(())
}

pub fn bans_del_user(state: &mut PinnedState, user: &str) -> Result<()> {
    if !lift_user_ban(state, user)? {
        bail!("user {user} is not banned");
    }
    spool::record(
        state.dir(),
        Spooled::UserBanLifted {
            user: user.to_string(),
        },
    );
    println!("user {user}: ban lifted");
    Ok(())
}

/// Bans `user` until `until_ns` (CLOCK_MONOTONIC; `u64::MAX`: until
/// lifted), creating its entry if it has none; a longer ban it already
/// has is kept.
pub fn ban_user(state: &mut impl Maps, user: &str, until_ns: u64) -> Result<()> {
    let key = users::user_key(user);
    if let Some(existing) = state.user(key) {
        if users::id_of(&existing) != user {
            bail!(
                "user {user} shares its key with user {}; it cannot be banned apart",
                users::id_of(&existing)
            );
        }
        state.update_user(key, |s| {
            s.banned_until_ns = s.banned_until_ns.max(until_ns);
        })?;
    } else {
        let mut entry = users::new_state(user, 0, None);
        entry.banned_until_ns = until_ns;
        state
            .set_user(key, entry, true)
            .with_context(|| format!("cannot ban user {user}: the user map is full"))?;
    }
    Ok(())
}

/// Lifts `user`'s ban; whether it had one.
pub fn lift_user_ban(state: &mut impl Maps, user: &str) -> Result<bool> {
    let key = users::user_key(user);
    match state.user(key) {
        Some(u) if users::id_of(&u) == user && u.is_banned(monotonic_ns()) => {
            state.update_user(key, |s| s.banned_until_ns = 0)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// The busiest users over `interval`: bytes/s, connections, time over
/// budget, class, ban.
pub fn users_print(
    state: &PinnedState,
    interval: Duration,
    limit: usize,
    as_json: bool,
) -> Result<()> {
    let before: std::collections::HashMap<_, _> = state.users()?.into_iter().collect();
    let started = std::time::Instant::now();
    std::thread::sleep(interval);
    let elapsed = started.elapsed().as_secs_f64();
    let now = monotonic_ns();
    let mut connections: std::collections::HashMap<u64, usize> = Default::default();
    for (_, key) in state.user_flows()? {
        *connections.entry(key).or_default() += 1;
    }
    let mut rows: Vec<_> = state
        .users()?
        .into_iter()
        .map(|(key, u)| {
            let earlier = before.get(&key).map_or(u.total_bytes, |b| b.total_bytes);
            let dropped = before.get(&key).map_or(0, |b| u.dropped_bytes.saturating_sub(b.dropped_bytes));
            json!({
                "user": users::id_of(&u),
                "class": users::class_of(&u),
                "bytes_per_second": (u.total_bytes.saturating_sub(earlier) as f64 / elapsed).round(),
                "dropped_bytes_per_second": (dropped as f64 / elapsed).round(),
                "connections": connections.get(&key).copied().unwrap_or(0),
                "over_budget_seconds": state
                    .user_budget(u.class)
                    .map_or(0, |b| u.over_budget_ns(&b.bytes, now)) as f64 / 1e9,
                "banned": u.is_banned(now),
            })
        })
        .collect();
    rows.sort_by(|a, b| {
        let rate = |r: &serde_json::Value| r["bytes_per_second"].as_f64().unwrap_or(0.0);
        rate(b).total_cmp(&rate(a))
    });
    rows.truncate(limit);
    if as_json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<32} {:<12} {:>12} {:>12} {:>5} {:>10} {:>6}",
        "USER", "CLASS", "BYTES/S", "DROPPED/S", "CONNS", "OVER (S)", "BANNED"
    );
    for r in rows {
        println!(
            "{:<32} {:<12} {:>12} {:>12} {:>5} {:>10.1} {:>6}",
            r["user"].as_str().unwrap_or(""),
            r["class"].as_str().unwrap_or("-"),
            r["bytes_per_second"],
            r["dropped_bytes_per_second"],
            r["connections"],
            r["over_budget_seconds"].as_f64().unwrap_or(0.0),
            if r["banned"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
        );
    }
    Ok(())
}

pub fn bans_del(state: &mut PinnedState, addr: IpAddr) -> Result<()> {
    if !state.remove_ban_of(addr)? {
        bail!("{addr} is not banned");
    }
    spool::record(state.dir(), Spooled::BanLifted { addr });
    println!("{addr}: ban lifted");
    Ok(())
}

/// Signals the running agent to reload and waits for its verdict.
pub fn reload(pin_dir: &Path) -> Result<()> {
    let Some(before) = AgentFile::read_running(pin_dir) else {
        bail!(
            "no wsguard agent is running with its state at {}",
            pin_dir.display()
        );
    };
    if unsafe { libc::kill(before.pid as i32, libc::SIGHUP) } != 0 {
        return Err(std::io::Error::last_os_error())
            .context(format!("cannot signal the agent (pid {})", before.pid));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if let Some(now) = AgentFile::read_running(pin_dir).filter(|f| f.reloads > before.reloads) {
            return match now.last_reload_error {
                None => {
                    println!("reloaded {}", now.config.display());
                    Ok(())
                }
                Some(e) => Err(InputError(format!(
                    "reload rejected, the running config keeps enforcing: {e}"
                ))
                .into()),
            };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "the agent (pid {}) did not answer the reload within 10 s",
        before.pid
    )
}
