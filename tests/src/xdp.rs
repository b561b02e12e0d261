//! The XDP program loaded into the kernel (not attached) and driven with
//! crafted frames through BPF_PROG_TEST_RUN.

use std::{
    collections::HashMap as StdHashMap,
    os::fd::{AsFd, AsRawFd},
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result};
use aya::{
    maps::{Array, IterableMap, MapData},
    programs::{Program, TestRun, TestRunOptions, Xdp},
};
use wsguard::{
    config::Config,
    kernel::{Kernel, MapSource, Maps, lists},
};
use wsguard_common::{
    Ban, Counter, HandshakeSettings, Reason, Release, SourceKey, SourceSet, SourceState, Stream,
    maps::{names, programs},
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

pub struct XdpHarness {
    pub kernel: Kernel,
    config: Config,
    _pinned: CpuPin,
}

impl XdpHarness {
    /// Loads the programs with `body` as the config (an `[agent]` section
    /// naming an interface is added; nothing is attached).
    pub fn new(body: &str) -> Result<XdpHarness> {
        XdpHarness::with_agent_keys("", body)
    }

    /// Like [`XdpHarness::new`], with extra lines for `[agent]`. SYN
    /// cookies are off unless `body` has a `[syn_cookies]` table: most
    /// verdict tests are about what a SYN costs without them.
    pub fn with_agent_keys(agent_keys: &str, body: &str) -> Result<XdpHarness> {
        let cookies = if body.contains("[syn_cookies]") {
            ""
        } else {
            "\n[syn_cookies]\nenabled = false\n"
        };
        let text = format!("[agent]\ninterfaces = [\"lo\"]\n{agent_keys}\n\n{body}{cookies}");
        let config = Config::parse(Path::new("test.toml"), &text)?;
        let pinned = CpuPin::here()?;
        Ok(XdpHarness {
            kernel: Kernel::load(&config, None)?,
            config,
            _pinned: pinned,
        })
    }

    /// Loads `wsguard_floor` (XDP_PASS and nothing else), which the agent
    /// never loads, for [`XdpHarness::run_floor`].
    pub fn load_floor(&mut self) -> Result<()> {
        let p: &mut Xdp = self
            .kernel
            .ebpf_mut()
            .program_mut(programs::FLOOR)
            .context("no floor program in the object")?
            .try_into()?;
        p.load()?;
        Ok(())
    }

    /// Like [`XdpHarness::run_repeat`], through the floor program.
    pub fn run_floor(&self, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        self.test_run(programs::FLOOR, frame, repeat)
    }

    /// BPF_PROG_TEST_RUN of the loaded program `name` on `frame`, `repeat`
    /// times: its return value and the kernel's mean time per run.
    fn test_run(&self, name: &str, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..Default::default()
        };
        let result = match self.kernel.ebpf().program(name) {
            Some(Program::Xdp(p)) => p.test_run(opts),
            _ => anyhow::bail!("no packet program {name} in the object"),
        }
        .with_context(|| format!("BPF_PROG_TEST_RUN of {name}"))?;
        Ok((result.return_value, result.duration))
    }

    /// Runs one frame through the ingress program; its verdict and the
    /// frame as the program left it (a SYN-ACK after XDP_TX).
    pub fn run_out(&self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; 4096];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let result = match self.kernel.ebpf().program(programs::INGRESS) {
            Some(Program::Xdp(p)) => p.test_run(opts)?,
            _ => anyhow::bail!("no ingress program"),
        };
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    /// The SYN-cookie settings in the kernel's map (with its key).
    pub fn cookie_settings(&self) -> wsguard_common::cookie::CookieSettings {
        self.kernel.cookie_settings().expect("cookie settings")
    }

    /// Runs one frame through the program and returns its verdict.
    pub fn run(&self, frame: &[u8]) -> u32 {
        self.run_repeat(frame, 1).expect("BPF_PROG_TEST_RUN").0
    }

    /// Runs one frame `repeat` times; returns the verdict and the kernel's
    /// mean time per run.
    pub fn run_repeat(&self, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        self.test_run(programs::INGRESS, frame, repeat)
    }

    /// A loopback TCP connection whose server socket is under inspection
    /// (in `WSG_INSPECTED`, with its stream entry), as sock_ops puts it
    /// there: the stream verdict program sees every byte the client sends.
    /// BPF_PROG_TEST_RUN does not run sk_skb programs, so they are tested on
    /// real sockets.
    pub fn inspected_connection(&mut self) -> Result<InspectedConnection> {
        self.kernel.attach_stream_verdict()?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let client = std::net::TcpStream::connect(listener.local_addr()?)?;
        let (server, _) = listener.accept()?;
        server.set_nonblocking(true)?;
        let cookie = socket_cookie(&server)?;
        self.open_stream(cookie);
        let map = self.kernel.ebpf_mut().map_mut(names::INSPECTED).unwrap();
        let mut sockets: aya::maps::SockHash<&mut MapData, u64> =
            aya::maps::SockHash::try_from(map)?;
        sockets.insert(cookie, server.as_raw_fd(), 0)?;
        Ok(InspectedConnection {
            cookie,
            client,
            server,
        })
    }

    /// Writes the config into the maps again, as a reload does.
    pub fn reload(&mut self) {
        self.kernel
            .apply(&self.config)
            .expect("applying the config");
    }

    pub fn set_pending_full(&mut self, full: bool) {
        self.kernel.set_pending_full(full).unwrap();
    }

    pub fn handshake_settings(&self) -> HandshakeSettings {
        self.kernel
            .handshake_settings()
            .expect("handshake settings")
    }

    /// Sets the kernel's count of open inspected connections.
    pub fn set_inspected_count(&mut self, open: u64) {
        self.kernel.set_inspected_connections(open).unwrap();
    }

    /// Creates the kernel's entry for connection `cookie`, as sock_ops does
    /// when it is established.
    pub fn open_stream(&mut self, cookie: u64) {
        self.kernel
            .set_stream(cookie, Some(Stream::default()))
            .unwrap();
    }

    /// Removes the kernel's entry for connection `cookie`.
    pub fn close_stream(&mut self, cookie: u64) {
        self.kernel.set_stream(cookie, None).unwrap();
    }

    pub fn stream(&self, cookie: u64) -> Option<Stream> {
        self.kernel.stream(cookie)
    }

    pub fn set_release(&mut self, cookie: u64, state: u32, upto: u64) {
        self.kernel
            .set_release(
                cookie,
                Release {
                    state,
                    _pad: 0,
                    upto,
                },
            )
            .unwrap();
    }

    /// The inspection ring buffer, to read what the kernel handed over.
    pub fn take_records(&mut self) -> aya::maps::RingBuf<MapData> {
        self.kernel.take_stream_records().unwrap()
    }

    pub fn counters(&self) -> StdHashMap<Reason, Counter> {
        self.kernel
            .counters()
            .expect("reading counters")
            .into_iter()
            .collect()
    }

    pub fn packets(&self, reason: Reason) -> u64 {
        self.counters()[&reason].packets
    }

    /// Packets dry-run counted as would-drop under `reason`.
    pub fn would_drop(&self, reason: Reason) -> u64 {
        self.kernel
            .would_drop()
            .expect("reading counters")
            .into_iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, c)| c.packets)
    }

    /// Every counter that is not zero, for exact assertions.
    pub fn nonzero(&self) -> Vec<(Reason, u64)> {
        let mut v: Vec<(Reason, u64)> = self
            .counters()
            .into_iter()
            .filter(|(_, c)| c.packets != 0)
            .map(|(r, c)| (r, c.packets))
            .collect();
        v.sort_by_key(|(r, _)| *r as u32);
        v
    }

    pub fn tracked_sources(&self) -> Vec<SourceKey> {
        let sources = self.kernel.tracked_sources().expect("tracked sources");
        sources.into_iter().map(|(key, _)| key).collect()
    }

    /// The kernel's entry for a source (by its tracking key), if the
    /// table holds it.
    pub fn source_state(&self, key: &SourceKey) -> Option<SourceState> {
        let sources = self.kernel.tracked_sources().expect("tracked sources");
        sources.into_iter().find(|(k, _)| k == key).map(|(_, s)| s)
    }

    pub fn ban(&self, key: &SourceKey) -> Option<Ban> {
        let bans = self.kernel.bans().expect("bans");
        bans.into_iter().find(|(k, _)| k == key).map(|(_, ban)| ban)
    }

    pub fn set_ban(&mut self, key: &SourceKey, ban: Ban) {
        self.kernel.set_ban(key, ban).expect("writing ban");
    }

    /// Adds `net` to the deny list, as `wsguard deny add` does.
    pub fn deny(&mut self, net: &ipnet::IpNet) -> Result<()> {
        self.kernel
            .with_list(false, |list| lists::add_runtime(list, net, 0))
    }

    /// Bytes the kernel charges for the map of tracked sources (`memlock` in
    /// its fdinfo), which is preallocated for `tracking.max_sources` entries.
    pub fn sources_map_bytes(&self) -> Result<u64> {
        let map = self.kernel.map(names::SOURCES)?;
        let sets: Array<&MapData, SourceSet> = Array::try_from(&*map)?;
        let fd = sets.map().fd().as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
        info.lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
            .context("no memlock in the map's fdinfo")
    }

    pub fn set_open_connections(&mut self, key: &SourceKey, open: u64) {
        self.kernel
            .set_open_connections(key, open)
            .expect("writing connection count");
    }
}

/// Keeps the calling thread on the CPU it runs on while any harness of
/// the thread is alive. BPF_PROG_TEST_RUN runs the program on the calling
/// CPU, and per-CPU state (counters, each CPU's share of the global
/// buckets) then stays on one CPU, as a flow's packets do on one receive
/// queue; a test that moved between CPUs would see a share it took on one
/// CPU missing on the next. The thread's own CPU set comes back when the
/// last harness goes, so threads it starts later (a benchmark's senders)
/// are not confined to one CPU.
struct CpuPin;

thread_local! {
    /// Harnesses alive on this thread, and the CPU set from before the first.
    static PINS: std::cell::RefCell<(usize, Option<libc::cpu_set_t>)> =
        const { std::cell::RefCell::new((0, None)) };
}

impl CpuPin {
    fn here() -> Result<CpuPin> {
        PINS.with(|pins| {
            let mut pins = pins.borrow_mut();
            if pins.0 == 0 {
                // SAFETY: plain libc calls on a zeroed cpu_set_t; 0 is the
                // calling thread.
                unsafe {
                    let mut before: libc::cpu_set_t = std::mem::zeroed();
                    let size = std::mem::size_of::<libc::cpu_set_t>();
                    anyhow::ensure!(
                        libc::sched_getaffinity(0, size, &mut before) == 0,
                        "sched_getaffinity: {}",
                        std::io::Error::last_os_error()
                    );
                    let cpu = libc::sched_getcpu();
                    anyhow::ensure!(
                        cpu >= 0,
                        "sched_getcpu: {}",
                        std::io::Error::last_os_error()
                    );
                    let mut one: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu as usize, &mut one);
                    anyhow::ensure!(
                        libc::sched_setaffinity(0, size, &one) == 0,
                        "sched_setaffinity: {}",
                        std::io::Error::last_os_error()
                    );
                    pins.1 = Some(before);
                }
            }
            pins.0 += 1;
            Ok(CpuPin)
        })
    }
}

impl Drop for CpuPin {
    fn drop(&mut self) {
        PINS.with(|pins| {
            let mut pins = pins.borrow_mut();
            pins.0 -= 1;
            if pins.0 == 0
                && let Some(before) = pins.1.take()
            {
                // SAFETY: restores the set read in `here`.
                unsafe {
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &before);
                }
            }
        });
    }
}

/// A loopback connection under inspection (see [`XdpHarness::inspected_connection`]).
pub struct InspectedConnection {
    pub cookie: u64,
    pub client: std::net::TcpStream,
    /// Non-blocking: a read shows what the application would get now.
    pub server: std::net::TcpStream,
}

impl InspectedConnection {
    /// Sends from the client and waits until the kernel has taken the
    /// bytes in (the stream verdict runs as they arrive).
    pub fn send(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.client.write_all(bytes).unwrap();
    }

    /// What the server application can read now (waiting up to `wait` for
    /// the first byte).
    pub fn server_reads(&mut self, wait: Duration) -> Vec<u8> {
        use std::io::Read;
        let deadline = std::time::Instant::now() + wait;
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match self.server.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if !out.is_empty() || std::time::Instant::now() >= deadline {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("server read: {e}"),
            }
        }
        out
    }
}

/// The socket's cookie (SO_COOKIE), the key inspection uses.
pub fn socket_cookie(socket: &impl AsRawFd) -> Result<u64> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_COOKIE");
    }
    Ok(cookie)
}
