//! The workspace's test harness.
//!
//! - [`frontend`]: a vhost-user frontend written in the test, driving a daemon's queues
//!   over its real socket in memfd-backed memory.
//! - Guest launchers behind one [`Launcher`] trait: a real Linux guest under QEMU
//!   ([`qemu_or_skip`]; KVM where a real boot works, TCG otherwise) with vhost-user devices
//!   attached, running a command and returning its output and exit status; and under
//!   `vmm-frontend` ([`vmm_or_skip`]), directly on a KVM host or nested in a QEMU TCG
//!   guest whose own KVM runs the test guest.
//! - [`cpio`]: the initramfs format, shared with `cargo xtask guest`.
//!
//! A test that cannot run here (no QEMU, no guest image) prints `SKIPPED` and why, and
//! records it for `cargo xtask test`'s summary; it never passes in silence.

#![warn(missing_docs)]

pub mod aarch64;
pub mod cpio;
pub mod frontend;
pub mod guest;
pub mod nested;
pub mod paths;
pub mod process;
pub mod qemu;

pub use guest::{Device, DeviceKind, GuestRun, GuestSpec, Launcher};
pub use nested::{vmm_or_skip, Vmm};
pub use paths::bin_path;
pub use process::ChildGuard;
pub use qemu::{qemu_or_skip, Qemu};
