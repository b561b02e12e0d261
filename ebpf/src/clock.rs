//! The XDP program's clock (see `wsguard_common::maps::TickClock`), and the
//! program that lets the agent set it.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::map,
    maps::Array,
};
use wsguard_common::{Settings, maps::ClockSample};

#[map(name = "WSG_CLOCK")]
static SAMPLE: Array<ClockSample> = Array::with_max_entries(1, 0);

/// CLOCK_MONOTONIC to within a tick, for the packet being judged: one load
/// (the verifier inlines `bpf_jiffies64`), a multiply and an add.
#[inline(always)]
pub fn now_ns(settings: &Settings) -> u64 {
    if settings.clock.tick_ns == 0 {
        return unsafe { bpf_ktime_get_coarse_ns() };
    }
    settings.clock.at(unsafe { bpf_jiffies64() })
}

/// `wsguard_clock`: the tick count and the coarse clock read together.
/// `XDP_PASS` when no tick fell between the reads (the coarse clock read
/// the same before and after), so that the two belong to the same tick;
/// `XDP_ABORTED` asks the agent to try again.
#[inline(always)]
pub fn sample() -> u32 {
    let Some(slot) = SAMPLE.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let (before, jiffies, after) = unsafe {
        (
            bpf_ktime_get_coarse_ns(),
            bpf_jiffies64(),
            bpf_ktime_get_coarse_ns(),
        )
    };
    if before != after {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: an array value pointer, valid for the duration of the program.
    unsafe {
        *slot = ClockSample {
            jiffies,
            coarse_ns: before,
        }
    };
    xdp_action::XDP_PASS
}
