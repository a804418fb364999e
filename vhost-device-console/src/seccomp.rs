//! The console daemon's system calls beyond the shared list
//! ([`vhost_device_common::sandbox::common_syscalls`]), found by running its tests with
//! `--seccomp log`: terminal modes and window sizes of the stdio and pty endpoints, and the
//! log file reopened on `SIGHUP` (append-only: the flags `File::options().append(true)
//! .create(true)` passes, so nothing can be opened for reading). The tcp and unix endpoints
//! only accept on listeners bound before the filter.

use vhost_device_common::Syscalls;

/// `openat` flags of the log file (see the module doc).
const LOG_OPEN_FLAGS: libc::c_int =
    libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_CLOEXEC;

/// What the console daemon calls while serving.
pub fn syscalls() -> Syscalls {
    Syscalls::new()
        .allow_ioctl(&[
            libc::TCGETS,
            libc::TCSETS,
            libc::TCSETSW,
            libc::TCSETSF,
            libc::TIOCGWINSZ,
            libc::TIOCSWINSZ,
        ])
        .allow_arg(libc::SYS_openat, 2, &[LOG_OPEN_FLAGS as u64])
        // An endpoint that cannot accept or poll waits a little rather than spin.
        .allow(&[libc::SYS_clock_nanosleep])
}
