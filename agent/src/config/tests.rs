use std::path::Path;

use super::*;

const MINIMAL: &str = "[agent]\ninterfaces = [\"eth0\"]\n[protect]\nports = [8080]\n";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("/etc/wsguard/wsguard.toml"), text)
}

#[test]
fn the_documented_example_parses() {
    let text = include_str!("../../../packaging/wsguard.example.toml");
    let config = parse(text).unwrap();
    assert_eq!(config.ports, vec![80, 8080]);
    assert_eq!(config.ipv6_prefix, 64);
    assert_eq!(config.settings.source_connections.burst(), 40);
    assert_eq!(config.settings.source_bytes.burst(), 4 << 20);
}

#[test]
fn defaults_fill_everything_but_interfaces_and_ports() {
    let config = parse(MINIMAL).unwrap();
    assert_eq!(config.ipv4_prefix, 32);
    assert_eq!(config.ipv6_prefix, 64);
    assert_eq!(config.max_sources, 1_000_000);
    assert_eq!(config.settings.max_concurrent, 64);
    assert_eq!(config.settings.ban_after_drops, 200);
    // Global bursts default to one second of the rate.
    assert_eq!(config.settings.global_connections.burst(), 5000);
    assert!(config.allow.is_empty());
}

/// (config text, expected "line:column: reason" fragment)
const INVALID: &[(&str, &str)] = &[
    (
        "[agent]\ninterfaces = [\"eth0\"]\nbogus = 1\n[protect]\nports = [80]\n",
        ":3:1: unknown field `bogus`",
    ),
    (
        "[agent]\ninterfaces = [\"eth0\"]\n",
        "missing field `protect`",
    ),
    (
        "[agent]\ninterfaces = []\n[protect]\nports = [80]\n",
        ":2:14: agent.interfaces is empty",
    ),
    (
        "[agent]\ninterfaces = [\"eth0\"]\n[protect]\nports = [80, 70000]\n",
        ":4:14: port 70000 is out of range",
    ),
    (
        "[agent]\ninterfaces = [\"eth0\"]\n[protect]\nports = [0]\n",
        ":4:10: port 0 is out of range",
    ),
    (
        "[agent]\ninterfaces = [\"eth0\"]\n[protect]\nports = [80, 80]\n",
        "port 80 is listed twice",
    ),
    (
        "[agent]\ninterfaces = [\"eth0\"]\nxdp_mode = \"turbo\"\n[protect]\nports = [80]\n",
        ":3:12: unknown variant `turbo`",
    ),
    (
        "[agent]\ninterfaces = [\"eth0\"]\n[protect]\nports = [80]\nipv4_prefix = 33\n",
        ":5:15: protect.ipv4_prefix must be 1 to 32",
    ),
    (
        "[agent]\ninterfaces = [\"eth0\"]\n[protect]\nports = [80]\n[limits.per_source]\nnew_connections = \"20/s\"\nnew_connections_burst = 10\n",
        ":7:25: limits.per_source.new_connections_burst (10) is below the rate (20/s)",
    ),
    (
        "[agent]\ninterfaces = [\"eth0\"]\n[protect]\nports = [80]\n[limits.per_source]\nbytes = \"1MiB/s\"\nbytes_burst = \"64KiB\"\n",
        ":7:15: limits.per_source.bytes_burst (64KiB) is below the rate (1MiB/s)",
    ),
    (
        "[agent]\ninterfaces = [\"eth0\"]\n[protect]\nports = [80]\n[limits.per_source]\nbytes = \"1M/s\"\n",
        ":6:9: unknown or ambiguous size unit \"M\"",
    ),
    (
        "[agent]\ninterfaces = [\"eth0\"]\n[protect]\nports = [80]\n[limits.per_source]\nnew_connections = \"20\"\n",
        "is not a rate",
    ),
    (
        "[agent]\ninterfaces = [\"eth0\"]\n[protect]\nports = [80]\n[ban]\nwindow = \"10\"\n",
        ":6:10: \"10\" has no unit",
    ),
    (
        "[agent]\ninterfaces = [\"eth0\"]\n[protect]\nports = [80]\n[ban]\nduration = \"1M\"\n",
        "could mean minutes or months",
    ),
    (
        "[agent]\ninterfaces = [\"eth0\"]\n[protect]\nports = [80]\n[lists]\ndeny = [\"10.0.0.300/8\"]\n",
        ":6:9: lists.deny: \"10.0.0.300/8\" is not a CIDR",
    ),
    (
        "[agent]\ninterfaces = [\"eth0\"]\n[protect]\nports = [80]\n[lists]\nallow = [\"10.0.0.1/8\"]\n",
        "has host bits set; did you mean 10.0.0.0/8?",
    ),
    (
        "[agent]\ninterfaces = [\"eth0\"]\n[protect]\nports = [80]\n[tracking]\nmax_sources = 0\n",
        ":6:15: tracking.max_sources must be 1",
    ),
    (
        "[agent]\ninterfaces = [\"eth0\"]\n[protect]\nports = [80]\n[limits.per_sourc]\n",
        "unknown field `per_sourc`",
    ),
    ("[agent]\ninterfaces = [\"eth0\"\n", ":2:"),
    (
        "[agent]\ninterfaces = [\"eth0\"]\n[protect]\nports = [80]\n[limits.per_user]\nbytes = \"1MiB/s\"\nbytes_burst = \"1KiB\"\n",
        ":7:15: limits.per_user.bytes_burst (1KiB) is below the rate",
    ),
    (
        "[agent]\ninterfaces = [\"eth0\"]\n[protect]\nports = [80]\n[limits.per_user]\nover_budget_timeout = \"0s\"\n",
        ":6:23: limits.per_user.over_budget_timeout must be longer than zero",
    ),
    (
        "[agent]\ninterfaces = [\"eth0\"]\n[protect]\nports = [80]\n[limits.per_user]\nmax_users = 0\n",
        ":6:13: limits.per_user.max_users must be 1 to",
    ),
    (
        "[agent]\ninterfaces = [\"eth0\"]\n[protect]\nports = [80]\n[limits.class.Pro]\nbytes = \"1MiB/s\"\n",
        "[limits.class.Pro]: a class is 1 to 32 characters",
    ),
    (
        "[agent]\ninterfaces = [\"eth0\"]\n[protect]\nports = [80]\n[limits.class.pro]\nbytes = \"8MiB/s\"\n",
        "limits.class.pro.bytes_burst (4MiB) is below",
    ),
    (
        "[agent]\ninterfaces = [\"eth0\"]\n[protect]\nports = [80]\n[limits.class.pro]\nmax_users = 5\n",
        ":6:1: unknown field `max_users`",
    ),
    (
        "[agent]\ninterfaces = [\"eth0\"]\n[protect]\nports = [80]\n[ban]\nusers = \"yes\"\n",
        ":6:9: invalid type",
    ),
];

#[test]
fn invalid_configs_name_file_line_and_reason() {
    for (text, expected) in INVALID {
        let err = parse(text).expect_err(text).to_string();
        assert!(err.starts_with("/etc/wsguard/wsguard.toml:"), "{err}");
        assert!(
            err.contains(expected),
            "config:\n{text}\nexpected: {expected}\ngot: {err}"
        );
    }
}

#[test]
fn plain_addresses_and_ipv6_cidrs_are_accepted() {
    let config = parse(&format!(
        "{MINIMAL}[lists]\nallow = [\"198.18.0.1\", \"2001:db8::/32\"]\n"
    ))
    .unwrap();
    assert_eq!(config.allow[0].to_string(), "198.18.0.1/32");
    assert_eq!(config.allow[1].to_string(), "2001:db8::/32");
}

#[test]
fn unlimited_rates_disable_their_bucket() {
    let config = parse(&format!(
        "{MINIMAL}[limits.global]\nbytes = \"unlimited\"\n"
    ))
    .unwrap();
    assert!(config.settings.global_bytes.is_unlimited());
}

#[test]
fn handshake_settings_are_validated_with_their_line() {
    let base = "[agent]\ninterfaces = [\"eth0\"]\n[protect]\nports = [80, 8080]\n[handshake]\n";
    let cases: &[(&str, &str)] = &[
        (
            "inspect_ports = [9090]\n",
            ":6:18: handshake.inspect_ports: 9090 is not one of protect.ports",
        ),
        (
            "inspect_ports = [8080]\nallowed_origins = [\"example.com\"]\n",
            ":7:20: handshake.allowed_origins: \"example.com\" is not an origin",
        ),
        (
            "inspect_ports = [8080]\nallowed_paths = [\"ws\"]\n",
            "handshake.allowed_paths: path \"ws\" must start with /",
        ),
        (
            "inspect_ports = [8080]\nmax_request_bytes = \"10\"\n",
            "has no unit",
        ),
        (
            "inspect_ports = [8080]\nmissing_origin = \"maybe\"\n",
            "unknown variant `maybe`",
        ),
        (
            "inspect_ports = [8080]\n[handshake.ticket]\nrequired = true\nsecret_file = \"/nonexistent/key\"\n",
            ":9:15: handshake.ticket.secret_file: cannot read the ticket secret /nonexistent/key",
        ),
    ];
    for (extra, expected) in cases {
        let err = parse(&format!("{base}{extra}"))
            .expect_err(extra)
            .to_string();
        assert!(
            err.contains(expected),
            "{extra}\nexpected: {expected}\ngot: {err}"
        );
    }
    let ok = parse(&format!(
        "{base}inspect_ports = [8080]\nallowed_origins = [\"https://*.example.com\"]\n"
    ))
    .unwrap();
    assert_eq!(ok.handshake.ports, vec![8080]);
    assert!(
        parse(base).unwrap().handshake.ports.is_empty(),
        "no inspect_ports: inspection off"
    );
}

#[test]
fn the_summary_names_every_family_in_dry_run() {
    let mode = |extra: &str| {
        let summary = parse(&format!("{MINIMAL}{extra}")).unwrap().summary();
        summary.lines().last().unwrap().trim().to_string()
    };
    assert_eq!(mode(""), "mode: enforcing");
    assert_eq!(
        mode("[handshake]\ndry_run = true\n"),
        "mode: dry run for handshake verdicts (counted as would-drop), enforcing the rest"
    );
    assert_eq!(
        mode("[limits]\ndry_run = true\n[lists]\ndry_run = true\n"),
        "mode: dry run for limits and bans and deny list (counted as would-drop), enforcing the rest"
    );
    let all = "[agent]\ninterfaces = [\"eth0\"]\ndry_run = true\n[protect]\nports = [8080]\n";
    let summary = parse(all).unwrap().summary();
    assert!(summary.ends_with("mode: dry run: everything counted as would-drop, nothing dropped"));
}

#[test]
fn a_reload_names_the_settings_that_need_a_restart() {
    let old = parse(MINIMAL).unwrap();
    let same = parse(&format!(
        "{MINIMAL}[limits.per_source]\nbytes = \"2MiB/s\"\n"
    ))
    .unwrap();
    assert!(
        old.restart_only_changes(&same).is_empty(),
        "limits reload in place"
    );
    let resized = parse(&format!(
        "{MINIMAL}[tracking]\nmax_sources = 1000\n[metrics]\nlisten = \"\"\n"
    ))
    .unwrap();
    assert_eq!(
        old.restart_only_changes(&resized),
        vec!["tracking.max_sources", "metrics.listen"]
    );
}

#[test]
fn per_user_limits_have_defaults_and_classes_override_them() {
    let config = parse(MINIMAL).unwrap();
    let users = &config.users;
    assert_eq!(users.max_users, 65_536);
    assert!(!users.ban_users);
    assert_eq!(users.per_user.bytes.burst(), 4 << 20);
    assert_eq!(users.per_user.concurrent_connections, 16);
    assert_eq!(users.per_user.new_connections.burst(), 10);
    assert_eq!(users.per_user.over_budget_timeout.as_secs(), 30);
    let config = parse(&format!(
        "{MINIMAL}[limits.per_user]\nconcurrent_connections = 2\n[limits.class.pro]\nbytes = \"10MiB/s\"\nbytes_burst = \"20MiB\"\n[limits.class.free]\nconcurrent_connections = 1\n[ban]\nusers = true\n"
    ))
    .unwrap();
    let users = &config.users;
    assert!(users.ban_users);
    // Classes in name order from index 1; an unknown class or none is 0.
    let (free, free_limits) = users.limits(Some("free"));
    let (pro, pro_limits) = users.limits(Some("pro"));
    assert_eq!((free, pro), (1, 2));
    assert_eq!(free_limits.concurrent_connections, 1);
    assert_eq!(
        free_limits.bytes, users.per_user.bytes,
        "a key left out is per_user's"
    );
    assert_eq!(pro_limits.concurrent_connections, 2);
    assert_eq!(pro_limits.bytes.burst(), 20 << 20);
    assert_eq!(users.limits(Some("gold")).0, 0);
    assert_eq!(users.limits(None).0, 0);
    let budgets: Vec<_> = users.budgets().iter().map(|b| b.bytes).collect();
    assert_eq!(
        budgets,
        vec![users.per_user.bytes, free_limits.bytes, pro_limits.bytes]
    );
    assert_eq!(users.budgets()[0].over_budget_timeout_ns, 30_000_000_000);
    assert!(
        config
            .summary()
            .contains("class pro: bytes 10MiB/s (burst 20MiB)"),
        "{}",
        config.summary()
    );
}

#[test]
fn changing_max_users_needs_a_restart() {
    let old = parse(MINIMAL).unwrap();
    let new = parse(&format!("{MINIMAL}[limits.per_user]\nmax_users = 10\n")).unwrap();
    assert_eq!(
        old.restart_only_changes(&new),
        vec!["limits.per_user.max_users"]
    );
}

#[test]
fn a_fleet_ca_file_must_be_pem_certificates_for_a_tls_url() {
    let dir = std::env::temp_dir().join(format!("wsguard-ca-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_pem = dir.join("not-pem");
    std::fs::write(&not_pem, "just text\n").unwrap();
    let fleet = |url: &str, ca: &Path| {
        format!(
            "{MINIMAL}[fleet]\nredis_url = \"{url}\"\nhost_id = \"h\"\nca_file = \"{}\"\n",
            ca.display()
        )
    };
    let cases = [
        (
            fleet("redis://127.0.0.1:6379", &not_pem),
            ":8:11: fleet.ca_file applies to a rediss:// (TLS) fleet.redis_url only",
        ),
        (
            fleet("rediss://127.0.0.1:6379", &dir.join("missing")),
            ":8:11: cannot read fleet.ca_file",
        ),
        (
            fleet("rediss://127.0.0.1:6379", &not_pem),
            "holds no PEM certificate",
        ),
    ];
    for (text, expected) in cases {
        let error = parse(&text).unwrap_err().to_string();
        assert!(error.contains(expected), "{error} (wanted {expected})");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_list_longer_than_the_kernel_map_is_refused_at_its_first_entry_over() {
    let capacity = wsguard_common::maps::LIST_CAPACITY as usize;
    // One /32 per line, one more than a list holds.
    let entries: String = (0..=capacity as u32)
        .map(|i| format!("\"{}/32\",\n", std::net::Ipv4Addr::from(0x0a00_0000 + i)))
        .collect();
    let text = format!("{MINIMAL}[lists]\ndeny = [\n{entries}]\n");
    let error = parse(&text).unwrap_err().to_string();
    let line = 4 + 2 + capacity + 1;
    assert!(
        error.contains(&format!(
            ":{line}:1: lists.deny has {} entries",
            capacity + 1
        )),
        "{error}"
    );
    // Exactly full is fine.
    let full: String = entries
        .lines()
        .take(capacity)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(parse(&format!("{MINIMAL}[lists]\ndeny = [\n{full}\n]\n")).is_ok());
}
