//! Allow and deny lists: CIDRs in one LPM trie per list, IPv4 prefixes mapped
//! into `::ffff:0:0/96` like the source keys.
//!
//! An entry may come from the config file, from `wsguard deny|allow add` at
//! run time, or both ([`ListEntry::origin`]). A reload rewrites the config
//! entries only; runtime entries stay until removed or expired.

use std::{
    borrow::BorrowMut,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Result, bail};
use aya::maps::{LpmTrie, MapData, lpm_trie::Key};
use ipnet::IpNet;
use wsguard_common::{ListEntry, LpmKey, SourceKey, source::V4_MAPPED_BITS};

pub type List<T> = LpmTrie<T, LpmKey, ListEntry>;

pub fn lpm_key(net: &IpNet) -> Key<LpmKey> {
    match net {
        IpNet::V4(n) => Key::new(
            V4_MAPPED_BITS + n.prefix_len() as u32,
            SourceKey::from_v4(n.addr().octets()).addr,
        ),
        IpNet::V6(n) => Key::new(n.prefix_len() as u32, n.addr().octets()),
    }
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
pub fn entries<T: std::borrow::Borrow<MapData>>(list: &List<T>) -> Vec<(IpNet, ListEntry)> {
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
pub fn sync_config<T: BorrowMut<MapData>>(list: &mut List<T>, wanted: &[IpNet]) -> Result<()> {
    for (net, mut entry) in entries(list) {
        if entry.origin & ListEntry::FROM_CONFIG != 0 && !wanted.contains(&net) {
            entry.origin &= !ListEntry::FROM_CONFIG;
            store(list, &net, entry)?;
        }
    }
    for net in wanted {
        let key = lpm_key(net);
        let mut entry = list.get(&key, 0).unwrap_or_default();
        entry.origin |= ListEntry::FROM_CONFIG;
        list.insert(&key, entry, 0)?;
    }
    Ok(())
}

/// Adds (or refreshes) a runtime entry; `expires_ns` 0 means until removed.
pub fn add_runtime<T: BorrowMut<MapData>>(
    list: &mut List<T>,
    net: &IpNet,
    expires_ns: u64,
) -> Result<()> {
    let key = lpm_key(net);
    let mut entry = list.get(&key, 0).unwrap_or_default();
    entry.origin |= ListEntry::FROM_RUNTIME;
    entry.expires_ns = expires_ns;
    list.insert(&key, entry, 0)?;
    Ok(())
}

/// Adds a runtime entry, or keeps the one there if it lasts longer
/// (`expires_ns == 0`: until removed, which outlasts any expiry).
/// Whether the list changed.
pub fn extend_runtime<T: BorrowMut<MapData>>(
    list: &mut List<T>,
    net: &IpNet,
    expires_ns: u64,
) -> Result<bool> {
    let key = lpm_key(net);
    if let Ok(entry) = list.get(&key, 0)
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
pub fn remove_runtime<T: BorrowMut<MapData>>(list: &mut List<T>, net: &IpNet) -> Result<()> {
    let key = lpm_key(net);
    let Ok(mut entry) = list.get(&key, 0) else {
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
pub fn sweep_expired<T: BorrowMut<MapData>>(list: &mut List<T>, now_ns: u64) -> Result<Vec<IpNet>> {
    let mut expired = Vec::new();
    for (net, mut entry) in entries(list) {
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
fn store<T: BorrowMut<MapData>>(list: &mut List<T>, net: &IpNet, entry: ListEntry) -> Result<()> {
    let key = lpm_key(net);
    if entry.origin == 0 {
        list.remove(&key)?;
    } else {
        list.insert(&key, entry, 0)?;
    }
    Ok(())
}
