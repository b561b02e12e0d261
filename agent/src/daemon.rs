//! `wsguard run`: load, attach, enforce until told to stop, detach.

use std::{os::fd::AsRawFd, path::Path};

use anyhow::{Context, Result};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};
use tracing::{error, info, warn};

use crate::{
    agent_file::{self, AgentFile},
    config::Config,
    kernel::{self, Kernel},
    status,
};

pub async fn run(config_path: &Path) -> Result<()> {
    let mut config = Config::load(config_path)?;
    kernel::check_privileges()?;
    kernel::raise_memlock();
    let pins = kernel::pin_dir(&kernel::resolve_pin_path(&config.agent.pin_path, true)?);

    let mut kernel = Kernel::load(&config, Some(&pins))?;
    spawn_kernel_log_drain(&mut kernel)?;
    let takeover = kernel.attach(&config)?;

    println!(
        "wsguard {}: enforcing {} (state pinned at {})\n{}",
        env!("CARGO_PKG_VERSION"),
        config.file.display(),
        pins.display(),
        config.summary()
    );
    if !takeover.interfaces.is_empty() {
        println!("  took over the programs left running on {} without a gap", takeover.interfaces.join(", "));
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

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut housekeeping = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = terminate.recv() => { info!("SIGTERM: stopping"); break; }
            _ = interrupt.recv() => { info!("interrupted: stopping"); break; }
            _ = hangup.recv() => {
                agent_file.reloads += 1;
                match reload(&mut kernel, &config) {
                    Ok(new) => {
                        info!(config = %new.file.display(), "reloaded");
                        println!("wsguard: reloaded {}\n{}", new.file.display(), new.summary());
                        config = new;
                        agent_file.config_loaded_at = agent_file::now_unix();
                        agent_file.last_reload_error = None;
                    }
                    Err(e) => {
                        error!("reload rejected, the running config keeps enforcing: {e:#}");
                        agent_file.last_reload_error = Some(format!("{e:#}"));
                    }
                }
                if let Err(e) = agent_file.write(&pins) {
                    warn!("cannot update the agent file: {e:#}");
                }
            }
            _ = housekeeping.tick() => {
                match kernel.sweep_expired_lists(kernel::monotonic_ns()) {
                    Ok(swept) => for (allow, net) in swept {
                        info!("runtime {} entry {net} expired", if allow { "allow" } else { "deny" });
                    },
                    Err(e) => warn!("cannot sweep expired list entries: {e:#}"),
                }
            }
        }
    }

    AgentFile::remove(&pins);
    let counters = kernel.counters()?;
    let keep = config.agent.keep_enforcing_on_exit;
    kernel.release(keep)?;
    let how = if keep { "stopped; the programs stay attached (keep_enforcing_on_exit)" } else { "detached" };
    println!("wsguard: {how}; counters at exit:\n{}", status::format_counters(&counters));
    Ok(())
}

/// Re-reads the config and rewrites the maps in place. Per-source state and
/// bans are kept. Settings that size or place kernel objects need a restart.
fn reload(kernel: &mut Kernel, current: &Config) -> Result<Config> {
    let new = Config::load(&current.file)?;
    let fixed = [
        ("agent.interfaces", current.agent.interfaces.get_ref() != new.agent.interfaces.get_ref()),
        ("agent.xdp_mode", current.agent.xdp_mode != new.agent.xdp_mode),
        ("agent.pin_path", current.agent.pin_path != new.agent.pin_path),
        ("agent.cgroup", current.agent.cgroup != new.agent.cgroup),
        ("tracking.max_sources", current.max_sources != new.max_sources),
        ("tracking.max_bans", current.max_bans != new.max_bans),
        (
            "limits.per_source.concurrent_connections (turning it on or off)",
            (current.settings.max_concurrent == 0) != (new.settings.max_concurrent == 0),
        ),
    ];
    let changed: Vec<&str> = fixed.iter().filter(|(_, c)| *c).map(|(k, _)| *k).collect();
    if !changed.is_empty() {
        anyhow::bail!("{} changed; these take effect only on restart", changed.join(", "));
    }
    kernel.apply(&new)?;
    Ok(new)
}

/// Forwards the kernel programs' aya-log records (ban started, ...) to the
/// agent's log.
fn spawn_kernel_log_drain(kernel: &mut Kernel) -> Result<()> {
    let logger = aya_log::EbpfLogger::init(kernel.ebpf_mut()).context("cannot read the kernel programs' log")?;
    let fd = logger.as_raw_fd();
    // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd
    // holds the logger, and as_raw_fd always returns that fd.
    let mut logger = unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)
        .with_context(|| format!("cannot poll the kernel log ring buffer (fd {fd})"))?;
    tokio::spawn(async move {
        loop {
            let Ok(mut ready) = logger.readable_mut().await else { break };
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    });
    Ok(())
}
