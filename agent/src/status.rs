//! What an agent enforces and has done, read from its pins: `wsguard status`,
//! the metrics endpoint and `wsguard top` all start from a [`Snapshot`].

use crate::kernel::Maps;
use std::{net::IpAddr, path::PathBuf};

use anyhow::Result;
use serde_json::json;
use wsguard_common::{Ban, Counter, Reason, SourceKey, maps::names};

use crate::{
    agent_file::AgentFile,
    kernel::{PinnedState, monotonic_ns},
};

/// "passed", "dropped", "answered" (a SYN answered with a cookie) or
/// "event", for a reason.
pub fn verdict(reason: Reason) -> &'static str {
    if reason == Reason::SynCookieSent {
        "answered"
    } else if reason.is_drop() {
        "dropped"
    } else if matches!(
        reason,
        Reason::Passed | Reason::AllowListed | Reason::PassedFragment
    ) {
        "passed"
    } else {
        "event"
    }
}

pub fn format_counters(counters: &[(Reason, Counter)]) -> String {
    let mut out = format!("  {:<24} {:>14} {:>16}\n", "reason", "packets", "bytes");
    for (reason, c) in counters {
        out.push_str(&format!(
            "  {:<24} {:>14} {:>16}   {}\n",
            reason.name(),
            c.packets,
            c.bytes,
            verdict(*reason)
        ));
    }
    out.pop();
    out
}

pub struct LinkStatus {
    pub name: String,
    pub program_id: Option<u32>,
}

/// Run statistics of an attached program (zero unless the kernel keeps
/// them: sysctl kernel.bpf_stats_enabled=1).
pub struct ProgramStats {
    pub link: String,
    pub run_count: u64,
    pub run_time_ns: u64,
}

/// Everything `status` shows, read at one moment.
pub struct Snapshot {
    pub pin_dir: PathBuf,
    /// The running agent, if any.
    pub agent: Option<AgentFile>,
    pub links: Vec<LinkStatus>,
    pub programs: Vec<ProgramStats>,
    pub counters: Vec<(Reason, Counter)>,
    /// What dry-run counted instead of dropping.
    pub would_drop: Vec<(Reason, Counter)>,
    pub tracked_sources: usize,
    pub max_sources: u32,
    /// Active bans.
    pub bans: Vec<(SourceKey, Ban)>,
    pub max_bans: u32,
    pub open_connections: Vec<(SourceKey, u64)>,
    pub allow_entries: usize,
    pub deny_entries: usize,
    /// Entries in the user map (users with a budget or a ban), its capacity,
    /// connections bound to a user, and banned users.
    pub users: usize,
    pub max_users: u32,
    pub bound_connections: usize,
    pub banned_users: usize,
    pub now_ns: u64,
}

impl Snapshot {
    pub fn take(state: &PinnedState) -> Result<Snapshot> {
        let now_ns = monotonic_ns();
        let bans = state
            .bans()?
            .into_iter()
            .filter(|(_, b)| b.until_ns > now_ns)
            .collect();
        let applies = |allow| -> Result<usize> {
            Ok(state
                .list_entries(allow)?
                .iter()
                .filter(|(_, e)| e.applies(now_ns))
                .count())
        };
        let links: Vec<LinkStatus> = state
            .links()
            .into_iter()
            .map(|(name, program_id)| LinkStatus { name, program_id })
            .collect();
        let infos: Vec<_> = aya::programs::loaded_programs()
            .filter_map(|p| p.ok())
            .collect();
        let programs = links
            .iter()
            .filter_map(|l| {
                let info = infos.iter().find(|i| Some(i.id()) == l.program_id)?;
                Some(ProgramStats {
                    link: l.name.clone(),
                    run_count: info.run_count(),
                    run_time_ns: info.run_time().as_nanos() as u64,
                })
            })
            .collect();
        let users = state.users()?;
        Ok(Snapshot {
            users: users.len(),
            max_users: state.capacity(names::USERS)?,
            bound_connections: state.user_flows()?.len(),
            banned_users: users.iter().filter(|(_, u)| u.is_banned(now_ns)).count(),
            pin_dir: state.dir().to_owned(),
            agent: AgentFile::read_running(state.dir()),
            links,
            programs,
            counters: state.counters()?,
            would_drop: state.would_drop()?,
            tracked_sources: state.tracked_source_count()? as usize,
            max_sources: state.source_capacity()?,
            bans,
            max_bans: state.capacity(names::BANS)?,
            open_connections: state.connections()?,
            allow_entries: applies(true)?,
            deny_entries: applies(false)?,
            now_ns,
        })
    }

    pub fn counter(&self, reason: Reason) -> Counter {
        self.counters
            .iter()
            .find(|(r, _)| *r == reason)
            .map(|(_, c)| *c)
            .unwrap_or_default()
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "pin_dir": self.pin_dir,
            "agent": self.agent.as_ref().map(|a| json!({
                "running": true,
                "pid": a.pid,
                "config": a.config,
                "config_loaded_at_unix": a.config_loaded_at,
                "interfaces": a.interfaces,
                "xdp_mode": a.xdp_mode,
                "reloads": a.reloads,
                "last_reload_error": a.last_reload_error,
                "pending_handshakes": a.pending_handshakes,
                "ticket_replay_cache": a.ticket_replay_cache.map(|(used, capacity)| json!({"entries": used, "capacity": capacity})),
            })).unwrap_or_else(|| json!({"running": false})),
            "attached": self.links.iter().map(|l| json!({"link": l.name, "program_id": l.program_id})).collect::<Vec<_>>(),
            "maps": {
                "tracked_sources": self.tracked_sources,
                "max_sources": self.max_sources,
                "active_bans": self.bans.len(),
                "max_bans": self.max_bans,
                "sources_with_open_connections": self.open_connections.len(),
                "allow_entries": self.allow_entries,
                "deny_entries": self.deny_entries,
                "users": self.users,
                "max_users": self.max_users,
                "user_bound_connections": self.bound_connections,
                "banned_users": self.banned_users,
            },
            "counters": self.counters.iter().map(|(r, c)| (r.name().to_string(), json!({"packets": c.packets, "bytes": c.bytes, "verdict": verdict(*r)}))).collect::<serde_json::Map<_, _>>(),
            "would_drop": self.would_drop.iter().filter(|(r, _)| r.is_drop() || *r == Reason::BanStarted).map(|(r, c)| (r.name().to_string(), json!({"packets": c.packets, "bytes": c.bytes}))).collect::<serde_json::Map<_, _>>(),
            "bans": self.bans.iter().map(|(k, b)| json!({
                "source": IpAddr::from(*k).to_string(),
                "remaining_seconds": (b.until_ns - self.now_ns) as f64 / 1e9,
            })).collect::<Vec<_>>(),
            "open_connections": self.open_connections.iter().map(|(k, n)| json!({"source": IpAddr::from(*k).to_string(), "open": n})).collect::<Vec<_>>(),
        })
    }

    pub fn to_text(&self) -> String {
        let mut out = format!(
            "wsguard status (state pinned at {})\n",
            self.pin_dir.display()
        );
        match &self.agent {
            Some(a) => {
                let loaded =
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(a.config_loaded_at);
                let ago = std::time::SystemTime::now()
                    .duration_since(loaded)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                out += &format!(
                    "  agent: running (pid {}), config {} loaded {ago}s ago; interfaces {} (xdp mode {})\n",
                    a.pid,
                    a.config.display(),
                    a.interfaces.join(", "),
                    a.xdp_mode
                );
                if let Some(e) = &a.last_reload_error {
                    out += &format!("  last reload rejected: {e}\n");
                }
                out += &format!("  handshakes awaiting a verdict: {}", a.pending_handshakes);
                if let Some((used, capacity)) = a.ticket_replay_cache {
                    out += &format!("   single-use tickets remembered: {used}/{capacity}");
                }
                out += "\n";
            }
            None => out += "  agent: not running\n",
        }
        if self.links.is_empty() {
            out += match &self.agent {
                Some(a) => format!("  attached: by the running agent only (fail-open: detached when it exits), on {}\n", a.interfaces.join(", ")),
                None => "  attached: nothing\n".to_string(),
            }
            .as_str();
        } else {
            let links: Vec<String> = self
                .links
                .iter()
                .map(|l| match l.program_id {
                    Some(id) => format!("{} (program {id})", l.name),
                    None => l.name.clone(),
                })
                .collect();
            out += &format!("  attached: {}\n", links.join(", "));
        }
        let pct = |n: usize, max: u32| {
            if max == 0 {
                0.0
            } else {
                n as f64 * 100.0 / max as f64
            }
        };
        out += &format!(
            "  tracked sources: {}/{} ({:.1}%)   active bans: {}/{}   sources with open connections: {}   allow entries: {}   deny entries: {}\n",
            self.tracked_sources,
            self.max_sources,
            pct(self.tracked_sources, self.max_sources),
            self.bans.len(),
            self.max_bans,
            self.open_connections.len(),
            self.allow_entries,
            self.deny_entries,
        );
        out += &format!(
            "  users: {}/{} ({:.1}%)   connections bound to a user: {}   banned users: {}\n",
            self.users,
            self.max_users,
            pct(self.users, self.max_users),
            self.bound_connections,
            self.banned_users,
        );
        out += &format_counters(&self.counters);
        let dry: Vec<String> = self
            .would_drop
            .iter()
            .filter(|(_, c)| c.packets != 0)
            .map(|(r, c)| format!("{} {} packets", r.name(), c.packets))
            .collect();
        if !dry.is_empty() {
            out += &format!("\n  dry run would have dropped: {}", dry.join(", "));
        }
        for (key, ban) in &self.bans {
            out += &format!(
                "\n  banned: {} for {:.0} s more",
                IpAddr::from(*key),
                (ban.until_ns - self.now_ns) as f64 / 1e9
            );
        }
        out
    }
}
