//! `cargo xtask`: build, run and test wsguard, installing what the build
//! needs on a fresh machine first.

mod deb;
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
    /// Lint, build, then run every test (unit, BPF_PROG_TEST_RUN and
    /// namespace tests) against the running kernel (as root), with the
    /// binary just built; then the fuzz targets for a bounded time. Extra
    /// arguments go to each test binary (a name filter, `--exact`, ...).
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then run the benchmarks (as root): cost per packet, scale,
    /// protection under flood next to iptables and nftables, enforcement
    /// latency and overhead. Writes docs/benchmarks.md and docs/benchmarks/.
    Bench {
        /// About two minutes instead of ten: fewer rounds, shorter phases.
        #[arg(long)]
        quick: bool,
        /// Only section 1 (the kernel's cost per packet), printed as a
        /// table; docs/ is left as it is.
        #[arg(long)]
        cost_only: bool,
    },
    /// Build, then package target/debian/wsguard_<version>_<arch>.deb: the
    /// binary, the systemd unit, /etc/wsguard/wsguard.toml, man pages and
    /// shell completions.
    Deb,
    /// Check formatting (rustfmt) and lints (clippy, warnings denied) for the
    /// host crates and the kernel crate. `cargo xtask test` runs it first.
    Lint,
    /// Run the fuzz targets (fuzz/) for longer than the test run does.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// Only this target (handshake_judge, streams, config).
        target: Option<String>,
    },
}

const FUZZ_TARGETS: [&str; 3] = ["handshake_judge", "streams", "config"];
/// Seconds per fuzz target within `cargo xtask test` (WSGUARD_FUZZ_SECONDS).
const TEST_FUZZ_SECONDS: u64 = 20;

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
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
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
                vec![
                    "--config".to_string(),
                    root.join("packaging/wsguard.loopback.toml")
                        .display()
                        .to_string(),
                ]
            } else {
                args
            };
            eprintln!("xtask: running {} run {}", binary.display(), args.join(" "));
            let status = Command::new(&binary).arg("run").args(&args).status()?;
            if !status.success() {
                bail!("wsguard exited with {status}");
            }
        }
        Task::Lint => lint(&root)?,
        Task::Test { args } => {
            lint(&root)?;
            let binary = build(&root)?;
            require_root("cargo xtask test")?;
            prerequisites::ensure_test_tools()?;
            // The packaging tests install it (into a scratch root).
            let deb = deb::build(&root, &binary)?;
            let (mut passed, mut failed, mut failures) = (0u64, 0u64, Vec::<String>::new());
            for test_binary in test_binaries(&root)? {
                let outcome = run_test_binary(&test_binary, &binary, &deb, &args)?;
                passed += outcome.passed;
                failed += outcome.failed;
                failures.extend(outcome.failures);
            }
            // The fuzz targets, each for a bounded time, count as tests too.
            let seconds = std::env::var("WSGUARD_FUZZ_SECONDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(TEST_FUZZ_SECONDS);
            prerequisites::ensure_cargo_fuzz()?;
            for target in FUZZ_TARGETS {
                match fuzz(&root, target, seconds, FuzzOutput::LogFile) {
                    Ok(()) => passed += 1,
                    Err(e) => {
                        eprintln!("xtask: fuzz target {target} failed: {e:#}");
                        failed += 1;
                        failures.push(format!("fuzz target {target}"));
                    }
                }
            }
            // The names again at the very end, where a CI log's tail shows them.
            for failure in &failures {
                println!("failed: {failure}");
            }
            println!("tests: {passed} passed, {failed} failed");
            if failed > 0 {
                bail!("tests failed ({failed} failed)");
            }
        }
        Task::Deb => {
            let binary = build(&root)?;
            println!("{}", deb::build(&root, &binary)?.display());
        }
        Task::Bench { quick, cost_only } => {
            let binary = build(&root)?;
            require_root("cargo xtask bench")?;
            prerequisites::ensure_bench_tools()?;
            let status = Command::new(cargo())
                .current_dir(&root)
                .args(["run", "--release", "--package", "wsguard-bench", "--"])
                .args(quick.then_some("--quick"))
                .args(cost_only.then_some("--cost-only"))
                .args(["--docs", &root.join("docs").display().to_string()])
                .env("WSGUARD_BIN", &binary)
                .status()
                .context("cannot run the benchmarks")?;
            if !status.success() {
                bail!("the benchmarks failed ({status})");
            }
        }
        Task::Fuzz { seconds, target } => {
            prerequisites::ensure_build_tools()?;
            prerequisites::ensure_cargo_fuzz()?;
            let targets: Vec<&str> = match &target {
                Some(t) => vec![t.as_str()],
                None => FUZZ_TARGETS.to_vec(),
            };
            for target in targets {
                fuzz(&root, target, seconds, FuzzOutput::Terminal)?;
            }
        }
    }
    Ok(())
}

/// rustfmt, then clippy with warnings denied: the host crates with the
/// kernel build skipped (a stub object stands in, so no BPF toolchain is
/// needed for this half), then the kernel crate for its own target.
fn lint(root: &Path) -> Result<()> {
    let step = |what: &str, cmd: &mut Command| -> Result<()> {
        eprintln!("xtask: lint: {what}");
        let status = cmd
            .current_dir(root)
            .status()
            .with_context(|| format!("cannot run {cmd:?}"))?;
        if !status.success() {
            bail!("lint: {what} failed ({status})");
        }
        Ok(())
    };
    step(
        "rustfmt",
        Command::new(cargo()).args(["fmt", "--all", "--", "--check"]),
    )?;
    step(
        "clippy, host crates",
        Command::new(cargo())
            .args(["clippy", "--workspace", "--exclude", "wsguard-ebpf"])
            .args(["--all-targets", "--", "-D", "warnings"])
            .env("AYA_BUILD_SKIP", "1"),
    )?;
    prerequisites::ensure_build_tools()?;
    step(
        "clippy, kernel crate",
        Command::new("rustup")
            .args(["run", prerequisites::KERNEL_TOOLCHAIN, "cargo", "clippy"])
            .args(["--package", "wsguard-ebpf", "--release"])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .args(["--", "-D", "warnings"])
            .env_remove("RUSTC")
            .env_remove("RUSTC_WRAPPER"),
    )
}

/// Where libFuzzer's progress lines go: to the terminal for `cargo xtask
/// fuzz`, to a log file under `target/fuzz-logs/` for `cargo xtask test`
/// (thousands of lines that would bury the test summary; the tail is
/// printed when a target fails).
#[derive(Clone, Copy, PartialEq)]
enum FuzzOutput {
    Terminal,
    LogFile,
}

/// Runs one fuzz target for `seconds`, starting from its committed corpus
/// (new inputs go to a scratch directory, so the tree stays as it is).
fn fuzz(root: &Path, target: &str, seconds: u64, output: FuzzOutput) -> Result<()> {
    let scratch =
        std::env::temp_dir().join(format!("wsguard-fuzz-{target}-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let log_path = root.join("target/fuzz-logs").join(format!("{target}.log"));
    let mut command = Command::new("cargo");
    if output == FuzzOutput::LogFile {
        std::fs::create_dir_all(log_path.parent().expect("has a parent"))?;
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        command.stdout(log.try_clone()?).stderr(log);
        eprintln!(
            "xtask: fuzzing {target} for {seconds} s (output in {})",
            log_path.display()
        );
    } else {
        eprintln!("xtask: fuzzing {target} for {seconds} s");
    }
    let status = command
        .current_dir(root)
        .args([
            "+nightly",
            "fuzz",
            "run",
            "--fuzz-dir",
            "fuzz",
            "-O",
            target,
        ])
        .arg(&scratch)
        .arg(root.join("fuzz/corpus").join(target))
        .args([
            "--",
            &format!("-max_total_time={seconds}"),
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
        ])
        .status()
        .context("cannot run cargo fuzz")?;
    let _ = std::fs::remove_dir_all(&scratch);
    if !status.success() && output == FuzzOutput::LogFile {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for line in &lines[lines.len().saturating_sub(60)..] {
            eprintln!("{line}");
        }
    }
    if !status.success() {
        bail!("{target}: {status} (the crashing input is under fuzz/artifacts/{target})");
    }
    Ok(())
}

/// A test executable cargo built, and whether it is the integration
/// binary (namespace tests, run one at a time).
struct TestBinary {
    path: PathBuf,
    /// Its package's folder, the working directory `cargo test` gives it.
    package_dir: PathBuf,
    integration: bool,
}

/// Builds every test executable of the workspace (the kernel crate aside)
/// and returns their paths as cargo reports them in its JSON messages.
fn test_binaries(root: &Path) -> Result<Vec<TestBinary>> {
    let out = Command::new(cargo())
        .current_dir(root)
        .args(["test", "--release", "--no-run", "--workspace"])
        .args([
            "--exclude",
            "wsguard-ebpf",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the tests failed ({})", out.status);
    }
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test =
            message["reason"] == "compiler-artifact" && message["profile"]["test"] == true;
        if let (true, Some(path)) = (is_test, message["executable"].as_str()) {
            let manifest = PathBuf::from(message["manifest_path"].as_str().unwrap_or_default());
            binaries.push(TestBinary {
                path: PathBuf::from(path),
                package_dir: manifest.parent().unwrap_or(root).to_path_buf(),
                integration: message["target"]["name"] == "integration",
            });
        }
    }
    if !binaries.iter().any(|b| b.integration) {
        bail!("cargo built no integration test binary (tests/tests/integration)");
    }
    Ok(binaries)
}

struct Outcome {
    passed: u64,
    failed: u64,
    /// The failed tests' names (the binary's name when libtest named none).
    failures: Vec<String>,
}

/// Runs one test executable against the wsguard binary just built (passed
/// explicitly in WSGUARD_BIN). Its tests are counted from `--list` (with
/// the same filters); a binary that fails counts its listed tests as failed
/// unless libtest's own "failures:" list says which.
fn run_test_binary(
    test: &TestBinary,
    wsguard: &Path,
    deb: &Path,
    args: &[String],
) -> Result<Outcome> {
    let listed = Command::new(&test.path)
        .current_dir(&test.package_dir)
        .args(["--list", "--format", "terse"])
        .args(args)
        .output()
        .with_context(|| format!("cannot list the tests of {}", test.path.display()))?;
    let count = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter(|l| l.ends_with(": test"))
        .count() as u64;
    if count == 0 {
        return Ok(Outcome {
            passed: 0,
            failed: 0,
            failures: Vec::new(),
        });
    }
    eprintln!("xtask: running {} ({count} tests)", test.path.display());
    let mut command = Command::new(&test.path);
    command.current_dir(&test.package_dir);
    if test.integration {
        command.arg("--test-threads=1");
    }
    let mut child = command
        .args(args)
        .env("WSGUARD_BIN", wsguard)
        .env("WSGUARD_DEB", deb)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", test.path.display()))?;
    // Passed through as it comes, and kept to find the failures.
    let mut text = String::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        text.push_str(&line);
        text.push('\n');
    }
    if child.wait()?.success() {
        return Ok(Outcome {
            passed: count,
            failed: 0,
            failures: Vec::new(),
        });
    }
    let mut failures: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("test ")?.strip_suffix(" ... FAILED"))
        .map(str::to_string)
        .collect();
    let failed = if failures.is_empty() {
        // It died without naming a test (a crash, a panic outside a test):
        // every listed test counts as failed.
        failures.push(format!("{} (all {count} tests)", test.path.display()));
        count
    } else {
        failures.len() as u64
    };
    Ok(Outcome {
        passed: count.saturating_sub(failed),
        failed,
        failures,
    })
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
        bail!(
            "{what} loads BPF programs and creates network namespaces: run it as root (e.g. sudo -E cargo xtask ...)"
        );
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
