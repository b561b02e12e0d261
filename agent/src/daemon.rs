//! `wsguard run`: load, attach, enforce until told to stop, then detach or
//! (fail-closed) leave the programs enforcing.

use std::{
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context, Result};
use sd_notify::NotifyState;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};
use tracing::{error, info, warn};
use wsguard_common::Event as KernelEvent;

use crate::{
    agent_file::{self, AgentFile},
    config::Config,
    events::{BanWatch, Event, EventSink, source_prefix},
    fleet::Fleet,
    inspection::{self, Inspection},
    kernel::{self, Kernel, Maps},
    metrics::{self, AgentCounters},
    status,
};

type Sink = Arc<Mutex<EventSink>>;

/// Writes one event record. The sink is shared with the task that reads the
/// kernel's events; a panic there must not silence this side.
fn emit(sink: &Sink, event: Event) {
    sink.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .emit(event);
}

/// The inspection ring buffer, polled by the runtime.
type Records = AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>;

/// The running agent's state, with one method per thing that happens to it.
struct Daemon {
    config: Config,
    pins: PathBuf,
    kernel: Kernel,
    sink: Sink,
    counters: Arc<AgentCounters>,
    inspection: Option<Inspection>,
    agent_file: AgentFile,
    ban_watch: BanWatch,
    /// Configured interfaces that are gone (attached again when they return).
    missing: Vec<String>,
    housekeeping_ticks: u32,
    /// Interfaces whose running programs this agent took over at start.
    took_over: Vec<String>,
    fleet: Fleet,
}

pub async fn run(config_path: &Path) -> Result<()> {
    let (mut daemon, mut records) = Daemon::start(config_path).await?;
    // Signals are caught before readiness is announced: a stop that follows
    // the announcement at once is a clean stop, not a kill.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    // The CLI's nudge: it spooled a decision for the fleet.
    let mut spooled = signal(SignalKind::user_defined1())?;
    daemon.announce()?;

    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    let mut deadlines = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            ready = readable(&mut records) => {
                let Ok(mut ready) = ready else { break };
                if daemon.on_records(ready.get_inner_mut()) {
                    ready.clear_ready();
                }
            }
            _ = deadlines.tick() => daemon.on_deadline_tick(),
            _ = terminate.recv() => { info!("SIGTERM: stopping"); break; }
            _ = interrupt.recv() => { info!("interrupted: stopping"); break; }
            _ = hangup.recv() => daemon.on_reload(),
            _ = spooled.recv() => daemon.fleet.drain_spool(&daemon.pins),
            _ = housekeeping.tick() => daemon.on_housekeeping(),
        }
    }
    daemon.shutdown()
}

impl Daemon {
    /// Loads the programs, starts inspection and attaches: enforcing from
    /// here on. Returns the inspection records to poll, when inspecting.
    async fn start(config_path: &Path) -> Result<(Daemon, Option<Records>)> {
        let config = Config::load(config_path)?;
        kernel::check_privileges()?;
        kernel::raise_memlock();
        let pins = kernel::pin_dir(&kernel::resolve_pin_path(&config.agent.pin_path, true)?);
        let counters = Arc::new(AgentCounters::default());
        let sink: Sink = Arc::new(Mutex::new(EventSink::open(
            &config.events_output,
            counters.clone(),
        )?));

        let mut kernel = Kernel::load(&config, Some(&pins))?;
        spawn_kernel_log_drain(&mut kernel)?;
        let fleet = Fleet::start(&config, &pins, sink.clone(), counters.fleet.clone());
        spawn_kernel_events(&mut kernel, sink.clone(), &config, fleet.clone())?;
        let inspecting = !config.handshake.ports.is_empty();
        // Read before attaching, so that no record of a new connection is missed.
        let records = if inspecting {
            let ring = kernel.take_stream_records()?;
            // SAFETY: the ring buffer owns its fd for as long as the AsyncFd holds it.
            Some(
                unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                    .map_err(std::io::Error::from)
                    .context("cannot poll the inspection ring buffer")?,
            )
        } else {
            None
        };
        let inspection = if inspecting {
            let mut sink = sink
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            Some(Inspection::start(&mut inspection::Context {
                kernel: &mut kernel,
                config: &config,
                sink: &mut sink,
                counters: &counters,
                fleet: &fleet,
            })?)
        } else {
            None
        };
        let takeover = kernel.attach(&config)?;
        if let Some(listen) = config.metrics_listen {
            metrics::serve(listen, pins.clone(), counters.clone()).await?;
        }
        let agent_file = AgentFile {
            pid: std::process::id(),
            config: std::fs::canonicalize(&config.file).unwrap_or_else(|_| config.file.clone()),
            config_loaded_at: agent_file::now_unix(),
            interfaces: config.interfaces.clone(),
            xdp_mode: config.agent.xdp_mode.to_string(),
            fleet: config.fleet.is_some(),
            ..Default::default()
        };
        emit(
            &sink,
            Event::AgentStarted {
                config: agent_file.config.clone(),
                interfaces: agent_file.interfaces.clone(),
                dry_run: config.settings.dry_run != 0,
                took_over: takeover.interfaces.clone(),
            },
        );
        let daemon = Daemon {
            config,
            pins,
            kernel,
            sink,
            counters,
            inspection,
            agent_file,
            ban_watch: BanWatch::default(),
            missing: Vec::new(),
            housekeeping_ticks: 0,
            took_over: takeover.interfaces,
            fleet,
        };
        Ok((daemon, records))
    }

    /// Says what is enforced, writes the agent file and tells systemd.
    fn announce(&mut self) -> Result<()> {
        println!(
            "wsguard {}: enforcing {} (state pinned at {})\n{}",
            env!("CARGO_PKG_VERSION"),
            self.config.file.display(),
            self.pins.display(),
            self.config.summary()
        );
        if !self.took_over.is_empty() {
            println!(
                "  took over the programs left running on {} without a gap",
                self.took_over.join(", ")
            );
        }
        info!(config = %self.config.file.display(), "attached and enforcing");
        self.agent_file.write(&self.pins)?;
        notify(&[NotifyState::Ready]);
        Ok(())
    }

    /// Runs `f` with what inspection needs, when inspecting.
    fn with_inspection(&mut self, f: impl FnOnce(&mut Inspection, &mut inspection::Context)) {
        if let Some(inspection) = self.inspection.as_mut() {
            let mut sink = self
                .sink
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut cx = inspection::Context {
                kernel: &mut self.kernel,
                config: &self.config,
                sink: &mut sink,
                counters: &self.counters,
                fleet: &self.fleet,
            };
            f(inspection, &mut cx);
            self.counters
                .pending_handshakes
                .store(inspection.pending() as u64, Ordering::Relaxed);
            self.counters
                .connected_users
                .store(inspection.connected_users() as u64, Ordering::Relaxed);
        }
    }

    /// Inspection records from the kernel, a bounded batch so that timers
    /// and signals get their turn. Returns whether the ring was drained.
    fn on_records(&mut self, ring: &mut aya::maps::RingBuf<aya::maps::MapData>) -> bool {
        let mut drained = false;
        self.with_inspection(|inspection, cx| {
            for _ in 0..4096 {
                let Some(item) = ring.next() else {
                    drained = true;
                    return;
                };
                inspection.on_record(cx, &item);
            }
        });
        drained
    }

    /// Every 100 ms: handshake deadlines.
    fn on_deadline_tick(&mut self) {
        self.with_inspection(|inspection, cx| inspection.tick(cx));
        self.fleet.drain_spool(&self.pins);
        if let Some((used, capacity)) = self.inspection.as_ref().and_then(|i| i.replay_fill()) {
            let c = &self.counters;
            c.replay_cache_entries.store(used as u64, Ordering::Relaxed);
            c.replay_cache_capacity
                .store(capacity as u64, Ordering::Relaxed);
        }
    }

    /// SIGHUP: the new config enforces, or the old one keeps enforcing and
    /// the rejection is reported.
    fn on_reload(&mut self) {
        notify(&[NotifyState::Reloading]);
        self.agent_file.reloads += 1;
        match reload(&mut self.kernel, &self.config) {
            Ok(new) => {
                let keep = new.agent.keep_enforcing_on_exit;
                if keep != self.config.agent.keep_enforcing_on_exit {
                    if let Err(e) = self.kernel.set_keep_enforcing(keep) {
                        warn!("cannot switch keep_enforcing_on_exit: {e:#}");
                    }
                }
                info!(config = %new.file.display(), "reloaded");
                println!(
                    "wsguard: reloaded {}\n{}",
                    new.file.display(),
                    new.summary()
                );
                self.config = new;
                self.with_inspection(|inspection, cx| inspection.reconfigure(cx));
                self.agent_file.config_loaded_at = agent_file::now_unix();
                self.agent_file.last_reload_error = None;
                self.counters.reloads_ok.fetch_add(1, Ordering::Relaxed);
                let config = self.agent_file.config.clone();
                emit(&self.sink, Event::ConfigReloaded { config });
            }
            Err(e) => {
                error!("reload rejected, the running config keeps enforcing: {e:#}");
                self.agent_file.last_reload_error = Some(format!("{e:#}"));
                self.counters
                    .reloads_rejected
                    .fetch_add(1, Ordering::Relaxed);
                let (config, error) = (self.agent_file.config.clone(), format!("{e:#}"));
                emit(&self.sink, Event::ConfigRejected { config, error });
            }
        }
        if let Err(e) = self.agent_file.write(&self.pins) {
            warn!("cannot update the agent file: {e:#}");
        }
        notify(&[NotifyState::Ready]);
    }

    /// Once a second: expire runtime list entries, notice bans that ended,
    /// close the events window, keep the agent file's fill levels current,
    /// sweep lost verdicts (every 30 s) and watch the interfaces.
    fn on_housekeeping(&mut self) {
        if let Err(e) = self.expire_lists_and_bans() {
            warn!("housekeeping: {e:#}");
        }
        let sweep = self.housekeeping_ticks.is_multiple_of(10);
        self.with_inspection(|inspection, cx| inspection.housekeeping(cx, sweep));
        if let Some(inspection) = self.inspection.as_ref() {
            let fill = (
                inspection.pending() as u64,
                inspection.replay_fill().map(|(u, c)| (u as u64, c as u64)),
            );
            let file = &mut self.agent_file;
            if fill != (file.pending_handshakes, file.ticket_replay_cache) {
                (file.pending_handshakes, file.ticket_replay_cache) = fill;
                if let Err(e) = file.write(&self.pins) {
                    warn!("cannot update the agent file: {e:#}");
                }
            }
        }
        self.housekeeping_ticks += 1;
        if self.inspection.is_some() && self.housekeeping_ticks.is_multiple_of(30) {
            // Verdicts whose close record was lost.
            if let Err(e) = self.kernel.sweep_releases() {
                warn!("cannot sweep handshake verdicts: {e:#}");
            }
        }
        self.watch_interfaces();
    }

    /// Stops inspection and lets go of the programs: detached, or (with
    /// `keep_enforcing_on_exit`) left enforcing.
    fn shutdown(mut self) -> Result<()> {
        notify(&[NotifyState::Stopping]);
        self.with_inspection(|inspection, cx| inspection.stop(cx));
        AgentFile::remove(&self.pins);
        let counters = self.kernel.counters()?;
        let keep = self.config.agent.keep_enforcing_on_exit;
        self.kernel.release(keep)?;
        emit(
            &self.sink,
            Event::AgentStopped {
                programs_stay_attached: keep,
            },
        );
        let how = if keep {
            "stopped; the programs stay attached (keep_enforcing_on_exit)"
        } else {
            "detached"
        };
        println!(
            "wsguard: {how}; counters at exit:\n{}",
            status::format_counters(&counters)
        );
        Ok(())
    }

    fn expire_lists_and_bans(&mut self) -> Result<()> {
        let now = kernel::monotonic_ns();
        let config = &self.config;
        let mut sink = self
            .sink
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (allow, net) in self.kernel.sweep_expired_lists(now)? {
            sink.emit(Event::ListEntryExpired {
                list: if allow { "allow" } else { "deny" },
                cidr: net.to_string(),
            });
        }
        let (ended, expired) = self.ban_watch.update(&self.kernel.bans()?, now);
        for key in expired {
            let _ = self.kernel.remove_ban(&key);
        }
        for (key, how) in ended {
            let source = source_prefix(&key, config.ipv4_prefix, config.ipv6_prefix);
            sink.emit(Event::BanEnded { source, how });
        }
        sink.roll_window();
        Ok(())
    }

    /// Notices interfaces that went away and re-attaches to those that came
    /// back (a re-created veth, a re-plugged NIC): their programs died with
    /// the old device.
    fn watch_interfaces(&mut self) {
        for interface in Kernel::missing_interfaces(&self.config) {
            if !self.missing.contains(&interface) {
                warn!("interface {interface} is gone; wsguard attaches again when it returns");
                let gone = interface.clone();
                emit(&self.sink, Event::InterfaceGone { interface: gone });
                self.missing.push(interface);
            }
        }
        match self.kernel.reattach_changed(&self.config) {
            Ok(back) => {
                for interface in back {
                    info!("interface {interface} is back: attached again");
                    self.missing.retain(|m| *m != interface);
                    emit(&self.sink, Event::InterfaceReattached { interface });
                }
            }
            Err(e) => warn!("cannot attach again: {e:#}"),
        }
    }
}

/// systemd readiness and state (a no-op outside systemd).
fn notify(state: &[NotifyState]) {
    let _ = sd_notify::notify(state);
}

/// Re-reads the config and rewrites the maps in place. Per-source state and
/// bans are kept. Settings that size or place kernel objects need a restart.
fn reload(kernel: &mut Kernel, current: &Config) -> Result<Config> {
    let new = Config::load(&current.file)?;
    let changed = current.restart_only_changes(&new);
    if !changed.is_empty() {
        anyhow::bail!(
            "{} changed; these take effect only on restart",
            changed.join(", ")
        );
    }
    kernel.apply(&new)?;
    Ok(new)
}

/// Waits until the inspection ring buffer has records (forever when
/// inspection is off).
async fn readable(
    records: &mut Option<Records>,
) -> std::io::Result<
    tokio::io::unix::AsyncFdReadyMutGuard<'_, aya::maps::RingBuf<aya::maps::MapData>>,
> {
    match records {
        Some(ring) => ring.readable_mut().await,
        None => std::future::pending().await,
    }
}

/// Reads the kernel's event records (bans started) into the event sink.
fn spawn_kernel_events(
    kernel: &mut Kernel,
    sink: Sink,
    config: &Config,
    fleet: Fleet,
) -> Result<()> {
    let ring = kernel.take_events()?;
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd holds it.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)
        .context("cannot poll the events ring buffer")?;
    let (v4, v6) = (config.ipv4_prefix, config.ipv6_prefix);
    tokio::spawn(async move {
        loop {
            let Ok(mut ready) = ring.readable_mut().await else {
                break;
            };
            while let Some(item) = ready.get_inner_mut().next() {
                if item.len() < std::mem::size_of::<KernelEvent>() {
                    continue;
                }
                // SAFETY: the kernel wrote an Event; read it unaligned.
                let event: KernelEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                if event.kind == KernelEvent::BAN_STARTED {
                    if event.dry_run == 0 {
                        fleet.banned(&event.source, event.until_ns);
                    }
                    let seconds =
                        event.until_ns.saturating_sub(kernel::monotonic_ns()) as f64 / 1e9;
                    emit(
                        &sink,
                        Event::BanStarted {
                            source: source_prefix(&event.source, v4, v6),
                            duration_seconds: seconds.round() as u64,
                            dry_run: event.dry_run != 0,
                        },
                    );
                }
            }
            ready.clear_ready();
        }
    });
    Ok(())
}

/// Forwards the kernel programs' aya-log records (ban started, ...) to the
/// agent's log.
fn spawn_kernel_log_drain(kernel: &mut Kernel) -> Result<()> {
    let logger = aya_log::EbpfLogger::init(kernel.ebpf_mut())
        .context("cannot read the kernel programs' log")?;
    let fd = logger.as_raw_fd();
    // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd
    // holds the logger, and as_raw_fd always returns that fd.
    let mut logger =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)
            .with_context(|| format!("cannot poll the kernel log ring buffer (fd {fd})"))?;
    tokio::spawn(async move {
        loop {
            let Ok(mut ready) = logger.readable_mut().await else {
                break;
            };
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    });
    Ok(())
}
