//! Cost per packet of the XDP program as the kernel measures it
//! (BPF_PROG_TEST_RUN), next to `wsguard_floor`, which only returns XDP_PASS:
//! sections 1 (per decision path) and 2 (with many sources tracked), and the
//! in-kernel half of ban latency.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Result, bail, ensure};
use serde::Serialize;
use wsguard::kernel::Maps;
use wsguard_common::SourceKey;
use wsguard_common::{Ban, Reason};
use wsguard_tests::{
    packets::Packet,
    xdp::{XDP_DROP, XDP_PASS, XDP_TX, XdpHarness},
};

use crate::stats::Spread;

const PORT: u16 = 8080;
const UNPROTECTED_PORT: u16 = 9999;

/// How long each measurement runs.
#[derive(Clone, Copy)]
pub struct Effort {
    /// BPF_PROG_TEST_RUN repeat count for one frame.
    pub repeat: u32,
    /// Rounds; every case is measured once per round, next to the floor.
    pub rounds: usize,
    /// Distinct frames per round where each frame can run only once (new
    /// sources, cold lookups).
    pub singles: usize,
}

#[derive(Debug, Serialize)]
pub struct CostRow {
    pub case: String,
    pub verdict: &'static str,
    /// Nanoseconds per packet.
    pub ns: Spread,
    /// `ns` over the floor's, measured next to it in the same round.
    pub ratio: Spread,
    /// `ns` minus the floor's, in the same round (the floor itself varies
    /// between machines; this does less).
    pub over_floor: Spread,
    /// The ratio the row must stay within, where there is one.
    pub target: Option<f64>,
}

impl CostRow {
    /// Whether the median ratio is within the target (`None`: no target).
    pub fn meets_target(&self) -> Option<bool> {
        self.target.map(|t| self.ratio.median <= t)
    }
}

#[derive(Debug, Serialize)]
pub struct ScaleRow {
    /// `tracking.max_sources`, which the map was filled to.
    pub sources: u32,
    /// Entries the map held after filling.
    pub tracked: u32,
    /// Map memory the kernel charges for the map (`memlock`).
    pub map_bytes: u64,
    pub rows: Vec<CostRow>,
}

impl ScaleRow {
    pub fn bytes_per_source(&self) -> f64 {
        self.map_bytes as f64 / f64::from(self.sources)
    }

    pub fn map_mib(&self) -> f64 {
        self.map_bytes as f64 / (1024.0 * 1024.0)
    }
}

#[derive(Debug, Serialize)]
pub struct BanLatency {
    pub after_drops: u32,
    /// Sources driven over their limit, one after another.
    pub sources: u32,
    /// Packets the kernel let through between the drop that crossed the
    /// threshold and the first drop for the ban (0: the very next one).
    pub packets_through_after_crossing: u64,
    /// Cost of the packet that crossed the threshold and wrote the ban.
    pub crossing_packet_ns: Spread,
}

/// A config with limits so high that nothing in a benchmark reaches them.
fn open_config(max_sources: u32, ipv6_prefix: u8) -> String {
    format!(
        "[protect]\nports = [{PORT}]\nipv6_prefix = {ipv6_prefix}\n\
         [limits.per_source]\nnew_connections = \"100000000/s\"\nnew_connections_burst = 100000000\n\
         bytes = \"4GiB/s\"\nbytes_burst = \"4GiB\"\nconcurrent_connections = 1000000\n\
         [limits.global]\nnew_connections = \"1000000000/s\"\nbytes = \"4GiB/s\"\n\
         [ban]\nafter_drops = 0\n[tracking]\nmax_sources = {max_sources}\n"
    )
}

fn v4(n: u32) -> IpAddr {
    // 198.18.0.0/15: 131072 addresses.
    IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (n & 0x1ffff),
    ))
}

/// A distinct address per `n` in 2001:db8:N::/48-sized steps, so that each is
/// its own /64 (and its own /128).
fn v6(block: u16, n: u32) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(
        0x2001,
        0xdb8,
        block,
        (n >> 16) as u16,
        n as u16,
        0,
        0,
        1,
    ))
}

/// Fills `h`'s source map with `count` sources of `block`, one packet
/// each from the program itself, so every entry holds what a real first
/// packet leaves.
/// Sends data from new sources of `block` until the per-source table is
/// full: its capacity first, then more (a source whose set is full takes
/// the way of another) until every way of every set is taken, or four
/// times the capacity. How many sources were sent.
fn fill_sources(h: &XdpHarness, block: u16) -> Result<u32> {
    let capacity = h.kernel.source_capacity()?;
    let mut sent = 0;
    while sent < 4 * capacity {
        let round = if sent == 0 {
            capacity
        } else {
            capacity / 16 + 1
        };
        for i in sent..sent + round {
            h.run_repeat(&data(v6(block, i)), 1)?;
        }
        sent += round;
        if h.kernel.tracked_source_count()? >= u64::from(capacity) {
            break;
        }
    }
    Ok(sent)
}

/// Data frames from sources of `block` not seen yet: the numbers after
/// `after`, one per frame.
fn new_sources(block: u16, after: u32) -> impl Iterator<Item = Vec<u8>> {
    (after + 1..).map(move |n| data(v6(block, n)))
}

fn syn(src: IpAddr, port: u16) -> Vec<u8> {
    Packet::syn(src, port).bytes()
}

fn data(src: IpAddr) -> Vec<u8> {
    Packet::data(src, PORT, 0).bytes()
}

fn verdict_name(v: u32) -> &'static str {
    match v {
        XDP_PASS => "pass",
        XDP_DROP => "drop",
        XDP_TX => "answered (XDP_TX)",
        _ => "other",
    }
}

/// One case: a frame through the ingress program of a harness, repeated.
struct Case<'a> {
    name: String,
    harness: &'a XdpHarness,
    frame: Vec<u8>,
    expect: u32,
    /// Ratio to the floor the case must stay within.
    target: Option<f64>,
}

/// Measures every case once per round, each right after the floor, and
/// reports medians over the rounds.
fn measure(floor: &XdpHarness, cases: &[Case], effort: Effort) -> Result<Vec<CostRow>> {
    let mut ns = vec![Vec::new(); cases.len()];
    let mut ratio = vec![Vec::new(); cases.len()];
    let mut over = vec![Vec::new(); cases.len()];
    let mut floor_ns = Vec::new();
    for round in 0..effort.rounds {
        // Rotate the order so drift on a shared machine spreads evenly.
        for k in 0..cases.len() {
            let i = (k + round) % cases.len();
            let case = &cases[i];
            let (_, base) = floor.run_floor(&case.frame, effort.repeat)?;
            let (verdict, took) = case.harness.run_repeat(&case.frame, effort.repeat)?;
            ensure!(
                verdict == case.expect,
                "{}: the program answered {verdict}, not {} (the benchmark would measure the wrong path)",
                case.name,
                case.expect
            );
            let (b, t) = (base.as_nanos() as f64, took.as_nanos() as f64);
            floor_ns.push(b);
            ns[i].push(t);
            ratio[i].push(t / b.max(1.0));
            over[i].push(t - b);
        }
    }
    let mut rows = vec![floor_row("floor: XDP_PASS only", &floor_ns)];
    rows.extend(cases.iter().enumerate().map(|(i, c)| CostRow {
        case: c.name.clone(),
        verdict: verdict_name(c.expect),
        ns: Spread::of(&ns[i]),
        ratio: Spread::of(&ratio[i]),
        over_floor: Spread::of(&over[i]),
        target: c.target,
    }));
    Ok(rows)
}

fn floor_row(name: &str, floor_ns: &[f64]) -> CostRow {
    CostRow {
        case: name.to_string(),
        verdict: "pass",
        ns: Spread::of(floor_ns),
        ratio: Spread::of(&vec![1.0; floor_ns.len()]),
        over_floor: Spread::of(&vec![0.0; floor_ns.len()]),
        target: None,
    }
}

/// Runs `frames` once each (a repeat would make every run after the first a
/// hit), alternating with the floor; returns per-round medians of the
/// program and of the floor. Includes the kernel's clock reads around one
/// run, which the floor pays too.
fn measure_singles(
    harness: &XdpHarness,
    frames: &mut impl Iterator<Item = Vec<u8>>,
    effort: Effort,
    expect: u32,
    what: &str,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut medians, mut floors) = (Vec::new(), Vec::new());
    for _ in 0..effort.rounds {
        let (mut runs, mut base) = (Vec::new(), Vec::new());
        for frame in frames.take(effort.singles) {
            let (_, b) = harness.run_floor(&frame, 1)?;
            let (verdict, t) = harness.run_repeat(&frame, 1)?;
            ensure!(verdict == expect, "{what}: verdict {verdict}, not {expect}");
            base.push(b.as_nanos() as f64);
            runs.push(t.as_nanos() as f64);
        }
        medians.push(Spread::of(&runs).median);
        floors.push(Spread::of(&base).median);
    }
    Ok((medians, floors))
}

fn singles_row(
    name: &str,
    verdict: u32,
    target: Option<f64>,
    (runs, floors): (Vec<f64>, Vec<f64>),
) -> [CostRow; 2] {
    let ratios: Vec<f64> = runs
        .iter()
        .zip(&floors)
        .map(|(r, f)| r / f.max(1.0))
        .collect();
    let over: Vec<f64> = runs.iter().zip(&floors).map(|(r, f)| r - f).collect();
    [
        floor_row("floor, one run per frame", &floors),
        CostRow {
            case: name.to_string(),
            verdict: verdict_name(verdict),
            ns: Spread::of(&runs),
            ratio: Spread::of(&ratios),
            over_floor: Spread::of(&over),
            target,
        },
    ]
}

/// Targets, as ratios to the floor, for section 1's rows.
const UNPROTECTED_TARGET: f64 = 1.2;
const KNOWN_SOURCE_TARGET: f64 = 2.0;
const OTHER_PATH_TARGET: f64 = 3.0;
const FULL_MAP_INSERT_TARGET: f64 = 5.0;

/// Section 1: the cost of each decision path.
pub fn per_packet(effort: Effort) -> Result<Vec<CostRow>> {
    let mut open = XdpHarness::new(&open_config(65536, 64))?;
    open.load_floor()?;
    let strict = XdpHarness::new(
        "[protect]\nports = [8080]\n[limits.per_source]\nnew_connections = \"1/m\"\nnew_connections_burst = 1\n[ban]\nafter_drops = 0\n",
    )?;

    // The default: SYNs are answered with cookies, and a segment that
    // belongs to no connection must carry one.
    let mut cookies = XdpHarness::new(&format!(
        "{}[syn_cookies]\nenabled = true\n",
        open_config(65536, 64)
    ))?;
    cookies.load_floor()?;

    // Allow and deny lists that hold entries, none of them the source's.
    let mut listed = XdpHarness::new(&format!(
        "{}[lists]\nallow = [\"198.19.0.0/24\"]\ndeny = [\"198.19.1.0/24\"]\n",
        open_config(65536, 64)
    ))?;
    listed.load_floor()?;
    // An inspected port (the agent's handshake inspection).
    let inspected = XdpHarness::new(&format!(
        "{}[handshake]\ninspect_ports = [{PORT}]\nmissing_origin = \"allow\"\n",
        open_config(65536, 64)
    ))?;

    let known = v4(10);
    open.run(&data(known)); // the first packet inserts the source
    let known_v6 = v6(3, 10);
    open.run(&data(known_v6));
    listed.run(&data(known));
    let over = v4(11);
    strict.run(&syn(over, PORT)); // the one connection the bucket holds
    let banned = v4(12);
    open.set_ban(
        &SourceKey::from(banned),
        Ban {
            since_ns: 0,
            until_ns: u64::MAX,
        },
    );
    let allowed = v4_in_allow_list();
    inspected.run(&syn(known, PORT));

    let mut deny_lists = Vec::new();
    for entries in [1u32, 1_000, 100_000] {
        let mut h = XdpHarness::new(&open_config(1024, 64))?;
        for i in 0..entries {
            h.deny(&ipnet::IpNet::new(v4(i * (131_072 / entries)), 32)?)?;
        }
        deny_lists.push((entries, h, v4((entries / 2) * (131_072 / entries))));
    }

    let case = |name: &str, harness, frame, expect, target| Case {
        name: name.to_string(),
        harness,
        frame,
        expect,
        target,
    };
    let mut cases = vec![
        case(
            "unprotected port",
            &open,
            syn(known, UNPROTECTED_PORT),
            XDP_PASS,
            Some(UNPROTECTED_TARGET),
        ),
        case(
            "known source under its limits",
            &open,
            data(known),
            XDP_PASS,
            Some(KNOWN_SOURCE_TARGET),
        ),
        case(
            "known source under its limits, IPv6",
            &open,
            data(known_v6),
            XDP_PASS,
            None,
        ),
        case(
            "known source under its limits, one VLAN tag (the full walk)",
            &open,
            Packet::data(known, PORT, 0)
                .with(|p| p.vlan_tpids = vec![wsguard_tests::packets::ETH_P_8021Q])
                .bytes(),
            XDP_PASS,
            None,
        ),
        case(
            "known source under its limits, allow and deny lists in use",
            &listed,
            data(known),
            XDP_PASS,
            None,
        ),
        case(
            "known source, new connection to an inspected port (syn_cookies off)",
            &inspected,
            syn(known, PORT),
            XDP_PASS,
            None,
        ),
        case(
            "source over its connection limit",
            &strict,
            syn(over, PORT),
            XDP_DROP,
            Some(OTHER_PATH_TARGET),
        ),
        case(
            "banned source",
            &open,
            syn(banned, PORT),
            XDP_DROP,
            Some(OTHER_PATH_TARGET),
        ),
        case(
            "allow-listed source",
            &listed,
            syn(allowed, PORT),
            XDP_PASS,
            Some(OTHER_PATH_TARGET),
        ),
        case(
            "segment of no connection with syn_cookies on (cookie check fails)",
            &cookies,
            data(v4(21)),
            XDP_DROP,
            None,
        ),
    ];
    for (entries, h, source) in &deny_lists {
        cases.push(Case {
            name: format!("denied CIDR, {entries} in the deny list"),
            harness: h,
            frame: syn(*source, PORT),
            expect: XDP_DROP,
            target: (*entries <= 1_000).then_some(OTHER_PATH_TARGET),
        });
    }
    let mut rows = measure(&open, &cases, effort)?;

    rows.extend(singles_row(
        "new source (first packet: insert)",
        XDP_PASS,
        Some(OTHER_PATH_TARGET),
        measure_singles(
            &open,
            &mut new_sources(1, 0),
            effort,
            XDP_PASS,
            "new source",
        )?,
    ));
    // A map the size of the singles, filled: every new source evicts one.
    let full_size = effort.singles.max(1024) as u32;
    let mut full = XdpHarness::new(&open_config(full_size, 128))?;
    full.load_floor()?;
    let sent = fill_sources(&full, 4)?;
    let mut evicting = new_sources(4, sent);
    rows.extend(singles_row(
        "new source into a full map (insert, evicting the oldest)",
        XDP_PASS,
        Some(FULL_MAP_INSERT_TARGET),
        measure_singles(&full, &mut evicting, effort, XDP_PASS, "full-map insert")?,
    ));
    // XDP_TX turns the frame into the SYN-ACK in place, and a repeated run
    // would judge that: one run per frame.
    let mut cookie_syns = std::iter::repeat(syn(v4(20), PORT));
    rows.extend(singles_row(
        "SYN with syn_cookies on: answered with a cookie (one run per frame)",
        XDP_TX,
        None,
        measure_singles(&cookies, &mut cookie_syns, effort, XDP_TX, "cookie SYN")?,
    ));
    Ok(rows)
}

/// An address inside the allow list of section 1's `listed` harness.
fn v4_in_allow_list() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 19, 0, 7))
}

/// Section 2: costs with `sources` tracked, and the memory that takes.
pub fn scale(sources: u32, effort: Effort) -> Result<ScaleRow> {
    // /128 tracking, so each IPv6 address is its own source.
    let mut h = XdpHarness::new(&open_config(sources, 128))?;
    h.load_floor()?;
    let sent = fill_sources(&h, 2)?;
    let tracked: Vec<IpAddr> = h
        .tracked_sources()
        .iter()
        .map(|k| IpAddr::from(*k))
        .collect();
    ensure!(
        tracked.len() as f64 >= 0.9 * f64::from(sources),
        "only {} of {sources} sources tracked",
        tracked.len()
    );
    let map_bytes = h.sources_map_bytes()?;

    let hot = tracked[tracked.len() / 2];
    let mut rows = measure(
        &h,
        &[Case {
            name: "known source, same frame repeated (cache-hot)".into(),
            harness: &h,
            frame: data(hot),
            expect: XDP_PASS,
            target: None,
        }],
        effort,
    )?;
    rows.remove(0);
    let mut rng = fastrand::Rng::with_seed(u64::from(sources));
    let mut known = std::iter::from_fn(|| Some(data(tracked[rng.usize(0..tracked.len())])));
    let [_, cold] = singles_row(
        "known source, a different one each packet",
        XDP_PASS,
        None,
        measure_singles(&h, &mut known, effort, XDP_PASS, "known source")?,
    );
    let mut fresh = new_sources(2, sent);
    let [floor, insert] = singles_row(
        "new source into a full map (insert, evicting the oldest)",
        XDP_PASS,
        Some(FULL_MAP_INSERT_TARGET),
        measure_singles(&h, &mut fresh, effort, XDP_PASS, "new source")?,
    );
    rows.extend([floor, cold, insert]);
    Ok(ScaleRow {
        sources,
        tracked: tracked.len() as u32,
        map_bytes,
        rows,
    })
}

/// Ban latency in the kernel: SYNs from one source over its connection limit,
/// one at a time; where the ban starts and when its drops begin.
pub fn ban_latency(effort: Effort) -> Result<BanLatency> {
    let after_drops = 5;
    // One harness for every source: the first ban also warms the ban map's
    // allocator, which a running agent has long done.
    let h = XdpHarness::new(&format!(
        "[protect]\nports = [{PORT}]\n[limits.per_source]\nnew_connections = \"1/m\"\nnew_connections_burst = 1\n\
         [ban]\nafter_drops = {after_drops}\nwindow = \"1m\"\nduration = \"1h\"\n"
    ))?;
    let mut crossing_ns = Vec::new();
    let mut through = 0;
    let sources = (effort.rounds as u32 * 3).max(10);
    for source in 0..sources {
        let frame = syn(v4(100 + source), PORT);
        let banned_before = h.packets(Reason::Banned);
        let mut crossed = false;
        for _ in 0..after_drops + 10 {
            let started = h.packets(Reason::BanStarted);
            let (verdict, took) = h.run_repeat(&frame, 1)?;
            if !crossed && h.packets(Reason::BanStarted) > started {
                crossed = true;
                crossing_ns.push(took.as_nanos() as f64);
            } else if crossed {
                if h.packets(Reason::Banned) > banned_before {
                    break;
                }
                through += u64::from(verdict == XDP_PASS);
            }
        }
        if !crossed || h.packets(Reason::Banned) == banned_before {
            bail!(
                "no ban, or no drop for it, within {} packets over the limit",
                after_drops + 10
            );
        }
    }
    // The first crossing paid for the allocator's first refill: left out.
    crossing_ns.remove(0);
    Ok(BanLatency {
        after_drops,
        sources,
        packets_through_after_crossing: through,
        crossing_packet_ns: Spread::of(&crossing_ns),
    })
}
