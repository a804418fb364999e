//! The command-line flags every daemon shares, after QEMU's vhost-user "backend program
//! conventions" (`docs/interop/vhost-user.rst`): `--socket-path` or `--fd`, and
//! `--print-capabilities`.

use std::path::PathBuf;

use clap::Args;

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
}
