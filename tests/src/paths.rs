//! Where the harness finds the guest image and the workspace's binaries.

use std::path::{Path, PathBuf};

/// The workspace root (the folder holding the top `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The guest image cache that `cargo xtask guest` fills: always `<workspace>/target/guest`,
/// whatever `CARGO_TARGET_DIR` says, so every build shares one image.
pub fn guest_dir() -> PathBuf {
    workspace_root().join("target").join("guest")
}

/// The guest kernel.
pub fn kernel() -> PathBuf {
    guest_dir().join("vmlinuz")
}

/// The base initramfs (busybox, modules, fio, socat, iperf3, `/init`).
pub fn initrd() -> PathBuf {
    guest_dir().join("initrd.gz")
}

/// The kernel's module tree, for modules a launcher adds (kvm for nesting).
pub fn modules_dir() -> PathBuf {
    guest_dir().join("modules")
}

/// A file listing the tests that were skipped, and why; `cargo xtask test` prints it.
pub fn skip_log() -> PathBuf {
    workspace_root().join("target").join("e2e-skipped.log")
}

/// The directory of this build's binaries (`target/<profile>`), found from the running test
/// executable (`target/<profile>/deps/<test>`), so it follows `CARGO_TARGET_DIR`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// A workspace binary of this build, e.g. `vhost-device-blk`.
///
/// # Panics
/// When it is not built: `cargo test --workspace` builds every binary first; a lone
/// `cargo test -p e2e` does not, and the message says so.
pub fn bin_path(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace` (or `cargo xtask test`) first",
        path.display()
    );
    path
}
