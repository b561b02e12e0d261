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
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
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
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK: {}", std::io::Error::last_os_error());
    }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else { return false };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Makes sure `pin_path` lies on a bpf filesystem, mounting one at
/// /sys/fs/bpf when it is missing there (as on a fresh host).
pub fn ensure_bpffs(pin_path: &Path) -> Result<()> {
    let existing = pin_path.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    if is_bpffs(existing) {
        return Ok(());
    }
    let default_mount = Path::new("/sys/fs/bpf");
    if pin_path.starts_with(default_mount) && !is_bpffs(default_mount) {
        let target = CString::new("/sys/fs/bpf").unwrap();
        let fstype = CString::new("bpf").unwrap();
        let rc = unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
        if rc != 0 {
            bail!("cannot mount the bpf filesystem at /sys/fs/bpf: {}", std::io::Error::last_os_error());
        }
        tracing::info!("mounted the bpf filesystem at /sys/fs/bpf");
        return Ok(());
    }
    bail!(
        "agent.pin_path {} is not on a bpf filesystem; mount one (mount -t bpf bpf DIR) or use a path under /sys/fs/bpf",
        pin_path.display()
    )
}

/// The root of the first cgroup v2 mount.
pub fn default_cgroup() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    for line in mountinfo.lines() {
        // "... mount_point options - fstype source super_options"
        let Some((left, right)) = line.split_once(" - ") else { continue };
        if right.split_whitespace().next() == Some("cgroup2") {
            if let Some(mount_point) = left.split_whitespace().nth(4) {
                return Ok(PathBuf::from(mount_point));
            }
        }
    }
    bail!(
        "no cgroup v2 filesystem is mounted; the concurrent-connection limit needs one \
         (mount -t cgroup2 none /sys/fs/cgroup), or set limits.per_source.concurrent_connections = 0"
    )
}

/// CLOCK_MONOTONIC in nanoseconds: the clock the kernel programs stamp bans with.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
