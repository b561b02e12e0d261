//! Operating the agent: status and top match the traffic sent, runtime
//! allow/deny entries and bans through the CLI, reload through the CLI,
//! restarts after SIGTERM or `kill -9` that keep bans, lists and counters,
//! and fail-closed versus fail-open while no agent runs.

use std::{net::SocketAddr, path::PathBuf, process::Output, time::Duration};

use anyhow::{Context, Result, ensure};
use wsguard::kernel::{Maps, PinnedState, pin_dir};
use wsguard_common::{
    Reason,
    maps::{list_search, shortcuts},
};
use wsguard_tests::{
    Agent, Lab, Setup,
    agent::remove_state,
    peers::{EchoServer, connect_from, connection_flood, connects, echo, ws_connect},
    wait_until,
};

const SECOND: Duration = Duration::from_secs(1);
const DROPPED: Duration = Duration::from_millis(900);

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Removes an agent's pins when a restart test ends, however it ends.
struct StateGuard(PathBuf);

impl Drop for StateGuard {
    fn drop(&mut self) {
        remove_state(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// These count one SYN per connection attempt and see a refused connection
// fail at connect(): SYN cookies are off (with them, the budget is charged
// when the ACK returns the cookie; syn_cookies.rs).
async fn status_and_top_match_the_traffic_sent() -> Result<()> {
    let Setup { agent, server: _server, addr, lab } = Setup::start(
        "[protect]\nports = [8080]\n[limits.per_source]\nnew_connections = \"5/m\"\nnew_connections_burst = 5\n[ban]\nafter_drops = 0\n[syn_cookies]\nenabled = false\n",
    )
    .await?;
    // Five connections pass, five more are dropped for the rate.
    for i in 0..5 {
        let mut ws = ws_connect(&lab.client, lab.client_v4(6).into(), addr, SECOND).await?;
        echo(&mut ws, &format!("{i}"), SECOND).await?;
    }
    for _ in 0..5 {
        ensure!(
            !connects(
                &lab.client,
                lab.client_v4(6).into(),
                addr,
                Duration::from_millis(300)
            )
            .await
        );
    }
    let out = agent.cli(&["status", "--json"]);
    ensure!(out.status.success(), "{}", text(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(doc["counters"]["connection_rate"]["packets"] == 5, "{doc}");
    ensure!(doc["counters"]["connection_rate"]["verdict"] == "dropped");
    ensure!(
        doc["counters"]["passed"]["packets"].as_u64() >= Some(5 * 3),
        "{doc}"
    );
    ensure!(doc["maps"]["tracked_sources"] == 1, "{doc}");
    ensure!(
        doc["agent"]["running"] == true && doc["agent"]["interfaces"][0] == lab.server_if.as_str(),
        "{doc}"
    );
    ensure!(doc["agent"]["xdp_mode"] == "auto", "{doc}");
    let human = text(&agent.cli(&["status"]));
    ensure!(
        human.contains("connection_rate") && human.contains("agent: running"),
        "{human}"
    );

    // top, during a flood, puts the flooding source first.
    let flood = connection_flood(
        &lab.client,
        lab.client_v4(20).into(),
        addr,
        2 * SECOND,
        32,
        Duration::from_millis(200),
    );
    let top = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let pin = agent.pin_path.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(wsguard_tests::agent::binary())
                .args(["top", "--once", "--interval", "500ms", "--pin-path"])
                .arg(pin)
                .output()
        })
        .await
    };
    let (_, top) = tokio::join!(flood, top);
    let top = top??;
    // The first row under the table's header.
    let first = String::from_utf8_lossy(&top.stdout)
        .lines()
        .skip_while(|line| !line.starts_with("source"))
        .nth(1)
        .unwrap_or_default()
        .to_string();
    ensure!(
        first.starts_with(&lab.client_v4(20).to_string()),
        "top:\n{}",
        text(&top)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_deny_and_allow_take_effect_at_once_and_expire() -> Result<()> {
    let Setup { agent, server: _server, addr, lab } = Setup::start(
        "[protect]\nports = [8080]\n[limits.per_source]\nnew_connections = \"1/m\"\nnew_connections_burst = 1\n[ban]\nafter_drops = 0\n[syn_cookies]\nenabled = false\n",
    )
    .await?;
    let source = lab.client_v4(7);
    let mut ws = ws_connect(&lab.client, source.into(), addr, SECOND).await?;
    echo(&mut ws, "before", SECOND).await?;

    // A deny added at run time drops the very next packet, even on an
    // established connection.
    let out = agent.cli(&["deny", "add", &format!("{source}/32"), "--ttl", "2s"]);
    ensure!(out.status.success(), "{}", text(&out));
    ensure!(
        echo(&mut ws, "after deny", Duration::from_millis(500))
            .await
            .is_err(),
        "echo through a deny"
    );
    let list = text(&agent.cli(&["deny", "list"]));
    ensure!(
        list.contains(&format!("{source}/32\truntime\texpires in")),
        "{list}"
    );
    // The TTL runs out in the kernel: the connection resumes by itself.
    wait_until("the deny to expire", 4 * SECOND, || {
        (!text(&agent.cli(&["deny", "list"])).contains(&source.to_string())).then_some(())
    })
    .await?;

    // A runtime allow exempts a source from its (exhausted) rate at once.
    ensure!(
        !connects(&lab.client, source.into(), addr, DROPPED).await,
        "rate of 1/m should hold"
    );
    ensure!(
        agent
            .cli(&["allow", "add", &source.to_string()])
            .status
            .success()
    );
    connect_from(&lab.client, source.into(), addr, SECOND).await?;
    let out = agent.cli(&["allow", "del", &source.to_string()]);
    ensure!(out.status.success(), "{}", text(&out));
    ensure!(
        !connects(&lab.client, source.into(), addr, DROPPED).await,
        "allow removed, rate applies again"
    );

    // Bad input: exit code 2 and the reason; removing what is not there: 1.
    let out = agent.cli(&["deny", "add", "198.18.0.1/8"]);
    ensure!(
        out.status.code() == Some(2) && text(&out).contains("did you mean 198.0.0.0/8?"),
        "{}",
        text(&out)
    );
    let out = agent.cli(&["deny", "add", "198.18.0.0/24", "--ttl", "5"]);
    ensure!(
        out.status.code() == Some(2) && text(&out).contains("has no unit"),
        "{}",
        text(&out)
    );
    let out = agent.cli(&["deny", "del", "198.51.100.0/24"]);
    ensure!(
        out.status.code() == Some(1) && text(&out).contains("not in the list"),
        "{}",
        text(&out)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_writers_at_once_leave_every_entry_enforced() -> Result<()> {
    let Setup {
        agent,
        server: _server,
        addr,
        lab,
    } = Setup::start("[protect]\nports = [8080]\n[syn_cookies]\nenabled = false\n").await?;
    let [_, _, net, _] = lab.client_v4(0).octets();
    // Four prefix lengths (/32, /30, /24, /28), added by six CLI processes
    // at once, then two of them removed at once: each works out how the
    // kernel searches the list from what the one before it left.
    let mut enforced: Vec<String> = [20u8, 21, 22]
        .iter()
        .map(|host| format!("{}/32", lab.client_v4(*host)))
        .collect();
    enforced.push(format!("198.18.{net}.24/30"));
    let unrelated = ["198.19.250.0/24", "198.19.251.0/28"];
    let all_at_once = |command: &str, nets: Vec<&str>| {
        std::thread::scope(|s| {
            let runs: Vec<_> = nets
                .iter()
                .map(|cidr| s.spawn(|| agent.cli(&["deny", command, cidr])))
                .collect();
            runs.into_iter()
                .map(|run| run.join().expect("a CLI thread"))
                .collect::<Vec<Output>>()
        })
    };
    let nets: Vec<&str> = enforced
        .iter()
        .map(String::as_str)
        .chain(unrelated)
        .collect();
    for out in all_at_once("add", nets) {
        ensure!(out.status.success(), "{}", text(&out));
    }
    let state = PinnedState::open(&pin_dir(&agent.pin_path))?;
    ensure!(state.shortcut(shortcuts::DENY_SEARCH)? == list_search::TRIE);
    for out in all_at_once("del", unrelated.to_vec()) {
        ensure!(out.status.success(), "{}", text(&out));
    }
    ensure!(
        state.shortcut(shortcuts::DENY_SEARCH)? == list_search::encode([128, 126]),
        "a /32 and a /30 left: two hash probes"
    );
    for host in [20u8, 21, 22, 25] {
        ensure!(
            !connects(&lab.client, lab.client_v4(host).into(), addr, DROPPED).await,
            "198.18.{net}.{host} is denied"
        );
    }
    connect_from(&lab.client, lab.client_v4(28).into(), addr, SECOND).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_through_the_cli_keeps_bans_and_state_and_refuses_bad_configs() -> Result<()> {
    let body = |rate: &str| {
        format!(
            "[protect]\nports = [8080]\n[limits.per_source]\nnew_connections = \"{rate}\"\nnew_connections_burst = 3\n[ban]\nafter_drops = 3\nduration = \"1h\"\n"
        )
    };
    let Setup {
        agent,
        server: _server,
        addr,
        lab,
    } = Setup::start(&body("3/m")).await?;
    let banned = lab.client_v4(8);
    connection_flood(
        &lab.client,
        banned.into(),
        addr,
        SECOND,
        16,
        Duration::from_millis(200),
    )
    .await?;
    agent.wait_counter(Reason::BanStarted, 1, SECOND).await?;
    let tracked_before = agent.state()?.tracked_sources()?.len();

    let header = std::fs::read_to_string(agent.config_file.path())?;
    let header = header[..header.find("[protect]").unwrap()].to_string();
    std::fs::write(
        agent.config_file.path(),
        format!("{header}{}", body("30/m")),
    )?;
    let out = agent.cli(&["reload"]);
    ensure!(
        out.status.success() && text(&out).contains("reloaded"),
        "{}",
        text(&out)
    );
    let bans = text(&agent.cli(&["bans", "list"]));
    ensure!(
        bans.contains(&banned.to_string()),
        "the ban did not survive the reload: {bans}"
    );
    ensure!(
        agent.state()?.tracked_sources()?.len() >= tracked_before,
        "per-source state was reset"
    );
    ensure!(
        !connects(&lab.client, banned.into(), addr, DROPPED).await,
        "banned source connected after reload"
    );

    std::fs::write(
        agent.config_file.path(),
        format!("{header}[protect]\nports = [80, 80]\n"),
    )?;
    let out = agent.cli(&["reload"]);
    ensure!(out.status.code() == Some(2), "{}", text(&out));
    ensure!(
        text(&out).contains("port 80 is listed twice"),
        "{}",
        text(&out)
    );
    ensure!(
        !connects(&lab.client, banned.into(), addr, DROPPED).await,
        "the old config stopped enforcing"
    );

    // Lifting the ban by hand lets the source back in.
    let out = agent.cli(&["bans", "del", &banned.to_string()]);
    ensure!(out.status.success(), "{}", text(&out));
    connect_from(&lab.client, banned.into(), addr, SECOND).await?;
    let out = agent.cli(&["bans", "del", &banned.to_string()]);
    ensure!(out.status.code() == Some(1), "{}", text(&out));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_then_run_keeps_bans_lists_and_counters() -> Result<()> {
    let lab = Lab::new()?;
    let _server = EchoServer::start(&lab.server, 8080).await?;
    let body = "[protect]\nports = [8080]\n[limits.per_source]\nnew_connections = \"3/m\"\nnew_connections_burst = 3\n[ban]\nafter_drops = 3\nduration = \"1h\"\n";
    let addr = SocketAddr::new(lab.server_v4().into(), 8080);
    let first = Agent::start(&lab, body)?;
    let _guard = StateGuard(first.pin_path.clone());
    let banned = lab.client_v4(8);
    let denied = lab.client_v4(9);
    connection_flood(
        &lab.client,
        banned.into(),
        addr,
        SECOND,
        16,
        Duration::from_millis(200),
    )
    .await?;
    first.wait_counter(Reason::BanStarted, 1, SECOND).await?;
    ensure!(
        first
            .cli(&["deny", "add", &denied.to_string()])
            .status
            .success()
    );
    let dropped_before = first.counter(Reason::ConnectionRate).packets;
    first.kill()?;
    // Fail-open (the default): a crash leaves nothing attached.
    connect_from(&lab.client, denied.into(), addr, SECOND)
        .await
        .context("fail-open agent killed, yet still enforcing")?;

    let second = Agent::start(&lab, body)?;
    ensure!(
        text(&second.cli(&["bans", "list"])).contains(&banned.to_string()),
        "ban lost across kill -9"
    );
    ensure!(
        text(&second.cli(&["deny", "list"])).contains(&denied.to_string()),
        "runtime deny lost across kill -9"
    );
    ensure!(
        second.counter(Reason::ConnectionRate).packets == dropped_before,
        "counters lost across kill -9"
    );
    ensure!(
        !connects(&lab.client, banned.into(), addr, DROPPED).await,
        "ban not enforced after restart"
    );
    ensure!(
        !connects(&lab.client, denied.into(), addr, DROPPED).await,
        "deny not enforced after restart"
    );
    let mut ws = ws_connect(&lab.client, lab.client_v4(2).into(), addr, SECOND).await?;
    echo(&mut ws, "after restart", SECOND).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_keeps_dropping_while_no_agent_runs_and_fail_open_does_not() -> Result<()> {
    let lab = Lab::new()?;
    let _server = EchoServer::start(&lab.server, 8080).await?;
    let addr = SocketAddr::new(lab.server_v4().into(), 8080);
    let denied = lab.client_v4(9);
    let body = format!("[protect]\nports = [8080]\n[lists]\ndeny = [\"{denied}\"]\n");

    let agent = Agent::start_with_agent_keys(&lab, "keep_enforcing_on_exit = true", &body)?;
    let _guard = StateGuard(agent.pin_path.clone());
    let pin_path = agent.pin_path.clone();
    let mut ws = ws_connect(&lab.client, lab.client_v4(2).into(), addr, SECOND).await?;
    let (status, stdout) = agent.stop_keeping_state()?;
    ensure!(
        status.success()
            && stdout
                .iter()
                .any(|l| l.contains("the programs stay attached")),
        "{stdout:?}"
    );
    // No agent runs: the kernel still drops the denied source, still counts,
    // and other clients carry on.
    let status_out = std::process::Command::new(wsguard_tests::agent::binary())
        .args(["status", "--json", "--pin-path"])
        .arg(&pin_path)
        .output()?;
    let doc: serde_json::Value = serde_json::from_slice(&status_out.stdout)?;
    ensure!(doc["agent"]["running"] == false, "{doc}");
    let before = doc["counters"]["deny_list"]["packets"]
        .as_u64()
        .unwrap_or(0);
    ensure!(
        !connects(&lab.client, denied.into(), addr, DROPPED).await,
        "fail-closed let a denied source in"
    );
    echo(&mut ws, "while the agent is down", SECOND).await?;
    let after = wsguard::kernel::PinnedState::open(&wsguard::kernel::pin_dir(&pin_path))?
        .counter(Reason::DenyList)?
        .packets;
    ensure!(
        after > before,
        "the kernel stopped counting while the agent was down"
    );

    // The next agent takes the running programs over; with fail-open it
    // detaches them on exit.
    let agent = Agent::start(&lab, &body)?;
    wait_until("the takeover to be reported", SECOND, || {
        agent
            .stdout()
            .iter()
            .any(|l| l.contains("took over"))
            .then_some(())
    })
    .await?;
    ensure!(!connects(&lab.client, denied.into(), addr, DROPPED).await);
    let (status, _) = agent.stop_keeping_state()?;
    ensure!(status.success());
    connect_from(&lab.client, denied.into(), addr, SECOND).await?;
    Ok(())
}

/// The same flood, enforced and in dry run: dry run drops nothing and counts
/// as would-drop exactly what enforcing drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_drops_nothing_and_counts_what_enforcing_drops() -> Result<()> {
    let mut dropped = Vec::new();
    for dry_run in [false, true] {
        let Setup { agent, server, addr, lab } = Setup::start(&format!(
            "[protect]\nports = [8080]\n[limits]\ndry_run = {dry_run}\n[limits.per_source]\nnew_connections = \"5/m\"\nnew_connections_burst = 5\n[ban]\nafter_drops = 0\n[syn_cookies]\nenabled = false\n"
        ))
        .await?;
        let mut connected = 0;
        for _ in 0..30 {
            // One SYN per attempt: the timeout comes before any retransmission.
            connected += u32::from(
                connects(
                    &lab.client,
                    lab.client_v4(5).into(),
                    addr,
                    Duration::from_millis(300),
                )
                .await,
            );
        }
        let state = agent.state()?;
        let counted = |set: Vec<(Reason, wsguard_common::Counter)>| {
            set.into_iter()
                .find(|(r, _)| *r == Reason::ConnectionRate)
                .unwrap()
                .1
                .packets
        };
        let (done, would) = (counted(state.counters()?), counted(state.would_drop()?));
        if dry_run {
            ensure!(
                connected == 30 && done == 0,
                "dry run dropped: {connected} connected, {done} dropped"
            );
            wait_until("every connection accepted", SECOND, || {
                (server.accepted() >= 30).then_some(())
            })
            .await?;
            let status = text(&agent.cli(&["status"]));
            ensure!(
                status.contains("dry run would have dropped: connection_rate 25 packets"),
                "{status}"
            );
            dropped.push(would);
        } else {
            ensure!(
                connected == 5 && would == 0,
                "enforcing: {connected} connected, {would} would-drop"
            );
            dropped.push(done);
        }
    }
    ensure!(
        dropped[0] == 25 && dropped[1] == dropped[0],
        "enforced drops {} vs dry-run would-drops {}",
        dropped[0],
        dropped[1]
    );
    Ok(())
}

/// Under systemd (Type=notify) the agent reports ready once attached, and
/// reloading and stopping on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_after_attach() -> Result<()> {
    let lab = Lab::new()?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path)?;
    socket.set_read_timeout(Some(5 * SECOND))?;
    let agent = Agent::start_with_env(
        &lab,
        "[protect]\nports = [8080]\n",
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    )?;
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf)?;
    ensure!(
        String::from_utf8_lossy(&buf[..n]).contains("READY=1"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    // Ready comes after the XDP program is on the interface.
    let link = lab.server_link()?;
    ensure!(link.contains("xdp"), "{link}");
    agent.signal(libc::SIGHUP);
    let n = socket.recv(&mut buf)?;
    ensure!(String::from_utf8_lossy(&buf[..n]).contains("RELOADING=1"));
    let (status, _) = agent.stop()?;
    ensure!(status.success());
    let mut saw_stopping = false;
    while let Ok(n) = socket.recv(&mut buf) {
        saw_stopping |= String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
        if saw_stopping {
            break;
        }
    }
    ensure!(saw_stopping, "no STOPPING=1");
    Ok(())
}

/// An interface deleted and created again (as a container restart does to
/// veth pairs) gets the programs back without a restart of the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_and_re_added_interface_is_attached_again() -> Result<()> {
    let Setup {
        agent,
        server: _server,
        addr,
        lab,
    } = Setup::start("[protect]\nports = [8080]\n[lists]\ndeny = [\"198.18.{id}.9\"]\n").await?;
    ensure!(!connects(&lab.client, lab.client_v4(9).into(), addr, DROPPED).await);
    lab.rewire()?;
    wait_until("the agent to attach again", 5 * SECOND, || {
        agent
            .stderr()
            .iter()
            .any(|l| l.contains(&format!("interface {} is back", lab.server_if)))
            .then_some(())
    })
    .await?;
    ensure!(
        lab.server_link()?.contains("xdp"),
        "no XDP on the new device"
    );
    ensure!(
        !connects(&lab.client, lab.client_v4(9).into(), addr, DROPPED).await,
        "the deny list no longer applies"
    );
    let mut ws = ws_connect(&lab.client, lab.client_v4(2).into(), addr, SECOND).await?;
    echo(&mut ws, "after re-creation", SECOND).await?;
    Ok(())
}

/// A pinned map that is not what this build expects (damaged, or left by
/// another layout) is rebuilt with a log line naming it; the rest of the
/// state carries over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_pinned_map_is_detected_and_rebuilt() -> Result<()> {
    let lab = Lab::new()?;
    let _server = EchoServer::start(&lab.server, 8080).await?;
    let body = "[protect]\nports = [8080]\n";
    let first = Agent::start(&lab, body)?;
    let _guard = StateGuard(first.pin_path.clone());
    let denied = lab.client_v4(9);
    ensure!(
        first
            .cli(&["deny", "add", &denied.to_string()])
            .status
            .success()
    );
    let dir = wsguard::kernel::pin_dir(&first.pin_path);
    first.kill()?;
    // Put the counters map where the bans map belongs: wrong key and value sizes.
    let bans = dir.join("WSG_BANS");
    std::fs::remove_file(&bans)?;
    aya::maps::MapData::from_pin(dir.join("WSG_COUNTERS"))?.pin(&bans)?;
    // And lose another one altogether.
    let global = dir.join("WSG_GLOBAL");
    std::fs::remove_file(&global)?;

    let second = Agent::start(&lab, body)?;
    let warning = format!("pinned map {} has key/value/entries", bans.display());
    wait_until("the rebuild to be logged", SECOND, || {
        second
            .stderr()
            .iter()
            .any(|l| l.contains(&warning) && l.contains("rebuilding it empty"))
            .then_some(())
    })
    .await?;
    let missing = format!(
        "pinned map {} is missing: creating it empty",
        global.display()
    );
    ensure!(
        second.stderr().iter().any(|l| l.contains(&missing)),
        "no word about the missing map: {:?}",
        second.stderr()
    );
    ensure!(
        second.state()?.bans().is_ok(),
        "the bans map was not rebuilt"
    );
    // The other maps carried over: the runtime deny still holds.
    ensure!(
        connect_from(
            &lab.client,
            denied.into(),
            SocketAddr::new(lab.server_v4().into(), 8080),
            DROPPED
        )
        .await
        .is_err()
    );
    Ok(())
}

/// `status` counts tracked sources from the kernel's count of entries it
/// created, not by walking the map: that count lives and dies with the map.
/// A restart keeps both; one that resizes the map (a new
/// `tracking.max_sources`) starts both again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tracked_source_count_restarts_with_a_resized_map() -> Result<()> {
    let lab = Lab::new()?;
    let _server = EchoServer::start(&lab.server, 8080).await?;
    let addr = SocketAddr::new(lab.server_v4().into(), 8080);
    let body = |max: u32| format!("[protect]\nports = [8080]\n[tracking]\nmax_sources = {max}\n");
    let tracked = |agent: &Agent| -> Result<serde_json::Value> {
        let out = agent.cli(&["status", "--json"]);
        ensure!(out.status.success(), "{}", text(&out));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(doc["maps"]["tracked_sources"].clone())
    };
    let first = Agent::start(&lab, &body(1000))?;
    let _guard = StateGuard(first.pin_path.clone());
    for host in [11, 12] {
        ws_connect(&lab.client, lab.client_v4(host).into(), addr, SECOND).await?;
    }
    ensure!(tracked(&first)? == 2, "{}", tracked(&first)?);
    first.stop_keeping_state()?;

    let same = Agent::start(&lab, &body(1000))?;
    ensure!(
        tracked(&same)? == 2,
        "kept across a restart: {}",
        tracked(&same)?
    );
    same.stop_keeping_state()?;

    let resized = Agent::start(&lab, &body(2000))?;
    ensure!(tracked(&resized)? == 0, "a new map: {}", tracked(&resized)?);
    ws_connect(&lab.client, lab.client_v4(13).into(), addr, SECOND).await?;
    ensure!(tracked(&resized)? == 1, "{}", tracked(&resized)?);
    Ok(())
}

/// Many legitimate clients behind one address (NAT) stay within limits sized
/// for them, and none is banned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_behind_one_address_are_not_banned_within_their_limits() -> Result<()> {
    let Setup { agent, server: _server, addr, lab } = Setup::start(
        "[protect]\nports = [8080]\n[limits.per_source]\nnew_connections = \"100/s\"\nnew_connections_burst = 200\nconcurrent_connections = 120\n[ban]\nafter_drops = 5\n",
    )
    .await?;
    let nat: std::net::IpAddr = lab.client_v4(20).into();
    let mut clients = Vec::new();
    for i in 0..100 {
        let mut ws = ws_connect(&lab.client, nat, addr, SECOND).await?;
        echo(&mut ws, &format!("user {i}"), SECOND).await?;
        clients.push(ws);
    }
    for (i, ws) in clients.iter_mut().enumerate() {
        echo(ws, &format!("still {i}"), SECOND).await?;
    }
    for reason in [
        Reason::ConnectionRate,
        Reason::Concurrency,
        Reason::ByteRate,
        Reason::BanStarted,
    ] {
        ensure!(
            agent.counter(reason).packets == 0,
            "NAT clients met {}",
            reason.name()
        );
    }
    Ok(())
}
