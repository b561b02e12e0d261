//! Metrics and events as an operator's tooling sees them: Prometheus text
//! scraped over HTTP, and JSON-lines event records.

use std::time::Duration;

use anyhow::{Result, ensure};
use wsguard_common::Reason;
use wsguard_tests::{
    Setup,
    lab::Netns,
    peers::{connection_flood, connects, echo, http_get, ws_connect},
    wait_until,
};

const SECOND: Duration = Duration::from_secs(1);

fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

async fn scrape(ns: &Netns) -> Result<prometheus_parse::Scrape> {
    let (status, headers, body) = http_get(ns, "/metrics").await?;
    ensure!(status.contains("200"), "{status}");
    ensure!(
        headers.contains("content-type: application/openmetrics-text"),
        "{headers}"
    );
    ensure!(
        body.trim_end().ends_with("# EOF"),
        "exposition does not end with # EOF"
    );
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        ensure!(
            line.starts_with("wsguard_") && line.split_whitespace().count() == 2,
            "odd sample line: {line}"
        );
    }
    Ok(prometheus_parse::Scrape::parse(
        body.lines().map(|l| Ok(l.to_string())),
    )?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_is_valid_exposition_and_moves_with_traffic() -> Result<()> {
    let Setup {
        agent,
        server: _server,
        addr,
        lab,
    } = Setup::start("[protect]\nports = [8080]\n[lists]\ndeny = [\"198.18.{id}.9\"]\n").await?;
    let first = scrape(&lab.server).await?;
    ensure!(sample(&first, "wsguard_up", &[]) == Some(1.0));
    let denied = |s: &prometheus_parse::Scrape| {
        sample(
            s,
            "wsguard_packets_total",
            &[("reason", "deny_list"), ("verdict", "dropped")],
        )
    };
    ensure!(denied(&first) == Some(0.0), "{:?}", denied(&first));

    ensure!(
        !connects(
            &lab.client,
            lab.client_v4(9).into(),
            addr,
            Duration::from_millis(900)
        )
        .await
    );
    let mut ws = ws_connect(&lab.client, lab.client_v4(2).into(), addr, SECOND).await?;
    echo(&mut ws, "hello", SECOND).await?;
    let second = scrape(&lab.server).await?;
    let kernel_denied = agent.counter(Reason::DenyList).packets as f64;
    ensure!(
        denied(&second) >= Some(1.0) && denied(&second) <= Some(kernel_denied),
        "deny_list {:?} vs kernel {kernel_denied}",
        denied(&second)
    );
    let passed = sample(
        &second,
        "wsguard_packets_total",
        &[("reason", "passed"), ("verdict", "passed")],
    )
    .unwrap_or(0.0);
    ensure!(passed >= 3.0, "passed {passed}");
    ensure!(
        sample(
            &second,
            "wsguard_frame_bytes_total",
            &[("reason", "passed")]
        )
        .unwrap_or(0.0)
            > passed * 54.0
    );
    ensure!(sample(&second, "wsguard_tracked_sources", &[]) == Some(1.0));
    ensure!(sample(&second, "wsguard_list_entries", &[("list", "deny")]) == Some(1.0));
    // (The connection counter sees every socket on the host, other tests' too.)
    ensure!(sample(&second, "wsguard_open_connections", &[]) >= Some(1.0));
    let (status, _, _) = http_get(&lab.server, "/").await?;
    ensure!(status.contains("404"), "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_record_bans_starting_and_ending_and_reloads() -> Result<()> {
    let events = tempfile::NamedTempFile::new()?;
    let Setup { agent, server: _server, addr, lab } = Setup::start(&format!(
        "[protect]\nports = [8080]\n[limits.per_source]\nnew_connections = \"2/m\"\nnew_connections_burst = 2\n\
         [ban]\nafter_drops = 3\nduration = \"1s\"\n[events]\noutput = \"{}\"\n",
        events.path().display()
    ))
    .await?;
    let records = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(events.path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let find = |kind: &str| records().into_iter().find(|r| r["event"] == kind);
    wait_until("an agent_started record", 2 * SECOND, || {
        find("agent_started")
    })
    .await?;

    connection_flood(
        &lab.client,
        lab.client_v4(8).into(),
        addr,
        SECOND,
        16,
        Duration::from_millis(200),
    )
    .await?;
    let started = wait_until("a ban_started record", 2 * SECOND, || find("ban_started")).await?;
    ensure!(
        started["source"] == format!("{}/32", lab.client_v4(8)),
        "{started}"
    );
    ensure!(
        started["dry_run"] == false && started["ts"].as_str().is_some(),
        "{started}"
    );
    let ended = wait_until("the ban to end", 4 * SECOND, || find("ban_ended")).await?;
    ensure!(
        ended["source"] == started["source"] && ended["how"] == "expired",
        "{ended}"
    );

    agent.signal(libc::SIGHUP);
    wait_until("a config_reloaded record", 5 * SECOND, || {
        find("config_reloaded")
    })
    .await?;
    std::fs::write(agent.config_file.path(), "[agent]\n")?;
    agent.signal(libc::SIGHUP);
    let rejected = wait_until("a config_rejected record", 5 * SECOND, || {
        find("config_rejected")
    })
    .await?;
    ensure!(
        rejected["error"]
            .as_str()
            .is_some_and(|e| e.contains("missing field")),
        "{rejected}"
    );
    let (status, _) = agent.stop()?;
    ensure!(status.success());
    ensure!(find("agent_stopped").is_some());
    Ok(())
}
