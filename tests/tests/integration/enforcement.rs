//! What users see: the real agent attached to a test host's interface, a real
//! WebSocket echo server, real clients and real floods from other source
//! addresses (all inside 198.18.0.0/15 and 2001:db8::/32, in namespaces).

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use futures_util::SinkExt;
use wsguard::kernel::Maps;
use wsguard_common::Reason;
use wsguard_tests::{
    Agent, Lab, Setup,
    peers::{EchoServer, connect_from, connection_flood, connects, echo, ws_connect},
    wait_until,
};

const PORT: u16 = 8080;
const SECOND: Duration = Duration::from_secs(1);
/// How long a connect may take before its SYN is taken as dropped: below
/// the first SYN retransmission (1 s), so a retransmitted SYN never counts.
const DROPPED: Duration = Duration::from_millis(900);
/// Handshakes a flood keeps in flight at once.
const IN_FLIGHT: usize = 128;

fn target(lab: &Lab) -> SocketAddr {
    SocketAddr::new(lab.server_v4().into(), PORT)
}

/// Most a token bucket can grant over `elapsed`: the burst plus the refill,
/// plus one for the token that may be refilling at the edge.
fn bucket_bound(burst: f64, rate_per_s: f64, elapsed: Duration) -> u64 {
    (burst + rate_per_s * elapsed.as_secs_f64()).ceil() as u64 + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_is_cut_to_rate_and_burst_while_another_source_keeps_echoing()
-> Result<()> {
    // SYN cookies off: this counts SYNs; syn_cookies.rs has the same limit
    // charged at the cookie ACK.
    let Setup { agent, server, addr, lab } = Setup::start(
        "[protect]\nports = [8080]\n[limits.per_source]\nnew_connections = \"10/s\"\nnew_connections_burst = 20\nconcurrent_connections = 0\n[ban]\nafter_drops = 0\n[syn_cookies]\nenabled = false\n",
    )
    .await?;
    let mut legit = ws_connect(&lab.client, lab.client_v4(3).into(), addr, 2 * SECOND).await?;
    echo(&mut legit, "before", SECOND).await?;
    let accepted_before = server.accepted();

    let started = Instant::now();
    let flood = connection_flood(
        &lab.client,
        lab.client_v4(10).into(),
        addr,
        2 * SECOND,
        IN_FLIGHT,
        DROPPED,
    );
    // Echo round trips from the other source all through the flood.
    let echoes = async {
        let mut n = 0u32;
        let until = Instant::now() + 2 * SECOND;
        while Instant::now() < until {
            echo(&mut legit, &format!("during {n}"), SECOND).await?;
            n += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(n)
    };
    let (report, echoes) = tokio::join!(flood, echoes);
    let (report, echoes) = (report?, echoes?);
    let elapsed = started.elapsed();

    let most = bucket_bound(20.0, 10.0, elapsed);
    ensure!(
        report.attempts >= 4 * most,
        "the flood was not a flood: {report:?}"
    );
    // The server's own count is the truth about what got through.
    let accepted = wait_until("the server to accept what connected", SECOND, || {
        let n = server.accepted() - accepted_before;
        (n >= report.connected).then_some(n)
    })
    .await?;
    ensure!(
        accepted <= most,
        "the server accepted {accepted} flood connections in {elapsed:?}; the bucket allows {most}"
    );
    // Each attempt sent exactly one SYN (none lived to a retransmission), so
    // the kernel's drop count tells how many SYNs it let through.
    let dropped = agent.counter(Reason::ConnectionRate).packets;
    let passed = report.attempts - dropped;
    ensure!(
        (20..=most).contains(&passed),
        "{passed} SYNs passed ({report:?}); the burst is 20 and the bucket allows {most}"
    );
    ensure!(
        echoes >= 10,
        "only {echoes} echo round trips during the flood"
    );
    // The legitimate source still opens new connections.
    let mut fresh = ws_connect(&lab.client, lab.client_v4(3).into(), addr, SECOND).await?;
    echo(&mut fresh, "after", SECOND).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_flood_is_held_near_its_byte_rate_at_the_server() -> Result<()> {
    let Setup { agent, server, addr, lab } = Setup::start(
        "[protect]\nports = [8080]\n[limits.per_source]\nbytes = \"512KiB/s\"\nbytes_burst = \"512KiB\"\nconcurrent_connections = 0\n[ban]\nafter_drops = 0\n",
    )
    .await?;
    let mut flooder = ws_connect(&lab.client, lab.client_v4(10).into(), addr, SECOND).await?;
    let mut legit = ws_connect(&lab.client, lab.client_v4(3).into(), addr, SECOND).await?;

    let chunk = vec![0x5a_u8; 16 * 1024];
    let before = server.bytes_received();
    let started = Instant::now();
    let window = 3 * SECOND;
    let send = async {
        while started.elapsed() < window {
            // A send blocked by a full socket buffer is cut off at the window's end.
            let _ = tokio::time::timeout(
                window.saturating_sub(started.elapsed()),
                flooder.send(chunk.clone().into()),
            )
            .await;
        }
    };
    let echoes = async {
        let mut n = 0;
        while started.elapsed() < window {
            echo(&mut legit, "still here", SECOND).await?;
            n += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::Ok(n)
    };
    let ((), echoes) = tokio::join!(send, echoes);
    let received = server.bytes_received() - before;
    let elapsed = started.elapsed();

    // Frames carry headers too, so payload at the server stays under the
    // bucket's bound on frame bytes.
    let rate = 512.0 * 1024.0;
    let most = bucket_bound(rate, rate, elapsed);
    ensure!(
        received <= most,
        "{received} bytes reached the server in {elapsed:?}; the bucket allows {most}"
    );
    ensure!(
        received as f64 >= 0.4 * rate * elapsed.as_secs_f64(),
        "only {received} bytes passed in {elapsed:?}: held far below the rate"
    );
    ensure!(
        agent.counter(Reason::ByteRate).packets > 0,
        "no byte_rate drops counted"
    );
    ensure!(echoes? >= 10, "the other source's echoes stalled");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_listed_sources_are_never_limited_and_denied_cidrs_cannot_connect() -> Result<()> {
    let Setup { agent, server: _server, addr, lab } = Setup::start(
        "[protect]\nports = [8080]\n[limits.per_source]\nnew_connections = \"2/m\"\nnew_connections_burst = 2\nconcurrent_connections = 2\n[ban]\nafter_drops = 1\n\
         [lists]\nallow = [\"198.18.{id}.4/32\"]\ndeny = [\"198.18.{id}.32/27\"]\n",
    )
    .await?;
    // Far past every per-source limit, and all at once past the concurrency limit.
    let mut open = Vec::new();
    for i in 0..30 {
        let mut ws = ws_connect(&lab.client, lab.client_v4(4).into(), addr, SECOND).await?;
        echo(&mut ws, &format!("allowed {i}"), SECOND).await?;
        open.push(ws);
    }
    ensure!(
        agent.counter(Reason::AllowListed).packets >= 30 * 3,
        "allow-listed traffic not counted as such"
    );
    for reason in [
        Reason::ConnectionRate,
        Reason::Concurrency,
        Reason::BanStarted,
    ] {
        ensure!(
            agent.counter(reason).packets == 0,
            "an allow-listed source met {}",
            reason.name()
        );
    }
    let denied = connect_from(&lab.client, lab.client_v4(33).into(), addr, DROPPED).await;
    ensure!(denied.is_err(), "a denied source connected");
    agent.wait_counter(Reason::DenyList, 1, SECOND).await?;

    // SIGTERM detaches: the denied source connects once the agent is gone.
    let (status, stdout) = agent.stop()?;
    ensure!(status.success(), "the agent exited with {status}");
    ensure!(
        stdout.iter().any(|l| l.contains("detached")),
        "no detach report: {stdout:?}"
    );
    connect_from(&lab.client, lab.client_v4(33).into(), addr, SECOND).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_banned_source_is_dropped_and_recovers_when_the_ban_expires() -> Result<()> {
    let Setup { agent, server: _server, addr, lab } = Setup::start(
        "[protect]\nports = [8080]\n[limits.per_source]\nnew_connections = \"5/s\"\nnew_connections_burst = 5\nconcurrent_connections = 0\n\
         [ban]\nafter_drops = 10\nwindow = \"10s\"\nduration = \"2s\"\n",
    )
    .await?;
    let source: IpAddr = lab.client_v4(10).into();
    // Flood until the kernel bans the source (bounded: a second at most).
    let report = connection_flood(&lab.client, source, addr, SECOND, IN_FLIGHT, DROPPED).await?;
    agent.wait_counter(Reason::BanStarted, 1, SECOND).await?;
    let bans = agent.state()?.bans()?;
    ensure!(
        bans.len() == 1 && IpAddr::from(bans[0].0) == source,
        "bans: {bans:?} after {report:?}"
    );

    // While banned nothing from the source passes, not even a lone connect;
    // other sources are untouched.
    let banned_before = agent.counter(Reason::Banned).packets;
    ensure!(
        !connects(&lab.client, source, addr, DROPPED).await,
        "a banned source connected"
    );
    ensure!(agent.counter(Reason::Banned).packets > banned_before);
    let mut other = ws_connect(&lab.client, lab.client_v4(3).into(), addr, SECOND).await?;
    echo(&mut other, "unaffected", SECOND).await?;

    // After the ban's end the kernel lets the source back in by itself.
    let until = bans[0].1.until_ns;
    wait_until("the ban to run out", 5 * SECOND, || {
        (wsguard::kernel::monotonic_ns() > until).then_some(())
    })
    .await?;
    let mut back = ws_connect(&lab.client, source, addr, SECOND).await?;
    echo(&mut back, "recovered", SECOND).await?;
    ensure!(
        agent.state()?.bans()?.is_empty(),
        "the expired ban is still recorded"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrent_connection_limit_holds_and_frees_up_as_connections_close() -> Result<()> {
    // SYN cookies off: a refused connection fails at connect(); with
    // cookies, connect() succeeds and the server never sees the connection
    // (syn_cookies.rs).
    let Setup { agent, server: _server, addr, lab } = Setup::start(
        "[protect]\nports = [8080]\n[limits.per_source]\nnew_connections = \"100/s\"\nnew_connections_burst = 100\nconcurrent_connections = 3\n[ban]\nafter_drops = 0\n[syn_cookies]\nenabled = false\n",
    )
    .await?;
    let source: IpAddr = lab.client_v4(12).into();
    let open_count = || -> u64 {
        agent
            .state()
            .and_then(|s| s.connections())
            .unwrap_or_default()
            .iter()
            .filter(|(k, _)| IpAddr::from(*k) == source)
            .map(|(_, n)| *n)
            .sum()
    };
    let mut open = Vec::new();
    for i in 0..3 {
        let mut ws = ws_connect(&lab.client, source, addr, SECOND).await?;
        echo(&mut ws, &format!("conn {i}"), SECOND).await?;
        open.push(ws);
    }
    wait_until("3 open connections counted", SECOND, || {
        (open_count() == 3).then_some(())
    })
    .await?;
    ensure!(
        !connects(&lab.client, source, addr, DROPPED).await,
        "a 4th connection got through"
    );
    ensure!(agent.counter(Reason::Concurrency).packets >= 1);

    // Close one: the kernel sees the socket close and frees a slot.
    let mut closing = open.pop().unwrap();
    closing.close(None).await?;
    drop(closing);
    wait_until("the count to drop to 2", 2 * SECOND, || {
        (open_count() == 2).then_some(())
    })
    .await?;
    let mut again = ws_connect(&lab.client, source, addr, SECOND).await?;
    echo(&mut again, "slot reused", SECOND).await?;
    for ws in open.iter_mut() {
        echo(ws, "still open", SECOND).await?;
    }
    // All closed: the source's entry goes away entirely.
    drop(again);
    drop(open);
    // (The opened/closed counters are host-wide: the connection counter sees
    // every socket on the host, other tests' included, so only this source's
    // entry is checked.)
    wait_until("every connection to be counted closed", 2 * SECOND, || {
        (open_count() == 0).then_some(())
    })
    .await?;
    ensure!(agent.counter(Reason::ConnectionClosed).packets >= 4);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_sources_meet_the_same_flood_limits_and_lists() -> Result<()> {
    // Allowed: host ::4 of the second /64; denied: ::20 to ::3f of it.
    let Setup { agent, server, addr, lab } = Setup::start_v6(
        "[protect]\nports = [8080]\nipv6_prefix = 64\n[limits.per_source]\nnew_connections = \"10/s\"\nnew_connections_burst = 10\nconcurrent_connections = 0\n[ban]\nafter_drops = 0\n[syn_cookies]\nenabled = false\n\
         [lists]\nallow = [\"2001:db8:{id6}:1::4/128\"]\ndeny = [\"2001:db8:{id6}:1::20/123\"]\n",
    )
    .await?;
    let allowed = lab.client_v6_other_prefix(4);
    let denied = lab.client_v6_other_prefix(33);
    let mut legit = ws_connect(
        &lab.client,
        lab.client_v6_other_prefix(3).into(),
        addr,
        SECOND,
    )
    .await?;

    // A flood from one /64, spread over two of its addresses: one bucket.
    let accepted_before = server.accepted();
    let started = Instant::now();
    let flood = |host| {
        connection_flood(
            &lab.client,
            lab.client_v6(host).into(),
            addr,
            1500 * Duration::from_millis(1),
            IN_FLIGHT / 2,
            DROPPED,
        )
    };
    let (a, b) = tokio::join!(flood(10), flood(11));
    let (a, b) = (a?, b?);
    let connected = a.connected + b.connected;
    let most = bucket_bound(10.0, 10.0, started.elapsed());
    let accepted = wait_until("the server to accept what connected", SECOND, || {
        let n = server.accepted() - accepted_before;
        (n >= connected).then_some(n)
    })
    .await?;
    ensure!(
        accepted <= most,
        "{accepted} connections from one /64 got through; the bucket allows {most} ({a:?}, {b:?})"
    );
    let passed = a.attempts + b.attempts - agent.counter(Reason::ConnectionRate).packets;
    ensure!(
        (10..=most).contains(&passed),
        "{passed} SYNs passed ({a:?}, {b:?}); the burst is 10 and the bucket allows {most}"
    );
    // The other /64 has its own bucket and keeps echoing.
    echo(&mut legit, "other prefix", SECOND).await?;
    let mut fresh = ws_connect(
        &lab.client,
        lab.client_v6_other_prefix(5).into(),
        addr,
        SECOND,
    )
    .await?;
    echo(&mut fresh, "new from other prefix", SECOND).await?;

    for i in 0..30 {
        let mut ws = ws_connect(&lab.client, allowed.into(), addr, SECOND).await?;
        echo(&mut ws, &format!("allowed {i}"), SECOND).await?;
    }
    ensure!(agent.counter(Reason::AllowListed).packets > 0);
    ensure!(
        !connects(&lab.client, denied.into(), addr, DROPPED).await,
        "a denied IPv6 source connected"
    );
    agent.wait_counter(Reason::DenyList, 1, SECOND).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_xdp_mode_attaches_and_enforces() -> Result<()> {
    let lab = Lab::new()?;
    let _server = EchoServer::start(&lab.server, PORT).await?;
    let addr = target(&lab);
    for mode in ["auto", "native", "skb"] {
        // On a veth, SYN cookie replies from native XDP need an XDP program
        // on the peer (the agent warns): native mode runs without cookies.
        let cookies = mode != "native";
        let config = format!(
            "[protect]\nports = [8080]\n[lists]\ndeny = [\"{}\"]\n[syn_cookies]\nenabled = {cookies}\n",
            lab.client_v4(9)
        );
        // xdp_mode sits in [agent]: written by hand here rather than by Agent::start.
        let agent = Agent::start_with_agent_keys(&lab, &format!("xdp_mode = \"{mode}\""), &config)?;
        let reported = format!("xdp mode {mode}");
        wait_until("the summary to name the mode", SECOND, || {
            agent
                .stdout()
                .iter()
                .any(|l| l.contains(&reported))
                .then_some(())
        })
        .await?;
        ensure!(
            !connects(&lab.client, lab.client_v4(9).into(), addr, DROPPED).await,
            "{mode}: denied source connected"
        );
        let mut ws = ws_connect(&lab.client, lab.client_v4(2).into(), addr, SECOND).await?;
        echo(&mut ws, mode, SECOND).await?;
        let (status, _) = agent.stop()?;
        ensure!(status.success(), "{mode}: exit {status}");
    }
    Ok(())
}
