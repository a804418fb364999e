//! The command-line flags every daemon shares, after QEMU's vhost-user "backend program
//! conventions" (`docs/interop/vhost-user.rst`): `--socket-path` or `--fd`, and
//! `--print-capabilities`; and how the daemon confines itself, `--seccomp` and `--user`.

use std::path::PathBuf;

use clap::Args;

use crate::sandbox::{Sandbox, SeccompMode};

/// Flags common to all daemons; flatten into the daemon's own `clap::Parser`.
#[derive(Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct CommonArgs {
    /// Unix socket to listen on for the vhost-user frontend (QEMU, Cloud Hypervisor,
    /// vmm-frontend). Not needed when systemd passes the socket (socket activation).
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,

    /// Serve on an inherited, already listening Unix socket with this file descriptor
    /// number (as libvirt does) instead of binding a path.
    #[arg(long, value_name = "FD")]
    pub fd: Option<i32>,

    /// Print the device's capabilities as JSON (QEMU's vhost-user.json convention) and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// What a system call off the daemon's seccomp allow-list does once it serves: `kill`
    /// the process, `trap` (print the call's number, then die), `log` it to the kernel log
    /// and allow it, or `none` (no filter). See docs/security.md.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = SeccompMode::Kill)]
    pub seccomp: SeccompMode,

    /// Switch to this user (and its group, or GROUP) once the socket and files are open.
    #[arg(long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,
}

impl CommonArgs {
    /// How the daemon confines itself (`--seccomp`, `--user`), for [`crate::serve()`].
    pub fn sandbox(&self) -> Sandbox {
        Sandbox {
            seccomp: self.seccomp,
            user: self.user.clone(),
        }
    }
}
