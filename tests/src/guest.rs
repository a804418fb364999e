//! What a guest run is: the command, the devices, the files; and running a VM process to
//! the guest's markers.
//!
//! The guest's `/init` (built by `cargo xtask guest`) prints `@@E2E-INIT:<tag>@@` as soon as
//! it runs, then runs `/e2e/cmd` between `@@E2E-BEGIN:<tag>@@` and `@@E2E-END:<tag> rc=N@@`,
//! and powers off. `<tag>` comes from `e2e.tag=` on the kernel command line, so a guest
//! nested in another guest prints markers that cannot be mistaken for its host's.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::cpio::Archive;
use crate::process::ChildGuard;

/// The tag of the guest a test talks to.
pub const GUEST_TAG: &str = "g";

/// Why a guest run failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Preparing the run failed (image missing, daemon did not start, ...).
    #[error("guest set-up failed: {0}")]
    Setup(String),
    /// The VM printed nothing of the guest's init in time.
    #[error(
        "{launcher}: the guest did not reach its init within {secs} s\n--- console ---\n{console}"
    )]
    NoBoot {
        /// Which launcher.
        launcher: String,
        /// The boot timeout.
        secs: u64,
        /// What the console showed.
        console: String,
    },
    /// The guest command did not finish in time.
    #[error(
        "{launcher}: the guest command did not finish within {secs} s\n--- console ---\n{console}"
    )]
    Timeout {
        /// Which launcher.
        launcher: String,
        /// The command timeout.
        secs: u64,
        /// What the console showed.
        console: String,
    },
    /// The guest kernel panicked.
    #[error("{launcher}: the guest kernel panicked\n--- console ---\n{console}")]
    Panic {
        /// Which launcher.
        launcher: String,
        /// What the console showed.
        console: String,
    },
    /// The VM process ended before the guest command finished.
    #[error("{launcher}: the VM exited ({status}) before the guest command finished\n--- console ---\n{console}\n--- stderr ---\n{stderr}")]
    Exited {
        /// Which launcher.
        launcher: String,
        /// How it exited.
        status: String,
        /// What the console showed.
        console: String,
        /// What the VM printed on stderr.
        stderr: String,
    },
}

/// The kind of a vhost-user device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// virtio-blk.
    Blk,
    /// virtio-net.
    Net,
    /// virtio-vsock.
    Vsock,
    /// virtio-console.
    Console,
}

/// A daemon the launcher starts for a device, where the device runs (on the host for QEMU,
/// inside the L2 guest for the nested launcher). `{socket}` in `args` becomes the socket path.
#[derive(Debug, Clone)]
pub struct DaemonSpec {
    /// The workspace binary, e.g. `vhost-device-blk`.
    pub binary: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// A network namespace to run it in (`ip netns exec`), which the spec's host set-up
    /// creates.
    pub netns: Option<String>,
}

/// A vhost-user device attached to the guest through a socket.
#[derive(Debug, Clone)]
pub struct Device {
    /// The device type.
    pub kind: DeviceKind,
    /// The daemon's socket.
    pub socket: PathBuf,
    /// Queues (blk) or queue pairs (net).
    pub queues: u16,
    /// The MAC address (net).
    pub mac: Option<String>,
    /// The guest CID (vsock).
    pub cid: u64,
    /// A daemon for the launcher to start, if the test does not start it itself.
    pub daemon: Option<DaemonSpec>,
    /// Whether the frontend reconnects to a daemon that went away (QEMU's chardev
    /// `reconnect=1`).
    pub reconnect: bool,
}

impl Device {
    fn new(kind: DeviceKind, socket: &Path) -> Self {
        Device {
            kind,
            socket: socket.to_path_buf(),
            queues: 1,
            mac: None,
            cid: 3,
            daemon: None,
            reconnect: false,
        }
    }

    /// A block device served on `socket`.
    pub fn blk(socket: &Path) -> Self {
        Self::new(DeviceKind::Blk, socket)
    }

    /// A network device served on `socket`.
    pub fn net(socket: &Path) -> Self {
        Self::new(DeviceKind::Net, socket)
    }

    /// A vsock device served on `socket`, for guest CID `cid`.
    pub fn vsock(socket: &Path, cid: u64) -> Self {
        Device {
            cid,
            ..Self::new(DeviceKind::Vsock, socket)
        }
    }

    /// A console device served on `socket`.
    pub fn console(socket: &Path) -> Self {
        Self::new(DeviceKind::Console, socket)
    }

    /// Sets the number of queues (blk) or queue pairs (net).
    #[must_use]
    pub fn queues(mut self, queues: u16) -> Self {
        self.queues = queues;
        self
    }

    /// Has the frontend reconnect (every second) to a daemon that went away.
    #[must_use]
    pub fn reconnect(mut self) -> Self {
        self.reconnect = true;
        self
    }

    /// Sets the MAC address (net).
    #[must_use]
    pub fn mac(mut self, mac: &str) -> Self {
        self.mac = Some(mac.to_string());
        self
    }

    /// Has the launcher start `binary args...` (with `{socket}` replaced) for this device.
    #[must_use]
    pub fn daemon(mut self, binary: &str, args: &[&str]) -> Self {
        self.daemon = Some(DaemonSpec {
            binary: binary.to_string(),
            args: args.iter().map(ToString::to_string).collect(),
            netns: None,
        });
        self
    }

    /// Runs the device's daemon inside network namespace `ns` (set [`Device::daemon`] first).
    #[must_use]
    pub fn in_netns(mut self, ns: &str) -> Self {
        if let Some(d) = self.daemon.as_mut() {
            d.netns = Some(ns.to_string());
        }
        self
    }

    /// The daemon's arguments with the socket path filled in.
    pub fn daemon_args(&self) -> Vec<String> {
        let socket = self.socket.display().to_string();
        self.daemon
            .as_ref()
            .map(|d| {
                d.args
                    .iter()
                    .map(|a| a.replace("{socket}", &socket))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A file placed in the guest's initramfs.
#[derive(Debug, Clone)]
pub struct GuestFile {
    /// Absolute path in the guest.
    pub path: String,
    /// Contents.
    pub body: Vec<u8>,
    /// Permission bits.
    pub mode: u32,
}

/// One guest run: a shell command, the devices, extra files.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// The command, run by `/bin/sh` in the guest as root.
    pub command: String,
    /// vhost-user devices.
    pub devices: Vec<Device>,
    /// Extra files for the guest.
    pub files: Vec<GuestFile>,
    /// How long the command may run once the guest's init has started.
    pub timeout: Duration,
    /// vCPUs.
    pub cpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Extra kernel command line arguments.
    pub kernel_args: Vec<String>,
    /// Shell run where the daemons run (the host for QEMU, L2 for nested) before the VM
    /// starts, e.g. to create an image file.
    pub host_setup: String,
    /// Shell run where the daemons run after the VM has exited; its output is
    /// [`GuestRun::host_output`].
    pub host_check: String,
    /// Shell commands started in the background where the daemons run, after them and
    /// before the VM (e.g. a host program the guest talks to); stopped after the VM exits.
    pub host_background: Vec<String>,
}

impl GuestSpec {
    /// A run of `command` with no devices, 1 vCPU and 512 MiB.
    pub fn new(command: &str) -> Self {
        GuestSpec {
            command: command.to_string(),
            devices: Vec::new(),
            files: Vec::new(),
            timeout: Duration::from_secs(60),
            cpus: 1,
            memory_mib: 512,
            kernel_args: Vec::new(),
            host_setup: String::new(),
            host_check: String::new(),
            host_background: Vec::new(),
        }
    }

    /// Attaches a device.
    #[must_use]
    pub fn device(mut self, device: Device) -> Self {
        self.devices.push(device);
        self
    }

    /// Adds a file to the guest (mode 0644).
    #[must_use]
    pub fn file(mut self, path: &str, body: impl Into<Vec<u8>>) -> Self {
        self.files.push(GuestFile {
            path: path.to_string(),
            body: body.into(),
            mode: 0o644,
        });
        self
    }

    /// Adds an executable file to the guest (mode 0755).
    #[must_use]
    pub fn exec_file(mut self, path: &str, body: impl Into<Vec<u8>>) -> Self {
        self.files.push(GuestFile {
            path: path.to_string(),
            body: body.into(),
            mode: 0o755,
        });
        self
    }

    /// Sets the command timeout.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the vCPU count.
    #[must_use]
    pub fn cpus(mut self, cpus: u8) -> Self {
        self.cpus = cpus;
        self
    }

    /// Sets guest memory in MiB.
    #[must_use]
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Adds a kernel command line argument.
    #[must_use]
    pub fn kernel_arg(mut self, arg: &str) -> Self {
        self.kernel_args.push(arg.to_string());
        self
    }

    /// Sets the host-side set-up shell (see [`GuestSpec::host_setup`]).
    #[must_use]
    pub fn host_setup(mut self, script: &str) -> Self {
        self.host_setup = script.to_string();
        self
    }

    /// Sets the host-side check shell (see [`GuestSpec::host_check`]).
    #[must_use]
    pub fn host_check(mut self, script: &str) -> Self {
        self.host_check = script.to_string();
        self
    }

    /// Adds a background host command (see [`GuestSpec::host_background`]).
    #[must_use]
    pub fn host_background(mut self, script: &str) -> Self {
        self.host_background.push(script.to_string());
        self
    }

    /// Runs the guest with `launcher`.
    pub fn run(&self, launcher: &dyn Launcher) -> Result<GuestRun, Error> {
        launcher.run(self)
    }

    /// The archive with `/e2e/cmd` and the extra files, to append to a base initramfs.
    pub fn archive(&self) -> std::io::Result<Vec<u8>> {
        let mut a = Archive::new();
        let mut made = std::collections::BTreeSet::new();
        a.dirs_for("/e2e/cmd", &mut made);
        a.file(
            "/e2e/cmd",
            0o755,
            format!("#!/bin/sh\n{}\n", self.command).as_bytes(),
        );
        for f in &self.files {
            a.dirs_for(&f.path, &mut made);
            a.file(&f.path, f.mode, &f.body);
        }
        a.finish_gz()
    }
}

/// What a guest run produced.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// What the guest command printed (stdout and stderr), between the markers.
    pub output: String,
    /// The guest command's exit status.
    pub exit_code: Option<i32>,
    /// Everything the console showed.
    pub console: String,
    /// Output of [`GuestSpec::host_check`].
    pub host_output: String,
    /// The launcher and accelerator, e.g. `QEMU 7.2.22 (TCG)`.
    pub launcher: String,
    /// Wall time of the run.
    pub duration: Duration,
    /// Whether the run was retried once after a VM that printed nothing.
    pub retried: bool,
}

/// Something that boots the guest: QEMU, or vmm-frontend nested in a QEMU guest.
pub trait Launcher {
    /// The launcher and accelerator, for test output.
    fn describe(&self) -> String;
    /// Boots the guest, runs the spec's command, returns what it printed.
    fn run(&self, spec: &GuestSpec) -> Result<GuestRun, Error>;
}

/// The guest command's output and status, parsed from a console by `tag`'s markers.
pub fn parse_markers(console: &str, tag: &str) -> (bool, Option<String>, Option<i32>) {
    let init = format!("@@E2E-INIT:{tag}@@");
    let begin = format!("@@E2E-BEGIN:{tag}@@");
    let end = format!("@@E2E-END:{tag} rc=");
    let saw_init = console.contains(&init);
    let Some(b) = console.find(&begin) else {
        return (saw_init, None, None);
    };
    let after = &console[b + begin.len()..];
    let after = after.strip_prefix('\n').unwrap_or(after);
    let Some(e) = after.find(&end) else {
        return (saw_init, Some(after.to_string()), None);
    };
    let output = after[..e].to_string();
    let rc = after[e + end.len()..]
        .split("@@")
        .next()
        .and_then(|n| n.trim().parse().ok());
    (saw_init, Some(output), rc)
}

/// How a VM process is watched.
#[derive(Debug, Clone)]
pub struct Watch {
    /// For messages.
    pub launcher: String,
    /// The marker tag of the guest whose command ends the run.
    pub tag: String,
    /// Time allowed to reach the init marker.
    pub boot_timeout: Duration,
    /// Time allowed for the command after init.
    pub command_timeout: Duration,
    /// Echo console lines to stderr as they come (`E2E_VERBOSE=1`).
    pub echo: bool,
}

/// The raw result of watching a VM process.
#[derive(Debug)]
pub struct Watched {
    /// The whole console.
    pub console: String,
    /// The command output between the tag's markers.
    pub output: String,
    /// Its exit status.
    pub exit_code: Option<i32>,
    /// Whether anything at all was printed.
    pub printed_anything: bool,
}

/// Spawns `cmd` (a VM with its serial console on stdout) and follows its console to the
/// end marker of `watch.tag`, enforcing the timeouts; the VM is killed on every way out.
pub fn watch_vm(mut cmd: Command, watch: &Watch) -> Result<Watched, Error> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut vm =
        ChildGuard::spawn(&watch.launcher, cmd).map_err(|e| Error::Setup(e.to_string()))?;
    let stdout = vm.child_mut().stdout.take();
    let stderr = vm.child_mut().stderr.take();
    let (tx, rx) = mpsc::channel::<String>();
    if let Some(out) = stdout {
        std::thread::spawn(move || {
            let mut reader = BufReader::new(out);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).replace('\r', "");
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
    let stderr_text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    if let Some(err) = stderr {
        let sink = stderr_text.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(err);
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&line);
                }
                line.clear();
            }
        });
    }

    let init = format!("@@E2E-INIT:{}@@", watch.tag);
    let end = format!("@@E2E-END:{} rc=", watch.tag);
    let start = Instant::now();
    let mut deadline = start + watch.boot_timeout;
    let mut console = String::new();
    let mut booted = false;
    let mut panicked_at: Option<Instant> = None;
    let result = loop {
        let now = Instant::now();
        if let Some(t) = panicked_at {
            if now > t + Duration::from_secs(2) {
                break Err(Error::Panic {
                    launcher: watch.launcher.clone(),
                    console: console.clone(),
                });
            }
        }
        if now >= deadline {
            break Err(if booted {
                Error::Timeout {
                    launcher: watch.launcher.clone(),
                    secs: watch.command_timeout.as_secs(),
                    console: console.clone(),
                }
            } else {
                Error::NoBoot {
                    launcher: watch.launcher.clone(),
                    secs: watch.boot_timeout.as_secs(),
                    console: console.clone(),
                }
            });
        }
        match rx.recv_timeout((deadline - now).min(Duration::from_millis(250))) {
            Ok(line) => {
                if watch.echo {
                    let _ = write!(std::io::stderr(), "[{}] {line}", watch.tag);
                }
                console.push_str(&line);
                if !line.ends_with('\n') {
                    console.push('\n');
                }
                if !booted && line.contains(&init) {
                    booted = true;
                    deadline = Instant::now() + watch.command_timeout;
                }
                if line.contains("Kernel panic - not syncing") && panicked_at.is_none() {
                    panicked_at = Some(Instant::now());
                }
                if line.contains(&end) {
                    break Ok(());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = vm
                    .wait_timeout(Duration::from_secs(5))
                    .map_or_else(|| "still running".to_string(), |s| s.to_string());
                break Err(if panicked_at.is_some() {
                    Error::Panic {
                        launcher: watch.launcher.clone(),
                        console: console.clone(),
                    }
                } else {
                    Error::Exited {
                        launcher: watch.launcher.clone(),
                        status,
                        console: console.clone(),
                        stderr: stderr_text.lock().map(|s| s.clone()).unwrap_or_default(),
                    }
                });
            }
        }
    };
    let printed_anything = !console.trim().is_empty();
    match result {
        Ok(()) => {
            // The guest powers off right after its end marker; give it a moment, then make
            // sure the VM is gone either way.
            let _ = vm.wait_timeout(Duration::from_secs(15));
            vm.kill();
            let (_, output, exit_code) = parse_markers(&console, &watch.tag);
            Ok(Watched {
                output: output.unwrap_or_default(),
                exit_code,
                console,
                printed_anything,
            })
        }
        Err(e) => {
            vm.kill();
            Err(e)
        }
    }
}

/// Runs `once`, and once more if the VM printed nothing at all before its boot timeout (a
/// hang seen on loaded hosts), saying so; then prints which launcher ran the guest and how
/// long it took.
pub fn run_with_retry(
    launcher: &str,
    once: impl Fn() -> Result<GuestRun, Error>,
) -> Result<GuestRun, Error> {
    let result = match once() {
        Err(Error::NoBoot { console, secs, .. }) if console.trim().is_empty() => {
            say(&format!(
                "e2e: RETRY: {launcher} printed nothing within {secs} s; retrying once"
            ));
            once().map(|mut r| {
                r.retried = true;
                r
            })
        }
        other => other,
    };
    if let Ok(r) = &result {
        say(&format!(
            "e2e: guest ran under {} in {:.1} s{}",
            r.launcher,
            r.duration.as_secs_f64(),
            if r.retried { " (after a retry)" } else { "" }
        ));
    }
    result
}

/// Writes `base` followed by `extra` (both gzip'd newc archives) to `out`.
pub fn compose_initrd(base: &Path, extras: &[&[u8]], out: &Path) -> std::io::Result<()> {
    let mut data = std::fs::read(base)?;
    for extra in extras {
        data.extend_from_slice(extra);
    }
    std::fs::write(out, data)
}

/// Prints a line that libtest's output capture does not swallow.
pub fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_parsed_by_tag() {
        let console = "noise\n@@E2E-INIT:l2@@\n@@E2E-BEGIN:l2@@\nx\n@@E2E-INIT:g@@\n\
                       @@E2E-BEGIN:g@@\nhello\nworld\n@@E2E-END:g rc=3@@\ny\n@@E2E-END:l2 rc=0@@\n";
        let (init, out, rc) = parse_markers(console, "g");
        assert!(init);
        assert_eq!(out.as_deref(), Some("hello\nworld\n"));
        assert_eq!(rc, Some(3));
        let (_, out, rc) = parse_markers(console, "l2");
        assert!(out.unwrap().contains("@@E2E-END:g rc=3@@"));
        assert_eq!(rc, Some(0));
    }

    #[test]
    fn missing_end_marker_gives_no_status() {
        let (init, out, rc) = parse_markers("@@E2E-INIT:g@@\n@@E2E-BEGIN:g@@\npartial\n", "g");
        assert!(init);
        assert_eq!(out.as_deref(), Some("partial\n"));
        assert_eq!(rc, None);
    }
}
