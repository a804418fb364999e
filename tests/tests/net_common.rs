//! Shared by the net tests: a network namespace per test (created and deleted by a guard,
//! never touching the root namespace), the daemon started inside it, and packet helpers.
//!
//! Cargo also builds this file as a test target of its own; it has no tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use e2e::ChildGuard;

/// A network namespace `vdn-test-<pid>-<n>`, deleted on drop (also when the test panics).
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

impl Netns {
    /// Creates the namespace with its loopback up and IPv6 off (no router solicitations on
    /// the tap to sift through), or says why it cannot (the test then skips, loudly).
    pub fn new() -> Result<Self, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("needs root (CAP_SYS_ADMIN) to create a network namespace".into());
        }
        if !Path::new("/dev/net/tun").exists() {
            return Err("no /dev/net/tun".into());
        }
        let name = format!(
            "vdn-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map_err(|e| format!("cannot run ip: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ip netns add failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let ns = Netns { name };
        ns.sh("ip link set lo up; sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1")
            .map_err(|e| format!("cannot set up namespace: {e}"))?;
        Ok(ns)
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs a shell snippet inside the namespace; its stdout, or stdout and stderr on failure.
    pub fn sh(&self, script: &str) -> Result<String, String> {
        let out = self
            .command("/bin/sh")
            .args(["-c", script])
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!(
                "`{script}` failed ({}): {text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// The shell prefix to run a command in this namespace from a host script.
    pub fn prefix(&self) -> String {
        format!("ip netns exec {} ", self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Creates the namespace or prints `SKIPPED` and records why.
pub fn netns_or_skip(test: &str) -> Option<Netns> {
    match Netns::new() {
        Ok(ns) => Some(ns),
        Err(why) => {
            e2e::qemu::skip(test, &why);
            None
        }
    }
}

/// The daemon running inside a namespace, its log in a file; killed on drop.
#[derive(Debug)]
pub struct Daemon {
    pub guard: ChildGuard,
    pub socket: PathBuf,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `vhost-device-net --socket-path <tmp>/net.sock ARGS` in `ns` and waits for
    /// the socket.
    pub fn start(ns: &Netns, args: &[&str]) -> Daemon {
        Self::start_with(ns, args, |_| {})
    }

    /// Like [`Daemon::start`], with a last change to the command (e.g. an inherited fd).
    pub fn start_with(ns: &Netns, args: &[&str], tweak: impl FnOnce(&mut Command)) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("net.sock");
        let log = dir.path().join("daemon.log");
        let mut cmd = ns.command(
            e2e::bin_path("vhost-device-net")
                .to_str()
                .expect("utf-8 path"),
        );
        cmd.arg("--socket-path").arg(&socket).args(args);
        cmd.env("RUST_LOG", "info");
        cmd.stdout(Stdio::null());
        cmd.stderr(std::fs::File::create(&log).expect("log file"));
        tweak(&mut cmd);
        let mut guard = ChildGuard::spawn("vhost-device-net", cmd).expect("start daemon");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some(status) = guard.try_wait() {
                panic!(
                    "daemon exited ({status}) before listening:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon {
            guard,
            socket,
            log,
            _dir: dir,
        }
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `text` (e.g. a connection's totals), then returns it.
    pub fn wait_log(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if log.contains(text) || Instant::now() >= deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the daemon with SIGTERM and returns its log.
    pub fn stop(mut self) -> String {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.guard.pid()).unwrap_or(0));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.guard.wait_timeout(Duration::from_secs(5));
        self.log()
    }
}

/// Runs the daemon binary with `args` to completion (for command-line errors).
pub fn run_daemon(args: &[&str]) -> Output {
    Command::new(e2e::bin_path("vhost-device-net"))
        .args(args)
        .output()
        .expect("run daemon")
}

pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0x02];
pub const GUEST_MAC_STR: &str = "52:54:00:ab:cd:02";

/// The one's-complement checksum of IP and ICMP.
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(u16::MAX)
}

/// An Ethernet frame.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An ARP request from `src_mac`/`src_ip` for `target_ip`.
pub fn arp_request(src_mac: [u8; 6], src_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&src_mac);
    arp.extend_from_slice(&src_ip);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&target_ip);
    ethernet([0xff; 6], src_mac, 0x0806, &arp)
}

/// An IPv4 ICMP echo request frame carrying `payload`.
pub fn icmp_echo(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    id: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&1u16.to_be_bytes());
    icmp.extend_from_slice(payload);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = u16::try_from(20 + icmp.len()).expect("small packet");
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&icmp);
    ethernet(dst_mac, src_mac, 0x0800, &ip)
}
