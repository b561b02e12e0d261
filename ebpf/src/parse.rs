//! From Ethernet to TCP over any [`Packet`] (direct packet access for XDP
//! and TC): a fast path for the common frame ([`common_frame`]: no VLAN tag,
//! IPv4 without options or IPv6 without extension headers, a whole TCP
//! header), and the full header walk for every other frame. Both give the
//! same [`Parsed`] for a frame the fast path takes (tested frame by frame).
//!
//! Rules for odd packets (documented in the README, "Packet rules"):
//! - Ethernet, VLAN or IP headers cut short, IPv4 with IHL < 5, a version
//!   field that disagrees with the EtherType, more than two VLAN tags, or a
//!   protocol other than TCP: [`Parsed::Other`] (passed untouched; the
//!   kernel's own checks discard what is invalid).
//! - A non-first IPv4 or IPv6 fragment: [`Parsed::Fragment`]; its ports are
//!   unknown, so only source-based rules apply.
//! - TCP cut short before its ports (this includes a first fragment too small
//!   to hold them, RFC 1858), or an IPv6 extension chain longer than
//!   [`MAX_IPV6_EXTENSIONS`]: [`Parsed::Malformed`].
//! - TCP to a port outside the set the caller protects: [`Parsed::Unprotected`]
//!   (passed untouched), whatever follows its ports.
//! - TCP whose header is cut short after the ports, or whose data offset is
//!   below 5 or past the packet's end: [`Parsed::Tcp`] with
//!   `incomplete_header` (malformed).

use core::mem::size_of;

use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    vlan::VlanHdr,
};
use wsguard_common::{PortSet, SourceKey};

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

/// A TCP segment, with what the programs need to know of it.
pub struct TcpSegment {
    /// The full source address (IPv4 as IPv4-mapped).
    pub source: SourceKey,
    pub destination_port: u16,
    /// The header is cut short after the ports, its data offset is below 5,
    /// or it runs past the packet (flags are then unknown, and zero here).
    pub incomplete_header: bool,
    /// Bytes 12 and 13 of the TCP header (data offset, reserved bits,
    /// flags), as read; zero when the header is incomplete.
    pub header_word: [u8; 2],
    /// Where the IP header and the TCP header start in the frame.
    pub network_offset: usize,
    pub transport_offset: usize,
    pub ipv4: bool,
    /// IPv4 without options or IPv6 without extension headers: the only
    /// shapes the SYN-cookie path answers.
    pub plain: bool,
}

impl TcpSegment {
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;

    /// The segment at `transport_offset`, from its header word (`None`:
    /// the header is incomplete, its flags unknown).
    #[inline(always)]
    fn new(
        source: SourceKey,
        destination_port: u16,
        transport_offset: usize,
        network: Network,
        header_word: Option<[u8; 2]>,
    ) -> TcpSegment {
        TcpSegment {
            source,
            destination_port,
            incomplete_header: header_word.is_none(),
            header_word: header_word.unwrap_or([0, 0]),
            network_offset: network.offset,
            transport_offset,
            ipv4: network.ipv4,
            plain: network.plain,
        }
    }

    /// TCP flags (byte 13 of the header; zero when the header is incomplete).
    #[inline(always)]
    pub fn flags(&self) -> u8 {
        self.header_word[1]
    }

    /// SYN without ACK: the start of a new connection.
    #[inline(always)]
    pub fn opens_connection(&self) -> bool {
        self.flags() & (Self::SYN | Self::ACK) == Self::SYN
    }

    /// ACK set, SYN and RST clear: what returns a SYN cookie.
    #[inline(always)]
    pub fn is_plain_ack(&self) -> bool {
        self.flags() & (Self::SYN | Self::RST | Self::ACK) == Self::ACK
    }
}

/// Where the network header is and what it is, for [`tcp`].
#[derive(Clone, Copy)]
struct Network {
    offset: usize,
    ipv4: bool,
    plain: bool,
}

pub enum Parsed {
    /// Not TCP we can see: passed untouched, uncounted.
    Other,
    /// TCP to a port outside the set asked for: passed untouched, uncounted.
    Unprotected,
    Tcp(TcpSegment),
    Fragment(SourceKey),
    Malformed(SourceKey),
}

/// Packet bytes, however a program type reaches them.
pub trait Packet {
    /// A copy of the `T` at `offset`, if the whole `T` lies inside the packet.
    fn read<T: Copy>(&self, offset: usize) -> Option<T>;
}

/// Direct packet access, `data..end` (XDP, TC).
pub struct Frame {
    pub data: usize,
    pub end: usize,
}

impl Frame {
    pub fn len(&self) -> u64 {
        (self.end - self.data) as u64
    }
}

impl Packet for Frame {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        let start = self.data + offset;
        if start + size_of::<T>() > self.end {
            return None;
        }
        // SAFETY: bounds checked against data_end above; an unaligned read of
        // plain header bytes.
        Some(unsafe { core::ptr::read_unaligned(start as *const T) })
    }
}

impl Frame {
    /// Whether the frame holds at least `len` bytes. After it, the
    /// verifier knows every offset below `len` is in the packet, so the
    /// fast path's loads need no check of their own.
    #[inline(always)]
    fn holds(&self, len: usize) -> bool {
        self.data + len <= self.end
    }

    /// The `T` at `offset` with one load of `T`'s width (a `u8`, `u16`,
    /// `u32` or `u64`). `read` copies byte by byte, as it must for a
    /// header struct of byte arrays; this is for the fast path's fields.
    ///
    /// # Safety
    /// `holds(offset + size_of::<T>())` must have been checked.
    #[inline(always)]
    unsafe fn load<T: Copy>(&self, offset: usize) -> T {
        // SAFETY: in the frame, by the caller's check. Header fields sit at
        // 2-byte alignment in the frame; the BPF JITs of the hosts we run on
        // (x86-64, arm64) load at any alignment, and the verifier allows it
        // unless strict alignment is asked for. A read_unaligned would be
        // split into single-byte loads by the BPF backend.
        unsafe { core::ptr::read((self.data + offset) as *const T) }
    }
}

const ETHERTYPE_IPV4: u16 = EtherType::Ipv4 as u16;
const ETHERTYPE_IPV6: u16 = EtherType::Ipv6 as u16;
/// Ethernet, IPv4 without options, and a minimal TCP header.
const COMMON_V4_LEN: usize = EthHdr::LEN + Ipv4Hdr::LEN + TcpHdr::LEN;
/// Ethernet, IPv6 without extension headers, and a minimal TCP header.
const COMMON_V6_LEN: usize = EthHdr::LEN + Ipv6Hdr::LEN + TcpHdr::LEN;

/// The common frame with a handful of loads: an untagged Ethernet frame
/// carrying IPv4 without options (not a non-first fragment) or IPv6
/// without extension headers, then TCP with a whole header. The port is
/// checked against `ports` before anything else is read. `None` for every
/// other frame, which takes the full walk.
#[inline(always)]
fn common_frame(frame: &Frame, ports: &PortSet) -> Option<Parsed> {
    // Both shapes are at least this long; a shorter frame takes the walk.
    if !frame.holds(COMMON_V4_LEN) {
        return None;
    }
    let l3 = EthHdr::LEN;
    // SAFETY (every load below): within COMMON_V4_LEN, checked above, or
    // for IPv6 within COMMON_V6_LEN, checked before its loads.
    let ether_type = unsafe { frame.load::<u16>(12) };
    let network = Network {
        offset: l3,
        ipv4: ether_type == ETHERTYPE_IPV4,
        plain: true,
    };
    let l4 = if network.ipv4 {
        // Version 4, header length 5 words; a later fragment, TCP or not,
        // and any other protocol take the walk.
        let (version_ihl, protocol, fragment) = unsafe {
            (
                frame.load::<u8>(l3),
                frame.load::<u8>(l3 + 9),
                frame.load::<u16>(l3 + 6),
            )
        };
        if version_ihl != 0x45 || protocol != IPPROTO_TCP || u16::from_be(fragment) & 0x1fff != 0 {
            return None;
        }
        l3 + Ipv4Hdr::LEN
    } else if ether_type == ETHERTYPE_IPV6 {
        if !frame.holds(COMMON_V6_LEN) {
            return None;
        }
        let (version, next_header) = unsafe { (frame.load::<u8>(l3), frame.load::<u8>(l3 + 6)) };
        if version >> 4 != 6 || next_header != IPPROTO_TCP {
            return None;
        }
        l3 + Ipv6Hdr::LEN
    } else {
        return None;
    };
    let destination_port = u16::from_be(unsafe { frame.load::<u16>(l4 + 2) });
    if !ports.contains(destination_port) {
        return Some(Parsed::Unprotected);
    }
    let header_word = unsafe { [frame.load::<u8>(l4 + 12), frame.load::<u8>(l4 + 13)] };
    let header_len = (header_word[0] >> 4) as usize * 4;
    // A data offset below 5 or past the frame: the walk says how.
    if header_len < TcpHdr::LEN || !frame.holds(l4 + header_len) {
        return None;
    }
    let source = unsafe {
        if network.ipv4 {
            SourceKey::from_v4_word(frame.load::<u32>(l3 + 12))
        } else {
            SourceKey::from_words([frame.load::<u64>(l3 + 8), frame.load::<u64>(l3 + 16)])
        }
    };
    Some(Parsed::Tcp(TcpSegment::new(
        source,
        destination_port,
        l4,
        network,
        Some(header_word),
    )))
}

/// From the Ethernet header on (XDP, TC): the fast path, or the walk. TCP
/// to a port outside `ports` is [`Parsed::Unprotected`].
#[inline(always)]
pub fn parse(frame: &Frame, ports: &PortSet) -> Parsed {
    match common_frame(frame, ports) {
        Some(parsed) => parsed,
        None => walk(frame, ports),
    }
}

/// The full walk from the Ethernet header: VLAN tags, IPv4 options, IPv6
/// extension headers, fragments, short headers.
#[inline(always)]
pub fn walk<P: Packet>(packet: &P, ports: &PortSet) -> Parsed {
    let Some(eth) = packet.read::<EthHdr>(0) else {
        return Parsed::Other;
    };
    let mut ether_type = eth.ether_type;
    let mut offset = EthHdr::LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != EtherType::Ieee8021q as u16 && ether_type != EtherType::Ieee8021ad as u16 {
            break;
        }
        let Some(vlan) = packet.read::<VlanHdr>(offset) else {
            return Parsed::Other;
        };
        ether_type = vlan.ether_type;
        offset += VlanHdr::LEN;
    }
    parse_network(packet, ether_type, offset, ports)
}

/// From the network header at `offset`, given the EtherType (network byte
/// order as read from the frame).
#[inline(always)]
pub fn parse_network<P: Packet>(
    packet: &P,
    ether_type: u16,
    offset: usize,
    ports: &PortSet,
) -> Parsed {
    if ether_type == ETHERTYPE_IPV4 {
        ipv4(packet, offset, ports)
    } else if ether_type == ETHERTYPE_IPV6 {
        ipv6(packet, offset, ports)
    } else {
        Parsed::Other
    }
}

#[inline(always)]
fn ipv4<P: Packet>(packet: &P, offset: usize, ports: &PortSet) -> Parsed {
    let Some(ip) = packet.read::<Ipv4Hdr>(offset) else {
        return Parsed::Other;
    };
    let header_len = ip.ihl() as usize;
    if ip.version() != 4 || header_len < Ipv4Hdr::LEN || ip.proto != IPPROTO_TCP {
        return Parsed::Other;
    }
    let source = SourceKey::from_v4(ip.src_addr);
    if ip.frag_offset() != 0 {
        return Parsed::Fragment(source);
    }
    let network = Network {
        offset,
        ipv4: true,
        plain: header_len == Ipv4Hdr::LEN,
    };
    tcp(packet, offset + header_len, source, network, ports)
}

#[inline(always)]
fn ipv6<P: Packet>(packet: &P, offset: usize, ports: &PortSet) -> Parsed {
    let Some(ip) = packet.read::<Ipv6Hdr>(offset) else {
        return Parsed::Other;
    };
    if ip.version() != 6 {
        return Parsed::Other;
    }
    let source = SourceKey::from_v6(ip.src_addr);
    let plain = Network {
        offset,
        ipv4: false,
        plain: true,
    };
    let extended = Network {
        plain: false,
        ..plain
    };
    if ip.next_hdr == IPPROTO_TCP {
        return tcp(packet, offset + Ipv6Hdr::LEN, source, plain, ports);
    }
    let mut next = ip.next_hdr;
    let mut l4 = offset + Ipv6Hdr::LEN;
    for _ in 0..MAX_IPV6_EXTENSIONS {
        match next {
            IPPROTO_TCP => return tcp(packet, l4, source, extended, ports),
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_MOBILITY
            | IPPROTO_HIP | IPPROTO_SHIM6 => {
                // Next header, then length in 8-octet units not counting the first.
                let Some(ext) = packet.read::<[u8; 2]>(l4) else {
                    return Parsed::Other;
                };
                next = ext[0];
                l4 += (ext[1] as usize + 1) * 8;
            }
            IPPROTO_AH => {
                // Length in 4-octet units minus 2 (RFC 4302).
                let Some(ext) = packet.read::<[u8; 2]>(l4) else {
                    return Parsed::Other;
                };
                next = ext[0];
                l4 += (ext[1] as usize + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let Some(ext) = packet.read::<[u8; 8]>(l4) else {
                    return Parsed::Other;
                };
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
        return tcp(packet, l4, source, extended, ports);
    }
    Parsed::Malformed(source)
}

#[inline(always)]
fn tcp<P: Packet>(
    packet: &P,
    offset: usize,
    source: SourceKey,
    network: Network,
    ports: &PortSet,
) -> Parsed {
    if offset > MAX_L4_OFFSET {
        return Parsed::Malformed(source);
    }
    // Without its ports a segment cannot be told apart: malformed.
    let Some(port_bytes) = packet.read::<[u8; 4]>(offset) else {
        return Parsed::Malformed(source);
    };
    let destination_port = u16::from_be_bytes([port_bytes[2], port_bytes[3]]);
    if !ports.contains(destination_port) {
        return Parsed::Unprotected;
    }
    let Some(th) = packet.read::<TcpHdr>(offset) else {
        return Parsed::Tcp(TcpSegment::new(
            source,
            destination_port,
            offset,
            network,
            None,
        ));
    };
    let header_len = th.doff() as usize * 4;
    let header_end = offset + header_len;
    let incomplete_header = header_len < TcpHdr::LEN || packet.read::<u8>(header_end - 1).is_none();
    // From the copy already read: a second packet read here would be one
    // the compiler merges with the first, which the verifier cannot follow.
    // SAFETY: TcpHdr is 20 plain bytes.
    let raw: [u8; TcpHdr::LEN] = unsafe { core::mem::transmute(th) };
    let header_word = (!incomplete_header).then_some([raw[12], raw[13]]);
    Parsed::Tcp(TcpSegment::new(
        source,
        destination_port,
        offset,
        network,
        header_word,
    ))
}
