//! Loading, configuring and attaching the kernel programs.

mod lists;
mod pins;
mod system;

use std::path::Path;

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, PerCpuArray},
    programs::{CgroupAttachMode, SockOps, Xdp, XdpMode as AyaXdpMode},
};
use wsguard_common::{
    Counter, Reason, Settings,
    maps::{GlobalState, PORT_SLOTS, names, programs},
};

use crate::config::{Config, XdpMode};
pub use lists::lpm_key;
pub use pins::{PinnedState, pin_dir};
pub use system::{check_privileges, monotonic_ns, open_cgroup, raise_memlock, resolve_pin_path};
pub use pins::unpin_all;

/// The compiled kernel programs, embedded so that `wsguard` is one file.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wsguard"));

/// The loaded programs and their maps. Dropping it detaches everything.
pub struct Kernel {
    ebpf: Ebpf,
}

impl Kernel {
    /// Loads (and verifies) the programs with maps sized from the config, and
    /// fills the maps from it. Nothing is attached yet.
    pub fn load(config: &Config) -> Result<Kernel> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::SOURCES, config.max_sources)
            .map_max_entries(names::CONNECTIONS, config.max_sources)
            .map_max_entries(names::BANS, config.max_bans)
            .load(EBPF_OBJECT)
            .context("the kernel refused to create wsguard's maps")?;
        for name in [programs::INGRESS, programs::CONNECTION_TRACKER] {
            let program = ebpf.program_mut(name).with_context(|| format!("program {name} missing from the object"))?;
            let loaded = match program {
                aya::programs::Program::Xdp(p) => p.load(),
                aya::programs::Program::SockOps(p) => p.load(),
                _ => bail!("program {name} has an unexpected type"),
            };
            loaded.with_context(|| format!("the kernel's verifier rejected program {name}"))?;
        }
        let mut kernel = Kernel { ebpf };
        kernel.apply(config)?;
        Ok(kernel)
    }

    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Writes the config into the maps: ports, lists, then the settings,
    /// which switch enforcement on. Used at start and on reload; per-source
    /// state and bans are left as they are.
    pub fn apply(&mut self, config: &Config) -> Result<()> {
        let mut ports: Array<&mut MapData, u8> = Array::try_from(self.map_mut(names::PORTS)?)?;
        for port in 0..PORT_SLOTS {
            let protected = u8::from(config.ports.contains(&(port as u16)));
            if ports.get(&port, 0)? != protected {
                ports.set(port, protected, 0)?;
            }
        }
        lists::sync(self.map_mut(names::ALLOW)?, &config.allow).context("filling the allow list")?;
        lists::sync(self.map_mut(names::DENY)?, &config.deny).context("filling the deny list")?;
        let mut settings: Array<&mut MapData, Settings> = Array::try_from(self.map_mut(names::SETTINGS)?)?;
        settings.set(0, config.settings, 0)?;
        // New limits take effect from a full bucket rather than carrying the
        // old state over.
        let mut global: Array<&mut MapData, GlobalState> = Array::try_from(self.map_mut(names::GLOBAL)?)?;
        global.set(0, GlobalState::default(), 0)?;
        Ok(())
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut Map> {
        self.ebpf.map_mut(name).with_context(|| format!("map {name} missing from the object"))
    }

    /// Attaches the XDP program to every configured interface and, when the
    /// concurrency limit is on, the connection counter to the cgroup.
    pub fn attach(&mut self, config: &Config) -> Result<()> {
        let mode = match config.agent.xdp_mode {
            XdpMode::Auto => AyaXdpMode::Default,
            XdpMode::Native => AyaXdpMode::Driver,
            XdpMode::Skb => AyaXdpMode::Skb,
        };
        let xdp: &mut Xdp = self.ebpf.program_mut(programs::INGRESS).context("xdp program")?.try_into()?;
        for interface in config.agent.interfaces.get_ref() {
            xdp.attach(interface, mode).map_err(|e| attach_error(interface, config.agent.xdp_mode, e))?;
        }
        if config.settings.max_concurrent != 0 {
            let (dir, cgroup) = open_cgroup(config.agent.cgroup.as_deref())?;
            let sock_ops: &mut SockOps =
                self.ebpf.program_mut(programs::CONNECTION_TRACKER).context("sock_ops program")?.try_into()?;
            // On kernels with BPF links (5.7+) aya attaches through a link,
            // which always coexists with other programs and takes no flags:
            // `Single` is the mode that passes none.
            sock_ops
                .attach(dir, CgroupAttachMode::Single)
                .with_context(|| format!("cannot attach the connection counter to cgroup {}", cgroup.display()))?;
        }
        Ok(())
    }

    /// Pins every map under `dir` so that `wsguard status` and other tools can
    /// read them while the agent runs.
    pub fn pin(&self, dir: &Path) -> Result<()> {
        pins::pin_all(&self.ebpf, dir)
    }

    pub fn counters(&self) -> Result<Vec<(Reason, Counter)>> {
        let map = self.ebpf.map(names::COUNTERS).context("counters map")?;
        let counters: PerCpuArray<&MapData, Counter> = PerCpuArray::try_from(map)?;
        sum_counters(&counters)
    }
}

fn attach_error(interface: &str, mode: XdpMode, e: aya::programs::ProgramError) -> anyhow::Error {
    let detail = format!("{e:#}");
    let hint = if detail.contains("No such device") || detail.contains("ENODEV") || detail.contains("unknown network interface") {
        " (no such interface here)".to_string()
    } else if detail.contains("busy") || detail.contains("EBUSY") {
        " (another XDP program is attached; is another wsguard running?)".to_string()
    } else if mode == XdpMode::Native {
        " (the driver may lack native XDP: try xdp_mode = \"auto\" or \"skb\")".to_string()
    } else {
        String::new()
    };
    anyhow::anyhow!("cannot attach XDP ({mode}) to interface {interface}{hint}: {detail}")
}

/// Sums a per-CPU counters array into one value per reason.
pub fn sum_counters<T: std::borrow::Borrow<MapData>>(counters: &PerCpuArray<T, Counter>) -> Result<Vec<(Reason, Counter)>> {
    Reason::ALL
        .iter()
        .map(|&reason| {
            let per_cpu = counters.get(&(reason as u32), 0)?;
            let total = per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            });
            Ok((reason, total))
        })
        .collect()
}

