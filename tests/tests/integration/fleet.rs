//! A fleet of three hosts (three labs, each with its own agent and echo
//! server) sharing one real `redis-server`: a ban decided on one host is
//! enforced by the others' kernels; decisions made while Redis is down,
//! or before a host starts, arrive all the same; what is written straight
//! into Redis is checked; wrong credentials are refused and say so; over
//! TLS, only the CA a host is given is trusted.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use wsguard::kernel::Maps;
use wsguard_common::{Reason, SourceKey};
use wsguard_tests::{
    Agent, Lab,
    peers::{EchoServer, connect_from, connection_flood, connects, http_get},
    redis::RedisServer,
    wait_until,
};

const SECOND: Duration = Duration::from_secs(1);
const DROPPED: Duration = Duration::from_millis(700);
/// The client every host of the fleet sees.
const SHARED: Ipv4Addr = Ipv4Addr::new(198, 19, 201, 7);

/// One host of the fleet: a lab, its echo server and its agent.
struct Host {
    agent: Agent,
    _server: EchoServer,
    addr: SocketAddr,
    lab: Lab,
}

/// Three connections per minute per source, three drops earn an hour's ban.
fn body(redis: &RedisServer, host: &str, extra: &str) -> String {
    format!(
        "[protect]\nports = [8080]\n\
         [limits.per_source]\nnew_connections = \"3/m\"\nnew_connections_burst = 3\n\
         [ban]\nafter_drops = 3\nduration = \"1h\"\n\
         [syn_cookies]\nenabled = false\n\
         [fleet]\nredis_url = \"{}\"\nhost_id = \"{host}\"\n{extra}",
        redis.url()
    )
}

impl Host {
    async fn start(redis: &RedisServer, name: &str, extra: &str) -> Result<Host> {
        Host::start_with_body(&body(redis, name, extra)).await
    }

    async fn start_with_body(body: &str) -> Result<Host> {
        let lab = Lab::new()?;
        lab.add_shared_client(SHARED)?;
        let server = EchoServer::start(&lab.server, 8080).await?;
        let addr = SocketAddr::new(lab.server_v4().into(), 8080);
        let agent = Agent::start(&lab, body)?;
        Ok(Host {
            agent,
            _server: server,
            addr,
            lab,
        })
    }

    async fn serves(&self, source: IpAddr) -> bool {
        connects(&self.lab.client, source, self.addr, DROPPED).await
    }

    fn banned(&self, source: IpAddr) -> bool {
        self.agent
            .state()
            .and_then(|s| s.ban_of(&SourceKey::from(source)))
            .is_ok_and(|b| b.is_some())
    }

    fn denies(&self, net: &str) -> bool {
        self.agent.state().is_ok_and(|s| {
            s.list_entries(false)
                .is_ok_and(|entries| entries.iter().any(|(n, _)| n.to_string() == net))
        })
    }

    /// Floods until the kernel bans `source`.
    async fn earn_ban(&self, source: IpAddr) -> Result<()> {
        connection_flood(
            &self.lab.client,
            source,
            self.addr,
            SECOND,
            16,
            Duration::from_millis(200),
        )
        .await?;
        self.agent
            .wait_counter(Reason::BanStarted, 1, SECOND)
            .await?;
        Ok(())
    }

    async fn connected(&self) -> Result<()> {
        self.agent.wait_fleet_connected(5 * SECOND).await
    }

    fn fleet_report(&self) -> Option<serde_json::Value> {
        self.agent.fleet_report()
    }

    async fn metric(&self, line_start: &str) -> Result<f64> {
        let (_, _, body) = http_get(&self.lab.server, "/metrics").await?;
        body.lines()
            .find_map(|l| l.strip_prefix(line_start))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no sample {line_start} in:\n{body}"))
    }
}

async fn fleet_of_three(redis: &RedisServer) -> Result<[Host; 3]> {
    let a = Host::start(redis, "host-a", "").await?;
    let b = Host::start(redis, "host-b", "").await?;
    let c = Host::start(redis, "host-c", "").await?;
    for host in [&a, &b, &c] {
        host.connected().await?;
    }
    Ok([a, b, c])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_on_one_host_drops_that_source_on_every_host_within_a_second() -> Result<()> {
    let redis = RedisServer::start()?;
    let [a, b, c] = fleet_of_three(&redis).await?;
    let shared = IpAddr::V4(SHARED);
    ensure!(b.serves(shared).await && c.serves(shared).await);

    a.earn_ban(shared).await?;
    let decided = Instant::now();
    for host in [&b, &c] {
        wait_until("the ban to reach the other hosts", SECOND, || {
            host.banned(shared).then_some(())
        })
        .await?;
    }
    let took = decided.elapsed();
    ensure!(took < SECOND, "the ban took {took:?} to reach every host");
    ensure!(
        !b.serves(shared).await,
        "host B still serves the banned source"
    );
    ensure!(
        !c.serves(shared).await,
        "host C still serves the banned source"
    );
    // Everyone else is still served there.
    ensure!(b.serves(b.lab.client_v4(2).into()).await);

    // Where it came from, as B sees it.
    let report = b.fleet_report().context("status --fleet")?;
    let decisions = report["decisions"].as_array().context("decisions")?;
    ensure!(
        decisions
            .iter()
            .any(|d| d["subject"] == "198.19.201.7/32" && d["from"] == "host-a"),
        "status --fleet on B: {report}"
    );
    let hosts: Vec<&str> = report["hosts"]
        .as_array()
        .context("hosts")?
        .iter()
        .filter_map(|h| h["host"].as_str())
        .collect();
    ensure!(
        hosts == ["host-a", "host-b", "host-c"],
        "hosts seen: {hosts:?}"
    );
    ensure!(
        b.metric("wsguard_fleet_decisions_applied_total ").await? >= 1.0,
        "applied counter"
    );
    ensure!(
        b.metric("wsguard_fleet_propagation_seconds_count ").await? >= 1.0,
        "propagation histogram"
    );
    ensure!(
        b.agent
            .stdout()
            .iter()
            .any(|l| l.contains("\"event\":\"fleet_decision\"") && l.contains("host-a")),
        "no fleet_decision event on B"
    );

    // Lifted on B (the CLI), lifted everywhere.
    let out = b.agent.cli(&["bans", "del", "198.19.201.7"]);
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for host in [&a, &c] {
        wait_until("the lift to reach the other hosts", 2 * SECOND, || {
            (!host.banned(shared)).then_some(())
        })
        .await?;
    }
    // C never met the flood: its budget for the source is whole.
    ensure!(
        c.serves(shared).await,
        "host C still drops the source after the lift"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_made_while_redis_is_down_reach_the_fleet_when_it_is_back_empty() -> Result<()> {
    let mut redis = RedisServer::start()?;
    let [a, b, c] = fleet_of_three(&redis).await?;
    // Decided before the outage: Redis loses it, its host publishes it again.
    let out = a
        .agent
        .cli(&["deny", "add", "198.19.210.0/24", "--ttl", "1h"]);
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("the deny entry to reach B", 2 * SECOND, || {
        b.denies("198.19.210.0/24").then_some(())
    })
    .await?;

    redis.kill();
    let shared = IpAddr::V4(SHARED);
    // While Redis is down: a ban earned on A, and a deny entry added on C.
    a.earn_ban(shared).await?;
    let out = c
        .agent
        .cli(&["deny", "add", "198.19.211.0/24", "--ttl", "1h"]);
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("A to count its decision waiting", 2 * SECOND, || {
        a.fleet_report()
            .filter(|r| r["connected"] == false && r["outbox"].as_u64() >= Some(1))
            .map(|_| ())
    })
    .await?;
    // Every host goes on enforcing alone.
    ensure!(!a.serves(shared).await, "A stopped enforcing its own ban");
    ensure!(!b.banned(shared), "B cannot know yet");

    redis.restart()?;
    for host in [&b, &c] {
        wait_until("the ban decided during the outage", 10 * SECOND, || {
            host.banned(shared).then_some(())
        })
        .await?;
    }
    wait_until("C's deny entry at A and B", 10 * SECOND, || {
        (a.denies("198.19.211.0/24") && b.denies("198.19.211.0/24")).then_some(())
    })
    .await?;
    ensure!(!b.serves(shared).await && !c.serves(shared).await);
    // The empty Redis holds every live decision again.
    wait_until("Redis to hold the decisions again", 10 * SECOND, || {
        let keys = redis.cli(&["--scan", "--pattern", "wsguard:*"]).ok()?;
        (keys.contains("wsguard:ban:198.19.201.7/32")
            && keys.contains("wsguard:deny:198.19.210.0/24")
            && keys.contains("wsguard:deny:198.19.211.0/24"))
        .then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_started_late_gets_every_live_decision() -> Result<()> {
    let redis = RedisServer::start()?;
    let a = Host::start(&redis, "host-a", "").await?;
    a.connected().await?;
    let shared = IpAddr::V4(SHARED);
    a.earn_ban(shared).await?;
    for args in [
        &["deny", "add", "198.19.220.0/24", "--ttl", "1h"][..],
        &["deny", "add", "198.19.221.0/24"][..],
        &["bans", "add", "--user", "mallory", "--ttl", "1h"][..],
        &["allow", "add", "198.19.222.0/24"][..],
    ] {
        let out = a.agent.cli(args);
        ensure!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait_until("A to publish its decisions", 2 * SECOND, || {
        let keys = redis.cli(&["--scan", "--pattern", "wsguard:*"]).ok()?;
        (keys.lines().filter(|k| !k.contains(":host:")).count() >= 5).then_some(())
    })
    .await?;

    let late = Host::start(&redis, "host-late", "").await?;
    late.connected().await?;
    wait_until("every live decision on the late host", 2 * SECOND, || {
        (late.banned(shared) && late.denies("198.19.220.0/24") && late.denies("198.19.221.0/24"))
            .then_some(())
    })
    .await?;
    let user = late
        .agent
        .state()?
        .user(wsguard::users::user_key("mallory"))
        .context("the user ban")?;
    ensure!(user.is_banned(wsguard::kernel::monotonic_ns()));
    ensure!(!late.serves(shared).await);
    // An allow entry from another host is refused without accept_allow.
    ensure!(
        !late
            .agent
            .state()?
            .list_entries(true)?
            .iter()
            .any(|(n, _)| n.to_string() == "198.19.222.0/24"),
        "an allow entry from the fleet was applied"
    );
    ensure!(
        late.metric("wsguard_fleet_decisions_rejected_total{reason=\"allow_not_accepted\"} ")
            .await?
            >= 1.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_written_straight_into_redis_is_checked_and_counted() -> Result<()> {
    let redis = RedisServer::start()?;
    let a = Host::start(&redis, "host-a", "").await?;
    a.connected().await?;
    let until = wsguard::fleet::decision::now_ms() + 3_600_000;
    let value = format!("{{\"until_ms\":{until},\"host\":\"intruder\",\"since_ms\":1}}");
    let message = |key: &str| {
        format!(
            "{{\"key\":\"{key}\",\"op\":\"set\",\"until_ms\":{until},\"host\":\"intruder\",\"sent_ms\":1}}"
        )
    };
    // Published: a bad key, a prefix this host does not track, garbage, and
    // one valid entry (to know the others were read).
    for payload in [
        message("ban:not-an-address/32"),
        message("ban:198.19.0.0/16"),
        "{\"drop\": \"tables\"}".to_string(),
        message("deny:198.19.230.0/24"),
    ] {
        redis.cli(&["PUBLISH", "wsguard:decisions", &payload])?;
    }
    wait_until("the valid entry", 2 * SECOND, || {
        a.denies("198.19.230.0/24").then_some(())
    })
    .await?;
    ensure!(!a.banned(IpAddr::V4(Ipv4Addr::new(198, 19, 0, 0))));
    for (reason, at_least) in [
        ("bad_key", 1.0),
        ("prefix_mismatch", 1.0),
        ("bad_value", 1.0),
    ] {
        let n = a
            .metric(&format!(
                "wsguard_fleet_decisions_rejected_total{{reason=\"{reason}\"}} "
            ))
            .await?;
        ensure!(n >= at_least, "{reason}: {n}");
    }
    // Written as keys and read back after a reconnect: a bad TTL (a ban
    // that never ends) and a bad key are skipped and counted too.
    redis.cli(&[
        "SET",
        "wsguard:ban:198.19.231.9/32",
        "{\"until_ms\":0,\"host\":\"intruder\",\"since_ms\":1}",
    ])?;
    redis.cli(&["SET", "wsguard:ban:198.19.231.10", "{not json"])?;
    redis.cli(&["SET", "wsguard:deny:198.19.232.0/24", &value])?;
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"])?;
    wait_until(
        "the entries read back after the reconnect",
        5 * SECOND,
        || a.denies("198.19.232.0/24").then_some(()),
    )
    .await?;
    ensure!(!a.banned(IpAddr::V4(Ipv4Addr::new(198, 19, 231, 9))));
    ensure!(
        a.metric("wsguard_fleet_decisions_rejected_total{reason=\"bad_ttl\"} ")
            .await?
            >= 1.0
    );
    ensure!(
        a.agent
            .stdout()
            .iter()
            .any(|l| l.contains("fleet_decision_rejected") && l.contains("prefix_mismatch")),
        "no fleet_decision_rejected event"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_with_wrong_credentials_is_refused_and_says_why() -> Result<()> {
    let redis = RedisServer::start_with(&[
        "--user",
        "default",
        "off",
        "--user",
        "wsguard",
        "on",
        ">right-password",
        "~*",
        "&*",
        "+@all",
    ])?;
    let dir = tempfile::tempdir()?;
    let (right, wrong) = (dir.path().join("right"), dir.path().join("wrong"));
    std::fs::write(&right, "right-password\n")?;
    std::fs::write(&wrong, "wrong-password\n")?;
    let keys = |file: &std::path::Path| {
        format!(
            "username = \"wsguard\"\npassword_file = \"{}\"\n",
            file.display()
        )
    };
    let refused = Host::start(&redis, "host-refused", &keys(&wrong)).await?;
    let report = wait_until("the refusal", 5 * SECOND, || {
        refused.fleet_report().filter(|r| {
            r["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("credentials"))
        })
    })
    .await?;
    ensure!(report["connected"] == false, "{report}");
    ensure!(
        refused
            .agent
            .stderr()
            .iter()
            .any(|l| l.contains("refused this host's credentials")),
        "the log does not say why"
    );
    // It still enforces on its own.
    let shared = IpAddr::V4(SHARED);
    refused.earn_ban(shared).await?;
    ensure!(!refused.serves(shared).await);

    let admitted = Host::start(&redis, "host-admitted", &keys(&right)).await?;
    admitted.connected().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_spread_over_the_fleet_under_every_hosts_limit_is_banned_by_the_fleet_limit()
-> Result<()> {
    let redis = RedisServer::start()?;
    // 50 new connections per second per source on each host; 60 per
    // second over the fleet.
    let body = |host: &str| {
        format!(
            "[protect]\nports = [8080]\n\
             [limits.per_source]\nnew_connections = \"50/s\"\nnew_connections_burst = 50\n\
             [limits.fleet.per_source]\nnew_connections = \"60/s\"\n\
             [ban]\nduration = \"1h\"\n\
             [syn_cookies]\nenabled = false\n\
             [fleet]\nredis_url = \"{}\"\nhost_id = \"{host}\"\n",
            redis.url()
        )
    };
    let mut hosts = Vec::new();
    for name in ["host-a", "host-b", "host-c"] {
        let host = Host::start_with_body(&body(name)).await?;
        host.connected().await?;
        hosts.push(host);
    }
    let shared = IpAddr::V4(SHARED);
    // 25 new connections per second to each host (75 over the fleet), for
    // at most 8 s or until every host has banned the source.
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(40));
    let mut open = Vec::new();
    let attempt = Duration::from_millis(300);
    while !hosts.iter().all(|h| h.banned(shared)) {
        ensure!(
            started.elapsed() < 8 * SECOND,
            "the fleet limit did not ban the source within 8 s"
        );
        tick.tick().await;
        let (a, b, c) = tokio::join!(
            connect_from(&hosts[0].lab.client, shared, hosts[0].addr, attempt),
            connect_from(&hosts[1].lab.client, shared, hosts[1].addr, attempt),
            connect_from(&hosts[2].lab.client, shared, hosts[2].addr, attempt),
        );
        open.extend([a, b, c].into_iter().flatten());
        // Closed as they go, so the concurrency limit stays out of it.
        if open.len() > 30 {
            open.drain(..15);
        }
    }
    drop(open);
    let took = started.elapsed();
    for host in &hosts {
        // Under every host's own limit: no host dropped it for its rate.
        ensure!(
            host.agent.counter(Reason::ConnectionRate).packets == 0,
            "a host's own limit dropped the source"
        );
        ensure!(!host.serves(shared).await, "a host still serves the source");
    }
    ensure!(
        hosts.iter().any(|h| h
            .agent
            .stdout()
            .iter()
            .any(|l| l.contains("\"event\":\"fleet_limit_ban\""))),
        "no fleet_limit_ban event"
    );
    // top --fleet showed it with the hosts that reported it.
    let out = hosts[0].agent.cli(&["top", "--fleet", "--once"]);
    let top = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(top.contains("source"), "top --fleet: {top}");
    eprintln!("fleet limit: banned everywhere after {took:?}");
    Ok(())
}

/// `deny add NET --ttl 1h` on `agent`, then waits until Redis holds it as
/// decided by `host`.
async fn deny_reaches_redis(
    agent: &Agent,
    redis: &RedisServer,
    net: &str,
    host: &str,
) -> Result<()> {
    let out = agent.cli(&["deny", "add", net, "--ttl", "1h"]);
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = format!("wsguard:deny:{net}");
    wait_until("the decision in Redis", 2 * SECOND, || {
        let value = redis.cli(&["GET", &key]).ok()?;
        value.contains(host).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_reaches_redis_over_tcp() -> Result<()> {
    // Redis in the lab's client namespace, on one of its addresses; the
    // agent (in the server namespace) reaches it over the lab's veth.
    let lab = Lab::new()?;
    let redis_addr = lab.client_v4(41);
    let redis = RedisServer::start_tcp(&lab.client.name, redis_addr, 6390)?;
    let body = format!(
        "[protect]\nports = [8080]\n[fleet]\nredis_url = \"redis://{redis_addr}:6390\"\nhost_id = \"host-tcp\"\n"
    );
    let agent = Agent::start(&lab, &body)?;
    agent.wait_fleet_connected(5 * SECOND).await?;
    deny_reaches_redis(&agent, &redis, "198.19.240.0/24", "host-tcp").await?;
    let ttl: i64 = redis
        .cli(&["PTTL", "wsguard:deny:198.19.240.0/24"])?
        .trim()
        .parse()?;
    ensure!(
        (3_500_000..=3_600_000).contains(&ttl),
        "the key expires with the entry: {ttl} ms left"
    );
    // The report `status --fleet` reads goes with the agent.
    let report = wsguard::fleet::report_path(&wsguard::kernel::pin_dir(&agent.pin_path));
    ensure!(report.exists(), "no fleet report at {}", report.display());
    agent.stop()?;
    ensure!(!report.exists(), "{} outlived the agent", report.display());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_reaches_redis_over_tls_and_trusts_only_the_ca_it_is_given() -> Result<()> {
    // Redis with TLS only, in the lab's client namespace; its certificate
    // is signed by a CA of the test's own, which no system store holds.
    let lab = Lab::new()?;
    let redis_addr = lab.client_v4(40);
    let redis = RedisServer::start_tls(&lab.client.name, redis_addr, 6391)?;
    let body = |extra: &str| {
        format!(
            "[protect]\nports = [8080]\n[fleet]\nredis_url = \"rediss://{redis_addr}:6391\"\nhost_id = \"host-tls\"\n{extra}"
        )
    };
    // Without ca_file the system's CAs are trusted, and they do not sign
    // this server: refused, and it says why.
    let untrusting = Agent::start(&lab, &body(""))?;
    let report = wait_until("the certificate refused", 5 * SECOND, || {
        untrusting.fleet_report().filter(|r| {
            r["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("certificate is not trusted (fleet.ca_file"))
        })
    })
    .await?;
    ensure!(report["connected"] == false, "{report}");
    drop(untrusting);

    let agent = Agent::start(
        &lab,
        &body(&format!("ca_file = \"{}\"\n", redis.ca_file().display())),
    )?;
    agent.wait_fleet_connected(5 * SECOND).await?;
    deny_reaches_redis(&agent, &redis, "198.19.241.0/24", "host-tls").await?;
    Ok(())
}
