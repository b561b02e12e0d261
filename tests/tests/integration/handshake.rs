//! Handshake inspection as users see it: the real agent, a tokio-tungstenite
//! server that answers the upgrade at once, and real clients sending good,
//! hijacked, unauthenticated, split, slow and oversized handshakes.

use std::{net::IpAddr, time::Duration};
use wsguard::kernel::Maps;

use anyhow::{Result, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wsguard_common::Reason;
use wsguard_tests::{
    Setup,
    peers::{connect_from, connect_from_port, connects, echo, upgrade, ws_connect_with},
    wait_until,
};

const SECOND: Duration = Duration::from_secs(1);
const GOOD_ORIGIN: &str = "https://app.example.com";

fn body(extra: &str) -> String {
    format!(
        "[protect]\nports = [8080]\n[limits.per_source]\nnew_connections = \"100/s\"\nnew_connections_burst = 100\n[ban]\nafter_drops = 0\n\
         [handshake]\ninspect_ports = [8080]\nallowed_origins = [\"{GOOD_ORIGIN}\", \"https://*.example.com\"]\nallowed_paths = [\"/ws\", \"/live/*\"]\n\
         deadline = \"1s\"\n{extra}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_origin_upgrades_and_a_hijack_never_gets_an_echo() -> Result<()> {
    let Setup {
        agent,
        server,
        addr,
        lab,
    } = Setup::start(&body("")).await?;
    let client: IpAddr = lab.client_v4(3).into();
    let mut ws = ws_connect_with(
        &lab.client,
        client,
        addr,
        "/ws",
        Some(GOOD_ORIGIN),
        2 * SECOND,
    )
    .await?;
    echo(&mut ws, "hello", SECOND).await?;
    echo(&mut ws, "again", SECOND).await?;

    for (path, origin) in [
        ("/ws", Some("https://evil.net")),
        ("/ws", None),
        ("/ws", Some("https://evil-example.com")),
        ("/admin", Some(GOOD_ORIGIN)),
    ] {
        let closed_before = server.closed();
        let attempt = ws_connect_with(&lab.client, client, addr, path, origin, 2 * SECOND).await;
        if let Ok(mut ws) = attempt {
            ensure!(
                echo(&mut ws, "hijack", SECOND).await.is_err(),
                "{path} {origin:?}: an echo got through"
            );
        }
        // The server sees the connection close: the application stops serving it.
        wait_until(
            "the server to see the rejected connection close",
            2 * SECOND,
            || (server.closed() > closed_before).then_some(()),
        )
        .await?;
    }
    // The requests went to the agent, not to the server.
    ensure!(agent.counter(Reason::HandedToAgent).packets > 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_server_is_protected_the_same_way() -> Result<()> {
    use wsguard_tests::{Agent, Lab, peers::EchoServer};
    let lab = Lab::new()?;
    let server =
        EchoServer::start_with_delay(&lab.server, 8080, Duration::from_millis(300)).await?;
    let _agent = Agent::start(&lab, &body(""))?;
    let addr = std::net::SocketAddr::new(lab.server_v4().into(), 8080);
    let mut ws = ws_connect_with(
        &lab.client,
        lab.client_v4(3).into(),
        addr,
        "/live/prices",
        Some("https://eu.example.com"),
        3 * SECOND,
    )
    .await?;
    echo(&mut ws, "slow but fine", SECOND).await?;
    let closed_before = server.closed();
    if let Ok(mut ws) = ws_connect_with(
        &lab.client,
        lab.client_v4(3).into(),
        addr,
        "/ws",
        Some("https://evil.net"),
        3 * SECOND,
    )
    .await
    {
        ensure!(
            echo(&mut ws, "hijack", SECOND).await.is_err(),
            "an echo got through a slow server"
        );
    }
    wait_until("the server to see the close", 3 * SECOND, || {
        (server.closed() > closed_before).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_missing_expired_for_another_ip_or_tampered_are_rejected() -> Result<()> {
    use wsguard::handshake::ticket;
    let secret_file = tempfile::NamedTempFile::new()?;
    std::fs::write(
        secret_file.path(),
        "this is a shared secret of sufficient length 0123",
    )?;
    let secret = ticket::read_secret(secret_file.path())?;
    let Setup { agent: _agent, server: _server, addr, lab } = Setup::start(&body(&format!(
        "[handshake.ticket]\nrequired = true\nsecret_file = \"{}\"\nquery_param = \"ticket\"\nmax_age = \"60s\"\nbind_to_source_ip = true\n",
        secret_file.path().display()
    )))
    .await?;
    let client: IpAddr = lab.client_v4(4).into();
    let now = wsguard::agent_file::now_unix();
    let try_ticket_from = |client: IpAddr, t: Option<String>| {
        let path = t.map_or("/ws".to_string(), |t| format!("/ws?ticket={t}"));
        let ns = &lab.client;
        async move {
            match ws_connect_with(ns, client, addr, &path, Some(GOOD_ORIGIN), 2 * SECOND).await {
                Ok(mut ws) => echo(&mut ws, "x", SECOND).await.is_ok(),
                Err(_) => false,
            }
        }
    };
    let try_ticket = |t: Option<String>| try_ticket_from(client, t);
    let valid = ticket::mint(&secret, now + 30, Some(client));
    ensure!(
        try_ticket(Some(valid.clone())).await,
        "a valid ticket was refused"
    );
    ensure!(!try_ticket(None).await, "no ticket accepted");
    ensure!(
        !try_ticket(Some(ticket::mint(&secret, now - 5, Some(client)))).await,
        "an expired ticket accepted"
    );
    ensure!(
        !try_ticket(Some(ticket::mint(
            &secret,
            now + 30,
            Some(lab.client_v4(5).into())
        )))
        .await,
        "another IP's ticket accepted"
    );
    let mut tampered = valid.into_bytes();
    tampered[4] = if tampered[4] == b'A' { b'B' } else { b'A' };
    ensure!(
        !try_ticket(Some(String::from_utf8(tampered)?)).await,
        "a tampered ticket accepted"
    );
    // Version 2 tickets naming a user, from the repository's Python and
    // Node.js minters as an application would run them.
    // Each from a client of its own: the five rejections above earned the
    // first one a ban (`failures_before_ban`).
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tickets");
    for (host, program, script) in [
        (6, "python3", "mint_ticket.py"),
        (7, "node", "mint_ticket.js"),
    ] {
        let client: IpAddr = lab.client_v4(host).into();
        let out = std::process::Command::new(program)
            .arg(format!("{examples}/{script}"))
            .arg(secret_file.path())
            .args([
                "30",
                "--ip",
                &client.to_string(),
                "--user",
                "alice",
                "--class",
                "pro",
            ])
            .output()?;
        ensure!(
            out.status.success(),
            "{program} {script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let minted = String::from_utf8(out.stdout)?.trim().to_string();
        let opened = ticket::open(&secret, &minted).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        ensure!(
            opened.user == Some(ticket::User::new("alice", Some("pro")).unwrap()),
            "{script} minted {opened:?}"
        );
        ensure!(
            try_ticket_from(client, Some(minted.clone())).await,
            "a version 2 ticket from {script} was refused"
        );
        let mut tampered = minted.into_bytes();
        tampered[20] = if tampered[20] == b'A' { b'B' } else { b'A' };
        ensure!(
            !try_ticket_from(client, Some(String::from_utf8(tampered)?)).await,
            "a tampered version 2 ticket from {script} was accepted"
        );
    }
    Ok(())
}

/// Writes a request head in pieces with pauses, then reads the answer.
async fn raw_handshake(
    stream: &mut tokio::net::TcpStream,
    head: &[u8],
    pieces: usize,
    pause: Duration,
) -> Result<String> {
    stream.set_nodelay(true)?;
    let step = head.len().div_ceil(pieces);
    for chunk in head.chunks(step) {
        stream.write_all(chunk).await?;
        tokio::time::sleep(pause).await;
    }
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(3 * SECOND, stream.read(&mut answer)).await??;
    Ok(String::from_utf8_lossy(&answer[..n]).into_owned())
}

fn head(path: &str, origin: &str, pad: usize) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: chat.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: {origin}\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(pad)
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_split_over_segments_with_pauses_is_rebuilt_and_judged() -> Result<()> {
    let Setup {
        agent: _agent,
        server: _server,
        addr,
        lab,
    } = Setup::start(&body("")).await?;
    let mut good = connect_from(&lab.client, lab.client_v4(6).into(), addr, SECOND).await?;
    let answer = raw_handshake(
        &mut good,
        &head("/ws", GOOD_ORIGIN, 200),
        5,
        Duration::from_millis(60),
    )
    .await?;
    ensure!(
        answer.starts_with("HTTP/1.1 101"),
        "a good split head got: {answer:?}"
    );
    let mut bad = connect_from(&lab.client, lab.client_v4(6).into(), addr, SECOND).await?;
    let answer = raw_handshake(
        &mut bad,
        &head("/ws", "https://evil.net", 200),
        5,
        Duration::from_millis(60),
    )
    .await;
    ensure!(
        !answer.as_deref().unwrap_or("").contains("101"),
        "a bad split head got: {answer:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_cut_after_the_deadline() -> Result<()> {
    let Setup {
        agent,
        server,
        addr,
        lab,
    } = Setup::start(&body("")).await?;
    let mut slow = connect_from(&lab.client, lab.client_v4(7).into(), addr, SECOND).await?;
    slow.write_all(b"GET /ws HTTP/1.1\r\nHost: chat.example.com\r\n")
        .await?;
    let started = std::time::Instant::now();
    let closed_before = server.closed();
    // Keep trickling a header line; the deadline (1 s from the SYN) cuts it.
    wait_until("the server to drop the slow connection", 4 * SECOND, || {
        (server.closed() > closed_before).then_some(())
    })
    .await?;
    let waited = started.elapsed();
    ensure!(
        waited >= Duration::from_millis(800),
        "cut before the deadline: {waited:?}"
    );
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(2 * SECOND, slow.read(&mut buf)).await;
    ensure!(
        !matches!(read, Ok(Ok(n)) if n > 0),
        "the slow client still gets data"
    );
    let _ = agent;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_head_is_rejected_without_growing_the_agent() -> Result<()> {
    let Setup {
        agent,
        server: _server,
        addr,
        lab,
    } = Setup::start(&body(
        "max_request_bytes = \"2KiB\"\nfailures_before_ban = 0\n",
    ))
    .await?;
    let before = agent.rss_kb();
    for _ in 0..40 {
        let mut s = connect_from(&lab.client, lab.client_v4(8).into(), addr, SECOND).await?;
        let answer = raw_handshake(
            &mut s,
            &head("/ws", GOOD_ORIGIN, 6000),
            2,
            Duration::from_millis(5),
        )
        .await;
        ensure!(
            !answer.as_deref().unwrap_or("").contains("101"),
            "an oversized head was answered: {answer:?}"
        );
    }
    let after = agent.rss_kb();
    ensure!(
        after < before + 8 * 1024,
        "agent RSS grew from {before} kB to {after} kB"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_ban_a_source_and_allow_listed_sources_are_never_cut() -> Result<()> {
    let Setup {
        agent,
        server: _server,
        addr,
        lab,
    } = Setup::start(
        &format!(
            "{}failures_before_ban = 3\n[lists]\nallow = [\"198.18.{{id}}.9\"]\n",
            body("")
        )
        .replace(
            "[ban]\nafter_drops = 0\n",
            "[ban]\nafter_drops = 0\nduration = \"1h\"\n",
        ),
    )
    .await?;
    let offender: IpAddr = lab.client_v4(10).into();
    for _ in 0..3 {
        let _ = ws_connect_with(
            &lab.client,
            offender,
            addr,
            "/ws",
            Some("https://evil.net"),
            SECOND,
        )
        .await;
    }
    wait_until("the ban", 2 * SECOND, || {
        agent
            .state()
            .ok()?
            .bans()
            .ok()?
            .iter()
            .any(|(k, _)| std::net::IpAddr::from(*k) == offender)
            .then_some(())
    })
    .await?;
    ensure!(
        !connects(&lab.client, offender, addr, Duration::from_millis(900)).await,
        "banned source connected"
    );
    // Allow-listed: never inspected, never cut, even with a bad origin.
    let mut ws = ws_connect_with(
        &lab.client,
        lab.client_v4(9).into(),
        addr,
        "/admin",
        Some("https://evil.net"),
        2 * SECOND,
    )
    .await?;
    echo(&mut ws, "trusted", SECOND).await?;
    Ok(())
}

/// Legitimate clients under inspection: every handshake completes, its
/// request handed to the agent and put back into the server's socket. The
/// time it took is printed, not asserted (the benchmarks measure it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legitimate_handshakes_all_complete_through_the_agent() -> Result<()> {
    let Setup {
        agent,
        server: _server,
        addr,
        lab,
    } = Setup::start(&body("")).await?;
    let rounds = 40;
    let started = std::time::Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..rounds {
        let t = std::time::Instant::now();
        let mut ws = ws_connect_with(
            &lab.client,
            lab.client_v4(11).into(),
            addr,
            "/ws",
            Some(GOOD_ORIGIN),
            3 * SECOND,
        )
        .await?;
        echo(&mut ws, &format!("{i}"), SECOND).await?;
        slowest = slowest.max(t.elapsed());
    }
    let handed = agent.counter(Reason::HandedToAgent).packets;
    ensure!(
        handed >= rounds,
        "only {handed} segments went through the agent for {rounds} upgrades"
    );
    println!(
        "handshake inspection: {rounds} upgrades in {:?} (slowest {slowest:?})",
        started.elapsed(),
    );
    Ok(())
}

/// Clients reuse source ports: after a hijack attempt is cut, a new
/// connection from the same address and port is judged on its own and, with
/// an allowed Origin, served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_from_a_rejected_connections_port_is_judged_afresh() -> Result<()> {
    let Setup {
        agent: _agent,
        server: _server,
        addr,
        lab,
    } = Setup::start(&body("")).await?;
    let source = std::net::SocketAddr::new(lab.client_v4(12).into(), 45_678);
    let mut stream = connect_from_port(&lab.client, source, addr, 2 * SECOND).await?;
    stream
        .write_all(&head("/ws", "https://evil.net", 0))
        .await?;
    let mut answer = [0u8; 256];
    match tokio::time::timeout(3 * SECOND, stream.read(&mut answer)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => anyhow::bail!("the hijack got {n} bytes of answer"),
        Err(_) => anyhow::bail!("the hijack was not cut within 3 s"),
    }
    drop(stream);
    let stream = connect_from_port(&lab.client, source, addr, 2 * SECOND).await?;
    let mut ws = upgrade(stream, addr, "/ws", Some(GOOD_ORIGIN), 2 * SECOND).await?;
    echo(&mut ws, "same port, new connection", SECOND).await?;
    Ok(())
}

/// A source allow-listed while its handshake is in flight is not cut, even
/// with a foreign Origin: the allow list wins over inspection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_allow_listed_mid_handshake_is_not_cut() -> Result<()> {
    let Setup {
        agent,
        server: _server,
        addr,
        lab,
    } = Setup::start(&body("")).await?;
    let source = lab.client_v4(13);
    let stream = connect_from(&lab.client, source.into(), addr, 2 * SECOND).await?;
    let out = agent.cli(&["allow", "add", &source.to_string()]);
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut ws = upgrade(stream, addr, "/ws", Some("https://evil.net"), 2 * SECOND).await?;
    // A verdict takes about a millisecond (docs/benchmarks.md); a cut would
    // show within these 500 ms of echoes.
    for i in 0..10 {
        echo(&mut ws, &format!("still here {i}"), SECOND).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// With `keep_enforcing_on_exit`, a handshake that arrives while no agent
/// runs is held (the server reads nothing and answers nothing) and judged by
/// the next agent from the pinned ring buffer: served when allowed, cut
/// when not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_arriving_while_no_agent_runs_is_held_then_judged_by_the_next() -> Result<()> {
    use wsguard_tests::{Agent, Lab, peers::EchoServer};
    let lab = Lab::new()?;
    let _server = EchoServer::start(&lab.server, 8080).await?;
    let keys = "keep_enforcing_on_exit = true";
    let agent = Agent::start_with_agent_keys(&lab, keys, &body(""))?;
    let addr = std::net::SocketAddr::new(lab.server_v4().into(), 8080);
    let stderr = agent.stderr();
    let (status, stdout) = agent.stop_keeping_state()?;
    ensure!(
        status.success(),
        "the agent failed to stop: {stdout:?} {stderr:?}"
    );

    let mut good = connect_from(&lab.client, lab.client_v4(36).into(), addr, 2 * SECOND).await?;
    good.write_all(&head("/ws", GOOD_ORIGIN, 0)).await?;
    let mut bad = connect_from(&lab.client, lab.client_v4(37).into(), addr, 2 * SECOND).await?;
    bad.write_all(&head("/ws", "https://evil.net", 0)).await?;
    let mut answer = [0u8; 256];
    let early = tokio::time::timeout(Duration::from_millis(500), good.read(&mut answer)).await;
    ensure!(
        early.is_err(),
        "a handshake was answered while no agent ran: {:?}",
        early.map(|r| r.map(|n| String::from_utf8_lossy(&answer[..n]).into_owned()))
    );

    let _agent = Agent::start_with_agent_keys(&lab, keys, &body(""))?;
    let n = tokio::time::timeout(3 * SECOND, good.read(&mut answer)).await??;
    ensure!(
        answer[..n].starts_with(b"HTTP/1.1 101"),
        "the held legitimate handshake got {:?}",
        String::from_utf8_lossy(&answer[..n])
    );
    match tokio::time::timeout(3 * SECOND, bad.read(&mut answer)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => anyhow::bail!(
            "the held forbidden handshake got {:?}",
            String::from_utf8_lossy(&answer[..n])
        ),
        Err(_) => anyhow::bail!("the held forbidden handshake was not cut within 3 s"),
    }
    Ok(())
}
