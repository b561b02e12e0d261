//! `cargo xtask`: build, run and test wsguard, installing what the build
//! needs on a fresh machine first.

mod prerequisites;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, run and test wsguard")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install build prerequisites and build target/release/wsguard.
    Build,
    /// Build, then run the agent (as root). Without arguments it protects
    /// ports 80 and 8080 on the loopback interface
    /// (packaging/wsguard.loopback.toml); `-- --config FILE` runs another config.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then run every test (unit, BPF_PROG_TEST_RUN and namespace
    /// tests) against the running kernel (as root). Extra arguments go to
    /// `cargo test`.
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn run(cli: Cli) -> Result<()> {
    let root = workspace_root();
    match cli.command {
        Task::Build => {
            build(&root)?;
        }
        Task::Run { args } => {
            let binary = build(&root)?;
            require_root("cargo xtask run")?;
            let args = if args.is_empty() {
                vec!["--config".to_string(), root.join("packaging/wsguard.loopback.toml").display().to_string()]
            } else {
                args
            };
            eprintln!("xtask: running {} run {}", binary.display(), args.join(" "));
            let status = Command::new(&binary).arg("run").args(&args).status()?;
            if !status.success() {
                bail!("wsguard exited with {status}");
            }
        }
        Task::Test { args } => {
            let binary = build(&root)?;
            require_root("cargo xtask test")?;
            prerequisites::ensure_test_tools()?;
            let mut child = Command::new(cargo())
                .current_dir(&root)
                .args(["test", "--release", "--no-fail-fast"])
                .args(&args)
                .env("WSGUARD_BIN", &binary)
                .stdout(Stdio::piped())
                .spawn()
                .context("cannot run cargo test")?;
            // Pass the output through and add up the test binaries' results.
            let (mut passed, mut failed) = (0u64, 0u64);
            for line in BufReader::new(child.stdout.take().unwrap()).lines() {
                let line = line?;
                println!("{line}");
                if let Some((p, f)) = parse_test_result(&line) {
                    passed += p;
                    failed += f;
                }
            }
            let status = child.wait()?;
            println!("tests: {passed} passed, {failed} failed");
            if !status.success() {
                bail!("tests failed ({status})");
            }
        }
    }
    Ok(())
}

/// (passed, failed) from a libtest line such as
/// "test result: ok. 16 passed; 0 failed; 0 ignored; …".
fn parse_test_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |word: &str| {
        rest.split(';').find_map(|part| part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(word)?.trim().parse().ok())
    };
    Some((count(" passed")?, count(" failed")?))
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

/// Installs the kernel-side toolchain pieces and builds the release binary
/// (agent/build.rs builds the eBPF object and embeds it).
fn build(root: &Path) -> Result<PathBuf> {
    prerequisites::ensure_build_tools()?;
    let status = Command::new(cargo())
        .current_dir(root)
        .args(["build", "--release", "--package", "wsguard"])
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("build failed ({status})");
    }
    let binary = root.join("target/release/wsguard");
    eprintln!("xtask: built {}", binary.display());
    Ok(binary)
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("{what} loads BPF programs and creates network namespaces: run it as root (e.g. sudo -E cargo xtask ...)");
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
