//! The I/O half of handshake inspection: reads the kernel's stream records,
//! feeds them to [`Streams`], and carries out its actions: bytes put back
//! into the server's socket through the injection socket, verdicts written
//! for the kernel, rejected connections cut (SOCK_DESTROY), events,
//! counters and bans for repeat offenders.

mod destroy;

use std::{
    collections::HashMap,
    io::Write,
    net::{IpAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tracing::{debug, warn};
use wsguard_common::{RecordHeader, Release, SourceKey, StreamPeers, UserKey};

use crate::{
    config::{Config, UserPolicy},
    events::{Event, EventSink, source_prefix},
    handshake::{
        Rejection,
        streams::{Action, Outside, Peers, Settings, Streams, peers_of},
        ticket::User,
    },
    kernel::{self, Kernel, Maps},
    metrics::AgentCounters,
    users::{Cut, Users},
};

/// Whether user cuts are only reported: the limits' dry run.
fn users_dry_run(config: &Config) -> bool {
    config
        .settings
        .is_dry_run(wsguard_common::Reason::UserByteRate)
}

/// What the verdicts ask of the kernel and the user registry.
struct Judging<'a> {
    kernel: &'a mut Kernel,
    users: &'a mut Users,
    policy: &'a UserPolicy,
}

impl<'a> Judging<'a> {
    fn new(users: &'a mut Users, cx: &'a mut Context) -> Judging<'a> {
        Judging {
            kernel: cx.kernel,
            users,
            policy: &cx.config.users,
        }
    }
}

impl Outside for Judging<'_> {
    fn exempt(&self, client: IpAddr) -> bool {
        self.kernel.is_allow_listed(client)
    }

    fn admit_user(&mut self, user: &User, cookie: u64, peers: Peers) -> Result<(), Rejection> {
        self.users
            .admit(self.kernel, self.policy, user, cookie, peers)
    }
}

/// Rejections per source within the ban window.
#[derive(Default)]
pub struct Failures {
    by_source: HashMap<SourceKey, (u32, Instant)>,
}

impl Failures {
    /// Counts one; returns true when the source reached `threshold`.
    fn add(&mut self, source: SourceKey, window: Duration, threshold: u32, now: Instant) -> bool {
        if self.by_source.len() > 100_000 {
            self.by_source
                .retain(|_, (_, since)| now.duration_since(*since) < window);
        }
        let entry = self.by_source.entry(source).or_insert((0, now));
        if now.duration_since(entry.1) >= window {
            *entry = (0, now);
        }
        entry.0 += 1;
        if threshold != 0 && entry.0 >= threshold {
            entry.0 = 0;
            return true;
        }
        false
    }
}

/// The agent's end of the injection path: a loopback TCP connection whose
/// client socket is in `WSG_INJECTOR`; what the agent writes to it is put
/// into the receive queue of the connection named in `WSG_INJECT_TO`.
pub struct Injector {
    socket: TcpStream,
    /// The other end, kept open (it never receives anything).
    _peer: TcpStream,
}

impl Injector {
    pub fn open(kernel: &mut Kernel) -> Result<Injector> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .or_else(|e| {
                // A fresh network namespace has its loopback down.
                kernel::bring_up_loopback()?;
                TcpListener::bind("127.0.0.1:0").with_context(|| format!("{e}"))
            })
            .context("handshake inspection needs a loopback TCP socket for its injection path")?;
        let socket = TcpStream::connect(listener.local_addr()?)?;
        let (peer, _) = listener.accept()?;
        socket.set_nodelay(true)?;
        socket.set_write_timeout(Some(Duration::from_secs(1)))?;
        kernel.attach_injector(&socket)?;
        Ok(Injector {
            socket,
            _peer: peer,
        })
    }

    /// Puts `bytes` into connection `cookie`'s receive queue. A redirect
    /// that fails leaves its verdict stuck on the sending socket (the kernel
    /// keeps applying it to what that socket sends next), so after a failure
    /// the injection socket is replaced and the bytes sent once more.
    fn put(&mut self, kernel: &mut Kernel, cookie: u64, bytes: &[u8]) -> Result<()> {
        kernel.set_inject_target(cookie)?;
        // One sendmsg is one redirect; keep each well within a message's
        // scatterlist.
        for chunk in bytes.chunks(16 * 1024) {
            if self.socket.write_all(chunk).is_err() {
                *self = Injector::open(kernel).context("cannot open a new injection socket")?;
                self.socket
                    .write_all(chunk)
                    .context("the connection did not take the judged bytes")?;
            }
        }
        Ok(())
    }
}

pub struct Inspection {
    streams: Streams,
    users: Users,
    injector: Injector,
    failures: Failures,
    /// The admission flag as last written to the kernel (`None`: not yet).
    admission_full: Option<bool>,
}

pub fn settings(config: &Config) -> Settings {
    Settings {
        policy: config.handshake.policy.clone(),
        deadline: config.handshake.deadline,
        max_pending: config.handshake.max_pending,
        dry_run: config
            .settings
            .is_dry_run(wsguard_common::Reason::FlowRejected),
        replay_capacity: config.handshake.replay_cache_size.map(|c| c as usize),
    }
}

/// What carrying out actions needs from the daemon.
pub struct Context<'a> {
    pub kernel: &'a mut Kernel,
    pub config: &'a Config,
    pub sink: &'a mut EventSink,
    pub counters: &'a AgentCounters,
    /// Where this host's bans go for the rest of the fleet.
    pub fleet: &'a crate::fleet::Fleet,
}

impl Inspection {
    /// Opens the injection path and takes over the connections an earlier
    /// agent left awaiting a verdict. Those whose bytes are all still in the
    /// (pinned) ring buffer are judged as usual; those whose first bytes that
    /// agent had already read show a hole and are cut, and those that stay
    /// silent meet the deadline.
    pub fn start(cx: &mut Context) -> Result<Inspection> {
        let injector = Injector::open(cx.kernel)?;
        let users = Users::rebuild(cx.kernel).unwrap_or_else(|e| {
            warn!("cannot read back the users an earlier agent bound: {e:#}");
            Users::default()
        });
        let mut inspection = Inspection {
            streams: Streams::new(settings(cx.config)),
            users,
            injector,
            failures: Failures::default(),
            admission_full: None,
        };
        let now = Instant::now();
        for (cookie, stream) in cx.kernel.streams()? {
            if cx.kernel.release_of(cookie).is_none() {
                let actions = inspection
                    .streams
                    .opened(cookie, peers_of(&stream.peers), now);
                inspection.carry_out(cx, actions);
            }
        }
        // The flag an earlier agent left in the pinned settings.
        inspection.update_admission(cx);
        Ok(inspection)
    }

    pub fn reconfigure(&mut self, cx: &mut Context) {
        self.streams.configure(settings(cx.config));
        self.users.reclassify(cx.kernel, &cx.config.users);
    }

    pub fn pending(&self) -> usize {
        self.streams.pending()
    }

    pub fn replay_fill(&self) -> Option<(usize, usize)> {
        self.streams.replay_fill()
    }

    /// Users with a connection open now.
    pub fn connected_users(&self) -> usize {
        self.users.connected()
    }

    /// One record from the kernel.
    pub fn on_record(&mut self, cx: &mut Context, record: &[u8]) {
        let size = std::mem::size_of::<RecordHeader>();
        if record.len() < size {
            return;
        }
        // SAFETY: the kernel wrote a RecordHeader first; read it unaligned.
        let header: RecordHeader = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
        let rest = &record[size..];
        let now = Instant::now();
        let actions = match header.kind {
            RecordHeader::OPENED | RecordHeader::REFUSED => {
                if rest.len() < std::mem::size_of::<StreamPeers>() {
                    return;
                }
                // SAFETY: StreamPeers follows the header.
                let peers: StreamPeers = unsafe { std::ptr::read_unaligned(rest.as_ptr().cast()) };
                let peers = peers_of(&peers);
                debug!(
                    "connection {:#x} {} -> {} ({})",
                    header.cookie, peers.0, peers.1, header.kind
                );
                if header.kind == RecordHeader::OPENED {
                    self.streams.opened(header.cookie, peers, now)
                } else {
                    vec![self.streams.reject_unknown(
                        header.cookie,
                        peers,
                        Rejection::InspectionLost,
                    )]
                }
            }
            RecordHeader::DATA => {
                let len = (header.len as usize).min(rest.len());
                debug!(
                    "{} bytes at {} of connection {:#x}",
                    len, header.offset, header.cookie
                );
                self.on_data(cx, header.cookie, header.offset, &rest[..len], now)
            }
            RecordHeader::CLOSED => {
                self.streams.closed(header.cookie);
                self.users.closed(header.cookie);
                cx.kernel.remove_release(header.cookie);
                Vec::new()
            }
            RecordHeader::USER => {
                self.on_user_signal(cx, header.cookie);
                Vec::new()
            }
            _ => Vec::new(),
        };
        self.carry_out(cx, actions);
    }

    fn on_data(
        &mut self,
        cx: &mut Context,
        cookie: u64,
        offset: u64,
        bytes: &[u8],
        now: Instant,
    ) -> Vec<Action> {
        let unix_now = crate::agent_file::now_unix();
        let mut judging = Judging::new(&mut self.users, cx);
        if let Some(actions) = self
            .streams
            .data(cookie, offset, bytes, now, unix_now, &mut judging)
        {
            return actions;
        }
        // Not known: an upgraded connection the agent already forgot, whose
        // last bytes the kernel handed over before it saw the release.
        if let Some(release) = cx.kernel.release_of(cookie) {
            if release.state == Release::ACCEPTED && release.upto == offset {
                return vec![
                    Action::Inject {
                        cookie,
                        bytes: bytes.to_vec(),
                    },
                    Action::Release {
                        cookie,
                        upto: offset + bytes.len() as u64,
                    },
                ];
            }
            if release.state == Release::REJECTED {
                return Vec::new();
            }
        }
        // Its OPENED record was lost: adopt it if nothing is missing.
        let Some(stream) = cx.kernel.stream(cookie) else {
            return Vec::new();
        };
        let peers = peers_of(&stream.peers);
        if offset != 0 {
            return vec![
                self.streams
                    .reject_unknown(cookie, peers, Rejection::InspectionLost),
            ];
        }
        let mut actions = self.streams.opened(cookie, peers, now);
        if actions.is_empty() {
            let mut judging = Judging::new(&mut self.users, cx);
            actions = self
                .streams
                .data(cookie, offset, bytes, now, unix_now, &mut judging)
                .unwrap_or_default();
        }
        actions
    }

    /// Connections past their deadline; the kernel's admission flag.
    pub fn tick(&mut self, cx: &mut Context) {
        let mut judging = Judging::new(&mut self.users, cx);
        let actions = self.streams.expire(Instant::now(), &mut judging);
        self.carry_out(cx, actions);
        self.admission_full = None;
        self.update_admission(cx);
    }

    /// The kernel says user `key` stayed over budget too long, or is banned.
    fn on_user_signal(&mut self, cx: &mut Context, key: UserKey) {
        let dry_run = users_dry_run(cx.config);
        let cut = self.users.judge(
            cx.kernel,
            key,
            &cx.config.users,
            cx.config.ban_duration,
            dry_run,
        );
        self.cut_users(cx, cut.into_iter().collect(), dry_run);
    }

    /// Cuts the connections of users over budget for longer than their
    /// `over_budget_timeout` (or banned), with an event per user.
    fn cut_users(&mut self, cx: &mut Context, cuts: Vec<Cut>, dry_run: bool) {
        let ban_duration = cx.config.ban_duration;
        for cut in cuts {
            if !dry_run {
                for (cookie, peers) in &cut.connections {
                    self::cut(cx.kernel, *cookie, *peers);
                }
                cx.counters
                    .user_cuts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let started_ban = cut.banned && !cut.over_budget.is_zero();
            cx.sink.emit(Event::UserCut {
                user: cut.user.clone(),
                class: cut.class,
                connections: cut.connections.len(),
                over_budget_seconds: (cut.over_budget.as_secs_f64() * 1000.0).round() / 1000.0,
                banned: cut.banned,
                dry_run,
            });
            if started_ban && !dry_run {
                cx.fleet.decided(
                    crate::fleet::Target::User(cut.user.clone()),
                    crate::fleet::Change::Set {
                        until_ms: crate::fleet::decision::now_ms()
                            + ban_duration.as_millis() as u64,
                    },
                );
            }
            if started_ban {
                cx.sink.emit(Event::UserBanStarted {
                    user: cut.user,
                    duration_seconds: ban_duration.as_secs(),
                    dry_run,
                });
            }
        }
    }

    /// Every 10 s (`sweep`, a walk of the user map): users with nothing
    /// left to remember are forgotten, and every connected user is judged
    /// (a USER record lost to a full ring buffer, a banned user whose
    /// connections stay silent). A full map forgets idle users at once.
    pub fn housekeeping(&mut self, cx: &mut Context, sweep: bool) {
        if sweep {
            if let Err(e) = self.users.housekeeping(cx.kernel) {
                warn!("cannot sweep idle users: {e:#}");
            }
            let dry_run = users_dry_run(cx.config);
            let cuts =
                self.users
                    .sweep(cx.kernel, &cx.config.users, cx.config.ban_duration, dry_run);
            self.cut_users(cx, cuts, dry_run);
        }
    }

    /// Writes the kernel's admission flag when it changes (and on every
    /// tick, which also repairs it after a reload rewrote the settings).
    fn update_admission(&mut self, cx: &mut Context) {
        let full = self.streams.is_full();
        if self.admission_full == Some(full) {
            return;
        }
        match cx.kernel.set_pending_full(full) {
            Ok(()) => self.admission_full = Some(full),
            Err(e) => warn!("cannot update the pending-handshakes flag: {e:#}"),
        }
    }

    /// At shutdown: connections still awaiting a verdict are cut, since the
    /// bytes they sent are held here and go with the agent.
    pub fn stop(&mut self, cx: &mut Context) {
        for (cookie, peers) in self.streams.drain_pending() {
            cut(cx.kernel, cookie, peers);
        }
    }

    fn carry_out(&mut self, cx: &mut Context, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Inject { cookie, bytes } => {
                    // A connection that closed meanwhile needs nothing more.
                    if bytes.is_empty() || cx.kernel.stream(cookie).is_none() {
                        continue;
                    }
                    debug!(
                        "putting {} judged bytes into connection {cookie:#x}",
                        bytes.len()
                    );
                    if let Err(e) = self.injector.put(cx.kernel, cookie, &bytes) {
                        debug!("cannot put judged bytes into connection {cookie:#x}: {e:#}");
                        if let Some(stream) = cx.kernel.stream(cookie) {
                            let reject = self.streams.reject_unknown(
                                cookie,
                                peers_of(&stream.peers),
                                Rejection::InspectionLost,
                            );
                            self.streams.closed(cookie);
                            self.carry_out(cx, vec![reject]);
                        }
                    }
                }
                Action::Release { cookie, upto } => {
                    let release = Release {
                        state: Release::ACCEPTED,
                        _pad: 0,
                        upto,
                    };
                    if let Err(e) = cx.kernel.set_release(cookie, release) {
                        warn!("cannot record the verdict on connection {cookie:#x}: {e:#}");
                    }
                }
                Action::Accepted { upgrade, .. } => {
                    cx.counters
                        .count_handshake("accepted", if upgrade { "ok" } else { "plain_http" });
                }
                Action::Reject {
                    cookie,
                    peers,
                    reason,
                    dry_run,
                    user,
                } => self.reject(cx, cookie, peers, reason, dry_run, user),
            }
        }
        self.update_admission(cx);
    }

    fn reject(
        &mut self,
        cx: &mut Context,
        cookie: u64,
        (client, server): Peers,
        reason: Rejection,
        dry_run: bool,
        user: Option<String>,
    ) {
        if !dry_run {
            cut(cx.kernel, cookie, (client, server));
        }
        cx.counters.count_handshake(
            if dry_run { "would_reject" } else { "rejected" },
            reason.name(),
        );
        let (source, server) = (client.ip().to_canonical().to_string(), server.to_string());
        let reason_name = reason.name();
        cx.sink.emit(if reason == Rejection::Deadline {
            Event::DeadlineCut {
                source,
                server,
                reason: reason_name,
                dry_run,
            }
        } else {
            Event::HandshakeRejected {
                source,
                server,
                reason: reason_name,
                dry_run,
                user,
            }
        });
        if !reason.counts_towards_ban() {
            return;
        }
        let source = cx
            .config
            .settings
            .tracking_key(&SourceKey::from(client.ip()));
        let window = cx.config.ban_window;
        if !self.failures.add(
            source,
            window,
            cx.config.handshake.failures_before_ban,
            Instant::now(),
        ) {
            return;
        }
        let duration = cx.config.ban_duration;
        if !dry_run {
            let until_ns = kernel::monotonic_ns() + duration.as_nanos() as u64;
            match cx.kernel.ban(&source, until_ns) {
                Ok(()) => cx.fleet.banned(&source, until_ns),
                Err(e) => warn!("cannot ban {}: {e:#}", client.ip().to_canonical()),
            }
        }
        cx.sink.emit(Event::BanStarted {
            source: source_prefix(&source, cx.config.ipv4_prefix, cx.config.ipv6_prefix),
            duration_seconds: duration.as_secs(),
            dry_run,
        });
    }
}

/// Cuts a connection: the kernel drops whatever else it sends, and the
/// server's socket is destroyed.
fn cut(kernel: &mut Kernel, cookie: u64, (client, server): Peers) {
    let release = Release {
        state: Release::REJECTED,
        _pad: 0,
        upto: 0,
    };
    if let Err(e) = kernel.set_release(cookie, release) {
        warn!("cannot record the rejection of {client} -> {server}: {e:#}");
    }
    if let Err(e) = destroy::destroy(client, server, cookie) {
        debug!("SOCK_DESTROY {client} -> {server}: {e:#}");
    }
}
