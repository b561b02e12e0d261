//! Sections 3 and 5: a real WebSocket echo client's latency and throughput
//! with no attack, under a SYN flood and under a byte flood, for each
//! contender in turn on the same lab; flood packets offered and dropped, and
//! the softirq CPU time they cost.
//!
//! The flood comes from our own sender rather than hping3: hping3's
//! `--rand-source` draws from the whole IPv4 space, and test traffic must
//! stay inside 198.18.0.0/15. Sources are 198.19.0.0/16; the server's
//! namespace routes that range back to the client namespace, which owns none
//! of it and drops the answers, so nothing leaves the lab.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use etherparse::PacketBuilder;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;
use wsguard_tests::{
    Lab,
    lab::send_frames,
    peers::{EchoServer, WsClient, ws_connect},
};

use crate::{
    contenders::{Contender, PORT},
    stats::p50_p99,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Attack {
    Baseline,
    /// SYNs from 256 sources at [`SYN_PPS`], each source far over its
    /// connection rate.
    SynFlood,
    /// 1000-byte TCP segments (outside any connection) and UDP datagrams to
    /// the port, half and half, from 2 sources at [`BYTE_PPS`], each source
    /// far over its byte rate.
    ByteFlood,
    /// The SYN flood as fast as one sender thread goes, with no client: the
    /// sender pays for the receiving side's work, so its rate and the CPU per
    /// packet show what each protection costs.
    SynFloodFullSpeed,
}

/// Paced flood rates, the same for every contender, low enough that the
/// costliest one still absorbs them on this kind of machine.
pub const SYN_PPS: u64 = 15_000;
pub const BYTE_PPS: u64 = 40_000;

impl Attack {
    pub const ALL: [Attack; 4] = [
        Attack::Baseline,
        Attack::SynFlood,
        Attack::ByteFlood,
        Attack::SynFloodFullSpeed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Attack::Baseline => "no attack",
            Attack::SynFlood => "SYN flood",
            Attack::ByteFlood => "byte flood (TCP + UDP)",
            Attack::SynFloodFullSpeed => "SYN flood at full speed",
        }
    }

    /// Packets per second the sender keeps to; `None`: as fast as it can.
    pub fn pps(self) -> Option<u64> {
        match self {
            Attack::SynFlood => Some(SYN_PPS),
            Attack::ByteFlood => Some(BYTE_PPS),
            Attack::Baseline | Attack::SynFloodFullSpeed => None,
        }
    }
}

/// One phase: one contender, one attack, a fixed time.
#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    pub contender: Contender,
    pub attack: Attack,
    pub round: usize,
    pub seconds: f64,
    /// Legitimate client: echo round trips, in microseconds.
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    pub messages_per_second: f64,
    /// Echoes that failed or timed out (each followed by a reconnect).
    pub client_errors: u64,
    pub flood_sent: u64,
    pub flood_dropped: u64,
    /// Softirq CPU time on all cores during the phase (tick-sampled).
    pub softirq_ms: f64,
    /// User, system, softirq and irq time on all cores: the sender's work
    /// included.
    pub busy_ms: f64,
}

impl Phase {
    pub fn flood_pps(&self) -> f64 {
        self.flood_sent as f64 / self.seconds
    }

    /// Softirq time per flood packet sent, in nanoseconds.
    pub fn softirq_ns_per_flood_packet(&self) -> f64 {
        self.softirq_ms * 1e6 / self.flood_sent.max(1) as f64
    }

    /// All CPU time per flood packet sent (sender included), in nanoseconds.
    pub fn busy_ns_per_flood_packet(&self) -> f64 {
        self.busy_ms * 1e6 / self.flood_sent.max(1) as f64
    }

    pub fn softirq_ns_per_drop(&self) -> f64 {
        if self.flood_dropped == 0 {
            return f64::NAN;
        }
        self.softirq_ms * 1e6 / self.flood_dropped as f64
    }
}

/// The lab, the echo server and the route that keeps flood answers inside.
pub struct FloodLab {
    // Serves for as long as the lab exists.
    _server: EchoServer,
    pub addr: SocketAddr,
    pub lab: Lab,
    server_mac: [u8; 6],
}

const FLOOD_RANGE: &str = "198.19.0.0/16";
/// Hard bound on any flood, whatever its duration.
const MAX_FLOOD_PACKETS: u64 = 50_000_000;

impl FloodLab {
    pub async fn new() -> Result<FloodLab> {
        let lab = Lab::new()?;
        let server = EchoServer::start(&lab.server, PORT).await?;
        let gateway = lab.client_v4(2).to_string();
        lab.server
            .ip(&["route", "add", FLOOD_RANGE, "via", &gateway])?;
        let server_mac = lab.server_mac()?;
        let addr = SocketAddr::new(lab.server_v4().into(), PORT);
        Ok(FloodLab {
            _server: server,
            addr,
            lab,
            server_mac,
        })
    }

    /// `block` (0–255) picks the flood's /24 in 198.19.0.0/16, so that no
    /// phase inherits per-source state (buckets, conntrack entries) from
    /// another.
    pub fn flood_frames(&self, attack: Attack, block: u8) -> Vec<Vec<u8>> {
        let server = self.lab.server_v4().octets();
        let (src_mac, dst_mac) = ([0x02, 0, 0, 0, 0x19, 0x01], self.server_mac);
        let mut frames = Vec::new();
        match attack {
            Attack::Baseline => {}
            Attack::SynFlood | Attack::SynFloodFullSpeed => {
                for i in 0..65_536u32 {
                    let source = [198, 19, block, (i % 256) as u8];
                    let port = 1024 + (i / 256) as u16;
                    let builder = PacketBuilder::ethernet2(src_mac, dst_mac)
                        .ipv4(source, server, 64)
                        .tcp(port, PORT, i.wrapping_mul(2_654_435_761), 64_240)
                        .syn();
                    let mut frame = Vec::with_capacity(builder.size(0));
                    builder.write(&mut frame, &[]).expect("SYN frame");
                    frames.push(frame);
                }
            }
            Attack::ByteFlood => {
                let payload = [0x61u8; 1000];
                for i in 0..8192u32 {
                    let source = [198, 19, block, 1 + (i % 4 / 2) as u8];
                    let port = 1024 + (i / 4) as u16;
                    let ip = PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(source, server, 64);
                    let mut frame = Vec::with_capacity(1100);
                    if i % 2 == 0 {
                        let b = ip.tcp(port, PORT, i, 64_240).ack(1).psh();
                        b.write(&mut frame, &payload).expect("TCP frame");
                    } else {
                        let b = ip.udp(port, PORT);
                        b.write(&mut frame, &payload).expect("UDP frame");
                    }
                    frames.push(frame);
                }
            }
        }
        frames
    }

    /// Runs `attack` for `duration` while the legitimate client echoes.
    pub async fn phase(
        &self,
        installed: &crate::contenders::Installed<'_>,
        attack: Attack,
        round: usize,
        block: u8,
        duration: Duration,
    ) -> Result<Phase> {
        let legit: IpAddr = self.lab.client_v4(2).into();
        let mut client = if attack == Attack::SynFloodFullSpeed {
            None
        } else {
            let ws = ws_connect(&self.lab.client, legit, self.addr, Duration::from_secs(3))
                .await
                .context("legitimate client before the phase")?;
            Some(ws)
        };
        let frames = self.flood_frames(attack, block);
        let dropped_before = installed.dropped()?;
        let cpu_before = Cpu::now()?;
        let started = Instant::now();
        let deadline = started + duration;

        let flood = (!frames.is_empty()).then(|| {
            let (netns, interface) = (self.lab.client.path(), self.lab.client_if.clone());
            let stop = Arc::new(AtomicBool::new(false));
            let sender_stop = stop.clone();
            let pps = attack.pps();
            let mut n = 0u64;
            let stream = std::iter::from_fn(move || {
                n += 1;
                // Paced in steps of 8 packets: bursts of dozens would make the
                // client's tail latency a measure of the burst, not the flood.
                if n.is_multiple_of(8) {
                    let now = Instant::now();
                    if n > MAX_FLOOD_PACKETS
                        || now >= deadline
                        || sender_stop.load(Ordering::Relaxed)
                    {
                        return None;
                    }
                    if let Some(pps) = pps {
                        let due = started + Duration::from_secs_f64(n as f64 / pps as f64);
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                    }
                }
                Some(frames[(n as usize) % frames.len()].clone())
            });
            (
                stop,
                tokio::task::spawn_blocking(move || send_frames(netns, interface, stream)),
            )
        });

        let mut rtts = Vec::new();
        let mut errors = 0u64;
        let payload = "x".repeat(64);
        match client.as_mut() {
            Some(ws) => {
                while Instant::now() < deadline {
                    let sent_at = Instant::now();
                    match echo_once(ws, &payload).await {
                        Ok(()) => rtts.push(sent_at.elapsed().as_secs_f64() * 1e6),
                        Err(_) => {
                            errors += 1;
                            let timeout = Duration::from_secs(1);
                            if let Ok(fresh) =
                                ws_connect(&self.lab.client, legit, self.addr, timeout).await
                            {
                                *ws = fresh;
                            }
                        }
                    }
                }
            }
            None => tokio::time::sleep_until(deadline.into()).await,
        }
        let seconds = started.elapsed().as_secs_f64();
        let flood_sent = match flood {
            Some((stop, sender)) => {
                stop.store(true, Ordering::Relaxed);
                sender.await??
            }
            None => 0,
        };
        let cpu = Cpu::now()?.since(&cpu_before);
        if let Some(mut ws) = client {
            let _ = ws.close(None).await;
        }
        let (p50, p99) = if rtts.is_empty() {
            (f64::NAN, f64::NAN)
        } else {
            p50_p99(&rtts)
        };
        Ok(Phase {
            contender: installed.contender,
            attack,
            round,
            seconds,
            rtt_p50_us: p50,
            rtt_p99_us: p99,
            messages_per_second: if attack == Attack::SynFloodFullSpeed {
                f64::NAN
            } else {
                rtts.len() as f64 / seconds
            },
            client_errors: errors,
            flood_sent,
            flood_dropped: installed.dropped()? - dropped_before,
            softirq_ms: cpu.softirq_ms,
            busy_ms: cpu.busy_ms,
        })
    }
}

pub async fn echo_once(ws: &mut WsClient, payload: &str) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(1), async {
        ws.send(Message::text(payload)).await?;
        while let Some(msg) = ws.next().await {
            if msg?.is_text() {
                return Ok(());
            }
        }
        anyhow::bail!("connection closed")
    })
    .await
    .context("echo timed out")?
}

/// CPU time on all cores so far, from the first line of /proc/stat.
pub struct Cpu {
    pub softirq_ms: f64,
    pub busy_ms: f64,
}

impl Cpu {
    pub fn now() -> Result<Cpu> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        // cpu user nice system idle iowait irq softirq …
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .context("empty /proc/stat")?
            .split_whitespace()
            .skip(1)
            .filter_map(|t| t.parse().ok())
            .collect();
        anyhow::ensure!(ticks.len() >= 7, "short cpu line in /proc/stat");
        // SAFETY: sysconf has no preconditions.
        let ms_per_tick = 1000.0 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6];
        Ok(Cpu {
            softirq_ms: ticks[6] as f64 * ms_per_tick,
            busy_ms: busy as f64 * ms_per_tick,
        })
    }

    pub fn since(&self, before: &Cpu) -> Cpu {
        Cpu {
            softirq_ms: self.softirq_ms - before.softirq_ms,
            busy_ms: self.busy_ms - before.busy_ms,
        }
    }
}

/// Every contender, every attack, `rounds` times, contenders in a rotating
/// order so drift on a shared machine does not favour one of them.
pub async fn run(rounds: usize, duration: Duration) -> Result<Vec<Phase>> {
    anyhow::ensure!(
        rounds * Contender::ALL.len() * Attack::ALL.len() <= 256,
        "{rounds} rounds need more than the 256 /24s of 198.19.0.0/16"
    );
    let lab = FloodLab::new().await?;
    let mut phases = Vec::new();
    for round in 0..rounds {
        for k in 0..Contender::ALL.len() {
            let contender = Contender::ALL[(k + round) % Contender::ALL.len()];
            let installed = contender.install(&lab.lab)?;
            for (a, attack) in Attack::ALL.into_iter().enumerate() {
                let block = ((round * Contender::ALL.len() + k) * Attack::ALL.len() + a) as u8;
                let phase = lab
                    .phase(&installed, attack, round, block, duration)
                    .await?;
                eprintln!(
                    "bench: round {round} {:<11} {:<24} p50 {:>7.0} µs p99 {:>7.0} µs {:>6.0} msg/s, flood {:>8} sent {:>8} dropped, softirq {:>5.0} ms",
                    contender.short(),
                    attack.name(),
                    phase.rtt_p50_us,
                    phase.rtt_p99_us,
                    phase.messages_per_second,
                    phase.flood_sent,
                    phase.flood_dropped,
                    phase.softirq_ms
                );
                phases.push(phase);
            }
        }
    }
    Ok(phases)
}
