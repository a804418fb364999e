//! `cargo xtask guest`: the test guest, built from Debian packages into `target/guest`.
//!
//! - the kernel of the current `linux-image-cloud-amd64` (its real package is resolved with
//!   apt, never a hard-coded ABI number), downloaded with `apt-get download`;
//! - `modules.dep` computed with `depmod -b`, and the virtio modules with their dependencies;
//! - an initramfs (newc, gzip) with busybox-static, fio, socat and iperf3 with the shared
//!   libraries `ldd` lists, and an `/init` that prints a marker, loads the modules, runs
//!   `/e2e/cmd` between markers, and powers off.
//!
//! Everything is keyed by a fingerprint of its inputs: a second run with nothing changed
//! does no work.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::cpio::Archive;

use crate::util::{mkdir, output, run, step, Result};

/// Modules every guest loads, in dependency order after resolution.
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "vmw_vsock_virtio_transport",
];

/// Modules shipped but loaded only on demand (`/etc/e2e/modules.kvm`): nested KVM and taps
/// for the vmm-frontend launcher.
const KVM_MODULES: &[&str] = &["kvm_amd", "kvm_intel", "tun"];

/// Programs copied from the host with their libraries.
/// `ip` is iproute2's: busybox's has no `netns`, which nested runs need for the net daemon.
const PROGRAMS: &[&str] = &["fio", "socat", "iperf3", "ip"];

/// Bump to force a rebuild when the image layout changes.
const FORMAT: u32 = 3;

/// The guest's `/init`.
pub const INIT: &str = r#"#!/bin/sh
# e2e guest init: marker, mounts, modules, the test command between markers, power off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
TAG=g
mount -t proc proc /proc
read -r CMDLINE < /proc/cmdline
for w in $CMDLINE; do case "$w" in e2e.tag=*) TAG="${w#e2e.tag=}";; esac; done
echo "@@E2E-INIT:$TAG@@"
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
hostname guest-$TAG
KVER=$(uname -r)
for m in $(cat /etc/e2e/modules); do
  insmod /lib/modules/$KVER/$m || echo "e2e: cannot load $m"
done
ip link set lo up
mdev -s 2>/dev/null
if [ -x /e2e/cmd ]; then
  dmesg -n 1
  echo "@@E2E-BEGIN:$TAG@@"
  /e2e/cmd </dev/null 2>&1
  rc=$?
  echo "@@E2E-END:$TAG rc=$rc@@"
else
  echo "@@E2E-NOCMD:$TAG@@"
fi
sync
poweroff -f
"#;

fn guest_dir() -> PathBuf {
    e2e::paths::guest_dir()
}

/// Resolves the real kernel package behind `meta` (`linux-image-cloud-amd64`, or
/// `linux-image-cloud-arm64:arm64`) and its version.
pub(crate) fn kernel_package(meta: &str) -> Result<(String, String)> {
    let resolve = || -> Result<(String, String)> {
        let deps = output(Command::new("apt-cache").args(["depends", meta]))?;
        let pkg = deps
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends:"))
            .map(str::trim)
            .find(|p| p.starts_with("linux-image-"))
            .ok_or_else(|| format!("apt-cache shows no kernel package behind {meta}"))?
            .to_string();
        let policy = output(Command::new("apt-cache").args(["policy", &pkg]))?;
        let version = policy
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Candidate:"))
            .map(str::trim)
            .next()
            .filter(|v| *v != "(none)")
            .ok_or_else(|| format!("apt has no candidate version of {pkg}"))?
            .to_string();
        Ok((pkg, version))
    };
    resolve().or_else(|_| {
        step("package lists lack the kernel; running apt-get update");
        run(Command::new("apt-get").args(["update", "-q"]))?;
        resolve()
    })
}

/// The kernel release inside the package name: `linux-image-6.1.0-48-cloud-amd64` →
/// `6.1.0-48-cloud-amd64`.
pub(crate) fn kernel_release(pkg: &str) -> String {
    let pkg = pkg.split(':').next().unwrap_or(pkg);
    pkg.trim_start_matches("linux-image-").to_string()
}

/// A file's identity for the fingerprint.
fn file_id(path: &Path) -> String {
    std::fs::metadata(path).map_or_else(
        |_| format!("{}:missing", path.display()),
        |m| {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            format!("{}:{}:{mtime}", path.display(), m.len())
        },
    )
}

/// The shared libraries (and the dynamic loader) `ldd` lists for `program`.
fn libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let text = output(Command::new("ldd").arg(program))?;
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let path = if let Some((_, rest)) = line.split_once("=>") {
            rest.split_whitespace().next().unwrap_or("")
        } else {
            line.split_whitespace().next().unwrap_or("")
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// Parses `modules.dep` into name → (path, dependency paths).
pub(crate) fn parse_modules_dep(text: &str) -> HashMap<String, (String, Vec<String>)> {
    let mut map = HashMap::new();
    for line in text.lines() {
        let Some((path, deps)) = line.split_once(':') else {
            continue;
        };
        let name = Path::new(path)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .trim_end_matches(".xz")
            .trim_end_matches(".zst")
            .trim_end_matches(".ko")
            .replace('-', "_");
        let deps = deps.split_whitespace().map(str::to_string).collect();
        map.insert(name, (path.to_string(), deps));
    }
    map
}

/// The module paths to load for `wanted`, dependencies first, each once.
pub(crate) fn module_load_order(
    dep: &HashMap<String, (String, Vec<String>)>,
    wanted: &[&str],
    done: &mut BTreeSet<String>,
) -> Result<Vec<String>> {
    let by_path: HashMap<&str, &Vec<String>> = dep.values().map(|(p, d)| (p.as_str(), d)).collect();
    fn visit(
        path: &str,
        by_path: &HashMap<&str, &Vec<String>>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<String>,
        depth: usize,
    ) {
        if depth > 64 || done.contains(path) {
            return;
        }
        if let Some(deps) = by_path.get(path) {
            // modules.dep lists the full transitive closure, nearest first: load from the end.
            for d in deps.iter().rev() {
                visit(d, by_path, done, order, depth + 1);
            }
        }
        if done.insert(path.to_string()) {
            order.push(path.to_string());
        }
    }
    let mut order = Vec::new();
    for name in wanted {
        let (path, _) = dep
            .get(*name)
            .ok_or_else(|| format!("the guest kernel has no module {name} (is it built in?)"))?;
        visit(path, &by_path, done, &mut order, 0);
    }
    Ok(order)
}

/// `pkg` (which may carry an `:arch` suffix) at `version` in `debs`, downloaded with
/// `apt-get download` unless it is there already.
pub(crate) fn download_deb(debs: &Path, pkg: &str, version: &str, arch: &str) -> Result<PathBuf> {
    let name = pkg.split(':').next().unwrap_or(pkg);
    let deb = debs.join(format!("{name}_{}_{arch}.deb", version.replace(':', "%3a")));
    if deb.exists() {
        return Ok(deb);
    }
    step(&format!("downloading {pkg} {version}"));
    run(Command::new("apt-get").current_dir(debs).args([
        "download",
        "-q",
        &format!("{pkg}={version}"),
    ]))?;
    if !deb.exists() {
        // apt names the file itself; take the package's .deb.
        let found = std::fs::read_dir(debs)
            .map_err(|e| e.to_string())?
            .filter_map(std::result::Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with(&format!("{name}_")) && n.ends_with(&format!("_{arch}.deb"))
                })
            })
            .ok_or_else(|| {
                format!(
                    "apt-get download left no {pkg} package in {}",
                    debs.display()
                )
            })?;
        std::fs::rename(found, &deb).map_err(|e| e.to_string())?;
    }
    Ok(deb)
}

/// Builds the guest image if its inputs changed.
pub fn build() -> Result<()> {
    let dir = guest_dir();
    mkdir(&dir)?;
    let (pkg, version) = kernel_package("linux-image-cloud-amd64")?;
    let release = kernel_release(&pkg);
    let programs: Vec<PathBuf> = PROGRAMS
        .iter()
        .map(|p| {
            crate::util::which(p).ok_or_else(|| {
                format!("{p} is not installed on the host (run `cargo xtask test` as root, or apt-get install {p})")
            })
        })
        .collect::<Result<_>>()?;
    let busybox = PathBuf::from("/bin/busybox");
    if !busybox.exists() {
        return Err("busybox-static is not installed (apt-get install busybox-static)".into());
    }

    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (FORMAT, &pkg, &version, INIT, MODULES, KVM_MODULES).hash(&mut hasher);
    for p in programs.iter().chain(std::iter::once(&busybox)) {
        file_id(p).hash(&mut hasher);
    }
    let fingerprint = format!("{pkg} {version} {:016x}", hasher.finish());
    let stamp = dir.join("stamp");
    let outputs_exist = e2e::paths::kernel().exists()
        && e2e::paths::initrd().exists()
        && e2e::paths::modules_dir().join("modules.dep").exists();
    if outputs_exist && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == fingerprint) {
        step(&format!("guest image is up to date ({pkg} {version})"));
        return Ok(());
    }

    // The kernel package.
    let debs = dir.join("debs");
    mkdir(&debs)?;
    let deb = download_deb(&debs, &pkg, &version, "amd64")?;
    step(&format!("unpacking {}", deb.display()));
    let root = dir.join("kernel");
    let _ = std::fs::remove_dir_all(&root);
    mkdir(&root)?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    run(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
    let modules_src = root.join("lib/modules").join(&release);
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    std::fs::rename(&vmlinuz, e2e::paths::kernel())
        .map_err(|e| format!("cannot move {}: {e}", vmlinuz.display()))?;
    let modules_dir = e2e::paths::modules_dir();
    let _ = std::fs::remove_dir_all(&modules_dir);
    std::fs::rename(&modules_src, &modules_dir).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&root);

    // Module load order from modules.dep.
    let dep_text = std::fs::read_to_string(modules_dir.join("modules.dep"))
        .map_err(|e| format!("cannot read modules.dep: {e}"))?;
    let dep = parse_modules_dep(&dep_text);
    let mut loaded = BTreeSet::new();
    let always = module_load_order(&dep, MODULES, &mut loaded)?;
    let kvm = module_load_order(&dep, KVM_MODULES, &mut loaded.clone())?;
    // kvm_intel and kvm_amd are alternatives: the nested launcher loads what the CPU has;
    // listing both is harmless since insmod of the wrong one fails and is ignored.

    step("building the initramfs");
    let mut a = Archive::new();
    let mut made = BTreeSet::new();
    for d in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "lib", "lib64", "proc", "sys", "dev", "tmp",
        "run", "etc", "etc/e2e", "root", "mnt", "var", "e2e",
    ] {
        made.insert(d.to_string());
        a.dir(d);
    }
    a.file("init", 0o755, INIT.as_bytes());
    a.file(
        "bin/busybox",
        0o755,
        &std::fs::read(&busybox).map_err(|e| e.to_string())?,
    );
    let applets = output(Command::new(&busybox).arg("--list-full"))?;
    for applet in applets.lines().map(str::trim).filter(|l| !l.is_empty()) {
        // The real programs replace busybox's applets of the same name (its `ip` lacks
        // `netns`), wherever on PATH the applet would sit.
        let base = applet.rsplit('/').next().unwrap_or(applet);
        if applet == "bin/busybox" || PROGRAMS.contains(&base) {
            continue;
        }
        a.dirs_for(applet, &mut made);
        a.symlink(applet, "/bin/busybox");
    }
    let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
    for program in &programs {
        // At the host's path: busybox's shell runs its own applets before PATH, so guest
        // scripts call these by full path, the same on the host and in the guest.
        files.insert(
            program
                .display()
                .to_string()
                .trim_start_matches('/')
                .to_string(),
            program.clone(),
        );
        for lib in libraries(program)? {
            files.insert(
                lib.display()
                    .to_string()
                    .trim_start_matches('/')
                    .to_string(),
                lib,
            );
        }
    }
    for (dest, src) in &files {
        let body = std::fs::read(src).map_err(|e| format!("cannot read {}: {e}", src.display()))?;
        a.dirs_for(dest, &mut made);
        a.file(dest, 0o755, &body);
    }
    for path in always.iter().chain(kvm.iter()) {
        let dest = format!("lib/modules/{release}/{path}");
        let body = std::fs::read(modules_dir.join(path))
            .map_err(|e| format!("cannot read module {path}: {e}"))?;
        a.dirs_for(&dest, &mut made);
        a.file(&dest, 0o644, &body);
    }
    a.file(
        "etc/e2e/modules",
        0o644,
        (always.join("\n") + "\n").as_bytes(),
    );
    a.file(
        "etc/e2e/modules.kvm",
        0o644,
        (kvm.join("\n") + "\n").as_bytes(),
    );
    a.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    a.file("etc/group", 0o644, b"root:x:0:\n");
    a.file("etc/hosts", 0o644, b"127.0.0.1 localhost\n");
    let gz = a.finish_gz().map_err(|e| e.to_string())?;
    // Written aside and renamed, so a test reading the image never sees half of it.
    let tmp = dir.join("initrd.gz.tmp");
    std::fs::write(&tmp, &gz).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, e2e::paths::initrd()).map_err(|e| e.to_string())?;
    std::fs::write(&stamp, format!("{fingerprint}\n")).map_err(|e| e.to_string())?;
    step(&format!(
        "guest image ready: {} ({release}), initramfs {:.1} MB, modules: {}",
        dir.display(),
        gz.len() as f64 / 1e6,
        always.len() + kvm.len()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_load_dependencies_first_and_once() {
        let dep = parse_modules_dep(
            "kernel/a/virtio_blk.ko: kernel/a/virtio_ring.ko kernel/a/virtio.ko\n\
             kernel/a/virtio_ring.ko: kernel/a/virtio.ko\n\
             kernel/a/virtio.ko:\n\
             kernel/a/virtio_net.ko: kernel/a/net_failover.ko kernel/a/virtio_ring.ko kernel/a/virtio.ko\n\
             kernel/a/net_failover.ko:\n",
        );
        let order =
            module_load_order(&dep, &["virtio_blk", "virtio_net"], &mut BTreeSet::new()).unwrap();
        assert_eq!(
            order,
            [
                "kernel/a/virtio.ko",
                "kernel/a/virtio_ring.ko",
                "kernel/a/virtio_blk.ko",
                "kernel/a/net_failover.ko",
                "kernel/a/virtio_net.ko"
            ]
        );
        assert!(module_load_order(&dep, &["nope"], &mut BTreeSet::new()).is_err());
    }

    #[test]
    fn release_comes_from_the_package_name() {
        assert_eq!(
            kernel_release("linux-image-6.1.0-48-cloud-amd64"),
            "6.1.0-48-cloud-amd64"
        );
    }
}
