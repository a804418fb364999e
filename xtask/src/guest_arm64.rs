//! `cargo xtask guest-arm64`: the arm64 test guest, built from Debian's arm64 packages into
//! `target/guest-arm64` (the x86 guest's recipe, `guest.rs`, for another architecture).
//!
//! - `dpkg --add-architecture arm64` (and `apt-get update`) when apt does not know arm64;
//! - the kernel behind `linux-image-cloud-arm64:arm64` (resolved with apt, downloaded with
//!   `apt-get download`): its `vmlinuz` is an uncompressed arm64 `Image`, KVM is built in,
//!   virtio is modules, PL011 and GICv3 are built in;
//! - `busybox-static:arm64`;
//! - an initramfs with busybox (which installs its own applet links at start, since the
//!   host cannot run it to list them), `virtio_mmio` and `virtio_blk` with their
//!   dependencies, and the x86 guest's `/init`.
//!
//! The same image is L2 (the emulated arm64 machine, with the test's files appended) and
//! L3 (the guest of the aarch64 `vmm-frontend`). Keyed by a fingerprint like `target/guest`.

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::process::Command;

use e2e::aarch64;
use e2e::cpio::Archive;

use crate::guest::{
    download_deb, kernel_package, kernel_release, module_load_order, parse_modules_dep, INIT,
};
use crate::util::{is_root, mkdir, output, run, step, Result};

/// Modules the arm64 guest loads (virtio devices sit in the device tree as virtio-mmio).
const MODULES: &[&str] = &["virtio_mmio", "virtio_blk"];

/// Bump to force a rebuild when the image layout changes.
const FORMAT: u32 = 1;

/// The `/init`: busybox links itself first, then the x86 guest's init runs unchanged.
fn init() -> String {
    let body = INIT.split_once('\n').map_or(INIT, |(_, rest)| rest);
    format!("#!/bin/sh\n/bin/busybox --install -s\n{body}")
}

/// Makes apt know the arm64 architecture.
fn ensure_arm64_arch() -> Result<()> {
    let foreign = output(Command::new("dpkg").arg("--print-foreign-architectures"))?;
    if foreign.lines().any(|l| l.trim() == "arm64") {
        return Ok(());
    }
    if !is_root() {
        return Err("apt does not know arm64: run `sudo dpkg --add-architecture arm64 && sudo apt-get update`".into());
    }
    step("adding the arm64 architecture to apt");
    run(Command::new("dpkg").args(["--add-architecture", "arm64"]))?;
    run(Command::new("apt-get").args(["update", "-q"]))
}

/// The candidate version of `pkg`.
fn candidate(pkg: &str) -> Result<String> {
    let policy = output(Command::new("apt-cache").args(["policy", pkg]))?;
    policy
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .find(|v| *v != "(none)")
        .map(str::to_string)
        .ok_or_else(|| format!("apt has no candidate version of {pkg}"))
}

/// Builds the arm64 guest image if its inputs changed.
pub fn build() -> Result<()> {
    ensure_arm64_arch()?;
    let dir = aarch64::guest_dir();
    mkdir(&dir)?;
    let (pkg, version) = kernel_package("linux-image-cloud-arm64:arm64")?;
    let pkg = if pkg.contains(':') {
        pkg
    } else {
        format!("{pkg}:arm64")
    };
    let release = kernel_release(&pkg);
    let busybox_pkg = "busybox-static:arm64";
    let busybox_version = candidate(busybox_pkg)?;

    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (FORMAT, &pkg, &version, &busybox_version, init(), MODULES).hash(&mut hasher);
    let fingerprint = format!("{pkg} {version} {:016x}", hasher.finish());
    let stamp = dir.join("stamp");
    let outputs_exist = aarch64::kernel().exists() && aarch64::initrd().exists();
    if outputs_exist && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == fingerprint) {
        step(&format!(
            "arm64 guest image is up to date ({pkg} {version})"
        ));
        return Ok(());
    }

    let debs = dir.join("debs");
    mkdir(&debs)?;
    let kernel_deb = download_deb(&debs, &pkg, &version, "arm64")?;
    let busybox_deb = download_deb(&debs, busybox_pkg, &busybox_version, "arm64")?;
    let root = dir.join("unpacked");
    let _ = std::fs::remove_dir_all(&root);
    mkdir(&root)?;
    for deb in [&kernel_deb, &busybox_deb] {
        step(&format!("unpacking {}", deb.display()));
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root))?;
    }
    run(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    let image =
        std::fs::read(&vmlinuz).map_err(|e| format!("cannot read {}: {e}", vmlinuz.display()))?;
    // The arm64 boot header: "ARM\x64" at offset 56. A compressed vmlinuz (a later
    // Debian kernel might gzip it) is refused plainly rather than handed to the VMM.
    if image.get(56..60) != Some(b"ARM\x64".as_slice()) {
        return Err(format!(
            "{} is not an uncompressed arm64 Image",
            vmlinuz.display()
        ));
    }
    let modules = root.join("lib/modules").join(&release);
    let dep_text = std::fs::read_to_string(modules.join("modules.dep"))
        .map_err(|e| format!("cannot read modules.dep: {e}"))?;
    let order = module_load_order(&parse_modules_dep(&dep_text), MODULES, &mut BTreeSet::new())?;

    step("building the arm64 initramfs");
    let mut a = Archive::new();
    for d in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "etc",
        "etc/e2e", "root", "mnt", "var", "e2e",
    ] {
        a.dir(d);
    }
    let mut made: BTreeSet<String> = BTreeSet::new();
    a.file("init", 0o755, init().as_bytes());
    let busybox = std::fs::read(root.join("bin/busybox"))
        .map_err(|e| format!("busybox-static:arm64 has no bin/busybox: {e}"))?;
    a.file("bin/busybox", 0o755, &busybox);
    a.symlink("bin/sh", "/bin/busybox");
    for path in &order {
        let dest = format!("lib/modules/{release}/{path}");
        let body = std::fs::read(modules.join(path))
            .map_err(|e| format!("cannot read module {path}: {e}"))?;
        a.dirs_for(&dest, &mut made);
        a.file(&dest, 0o644, &body);
    }
    a.file(
        "etc/e2e/modules",
        0o644,
        (order.join("\n") + "\n").as_bytes(),
    );
    a.file("etc/e2e/modules.kvm", 0o644, b"");
    a.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    a.file("etc/group", 0o644, b"root:x:0:\n");
    let gz = a.finish_gz().map_err(|e| e.to_string())?;
    write_atomic(&dir, &aarch64::initrd(), &gz)?;
    write_atomic(&dir, &aarch64::kernel(), &image)?;
    let _ = std::fs::remove_dir_all(&root);
    std::fs::write(&stamp, format!("{fingerprint}\n")).map_err(|e| e.to_string())?;
    step(&format!(
        "arm64 guest image ready: {} ({release}), Image {:.1} MB, initramfs {:.1} MB",
        dir.display(),
        image.len() as f64 / 1e6,
        gz.len() as f64 / 1e6
    ));
    Ok(())
}

/// Writes `body` aside and renames it to `dest`, so a reader never sees half of it.
fn write_atomic(dir: &Path, dest: &Path, body: &[u8]) -> Result<()> {
    let tmp = dir.join(".tmp");
    std::fs::write(&tmp, body).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, dest).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_links_busybox_then_runs_the_shared_init() {
        let i = init();
        assert!(i.starts_with("#!/bin/sh\n/bin/busybox --install -s\n"));
        assert!(i.contains("@@E2E-INIT:"));
        assert_eq!(i.matches("#!/bin/sh").count(), 1);
    }
}
