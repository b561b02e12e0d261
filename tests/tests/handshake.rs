//! Handshake inspection as users see it: the real agent, a tokio-tungstenite
//! server that answers the upgrade at once, and real clients sending good,
//! hijacked, unauthenticated, split, slow and oversized handshakes.

use std::{net::IpAddr, time::Duration};

use anyhow::{Result, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wsguard_common::Reason;
use wsguard_tests::{
    Setup,
    peers::{connect_from, echo, ws_connect_with},
    wait_until,
};

const SECOND: Duration = Duration::from_secs(1);
const GOOD_ORIGIN: &str = "https://app.example.com";

fn body(extra: &str) -> String {
    format!(
        "[protect]\nports = [8080]\n[limits.per_source]\nnew_connections = \"100/s\"\nnew_connections_burst = 100\n[ban]\nafter_drops = 0\n\
         [handshake]\ninspect_ports = [8080]\nallowed_origins = [\"{GOOD_ORIGIN}\", \"https://*.example.com\"]\nallowed_paths = [\"/ws\", \"/live/*\"]\n\
         deadline = \"1s\"\nverdict_timeout = \"2s\"\n{extra}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_origin_upgrades_and_a_hijack_never_gets_an_echo() -> Result<()> {
    let Setup { agent, server, addr, lab } = Setup::start(&body("")).await?;
    let client: IpAddr = lab.client_v4(3).into();
    let mut ws = ws_connect_with(&lab.client, client, addr, "/ws", Some(GOOD_ORIGIN), 2 * SECOND).await?;
    echo(&mut ws, "hello", SECOND).await?;
    echo(&mut ws, "again", SECOND).await?;

    for (path, origin) in [
        ("/ws", Some("https://evil.net")),
        ("/ws", None),
        ("/ws", Some("https://evil-example.com")),
        ("/admin", Some(GOOD_ORIGIN)),
    ] {
        let closed_before = server.stats.connections_closed.load(std::sync::atomic::Ordering::Relaxed);
        let attempt = ws_connect_with(&lab.client, client, addr, path, origin, 2 * SECOND).await;
        if let Ok(mut ws) = attempt {
            ensure!(echo(&mut ws, "hijack", SECOND).await.is_err(), "{path} {origin:?}: an echo got through");
        }
        // The server sees the connection close: the application stops serving it.
        wait_until("the server to see the rejected connection close", 2 * SECOND, || {
            (server.stats.connections_closed.load(std::sync::atomic::Ordering::Relaxed) > closed_before).then_some(())
        })
        .await?;
    }
    ensure!(agent.counter(Reason::ResponseHeld).packets >= 1, "no answer was held back");
    Ok(())
}
