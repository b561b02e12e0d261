//! Pinned maps: where they live and how to read them without the agent's
//! in-memory handles (`wsguard status`, tests).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData, PerCpuArray},
};
use wsguard_common::{
    Ban, Counter, Reason, SourceKey, SourceState,
    maps::{LAYOUT_VERSION, names},
};

/// The versioned directory maps are pinned in.
pub fn pin_dir(pin_path: &Path) -> PathBuf {
    pin_path.join(format!("v{LAYOUT_VERSION}"))
}

/// Pins the wsguard maps under `dir`, replacing pins left by an agent that
/// did not exit cleanly.
pub fn pin_all(ebpf: &Ebpf, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create pin directory {}", dir.display()))?;
    for (name, map) in ebpf.maps() {
        if !name.starts_with("WSG_") {
            continue;
        }
        let path = dir.join(name);
        if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("cannot replace stale pin {}", path.display()))?;
        }
        map.pin(&path).with_context(|| format!("cannot pin map {name} at {}", path.display()))?;
    }
    Ok(())
}

/// Removes the pins (the maps themselves go when the last user closes them).
pub fn unpin_all(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        std::fs::remove_file(entry?.path())?;
    }
    std::fs::remove_dir(dir)?;
    Ok(())
}

/// Read-only view of the maps an agent pinned.
pub struct PinnedState {
    dir: PathBuf,
}

impl PinnedState {
    pub fn open(dir: &Path) -> Result<PinnedState> {
        let probe = dir.join(names::COUNTERS);
        if !probe.exists() {
            anyhow::bail!(
                "no wsguard state pinned at {}: is the agent running with this pin_path?",
                dir.display()
            );
        }
        Ok(PinnedState { dir: dir.to_owned() })
    }

    fn map(&self, name: &str) -> Result<MapData> {
        let path = self.dir.join(name);
        MapData::from_pin(&path).with_context(|| format!("cannot open pinned map {}", path.display()))
    }

    pub fn counters(&self) -> Result<Vec<(Reason, Counter)>> {
        let map: PerCpuArray<MapData, Counter> = PerCpuArray::try_from(Map::PerCpuArray(self.map(names::COUNTERS)?))?;
        super::sum_counters(&map)
    }

    pub fn counter(&self, reason: Reason) -> Result<Counter> {
        Ok(self.counters()?.into_iter().find(|(r, _)| *r == reason).map(|(_, c)| c).unwrap_or_default())
    }

    pub fn bans(&self) -> Result<Vec<(SourceKey, Ban)>> {
        let map: HashMap<MapData, SourceKey, Ban> = HashMap::try_from(Map::HashMap(self.map(names::BANS)?))?;
        Ok(map.iter().filter_map(|r| r.ok()).collect())
    }

    pub fn tracked_sources(&self) -> Result<usize> {
        let map: HashMap<MapData, SourceKey, SourceState> =
            HashMap::try_from(Map::LruHashMap(self.map(names::SOURCES)?))?;
        Ok(map.keys().filter(|k| k.is_ok()).count())
    }

    pub fn connections(&self) -> Result<Vec<(SourceKey, u64)>> {
        let map: HashMap<MapData, SourceKey, u64> = HashMap::try_from(Map::HashMap(self.map(names::CONNECTIONS)?))?;
        Ok(map.iter().filter_map(|r| r.ok()).collect())
    }
}
