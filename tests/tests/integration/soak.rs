//! A bounded soak: long-lived WebSocket sessions, floods, bad and slow
//! handshakes at once, for `WSGUARD_SOAK_SECONDS` (20 by default). Every
//! legitimate session must stay intact; the agent's memory and its table of
//! pending handshakes must stay bounded.

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use tokio::io::AsyncWriteExt;
use wsguard_tests::{
    Setup,
    peers::{connect_from, connection_flood, echo, http_get, ws_connect_with},
};

const SECOND: Duration = Duration::from_secs(1);
const ORIGIN: &str = "https://app.example.com";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_traffic_keeps_sessions_intact_and_memory_bounded() -> Result<()> {
    let seconds: u64 = std::env::var("WSGUARD_SOAK_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let Setup { agent, server: _server, addr, lab } = Setup::start(&format!(
        "[protect]\nports = [8080]\n[limits.per_source]\nnew_connections = \"20/s\"\nnew_connections_burst = 20\n[ban]\nafter_drops = 50\nduration = \"2s\"\n\
         [handshake]\ninspect_ports = [8080]\nallowed_origins = [\"{ORIGIN}\"]\ndeadline = \"1s\"\nmax_pending = 64\nfailures_before_ban = 0\n"
    ))
    .await?;
    let start_rss = agent.rss_kb();
    let stop = Arc::new(AtomicBool::new(false));
    let until = Instant::now() + Duration::from_secs(seconds);

    // Ten long-lived sessions, each echoing every 100 ms.
    let echoes = Arc::new(AtomicU64::new(0));
    let mut sessions = Vec::new();
    for host in 2..12u8 {
        let mut ws = ws_connect_with(
            &lab.client,
            lab.client_v4(host).into(),
            addr,
            "/ws",
            Some(ORIGIN),
            2 * SECOND,
        )
        .await?;
        let (echoes, stop) = (echoes.clone(), stop.clone());
        sessions.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                echo(&mut ws, &format!("{host}:{n}"), 2 * SECOND).await?;
                echoes.fetch_add(1, Ordering::Relaxed);
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::Ok(n)
        }));
    }

    // Hostile traffic until the end: connection floods, hijack attempts, slowloris.
    let mut peak_rss = start_rss;
    let mut peak_pending = 0.0f64;
    let mut rounds = 0u32;
    while Instant::now() < until {
        rounds += 1;
        let flooder: IpAddr = lab.client_v4(20 + (rounds % 10) as u8).into();
        let flood = connection_flood(
            &lab.client,
            flooder,
            addr,
            Duration::from_millis(300),
            32,
            Duration::from_millis(150),
        );
        let hijacks = async {
            for _ in 0..5 {
                let _ = ws_connect_with(
                    &lab.client,
                    lab.client_v4(30).into(),
                    addr,
                    "/ws",
                    Some("https://evil.net"),
                    Duration::from_millis(500),
                )
                .await;
            }
        };
        let slowloris = async {
            let mut held = Vec::new();
            for _ in 0..10 {
                if let Ok(mut s) = connect_from(
                    &lab.client,
                    lab.client_v4(31).into(),
                    addr,
                    Duration::from_millis(300),
                )
                .await
                {
                    let _ = s.write_all(b"GET /ws HTTP/1.1\r\n").await;
                    held.push(s);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(held);
        };
        let (_, _, _) = tokio::join!(flood, hijacks, slowloris);
        peak_rss = peak_rss.max(agent.rss_kb());
        if let Ok((_, _, body)) = http_get(&lab.server, "/metrics").await {
            if let Some(v) = body
                .lines()
                .find_map(|l| l.strip_prefix("wsguard_pending_handshakes "))
                .and_then(|v| v.parse::<f64>().ok())
            {
                peak_pending = peak_pending.max(v);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut per_session = Vec::new();
    for s in sessions {
        per_session.push(s.await??);
    }
    let total = echoes.load(Ordering::Relaxed);
    println!(
        "soak: {seconds} s, {rounds} rounds of floods/hijacks/slowloris, {total} echoes over 10 sessions, RSS {start_rss} -> peak {peak_rss} kB, peak pending heads {peak_pending}"
    );
    ensure!(
        per_session.iter().all(|n| *n >= seconds * 3),
        "a session stalled: {per_session:?}"
    );
    ensure!(
        peak_pending <= 64.0,
        "pending heads went past max_pending: {peak_pending}"
    );
    ensure!(
        peak_rss < start_rss + 32 * 1024,
        "agent RSS grew from {start_rss} kB to {peak_rss} kB"
    );
    Ok(())
}
