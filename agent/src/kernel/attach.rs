//! Attaching the programs: XDP and the SYN-cookie hand-off on each
//! interface, sock_ops on the cgroup, the inspection programs on their maps;
//! taking over the links an earlier run left, and letting go of them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use aya::{
    maps::{MapData, SockHash, SockMap},
    programs::{
        CgroupAttachMode, SchedClassifier, SkMsg, SkSkb, SockOps, TcAttachType, Xdp,
        XdpMode as AyaXdpMode,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use tracing::info;
use wsguard_common::maps::{names, programs};

use super::{Kernel, link_path, open_cgroup, system};
use crate::config::{Config, XdpMode};

fn aya_mode(mode: XdpMode) -> AyaXdpMode {
    match mode {
        XdpMode::Auto => AyaXdpMode::Default,
        XdpMode::Native => AyaXdpMode::Driver,
        XdpMode::Skb => AyaXdpMode::Skb,
    }
}

/// The XDP mode for one interface. SYN cookies send their SYN-ACKs with
/// XDP_TX, which on a veth in native mode reaches the peer only when the
/// peer runs an XDP program too: with `xdp_mode = "auto"` a veth is
/// attached in generic mode instead, and `"native"` is warned about.
fn attach_mode(interface: &str, config: &Config) -> AyaXdpMode {
    if config.syn_cookies.enabled && system::is_veth(interface) {
        match config.agent.xdp_mode {
            XdpMode::Auto => {
                info!(
                    "{interface} is a veth: attaching XDP in generic (skb) mode, where SYN cookie \
                     replies (XDP_TX) reach the peer without an XDP program on it"
                );
                return AyaXdpMode::Skb;
            }
            XdpMode::Native => tracing::warn!(
                "{interface} is a veth in native XDP mode: SYN cookie replies (XDP_TX) are lost \
                 unless the peer runs an XDP program; use xdp_mode = \"auto\" or \"skb\", or \
                 turn syn_cookies off"
            ),
            XdpMode::Skb => {}
        }
    }
    aya_mode(config.agent.xdp_mode)
}

fn ifindex(interface: &str) -> u32 {
    std::ffi::CString::new(interface)
        .map_or(0, |name| unsafe { libc::if_nametoindex(name.as_ptr()) })
}

/// A link held by the agent: pinned (under `pins/links`, so it outlives the
/// process: fail-closed) or only by its file descriptor (a crash detaches
/// it: fail-open).
pub(super) enum Held {
    Pinned { link: PinnedLink, path: PathBuf },
    Owned { link: FdLink, path: PathBuf },
}

impl Held {
    fn path(&self) -> &PathBuf {
        match self {
            Held::Pinned { path, .. } | Held::Owned { path, .. } => path,
        }
    }

    fn new(link: FdLink, path: PathBuf, pin: bool) -> Result<Held> {
        Ok(if pin {
            Held::Pinned {
                link: link
                    .pin(&path)
                    .with_context(|| format!("cannot pin {}", path.display()))?,
                path,
            }
        } else {
            Held::Owned { link, path }
        })
    }

    /// Lets go: leaves the program attached (pinning it if needed) or detaches it.
    fn release(self, keep_attached: bool) -> Result<()> {
        match (self, keep_attached) {
            (Held::Pinned { link, .. }, true) => drop(link),
            (Held::Pinned { link, .. }, false) => drop(link.unpin()?),
            (Held::Owned { link, path }, true) => drop(
                link.pin(&path)
                    .with_context(|| format!("cannot pin {}", path.display()))?,
            ),
            (Held::Owned { link, .. }, false) => drop(link),
        }
        Ok(())
    }
}

/// What `attach` found from an earlier run.
#[derive(Debug, Default)]
pub struct Takeover {
    /// Interfaces whose running XDP link was switched to the new program
    /// without a moment unattached.
    pub interfaces: Vec<String>,
    /// Whether the connection counter had stayed attached, so that its counts
    /// are still exact (otherwise they are reset).
    pub connection_counter: bool,
}

impl Kernel {
    /// Attaches the XDP program to every configured interface and, when the
    /// concurrency limit is on, the connection counter to the cgroup. Links
    /// pinned by an earlier fail-closed run are taken over: the XDP link of
    /// an interface switches to the new program atomically, so no packet goes
    /// unfiltered across a restart. With `keep_enforcing_on_exit` the links
    /// are pinned at once (a crash leaves them enforcing); otherwise only the
    /// agent holds them (a crash detaches them).
    pub fn attach(&mut self, config: &Config) -> Result<Takeover> {
        let pin = config.agent.keep_enforcing_on_exit;
        let dir = self
            .pins
            .clone()
            .context("attaching needs a pin directory")?;
        let mut takeover = Takeover::default();
        let mut wanted = Vec::new();
        for interface in &config.interfaces {
            let mode = attach_mode(interface, config);
            if self.attach_interface(interface, mode, config.agent.xdp_mode, &dir, pin)? {
                takeover.interfaces.push(interface.clone());
            }
            wanted.push(format!("xdp-{interface}"));
            wanted.push(format!("tc-{interface}"));
        }
        let inspecting = !config.handshake.ports.is_empty();
        if inspecting {
            // Before sock_ops can put a socket into the map: a socket in it
            // without the verdict program would be served unjudged.
            self.attach_stream_verdict()?;
        }

        let path = link_path(&dir, "sock_ops");
        let previous = PinnedLink::from_pin(&path).ok();
        takeover.connection_counter = previous.is_some() && config.settings.max_concurrent != 0;
        if config.settings.max_concurrent != 0 || inspecting {
            let (cgroup, cgroup_name) = open_cgroup(config.agent.cgroup.as_deref())?;
            let sock_ops: &mut SockOps = self
                .ebpf
                .program_mut(programs::CONNECTION_TRACKER)
                .context("sock_ops program")?
                .try_into()?;
            // On kernels with BPF links (5.7+) aya attaches through a link,
            // which coexists with other programs and takes no flags: `Single`
            // is the mode that passes none.
            let id = sock_ops
                .attach(cgroup, CgroupAttachMode::Single)
                .with_context(|| {
                    format!(
                        "cannot attach the connection tracker (sock_ops) to {}",
                        cgroup_name.display()
                    )
                })?;
            let link: FdLink = sock_ops
                .take_link(id)?
                .try_into()
                .context("sock_ops attached without a BPF link")?;
            // The new counter is attached before the old one goes, so no
            // close is missed; a connection established in between is
            // counted twice (erring towards the limit, for that one).
            if let Some(old) = previous {
                drop(old.unpin()?);
            }
            self.links.push(Held::new(link, path, pin)?);
            wanted.push("sock_ops".to_string());
        } else if let Some(old) = previous {
            drop(old.unpin()?);
        }
        if !takeover.connection_counter {
            // Connections that closed while no counter was attached were
            // never subtracted: start from zero, which errs towards letting
            // connections through.
            self.clear_connections()?;
        }

        // Links of interfaces no longer in the config.
        for entry in std::fs::read_dir(dir.join("links"))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !wanted.contains(&name) {
                if let Ok(link) = PinnedLink::from_pin(entry.path()) {
                    drop(link.unpin()?);
                    info!("detached {name}, left by an earlier run and no longer configured");
                }
            }
        }
        Ok(takeover)
    }

    /// Attaches XDP to one interface, taking over a link a previous run left
    /// running; returns whether it took over.
    fn attach_interface(
        &mut self,
        interface: &str,
        mode: AyaXdpMode,
        setting: XdpMode,
        dir: &Path,
        pin: bool,
    ) -> Result<bool> {
        let path = link_path(dir, &format!("xdp-{interface}"));
        let xdp: &mut Xdp = self
            .ebpf
            .program_mut(programs::INGRESS)
            .context("xdp program")?
            .try_into()?;
        let (link, took_over) = attach_or_take_over(
            xdp,
            &path,
            |xdp, running| xdp.attach_to_link(XdpLink::try_from(running).ok()?).ok(),
            |xdp| {
                xdp.attach(interface, mode)
                    .map_err(|e| attach_error(interface, setting, e))
            },
            |xdp, id| {
                xdp.take_link(id)?
                    .try_into()
                    .context("XDP attached without a BPF link (kernel older than 5.9?)")
            },
        )?;
        self.links.push(Held::new(link, path, pin)?);
        self.attach_cookie_ack(interface, dir, pin)?;

        self.ifindex
            .insert(interface.to_string(), ifindex(interface));
        Ok(took_over)
    }

    /// Attaches the SYN-cookie hand-off (TC ingress) to one interface,
    /// taking over the link an earlier run left. Attached whether or not
    /// cookies are on: without XDP's metadata it lets every packet by, and
    /// a reload can then switch cookies on or off at once.
    fn attach_cookie_ack(&mut self, interface: &str, dir: &Path, pin: bool) -> Result<()> {
        let path = link_path(dir, &format!("tc-{interface}"));
        let tc: &mut SchedClassifier = self
            .ebpf
            .program_mut(programs::COOKIE_ACK)
            .context("tc program")?
            .try_into()?;
        let (link, _) = attach_or_take_over(
            tc,
            &path,
            |tc, running| {
                tc.attach_to_link(SchedClassifierLink::try_from(running).ok()?)
                    .ok()
            },
            |tc| {
                tc.attach(interface, TcAttachType::Ingress)
                    .with_context(|| {
                        format!("cannot attach the SYN-cookie hand-off (TC ingress) to {interface}")
                    })
            },
            |tc, id| {
                tc.take_link(id)?
                    .try_into()
                    .context("TC attached without a BPF link (kernel older than 6.6?)")
            },
        )?;
        self.links.push(Held::new(link, path, pin)?);
        Ok(())
    }

    /// Interfaces that came back (or were re-created) since they were
    /// attached: their links died with the old device, so attach again.
    /// Returns the interfaces re-attached; an interface that is gone is left
    /// for a later call.
    pub fn reattach_changed(&mut self, config: &Config) -> Result<Vec<String>> {
        let dir = self
            .pins
            .clone()
            .context("attaching needs a pin directory")?;
        let mut done = Vec::new();
        for interface in &config.interfaces {
            let now = ifindex(interface);
            if now == 0 || self.ifindex.get(interface) == Some(&now) {
                continue;
            }
            let stale = [
                link_path(&dir, &format!("xdp-{interface}")),
                link_path(&dir, &format!("tc-{interface}")),
            ];
            self.links.retain(|held| !stale.contains(held.path()));
            self.attach_interface(
                interface,
                attach_mode(interface, config),
                config.agent.xdp_mode,
                &dir,
                config.agent.keep_enforcing_on_exit,
            )?;
            done.push(interface.clone());
        }
        Ok(done)
    }

    /// Configured interfaces that do not exist now.
    pub fn missing_interfaces(config: &Config) -> Vec<String> {
        config
            .interfaces
            .iter()
            .filter(|i| ifindex(i) == 0)
            .cloned()
            .collect()
    }

    /// Lets go of the programs. With `keep_enforcing`, pinned links keep
    /// them attached while no agent runs (fail-closed); otherwise they are
    /// detached (fail-open). Maps stay pinned either way, so the next run
    /// starts from the same bans, buckets and counters.
    pub fn release(mut self, keep_enforcing: bool) -> Result<()> {
        for link in self.links.drain(..) {
            link.release(keep_enforcing)?;
        }
        Ok(())
    }

    /// Pins the links now (fail-closed) or unpins them (fail-open, a crash
    /// then detaches them), after a reload changed `keep_enforcing_on_exit`.
    pub fn set_keep_enforcing(&mut self, keep: bool) -> Result<()> {
        let mut held = Vec::new();
        for link in self.links.drain(..) {
            held.push(match (link, keep) {
                (Held::Owned { link, path }, true) => Held::new(link, path, true)?,
                (Held::Pinned { link, path }, false) => Held::Owned {
                    link: link.unpin()?,
                    path,
                },
                (other, _) => other,
            });
        }
        self.links = held;
        Ok(())
    }

    /// Attaches the stream verdict program to the inspected sockets' map
    /// for good (replacing one an earlier run left there).
    pub fn attach_stream_verdict(&mut self) -> Result<()> {
        let map = self
            .ebpf
            .map(names::INSPECTED)
            .context("inspected sockets map")?;
        let sockets: SockHash<&MapData, u64> = SockHash::try_from(map)?;
        let fd = sockets.fd().try_clone()?;
        let verdict: &mut SkSkb = self
            .ebpf
            .program_mut(programs::STREAM_VERDICT)
            .context("stream verdict program")?
            .try_into()?;
        let id = verdict
            .attach(&fd)
            .context("cannot attach the stream verdict program")?;
        // The attachment belongs to the pinned map, not to this process:
        // aya would detach it when the agent exits, and sockets that
        // sock_ops puts into the map afterwards would then be served
        // unjudged. The next agent's attach replaces it.
        std::mem::forget(verdict.take_link(id)?);
        Ok(())
    }

    /// Attaches the injection program to the injector map and puts the
    /// agent's injection socket in it.
    pub fn attach_injector(&mut self, socket: &impl std::os::fd::AsRawFd) -> Result<()> {
        let fd = {
            let map = self.ebpf.map(names::INJECTOR).context("injector map")?;
            let injector: SockMap<&MapData> = SockMap::try_from(map)?;
            injector.fd().try_clone()?
        };
        let inject: &mut SkMsg = self
            .ebpf
            .program_mut(programs::INJECT)
            .context("injection program")?
            .try_into()?;
        inject
            .attach(&fd)
            .context("cannot attach the injection program")?;
        let mut injector: SockMap<&mut MapData> =
            SockMap::try_from(self.loaded_map_mut(names::INJECTOR)?)?;
        injector
            .set(0, socket, 0)
            .context("cannot put the injection socket into its map")?;
        Ok(())
    }
}

/// Attaches `program` to an interface through the link pinned at `path`:
/// the link an earlier run left is taken over (`take_over`: the switch to
/// the new program is atomic, no packet goes unfiltered), or a new one is
/// made (`attach`). A pin that cannot be taken over (its interface is gone)
/// is stale and removed. Returns the link and whether it was taken over.
fn attach_or_take_over<P, Id>(
    program: &mut P,
    path: &Path,
    take_over: impl FnOnce(&mut P, FdLink) -> Option<Id>,
    attach: impl FnOnce(&mut P) -> Result<Id>,
    take_link: impl FnOnce(&mut P, Id) -> Result<FdLink>,
) -> Result<(FdLink, bool)> {
    let taken = PinnedLink::from_pin(path)
        .ok()
        .and_then(|running| take_over(program, FdLink::from(running)));
    let _ = std::fs::remove_file(path);
    let took_over = taken.is_some();
    let id = match taken {
        Some(id) => id,
        None => attach(program)?,
    };
    Ok((take_link(program, id)?, took_over))
}

fn attach_error(interface: &str, mode: XdpMode, e: aya::programs::ProgramError) -> anyhow::Error {
    let detail = format!("{e:#}");
    let hint = if detail.contains("No such device")
        || detail.contains("ENODEV")
        || detail.contains("unknown network interface")
    {
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
