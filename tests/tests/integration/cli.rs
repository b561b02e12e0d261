//! The command line as operators and scripts meet it: exit codes, messages
//! with file, line and reason, refusal without privileges.

use std::{
    io::Write,
    os::unix::process::CommandExt,
    process::{Command, Output},
};

use wsguard_common::maps::LAYOUT_VERSION;
use wsguard_tests::agent::binary;

fn wsguard(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("running wsguard")
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn check_config_accepts_the_shipped_configs() {
    for file in [
        "../packaging/wsguard.example.toml",
        "../packaging/wsguard.loopback.toml",
    ] {
        let out = wsguard(&["check-config", file]);
        assert!(out.status.success(), "{file}: {}", stderr(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(": ok") && stdout.contains("tcp ports: 80, 8080"),
            "{stdout}"
        );
    }
}

#[test]
fn check_config_rejects_with_file_line_and_reason_and_exit_code_2() {
    let f = config_file(
        "[agent]\ninterfaces = [\"eth0\"]\n\n[protect]\nports = [80]\n\n[limits.per_source]\nnew_connections = \"20/s\"\nnew_connections_burst = 5\n",
    );
    let out = wsguard(&["check-config", f.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let expected = format!(
        "wsguard: error: {}:9:25: limits.per_source.new_connections_burst (5) is below the rate (20/s)",
        f.path().display()
    );
    assert!(stderr(&out).contains(&expected), "{}", stderr(&out));

    let out = wsguard(&["check-config", "/nonexistent/wsguard.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("/nonexistent/wsguard.toml: cannot read the config file"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn run_refuses_a_bad_config_before_touching_the_kernel() {
    let f = config_file("[agent]\ninterfaces = [\"lo\"]\n[protect]\nports = [80]\nbogus = true\n");
    let out = wsguard(&["run", "--config", f.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(":5:1: unknown field `bogus`"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn run_names_a_missing_interface() {
    let f = config_file(
        "[agent]\ninterfaces = [\"wsg-missing0\"]\npin_path = \"/sys/fs/bpf/wsguard-test-missing-if\"\n[protect]\nports = [80]\n",
    );
    let out = wsguard(&["run", "--config", f.path().to_str().unwrap()]);
    wsguard_tests::agent::remove_state(std::path::Path::new("/sys/fs/bpf/wsguard-test-missing-if"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot attach XDP (auto) to interface wsg-missing0"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn run_without_privileges_says_which_are_missing() {
    let f = config_file("[agent]\ninterfaces = [\"lo\"]\n[protect]\nports = [80]\n");
    std::fs::set_permissions(
        f.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    // The tree may sit in a directory only root can enter (a 0700 mktemp
    // dir): run a copy from a place the unprivileged user can reach.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let copy = dir.path().join("wsguard");
    std::fs::copy(binary(), &copy).unwrap();
    std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = Command::new(&copy)
        .args(["run", "--config", f.path().to_str().unwrap()])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (or root); missing: CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN"), "{}", stderr(&out));
}

#[test]
fn status_without_an_agent_fails_clearly() {
    let out = wsguard(&[
        "status",
        "--pin-path",
        "/sys/fs/bpf/wsguard-test-nobody-here",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!(
            "no wsguard state pinned at /sys/fs/bpf/wsguard-test-nobody-here/v{LAYOUT_VERSION}"
        )),
        "{}",
        stderr(&out)
    );
}

/// `ip netns exec` gives each command its own /sys, without the host's bpffs
/// or cgroup v2 mounts: the agent started that way still enforces, counts
/// connections, and reports its counters when stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_under_ip_netns_exec() -> anyhow::Result<()> {
    use std::{net::SocketAddr, time::Duration};
    use wsguard_tests::{
        Agent, Lab,
        peers::{EchoServer, connects, echo, ws_connect},
    };

    let lab = Lab::new()?;
    let _server = EchoServer::start(&lab.server, 8080).await?;
    let agent = Agent::start_with_ip_netns_exec(
        &lab,
        &format!(
            "[protect]\nports = [8080]\n[limits.per_source]\nconcurrent_connections = 1\n[lists]\ndeny = [\"{}\"]\n[syn_cookies]\nenabled = false\n",
            lab.client_v4(9)
        ),
    )?;
    let addr = SocketAddr::new(lab.server_v4().into(), 8080);
    let mut ws = ws_connect(
        &lab.client,
        lab.client_v4(2).into(),
        addr,
        Duration::from_secs(1),
    )
    .await?;
    echo(&mut ws, "hello", Duration::from_secs(1)).await?;
    anyhow::ensure!(
        !connects(
            &lab.client,
            lab.client_v4(9).into(),
            addr,
            Duration::from_millis(900)
        )
        .await,
        "denied source connected"
    );
    // The connection counter works there too: the echo above proves the
    // first connection established, so a second one is over the limit of 1.
    anyhow::ensure!(
        !connects(
            &lab.client,
            lab.client_v4(2).into(),
            addr,
            Duration::from_millis(900)
        )
        .await,
        "the concurrency limit of 1 did not hold"
    );
    let (status, stdout) = agent.stop()?;
    anyhow::ensure!(status.success(), "exit {status}");
    let line = |name: &str| {
        stdout
            .iter()
            .find(|l| l.split_whitespace().next() == Some(name))
            .cloned()
            .unwrap_or_default()
    };
    anyhow::ensure!(
        line("deny_list").split_whitespace().nth(1).unwrap_or("0") != "0",
        "{stdout:?}"
    );
    anyhow::ensure!(
        line("concurrency").split_whitespace().nth(1).unwrap_or("0") != "0",
        "{stdout:?}"
    );
    Ok(())
}

#[test]
fn ticket_issue_mints_tickets_the_agent_accepts() {
    use wsguard::handshake::ticket;
    let secret = config_file("0123456789abcdef0123456789abcdef-a shared secret\n");
    let out = wsguard(&[
        "ticket",
        "issue",
        "--secret-file",
        secret.path().to_str().unwrap(),
        "--ip",
        "198.18.0.7",
        "--ttl",
        "60s",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let minted = String::from_utf8(out.stdout).unwrap();
    let key = ticket::read_secret(secret.path()).unwrap();
    let now = wsguard::agent_file::now_unix();
    let opened = ticket::verify(
        &key,
        minted.trim(),
        "198.18.0.7".parse().unwrap(),
        now,
        61,
        true,
    )
    .expect("valid ticket");
    assert!((now + 59..=now + 60).contains(&opened.expires_at));

    let short = config_file("too short");
    let out = wsguard(&[
        "ticket",
        "issue",
        "--secret-file",
        short.path().to_str().unwrap(),
        "--ip",
        "198.18.0.7",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("at least 32 are needed"),
        "{}",
        stderr(&out)
    );
    let out = wsguard(&[
        "ticket",
        "issue",
        "--secret-file",
        secret.path().to_str().unwrap(),
        "--ip",
        "nope",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("\"nope\" is not an IP address"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn ticket_issue_names_a_user_in_a_version_2_ticket() {
    use wsguard::handshake::ticket;
    let secret = config_file("0123456789abcdef0123456789abcdef-a shared secret\n");
    let path = secret.path().to_str().unwrap();
    let issue = |extra: &[&str]| {
        let mut args = vec!["ticket", "issue", "--secret-file", path, "--unbound"];
        args.extend_from_slice(extra);
        wsguard(&args)
    };
    let out = issue(&["--user", "alice@example.com", "--class", "pro"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let key = ticket::read_secret(secret.path()).unwrap();
    let opened = ticket::open(&key, String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    assert_eq!(
        opened.user,
        Some(ticket::User::new("alice@example.com", Some("pro")).unwrap())
    );
    for (extra, words) in [
        (&["--class", "pro"][..], "--user"),
        (&["--user", &"u".repeat(65)][..], "1 to 64 bytes"),
        (&["--user", "bob", "--class", "Gold"][..], "a-z, 0-9"),
    ] {
        let out = issue(extra);
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
        assert!(stderr(&out).contains(words), "{extra:?}: {}", stderr(&out));
    }
}

/// The Python and Node.js minters in `examples/tickets` make exactly the
/// test vectors (which the agent's own minter is held to in its unit tests).
#[test]
fn the_example_minters_make_the_test_vectors() {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tickets");
    let vectors: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{examples}/vectors.json")).unwrap())
            .unwrap();
    let expected: Vec<&str> = vectors["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["ticket"].as_str().unwrap())
        .collect();
    let python = "import json, sys\nsys.path.insert(0, '.')\nfrom mint_ticket import mint\n\
        for v in json.load(open('vectors.json'))['vectors']:\n    \
        print(mint(v['secret'].encode(), v['expires_at'], v['ip'], v['user'], v['class'], bytes.fromhex(v['nonce_hex'])))";
    let node = "const {mint} = require('./mint_ticket.js');\n\
        for (const v of require('./vectors.json').vectors)\n  \
        console.log(mint(Buffer.from(v.secret), v.expires_at, {ip: v.ip, user: v.user, userClass: v.class, nonce: Buffer.from(v.nonce_hex, 'hex')}));";
    for (program, flag, code) in [("python3", "-c", python), ("node", "-e", node)] {
        let out = std::process::Command::new(program)
            .current_dir(examples)
            .args([flag, code])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(out.status.success(), "{program}: {}", stderr(&out));
        let minted = String::from_utf8(out.stdout).unwrap();
        assert_eq!(minted.lines().collect::<Vec<_>>(), expected, "{program}");
    }
    // The README shows the same vectors.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    for ticket in &expected {
        assert!(
            readme.contains(ticket),
            "the README lacks the vector {ticket}"
        );
    }
}

/// Bad operator input, each with the exit code and the words a user sees.
#[test]
fn bad_cli_input_is_refused_with_exit_code_and_reason() {
    let pins = "/sys/fs/bpf/wsguard-test-nobody-here";
    let not_pinned = format!("no wsguard state pinned at {pins}/v{LAYOUT_VERSION}");
    let not_running =
        format!("no wsguard agent is running with its state at {pins}/v{LAYOUT_VERSION}");
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["deny", "add", "10.0.0.1/8", "--pin-path", pins],
            2,
            "\"10.0.0.1/8\" has host bits set; did you mean 10.0.0.0/8?",
        ),
        (
            &["deny", "add", "not-a-cidr", "--pin-path", pins],
            2,
            "\"not-a-cidr\" is not a CIDR",
        ),
        (
            &[
                "allow",
                "add",
                "198.18.0.0/15",
                "--ttl",
                "10",
                "--pin-path",
                pins,
            ],
            2,
            "--ttl: \"10\" has no unit",
        ),
        (
            &[
                "allow",
                "add",
                "198.18.0.0/15",
                "--ttl",
                "1M",
                "--pin-path",
                pins,
            ],
            2,
            "could mean minutes or months",
        ),
        (
            &["bans", "del", "nope", "--pin-path", pins],
            2,
            "\"nope\" is not an IP address",
        ),
        (&["deny", "list", "--pin-path", pins], 1, &not_pinned),
        (&["reload", "--pin-path", pins], 1, &not_running),
        (
            &["status", "--config", "/nonexistent.toml"],
            2,
            "/nonexistent.toml: cannot read the config file",
        ),
        (
            &[
                "ticket",
                "issue",
                "--secret-file",
                "/nonexistent.key",
                "--ip",
                "198.18.0.1",
            ],
            1,
            "cannot read the ticket secret /nonexistent.key",
        ),
        (
            &["top", "--interval", "fast", "--pin-path", pins],
            2,
            "invalid value 'fast' for '--interval",
        ),
        (&["run", "--bogus"], 2, "unexpected argument '--bogus'"),
    ];
    for (args, code, expected) in cases {
        let out = wsguard(args);
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(expected),
            "{args:?}\nexpected: {expected}\ngot: {}",
            stderr(&out)
        );
    }
}
