//! A real `redis-server` (Debian's) for the fleet tests: an instance of its
//! own on a Unix socket in a scratch directory (reachable from every
//! network namespace, bound to no network address), no persistence, killed
//! when dropped.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

pub struct RedisServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Extra `redis-server` arguments (ACL users, …), kept for restarts.
    args: Vec<String>,
    /// The network namespace it runs in, when it also listens on TCP.
    netns: Option<String>,
}

impl RedisServer {
    pub fn start() -> Result<RedisServer> {
        RedisServer::start_with(&[])
    }

    /// With extra arguments, e.g. `["--user", "wsguard", "on", ">secret", "~*", "&*", "+@all"]`.
    pub fn start_with(args: &[&str]) -> Result<RedisServer> {
        let mut server = RedisServer {
            child: None,
            dir: tempfile::Builder::new()
                .prefix("wsguard-redis-")
                .tempdir()?,
            args: args.iter().map(|a| a.to_string()).collect(),
            netns: None,
        };
        server.launch()?;
        Ok(server)
    }

    /// Also listening on TCP at `addr:port`, inside network namespace
    /// `netns` (a lab's, so that `redis://` is reachable from the lab's
    /// other side and from nowhere else).
    pub fn start_tcp(netns: &str, addr: std::net::Ipv4Addr, port: u16) -> Result<RedisServer> {
        let mut server = RedisServer {
            child: None,
            dir: tempfile::Builder::new()
                .prefix("wsguard-redis-")
                .tempdir()?,
            args: vec![
                "--port".into(),
                port.to_string(),
                "--bind".into(),
                addr.to_string(),
                "--protected-mode".into(),
                "no".into(),
            ],
            netns: Some(netns.to_string()),
        };
        server.launch()?;
        Ok(server)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// What `fleet.redis_url` says to reach it.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    fn launch(&mut self) -> Result<()> {
        let mut command = match &self.netns {
            Some(netns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", netns, "redis-server"]);
                c
            }
            None => Command::new("redis-server"),
        };
        let child = command
            .args(["--port", "0", "--unixsocket"])
            .arg(self.socket())
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--daemonize", "no", "--dir"])
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (cargo xtask test installs it)")?;
        self.child = Some(child);
        // Ready once it answers on its socket.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.socket().exists()
                && self
                    .cli(&["PING"])
                    .is_ok_and(|out| out.contains("PONG") || out.contains("NOAUTH"))
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("redis-server did not answer within 10 s")
    }

    /// `kill -9`: what it held is gone (no persistence).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(self.socket());
    }

    /// Starts again, empty, on the same socket.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.launch()
    }

    /// `redis-cli ARGS…` against it; its output.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("redis-cli")
            .arg("-s")
            .arg(self.socket())
            .args(args)
            .output()
            .context("running redis-cli")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
