//! The kernel half of handshake inspection, through BPF_PROG_TEST_RUN:
//! flows tracked from the SYN, the capture filter (what reaches the agent and
//! what does not), the egress program holding the server's answer back until
//! the verdict, and rejected connections dropped both ways.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use wsguard_common::{Flow, FlowKey, Reason, SourceKey};
use wsguard_tests::{
    packets::{Packet, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN},
    xdp::{TC_ACT_OK, TC_ACT_SHOT, XDP_DROP, XDP_PASS, XdpHarness},
};

const INSPECTED: u16 = 8080;
const PROTECTED_ONLY: u16 = 80;
const SECOND: u64 = 1_000_000_000;

fn client() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 0, 7))
}

fn harness(timeout_ns: u64, fail_closed: bool) -> XdpHarness {
    let mut h = XdpHarness::new(&format!(
        "[protect]\nports = [{PROTECTED_ONLY}, {INSPECTED}]\n[ban]\nafter_drops = 0\n[lists]\nallow = [\"198.18.0.200\"]\n"
    ))
    .unwrap();
    h.inspect(INSPECTED, timeout_ns, fail_closed);
    h
}

fn key(p: &Packet) -> FlowKey {
    let server = p.dst.unwrap_or(match p.src {
        IpAddr::V4(_) => IpAddr::from([198, 18, 0, 1]),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
    });
    let full = |a: IpAddr| match a {
        IpAddr::V4(v4) => SourceKey::from_v4(v4.octets()).addr,
        IpAddr::V6(v6) => v6.octets(),
    };
    FlowKey {
        client: full(p.src),
        server: full(server),
        client_port: p.src_port,
        server_port: p.dst_port,
        _pad: 0,
    }
}

/// Sets the flow `syn` opened to `state` (what the agent does with its
/// verdict), as of long ago.
fn set_state(h: &mut XdpHarness, syn: &Packet, state: u32) {
    h.set_flow(
        &key(syn),
        Flow {
            state,
            _pad: 0,
            since_ns: 1,
        },
    );
}

#[test]
fn a_syn_to_an_inspected_port_starts_a_pending_flow() {
    let h = harness(SECOND, false);
    let syn = Packet::syn(client(), INSPECTED);
    assert_eq!(h.run(&syn.bytes()), XDP_PASS);
    assert_eq!(h.flow(&key(&syn)).map(|f| f.state), Some(Flow::PENDING));
    // Protected but not inspected, or allow-listed: no flow.
    let plain = Packet::syn(client(), PROTECTED_ONLY);
    assert_eq!(h.run(&plain.bytes()), XDP_PASS);
    assert!(h.flow(&key(&plain)).is_none());
    let allowed = Packet::syn(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 200)), INSPECTED);
    assert_eq!(h.run(&allowed.bytes()), XDP_PASS);
    assert!(
        h.flow(&key(&allowed)).is_none(),
        "allow-listed sources are never inspected"
    );
    // IPv6 too.
    let six = Packet::syn(
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7)),
        INSPECTED,
    );
    assert_eq!(h.run(&six.bytes()), XDP_PASS);
    assert_eq!(h.flow(&key(&six)).map(|f| f.state), Some(Flow::PENDING));
}

#[test]
fn the_capture_filter_passes_only_what_the_inspector_needs() {
    let mut h = harness(SECOND, false);
    let syn = Packet::syn(client(), INSPECTED);
    let head = Packet::data(client(), INSPECTED, 300);
    let full_len = |p: &Packet| p.bytes().len() as u32 - 14; // the filter sees the packet from the network header
    // Nothing of a connection XDP is not tracking (established before the
    // agent, allow-listed, not inspected).
    assert_eq!(h.run_capture(&syn.bytes()), 0);
    assert_eq!(h.run_capture(&head.bytes()), 0);
    assert_eq!(h.run(&syn.bytes()), XDP_PASS); // XDP, which runs first, starts the flow
    assert_eq!(
        h.run_capture(&syn.bytes()),
        full_len(&syn),
        "the SYN, which starts the deadline"
    );
    assert_eq!(
        h.run_capture(&head.bytes()),
        full_len(&head),
        "the request head of a pending flow"
    );
    let fin = Packet::tcp(client(), INSPECTED, TCP_FIN | TCP_ACK);
    assert_eq!(
        h.run_capture(&fin.bytes()),
        full_len(&fin),
        "its end, so the agent forgets it"
    );
    // The server's side, other ports, other protocols: never.
    assert_eq!(h.run_capture(&syn.reply(TCP_ACK | TCP_PSH, 100).bytes()), 0);
    assert_eq!(
        h.run_capture(&Packet::data(client(), PROTECTED_ONLY, 300).bytes()),
        0
    );
    assert_eq!(h.run_capture(&Packet::udp(client(), INSPECTED).bytes()), 0);
    // Once judged, bulk traffic stays in the kernel.
    set_state(&mut h, &syn, Flow::ACCEPTED);
    assert_eq!(h.run_capture(&head.bytes()), 0);
    set_state(&mut h, &syn, Flow::REJECTED);
    assert_eq!(h.run_capture(&head.bytes()), 0);
}

#[test]
fn the_servers_answer_waits_for_the_verdict() {
    let mut h = harness(3600 * SECOND, false);
    let syn = Packet::syn(client(), INSPECTED);
    assert_eq!(h.run(&syn.bytes()), XDP_PASS);
    let syn_ack = syn.reply(TCP_SYN | TCP_ACK, 0);
    let answer = syn.reply(TCP_ACK | TCP_PSH, 129); // "HTTP/1.1 101 Switching Protocols…"
    assert_eq!(
        h.run_egress(&syn_ack.bytes()),
        TC_ACT_OK,
        "the handshake itself is not held"
    );
    assert_eq!(
        h.run_egress(&answer.bytes()),
        TC_ACT_SHOT,
        "held back while pending"
    );
    assert_eq!(h.packets(Reason::ResponseHeld), 1);
    set_state(&mut h, &syn, Flow::ACCEPTED);
    assert_eq!(
        h.run_egress(&answer.bytes()),
        TC_ACT_OK,
        "accepted: the (retransmitted) answer goes out"
    );
    // Connections the kernel knows nothing of are untouched.
    let other = Packet::syn(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 8)), INSPECTED)
        .reply(TCP_ACK | TCP_PSH, 50);
    assert_eq!(h.run_egress(&other.bytes()), TC_ACT_OK);
    // Not an inspected port: untouched.
    let plain = Packet::syn(client(), PROTECTED_ONLY);
    assert_eq!(h.run(&plain.bytes()), XDP_PASS);
    assert_eq!(
        h.run_egress(&plain.reply(TCP_ACK | TCP_PSH, 50).bytes()),
        TC_ACT_OK
    );
}

#[test]
fn past_the_verdict_timeout_fail_open_passes_and_fail_closed_drops() {
    for fail_closed in [false, true] {
        let mut h = harness(SECOND, fail_closed);
        let syn = Packet::syn(client(), INSPECTED);
        set_state(&mut h, &syn, Flow::PENDING); // long ago
        let verdict = h.run_egress(&syn.reply(TCP_ACK | TCP_PSH, 129).bytes());
        if fail_closed {
            assert_eq!(verdict, TC_ACT_SHOT);
            assert_eq!(h.packets(Reason::VerdictTimeout), 1);
        } else {
            assert_eq!(verdict, TC_ACT_OK);
            assert_eq!(h.packets(Reason::VerdictTimeoutPassed), 1);
        }
    }
}

#[test]
fn a_rejected_connection_is_dropped_both_ways_but_the_servers_rst_passes() {
    let mut h = harness(SECOND, false);
    let syn = Packet::syn(client(), INSPECTED);
    assert_eq!(h.run(&syn.bytes()), XDP_PASS);
    set_state(&mut h, &syn, Flow::REJECTED);
    assert_eq!(
        h.run(&Packet::data(client(), INSPECTED, 40).bytes()),
        XDP_DROP,
        "the client's frames"
    );
    assert_eq!(
        h.run_egress(&syn.reply(TCP_ACK | TCP_PSH, 129).bytes()),
        TC_ACT_SHOT,
        "the server's answer"
    );
    assert_eq!(
        h.run_egress(&syn.reply(TCP_RST | TCP_ACK, 0).bytes()),
        TC_ACT_OK,
        "the server's reset"
    );
    assert_eq!(h.packets(Reason::FlowRejected), 2);
    // The same client's other connections are judged on their own.
    let other = Packet::data(client(), INSPECTED, 40).with(|p| p.src_port = 40001);
    assert_eq!(h.run(&other.bytes()), XDP_PASS);
}

/// Clients reuse source ports: a new SYN on the 4-tuple of a rejected
/// connection is a new connection, judged afresh, not part of the old one.
#[test]
fn a_new_connection_on_a_rejected_connections_ports_is_judged_afresh() {
    let mut h = harness(SECOND, false);
    let syn = Packet::syn(client(), INSPECTED);
    assert_eq!(h.run(&syn.bytes()), XDP_PASS);
    set_state(&mut h, &syn, Flow::REJECTED);
    assert_eq!(h.run(&syn.bytes()), XDP_PASS, "the new SYN");
    assert_eq!(h.flow(&key(&syn)).map(|f| f.state), Some(Flow::PENDING));
    assert_eq!(
        h.run_egress(&syn.reply(TCP_SYN | TCP_ACK, 0).bytes()),
        TC_ACT_OK,
        "the server's SYN-ACK"
    );
    assert_eq!(h.packets(Reason::FlowRejected), 0);
}

/// `handshake.dry_run`: the kernel counts what it would drop for a rejected
/// flow, a held answer or a verdict timeout (fail-closed), and passes it all.
#[test]
fn handshake_dry_run_counts_would_drop_and_passes() {
    let mut h = XdpHarness::new(&format!(
        "[protect]\nports = [{INSPECTED}]\n[ban]\nafter_drops = 0\n\
         [handshake]\ninspect_ports = [{INSPECTED}]\nallowed_origins = [\"https://app.example.com\"]\ndry_run = true\n"
    ))
    .unwrap();
    h.inspect(INSPECTED, 1000 * SECOND, true);

    let rejected = Packet::syn(client(), INSPECTED);
    assert_eq!(h.run(&rejected.bytes()), XDP_PASS);
    set_state(&mut h, &rejected, Flow::REJECTED);
    let data = Packet::data(client(), INSPECTED, 40);
    assert_eq!(h.run(&data.bytes()), XDP_PASS, "the client's frames");
    assert_eq!(
        h.run_egress(&rejected.reply(TCP_ACK | TCP_PSH, 129).bytes()),
        TC_ACT_OK,
        "the server's answer"
    );
    assert_eq!(h.would_drop(Reason::FlowRejected), 2);

    let pending = Packet::syn(client(), INSPECTED).with(|p| p.src_port = 40002);
    assert_eq!(h.run(&pending.bytes()), XDP_PASS);
    assert_eq!(
        h.run_egress(&pending.reply(TCP_ACK | TCP_PSH, 129).bytes()),
        TC_ACT_OK,
        "an answer before the verdict"
    );
    assert_eq!(h.would_drop(Reason::ResponseHeld), 1);

    let late = Packet::syn(client(), INSPECTED).with(|p| p.src_port = 40003);
    h.inspect(INSPECTED, 1, true);
    set_state(&mut h, &late, Flow::PENDING);
    assert_eq!(
        h.run_egress(&late.reply(TCP_ACK | TCP_PSH, 129).bytes()),
        TC_ACT_OK,
        "an answer past the verdict timeout, fail-closed"
    );
    assert_eq!(h.would_drop(Reason::VerdictTimeout), 1);
    assert!(
        h.nonzero()
            .iter()
            .all(|(r, _)| !r.is_drop() || *r == Reason::Passed),
        "nothing counted as dropped: {:?}",
        h.nonzero()
    );
}

/// An allow-listed client is never held back or cut, even on a port whose
/// earlier connection (from before it was listed) was pending or rejected.
#[test]
fn stale_flows_never_hold_back_or_cut_an_allow_listed_client() {
    let mut h = harness(SECOND, true);
    let allowed = Packet::syn(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 200)), INSPECTED);
    for state in [Flow::REJECTED, Flow::PENDING] {
        set_state(&mut h, &allowed, state);
        assert_eq!(h.run(&allowed.bytes()), XDP_PASS, "the new SYN");
        assert_eq!(
            h.run_egress(&allowed.reply(TCP_SYN | TCP_ACK, 0).bytes()),
            TC_ACT_OK
        );
        assert_eq!(
            h.run_egress(&allowed.reply(TCP_ACK | TCP_PSH, 129).bytes()),
            TC_ACT_OK,
            "the server's answer, flow {state}"
        );
    }
    assert!(
        h.nonzero().iter().all(|(r, _)| !r.is_drop()),
        "{:?}",
        h.nonzero()
    );
}
