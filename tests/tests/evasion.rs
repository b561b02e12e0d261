//! Trying to get around handshake inspection, as an attacker would, against
//! the real agent and a real tokio-tungstenite server: requests the policy
//! forbids, written so that a lenient reader could see something else, must
//! never get `101 Switching Protocols`; the legitimate variant (the same
//! client, an allowed Origin) is served. Spoofed SYNs never earn a ban.
//! docs/reliability.md lists each class with its test.

use std::time::Duration;

use anyhow::{Result, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wsguard_tests::{
    Setup,
    lab::send_frames,
    packets::Packet,
    peers::{connect_from, echo, upgrade},
    wait_until,
};

const SECOND: Duration = Duration::from_secs(1);
const GOOD_ORIGIN: &str = "https://app.example.com";
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn body(extra: &str) -> String {
    format!(
        "[protect]\nports = [8080]\n[limits.per_source]\nnew_connections = \"200/s\"\nnew_connections_burst = 200\n[ban]\nafter_drops = 0\n\
         [handshake]\ninspect_ports = [8080]\nallowed_origins = [\"{GOOD_ORIGIN}\"]\nallowed_paths = [\"/ws\", \"/live/*\"]\n\
         deadline = \"1s\"\nfailures_before_ban = 0\n{extra}"
    )
}

/// Sends `request` on a fresh connection from client host `host` and
/// returns everything the server answered before the connection ended (or
/// 2 s passed).
async fn answer_to(setup: &Setup, host: u8, request: &[u8]) -> Result<String> {
    let mut stream = connect_from(
        &setup.lab.client,
        setup.lab.client_v4(host).into(),
        setup.addr,
        2 * SECOND,
    )
    .await?;
    stream.write_all(request).await?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let until = tokio::time::Instant::now() + 2 * SECOND;
    loop {
        match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
        }
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

fn upgrade_head(target: &str, headers: &str) -> Vec<u8> {
    format!(
        "GET {target} HTTP/1.1\r\nHost: chat.example.com\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{headers}\r\n"
    )
    .into_bytes()
}

/// Each forbidden request, and the same client's legitimate variant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_two_parsers_read_differently_never_get_101() -> Result<()> {
    let setup = Setup::start(&body("")).await?;
    let evil = "Origin: https://evil.net\r\n";
    let good = format!("Origin: {GOOD_ORIGIN}\r\n");
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        (
            "two Connection headers, keep-alive first",
            upgrade_head(
                "/ws",
                &format!("Connection: keep-alive\r\nConnection: Upgrade\r\n{evil}"),
            ),
            upgrade_head("/ws", &format!("Connection: keep-alive, Upgrade\r\n{good}")),
        ),
        (
            "Connection split by a space",
            upgrade_head("/ws", &format!("Connection: keep-alive Upgrade\r\n{evil}")),
            upgrade_head("/ws", &format!("Connection: keep-alive,Upgrade\r\n{good}")),
        ),
        (
            "two Origin headers, the forbidden one first",
            upgrade_head("/ws", &format!("Connection: Upgrade\r\n{evil}{good}")),
            upgrade_head("/ws", &format!("Connection: Upgrade\r\n{good}")),
        ),
        (
            "two Origin headers, the forbidden one last",
            upgrade_head("/ws", &format!("Connection: Upgrade\r\n{good}{evil}")),
            upgrade_head("/ws", &format!("Connection: Upgrade\r\n{good}")),
        ),
        (
            "dot segments out of an allowed prefix",
            upgrade_head("/live/../admin", &format!("Connection: Upgrade\r\n{good}")),
            upgrade_head("/live/feed", &format!("Connection: Upgrade\r\n{good}")),
        ),
        (
            "encoded dot segments",
            upgrade_head(
                "/live/%2e%2e/admin",
                &format!("Connection: Upgrade\r\n{good}"),
            ),
            upgrade_head("/live/%61dmin", &format!("Connection: Upgrade\r\n{good}")),
        ),
        (
            "absolute-form target naming another host",
            upgrade_head(
                "http://evil.net/ws",
                &format!("Connection: Upgrade\r\n{good}"),
            ),
            upgrade_head(
                "http://chat.example.com/ws",
                &format!("Connection: Upgrade\r\n{good}"),
            ),
        ),
        (
            "a folded Origin line",
            upgrade_head(
                "/ws",
                &format!("Connection: Upgrade\r\nOrigin: https://evil.net\r\n {GOOD_ORIGIN}\r\n"),
            ),
            upgrade_head("/ws", &format!("Connection: Upgrade\r\n{good}")),
        ),
        (
            "a plain keep-alive GET, then the forbidden upgrade",
            [
                b"GET /ws HTTP/1.1\r\nHost: chat.example.com\r\n\r\n".to_vec(),
                upgrade_head("/ws", &format!("Connection: Upgrade\r\n{evil}")),
            ]
            .concat(),
            upgrade_head("/ws", &format!("Connection: Upgrade\r\n{good}")),
        ),
    ];
    for (i, (name, forbidden, legitimate)) in cases.iter().enumerate() {
        let host = 20 + i as u8;
        let answer = answer_to(&setup, host, forbidden).await?;
        ensure!(
            !answer.contains("101"),
            "{name}: the forbidden request was upgraded: {answer:?}"
        );
        let answer = answer_to(&setup, host, legitimate).await?;
        ensure!(
            answer.starts_with("HTTP/1.1 101"),
            "{name}: the legitimate variant was not served: {answer:?}"
        );
    }
    Ok(())
}

/// A ticket is good for one connection: the same ticket again (from the
/// same address, as from anyone behind the same NAT) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_use_ticket_opens_one_connection_only() -> Result<()> {
    use wsguard::handshake::ticket;
    let secret_file = tempfile::NamedTempFile::new()?;
    std::fs::write(secret_file.path(), "s".repeat(48))?;
    let setup = Setup::start(&body(&format!(
        "[handshake.ticket]\nrequired = true\nsecret_file = \"{}\"\nbind_to_source_ip = false\n",
        secret_file.path().display()
    )))
    .await?;
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 30;
    let t = ticket::mint(&"s".repeat(48).into_bytes(), expires, None);
    let path = format!("/ws?ticket={t}");
    let stream = connect_from(
        &setup.lab.client,
        setup.lab.client_v4(40).into(),
        setup.addr,
        2 * SECOND,
    )
    .await?;
    let first = upgrade(stream, setup.addr, &path, Some(GOOD_ORIGIN), 2 * SECOND).await;
    let mut ws = first
        .map_err(|e| anyhow::anyhow!("first use: {e:#}; agent: {:?}", setup.agent.stdout()))?;
    echo(&mut ws, "first use", SECOND)
        .await
        .map_err(|e| anyhow::anyhow!("first echo: {e:#}; agent: {:?}", setup.agent.stdout()))?;
    let again = answer_to(
        &setup,
        41,
        &upgrade_head(
            &path,
            &format!("Connection: Upgrade\r\nOrigin: {GOOD_ORIGIN}\r\n"),
        ),
    )
    .await?;
    ensure!(
        !again.contains("101"),
        "a replayed ticket was served: {again:?}"
    );
    wait_until("a ticket_replayed event", 2 * SECOND, || {
        setup
            .agent
            .stdout()
            .iter()
            .any(|l| l.contains("\"reason\":\"ticket_replayed\""))
            .then_some(())
    })
    .await?;
    // A fresh ticket still works.
    let fresh = ticket::mint(&"s".repeat(48).into_bytes(), expires, None);
    let stream = connect_from(
        &setup.lab.client,
        setup.lab.client_v4(40).into(),
        setup.addr,
        2 * SECOND,
    )
    .await?;
    let mut ws = upgrade(
        stream,
        setup.addr,
        &format!("/ws?ticket={fresh}"),
        Some(GOOD_ORIGIN),
        2 * SECOND,
    )
    .await?;
    echo(&mut ws, "fresh ticket", SECOND).await?;
    Ok(())
}

/// SYNs from a spoofed address never complete the TCP handshake, so they
/// are never judged, cut or counted towards a ban: nobody can get a victim
/// banned by spoofing its address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_syns_never_earn_their_address_a_ban() -> Result<()> {
    let setup =
        Setup::start(&body("").replace("failures_before_ban = 0", "failures_before_ban = 2"))
            .await?;
    let victim = setup.lab.client_v4(30);
    let mac = setup.lab.server_mac()?;
    let server = setup.lab.server_v4();
    let frames: Vec<Vec<u8>> = (0..20)
        .map(|i| {
            Packet::syn(victim.into(), 8080)
                .with(|p| {
                    p.dst_mac = Some(mac);
                    p.dst = Some(server.into());
                    p.src_port = 41000 + i;
                })
                .bytes()
        })
        .collect();
    let link = setup.lab.client_if.clone();
    let sent = send_frames(setup.lab.client.path(), link, frames.into_iter())?;
    ensure!(sent == 20, "sent {sent} SYNs");
    wait_until("the SYNs to reach XDP", 2 * SECOND, || {
        (setup.agent.counter(wsguard_common::Reason::Passed).packets >= 20).then_some(())
    })
    .await?;
    // Two deadlines later: nothing was cut, and the victim is not banned.
    tokio::time::sleep(2 * SECOND + SECOND / 2).await;
    let stdout = setup.agent.stdout().join("\n");
    ensure!(
        !stdout.contains("deadline_cut"),
        "a spoofed SYN was cut: {stdout}"
    );
    ensure!(
        setup.agent.state()?.bans()?.is_empty(),
        "the spoofed address was banned"
    );
    // The real client behind that address is served.
    let stream = connect_from(&setup.lab.client, victim.into(), setup.addr, 2 * SECOND).await?;
    let mut ws = upgrade(stream, setup.addr, "/ws", Some(GOOD_ORIGIN), 2 * SECOND).await?;
    echo(&mut ws, "not banned", SECOND).await?;
    Ok(())
}
