//! Section 4: enforcement latency as a client sees it, with the real agent.
//!
//! - Rejected handshake: from writing a hijack attempt (a foreign Origin) on
//!   a fresh connection to the connection being reset, which happens when the
//!   agent has judged the request, marked the flow rejected in the kernel and
//!   destroyed the server's socket (SOCK_DESTROY sends the reset; the egress
//!   program lets nothing else of that flow out).
//! - Ban for repeated rejections: from the last rejected handshake's reset to
//!   the source's ban being in the kernel's map (from then on XDP drops it).

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wsguard::kernel::Maps;
use wsguard_tests::{Lab, Setup, peers::connect_from};

use crate::stats::p50_p99;

const SECOND: Duration = Duration::from_secs(1);

#[derive(Debug, Serialize)]
pub struct Latency {
    pub samples_ms: Vec<f64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Rejected attempts that got an answer from the server (should be 0).
    pub answered: u64,
}

impl Latency {
    fn of(samples_ms: Vec<f64>, answered: u64) -> Latency {
        let (p50_ms, p99_ms) = p50_p99(&samples_ms);
        Latency {
            samples_ms,
            p50_ms,
            p99_ms,
            answered,
        }
    }
}

fn config(failures_before_ban: u32) -> String {
    format!(
        "[protect]\nports = [8080]\n[limits.per_source]\nnew_connections = \"100000/s\"\nnew_connections_burst = 100000\n\
         [ban]\nafter_drops = 0\nduration = \"1h\"\n\
         [handshake]\ninspect_ports = [8080]\nallowed_origins = [\"https://app.example.com\"]\n\
         deadline = \"2s\"\nfailures_before_ban = {failures_before_ban}\n"
    )
}

fn hijack_request() -> &'static [u8] {
    b"GET /ws HTTP/1.1\r\nHost: chat.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
      Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
      Origin: https://evil.example.net\r\nCookie: session=stolen\r\n\r\n"
}

/// One hijack attempt from `source`: milliseconds from the request to the
/// reset, and whether any answer came through first.
async fn rejected_once(
    lab: &Lab,
    source: IpAddr,
    server: std::net::SocketAddr,
) -> Result<(f64, bool)> {
    let mut stream = connect_from(&lab.client, source, server, 2 * SECOND).await?;
    stream.set_nodelay(true)?;
    let started = Instant::now();
    stream.write_all(hijack_request()).await?;
    let mut answered = false;
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(3 * SECOND, stream.read(&mut buf)).await {
            Err(_) => bail!("from {source}: no reset within 3 s"),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => answered = true,
        }
    }
    Ok((started.elapsed().as_secs_f64() * 1e3, answered))
}

/// `count` hijack attempts, `parallel` at a time, from the lab's client
/// addresses in turn.
pub async fn rejected_handshakes(count: usize, parallel: usize) -> Result<Latency> {
    let setup = Setup::start(&config(0)).await?;
    let (lab, addr) = (&setup.lab, setup.addr);
    let mut samples = Vec::with_capacity(count);
    let mut answered = 0;
    let mut next = 0usize;
    while next < count {
        let batch: Vec<_> = (next..(next + parallel).min(count))
            .map(|i| {
                let source: IpAddr = lab
                    .client_v4(2 + (i % Lab::CLIENT_HOSTS as usize) as u8)
                    .into();
                rejected_once(lab, source, addr)
            })
            .collect();
        next += batch.len();
        for result in futures_util::future::join_all(batch).await {
            let (ms, got_answer) = result?;
            samples.push(ms);
            answered += u64::from(got_answer);
        }
    }
    Ok(Latency::of(samples, answered))
}

/// For `sources` sources: three rejected handshakes each, then the time
/// until the agent's ban is in the kernel.
pub async fn ban_after_rejections(sources: u8) -> Result<Latency> {
    let failures = 3;
    let setup = Setup::start(&config(failures)).await?;
    let (lab, addr, agent) = (&setup.lab, setup.addr, &setup.agent);
    let mut samples = Vec::new();
    let mut answered = 0;
    for host in 2..2 + sources.min(Lab::CLIENT_HOSTS) {
        let source: IpAddr = lab.client_v4(host).into();
        for _ in 0..failures {
            answered += u64::from(rejected_once(lab, source, addr).await?.1);
        }
        let reset_at = Instant::now();
        let state = agent.state()?;
        // Polled every millisecond: the figure is within 1 ms of the truth.
        loop {
            let bans = state.bans()?;
            if bans.iter().any(|(k, _)| IpAddr::from(*k) == source) {
                break;
            }
            if reset_at.elapsed() > 3 * SECOND {
                bail!("{source} was not banned within 3 s of its last rejected handshake");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        samples.push(reset_at.elapsed().as_secs_f64() * 1e3);
    }
    Ok(Latency::of(samples, answered))
}

/// Legitimate handshakes through the agent: milliseconds from writing the
/// request to reading the server's `101`.
#[derive(Debug, Serialize)]
pub struct Accepted {
    pub latency: Latency,
    /// Handshakes that took 200 ms or more (what a TCP retransmission costs).
    pub slow: u64,
    /// Handshakes started per second, as reached.
    pub rate: f64,
    /// Incomplete heads held open meanwhile.
    pub held: usize,
}

fn accepted_config(max_pending: usize) -> String {
    format!(
        "[protect]\nports = [8080]\n[limits.per_source]\nnew_connections = \"100000/s\"\nnew_connections_burst = 100000\n\
         concurrent_connections = 0\nbytes = \"1GiB/s\"\nbytes_burst = \"4GiB\"\n[limits.global]\nnew_connections = \"1000000/s\"\n\
         [ban]\nafter_drops = 0\n\
         [handshake]\ninspect_ports = [8080]\nallowed_origins = [\"https://app.example.com\"]\n\
         deadline = \"60s\"\nmax_pending = {max_pending}\n"
    )
}

fn valid_request() -> &'static [u8] {
    b"GET /ws HTTP/1.1\r\nHost: chat.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
      Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
      Origin: https://app.example.com\r\n\r\n"
}

/// One legitimate handshake from `source`: milliseconds to the `101`.
async fn accepted_once(lab: &Lab, source: IpAddr, server: std::net::SocketAddr) -> Result<f64> {
    let mut stream = connect_from(&lab.client, source, server, 2 * SECOND).await?;
    stream.set_nodelay(true)?;
    let started = Instant::now();
    stream.write_all(valid_request()).await?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 512];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(3 * SECOND, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
            _ => bail!("from {source}: no answer to a valid upgrade within 3 s"),
        }
    }
    if !answer.starts_with(b"HTTP/1.1 101") {
        bail!(
            "from {source}: a valid upgrade got {:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    Ok(started.elapsed().as_secs_f64() * 1e3)
}

fn accepted_of(samples: Vec<f64>, rate: f64, held: usize) -> Accepted {
    let slow = samples.iter().filter(|ms| **ms >= 200.0).count() as u64;
    Accepted {
        latency: Latency::of(samples, 0),
        slow,
        rate,
        held,
    }
}

/// Legitimate handshakes started at `rate` per second for `duration`, from
/// the lab's client addresses in turn.
pub async fn accepted_at_rate(rate: u32, duration: Duration) -> Result<Accepted> {
    let setup = Setup::start(&accepted_config(4096)).await?;
    let (lab, addr) = (std::sync::Arc::new(setup.lab), setup.addr);
    let ticks = (duration.as_millis() / 10) as u32;
    let per_tick = (rate / 100).max(1);
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for t in 0..ticks {
        tick.tick().await;
        for i in 0..per_tick {
            let n = t * per_tick + i;
            let source: IpAddr = lab
                .client_v4(2 + (n % Lab::CLIENT_HOSTS as u32) as u8)
                .into();
            let lab = lab.clone();
            tasks.push(tokio::spawn(async move {
                accepted_once(&lab, source, addr).await
            }));
        }
    }
    let launched = tasks.len() as f64 / started.elapsed().as_secs_f64();
    let mut samples = Vec::with_capacity(tasks.len());
    for task in tasks {
        samples.push(task.await??);
    }
    drop(setup.agent);
    drop(setup.server);
    Ok(accepted_of(samples, launched, 0))
}

/// `count` legitimate handshakes, one at a time, while `held` connections
/// keep an incomplete head open (as many as `max_pending` allows, less the
/// room the measured handshakes need).
pub async fn accepted_while_pending(held: usize, count: usize) -> Result<Accepted> {
    let setup = Setup::start(&accepted_config(held + 8)).await?;
    let (lab, addr) = (&setup.lab, setup.addr);
    let mut open = Vec::with_capacity(held);
    for i in 0..held {
        let source: IpAddr = lab
            .client_v4(2 + (i % Lab::CLIENT_HOSTS as usize) as u8)
            .into();
        let mut stream = connect_from(&lab.client, source, addr, 2 * SECOND).await?;
        stream
            .write_all(b"GET /ws HTTP/1.1\r\nHost: chat.example.com\r\n")
            .await?;
        open.push(stream);
    }
    // Every held head has reached the agent before the clock starts.
    let state = setup.agent.state()?;
    let until = Instant::now() + 10 * SECOND;
    while state
        .counter(wsguard_common::Reason::HandedToAgent)?
        .packets
        < held as u64
    {
        if Instant::now() > until {
            bail!("the held heads did not all reach the agent");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        let source: IpAddr = lab
            .client_v4(2 + (i % Lab::CLIENT_HOSTS as usize) as u8)
            .into();
        samples.push(accepted_once(lab, source, addr).await?);
    }
    drop(open);
    Ok(accepted_of(samples, 0.0, held))
}
