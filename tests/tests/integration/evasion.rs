//! Trying to get around handshake inspection, as an attacker would, against
//! the real agent and a real tokio-tungstenite server: requests the policy
//! forbids, written so that a lenient reader could see something else, must
//! never get `101 Switching Protocols`; the legitimate variant (the same
//! client, an allowed Origin) is served. Spoofed SYNs never earn a ban.
//! docs/reliability.md lists each class with its test.

use std::time::Duration;
use wsguard::kernel::Maps;

use anyhow::{Context, Result, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wsguard_tests::{
    Setup,
    lab::send_frames,
    packets::Packet,
    peers::{PythonServer, connect_from, echo, upgrade},
    wait_until,
};

const SECOND: Duration = Duration::from_secs(1);
const GOOD_ORIGIN: &str = "https://app.example.com";
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Ports of the other servers: python websockets, and a keep-alive HTTP
/// server (Python's http.server).
const PYTHON_WS: u16 = 8081;
const KEEP_ALIVE_HTTP: u16 = 8082;

fn body(extra: &str) -> String {
    format!(
        "[protect]\nports = [8080, 8081, 8082]\n[limits.per_source]\nnew_connections = \"200/s\"\nnew_connections_burst = 200\n[ban]\nafter_drops = 0\n\
         [handshake]\ninspect_ports = [8080, 8081, 8082]\nallowed_origins = [\"{GOOD_ORIGIN}\"]\nallowed_paths = [\"/ws\", \"/live/*\"]\n\
         deadline = \"1s\"\nfailures_before_ban = 0\n{extra}"
    )
}

/// Sends `request` on a fresh connection from client host `host` and
/// returns everything the server answered before the connection ended (or
/// 2 s passed).
async fn answer_to(setup: &Setup, host: u8, request: &[u8]) -> Result<String> {
    answer_on(setup, host, setup.addr.port(), request).await
}

async fn answer_on(setup: &Setup, host: u8, port: u16, request: &[u8]) -> Result<String> {
    let mut stream = connect_from(
        &setup.lab.client,
        setup.lab.client_v4(host).into(),
        std::net::SocketAddr::new(setup.addr.ip(), port),
        2 * SECOND,
    )
    .await?;
    stream.write_all(request).await?;
    // Until the connection ends, or 300 ms after the last byte once an
    // answer's head is in (keep-alive servers keep the connection).
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let until = tokio::time::Instant::now() + 2 * SECOND;
    loop {
        let wait = if answer.windows(4).any(|w| w == b"\r\n\r\n") {
            until.min(tokio::time::Instant::now() + Duration::from_millis(300))
        } else {
            until
        };
        match tokio::time::timeout_at(wait, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
        }
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

fn upgrade_head(target: &str, headers: &str) -> Vec<u8> {
    format!(
        "GET {target} HTTP/1.1\r\nHost: chat.example.com\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{headers}\r\n"
    )
    .into_bytes()
}

/// Each forbidden request, and the same client's legitimate variant, against
/// tokio-tungstenite, python websockets and a keep-alive HTTP server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_two_parsers_read_differently_never_get_101() -> Result<()> {
    let setup = Setup::start(&body("")).await?;
    let python_ws = PythonServer::start(&setup.lab.server, "ws_echo.py", PYTHON_WS)?;
    let keep_alive = PythonServer::start(&setup.lab.server, "http_keepalive.py", KEEP_ALIVE_HTTP)?;
    let evil = "Origin: https://evil.net\r\n";
    let good = format!("Origin: {GOOD_ORIGIN}\r\n");
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        (
            "two Connection headers, keep-alive first",
            upgrade_head(
                "/ws",
                &format!("Connection: keep-alive\r\nConnection: Upgrade\r\n{evil}"),
            ),
            upgrade_head("/ws", &format!("Connection: keep-alive, Upgrade\r\n{good}")),
        ),
        (
            "Connection split by a space",
            upgrade_head("/ws", &format!("Connection: keep-alive Upgrade\r\n{evil}")),
            upgrade_head("/ws", &format!("Connection: keep-alive,Upgrade\r\n{good}")),
        ),
        (
            "two Origin headers, the forbidden one first",
            upgrade_head("/ws", &format!("Connection: Upgrade\r\n{evil}{good}")),
            upgrade_head("/ws", &format!("Connection: Upgrade\r\n{good}")),
        ),
        (
            "two Origin headers, the forbidden one last",
            upgrade_head("/ws", &format!("Connection: Upgrade\r\n{good}{evil}")),
            upgrade_head("/ws", &format!("Connection: Upgrade\r\n{good}")),
        ),
        (
            "dot segments out of an allowed prefix",
            upgrade_head("/live/../admin", &format!("Connection: Upgrade\r\n{good}")),
            upgrade_head("/live/feed", &format!("Connection: Upgrade\r\n{good}")),
        ),
        (
            "encoded dot segments",
            upgrade_head(
                "/live/%2e%2e/admin",
                &format!("Connection: Upgrade\r\n{good}"),
            ),
            upgrade_head("/live/%61dmin", &format!("Connection: Upgrade\r\n{good}")),
        ),
        (
            "absolute-form target naming another host",
            upgrade_head(
                "http://evil.net/ws",
                &format!("Connection: Upgrade\r\n{good}"),
            ),
            upgrade_head(
                "http://chat.example.com/ws",
                &format!("Connection: Upgrade\r\n{good}"),
            ),
        ),
        (
            "a folded Origin line",
            upgrade_head(
                "/ws",
                &format!("Connection: Upgrade\r\nOrigin: https://evil.net\r\n {GOOD_ORIGIN}\r\n"),
            ),
            upgrade_head("/ws", &format!("Connection: Upgrade\r\n{good}")),
        ),
        (
            "a plain keep-alive GET, then the forbidden upgrade",
            [
                b"GET /ws HTTP/1.1\r\nHost: chat.example.com\r\n\r\n".to_vec(),
                upgrade_head("/ws", &format!("Connection: Upgrade\r\n{evil}")),
            ]
            .concat(),
            upgrade_head("/ws", &format!("Connection: Upgrade\r\n{good}")),
        ),
    ];
    for (i, (name, forbidden, legitimate)) in cases.iter().enumerate() {
        let host = 20 + i as u8;
        for port in [setup.addr.port(), PYTHON_WS] {
            let answer = answer_on(&setup, host, port, forbidden).await?;
            ensure!(
                !answer.contains("101"),
                "{name} (port {port}): the forbidden request was upgraded: {answer:?}"
            );
            let answer = answer_on(&setup, host, port, legitimate).await?;
            ensure!(
                answer.starts_with("HTTP/1.1 101"),
                "{name} (port {port}): the legitimate variant was not served: {answer:?}"
            );
        }
        // The keep-alive HTTP server answers every request it reads: the
        // forbidden one never reaches it (only a plain request before it
        // may). Its legitimate variant is not asserted: http.server reads
        // with a blocking thread per connection, which the kernel can leave
        // waiting (README, "What it cannot see").
        let answer = answer_on(&setup, host, KEEP_ALIVE_HTTP, forbidden).await?;
        ensure!(
            answer.matches("HTTP/1.1 200").count() <= 1 && !answer.contains("101"),
            "{name}: the HTTP server answered the forbidden request: {answer:?}"
        );
    }
    let upgraded = python_ws.lines();
    ensure!(
        upgraded.iter().all(|l| !l.contains("evil")),
        "python websockets upgraded a forbidden request: {upgraded:?}"
    );
    let read = keep_alive.lines();
    ensure!(
        read.iter()
            .all(|l| !l.contains("evil") && !l.contains("admin")),
        "the keep-alive server read a forbidden request: {read:?}"
    );
    Ok(())
}

/// A ticket is good for one connection: the same ticket again (from the
/// same address, as from anyone behind the same NAT) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_use_ticket_opens_one_connection_only() -> Result<()> {
    use wsguard::handshake::ticket;
    let secret_file = tempfile::NamedTempFile::new()?;
    std::fs::write(secret_file.path(), "s".repeat(48))?;
    let setup = Setup::start(&body(&format!(
        "[handshake.ticket]\nrequired = true\nsecret_file = \"{}\"\nbind_to_source_ip = false\n",
        secret_file.path().display()
    )))
    .await?;
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 30;
    let t = ticket::mint(&"s".repeat(48).into_bytes(), expires, None);
    let path = format!("/ws?ticket={t}");
    let stream = connect_from(
        &setup.lab.client,
        setup.lab.client_v4(40).into(),
        setup.addr,
        2 * SECOND,
    )
    .await?;
    let first = upgrade(stream, setup.addr, &path, Some(GOOD_ORIGIN), 2 * SECOND).await;
    let mut ws = first
        .map_err(|e| anyhow::anyhow!("first use: {e:#}; agent: {:?}", setup.agent.stdout()))?;
    echo(&mut ws, "first use", SECOND)
        .await
        .map_err(|e| anyhow::anyhow!("first echo: {e:#}; agent: {:?}", setup.agent.stdout()))?;
    let again = answer_to(
        &setup,
        41,
        &upgrade_head(
            &path,
            &format!("Connection: Upgrade\r\nOrigin: {GOOD_ORIGIN}\r\n"),
        ),
    )
    .await?;
    ensure!(
        !again.contains("101"),
        "a replayed ticket was served: {again:?}"
    );
    wait_until("a ticket_replayed event", 2 * SECOND, || {
        setup
            .agent
            .stdout()
            .iter()
            .any(|l| l.contains("\"reason\":\"ticket_replayed\""))
            .then_some(())
    })
    .await?;
    // The cache's fill shows in `wsguard status` (refreshed every second).
    wait_until("the replay cache's fill in status", 3 * SECOND, || {
        let out = setup.agent.cli(&["status", "--json"]);
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let cache = &doc["agent"]["ticket_replay_cache"];
        (cache["entries"] == 1 && cache["capacity"] == 100_000).then_some(())
    })
    .await?;
    // A fresh ticket still works.
    let fresh = ticket::mint(&"s".repeat(48).into_bytes(), expires, None);
    let stream = connect_from(
        &setup.lab.client,
        setup.lab.client_v4(40).into(),
        setup.addr,
        2 * SECOND,
    )
    .await?;
    let mut ws = upgrade(
        stream,
        setup.addr,
        &format!("/ws?ticket={fresh}"),
        Some(GOOD_ORIGIN),
        2 * SECOND,
    )
    .await?;
    echo(&mut ws, "fresh ticket", SECOND).await?;
    Ok(())
}

/// SYNs from a spoofed address never complete the TCP handshake, so they
/// are never judged, cut or counted towards a ban: nobody can get a victim
/// banned by spoofing its address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_syns_never_earn_their_address_a_ban() -> Result<()> {
    let setup =
        Setup::start(&body("").replace("failures_before_ban = 0", "failures_before_ban = 2"))
            .await?;
    let victim = setup.lab.client_v4(30);
    let mac = setup.lab.server_mac()?;
    let server = setup.lab.server_v4();
    let frames: Vec<Vec<u8>> = (0..20)
        .map(|i| {
            Packet::syn(victim.into(), 8080)
                .with(|p| {
                    p.dst_mac = Some(mac);
                    p.dst = Some(server.into());
                    p.src_port = 41000 + i;
                })
                .bytes()
        })
        .collect();
    let link = setup.lab.client_if.clone();
    let sent = send_frames(setup.lab.client.path(), link, frames.into_iter())?;
    ensure!(sent == 20, "sent {sent} SYNs");
    // With SYN cookies (the default) each is answered from XDP and gets no
    // state at all; without, each passes to the listener.
    wait_until("the SYNs to reach XDP", 2 * SECOND, || {
        let answered = setup
            .agent
            .counter(wsguard_common::Reason::SynCookieSent)
            .packets;
        let passed = setup.agent.counter(wsguard_common::Reason::Passed).packets;
        (answered + passed >= 20).then_some(())
    })
    .await?;
    // Two deadlines later: nothing was cut, and the victim is not banned.
    tokio::time::sleep(2 * SECOND + SECOND / 2).await;
    let stdout = setup.agent.stdout().join("\n");
    ensure!(
        !stdout.contains("deadline_cut"),
        "a spoofed SYN was cut: {stdout}"
    );
    ensure!(
        setup.agent.state()?.bans()?.is_empty(),
        "the spoofed address was banned"
    );
    // The real client behind that address is served.
    let stream = connect_from(&setup.lab.client, victim.into(), setup.addr, 2 * SECOND).await?;
    let mut ws = upgrade(stream, setup.addr, "/ws", Some(GOOD_ORIGIN), 2 * SECOND).await?;
    echo(&mut ws, "not banned", SECOND).await?;
    Ok(())
}

/// A client that resets its connection right after a forbidden request is
/// gone by the time its verdict comes: cutting it must not hit anything
/// else (without the socket's cookie, the kernel's lookup for SOCK_DESTROY
/// falls back to the listening socket, and the server would stop
/// accepting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resetting_after_a_forbidden_request_cannot_take_the_listener_down() -> Result<()>
{
    let setup = Setup::start(&body("")).await?;
    let forbidden = upgrade_head("/ws", "Connection: Upgrade\r\nOrigin: https://evil.net\r\n");
    for _ in 0..30 {
        let stream = connect_from(
            &setup.lab.client,
            setup.lab.client_v4(33).into(),
            setup.addr,
            2 * SECOND,
        )
        .await?;
        let std = stream.into_std()?;
        std::io::Write::write_all(&mut &std, &forbidden)?;
        // Close with RST (linger 0): the server's socket goes at once.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&std),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                size_of::<libc::linger>() as u32,
            )
        };
        ensure!(rc == 0, "SO_LINGER: {}", std::io::Error::last_os_error());
        drop(std);
    }
    wait_until("the forbidden requests to be rejected", 3 * SECOND, || {
        (setup
            .agent
            .stdout()
            .iter()
            .filter(|l| l.contains("handshake_rejected"))
            .count()
            >= 20)
            .then_some(())
    })
    .await?;
    let stream = connect_from(
        &setup.lab.client,
        setup.lab.client_v4(34).into(),
        setup.addr,
        2 * SECOND,
    )
    .await?;
    let mut ws = upgrade(stream, setup.addr, "/ws", Some(GOOD_ORIGIN), 2 * SECOND).await?;
    echo(&mut ws, "the listener is still there", SECOND).await?;
    Ok(())
}

mod wire {
    //! Wire-level tricks from a hand-written TCP client: the kernel's TCP
    //! stack decides what the stream is, and the agent judges that stream.

    use super::*;
    use wsguard_tests::raw_tcp::{RawTcp, Segment};

    fn request(origin: &str) -> Vec<u8> {
        upgrade_head(
            "/ws",
            &format!("Connection: Upgrade\r\nOrigin: {origin}\r\n"),
        )
    }

    /// Sends `segments` on a new raw connection from `host` and returns the
    /// server's answer (empty if none within 2 s).
    async fn answer(setup: &Setup, host: u8, segments: Vec<Segment>) -> Result<String> {
        let mut tcp = RawTcp::connect(&setup.lab, host, Setup::PORT)?;
        for s in &segments {
            tcp.send(s)?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tcp.answer(2 * SECOND)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wire_level_tricks_never_get_a_forbidden_request_101() -> Result<()> {
        let setup = Setup::start(&body("")).await?;
        let evil = request("https://evil.net");
        let good = request(GOOD_ORIGIN);
        let harmless_at_same_seq = |bad_checksum: bool, flags: u8| {
            let mut decoy = Segment::data(0, &good);
            decoy.bad_checksum = bad_checksum;
            decoy.flags = flags;
            vec![decoy, Segment::data(0, &evil)]
        };
        let split = evil.len() / 2;
        let cases: Vec<(&str, Vec<Segment>, Vec<Segment>)> = vec![
            (
                "a harmless request with a bad checksum at the real one's sequence number",
                harmless_at_same_seq(
                    true,
                    wsguard_tests::raw_tcp::ACK | wsguard_tests::raw_tcp::PSH,
                ),
                vec![Segment::data(0, &good)],
            ),
            (
                "a harmless request without ACK at the real one's sequence number",
                harmless_at_same_seq(false, wsguard_tests::raw_tcp::PSH),
                vec![Segment::data(0, &good)],
            ),
            (
                "two out-of-order segments at one sequence number, the later one longer",
                vec![
                    Segment::data(split as u32, &good[split..split + 4]),
                    Segment::data(split as u32, &evil[split..]),
                    Segment::data(0, &evil[..split]),
                ],
                vec![
                    Segment::data(split as u32, &good[split..]),
                    Segment::data(0, &good[..split]),
                ],
            ),
            (
                "a forged RST with a bad checksum between the halves",
                vec![
                    Segment::data(0, &evil[..split]),
                    Segment {
                        flags: wsguard_tests::raw_tcp::RST,
                        bad_checksum: true,
                        ..Segment::data(split as u32, b"")
                    },
                    Segment::data(split as u32, &evil[split..]),
                ],
                vec![
                    Segment::data(0, &good[..split]),
                    Segment::data(split as u32, &good[split..]),
                ],
            ),
            (
                "the request in IP fragments",
                vec![Segment {
                    fragment: Some(64),
                    ..Segment::data(0, &evil)
                }],
                vec![Segment {
                    fragment: Some(64),
                    ..Segment::data(0, &good)
                }],
            ),
        ];
        for (i, (name, forbidden, legitimate)) in cases.into_iter().enumerate() {
            let host = 200 + 2 * i as u8;
            let got = answer(&setup, host, forbidden).await?;
            ensure!(
                !got.contains(" 101 "),
                "{name}: the forbidden request was upgraded: {got:?}"
            );
            let got = answer(&setup, host + 1, legitimate).await?;
            ensure!(
                got.starts_with("HTTP/1.1 101"),
                "{name}: the legitimate variant was not served: {got:?}"
            );
        }
        Ok(())
    }
}

/// TCP Fast Open: the request travels in the SYN, and the kernel queues it
/// when it creates the server's socket. It must still go to the agent first:
/// a forbidden request is never read by the server, and a legitimate TFO
/// client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_the_syn_with_tcp_fast_open_are_judged_too() -> Result<()> {
    use std::{
        io::{Read, Write},
        os::fd::{AsRawFd, FromRawFd},
        sync::{Arc, Mutex},
    };
    const TFO_PORT: u16 = 8083;
    // SYN cookies off: with them, data on a SYN is dropped (the SYN is
    // answered with a cookie, without Fast Open) and sent again later.
    let setup =
        Setup::start(&body("[syn_cookies]\nenabled = false\n").replace("8082]", "8082, 8083]"))
            .await?;
    for ns in [&setup.lab.server, &setup.lab.client] {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "sysctl",
                "-qw",
                "net.ipv4.tcp_fastopen=3",
            ])
            .output()?;
        ensure!(
            out.status.success(),
            "sysctl tcp_fastopen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A server that enables TFO on its listener and records what it reads.
    let listener = setup
        .lab
        .server
        .run(move || -> std::io::Result<std::net::TcpListener> {
            let l = std::net::TcpListener::bind(("0.0.0.0", TFO_PORT))?;
            let qlen: libc::c_int = 16;
            let rc = unsafe {
                libc::setsockopt(
                    l.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_FASTOPEN,
                    (&qlen as *const libc::c_int).cast(),
                    4,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(l)
        })?;
    let read_by_server = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = read_by_server.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let seen = seen.clone();
            std::thread::spawn(move || {
                stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                let mut head = Vec::new();
                let mut buf = [0u8; 2048];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        // A blocked read can be woken by bytes that went to
                        // the agent and return EAGAIN (README, "Blocking
                        // readers"): not yet, read again.
                        Err(e)
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                && std::time::Instant::now() < deadline => {}
                        _ => return,
                    }
                }
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).into_owned());
                let _ = stream.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n");
                std::thread::sleep(Duration::from_millis(200));
            });
        }
    });
    let server = std::net::SocketAddrV4::new(setup.lab.server_v4(), TFO_PORT);
    // A client that sends its request with the SYN (TCP_FASTOPEN_CONNECT).
    let tfo_request = |host: u8, origin: &'static str| {
        let client = setup.lab.client_v4(host);
        setup.lab.client.run(move || -> Result<String> {
            let fd =
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
            ensure!(fd >= 0, "socket");
            let mut stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
            let one: libc::c_int = 1;
            const TCP_FASTOPEN_CONNECT: libc::c_int = 30;
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    TCP_FASTOPEN_CONNECT,
                    (&one as *const libc::c_int).cast(),
                    4,
                )
            };
            ensure!(
                rc == 0,
                "TCP_FASTOPEN_CONNECT: {}",
                std::io::Error::last_os_error()
            );
            let local = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(client.octets()),
                },
                sin_zero: [0; 8],
            };
            let remote = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: server.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(server.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            unsafe {
                ensure!(
                    libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), 16) == 0,
                    "bind"
                );
                ensure!(
                    libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), 16) == 0,
                    "connect: {}",
                    std::io::Error::last_os_error()
                );
            }
            stream.write_all(&upgrade_head(
                "/ws",
                &format!("Connection: Upgrade\r\nOrigin: {origin}\r\n"),
            ))?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer);
            Ok(String::from_utf8_lossy(&answer).into_owned())
        })
    };
    let fast_opens = || -> Result<u64> {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &setup.lab.server.name,
                "cat",
                "/proc/net/netstat",
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
        let names: Vec<&str> = lines[0].split_whitespace().collect();
        let values: Vec<&str> = lines[1].split_whitespace().collect();
        let at = names
            .iter()
            .position(|n| *n == "TCPFastOpenPassive")
            .context("no TFO counter")?;
        Ok(values[at].parse()?)
    };
    // The first connection fetches the cookie; the next ones carry data in the SYN.
    let first = tfo_request(35, GOOD_ORIGIN)?;
    ensure!(
        first.starts_with("HTTP/1.1 101"),
        "the first TFO client was not served: {first:?}"
    );
    let before = fast_opens()?;
    for round in 0..3 {
        let got = tfo_request(35, "https://evil.net")?;
        ensure!(
            !got.contains("101"),
            "round {round}: a forbidden request in the SYN was upgraded: {got:?}"
        );
        let got = tfo_request(35, GOOD_ORIGIN)?;
        ensure!(
            got.starts_with("HTTP/1.1 101"),
            "round {round}: a legitimate TFO client was not served: {got:?}"
        );
    }
    ensure!(
        fast_opens()? >= before + 3,
        "the requests did not travel in the SYN"
    );
    let read = read_by_server.lock().unwrap().clone();
    ensure!(
        read.iter().all(|r| !r.contains("evil")),
        "the server read a forbidden request: {read:?}"
    );
    Ok(())
}

/// The same inspection for IPv6 clients: a forbidden Origin never gets
/// `101`, an allowed one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_clients_are_inspected_too() -> Result<()> {
    let setup = Setup::start_v6(&body("")).await?;
    for (host, origin, allowed) in [(2, "https://evil.net", false), (3, GOOD_ORIGIN, true)] {
        let mut stream = connect_from(
            &setup.lab.client,
            setup.lab.client_v6(host).into(),
            setup.addr,
            2 * SECOND,
        )
        .await?;
        stream
            .write_all(&upgrade_head(
                "/ws",
                &format!("Connection: Upgrade\r\nOrigin: {origin}\r\n"),
            ))
            .await?;
        let mut answer = [0u8; 512];
        let n = match tokio::time::timeout(2 * SECOND, stream.read(&mut answer)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => 0,
            Err(_) => anyhow::bail!("no answer and no cut within 2 s for {origin}"),
        };
        let upgraded = answer[..n].starts_with(b"HTTP/1.1 101");
        ensure!(
            upgraded == allowed,
            "Origin {origin} over IPv6: got {:?}",
            String::from_utf8_lossy(&answer[..n])
        );
    }
    ensure!(
        setup
            .agent
            .counter(wsguard_common::Reason::HandedToAgent)
            .packets
            >= 2
    );
    Ok(())
}
