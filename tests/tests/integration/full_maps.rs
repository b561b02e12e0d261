//! A SYN flood on the wire from far more spoofed sources than
//! `tracking.max_sources`, with a `kill -9` of a fail-closed agent in the
//! middle: the kernel keeps enforcing, long-lived clients keep working,
//! allow-listed sources are untouched, and bans are neither evicted by the
//! flood nor lost across the restart.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Result, ensure};
use wsguard::kernel::Maps;
use wsguard_common::Reason;
use wsguard_tests::{
    Agent, Lab,
    agent::remove_state,
    lab::send_frames,
    packets::Packet,
    peers::{EchoServer, connect_from, connection_flood, connects, echo, ws_connect},
    wait_until,
};

const SECOND: Duration = Duration::from_secs(1);
const DROPPED: Duration = Duration::from_millis(900);
const MAX_SOURCES: usize = 1024;

/// `n` SYNs to the server from distinct spoofed sources in 198.19.0.0/16 and
/// 2001:db8:ffff::/48 (outside the lab's own subnets).
fn spoofed_syns(
    lab: &Lab,
    n: u32,
    seed: u32,
) -> Result<impl Iterator<Item = Vec<u8>> + Send + 'static> {
    let mac = lab.server_mac()?;
    let (v4, v6) = (lab.server_v4(), lab.server_v6());
    Ok((0..n).map(move |i| {
        let k = i.wrapping_mul(2_654_435_761).wrapping_add(seed);
        let (src, dst): (IpAddr, IpAddr) = if i % 4 == 0 {
            (
                Ipv6Addr::new(0x2001, 0xdb8, 0xffff, (k >> 16) as u16, 0, 0, 0, k as u16).into(),
                v6.into(),
            )
        } else {
            (
                Ipv4Addr::new(198, 19, (k >> 8) as u8, k as u8).into(),
                v4.into(),
            )
        };
        Packet::syn(src, 8080)
            .with(|p| {
                p.dst = Some(dst);
                p.dst_mac = Some(mac);
                p.src_port = (k >> 3) as u16 | 1024;
            })
            .bytes()
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofed_flood_past_the_source_map_and_a_kill_9_lose_nothing() -> Result<()> {
    let lab = Lab::new()?;
    let _server = EchoServer::start(&lab.server, 8080).await?;
    let addr = SocketAddr::new(lab.server_v4().into(), 8080);
    let body = format!(
        "[protect]\nports = [8080]\n[limits.per_source]\nnew_connections = \"3/m\"\nnew_connections_burst = 3\n\
         [ban]\nafter_drops = 3\nduration = \"1h\"\n[lists]\nallow = [\"{}\"]\n[tracking]\nmax_sources = {MAX_SOURCES}\n\
         [syn_cookies]\nenabled = false\n",
        lab.client_v4(4)
    );
    // SYN cookies off: with them, spoofed SYNs never reach the source map
    // (syn_cookies.rs shows that); here the map itself is under test.
    let agent = Agent::start_with_agent_keys(&lab, "keep_enforcing_on_exit = true", &body)?;
    let pin_path = agent.pin_path.clone();
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            remove_state(&self.0);
        }
    }
    let _cleanup = Cleanup(pin_path.clone());

    // A ban earned before the flood, and a long-lived client.
    let banned: IpAddr = lab.client_v4(10).into();
    connection_flood(
        &lab.client,
        banned,
        addr,
        SECOND,
        16,
        Duration::from_millis(200),
    )
    .await?;
    agent.wait_counter(Reason::BanStarted, 1, SECOND).await?;
    let mut long_lived = ws_connect(&lab.client, lab.client_v4(3).into(), addr, SECOND).await?;
    echo(&mut long_lived, "before", SECOND).await?;

    // 60,000 spoofed SYNs from 60,000 sources: far past the 1,024 the map holds.
    let flood = |seed| -> Result<_> {
        let frames = spoofed_syns(&lab, 30_000, seed)?;
        let (ns, interface) = (lab.client.path(), lab.client_if.clone());
        Ok(tokio::task::spawn_blocking(move || {
            send_frames(ns, interface, frames)
        }))
    };
    let first_half = flood(1)?;
    echo(&mut long_lived, "during", SECOND).await?;
    connect_from(&lab.client, lab.client_v4(4).into(), addr, SECOND).await?; // allow-listed
    let first_half = first_half.await??;

    // The key of the table's hash: a restart must keep it, or the sources
    // the table holds would no longer be found.
    let hash_key = agent.state()?.settings()?.source_hash_key;
    // kill -9 in the middle of the flood; the programs keep enforcing.
    agent.kill()?;
    let second_half = flood(2)?;
    ensure!(
        !connects(&lab.client, banned, addr, DROPPED).await,
        "a banned source got in while the agent was down"
    );
    echo(&mut long_lived, "while down", SECOND).await?;
    let sent = first_half + second_half.await??;
    // (A few sends may fail for want of buffer space; what was sent counts.)
    ensure!(sent >= 55_000, "sent only {sent} frames");

    let agent = Agent::start_with_agent_keys(&lab, "keep_enforcing_on_exit = true", &body)?;
    let state = agent.state()?;
    ensure!(
        state.settings()?.source_hash_key == hash_key,
        "the restart changed the source table's hash key"
    );
    let tracked = state.tracked_sources()?.len();
    ensure!(
        tracked <= MAX_SOURCES,
        "{tracked} sources tracked with room for {MAX_SOURCES}"
    );
    ensure!(
        tracked >= MAX_SOURCES / 2,
        "only {tracked} sources tracked: the flood did not fill the map"
    );
    ensure!(
        state
            .bans()?
            .iter()
            .any(|(k, _)| std::net::IpAddr::from(*k) == banned),
        "the ban was evicted by the flood or lost across the kill"
    );
    // Every spoofed SYN was judged and counted, before and after the kill
    // (most fall to the global connection rate).
    let counted: u64 = state
        .counters()?
        .iter()
        .filter(|(r, _)| wsguard::status::verdict(*r) != "event")
        .map(|(_, c)| c.packets)
        .sum();
    ensure!(
        counted >= sent,
        "{counted} packets counted for {sent} spoofed SYNs: the kernel stopped counting while the agent was down"
    );
    ensure!(
        !connects(&lab.client, banned, addr, DROPPED).await,
        "the ban stopped holding"
    );
    echo(&mut long_lived, "after", SECOND).await?;
    wait_until("the takeover to be reported", SECOND, || {
        agent
            .stdout()
            .iter()
            .any(|l| l.contains("took over"))
            .then_some(())
    })
    .await?;
    Ok(())
}
