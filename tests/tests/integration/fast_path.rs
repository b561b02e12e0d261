//! The XDP program's shortcuts, each next to the slow path it cuts short,
//! in the running kernel through BPF_PROG_TEST_RUN:
//! - the common frame (no VLAN tag, IPv4 without options, IPv6 without
//!   extension headers) is parsed with a few word loads, every other frame
//!   by the full walk: the same frame with and without a tag, options or
//!   extension headers must get the same verdicts, counters and state;
//! - the allow and deny lists are skipped while empty, and searched by
//!   hash probes instead of their tries while they use few prefix lengths:
//!   the same frames get the same verdicts either way;
//! - the ban lookup is skipped while a source's entry vouches for the ban
//!   epoch.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use wsguard::kernel::{MapSource, Maps, lists};
use wsguard_common::{
    Ban, ListEntry, ListKey, Reason, SourceKey,
    maps::{list_search, names, shortcuts},
};
use wsguard_tests::{
    packets::{ETH_P_8021AD, ETH_P_8021Q, Ext, Packet, TCP_ACK, TCP_FIN, TCP_RST},
    xdp::{XDP_DROP, XDP_PASS, XdpHarness},
};

const PORT: u16 = 8080;

fn v4(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 0, last))
}

fn v6(last: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 7, 0, 0, 0, last))
}

/// Two connections per source, then drops; three drops earn a ban.
const STRICT: &str = "[protect]\nports = [8080]\n\
    [limits.per_source]\nnew_connections = \"2/m\"\nnew_connections_burst = 2\n\
    [ban]\nafter_drops = 3\nwindow = \"1m\"\nduration = \"1h\"\n";

/// How a frame is dressed: the fast path takes only `Plain`.
#[derive(Clone, Copy, Debug)]
enum Dress {
    Plain,
    OneVlanTag,
    TwoVlanTags,
    /// IPv4 options, or IPv6 extension headers.
    NetworkOptions,
}

impl Dress {
    const ALL: [Dress; 4] = [
        Dress::Plain,
        Dress::OneVlanTag,
        Dress::TwoVlanTags,
        Dress::NetworkOptions,
    ];

    fn apply(self, packet: Packet) -> Packet {
        packet.with(|p| match self {
            Dress::Plain => {}
            Dress::OneVlanTag => p.vlan_tpids = vec![ETH_P_8021Q],
            Dress::TwoVlanTags => p.vlan_tpids = vec![ETH_P_8021AD, ETH_P_8021Q],
            Dress::NetworkOptions => match p.src {
                IpAddr::V4(_) => p.ipv4_option_words = 2,
                IpAddr::V6(_) => p.ipv6_ext = vec![Ext::HopByHop, Ext::DestOpts],
            },
        })
    }
}

/// A sequence of segments that walks through most verdicts: passes, a
/// connection-rate drop, a ban, malformed headers, unprotected ports.
fn script(src: IpAddr) -> Vec<Packet> {
    vec![
        Packet::syn(src, PORT),
        Packet::data(src, PORT, 100),
        Packet::tcp(src, PORT, TCP_ACK),
        Packet::tcp(src, PORT, TCP_RST),
        Packet::tcp(src, PORT, TCP_FIN | TCP_ACK),
        Packet::syn(src, 22),
        Packet::syn(src, 22).with(|p| p.tcp_doff = 2),
        Packet::syn(src, PORT).with(|p| p.tcp_doff = 4),
        Packet::syn(src, PORT).with(|p| p.tcp_doff = 15),
        Packet::syn(src, PORT).with(|p| p.tcp_options = vec![2, 4, 5, 0xb4]),
        Packet::syn(src, PORT),
        // Over the connection rate from here: three drops, then the ban.
        Packet::syn(src, PORT),
        Packet::syn(src, PORT),
        Packet::syn(src, PORT),
        Packet::data(src, PORT, 10),
        Packet::syn(src, 22),
    ]
}

/// What a script left behind.
#[derive(Clone, Debug, PartialEq)]
struct Outcome {
    verdicts: Vec<u32>,
    /// Packets per reason (bytes differ with the dress).
    counters: Vec<(Reason, u64)>,
    tracked: Vec<SourceKey>,
    banned: bool,
}

fn outcome(dress: Dress, src: IpAddr) -> Outcome {
    let h = XdpHarness::new(STRICT).expect("loading the programs");
    let verdicts = script(src)
        .into_iter()
        .map(|p| h.run(&dress.apply(p).bytes()))
        .collect();
    let banned = h
        .ban(&SourceKey::from(src).masked(&prefix_of(src)))
        .is_some();
    Outcome {
        verdicts,
        counters: h.nonzero(),
        tracked: h.tracked_sources(),
        banned,
    }
}

/// The default tracking prefixes (/32 for IPv4, /64 for IPv6).
fn prefix_of(src: IpAddr) -> [u64; 2] {
    match src {
        IpAddr::V4(_) => wsguard_common::source::prefix_mask(128),
        IpAddr::V6(_) => wsguard_common::source::prefix_mask(64),
    }
}

#[test]
fn the_fast_path_and_the_walk_agree_frame_by_frame() {
    for src in [v4(2), v6(2)] {
        let plain = outcome(Dress::Plain, src);
        // The script means something: it passes, drops and bans.
        assert!(plain.verdicts.contains(&XDP_PASS) && plain.verdicts.contains(&XDP_DROP));
        assert!(plain.banned, "{src}: the script earns a ban");
        assert_eq!(plain.tracked.len(), 1);
        for reason in [
            Reason::Passed,
            Reason::ConnectionRate,
            Reason::Banned,
            Reason::Malformed,
        ] {
            assert!(
                plain.counters.iter().any(|(r, _)| *r == reason),
                "{src}: no {reason:?} in {:?}",
                plain.counters
            );
        }
        for dress in &Dress::ALL[1..] {
            assert_eq!(
                outcome(*dress, src),
                plain,
                "{src}: {dress:?} against the plain frame"
            );
        }
    }
}

#[test]
fn the_fast_path_passes_only_what_it_understands() {
    // Shapes close to the common frame that it must leave to the walk.
    let h = XdpHarness::new(STRICT).expect("loading the programs");
    let src = v4(3);
    // A later fragment: source rules only, passed as a fragment.
    let fragment = Packet::syn(src, PORT).with(|p| p.ipv4_fragment = Some((8, false)));
    assert_eq!(h.run(&fragment.bytes()), XDP_PASS);
    assert_eq!(h.packets(Reason::PassedFragment), 1);
    // A first fragment cut before the ports: malformed.
    let cut = Packet::syn(src, PORT).with(|p| p.truncate_to = Some(14 + 20 + 3));
    assert_eq!(h.run(&cut.bytes()), XDP_DROP);
    // Cut after the ports but inside the TCP header: malformed too.
    let cut = Packet::syn(src, PORT).with(|p| p.truncate_to = Some(14 + 20 + 19));
    assert_eq!(h.run(&cut.bytes()), XDP_DROP);
    assert_eq!(h.packets(Reason::Malformed), 2);
    // An IPv4 header that says version 6: not TCP we can see.
    let mut odd = Packet::syn(src, PORT).bytes();
    odd[14] = 0x65;
    assert_eq!(h.run(&odd), XDP_PASS);
    // The same cut to an unprotected port: untouched, uncounted.
    let cut = Packet::syn(src, 22).with(|p| p.truncate_to = Some(14 + 20 + 19));
    assert_eq!(h.run(&cut.bytes()), XDP_PASS);
    assert_eq!(h.packets(Reason::Malformed), 2);
    assert_eq!(h.packets(Reason::Passed), 0);
}

#[test]
fn an_entry_added_to_an_empty_list_applies_to_the_very_next_packet() {
    let mut h = XdpHarness::new(STRICT).expect("loading the programs");
    let src = v4(4);
    let net: IpNet = "198.18.0.4/32".parse().unwrap();
    let data = Packet::data(src, PORT, 10).bytes();
    assert_eq!(h.kernel.shortcut(shortcuts::DENY_SEARCH).unwrap(), 0);
    assert_eq!(h.kernel.shortcut(shortcuts::ALLOW_SEARCH).unwrap(), 0);
    assert_eq!(h.run(&data), XDP_PASS);

    h.deny(&net).unwrap();
    assert_eq!(
        h.kernel.shortcut(shortcuts::DENY_SEARCH).unwrap(),
        list_search::encode([128]),
        "one probe, for a /32"
    );
    assert_eq!(h.run(&data), XDP_DROP, "denied at once");
    assert_eq!(h.packets(Reason::DenyList), 1);
    h.kernel
        .with_list(false, |list| lists::remove_runtime(list, &net))
        .unwrap();
    assert_eq!(h.kernel.shortcut(shortcuts::DENY_SEARCH).unwrap(), 0);
    assert_eq!(h.run(&data), XDP_PASS, "the deny entry is gone");

    // Over its connection rate, then allow-listed: passes at once.
    let syn = Packet::syn(src, PORT).bytes();
    while h.run(&syn) == XDP_PASS {}
    h.kernel
        .with_list(true, |list| lists::add_runtime(list, &net, 0))
        .unwrap();
    assert_eq!(
        h.kernel.shortcut(shortcuts::ALLOW_SEARCH).unwrap(),
        list_search::encode([128])
    );
    assert_eq!(h.run(&syn), XDP_PASS, "allow-listed at once");
    assert_eq!(h.packets(Reason::AllowListed), 1);
}

#[test]
fn the_search_follows_every_prefix_length_and_is_repaired_at_start() {
    let mut h = XdpHarness::new(STRICT).expect("loading the programs");
    let search = |h: &XdpHarness| h.kernel.shortcut(shortcuts::DENY_SEARCH).unwrap();
    let net = |text: &str| -> IpNet { text.parse().unwrap() };
    let remove = |h: &mut XdpHarness, text: &str| {
        h.kernel
            .with_list(false, |list| lists::remove_runtime(list, &net(text)))
            .unwrap()
    };
    h.deny(&net("198.18.0.5/32")).unwrap();
    h.deny(&net("198.18.7.0/24")).unwrap();
    h.deny(&net("198.18.8.0/24")).unwrap();
    assert_eq!(search(&h), list_search::encode([128, 120]));
    // A length stays probed until its last entry is gone.
    remove(&mut h, "198.18.7.0/24");
    assert_eq!(search(&h), list_search::encode([128, 120]));
    let in_the_other = Packet::data(IpAddr::V4(Ipv4Addr::new(198, 18, 8, 1)), PORT, 10).bytes();
    assert_eq!(h.run(&in_the_other), XDP_DROP);
    remove(&mut h, "198.18.8.0/24");
    assert_eq!(search(&h), list_search::encode([128]));

    // A search left wrong (by a writer stopped between its writes) is what
    // the kernel reads: it hides the entries it does not name...
    let data = Packet::data(v4(5), PORT, 10).bytes();
    assert_eq!(h.run(&data), XDP_DROP);
    h.kernel
        .set_shortcut(shortcuts::DENY_SEARCH, list_search::encode([120]))
        .unwrap();
    assert_eq!(h.run(&data), XDP_PASS, "the /32 is not probed");
    // ...until a start or reload works it out from the whole list.
    h.kernel.refresh_list_search(false).unwrap();
    assert_eq!(search(&h), list_search::encode([128]));
    assert_eq!(h.run(&data), XDP_DROP);
    // Entries from the config set the search as well.
    let config = "[protect]\nports = [8080]\n[lists]\ndeny = [\"198.18.0.5/32\"]\n";
    let h = XdpHarness::new(config).expect("loading the programs");
    assert_eq!(search(&h), list_search::encode([128]));
    assert_eq!(h.run(&data), XDP_DROP, "config entries set the search too");
}

/// Lists of three prefix lengths, nested: a /24 with an allowed /32 in it
/// and an expired runtime /32 over it (which must not fall back to the
/// /24), and an IPv6 /64.
const NESTED_LISTS: &str = "[protect]\nports = [8080]\n[lists]\n\
    deny = [\"198.18.4.0/24\", \"2001:db8:0:7::/64\"]\nallow = [\"198.18.4.8/32\"]\n";

/// Frames from in and around every entry of `NESTED_LISTS`, with the
/// verdict and the reason each must get.
fn nested_list_frames() -> Vec<(IpAddr, u32, Reason)> {
    let v4 = |c: u8, d: u8| IpAddr::V4(Ipv4Addr::new(198, 18, c, d));
    vec![
        (v4(4, 1), XDP_DROP, Reason::DenyList),
        (v4(4, 255), XDP_DROP, Reason::DenyList),
        (v4(4, 8), XDP_PASS, Reason::AllowListed),
        (v4(4, 9), XDP_PASS, Reason::Passed),
        (v4(5, 1), XDP_PASS, Reason::Passed),
        (v4(3, 255), XDP_PASS, Reason::Passed),
        (v6(1), XDP_DROP, Reason::DenyList),
        (v6(0xffff), XDP_DROP, Reason::DenyList),
        (
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 8, 0, 0, 0, 1)),
            XDP_PASS,
            Reason::Passed,
        ),
    ]
}

fn nested_lists() -> XdpHarness {
    let mut h = XdpHarness::new(NESTED_LISTS).expect("loading the programs");
    let expired: IpNet = "198.18.4.9/32".parse().unwrap();
    h.kernel
        .with_list(false, |list| lists::add_runtime(list, &expired, 1))
        .unwrap();
    h
}

#[test]
fn hash_probes_and_the_trie_give_every_frame_the_same_verdict() {
    let mut h = nested_lists();
    assert_eq!(
        h.kernel.shortcut(shortcuts::DENY_SEARCH).unwrap(),
        list_search::encode([128, 120, 64]),
        "three lengths: probed by hash"
    );
    for search in ["hash", "trie"] {
        for (src, verdict, reason) in nested_list_frames() {
            let before = h.packets(reason);
            for dress in [Dress::Plain, Dress::OneVlanTag] {
                let frame = dress.apply(Packet::data(src, PORT, 10)).bytes();
                assert_eq!(
                    h.run(&frame),
                    verdict,
                    "{search}: {src} {dress:?} {:?}",
                    h.nonzero()
                );
            }
            assert_eq!(
                h.packets(reason),
                before + 2,
                "{search}: {src} as {reason:?}"
            );
        }
        // The same lists searched through their tries.
        h.kernel
            .set_shortcut(shortcuts::DENY_SEARCH, list_search::TRIE)
            .unwrap();
        h.kernel
            .set_shortcut(shortcuts::ALLOW_SEARCH, list_search::TRIE)
            .unwrap();
    }

    // A fourth length: the trie from then on, and hash probes again once
    // it is gone.
    let fourth: IpNet = "198.19.0.0/16".parse().unwrap();
    h.deny(&fourth).unwrap();
    assert_eq!(
        h.kernel.shortcut(shortcuts::DENY_SEARCH).unwrap(),
        list_search::TRIE
    );
    let inside = Packet::data(IpAddr::V4(Ipv4Addr::new(198, 19, 7, 7)), PORT, 10).bytes();
    assert_eq!(h.run(&inside), XDP_DROP);
    h.kernel
        .with_list(false, |list| lists::remove_runtime(list, &fourth))
        .unwrap();
    assert_eq!(
        h.kernel.shortcut(shortcuts::DENY_SEARCH).unwrap(),
        list_search::encode([128, 120, 64])
    );
    assert_eq!(h.run(&inside), XDP_PASS);

    // The runtime /32 inside the configured /24 is an entry of its own:
    // removing it leaves the /24 as the file made it, and removing a /32
    // never added is refused rather than carved out of the /24.
    let expired: IpNet = "198.18.4.9/32".parse().unwrap();
    h.kernel
        .with_list(false, |list| lists::remove_runtime(list, &expired))
        .expect("a runtime entry of its own");
    let never: IpNet = "198.18.4.10/32".parse().unwrap();
    let refused = h
        .kernel
        .with_list(false, |list| lists::remove_runtime(list, &never))
        .unwrap_err();
    assert!(refused.to_string().contains("not in the list"), "{refused}");
    let entries = h.kernel.list_entries(false).unwrap();
    let held: Vec<(String, u32)> = entries
        .iter()
        .map(|(net, entry)| (net.to_string(), entry.origin))
        .collect();
    assert_eq!(
        held,
        [
            ("198.18.4.0/24".to_string(), ListEntry::FROM_CONFIG),
            ("2001:db8:0:7::/64".to_string(), ListEntry::FROM_CONFIG)
        ]
    );
    let frame = Packet::data(IpAddr::V4(Ipv4Addr::new(198, 18, 4, 9)), PORT, 10).bytes();
    assert_eq!(h.run(&frame), XDP_DROP, "now the /24's");
}

#[test]
fn the_hash_is_made_to_mirror_the_trie_at_every_start_and_reload() {
    let mut h = nested_lists();
    // As if a writer had stopped between its two writes: an entry only
    // the hash holds, and a trie entry whose twin the hash lost.
    let stale = ListKey::of(&SourceKey::from(v4(0)), 120);
    let lost = ListKey::of(&SourceKey::from(v6(0)), 64);
    {
        let mut map = h.kernel.map_mut(names::DENY_EXACT).unwrap();
        let mut exact: aya::maps::HashMap<&mut aya::maps::MapData, ListKey, ListEntry> =
            aya::maps::HashMap::try_from(&mut *map).unwrap();
        exact
            .insert(
                stale,
                ListEntry {
                    origin: ListEntry::FROM_RUNTIME,
                    ..Default::default()
                },
                0,
            )
            .unwrap();
        exact.remove(&lost).unwrap();
    }
    let stale_frame = Packet::data(v4(1), PORT, 10).bytes();
    let lost_frame = Packet::data(v6(1), PORT, 10).bytes();
    assert_eq!(h.run(&stale_frame), XDP_DROP, "the probe reads the hash");
    assert_eq!(h.run(&lost_frame), XDP_PASS);

    // What a start or reload does with the config's lists.
    let config: Vec<IpNet> = vec![
        "198.18.4.0/24".parse().unwrap(),
        "2001:db8:0:7::/64".parse().unwrap(),
    ];
    h.kernel
        .with_list(false, |list| lists::sync_config(list, &config))
        .unwrap();
    assert_eq!(h.run(&stale_frame), XDP_PASS, "the stale entry is gone");
    assert_eq!(h.run(&lost_frame), XDP_DROP, "the lost twin is back");
    for (src, verdict, _) in nested_list_frames() {
        assert_eq!(
            h.run(&Packet::data(src, PORT, 10).bytes()),
            verdict,
            "{src}"
        );
    }
}

#[test]
fn a_ban_written_by_the_agent_applies_to_a_source_the_kernel_already_vouched_for() {
    let mut h = XdpHarness::new(STRICT).expect("loading the programs");
    let epoch = h.kernel.shortcut(shortcuts::BAN_EPOCH).unwrap();
    assert_ne!(epoch, 0, "the agent turns the shortcut on");
    let src = v4(6);
    let data = Packet::data(src, PORT, 10).bytes();
    // The source's entry now vouches for the epoch: no ban lookup.
    for _ in 0..3 {
        assert_eq!(h.run(&data), XDP_PASS);
    }
    let key = SourceKey::from(src);
    let state = h.source_state(&key).expect("tracked");
    assert_eq!((state.ban_epoch, state.banned_until_ns), (epoch, 0));
    h.set_ban(
        &key,
        Ban {
            since_ns: 0,
            until_ns: u64::MAX,
        },
    );
    assert_ne!(h.kernel.shortcut(shortcuts::BAN_EPOCH).unwrap(), epoch);
    assert_eq!(h.run(&data), XDP_DROP, "banned at once");
    assert_eq!(h.packets(Reason::Banned), 1);
    // Lifted: the next packet finds no ban and vouches again.
    assert!(h.kernel.remove_ban(&key).unwrap());
    assert_eq!(h.run(&data), XDP_PASS);
}

#[test]
fn a_ban_the_kernel_writes_voids_every_sources_voucher() {
    let h = XdpHarness::new(STRICT).expect("loading the programs");
    let epoch = h.kernel.shortcut(shortcuts::BAN_EPOCH).unwrap();
    let (flooder, bystander) = (v4(7), v4(8));
    assert_eq!(h.run(&Packet::data(bystander, PORT, 10).bytes()), XDP_PASS);
    let syn = Packet::syn(flooder, PORT).bytes();
    while h.packets(Reason::BanStarted) == 0 {
        h.run(&syn);
    }
    assert_eq!(h.kernel.shortcut(shortcuts::BAN_EPOCH).unwrap(), epoch + 1);
    assert_eq!(h.run(&syn), XDP_DROP);
    assert_eq!(h.packets(Reason::Banned), 1, "the flooder's next SYN");
    assert_eq!(h.run(&Packet::data(bystander, PORT, 10).bytes()), XDP_PASS);
}
