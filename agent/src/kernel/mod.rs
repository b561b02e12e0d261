//! The kernel programs as the agent holds them: [`Kernel`] owns the loaded
//! object and its links. One file per job: `load.rs` (load and verify),
//! `apply.rs` (write a config into the maps), `attach.rs` (attach, take over,
//! let go), `maps.rs` (typed map access, shared with the CLI and the tests),
//! `pins.rs` (pinned state), `lists.rs` (CIDR lists), `kfuncs.rs` and
//! `system.rs` (what the host offers).

mod apply;
mod attach;
mod kfuncs;
pub mod lists;
mod load;
pub mod mapped;
pub mod maps;
mod pins;
mod system;

use std::path::PathBuf;

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData},
};
use wsguard_common::{SourceKey, maps::Capacity, maps::names};

use crate::config::Config;
use attach::Held;
pub use attach::Takeover;
pub use lists::lpm_key;
pub use maps::{MapMut, MapRef, MapSource, Maps, sum_counters};
pub use pins::{PinnedState, link_path, pin_dir, unpin_all};
pub use system::{
    bring_up_loopback, check_privileges, coarse_monotonic_ns, coarse_tick_ns, flock, monotonic_ns,
    open_cgroup, raise_memlock, resolve_pin_path,
};

/// The compiled kernel programs, embedded so that `wsguard` is one file.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wsguard"));

/// Capacity of the inspection maps: twice `handshake.max_connections`, so
/// that handshakes completing at once while the kernel starts refusing new
/// ones (at `max_connections`) still find room.
pub fn inspected_capacity(config: &Config) -> u32 {
    config.handshake.max_connections.saturating_mul(2)
}

/// The number of entries a map gets under `config`.
pub fn capacity(capacity: Capacity, config: &Config) -> u32 {
    match capacity {
        Capacity::Fixed(n) => n,
        Capacity::Sources => config.max_sources,
        Capacity::SourceSets => wsguard_common::maps::source_sets(config.max_sources),
        Capacity::Bans => config.max_bans,
        Capacity::Inspected => inspected_capacity(config),
        Capacity::Users => config.users.max_users,
    }
}

/// The loaded programs, their maps and their links.
pub struct Kernel {
    ebpf: Ebpf,
    /// The versioned pin directory; `None` for programs loaded only to be
    /// run through BPF_PROG_TEST_RUN.
    pins: Option<PathBuf>,
    /// Links this agent attached (or took over).
    links: Vec<Held>,
    /// The interface index each interface had when attached.
    ifindex: std::collections::HashMap<String, u32>,
    /// Whether this kernel can hand a cookie-validated connection to its
    /// listener (`bpf_sk_assign_tcp_reqsk`, Linux 6.9+).
    syn_cookies_supported: bool,
}

impl Kernel {
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    fn loaded_map_mut(&mut self, name: &str) -> Result<&mut Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} missing from the object"))
    }

    fn clear_connections(&mut self) -> Result<()> {
        let mut map: HashMap<&mut MapData, SourceKey, u64> =
            HashMap::try_from(self.loaded_map_mut(names::CONNECTIONS)?)?;
        let keys: Vec<SourceKey> = map.keys().filter_map(|k| k.ok()).collect();
        for key in keys {
            let _ = map.remove(&key);
        }
        Ok(())
    }

    /// The events ring buffer, for the agent to read (once).
    pub fn take_events(&mut self) -> Result<aya::maps::RingBuf<MapData>> {
        let map = self.ebpf.take_map(names::EVENTS).context("events map")?;
        Ok(aya::maps::RingBuf::try_from(map)?)
    }

    /// The inspection records ring buffer, for the agent to read (once).
    pub fn take_stream_records(&mut self) -> Result<aya::maps::RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(names::STREAM_RECORDS)
            .context("stream records map")?;
        Ok(aya::maps::RingBuf::try_from(map)?)
    }
}

impl MapSource for Kernel {
    fn map(&self, name: &'static str) -> Result<MapRef<'_>> {
        self.ebpf
            .map(name)
            .map(MapRef::Loaded)
            .with_context(|| format!("map {name} missing from the object"))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<MapMut<'_>> {
        self.loaded_map_mut(name).map(MapMut::Loaded)
    }

    fn pin_dir(&self) -> Option<&std::path::Path> {
        self.pins.as_deref()
    }
}
