//! Header walk from Ethernet to TCP, over direct packet access
//! (`data`..`data_end`), so XDP and TC programs share it.
//!
//! Rules for odd packets (documented in the README, "Packet rules"):
//! - Ethernet, VLAN or IP headers cut short, IPv4 with IHL < 5, a version
//!   field that disagrees with the EtherType, more than two VLAN tags, or a
//!   protocol other than TCP: [`Parsed::Other`] (passed untouched; the
//!   kernel's own checks discard what is invalid).
//! - A non-first IPv4 or IPv6 fragment: [`Parsed::Fragment`]; its ports are
//!   unknown, so only source-based rules apply.
//! - TCP whose 20-byte header is cut short (this includes a first fragment too
//!   small to hold it, RFC 1858), a data offset below 5 or past the packet's
//!   end on a protected port, or an IPv6 extension chain longer than
//!   [`MAX_IPV6_EXTENSIONS`]: [`Parsed::Malformed`].

use core::mem::size_of;

use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    vlan::VlanHdr,
};
use wsguard_common::SourceKey;

use crate::maps::is_protected_port;

/// VLAN tags (802.1Q / 802.1ad) walked before the IP header.
pub const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked before giving up on finding TCP.
pub const MAX_IPV6_EXTENSIONS: usize = 8;
/// Upper bound on the offset of the TCP header; keeps offsets provably small
/// for the verifier. No sane header chain comes near it.
const MAX_L4_OFFSET: usize = 8192;

const IPPROTO_TCP: u8 = IpProto::Tcp as u8;
const IPPROTO_HOPOPTS: u8 = IpProto::HopOpt as u8;
const IPPROTO_ROUTING: u8 = IpProto::Ipv6Route as u8;
const IPPROTO_FRAGMENT: u8 = IpProto::Ipv6Frag as u8;
const IPPROTO_AH: u8 = IpProto::Ah as u8;
const IPPROTO_DSTOPTS: u8 = IpProto::Ipv6Opts as u8;
const IPPROTO_MOBILITY: u8 = 135;
const IPPROTO_HIP: u8 = 139;
const IPPROTO_SHIM6: u8 = 140;

/// A TCP segment to a protected port.
pub struct TcpSegment {
    /// Full source address (IPv4 as IPv4-mapped).
    pub source: SourceKey,
    /// SYN without ACK: the start of a new connection.
    pub opens_connection: bool,
}

pub enum Parsed {
    /// Not TCP to a protected port: passed untouched, uncounted.
    Other,
    Tcp(TcpSegment),
    Fragment(SourceKey),
    Malformed(SourceKey),
}

/// The packet bytes, `data..end`.
pub struct Frame {
    pub data: usize,
    pub end: usize,
}

impl Frame {
    /// A pointer to a `T` at `offset`, if the whole `T` lies inside the packet.
    #[inline(always)]
    fn at<T>(&self, offset: usize) -> Option<&T> {
        let start = self.data + offset;
        if start + size_of::<T>() > self.end {
            return None;
        }
        // SAFETY: bounds checked against data_end above; headers are read-only
        // byte structs with alignment 1 (or 2 for EtherType fields, which the
        // kernel's packet layout guarantees).
        Some(unsafe { &*(start as *const T) })
    }

    pub fn len(&self) -> u64 {
        (self.end - self.data) as u64
    }
}

#[inline(always)]
pub fn parse(frame: &Frame) -> Parsed {
    let Some(eth) = frame.at::<EthHdr>(0) else { return Parsed::Other };
    let mut ether_type = eth.ether_type;
    let mut offset = EthHdr::LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != EtherType::Ieee8021q as u16 && ether_type != EtherType::Ieee8021ad as u16 {
            break;
        }
        let Some(vlan) = frame.at::<VlanHdr>(offset) else { return Parsed::Other };
        ether_type = vlan.ether_type;
        offset += VlanHdr::LEN;
    }
    if ether_type == EtherType::Ipv4 as u16 {
        ipv4(frame, offset)
    } else if ether_type == EtherType::Ipv6 as u16 {
        ipv6(frame, offset)
    } else {
        Parsed::Other
    }
}

#[inline(always)]
fn ipv4(frame: &Frame, offset: usize) -> Parsed {
    let Some(ip) = frame.at::<Ipv4Hdr>(offset) else { return Parsed::Other };
    let header_len = ip.ihl() as usize;
    if ip.version() != 4 || header_len < Ipv4Hdr::LEN || ip.proto != IPPROTO_TCP {
        return Parsed::Other;
    }
    let source = SourceKey::from_v4(ip.src_addr);
    if ip.frag_offset() != 0 {
        return Parsed::Fragment(source);
    }
    tcp(frame, offset + header_len, source)
}

#[inline(always)]
fn ipv6(frame: &Frame, offset: usize) -> Parsed {
    let Some(ip) = frame.at::<Ipv6Hdr>(offset) else { return Parsed::Other };
    if ip.version() != 6 {
        return Parsed::Other;
    }
    let source = SourceKey::from_v6(ip.src_addr);
    let mut next = ip.next_hdr;
    let mut l4 = offset + Ipv6Hdr::LEN;
    for _ in 0..MAX_IPV6_EXTENSIONS {
        match next {
            IPPROTO_TCP => return tcp(frame, l4, source),
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_MOBILITY | IPPROTO_HIP
            | IPPROTO_SHIM6 => {
                // Next header, then length in 8-octet units not counting the first.
                let Some(ext) = frame.at::<[u8; 2]>(l4) else { return Parsed::Other };
                next = ext[0];
                l4 += (ext[1] as usize + 1) * 8;
            }
            IPPROTO_AH => {
                // Length in 4-octet units minus 2 (RFC 4302).
                let Some(ext) = frame.at::<[u8; 2]>(l4) else { return Parsed::Other };
                next = ext[0];
                l4 += (ext[1] as usize + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let Some(ext) = frame.at::<[u8; 8]>(l4) else { return Parsed::Other };
                let fragment_offset = u16::from_be_bytes([ext[2], ext[3]]) >> 3;
                if fragment_offset != 0 {
                    return Parsed::Fragment(source);
                }
                next = ext[0];
                l4 += 8;
            }
            // ESP, No Next Header, UDP, ICMPv6, ...: not TCP we can see.
            _ => return Parsed::Other,
        }
        if l4 > MAX_L4_OFFSET {
            return Parsed::Malformed(source);
        }
    }
    if next == IPPROTO_TCP {
        return tcp(frame, l4, source);
    }
    Parsed::Malformed(source)
}

#[inline(always)]
fn tcp(frame: &Frame, offset: usize, source: SourceKey) -> Parsed {
    if offset > MAX_L4_OFFSET {
        return Parsed::Malformed(source);
    }
    let Some(th) = frame.at::<TcpHdr>(offset) else { return Parsed::Malformed(source) };
    if !is_protected_port(u16::from_be_bytes(th.dest)) {
        return Parsed::Other;
    }
    let header_len = th.doff() as usize * 4;
    if header_len < TcpHdr::LEN || frame.data + offset + header_len > frame.end {
        return Parsed::Malformed(source);
    }
    Parsed::Tcp(TcpSegment { source, opens_connection: th.syn() != 0 && th.ack() == 0 })
}
