//! Decisions the CLI makes (`deny`/`allow add|del`, `bans add|del`) write
//! the pinned maps directly; for the fleet to hear of them, the CLI also
//! appends them to a spool file next to the running agent's file and sends
//! the agent SIGUSR1, and the agent drains the spool into its outbox (also
//! every 100 ms, should a signal be lost). Only while an agent with
//! `[fleet]` runs: a host outside a fleet keeps its decisions to itself.

use std::{
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::agent_file::{self, AgentFile};

/// One operator decision, as the CLI spools it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Spooled {
    /// `bans del ADDR` (the agent finds the tracking prefix).
    BanLifted {
        addr: IpAddr,
    },
    /// `bans add --user` (wall-clock ms; 0 until lifted).
    UserBanned {
        user: String,
        until_ms: u64,
    },
    UserBanLifted {
        user: String,
    },
    /// `deny|allow add` (wall-clock ms; 0 until removed).
    Listed {
        allow: bool,
        net: IpNet,
        until_ms: u64,
    },
    Unlisted {
        allow: bool,
        net: IpNet,
    },
}

fn path(pin_dir: &Path) -> PathBuf {
    agent_file::path_for(pin_dir).with_extension("fleet-spool")
}

/// Appends `decision` for the running agent, if it shares its decisions
/// with a fleet. A failure is reported but does not undo the local change.
pub fn record(pin_dir: &Path, decision: Spooled) {
    let Some(agent) = AgentFile::read_running(pin_dir).filter(|f| f.fleet) else {
        return;
    };
    let append = || -> Result<()> {
        let mut line = serde_json::to_vec(&decision)?;
        line.push(b'\n');
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path(pin_dir))?
            .write_all(&line)?;
        Ok(())
    };
    match append() {
        // SAFETY: kill(2) with the pid the agent file names.
        Ok(()) => unsafe {
            libc::kill(agent.pid as i32, libc::SIGUSR1);
        },
        Err(e) => eprintln!("wsguard: warning: the fleet will not hear of this change: {e:#}"),
    }
}

/// Takes what the CLI spooled since the last call.
pub fn drain(pin_dir: &Path) -> Vec<Spooled> {
    let spool = path(pin_dir);
    let taken = spool.with_extension("fleet-spool.draining");
    if std::fs::rename(&spool, &taken).is_err() {
        return Vec::new();
    }
    let read = || -> Result<Vec<Spooled>> {
        let file = std::fs::File::open(&taken).context("opening the spool")?;
        let mut out = Vec::new();
        for line in BufReader::new(file).lines() {
            match serde_json::from_str(&line?) {
                Ok(decision) => out.push(decision),
                Err(e) => warn!("fleet: skipping a spooled decision it cannot read: {e}"),
            }
        }
        Ok(out)
    };
    let decisions = read().unwrap_or_else(|e| {
        warn!("fleet: cannot read {}: {e:#}", taken.display());
        Vec::new()
    });
    let _ = std::fs::remove_file(&taken);
    decisions
}
