//! Hostile input for the kernel programs: a million and more random and
//! mutated frames through the XDP program with BPF_PROG_TEST_RUN (handshake
//! inspection on), checking invariants rather than exact verdicts:
//! - every run succeeds with a verdict the program type allows;
//! - frames whose destination port can be read and is unprotected, and
//!   frames from an allow-listed source, pass;
//! - every XDP drop is counted under exactly one drop reason.
//!
//! (The stream verdict program never parses the bytes it hands over, so
//! random content tells nothing more about it; `handshake_kernel.rs` tests it.)
//!
//! The seed is printed; `WSGUARD_FUZZ_SEED` and `WSGUARD_FUZZ_PACKETS`
//! replay or lengthen a run.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use wsguard_tests::{
    packets::{ETH_P_8021AD, ETH_P_8021Q, Ext, Packet},
    xdp::{XDP_DROP, XDP_PASS, XdpHarness},
};

const PROTECTED: u16 = 8080;
const UNPROTECTED: u16 = 22;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The allow list of the fuzzed config.
const ALLOWED: [IpAddr; 3] = [
    IpAddr::V4(Ipv4Addr::new(198, 18, 0, 200)),
    IpAddr::V4(Ipv4Addr::new(198, 19, 0, 200)),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xa11)),
];

/// A source from the test ranges, allow-listed or (almost surely) not.
fn address(rng: &mut fastrand::Rng, allowed: bool) -> IpAddr {
    if allowed {
        return ALLOWED[rng.usize(..ALLOWED.len())];
    }
    if rng.bool() {
        IpAddr::V4(Ipv4Addr::new(
            198,
            18 + rng.u8(0..2),
            rng.u8(..),
            rng.u8(1..200),
        ))
    } else {
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            rng.u16(..),
            0,
            0,
            0,
            0,
            rng.u16(1..0xa00),
        ))
    }
}

fn ext(rng: &mut fastrand::Rng) -> Ext {
    match rng.u8(0..7) {
        0 => Ext::HopByHop,
        1 => Ext::Routing,
        2 => Ext::DestOpts,
        3 => Ext::Fragment {
            offset: if rng.bool() { 0 } else { rng.u16(..0x1fff) },
            more: rng.bool(),
        },
        4 => Ext::Ah,
        5 => Ext::Esp,
        _ => Ext::NoNext,
    }
}

/// How hostile a structured frame may be.
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// Anything: wrong header lengths, later fragments, cuts anywhere.
    Hostile,
    /// Odd but honest about its destination port: the port can be read where
    /// the headers say it is (no lying IHL, no later fragments, no cut
    /// before the port, no denied source).
    PortVisible,
}

/// A frame built from random header choices (often valid, often not).
fn structured(rng: &mut fastrand::Rng, port: u16, allowed: bool, shape: Shape) -> Vec<u8> {
    let hostile = shape == Shape::Hostile;
    let mut source = address(rng, allowed);
    if !hostile {
        // Stay clear of the deny list (198.19.0.0/16, 2001:db8:ff00::/40).
        source = match source {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::new(198, 18, a.octets()[2], a.octets()[3])),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::new(
                0x2001,
                0xdb8,
                a.segments()[2] & 0x7fff,
                0,
                0,
                0,
                0,
                a.segments()[7],
            )),
        };
    }
    let mut p = Packet::tcp(source, port, rng.u8(..));
    p.src_port = rng.u16(..);
    p.vlan_tpids = (0..rng.usize(0..if hostile { 4 } else { 3 }))
        .map(|_| {
            if rng.bool() {
                ETH_P_8021Q
            } else {
                ETH_P_8021AD
            }
        })
        .collect();
    p.ipv4_option_words = rng.u8(0..11);
    if hostile && rng.u8(..) < 20 {
        p.ipv4_ihl_override = Some(rng.u8(0..16));
    }
    if rng.u8(..) < 30 {
        let offset = if hostile {
            rng.u16(..0x1fff) * u16::from(rng.bool())
        } else {
            0
        };
        p.ipv4_fragment = Some((offset, rng.bool()));
    }
    p.ipv6_ext = (0..rng.usize(0..if hostile { 11 } else { 8 }))
        .map(|_| match ext(rng) {
            Ext::Fragment { more, .. } if !hostile => Ext::Fragment { offset: 0, more },
            other => other,
        })
        .collect();
    p.tcp_doff = if rng.u8(..) < 30 {
        rng.u8(0..16)
    } else {
        5 + rng.u8(0..3)
    };
    p.payload = rng.usize(0..600);
    if rng.u8(..) < 40 {
        p.protocol = [6, 17, 1, 58, 132][rng.usize(0..5)];
    }
    let mut bytes = p.bytes();
    if rng.u8(..) < 60 {
        let shortest = if hostile {
            14
        } else {
            (p.l4_offset() + 4).min(bytes.len())
        };
        bytes.truncate(rng.usize(shortest..bytes.len().max(shortest + 1)));
    }
    bytes
}

/// A structured frame with random bytes flipped, or pure noise.
fn mutated(rng: &mut fastrand::Rng) -> Vec<u8> {
    if rng.u8(..) < 40 {
        return (0..rng.usize(14..400)).map(|_| rng.u8(..)).collect();
    }
    let mut bytes = structured(rng, PROTECTED, false, Shape::Hostile);
    for _ in 0..rng.usize(1..8) {
        let i = rng.usize(..bytes.len());
        bytes[i] = rng.u8(..);
    }
    bytes
}

#[test]
fn a_million_hostile_frames_keep_every_invariant() {
    let seed = env_or("WSGUARD_FUZZ_SEED", fastrand::u64(..));
    let total = env_or("WSGUARD_FUZZ_PACKETS", 1_000_000);
    println!(
        "fuzz seed {seed}, {total} frames (WSGUARD_FUZZ_SEED / WSGUARD_FUZZ_PACKETS replay or lengthen)"
    );
    let mut rng = fastrand::Rng::with_seed(seed);
    let allow: Vec<String> = ALLOWED.iter().map(|a| format!("\"{a}\"")).collect();
    let h = XdpHarness::new(&format!(
        "[protect]\nports = [{PROTECTED}]\n[limits.per_source]\nnew_connections = \"50/s\"\nnew_connections_burst = 50\nbytes = \"64KiB/s\"\n\
         bytes_burst = \"64KiB\"\n[ban]\nafter_drops = 20\nduration = \"1h\"\n[tracking]\nmax_sources = 4096\n\
         [lists]\nallow = [{}]\ndeny = [\"198.19.0.0/16\", \"2001:db8:ff00::/40\"]\n\
         [handshake]\ninspect_ports = [{PROTECTED}]\nmissing_origin = \"allow\"\n",
        allow.join(", ")
    ))
    .unwrap();

    let mut drops = 0u64;
    for i in 0..total {
        let (frame, kind) = match i % 4 {
            0 => (
                structured(&mut rng, UNPROTECTED, false, Shape::PortVisible),
                "unprotected",
            ),
            1 => (
                structured(&mut rng, PROTECTED, true, Shape::Hostile),
                "allow-listed",
            ),
            2 => (
                structured(&mut rng, PROTECTED, false, Shape::Hostile),
                "protected",
            ),
            _ => (mutated(&mut rng), "mutated"),
        };
        let verdict = h.run(&frame);
        assert!(
            verdict == XDP_PASS || verdict == XDP_DROP,
            "seed {seed} frame {i}: XDP verdict {verdict}"
        );
        if matches!(kind, "unprotected" | "allow-listed") {
            assert_eq!(
                verdict, XDP_PASS,
                "seed {seed} frame {i} ({kind}) dropped: {frame:02x?}"
            );
        }
        drops += u64::from(verdict == XDP_DROP);
    }
    let counted: u64 = h
        .counters()
        .iter()
        .filter(|(r, _)| r.is_drop())
        .map(|(_, c)| c.packets)
        .sum();
    assert_eq!(
        h.packets(wsguard_common::Reason::FlowRejected),
        0,
        "no verdicts were given, so no connection can be rejected"
    );
    assert_eq!(
        counted, drops,
        "seed {seed}: XDP dropped {drops} frames but counted {counted}"
    );
    assert!(
        drops > 0,
        "the limits were never reached: the generator is too tame"
    );
    println!("{total} frames: {drops} dropped by XDP, all counted");
}
