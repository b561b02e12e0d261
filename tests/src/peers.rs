//! Real WebSocket peers: a tokio-tungstenite echo server in the server
//! namespace and clients bound to chosen source addresses in the client
//! namespace.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, accept_async, client_async, tungstenite::Message,
};

use crate::lab::Netns;

pub type WsClient = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Default)]
pub struct ServerStats {
    /// WebSocket payload bytes received, all connections together.
    pub bytes_received: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub connections_closed: AtomicU64,
}

/// An echo server on [::]:port (dual stack) in `ns`.
pub struct EchoServer {
    pub port: u16,
    pub stats: Arc<ServerStats>,
    task: tokio::task::JoinHandle<()>,
}

impl EchoServer {
    pub async fn start(ns: &Netns, port: u16) -> Result<EchoServer> {
        EchoServer::start_with_delay(ns, port, Duration::ZERO).await
    }

    /// A server that waits `delay` after accepting before it reads the
    /// upgrade request and answers (a slow application).
    pub async fn start_with_delay(ns: &Netns, port: u16, delay: Duration) -> Result<EchoServer> {
        let std_listener = ns.run(move || -> std::io::Result<std::net::TcpListener> {
            let l = std::net::TcpListener::bind(SocketAddr::from(([0u16; 8], port)))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        let listener = TcpListener::from_std(std_listener)?;
        let stats = Arc::new(ServerStats::default());
        let task_stats = stats.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                task_stats
                    .connections_accepted
                    .fetch_add(1, Ordering::Relaxed);
                let stats = task_stats.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Ok(mut ws) = accept_async(stream).await {
                        while let Some(Ok(msg)) = ws.next().await {
                            if msg.is_binary() || msg.is_text() {
                                stats
                                    .bytes_received
                                    .fetch_add(msg.len() as u64, Ordering::Relaxed);
                                // Echo only small messages: bulk senders measure ingress.
                                if msg.len() <= 4096 && ws.send(msg).await.is_err() {
                                    break;
                                }
                            } else if msg.is_close() {
                                break;
                            }
                        }
                    }
                    stats.connections_closed.fetch_add(1, Ordering::Relaxed);
                });
            }
        });
        Ok(EchoServer { port, stats, task })
    }

    /// Connections accepted so far (handshakes completed at the server).
    pub fn accepted(&self) -> u64 {
        self.stats.connections_accepted.load(Ordering::Relaxed)
    }

    /// Connections that have ended at the server so far.
    pub fn closed(&self) -> u64 {
        self.stats.connections_closed.load(Ordering::Relaxed)
    }

    pub fn bytes_received(&self) -> u64 {
        self.stats.bytes_received.load(Ordering::Relaxed)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Opens a TCP connection from `source` (an address of the client namespace)
/// to `server:port`, failing after `timeout` (a dropped SYN shows up as that).
pub async fn connect_from(
    ns: &Netns,
    source: IpAddr,
    server: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream> {
    connect_from_port(ns, SocketAddr::new(source, 0), server, timeout).await
}

/// Whether a TCP connection from `source` gets through within `timeout`
/// (a dropped SYN shows up as a timeout).
pub async fn connects(ns: &Netns, source: IpAddr, server: SocketAddr, timeout: Duration) -> bool {
    connect_from(ns, source, server, timeout).await.is_ok()
}

/// Like [`connect_from`], from a chosen source port (0: any).
pub async fn connect_from_port(
    ns: &Netns,
    source: SocketAddr,
    server: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream> {
    let socket = ns.run(move || -> std::io::Result<TcpSocket> {
        let s = if source.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        s.set_reuseaddr(true)?;
        s.bind(source)?;
        Ok(s)
    })?;
    match tokio::time::timeout(timeout, socket.connect(server)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(e).context("connect failed"),
        Err(_) => bail!("connect from {source} to {server} timed out after {timeout:?}"),
    }
}

/// A WebSocket client from `source`, upgraded and ready.
pub async fn ws_connect(
    ns: &Netns,
    source: IpAddr,
    server: SocketAddr,
    timeout: Duration,
) -> Result<WsClient> {
    let stream = connect_from(ns, source, server, timeout).await?;
    let url = format!("ws://{}/ws", server);
    let (ws, _) = tokio::time::timeout(timeout, client_async(url, MaybeTlsStream::Plain(stream)))
        .await
        .context("upgrade timed out")??;
    Ok(ws)
}

/// A WebSocket client from `source` asking for `path` with the given
/// Origin header (or none).
pub async fn ws_connect_with(
    ns: &Netns,
    source: IpAddr,
    server: SocketAddr,
    path: &str,
    origin: Option<&str>,
    timeout: Duration,
) -> Result<WsClient> {
    let stream = connect_from(ns, source, server, timeout).await?;
    upgrade(stream, server, path, origin, timeout).await
}

/// The WebSocket upgrade on a connected stream, for `path` with the given
/// Origin header (or none).
pub async fn upgrade(
    stream: TcpStream,
    server: SocketAddr,
    path: &str,
    origin: Option<&str>,
    timeout: Duration,
) -> Result<WsClient> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{server}{path}").into_client_request()?;
    if let Some(origin) = origin {
        request.headers_mut().insert("Origin", origin.parse()?);
    }
    let (ws, _) = tokio::time::timeout(
        timeout,
        client_async(request, MaybeTlsStream::Plain(stream)),
    )
    .await
    .context("upgrade timed out")??;
    Ok(ws)
}

/// One echo round trip; returns an error if it does not complete in `timeout`.
pub async fn echo(ws: &mut WsClient, payload: &str, timeout: Duration) -> Result<()> {
    tokio::time::timeout(timeout, async {
        ws.send(Message::text(payload.to_string())).await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.as_str() == payload => return Ok(()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(anyhow::Error::from(e)),
                None => bail!("connection closed during echo"),
            }
        }
    })
    .await
    .context("echo timed out")?
}

/// What a connection flood achieved.
#[derive(Debug, Default, Clone, Copy)]
pub struct FloodReport {
    pub attempts: u64,
    pub connected: u64,
}

/// Opens TCP connections from `source` to `server` as fast as it can, with up
/// to `in_flight` handshakes at once, for `duration`. A handshake that does
/// not complete in `attempt_timeout` (its SYN was dropped) counts as failed.
/// Connections that succeed are closed at once.
pub async fn connection_flood(
    ns: &Netns,
    source: IpAddr,
    server: SocketAddr,
    duration: Duration,
    in_flight: usize,
    attempt_timeout: Duration,
) -> Result<FloodReport> {
    let deadline = tokio::time::Instant::now() + duration;
    let mut report = FloodReport::default();
    let mut pending = tokio::task::JoinSet::new();
    let mut sockets: Vec<TcpSocket> = Vec::new();
    while tokio::time::Instant::now() < deadline {
        while pending.len() < in_flight {
            if sockets.is_empty() {
                sockets = tcp_sockets(ns, source, 64)?;
            }
            let socket = sockets.pop().unwrap();
            report.attempts += 1;
            pending.spawn(async move {
                matches!(
                    tokio::time::timeout(attempt_timeout, socket.connect(server)).await,
                    Ok(Ok(_))
                )
            });
        }
        if let Some(done) = pending.join_next().await {
            report.connected += u64::from(done?);
        }
    }
    while let Some(done) = pending.join_next().await {
        report.connected += u64::from(done?);
    }
    Ok(report)
}

/// `n` unconnected TCP sockets bound to `source`, created in `ns`.
pub fn tcp_sockets(ns: &Netns, source: IpAddr, n: usize) -> Result<Vec<TcpSocket>> {
    Ok(ns.run(move || -> std::io::Result<Vec<TcpSocket>> {
        (0..n)
            .map(|_| {
                let s = if source.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                s.bind(SocketAddr::new(source, 0))?;
                Ok(s)
            })
            .collect()
    })?)
}

/// GET `path` from the agent's metrics endpoint (127.0.0.1:9464) inside `ns`;
/// returns (status line, lowercased headers, body).
pub async fn http_get(ns: &Netns, path: &str) -> Result<(String, String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = ns.run(TcpSocket::new_v4)?;
    let mut stream = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], 9464)))
        .await
        .context("connecting to metrics")?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response)).await??;
    let (head, body) = response.split_once("\r\n\r\n").context("no header end")?;
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    Ok((status.to_string(), headers.to_lowercase(), body.to_string()))
}

/// A server from `tests/peers/` (Debian's Python), run in a namespace: a
/// real implementation no one here wrote. It prints `ready` when it listens;
/// its other output lines are kept.
pub struct PythonServer {
    child: std::process::Child,
    lines: Arc<std::sync::Mutex<Vec<String>>>,
}

impl PythonServer {
    pub fn start(ns: &Netns, script: &str, port: u16) -> Result<PythonServer> {
        use std::io::BufRead;
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("peers")
            .join(script);
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name, "/usr/bin/python3", "-u"])
            .arg(&path)
            .arg(port.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", path.display()))?;
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let kept = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(|l| l.ok())
            {
                if line == "ready" {
                    let _ = ready_tx.send(());
                } else {
                    kept.lock().unwrap().push(line);
                }
            }
        });
        if ready.recv_timeout(Duration::from_secs(10)).is_err() {
            let _ = child.kill();
            anyhow::bail!("{script} did not start listening on port {port}");
        }
        Ok(PythonServer { child, lines })
    }

    /// What the server printed (requests it read, upgrades it completed).
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
