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
    kernel::{PinnedState, lists, monotonic_ns},
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
    match ttl {
        Some(t) => println!("{} {net}: added for {t}", list_name(allow)),
        None => println!("{} {net}: added until removed", list_name(allow)),
    }
    Ok(())
}

pub fn list_del(state: &mut PinnedState, allow: bool, net: &IpNet) -> Result<()> {
    state.with_list(allow, |list| lists::remove_runtime(list, net))?;
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

pub fn bans_print(state: &PinnedState, as_json: bool) -> Result<()> {
    let now = monotonic_ns();
    let mut bans: Vec<_> = state
        .bans()?
        .into_iter()
        .filter(|(_, b)| b.until_ns > now)
        .collect();
    bans.sort_by_key(|(_, b)| b.until_ns);
    if as_json {
        let doc: Vec<_> = bans
            .iter()
            .map(|(k, b)| {
                json!({
                    "source": IpAddr::from(*k).to_string(),
                    "banned_for_seconds": (now.saturating_sub(b.since_ns)) as f64 / 1e9,
                    "remaining_seconds": (b.until_ns - now) as f64 / 1e9,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        for (k, b) in bans {
            println!(
                "{}\t{:.0}s left",
                IpAddr::from(k),
                (b.until_ns - now) as f64 / 1e9
            );
        }
    }
    Ok(())
}

pub fn bans_del(state: &mut PinnedState, addr: IpAddr) -> Result<()> {
    if !state.remove_ban_of(addr)? {
        bail!("{addr} is not banned");
    }
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
