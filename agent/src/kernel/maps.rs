//! Typed reads and writes of wsguard's maps, written once. The running agent
//! (the maps it loaded, [`super::Kernel`]), the CLI (maps opened from their
//! pins, [`super::PinnedState`]) and the test harness all go through
//! [`Maps`]; each only says where a map comes from ([`MapSource`]).

use std::{
    net::IpAddr,
    ops::{Deref, DerefMut},
    os::fd::AsFd,
};

use anyhow::{Context, Result, bail};
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuValues};
use ipnet::IpNet;
use wsguard_common::{
    Ban, Counter, HandshakeSettings, ListEntry, Reason, Release, Settings, SourceKey, SourceSet,
    SourceState, Stream, StreamPeers, UserBudget, UserKey, UserState,
    cookie::CookieSettings,
    maps::{
        GlobalShares, GlobalState, SOURCE_WAYS, USER_BUDGET_SLOTS, list_search, names, shortcuts,
    },
};

use super::{
    lists::{self, List},
    system::{self, monotonic_ns},
};

/// A map borrowed from the loaded programs, or opened from its pin.
pub enum MapRef<'a> {
    Loaded(&'a Map),
    Pinned(Map),
}

impl Deref for MapRef<'_> {
    type Target = Map;
    fn deref(&self) -> &Map {
        match self {
            MapRef::Loaded(map) => map,
            MapRef::Pinned(map) => map,
        }
    }
}

/// A map to write, borrowed from the loaded programs or opened from its pin.
pub enum MapMut<'a> {
    Loaded(&'a mut Map),
    Pinned(Map),
}

impl Deref for MapMut<'_> {
    type Target = Map;
    fn deref(&self) -> &Map {
        match self {
            MapMut::Loaded(map) => map,
            MapMut::Pinned(map) => map,
        }
    }
}

impl DerefMut for MapMut<'_> {
    fn deref_mut(&mut self) -> &mut Map {
        match self {
            MapMut::Loaded(map) => map,
            MapMut::Pinned(map) => map,
        }
    }
}

/// Where a map by name comes from.
pub trait MapSource {
    fn map(&self, name: &'static str) -> Result<MapRef<'_>>;
    fn map_mut(&mut self, name: &'static str) -> Result<MapMut<'_>>;
    /// The pin directory the maps are shared through, if they are.
    fn pin_dir(&self) -> Option<&std::path::Path>;
}

/// Every typed operation on wsguard's maps, for anything that has them.
pub trait Maps: MapSource {
    /// What was done, per reason.
    fn counters(&self) -> Result<Vec<(Reason, Counter)>> {
        counter_set(self, false)
    }

    /// What dry-run counted as would-drop (and would-ban), per reason.
    fn would_drop(&self) -> Result<Vec<(Reason, Counter)>> {
        counter_set(self, true)
    }

    fn counter(&self, reason: Reason) -> Result<Counter> {
        Ok(self
            .counters()?
            .into_iter()
            .find(|(r, _)| *r == reason)
            .map(|(_, c)| c)
            .unwrap_or_default())
    }

    fn settings(&self) -> Result<Settings> {
        let map = self.map(names::SETTINGS)?;
        let settings: Array<&MapData, Settings> = Array::try_from(&*map)?;
        Ok(settings.get(&0, 0)?)
    }

    fn handshake_settings(&self) -> Result<HandshakeSettings> {
        let map = self.map(names::HANDSHAKE)?;
        let settings: Array<&MapData, HandshakeSettings> = Array::try_from(&*map)?;
        Ok(settings.get(&0, 0)?)
    }

    /// Tells XDP to refuse (or admit again) new connections to inspected
    /// ports while the agent's table of pending handshakes is full.
    fn set_pending_full(&mut self, full: bool) -> Result<()> {
        let mut map = self.map_mut(names::HANDSHAKE)?;
        let mut hs: Array<&mut MapData, HandshakeSettings> = Array::try_from(&mut *map)?;
        let mut settings = hs.get(&0, 0)?;
        if settings.pending_full != u32::from(full) {
            settings.pending_full = u32::from(full);
            hs.set(0, settings, 0)?;
        }
        Ok(())
    }

    /// Sets the global buckets all CPUs share (each CPU's unspent share
    /// is left as it is).
    fn set_global_buckets(&mut self, state: GlobalState) -> Result<()> {
        let mut map = self.map_mut(names::GLOBAL)?;
        let mut global: Array<&mut MapData, GlobalState> = Array::try_from(&mut *map)?;
        global.set(0, state, 0)?;
        Ok(())
    }

    /// Starts the global buckets again full, with no CPU holding a share.
    fn reset_global_buckets(&mut self) -> Result<()> {
        self.set_global_buckets(GlobalState::default())?;
        let possible = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        let mut map = self.map_mut(names::GLOBAL_SHARES)?;
        let mut shares: PerCpuArray<&mut MapData, GlobalShares> = PerCpuArray::try_from(&mut *map)?;
        shares.set(
            0,
            PerCpuValues::try_from(vec![GlobalShares::default(); possible])?,
            0,
        )?;
        Ok(())
    }

    fn bans(&self) -> Result<Vec<(SourceKey, Ban)>> {
        let map = self.map(names::BANS)?;
        let bans: HashMap<&MapData, SourceKey, Ban> = HashMap::try_from(&*map)?;
        Ok(bans.iter().filter_map(|r| r.ok()).collect())
    }

    /// The ban on one source (by its tracking key), if it has one.
    fn ban_of(&self, key: &SourceKey) -> Result<Option<Ban>> {
        let map = self.map(names::BANS)?;
        let bans: HashMap<&MapData, SourceKey, Ban> = HashMap::try_from(&*map)?;
        Ok(bans.get(key, 0).ok())
    }

    /// Bans a source (by its tracking key) from now until `until_ns`.
    fn ban(&mut self, key: &SourceKey, until_ns: u64) -> Result<()> {
        let since_ns = monotonic_ns();
        self.set_ban(key, Ban { since_ns, until_ns })
    }

    fn set_ban(&mut self, key: &SourceKey, ban: Ban) -> Result<()> {
        {
            let mut map = self.map_mut(names::BANS)?;
            let mut bans: HashMap<&mut MapData, SourceKey, Ban> = HashMap::try_from(&mut *map)?;
            bans.insert(key, ban, 0)?;
        }
        // After the insert: a source that checks the ban map at the new
        // epoch finds this ban.
        self.next_ban_epoch()
    }

    /// Moves the ban epoch on (see `shortcuts::BAN_EPOCH`).
    fn next_ban_epoch(&mut self) -> Result<()> {
        let epoch = self.shortcut(shortcuts::BAN_EPOCH)?;
        self.set_shortcut(shortcuts::BAN_EPOCH, epoch.wrapping_add(1).max(1))
    }

    /// Turns the ban shortcut on at a random epoch if it is off (a new
    /// map): epochs cached by source entries of an earlier map cannot
    /// match it by chance.
    fn start_ban_epoch(&mut self) -> Result<()> {
        if self.shortcut(shortcuts::BAN_EPOCH)? == 0 {
            let [random, _] = system::random_key()?;
            self.set_shortcut(shortcuts::BAN_EPOCH, random.max(1))?;
        }
        Ok(())
    }

    fn shortcut(&self, slot: u32) -> Result<u64> {
        let map = self.map(names::SHORTCUTS)?;
        let slots: Array<&MapData, u64> = Array::try_from(&*map)?;
        Ok(slots.get(&slot, 0)?)
    }

    fn set_shortcut(&mut self, slot: u32, value: u64) -> Result<()> {
        let mut map = self.map_mut(names::SHORTCUTS)?;
        let mut slots: Array<&mut MapData, u64> = Array::try_from(&mut *map)?;
        slots.set(slot, value, 0)?;
        Ok(())
    }

    /// Lifts the ban on a source (by its tracking key); whether there was one.
    fn remove_ban(&mut self, key: &SourceKey) -> Result<bool> {
        let removed = {
            let mut map = self.map_mut(names::BANS)?;
            let mut bans: HashMap<&mut MapData, SourceKey, Ban> = HashMap::try_from(&mut *map)?;
            bans.remove(key).is_ok()
        };
        if removed {
            // After the delete: source entries that cached the ban read the
            // ban map again.
            self.next_ban_epoch()?;
        }
        Ok(removed)
    }

    /// How many sources the per-source table can hold: its sets times
    /// their ways (`tracking.max_sources` rounded up to whole sets).
    fn source_capacity(&self) -> Result<u32> {
        let map = self.map(names::SOURCES)?;
        let sets: Array<&MapData, SourceSet> = Array::try_from(&*map)?;
        Ok(sets.len().saturating_mul(SOURCE_WAYS as u32))
    }

    /// How many sources the per-source table holds, without walking it:
    /// the ways the kernel filled (a way once filled is only ever
    /// reused, never emptied), at most the table's capacity.
    fn tracked_source_count(&self) -> Result<u64> {
        let capacity = self.source_capacity()?;
        let map = self.map(names::SOURCES_CREATED)?;
        let created: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(&*map)?;
        let created: u64 = created.get(&0, 0)?.iter().sum();
        Ok(created.min(u64::from(capacity)))
    }

    /// Every source the per-source table holds (a walk of every set).
    fn tracked_sources(&self) -> Result<Vec<(SourceKey, SourceState)>> {
        let map = self.map(names::SOURCES)?;
        let sets: Array<&MapData, SourceSet> = Array::try_from(&*map)?;
        Ok(sets
            .iter()
            .filter_map(|set| set.ok())
            .flat_map(|set| set.sources().collect::<Vec<_>>())
            .collect())
    }

    /// Established connections per source (kept by sock_ops).
    fn connections(&self) -> Result<Vec<(SourceKey, u64)>> {
        let map = self.map(names::CONNECTIONS)?;
        let connections: HashMap<&MapData, SourceKey, u64> = HashMap::try_from(&*map)?;
        Ok(connections.iter().filter_map(|r| r.ok()).collect())
    }

    /// Sets a source's count of established connections, as sock_ops does.
    fn set_open_connections(&mut self, key: &SourceKey, open: u64) -> Result<()> {
        let mut map = self.map_mut(names::CONNECTIONS)?;
        let mut connections: HashMap<&mut MapData, SourceKey, u64> = HashMap::try_from(&mut *map)?;
        connections.insert(key, open, 0)?;
        Ok(())
    }

    /// The SYN-cookie settings (with the cookie key).
    fn cookie_settings(&self) -> Result<CookieSettings> {
        let map = self.map(names::SYN_COOKIES)?;
        let settings: Array<&MapData, CookieSettings> = Array::try_from(&*map)?;
        Ok(settings.get(&0, 0)?)
    }

    /// Inspected connections open now (kept by the kernel).
    fn inspected_connections(&self) -> Result<u64> {
        let map = self.map(names::INSPECTED_COUNT)?;
        let count: Array<&MapData, u64> = Array::try_from(&*map)?;
        Ok(count.get(&0, 0)?)
    }

    /// Sets the kernel's count of open inspected connections.
    fn set_inspected_connections(&mut self, open: u64) -> Result<()> {
        let mut map = self.map_mut(names::INSPECTED_COUNT)?;
        let mut count: Array<&mut MapData, u64> = Array::try_from(&mut *map)?;
        count.set(0, open, 0)?;
        Ok(())
    }

    /// The kernel's entry for an inspected connection, if it is open.
    fn stream(&self, cookie: u64) -> Option<Stream> {
        let map = self.map(names::STREAMS).ok()?;
        let streams: HashMap<&MapData, u64, Stream> = HashMap::try_from(&*map).ok()?;
        streams.get(&cookie, 0).ok()
    }

    /// Every open inspected connection, by cookie.
    fn streams(&self) -> Result<Vec<(u64, Stream)>> {
        let map = self.map(names::STREAMS)?;
        let streams: HashMap<&MapData, u64, Stream> = HashMap::try_from(&*map)?;
        Ok(streams.iter().filter_map(|r| r.ok()).collect())
    }

    /// Creates (`Some`) or removes (`None`) the kernel's entry for connection
    /// `cookie`, as sock_ops does when it is established and closed.
    fn set_stream(&mut self, cookie: u64, stream: Option<Stream>) -> Result<()> {
        let mut map = self.map_mut(names::STREAMS)?;
        let mut streams: HashMap<&mut MapData, u64, Stream> = HashMap::try_from(&mut *map)?;
        match stream {
            Some(stream) => streams.insert(cookie, stream, 0)?,
            None => streams.remove(&cookie)?,
        }
        Ok(())
    }

    /// Records the agent's verdict on an inspected connection.
    fn set_release(&mut self, cookie: u64, release: Release) -> Result<()> {
        let mut map = self.map_mut(names::RELEASES)?;
        let mut releases: HashMap<&mut MapData, u64, Release> = HashMap::try_from(&mut *map)?;
        releases.insert(cookie, release, 0)?;
        Ok(())
    }

    fn release_of(&self, cookie: u64) -> Option<Release> {
        let map = self.map(names::RELEASES).ok()?;
        let releases: HashMap<&MapData, u64, Release> = HashMap::try_from(&*map).ok()?;
        releases.get(&cookie, 0).ok()
    }

    fn remove_release(&mut self, cookie: u64) {
        if let Ok(mut map) = self.map_mut(names::RELEASES)
            && let Ok(mut releases) = HashMap::<&mut MapData, u64, Release>::try_from(&mut *map)
        {
            let _ = releases.remove(&cookie);
        }
    }

    /// Removes verdicts whose connection is gone (its close record was
    /// lost); how many.
    fn sweep_releases(&mut self) -> Result<usize> {
        let open: std::collections::HashSet<u64> =
            self.streams()?.into_iter().map(|(c, _)| c).collect();
        let mut map = self.map_mut(names::RELEASES)?;
        let mut releases: HashMap<&mut MapData, u64, Release> = HashMap::try_from(&mut *map)?;
        let stale: Vec<u64> = releases
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !open.contains(k))
            .collect();
        for cookie in &stale {
            let _ = releases.remove(cookie);
        }
        Ok(stale.len())
    }

    /// A user's kernel entry, if it has one.
    fn user(&self, key: UserKey) -> Option<UserState> {
        let map = self.map(names::USERS).ok()?;
        let users: HashMap<&MapData, UserKey, UserState> = HashMap::try_from(&*map).ok()?;
        users.get(&key, 0).ok()
    }

    /// Every user with a kernel entry.
    fn users(&self) -> Result<Vec<(UserKey, UserState)>> {
        let map = self.map(names::USERS)?;
        let users: HashMap<&MapData, UserKey, UserState> = HashMap::try_from(&*map)?;
        Ok(users.iter().filter_map(|r| r.ok()).collect())
    }

    /// Writes a user's entry: `create_only` fails when it exists (another
    /// writer created it first) or when the map is full.
    fn set_user(&mut self, key: UserKey, state: UserState, create_only: bool) -> Result<()> {
        let mut map = self.map_mut(names::USERS)?;
        let mut users: HashMap<&mut MapData, UserKey, UserState> = HashMap::try_from(&mut *map)?;
        // BPF_NOEXIST = 1.
        users.insert(key, state, if create_only { 1 } else { 0 })?;
        Ok(())
    }

    fn remove_user(&mut self, key: UserKey) -> Result<bool> {
        let mut map = self.map_mut(names::USERS)?;
        let mut users: HashMap<&mut MapData, UserKey, UserState> = HashMap::try_from(&mut *map)?;
        Ok(users.remove(&key).is_ok())
    }

    /// Changes a user's entry in place (read, change, write back); false
    /// when it has none. The kernel may charge the user in between; what it
    /// charged then is lost, a few packets' worth at most.
    fn update_user(&mut self, key: UserKey, change: impl FnOnce(&mut UserState)) -> Result<bool> {
        let Some(mut state) = self.user(key) else {
            return Ok(false);
        };
        change(&mut state);
        self.set_user(key, state, false)?;
        Ok(true)
    }

    /// Binds a connection to a user: the kernel charges its bytes to the
    /// user's budget from the next packet on.
    fn bind_user_flow(&mut self, peers: &StreamPeers, key: UserKey) -> Result<()> {
        if self.shortcut(shortcuts::USERS_BOUND)? == 0 {
            self.set_shortcut(shortcuts::USERS_BOUND, 1)?;
        }
        let mut map = self.map_mut(names::USER_FLOWS)?;
        let mut flows: HashMap<&mut MapData, StreamPeers, UserKey> = HashMap::try_from(&mut *map)?;
        flows.insert(peers, key, 0)?;
        Ok(())
    }

    fn unbind_user_flow(&mut self, peers: &StreamPeers) {
        if let Ok(mut map) = self.map_mut(names::USER_FLOWS)
            && let Ok(mut flows) =
                HashMap::<&mut MapData, StreamPeers, UserKey>::try_from(&mut *map)
        {
            let _ = flows.remove(peers);
        }
    }

    /// Every connection bound to a user.
    fn user_flows(&self) -> Result<Vec<(StreamPeers, UserKey)>> {
        let map = self.map(names::USER_FLOWS)?;
        let flows: HashMap<&MapData, StreamPeers, UserKey> = HashMap::try_from(&*map)?;
        Ok(flows.iter().filter_map(|r| r.ok()).collect())
    }

    /// The budget of class index `class` (the CLI reads it to tell how long
    /// a user has been over budget).
    fn user_budget(&self, class: u32) -> Option<UserBudget> {
        let map = self.map(names::USER_BUDGETS).ok()?;
        let table: Array<&MapData, UserBudget> = Array::try_from(&*map).ok()?;
        table.get(&class, 0).ok()
    }

    /// Writes the budget of each class index; slots past the last class
    /// get the first budget (`[limits.per_user]`).
    fn set_user_budgets(&mut self, budgets: &[UserBudget]) -> Result<()> {
        let mut map = self.map_mut(names::USER_BUDGETS)?;
        let mut table: Array<&mut MapData, UserBudget> = Array::try_from(&mut *map)?;
        for slot in 0..USER_BUDGET_SLOTS {
            let budget = budgets
                .get(slot as usize)
                .or(budgets.first())
                .copied()
                .unwrap_or_default();
            table.set(slot, budget, 0)?;
        }
        Ok(())
    }

    /// Names the connection the next injected bytes go to.
    fn set_inject_target(&mut self, cookie: u64) -> Result<()> {
        let mut map = self.map_mut(names::INJECT_TARGET)?;
        let mut target: Array<&mut MapData, u64> = Array::try_from(&mut *map)?;
        target.set(0, cookie, 0)?;
        Ok(())
    }

    /// Whether an address is on the allow list now.
    fn is_allow_listed(&self, addr: IpAddr) -> bool {
        let Ok(map) = self.map(names::ALLOW) else {
            return false;
        };
        let Ok(list) = lists::Trie::<&MapData>::try_from(&*map) else {
            return false;
        };
        let key = aya::maps::lpm_trie::Key::new(128, SourceKey::from(addr).addr);
        list.get(&key, 0).is_ok_and(|e| e.applies(monotonic_ns()))
    }

    /// The allow (`allow = true`) or deny list's entries.
    fn list_entries(&self, allow: bool) -> Result<Vec<(IpNet, ListEntry)>> {
        let map = self.map(ListMaps::of(allow).trie)?;
        let list: lists::Trie<&MapData> = LpmTrie::try_from(&*map)?;
        Ok(lists::entries(&list))
    }

    /// Runs `f` on the allow (`allow = true`) or deny list, to change it,
    /// then tells the XDP program how to search the list. Writers of the
    /// same pinned maps (the agent, CLI commands) take turns, so the search
    /// each works out from the one before is never overwritten by another.
    fn with_list<R>(&mut self, allow: bool, f: impl FnOnce(&mut List) -> Result<R>) -> Result<R> {
        let _turn = self.lists_turn()?;
        let maps = ListMaps::of(allow);
        let exact = {
            let map = self.map(maps.exact)?;
            let Map::HashMap(data) = &*map else {
                bail!("map {} is not a hash", maps.exact);
            };
            // Its own descriptor, so that the trie can be borrowed next to it.
            MapData::from_fd(data.fd().as_fd().try_clone_to_owned()?)?
        };
        let (result, lengths) = {
            let mut map = self.map_mut(maps.trie)?;
            let mut list = List::new(
                LpmTrie::try_from(&mut *map)?,
                HashMap::try_from(Map::HashMap(exact))?,
            );
            let result = f(&mut list);
            (result, list.lengths_touched())
        };
        // Also when `f` failed half-way: the list may have changed.
        if let Some((added, removed)) = lengths {
            self.update_list_search(allow, &added, &removed)?;
        }
        result
    }

    /// Sets the list's search (`list_search`) from every entry of its hash:
    /// at start and reload, which also repair a search a writer that
    /// stopped half-way left behind.
    fn refresh_list_search(&mut self, allow: bool) -> Result<()> {
        let _turn = self.lists_turn()?;
        let search = {
            let map = self.map(ListMaps::of(allow).exact)?;
            let exact: lists::Exact<&MapData> = HashMap::try_from(&*map)?;
            lists::search_of(&exact)
        };
        self.set_shortcut(ListMaps::of(allow).search_slot, search)
    }

    /// Moves the list's search on after entries of the `added` and
    /// `removed` prefix lengths were written: a length is probed from its
    /// first entry on and until its last is gone. Only the removal of a
    /// length's entry reads the list, until it finds another of that length.
    fn update_list_search(&mut self, allow: bool, added: &[u32], removed: &[u32]) -> Result<()> {
        let slot = ListMaps::of(allow).search_slot;
        let current = self.shortcut(slot)?;
        if current == list_search::TRIE && removed.is_empty() {
            return Ok(());
        }
        let map = self.map(ListMaps::of(allow).exact)?;
        let exact: lists::Exact<&MapData> = HashMap::try_from(&*map)?;
        let search = if current == list_search::TRIE {
            lists::search_of(&exact)
        } else {
            let mut lengths: Vec<u32> = (0..list_search::MAX_PROBES)
                .map_while(|i| list_search::probe(current, i))
                .chain(added.iter().copied())
                .collect();
            lengths
                .retain(|length| !removed.contains(length) || lists::holds_length(&exact, *length));
            list_search::encode(lengths)
        };
        drop(map);
        if search != current {
            self.set_shortcut(slot, search)?;
        }
        Ok(())
    }

    /// This writer's turn at the lists, until the value is dropped: an
    /// exclusive lock on the pin directory (none for maps that are not
    /// pinned, which no one else can reach).
    fn lists_turn(&self) -> Result<Option<std::fs::File>> {
        let Some(dir) = self.pin_dir() else {
            return Ok(None);
        };
        let file = std::fs::File::open(dir)
            .with_context(|| format!("cannot open {} to lock the lists", dir.display()))?;
        super::flock(&file, libc::LOCK_EX)
            .with_context(|| format!("cannot lock {}", dir.display()))?;
        Ok(Some(file))
    }

    /// Removes runtime list entries whose TTL has passed: (allow list?, CIDR).
    fn sweep_expired_lists(&mut self, now_ns: u64) -> Result<Vec<(bool, IpNet)>> {
        let mut swept = Vec::new();
        for allow in [true, false] {
            let gone = self.with_list(allow, |list| lists::sweep_expired(list, now_ns))?;
            swept.extend(gone.into_iter().map(|n| (allow, n)));
        }
        Ok(swept)
    }
}

impl<T: MapSource + ?Sized> Maps for T {}

/// The maps and shortcut slot of the allow (`allow = true`) or deny list.
struct ListMaps {
    trie: &'static str,
    exact: &'static str,
    search_slot: u32,
}

impl ListMaps {
    fn of(allow: bool) -> ListMaps {
        if allow {
            ListMaps {
                trie: names::ALLOW,
                exact: names::ALLOW_EXACT,
                search_slot: shortcuts::ALLOW_SEARCH,
            }
        } else {
            ListMaps {
                trie: names::DENY,
                exact: names::DENY_EXACT,
                search_slot: shortcuts::DENY_SEARCH,
            }
        }
    }
}

fn counter_set<S: Maps + ?Sized>(maps: &S, dry_run: bool) -> Result<Vec<(Reason, Counter)>> {
    let map = maps.map(names::COUNTERS)?;
    let counters: PerCpuArray<&MapData, Counter> = PerCpuArray::try_from(&*map)?;
    sum_counters(&counters, dry_run)
}

/// Sums a per-CPU counters array into one value per reason, for what was
/// done or (with `dry_run`) what dry-run would have done.
pub fn sum_counters<T: std::borrow::Borrow<MapData>>(
    counters: &PerCpuArray<T, Counter>,
    dry_run: bool,
) -> Result<Vec<(Reason, Counter)>> {
    Reason::ALL
        .iter()
        .map(|&reason| {
            let per_cpu = counters.get(&reason.slot(dry_run), 0)?;
            let total = per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            });
            Ok((reason, total))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use wsguard_common::maps::{Capacity, KERNEL_ONLY_MAPS, MAP_FACTS};

    /// The table user space sizes and checks maps with says what the
    /// compiled kernel programs declare, map by map (needs no root: only
    /// the object is read).
    #[test]
    fn map_facts_match_the_compiled_object() {
        let object = aya_obj::Object::parse(super::super::EBPF_OBJECT).expect("the object parses");
        let mut in_object: Vec<&str> = object.maps.keys().map(String::as_str).collect();
        // Sections the toolchain adds (.rodata, .bss, aya-log's ring) are
        // not wsguard's maps, and the kernel-only scratch maps are not in
        // the table.
        in_object.retain(|name| name.starts_with("WSG_") && !KERNEL_ONLY_MAPS.contains(name));
        in_object.sort_unstable();
        let mut in_table: Vec<&str> = MAP_FACTS.iter().map(|f| f.name).collect();
        in_table.sort_unstable();
        assert_eq!(in_object, in_table, "maps in the object and in MAP_FACTS");
        for fact in &MAP_FACTS {
            let map = &object.maps[fact.name];
            assert_eq!(
                (map.key_size(), map.value_size()),
                (fact.key_size, fact.value_size),
                "key and value size of {}",
                fact.name
            );
            if let Capacity::Fixed(n) = fact.capacity {
                assert_eq!(map.max_entries(), n, "max entries of {}", fact.name);
            }
        }
    }
}
