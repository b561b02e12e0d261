//! Allow and deny lists: CIDRs in one LPM trie per list, IPv4 prefixes mapped
//! into `::ffff:0:0/96` like the source keys, and the same entries in a hash
//! by (prefix length, masked address), which the XDP program probes instead
//! while the list uses few prefix lengths (`list_search`). Every write goes
//! to both, here.
//!
//! An entry may come from the config file, from `wsguard deny|allow add` at
//! run time, or both ([`ListEntry::origin`]). A reload rewrites the config
//! entries only; runtime entries stay until removed or expired.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Result, bail};
use aya::maps::{HashMap, LpmTrie, MapData, lpm_trie::Key};
use ipnet::IpNet;
use wsguard_common::{
    ListEntry, ListKey, LpmKey, SourceKey, maps::list_search, source::V4_MAPPED_BITS,
};

pub type Trie<T> = LpmTrie<T, LpmKey, ListEntry>;
pub type Exact<T> = HashMap<T, ListKey, ListEntry>;

/// One list to change: its trie and its hash, written together.
pub struct List<'a> {
    trie: Trie<&'a mut MapData>,
    exact: Exact<MapData>,
    /// Prefix lengths of the entries written and removed.
    added: Vec<u32>,
    removed: Vec<u32>,
}

impl<'a> List<'a> {
    pub fn new(trie: Trie<&'a mut MapData>, exact: Exact<MapData>) -> List<'a> {
        List {
            trie,
            exact,
            added: Vec::new(),
            removed: Vec::new(),
        }
    }

    /// The prefix lengths of the entries written and of those removed, if
    /// anything was written: the XDP program's search must then follow.
    pub fn lengths_touched(self) -> Option<(Vec<u32>, Vec<u32>)> {
        (!self.added.is_empty() || !self.removed.is_empty()).then_some((self.added, self.removed))
    }

    fn touched(&mut self, key: &ListKey, added: bool) {
        let lengths = if added {
            &mut self.added
        } else {
            &mut self.removed
        };
        if !lengths.contains(&key.prefix_len) {
            lengths.push(key.prefix_len);
        }
    }

    /// The entry for exactly `net` (the hash's: a trie lookup would return
    /// the longest prefix holding it, which may be a shorter entry's).
    fn get(&self, net: &IpNet) -> Option<ListEntry> {
        self.exact.get(&exact_key(net), 0).ok()
    }

    /// Writes an entry to the hash, then the trie; a failure leaves neither.
    fn insert(&mut self, net: &IpNet, entry: ListEntry) -> Result<()> {
        let exact_key = exact_key(net);
        self.touched(&exact_key, true);
        self.exact.insert(exact_key, entry, 0)?;
        if let Err(e) = self.trie.insert(&lpm_key(net), entry, 0) {
            let _ = self.exact.remove(&exact_key);
            return Err(e.into());
        }
        Ok(())
    }

    fn remove(&mut self, net: &IpNet) -> Result<()> {
        let exact_key = exact_key(net);
        self.touched(&exact_key, false);
        self.trie.remove(&lpm_key(net))?;
        let _ = self.exact.remove(&exact_key);
        Ok(())
    }
}

pub fn lpm_key(net: &IpNet) -> Key<LpmKey> {
    match net {
        IpNet::V4(n) => Key::new(
            V4_MAPPED_BITS + n.prefix_len() as u32,
            SourceKey::from_v4(n.addr().octets()).addr,
        ),
        IpNet::V6(n) => Key::new(n.prefix_len() as u32, n.addr().octets()),
    }
}

/// The hash's key of a network.
fn exact_key(net: &IpNet) -> ListKey {
    let key = lpm_key(net);
    ListKey::of(&SourceKey { addr: key.data() }, key.prefix_len())
}

/// How the XDP program is to search a list whose hash holds `exact`
/// ([`list_search`]); an error reading it means the trie.
pub fn search_of<T: std::borrow::Borrow<MapData>>(exact: &Exact<T>) -> u64 {
    let mut lengths = Vec::with_capacity(list_search::MAX_PROBES + 1);
    for key in exact.keys() {
        let Ok(key) = key else {
            return list_search::TRIE;
        };
        if !lengths.contains(&key.prefix_len) {
            lengths.push(key.prefix_len);
            if lengths.len() > list_search::MAX_PROBES {
                return list_search::TRIE;
            }
        }
    }
    list_search::encode(lengths)
}

/// Whether the hash holds an entry of `prefix_len` (read until one is
/// found; an error reading it counts as "yes", which keeps the probe).
pub fn holds_length<T: std::borrow::Borrow<MapData>>(exact: &Exact<T>, prefix_len: u32) -> bool {
    exact
        .keys()
        .any(|key| key.map_or(true, |key| key.prefix_len == prefix_len))
}

fn net_of(key: &Key<LpmKey>) -> IpNet {
    let source = SourceKey { addr: key.data() };
    let len = key.prefix_len();
    if source.is_v4() && len >= V4_MAPPED_BITS {
        let a = source.addr;
        IpNet::new(
            IpAddr::V4(Ipv4Addr::new(a[12], a[13], a[14], a[15])),
            (len - V4_MAPPED_BITS) as u8,
        )
        .expect("valid prefix")
    } else {
        IpNet::new(IpAddr::V6(Ipv6Addr::from(source.addr)), len as u8).expect("valid prefix")
    }
}

/// Every entry with its network.
pub fn entries<T: std::borrow::Borrow<MapData>>(list: &Trie<T>) -> Vec<(IpNet, ListEntry)> {
    let mut out: Vec<(IpNet, ListEntry)> = list
        .iter()
        .filter_map(|r| r.ok())
        .map(|(k, v)| (net_of(&k), v))
        .collect();
    out.sort_by_key(|(net, _)| *net);
    out
}

/// Makes the config part of the list exactly `wanted`, leaving runtime
/// entries alone.
pub fn sync_config(list: &mut List, wanted: &[IpNet]) -> Result<()> {
    mirror_trie(list)?;
    for (net, mut entry) in entries(&list.trie) {
        if entry.origin & ListEntry::FROM_CONFIG != 0 && !wanted.contains(&net) {
            entry.origin &= !ListEntry::FROM_CONFIG;
            store(list, &net, entry)?;
        }
    }
    for net in wanted {
        let mut entry = list.get(net).unwrap_or_default();
        if entry.origin & ListEntry::FROM_CONFIG == 0 {
            entry.origin |= ListEntry::FROM_CONFIG;
            list.insert(net, entry)?;
        }
    }
    Ok(())
}

/// Makes the hash hold exactly the trie's entries (they differ only if a
/// writer stopped between its two writes).
fn mirror_trie(list: &mut List) -> Result<()> {
    let wanted: std::collections::HashMap<ListKey, ListEntry> = entries(&list.trie)
        .into_iter()
        .map(|(net, entry)| (exact_key(&net), entry))
        .collect();
    let held: std::collections::HashMap<ListKey, ListEntry> =
        list.exact.iter().filter_map(|r| r.ok()).collect();
    for (key, entry) in &held {
        if wanted.get(key) != Some(entry) {
            list.touched(key, false);
            let _ = list.exact.remove(key);
        }
    }
    for (key, entry) in wanted {
        if held.get(&key) != Some(&entry) {
            list.touched(&key, true);
            list.exact.insert(key, entry, 0)?;
        }
    }
    Ok(())
}

/// Adds (or refreshes) a runtime entry; `expires_ns` 0 means until removed.
pub fn add_runtime(list: &mut List, net: &IpNet, expires_ns: u64) -> Result<()> {
    let mut entry = list.get(net).unwrap_or_default();
    entry.origin |= ListEntry::FROM_RUNTIME;
    entry.expires_ns = expires_ns;
    list.insert(net, entry)
}

/// Adds a runtime entry, or keeps the one there if it lasts longer
/// (`expires_ns == 0`: until removed, which outlasts any expiry).
/// Whether the list changed.
pub fn extend_runtime(list: &mut List, net: &IpNet, expires_ns: u64) -> Result<bool> {
    if let Some(entry) = list.get(net)
        && entry.origin & ListEntry::FROM_RUNTIME != 0
        && (entry.expires_ns == 0 || (expires_ns != 0 && entry.expires_ns >= expires_ns))
    {
        return Ok(false);
    }
    add_runtime(list, net, expires_ns)?;
    Ok(true)
}

/// Removes a runtime entry. An entry that only the config file holds is not
/// removed: the file would put it back on the next reload.
pub fn remove_runtime(list: &mut List, net: &IpNet) -> Result<()> {
    let Some(mut entry) = list.get(net) else {
        bail!("{net} is not in the list")
    };
    if entry.origin & ListEntry::FROM_RUNTIME == 0 {
        bail!("{net} comes from the config file; remove it there and reload");
    }
    entry.origin &= !ListEntry::FROM_RUNTIME;
    entry.expires_ns = 0;
    store(list, net, entry)
}

/// Drops runtime entries whose TTL has passed; returns them.
pub fn sweep_expired(list: &mut List, now_ns: u64) -> Result<Vec<IpNet>> {
    let mut expired = Vec::new();
    for (net, mut entry) in entries(&list.trie) {
        if entry.origin & ListEntry::FROM_RUNTIME != 0
            && entry.expires_ns != 0
            && now_ns >= entry.expires_ns
        {
            entry.origin &= !ListEntry::FROM_RUNTIME;
            entry.expires_ns = 0;
            store(list, &net, entry)?;
            expired.push(net);
        }
    }
    Ok(expired)
}

/// Writes an entry back, or removes it when no origin is left.
fn store(list: &mut List, net: &IpNet, entry: ListEntry) -> Result<()> {
    if entry.origin == 0 {
        list.remove(net)
    } else {
        list.insert(net, entry)
    }
}
