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
    maps::{Array, HashMap, IterableMap, LpmTrie, MapData},
    programs::{Program, TestRun, TestRunOptions, Xdp},
};
use wsguard::{
    config::Config,
    kernel::{Kernel, lists},
};
use wsguard_common::{
    Ban, Counter, Flow, FlowKey, HandshakeSettings, Reason, SourceKey, SourceState,
    maps::{names, programs},
};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

pub struct XdpHarness {
    pub kernel: Kernel,
}

impl XdpHarness {
    /// Loads the programs with `body` as the config (an `[agent]` section
    /// naming an interface is added; nothing is attached).
    pub fn new(body: &str) -> Result<XdpHarness> {
        XdpHarness::with_agent_keys("", body)
    }

    /// Like [`XdpHarness::new`], with extra lines for `[agent]`.
    pub fn with_agent_keys(agent_keys: &str, body: &str) -> Result<XdpHarness> {
        let text = format!("[agent]\ninterfaces = [\"lo\"]\n{agent_keys}\n\n{body}");
        let config = Config::parse(Path::new("test.toml"), &text)?;
        Ok(XdpHarness {
            kernel: Kernel::load(&config, None)?,
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
            Some(Program::SchedClassifier(p)) => p.test_run(opts),
            Some(Program::SocketFilter(p)) => p.test_run(opts),
            _ => anyhow::bail!("no packet program {name} in the object"),
        }
        .with_context(|| format!("BPF_PROG_TEST_RUN of {name}"))?;
        Ok((result.return_value, result.duration))
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

    /// Runs a frame through the TC egress program.
    pub fn run_egress(&self, frame: &[u8]) -> u32 {
        self.test_run(programs::EGRESS, frame, 1).unwrap().0
    }

    /// Runs a frame through the capture socket filter; returns the bytes it
    /// would hand to user space (0: filtered out).
    pub fn run_capture(&self, frame: &[u8]) -> u32 {
        self.test_run(programs::CAPTURE, frame, 1).unwrap().0
    }

    /// Turns handshake inspection on for `port` (the agent's config will do
    /// this; here the maps are written directly).
    pub fn inspect(&mut self, port: u16, verdict_timeout_ns: u64, fail_closed: bool) {
        let mut ports: Array<&mut MapData, u8> =
            Array::try_from(self.kernel.ebpf_mut().map_mut(names::INSPECT).unwrap()).unwrap();
        ports.set(port as u32, 1, 0).unwrap();
        let mut hs: Array<&mut MapData, HandshakeSettings> =
            Array::try_from(self.kernel.ebpf_mut().map_mut(names::HANDSHAKE).unwrap()).unwrap();
        hs.set(
            0,
            HandshakeSettings {
                enabled: 1,
                fail_closed: u32::from(fail_closed),
                verdict_timeout_ns,
            },
            0,
        )
        .unwrap();
    }

    pub fn flow(&self, key: &FlowKey) -> Option<Flow> {
        let map: HashMap<&MapData, FlowKey, Flow> =
            HashMap::try_from(self.kernel.ebpf().map(names::FLOWS).unwrap()).unwrap();
        map.get(key, 0).ok()
    }

    pub fn set_flow(&mut self, key: &FlowKey, flow: Flow) {
        let mut map: HashMap<&mut MapData, FlowKey, Flow> =
            HashMap::try_from(self.kernel.ebpf_mut().map_mut(names::FLOWS).unwrap()).unwrap();
        map.insert(key, flow, 0).unwrap();
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

    fn hash<V: aya::Pod>(&self, name: &str) -> HashMap<&MapData, SourceKey, V> {
        let map = self.kernel.ebpf().map(name).expect("map");
        HashMap::try_from(map).expect("hash map")
    }

    fn hash_mut<V: aya::Pod>(&mut self, name: &str) -> HashMap<&mut MapData, SourceKey, V> {
        let map = self.kernel.ebpf_mut().map_mut(name).expect("map");
        HashMap::try_from(map).expect("hash map")
    }

    pub fn tracked_sources(&self) -> Vec<SourceKey> {
        self.hash::<SourceState>(names::SOURCES)
            .keys()
            .filter_map(|k| k.ok())
            .collect()
    }

    pub fn ban(&self, key: &SourceKey) -> Option<Ban> {
        self.hash::<Ban>(names::BANS).get(key, 0).ok()
    }

    pub fn set_ban(&mut self, key: &SourceKey, ban: Ban) {
        self.hash_mut::<Ban>(names::BANS)
            .insert(key, ban, 0)
            .expect("writing ban");
    }

    /// Adds `net` to the deny list, as `wsguard deny add` does.
    pub fn deny(&mut self, net: &ipnet::IpNet) -> Result<()> {
        let map = self
            .kernel
            .ebpf_mut()
            .map_mut(names::DENY)
            .context("deny map")?;
        let mut list: lists::List<&mut MapData> = LpmTrie::try_from(map)?;
        lists::add_runtime(&mut list, net, 0)
    }

    /// Bytes the kernel charges for the map of tracked sources (`memlock` in
    /// its fdinfo), which is preallocated for `tracking.max_sources` entries.
    pub fn sources_map_bytes(&self) -> Result<u64> {
        let map = self.hash::<SourceState>(names::SOURCES);
        let fd = map.map().fd().as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
        info.lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
            .context("no memlock in the map's fdinfo")
    }

    pub fn set_open_connections(&mut self, key: &SourceKey, open: u64) {
        self.hash_mut::<u64>(names::CONNECTIONS)
            .insert(key, open, 0)
            .expect("writing connection count");
    }
}
