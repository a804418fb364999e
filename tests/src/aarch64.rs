//! The arm64 side of the e2e harness: where `cargo xtask guest-arm64` puts the arm64 test
//! guest, and the launcher that boots `vmm-frontend` built for aarch64 inside an emulated
//! arm64 machine (QEMU TCG `virt` with EL2, whose own KVM runs the test guest).
//!
//! The layout mirrors the x86 nesting of [`crate::nested`]: L2 is `qemu-system-aarch64
//! -machine virt,virtualization=on,gic-version=3 -cpu max` booting the Debian arm64 cloud
//! kernel (KVM built in) with an initramfs holding the statically linked aarch64
//! `vmm-frontend` and `vhost-device-blk`, the same kernel `Image` and the L3 initramfs; L2's
//! command starts the daemon and `vmm-frontend`, and L3's markers come back through L2's
//! PL011 console.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::guest::{run_with_retry, Error, GuestRun, GuestSpec, Launcher};
use crate::nested::{run_nested_on, Platform};
use crate::qemu::{lock_guests, skip, which};

/// The Rust target of the arm64 binaries.
pub const TARGET: &str = "aarch64-unknown-linux-gnu";

/// The arm64 guest image cache: `<workspace>/target/guest-arm64`, shared by every build.
pub fn guest_dir() -> PathBuf {
    crate::paths::workspace_root()
        .join("target")
        .join("guest-arm64")
}

/// The arm64 kernel `Image` (Debian's arm64 `vmlinuz` is an uncompressed `Image`).
pub fn kernel() -> PathBuf {
    guest_dir().join("Image")
}

/// The base arm64 initramfs (busybox, the virtio-mmio and virtio-blk modules, `/init`).
pub fn initrd() -> PathBuf {
    guest_dir().join("initrd.gz")
}

/// The aarch64 binaries of this build: `target/<dir>/aarch64-unknown-linux-gnu/<profile>`
/// beside this test's `target/<dir>/<profile>`.
pub fn bin_dir() -> PathBuf {
    let host = crate::paths::bin_dir();
    let profile = host.file_name().map(ToOwned::to_owned).unwrap_or_default();
    host.parent()
        .map_or_else(PathBuf::new, Path::to_path_buf)
        .join(TARGET)
        .join(profile)
}

/// The aarch64 `vmm-frontend` nested in an emulated arm64 machine, as a guest launcher.
#[derive(Debug, Clone)]
pub struct Aarch64Vmm {
    qemu: PathBuf,
    gic_v2: bool,
}

/// The launcher for `test`, or `None` after printing why the test is skipped.
pub fn aarch64_or_skip(test: &str) -> Option<Aarch64Vmm> {
    let Some(qemu) = which("qemu-system-aarch64") else {
        skip(
            test,
            "qemu-system-aarch64 is not installed (Debian qemu-system-arm; cargo xtask deps)",
        );
        return None;
    };
    if !kernel().exists() || !initrd().exists() {
        skip(
            test,
            &format!(
                "no arm64 guest image in {} (cargo xtask guest-arm64)",
                guest_dir().display()
            ),
        );
        return None;
    }
    for b in ["vmm-frontend", "vhost-device-blk"] {
        if !bin_dir().join(b).exists() {
            skip(
                test,
                &format!(
                    "{} is not built (cargo build --target {TARGET} -p vmm-frontend -p vhost-device-blk)",
                    bin_dir().join(b).display()
                ),
            );
            return None;
        }
    }
    Some(Aarch64Vmm {
        qemu,
        gic_v2: false,
    })
}

impl Aarch64Vmm {
    /// The same with a GICv2 in the emulated machine: KVM there has no GICv3 to offer, so
    /// `vmm-frontend` falls back to an in-kernel GICv2.
    pub fn with_gic_v2(mut self) -> Self {
        self.gic_v2 = true;
        self
    }
}

/// L2: `virt` with EL2 and GICv3, `-cpu max`, 2 vCPUs, 2 GiB, multi-threaded TCG.
fn l2_command(qemu: &Path, kernel: &Path, initrd: &Path) -> Command {
    l2_command_with(qemu, kernel, initrd, 3)
}

/// [`l2_command`] with a GICv2.
fn l2_command_gic_v2(qemu: &Path, kernel: &Path, initrd: &Path) -> Command {
    l2_command_with(qemu, kernel, initrd, 2)
}

fn l2_command_with(qemu: &Path, kernel: &Path, initrd: &Path, gic: u8) -> Command {
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-machine",
        &format!("virt,virtualization=on,gic-version={gic}"),
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max,pauth-impdef=on",
        "-smp",
        "2",
        "-m",
        "2G",
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

impl Launcher for Aarch64Vmm {
    fn describe(&self) -> String {
        let gic = if self.gic_v2 { "GICv2" } else { "GICv3" };
        format!("aarch64 vmm-frontend (KVM in an emulated arm64 machine, {gic})")
    }

    fn run(&self, spec: &GuestSpec) -> Result<GuestRun, Error> {
        let _lock = lock_guests().map_err(|e| Error::Setup(format!("guest lock: {e}")))?;
        let platform = Platform {
            kernel: kernel(),
            initrd: initrd(),
            bin_dir: bin_dir(),
            objcopy: "aarch64-linux-gnu-objcopy",
            copy_libraries: false,
            console: "ttyAMA0",
            qemu: self.qemu.clone(),
            l2_command: if self.gic_v2 {
                l2_command_gic_v2
            } else {
                l2_command
            },
            boot_timeout: Duration::from_secs(120),
        };
        run_with_retry(&self.describe(), || {
            run_nested_on(spec, &platform, &self.describe())
        })
    }
}
