//! The protections compared under flood, each set up with the same limits in
//! the lab's server namespace: none, iptables (hashlimit + connlimit),
//! nftables (dynamic sets with limits and ct count), and wsguard.

use std::process::Command;
use wsguard::kernel::Maps;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use wsguard_tests::{Agent, Lab};

/// The limits every contender enforces, per source address, on TCP port
/// [`PORT`]. The byte burst is above one second of the rate because
/// iptables' hashlimit refuses anything smaller in byte mode.
pub const PORT: u16 = 8080;
pub const CONNECTIONS_PER_SECOND: u32 = 20;
pub const CONNECTION_BURST: u32 = 40;
pub const MIB_PER_SECOND: u32 = 4;
pub const BURST_MIB: u32 = 6;
pub const CONCURRENT: u32 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Contender {
    None,
    Iptables,
    Nftables,
    Wsguard,
    /// wsguard attached with `dry_run = true`: every program runs, nothing is
    /// dropped. It separates what attaching costs from what dropping saves.
    WsguardDryRun,
}

impl Contender {
    pub const ALL: [Contender; 5] = [
        Contender::None,
        Contender::Iptables,
        Contender::Nftables,
        Contender::Wsguard,
        Contender::WsguardDryRun,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Contender::None => "no protection",
            Contender::Iptables => "iptables hashlimit + connlimit",
            Contender::Nftables => "nftables sets (limit, ct count)",
            Contender::Wsguard => "wsguard",
            Contender::WsguardDryRun => "wsguard, dry run (attached, drops nothing)",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Contender::None => "none",
            Contender::Iptables => "iptables",
            Contender::Nftables => "nftables",
            Contender::Wsguard => "wsguard",
            Contender::WsguardDryRun => "wsguard-dry",
        }
    }

    /// Puts the protection in place in the lab's server namespace.
    pub fn install(self, lab: &Lab) -> Result<Installed<'_>> {
        let ns = &lab.server.name;
        match self {
            Contender::None => {}
            Contender::Iptables => {
                for rule in iptables_rules() {
                    let args: Vec<&str> = rule.iter().map(String::as_str).collect();
                    netns_exec(ns, "iptables", &args)?;
                }
            }
            Contender::Nftables => {
                let file = std::env::temp_dir().join(format!("wsguard-bench-{}.nft", ns));
                std::fs::write(&file, nft_ruleset())?;
                let applied = netns_exec(ns, "nft", &["-f", &file.display().to_string()]);
                let _ = std::fs::remove_file(&file);
                applied?;
            }
            Contender::Wsguard | Contender::WsguardDryRun => {
                let dry_run = self == Contender::WsguardDryRun;
                let agent = Agent::start_with_agent_keys(
                    lab,
                    &format!("dry_run = {dry_run}"),
                    &wsguard_config(),
                )?;
                return Ok(Installed {
                    contender: self,
                    lab,
                    agent: Some(agent),
                });
            }
        }
        Ok(Installed {
            contender: self,
            lab,
            agent: None,
        })
    }
}

/// A protection in place; removed on drop.
pub struct Installed<'a> {
    pub contender: Contender,
    lab: &'a Lab,
    agent: Option<Agent>,
}

impl Installed<'_> {
    /// Flood packets the protection has stopped before the TCP stack so far:
    /// dropped, or (wsguard with SYN cookies) answered from XDP.
    pub fn dropped(&self) -> Result<u64> {
        let ns = &self.lab.server.name;
        match self.contender {
            Contender::None => Ok(0),
            Contender::Iptables => {
                let listing = netns_exec(ns, "iptables", &["-nvxL", "INPUT"])?;
                Ok(listing
                    .lines()
                    .filter(|l| l.split_whitespace().nth(2) == Some("DROP"))
                    .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                    .sum())
            }
            Contender::Nftables => {
                let listing = netns_exec(ns, "nft", &["list", "table", "inet", "wsguard_bench"])?;
                Ok(listing
                    .split("counter packets ")
                    .skip(1)
                    .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
                    .sum())
            }
            Contender::WsguardDryRun => Ok(0),
            Contender::Wsguard => {
                let agent = self.agent.as_ref().context("agent")?;
                Ok(agent
                    .state()?
                    .counters()?
                    .into_iter()
                    // A SYN answered with a cookie from XDP is stopped
                    // as surely as a dropped one: the TCP stack never sees it.
                    .filter(|(reason, _)| {
                        reason.is_drop() || *reason == wsguard_common::Reason::SynCookieSent
                    })
                    .map(|(_, c)| c.packets)
                    .sum())
            }
        }
    }
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        let ns = &self.lab.server.name;
        match self.contender {
            Contender::Iptables => {
                let _ = netns_exec(ns, "iptables", &["-F", "INPUT"]);
            }
            Contender::Nftables => {
                let _ = netns_exec(ns, "nft", &["delete", "table", "inet", "wsguard_bench"]);
            }
            // The agent stops (and detaches) when dropped.
            Contender::None | Contender::Wsguard | Contender::WsguardDryRun => {}
        }
    }
}

fn netns_exec(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn iptables_rules() -> Vec<Vec<String>> {
    let tcp = format!("-A INPUT -p tcp --dport {PORT}");
    [
        format!("--syn -m connlimit --connlimit-above {CONCURRENT} --connlimit-mask 32 -j DROP"),
        format!(
            "--syn -m hashlimit --hashlimit-name wsg_conn --hashlimit-mode srcip \
             --hashlimit-above {CONNECTIONS_PER_SECOND}/second --hashlimit-burst {CONNECTION_BURST} -j DROP"
        ),
        format!(
            "-m hashlimit --hashlimit-name wsg_bytes --hashlimit-mode srcip \
             --hashlimit-above {MIB_PER_SECOND}mb/second --hashlimit-burst {BURST_MIB}mb -j DROP"
        ),
    ]
    .iter()
    .map(|rule| {
        format!("{tcp} {rule}")
            .split_whitespace()
            .map(str::to_string)
            .collect()
    })
    .collect()
}

/// The same limits as an nftables ruleset (the form `meter` became).
pub fn nft_ruleset() -> String {
    format!(
        "table inet wsguard_bench {{
  set conn_count {{ type ipv4_addr; flags dynamic; size 65536; }}
  set conn_rate {{ type ipv4_addr; flags dynamic, timeout; timeout 1m; size 65536; }}
  set byte_rate {{ type ipv4_addr; flags dynamic, timeout; timeout 1m; size 65536; }}
  chain input {{
    type filter hook input priority filter; policy accept;
    tcp dport {PORT} tcp flags & (syn | ack) == syn add @conn_count {{ ip saddr ct count over {CONCURRENT} }} counter drop
    tcp dport {PORT} tcp flags & (syn | ack) == syn update @conn_rate {{ ip saddr limit rate over {CONNECTIONS_PER_SECOND}/second burst {CONNECTION_BURST} packets }} counter drop
    tcp dport {PORT} update @byte_rate {{ ip saddr limit rate over {MIB_PER_SECOND} mbytes/second burst {BURST_MIB} mbytes }} counter drop
  }}
}}
"
    )
}

/// The same limits as a wsguard config (without `[agent]`). Bans are off:
/// the others have no equivalent, so every drop here is a limit's.
pub fn wsguard_config() -> String {
    format!(
        "[protect]\nports = [{PORT}]\n\
         [limits.per_source]\nnew_connections = \"{CONNECTIONS_PER_SECOND}/s\"\nnew_connections_burst = {CONNECTION_BURST}\n\
         bytes = \"{MIB_PER_SECOND}MiB/s\"\nbytes_burst = \"{BURST_MIB}MiB\"\nconcurrent_connections = {CONCURRENT}\n\
         [limits.global]\nnew_connections = \"1000000000/s\"\nbytes = \"4GiB/s\"\n\
         [ban]\nafter_drops = 0\n"
    )
}

/// The iptables rules as a user would type them, for the report.
pub fn iptables_script() -> String {
    iptables_rules()
        .into_iter()
        .map(|r| format!("iptables {}", r.join(" ")))
        .collect::<Vec<_>>()
        .join("\n")
}
