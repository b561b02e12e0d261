//! Many users behind one address, with and without an abusive one: the
//! scenario of the per-user limits, shared by the namespace test and
//! `cargo xtask bench` ("fairness behind one address").
//!
//! `users` WebSocket clients connect from one address of the client
//! namespace, each with a version 2 ticket naming its own user (or, for the
//! per-address comparison, with no ticket at all), and echo a short message
//! in turn for `phase`. The abuser, on the same address, sends 8 KiB
//! messages as fast as its connections take them, over
//! [`ABUSER_CONNECTIONS`] connections.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use wsguard::{
    handshake::ticket::{self, User},
    kernel::Maps,
    users::user_key,
};
use wsguard_common::Reason;

use crate::{
    Agent, Lab,
    peers::{EchoServer, WsClient, echo, ws_connect_with},
};

pub const ORIGIN: &str = "https://app.example.com";
/// The abuser floods over this many connections at once.
pub const ABUSER_CONNECTIONS: usize = 4;
const SECOND: Duration = Duration::from_secs(1);

/// A ticket secret in a file, and tickets minted with it.
pub struct Tickets {
    pub secret: Vec<u8>,
    file: tempfile::NamedTempFile,
}

impl Tickets {
    pub fn new() -> Result<Tickets> {
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(
            file.path(),
            "a shared secret for the user tests, 0123456789",
        )?;
        Ok(Tickets {
            secret: ticket::read_secret(file.path())?,
            file,
        })
    }

    /// A version 2 ticket for `user` (of `class`) bound to `client`.
    pub fn for_user(&self, user: &str, class: Option<&str>, client: IpAddr) -> String {
        ticket::mint_for_user(
            &self.secret,
            wsguard::agent_file::now_unix() + 60,
            Some(client),
            &User::new(user, class).expect("a valid user"),
        )
    }

    /// A version 1 ticket (no user).
    pub fn anonymous(&self, client: IpAddr) -> String {
        ticket::mint(
            &self.secret,
            wsguard::agent_file::now_unix() + 60,
            Some(client),
        )
    }

    /// The config body: one inspected port, tickets required (reusable),
    /// per-source limits sized for many users behind one address, and `extra`.
    pub fn config(&self, extra: &str) -> String {
        format!(
            "[protect]\nports = [8080]\n{PER_SOURCE}\
             [handshake]\ninspect_ports = [8080]\nallowed_origins = [\"{ORIGIN}\"]\ndeadline = \"2s\"\nfailures_before_ban = 3\n\
             [handshake.ticket]\nrequired = true\nsecret_file = \"{}\"\nsingle_use = false\n{extra}",
            self.file.path().display()
        )
    }
}

/// Per-source limits for an address many users share: connections for all
/// of them, and a byte budget their ordinary traffic fits in.
const PER_SOURCE: &str = "[limits.per_source]\nnew_connections = \"1000/s\"\nnew_connections_burst = 1000\nconcurrent_connections = 0\nbytes = \"1MiB/s\"\nbytes_burst = \"2MiB\"\n";

/// A WebSocket client from `client` with `ticket` (none: no ticket).
pub async fn connect(
    lab: &Lab,
    client: IpAddr,
    addr: SocketAddr,
    ticket: Option<&str>,
) -> Result<WsClient> {
    let path = ticket.map_or("/ws".to_string(), |t| format!("/ws?ticket={t}"));
    ws_connect_with(&lab.client, client, addr, &path, Some(ORIGIN), 2 * SECOND).await
}

/// Sends 8 KiB messages as fast as the connection takes them (the echo
/// server does not echo messages that large) until the connection fails or
/// `stop` is set; the bytes it sent.
pub fn flood(ws: WsClient, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let (mut tx, mut rx) = ws.split();
        tokio::spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let message = Message::binary(vec![0u8; 8192]);
            match tokio::time::timeout(5 * SECOND, tx.send(message)).await {
                Ok(Ok(())) => sent += 8192,
                _ => break,
            }
        }
        sent
    })
}

/// How often each well-behaved user sends an echo: 100 a second, about
/// 15 KB/s of frames and acknowledgements, well inside the 64 KiB/s user
/// budget of the scenarios. (Unpaced, a fast host runs several hundred
/// round trips a second per user and takes the users over their budget.)
pub const ECHO_EVERY: Duration = Duration::from_millis(10);

/// Echo round trips of `clients` in turn, a round every [`ECHO_EVERY`],
/// until `running` is cleared: every round trip's time, the failures, and
/// the clients.
pub async fn echo_rounds(
    mut clients: Vec<WsClient>,
    running: Arc<AtomicBool>,
) -> (Vec<Duration>, usize, Vec<WsClient>) {
    let mut times = Vec::new();
    let mut failures = 0;
    // The first failure of each client, told on stderr (shown when a test
    // fails).
    let mut failed = vec![false; clients.len()];
    let mut rounds = tokio::time::interval(ECHO_EVERY);
    rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while running.load(Ordering::Relaxed) {
        rounds.tick().await;
        for (i, ws) in clients.iter_mut().enumerate() {
            let started = Instant::now();
            match echo(ws, "tick", SECOND).await {
                Ok(()) => times.push(started.elapsed()),
                Err(e) => {
                    failures += 1;
                    if !std::mem::replace(&mut failed[i], true) {
                        eprintln!(
                            "echo client {i}: first failure after {} echoes: {e:#}",
                            times.len()
                        );
                    }
                }
            }
        }
    }
    (times, failures, clients)
}

/// How the users are told apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    /// A version 2 ticket per user: per-user budgets.
    Tickets,
    /// No ticket: everyone on the address shares its per-source budget.
    AddressOnly,
}

#[derive(Clone, Copy, Debug)]
pub struct Fairness {
    pub users: usize,
    pub identity: Identity,
    pub abuser: bool,
    /// How long the users echo (the abuser floods throughout).
    pub phase: Duration,
    /// `limits.per_user.over_budget_timeout`.
    pub over_budget_timeout: Duration,
}

#[derive(Clone, Debug, Default)]
pub struct FairnessReport {
    pub echoes: usize,
    pub failures: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// Echoes that took 100 ms or more: a lost packet resent by TCP.
    pub slow: usize,
    /// Packets of the well-behaved users dropped for their users' budgets
    /// (known with tickets only).
    pub others_dropped: Option<u64>,
    /// Drops of the abuser's user (with tickets).
    pub abuser_dropped: Option<u64>,
    /// Drops for the address's byte budget, whoever sent the packet.
    pub address_dropped: u64,
    /// From the abuser's first drop to its cut, if it was cut.
    pub cut_after: Option<Duration>,
    /// Bytes of the abuser the server received in the phase.
    pub abuser_bytes_per_second: f64,
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted
        .get(sorted.len().saturating_sub(1) * p / 100)
        .copied()
        .unwrap_or_default()
}

/// Runs the scenario on a lab of its own.
pub async fn run(f: Fairness) -> Result<FairnessReport> {
    let tickets = Tickets::new()?;
    let lab = Lab::new()?;
    let server = EchoServer::start(&lab.server, 8080).await?;
    let addr = SocketAddr::new(lab.server_v4().into(), 8080);
    let user_limits = format!(
        "[limits.per_user]\nbytes = \"64KiB/s\"\nbytes_burst = \"128KiB\"\nover_budget_timeout = \"{}ms\"\n[ban]\nafter_drops = 0\nusers = true\nduration = \"60s\"\n",
        f.over_budget_timeout.as_millis()
    );
    let body = match f.identity {
        Identity::Tickets => tickets.config(&user_limits),
        Identity::AddressOnly => format!(
            "[protect]\nports = [8080]\n{PER_SOURCE}[handshake]\ninspect_ports = [8080]\nallowed_origins = [\"{ORIGIN}\"]\n{user_limits}"
        ),
    };
    let agent = Agent::start(&lab, &body)?;
    let shared: IpAddr = lab.client_v4(3).into();
    let ticket_for = |user: &str| match f.identity {
        Identity::Tickets => Some(tickets.for_user(user, None, shared)),
        Identity::AddressOnly => None,
    };
    let mut clients = Vec::with_capacity(f.users);
    for i in 0..f.users {
        let mut ws = connect(
            &lab,
            shared,
            addr,
            ticket_for(&format!("user-{i}")).as_deref(),
        )
        .await?;
        echo(&mut ws, "hello", SECOND).await?;
        clients.push(ws);
    }
    let running = Arc::new(AtomicBool::new(true));
    let echoes = tokio::spawn(echo_rounds(clients, running.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let received_before = server.bytes_received();
    let started = Instant::now();
    let mut flooding = Vec::new();
    if f.abuser {
        for _ in 0..ABUSER_CONNECTIONS {
            let abuser = connect(&lab, shared, addr, ticket_for("mallory").as_deref()).await?;
            flooding.push(flood(abuser, stop.clone()));
        }
    }
    // The first drop of the abuser's bytes, and its cut, as they happen.
    let first_drop = Arc::new(AtomicU64::new(0));
    let mut cut_after = None;
    let drop_reason = match f.identity {
        Identity::Tickets => Reason::UserByteRate,
        Identity::AddressOnly => Reason::ByteRate,
    };
    while started.elapsed() < f.phase {
        if f.abuser
            && first_drop.load(Ordering::Relaxed) == 0
            && agent.counter(drop_reason).packets > 0
        {
            first_drop.store(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        if cut_after.is_none() && first_drop.load(Ordering::Relaxed) != 0 {
            let cut = agent.stdout().iter().any(|l| {
                l.contains("\"event\":\"user_cut\"") && l.contains("\"user\":\"mallory\"")
            });
            if cut {
                cut_after = Some(
                    started.elapsed() - Duration::from_nanos(first_drop.load(Ordering::Relaxed)),
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    running.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let (mut times, failures, _clients) = echoes.await?;
    let echo_bytes = times.len() as u64 * 4;
    for flooding in flooding {
        flooding.abort();
    }
    times.sort();
    let state = agent.state()?;
    let (others_dropped, abuser_dropped) = match f.identity {
        Identity::Tickets => {
            let mut others = 0;
            for i in 0..f.users {
                others += state
                    .user(user_key(&format!("user-{i}")))
                    .map_or(0, |u| u.dropped_packets);
            }
            let abuser = state
                .user(user_key("mallory"))
                .map_or(0, |u| u.dropped_packets);
            (Some(others), Some(abuser))
        }
        Identity::AddressOnly => (None, None),
    };
    let received = server.bytes_received() - received_before;
    ensure!(!times.is_empty(), "no echo completed");
    Ok(FairnessReport {
        echoes: times.len(),
        failures,
        p50: percentile(&times, 50),
        p99: percentile(&times, 99),
        max: times.last().copied().unwrap_or_default(),
        slow: times
            .iter()
            .filter(|t| **t >= Duration::from_millis(100))
            .count(),
        others_dropped,
        abuser_dropped,
        address_dropped: state.counter(Reason::ByteRate)?.packets,
        cut_after,
        abuser_bytes_per_second: received.saturating_sub(echo_bytes) as f64 / elapsed,
    })
}
