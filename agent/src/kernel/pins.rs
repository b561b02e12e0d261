//! Pinned maps and links: where they live, checking that pinned maps still
//! have the layout this build expects, and reading or changing the state of
//! an agent (running or not) through its pins.
//!
//! Layout under `<agent.pin_path>/v<LAYOUT_VERSION>/`: one file per map
//! (`WSG_*`), and `links/` with the XDP link of each interface
//! (`xdp-<interface>`), the SYN-cookie hand-off of each (`tc-<interface>`)
//! and the connection counter's (`sock_ops`). The
//! inspection programs are attached to their maps (`WSG_INSPECTED`,
//! `WSG_INJECTOR`) and need no link.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use aya::{
    maps::{Map, MapData},
    programs::links::{FdLink, PinnedLink},
};
use tracing::warn;
use wsguard_common::{
    SourceKey,
    maps::{ENTRY_COUNTERS, LAYOUT_VERSION, MAP_FACTS, names},
};

use super::maps::{MapMut, MapRef, MapSource, Maps};
use crate::config::Config;

/// The versioned directory maps are pinned in.
pub fn pin_dir(pin_path: &Path) -> PathBuf {
    pin_path.join(format!("v{LAYOUT_VERSION}"))
}

pub fn link_path(pin_dir: &Path, link: &str) -> PathBuf {
    pin_dir.join("links").join(link)
}

/// (name, key size, value size, max entries) of every pinned map.
fn expected_layouts(config: &Config) -> impl Iterator<Item = (&'static str, u32, u32, u32)> {
    MAP_FACTS.iter().filter(|fact| fact.pinned).map(|fact| {
        let max = super::capacity(fact.capacity, config);
        (fact.name, fact.key_size, fact.value_size, max)
    })
}

/// Paths for the loader: every map pinned by name under `dir`. A pinned map
/// whose layout differs from this build's (another size in the config, or
/// a damaged pin) is removed first, so that it is created anew; that is said
/// in the log, since its state is lost.
pub fn prepare_map_pins(dir: &Path, config: &Config) -> Result<Vec<(&'static str, PathBuf)>> {
    std::fs::create_dir_all(dir.join("links"))
        .with_context(|| format!("cannot create pin directory {}", dir.display()))?;
    // State left by an earlier run: a map missing from it is worth a word.
    let earlier_state = dir.join(names::COUNTERS).exists() || dir.join(names::BANS).exists();
    let mut out = Vec::new();
    for (name, key, value, max) in expected_layouts(config) {
        let path = dir.join(name);
        if !path.exists() && earlier_state {
            warn!(
                "pinned map {} is missing: creating it empty",
                path.display()
            );
        }
        if path.exists() {
            let problem = match MapData::from_pin(&path) {
                Err(e) => Some(format!("cannot be opened ({e})")),
                Ok(map) => match map.info() {
                    Err(e) => Some(format!("cannot be inspected ({e})")),
                    Ok(info)
                        if (info.key_size(), info.value_size(), info.max_entries())
                            != (key, value, max) =>
                    {
                        Some(format!(
                            "has key/value/entries {}/{}/{} where {key}/{value}/{max} are expected",
                            info.key_size(),
                            info.value_size(),
                            info.max_entries()
                        ))
                    }
                    Ok(_) => None,
                },
            };
            if let Some(problem) = problem {
                warn!(
                    "pinned map {} {problem}: rebuilding it empty",
                    path.display()
                );
                std::fs::remove_file(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
            }
        }
        out.push((name, path));
    }
    // A count of another map's entries starts again with that map.
    for (counter, counted) in ENTRY_COUNTERS {
        if !dir.join(counted).exists() {
            let path = dir.join(counter);
            if path.exists() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
            }
        }
    }
    Ok(out)
}

/// Removes every pin under `dir`, links included (which detaches them).
pub fn unpin_all(dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    Ok(())
}

/// The state of an agent, read and changed through its pins.
pub struct PinnedState {
    dir: PathBuf,
}

impl PinnedState {
    pub fn open(dir: &Path) -> Result<PinnedState> {
        if !dir.join(names::COUNTERS).exists() {
            anyhow::bail!(
                "no wsguard state pinned at {}: has the agent run with this pin_path?",
                dir.display()
            );
        }
        Ok(PinnedState {
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn open_map_data(&self, name: &str) -> Result<MapData> {
        let path = self.dir.join(name);
        MapData::from_pin(&path)
            .with_context(|| format!("cannot open pinned map {}", path.display()))
    }

    fn open_map(&self, name: &str) -> Result<Map> {
        Ok(Map::from_map_data(self.open_map_data(name)?)?)
    }

    /// Whether programs are attached through pinned links (the agent runs,
    /// or stopped with keep_enforcing_on_exit).
    pub fn attached_links(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.join("links"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// A map's capacity (max_entries).
    pub fn capacity(&self, name: &str) -> Result<u32> {
        Ok(self.open_map_data(name)?.info()?.max_entries())
    }

    /// Pinned links with the id of the program each runs.
    pub fn links(&self) -> Vec<(String, Option<u32>)> {
        self.attached_links()
            .into_iter()
            .map(|name| {
                let id = PinnedLink::from_pin(link_path(&self.dir, &name))
                    .ok()
                    .and_then(|l| FdLink::from(l).info().ok())
                    .map(|i| i.program_id());
                (name, id)
            })
            .collect()
    }

    /// Lifts the ban on the source that `addr` belongs to (after prefix
    /// aggregation). Returns whether there was one.
    pub fn remove_ban_of(&mut self, addr: std::net::IpAddr) -> Result<bool> {
        let key = self.settings()?.tracking_key(&SourceKey::from(addr));
        self.remove_ban(&key)
    }
}

impl MapSource for PinnedState {
    fn map(&self, name: &'static str) -> Result<MapRef<'_>> {
        Ok(MapRef::Pinned(self.open_map(name)?))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<MapMut<'_>> {
        Ok(MapMut::Pinned(self.open_map(name)?))
    }

    fn pin_dir(&self) -> Option<&Path> {
        Some(&self.dir)
    }
}
