//! Loading, configuring and attaching the kernel programs.

mod kfuncs;
pub mod lists;
pub mod maps;
mod pins;
mod system;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, ProgramArray, SockHash, SockMap},
    programs::{
        CgroupAttachMode, SchedClassifier, SkMsg, SkSkb, SockOps, TcAttachType, Xdp,
        XdpMode as AyaXdpMode,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use tracing::info;
use wsguard_common::{
    HandshakeSettings, Settings, SourceKey,
    cookie::CookieSettings,
    maps::{Capacity, GlobalState, MAP_FACTS, PORT_SLOTS, names, programs},
};

use crate::config::{Config, XdpMode};
pub use lists::lpm_key;
pub use maps::{MapMut, MapRef, MapSource, Maps, sum_counters};
pub use pins::{PinnedState, link_path, pin_dir, unpin_all};
pub use system::{
    bring_up_loopback, check_privileges, monotonic_ns, open_cgroup, raise_memlock, resolve_pin_path,
};

/// The compiled kernel programs, embedded so that `wsguard` is one file.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wsguard"));

/// Capacity of the inspection maps: twice `handshake.max_connections`, so
/// that handshakes completing at once while the kernel starts refusing new
/// ones (at `max_connections`) still find room.
pub fn inspected_capacity(config: &Config) -> u32 {
    config.handshake.max_connections.saturating_mul(2)
}

/// The number of entries a map gets under `config`.
pub fn capacity(capacity: Capacity, config: &Config) -> u32 {
    match capacity {
        Capacity::Fixed(n) => n,
        Capacity::Sources => config.max_sources,
        Capacity::Bans => config.max_bans,
        Capacity::Inspected => inspected_capacity(config),
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

/// The loaded programs, their maps and their links.
pub struct Kernel {
    ebpf: Ebpf,
    /// The versioned pin directory; `None` for programs loaded only to be
    /// run through BPF_PROG_TEST_RUN.
    pins: Option<PathBuf>,
    /// Links this agent attached (or took over).
    links: Vec<Held>,
    /// The interface index each interface had when attached.
    ifindex: std::collections::HashMap<String, u32>,
    /// Whether this kernel can hand a cookie-validated connection to its
    /// listener (`bpf_sk_assign_tcp_reqsk`, Linux 6.9+).
    syn_cookies_supported: bool,
}

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
enum Held {
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
        // First, as it can refuse the config: nothing is changed then.
        let cookies = self.cookie_settings(config)?;
        let mut ports: Array<&mut MapData, u8> =
            Array::try_from(self.loaded_map_mut(names::PORTS)?)?;
        for port in 0..PORT_SLOTS {
            let protected = u8::from(config.ports.contains(&(port as u16)));
            if ports.get(&port, 0)? != protected {
                ports.set(port, protected, 0)?;
            }
        }
        let mut inspect: Array<&mut MapData, u8> =
            Array::try_from(self.loaded_map_mut(names::INSPECT)?)?;
        for port in 0..PORT_SLOTS {
            let inspected = u8::from(config.handshake.ports.contains(&(port as u16)));
            if inspect.get(&port, 0)? != inspected {
                inspect.set(port, inspected, 0)?;
            }
        }
        let mut hs: Array<&mut MapData, HandshakeSettings> =
            Array::try_from(self.loaded_map_mut(names::HANDSHAKE)?)?;
        // The agent's "pending table full" flag outlives a reload.
        let pending_full = hs.get(&0, 0).map_or(0, |h| h.pending_full);
        let handshake = HandshakeSettings {
            enabled: u32::from(!config.handshake.ports.is_empty()),
            pending_full,
            max_connections: u64::from(config.handshake.max_connections),
            netns_cookie: system::netns_cookie()?,
        };
        hs.set(0, handshake, 0)?;
        for (name, nets) in [(names::ALLOW, &config.allow), (names::DENY, &config.deny)] {
            let mut list: lists::List<&mut MapData> =
                LpmTrie::try_from(self.loaded_map_mut(name)?)?;
            lists::sync_config(&mut list, nets).with_context(|| format!("filling {name}"))?;
        }
        let mut cookie_map: Array<&mut MapData, CookieSettings> =
            Array::try_from(self.loaded_map_mut(names::SYN_COOKIES)?)?;
        cookie_map.set(0, cookies, 0)?;
        let mut settings: Array<&mut MapData, Settings> =
            Array::try_from(self.loaded_map_mut(names::SETTINGS)?)?;
        settings.set(0, config.settings, 0)?;
        // New limits take effect from a full bucket rather than carrying the
        // old state over.
        let mut global: Array<&mut MapData, GlobalState> =
            Array::try_from(self.loaded_map_mut(names::GLOBAL)?)?;
        global.set(0, GlobalState::default(), 0)?;
        Ok(())
    }

    /// The SYN-cookie settings for `config`: what the SYN-ACK offers
    /// mirrors the server's own TCP sysctls and interface MTUs; the key
    /// already in the (pinned) map is kept, so cookies sent before a
    /// restart or reload still check.
    fn cookie_settings(&mut self, config: &Config) -> Result<CookieSettings> {
        let enabled = config.syn_cookies.enabled;
        if enabled && !self.syn_cookies_supported {
            bail!(
                "{}: syn_cookies.enabled = true needs the kernel function {} (Linux 6.9 or later), \
                 which this kernel lacks; set `enabled = false` under [syn_cookies]",
                config.file.display(),
                kfuncs::ASSIGN_TCP_REQSK
            );
        }
        let map: Array<&MapData, CookieSettings> = Array::try_from(
            self.ebpf
                .map(names::SYN_COOKIES)
                .context("map WSG_SYN_COOKIES missing from the object")?,
        )?;
        let mut key = map.get(&0, 0)?.key;
        if key == [0, 0] {
            key = system::random_key()?;
        }
        if enabled {
            system::ensure_tcp_syncookies()?;
        }
        let tcp = system::TcpSysctls::read();
        let mtu = config
            .agent
            .interfaces
            .get_ref()
            .iter()
            .map(|i| system::interface_mtu(i))
            .min()
            .unwrap_or(1500);
        let mut offers = 0;
        if tcp.timestamps {
            offers |= CookieSettings::OFFER_TIMESTAMPS;
        }
        if tcp.sack {
            offers |= CookieSettings::OFFER_SACK;
        }
        if tcp.window_scaling {
            offers |= CookieSettings::OFFER_WSCALE;
        }
        Ok(CookieSettings {
            enabled: u32::from(enabled),
            offers,
            mss_v4: mtu.saturating_sub(40).clamp(536, u16::MAX as u32) as u16,
            mss_v6: mtu.saturating_sub(60).clamp(1220, u16::MAX as u32) as u16,
            server_wscale: tcp.window_scale,
            _pad: [0; 3],
            key,
        })
    }

    fn loaded_map_mut(&mut self, name: &str) -> Result<&mut Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} missing from the object"))
    }

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
        for interface in config.agent.interfaces.get_ref() {
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
        let taken = PinnedLink::from_pin(&path)
            .ok()
            .and_then(|running| XdpLink::try_from(FdLink::from(running)).ok())
            .and_then(|link| xdp.attach_to_link(link).ok());
        // A pin that could not be taken over (its interface is gone) is stale.
        let _ = std::fs::remove_file(&path);
        let took_over = taken.is_some();
        let id = match taken {
            Some(id) => id,
            None => xdp
                .attach(interface, mode)
                .map_err(|e| attach_error(interface, setting, e))?,
        };
        let link: FdLink = xdp
            .take_link(id)?
            .try_into()
            .context("XDP attached without a BPF link (kernel older than 5.9?)")?;
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
        let taken = PinnedLink::from_pin(&path)
            .ok()
            .and_then(|running| SchedClassifierLink::try_from(FdLink::from(running)).ok())
            .and_then(|link| tc.attach_to_link(link).ok());
        let _ = std::fs::remove_file(&path);
        let id = match taken {
            Some(id) => id,
            None => tc
                .attach(interface, TcAttachType::Ingress)
                .with_context(|| {
                    format!("cannot attach the SYN-cookie hand-off (TC ingress) to {interface}")
                })?,
        };
        let link: FdLink = tc
            .take_link(id)?
            .try_into()
            .context("TC attached without a BPF link (kernel older than 6.6?)")?;
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
        for interface in config.agent.interfaces.get_ref() {
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
            .agent
            .interfaces
            .get_ref()
            .iter()
            .filter(|i| ifindex(i) == 0)
            .cloned()
            .collect()
    }

    fn clear_connections(&mut self) -> Result<()> {
        let mut map: HashMap<&mut MapData, SourceKey, u64> =
            HashMap::try_from(self.loaded_map_mut(names::CONNECTIONS)?)?;
        let keys: Vec<SourceKey> = map.keys().filter_map(|k| k.ok()).collect();
        for key in keys {
            let _ = map.remove(&key);
        }
        Ok(())
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

    /// The events ring buffer, for the agent to read (once).
    pub fn take_events(&mut self) -> Result<aya::maps::RingBuf<MapData>> {
        let map = self.ebpf.take_map(names::EVENTS).context("events map")?;
        Ok(aya::maps::RingBuf::try_from(map)?)
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

    /// The inspection records ring buffer, for the agent to read (once).
    pub fn take_stream_records(&mut self) -> Result<aya::maps::RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(names::STREAM_RECORDS)
            .context("stream records map")?;
        Ok(aya::maps::RingBuf::try_from(map)?)
    }
}

impl MapSource for Kernel {
    fn map(&self, name: &'static str) -> Result<MapRef<'_>> {
        self.ebpf
            .map(name)
            .map(MapRef::Loaded)
            .with_context(|| format!("map {name} missing from the object"))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<MapMut<'_>> {
        self.loaded_map_mut(name).map(MapMut::Loaded)
    }
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
