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

use std::{
    mem::size_of,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::{
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray},
    programs::links::{FdLink, PinnedLink},
};
use ipnet::IpNet;
use tracing::warn;
use wsguard_common::{
    Ban, Counter, HandshakeSettings, ListEntry, Reason, Release, Settings, SourceKey, SourceState,
    Stream,
    counters::COUNTER_SLOTS,
    maps::{
        EVENTS_BYTES, GlobalState, LAYOUT_VERSION, LIST_CAPACITY, PORT_SLOTS, STREAM_RECORDS_BYTES,
        names,
    },
};

use super::lists::{self, List};
use crate::config::Config;

/// The versioned directory maps are pinned in.
pub fn pin_dir(pin_path: &Path) -> PathBuf {
    pin_path.join(format!("v{LAYOUT_VERSION}"))
}

pub fn link_path(pin_dir: &Path, link: &str) -> PathBuf {
    pin_dir.join("links").join(link)
}

/// (name, key size, value size, max entries) of every pinned map.
fn expected_layouts(config: &Config) -> [(&'static str, u32, u32, u32); 19] {
    let inspected = super::inspected_capacity(config);
    let lpm_key = (4 + size_of::<[u8; 16]>()) as u32;
    let source_key = size_of::<SourceKey>() as u32;
    [
        (names::SETTINGS, 4, size_of::<Settings>() as u32, 1),
        (names::PORTS, 4, 1, PORT_SLOTS),
        (
            names::ALLOW,
            lpm_key,
            size_of::<ListEntry>() as u32,
            LIST_CAPACITY,
        ),
        (
            names::DENY,
            lpm_key,
            size_of::<ListEntry>() as u32,
            LIST_CAPACITY,
        ),
        (
            names::SOURCES,
            source_key,
            size_of::<SourceState>() as u32,
            config.max_sources,
        ),
        (
            names::BANS,
            source_key,
            size_of::<Ban>() as u32,
            config.max_bans,
        ),
        (
            names::CONNECTIONS,
            source_key,
            size_of::<u64>() as u32,
            config.max_sources,
        ),
        (names::GLOBAL, 4, size_of::<GlobalState>() as u32, 1),
        (
            names::COUNTERS,
            4,
            size_of::<Counter>() as u32,
            COUNTER_SLOTS,
        ),
        (names::EVENTS, 0, 0, EVENTS_BYTES),
        (names::INSPECT, 4, 1, PORT_SLOTS),
        (names::INSPECTED, 8, 4, inspected),
        (names::STREAMS, 8, size_of::<Stream>() as u32, inspected),
        (names::RELEASES, 8, size_of::<Release>() as u32, inspected),
        (names::INSPECTED_COUNT, 4, 8, 1),
        (names::STREAM_RECORDS, 0, 0, STREAM_RECORDS_BYTES),
        (
            names::HANDSHAKE,
            4,
            size_of::<HandshakeSettings>() as u32,
            1,
        ),
        // Pinned so that its entries outlive the agent with the XDP link
        // (a program array is emptied when no one holds it).
        (names::COOKIE_PROGRAMS, 4, 4, 2),
        (
            names::SYN_COOKIES,
            4,
            size_of::<wsguard_common::cookie::CookieSettings>() as u32,
            1,
        ),
    ]
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

    fn map(&self, name: &str) -> Result<MapData> {
        let path = self.dir.join(name);
        MapData::from_pin(&path)
            .with_context(|| format!("cannot open pinned map {}", path.display()))
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
        Ok(self.map(name)?.info()?.max_entries())
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

    pub fn counters(&self) -> Result<Vec<(Reason, Counter)>> {
        self.counter_set(false)
    }

    /// What dry-run counted as would-drop (and would-ban).
    pub fn would_drop(&self) -> Result<Vec<(Reason, Counter)>> {
        self.counter_set(true)
    }

    fn counter_set(&self, dry_run: bool) -> Result<Vec<(Reason, Counter)>> {
        let map: PerCpuArray<MapData, Counter> =
            PerCpuArray::try_from(Map::PerCpuArray(self.map(names::COUNTERS)?))?;
        super::sum_counters(&map, dry_run)
    }

    pub fn counter(&self, reason: Reason) -> Result<Counter> {
        Ok(self
            .counters()?
            .into_iter()
            .find(|(r, _)| *r == reason)
            .map(|(_, c)| c)
            .unwrap_or_default())
    }

    pub fn settings(&self) -> Result<Settings> {
        let map: Array<MapData, Settings> =
            Array::try_from(Map::Array(self.map(names::SETTINGS)?))?;
        Ok(map.get(&0, 0)?)
    }

    fn bans_map(&self) -> Result<HashMap<MapData, SourceKey, Ban>> {
        Ok(HashMap::try_from(Map::HashMap(self.map(names::BANS)?))?)
    }

    pub fn bans(&self) -> Result<Vec<(SourceKey, Ban)>> {
        Ok(self.bans_map()?.iter().filter_map(|r| r.ok()).collect())
    }

    /// Lifts the ban on the source that `addr` belongs to (after prefix
    /// aggregation). Returns whether there was one.
    pub fn remove_ban(&self, addr: std::net::IpAddr) -> Result<bool> {
        let key = self.settings()?.tracking_key(&super::source_key(addr));
        let mut bans = self.bans_map()?;
        Ok(bans.remove(&key).is_ok())
    }

    pub fn tracked_sources(&self) -> Result<Vec<(SourceKey, SourceState)>> {
        let map: HashMap<MapData, SourceKey, SourceState> =
            HashMap::try_from(Map::LruHashMap(self.map(names::SOURCES)?))?;
        Ok(map.iter().filter_map(|r| r.ok()).collect())
    }

    /// Inspected connections open now (kept by the kernel).
    pub fn inspected_connections(&self) -> Result<u64> {
        let map: Array<MapData, u64> =
            Array::try_from(Map::Array(self.map(names::INSPECTED_COUNT)?))?;
        Ok(map.get(&0, 0)?)
    }

    pub fn connections(&self) -> Result<Vec<(SourceKey, u64)>> {
        let map: HashMap<MapData, SourceKey, u64> =
            HashMap::try_from(Map::HashMap(self.map(names::CONNECTIONS)?))?;
        Ok(map.iter().filter_map(|r| r.ok()).collect())
    }

    /// The allow (`allow = true`) or deny list.
    pub fn list(&self, allow: bool) -> Result<List<MapData>> {
        let name = if allow { names::ALLOW } else { names::DENY };
        Ok(LpmTrie::try_from(Map::LpmTrie(self.map(name)?))?)
    }

    pub fn list_entries(&self, allow: bool) -> Result<Vec<(IpNet, ListEntry)>> {
        Ok(lists::entries(&self.list(allow)?))
    }
}
