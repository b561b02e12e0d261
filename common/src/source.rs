//! Source identity: the address a limit is charged to.
//!
//! IPv4 and IPv6 share one 16-byte key space: an IPv4 address is stored as its
//! IPv4-mapped IPv6 form (`::ffff:a.b.c.d`), so one map holds both families and
//! a dual-stack socket that reports `::ffff:a.b.c.d` yields the same key as the
//! plain IPv4 packet.

use crate::assert_size;

/// Prefix of IPv4-mapped IPv6 addresses (`::ffff:0:0/96`).
pub const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
/// Prefix length of an IPv4 address inside the mapped space.
pub const V4_MAPPED_BITS: u32 = 96;

/// A source address after aggregation to the configured prefix.
///
/// Aligned to 8 bytes so that the kernel programs build, mask and compare
/// keys with two 64-bit words instead of sixteen single bytes (the
/// per-packet path builds one for every protected segment).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey {
    pub addr: [u8; 16],
}
assert_size!(SourceKey, 16);

/// The second word of an IPv4-mapped key without its address: bytes
/// 10 and 11 are 0xff (`::ffff:0:0`).
const V4_MAPPED_LOW: u64 = u64::from_ne_bytes([0, 0, 0xff, 0xff, 0, 0, 0, 0]);
/// Where the four address bytes sit in the second word.
const V4_ADDRESS_SHIFT: u32 = if cfg!(target_endian = "little") {
    32
} else {
    0
};

impl SourceKey {
    /// The key of two native-order words (bytes 0–7 and 8–15).
    #[inline(always)]
    pub fn from_words(words: [u64; 2]) -> SourceKey {
        // SAFETY: [u64; 2] and [u8; 16] have the same size, any bits are valid.
        SourceKey {
            addr: unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(words) },
        }
    }

    /// Bytes 0–7 and 8–15 as native-order words.
    #[inline(always)]
    pub fn words(&self) -> [u64; 2] {
        // SAFETY: as in from_words; the key is 8-byte aligned.
        unsafe { core::mem::transmute::<[u8; 16], [u64; 2]>(self.addr) }
    }

    /// The full (unmasked) key of an IPv4 address, in network byte order.
    #[inline(always)]
    pub fn from_v4(octets: [u8; 4]) -> SourceKey {
        SourceKey::from_v4_word(u32::from_ne_bytes(octets))
    }

    /// As [`SourceKey::from_v4`], from the address as one native-order
    /// word read straight from the header (its bytes in network order).
    #[inline(always)]
    pub fn from_v4_word(address: u32) -> SourceKey {
        SourceKey::from_words([0, V4_MAPPED_LOW | (u64::from(address) << V4_ADDRESS_SHIFT)])
    }

    #[inline(always)]
    pub fn from_v6(octets: [u8; 16]) -> SourceKey {
        SourceKey { addr: octets }
    }

    /// True for IPv4 (IPv4-mapped) keys.
    #[inline(always)]
    pub fn is_v4(&self) -> bool {
        let [high, low] = self.words();
        let mapped_mask = !(u64::from(u32::MAX) << V4_ADDRESS_SHIFT);
        high == 0 && low & mapped_mask == V4_MAPPED_LOW
    }

    /// The set of the per-source table (`sets` of them) that holds this
    /// key, under the table's random `hash_key`: each word, offset by its
    /// half of the key, goes through a 64-bit mixer (MurmurHash3's
    /// finalizer, a bijection), so every bit of the address reaches the
    /// bits that pick the set, and a sender that does not know the key
    /// cannot aim its sources at another's set.
    #[inline(always)]
    pub fn set_index(&self, hash_key: &[u64; 2], sets: u32) -> u32 {
        let [high, low] = self.words();
        let hash = mix64(mix64(high ^ hash_key[0]) ^ low ^ hash_key[1]);
        // The high 32 bits scaled to 0..sets, without a division.
        (((hash >> 32) * u64::from(sets)) >> 32) as u32
    }

    /// Applies a 16-byte mask (see [`prefix_mask`]).
    #[inline(always)]
    pub fn masked(&self, mask: &[u64; 2]) -> SourceKey {
        let [high, low] = self.words();
        SourceKey::from_words([high & mask[0], low & mask[1]])
    }
}

/// The full key of an address (before prefix aggregation); an
/// IPv4-mapped IPv6 address gets the same key as the IPv4 address.
impl From<core::net::IpAddr> for SourceKey {
    fn from(addr: core::net::IpAddr) -> SourceKey {
        match addr.to_canonical() {
            core::net::IpAddr::V4(a) => SourceKey::from_v4(a.octets()),
            core::net::IpAddr::V6(a) => SourceKey::from_v6(a.octets()),
        }
    }
}

/// The address a key stands for (its first address after aggregation);
/// IPv4 keys come back as IPv4 addresses.
impl From<SourceKey> for core::net::IpAddr {
    fn from(key: SourceKey) -> core::net::IpAddr {
        core::net::IpAddr::V6(core::net::Ipv6Addr::from(key.addr)).to_canonical()
    }
}

/// MurmurHash3's 64-bit finalizer.
#[inline(always)]
const fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// A mask keeping the first `bits` bits of a 16-byte address, as the two
/// native-order words [`SourceKey::masked`] takes: a few instructions,
/// so the kernel can build one per list probe.
#[inline(always)]
pub fn prefix_mask(bits: u32) -> [u64; 2] {
    [word_mask(bits), word_mask(bits.saturating_sub(64))]
}

/// A mask keeping the first `bits` bits (all of them from 64) of 8 address
/// bytes read as a native-order word.
#[inline(always)]
fn word_mask(bits: u32) -> u64 {
    let in_order = if bits == 0 {
        0
    } else if bits >= 64 {
        u64::MAX
    } else {
        u64::MAX << (64 - bits)
    };
    // The first address byte is the word's most significant in network order.
    in_order.to_be()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_is_mapped_and_masks_by_prefix() {
        let k = SourceKey::from_v4([198, 18, 7, 9]);
        assert_eq!(
            k.addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 7, 9]
        );
        assert!(k.is_v4());
        let mut almost = k;
        almost.addr[9] = 1;
        assert!(!almost.is_v4());
        let m = k.masked(&prefix_mask(V4_MAPPED_BITS + 24));
        assert_eq!(m, SourceKey::from_v4([198, 18, 7, 0]));
    }

    #[test]
    fn v6_masks_to_64() {
        let mut a = [0u8; 16];
        a[0] = 0x20;
        a[1] = 0x01;
        a[2] = 0x0d;
        a[3] = 0xb8;
        a[15] = 7;
        a[8] = 1;
        let k = SourceKey::from_v6(a);
        assert!(!k.is_v4());
        let m = k.masked(&prefix_mask(64));
        assert_eq!(&m.addr[..8], &a[..8]);
        assert_eq!(&m.addr[8..], &[0u8; 8]);
    }

    #[test]
    fn set_index_spreads_keys_over_every_set() {
        let hash_key = [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210];
        let sets = 1000u32;
        let mut hits = [0u32; 1000];
        // 100,000 IPv4 /32s differing in their low octets, and /64s.
        for i in 0..50_000u32 {
            let v4 = SourceKey::from_v4((0xc612_0000 | i).to_be_bytes());
            hits[v4.set_index(&hash_key, sets) as usize] += 1;
            let mut v6 = [0u8; 16];
            v6[..8].copy_from_slice(&(0x2001_0db8_0000_0000u64 | u64::from(i)).to_be_bytes());
            hits[SourceKey::from_v6(v6).set_index(&hash_key, sets) as usize] += 1;
        }
        let (min, max) = (hits.iter().min().unwrap(), hits.iter().max().unwrap());
        // 100 per set on average; a uniform spread keeps every set near it.
        assert!(*min >= 50 && *max <= 160, "sets hold {min} to {max} keys");
        // Another key puts the same source in another set.
        let key = SourceKey::from_v4([198, 18, 0, 1]);
        let moved = (1..20u64)
            .filter(|k| key.set_index(&[*k, *k], sets) != key.set_index(&hash_key, sets))
            .count();
        assert!(moved >= 18, "the set hardly depends on the hash key");
    }

    fn mask_bytes(bits: u32) -> [u8; 16] {
        SourceKey::from_words(prefix_mask(bits)).addr
    }

    #[test]
    fn odd_prefixes() {
        assert_eq!(mask_bytes(0), [0; 16]);
        assert_eq!(mask_bytes(128), [0xff; 16]);
        assert_eq!(mask_bytes(200), [0xff; 16]);
        let m = mask_bytes(99);
        assert_eq!(m[11], 0xff);
        assert_eq!(m[12], 0xe0);
        assert_eq!(m[13], 0);
    }

    #[test]
    fn every_prefix_keeps_exactly_its_bits() {
        for bits in 0..=128u32 {
            let mask = u128::from_be_bytes(mask_bytes(bits));
            assert_eq!(mask.count_ones(), bits, "/{bits}");
            assert_eq!(mask.leading_ones(), bits, "/{bits}: the first bits");
        }
    }
}
