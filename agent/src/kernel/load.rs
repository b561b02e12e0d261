//! Loading the programs: maps sized from the config (and reused from their
//! pins), kernel functions resolved, SYN-cookie programs put in place.

use std::path::Path;

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, ProgramArray},
};
use wsguard_common::maps::{Capacity, MAP_FACTS, names, programs};

use super::{EBPF_OBJECT, Kernel, capacity, kfuncs, pins};
use crate::config::Config;

impl Kernel {
    /// Loads (and verifies) the programs with maps sized from the config, and
    /// fills the maps from it. With `pins`, maps pinned there by an earlier
    /// run are reused, so bans, buckets and counters carry over. Nothing is
    /// attached yet.
    pub fn load(config: &Config, pins: Option<&Path>) -> Result<Kernel> {
        let map_pins = match pins {
            Some(dir) => pins::prepare_map_pins(dir, config)?,
            None => Vec::new(),
        };
        let mut loader = EbpfLoader::new();
        for fact in &MAP_FACTS {
            if !matches!(fact.capacity, Capacity::Fixed(_)) {
                loader.map_max_entries(fact.name, capacity(fact.capacity, config));
            }
        }
        for (name, path) in &map_pins {
            loader.map_pin_path(name, path.as_path());
        }
        if EBPF_OBJECT.is_empty() {
            anyhow::bail!(
                "this wsguard was built with AYA_BUILD_SKIP=1 and carries no kernel programs: build it with `cargo xtask build`"
            );
        }
        let resolved = kfuncs::resolve(EBPF_OBJECT)?;
        let mut ebpf = loader
            .load(&resolved.object)
            .context("the kernel refused to create wsguard's maps")?;
        for name in [
            programs::INGRESS,
            programs::CLOCK,
            programs::COOKIE_SYN,
            programs::COOKIE_CHECK,
            programs::COOKIE_ACK,
            programs::CONNECTION_TRACKER,
            programs::STREAM_VERDICT,
            programs::INJECT,
        ] {
            let program = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?;
            let loaded = match program {
                aya::programs::Program::Xdp(p) => p.load(),
                aya::programs::Program::SockOps(p) => p.load(),
                aya::programs::Program::SkSkb(p) => p.load(),
                aya::programs::Program::SkMsg(p) => p.load(),
                aya::programs::Program::SchedClassifier(p) => p.load(),
                _ => bail!("program {name} has an unexpected type"),
            };
            loaded.with_context(|| format!("the kernel's verifier rejected program {name}"))?;
        }
        fill_cookie_programs(&mut ebpf)?;
        let mut kernel = Kernel {
            ebpf,
            pins: pins.map(Path::to_owned),
            links: Vec::new(),
            ifindex: Default::default(),
            syn_cookies_supported: resolved.has(kfuncs::ASSIGN_TCP_REQSK),
        };
        kernel.apply(config)?;
        Ok(kernel)
    }
}

/// Puts the SYN-cookie programs where the XDP program tail-calls them.
fn fill_cookie_programs(ebpf: &mut Ebpf) -> Result<()> {
    let mut fds = Vec::new();
    for (slot, name) in [
        (wsguard_common::cookie::PROGRAM_SYN, programs::COOKIE_SYN),
        (
            wsguard_common::cookie::PROGRAM_CHECK,
            programs::COOKIE_CHECK,
        ),
    ] {
        let program = ebpf
            .program(name)
            .with_context(|| format!("program {name} missing from the object"))?;
        fds.push((slot, program.fd()?.try_clone()?));
    }
    let mut table: ProgramArray<&mut MapData> = ProgramArray::try_from(
        ebpf.map_mut(names::COOKIE_PROGRAMS)
            .context("map WSG_COOKIE_PROGS missing from the object")?,
    )?;
    for (slot, fd) in &fds {
        table.set(*slot, fd, 0)?;
    }
    Ok(())
}
