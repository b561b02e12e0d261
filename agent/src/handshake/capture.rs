//! Packet sockets that receive, through the capture socket filter, the
//! client segments of connections awaiting a verdict.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context, Result, bail};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use tokio::io::unix::AsyncFd;

/// One client segment, as the inspector needs it.
#[derive(Clone, Debug)]
pub struct Segment {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub seq: u32,
    pub syn: bool,
    pub fin_or_rst: bool,
    pub payload: Vec<u8>,
}

/// Opens a packet socket on `interface` with `attach` putting the capture
/// filter on it before it is bound, so it never queues unfiltered frames.
pub fn open(
    interface: &str,
    attach: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> Result<()>,
) -> Result<AsyncFd<OwnedFd>> {
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            protocol as i32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .context("cannot open a packet socket (needs CAP_NET_RAW)");
    }
    // SAFETY: a fresh descriptor we own.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    attach(socket.as_fd())?;
    let name = std::ffi::CString::new(interface)?;
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {interface} to inspect handshakes on");
    }
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = protocol;
    address.sll_ifindex = ifindex as i32;
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&address as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot bind the packet socket to {interface}"));
    }
    // SAFETY: the AsyncFd owns the socket for its whole life.
    Ok(unsafe { AsyncFd::register(socket) }.map_err(std::io::Error::from)?)
}

/// Reads one frame; `None` for frames the host sends (loopback shows both
/// directions) or that are not a TCP segment.
pub fn read_frame(socket: &OwnedFd, buffer: &mut [u8]) -> std::io::Result<Option<Segment>> {
    let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut from_len = size_of::<libc::sockaddr_ll>() as u32;
    let n = unsafe {
        libc::recvfrom(
            socket.as_raw_fd(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            0,
            (&mut from as *mut libc::sockaddr_ll).cast(),
            &mut from_len,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if from.sll_pkttype == libc::PACKET_OUTGOING as u8 {
        return Ok(None);
    }
    Ok(parse(&buffer[..n as usize]))
}

fn parse(frame: &[u8]) -> Option<Segment> {
    let packet = SlicedPacket::from_ethernet(frame).ok()?;
    let (source, destination) = match packet.net? {
        NetSlice::Ipv4(ip) => (
            IpAddr::V4(ip.header().source_addr()),
            IpAddr::V4(ip.header().destination_addr()),
        ),
        NetSlice::Ipv6(ip) => (
            IpAddr::V6(ip.header().source_addr()),
            IpAddr::V6(ip.header().destination_addr()),
        ),
        _ => return None,
    };
    let Some(TransportSlice::Tcp(tcp)) = packet.transport else {
        return None;
    };
    Some(Segment {
        client: SocketAddr::new(source, tcp.source_port()),
        server: SocketAddr::new(destination, tcp.destination_port()),
        seq: tcp.sequence_number(),
        syn: tcp.syn() && !tcp.ack(),
        fin_or_rst: tcp.fin() || tcp.rst(),
        payload: tcp.payload().to_vec(),
    })
}
