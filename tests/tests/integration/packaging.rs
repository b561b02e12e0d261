//! The shipped packaging: the systemd unit verifies and asks for the least
//! capabilities, the Kubernetes manifests parse, and the config inside them
//! passes `wsguard check-config`.

use std::{collections::BTreeSet, process::Command};

use serde_json::Value;
use wsguard_tests::agent::binary;

const CAPABILITIES: [&str; 4] = ["BPF", "NET_ADMIN", "NET_RAW", "PERFMON"];

fn packaging(path: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/../packaging/{path}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn yaml(path: &str) -> Value {
    serde_norway::from_str(&packaging(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_systemd_unit_verifies_and_keeps_to_the_minimum_capabilities() {
    let unit = packaging("systemd/wsguard.service");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wsguard.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/wsguard", binary().to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !report.contains("wsguard.service"),
        "systemd-analyze verify: {report}"
    );

    let value = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}="))
    };
    assert_eq!(value("Type"), "notify");
    assert_eq!(value("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(
        value("ExecStart"),
        "/usr/local/bin/wsguard run --config /etc/wsguard/wsguard.toml"
    );
    let wanted: BTreeSet<String> = CAPABILITIES.iter().map(|c| format!("CAP_{c}")).collect();
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        let caps: BTreeSet<String> = value(key).split_whitespace().map(String::from).collect();
        assert_eq!(caps, wanted, "{key}");
    }
    assert_eq!(value("NoNewPrivileges"), "yes");
}

#[test]
fn the_kubernetes_manifests_parse_and_carry_a_valid_config() {
    let config_map = yaml("kubernetes/configmap.yaml");
    assert_eq!(config_map["kind"], "ConfigMap");
    let toml = config_map["data"]["wsguard.toml"]
        .as_str()
        .expect("wsguard.toml in the ConfigMap");
    // The Secret's password, where the DaemonSet mounts it.
    let secret = yaml("kubernetes/secret.yaml");
    assert_eq!(secret["kind"], "Secret");
    let password = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        password.path(),
        secret["stringData"]["password"]
            .as_str()
            .expect("a password"),
    )
    .unwrap();
    let secret_path = "/etc/wsguard-redis/password";
    assert!(
        toml.contains(secret_path),
        "[fleet] reads the Secret's password"
    );
    let toml = toml.replace(secret_path, &password.path().display().to_string());
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), toml).unwrap();
    let out = Command::new(binary())
        .arg("check-config")
        .arg(file.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let daemon_set = yaml("kubernetes/daemonset.yaml");
    assert_eq!(daemon_set["kind"], "DaemonSet");
    let pod = &daemon_set["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    let container = &pod["containers"][0];
    let added: BTreeSet<&str> = container["securityContext"]["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(added, CAPABILITIES.into_iter().collect());
    assert_eq!(container["securityContext"]["privileged"], false);
    assert_eq!(container["ports"][0]["containerPort"], 9464);
    let volumes = pod["volumes"].as_array().unwrap();
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("volume {name}"))
    };
    assert_eq!(volume("bpffs")["hostPath"]["path"], "/sys/fs/bpf");
    assert_eq!(
        volume("config")["configMap"]["name"],
        config_map["metadata"]["name"]
    );
    let mounts = container["volumeMounts"].as_array().unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| m["name"] == "bpffs" && m["mountPath"] == "/sys/fs/bpf")
    );
    assert!(
        mounts
            .iter()
            .any(|m| m["name"] == "config" && m["mountPath"] == "/etc/wsguard")
    );
    assert_eq!(
        volume("redis-password")["secret"]["secretName"],
        secret["metadata"]["name"]
    );
    assert!(
        mounts
            .iter()
            .any(|m| m["name"] == "redis-password" && m["mountPath"] == "/etc/wsguard-redis")
    );
    assert!(
        container["args"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "/etc/wsguard/wsguard.toml")
    );
}

/// The package `cargo xtask test` built (WSGUARD_DEB), installed with
/// `dpkg -i` into a scratch root: its files land where Debian puts them,
/// its man pages and completions are there, its config checks, and the
/// agent it installs starts, enforces and stops cleanly (in a lab, with
/// the installed config pointed at the lab's interface).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deb_installs_with_dpkg_and_its_agent_starts_and_stops_cleanly() -> anyhow::Result<()> {
    use anyhow::{Context, ensure};
    use std::io::{BufRead, BufReader};
    let deb = std::env::var_os("WSGUARD_DEB").context(
        "WSGUARD_DEB names the package under test: run these through `cargo xtask test`",
    )?;
    let root = tempfile::tempdir()?;
    let admin = root.path().join("var/lib/dpkg");
    std::fs::create_dir_all(admin.join("info"))?;
    std::fs::create_dir_all(admin.join("updates"))?;
    std::fs::write(admin.join("status"), "")?;
    let out = Command::new("dpkg")
        .arg(format!("--instdir={}", root.path().display()))
        .arg(format!("--admindir={}", admin.display()))
        // Maintainer scripts run outside a chroot with DPKG_ROOT set, and
        // leave systemd alone; libc6 is not in the scratch database.
        .args(["--force-script-chrootless", "--force-depends", "-i"])
        .arg(&deb)
        .output()?;
    ensure!(
        out.status.success(),
        "dpkg -i: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let status = Command::new("dpkg")
        .arg(format!("--admindir={}", admin.display()))
        .args(["-s", "wsguard"])
        .output()?;
    ensure!(
        String::from_utf8_lossy(&status.stdout).contains("Status: install ok installed"),
        "dpkg -s: {}",
        String::from_utf8_lossy(&status.stdout)
    );
    let installed = |path: &str| root.path().join(path);
    for path in [
        "usr/bin/wsguard",
        "lib/systemd/system/wsguard.service",
        "etc/wsguard/wsguard.toml",
        "usr/share/man/man1/wsguard.1.gz",
        "usr/share/man/man1/wsguard-run.1.gz",
        "usr/share/man/man1/wsguard-bans.1.gz",
        "usr/share/bash-completion/completions/wsguard",
        "usr/share/zsh/vendor-completions/_wsguard",
        "usr/share/fish/vendor_completions.d/wsguard.fish",
    ] {
        ensure!(installed(path).exists(), "{path} is not installed");
    }
    let unit = std::fs::read_to_string(installed("lib/systemd/system/wsguard.service"))?;
    ensure!(unit.contains("ExecStart=/usr/bin/wsguard run --config /etc/wsguard/wsguard.toml"));
    let conffiles = std::fs::read_to_string(admin.join("info/wsguard.conffiles"))?;
    ensure!(
        conffiles.contains("/etc/wsguard/wsguard.toml"),
        "{conffiles}"
    );
    let man = Command::new("gzip")
        .args(["-dc"])
        .arg(installed("usr/share/man/man1/wsguard-run.1.gz"))
        .output()?;
    ensure!(
        String::from_utf8_lossy(&man.stdout).contains(".TH wsguard-run"),
        "not a man page"
    );
    let bash = std::fs::read_to_string(installed("usr/share/bash-completion/completions/wsguard"))?;
    ensure!(
        bash.contains("deny") && bash.contains("--pin-path"),
        "bash completion"
    );

    let binary = installed("usr/bin/wsguard");
    let config = installed("etc/wsguard/wsguard.toml");
    let check = Command::new(&binary)
        .arg("check-config")
        .arg(&config)
        .output()?;
    ensure!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // The installed agent with the installed config, on a lab's interface.
    let lab = wsguard_tests::Lab::new()?;
    let pin_path = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/wsguard-test-deb-{}",
        std::process::id()
    ));
    let mut table: toml::Table = std::fs::read_to_string(&config)?.parse()?;
    let agent = table["agent"].as_table_mut().context("[agent]")?;
    agent.insert(
        "interfaces".into(),
        toml::Value::Array(vec![lab.server_if.clone().into()]),
    );
    agent.insert("pin_path".into(), pin_path.display().to_string().into());
    let lab_config = root.path().join("lab.toml");
    std::fs::write(&lab_config, toml::to_string(&table)?)?;
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            wsguard_tests::agent::remove_state(&self.0);
        }
    }
    let _cleanup = Cleanup(pin_path.clone());
    let mut child = Command::new("ip")
        .args(["netns", "exec", &lab.server.name])
        .arg(&binary)
        .args(["run", "--config"])
        .arg(&lab_config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut enforcing = false;
    while std::time::Instant::now() < deadline {
        match rx.recv_timeout(std::time::Duration::from_millis(200)) {
            Ok(line) if line.contains(": enforcing ") => {
                enforcing = true;
                break;
            }
            Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
    }
    // SAFETY: signalling the child just spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let exited = child.wait()?;
    ensure!(enforcing, "the installed agent never said it was enforcing");
    ensure!(exited.success(), "the installed agent exited with {exited}");
    Ok(())
}
