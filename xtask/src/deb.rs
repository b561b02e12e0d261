//! `cargo xtask deb`: a Debian package of the built binary, with its
//! systemd unit, its config file, man pages and shell completions made from
//! the CLI's own definition.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// The package, as `target/debian/wsguard_<version>_<arch>.deb`.
pub fn build(root: &Path, binary: &Path) -> Result<PathBuf> {
    let version = output(Command::new(binary).arg("--version"))?
        .split_whitespace()
        .nth(1)
        .context("wsguard --version printed no version")?
        .to_string();
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_string();
    let out = root.join("target/debian");
    let tree = out.join(format!("wsguard_{version}_{arch}"));
    if tree.exists() {
        std::fs::remove_dir_all(&tree)?;
    }
    let put = |path: &str, bytes: &[u8], mode: u32| -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let path = tree.join(path);
        std::fs::create_dir_all(path.parent().expect("a parent"))?;
        std::fs::write(&path, bytes)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    let read = |path: &str| -> Result<Vec<u8>> {
        std::fs::read(root.join(path)).with_context(|| format!("reading {path}"))
    };

    put("usr/bin/wsguard", &std::fs::read(binary)?, 0o755)?;
    // The unit as shipped, with the binary where the package puts it.
    let unit = String::from_utf8(read("packaging/systemd/wsguard.service")?)?
        .replace("/usr/local/bin/wsguard", "/usr/bin/wsguard");
    put("lib/systemd/system/wsguard.service", unit.as_bytes(), 0o644)?;
    put(
        "etc/wsguard/wsguard.toml",
        &read("packaging/wsguard.example.toml")?,
        0o644,
    )?;

    // Man pages and completions, from the binary itself.
    let generated = out.join("generated");
    if generated.exists() {
        std::fs::remove_dir_all(&generated)?;
    }
    run(Command::new(binary).arg("generate-docs").arg(&generated))?;
    for page in std::fs::read_dir(generated.join("man1"))? {
        let page = page?.path();
        let name = page
            .file_name()
            .and_then(|n| n.to_str())
            .context("a man page name")?;
        let raw = Command::new("gzip")
            .args(["-9n", "-c"])
            .arg(&page)
            .output()?;
        if !raw.status.success() {
            bail!("gzip failed on {name}");
        }
        put(&format!("usr/share/man/man1/{name}.gz"), &raw.stdout, 0o644)?;
    }
    let completions = generated.join("completions");
    put(
        "usr/share/bash-completion/completions/wsguard",
        &std::fs::read(completions.join("wsguard.bash"))?,
        0o644,
    )?;
    put(
        "usr/share/zsh/vendor-completions/_wsguard",
        &std::fs::read(completions.join("_wsguard"))?,
        0o644,
    )?;
    put(
        "usr/share/fish/vendor_completions.d/wsguard.fish",
        &std::fs::read(completions.join("wsguard.fish"))?,
        0o644,
    )?;

    let size_kb = du_kb(&tree)?;
    let control = format!(
        "Package: wsguard\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: wsguard <wsguard@localhost>\n\
         Installed-Size: {size_kb}\n\
         Depends: libc6\n\
         Section: net\n\
         Priority: optional\n\
         Homepage: https://github.com/wsguard/wsguard\n\
         Description: kernel-enforced WebSocket security\n \
         XDP flood limits, allow/deny lists and bans on the WebSocket ports,\n \
         handshake inspection with tickets, limits per user, and bans shared\n \
         by a fleet of hosts through Redis.\n"
    );
    put("DEBIAN/control", control.as_bytes(), 0o644)?;
    put("DEBIAN/conffiles", b"/etc/wsguard/wsguard.toml\n", 0o644)?;
    put("DEBIAN/postinst", POSTINST.as_bytes(), 0o755)?;
    put("DEBIAN/prerm", PRERM.as_bytes(), 0o755)?;
    put("DEBIAN/postrm", POSTRM.as_bytes(), 0o755)?;

    let deb = out.join(format!("wsguard_{version}_{arch}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group"])
        .arg(&tree)
        .arg(&deb))?;
    eprintln!("xtask: packaged {}", deb.display());
    Ok(deb)
}

/// Enables and starts the agent where systemd runs (it checks the config
/// first: ExecStartPre); nothing when installed into another root.
const POSTINST: &str = "#!/bin/sh
set -e
if [ -n \"$DPKG_ROOT\" ]; then exit 0; fi
if [ \"$1\" = configure ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable wsguard.service
    systemctl restart wsguard.service || echo \"wsguard: not started; see journalctl -u wsguard and /etc/wsguard/wsguard.toml\" >&2
fi
exit 0
";

const PRERM: &str = "#!/bin/sh
set -e
if [ -n \"$DPKG_ROOT\" ]; then exit 0; fi
if [ -d /run/systemd/system ] && [ \"$1\" = remove ]; then
    systemctl disable --now wsguard.service || true
fi
exit 0
";

const POSTRM: &str = "#!/bin/sh
set -e
if [ -n \"$DPKG_ROOT\" ]; then exit 0; fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
exit 0
";

fn du_kb(dir: &Path) -> Result<u64> {
    let text = output(Command::new("du").args(["-sk"]).arg(dir))?;
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("du printed no size")
}

fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn run(command: &mut Command) -> Result<()> {
    output(command).map(|_| ())
}
