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

use crate::{
    agent_file::{self, AgentFile},
    kernel::flock,
};

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

/// Appending and taking the spool take turns through an exclusive lock on
/// this file: without it, the agent could rename the spool between a CLI's
/// open and its write, read it empty and delete it, and the decision would
/// never reach the fleet.
pub(crate) fn lock_path(pin_dir: &Path) -> PathBuf {
    agent_file::path_for(pin_dir).with_extension("fleet-spool.lock")
}

fn open_lock(pin_dir: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path(pin_dir))
}

/// Appends `decision` for the running agent, if it shares its decisions
/// with a fleet. A failure is reported but does not undo the local change.
pub fn record(pin_dir: &Path, decision: Spooled) {
    let Some(agent) = AgentFile::read_running(pin_dir).filter(|f| f.fleet) else {
        return;
    };
    match append(pin_dir, &decision) {
        // SAFETY: kill(2) with the pid the agent file names.
        Ok(()) => unsafe {
            libc::kill(agent.pid as i32, libc::SIGUSR1);
        },
        Err(e) => eprintln!("wsguard: warning: the fleet will not hear of this change: {e:#}"),
    }
}

/// One line on the spool, in the spool's turn.
fn append(pin_dir: &Path, decision: &Spooled) -> Result<()> {
    let mut line = serde_json::to_vec(decision)?;
    line.push(b'\n');
    let lock = open_lock(pin_dir).context("opening the spool's lock")?;
    flock(&lock, libc::LOCK_EX).context("locking the spool")?;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path(pin_dir))?
        .write_all(&line)?;
    Ok(())
}

/// Takes what the CLI spooled since the last call. While a CLI holds the
/// spool's turn, nothing is taken: its nudge, or the next 100 ms tick,
/// takes it.
pub fn drain(pin_dir: &Path) -> Vec<Spooled> {
    let spool = path(pin_dir);
    let taken = spool.with_extension("fleet-spool.draining");
    {
        let Ok(lock) = open_lock(pin_dir) else {
            return Vec::new();
        };
        if flock(&lock, libc::LOCK_EX | libc::LOCK_NB).is_err()
            || std::fs::rename(&spool, &taken).is_err()
        {
            return Vec::new();
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A CLI appending while the agent drains loses nothing: every decision
    /// is taken once.
    #[test]
    fn appends_racing_with_drains_are_all_taken_once() {
        const DECISIONS: u32 = 3000;
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/wsguard-spool-test-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(agent_file::RUN_DIR).unwrap();
        let appender = {
            let pin_dir = pin_dir.clone();
            std::thread::spawn(move || {
                for i in 0..DECISIONS {
                    let net = IpNet::from(IpAddr::from(std::net::Ipv4Addr::from(0xc613_0000 + i)));
                    let decision = Spooled::Listed {
                        allow: false,
                        net,
                        until_ms: i as u64,
                    };
                    append(&pin_dir, &decision).unwrap();
                }
            })
        };
        let mut taken = Vec::new();
        while !appender.is_finished() {
            taken.extend(drain(&pin_dir));
        }
        appender.join().unwrap();
        taken.extend(drain(&pin_dir));
        let _ = std::fs::remove_file(lock_path(&pin_dir));
        let mut seen: Vec<u64> = taken
            .iter()
            .map(|d| match d {
                Spooled::Listed { until_ms, .. } => *until_ms,
                other => panic!("{other:?}"),
            })
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..DECISIONS as u64).collect::<Vec<_>>());
    }
}
