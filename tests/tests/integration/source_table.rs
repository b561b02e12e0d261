//! The per-source table the XDP program manages itself (sets of
//! `SOURCE_WAYS` ways, least recently seen evicted), the ban each entry
//! caches, and the program's own clock, in the running kernel through
//! BPF_PROG_TEST_RUN.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use wsguard::kernel::{self as system, MapSource, Maps};
use wsguard_common::{
    Ban, Reason, SourceKey,
    maps::{SOURCE_WAYS, names, shortcuts},
};
use wsguard_tests::{
    packets::Packet,
    xdp::{XDP_DROP, XDP_PASS, XdpHarness},
};

const PORT: u16 = 8080;
/// 16 sets of 4 ways.
const SMALL_TABLE: &str = "[protect]\nports = [8080]\n[tracking]\nmax_sources = 64\n";

fn v4(n: u16) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, (n >> 8) as u8, n as u8))
}

/// Waits for the coarse clock (the tick the table's "last seen" counts
/// in) to move on, so that two packets are seen at different times.
fn next_tick() {
    let start = system::coarse_monotonic_ns();
    let deadline = Instant::now() + Duration::from_secs(1);
    while system::coarse_monotonic_ns() == start {
        assert!(Instant::now() < deadline, "the coarse clock stopped");
        std::hint::spin_loop();
    }
}

/// `n` sources that share one set of the loaded table.
fn sources_in_one_set(h: &XdpHarness, n: usize) -> Vec<IpAddr> {
    let settings = h.kernel.settings().unwrap();
    let set_of = |ip: IpAddr| {
        settings
            .tracking_key(&SourceKey::from(ip))
            .set_index(&settings.source_hash_key, settings.source_sets)
    };
    let target = set_of(v4(1));
    let found: Vec<IpAddr> = (1..4096)
        .map(v4)
        .filter(|ip| set_of(*ip) == target)
        .take(n)
        .collect();
    assert_eq!(found.len(), n, "too few sources share a set");
    found
}

fn data(src: IpAddr) -> Vec<u8> {
    Packet::data(src, PORT, 10).bytes()
}

#[test]
fn a_full_set_forgets_the_source_it_saw_least_recently() {
    let h = XdpHarness::new(SMALL_TABLE).expect("loading the programs");
    let settings = h.kernel.settings().unwrap();
    assert_eq!(settings.source_sets, 16, "64 sources in sets of 4");
    assert_ne!(settings.source_hash_key, [0, 0], "the agent keys the hash");
    let sources = sources_in_one_set(&h, SOURCE_WAYS + 1);
    let (oldest, newcomer) = (sources[1], sources[SOURCE_WAYS]);
    // The set fills, each source seen a tick after the one before.
    for src in &sources[..SOURCE_WAYS] {
        assert_eq!(h.run(&data(*src)), XDP_PASS);
        next_tick();
    }
    // The first one is seen again: the second is now the least recent.
    assert_eq!(h.run(&data(sources[0])), XDP_PASS);
    next_tick();
    let held = |h: &XdpHarness, src: IpAddr| h.tracked_sources().contains(&SourceKey::from(src));
    assert!(!held(&h, newcomer));
    assert_eq!(h.run(&data(newcomer)), XDP_PASS, "a full set still serves");
    assert!(held(&h, newcomer), "the newcomer took a way");
    assert!(
        !held(&h, oldest),
        "the least recently seen source was forgotten"
    );
    for src in [sources[0], sources[2], sources[3]] {
        assert!(held(&h, src), "{src} was seen more recently and stays");
    }
    // Only empty ways count as new entries: the count stays exact.
    assert_eq!(h.kernel.tracked_source_count().unwrap(), SOURCE_WAYS as u64);
    assert_eq!(h.tracked_sources().len(), SOURCE_WAYS);
}

#[test]
fn a_forgotten_source_comes_back_with_a_full_burst() {
    // Two connections per minute per source: the third SYN is dropped.
    let config = "[protect]\nports = [8080]\n[tracking]\nmax_sources = 4\n\
        [limits.per_source]\nnew_connections = \"2/m\"\nnew_connections_burst = 2\n";
    let h = XdpHarness::new(config).expect("loading the programs");
    assert_eq!(h.kernel.settings().unwrap().source_sets, 1);
    let spent = v4(1);
    let syn = Packet::syn(spent, PORT).bytes();
    assert_eq!(h.run(&syn), XDP_PASS);
    assert_eq!(h.run(&syn), XDP_PASS);
    assert_eq!(h.run(&syn), XDP_DROP, "its burst is spent");
    next_tick();
    // Four other sources push it out of the only set.
    for n in 2..6 {
        assert_eq!(h.run(&data(v4(n))), XDP_PASS);
    }
    assert!(!h.tracked_sources().contains(&SourceKey::from(spent)));
    assert_eq!(h.run(&syn), XDP_PASS, "back with a full burst");
    assert_eq!(h.packets(Reason::ConnectionRate), 1);
}

#[test]
fn a_banned_source_caches_its_ban_until_the_ban_map_changes() {
    let mut h = XdpHarness::new(SMALL_TABLE).expect("loading the programs");
    let src = v4(7);
    let key = SourceKey::from(src);
    let until_ns = system::monotonic_ns() + 3_600_000_000_000;
    h.set_ban(
        &key,
        Ban {
            since_ns: 0,
            until_ns,
        },
    );
    assert!(!h.tracked_sources().contains(&key), "no entry before");
    assert_eq!(h.run(&data(src)), XDP_DROP);
    let epoch = h.kernel.shortcut(shortcuts::BAN_EPOCH).unwrap();
    let state = h
        .source_state(&key)
        .expect("a banned source gets an entry for its ban");
    assert_eq!((state.ban_epoch, state.banned_until_ns), (epoch, until_ns));
    // The ban taken out of the map behind the program's back (without
    // moving the epoch on): the cached ban still holds, which shows the
    // map is not read on every packet.
    {
        let mut map = h.kernel.map_mut(names::BANS).unwrap();
        let mut bans: HashMap<&mut MapData, SourceKey, Ban> = HashMap::try_from(&mut *map).unwrap();
        bans.remove(&key).unwrap();
    }
    assert_eq!(h.run(&data(src)), XDP_DROP, "served from the cache");
    // Any ban map change through the agent moves the epoch on; the next
    // packet reads the map again and finds no ban.
    h.set_ban(
        &key,
        Ban {
            since_ns: 0,
            until_ns,
        },
    );
    assert!(h.kernel.remove_ban(&key).unwrap());
    assert_ne!(h.kernel.shortcut(shortcuts::BAN_EPOCH).unwrap(), epoch);
    assert_eq!(h.run(&data(src)), XDP_PASS, "lifted at once");
    assert_eq!(h.packets(Reason::Banned), 2);
}

#[test]
fn the_programs_clock_is_clock_monotonic_to_within_a_tick() {
    let mut h = XdpHarness::new(SMALL_TABLE).expect("loading the programs");
    let clock = h.kernel.settings().unwrap().clock;
    let tick_ns = system::coarse_tick_ns().unwrap();
    assert_eq!(clock.tick_ns, tick_ns, "ticks of the coarse clock's length");
    // A ban 60 ms long, written in CLOCK_MONOTONIC as the agent writes
    // them: the program must lift it within a tick of its end.
    let src = v4(9);
    let until_ns = system::monotonic_ns() + 60_000_000;
    h.set_ban(
        &SourceKey::from(src),
        Ban {
            since_ns: 0,
            until_ns,
        },
    );
    let frame = data(src);
    let deadline = Instant::now() + Duration::from_secs(2);
    let lifted_at = loop {
        let before = system::monotonic_ns();
        if h.run(&frame) == XDP_PASS {
            break before;
        }
        assert!(Instant::now() < deadline, "the ban never ended");
    };
    let end = system::monotonic_ns();
    assert!(
        end + tick_ns >= until_ns,
        "lifted {} µs before its end (a tick is {} µs)",
        (until_ns - end) / 1000,
        tick_ns / 1000
    );
    assert!(
        lifted_at <= until_ns + 2 * tick_ns + 20_000_000,
        "lifted {} µs after its end (a tick is {} µs)",
        (lifted_at - until_ns) / 1000,
        tick_ns / 1000
    );
}

#[test]
fn each_source_counts_its_new_connections_and_bytes_per_second() {
    // What the fleet's limits sum over the hosts.
    let h = XdpHarness::new(SMALL_TABLE).expect("loading the programs");
    let src = v4(11);
    let syn = Packet::syn(src, PORT).bytes();
    let frame = data(src);
    for _ in 0..3 {
        assert_eq!(h.run(&syn), XDP_PASS);
    }
    assert_eq!(h.run(&frame), XDP_PASS);
    let state = h.source_state(&SourceKey::from(src)).expect("tracked");
    let second = (system::monotonic_ns() >> wsguard_common::maps::COUNT_SECOND_SHIFT) as u32;
    assert!(
        state.second.abs_diff(second) <= 1,
        "the second the kernel counts in"
    );
    assert_eq!(state.second_connections, 3);
    assert_eq!(state.second_bytes, (3 * syn.len() + frame.len()) as u64);
    // Read a second later, they are the last complete second's.
    let later = (u64::from(state.second) + 1) << wsguard_common::maps::COUNT_SECOND_SHIFT;
    assert_eq!(
        state.last_second(later),
        (3, (3 * syn.len() + frame.len()) as u64)
    );
    assert_eq!(state.last_second(later + (2 << 30)), (0, 0), "too old");
}
