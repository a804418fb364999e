//! The block daemon's system calls beyond the shared list
//! ([`vhost_device_common::sandbox::common_syscalls`]), found by running its tests with
//! `--seccomp log`: the io_uring engine; reads, writes, FLUSH, discard and write-zeroes of
//! the sync engine; the image size read again on `SIGHUP` (`lseek` for a block device); the
//! in-flight tracking area made for a frontend that asks for one.

use vhost_device_common::Syscalls;

/// What the block daemon calls while serving.
pub fn syscalls() -> Syscalls {
    Syscalls::new().allow(&[
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_fdatasync,
        libc::SYS_fallocate,
        libc::SYS_preadv,
        libc::SYS_preadv2,
        libc::SYS_pwritev,
        libc::SYS_pwritev2,
        libc::SYS_pwrite64,
        libc::SYS_lseek,
        // VHOST_USER_GET_INFLIGHT_FD: the in-flight area is a new memfd of the size asked.
        libc::SYS_memfd_create,
        libc::SYS_ftruncate,
    ])
}
