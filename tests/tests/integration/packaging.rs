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
