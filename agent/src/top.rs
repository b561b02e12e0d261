//! `wsguard top`: the busiest sources, refreshed in place.

use crate::kernel::Maps;
use std::{collections::HashMap, time::Duration};

use anyhow::Result;
use wsguard_common::{Reason, SourceKey, SourceState};

use crate::kernel::{PinnedState, monotonic_ns};

/// One source's rates between two samples.
#[derive(Debug, Clone)]
pub struct SourceRates {
    pub source: SourceKey,
    pub packets_per_s: f64,
    pub bytes_per_s: f64,
    pub drops_per_s: [f64; 3],
    pub open_connections: u64,
    pub banned_for_s: Option<f64>,
}

fn rates(
    before: &HashMap<SourceKey, SourceState>,
    after: &[(SourceKey, SourceState)],
    seconds: f64,
) -> Vec<(SourceKey, [f64; 5])> {
    after
        .iter()
        .map(|(key, now)| {
            let then = before.get(key).copied().unwrap_or_default();
            let per_s = |a: u64, b: u64| a.saturating_sub(b) as f64 / seconds;
            (
                *key,
                [
                    per_s(now.total_packets, then.total_packets),
                    per_s(now.total_bytes, then.total_bytes),
                    per_s(now.drops_connection_rate, then.drops_connection_rate),
                    per_s(now.drops_byte_rate, then.drops_byte_rate),
                    per_s(now.drops_concurrency, then.drops_concurrency),
                ],
            )
        })
        .collect()
}

/// SYN cookies per second between two samples: sent, validated, failed.
#[derive(Debug, Clone, Copy, Default)]
pub struct CookieRates {
    pub sent: f64,
    pub validated: f64,
    pub failed: f64,
}

fn cookie_counts(state: &PinnedState) -> Result<[u64; 3]> {
    Ok([
        state.counter(Reason::SynCookieSent)?.packets,
        state.counter(Reason::SynCookieValidated)?.packets,
        state.counter(Reason::SynCookieFailed)?.packets,
    ])
}

/// Samples twice, `interval` apart, and returns the `limit` busiest sources
/// (by bytes per second), banned sources first, and the SYN-cookie rates.
pub fn sample(
    state: &PinnedState,
    interval: Duration,
    limit: usize,
) -> Result<(Vec<SourceRates>, CookieRates)> {
    let before: HashMap<_, _> = state.tracked_sources()?.into_iter().collect();
    let cookies_before = cookie_counts(state)?;
    std::thread::sleep(interval);
    let after = state.tracked_sources()?;
    let cookies_after = cookie_counts(state)?;
    let per_s = |i: usize| {
        cookies_after[i].saturating_sub(cookies_before[i]) as f64 / interval.as_secs_f64()
    };
    let cookies = CookieRates {
        sent: per_s(0),
        validated: per_s(1),
        failed: per_s(2),
    };
    let now = monotonic_ns();
    let bans: HashMap<_, _> = state
        .bans()?
        .into_iter()
        .filter(|(_, b)| b.until_ns > now)
        .collect();
    let open: HashMap<_, _> = state.connections()?.into_iter().collect();
    let mut rows: Vec<SourceRates> = rates(&before, &after, interval.as_secs_f64())
        .into_iter()
        .map(|(source, r)| SourceRates {
            source,
            packets_per_s: r[0],
            bytes_per_s: r[1],
            drops_per_s: [r[2], r[3], r[4]],
            open_connections: open.get(&source).copied().unwrap_or(0),
            banned_for_s: bans.get(&source).map(|b| (b.until_ns - now) as f64 / 1e9),
        })
        .filter(|r| r.packets_per_s > 0.0 || r.banned_for_s.is_some() || r.open_connections > 0)
        .collect();
    rows.sort_by(|a, b| {
        b.banned_for_s
            .is_some()
            .cmp(&a.banned_for_s.is_some())
            .then(b.bytes_per_s.total_cmp(&a.bytes_per_s))
    });
    rows.truncate(limit);
    Ok((rows, cookies))
}

pub fn render(rows: &[SourceRates], cookies: &CookieRates) -> String {
    let mut out = format!(
        "syn cookies/s: sent {:.0}, validated {:.0}, failed {:.0}\n",
        cookies.sent, cookies.validated, cookies.failed
    );
    out += &format!(
        "{:<40} {:>10} {:>12} {:>10} {:>10} {:>10} {:>6} {:>10}\n",
        "source", "pkts/s", "bytes/s", "conn-drop", "byte-drop", "conc-drop", "open", "banned"
    );
    for r in rows {
        let banned = r
            .banned_for_s
            .map_or("-".to_string(), |s| format!("{s:.0}s"));
        out += &format!(
            "{:<40} {:>10.0} {:>12.0} {:>10.0} {:>10.0} {:>10.0} {:>6} {:>10}\n",
            std::net::IpAddr::from(r.source).to_string(),
            r.packets_per_s,
            r.bytes_per_s,
            r.drops_per_s[0],
            r.drops_per_s[1],
            r.drops_per_s[2],
            r.open_connections,
            banned
        );
    }
    out
}

/// Refreshes until interrupted; with `once`, prints one sample and returns.
pub fn run(state: &PinnedState, interval: Duration, limit: usize, once: bool) -> Result<()> {
    loop {
        let (rows, cookies) = sample(state, interval, limit)?;
        if once {
            print!("{}", render(&rows, &cookies));
            return Ok(());
        }
        // Clear the screen and go home, then draw.
        print!(
            "\x1b[2J\x1b[H{} sources shown, refreshed every {:?}\n{}",
            rows.len(),
            interval,
            render(&rows, &cookies)
        );
        use std::io::Write;
        std::io::stdout().flush()?;
    }
}
