//! SYN cookies: a source proves it is real before it costs anything.
//!
//! - A SYN to a protected port is answered from XDP with a SYN-ACK whose
//!   sequence number is a cookie ([`wsguard_common::cookie`]); the SYN never
//!   reaches the TCP stack, the per-source map or any budget.
//! - A segment that belongs to no connection (the socket lookup finds only
//!   the listener, or nothing) must be the ACK returning a valid cookie.
//!   Then XDP charges the new connection to the budgets and, if it passes,
//!   marks it for the TC program with a reserved TCP header bit
//!   ([`ADMITTED_HINT`]).
//! - The TC ingress program ([`assign`]) checks the cookie of a marked
//!   segment again (the mark is only a hint: anyone can set a bit), clears
//!   the mark and hands the connection to its listener as a request socket
//!   (`bpf_sk_assign_tcp_reqsk`, kernel 6.9+). The TCP stack completes it
//!   without its SYN queue ever seeing the flood, whatever its own
//!   `tcp_syncookies` setting. (XDP metadata would carry more, but neither
//!   generic XDP nor every driver hands it on to TC.)

use aya_ebpf::{
    bindings::{__sk_buff, TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_sock, bpf_sock_tuple},
    helpers::{
        bpf_l4_csum_replace, bpf_sk_release, bpf_skb_load_bytes, bpf_skb_store_bytes,
        bpf_skc_lookup_tcp, bpf_skc_to_tcp_sock, bpf_xdp_adjust_tail, bpf_xdp_load_bytes,
    },
    macros::map,
    maps::PerCpuArray,
    programs::{TcContext, XdpContext},
};
use wsguard_common::{
    PortSet,
    cookie::{
        self, CookieOptions, CookieSettings, CookieTuple, MAX_WSCALE, MSS_V4, MSS_V6, NO_WSCALE,
    },
};

use crate::parse::{Frame, Packet, Parsed, TcpSegment, parse};

const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_MSS: u8 = 2;
const TCPOPT_WINDOW: u8 = 3;
const TCPOPT_SACK_PERM: u8 = 4;
const TCPOPT_TIMESTAMP: u8 = 8;
/// TCP options fit in 40 bytes (data offset 15).
const MAX_OPTION_BYTES: usize = 40;
/// Options (NOPs included) walked before giving up on the rest: Linux sends
/// 5, Windows 6, macOS 8 in a SYN.
const MAX_OPTIONS: usize = 12;
/// Where a TCP header the cookie path answers can start at most: Ethernet,
/// two VLAN tags and an IPv6 header.
const MAX_TCP_OFFSET: usize = 14 + 8 + 40;
const _: () = assert!(MAX_TCP_OFFSET <= 0x7f && 20 + MAX_OPTION_BYTES <= 0x3f);
const TCP_LISTEN: u32 = 10;
/// `BPF_F_CURRENT_NETNS`: look sockets up in the packet's network namespace.
const CURRENT_NETNS: u64 = u64::MAX;

/// The options of a SYN or an ACK that a cookie needs.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct TcpOptions {
    /// 0 when absent.
    mss: u16,
    /// [`NO_WSCALE`] when absent.
    wscale: u8,
    sack_permitted: bool,
    timestamps: bool,
    tsval: u32,
    tsecr: u32,
}

/// Walks the options of the TCP header at `offset` (`header_len` bytes).
/// A malformed option ends the walk; what was read before it stands.
///
/// The options are copied into a per-CPU map slot first and walked there,
/// with the position kept in the slot too: the verifier does not follow
/// values through map memory, so every step looks alike to it and the walk
/// verifies in a few hundred steps instead of once per way through it.
#[inline(always)]
fn tcp_options(
    load: impl FnOnce(u32, *mut core::ffi::c_void, u32) -> i64,
    offset: usize,
    header_len: usize,
) -> TcpOptions {
    let none = TcpOptions {
        wscale: NO_WSCALE,
        ..Default::default()
    };
    let Some(walk) = OPTION_WALK.get_ptr_mut(0) else {
        return none;
    };
    // SAFETY: a per-CPU map slot; only this program runs on this CPU now.
    let walk = unsafe { &mut *walk };
    walk.found = none;
    walk.at = 0;
    let len = header_len.min(20 + MAX_OPTION_BYTES).saturating_sub(20);
    if len == 0 || offset > MAX_TCP_OFFSET {
        return none;
    }
    walk.len = len as u32;
    // The loader (bpf_xdp_load_bytes or bpf_skb_load_bytes) writes at most
    // `len` (<= 40) bytes into the slot.
    let copied = load(
        (offset + 20) as u32,
        walk.bytes.as_mut_ptr() as *mut _,
        (len & 0x3f) as u32,
    );
    if copied != 0 {
        return none;
    }
    for _ in 0..MAX_OPTIONS {
        // Volatile reads: the compiler must not carry the position over in
        // a register, where the verifier would follow it.
        // SAFETY: plain reads of the map slot.
        let (at, len) = unsafe {
            (
                core::ptr::read_volatile(&walk.at) as usize,
                core::ptr::read_volatile(&walk.len) as usize,
            )
        };
        if at >= len {
            break;
        }
        // Indices masked into the 64-byte buffer: in bounds for the
        // verifier whatever it makes of `at` (the walk stops at `len`).
        let byte = |i: usize| Some(walk.bytes[i & 63]);
        let Some(kind) = byte(at) else {
            break;
        };
        if kind == TCPOPT_EOL {
            break;
        }
        if kind == TCPOPT_NOP {
            walk.at = (at + 1) as u32;
            continue;
        }
        let Some(size) = byte(at + 1) else {
            break;
        };
        let size = size as usize;
        if size < 2 || at + size > len {
            break;
        }
        let (a, b, c, d) = (byte(at + 2), byte(at + 3), byte(at + 4), byte(at + 5));
        match (kind, size, a, b) {
            (TCPOPT_MSS, 4, Some(a), Some(b)) => walk.found.mss = u16::from_be_bytes([a, b]),
            (TCPOPT_WINDOW, 3, Some(a), _) => walk.found.wscale = a.min(MAX_WSCALE),
            (TCPOPT_SACK_PERM, 2, _, _) => walk.found.sack_permitted = true,
            (TCPOPT_TIMESTAMP, 10, Some(a), Some(b)) => {
                let (e, f, g, h) = (byte(at + 6), byte(at + 7), byte(at + 8), byte(at + 9));
                if let (Some(c), Some(d), Some(e), Some(f), Some(g), Some(h)) = (c, d, e, f, g, h) {
                    walk.found.timestamps = true;
                    walk.found.tsval = u32::from_be_bytes([a, b, c, d]);
                    walk.found.tsecr = u32::from_be_bytes([e, f, g, h]);
                }
            }
            _ => {}
        }
        walk.at = (at + size) as u32;
    }
    walk.found
}

/// The state of [`tcp_options`]'s walk.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct OptionWalk {
    found: TcpOptions,
    /// The options, as copied from the packet (at most 40 bytes; 64 so
    /// that masked indices stay inside), and how many bytes of them.
    bytes: [u8; 64],
    len: u32,
    /// The next option, from the start of the options.
    at: u32,
}

#[map(name = "WSG_TCP_OPTIONS")]
static OPTION_WALK: PerCpuArray<OptionWalk> = PerCpuArray::with_max_entries(1, 0);

/// The client's and the server's addresses (16-byte key space) and the
/// TCP header fields a cookie needs.
struct Endpoints {
    client: [u8; 16],
    server: [u8; 16],
    client_port: u16,
    seq: u32,
    ack_seq: u32,
    header_len: usize,
}

#[inline(always)]
fn endpoints<P: Packet>(packet: &P, segment: &TcpSegment) -> Option<Endpoints> {
    let l3 = segment.network_offset;
    let server = if segment.ipv4 {
        let a = packet.read::<[u8; 4]>(l3 + 16)?;
        wsguard_common::SourceKey::from_v4(a).addr
    } else {
        packet.read::<[u8; 16]>(l3 + 24)?
    };
    let l4 = segment.transport_offset;
    let head = packet.read::<[u8; 13]>(l4)?;
    Some(Endpoints {
        client: segment.source.addr,
        server,
        client_port: u16::from_be_bytes([head[0], head[1]]),
        seq: u32::from_be_bytes([head[4], head[5], head[6], head[7]]),
        ack_seq: u32::from_be_bytes([head[8], head[9], head[10], head[11]]),
        header_len: (head[12] >> 4) as usize * 4,
    })
}

/// What the socket lookup says a non-SYN segment belongs to.
pub enum Belongs {
    /// A connection the stack knows (established, closing, or a request
    /// socket of an allow-listed source's SYN).
    Connection,
    /// Only a listener, or no socket at all: nothing but a cookie can admit it.
    Nothing,
}

/// Looks the segment's 4-tuple up among the TCP sockets of the packet's
/// network namespace.
#[inline(always)]
pub fn belongs(
    ctx_ptr: *mut core::ffi::c_void,
    packet: &impl Packet,
    segment: &TcpSegment,
) -> Belongs {
    match lookup(ctx_ptr, packet, segment) {
        Some(sk) => {
            // SAFETY: a socket reference from bpf_skc_lookup_tcp, released below.
            let state = unsafe { (*sk).state };
            unsafe { bpf_sk_release(sk as *mut _) };
            if state == TCP_LISTEN {
                Belongs::Nothing
            } else {
                Belongs::Connection
            }
        }
        None => Belongs::Nothing,
    }
}

/// `struct bpf_sock_tuple` for IPv6 (the larger member): addresses and
/// ports in network byte order.
#[repr(C)]
struct SockTuple {
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: u16,
    dport: u16,
}

/// A referenced socket for the segment's 4-tuple (released by the caller).
#[inline(always)]
fn lookup(
    ctx_ptr: *mut core::ffi::c_void,
    packet: &impl Packet,
    segment: &TcpSegment,
) -> Option<*mut bpf_sock> {
    let l3 = segment.network_offset;
    let ports = packet.read::<[u8; 4]>(segment.transport_offset)?;
    let mut tuple = SockTuple {
        saddr: [0; 16],
        daddr: [0; 16],
        sport: u16::from_ne_bytes([ports[0], ports[1]]),
        dport: u16::from_ne_bytes([ports[2], ports[3]]),
    };
    let size = if segment.ipv4 {
        // The IPv4 member: saddr, daddr, sport, dport, packed into 12 bytes.
        let addrs = packet.read::<[u8; 8]>(l3 + 12)?;
        tuple.saddr[..8].copy_from_slice(&addrs);
        tuple.saddr[8..12].copy_from_slice(&ports);
        12u32
    } else {
        tuple.saddr = packet.read::<[u8; 16]>(l3 + 8)?;
        tuple.daddr = packet.read::<[u8; 16]>(l3 + 24)?;
        core::mem::size_of::<SockTuple>() as u32
    };
    // SAFETY: the helper reads `size` bytes of the tuple; the context
    // pointer is the program's own.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx_ptr,
            &mut tuple as *mut SockTuple as *mut bpf_sock_tuple,
            size,
            CURRENT_NETNS,
            0,
        )
    };
    if sk.is_null() { None } else { Some(sk) }
}

/// The shapes the cookie path handles: a complete TCP header right after
/// an IPv4 header without options or an IPv6 header without extensions.
#[inline(always)]
fn answerable(segment: &TcpSegment) -> bool {
    segment.plain && !segment.incomplete_header && segment.transport_offset <= MAX_TCP_OFFSET
}

/// Answers a SYN in place with a SYN-ACK carrying a cookie; the caller
/// returns XDP_TX. `Err` when the SYN cannot be answered (IP options, IPv6
/// extension headers, a frame that cannot be resized).
#[inline(always)]
pub fn answer_syn(
    ctx: &XdpContext,
    segment: &TcpSegment,
    settings: &CookieSettings,
    now_ns: u64,
) -> Result<(), ()> {
    if !answerable(segment) {
        return Err(());
    }
    let frame = Frame {
        data: ctx.data(),
        end: ctx.data_end(),
    };
    let ends = endpoints(&frame, segment).ok_or(())?;
    let options = tcp_options(xdp_loader(ctx), segment.transport_offset, ends.header_len);
    let table = if segment.ipv4 { &MSS_V4 } else { &MSS_V6 };
    let wscale = if settings.offers(CookieSettings::OFFER_WSCALE) {
        options.wscale
    } else {
        NO_WSCALE
    };
    let sack = settings.offers(CookieSettings::OFFER_SACK) && options.sack_permitted;
    let timestamps = settings.offers(CookieSettings::OFFER_TIMESTAMPS) && options.timestamps;
    let carried = CookieOptions {
        mss_index: cookie::mss_index(table, options.mss),
        wscale,
        sack,
    };
    let tuple = CookieTuple {
        client: ends.client,
        server: ends.server,
        client_port: ends.client_port,
        server_port: segment.destination_port,
        client_isn: ends.seq,
    };
    let isn = cookie::make(&settings.key, &tuple, carried, cookie::slot(now_ns));

    // The SYN-ACK's TCP options, in the kernel's own order.
    let mut words = [0u32; 5];
    let mut n = 0usize;
    let our_mss = if segment.ipv4 {
        settings.mss_v4
    } else {
        settings.mss_v6
    };
    words[0] = 0x0204_0000 | u32::from(our_mss);
    n += 1;
    if timestamps {
        words[1] = if sack { 0x0402_080a } else { 0x0101_080a };
        // Any value will do: the stack continues from it (ts_off).
        words[2] = (now_ns / 1_000_000) as u32;
        words[3] = options.tsval;
        n += 3;
    } else if sack {
        words[1] = 0x0101_0402;
        n += 1;
    }
    if wscale != NO_WSCALE {
        let window = 0x0103_0300 | u32::from(settings.server_wscale);
        if n == 1 {
            words[1] = window;
        } else if n == 2 {
            words[2] = window;
        } else {
            words[4] = window;
        }
        n += 1;
    }
    let tcp_len = 20 + 4 * n;
    // The TCP header as five 32-bit words, checksum left at zero for now.
    let header = [
        u32::from(segment.destination_port) << 16 | u32::from(ends.client_port),
        isn,
        ends.seq.wrapping_add(1),
        ((tcp_len as u32 / 4) << 28)
            | u32::from(TcpSegment::SYN | TcpSegment::ACK) << 16
            | u32::from(u16::MAX),
        0,
    ];
    let mut sum = 6 + tcp_len as u64;
    for word in header {
        sum += u64::from(word >> 16) + u64::from(word & 0xffff);
    }
    for i in 0..5 {
        if i < n {
            sum += u64::from(words[i] >> 16) + u64::from(words[i] & 0xffff);
        }
    }
    sum += cookie::sum_be16(&ends.server) + cookie::sum_be16(&ends.client);
    if segment.ipv4 {
        // The pseudo header holds the 4-byte addresses; the mapped prefix
        // (::ffff) summed above comes off again.
        sum -= 2 * 0xffff;
    }
    let tcp_check = cookie::fold_checksum(sum);

    // Resize the frame to headers only (a SYN's data, if any, is dropped:
    // the client sends it again once connected).
    let l3 = segment.network_offset;
    let l4 = segment.transport_offset;
    let new_len = l4 + tcp_len;
    let delta = new_len as i32 - (frame.end - frame.data) as i32;
    if delta != 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return Err(());
    }
    let data = ctx.data();
    let end = ctx.data_end();
    if l4 > 128 || data + new_len > end {
        return Err(());
    }
    let put = |at: usize, word: u32| -> Result<(), ()> {
        if data + at + 4 > end {
            return Err(());
        }
        // SAFETY: within the frame, checked above.
        unsafe { core::ptr::write_unaligned((data + at) as *mut [u8; 4], word.to_be_bytes()) };
        Ok(())
    };
    // Ethernet: the addresses swap; VLAN tags and EtherType stay.
    if data + 12 > end {
        return Err(());
    }
    // SAFETY: the first 12 bytes are within the frame, checked above.
    unsafe {
        let eth = data as *mut [u8; 6];
        let destination = *eth;
        *eth = *eth.add(1);
        *eth.add(1) = destination;
    }
    if segment.ipv4 {
        let server = u32::from_be_bytes([
            ends.server[12],
            ends.server[13],
            ends.server[14],
            ends.server[15],
        ]);
        let client = u32::from_be_bytes([
            ends.client[12],
            ends.client[13],
            ends.client[14],
            ends.client[15],
        ]);
        let mut ip = [
            0x4500_0000 | (new_len - l3) as u32,
            0x0000_4000, // DF
            64 << 24 | 6 << 16,
            server,
            client,
        ];
        let mut ip_sum = 0u64;
        for word in ip {
            ip_sum += u64::from(word >> 16) + u64::from(word & 0xffff);
        }
        ip[2] |= u32::from(cookie::fold_checksum(ip_sum));
        for (i, word) in ip.iter().enumerate() {
            put(l3 + 4 * i, *word)?;
        }
    } else {
        put(l3, 0x6000_0000)?;
        put(l3 + 4, (tcp_len as u32) << 16 | 6 << 8 | 64)?;
        for i in 0..4 {
            let at = 4 * i;
            let s = &ends.server;
            let c = &ends.client;
            put(
                l3 + 8 + at,
                u32::from_be_bytes([s[at], s[at + 1], s[at + 2], s[at + 3]]),
            )?;
            put(
                l3 + 24 + at,
                u32::from_be_bytes([c[at], c[at + 1], c[at + 2], c[at + 3]]),
            )?;
        }
    }
    for (i, word) in header.iter().enumerate() {
        let word = if i == 4 {
            u32::from(tcp_check) << 16
        } else {
            *word
        };
        put(l4 + 4 * i, word)?;
    }
    for i in 0..5 {
        if i < n {
            put(l4 + 20 + 4 * i, words[i])?;
        }
    }
    Ok(())
}

/// What a valid cookie admits: the options of the connection the TCP
/// stack is to create.
pub struct Admitted {
    pub mss: u16,
    /// The client's window scale, or [`NO_WSCALE`].
    pub client_wscale: u8,
    pub sack: bool,
    /// The ACK's timestamp option, when timestamps were offered and it has one.
    pub timestamps: bool,
    pub tsval: u32,
    pub tsecr: u32,
}

/// A reserved bit of the TCP header (byte 12) that XDP sets on a segment
/// whose cookie it admitted, for the TC program to find it without a socket
/// lookup per segment. TCP receivers ignore reserved bits, and TC clears it.
pub const ADMITTED_HINT: u8 = 0x02;

/// `bpf_xdp_load_bytes` on `ctx`, for [`tcp_options`].
#[inline(always)]
fn xdp_loader(ctx: &XdpContext) -> impl FnOnce(u32, *mut core::ffi::c_void, u32) -> i64 + '_ {
    move |offset, to, len| unsafe { bpf_xdp_load_bytes(ctx.ctx, offset, to, len) }
}

/// Checks the cookie a plain ACK returns (its acknowledgment number minus
/// one); what it admits, when valid.
#[inline(always)]
fn verify_ack<P: Packet>(
    packet: &P,
    segment: &TcpSegment,
    settings: &CookieSettings,
    now_ns: u64,
    load: impl FnOnce(u32, *mut core::ffi::c_void, u32) -> i64,
) -> Option<Admitted> {
    if !answerable(segment) || !segment.is_plain_ack() {
        return None;
    }
    let ends = endpoints(packet, segment)?;
    let tuple = CookieTuple {
        client: ends.client,
        server: ends.server,
        client_port: ends.client_port,
        server_port: segment.destination_port,
        client_isn: ends.seq.wrapping_sub(1),
    };
    let carried = cookie::check(
        &settings.key,
        &tuple,
        ends.ack_seq.wrapping_sub(1),
        cookie::slot(now_ns),
    )?;
    let options = tcp_options(load, segment.transport_offset, ends.header_len);
    let table = if segment.ipv4 { &MSS_V4 } else { &MSS_V6 };
    Some(Admitted {
        mss: table[(carried.mss_index & 3) as usize],
        client_wscale: carried.wscale,
        sack: carried.sack,
        timestamps: settings.offers(CookieSettings::OFFER_TIMESTAMPS) && options.timestamps,
        tsval: options.tsval,
        tsecr: options.tsecr,
    })
}

/// XDP: whether a segment of no connection returns a valid cookie.
#[inline(always)]
pub fn check_ack(
    ctx: &XdpContext,
    frame: &Frame,
    segment: &TcpSegment,
    settings: &CookieSettings,
    now_ns: u64,
) -> bool {
    verify_ack(frame, segment, settings, now_ns, xdp_loader(ctx)).is_some()
}

/// XDP: sets [`ADMITTED_HINT`] on an admitted segment, keeping its TCP
/// checksum right (RFC 1624).
#[inline(always)]
pub fn mark_admitted(ctx: &XdpContext, segment: &TcpSegment) -> Result<(), ()> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let l4 = segment.transport_offset;
    if l4 > MAX_TCP_OFFSET || data + l4 + 18 > end {
        return Err(());
    }
    // SAFETY: bytes 12..18 of the TCP header are within the frame, checked above.
    unsafe {
        let word = (data + l4 + 12) as *mut [u8; 2];
        let check = (data + l4 + 16) as *mut [u8; 2];
        let old = u16::from_be_bytes(*word);
        let new = old | u16::from(ADMITTED_HINT) << 8;
        let sum = u64::from(!u16::from_be_bytes(*check)) + u64::from(!old) + u64::from(new);
        *check = cookie::fold_checksum(sum).to_be_bytes();
        *word = new.to_be_bytes();
    }
    Ok(())
}

/// `struct bpf_tcp_req_attrs` (include/net/tcp.h, kernel 6.9+; the
/// kernel refuses any other size).
#[repr(C)]
pub struct TcpReqAttrs {
    pub rcv_tsval: u32,
    pub rcv_tsecr: u32,
    pub mss: u16,
    pub rcv_wscale: u8,
    pub snd_wscale: u8,
    pub ecn_ok: u8,
    pub wscale_ok: u8,
    pub sack_ok: u8,
    pub tstamp_ok: u8,
    pub usec_ts_ok: u8,
    pub reserved: [u8; 3],
}

unsafe extern "C" {
    /// kfunc: gives `skb` a request socket for `listener` built from
    /// `attrs`; the TCP stack completes it as it would a SYN cookie's.
    /// The agent turns this call into a kfunc call before loading
    /// (aya does not resolve kfuncs itself).
    fn bpf_sk_assign_tcp_reqsk(
        skb: *mut __sk_buff,
        listener: *mut core::ffi::c_void,
        attrs: *mut TcpReqAttrs,
        attrs_size: u32,
    ) -> i32;
}

/// TC ingress: a segment XDP marked as admitted becomes a request socket
/// of its listener once its cookie checks here too. Everything else goes
/// on untouched (TC_ACT_UNSPEC: the next program in the interface's chain,
/// if any, still runs).
#[inline(always)]
pub fn assign(ctx: &TcContext, protected_ports: &PortSet, settings: &CookieSettings) -> i32 {
    const NEXT: i32 = TC_ACT_UNSPEC;
    let skb = ctx.skb.skb;
    let frame = Frame {
        data: ctx.data(),
        end: ctx.data_end(),
    };
    let Parsed::Tcp(segment) = parse(&frame, protected_ports) else {
        return NEXT;
    };
    let l4 = segment.transport_offset;
    let flags_word = segment.header_word;
    if flags_word[0] & ADMITTED_HINT == 0 {
        return NEXT;
    }
    let verdict = hand_to_listener(ctx, &frame, &segment, settings);
    // The mark comes off whatever the verdict; the checksum follows.
    let cleared = [flags_word[0] & !ADMITTED_HINT, flags_word[1]];
    // SAFETY: helpers on the program's own packet, within its TCP header.
    unsafe {
        bpf_l4_csum_replace(
            skb,
            (l4 + 16) as u32,
            u64::from(u16::from_ne_bytes(flags_word)),
            u64::from(u16::from_ne_bytes(cleared)),
            2,
        );
        bpf_skb_store_bytes(skb, (l4 + 12) as u32, cleared.as_ptr() as *const _, 1, 0);
    }
    verdict
}

#[inline(always)]
fn hand_to_listener(
    ctx: &TcContext,
    frame: &Frame,
    segment: &TcpSegment,
    settings: &CookieSettings,
) -> i32 {
    const NEXT: i32 = TC_ACT_UNSPEC;
    let skb = ctx.skb.skb;
    // `skb->sk` may be set already (a veth keeps the sender's socket across
    // namespaces): the kfunc orphans the packet first. A second copy of
    // this program (while an upgrade overlaps them) finds the mark cleared.
    let Some(sk) = lookup(skb as *mut _, frame, segment) else {
        // No listener (it closed since XDP looked): the stack answers.
        return NEXT;
    };
    let loader = |offset, to, len| unsafe { bpf_skb_load_bytes(skb as *const _, offset, to, len) };
    let admitted = verify_ack(frame, segment, settings, crate::maps::now_ns(), loader);
    // SAFETY: a referenced socket, released below.
    let verdict = unsafe {
        let listener = bpf_skc_to_tcp_sock(sk as *mut _);
        match admitted {
            Some(a) if (*sk).state == TCP_LISTEN && !listener.is_null() => {
                let wscale_ok = a.client_wscale != NO_WSCALE;
                let mut attrs = TcpReqAttrs {
                    rcv_tsval: a.tsval,
                    rcv_tsecr: a.tsecr,
                    mss: a.mss,
                    rcv_wscale: if wscale_ok { settings.server_wscale } else { 0 },
                    snd_wscale: if wscale_ok { a.client_wscale } else { 0 },
                    ecn_ok: 0,
                    wscale_ok: u8::from(wscale_ok),
                    sack_ok: u8::from(a.sack),
                    tstamp_ok: u8::from(a.timestamps),
                    usec_ts_ok: 0,
                    reserved: [0; 3],
                };
                let assigned = bpf_sk_assign_tcp_reqsk(
                    skb,
                    listener as *mut _,
                    &mut attrs,
                    core::mem::size_of::<TcpReqAttrs>() as u32,
                );
                // Failing here, the listener would answer with a reset.
                if assigned < 0 { TC_ACT_SHOT } else { NEXT }
            }
            // A forged mark, or a listener gone: the stack answers.
            _ => NEXT,
        }
    };
    unsafe { bpf_sk_release(sk as *mut _) };
    verdict
}
const _: () = assert!(core::mem::size_of::<TcpReqAttrs>() == 20);
