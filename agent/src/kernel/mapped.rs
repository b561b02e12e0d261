//! The per-source table mapped into the agent's memory, read-only, for the
//! walks that read every source (the fleet's busiest sources, every
//! second): a read of memory instead of a syscall per set.

use std::{
    os::fd::{AsFd, AsRawFd},
    path::Path,
    ptr::NonNull,
};

use anyhow::{Context, Result, bail};
use aya::maps::MapData;
use wsguard_common::{SourceKey, SourceSet, maps::names};

/// A source's counts over the last complete second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceLoad {
    pub key: SourceKey,
    pub connections: u32,
    pub bytes: u64,
}

pub struct MappedSources {
    _map: MapData,
    base: NonNull<u8>,
    len: usize,
    sets: usize,
}

// SAFETY: the mapping is read-only and only read through volatile copies.
unsafe impl Send for MappedSources {}

impl MappedSources {
    /// Maps the table pinned in `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<MappedSources> {
        let path = pin_dir.join(names::SOURCES);
        let map = MapData::from_pin(&path)
            .with_context(|| format!("cannot open pinned map {}", path.display()))?;
        let info = map.info()?;
        let stride = size_of::<SourceSet>().next_multiple_of(8);
        if info.value_size() as usize != size_of::<SourceSet>() {
            bail!("{} holds another layout", path.display());
        }
        let sets = info.max_entries() as usize;
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = (sets * stride).next_multiple_of(page);
        // SAFETY: a shared read-only mapping of the array's values, which
        // the kernel allows for a BPF_F_MMAPABLE array; unmapped on drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot map {}", path.display()));
        }
        Ok(MappedSources {
            _map: map,
            base: NonNull::new(base.cast()).context("mmap returned null")?,
            len,
            sets,
        })
    }

    /// Every source with traffic in the last complete second at `now_ns`.
    /// The kernel writes while this reads: a count may be a packet old.
    pub fn loads(&self, now_ns: u64) -> Vec<SourceLoad> {
        let stride = size_of::<SourceSet>().next_multiple_of(8);
        let mut loads = Vec::new();
        for i in 0..self.sets {
            // SAFETY: within the mapping; a volatile copy, as the kernel
            // writes the values concurrently (any bit pattern is valid).
            let set: SourceSet = unsafe {
                std::ptr::read_volatile(self.base.as_ptr().add(i * stride).cast::<SourceSet>())
            };
            for (key, state) in set.sources() {
                let (connections, bytes) = state.last_second(now_ns);
                if connections > 0 || bytes > 0 {
                    loads.push(SourceLoad {
                        key,
                        connections,
                        bytes,
                    });
                }
            }
        }
        loads
    }
}

impl Drop for MappedSources {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// The `k` busiest by new connections and the `k` busiest by bytes (a
/// source in both is listed once).
pub fn busiest(mut loads: Vec<SourceLoad>, k: usize) -> Vec<SourceLoad> {
    loads.sort_unstable_by_key(|l| std::cmp::Reverse(l.connections));
    let mut chosen: Vec<SourceLoad> = loads
        .iter()
        .take(k)
        .filter(|l| l.connections > 0)
        .copied()
        .collect();
    loads.sort_unstable_by_key(|l| std::cmp::Reverse(l.bytes));
    for load in loads.iter().take(k) {
        if !chosen.iter().any(|c| c.key == load.key) {
            chosen.push(*load);
        }
    }
    chosen
}
