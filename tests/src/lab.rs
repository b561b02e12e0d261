//! Two test hosts joined by a veth pair: a server namespace (where the agent
//! attaches) and a client namespace holding many source addresses.
//!
//! Addresses come from 198.18.0.0/15 and 2001:db8::/32 only, and the server's
//! namespace has no route beyond the lab's own subnets, so nothing (not even a
//! SYN-ACK to a flood source) can leave the test hosts.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU8, Ordering},
};

use anyhow::{Context, Result, bail};

static NEXT_LAB: AtomicU8 = AtomicU8::new(1);

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Result<Netns> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        // No duplicate address detection on links created here: while a new
        // link's own link-local address is tentative (about a second), the
        // namespace cannot resolve a neighbour it has not heard from, and
        // an IPv6 reply to a second client would wait on it.
        ns.run(|| -> Result<()> {
            for conf in ["all", "default"] {
                std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/accept_dad"), "0")?;
            }
            Ok(())
        })?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS…`
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `f` on a thread that has entered this namespace; sockets created
    /// there belong to it for life, wherever they are used afterwards.
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let path = self.path();
        std::thread::spawn(move || {
            enter_netns(&path).expect("entering the test namespace");
            f()
        })
        .join()
        .expect("namespace thread panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// setns(2) into the network namespace at `path`, for the calling thread (or,
/// from a `pre_exec` hook, the child process). Only the network namespace
/// changes: the mount namespace (and so /sys/fs/bpf) stays shared.
pub fn enter_netns(path: &str) -> std::io::Result<()> {
    let file = File::open(path)?;
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub struct Lab {
    pub id: u8,
    /// Interface the agent protects, inside `server`.
    pub server_if: String,
    pub client_if: String,
    // Field order: the namespaces go last, taking the veth pair with them.
    pub server: Netns,
    pub client: Netns,
}

impl Lab {
    /// Number of IPv4 and IPv6 client addresses (hosts .2 to .N+1) each lab has.
    pub const CLIENT_HOSTS: u8 = 40;

    pub fn new() -> Result<Lab> {
        let id = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{}", std::process::id() % 100_000, id);
        let server = Netns::create(&format!("wsg-srv-{tag}"))?;
        let client = Netns::create(&format!("wsg-cli-{tag}"))?;
        let (server_if, client_if) = (format!("wsgs{tag}"), format!("wsgc{tag}"));
        let lab = Lab {
            id,
            server_if,
            client_if,
            server,
            client,
        };
        lab.wire()?;
        Ok(lab)
    }

    /// Creates the veth pair between the namespaces, with every address.
    fn wire(&self) -> Result<()> {
        let (lab, id) = (self, self.id);
        ip(&[
            "link",
            "add",
            &lab.server_if,
            "netns",
            &lab.server.name,
            "type",
            "veth",
            "peer",
            "name",
            &lab.client_if,
            "netns",
            &lab.client.name,
        ])?;
        let (s, c) = (&lab.server, &lab.client);
        s.ip(&[
            "addr",
            "add",
            &format!("{}/24", lab.server_v4()),
            "dev",
            &lab.server_if,
        ])?;
        s.ip(&[
            "addr",
            "add",
            &format!("{}/64", lab.server_v6()),
            "dev",
            &lab.server_if,
            "nodad",
        ])?;
        for host in 2..(2 + Self::CLIENT_HOSTS) {
            c.ip(&[
                "addr",
                "add",
                &format!("{}/24", lab.client_v4(host)),
                "dev",
                &lab.client_if,
            ])?;
            c.ip(&[
                "addr",
                "add",
                &format!("{}/64", lab.client_v6(host)),
                "dev",
                &lab.client_if,
                "nodad",
            ])?;
            c.ip(&[
                "addr",
                "add",
                &format!("{}/64", lab.client_v6_other_prefix(host)),
                "dev",
                &lab.client_if,
                "nodad",
            ])?;
        }
        s.ip(&["link", "set", &lab.server_if, "up"])?;
        c.ip(&["link", "set", &lab.client_if, "up"])?;
        // A second client /64, on-link, to tell IPv6 prefixes apart.
        s.ip(&[
            "-6",
            "route",
            "add",
            &format!("2001:db8:{:x}:1::/64", id),
            "dev",
            &lab.server_if,
        ])?;
        Ok(())
    }

    /// Gives the client namespace `addr` as well, and the server a route
    /// back to it: one address that several labs share, as one client of
    /// several hosts (198.19.0.0/16, outside every lab's own subnet).
    pub fn add_shared_client(&self, addr: Ipv4Addr) -> Result<()> {
        self.client
            .ip(&["addr", "add", &format!("{addr}/32"), "dev", &self.client_if])?;
        self.server.ip(&[
            "route",
            "add",
            &format!("{addr}/32"),
            "dev",
            &self.server_if,
        ])
    }

    /// Deletes the veth pair and creates it again, same names, new devices
    /// (what a container restart does to a host's interfaces).
    pub fn rewire(&self) -> Result<()> {
        self.server.ip(&["link", "del", &self.server_if])?;
        self.wire()
    }

    /// `ip link show` of the server's interface (its MAC, any XDP program).
    pub fn server_link(&self) -> Result<String> {
        let out = Command::new("ip")
            .args([
                "-n",
                &self.server.name,
                "link",
                "show",
                "dev",
                &self.server_if,
            ])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes the client addresses into the server's neighbour table, as a
    /// host behind a router always knows its one next hop. Floods sent from
    /// the client link leave IPv6 neighbour discovery for a client address
    /// first seen during the flood waiting for a retransmitted solicitation
    /// (one second), which is the lab's artefact, not the path under test.
    pub fn pin_client_neighbours(&self) -> Result<()> {
        let mac = self.client_mac()?;
        for host in 2..(2 + Self::CLIENT_HOSTS) {
            let addrs: [IpAddr; 3] = [
                self.client_v4(host).into(),
                self.client_v6(host).into(),
                self.client_v6_other_prefix(host).into(),
            ];
            for addr in addrs {
                self.server.ip(&[
                    "neigh",
                    "replace",
                    &addr.to_string(),
                    "lladdr",
                    &mac,
                    "dev",
                    &self.server_if,
                    "nud",
                    "permanent",
                ])?;
            }
        }
        Ok(())
    }

    /// The MAC address of the client's interface, as `ip` writes it.
    pub fn client_mac(&self) -> Result<String> {
        let out = Command::new("ip")
            .args([
                "-n",
                &self.client.name,
                "link",
                "show",
                "dev",
                &self.client_if,
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split("link/ether ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_string)
            .context("no MAC")
    }

    /// The MAC address of the server's interface.
    pub fn server_mac(&self) -> Result<[u8; 6]> {
        let text = self.server_link()?;
        let mac = text
            .split("link/ether ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .context("no MAC")?;
        let bytes: Vec<u8> = mac
            .split(':')
            .filter_map(|b| u8::from_str_radix(b, 16).ok())
            .collect();
        bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("odd MAC {mac}"))
    }

    pub fn server_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.id, 1)
    }

    pub fn server_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, self.id as u16, 0, 0, 0, 0, 1)
    }

    pub fn client_v4(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.id, host)
    }

    /// A client address in the server's /64.
    pub fn client_v6(&self, host: u8) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, self.id as u16, 0, 0, 0, 0, host as u16)
    }

    /// A client address in a second /64 (2001:db8:ID:1::/64).
    pub fn client_v6_other_prefix(&self, host: u8) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, self.id as u16, 1, 0, 0, 0, host as u16)
    }

    pub fn server_addr(&self, v6: bool) -> IpAddr {
        if v6 {
            self.server_v6().into()
        } else {
            self.server_v4().into()
        }
    }
}

/// Sends raw frames out of `interface` in the namespace at `netns_path`
/// (spoofed sources included: the server's namespace routes nowhere but the
/// lab, so no answer leaves it). Blocks until done; returns how many were sent.
pub fn send_frames(
    netns_path: String,
    interface: String,
    frames: impl Iterator<Item = Vec<u8>> + Send + 'static,
) -> Result<u64> {
    std::thread::spawn(move || -> Result<u64> {
        enter_netns(&netns_path)?;
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        anyhow::ensure!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        let name = std::ffi::CString::new(interface)?;
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        to.sll_halen = 6;
        let mut sent = 0;
        for frame in frames {
            let rc = unsafe {
                libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&to as *const libc::sockaddr_ll).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            sent += u64::from(rc > 0);
        }
        unsafe { libc::close(fd) };
        Ok(sent)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("sender thread panicked"))?
}
