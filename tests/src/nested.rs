//! The vmm-frontend launcher.
//!
//! `vmm-frontend` needs a KVM that runs a stock kernel. Where the host's does (the QEMU
//! probe says so), the daemons and `vmm-frontend` run right here ("direct"). Where it does
//! not — the development machines' `/dev/kvm` is KVM on PVM — they run inside a QEMU TCG
//! guest ("L2") with `-cpu max`, whose own KVM (nested SVM) runs the test guest ("L3"):
//! L2's initramfs carries the kvm modules, the project's binaries with their libraries, and
//! the L3 kernel and initramfs; its command starts the daemons and `vmm-frontend`, and the
//! L3 guest's markers come back through L2's serial console.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cpio::Archive;
use crate::guest::{
    compose_initrd, parse_markers, run_with_retry, watch_vm, DeviceKind, Error, GuestRun,
    GuestSpec, Launcher, Watch, GUEST_TAG,
};
use crate::paths;
use crate::qemu::{guest_image_or_skip, lock_guests, run_on_host, skip, which, Accel, Qemu};

/// The marker tag of the L2 guest.
const L2_TAG: &str = "l2";

/// How `vmm-frontend` gets its KVM.
#[derive(Debug, Clone)]
enum Mode {
    /// On this host.
    Direct,
    /// Inside a QEMU TCG guest with nested SVM.
    Nested { qemu: PathBuf, version: String },
}

/// `vmm-frontend` as a guest launcher.
#[derive(Debug, Clone)]
pub struct Vmm {
    mode: Mode,
}

/// `vmm-frontend` for `test`, or `None` after printing why the test is skipped.
pub fn vmm_or_skip(test: &str) -> Option<Vmm> {
    let vmm = paths::bin_dir().join("vmm-frontend");
    if !vmm.exists() {
        skip(
            test,
            &format!("{} is not built (cargo build --workspace)", vmm.display()),
        );
        return None;
    }
    let Some(binary) = which("qemu-system-x86_64") else {
        skip(
            test,
            "qemu-system-x86_64 is not installed: it is needed to probe KVM and, where the host's KVM cannot run a stock kernel, to nest one",
        );
        return None;
    };
    if !guest_image_or_skip(test) {
        return None;
    }
    let qemu = match Qemu::new(binary.clone()) {
        Ok(q) => q,
        Err(e) => {
            skip(test, &format!("QEMU is not usable: {e}"));
            return None;
        }
    };
    let mode = if qemu.accel() == Accel::Kvm {
        Mode::Direct
    } else {
        Mode::Nested {
            qemu: binary,
            version: qemu.version().to_string(),
        }
    };
    Some(Vmm { mode })
}

impl Vmm {
    /// The `vmm-frontend` arguments for `spec`, with the kernel and initramfs at the given
    /// paths.
    fn vmm_args(spec: &GuestSpec, kernel: &str, initrd: &str, console: &str) -> Vec<String> {
        let mut cmdline = format!("console={console} quiet panic=-1 e2e.tag={GUEST_TAG}");
        for a in &spec.kernel_args {
            cmdline.push(' ');
            cmdline.push_str(a);
        }
        let mut args = vec![
            "--kernel".to_string(),
            kernel.to_string(),
            "--initramfs".to_string(),
            initrd.to_string(),
            "--cmdline".to_string(),
            cmdline,
            "--cpus".to_string(),
            spec.cpus.to_string(),
            "--memory".to_string(),
            format!("{}M", spec.memory_mib),
            "--serial".to_string(),
            "stdio".to_string(),
        ];
        for dev in &spec.devices {
            let socket = dev.socket.display();
            let (flag, value) = match dev.kind {
                DeviceKind::Blk => ("--blk", format!("socket={socket},queues={}", dev.queues)),
                DeviceKind::Net => {
                    let mut v = format!("socket={socket},queues={}", dev.queues);
                    if let Some(mac) = &dev.mac {
                        let _ = write!(v, ",mac={mac}");
                    }
                    ("--net", v)
                }
                DeviceKind::Vsock => ("--vsock", format!("socket={socket},cid={}", dev.cid)),
                DeviceKind::Console => ("--console", format!("socket={socket}")),
            };
            args.push(flag.to_string());
            args.push(value);
        }
        args
    }

    fn run_direct(&self, spec: &GuestSpec) -> Result<GuestRun, Error> {
        run_on_host(spec, &self.describe(), Duration::from_secs(30), |initrd| {
            let mut cmd = Command::new(paths::bin_path("vmm-frontend"));
            cmd.args(Self::vmm_args(
                spec,
                &paths::kernel().display().to_string(),
                &initrd.display().to_string(),
                "ttyS0",
            ));
            Ok(cmd)
        })
    }

    /// The shell L2 runs: load KVM, set up, start the daemons, run vmm-frontend, check.
    /// `console` is the L3 kernel's console device.
    fn l2_script(spec: &GuestSpec, console: &str) -> String {
        let mut s = String::from(
            "KVER=$(uname -r)\n\
             for m in $(cat /etc/e2e/modules.kvm); do insmod /lib/modules/$KVER/$m 2>/dev/null; done\n\
             if [ ! -e /dev/kvm ]; then echo 'e2e-nested: L2 has no /dev/kvm'; exit 97; fi\n\
             cd /tmp\n",
        );
        if !spec.host_setup.is_empty() {
            let _ = writeln!(
                s,
                "( {}\n) || {{ echo 'e2e-nested: host set-up failed'; exit 98; }}",
                spec.host_setup
            );
        }
        let mut pids = Vec::new();
        for (i, dev) in spec.devices.iter().enumerate() {
            let Some(d) = &dev.daemon else { continue };
            let args: Vec<String> = dev.daemon_args().iter().map(|a| shell_quote(a)).collect();
            let netns = d
                .netns
                .as_ref()
                .map(|ns| format!("{} netns exec {} ", ip_path(), shell_quote(ns)))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "{netns}/usr/bin/{} {} > /tmp/daemon{i}.log 2>&1 &\nD{i}=$!; export D{i}",
                d.binary,
                args.join(" ")
            );
            let _ = writeln!(
                s,
                "n=0; while [ ! -S {sock} ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done\n\
                 [ -S {sock} ] || {{ echo 'e2e-nested: {bin} did not create its socket'; cat /tmp/daemon{i}.log; exit 99; }}",
                sock = shell_quote(&dev.socket.display().to_string()),
                bin = d.binary
            );
            pids.push(i);
        }
        for (i, script) in spec.host_background.iter().enumerate() {
            let _ = writeln!(
                s,
                "setsid sh -c {} > /tmp/background{i}.log 2>&1 &\nB{i}=$!",
                shell_quote(script)
            );
        }
        let vmm: Vec<String> = Self::vmm_args(spec, "/l3/vmlinuz", "/l3/initrd.gz", console)
            .iter()
            .map(|a| shell_quote(a))
            .collect();
        let _ = writeln!(
            s,
            "/usr/bin/vmm-frontend {}\necho \"@@E2E-VMM rc=$?@@\"",
            vmm.join(" ")
        );
        for i in &pids {
            let _ = writeln!(
                s,
                "kill -TERM $D{i} 2>/dev/null; wait $D{i}; echo \"@@E2E-DAEMON{i} rc=$?@@\"\n\
                 echo '--- daemon{i} log ---'; cat /tmp/daemon{i}.log"
            );
        }
        for i in 0..spec.host_background.len() {
            let _ = writeln!(
                s,
                "kill -TERM -$B{i} 2>/dev/null; kill -TERM $B{i} 2>/dev/null"
            );
        }
        s.push_str("echo @@E2E-HOST-BEGIN@@\n");
        if !spec.host_check.is_empty() {
            let _ = writeln!(s, "( {}\n) 2>&1", spec.host_check);
        }
        s.push_str("echo @@E2E-HOST-END@@\n");
        s
    }

    fn run_nested(&self, spec: &GuestSpec, qemu: &Path) -> Result<GuestRun, Error> {
        let platform = Platform {
            kernel: paths::kernel(),
            initrd: paths::initrd(),
            bin_dir: paths::bin_dir(),
            objcopy: "objcopy",
            copy_libraries: true,
            console: "ttyS0",
            qemu: qemu.to_path_buf(),
            l2_command,
            boot_timeout: Duration::from_secs(90),
        };
        run_nested_on(spec, &platform, &self.describe())
    }
}

/// What differs between the x86_64 nesting (q35 with nested SVM) and the arm64 one (`virt`
/// with EL2): the image, where the binaries are, and how L2 is started.
#[derive(Debug, Clone)]
pub(crate) struct Platform {
    /// The kernel of L2 and L3.
    pub kernel: PathBuf,
    /// The base initramfs of L2 and L3.
    pub initrd: PathBuf,
    /// Where the project's binaries for this architecture are.
    pub bin_dir: PathBuf,
    /// The `objcopy` that reads those binaries.
    pub objcopy: &'static str,
    /// Whether to copy the binaries' shared libraries (`ldd`); static binaries need none.
    pub copy_libraries: bool,
    /// The kernel's serial console device.
    pub console: &'static str,
    /// The QEMU binary of L2.
    pub qemu: PathBuf,
    /// L2's QEMU command line for (QEMU, kernel, initramfs), without `-append`.
    pub l2_command: fn(&Path, &Path, &Path) -> Command,
    /// Time allowed for L2 to reach its init.
    pub boot_timeout: Duration,
}

/// Runs `spec` under `vmm-frontend` inside an L2 guest of `platform`.
pub(crate) fn run_nested_on(
    spec: &GuestSpec,
    platform: &Platform,
    launcher: &str,
) -> Result<GuestRun, Error> {
    let started = Instant::now();
    let work = tempfile::tempdir().map_err(|e| Error::Setup(e.to_string()))?;
    // L3: the test's own guest.
    let l3_extra = spec.archive().map_err(|e| Error::Setup(e.to_string()))?;
    let mut l3_initrd = std::fs::read(&platform.initrd).map_err(|e| Error::Setup(e.to_string()))?;
    l3_initrd.extend_from_slice(&l3_extra);
    let kernel = std::fs::read(&platform.kernel).map_err(|e| Error::Setup(e.to_string()))?;

    // L2: the binaries, the L3 image, and the script.
    let mut binaries = vec!["vmm-frontend".to_string()];
    for dev in &spec.devices {
        if let Some(d) = &dev.daemon {
            if !binaries.contains(&d.binary) {
                binaries.push(d.binary.clone());
            }
        }
    }
    let mut a = Archive::new();
    let mut made = std::collections::BTreeSet::new();
    for d in ["l3", "usr", "usr/bin", "e2e"] {
        made.insert(d.to_string());
    }
    a.dir("l3");
    a.file("l3/vmlinuz", 0o644, &kernel);
    a.file("l3/initrd.gz", 0o644, &l3_initrd);
    for b in &binaries {
        let path = platform.bin_dir.join(b);
        if !path.exists() {
            return Err(Error::Setup(format!("{} is not built", path.display())));
        }
        let body = stripped_with(platform.objcopy, &path, work.path()).map_err(Error::Setup)?;
        a.file(&format!("usr/bin/{b}"), 0o755, &body);
        let libs = if platform.copy_libraries {
            libraries(&path)
        } else {
            Vec::new()
        };
        for lib in libs {
            let dest = lib.display().to_string();
            if let Ok(body) = std::fs::read(&lib) {
                a.dirs_for(&dest, &mut made);
                a.file(&dest, 0o755, &body);
            }
        }
    }
    let l2_spec = GuestSpec::new(&Vmm::l2_script(spec, platform.console));
    let l2_cmd = l2_spec.archive().map_err(|e| Error::Setup(e.to_string()))?;
    let l2_files = a.finish_gz().map_err(|e| Error::Setup(e.to_string()))?;
    let l2_initrd = work.path().join("l2-initrd.gz");
    compose_initrd(&platform.initrd, &[&l2_files, &l2_cmd], &l2_initrd)
        .map_err(|e| Error::Setup(format!("cannot write the L2 initramfs: {e}")))?;

    let mut cmd = (platform.l2_command)(&platform.qemu, &platform.kernel, &l2_initrd);
    cmd.args([
        "-append",
        &format!(
            "console={} quiet panic=-1 e2e.tag={L2_TAG}",
            platform.console
        ),
    ]);
    let watch = Watch {
        launcher: launcher.to_string(),
        tag: L2_TAG.to_string(),
        boot_timeout: platform.boot_timeout,
        // L3 boots in about 10 s under nested KVM; the rest is the test's own time.
        command_timeout: spec.timeout + Duration::from_secs(90),
        echo: std::env::var_os("E2E_VERBOSE").is_some(),
    };
    let watched = watch_vm(cmd, &watch)?;
    let l2_out = watched.output;
    let (l3_init, output, exit_code) = parse_markers(&l2_out, GUEST_TAG);
    if l2_out.contains("e2e-nested:") {
        return Err(Error::Setup(format!(
            "the L2 guest could not run vmm-frontend:\n{l2_out}"
        )));
    }
    if !l3_init {
        return Err(Error::NoBoot {
            launcher: launcher.to_string(),
            secs: watch.command_timeout.as_secs(),
            console: watched.console,
        });
    }
    let host_output = l2_out
        .split("@@E2E-HOST-BEGIN@@\n")
        .nth(1)
        .and_then(|t| t.split("@@E2E-HOST-END@@").next())
        .unwrap_or("")
        .to_string();
    Ok(GuestRun {
        output: output.unwrap_or_default(),
        exit_code,
        console: watched.console,
        host_output,
        launcher: launcher.to_string(),
        duration: started.elapsed(),
        retried: false,
    })
}

/// Boots the L2 guest alone and runs `command` there after loading the kvm modules: the
/// nested set-up's own check (is there a `/dev/kvm` inside L2?), without vmm-frontend.
pub fn run_l2(command: &str, timeout: Duration) -> Result<GuestRun, Error> {
    run_l2_spec(&GuestSpec::new(command).timeout(timeout))
}

/// Like [`run_l2`], with the spec's extra files in L2 (a benchmark's programs) and its
/// vCPU count (1 unless the spec asks for more); its devices are ignored.
pub fn run_l2_spec(spec: &GuestSpec) -> Result<GuestRun, Error> {
    let command = &spec.command;
    let timeout = spec.timeout;
    let qemu = which("qemu-system-x86_64")
        .ok_or_else(|| Error::Setup("qemu-system-x86_64 is not installed".into()))?;
    let _lock = lock_guests().map_err(|e| Error::Setup(format!("guest lock: {e}")))?;
    let started = Instant::now();
    let work = tempfile::tempdir().map_err(|e| Error::Setup(e.to_string()))?;
    let script = format!(
        "KVER=$(uname -r)\nfor m in $(cat /etc/e2e/modules.kvm); do insmod /lib/modules/$KVER/$m 2>/dev/null; done\n{command}"
    );
    let mut l2 = spec.clone();
    l2.command = script;
    let extra = l2.archive().map_err(|e| Error::Setup(e.to_string()))?;
    let initrd = work.path().join("l2-initrd.gz");
    compose_initrd(&paths::initrd(), &[&extra], &initrd)
        .map_err(|e| Error::Setup(e.to_string()))?;
    let mut cmd = l2_command_with(&qemu, &paths::kernel(), &initrd, spec.cpus);
    cmd.args([
        "-append",
        &format!("console=ttyS0 quiet panic=-1 e2e.tag={L2_TAG}"),
    ]);
    let watch = Watch {
        launcher: "QEMU TCG (L2)".to_string(),
        tag: L2_TAG.to_string(),
        boot_timeout: Duration::from_secs(60),
        command_timeout: timeout,
        echo: std::env::var_os("E2E_VERBOSE").is_some(),
    };
    let watched = watch_vm(cmd, &watch)?;
    Ok(GuestRun {
        output: watched.output,
        exit_code: watched.exit_code,
        console: watched.console,
        host_output: String::new(),
        launcher: watch.launcher,
        duration: started.elapsed(),
        retried: false,
    })
}

/// The QEMU command line of an L2 guest: one vCPU, multi-threaded TCG, `-cpu max` (which
/// emulates SVM with nested paging), 3 GiB.
fn l2_command(qemu: &Path, kernel: &Path, initrd: &Path) -> Command {
    l2_command_with(qemu, kernel, initrd, 1)
}

/// The L2 command line with `cpus` vCPUs.
fn l2_command_with(qemu: &Path, kernel: &Path, initrd: &Path, cpus: u8) -> Command {
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-machine",
        "q35",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-smp",
        &cpus.max(1).to_string(),
        "-m",
        "3G",
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
    cmd.arg("-kernel").arg(kernel);
    cmd.arg("-initrd").arg(initrd);
    cmd
}

/// A copy of `binary` without debug info (debug builds are large; L2 unpacks them under
/// emulation), or the binary itself if `objcopy` is missing.
pub fn stripped(binary: &Path, work: &Path) -> Result<Vec<u8>, String> {
    stripped_with("objcopy", binary, work)
}

/// [`stripped`] with another architecture's `objcopy` (`aarch64-linux-gnu-objcopy`).
pub fn stripped_with(objcopy: &str, binary: &Path, work: &Path) -> Result<Vec<u8>, String> {
    let name = binary.file_name().unwrap_or_default();
    let out = work.join(name);
    let ok = Command::new(objcopy)
        .arg("--strip-debug")
        .arg(binary)
        .arg(&out)
        .status()
        .is_ok_and(|s| s.success());
    std::fs::read(if ok { &out } else { binary })
        .map_err(|e| format!("cannot read {}: {e}", binary.display()))
}

/// The shared libraries `ldd` lists for `binary`.
pub fn libraries(binary: &Path) -> Vec<PathBuf> {
    let Ok(out) = Command::new("ldd").arg(binary).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let p = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => l.split_whitespace().next(),
            }?;
            p.starts_with('/').then(|| PathBuf::from(p))
        })
        .collect()
}

/// iproute2's `ip`, by the full path it has on the host and in the guest image (busybox's
/// shell would run its own `ip` applet, which has no `netns`, for a bare `ip`).
pub fn ip_path() -> String {
    which("ip").map_or_else(|| "/usr/sbin/ip".to_string(), |p| p.display().to_string())
}

/// Quotes `s` for `/bin/sh`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl Launcher for Vmm {
    fn describe(&self) -> String {
        match &self.mode {
            Mode::Direct => "vmm-frontend (KVM)".to_string(),
            Mode::Nested { version, .. } => {
                format!("vmm-frontend (nested KVM in a QEMU {version} TCG guest)")
            }
        }
    }

    fn run(&self, spec: &GuestSpec) -> Result<GuestRun, Error> {
        let _lock = lock_guests().map_err(|e| Error::Setup(format!("guest lock: {e}")))?;
        let once = || match &self.mode {
            Mode::Direct => self.run_direct(spec),
            Mode::Nested { qemu, .. } => self.run_nested(spec, qemu),
        };
        run_with_retry(&self.describe(), once)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    #[test]
    fn vmm_arguments_follow_the_cli() {
        let spec = GuestSpec::new("true")
            .cpus(2)
            .memory_mib(256)
            .device(Device::blk(Path::new("/tmp/b.sock")).queues(2))
            .device(Device::net(Path::new("/tmp/n.sock")).mac("52:54:00:00:00:01"))
            .device(Device::vsock(Path::new("/tmp/v.sock"), 5))
            .device(Device::console(Path::new("/tmp/c.sock")));
        let args = Vmm::vmm_args(&spec, "/k", "/i", "ttyS0").join(" ");
        assert!(
            args.starts_with("--kernel /k --initramfs /i --cmdline console=ttyS0"),
            "{args}"
        );
        assert!(
            args.contains("--cpus 2 --memory 256M --serial stdio"),
            "{args}"
        );
        assert!(args.contains("--blk socket=/tmp/b.sock,queues=2"), "{args}");
        assert!(
            args.contains("--net socket=/tmp/n.sock,queues=1,mac=52:54:00:00:00:01"),
            "{args}"
        );
        assert!(args.contains("--vsock socket=/tmp/v.sock,cid=5"), "{args}");
        assert!(args.contains("--console socket=/tmp/c.sock"), "{args}");
    }

    #[test]
    fn l2_script_starts_daemons_and_quotes_arguments() {
        let spec = GuestSpec::new("true")
            .host_setup("truncate -s 1M /tmp/d.img")
            .host_check("ls -l /tmp/d.img")
            .device(Device::blk(Path::new("/tmp/b.sock")).daemon(
                "vhost-device-blk",
                &["--socket-path", "{socket}", "--serial", "it's"],
            ));
        let s = Vmm::l2_script(&spec, "ttyS0");
        assert!(
            s.contains(
                "/usr/bin/vhost-device-blk '--socket-path' '/tmp/b.sock' '--serial' 'it'\\''s'"
            ),
            "{s}"
        );
        assert!(s.contains("truncate -s 1M /tmp/d.img"));
        let vmm_at = s.find("/usr/bin/vmm-frontend").unwrap();
        assert!(s.find("vhost-device-blk").unwrap() < vmm_at);
        assert!(s.find("ls -l /tmp/d.img").unwrap() > vmm_at);
    }
}
