//! The net daemon's system calls beyond the shared list
//! ([`vhost_device_common::sandbox::common_syscalls`]), found by running its tests with
//! `--seccomp log`: the tap ioctls that follow what the guest acked, and nothing that makes a
//! new tap or configures an interface (those happen before the filter).

use vhost_device_common::Syscalls;

/// What the net daemon calls while serving.
pub fn syscalls() -> Syscalls {
    Syscalls::new().allow_ioctl(&[
        libc::TUNSETOFFLOAD,
        libc::TUNSETVNETHDRSZ,
        libc::TUNSETQUEUE,
    ])
}
