//! What the build and the tests need beyond the stable toolchain, checked
//! and installed with a word about each step.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// The toolchain that builds the kernel side (`-Z build-std=core`): the
/// nightly this kind of machine ships. agent/build.rs names it through
/// aya-build's `Toolchain::Nightly`; this is the one other place.
pub const KERNEL_TOOLCHAIN: &str = "nightly";
/// The nightly the kernel programs were last built and verified with. Another
/// one is used with a warning: it may build a different object.
const KERNEL_TOOLCHAIN_TESTED: &str = "1.97.0-nightly";
/// bpf-linker 0.10.0 links with the LLVM inside the Rust toolchain; later
/// versions want a system LLVM 21+ that Debian 12 does not package.
const BPF_LINKER_VERSION: &str = "0.10.0";

fn quiet(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_step(what: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {what}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start: {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status}): {cmd:?}");
    }
    Ok(())
}

pub fn ensure_build_tools() -> Result<()> {
    let toolchains = quiet(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the kernel programs, and was not found")?;
    if !toolchains.lines().any(|l| l.starts_with(KERNEL_TOOLCHAIN)) {
        bail!(
            "the {KERNEL_TOOLCHAIN} Rust toolchain is needed to build the kernel programs: \
             rustup toolchain install {KERNEL_TOOLCHAIN} --profile minimal"
        );
    }
    let version =
        quiet(Command::new("rustup").args(["run", KERNEL_TOOLCHAIN, "rustc", "--version"]))
            .context(format!(
                "the {KERNEL_TOOLCHAIN} toolchain is listed but its rustc does not run"
            ))?;
    if !version.contains(KERNEL_TOOLCHAIN_TESTED) {
        eprintln!(
            "xtask: warning: the kernel programs were tested with {KERNEL_TOOLCHAIN_TESTED}; \
             this machine's {KERNEL_TOOLCHAIN} is {}: the build goes on, but the object may differ",
            version.trim()
        );
    }
    let components = quiet(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        KERNEL_TOOLCHAIN,
    ]))
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        run_step(
            &format!(
                "installing rust-src for the {KERNEL_TOOLCHAIN} toolchain (needed by -Z build-std=core)"
            ),
            Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                KERNEL_TOOLCHAIN,
            ]),
        )?;
    }
    let linker = quiet(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        let found = if linker.is_empty() {
            "not installed".to_string()
        } else {
            linker.trim().to_string()
        };
        run_step(
            &format!(
                "installing bpf-linker {BPF_LINKER_VERSION} (found: {found}); this takes about a minute"
            ),
            Command::new("cargo").args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--force",
            ]),
        )?;
    }
    Ok(())
}

/// cargo-fuzz, for the fuzz targets in fuzz/ (built with the nightly toolchain).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub fn ensure_cargo_fuzz() -> Result<()> {
    let found = quiet(Command::new("cargo").args(["fuzz", "--version"])).unwrap_or_default();
    if !found.contains(CARGO_FUZZ_VERSION) {
        run_step(
            &format!(
                "installing cargo-fuzz {CARGO_FUZZ_VERSION} (for the fuzz targets); this takes about a minute"
            ),
            Command::new("cargo").args([
                "install",
                &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
                "--locked",
                "--force",
            ]),
        )?;
    }
    Ok(())
}

/// Programs the tests drive: `ip` (namespaces and veth pairs),
/// `systemd-analyze` (verifying the shipped unit), and Debian's Python with
/// its `websockets` (a second real WebSocket server, next to tungstenite),
/// Node.js (the ticket minting example is run against the test vectors),
/// Debian's redis-server (the fleet tests run their own instances).
pub fn ensure_test_tools() -> Result<()> {
    ensure_packages(&[
        ("command -v ip", "iproute2"),
        ("command -v systemd-analyze", "systemd"),
        (
            "/usr/bin/python3 -c 'import websockets'",
            "python3-websockets",
        ),
        ("command -v node", "nodejs"),
        // The fleet tests start their own instances (never the service).
        ("command -v redis-server", "redis-server"),
    ])
}

/// What the benchmarks compare against and drive: iptables and nftables.
pub fn ensure_bench_tools() -> Result<()> {
    ensure_packages(&[
        ("command -v ip", "iproute2"),
        ("command -v iptables", "iptables"),
        ("command -v nft", "nftables"),
    ])
}

/// Installs, from Debian's packages, each `(check, package)` whose check
/// (a shell command) fails.
fn ensure_packages(wanted: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(check, _)| {
            !Command::new("sh")
                .args(["-c", &format!("{check} >/dev/null 2>&1")])
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    run_step(
        "apt-get update (to install missing tools)",
        Command::new("apt-get").args(["update", "-q"]),
    )?;
    run_step(
        &format!("installing {}", missing.join(" ")),
        Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
