//! Host checks and set-up: privileges, memlock, bpffs, cgroup v2.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Refuses to go on, with the missing capabilities named, unless the process
/// can load BPF programs and attach them to interfaces.
pub fn check_privileges() -> Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .context("cannot read effective capabilities")?;
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !missing.is_empty() {
        bail!(
            "wsguard run needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (or root); missing: {}",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; lift it so that
/// large maps load there too. Harmless on newer kernels.
pub fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn is_bpffs(path: &Path) -> bool {
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let Ok(c) = CString::new(existing.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Whether the host's (pid 1's) mount namespace is another one than this
/// process's and can be reached through /proc/1. It is another one under
/// `ip netns exec`, which gives every command a private /sys without the
/// host's bpffs and cgroup v2 mounts. (Where /proc/1 cannot be read, as in
/// some sandboxes, this process's namespace is all there is to use.)
fn host_namespace_elsewhere() -> bool {
    match (
        std::fs::read_link("/proc/self/ns/mnt"),
        std::fs::read_link("/proc/1/ns/mnt"),
    ) {
        (Ok(own), Ok(host)) => own != host,
        _ => false,
    }
}

/// `path` as the host's mount namespace sees it, reached through pid 1's root.
fn host_view(path: &Path) -> PathBuf {
    Path::new("/proc/1/root").join(path.strip_prefix("/").unwrap_or(path))
}

/// Where to pin (or find) the maps for `pin_path`: on the bpffs this process
/// sees, or else on the host's, so that pins made under `ip netns exec` are
/// found by a `wsguard status` run from anywhere. With `mount`, a missing
/// bpffs at /sys/fs/bpf is mounted (in the host's mount namespace when it can
/// be reached).
pub fn resolve_pin_path(pin_path: &Path, mount: bool) -> Result<PathBuf> {
    if is_bpffs(pin_path) {
        return Ok(pin_path.to_owned());
    }
    let elsewhere = host_namespace_elsewhere();
    if elsewhere && is_bpffs(&host_view(pin_path)) {
        return Ok(host_view(pin_path));
    }
    if !mount {
        return Ok(pin_path.to_owned());
    }
    // Two agents starting at once must not both mount (a second bpffs would
    // hide the first one's pins): check again under a lock.
    let lock_path = std::env::temp_dir().join("wsguard-bpffs.lock");
    let lock = std::fs::File::create(&lock_path)?;
    flock(&lock, libc::LOCK_EX).with_context(|| format!("cannot lock {}", lock_path.display()))?;
    if is_bpffs(pin_path) {
        return Ok(pin_path.to_owned());
    }
    if elsewhere && is_bpffs(&host_view(pin_path)) {
        return Ok(host_view(pin_path));
    }
    if !pin_path.starts_with("/sys/fs/bpf") {
        bail!(
            "agent.pin_path {} is not on a bpf filesystem; mount one (mount -t bpf bpf DIR) or use a path under /sys/fs/bpf",
            pin_path.display()
        );
    }
    mount_bpffs(!elsewhere)?;
    tracing::info!("mounted the bpf filesystem at /sys/fs/bpf");
    Ok(if elsewhere {
        host_view(pin_path)
    } else {
        pin_path.to_owned()
    })
}

fn mount_bpffs(here: bool) -> Result<()> {
    if here {
        let target = CString::new("/sys/fs/bpf").unwrap();
        let fstype = CString::new("bpf").unwrap();
        if unsafe {
            libc::mount(
                fstype.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        } != 0
        {
            bail!(
                "cannot mount the bpf filesystem at /sys/fs/bpf: {}",
                std::io::Error::last_os_error()
            );
        }
        return Ok(());
    }
    // setns(CLONE_NEWNS) needs a single-threaded process: do it in a child.
    let mut mount = std::process::Command::new("mount");
    mount.args(["-t", "bpf", "bpf", "/sys/fs/bpf"]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut mount, || {
            let fd = libc::open(c"/proc/1/ns/mnt".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::setns(fd, libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let out = mount
        .output()
        .context("cannot run mount(8) in the host's mount namespace")?;
    if !out.status.success() {
        bail!(
            "cannot mount the bpf filesystem at /sys/fs/bpf on the host: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "... mount_point options - fstype source super_options"
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next() != Some("cgroup2") {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// Opens the cgroup v2 directory the connection counter attaches to: the
/// configured one, else the root of the first cgroup v2 mount this process
/// sees (or the host's). Where none is visible (under `ip netns exec`, which
/// replaces /sys), cgroup2 is mounted on a private directory just long enough
/// to open its root; the open directory keeps the cgroup.
pub fn open_cgroup(configured: Option<&Path>) -> Result<(std::fs::File, PathBuf)> {
    let open = |path: &Path| {
        std::fs::File::open(path).with_context(|| format!("cannot open cgroup {}", path.display()))
    };
    if let Some(path) = configured {
        return Ok((open(path)?, path.to_owned()));
    }
    let own =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    if let Some(path) = cgroup2_mount(&own) {
        return Ok((open(&path)?, path));
    }
    if host_namespace_elsewhere() {
        if let Some(path) = std::fs::read_to_string("/proc/1/mountinfo")
            .ok()
            .as_deref()
            .and_then(cgroup2_mount)
        {
            let path = host_view(&path);
            return Ok((open(&path)?, path));
        }
    }
    let dir = std::env::temp_dir().join(format!("wsguard-cgroup2-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let target = CString::new(dir.as_os_str().as_bytes())?;
    let fstype = CString::new("cgroup2").unwrap();
    let mounted = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    } == 0;
    let result = if mounted {
        let file = open(&dir);
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        file
    } else {
        Err(std::io::Error::last_os_error()).context(
            "no cgroup v2 filesystem is mounted and mounting one failed; the concurrent-connection limit needs it \
             (mount -t cgroup2 none /sys/fs/cgroup), or set limits.per_source.concurrent_connections = 0",
        )
    };
    let _ = std::fs::remove_dir(&dir);
    tracing::info!("no cgroup v2 mount visible: opened the cgroup v2 root through a private mount");
    Ok((result?, PathBuf::from("cgroup2 root")))
}

/// CLOCK_MONOTONIC in nanoseconds: the clock the kernel programs stamp bans with.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::clock_gettime, libc::CLOCK_MONOTONIC).unwrap_or(0)
}

/// CLOCK_MONOTONIC_COARSE: CLOCK_MONOTONIC as of the kernel's last tick.
pub fn coarse_monotonic_ns() -> u64 {
    clock_ns(libc::clock_gettime, libc::CLOCK_MONOTONIC_COARSE).unwrap_or(0)
}

/// `read` (clock_gettime or clock_getres) of `clock`, in nanoseconds.
fn clock_ns(
    read: unsafe extern "C" fn(libc::clockid_t, *mut libc::timespec) -> libc::c_int,
    clock: libc::clockid_t,
) -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    (unsafe { read(clock, &mut ts) } == 0)
        .then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// The length of the kernel's tick: the resolution of the coarse
/// monotonic clock, which moves once a tick (1 ms at HZ=1000, 4 ms at 250).
pub fn coarse_tick_ns() -> anyhow::Result<u64> {
    match clock_ns(libc::clock_getres, libc::CLOCK_MONOTONIC_COARSE) {
        Some(ns) => Ok(ns),
        None => anyhow::bail!(
            "cannot read the resolution of CLOCK_MONOTONIC_COARSE: {}",
            std::io::Error::last_os_error()
        ),
    }
}

/// Brings the loopback interface of the current network namespace up (a
/// new namespace starts with it down); handshake inspection's injection
/// path runs over it.
pub fn bring_up_loopback() -> anyhow::Result<()> {
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if socket < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: a fresh descriptor we own.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(socket) };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo".iter().enumerate() {
        request.ifr_name[i] = *b as libc::c_char;
    }
    if unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut request) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    unsafe { request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    if unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &request) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    tracing::info!("brought the loopback interface up for handshake inspection");
    Ok(())
}

/// The cookie of this process's network namespace (SO_NETNS_COOKIE).
pub fn netns_cookie() -> anyhow::Result<u64> {
    use std::os::fd::AsRawFd;
    let socket =
        std::net::UdpSocket::bind("0.0.0.0:0").or_else(|_| std::net::UdpSocket::bind("[::]:0"))?;
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SO_NETNS_COOKIE (Linux 5.14+).
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(cookie)
}

/// A 128-bit key from the kernel's random source.
pub fn random_key() -> Result<[u64; 2]> {
    let mut bytes = [0u8; 16];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        bail!("getrandom: {}", std::io::Error::last_os_error());
    }
    Ok([
        u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")),
        u64::from_le_bytes(bytes[8..].try_into().expect("8 bytes")),
    ])
}

fn read_sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

const TCP_SYNCOOKIES: &str = "/proc/sys/net/ipv4/tcp_syncookies";

/// The TCP stack completes a connection handed over by wsguard's SYN-cookie
/// path only when `net.ipv4.tcp_syncookies` is not 0 (it covers IPv6 too).
/// At 0 it is set to 1 (the kernel's default: its own cookies only when a
/// listen queue overflows), and that is said in the log.
pub fn ensure_tcp_syncookies() -> Result<()> {
    if read_sysctl(TCP_SYNCOOKIES).as_deref() != Some("0") {
        return Ok(());
    }
    std::fs::write(TCP_SYNCOOKIES, "1").with_context(|| {
        format!(
            "syn_cookies need net.ipv4.tcp_syncookies >= 1, and {TCP_SYNCOOKIES} cannot be written"
        )
    })?;
    tracing::warn!(
        "net.ipv4.tcp_syncookies was 0: set to 1, without which the TCP stack refuses connections \
         whose SYN cookie wsguard validated"
    );
    Ok(())
}

/// The server's TCP settings that shape a SYN-ACK.
pub struct TcpSysctls {
    pub timestamps: bool,
    pub sack: bool,
    pub window_scaling: bool,
    /// The window scale the kernel would choose for a new connection.
    pub window_scale: u8,
}

impl TcpSysctls {
    pub fn read() -> TcpSysctls {
        let on =
            |name: &str| read_sysctl(&format!("/proc/sys/net/ipv4/{name}")).as_deref() != Some("0");
        let number = |path: &str, field: usize| {
            read_sysctl(path)
                .and_then(|s| {
                    s.split_whitespace()
                        .nth(field)
                        .and_then(|v| v.parse::<u64>().ok())
                })
                .unwrap_or(0)
        };
        // As tcp_select_initial_window: the largest receive buffer a socket
        // may grow to, scaled down until it fits in 16 bits.
        let mut space =
            number("/proc/sys/net/ipv4/tcp_rmem", 2).max(number("/proc/sys/net/core/rmem_max", 0));
        let mut window_scale = 0u8;
        while space > u64::from(u16::MAX) && window_scale < wsguard_common::cookie::MAX_WSCALE {
            space >>= 1;
            window_scale += 1;
        }
        TcpSysctls {
            timestamps: on("tcp_timestamps"),
            sack: on("tcp_sack"),
            window_scaling: on("tcp_window_scaling"),
            window_scale,
        }
    }
}

/// An interface's MTU (1500 when it cannot be read).
pub fn interface_mtu(interface: &str) -> u32 {
    read_sysctl(&format!("/sys/class/net/{interface}/mtu"))
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500)
}

/// Whether `interface` is a veth device (its driver, as ethtool reports it).
/// On a veth, frames sent back with XDP_TX from native-mode XDP reach the
/// peer only when the peer runs an XDP program of its own.
pub fn is_veth(interface: &str) -> bool {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;
    #[repr(C)]
    struct DriverInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut DriverInfo,
        _pad: [u8; 16],
    }
    if interface.len() >= libc::IFNAMSIZ {
        return false;
    }
    let mut info = DriverInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    let mut request = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut info,
        _pad: [0; 16],
    };
    request.name[..interface.len()].copy_from_slice(interface.as_bytes());
    // SAFETY: a datagram socket for the ioctl only; the request and the
    // driver info it points to outlive the call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return false;
        }
        let ok = libc::ioctl(fd, SIOCETHTOOL, &mut request) == 0;
        libc::close(fd);
        ok && info.driver.starts_with(b"veth\0")
    }
}

/// flock(2) on `file` (released when it is closed), again when a signal
/// interrupts it.
pub fn flock(file: &std::fs::File, operation: i32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}
