//! The plain-language summary `check-config` and the agent print.

use super::*;

/// A bucket's rate and burst in words ("unlimited" for no limit).
fn rate_text(params: &BucketParams, bytes: bool) -> String {
    if params.is_unlimited() {
        return "unlimited".to_string();
    }
    let per_second =
        (params.refill_per_ns as u128 * 1_000_000_000 / params.unit.max(1) as u128) as u64;
    if bytes {
        format!(
            "{}/s (burst {})",
            ByteSize(per_second),
            ByteSize(params.burst())
        )
    } else {
        format!("{per_second}/s (burst {})", params.burst())
    }
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
        let user = |l: &UserLimits| {
            format!(
                "bytes {}, concurrent connections {}, new connections {}, cut after {} over budget",
                rate_text(&l.bytes, true),
                match l.concurrent_connections {
                    0 => "unlimited".to_string(),
                    n => n.to_string(),
                },
                rate_text(&l.new_connections, false),
                HumanDuration(l.over_budget_timeout),
            )
        };
        let tickets_required = self
            .handshake
            .policy
            .ticket
            .as_ref()
            .is_some_and(|t| t.required);
        let _ = writeln!(
            s,
            "  per user{}: {}; up to {} users{}",
            if tickets_required {
                " (version 2 tickets)"
            } else {
                " (unused: tickets are not required)"
            },
            user(&self.users.per_user),
            self.users.max_users,
            if self.users.ban_users {
                format!(
                    ", a user cut for it is banned for {}",
                    self.ban.duration.get_ref()
                )
            } else {
                String::new()
            },
        );
        for (name, limits) in &self.users.classes {
            let _ = writeln!(s, "  class {name}: {}", user(limits));
        }
        let dry = self.settings.dry_run;
        let mode = if dry == 0 {
            "enforcing".to_string()
        } else if dry == Settings::DRY_RUN_ALL {
            "dry run: everything counted as would-drop, nothing dropped".to_string()
        } else {
            let families: Vec<&str> = DRY_RUN_FAMILIES
                .iter()
                .filter(|family| dry & family.bit != 0)
                .map(|family| family.name)
                .collect();
            format!(
                "dry run for {} (counted as would-drop), enforcing the rest",
                families.join(" and ")
            )
        };
        if let Some(fleet) = &self.fleet {
            let _ = writeln!(s, "  {}", crate::fleet::summary(fleet));
        }
        let _ = write!(s, "  mode: {mode}");
        s
    }
}
