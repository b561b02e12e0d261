//! The XDP program's charging of connections bound to a user, through
//! BPF_PROG_TEST_RUN with crafted frames: the user's bucket instead of the
//! source's, one budget over many addresses, class budgets, bans, and the
//! paths that must not be charged to a user.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use wsguard::{
    kernel::Maps,
    users::{new_state, user_key},
};
use wsguard_common::{Reason, RecordHeader, StreamPeers, UserState};
use wsguard_tests::{
    packets::Packet,
    xdp::{XDP_DROP, XDP_PASS, XdpHarness},
};

const PORT: u16 = 8080;
const OTHER_PORT: u16 = 9090;
/// 1000-byte frames: an IPv4 data segment with 946 bytes of payload.
const PAYLOAD_V4: usize = 946;

fn v4(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 0, last))
}

/// Per-source byte budget 3000 B, per-user 5000 B (and 10,000 B for class
/// `pro`), both per minute so nothing refills during a test.
fn harness(extra: &str) -> XdpHarness {
    XdpHarness::new(&format!(
        "[protect]\nports = [{PORT}, {OTHER_PORT}]\n\
         [limits.per_source]\nnew_connections = \"1000/s\"\nnew_connections_burst = 1000\nbytes = \"3000B/m\"\nbytes_burst = \"3000B\"\nconcurrent_connections = 0\n\
         [limits.per_user]\nbytes = \"5000B/m\"\nbytes_burst = \"5000B\"\n\
         [limits.class.pro]\nbytes = \"10000B/m\"\nbytes_burst = \"10000B\"\n\
         [ban]\nafter_drops = 0\n\
         [handshake]\ninspect_ports = [{PORT}]\nallowed_origins = [\"https://app.example.com\"]\n{extra}"
    ))
    .expect("loading the programs")
}

/// The connection a packet belongs to, as sock_ops names it.
fn peers_of(packet: &Packet) -> StreamPeers {
    let server = packet.dst.unwrap_or(match packet.src {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
        IpAddr::V6(_) => "2001:db8::1".parse().unwrap(),
    });
    StreamPeers {
        client: wsguard_common::SourceKey::from(packet.src).addr,
        server: wsguard_common::SourceKey::from(server).addr,
        client_port: packet.src_port,
        server_port: packet.dst_port,
        _pad: 0,
    }
}

/// Gives `user` (of class index `class`) an entry and binds the packet's
/// connection to it, as the agent does when it accepts the handshake.
fn bind(h: &mut XdpHarness, packet: &Packet, user: &str, class: u32) {
    let key = user_key(user);
    if h.kernel.user(key).is_none() {
        h.kernel
            .set_user(key, new_state(user, class, None), true)
            .unwrap();
    }
    h.kernel.bind_user_flow(&peers_of(packet), key).unwrap();
}

fn user(h: &XdpHarness, id: &str) -> UserState {
    h.kernel.user(user_key(id)).expect("the user's entry")
}

fn verdicts(h: &XdpHarness, frame: &[u8], n: usize) -> Vec<u32> {
    (0..n).map(|_| h.run(frame)).collect()
}

#[test]
fn a_bound_connection_is_charged_to_its_user_and_not_to_its_source() {
    let mut h = harness("");
    let bound = Packet::data(v4(2), PORT, PAYLOAD_V4);
    assert_eq!(bound.bytes().len(), 1000);
    bind(&mut h, &bound, "alice", 0);
    // The user's 5000 B, where the source's budget holds only 3000 B.
    assert_eq!(
        verdicts(&h, &bound.bytes(), 6),
        vec![XDP_PASS, XDP_PASS, XDP_PASS, XDP_PASS, XDP_PASS, XDP_DROP]
    );
    assert_eq!(h.packets(Reason::UserByteRate), 1);
    assert_eq!(h.packets(Reason::ByteRate), 0, "the source was not charged");
    let alice = user(&h, "alice");
    assert_eq!(alice.total_bytes, 6000);
    assert_eq!((alice.dropped_packets, alice.dropped_bytes), (1, 1000));
    assert_ne!(alice.over_since_ns, 0, "the spell over budget started");
    // Another connection from the same address, bound to no one, has the
    // source's own (untouched) budget.
    let unbound = Packet {
        src_port: 40001,
        ..bound.clone()
    };
    assert_eq!(
        verdicts(&h, &unbound.bytes(), 4),
        vec![XDP_PASS, XDP_PASS, XDP_PASS, XDP_DROP]
    );
    assert_eq!(h.packets(Reason::ByteRate), 1);
}

#[test]
fn one_user_over_five_addresses_is_held_to_one_budget() {
    let mut h = harness("");
    let connections: Vec<Packet> = (10..15)
        .map(|host| Packet::data(v4(host), PORT, PAYLOAD_V4))
        .collect();
    for packet in &connections {
        bind(&mut h, packet, "mallory", 0);
    }
    let mut passed = 0;
    for _ in 0..3 {
        for packet in &connections {
            passed += usize::from(h.run(&packet.bytes()) == XDP_PASS);
        }
    }
    assert_eq!(passed, 5, "5000 B over all five addresses");
    assert_eq!(h.packets(Reason::UserByteRate), 10);
    // Each address alone would have had 3000 B of its own.
    assert_eq!(h.packets(Reason::ByteRate), 0);
}

#[test]
fn a_class_has_its_own_budget_and_an_ipv6_connection_is_bound_too() {
    let mut h = harness("");
    let pro = Packet::data(v4(3), PORT, PAYLOAD_V4);
    // Class indexes follow the class names' order, from 1.
    bind(&mut h, &pro, "paying", 1);
    assert_eq!(
        verdicts(&h, &pro.bytes(), 11)
            .iter()
            .filter(|v| **v == XDP_PASS)
            .count(),
        10
    );
    let v6 = Packet::data(
        IpAddr::V6(Ipv6Addr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 7])),
        PORT,
        926,
    );
    assert_eq!(v6.bytes().len(), 1000);
    bind(&mut h, &v6, "six", 0);
    assert_eq!(
        verdicts(&h, &v6.bytes(), 6),
        vec![XDP_PASS, XDP_PASS, XDP_PASS, XDP_PASS, XDP_PASS, XDP_DROP]
    );
    assert_eq!(h.packets(Reason::UserByteRate), 2);
}

#[test]
fn a_banned_users_bytes_are_dropped_and_a_lifted_ban_serves_them_again() {
    let mut h = harness("");
    let packet = Packet::data(v4(4), PORT, 100);
    bind(&mut h, &packet, "banned", 0);
    let key = user_key("banned");
    h.kernel
        .update_user(key, |u| u.banned_until_ns = u64::MAX)
        .unwrap();
    assert_eq!(h.run(&packet.bytes()), XDP_DROP);
    assert_eq!(h.packets(Reason::UserBanned), 1);
    h.kernel
        .update_user(key, |u| u.banned_until_ns = 0)
        .unwrap();
    assert_eq!(h.run(&packet.bytes()), XDP_PASS);
}

#[test]
fn only_bound_connections_to_inspected_ports_are_charged_to_a_user() {
    let mut h = harness("");
    // Bound, but to a protected port that is not inspected (the agent
    // never binds those): the source's budget.
    let other = Packet::data(v4(5), OTHER_PORT, PAYLOAD_V4);
    bind(&mut h, &other, "ghost", 0);
    assert_eq!(
        verdicts(&h, &other.bytes(), 4),
        vec![XDP_PASS, XDP_PASS, XDP_PASS, XDP_DROP]
    );
    assert_eq!(h.packets(Reason::ByteRate), 1);
    // A bound connection whose user entry is gone falls back to its
    // source's budget (still judged, never unjudged).
    let orphan = Packet::data(v4(6), PORT, PAYLOAD_V4);
    bind(&mut h, &orphan, "orphan", 0);
    h.kernel.remove_user(user_key("orphan")).unwrap();
    assert_eq!(
        verdicts(&h, &orphan.bytes(), 4),
        vec![XDP_PASS, XDP_PASS, XDP_PASS, XDP_DROP]
    );
    assert_eq!(h.packets(Reason::ByteRate), 2);
    assert_eq!(h.packets(Reason::UserByteRate), 0);
}

#[test]
fn in_dry_run_a_user_over_budget_is_only_counted() {
    let mut h = harness("");
    let mut dry = XdpHarness::new(
        "[protect]\nports = [8080]\n[limits]\ndry_run = true\n\
         [limits.per_user]\nbytes = \"5000B/m\"\nbytes_burst = \"5000B\"\n[ban]\nafter_drops = 0\n\
         [handshake]\ninspect_ports = [8080]\nallowed_origins = [\"https://app.example.com\"]\n",
    )
    .unwrap();
    let packet = Packet::data(v4(7), PORT, PAYLOAD_V4);
    bind(&mut dry, &packet, "dry", 0);
    assert_eq!(verdicts(&dry, &packet.bytes(), 7), vec![XDP_PASS; 7]);
    assert_eq!(dry.would_drop(Reason::UserByteRate), 2);
    // The same in an enforcing harness drops.
    bind(&mut h, &packet, "dry", 0);
    assert_eq!(verdicts(&h, &packet.bytes(), 7)[5..], [XDP_DROP, XDP_DROP]);
}

/// The USER records the XDP program hands the agent.
fn user_records(ring: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<u64> {
    let mut keys = Vec::new();
    while let Some(item) = ring.next() {
        // SAFETY: the kernel wrote a RecordHeader first; read it unaligned.
        let header: RecordHeader = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        if header.kind == RecordHeader::USER {
            keys.push(header.cookie);
        }
    }
    keys
}

#[test]
fn a_user_over_budget_past_its_timeout_or_banned_is_reported_once() {
    // A timeout short enough for a test.
    let mut h = XdpHarness::new(&format!(
        "[protect]\nports = [{PORT}]\n[limits.per_user]\nbytes = \"5000B/m\"\nbytes_burst = \"5000B\"\nover_budget_timeout = \"5ms\"\n\
         [ban]\nafter_drops = 0\n[handshake]\ninspect_ports = [{PORT}]\nallowed_origins = [\"https://app.example.com\"]\n"
    ))
    .unwrap();
    let mut ring = h.take_records();
    let packet = Packet::data(v4(8), PORT, PAYLOAD_V4);
    bind(&mut h, &packet, "slow", 0);
    assert_eq!(verdicts(&h, &packet.bytes(), 6)[5], XDP_DROP);
    assert!(
        user_records(&mut ring).is_empty(),
        "reported before the timeout"
    );
    // The spell goes on: reported once it lasted the timeout (by the
    // kernel's clock, which moves in timer ticks).
    let started = std::time::Instant::now();
    let reported = loop {
        assert_eq!(h.run(&packet.bytes()), XDP_DROP);
        let records = user_records(&mut ring);
        if !records.is_empty() {
            break records;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "never reported"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    assert_eq!(reported, vec![user_key("slow")]);
    let slow = user(&h, "slow");
    assert!(
        slow.last_drop_ns - slow.over_since_ns >= 5_000_000,
        "reported {} ns into the spell",
        slow.last_drop_ns - slow.over_since_ns
    );
    // Once per spell.
    for _ in 0..10 {
        assert_eq!(h.run(&packet.bytes()), XDP_DROP);
    }
    assert!(user_records(&mut ring).is_empty(), "reported twice");
    assert_eq!(user(&h, "slow").signalled, 1);
    // A ban is reported at the banned user's next packet.
    let banned = Packet::data(v4(9), PORT, 100);
    bind(&mut h, &banned, "banned", 0);
    h.kernel
        .update_user(user_key("banned"), |u| u.banned_until_ns = u64::MAX)
        .unwrap();
    assert_eq!(h.run(&banned.bytes()), XDP_DROP);
    assert_eq!(h.run(&banned.bytes()), XDP_DROP);
    assert_eq!(user_records(&mut ring), vec![user_key("banned")]);
}

#[test]
fn a_bound_connection_still_meets_the_global_byte_limit() {
    let mut h = harness("[limits.global]\nbytes = \"2000B/m\"\n");
    let packet = Packet::data(v4(10), PORT, PAYLOAD_V4);
    bind(&mut h, &packet, "global", 0);
    assert_eq!(
        verdicts(&h, &packet.bytes(), 3),
        vec![XDP_PASS, XDP_PASS, XDP_DROP]
    );
    assert_eq!(h.packets(Reason::GlobalByteRate), 1);
    assert_eq!(h.packets(Reason::UserByteRate), 0);
}

#[test]
fn a_bucket_refilled_to_a_quarter_of_its_burst_ends_the_spell_over_budget() {
    let mut h = XdpHarness::new(&format!(
        "[protect]\nports = [{PORT}]\n[limits.per_user]\nbytes = \"10000B/s\"\nbytes_burst = \"10000B\"\n\
         [ban]\nafter_drops = 0\n[handshake]\ninspect_ports = [{PORT}]\nallowed_origins = [\"https://app.example.com\"]\n"
    ))
    .unwrap();
    let packet = Packet::data(v4(11), PORT, PAYLOAD_V4);
    bind(&mut h, &packet, "calm", 0);
    let verdicts = verdicts(&h, &packet.bytes(), 12);
    assert!(verdicts.contains(&XDP_DROP), "{verdicts:?}");
    assert_ne!(user(&h, "calm").over_since_ns, 0, "the spell started");
    // A pass while the bucket is still low keeps the spell going; once it
    // holds a quarter of its burst (2500 B, a quarter second of refill),
    // the next pass ends it.
    let budget = h.kernel.user_budget(0).unwrap().bytes;
    let started = std::time::Instant::now();
    while user(&h, "calm").over_budget_ns(&budget, wsguard::kernel::monotonic_ns()) != 0 {
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // The kernel's clock lags by up to a timer tick: pass until it sees it.
    let started = std::time::Instant::now();
    while user(&h, "calm").over_since_ns != 0 {
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        std::thread::sleep(std::time::Duration::from_millis(10));
        let mut small = packet.clone();
        small.payload = 10;
        assert_eq!(h.run(&small.bytes()), XDP_PASS);
    }
}
