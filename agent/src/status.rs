//! `wsguard status`: what the kernel is enforcing, read from the pinned maps.

use std::{net::IpAddr, path::Path};

use anyhow::Result;
use serde_json::json;
use wsguard_common::{Counter, Reason, SourceKey};

use crate::kernel::{PinnedState, monotonic_ns};

/// A source key as an address (IPv4 keys unmapped).
pub fn source_addr(key: &SourceKey) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(key.addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

pub fn format_counters(counters: &[(Reason, Counter)]) -> String {
    let mut out = format!("  {:<24} {:>14} {:>16}\n", "reason", "packets", "bytes");
    for (reason, c) in counters {
        let verdict = if reason.is_drop() { "dropped" } else if reason.name().starts_with("pass") || *reason == Reason::AllowListed { "passed" } else { "event" };
        out.push_str(&format!("  {:<24} {:>14} {:>16}   {verdict}\n", reason.name(), c.packets, c.bytes));
    }
    out.pop();
    out
}

pub fn print(pin_dir: &Path, as_json: bool) -> Result<()> {
    let state = PinnedState::open(pin_dir)?;
    let counters = state.counters()?;
    let now = monotonic_ns();
    let bans = state.bans()?;
    let active_bans: Vec<_> = bans.iter().filter(|(_, b)| b.until_ns > now).collect();
    let connections = state.connections()?;
    let tracked = state.tracked_sources()?.len();
    if as_json {
        let doc = json!({
            "pin_dir": pin_dir,
            "tracked_sources": tracked,
            "counters": counters.iter().map(|(r, c)| (r.name().to_string(), json!({"packets": c.packets, "bytes": c.bytes}))).collect::<serde_json::Map<_, _>>(),
            "bans": active_bans.iter().map(|(k, b)| json!({
                "source": source_addr(k).to_string(),
                "remaining_seconds": (b.until_ns - now) as f64 / 1e9,
            })).collect::<Vec<_>>(),
            "open_connections": connections.iter().map(|(k, n)| json!({"source": source_addr(k).to_string(), "open": n})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("wsguard status (state pinned at {})", pin_dir.display());
    println!("  tracked sources: {tracked}   active bans: {}   sources with open connections: {}", active_bans.len(), connections.len());
    println!("{}", format_counters(&counters));
    for (key, ban) in active_bans {
        println!("  banned: {} for {:.0} s more", source_addr(key), (ban.until_ns - now) as f64 / 1e9);
    }
    Ok(())
}
