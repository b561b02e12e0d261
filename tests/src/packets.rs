//! Frames crafted for BPF_PROG_TEST_RUN, including deliberately malformed
//! ones (truncated headers, bad lengths, long IPv6 extension chains), which is
//! why they are assembled byte by byte here rather than by a packet library
//! that only builds valid packets.

use std::net::IpAddr;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

#[derive(Clone, Copy, Debug)]
pub enum Ext {
    HopByHop,
    Routing,
    DestOpts,
    Fragment { offset: u16, more: bool },
    Ah,
    Esp,
    NoNext,
}

#[derive(Clone, Debug)]
pub struct Packet {
    pub vlan_tpids: Vec<u16>,
    pub ether_type_override: Option<u16>,
    pub src: IpAddr,
    /// Destination MAC; by default 02:00:00:00:00:01.
    pub dst_mac: Option<[u8; 6]>,
    /// Destination address; by default 198.18.0.1 or 2001:db8::1.
    pub dst: Option<IpAddr>,
    pub src_port: u16,
    /// Extra 32-bit words of IPv4 options (0 to 10).
    pub ipv4_option_words: u8,
    /// IHL to write instead of the real one.
    pub ipv4_ihl_override: Option<u8>,
    /// IPv4 fragment: (offset in 8-byte units, more fragments).
    pub ipv4_fragment: Option<(u16, bool)>,
    pub ipv6_ext: Vec<Ext>,
    pub protocol: u8,
    pub dst_port: u16,
    pub tcp_flags: u8,
    /// TCP data offset in 32-bit words; 5 is a bare header. Ignored when
    /// `tcp_options` is not empty.
    pub tcp_doff: u8,
    /// TCP options (padded with NOPs to a multiple of 4 bytes).
    pub tcp_options: Vec<u8>,
    pub seq: u32,
    pub ack_seq: u32,
    pub payload: usize,
    /// Cut the frame to this many bytes.
    pub truncate_to: Option<usize>,
}

impl Packet {
    pub fn tcp(src: IpAddr, dst_port: u16, flags: u8) -> Packet {
        Packet {
            vlan_tpids: vec![],
            ether_type_override: None,
            src,
            dst_mac: None,
            dst: None,
            src_port: 40000,
            ipv4_option_words: 0,
            ipv4_ihl_override: None,
            ipv4_fragment: None,
            ipv6_ext: vec![],
            protocol: 6,
            dst_port,
            tcp_flags: flags,
            tcp_doff: 5,
            tcp_options: vec![],
            seq: 1,
            ack_seq: 0,
            payload: 0,
            truncate_to: None,
        }
    }

    /// A SYN with the options a Linux client sends: MSS, SACK permitted,
    /// timestamps (tsval `tsval`), window scale 7.
    pub fn syn_with_options(src: IpAddr, dst_port: u16, mss: u16, tsval: u32) -> Packet {
        let mut options = vec![2, 4];
        options.extend_from_slice(&mss.to_be_bytes());
        options.extend_from_slice(&[4, 2, 8, 10]);
        options.extend_from_slice(&tsval.to_be_bytes());
        options.extend_from_slice(&0u32.to_be_bytes());
        options.extend_from_slice(&[1, 3, 3, 7]);
        Packet {
            tcp_options: options,
            seq: 0x1234_5678,
            ..Packet::syn(src, dst_port)
        }
    }

    /// A connection-opening SYN.
    pub fn syn(src: IpAddr, dst_port: u16) -> Packet {
        Packet::tcp(src, dst_port, TCP_SYN)
    }

    /// A data segment of an established connection.
    pub fn data(src: IpAddr, dst_port: u16, payload: usize) -> Packet {
        Packet {
            payload,
            ..Packet::tcp(src, dst_port, TCP_ACK | TCP_PSH)
        }
    }

    pub fn udp(src: IpAddr, dst_port: u16) -> Packet {
        Packet {
            protocol: 17,
            ..Packet::tcp(src, dst_port, 0)
        }
    }

    /// The server's answer on the same connection: addresses and ports swapped.
    pub fn reply(&self, flags: u8, payload: usize) -> Packet {
        let server = self.dst.unwrap_or(match self.src {
            IpAddr::V4(_) => IpAddr::from([198, 18, 0, 1]),
            IpAddr::V6(_) => IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1u16]),
        });
        Packet {
            src: server,
            dst: Some(self.src),
            src_port: self.dst_port,
            dst_port: self.src_port,
            tcp_flags: flags,
            payload,
            ..self.clone()
        }
    }

    pub fn with(mut self, f: impl FnOnce(&mut Packet)) -> Packet {
        f(&mut self);
        self
    }

    fn l4(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self.protocol {
            6 => {
                out.extend_from_slice(&self.src_port.to_be_bytes());
                out.extend_from_slice(&self.dst_port.to_be_bytes());
                out.extend_from_slice(&self.seq.to_be_bytes());
                out.extend_from_slice(&self.ack_seq.to_be_bytes());
                let mut options = self.tcp_options.clone();
                while !options.len().is_multiple_of(4) {
                    options.push(1); // NOP
                }
                let doff = if options.is_empty() {
                    self.tcp_doff
                } else {
                    5 + (options.len() / 4) as u8
                };
                out.push(doff << 4);
                out.push(self.tcp_flags);
                out.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
                if options.is_empty() {
                    let nops = (self.tcp_doff as usize * 4).saturating_sub(20);
                    options = vec![1u8; nops];
                }
                out.extend_from_slice(&options);
            }
            17 => {
                out.extend_from_slice(&self.src_port.to_be_bytes());
                out.extend_from_slice(&self.dst_port.to_be_bytes());
                out.extend_from_slice(&((8 + self.payload) as u16).to_be_bytes());
                out.extend_from_slice(&[0, 0]);
            }
            _ => {}
        }
        out.extend(std::iter::repeat_n(0x61u8, self.payload));
        out
    }

    /// Offset of the TCP (or UDP) header in the frame, as built.
    pub fn l4_offset(&self) -> usize {
        let l3 = 14 + 4 * self.vlan_tpids.len();
        match self.src {
            IpAddr::V4(_) => l3 + 20 + 4 * self.ipv4_option_words as usize,
            IpAddr::V6(_) => {
                l3 + 40
                    + self
                        .ipv6_ext
                        .iter()
                        .map(|e| match e {
                            Ext::HopByHop | Ext::Routing | Ext::DestOpts => 16,
                            Ext::Fragment { .. } => 8,
                            Ext::Ah => 24,
                            Ext::Esp => 16,
                            Ext::NoNext => 0,
                        })
                        .sum::<usize>()
            }
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut frame = self.dst_mac.unwrap_or([0x02, 0, 0, 0, 0, 0x01]).to_vec();
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
        for tpid in &self.vlan_tpids {
            frame.extend_from_slice(&tpid.to_be_bytes());
            frame.extend_from_slice(&[0x00, 0x07]); // VLAN id 7
        }
        let l4 = self.l4();
        let (ether_type, l3) = match self.src {
            IpAddr::V4(src) => (ETH_P_IPV4, self.ipv4(src.octets(), &l4)),
            IpAddr::V6(src) => (ETH_P_IPV6, self.ipv6(src.octets(), &l4)),
        };
        frame.extend_from_slice(&self.ether_type_override.unwrap_or(ether_type).to_be_bytes());
        frame.extend_from_slice(&l3);
        if let Some(n) = self.truncate_to {
            frame.truncate(n);
        }
        frame
    }

    fn ipv4(&self, src: [u8; 4], l4: &[u8]) -> Vec<u8> {
        let words = 5 + self.ipv4_option_words;
        let ihl = self.ipv4_ihl_override.unwrap_or(words);
        let total = words as usize * 4 + l4.len();
        let mut h = vec![0x40 | (ihl & 0x0f), 0];
        h.extend_from_slice(&(total as u16).to_be_bytes());
        h.extend_from_slice(&[0x12, 0x34]);
        let frag = match self.ipv4_fragment {
            Some((offset, more)) => (offset & 0x1fff) | if more { 0x2000 } else { 0 },
            None => 0x4000, // DF
        };
        h.extend_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(&[64, self.protocol, 0, 0]);
        h.extend_from_slice(&src);
        match self.dst {
            Some(IpAddr::V4(d)) => h.extend_from_slice(&d.octets()),
            _ => h.extend_from_slice(&[198, 18, 0, 1]),
        }
        h.extend(std::iter::repeat_n(
            1u8,
            self.ipv4_option_words as usize * 4,
        )); // NOP options
        h.extend_from_slice(l4);
        h
    }

    fn ipv6(&self, src: [u8; 16], l4: &[u8]) -> Vec<u8> {
        let mut exts = Vec::new();
        let types: Vec<u8> = self
            .ipv6_ext
            .iter()
            .map(ext_type)
            .chain([self.protocol])
            .collect();
        for (i, ext) in self.ipv6_ext.iter().enumerate() {
            let next = types[i + 1];
            match ext {
                Ext::HopByHop | Ext::Routing | Ext::DestOpts => {
                    // 16 bytes: length field 1 (in 8-octet units beyond the first).
                    exts.extend_from_slice(&[next, 1]);
                    exts.extend_from_slice(&[0; 14]);
                }
                Ext::Fragment { offset, more } => {
                    exts.extend_from_slice(&[next, 0]);
                    exts.extend_from_slice(&((offset << 3) | u16::from(*more)).to_be_bytes());
                    exts.extend_from_slice(&[0, 0, 0, 9]);
                }
                Ext::Ah => {
                    // 24 bytes: length (in 4-octet units) minus 2 = 4.
                    exts.extend_from_slice(&[next, 4]);
                    exts.extend_from_slice(&[0; 22]);
                }
                Ext::Esp => exts.extend_from_slice(&[0; 16]),
                Ext::NoNext => {}
            }
        }
        let first = types[0];
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&((exts.len() + l4.len()) as u16).to_be_bytes());
        h.extend_from_slice(&[first, 64]);
        h.extend_from_slice(&src);
        match self.dst {
            Some(IpAddr::V6(d)) => h.extend_from_slice(&d.octets()),
            _ => h.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
        }
        h.extend_from_slice(&exts);
        h.extend_from_slice(l4);
        h
    }
}

fn ext_type(ext: &Ext) -> u8 {
    match ext {
        Ext::HopByHop => 0,
        Ext::Routing => 43,
        Ext::Fragment { .. } => 44,
        Ext::Esp => 50,
        Ext::Ah => 51,
        Ext::NoNext => 59,
        Ext::DestOpts => 60,
    }
}

/// An ARP request frame.
pub fn arp() -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    frame.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&[0; 20]);
    frame
}
