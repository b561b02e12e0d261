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
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey {
    pub addr: [u8; 16],
}
assert_size!(SourceKey, 16);

impl SourceKey {
    /// The full (unmasked) key of an IPv4 address, in network byte order.
    #[inline(always)]
    pub fn from_v4(octets: [u8; 4]) -> SourceKey {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12] = octets[0];
        addr[13] = octets[1];
        addr[14] = octets[2];
        addr[15] = octets[3];
        SourceKey { addr }
    }

    #[inline(always)]
    pub fn from_v6(octets: [u8; 16]) -> SourceKey {
        SourceKey { addr: octets }
    }

    /// True for IPv4 (IPv4-mapped) keys.
    #[inline(always)]
    pub fn is_v4(&self) -> bool {
        u64::from_ne_bytes([
            self.addr[0],
            self.addr[1],
            self.addr[2],
            self.addr[3],
            self.addr[4],
            self.addr[5],
            self.addr[6],
            self.addr[7],
        ]) == 0
            && self.addr[8] == 0
            && self.addr[9] == 0
            && self.addr[10] == 0xff
            && self.addr[11] == 0xff
    }

    /// Applies a 16-byte mask (see [`prefix_mask`]).
    #[inline(always)]
    pub fn masked(&self, mask: &[u8; 16]) -> SourceKey {
        let (a_hi, a_lo) = split(&self.addr);
        let (m_hi, m_lo) = split(mask);
        let hi = (a_hi & m_hi).to_ne_bytes();
        let lo = (a_lo & m_lo).to_ne_bytes();
        SourceKey {
            addr: [
                hi[0], hi[1], hi[2], hi[3], hi[4], hi[5], hi[6], hi[7], lo[0], lo[1], lo[2], lo[3],
                lo[4], lo[5], lo[6], lo[7],
            ],
        }
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

#[inline(always)]
fn split(b: &[u8; 16]) -> (u64, u64) {
    (
        u64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        u64::from_ne_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
    )
}

/// A mask keeping the first `bits` bits of a 16-byte address (used by user
/// space to fill [`crate::Settings`]; the kernel only applies masks).
pub fn prefix_mask(bits: u32) -> [u8; 16] {
    let mut mask = [0u8; 16];
    let mut remaining = if bits > 128 { 128 } else { bits };
    let mut i = 0;
    while remaining > 0 && i < 16 {
        let take = if remaining >= 8 { 8 } else { remaining };
        mask[i] = (0xffu16 << (8 - take)) as u8;
        remaining -= take;
        i += 1;
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_is_mapped_and_masks_by_prefix() {
        let k = SourceKey::from_v4([198, 18, 7, 9]);
        assert!(k.is_v4());
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
    fn odd_prefixes() {
        assert_eq!(prefix_mask(0), [0; 16]);
        assert_eq!(prefix_mask(128), [0xff; 16]);
        let m = prefix_mask(99);
        assert_eq!(m[11], 0xff);
        assert_eq!(m[12], 0xe0);
        assert_eq!(m[13], 0);
    }
}
