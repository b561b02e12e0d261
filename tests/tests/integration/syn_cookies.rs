//! SYN cookies in the kernel program, through BPF_PROG_TEST_RUN: the SYN-ACK
//! XDP_TX sends back, field by field (IPv4, IPv6, VLAN); the ACK that
//! returns a valid cookie, and every way to return a bad one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use wsguard::kernel::monotonic_ns;
use wsguard_common::{
    Reason, SourceKey,
    cookie::{self, CookieOptions, CookieSettings, CookieTuple, MSS_V4, MSS_V6},
};
use wsguard_tests::{
    packets::{ETH_P_8021AD, ETH_P_8021Q, Ext, Packet, TCP_ACK, TCP_RST, TCP_SYN},
    xdp::{XDP_DROP, XDP_PASS, XDP_TX, XdpHarness},
};

const PORT: u16 = 8080;
const CLIENT_TSVAL: u32 = 777_000;

fn v4(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 0, last))
}

fn v6(last: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, last]))
}

fn server_of(src: IpAddr) -> IpAddr {
    match src {
        IpAddr::V4(_) => v4(1),
        IpAddr::V6(_) => v6(1),
    }
}

fn harness(extra: &str) -> XdpHarness {
    let body = format!(
        "[protect]\nports = [{PORT}]\n\n[limits.per_source]\nnew_connections = \"1/s\"\nnew_connections_burst = 2\n\n\
         [ban]\nafter_drops = 3\n\n[syn_cookies]\nenabled = true\n{extra}"
    );
    XdpHarness::new(&body).expect("loading the programs")
}

fn key16(addr: IpAddr) -> [u8; 16] {
    wsguard_common::SourceKey::from(addr).addr
}

fn tuple(src: IpAddr, src_port: u16, client_isn: u32) -> CookieTuple {
    CookieTuple {
        client: key16(src),
        server: key16(server_of(src)),
        client_port: src_port,
        server_port: PORT,
        client_isn,
    }
}

/// The Internet checksum over `bytes` plus an already summed pseudo header,
/// written independently of the kernel side's.
fn internet_checksum(pseudo: u32, bytes: &[u8]) -> u16 {
    let mut sum = pseudo;
    for chunk in bytes.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn sum_words(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum()
}

/// A SYN-ACK taken apart.
#[derive(Debug)]
struct SynAck {
    seq: u32,
    ack: u32,
    tsval: Option<u32>,
    tsecr: Option<u32>,
    mss: Option<u16>,
    wscale: Option<u8>,
    sack_permitted: bool,
}

/// Checks the reply to `syn` field by field and returns its TCP part.
fn check_syn_ack(syn: &Packet, out: &[u8], settings: &CookieSettings) -> SynAck {
    let sent = syn.bytes();
    assert_eq!(
        &out[0..6],
        &sent[6..12],
        "destination MAC is the SYN's source"
    );
    assert_eq!(
        &out[6..12],
        &sent[0..6],
        "source MAC is the SYN's destination"
    );
    let l3 = 12 + 4 * syn.vlan_tpids.len();
    assert_eq!(&out[12..l3], &sent[12..l3], "VLAN tags kept as they came");
    let l3 = l3 + 2;
    assert_eq!(&out[l3 - 2..l3], &sent[l3 - 2..l3], "EtherType kept");
    let server = server_of(syn.src);
    let (l4, pseudo) = match (syn.src, server) {
        (IpAddr::V4(client), IpAddr::V4(server)) => {
            let ip = &out[l3..l3 + 20];
            assert_eq!(ip[0], 0x45, "IPv4 without options");
            assert_eq!(ip[8], 64, "TTL");
            assert_eq!(ip[9], 6, "TCP");
            assert_eq!(&ip[12..16], &server.octets(), "source is the server");
            assert_eq!(&ip[16..20], &client.octets(), "destination is the client");
            assert_eq!(internet_checksum(0, ip), 0, "IPv4 header checksum");
            let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            assert_eq!(total, out.len() - l3, "IPv4 total length");
            let tcp_len = total - 20;
            let pseudo = sum_words(&ip[12..20]) + 6 + tcp_len as u32;
            (l3 + 20, pseudo)
        }
        (IpAddr::V6(client), IpAddr::V6(server)) => {
            let ip = &out[l3..l3 + 40];
            assert_eq!(ip[0] >> 4, 6);
            assert_eq!(ip[6], 6, "next header TCP");
            assert_eq!(ip[7], 64, "hop limit");
            assert_eq!(&ip[8..24], &server.octets());
            assert_eq!(&ip[24..40], &client.octets());
            let payload = u16::from_be_bytes([ip[4], ip[5]]) as usize;
            assert_eq!(payload, out.len() - l3 - 40, "IPv6 payload length");
            let pseudo = sum_words(&ip[8..40]) + 6 + payload as u32;
            (l3 + 40, pseudo)
        }
        _ => unreachable!(),
    };
    let tcp = &out[l4..];
    assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), PORT, "source port");
    assert_eq!(
        u16::from_be_bytes([tcp[2], tcp[3]]),
        syn.src_port,
        "destination port"
    );
    assert_eq!(tcp[13], TCP_SYN | TCP_ACK, "flags SYN|ACK only");
    let doff = (tcp[12] >> 4) as usize * 4;
    assert_eq!(doff, tcp.len(), "no payload");
    assert_eq!(internet_checksum(pseudo, tcp), 0, "TCP checksum");
    let mut reply = SynAck {
        seq: u32::from_be_bytes(tcp[4..8].try_into().unwrap()),
        ack: u32::from_be_bytes(tcp[8..12].try_into().unwrap()),
        tsval: None,
        tsecr: None,
        mss: None,
        wscale: None,
        sack_permitted: false,
    };
    let mut at = 20;
    while at < doff {
        match tcp[at] {
            0 => break,
            1 => at += 1,
            kind => {
                let len = tcp[at + 1] as usize;
                match kind {
                    2 => reply.mss = Some(u16::from_be_bytes([tcp[at + 2], tcp[at + 3]])),
                    3 => reply.wscale = Some(tcp[at + 2]),
                    4 => reply.sack_permitted = true,
                    8 => {
                        reply.tsval =
                            Some(u32::from_be_bytes(tcp[at + 2..at + 6].try_into().unwrap()));
                        reply.tsecr =
                            Some(u32::from_be_bytes(tcp[at + 6..at + 10].try_into().unwrap()));
                    }
                    other => panic!("unexpected option {other}"),
                }
                at += len;
            }
        }
    }
    let our_mss = if syn.src.is_ipv4() {
        settings.mss_v4
    } else {
        settings.mss_v6
    };
    assert_eq!(reply.mss, Some(our_mss), "the server's MSS");
    reply
}

/// The ACK a real client returns for `reply`.
fn ack_for(syn: &Packet, reply: &SynAck) -> Packet {
    let mut options = vec![1, 1, 8, 10];
    options.extend_from_slice(&(CLIENT_TSVAL + 1).to_be_bytes());
    options.extend_from_slice(&reply.tsval.unwrap_or(0).to_be_bytes());
    Packet {
        tcp_options: if reply.tsval.is_some() {
            options
        } else {
            vec![]
        },
        seq: syn.seq.wrapping_add(1),
        ack_seq: reply.seq.wrapping_add(1),
        tcp_flags: TCP_ACK,
        ..syn.clone()
    }
}

/// The current cookie slot, after waiting (at most 2 s, and only near a
/// boundary) until the kernel's coarse clock is in it and it has at least
/// 2 s to run: the checks that build cookies for "two slots ago" and "the
/// slot before" need the kernel to stay in this slot while they run.
fn settled_slot() -> u64 {
    const SLOT_NS: u64 = 1 << cookie::SLOT_SHIFT;
    const MARGIN_NS: u64 = 2_000_000_000;
    const SETTLE_NS: u64 = 50_000_000; // several ticks of the coarse clock
    let into = monotonic_ns() % SLOT_NS;
    if SLOT_NS - into < MARGIN_NS {
        std::thread::sleep(std::time::Duration::from_nanos(SLOT_NS - into + SETTLE_NS));
    } else if into < SETTLE_NS {
        std::thread::sleep(std::time::Duration::from_nanos(SETTLE_NS - into));
    }
    cookie::slot(monotonic_ns())
}

fn answered(h: &XdpHarness, syn: &Packet) -> SynAck {
    let (verdict, out) = h.run_out(&syn.bytes()).unwrap();
    assert_eq!(verdict, XDP_TX, "a SYN is answered from XDP");
    check_syn_ack(syn, &out, &h.cookie_settings())
}

#[test]
fn a_syn_is_answered_with_a_cookie_and_gets_no_state() {
    let h = harness("");
    let settings = h.cookie_settings();
    assert_ne!(settings.key, [0, 0], "the agent set a key");
    let cases = [
        (
            "IPv4",
            Packet::syn_with_options(v4(2), PORT, 1460, CLIENT_TSVAL),
        ),
        (
            "IPv6",
            Packet::syn_with_options(v6(2), PORT, 1440, CLIENT_TSVAL),
        ),
        (
            "IPv4 in 802.1Q",
            Packet::syn_with_options(v4(3), PORT, 1460, CLIENT_TSVAL)
                .with(|p| p.vlan_tpids = vec![ETH_P_8021Q]),
        ),
        (
            "IPv6 in QinQ",
            Packet::syn_with_options(v6(3), PORT, 1440, CLIENT_TSVAL)
                .with(|p| p.vlan_tpids = vec![ETH_P_8021AD, ETH_P_8021Q]),
        ),
    ];
    for (name, syn) in cases {
        let reply = answered(&h, &syn);
        assert_eq!(reply.ack, syn.seq + 1, "{name}: acknowledges the SYN");
        assert_eq!(
            reply.tsecr,
            Some(CLIENT_TSVAL),
            "{name}: echoes the client's timestamp"
        );
        assert!(reply.tsval.is_some(), "{name}: timestamps kept");
        assert!(reply.sack_permitted, "{name}: SACK kept");
        assert_eq!(
            reply.wscale,
            Some(settings.server_wscale),
            "{name}: window scaling kept"
        );
        let carried = cookie::check(
            &settings.key,
            &tuple(syn.src, syn.src_port, syn.seq),
            reply.seq,
            cookie::slot(monotonic_ns()),
        )
        .unwrap_or_else(|| panic!("{name}: the sequence number is a valid cookie"));
        let table = if syn.src.is_ipv4() { MSS_V4 } else { MSS_V6 };
        let client_mss = if syn.src.is_ipv4() { 1460 } else { 1440 };
        assert_eq!(
            table[carried.mss_index as usize], client_mss,
            "{name}: client MSS kept"
        );
        assert_eq!(carried.wscale, 7, "{name}: the client's window scale");
        assert!(carried.sack, "{name}");
    }
    assert_eq!(h.packets(Reason::SynCookieSent), 4);
    assert!(
        h.tracked_sources().is_empty(),
        "no per-source state for a SYN"
    );
}

#[test]
fn a_bare_syn_gets_a_bare_syn_ack() {
    let h = harness("");
    let syn = Packet::syn(v4(4), PORT);
    let reply = answered(&h, &syn);
    assert_eq!(reply.tsval, None, "no timestamps offered back");
    assert_eq!(reply.wscale, None);
    assert!(!reply.sack_permitted);
    let carried = cookie::check(
        &h.cookie_settings().key,
        &tuple(syn.src, syn.src_port, syn.seq),
        reply.seq,
        cookie::slot(monotonic_ns()),
    )
    .expect("valid cookie");
    assert_eq!(
        MSS_V4[carried.mss_index as usize], 536,
        "RFC 9293's default MSS"
    );
}

#[test]
fn a_valid_cookie_admits_the_connection_and_only_then_creates_state() {
    let h = harness("");
    for src in [v4(5), v6(5)] {
        let syn = Packet::syn_with_options(src, PORT, 1460, CLIENT_TSVAL);
        let reply = answered(&h, &syn);
        let ack = ack_for(&syn, &reply);
        assert_eq!(
            h.run(&ack.bytes()),
            XDP_PASS,
            "{src}: the cookie ACK passes"
        );
    }
    assert_eq!(h.packets(Reason::SynCookieValidated), 2);
    assert_eq!(h.packets(Reason::Passed), 2);
    let mut tracked = h.tracked_sources();
    tracked.sort();
    // IPv6 sources are tracked by /64 (the default prefix).
    let mut v6_prefix = key16(v6(5));
    v6_prefix[8..].fill(0);
    let mut expected = vec![
        SourceKey { addr: key16(v4(5)) },
        SourceKey { addr: v6_prefix },
    ];
    expected.sort();
    assert_eq!(tracked, expected, "state for the verified sources only");
}

#[test]
fn wrong_stale_and_borrowed_cookies_are_dropped_and_counted() {
    let h = harness("");
    let key = h.cookie_settings().key;
    let syn = Packet::syn_with_options(v4(6), PORT, 1460, CLIENT_TSVAL);
    let reply = answered(&h, &syn);
    let good = ack_for(&syn, &reply);

    let wrong = Packet {
        ack_seq: (reply.seq ^ 0x0001_0000).wrapping_add(1),
        ..good.clone()
    };
    assert_eq!(h.run(&wrong.bytes()), XDP_DROP, "a hash bit flipped");
    let borrowed = Packet {
        src_port: syn.src_port + 1,
        ..good.clone()
    };
    assert_eq!(
        h.run(&borrowed.bytes()),
        XDP_DROP,
        "a cookie replayed on another port"
    );
    let borrowed = Packet {
        src: v4(7),
        ..good.clone()
    };
    assert_eq!(
        h.run(&borrowed.bytes()),
        XDP_DROP,
        "a cookie replayed from another address"
    );
    let options = CookieOptions {
        mss_index: 3,
        wscale: 7,
        sack: true,
    };
    let now = settled_slot();
    let stale = cookie::make(
        &key,
        &tuple(syn.src, syn.src_port, syn.seq),
        options,
        now - 2,
    );
    let stale = Packet {
        ack_seq: stale.wrapping_add(1),
        ..good.clone()
    };
    assert_eq!(h.run(&stale.bytes()), XDP_DROP, "a cookie two slots old");
    let no_cookie = Packet {
        ack_seq: 12345,
        tcp_options: vec![],
        ..Packet::data(v4(8), PORT, 10)
    };
    assert_eq!(
        h.run(&no_cookie.bytes()),
        XDP_DROP,
        "data for no connection"
    );
    assert_eq!(h.packets(Reason::SynCookieFailed), 5);
    assert!(h.tracked_sources().is_empty(), "failures create no state");

    let previous = cookie::make(
        &key,
        &tuple(syn.src, syn.src_port, syn.seq),
        options,
        now - 1,
    );
    let previous = Packet {
        ack_seq: previous.wrapping_add(1),
        ..good
    };
    assert_eq!(
        h.run(&previous.bytes()),
        XDP_PASS,
        "last slot's cookie still holds"
    );
}

#[test]
fn lists_and_bans_come_before_cookies() {
    let h = harness("\n[lists]\nallow = [\"198.18.0.9/32\"]\ndeny = [\"198.18.0.10/32\"]\n");
    let allowed = Packet::syn_with_options(v4(9), PORT, 1460, CLIENT_TSVAL);
    assert_eq!(
        h.run(&allowed.bytes()),
        XDP_PASS,
        "allow-listed: no round trip"
    );
    let denied = Packet::syn_with_options(v4(10), PORT, 1460, CLIENT_TSVAL);
    assert_eq!(h.run(&denied.bytes()), XDP_DROP, "denied: no SYN-ACK");
    assert_eq!(h.packets(Reason::SynCookieSent), 0);
}

#[test]
fn a_banned_source_gets_no_syn_ack() {
    let mut h = harness("");
    let banned = SourceKey {
        addr: key16(v4(11)),
    };
    h.set_ban(
        &banned,
        wsguard_common::Ban {
            since_ns: 0,
            until_ns: u64::MAX,
        },
    );
    let syn = Packet::syn_with_options(v4(11), PORT, 1460, CLIENT_TSVAL);
    assert_eq!(h.run(&syn.bytes()), XDP_DROP);
    assert_eq!(h.packets(Reason::Banned), 1);
    assert_eq!(h.packets(Reason::SynCookieSent), 0);
}

#[test]
fn spoofed_syns_cannot_earn_their_address_a_ban() {
    // Without cookies, SYNs past the per-source burst are limit drops, and
    // three of them ban the address: anyone can get a victim banned.
    let victim = v4(12);
    let without = XdpHarness::new(&format!(
        "[protect]\nports = [{PORT}]\n\n[limits.per_source]\nnew_connections = \"1/s\"\nnew_connections_burst = 2\n\n[ban]\nafter_drops = 3\n"
    ))
    .unwrap();
    for _ in 0..20 {
        without.run(&Packet::syn(victim, PORT).bytes());
    }
    assert!(
        without
            .ban(&SourceKey {
                addr: key16(victim)
            })
            .is_some(),
        "the attack works without cookies"
    );

    let h = harness("");
    for i in 0..200u16 {
        let syn = Packet::syn(victim, PORT).with(|p| p.src_port = 1000 + i);
        assert_eq!(h.run(&syn.bytes()), XDP_TX);
    }
    assert_eq!(
        h.ban(&SourceKey {
            addr: key16(victim)
        }),
        None,
        "no ban"
    );
    assert!(h.tracked_sources().is_empty(), "no state");
    // The victim's own connection still gets in.
    let syn = Packet::syn_with_options(victim, PORT, 1460, CLIENT_TSVAL);
    let reply = answered(&h, &syn);
    assert_eq!(h.run(&ack_for(&syn, &reply).bytes()), XDP_PASS);
}

#[test]
fn the_connection_budget_is_charged_at_the_cookie_ack() {
    // Burst 2, 1/s: the third verified connection in a row is a limit drop.
    let h = harness("");
    let mut verdicts = Vec::new();
    for i in 0..3u16 {
        let syn = Packet::syn_with_options(v4(13), PORT, 1460, CLIENT_TSVAL)
            .with(|p| p.src_port = 2000 + i);
        let reply = answered(&h, &syn);
        verdicts.push(h.run(&ack_for(&syn, &reply).bytes()));
    }
    assert_eq!(verdicts, vec![XDP_PASS, XDP_PASS, XDP_DROP]);
    assert_eq!(h.packets(Reason::ConnectionRate), 1);
}

#[test]
fn syns_that_cannot_be_answered_are_dropped() {
    let h = harness("");
    let with_ip_options = Packet::syn_with_options(v4(14), PORT, 1460, CLIENT_TSVAL)
        .with(|p| p.ipv4_option_words = 2);
    assert_eq!(h.run(&with_ip_options.bytes()), XDP_DROP);
    let with_extension = Packet::syn_with_options(v6(14), PORT, 1440, CLIENT_TSVAL)
        .with(|p| p.ipv6_ext = vec![Ext::DestOpts]);
    assert_eq!(h.run(&with_extension.bytes()), XDP_DROP);
    let syn_rst = Packet::tcp(v4(15), PORT, TCP_SYN | TCP_RST);
    assert_eq!(h.run(&syn_rst.bytes()), XDP_DROP);
    assert_eq!(h.packets(Reason::SynCookieFailed), 3);
    assert!(h.tracked_sources().is_empty());
}

#[test]
fn in_dry_run_syns_pass_to_the_server() {
    let h = harness("\n[limits]\ndry_run = true\n");
    let syn = Packet::syn_with_options(v4(16), PORT, 1460, CLIENT_TSVAL);
    assert_eq!(
        h.run(&syn.bytes()),
        XDP_PASS,
        "a dry run does not answer for the server"
    );
    assert_eq!(h.packets(Reason::SynCookieSent), 0);
}

mod real_traffic {
    //! The agent on a test host's interface, real clients through the
    //! cookie round trip into a real WebSocket server.

    use std::{
        net::{SocketAddr, TcpListener, TcpStream},
        os::fd::AsRawFd,
        time::Duration,
    };

    use anyhow::{Context, Result, ensure};
    use wsguard::kernel::Maps;
    use wsguard_common::{Reason, SourceKey};
    use wsguard_tests::{
        Agent, Lab, Setup,
        lab::send_frames,
        packets::Packet,
        peers::{echo, ws_connect},
    };

    const SECOND: Duration = Duration::from_secs(1);
    const TCPI_OPT_TIMESTAMPS: u8 = 1;
    const TCPI_OPT_SACK: u8 = 2;
    const TCPI_OPT_WSCALE: u8 = 4;

    /// (tcpi_options, tcpi_snd_wscale, tcpi_rcv_wscale) of a socket.
    fn tcp_options(stream: &TcpStream) -> (u8, u8, u8) {
        let mut info = [0u8; 232];
        let mut len = info.len() as libc::socklen_t;
        // SAFETY: TCP_INFO writes at most `len` bytes into `info`.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                info.as_mut_ptr().cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "TCP_INFO");
        // struct tcp_info: state, ca_state, retransmits, probes, backoff,
        // options, then snd_wscale:4 | rcv_wscale:4.
        (info[5], info[6] & 0x0f, info[6] >> 4)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn websocket_clients_connect_through_the_cookie() -> Result<()> {
        for v6 in [false, true] {
            let body = "[protect]\nports = [8080]\n";
            let setup = if v6 {
                Setup::start_v6(body).await?
            } else {
                Setup::start(body).await?
            };
            let client = if v6 {
                setup.lab.client_v6(3).into()
            } else {
                setup.lab.client_v4(3).into()
            };
            let mut ws = ws_connect(&setup.lab.client, client, setup.addr, 2 * SECOND).await?;
            echo(&mut ws, "through the cookie", SECOND).await?;
            ensure!(
                setup.agent.counter(Reason::SynCookieSent).packets >= 1,
                "no cookie sent"
            );
            ensure!(
                setup.agent.counter(Reason::SynCookieValidated).packets >= 1,
                "no cookie validated"
            );
            ensure!(
                !setup.agent.state()?.tracked_sources()?.is_empty(),
                "the verified client is tracked"
            );
        }
        Ok(())
    }

    #[test]
    fn the_server_socket_keeps_timestamps_sack_and_window_scaling() -> Result<()> {
        let lab = Lab::new()?;
        let _agent = Agent::start(&lab, "[protect]\nports = [8080]\n")?;
        for server in [
            SocketAddr::new(lab.server_v4().into(), 8080),
            SocketAddr::new(lab.server_v6().into(), 8080),
        ] {
            let listener = lab.server.run(move || TcpListener::bind(server))?;
            let client = lab
                .client
                .run(move || TcpStream::connect_timeout(&server, 2 * SECOND))?;
            let (accepted, _) = listener.accept().context("accept")?;
            let (options, snd_wscale, rcv_wscale) = tcp_options(&accepted);
            ensure!(
                options & TCPI_OPT_TIMESTAMPS != 0,
                "{server}: timestamps lost ({options:#x})"
            );
            ensure!(
                options & TCPI_OPT_SACK != 0,
                "{server}: SACK lost ({options:#x})"
            );
            ensure!(
                options & TCPI_OPT_WSCALE != 0,
                "{server}: window scaling lost ({options:#x})"
            );
            let (client_options, client_snd, client_rcv) = tcp_options(&client);
            ensure!(
                client_options & 7 == 7 && client_snd == rcv_wscale && client_rcv == snd_wscale,
                "{server}: both ends agree on the options: client {client_options:#x} {client_snd}/{client_rcv}, server {snd_wscale}/{rcv_wscale}"
            );
        }
        Ok(())
    }

    /// SYNs from `count` random sources in 198.19.0.0/16 (or
    /// 2001:db8:ffff::/48), addressed to the lab's server.
    fn spoofed_syns(setup: &Setup, v6: bool, count: usize) -> Result<Vec<Vec<u8>>> {
        let mac = setup.lab.server_mac()?;
        let server = setup.addr.ip();
        Ok((0..count)
            .map(|i| {
                let source: std::net::IpAddr = if v6 {
                    std::net::Ipv6Addr::from([
                        0x2001,
                        0xdb8,
                        0xffff,
                        fastrand::u16(..),
                        0,
                        0,
                        0,
                        fastrand::u16(1..),
                    ])
                    .into()
                } else {
                    std::net::Ipv4Addr::new(198, 19, fastrand::u8(..), fastrand::u8(1..)).into()
                };
                Packet::syn(source, 8080)
                    .with(|p| {
                        p.dst_mac = Some(mac);
                        p.dst = Some(server);
                        p.src_port = 1024 + (i % 60_000) as u16;
                    })
                    .bytes()
            })
            .collect())
    }

    fn in_flood_range(key: &SourceKey) -> bool {
        key.addr[10..14] == [0xff, 0xff, 198, 19]
            || key.addr[..6] == [0x20, 0x01, 0x0d, 0xb8, 0xff, 0xff]
    }

    /// The scenario: a spoofed SYN flood against default limits and
    /// a small source map. New clients get in, the long session keeps
    /// echoing, and no flood source gets state or a ban.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn new_clients_get_in_while_spoofed_syns_flood_the_port() -> Result<()> {
        for v6 in [false, true] {
            let body = "[protect]\nports = [8080]\n[tracking]\nmax_sources = 1024\n";
            let setup = if v6 {
                Setup::start_v6(body).await?
            } else {
                Setup::start(body).await?
            };
            let client = |host: u8| -> std::net::IpAddr {
                if v6 {
                    setup.lab.client_v6(host).into()
                } else {
                    setup.lab.client_v4(host).into()
                }
            };
            // The SYN-ACKs to the spoofed sources come back to the client's
            // namespace (the only peer): there they are dropped as cheaply
            // and silently as they would be lost on the way to addresses
            // that sent nothing, rather than costing route misses and
            // ICMPv6 errors next to the real clients.
            setup
                .lab
                .client
                .ip(&["route", "add", "blackhole", "198.19.0.0/16"])?;
            setup
                .lab
                .client
                .ip(&["-6", "route", "add", "blackhole", "2001:db8:ffff::/48"])?;
            // The server learns its clients' link addresses up front: see
            // `pin_client_neighbours` for why a lab flood needs this.
            setup.lab.pin_client_neighbours()?;
            let mut session =
                ws_connect(&setup.lab.client, client(40), setup.addr, 2 * SECOND).await?;
            echo(&mut session, "before", SECOND).await?;

            // 40,000 SYNs at 20,000 per second: a veth hands every frame to
            // a 1,000-packet backlog before XDP (generic mode), so a faster
            // sender would drop the clients' packets there, before wsguard
            // sees them; the benchmark measures the sender's full speed.
            const FLOOD: usize = 40_000;
            let frames = spoofed_syns(&setup, v6, FLOOD)?;
            let started = std::time::Instant::now();
            let paced = frames.into_iter().enumerate().map(move |(i, frame)| {
                if i % 100 == 0 {
                    let due = started + Duration::from_micros(50 * i as u64);
                    if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                frame
            });
            let (netns, link) = (setup.lab.client.path(), setup.lab.client_if.clone());
            let flood = tokio::task::spawn_blocking(move || send_frames(netns, link, paced));
            let mut newcomers = 0;
            while !flood.is_finished() || newcomers < 10 {
                let counters = || {
                    Reason::ALL
                        .iter()
                        .map(|&r| (r, setup.agent.counter(r).packets))
                        .filter(|(_, n)| *n > 0)
                        .map(|(r, n)| format!("{} {n}", r.name()))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let mut ws = ws_connect(
                    &setup.lab.client,
                    client(10 + newcomers % 30),
                    setup.addr,
                    SECOND,
                )
                .await
                .with_context(|| {
                    format!(
                        "new client {newcomers} during the flood (v6 {v6}; {})",
                        counters()
                    )
                })?;
                echo(&mut ws, "new", SECOND).await?;
                echo(&mut session, "during", SECOND).await?;
                newcomers += 1;
            }
            let sent = flood.await??;
            ensure!(sent as usize == FLOOD, "sent {sent} of {FLOOD} SYNs");
            ensure!(
                setup.agent.counter(Reason::SynCookieSent).packets >= FLOOD as u64,
                "every flood SYN was answered with a cookie"
            );
            let state = setup.agent.state()?;
            let tracked = state.tracked_sources()?;
            ensure!(
                !tracked.iter().any(|(key, _)| in_flood_range(key)),
                "a flood source got state"
            );
            ensure!(
                tracked.len() <= 31,
                "only the real clients are tracked: {}",
                tracked.len()
            );
            ensure!(state.bans()?.is_empty(), "no one was banned");
        }
        Ok(())
    }

    /// With cookies the connection budget is charged when the ACK returns
    /// the cookie: the client's connect() succeeds (the SYN-ACK came), and a
    /// connection over the budget never reaches the server.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_connection_budgets_hold_at_the_server() -> Result<()> {
        let setup = Setup::start(
            "[protect]\nports = [8080]\n[limits.per_source]\nnew_connections = \"1/m\"\nnew_connections_burst = 5\nconcurrent_connections = 3\n[ban]\nafter_drops = 0\n",
        )
        .await?;
        let source: std::net::IpAddr = setup.lab.client_v4(7).into();
        let mut open = Vec::new();
        for i in 0..3 {
            let mut ws = ws_connect(&setup.lab.client, source, setup.addr, SECOND).await?;
            echo(&mut ws, &format!("conn {i}"), SECOND).await?;
            open.push(ws);
        }
        ensure!(
            ws_connect(&setup.lab.client, source, setup.addr, SECOND)
                .await
                .is_err(),
            "a 4th concurrent connection was served"
        );
        ensure!(
            setup.agent.counter(Reason::Concurrency).packets >= 1,
            "counted as concurrency"
        );
        // Two tokens left of the burst of 5 (the refused one took none):
        // after closing all, two more connections, then the bucket is empty.
        drop(open);
        tokio::time::sleep(SECOND / 2).await;
        for i in 0..2 {
            let mut ws = ws_connect(&setup.lab.client, source, setup.addr, SECOND).await?;
            echo(&mut ws, &format!("again {i}"), SECOND).await?;
        }
        ensure!(
            ws_connect(&setup.lab.client, source, setup.addr, SECOND)
                .await
                .is_err(),
            "a connection over the rate was served"
        );
        ensure!(
            setup.agent.counter(Reason::ConnectionRate).packets >= 1,
            "counted as connection_rate"
        );
        ensure!(
            setup.server.accepted() == 5,
            "the server accepted {} connections",
            setup.server.accepted()
        );
        Ok(())
    }
}
