//! Allow and deny lists: CIDRs in one LPM trie per list, IPv4 prefixes mapped
//! into `::ffff:0:0/96` like the source keys.

use std::collections::BTreeSet;

use anyhow::Result;
use aya::maps::{LpmTrie, Map, MapData, lpm_trie::Key};
use ipnet::IpNet;
use wsguard_common::{LpmKey, SourceKey, source::V4_MAPPED_BITS};

/// Value stored with each entry: where it came from.
const FROM_CONFIG: u8 = 1;

pub fn lpm_key(net: &IpNet) -> Key<LpmKey> {
    match net {
        IpNet::V4(n) => Key::new(V4_MAPPED_BITS + n.prefix_len() as u32, SourceKey::from_v4(n.addr().octets()).addr),
        IpNet::V6(n) => Key::new(n.prefix_len() as u32, n.addr().octets()),
    }
}

/// Makes the trie hold exactly `wanted`: removes what is gone, adds what is new.
pub fn sync(map: &mut Map, wanted: &[IpNet]) -> Result<()> {
    let mut trie: LpmTrie<&mut MapData, LpmKey, u8> = LpmTrie::try_from(map)?;
    let wanted: BTreeSet<(u32, LpmKey)> = wanted.iter().map(|n| {
        let k = lpm_key(n);
        (k.prefix_len(), k.data())
    }).collect();
    let present: Vec<(u32, LpmKey)> =
        trie.keys().filter_map(|k| k.ok()).map(|k| (k.prefix_len(), k.data())).collect();
    for (len, data) in &present {
        if !wanted.contains(&(*len, *data)) {
            trie.remove(&Key::new(*len, *data))?;
        }
    }
    for (len, data) in wanted {
        trie.insert(&Key::new(len, data), FROM_CONFIG, 0)?;
    }
    Ok(())
}
