//! Host packages the tests and the guest image need, installed with apt-get when missing.

use std::process::Command;

use crate::util::{is_root, output, run, step, Result};

/// Debian packages the test suite needs on the host.
///
/// - qemu-system-x86: the QEMU launcher (guests under TCG, and the L2 of nested KVM);
///   it also brings qemu-storage-daemon, the block benchmark's peer.
/// - busybox-static, fio, socat, iperf3: copied into the guest image with their libraries.
/// - kmod: `depmod`, to compute `modules.dep` for the guest kernel's modules.
/// - iproute2: network namespaces for the net tests.
/// - gcc-aarch64-linux-gnu, libc6-dev-arm64-cross: the linker and C library of the
///   `aarch64-unknown-linux-gnu` build (`.cargo/config.toml` names the linker);
///   qemu-system-arm: the emulated arm64 machine whose KVM runs the aarch64 e2e test.
pub const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-system-arm",
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "busybox-static",
    "fio",
    "socat",
    "iperf3",
    "kmod",
    "iproute2",
    "systemd",
];

fn installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_ok_and(|s| s.contains("install ok installed"))
}

/// Installs whatever of [`PACKAGES`] is missing.
pub fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        step("host packages: all present");
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        return Err(format!(
            "missing Debian packages: {list}; install them with: sudo apt-get install -y {list}"
        ));
    }
    step(&format!("installing Debian packages: {list}"));
    let install = |update: bool| -> Result<()> {
        if update {
            run(Command::new("apt-get").args(["update", "-q"]))?;
        }
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing))
    };
    // Package lists on a fresh machine may be stale or absent: update once on failure.
    install(false).or_else(|_| install(true))
}
