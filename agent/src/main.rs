//! The `wsguard` command line.

use std::{net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use wsguard::{
    config::{Config, ConfigError, HumanDuration},
    control::{self, InputError},
    daemon, handshake,
    kernel::{self, PinnedState},
    status::Snapshot,
    top,
};

/// Kernel-enforced WebSocket security: flood limits, allow/deny lists and bans
/// on the WebSocket ports, in XDP.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Which agent's state to use: the one whose config is given, or the one
/// pinned at a path (default /sys/fs/bpf/wsguard).
#[derive(Args, Clone)]
struct Target {
    /// Read agent.pin_path from this config file.
    #[arg(long, short, global = true, conflicts_with = "pin_path")]
    config: Option<PathBuf>,
    /// The agent's agent.pin_path.
    #[arg(long, global = true)]
    pin_path: Option<PathBuf>,
}

impl Target {
    fn pin_dir(&self) -> anyhow::Result<PathBuf> {
        let pin_path = match (&self.config, &self.pin_path) {
            (Some(file), _) => Config::load(file)?.agent.pin_path,
            (None, Some(p)) => p.clone(),
            (None, None) => PathBuf::from("/sys/fs/bpf/wsguard"),
        };
        Ok(kernel::pin_dir(&kernel::resolve_pin_path(
            &pin_path, false,
        )?))
    }

    fn state(&self) -> anyhow::Result<PinnedState> {
        PinnedState::open(&self.pin_dir()?)
    }
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
    /// Interfaces, programs, map fill, counters and bans of an agent (running
    /// or stopped).
    Status {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
        /// The fleet instead: hosts seen, each host's last report, the
        /// decisions in force and which host made each.
        #[arg(long)]
        fleet: bool,
    },
    /// The busiest sources, refreshed in place: rates, drops by reason, bans.
    Top {
        #[command(flatten)]
        target: Target,
        /// The fleet's busiest sources instead (each host's busiest, summed
        /// over the fleet), from the running agent's fleet report.
        #[arg(long)]
        fleet: bool,
        /// Time between samples, e.g. "1s" or "500ms".
        #[arg(long, default_value = "1s", value_parser = HumanDuration::parse)]
        interval: HumanDuration,
        /// Sources shown.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print one sample and exit.
        #[arg(long)]
        once: bool,
    },
    /// Runtime deny list: entries take effect at once and last until removed
    /// or expired; a reload leaves them alone.
    Deny {
        #[command(subcommand)]
        action: ListAction,
    },
    /// Runtime allow list (exempt from every limit), as for `deny`.
    Allow {
        #[command(subcommand)]
        action: ListAction,
    },
    /// The busiest users (named by version 2 tickets): bytes/s, connections,
    /// time over budget, class, ban.
    Users {
        #[command(flatten)]
        target: Target,
        /// Time the rates are measured over, e.g. "1s".
        #[arg(long, default_value = "1s", value_parser = HumanDuration::parse)]
        interval: HumanDuration,
        /// Users shown.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Active bans.
    Bans {
        #[command(subcommand)]
        action: BansAction,
    },
    /// Ask the running agent to reload its config and report the outcome.
    Reload {
        #[command(flatten)]
        target: Target,
    },
    /// Handshake tickets (see "Tickets" in the README).
    Ticket {
        #[command(subcommand)]
        action: TicketAction,
    },
    /// Writes man pages (DIR/man1) and shell completions (DIR/completions)
    /// made from this CLI's own definition; `cargo xtask deb` packages them.
    #[command(hide = true)]
    GenerateDocs { out: PathBuf },
}

/// Man pages for `wsguard` and each subcommand (`wsguard-run.1`, …), and
/// completions for bash, zsh and fish.
fn generate_docs(out: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let man = out.join("man1");
    std::fs::create_dir_all(&man)?;
    let command = Cli::command();
    let mut pages = vec![("wsguard".to_string(), command.clone())];
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("wsguard-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name)));
    }
    for (name, page) in pages {
        let mut text = Vec::new();
        clap_mangen::Man::new(page).render(&mut text)?;
        std::fs::write(man.join(format!("{name}.1")), text)?;
    }
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut Cli::command(), "wsguard", &completions)?;
    }
    Ok(())
}

#[derive(Subcommand)]
enum TicketAction {
    /// Mint a ticket for a client, printed on stdout.
    Issue {
        /// File holding the shared secret (at least 32 bytes).
        #[arg(long)]
        secret_file: PathBuf,
        /// The client's address the ticket is bound to.
        #[arg(long, required_unless_present = "unbound")]
        ip: Option<String>,
        /// Bind the ticket to no address (for policies with bind_to_source_ip = false).
        #[arg(long, conflicts_with = "ip")]
        unbound: bool,
        /// How long the ticket is valid, e.g. "60s".
        #[arg(long, default_value = "60s")]
        ttl: String,
        /// The user the ticket names (1 to 64 bytes of UTF-8): a version 2 ticket.
        #[arg(long)]
        user: Option<String>,
        /// The user's limit class (a-z, 0-9, _ and -, up to 32).
        #[arg(long, requires = "user")]
        class: Option<String>,
    },
}

#[derive(Subcommand)]
enum ListAction {
    /// Add a CIDR or address.
    Add {
        cidr: String,
        /// Remove it after this long, e.g. "10m".
        #[arg(long)]
        ttl: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Remove a runtime entry (entries from the config file stay).
    Del {
        cidr: String,
        #[command(flatten)]
        target: Target,
    },
    /// Entries in effect, with their origin (config, runtime) and expiry.
    List {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BansAction {
    List {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Ban a user: its tickets are refused and its connections cut.
    Add {
        /// The user id its tickets name.
        #[arg(long)]
        user: String,
        /// Lift the ban after this long, e.g. "10m" (default: until lifted).
        #[arg(long)]
        ttl: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Lift the ban on the source an address belongs to, or on a user.
    Del {
        #[arg(required_unless_present = "user", conflicts_with = "user")]
        addr: Option<String>,
        #[arg(long)]
        user: Option<String>,
        #[command(flatten)]
        target: Target,
    },
}

/// aya warns on every load that the kernel refuses the object's BTF (type
/// names from aya-log-ebpf that BTF does not allow); the programs do not use
/// BTF, so that warning is noise for operators.
const DEFAULT_LOG_FILTER: &str = "info,aya::bpf=error";

fn list_command(allow: bool, action: ListAction) -> anyhow::Result<()> {
    match action {
        ListAction::Add { cidr, ttl, target } => {
            let net = control::cidr(&cidr)?;
            let ttl = ttl.as_deref().map(control::ttl).transpose()?;
            control::list_add(&mut target.state()?, allow, &net, ttl)
        }
        ListAction::Del { cidr, target } => {
            control::list_del(&mut target.state()?, allow, &control::cidr(&cidr)?)
        }
        ListAction::List { target, json } => control::list_print(&target.state()?, allow, json),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(daemon::run(&config)),
        Command::CheckConfig { file } => {
            let config = Config::load(&file)?;
            println!("{}: ok\n{}", file.display(), config.summary());
            Ok(())
        }
        Command::Status {
            target,
            json,
            fleet: true,
        } => {
            let pins = target.pin_dir()?;
            let Some(report) = wsguard::fleet::FleetReport::read(&pins) else {
                anyhow::bail!(
                    "no fleet report at {}: no agent with a [fleet] table runs with its state at {}",
                    wsguard::fleet::report_path(&pins).display(),
                    pins.display()
                );
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
            Ok(())
        }
        Command::Status { target, json, .. } => {
            let snapshot = Snapshot::take(&target.state()?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&snapshot.to_json())?);
            } else {
                println!("{}", snapshot.to_text());
            }
            Ok(())
        }
        Command::Top {
            target,
            interval,
            limit,
            once,
            fleet: true,
        } => wsguard::fleet::top(
            &target.pin_dir()?,
            Duration::from_nanos(interval.nanos().max(1_000_000)),
            limit,
            once,
        ),
        Command::Top {
            target,
            interval,
            limit,
            once,
            fleet: false,
        } => top::run(
            &target.state()?,
            Duration::from_nanos(interval.nanos().max(1_000_000)),
            limit,
            once,
        ),
        Command::Deny { action } => list_command(false, action),
        Command::Allow { action } => list_command(true, action),
        Command::Bans { action } => match action {
            BansAction::List { target, json } => control::bans_print(&target.state()?, json),
            BansAction::Add { user, ttl, target } => {
                let user = control::user_id(&user)?;
                let ttl = ttl.as_deref().map(control::ttl).transpose()?;
                control::bans_add_user(&mut target.state()?, &user, ttl)
            }
            BansAction::Del {
                user: Some(user),
                target,
                ..
            } => control::bans_del_user(&mut target.state()?, &control::user_id(&user)?),
            BansAction::Del { addr, target, .. } => {
                let addr = addr.unwrap_or_default();
                let addr: IpAddr = addr
                    .trim()
                    .parse()
                    .map_err(|_| InputError(format!("\"{addr}\" is not an IP address")))?;
                control::bans_del(&mut target.state()?, addr)
            }
        },
        Command::Users {
            target,
            interval,
            limit,
            json,
        } => control::users_print(&target.state()?, interval.0, limit, json),
        Command::Reload { target } => control::reload(&target.pin_dir()?),
        Command::GenerateDocs { out } => generate_docs(&out),
        Command::Ticket {
            action:
                TicketAction::Issue {
                    secret_file,
                    ip,
                    unbound: _,
                    ttl,
                    user,
                    class,
                },
        } => {
            let ttl = control::ttl(&ttl)?;
            let address = ip
                .map(|a| {
                    a.trim()
                        .parse::<IpAddr>()
                        .map_err(|_| InputError(format!("--ip: \"{a}\" is not an IP address")))
                })
                .transpose()?;
            let secret = handshake::ticket::read_secret(&secret_file)?;
            let expires_at = wsguard::agent_file::now_unix() + ttl.0.as_secs().max(1);
            let ticket = match user {
                Some(id) => {
                    let user = handshake::ticket::User::new(&id, class.as_deref())
                        .map_err(|e| InputError(format!("--user/--class: {e}")))?;
                    handshake::ticket::mint_for_user(&secret, expires_at, address, &user)
                }
                None => handshake::ticket::mint(&secret, expires_at, address),
            };
            println!("{ticket}");
            Ok(())
        }
    }
}

/// Exit codes: 0 success, 1 runtime failure (privileges, kernel, no agent,
/// nothing to remove), 2 invalid config or operator input.
fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("WSGUARD_LOG")
                .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsguard: error: {e:#}");
            if e.downcast_ref::<ConfigError>().is_some() || e.downcast_ref::<InputError>().is_some()
            {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
