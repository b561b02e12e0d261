//! The socket filter on the agent's packet socket: hands user space the
//! client's segments of connections whose handshake awaits a verdict (SYN,
//! request head, FIN/RST), and nothing else, so the agent's cost does not
//! grow with bulk WebSocket traffic.
//!
//! Socket filters cannot read packets directly; [`SkbNetwork`] loads bytes
//! relative to the network header, which works the same on a packet socket
//! (where the data starts at the Ethernet header) and under BPF_PROG_TEST_RUN
//! (where it starts at the network header).

use core::{
    ffi::c_void,
    mem::{MaybeUninit, size_of},
};

use aya_ebpf::{
    bindings::bpf_hdr_start_off::BPF_HDR_START_NET, helpers::bpf_skb_load_bytes_relative,
    programs::SkBuffContext,
};
use wsguard_common::Flow;

use crate::{
    maps::{FLOWS, flow_from_client, handshake_settings, is_inspected_port},
    parse::{Packet, Parsed, parse_network},
};

struct SkbNetwork<'a>(&'a SkBuffContext);

impl Packet for SkbNetwork<'_> {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        let mut out = MaybeUninit::<T>::uninit();
        // SAFETY: the helper writes exactly size_of::<T>() bytes or fails.
        let rc = unsafe {
            bpf_skb_load_bytes_relative(
                self.0.skb.skb.cast(),
                offset as u32,
                out.as_mut_ptr() as *mut c_void,
                size_of::<T>() as u32,
                BPF_HDR_START_NET,
            )
        };
        (rc == 0).then(|| unsafe { out.assume_init() })
    }
}

/// Bytes of the packet to hand over: all of it, or none.
#[inline(always)]
pub fn run(ctx: &SkBuffContext) -> i64 {
    if handshake_settings().is_none() {
        return 0;
    }
    // skb->protocol holds the EtherType in network byte order.
    let ether_type = ctx.skb.protocol() as u16;
    let Parsed::Tcp(segment) = parse_network(&SkbNetwork(ctx), ether_type, 0) else {
        return 0;
    };
    if !is_inspected_port(segment.destination_port) || segment.incomplete_header {
        return 0;
    }
    // XDP runs before packet taps and starts a flow at each SYN it passes
    // (never for allow-listed sources), so a pending flow covers the SYN too.
    match FLOWS.get_ptr(&flow_from_client(&segment)) {
        Some(flow) if unsafe { (*flow).state } == Flow::PENDING => ctx.len() as i64,
        _ => 0,
    }
}
