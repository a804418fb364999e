//! The QEMU launcher: `qemu-system-x86_64 -machine q35` with memfd-backed shared memory (so
//! vhost-user daemons can map it), KVM where a real boot shows it works, TCG otherwise.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::guest::{
    compose_initrd, run_with_retry, say, watch_vm, DeviceKind, Error, GuestRun, GuestSpec,
    Launcher, Watch, GUEST_TAG,
};
use crate::paths;
use crate::process::ChildGuard;

/// The accelerator QEMU runs the guest with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// Software emulation, multi-threaded.
    Tcg,
}

/// QEMU as a guest launcher.
#[derive(Debug, Clone)]
pub struct Qemu {
    binary: PathBuf,
    version: String,
    accel: Accel,
}

/// Holds the machine-wide guest lock: emulated guests run one at a time on a small host.
#[derive(Debug)]
pub struct GuestLock {
    _lock: nix::fcntl::Flock<File>,
}

/// Takes the guest lock, waiting for other test processes' guests to finish.
pub fn lock_guests() -> std::io::Result<GuestLock> {
    std::fs::create_dir_all(paths::guest_dir())?;
    let file = File::create(paths::guest_dir().join(".run.lock"))?;
    let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| std::io::Error::from(e))?;
    Ok(GuestLock { _lock: lock })
}

/// Records and prints loudly that a test was skipped.
pub fn skip(test: &str, why: &str) {
    say(&format!("SKIPPED {test}: {why}"));
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(paths::skip_log())
    {
        let _ = std::io::Write::write_all(&mut f, format!("{test}: {why}\n").as_bytes());
    }
}

/// Finds a program on `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Whether the guest image is built; prints and records a skip for `test` if not.
pub fn guest_image_or_skip(test: &str) -> bool {
    if paths::kernel().exists() && paths::initrd().exists() {
        return true;
    }
    skip(
        test,
        &format!(
            "no guest image in {} (run `cargo xtask guest`, or `cargo xtask test` which builds it)",
            paths::guest_dir().display()
        ),
    );
    false
}

/// QEMU for `test`, or `None` after printing why the test is skipped.
pub fn qemu_or_skip(test: &str) -> Option<Qemu> {
    let Some(binary) = which("qemu-system-x86_64") else {
        skip(
            test,
            "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86, or run `cargo xtask test` as root)",
        );
        return None;
    };
    if !guest_image_or_skip(test) {
        return None;
    }
    match Qemu::new(binary) {
        Ok(q) => Some(q),
        Err(e) => {
            skip(test, &format!("QEMU is not usable: {e}"));
            None
        }
    }
}

impl Qemu {
    /// Probes `binary` and picks the accelerator (cached per host kernel and QEMU version).
    pub fn new(binary: PathBuf) -> Result<Self, String> {
        let out = Command::new(&binary)
            .arg("--version")
            .output()
            .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
        let version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .replace("QEMU emulator version ", "")
            .split_whitespace()
            .next()
            .unwrap_or("?")
            .to_string();
        let mut qemu = Qemu {
            binary,
            version,
            accel: Accel::Tcg,
        };
        qemu.accel = qemu.pick_accel();
        Ok(qemu)
    }

    /// The accelerator in use.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The QEMU version, e.g. `7.2.22`.
    pub fn version(&self) -> &str {
        &self.version
    }

    fn pick_accel(&self) -> Accel {
        match std::env::var("E2E_ACCEL").as_deref() {
            Ok("tcg") => return Accel::Tcg,
            Ok("kvm") => return Accel::Kvm,
            _ => {}
        }
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            return Accel::Tcg;
        }
        let host = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let key = format!("{host} qemu-{}", self.version);
        let cache = paths::guest_dir().join("accel-probe");
        // One probe for all test processes: the others wait and read its answer.
        let _lock = lock_guests();
        if let Ok(text) = std::fs::read_to_string(&cache) {
            if let Some(rest) = text.strip_prefix(&format!("{key}: ")) {
                return if rest.trim() == "kvm" {
                    Accel::Kvm
                } else {
                    Accel::Tcg
                };
            }
        }
        // /dev/kvm may exist and still not run a stock kernel (KVM on PVM): decide by a
        // real boot, once.
        let probe = Qemu {
            accel: Accel::Kvm,
            ..self.clone()
        };
        let spec = GuestSpec::new("true").timeout(Duration::from_secs(20));
        let works = probe
            .run_once(&spec, Duration::from_secs(20))
            .is_ok_and(|r| r.exit_code == Some(0));
        let accel = if works { Accel::Kvm } else { Accel::Tcg };
        say(&format!(
            "e2e: probed KVM with a real boot: {} (cached in {})",
            if works {
                "works"
            } else {
                "cannot run a stock kernel here, using TCG"
            },
            cache.display()
        ));
        let _ = std::fs::write(
            &cache,
            format!("{key}: {}\n", if works { "kvm" } else { "tcg" }),
        );
        accel
    }

    fn command(&self, spec: &GuestSpec, initrd: &Path) -> Result<Command, Error> {
        let mut cmd = Command::new(&self.binary);
        let mem = spec.memory_mib;
        cmd.args(["-machine", "q35,memory-backend=mem"]);
        match self.accel {
            Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max"]),
        };
        cmd.args(["-smp", &spec.cpus.to_string(), "-m", &format!("{mem}M")]);
        cmd.args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        ]);
        cmd.args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-no-reboot",
        ]);
        cmd.arg("-kernel").arg(paths::kernel());
        cmd.arg("-initrd").arg(initrd);
        let mut append = format!("console=ttyS0 quiet panic=-1 e2e.tag={GUEST_TAG}");
        for arg in &spec.kernel_args {
            append.push(' ');
            append.push_str(arg);
        }
        cmd.args(["-append", &append]);
        for (i, dev) in spec.devices.iter().enumerate() {
            let chardev = format!("vu{i}");
            cmd.args([
                "-chardev",
                &format!(
                    "socket,id={chardev},path={}{}",
                    dev.socket.display(),
                    if dev.reconnect { ",reconnect=1" } else { "" }
                ),
            ]);
            match dev.kind {
                DeviceKind::Blk => cmd.args([
                    "-device",
                    &format!(
                        "vhost-user-blk-pci,chardev={chardev},num-queues={}",
                        dev.queues
                    ),
                ]),
                DeviceKind::Net => {
                    let q = dev.queues;
                    cmd.args([
                        "-netdev",
                        &format!("vhost-user,id=net{i},chardev={chardev},queues={q}"),
                    ]);
                    let mut device = format!("virtio-net-pci,netdev=net{i}");
                    if let Some(mac) = &dev.mac {
                        device.push_str(&format!(",mac={mac}"));
                    }
                    if q > 1 {
                        device.push_str(",mq=on");
                    }
                    if self.accel == Accel::Tcg {
                        // QEMU 7.2 dereferences a NULL `vector_irqfd` when a guest starts a
                        // vhost-user virtio-net with MSI-X but without KVM irqfds (TCG):
                        // segfault in vhost_net_start -> msix_set_vector_notifiers. INTx
                        // (vectors=0) avoids that path.
                        device.push_str(",vectors=0");
                    } else if q > 1 {
                        device.push_str(&format!(",vectors={}", 2 * q + 2));
                    }
                    cmd.args(["-device", &device])
                }
                DeviceKind::Vsock => cmd.args([
                    "-device",
                    &format!("vhost-user-vsock-pci,chardev={chardev}"),
                ]),
                DeviceKind::Console => {
                    return Err(Error::Setup(format!(
                        "QEMU {} has no vhost-user console device; run console tests under vmm-frontend",
                        self.version
                    )))
                }
            };
        }
        Ok(cmd)
    }

    fn run_once(&self, spec: &GuestSpec, boot_timeout: Duration) -> Result<GuestRun, Error> {
        run_on_host(spec, &self.describe(), boot_timeout, |initrd| {
            self.command(spec, initrd)
        })
    }
}

/// Runs `spec` with a VM process on this host (QEMU, or vmm-frontend on a host whose KVM
/// runs stock kernels): writes the guest's initramfs, starts the host side, runs the VM
/// that `vm` builds for that initramfs to the guest's end marker, stops the daemons, runs
/// the host check.
pub fn run_on_host(
    spec: &GuestSpec,
    launcher: &str,
    boot_timeout: Duration,
    vm: impl FnOnce(&Path) -> Result<Command, Error>,
) -> Result<GuestRun, Error> {
    let started = Instant::now();
    let work = tempfile::tempdir().map_err(|e| Error::Setup(e.to_string()))?;
    let extra = spec.archive().map_err(|e| Error::Setup(e.to_string()))?;
    let initrd = work.path().join("initrd.gz");
    compose_initrd(&paths::initrd(), &[&extra], &initrd)
        .map_err(|e| Error::Setup(format!("cannot write the guest initramfs: {e}")))?;
    let mut daemons = start_host_side(spec)?;
    let watch = Watch {
        launcher: launcher.to_string(),
        tag: GUEST_TAG.to_string(),
        boot_timeout,
        command_timeout: spec.timeout,
        echo: std::env::var_os("E2E_VERBOSE").is_some(),
    };
    let watched = watch_vm(vm(&initrd)?, &watch);
    for d in &mut daemons {
        d.terminate(Duration::from_secs(5));
    }
    let watched = watched?;
    let host_output = if spec.host_check.is_empty() {
        String::new()
    } else {
        host_shell(&spec.host_check).unwrap_or_else(|e| e)
    };
    Ok(GuestRun {
        output: watched.output,
        exit_code: watched.exit_code,
        console: watched.console,
        host_output,
        launcher: launcher.to_string(),
        duration: started.elapsed(),
        retried: false,
    })
}

/// Runs the spec's host side where the daemons run on this host: the set-up script, the
/// daemons (waiting for their sockets), then the background commands. Everything returned
/// is stopped when dropped.
pub fn start_host_side(spec: &GuestSpec) -> Result<Vec<ChildGuard>, Error> {
    if !spec.host_setup.is_empty() {
        host_shell(&spec.host_setup).map_err(Error::Setup)?;
    }
    let mut started = Vec::new();
    for dev in &spec.devices {
        let Some(d) = &dev.daemon else { continue };
        let mut cmd = match &d.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns])
                    .arg(paths::bin_path(&d.binary));
                c
            }
            None => Command::new(paths::bin_path(&d.binary)),
        };
        cmd.args(dev.daemon_args());
        let mut guard =
            ChildGuard::spawn(&d.binary, cmd).map_err(|e| Error::Setup(e.to_string()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dev.socket.exists() && Instant::now() < deadline {
            if let Some(status) = guard.try_wait() {
                return Err(Error::Setup(format!(
                    "{} exited ({status}) before creating {}",
                    d.binary,
                    dev.socket.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !dev.socket.exists() {
            return Err(Error::Setup(format!(
                "{} did not create {} within 10 s",
                d.binary,
                dev.socket.display()
            )));
        }
        started.push(guard);
    }
    for (i, script) in spec.host_background.iter().enumerate() {
        started.push(
            ChildGuard::spawn_shell_group(&format!("background {i}"), script)
                .map_err(|e| Error::Setup(e.to_string()))?,
        );
    }
    Ok(started)
}

/// Runs a shell snippet on the host, returning its output (or the output and status on
/// failure as the error).
pub fn host_shell(script: &str) -> Result<String, String> {
    let out = Command::new("/bin/sh")
        .args(["-c", script])
        .output()
        .map_err(|e| format!("cannot run /bin/sh: {e}"))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("host script failed ({}): {text}", out.status))
    }
}

impl Launcher for Qemu {
    fn describe(&self) -> String {
        format!(
            "QEMU {} ({})",
            self.version,
            match self.accel {
                Accel::Kvm => "KVM",
                Accel::Tcg => "TCG",
            }
        )
    }

    fn run(&self, spec: &GuestSpec) -> Result<GuestRun, Error> {
        self.run_together(std::slice::from_ref(spec))
            .pop()
            .unwrap_or_else(|| Err(Error::Setup("no guest run".into())))
    }
}

impl Qemu {
    /// Runs several guests at the same time under one hold of the guest lock (e.g. two
    /// VMs of one daemon talking to each other), each with its own VM process, console,
    /// timeouts and retry; returns each guest's result in the order of `specs`. Give each
    /// guest `-smp 1` ([`GuestSpec::cpus`]) so they share the host's cores.
    pub fn run_together(&self, specs: &[GuestSpec]) -> Vec<Result<GuestRun, Error>> {
        let _lock = match lock_guests() {
            Ok(l) => l,
            Err(e) => {
                return specs
                    .iter()
                    .map(|_| Err(Error::Setup(format!("guest lock: {e}"))))
                    .collect()
            }
        };
        // Generous for a loaded 2-core machine (TCG reaches init in 2-4 s), yet a hung
        // guest fails in well under a minute.
        let boot = Duration::from_secs(40 * specs.len().max(1) as u64);
        let launcher = self.describe();
        std::thread::scope(|scope| {
            let runs: Vec<_> = specs
                .iter()
                .map(|spec| {
                    let launcher = &launcher;
                    scope.spawn(move || run_with_retry(launcher, || self.run_once(spec, boot)))
                })
                .collect();
            runs.into_iter()
                .map(|r| {
                    r.join()
                        .unwrap_or_else(|_| Err(Error::Setup("guest run thread panicked".into())))
                })
                .collect()
        })
    }
}
