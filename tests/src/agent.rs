//! The `wsguard` binary run as the daemon inside a lab's server namespace,
//! exactly as an operator runs it: `wsguard run --config FILE`.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use wsguard::kernel::{Maps, PinnedState, pin_dir};
use wsguard_common::{Counter, Reason};

use crate::{Lab, lab::enter_netns, wait_until};

/// Path of the binary under test, which `cargo xtask test` (and bench)
/// build and pass in WSGUARD_BIN: never whatever build happens to lie around.
pub fn binary() -> PathBuf {
    std::env::var_os("WSGUARD_BIN").map(PathBuf::from).expect(
        "WSGUARD_BIN names the wsguard binary under test: run these through `cargo xtask test`",
    )
}

enum Launch {
    /// setns(2) into the server namespace before exec: only the network
    /// namespace changes.
    Setns,
    IpNetnsExec,
}

pub struct Agent {
    child: Option<Child>,
    pub pin_path: PathBuf,
    pub config_file: tempfile::NamedTempFile,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// Remove the pins when the agent goes (off for restart tests).
    cleanup: bool,
    /// Threads copying stdout and stderr; joined at exit so no line is lost.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Agent {
    /// Starts the agent on the lab's server interface with `body` as the rest
    /// of the config (everything but `[agent]`), and waits until it reports
    /// that it enforces.
    pub fn start(lab: &Lab, body: &str) -> Result<Agent> {
        Agent::launch(lab, "", body, Launch::Setns, &[])
    }

    /// Like [`Agent::start`], with extra environment variables.
    pub fn start_with_env(lab: &Lab, body: &str, env: &[(&str, &str)]) -> Result<Agent> {
        Agent::launch(lab, "", body, Launch::Setns, env)
    }

    /// Like [`Agent::start`], with extra lines for the `[agent]` section.
    pub fn start_with_agent_keys(lab: &Lab, agent_keys: &str, body: &str) -> Result<Agent> {
        Agent::launch(lab, agent_keys, body, Launch::Setns, &[])
    }

    /// Starts the agent the way many operators do in a namespace:
    /// `ip netns exec NS wsguard run …`, which also gives it a private /sys.
    pub fn start_with_ip_netns_exec(lab: &Lab, body: &str) -> Result<Agent> {
        Agent::launch(lab, "", body, Launch::IpNetnsExec, &[])
    }

    fn launch(
        lab: &Lab,
        agent_keys: &str,
        body: &str,
        how: Launch,
        env: &[(&str, &str)],
    ) -> Result<Agent> {
        let pin_path = PathBuf::from(format!(
            "/sys/fs/bpf/wsguard-test-{}-{}",
            std::process::id(),
            lab.id
        ));
        let config = format!(
            "[agent]\ninterfaces = [\"{}\"]\npin_path = \"{}\"\n{agent_keys}\n\n{body}",
            lab.server_if,
            pin_path.display()
        );
        let mut config_file = tempfile::Builder::new()
            .prefix("wsguard-test-")
            .suffix(".toml")
            .tempfile()?;
        config_file.write_all(config.as_bytes())?;
        let netns = lab.server.path();
        let mut command = match how {
            Launch::Setns => {
                let mut c = Command::new(binary());
                // SAFETY: setns is async-signal-safe; the closure allocates
                // nothing but the path string it owns.
                unsafe { c.pre_exec(move || enter_netns(&netns)) };
                c
            }
            Launch::IpNetnsExec => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &lab.server.name]).arg(binary());
                c
            }
        };
        command
            .args(["run", "--config"])
            .arg(config_file.path())
            // WSGUARD_TEST_LOG turns up the agent's log when chasing a failure.
            .env(
                "WSGUARD_LOG",
                std::env::var("WSGUARD_TEST_LOG").unwrap_or_else(|_| "info,aya::bpf=error".into()),
            )
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", binary().display()))?;

        let (ready_tx, ready_rx) = mpsc::channel();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            forward(child.stdout.take().unwrap(), stdout.clone(), Some(ready_tx)),
            forward(child.stderr.take().unwrap(), stderr.clone(), None),
        ];
        let mut agent = Agent {
            child: Some(child),
            pin_path,
            config_file,
            stdout,
            stderr,
            cleanup: true,
            readers,
        };
        match ready_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(()) => Ok(agent),
            Err(_) => {
                let status = agent.stop_now();
                bail!(
                    "the agent did not report that it enforces ({status:?}); stderr:\n{}",
                    agent.stderr.lock().unwrap().join("\n")
                )
            }
        }
    }

    pub fn state(&self) -> Result<PinnedState> {
        PinnedState::open(&pin_dir(&self.pin_path))
    }

    pub fn counter(&self, reason: Reason) -> Counter {
        self.state()
            .and_then(|s| s.counter(reason))
            .unwrap_or_default()
    }

    /// Waits until the packets counted under `reason` reach `at_least`.
    pub async fn wait_counter(
        &self,
        reason: Reason,
        at_least: u64,
        timeout: Duration,
    ) -> Result<u64> {
        wait_until(
            &format!("counter {} >= {at_least}", reason.name()),
            timeout,
            || {
                let n = self.counter(reason).packets;
                (n >= at_least).then_some(n)
            },
        )
        .await
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// The agent's resident memory (VmRSS) in kB; 0 once it has exited.
    pub fn rss_kb(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends a signal to the agent.
    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// SIGTERM, then waits for a clean exit (SIGKILL after 10 s).
    pub fn stop(mut self) -> Result<(ExitStatus, Vec<String>)> {
        let status = self.stop_now().context("the agent was already gone")?;
        Ok((status, self.stdout()))
    }

    /// SIGTERM and a clean exit, leaving the pins (and whatever the agent
    /// left attached) for a later agent.
    pub fn stop_keeping_state(mut self) -> Result<(ExitStatus, Vec<String>)> {
        self.cleanup = false;
        self.stop()
    }

    /// `kill -9`: no chance to clean up anything.
    pub fn kill(mut self) -> Result<()> {
        self.cleanup = false;
        let mut child = self.child.take().context("the agent was already gone")?;
        child.kill()?;
        child.wait()?;
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        Ok(())
    }

    /// `wsguard status --fleet --json`, once the agent has written it.
    pub fn fleet_report(&self) -> Option<serde_json::Value> {
        let out = self.cli(&["status", "--fleet", "--json"]);
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until the agent's link to the fleet's Redis is up.
    pub async fn wait_fleet_connected(&self, timeout: Duration) -> Result<()> {
        wait_until("the agent to connect to the fleet's Redis", timeout, || {
            self.fleet_report()
                .filter(|r| r["connected"] == true)
                .map(|_| ())
        })
        .await
    }

    /// Runs `wsguard ARGS… --pin-path <this agent's pin path>`.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(binary())
            .args(args)
            .arg("--pin-path")
            .arg(&self.pin_path)
            .output()
            .expect("running wsguard")
    }

    fn stop_now(&mut self) -> Option<ExitStatus> {
        let status = self.terminate();
        if self.cleanup {
            let _ = wsguard::kernel::unpin_all(&pin_dir(&self.pin_path));
            let _ = std::fs::remove_dir(&self.pin_path);
        }
        status
    }

    fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break child.wait().ok()?;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        Some(status)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Removes the pins an agent left at `pin_path` (with `cleanup` off), so that
/// links left attached go too.
pub fn remove_state(pin_path: &std::path::Path) {
    let _ = wsguard::kernel::unpin_all(&pin_dir(pin_path));
    let _ = std::fs::remove_dir(pin_path);
}

fn forward(
    stream: impl std::io::Read + Send + 'static,
    lines: Arc<Mutex<Vec<String>>>,
    ready: Option<mpsc::Sender<()>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if let Some(tx) = &ready {
                if line.starts_with("wsguard ") && line.contains(": enforcing ") {
                    let _ = tx.send(());
                }
            }
            if std::env::var_os("WSGUARD_TEST_VERBOSE").is_some() {
                eprintln!("[agent] {line}");
            }
            lines.lock().unwrap().push(line);
        }
    })
}
