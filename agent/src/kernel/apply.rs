//! Writing a config into the loaded maps, at start and on every reload.

use anyhow::{Context, Result, bail};
use aya::maps::{Array, MapData};
use std::time::Duration;

use aya::programs::{Program, TestRun, TestRunOptions};
use wsguard_common::{
    HandshakeSettings, Settings,
    cookie::CookieSettings,
    maps::{ClockSample, SOURCE_WAYS, TickClock, names, programs},
};

use super::{Kernel, kfuncs, lists, maps::Maps, system};
use crate::config::Config;

/// What the clock program returns when its reads belong to one tick.
const XDP_PASS: u32 = 2;

impl Kernel {
    /// Writes the config into the maps: ports, lists, then the settings,
    /// which switch enforcement on. Used at start and on reload; per-source
    /// state and bans are left as they are.
    pub fn apply(&mut self, config: &Config) -> Result<()> {
        // First, as it can refuse the config: nothing is changed then.
        let cookies = self.cookie_settings(config)?;
        self.start_ban_epoch()?;
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
        for (allow, nets) in [(true, &config.allow), (false, &config.deny)] {
            self.with_list(allow, |list| lists::sync_config(list, nets))
                .and_then(|()| self.refresh_list_search(allow))
                .with_context(|| {
                    format!("filling the {} list", if allow { "allow" } else { "deny" })
                })?;
        }
        let mut cookie_map: Array<&mut MapData, CookieSettings> =
            Array::try_from(self.loaded_map_mut(names::SYN_COOKIES)?)?;
        cookie_map.set(0, cookies, 0)?;
        self.set_user_budgets(&config.users.budgets())?;
        // New limits take effect from a full bucket rather than carrying the
        // old state over; the shares CPUs held go with the old buckets.
        self.reset_global_buckets()?;
        let online = aya::util::online_cpus()
            .map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?
            .len() as u32;
        let mut kernel_settings = config.settings;
        kernel_settings.global_connections_share = config.settings.global_connections.share(online);
        kernel_settings.global_bytes_share = config.settings.global_bytes.share(online);
        kernel_settings.source_sets = self.source_capacity()? / SOURCE_WAYS as u32;
        kernel_settings.clock = self.tick_clock()?;
        let mut settings: Array<&mut MapData, Settings> =
            Array::try_from(self.loaded_map_mut(names::SETTINGS)?)?;
        // The hash key already in the (pinned) settings is kept: with
        // another, the sources the table holds would no longer be found.
        kernel_settings.source_hash_key = match settings.get(&0, 0)?.source_hash_key {
            [0, 0] => system::random_key()?,
            key => key,
        };
        settings.set(0, kernel_settings, 0)?;
        Ok(())
    }

    /// The XDP program's clock: ticks of the coarse clock's resolution,
    /// and the offset from the tick count to CLOCK_MONOTONIC, from the two
    /// read together by the clock program. A sample taken while the
    /// kernel has counted a tick but not yet moved the coarse clock on
    /// reads one tick ahead; of samples a little apart, the largest offset
    /// is the right one.
    fn tick_clock(&self) -> Result<TickClock> {
        let tick_ns = system::coarse_tick_ns()?;
        let Some(Program::Xdp(program)) = self.ebpf.program(programs::CLOCK) else {
            bail!("program {} missing from the object", programs::CLOCK);
        };
        let frame = [0u8; 64];
        let mut clock: Option<TickClock> = None;
        for attempt in 0..6 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_micros(1_300));
            }
            let run = program
                .test_run(TestRunOptions {
                    data_in: Some(&frame),
                    repeat: 1,
                    ..Default::default()
                })
                .context("running the clock program")?;
            if run.return_value != XDP_PASS {
                continue; // a tick fell between its reads
            }
            let samples: Array<&MapData, ClockSample> = Array::try_from(
                self.ebpf
                    .map(names::CLOCK)
                    .context("map WSG_CLOCK missing from the object")?,
            )?;
            let sample = TickClock::from_sample(&samples.get(&0, 0)?, tick_ns);
            // Offsets compared as a signed difference (they wrap).
            if clock.is_none_or(|c| sample.offset_ns.wrapping_sub(c.offset_ns) as i64 > 0) {
                clock = Some(sample);
            }
        }
        clock.context("the kernel's tick count and coarse clock never read together")
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
            .interfaces
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
}
