//! The kernel half of handshake inspection. The stream verdict program on
//! real loopback sockets (BPF_PROG_TEST_RUN does not run sk_skb programs):
//! bytes handed to the agent until its verdict, passed only once everything
//! handed over was put back, dropped after a rejection, never passed for a
//! connection it does not know or could not hand over. XDP through
//! BPF_PROG_TEST_RUN: new connections to inspected ports refused while
//! inspection is full.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use wsguard_common::{Reason, RecordHeader, Release};
use wsguard_tests::{
    packets::{Packet, TCP_ACK, TCP_PSH},
    xdp::{XDP_DROP, XDP_PASS, XdpHarness},
};

const INSPECTED: u16 = 8080;

fn client() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 0, 7))
}

fn harness(max_connections: u32) -> XdpHarness {
    XdpHarness::new(&format!(
        "[protect]\nports = [{INSPECTED}]\n[ban]\nafter_drops = 0\n[lists]\nallow = [\"198.18.0.200\"]\n\
         [handshake]\ninspect_ports = [{INSPECTED}]\nmax_connections = {max_connections}\nmissing_origin = \"allow\"\n"
    ))
    .unwrap()
}

/// The DATA records the kernel handed over: (offset, bytes).
fn handed(ring: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        let header: RecordHeader = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        if header.kind != RecordHeader::DATA {
            continue;
        }
        let data = &item[size_of::<RecordHeader>()..][..header.len as usize];
        out.push((header.offset, data.to_vec()));
    }
    out
}

fn concat(records: &[(u64, Vec<u8>)]) -> Vec<u8> {
    records.iter().flat_map(|(_, b)| b.clone()).collect()
}

/// Waits (5 s at most) until `done` holds.
fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "waited in vain for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until the kernel has seen `bytes` stream bytes of connection `cookie`.
fn wait_handed(h: &XdpHarness, cookie: u64, bytes: u64) {
    wait_for(&format!("{bytes} bytes handed over"), || {
        h.stream(cookie).map_or(0, |s| s.handed) >= bytes
    });
}

const NOTHING: Duration = Duration::from_millis(100);

#[test]
fn bytes_of_a_connection_awaiting_its_verdict_go_to_the_agent_never_to_the_application() {
    let mut h = harness(100);
    let mut ring = h.take_records();
    let mut c = h.inspected_connection().unwrap();
    let head = b"GET /ws HTTP/1.1\r\nHost: a\r\n\r\n";
    c.send(&head[..10]);
    wait_handed(&h, c.cookie, 10);
    c.send(&head[10..]);
    wait_handed(&h, c.cookie, head.len() as u64);
    assert!(
        c.server_reads(NOTHING).is_empty(),
        "the application read unjudged bytes"
    );
    let records = handed(&mut ring);
    assert_eq!(records[0].0, 0);
    assert_eq!(concat(&records), head);
    assert!(h.packets(Reason::HandedToAgent) >= 2);

    // A long write is split into records, offsets running on.
    let long: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    c.send(&long);
    wait_handed(&h, c.cookie, (head.len() + long.len()) as u64);
    let records = handed(&mut ring);
    let mut offset = head.len() as u64;
    for (at, bytes) in &records {
        assert_eq!(*at, offset);
        assert!(bytes.len() <= wsguard_common::maps::RECORD_DATA_BYTES);
        offset += bytes.len() as u64;
    }
    assert_eq!(concat(&records), long);
    assert!(c.server_reads(NOTHING).is_empty());
}

#[test]
fn an_accepted_connection_passes_only_once_everything_handed_over_was_put_back() {
    let mut h = harness(100);
    let mut ring = h.take_records();
    let mut c = h.inspected_connection().unwrap();
    c.send(&[b'a'; 100]);
    wait_handed(&h, c.cookie, 100);
    // The agent accepted after 60 bytes: the 40 after them are still on
    // their way to it, so new bytes must not overtake them.
    h.set_release(c.cookie, Release::ACCEPTED, 60);
    c.send(&[b'b'; 10]);
    wait_handed(&h, c.cookie, 110);
    assert!(c.server_reads(NOTHING).is_empty());
    assert_eq!(handed(&mut ring).last().unwrap().0, 100);
    // Everything put back: from now on straight to the application.
    h.set_release(c.cookie, Release::ACCEPTED, 110);
    c.send(b"direct");
    assert_eq!(c.server_reads(Duration::from_secs(5)), b"direct");
    assert!(handed(&mut ring).is_empty());
    assert_eq!(h.stream(c.cookie).unwrap().handed, 110);
}

#[test]
fn a_rejected_connection_gets_nothing() {
    let mut h = harness(100);
    let mut ring = h.take_records();
    let mut c = h.inspected_connection().unwrap();
    h.set_release(c.cookie, Release::REJECTED, 0);
    c.send(b"GET / HTTP/1.1\r\n\r\n");
    wait_for("the verdict", || h.packets(Reason::FlowRejected) > 0);
    assert!(c.server_reads(NOTHING).is_empty());
    assert!(handed(&mut ring).is_empty());
}

#[test]
fn a_socket_under_inspection_without_its_stream_entry_fails_closed() {
    let mut h = harness(100);
    let mut c = h.inspected_connection().unwrap();
    // As if the stream map had been full when sock_ops admitted it.
    h.close_stream(c.cookie);
    h.set_release(c.cookie, Release::ACCEPTED, 0);
    c.send(b"GET / HTTP/1.1\r\n\r\n");
    wait_for("the verdict", || h.packets(Reason::InspectLost) > 0);
    assert!(c.server_reads(NOTHING).is_empty());
}

#[test]
fn a_full_ring_buffer_marks_the_stream_lost_and_nothing_is_passed() {
    let mut h = harness(100);
    // Nobody reads the ring: 8 MiB of records fill it.
    let mut c = h.inspected_connection().unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0u64;
    while h.stream(c.cookie).unwrap().lost == 0 {
        c.send(&chunk);
        sent += chunk.len() as u64;
        assert!(sent < 64 << 20, "the ring buffer never filled");
        wait_handed(&h, c.cookie, sent);
    }
    assert!(h.packets(Reason::InspectLost) > 0);
    assert!(c.server_reads(NOTHING).is_empty());
}

#[test]
fn new_connections_to_inspected_ports_are_refused_while_inspection_is_full() {
    let mut h = harness(2);
    let syn = Packet::syn(client(), INSPECTED);
    assert_eq!(h.run(&syn.bytes()), XDP_PASS);

    // The agent's table of pending handshakes is full.
    h.set_pending_full(true);
    assert_eq!(h.run(&syn.bytes()), XDP_DROP);
    assert_eq!(h.packets(Reason::InspectFull), 1);
    // Segments of established connections still pass.
    assert_eq!(h.run(&syn.reply(TCP_ACK | TCP_PSH, 100).bytes()), XDP_PASS);
    // Allow-listed sources are never inspected, so never refused.
    let allowed = Packet::syn("198.18.0.200".parse().unwrap(), INSPECTED);
    assert_eq!(h.run(&allowed.bytes()), XDP_PASS);
    // A reload keeps the flag.
    h.reload();
    assert_eq!(h.handshake_settings().pending_full, 1);
    h.set_pending_full(false);
    assert_eq!(h.run(&syn.bytes()), XDP_PASS);

    // As many inspected connections open as handshake.max_connections.
    h.set_inspected_count(2);
    assert_eq!(h.run(&syn.bytes()), XDP_DROP);
    h.set_inspected_count(1);
    assert_eq!(h.run(&syn.bytes()), XDP_PASS);
    assert_eq!(h.packets(Reason::InspectFull), 2);
}

#[test]
fn handshake_dry_run_counts_a_refused_connection_and_passes_it() {
    let mut h = XdpHarness::new(&format!(
        "[protect]\nports = [{INSPECTED}]\n[ban]\nafter_drops = 0\n[handshake]\ninspect_ports = [{INSPECTED}]\ndry_run = true\nmissing_origin = \"allow\"\n"
    ))
    .unwrap();
    h.set_pending_full(true);
    assert_eq!(h.run(&Packet::syn(client(), INSPECTED).bytes()), XDP_PASS);
    assert_eq!(h.would_drop(Reason::InspectFull), 1);
    assert_eq!(h.packets(Reason::InspectFull), 0);
}
