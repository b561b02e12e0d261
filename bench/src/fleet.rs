//! Section 8: how fast a decision made on one host is enforced by another.
//! Two hosts (two labs, each with its agent) share a real `redis-server`;
//! `wsguard deny add` runs on host A once per decision, and each decision
//! is timed until host B's kernel map holds it. Once without load, once
//! while a spoofed SYN flood at full speed hits host B.

use std::{
    net::{IpAddr, Ipv4Addr},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use aya::maps::{LpmTrie, MapData};
use ipnet::IpNet;
use serde::Serialize;
use wsguard::kernel::{lpm_key, pin_dir};
use wsguard_common::{ListEntry, maps::names};
use wsguard_tests::{
    Agent, Lab, agent::binary, lab::send_frames, packets::Packet, redis::RedisServer,
};

use crate::{report::table::Table, stats::Spread};

#[derive(Clone, Debug, Serialize)]
pub struct PropagationRun {
    pub flood: bool,
    pub decisions: usize,
    /// From the CLI's start on host A to host B's map holding the entry.
    pub end_to_end_ms: Vec<f64>,
    /// From the CLI's exit on host A (its map written) to host B's.
    pub after_cli_ms: Vec<f64>,
    /// Flood frames sent at host B meanwhile.
    pub flood_frames: u64,
}

struct Host {
    agent: Agent,
    lab: Lab,
}

fn config(redis: &RedisServer, host: &str) -> String {
    format!(
        "[protect]\nports = [8080]\n[fleet]\nredis_url = \"{}\"\nhost_id = \"{host}\"\n",
        redis.url()
    )
}

async fn start(redis: &RedisServer, name: &str) -> Result<Host> {
    let lab = Lab::new()?;
    let agent = Agent::start(&lab, &config(redis, name))?;
    agent.wait_fleet_connected(Duration::from_secs(10)).await?;
    Ok(Host { agent, lab })
}

/// The `i`th decision's network (a /32 in 198.19.100.0 to 198.19.139.255).
fn decision_net(i: usize) -> IpNet {
    let addr = Ipv4Addr::new(198, 19, 100 + (i / 256) as u8, (i % 256) as u8);
    IpNet::from(IpAddr::V4(addr))
}

/// `decisions` deny entries decided on `a`, each timed until `b` holds it.
fn measure(a: &Host, b: &Host, first: usize, decisions: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let deny = MapData::from_pin(pin_dir(&b.agent.pin_path).join(names::DENY))?;
    let deny: LpmTrie<MapData, [u8; 16], ListEntry> =
        LpmTrie::try_from(aya::maps::Map::LpmTrie(deny))?;
    let (mut end_to_end, mut after_cli) = (Vec::new(), Vec::new());
    for i in first..first + decisions {
        let net = decision_net(i);
        let started = Instant::now();
        let out = Command::new(binary())
            .args([
                "deny",
                "add",
                &net.to_string(),
                "--ttl",
                "10m",
                "--pin-path",
            ])
            .arg(&a.agent.pin_path)
            .output()?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let decided = Instant::now();
        let key = lpm_key(&net);
        let deadline = decided + Duration::from_secs(5);
        while deny.get(&key, 0).is_err() {
            ensure!(Instant::now() < deadline, "{net} never reached host B");
            std::thread::sleep(Duration::from_micros(50));
        }
        let arrived = Instant::now();
        end_to_end.push((arrived - started).as_secs_f64() * 1e3);
        after_cli.push((arrived - decided).as_secs_f64() * 1e3);
    }
    Ok((end_to_end, after_cli))
}

pub async fn run(decisions: usize) -> Result<Vec<PropagationRun>> {
    let redis = RedisServer::start()?;
    let a = start(&redis, "host-a").await?;
    let b = start(&redis, "host-b").await?;
    let mut runs = Vec::new();
    for (round, flood) in [false, true].into_iter().enumerate() {
        let stop = Arc::new(AtomicBool::new(false));
        let sender = if flood {
            // Spoofed SYNs from 198.19.0.0/16 to host B, as fast as one
            // thread sends them, until the decisions are done (at most
            // 50 million frames).
            let server = IpAddr::V4(b.lab.server_v4());
            let mac = b.lab.server_mac()?;
            let frames: Vec<Vec<u8>> = (0..4096u32)
                .map(|i| {
                    let src = IpAddr::V4(Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8));
                    Packet::syn(src, 8080)
                        .with(|p| {
                            p.dst = Some(server);
                            p.dst_mac = Some(mac);
                            p.src_port = 1024 + (i % 60_000) as u16;
                        })
                        .bytes()
                })
                .collect();
            let stop = stop.clone();
            let mut n = 0usize;
            let stream = std::iter::from_fn(move || {
                n += 1;
                if n > 50_000_000 || (n.is_multiple_of(64) && stop.load(Ordering::Relaxed)) {
                    return None;
                }
                Some(frames[n % frames.len()].clone())
            });
            let (ns, interface) = (b.lab.client.path(), b.lab.client_if.clone());
            Some(tokio::task::spawn_blocking(move || {
                send_frames(ns, interface, stream)
            }))
        } else {
            None
        };
        let measured =
            tokio::task::block_in_place(|| measure(&a, &b, round * decisions, decisions));
        stop.store(true, Ordering::Relaxed);
        let flood_frames = match sender {
            Some(sender) => sender.await?.context("the flood")?,
            None => 0,
        };
        let (end_to_end_ms, after_cli_ms) = measured?;
        eprintln!(
            "bench: 8. fleet, {}: p50 {:.2} ms, p99 {:.2} ms after the CLI",
            if flood {
                "under a SYN flood"
            } else {
                "no flood"
            },
            Spread::of(&after_cli_ms).median,
            percentile(&after_cli_ms, 0.99)
        );
        runs.push(PropagationRun {
            flood,
            decisions,
            end_to_end_ms,
            after_cli_ms,
            flood_frames,
        });
    }
    Ok(runs)
}

fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

pub fn markdown(runs: &[PropagationRun]) -> String {
    let mut table = Table::new([
        "host B",
        "decisions",
        "after the CLI: p50 ms",
        "p99 ms",
        "max ms",
        "end to end (CLI included): p50 ms",
        "p99 ms",
        "flood frames at B",
    ]);
    for run in runs {
        table.row([
            if run.flood {
                "under a spoofed SYN flood at full speed".to_string()
            } else {
                "no flood".to_string()
            },
            run.decisions.to_string(),
            format!("{:.2}", percentile(&run.after_cli_ms, 0.5)),
            format!("{:.2}", percentile(&run.after_cli_ms, 0.99)),
            format!("{:.2}", percentile(&run.after_cli_ms, 1.0)),
            format!("{:.2}", percentile(&run.end_to_end_ms, 0.5)),
            format!("{:.2}", percentile(&run.end_to_end_ms, 0.99)),
            run.flood_frames.to_string(),
        ]);
    }
    format!(
        "\n## 8. A fleet: how fast a decision on one host holds on another\n\n\
         Two hosts (two labs, each with its agent and `[fleet]`) share one real `redis-server` \
         (Debian's, on a Unix socket). `wsguard deny add <a /32> --ttl 10m` runs on host A once per \
         decision, one after another, and each is timed until host B's kernel deny map holds it \
         (polled every 50 µs). \"End to end\" starts before the CLI process starts: the figure to \
         read. \"After the CLI\" starts when the bench sees the CLI process gone (its own map \
         written, its decision spooled and the agent nudged); the fleet often finishes before the \
         CLI process has fully exited, so it reads 0 then. The second run does the same while host B takes a spoofed SYN \
         flood at full speed from one sender thread (on the same two cores).\n\n{table}\n"
    )
}
