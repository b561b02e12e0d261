//! The per-source table (`WSG_SOURCES`): a set-associative array the XDP
//! program manages itself (see `wsguard_common::SourceSet` for why).

use wsguard_common::{Settings, SourceKey, SourceSet, SourceState, maps::SOURCE_WAYS};

use aya_ebpf::{macros::map, maps::PerCpuArray};

use crate::maps::{SOURCES, SOURCES_CREATED};

/// Where a source lives in the table, or would go.
#[derive(Clone, Copy)]
pub struct Slot {
    set: *mut SourceSet,
    way: usize,
    /// The way holds this source (else it is the way a new entry takes).
    held: bool,
}

/// The way `find` chose, written and read back through a per-CPU slot:
/// the verifier then follows the rest of the program once for an unknown
/// way below `SOURCE_WAYS`, rather than once per way it could be, which
/// would take it past its limit on instructions explored.
#[map(name = "WSG_SOURCE_WAY")]
static CHOSEN_WAY: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Looks `key` up in its set, marking it seen at `now` when held. `None`
/// only when the set is missing (the settings and the map disagree on its
/// size), in which case per-source limits are skipped for this packet and
/// the global limits still apply.
#[inline(always)]
pub fn find(settings: &Settings, key: &SourceKey, now: u64) -> Option<Slot> {
    let index = key.set_index(&settings.source_hash_key, settings.source_sets);
    let set = SOURCES.get_ptr_mut(index)?;
    // SAFETY: an array value pointer, valid for the duration of the program.
    let entries = unsafe { &mut *set };
    let wanted = key.words();
    // A way that holds the key, or SOURCE_WAYS plus the way a new entry takes.
    let mut chosen = SOURCE_WAYS;
    for way in 0..SOURCE_WAYS {
        if entries.seen_ns[way] != 0 && entries.keys[way].words() == wanted {
            chosen = way;
            break;
        }
    }
    if chosen == SOURCE_WAYS {
        chosen += least_recently_seen(entries);
    }
    let slot = CHOSEN_WAY.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot of a per-CPU array; volatile, so that the
    // compiler keeps the round trip through it.
    let chosen = unsafe {
        core::ptr::write_volatile(slot, chosen as u64);
        core::ptr::read_volatile(slot)
    };
    let way = (chosen % SOURCE_WAYS as u64) as usize;
    let held = chosen < SOURCE_WAYS as u64;
    // Written only when it moves: fewer stores to a shared line.
    if held && now > entries.seen_ns[way] {
        entries.seen_ns[way] = now;
    }
    Some(Slot { set, way, held })
}

/// The way a new entry takes: an empty one (seen at 0), or else the one
/// least recently seen.
#[inline(always)]
fn least_recently_seen(set: &SourceSet) -> usize {
    let (mut victim, mut oldest) = (0, u64::MAX);
    for way in 0..SOURCE_WAYS {
        if set.seen_ns[way] < oldest {
            (victim, oldest) = (way, set.seen_ns[way]);
        }
    }
    victim
}

impl Slot {
    /// The source's state, if the table holds it.
    #[inline(always)]
    pub fn state(&self) -> Option<*mut SourceState> {
        if !self.held {
            return None;
        }
        // SAFETY: as in `find`; `way` is below SOURCE_WAYS.
        Some(unsafe { &mut (*self.set).states[self.way % SOURCE_WAYS] })
    }

    /// The source's state, taking the way for it (with full buckets) when
    /// the table does not hold it yet: an empty way, or else the one least
    /// recently seen. Two CPUs that take the same way at once for two new
    /// sources leave one of them there; the other's packet is charged to
    /// it, and its next packet takes a way again.
    #[inline(always)]
    pub fn state_or_insert(&self, key: &SourceKey, now: u64) -> *mut SourceState {
        let way = self.way % SOURCE_WAYS;
        // SAFETY: as in `find`.
        let set = unsafe { &mut *self.set };
        if !self.held {
            if set.seen_ns[way] == 0
                && let Some(created) = SOURCES_CREATED.get_ptr_mut(0)
            {
                // SAFETY: this CPU's slot of a per-CPU array.
                unsafe { *created += 1 };
            }
            set.keys[way] = *key;
            set.states[way] = SourceState::default();
            set.seen_ns[way] = now;
        }
        &mut set.states[way]
    }
}
