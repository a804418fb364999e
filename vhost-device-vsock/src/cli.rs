//! The command line, a superset of rust-vmm vhost-device-vsock's.

use std::path::PathBuf;

use clap::Parser;
use vhost_device_common::cli::CommonArgs;

use crate::config::{self, Config, VmParams};

/// vhost-user virtio-vsock device: connects guest sockets to host Unix sockets
/// (hybrid vsock, the Firecracker convention). A host program connects to the uds path and
/// writes `CONNECT <port>\n`; a guest connecting to host port P reaches `<uds-path>_P`.
#[derive(Parser, Debug)]
#[command(name = "vhost-device-vsock", version)]
pub struct Args {
    /// Listening socket and capabilities.
    /// The flags every daemon shares (socket, --fd, --print-capabilities).
    #[command(flatten)]
    pub common: CommonArgs,

    /// The vhost-user socket (the peer's name for --socket-path).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["socket_path", "fd", "vm", "config"])]
    pub socket: Option<PathBuf>,

    /// Context identifier of the guest [default: 3].
    #[arg(long, value_name = "CID", conflicts_with_all = ["vm", "config"])]
    pub guest_cid: Option<u64>,

    /// Unix socket host programs connect to; guest connections to port P go to `<PATH>_P`.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["vm", "config"])]
    pub uds_path: Option<PathBuf>,

    /// Receive buffer per connection advertised to the guest, in bytes [default: 262144].
    #[arg(long, value_name = "BYTES", conflicts_with_all = ["vm", "config"])]
    pub tx_buffer_size: Option<u32>,

    /// Largest virtqueue size accepted [default: 1024].
    #[arg(long, value_name = "N", conflicts_with_all = ["vm", "config"])]
    pub queue_size: Option<usize>,

    /// Sibling groups, `+`-separated: VMs sharing a group reach each other by CID
    /// [default: default].
    #[arg(long, value_name = "NAME+NAME", conflicts_with_all = ["vm", "config"])]
    pub groups: Option<String>,

    /// One VM's device as comma-separated key=value pairs; repeat for more VMs, all served
    /// by this process. Keys: guest-cid, socket, uds-path, tx-buffer-size, queue-size,
    /// groups. Example:
    /// --vm guest-cid=3,socket=/tmp/vhost3.socket,uds-path=/tmp/vm3.vsock,groups=g1+g2
    #[arg(long, value_name = "KEY=VALUE,...", conflicts_with_all = ["config", "socket_path", "fd"])]
    pub vm: Vec<String>,

    /// Read the VMs from a YAML file (the peer's format: a `vms:` list of entries with
    /// guest_cid, socket, uds_path, tx_buffer_size, queue_size, groups).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["socket_path", "fd"])]
    pub config: Option<PathBuf>,
}

impl TryFrom<Args> for Config {
    type Error = config::Error;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        if let Some(file) = &args.config {
            return Config::from_yaml_file(file);
        }
        if !args.vm.is_empty() {
            let vms = args
                .vm
                .iter()
                .map(|v| VmParams::from_vm_arg(v).and_then(|p| p.finish(true)))
                .collect::<Result<Vec<_>, _>>()?;
            return Config::new(vms);
        }
        let params = VmParams {
            guest_cid: args.guest_cid,
            socket: args.socket.or(args.common.socket_path),
            uds_path: args.uds_path,
            tx_buffer_size: args.tx_buffer_size,
            queue_size: args.queue_size,
            groups: args.groups,
            forward_cid: None,
            forward_listen: None,
        };
        Config::new(vec![params.finish(false)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let args =
            Args::try_parse_from(std::iter::once("vhost-device-vsock").chain(args.iter().copied()))
                .map_err(|e| e.to_string())?;
        Config::try_from(args).map_err(|e| e.to_string())
    }

    #[test]
    fn single_vm_form_with_either_socket_spelling() {
        for flag in ["--socket", "--socket-path"] {
            let c = parse(&[
                "--guest-cid",
                "5",
                flag,
                "/tmp/v.sock",
                "--uds-path",
                "/tmp/u",
            ])
            .expect("valid");
            assert_eq!(c.vms.len(), 1);
            assert_eq!(c.vms[0].guest_cid, 5);
            assert_eq!(c.vms[0].socket, Some(PathBuf::from("/tmp/v.sock")));
        }
    }

    #[test]
    fn repeated_vm_flags_give_several_devices() {
        let c = parse(&[
            "--vm",
            "guest-cid=3,socket=/a,uds-path=/b",
            "--vm",
            "guest_cid=4,socket=/c,uds_path=/d,groups=x",
        ])
        .expect("valid");
        assert_eq!(c.vms.len(), 2);
        assert_eq!(c.vms[1].groups, vec!["x".to_string()]);
    }

    #[test]
    fn mixing_forms_is_refused() {
        assert!(parse(&["--vm", "socket=/a,uds-path=/b", "--guest-cid", "4"]).is_err());
        assert!(parse(&["--config", "/x.yaml", "--uds-path", "/b"]).is_err());
        let e =
            parse(&["--guest-cid", "2", "--socket", "/a", "--uds-path", "/b"]).expect_err("cid 2");
        assert!(e.contains("reserved"), "{e}");
    }
}
