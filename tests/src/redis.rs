//! A real `redis-server` (Debian's) for the fleet tests: an instance of its
//! own on a Unix socket in a scratch directory (reachable from every
//! network namespace, bound to no network address), no persistence, killed
//! when dropped.

use std::{
    path::PathBuf,
    process::{Child, Command},
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

    /// Listening with TLS only (no plain TCP) at `addr:port` inside
    /// `netns`, with a server certificate for `addr` signed by a CA made
    /// for it ([`RedisServer::ca_file`]).
    pub fn start_tls(netns: &str, addr: std::net::Ipv4Addr, port: u16) -> Result<RedisServer> {
        let dir = tempfile::Builder::new()
            .prefix("wsguard-redis-")
            .tempdir()?;
        let (ca, cert, key) = certificates(addr)?;
        let path = |name: &str| dir.path().join(name).display().to_string();
        std::fs::write(path("ca.pem"), ca)?;
        std::fs::write(path("cert.pem"), cert)?;
        std::fs::write(path("key.pem"), key)?;
        let mut server = RedisServer {
            child: None,
            args: vec![
                "--tls-port".into(),
                port.to_string(),
                "--bind".into(),
                addr.to_string(),
                "--protected-mode".into(),
                "no".into(),
                "--tls-cert-file".into(),
                path("cert.pem"),
                "--tls-key-file".into(),
                path("key.pem"),
                "--tls-ca-cert-file".into(),
                path("ca.pem"),
                "--tls-auth-clients".into(),
                "no".into(),
            ],
            dir,
            netns: Some(netns.to_string()),
        };
        server.launch()?;
        Ok(server)
    }

    /// The CA that signed a TLS server's certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
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
        // What it says goes to a log of its own, shown if it does not start.
        let log = std::fs::File::create(self.dir.path().join("redis.log"))?;
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
            .stdout(log.try_clone()?)
            .stderr(log)
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
        let log = std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
        bail!("redis-server did not answer within 10 s; it said:\n{log}")
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

/// A CA, and a server certificate for `addr` it signed, with the server's
/// key: PEM each.
fn certificates(addr: std::net::Ipv4Addr) -> Result<(String, String, String)> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        SanType,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "wsguard test fleet CA");
    let ca = ca.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut server = CertificateParams::new(Vec::<String>::new())?;
    server.subject_alt_names = vec![SanType::IpAddress(addr.into())];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = server.signed_by(&key, &ca, &ca_key)?;
    Ok((ca.pem(), server.pem(), key.serialize_pem()))
}
