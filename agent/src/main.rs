//! The `wsguard` command line.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use wsguard::{config::Config, daemon, kernel, status};

/// Kernel-enforced WebSocket security: flood limits, allow/deny lists and bans
/// on the WebSocket ports, in XDP.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the kernel programs and enforce the config until SIGTERM
    /// or Ctrl-C (SIGHUP reloads the config).
    Run {
        #[arg(long, short, default_value = "/etc/wsguard/wsguard.toml")]
        config: PathBuf,
    },
    /// Validate a config file; prints what it would enforce, or the error with
    /// file, line and reason.
    CheckConfig { file: PathBuf },
    /// Show counters, tracked sources and bans of a running agent.
    Status {
        /// Read the pin path from this config.
        #[arg(long, short, conflicts_with = "pin_path")]
        config: Option<PathBuf>,
        /// The agent's pin_path (default /sys/fs/bpf/wsguard).
        #[arg(long)]
        pin_path: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// aya warns on every load that the kernel refuses the object's BTF (type
/// names from aya-log-ebpf that BTF does not allow); the programs do not use
/// BTF, so that warning is noise for operators.
const DEFAULT_LOG_FILTER: &str = "info,aya::bpf=error";

/// Exit codes: 0 success, 1 runtime failure, 2 invalid config or usage.
fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("WSGUARD_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER)))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(daemon::run(&config))),
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(config) => {
                println!("{}: ok\n{}", file.display(), config.summary());
                Ok(())
            }
            Err(e) => Err(e.into()),
        },
        Command::Status { config, pin_path, json } => (|| {
            let pin_path = match (config, pin_path) {
                (Some(file), _) => Config::load(&file)?.agent.pin_path,
                (None, Some(p)) => p,
                (None, None) => PathBuf::from("/sys/fs/bpf/wsguard"),
            };
            status::print(&kernel::pin_dir(&kernel::resolve_pin_path(&pin_path, false)?), json)
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsguard: error: {e:#}");
            if e.downcast_ref::<wsguard::config::ConfigError>().is_some() { ExitCode::from(2) } else { ExitCode::FAILURE }
        }
    }
}
