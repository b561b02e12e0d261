//! A TCP client written by hand, for the wire-level evasion tests: it sends
//! segments the kernel's own TCP would never send (bad checksums, overlaps,
//! IP fragments, forged resets) and reads the server's answers off the wire.
//!
//! It runs in the client namespace from an address configured on no
//! interface there, so the client's kernel neither answers nor resets the
//! connection; the server reaches that address through a static neighbour
//! entry pointing at the client's link.

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::Lab;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// One segment to send.
#[derive(Clone, Debug)]
pub struct Segment {
    /// Offset of the first byte in the client's stream (0 is the byte after the SYN).
    pub offset: u32,
    pub flags: u8,
    pub payload: Vec<u8>,
    pub bad_checksum: bool,
    /// Send as IPv4 fragments of at most this many bytes of IP payload
    /// (a multiple of 8).
    pub fragment: Option<usize>,
}

impl Segment {
    pub fn data(offset: u32, payload: &[u8]) -> Segment {
        Segment {
            offset,
            flags: ACK | PSH,
            payload: payload.to_vec(),
            bad_checksum: false,
            fragment: None,
        }
    }
}

/// A connection from a hand-written TCP client.
pub struct RawTcp {
    send: OwnedFd,
    recv: OwnedFd,
    client: Ipv4Addr,
    server: Ipv4Addr,
    client_port: u16,
    server_port: u16,
    /// Initial sequence numbers.
    isn: u32,
    server_isn: u32,
    /// The client's stream offset after the last byte sent.
    sent: u32,
    /// Bytes of the server's stream received in order.
    pub received: Vec<u8>,
    /// The server reset the connection.
    pub reset: bool,
}

fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

impl RawTcp {
    /// Opens a connection from `client_host` (an unconfigured host number of
    /// the lab's client subnet) to the server's `port`.
    pub fn connect(lab: &Lab, client_host: u8, port: u16) -> Result<RawTcp> {
        let client = lab.client_v4(client_host);
        let server = lab.server_v4();
        let mac = lab.client_mac()?;
        lab.server.ip(&[
            "neigh",
            "replace",
            &client.to_string(),
            "lladdr",
            &mac,
            "dev",
            &lab.server_if,
        ])?;
        let interface = lab.client_if.clone();
        // Sockets belong to the namespace they were created in.
        let (send, recv) = lab.client.run(move || -> Result<(OwnedFd, OwnedFd)> {
            let send = unsafe {
                libc::socket(
                    libc::AF_INET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::IPPROTO_RAW,
                )
            };
            ensure!(send >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let recv = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                    (libc::ETH_P_IP as u16).to_be() as i32,
                )
            };
            ensure!(
                recv >= 0,
                "packet socket: {}",
                std::io::Error::last_os_error()
            );
            let name = std::ffi::CString::new(interface)?;
            let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            address.sll_family = libc::AF_PACKET as u16;
            address.sll_protocol = (libc::ETH_P_IP as u16).to_be();
            address.sll_ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
            let rc = unsafe {
                libc::bind(
                    recv,
                    (&address as *const libc::sockaddr_ll).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            ensure!(rc == 0, "bind: {}", std::io::Error::last_os_error());
            Ok(unsafe { (OwnedFd::from_raw_fd(send), OwnedFd::from_raw_fd(recv)) })
        })?;
        let mut tcp = RawTcp {
            send,
            recv,
            client,
            server,
            client_port: 30000 + u16::from(client_host) * 50 + (std::process::id() % 50) as u16,
            server_port: port,
            isn: 0x1000_0000,
            server_isn: 0,
            sent: 0,
            received: Vec::new(),
            reset: false,
        };
        tcp.send_raw(0, SYN, &[], false, None)?;
        let until = Instant::now() + Duration::from_secs(3);
        while tcp.server_isn == 0 {
            ensure!(Instant::now() < until, "no SYN-ACK from the server");
            tcp.poll()?;
            std::thread::sleep(Duration::from_millis(2));
        }
        tcp.send_raw(1, ACK, &[], false, None)?;
        Ok(tcp)
    }

    /// Sends a segment of the client's stream.
    pub fn send(&mut self, segment: &Segment) -> Result<()> {
        self.sent = self.sent.max(segment.offset + segment.payload.len() as u32);
        self.send_raw(
            segment.offset.wrapping_add(1),
            segment.flags,
            &segment.payload,
            segment.bad_checksum,
            segment.fragment,
        )
    }

    fn send_raw(
        &mut self,
        seq_offset: u32,
        flags: u8,
        payload: &[u8],
        bad_checksum: bool,
        fragment: Option<usize>,
    ) -> Result<()> {
        let seq = self.isn.wrapping_add(seq_offset);
        let ack = if flags & ACK != 0 {
            self.server_isn
                .wrapping_add(1)
                .wrapping_add(self.received.len() as u32)
        } else {
            0
        };
        let mut tcp = Vec::with_capacity(20 + payload.len());
        tcp.extend_from_slice(&self.client_port.to_be_bytes());
        tcp.extend_from_slice(&self.server_port.to_be_bytes());
        tcp.extend_from_slice(&seq.to_be_bytes());
        tcp.extend_from_slice(&ack.to_be_bytes());
        tcp.push(5 << 4);
        tcp.push(flags);
        tcp.extend_from_slice(&65535u16.to_be_bytes());
        tcp.extend_from_slice(&[0, 0, 0, 0]);
        tcp.extend_from_slice(payload);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&self.client.octets());
        pseudo.extend_from_slice(&self.server.octets());
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        pseudo.extend_from_slice(&tcp);
        let mut sum = checksum(&pseudo, 0);
        if bad_checksum {
            sum ^= 0x5a5a;
        }
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
        let step = fragment.unwrap_or(tcp.len()).max(8);
        let mut at = 0;
        while at < tcp.len() {
            let end = (at + step).min(tcp.len());
            let more = end < tcp.len();
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&((20 + end - at) as u16).to_be_bytes());
            ip.extend_from_slice(&[0x43, 0x21]);
            let frag = ((at / 8) as u16) | if more { 0x2000 } else { 0 };
            ip.extend_from_slice(&frag.to_be_bytes());
            ip.extend_from_slice(&[64, 6, 0, 0]);
            ip.extend_from_slice(&self.client.octets());
            ip.extend_from_slice(&self.server.octets());
            let header_sum = checksum(&ip, 0);
            ip[10..12].copy_from_slice(&header_sum.to_be_bytes());
            ip.extend_from_slice(&tcp[at..end]);
            let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            to.sin_family = libc::AF_INET as u16;
            to.sin_addr.s_addr = u32::from_ne_bytes(self.server.octets());
            let rc = unsafe {
                libc::sendto(
                    self.send.as_raw_fd(),
                    ip.as_ptr().cast(),
                    ip.len(),
                    0,
                    (&to as *const libc::sockaddr_in).cast(),
                    size_of::<libc::sockaddr_in>() as u32,
                )
            };
            if rc < 0 {
                bail!("sendto: {}", std::io::Error::last_os_error());
            }
            at = end;
        }
        Ok(())
    }

    /// Reads what the server sent so far (acknowledging its data).
    pub fn poll(&mut self) -> Result<()> {
        let mut buf = [0u8; 65536];
        loop {
            let n =
                unsafe { libc::recv(self.recv.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    return Ok(());
                }
                return Err(e).context("recv");
            }
            let ip = &buf[..n as usize];
            if ip.len() < 40
                || ip[9] != 6
                || ip[12..16] != self.server.octets()
                || ip[16..20] != self.client.octets()
            {
                continue;
            }
            let ihl = (ip[0] & 0x0f) as usize * 4;
            let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            let tcp = &ip[ihl..total.min(ip.len())];
            if tcp.len() < 20 || u16::from_be_bytes([tcp[2], tcp[3]]) != self.client_port {
                continue;
            }
            let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
            let flags = tcp[13];
            let doff = (tcp[12] >> 4) as usize * 4;
            if flags & RST != 0 {
                self.reset = true;
                continue;
            }
            if flags & SYN != 0 && flags & ACK != 0 {
                self.server_isn = seq;
                continue;
            }
            let payload = &tcp[doff.min(tcp.len())..];
            let offset = seq.wrapping_sub(self.server_isn.wrapping_add(1)) as usize;
            if !payload.is_empty() && offset == self.received.len() {
                self.received.extend_from_slice(payload);
                self.send_raw(self.sent + 1, ACK, &[], false, None).ok();
            }
        }
    }

    /// Waits up to `wait` for the server to answer or reset; returns its answer.
    pub fn answer(&mut self, wait: Duration) -> Result<String> {
        let until = Instant::now() + wait;
        while Instant::now() < until && self.received.is_empty() && !self.reset {
            self.poll()?;
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(String::from_utf8_lossy(&self.received).into_owned())
    }
}

impl Drop for RawTcp {
    fn drop(&mut self) {
        let _ = self.send_raw(self.sent + 1, RST | ACK, &[], false, None);
    }
}
