//! The TC egress program: the server's side of inspected connections.
//!
//! While a connection's handshake has no verdict, the server's answer (any
//! segment with payload) is held back, i.e. dropped: TCP retransmits it, and
//! by then the verdict is in. So a rejected client never sees
//! `101 Switching Protocols`, however fast the server answers. After the
//! verdict timeout, fail-open lets the answer through and fail-closed keeps
//! dropping it. Packets of a rejected connection are dropped, except the
//! server's RST, so the client learns the connection is gone. Allow-listed
//! clients are never held back or dropped.

use aya_ebpf::{bindings::TC_ACT_OK, bindings::TC_ACT_SHOT, programs::TcContext};
use wsguard_common::{Flow, Reason};

use crate::{
    maps::{
        FLOWS, count, flow_from_server, handshake_settings, is_allow_listed, is_inspected_port,
        now_ns, settings,
    },
    parse::{Frame, Parsed, parse},
};

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    let Some(handshake) = handshake_settings() else {
        return TC_ACT_OK;
    };
    let frame = Frame {
        data: ctx.data(),
        end: ctx.data_end(),
    };
    let Parsed::Tcp(segment) = parse(&frame) else {
        return TC_ACT_OK;
    };
    if !is_inspected_port(segment.source_port) || segment.incomplete_header {
        return TC_ACT_OK;
    }
    let Some(flow) = FLOWS.get_ptr(&flow_from_server(&segment)) else {
        return TC_ACT_OK;
    };
    // SAFETY: a map value pointer, valid for this run.
    let flow = unsafe { *flow };
    let now = now_ns();
    // Allow-listed clients are never inspected, so a flow entry for one is
    // left from before it was listed, on a reused port: it holds nothing back.
    let reason = match flow.state {
        Flow::REJECTED | Flow::PENDING if is_allow_listed(&segment.destination, now) => {
            return TC_ACT_OK;
        }
        Flow::REJECTED if !segment.rst => Reason::FlowRejected,
        Flow::PENDING if segment.payload_len > 0 => {
            if now.saturating_sub(flow.since_ns) < handshake.verdict_timeout_ns {
                Reason::ResponseHeld
            } else if handshake.fail_closed != 0 {
                Reason::VerdictTimeout
            } else {
                count(Reason::VerdictTimeoutPassed, frame.len(), false);
                return TC_ACT_OK;
            }
        }
        _ => return TC_ACT_OK,
    };
    let dry_run = settings().is_some_and(|s| s.is_dry_run(reason));
    count(reason, frame.len(), dry_run);
    if dry_run { TC_ACT_OK } else { TC_ACT_SHOT }
}
