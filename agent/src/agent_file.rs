//! A small JSON file describing the running agent: its pid, config and when
//! that was loaded, and the outcome of the last reload. `wsguard status`
//! shows it and `wsguard reload` uses it to signal the agent and wait for the
//! outcome. It lives in /run/wsguard, named after the pin directory, so that
//! several agents with their own pin paths do not collide.

use std::{
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub(crate) const RUN_DIR: &str = "/run/wsguard";

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentFile {
    pub pid: u32,
    pub config: PathBuf,
    /// Seconds since the epoch when the running config was loaded.
    pub config_loaded_at: u64,
    pub interfaces: Vec<String>,
    pub xdp_mode: String,
    /// Incremented on every reload attempt.
    pub reloads: u64,
    /// The last reload's error, if it was rejected.
    pub last_reload_error: Option<String>,
    /// Inspected connections awaiting a verdict (refreshed every second).
    #[serde(default)]
    pub pending_handshakes: u64,
    /// Single-use tickets remembered, and the cache's capacity.
    #[serde(default)]
    pub ticket_replay_cache: Option<(u64, u64)>,
    /// Whether the agent shares its decisions with a fleet (`[fleet]`): the
    /// CLI then spools its own for it.
    #[serde(default)]
    pub fleet: bool,
}

pub fn path_for(pin_dir: &Path) -> PathBuf {
    let name: String = pin_dir
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    Path::new(RUN_DIR).join(format!("{}.json", name.trim_matches('_')))
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AgentFile {
    pub fn write(&self, pin_dir: &Path) -> Result<()> {
        let path = path_for(pin_dir);
        std::fs::create_dir_all(RUN_DIR)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))
    }

    /// The file of a running agent for this pin directory; `None` when there
    /// is none or its process is gone.
    pub fn read_running(pin_dir: &Path) -> Option<AgentFile> {
        let file: AgentFile =
            serde_json::from_slice(&std::fs::read(path_for(pin_dir)).ok()?).ok()?;
        let alive = unsafe { libc::kill(file.pid as i32, 0) } == 0;
        alive.then_some(file)
    }

    pub fn remove(pin_dir: &Path) {
        let _ = std::fs::remove_file(path_for(pin_dir));
        crate::fleet::close_report(pin_dir);
        let _ = std::fs::remove_file(crate::fleet::spool::lock_path(pin_dir));
    }
}
