//! `wsguard run`: load, attach, enforce until told to stop, then detach or
//! (fail-closed) leave the programs enforcing.

use crate::kernel::Maps;
use std::{
    os::fd::AsRawFd,
    path::Path,
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
    handshake::inspection::{self, Inspection},
    kernel::{self, Kernel},
    metrics::{self, AgentCounters},
    status,
};

type Sink = Arc<Mutex<EventSink>>;

pub async fn run(config_path: &Path) -> Result<()> {
    let mut config = Config::load(config_path)?;
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
    spawn_kernel_events(&mut kernel, sink.clone(), &config)?;
    let inspecting = !config.handshake.ports.is_empty();
    // Read before attaching, so that no record of a new connection is missed.
    let mut records = if inspecting {
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
    let mut inspection = if inspecting {
        let mut sink = sink.lock().unwrap();
        Some(Inspection::start(&mut inspection::Context {
            kernel: &mut kernel,
            config: &config,
            sink: &mut sink,
            counters: &counters,
        })?)
    } else {
        None
    };
    let takeover = kernel.attach(&config)?;
    let mut missing: Vec<String> = Vec::new();
    if let Some(listen) = config.metrics_listen {
        metrics::serve(listen, pins.clone(), counters.clone()).await?;
    }

    // Signals are caught before readiness is announced: a stop that follows
    // the announcement at once is a clean stop, not a kill.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    println!(
        "wsguard {}: enforcing {} (state pinned at {})\n{}",
        env!("CARGO_PKG_VERSION"),
        config.file.display(),
        pins.display(),
        config.summary()
    );
    if !takeover.interfaces.is_empty() {
        println!(
            "  took over the programs left running on {} without a gap",
            takeover.interfaces.join(", ")
        );
    }
    info!(config = %config.file.display(), "attached and enforcing");
    let mut agent_file = AgentFile {
        pid: std::process::id(),
        config: std::fs::canonicalize(&config.file).unwrap_or_else(|_| config.file.clone()),
        config_loaded_at: agent_file::now_unix(),
        interfaces: config.agent.interfaces.get_ref().clone(),
        xdp_mode: config.agent.xdp_mode.to_string(),
        ..Default::default()
    };
    agent_file.write(&pins)?;
    sink.lock().unwrap().emit(Event::AgentStarted {
        config: agent_file.config.clone(),
        interfaces: agent_file.interfaces.clone(),
        dry_run: config.settings.dry_run != 0,
        took_over: takeover.interfaces.clone(),
    });
    notify(&[NotifyState::Ready]);

    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    let mut deadlines = tokio::time::interval(Duration::from_millis(100));
    let mut ban_watch = BanWatch::default();
    let mut sweeps = 0u32;
    loop {
        tokio::select! {
            ready = readable(&mut records) => {
                let Ok(mut ready) = ready else { break };
                let mut sink = sink.lock().unwrap();
                let mut cx = inspection::Context { kernel: &mut kernel, config: &config, sink: &mut sink, counters: &counters };
                if let Some(inspection) = inspection.as_mut() {
                    // A bounded batch, so that timers and signals get their turn.
                    for _ in 0..4096 {
                        let Some(item) = ready.get_inner_mut().next() else {
                            ready.clear_ready();
                            break;
                        };
                        inspection.on_record(&mut cx, &item);
                    }
                    counters.pending_handshakes.store(inspection.pending() as u64, Ordering::Relaxed);
                }
            }
            _ = deadlines.tick() => {
                if let Some(inspection) = inspection.as_mut() {
                    let mut sink = sink.lock().unwrap();
                    inspection.tick(&mut inspection::Context { kernel: &mut kernel, config: &config, sink: &mut sink, counters: &counters });
                    counters.pending_handshakes.store(inspection.pending() as u64, Ordering::Relaxed);
                    if let Some((used, capacity)) = inspection.replay_fill() {
                        counters.replay_cache_entries.store(used as u64, Ordering::Relaxed);
                        counters.replay_cache_capacity.store(capacity as u64, Ordering::Relaxed);
                    }
                }
            }
            _ = terminate.recv() => { info!("SIGTERM: stopping"); break; }
            _ = interrupt.recv() => { info!("interrupted: stopping"); break; }
            _ = hangup.recv() => {
                notify(&[NotifyState::Reloading]);
                agent_file.reloads += 1;
                match reload(&mut kernel, &config) {
                    Ok(new) => {
                        if new.agent.keep_enforcing_on_exit != config.agent.keep_enforcing_on_exit {
                            if let Err(e) = kernel.set_keep_enforcing(new.agent.keep_enforcing_on_exit) {
                                warn!("cannot switch keep_enforcing_on_exit: {e:#}");
                            }
                        }
                        info!(config = %new.file.display(), "reloaded");
                        println!("wsguard: reloaded {}\n{}", new.file.display(), new.summary());
                        config = new;
                        if let Some(inspection) = inspection.as_mut() {
                            inspection.reconfigure(&config);
                        }
                        agent_file.config_loaded_at = agent_file::now_unix();
                        agent_file.last_reload_error = None;
                        counters.reloads_ok.fetch_add(1, Ordering::Relaxed);
                        sink.lock().unwrap().emit(Event::ConfigReloaded { config: agent_file.config.clone() });
                    }
                    Err(e) => {
                        error!("reload rejected, the running config keeps enforcing: {e:#}");
                        agent_file.last_reload_error = Some(format!("{e:#}"));
                        counters.reloads_rejected.fetch_add(1, Ordering::Relaxed);
                        sink.lock().unwrap().emit(Event::ConfigRejected { config: agent_file.config.clone(), error: format!("{e:#}") });
                    }
                }
                if let Err(e) = agent_file.write(&pins) {
                    warn!("cannot update the agent file: {e:#}");
                }
                notify(&[NotifyState::Ready]);
            }
            _ = housekeeping.tick() => {
                if let Err(e) = housekeep(&mut kernel, &config, &sink, &mut ban_watch) {
                    warn!("housekeeping: {e:#}");
                }
                if let Some(inspection) = inspection.as_ref() {
                    let fill = (inspection.pending() as u64, inspection.replay_fill().map(|(u, c)| (u as u64, c as u64)));
                    if fill != (agent_file.pending_handshakes, agent_file.ticket_replay_cache) {
                        (agent_file.pending_handshakes, agent_file.ticket_replay_cache) = fill;
                        if let Err(e) = agent_file.write(&pins) {
                            warn!("cannot update the agent file: {e:#}");
                        }
                    }
                }
                sweeps += 1;
                if inspecting && sweeps.is_multiple_of(30) {
                    // Verdicts whose close record was lost.
                    if let Err(e) = kernel.sweep_releases() {
                        warn!("cannot sweep handshake verdicts: {e:#}");
                    }
                }
                watch_interfaces(&mut kernel, &config, &sink, &mut missing);
            }
        }
    }

    notify(&[NotifyState::Stopping]);
    if let Some(inspection) = inspection.as_mut() {
        let mut sink = sink.lock().unwrap();
        inspection.stop(&mut inspection::Context {
            kernel: &mut kernel,
            config: &config,
            sink: &mut sink,
            counters: &counters,
        });
    }
    AgentFile::remove(&pins);
    let counters = kernel.counters()?;
    let keep = config.agent.keep_enforcing_on_exit;
    kernel.release(keep)?;
    sink.lock().unwrap().emit(Event::AgentStopped {
        programs_stay_attached: keep,
    });
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

/// systemd readiness and state (a no-op outside systemd).
fn notify(state: &[NotifyState]) {
    let _ = sd_notify::notify(state);
}

/// Once a second: expire runtime list entries, notice bans that ended, and
/// close the events window.
fn housekeep(
    kernel: &mut Kernel,
    config: &Config,
    sink: &Sink,
    ban_watch: &mut BanWatch,
) -> Result<()> {
    let now = kernel::monotonic_ns();
    let mut sink = sink.lock().unwrap();
    for (allow, net) in kernel.sweep_expired_lists(now)? {
        sink.emit(Event::ListEntryExpired {
            list: if allow { "allow" } else { "deny" },
            cidr: net.to_string(),
        });
    }
    let (ended, expired) = ban_watch.update(&kernel.bans()?, now);
    for key in expired {
        let _ = kernel.remove_ban(&key);
    }
    for (key, how) in ended {
        let source = source_prefix(&key, config.ipv4_prefix, config.ipv6_prefix);
        sink.emit(Event::BanEnded { source, how });
    }
    sink.roll_window();
    Ok(())
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
    records: &mut Option<AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>>,
) -> std::io::Result<
    tokio::io::unix::AsyncFdReadyMutGuard<'_, aya::maps::RingBuf<aya::maps::MapData>>,
> {
    match records {
        Some(ring) => ring.readable_mut().await,
        None => std::future::pending().await,
    }
}

/// Notices interfaces that went away and re-attaches to those that came back
/// (a re-created veth, a re-plugged NIC): their programs died with the old
/// device.
fn watch_interfaces(kernel: &mut Kernel, config: &Config, sink: &Sink, missing: &mut Vec<String>) {
    for interface in Kernel::missing_interfaces(config) {
        if !missing.contains(&interface) {
            warn!("interface {interface} is gone; wsguard attaches again when it returns");
            sink.lock().unwrap().emit(Event::InterfaceGone {
                interface: interface.clone(),
            });
            missing.push(interface);
        }
    }
    match kernel.reattach_changed(config) {
        Ok(back) => {
            for interface in back {
                info!("interface {interface} is back: attached again");
                sink.lock().unwrap().emit(Event::InterfaceReattached {
                    interface: interface.clone(),
                });
                missing.retain(|m| *m != interface);
            }
        }
        Err(e) => warn!("cannot attach again: {e:#}"),
    }
}

/// Reads the kernel's event records (bans started) into the event sink.
fn spawn_kernel_events(kernel: &mut Kernel, sink: Sink, config: &Config) -> Result<()> {
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
                    let seconds =
                        event.until_ns.saturating_sub(kernel::monotonic_ns()) as f64 / 1e9;
                    sink.lock().unwrap().emit(Event::BanStarted {
                        source: source_prefix(&event.source, v4, v6),
                        duration_seconds: seconds.round() as u64,
                        dry_run: event.dry_run != 0,
                    });
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
