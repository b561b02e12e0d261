//! The XDP program's parsing and verdicts, in the running kernel through
//! BPF_PROG_TEST_RUN with crafted frames. Every verdict path and every
//! malformed shape in the README's "Packet rules" has a case here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use wsguard_common::{Ban, Reason, SourceKey};
use wsguard_tests::{
    packets::{ETH_P_8021AD, ETH_P_8021Q, Ext, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, arp},
    xdp::{XDP_DROP, XDP_PASS, XdpHarness},
};

const PORT: u16 = 8080;

fn v4(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 0, last))
}

fn v6(segments: [u16; 8]) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(segments))
}

/// A config whose limits no single test packet reaches, with the given
/// sections replacing the defaults.
fn config(per_source: &str, rest: &str) -> String {
    let per_source = if per_source.is_empty() {
        "new_connections = \"1000/s\"\nnew_connections_burst = 1000\nbytes = \"100MiB/s\"\nbytes_burst = \"100MiB\"\nconcurrent_connections = 0"
    } else {
        per_source
    };
    let ban = if rest.contains("[ban]") {
        ""
    } else {
        "[ban]\nafter_drops = 0\n"
    };
    format!("[protect]\nports = [{PORT}]\n\n[limits.per_source]\n{per_source}\n\n{ban}{rest}\n")
}

fn harness(per_source: &str, rest: &str) -> XdpHarness {
    XdpHarness::new(&config(per_source, rest)).expect("loading the programs")
}

#[test]
fn traffic_that_is_not_tcp_to_a_protected_port_passes_uncounted() {
    let h = harness("", "");
    let src = v4(2);
    assert_eq!(
        h.run(&Packet::syn(src, 22).bytes()),
        XDP_PASS,
        "unprotected port"
    );
    assert_eq!(
        h.run(&Packet::udp(src, PORT).bytes()),
        XDP_PASS,
        "UDP to the protected port"
    );
    assert_eq!(h.run(&arp()), XDP_PASS, "ARP");
    assert_eq!(
        h.run(&Packet::syn(v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 2]), 443).bytes()),
        XDP_PASS
    );
    assert_eq!(h.nonzero(), vec![], "the cheap path counts nothing");
    assert!(h.tracked_sources().is_empty(), "and tracks nothing");
}

#[test]
fn protected_tcp_is_counted_and_tracked() {
    let h = harness("", "");
    assert_eq!(h.run(&Packet::syn(v4(2), PORT).bytes()), XDP_PASS);
    assert_eq!(h.run(&Packet::data(v4(2), PORT, 100).bytes()), XDP_PASS);
    let c = h.counters()[&Reason::Passed];
    assert_eq!(c.packets, 2);
    assert_eq!(c.bytes, (14 + 20 + 20) * 2 + 100);
    assert_eq!(
        h.tracked_sources(),
        vec![SourceKey::from_v4([198, 18, 0, 2])]
    );
}

#[test]
fn connection_rate_allows_the_burst_then_drops() {
    let h = harness(
        "new_connections = \"3/m\"\nnew_connections_burst = 3\nbytes = \"100MiB/s\"\nbytes_burst = \"100MiB\"\nconcurrent_connections = 0",
        "",
    );
    let syn = Packet::syn(v4(2), PORT).bytes();
    let verdicts: Vec<u32> = (0..5).map(|_| h.run(&syn)).collect();
    assert_eq!(
        verdicts,
        vec![XDP_PASS, XDP_PASS, XDP_PASS, XDP_DROP, XDP_DROP]
    );
    assert_eq!(
        h.nonzero(),
        vec![(Reason::Passed, 3), (Reason::ConnectionRate, 2)]
    );
    // Segments of established connections do not spend connection tokens.
    assert_eq!(h.run(&Packet::data(v4(2), PORT, 10).bytes()), XDP_PASS);
    assert_eq!(
        h.run(&Packet::tcp(v4(2), PORT, TCP_SYN | TCP_ACK).bytes()),
        XDP_PASS,
        "SYN-ACK is not a new connection"
    );
    // Another source has its own bucket.
    assert_eq!(h.run(&Packet::syn(v4(3), PORT).bytes()), XDP_PASS);
}

#[test]
fn byte_rate_drops_what_exceeds_the_burst() {
    let h = harness(
        "new_connections = \"1000/s\"\nnew_connections_burst = 1000\nbytes = \"3000B/m\"\nbytes_burst = \"3000B\"\nconcurrent_connections = 0",
        "",
    );
    let big = Packet::data(v4(2), PORT, 946).bytes(); // 1000-byte frame
    assert_eq!(big.len(), 1000);
    let verdicts: Vec<u32> = (0..4).map(|_| h.run(&big)).collect();
    assert_eq!(verdicts, vec![XDP_PASS, XDP_PASS, XDP_PASS, XDP_DROP]);
    assert_eq!(h.counters()[&Reason::ByteRate].bytes, 1000);
}

#[test]
fn allow_list_wins_over_deny_list_and_limits() {
    let h = harness(
        "new_connections = \"1/m\"\nnew_connections_burst = 1\nbytes = \"100MiB/s\"\nbytes_burst = \"100MiB\"\nconcurrent_connections = 0",
        "[lists]\nallow = [\"198.18.0.0/28\", \"2001:db8:a::/48\"]\ndeny = [\"198.18.0.0/24\", \"2001:db8::/32\"]\n",
    );
    for _ in 0..10 {
        assert_eq!(h.run(&Packet::syn(v4(5), PORT).bytes()), XDP_PASS);
        assert_eq!(
            h.run(&Packet::syn(v6([0x2001, 0xdb8, 0xa, 1, 0, 0, 0, 9]), PORT).bytes()),
            XDP_PASS
        );
    }
    assert_eq!(
        h.run(&Packet::syn(v4(200), PORT).bytes()),
        XDP_DROP,
        "denied, not allowed"
    );
    assert_eq!(
        h.run(&Packet::syn(v6([0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 9]), PORT).bytes()),
        XDP_DROP
    );
    assert_eq!(
        h.nonzero(),
        vec![(Reason::AllowListed, 20), (Reason::DenyList, 2)]
    );
    assert!(
        h.tracked_sources().is_empty(),
        "allow-listed and denied sources need no entry"
    );
}

#[test]
fn repeated_limit_drops_earn_a_ban_that_expires_in_the_kernel() {
    let mut h = harness(
        "new_connections = \"1/m\"\nnew_connections_burst = 1\nbytes = \"100MiB/s\"\nbytes_burst = \"100MiB\"\nconcurrent_connections = 0",
        "[ban]\nafter_drops = 3\nwindow = \"1m\"\nduration = \"1h\"\n",
    );
    let syn = Packet::syn(v4(7), PORT).bytes();
    let key = SourceKey::from_v4([198, 18, 0, 7]);
    assert_eq!(h.run(&syn), XDP_PASS);
    for _ in 0..3 {
        assert_eq!(h.run(&syn), XDP_DROP);
    }
    assert_eq!(h.packets(Reason::BanStarted), 1);
    let ban = h.ban(&key).expect("ban recorded");
    assert!(ban.until_ns - ban.since_ns == 3_600_000_000_000);
    // Banned: even traffic that no limit would touch is dropped.
    assert_eq!(h.run(&Packet::data(v4(7), PORT, 1).bytes()), XDP_DROP);
    assert_eq!(h.packets(Reason::Banned), 1);
    // Expire the ban: the next packet lifts it in the kernel.
    h.set_ban(
        &key,
        Ban {
            since_ns: 1,
            until_ns: 2,
        },
    );
    assert_eq!(h.run(&Packet::data(v4(7), PORT, 1).bytes()), XDP_PASS);
    assert!(h.ban(&key).is_none(), "expired ban removed by the kernel");
    // Global-limit drops never count towards a source's ban.
}

/// With the ban map full, a source that earns a ban is counted under
/// `ban_map_full` and only its limits keep dropping; existing bans stay.
#[test]
fn a_full_ban_map_counts_the_ban_it_cannot_record() {
    let h = harness(
        "new_connections = \"1/m\"\nnew_connections_burst = 1\nbytes = \"100MiB/s\"\nbytes_burst = \"100MiB\"\nconcurrent_connections = 0",
        "[ban]\nafter_drops = 1\nwindow = \"1m\"\nduration = \"1h\"\n[tracking]\nmax_bans = 1\n",
    );
    for host in [20, 21] {
        let syn = Packet::syn(v4(host), PORT).bytes();
        assert_eq!(h.run(&syn), XDP_PASS);
        assert_eq!(h.run(&syn), XDP_DROP, "over the limit: earns a ban");
    }
    assert_eq!(h.packets(Reason::BanStarted), 1);
    assert_eq!(h.packets(Reason::BanMapFull), 1);
    assert!(h.ban(&SourceKey::from_v4([198, 18, 0, 20])).is_some());
    assert!(h.ban(&SourceKey::from_v4([198, 18, 0, 21])).is_none());
    // Unbanned, the second source is still held by its limit.
    assert_eq!(h.run(&Packet::syn(v4(21), PORT).bytes()), XDP_DROP);
    assert_eq!(h.packets(Reason::ConnectionRate), 3);
    assert_eq!(h.packets(Reason::Banned), 0);
}

#[test]
fn the_concurrency_limit_drops_new_connections_only() {
    let mut h = harness(
        "new_connections = \"1000/s\"\nnew_connections_burst = 1000\nbytes = \"100MiB/s\"\nbytes_burst = \"100MiB\"\nconcurrent_connections = 2",
        "",
    );
    let key = SourceKey::from_v4([198, 18, 0, 9]);
    h.set_open_connections(&key, 1);
    assert_eq!(h.run(&Packet::syn(v4(9), PORT).bytes()), XDP_PASS);
    h.set_open_connections(&key, 2);
    assert_eq!(h.run(&Packet::syn(v4(9), PORT).bytes()), XDP_DROP);
    assert_eq!(
        h.run(&Packet::data(v4(9), PORT, 10).bytes()),
        XDP_PASS,
        "open connections keep flowing"
    );
    assert_eq!(
        h.run(&Packet::tcp(v4(9), PORT, TCP_FIN | TCP_ACK).bytes()),
        XDP_PASS
    );
    assert_eq!(h.packets(Reason::Concurrency), 1);
}

#[test]
fn global_limits_cap_all_sources_together() {
    let h = harness(
        "",
        "[limits.global]\nnew_connections = \"4/m\"\nnew_connections_burst = 4\nbytes = \"unlimited\"\n",
    );
    let verdicts: Vec<u32> = (10..16)
        .map(|host| h.run(&Packet::syn(v4(host), PORT).bytes()))
        .collect();
    assert_eq!(
        verdicts,
        vec![XDP_PASS, XDP_PASS, XDP_PASS, XDP_PASS, XDP_DROP, XDP_DROP]
    );
    assert_eq!(h.packets(Reason::GlobalConnectionRate), 2);

    let h = harness(
        "",
        "[limits.global]\nbytes = \"2000B/m\"\nbytes_burst = \"2000B\"\n",
    );
    let frame = |host| Packet::data(v4(host), PORT, 946).bytes();
    assert_eq!(
        [h.run(&frame(20)), h.run(&frame(21)), h.run(&frame(22))],
        [XDP_PASS, XDP_PASS, XDP_DROP]
    );
    assert_eq!(h.packets(Reason::GlobalByteRate), 1);
}

#[test]
fn byte_rates_of_100_gbit_hosts_are_enforced_to_the_byte() {
    use wsguard::kernel::Maps;
    use wsguard_common::{TokenBucket, maps::GlobalState};
    for (rate, per_second) in [("10GiB/s", 10u64 << 30), ("12500MB/s", 12_500_000_000)] {
        // Only the global byte bucket limits: a single source sends it all.
        let mut h = harness(
            "bytes = \"unlimited\"",
            &format!("[limits.global]\nnew_connections = \"unlimited\"\nbytes = \"{rate}\"\n"),
        );
        let params = h.kernel.settings().unwrap().global_bytes;
        assert_eq!(params.burst(), per_second, "{rate}: one second of burst");
        let frame = Packet::data(v4(30), PORT, 1446).bytes();
        let need = frame.len() as u64 * params.unit;
        // A bucket frozen in time (its last refill lies ahead, so nothing
        // refills) one unit short of 1000 frames.
        let frozen = |tokens| GlobalState {
            connections: TokenBucket::default(),
            bytes: TokenBucket {
                tokens,
                last_ns: u64::MAX / 2,
            },
        };
        h.kernel
            .set_global_buckets(frozen(1000 * need - 1))
            .unwrap();
        let passed = (0..1100).filter(|_| h.run(&frame) == XDP_PASS).count();
        assert_eq!(passed, 999, "{rate}: exactly the frames the tokens pay for");
        assert_eq!(h.packets(Reason::GlobalByteRate), 101);
        // A full bucket, as after a reload: one second of the rate, which
        // is more than 4 GiB and so more than 32-bit arithmetic holds. The
        // CPU's share still holds the unit short of a frame from above:
        // (capacity + need - 1) / need frames in all.
        let full = params.capacity.div_ceil(need);
        assert!(full * frame.len() as u64 > 4 << 30);
        h.kernel
            .set_global_buckets(frozen(params.capacity))
            .unwrap();
        let (verdict, _) = h.run_repeat(&frame, full as u32).unwrap();
        assert_eq!(verdict, XDP_PASS, "{rate}: the last frame of the burst");
        assert_eq!(h.run(&frame), XDP_DROP, "{rate}: one frame past the burst");
        assert_eq!(h.packets(Reason::GlobalByteRate), 102);
    }
}

#[test]
fn ipv4_options_are_skipped_by_header_length() {
    let h = harness("", "");
    for words in 0..=10 {
        let p = Packet::syn(v4(2), PORT).with(|p| p.ipv4_option_words = words);
        assert_eq!(h.run(&p.bytes()), XDP_PASS);
        let unprotected = Packet::syn(v4(2), 22).with(|p| p.ipv4_option_words = words);
        assert_eq!(h.run(&unprotected.bytes()), XDP_PASS);
    }
    assert_eq!(
        h.nonzero(),
        vec![(Reason::Passed, 11)],
        "each protected SYN found its port behind the options"
    );
}

#[test]
fn vlan_tags_are_walked_up_to_two() {
    let h = harness("", "");
    let tagged = |tpids: Vec<u16>| {
        Packet::syn(v4(2), PORT)
            .with(|p| p.vlan_tpids = tpids)
            .bytes()
    };
    assert_eq!(h.run(&tagged(vec![ETH_P_8021Q])), XDP_PASS);
    assert_eq!(h.run(&tagged(vec![ETH_P_8021AD, ETH_P_8021Q])), XDP_PASS);
    assert_eq!(h.packets(Reason::Passed), 2);
    assert_eq!(
        h.run(&tagged(vec![ETH_P_8021AD, ETH_P_8021Q, ETH_P_8021Q])),
        XDP_PASS,
        "three tags: not parsed"
    );
    assert_eq!(h.packets(Reason::Passed), 2);
    // A VLAN-tagged flood is limited like an untagged one.
    let h = harness("", "[lists]\ndeny = [\"198.18.0.0/24\"]\n");
    assert_eq!(h.run(&tagged(vec![ETH_P_8021AD, ETH_P_8021Q])), XDP_DROP);
}

#[test]
fn truncated_and_inconsistent_headers_follow_the_packet_rules() {
    let h = harness("", "");
    let syn = Packet::syn(v4(2), PORT);
    // Cut inside the Ethernet, IPv4 header: passed uncounted (the kernel drops them).
    for cut in [14, 20, 33] {
        assert_eq!(
            h.run(&syn.clone().with(|p| p.truncate_to = Some(cut)).bytes()),
            XDP_PASS,
            "cut at {cut}"
        );
    }
    assert_eq!(
        h.run(&syn.clone().with(|p| p.ipv4_ihl_override = Some(4)).bytes()),
        XDP_PASS,
        "IHL < 5"
    );
    assert_eq!(h.nonzero(), vec![]);
    // TCP header cut short: dropped as malformed.
    for cut in [34, 37, 53] {
        assert_eq!(
            h.run(&syn.clone().with(|p| p.truncate_to = Some(cut)).bytes()),
            XDP_DROP,
            "cut at {cut}"
        );
    }
    // Data offset below 5, or past the end, on a protected port.
    assert_eq!(
        h.run(&syn.clone().with(|p| p.tcp_doff = 4).bytes()),
        XDP_DROP
    );
    let past_end = syn.clone().with(|p| {
        p.tcp_doff = 15;
        p.truncate_to = Some(14 + 20 + 40);
    });
    assert_eq!(h.run(&past_end.bytes()), XDP_DROP);
    assert_eq!(h.nonzero(), vec![(Reason::Malformed, 5)]);
    // A valid data offset with options passes.
    assert_eq!(
        h.run(&syn.clone().with(|p| p.tcp_doff = 15).bytes()),
        XDP_PASS
    );
    // IPv6 header cut short: passed uncounted.
    let six = Packet::syn(v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 2]), PORT);
    assert_eq!(
        h.run(&six.clone().with(|p| p.truncate_to = Some(40)).bytes()),
        XDP_PASS
    );
    assert_eq!(
        h.run(&six.clone().with(|p| p.truncate_to = Some(60)).bytes()),
        XDP_DROP,
        "TCP cut short"
    );
    // An EtherType that disagrees with the IP version.
    assert_eq!(
        h.run(
            &six.clone()
                .with(|p| p.ether_type_override = Some(0x0800))
                .bytes()
        ),
        XDP_PASS
    );
    // A malformed segment from an allow-listed source is never dropped.
    let h = harness("", "[lists]\nallow = [\"198.18.0.2\"]\n");
    assert_eq!(
        h.run(&syn.clone().with(|p| p.truncate_to = Some(40)).bytes()),
        XDP_PASS
    );
    assert_eq!(h.nonzero(), vec![(Reason::AllowListed, 1)]);
}

#[test]
fn ipv4_fragments_follow_the_packet_rules() {
    let h = harness("", "[lists]\ndeny = [\"198.18.0.66\"]\n");
    // A first fragment that holds the whole TCP header is judged normally.
    let first = Packet::syn(v4(2), PORT).with(|p| p.ipv4_fragment = Some((0, true)));
    assert_eq!(h.run(&first.bytes()), XDP_PASS);
    assert_eq!(h.packets(Reason::Passed), 1);
    // A first fragment too short for the TCP header (RFC 1858) is malformed.
    let tiny = first.clone().with(|p| p.truncate_to = Some(14 + 20 + 8));
    assert_eq!(h.run(&tiny.bytes()), XDP_DROP);
    // Later fragments carry no ports: only source rules apply.
    let later = |host| {
        Packet::data(v4(host), PORT, 100)
            .with(|p| p.ipv4_fragment = Some((185, false)))
            .bytes()
    };
    assert_eq!(h.run(&later(2)), XDP_PASS);
    assert_eq!(h.run(&later(66)), XDP_DROP);
    assert_eq!(
        h.nonzero(),
        vec![
            (Reason::Passed, 1),
            (Reason::PassedFragment, 1),
            (Reason::DenyList, 1),
            (Reason::Malformed, 1)
        ]
    );
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let h = harness("", "[lists]\ndeny = [\"2001:db8:dead::/48\"]\n");
    let src = v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 2]);
    let chain = vec![
        Ext::HopByHop,
        Ext::DestOpts,
        Ext::Routing,
        Ext::Fragment {
            offset: 0,
            more: true,
        },
        Ext::Ah,
        Ext::DestOpts,
    ];
    let p = Packet::syn(src, PORT).with(|p| p.ipv6_ext = chain.clone());
    assert_eq!(h.run(&p.bytes()), XDP_PASS);
    assert_eq!(
        h.packets(Reason::Passed),
        1,
        "TCP found behind six extension headers"
    );
    // Eight extension headers is the walk's limit; nine is malformed.
    let eight = Packet::syn(src, PORT).with(|p| p.ipv6_ext = vec![Ext::DestOpts; 8]);
    assert_eq!(h.run(&eight.bytes()), XDP_PASS);
    assert_eq!(h.packets(Reason::Passed), 2);
    let nine = Packet::syn(src, PORT).with(|p| p.ipv6_ext = vec![Ext::DestOpts; 9]);
    assert_eq!(h.run(&nine.bytes()), XDP_DROP);
    assert_eq!(h.packets(Reason::Malformed), 1);
    // Non-first fragments: source rules only.
    let frag = |src| {
        Packet::data(src, PORT, 64)
            .with(|p| {
                p.ipv6_ext = vec![Ext::Fragment {
                    offset: 100,
                    more: false,
                }]
            })
            .bytes()
    };
    assert_eq!(h.run(&frag(src)), XDP_PASS);
    assert_eq!(
        h.run(&frag(v6([0x2001, 0xdb8, 0xdead, 0, 0, 0, 0, 1]))),
        XDP_DROP
    );
    assert_eq!(h.packets(Reason::PassedFragment), 1);
    // ESP and No Next Header hide or end the chain: passed uncounted.
    let before = h.nonzero();
    assert_eq!(
        h.run(
            &Packet::syn(src, PORT)
                .with(|p| p.ipv6_ext = vec![Ext::Esp])
                .bytes()
        ),
        XDP_PASS
    );
    assert_eq!(
        h.run(
            &Packet::syn(src, PORT)
                .with(|p| p.ipv6_ext = vec![Ext::HopByHop, Ext::NoNext])
                .bytes()
        ),
        XDP_PASS
    );
    // An extension header cut short: passed uncounted (the kernel drops it).
    let cut = |at| {
        Packet::syn(src, PORT).with(|p| {
            p.ipv6_ext = vec![Ext::HopByHop];
            p.truncate_to = Some(at);
        })
    };
    assert_eq!(h.run(&cut(14 + 40 + 1).bytes()), XDP_PASS);
    assert_eq!(h.nonzero(), before);
    // The chain names TCP but the segment is cut short: malformed.
    assert_eq!(h.run(&cut(14 + 40 + 16 + 10).bytes()), XDP_DROP);
    assert_eq!(h.packets(Reason::Malformed), 2);
}

#[test]
fn sources_are_aggregated_to_the_configured_prefixes() {
    let h = XdpHarness::new(&format!(
        "[protect]\nports = [{PORT}]\nipv4_prefix = 24\nipv6_prefix = 64\n\n[limits.per_source]\nnew_connections = \"2/m\"\nnew_connections_burst = 2\nconcurrent_connections = 0\n[ban]\nafter_drops = 0\n"
    ))
    .unwrap();
    // Two hosts in one /24 share a bucket; a third in another /24 does not.
    assert_eq!(h.run(&Packet::syn(v4(2), PORT).bytes()), XDP_PASS);
    assert_eq!(h.run(&Packet::syn(v4(3), PORT).bytes()), XDP_PASS);
    assert_eq!(h.run(&Packet::syn(v4(4), PORT).bytes()), XDP_DROP);
    assert_eq!(
        h.run(&Packet::syn(IpAddr::V4(Ipv4Addr::new(198, 18, 1, 4)), PORT).bytes()),
        XDP_PASS
    );
    // Two addresses in one /64 share a bucket.
    let a = v6([0x2001, 0xdb8, 1, 2, 0, 0, 0, 1]);
    let b = v6([0x2001, 0xdb8, 1, 2, 0xffff, 0, 0, 7]);
    let c = v6([0x2001, 0xdb8, 1, 3, 0, 0, 0, 1]);
    assert_eq!(
        [
            h.run(&Packet::syn(a, PORT).bytes()),
            h.run(&Packet::syn(b, PORT).bytes())
        ],
        [XDP_PASS, XDP_PASS]
    );
    assert_eq!(h.run(&Packet::syn(a, PORT).bytes()), XDP_DROP);
    assert_eq!(h.run(&Packet::syn(c, PORT).bytes()), XDP_PASS);
    let mut keys = h.tracked_sources();
    keys.sort();
    assert_eq!(keys.len(), 4);
    assert!(keys.contains(&SourceKey::from_v4([198, 18, 0, 0])));
    assert!(keys.contains(&SourceKey::from_v6(
        Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, 0).octets()
    )));
}

#[test]
fn the_source_map_fill_level_is_counted_not_walked() {
    use wsguard::kernel::Maps;
    let h = harness("", "[tracking]\nmax_sources = 512\n");
    let data = |i: u8| Packet::data(v4(i), PORT, 10).bytes();
    for round in 0..3 {
        for i in 100..140 {
            assert_eq!(h.run(&data(i)), XDP_PASS, "round {round}");
        }
        // A source seen again is no new entry.
        assert_eq!(h.kernel.tracked_source_count().unwrap(), 40);
        assert_eq!(h.tracked_sources().len(), 40, "the walk agrees");
    }
    // Past the capacity: the count stops at it, as the map does.
    for i in 0..2000u16 {
        let src = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 9, i, 0, 0, 0, 1));
        h.run(&Packet::data(src, PORT, 10).bytes());
    }
    assert_eq!(h.kernel.tracked_source_count().unwrap(), 512);
    let walked = h.tracked_sources().len();
    assert!(
        (460..=512).contains(&walked),
        "an LRU map holds about its capacity: {walked}"
    );
}

#[test]
fn a_full_source_map_forgets_old_sources_but_keeps_bans() {
    let mut h = XdpHarness::new(&format!(
        "[protect]\nports = [{PORT}]\n\n[limits.per_source]\nnew_connections = \"1/m\"\nnew_connections_burst = 1\nconcurrent_connections = 0\n\n[tracking]\nmax_sources = 16\n"
    ))
    .unwrap();
    let banned = SourceKey::from_v4([198, 18, 0, 250]);
    h.set_ban(
        &banned,
        Ban {
            since_ns: 1,
            until_ns: u64::MAX,
        },
    );
    // Far more distinct sources than the map holds.
    for i in 0..2000u32 {
        let src = IpAddr::V4(Ipv4Addr::new(
            198,
            18,
            10 + (i / 250) as u8,
            (i % 250) as u8 + 1,
        ));
        assert_eq!(
            h.run(&Packet::syn(src, PORT).bytes()),
            XDP_PASS,
            "a new source starts with its full burst"
        );
    }
    assert!(
        h.tracked_sources().len() <= 16,
        "LRU keeps the map at its size"
    );
    assert_eq!(h.packets(Reason::Passed), 2000);
    // The ban lives outside the LRU map: the flood did not evict it.
    assert_eq!(h.run(&Packet::syn(v4(250), PORT).bytes()), XDP_DROP);
    assert_eq!(h.packets(Reason::Banned), 1);
}

#[test]
fn rst_and_ack_segments_are_byte_counted_but_open_nothing() {
    let h = harness(
        "new_connections = \"1/m\"\nnew_connections_burst = 1\nbytes = \"100MiB/s\"\nbytes_burst = \"100MiB\"\nconcurrent_connections = 0",
        "",
    );
    for flags in [TCP_ACK, TCP_RST, TCP_RST | TCP_ACK, TCP_FIN | TCP_ACK] {
        assert_eq!(h.run(&Packet::tcp(v4(2), PORT, flags).bytes()), XDP_PASS);
    }
    assert_eq!(
        h.run(&Packet::syn(v4(2), PORT).bytes()),
        XDP_PASS,
        "the one connection token is still there"
    );
    assert_eq!(h.packets(Reason::Passed), 5);
}

#[test]
fn dry_run_counts_would_drop_and_passes_per_family() {
    let limits = "new_connections = \"1/m\"\nnew_connections_burst = 1\nbytes = \"100MiB/s\"\nbytes_burst = \"100MiB\"\nconcurrent_connections = 0";
    // Limits in dry run, deny list enforced.
    let h = XdpHarness::new(&format!(
        "[protect]\nports = [{PORT}]\n[limits]\ndry_run = true\n[limits.per_source]\n{limits}\n[ban]\nafter_drops = 2\n[lists]\ndeny = [\"198.18.0.66\"]\n"
    ))
    .unwrap();
    let syn = Packet::syn(v4(2), PORT).bytes();
    assert_eq!([h.run(&syn), h.run(&syn), h.run(&syn)], [XDP_PASS; 3]);
    assert_eq!(h.would_drop(Reason::ConnectionRate), 2);
    assert_eq!(h.packets(Reason::ConnectionRate), 0, "nothing dropped");
    assert_eq!(
        h.would_drop(Reason::BanStarted),
        1,
        "the ban it would have earned is counted"
    );
    assert!(
        h.ban(&SourceKey::from_v4([198, 18, 0, 2])).is_none(),
        "but not imposed"
    );
    assert_eq!(
        h.run(&Packet::syn(v4(66), PORT).bytes()),
        XDP_DROP,
        "the deny list still enforces"
    );

    // Lists in dry run, limits enforced.
    let h = XdpHarness::new(&format!(
        "[protect]\nports = [{PORT}]\n[limits.per_source]\n{limits}\n[ban]\nafter_drops = 0\n[lists]\ndry_run = true\ndeny = [\"198.18.0.66\"]\n"
    ))
    .unwrap();
    assert_eq!(h.run(&Packet::syn(v4(66), PORT).bytes()), XDP_PASS);
    assert_eq!(h.would_drop(Reason::DenyList), 1);
    assert_eq!(
        [h.run(&syn), h.run(&syn)],
        [XDP_PASS, XDP_DROP],
        "limits still enforce"
    );

    // agent.dry_run: everything, malformed segments included.
    let h = XdpHarness::with_agent_keys(
        "dry_run = true",
        &format!("[protect]\nports = [{PORT}]\n[limits.per_source]\n{limits}\n[lists]\ndeny = [\"198.18.0.66\"]\n"),
    )
    .unwrap();
    let malformed = Packet::syn(v4(3), PORT).with(|p| p.tcp_doff = 4).bytes();
    for frame in [&syn, &syn, &Packet::syn(v4(66), PORT).bytes(), &malformed] {
        assert_eq!(h.run(frame), XDP_PASS);
    }
    assert_eq!(h.nonzero(), vec![(Reason::Passed, 1)]);
    assert_eq!(
        [
            h.would_drop(Reason::ConnectionRate),
            h.would_drop(Reason::DenyList),
            h.would_drop(Reason::Malformed)
        ],
        [1, 1, 1]
    );
}

#[test]
fn a_tcp_header_cut_after_its_ports_is_judged_by_its_port() {
    let h = harness("", "");
    let cut = |port| {
        Packet::syn(v4(2), port)
            .with(|p| p.truncate_to = Some(14 + 20 + 6))
            .bytes()
    };
    assert_eq!(
        h.run(&cut(UNPROTECTED_PORT)),
        XDP_PASS,
        "an unprotected port is never touched"
    );
    assert_eq!(h.nonzero(), vec![]);
    assert_eq!(h.run(&cut(PORT)), XDP_DROP);
    assert_eq!(h.nonzero(), vec![(Reason::Malformed, 1)]);
    // Cut before the destination port: it cannot be told, so malformed.
    assert_eq!(
        h.run(
            &Packet::syn(v4(2), UNPROTECTED_PORT)
                .with(|p| p.truncate_to = Some(14 + 20 + 3))
                .bytes()
        ),
        XDP_DROP
    );
}

const UNPROTECTED_PORT: u16 = 22;

/// The benchmarks' baseline: `wsguard_floor` passes every frame, counts
/// nothing and leaves no state, so the cost measured next to it is wsguard's
/// alone.
#[test]
fn the_floor_program_passes_everything_and_touches_no_map() {
    let mut h = harness("new_connections = \"1/m\"\nnew_connections_burst = 1\n", "");
    h.load_floor().unwrap();
    for frame in [
        Packet::syn(v4(60), PORT).bytes(),
        Packet::data(v4(60), PORT, 100).bytes(),
        Packet::udp(v4(60), PORT).bytes(),
        arp(),
    ] {
        for _ in 0..3 {
            assert_eq!(h.run_floor(&frame, 1).unwrap().0, XDP_PASS);
        }
    }
    assert!(h.nonzero().is_empty());
    assert!(h.tracked_sources().is_empty());
}
