//! The vsock daemon's system calls beyond the shared list
//! ([`vhost_device_common::sandbox::common_syscalls`]), found by running its tests with
//! `--seccomp log`: a guest's connection to host port N connects a new Unix socket to
//! `UDS_PATH_N` (with a send timeout); the `uds-path` listener itself is bound before the
//! filter. Each frontend connection's backend makes a timerfd (the held-back TX interrupt,
//! see `backend`).

use vhost_device_common::Syscalls;

/// What the vsock daemon calls while serving.
pub fn syscalls() -> Syscalls {
    Syscalls::new()
        .allow(&[
            libc::SYS_connect,
            libc::SYS_timerfd_create,
            libc::SYS_timerfd_settime,
        ])
        .allow_arg(
            libc::SYS_setsockopt,
            2,
            &[libc::SO_SNDTIMEO as u64, libc::SO_RCVTIMEO as u64],
        )
}
