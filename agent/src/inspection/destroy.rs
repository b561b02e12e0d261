//! Closing the server's side of a rejected connection: SOCK_DESTROY through
//! netlink inet_diag, so the application stops serving it at once.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Result, bail};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagDestroy,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    message::SockDiagMessage,
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

/// Destroys the server socket of the connection `client` → `server` whose
/// socket cookie is `cookie`. A server on a dual-stack listener holds an
/// IPv4 client in an IPv6 socket, so both forms are tried.
///
/// The cookie is what makes this safe: without it the kernel's lookup falls
/// back to the listening socket when the connection is already gone, and
/// would destroy the server's listener.
pub fn destroy(client: SocketAddr, server: SocketAddr, cookie: u64) -> Result<()> {
    let mut attempts = vec![(family(server.ip()), server.ip(), client.ip())];
    if let (IpAddr::V4(s), IpAddr::V4(c)) = (server.ip(), client.ip()) {
        attempts.push((
            AF_INET6,
            IpAddr::V6(s.to_ipv6_mapped()),
            IpAddr::V6(c.to_ipv6_mapped()),
        ));
    }
    let mut last = None;
    for (family, local, remote) in attempts {
        match send(
            family,
            SocketAddr::new(local, server.port()),
            SocketAddr::new(remote, client.port()),
            cookie,
        ) {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap())
}

fn family(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { AF_INET } else { AF_INET6 }
}

fn send(family: u8, local: SocketAddr, remote: SocketAddr, cookie: u64) -> Result<()> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let request = InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id: SocketId {
            source_port: local.port(),
            destination_port: remote.port(),
            source_address: local.ip(),
            destination_address: remote.ip(),
            interface_id: 0,
            // inet_diag's idiag_cookie: two u32 in host order, low half first.
            cookie: [
                (cookie as u32).to_ne_bytes(),
                ((cookie >> 32) as u32).to_ne_bytes(),
            ]
            .concat()
            .try_into()
            .expect("8 bytes"),
        },
    };
    let mut message = NetlinkMessage::new(
        header,
        NetlinkPayload::from(SockDiagDestroy::new(SockDiagMessage::InetRequest(request))),
    );
    message.finalize();
    let mut buffer = vec![0; message.buffer_len()];
    message.serialize(&mut buffer);
    socket.send(&buffer, 0)?;
    let mut reply = vec![0u8; 4096];
    let n = socket.recv(&mut &mut reply[..], 0)?;
    let answer = NetlinkMessage::<SockDiagMessage>::deserialize(&reply[..n])
        .map_err(|e| anyhow::anyhow!("bad netlink reply: {e}"))?;
    match answer.payload {
        NetlinkPayload::Error(e) if e.code.is_some() => {
            bail!("SOCK_DESTROY {local} <- {remote}: {}", e.to_io())
        }
        _ => Ok(()),
    }
}
