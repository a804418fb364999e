//! The command line, and running the daemon from it.

use std::sync::Arc;

use clap::Parser;
use vhost_device_common::capabilities::Capabilities;
use vhost_device_common::cli::CommonArgs;
use vhost_device_common::{serve, Error, SocketListener};

use crate::config::DEFAULT_QUEUE_SIZE;
use crate::{Config, NetDevice, RawConfig};

/// vhost-user virtio-net device daemon backed by a tap device.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    after_help = "Example: vhost-device-net --socket-path /run/vhost-net0.sock --tap tap0 --queue-pairs 2\n\
                  then: qemu-system-x86_64 ... -chardev socket,id=c,path=/run/vhost-net0.sock \\\n\
                  -netdev vhost-user,id=n,chardev=c,queues=2 -device virtio-net-pci,netdev=n,mq=on"
)]
pub struct Args {
    /// The flags every daemon shares (socket, --fd, --print-capabilities).
    #[command(flatten)]
    pub common: CommonArgs,

    /// Tap device to attach; created (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, multi_queue for
    /// several pairs) if it does not exist, which needs CAP_NET_ADMIN.
    #[arg(long, value_name = "NAME")]
    pub tap: Option<String>,

    /// An already opened tap queue passed by the caller, once per queue pair.
    #[arg(long, value_name = "FD")]
    pub tap_fd: Vec<i32>,

    /// The guest's MAC address (default: a random locally administered one).
    #[arg(long, value_name = "MAC")]
    pub mac: Option<String>,

    /// Number of RX/TX queue pairs (one worker thread and one tap queue each).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub queue_pairs: u32,

    /// Largest queue size the frontend may set (a power of two).
    #[arg(long, value_name = "N", default_value_t = u32::from(DEFAULT_QUEUE_SIZE))]
    pub queue_size: u32,

    /// MTU offered to the guest (VIRTIO_NET_F_MTU) and set on the tap.
    #[arg(long, value_name = "N")]
    pub mtu: Option<u32>,

    /// IPv4 address and prefix for the host side of the tap, which is then brought up.
    #[arg(long, value_name = "ADDR/PREFIX")]
    pub ip: Option<String>,
}

/// Runs the daemon as `args` say, until SIGTERM.
pub fn run(args: Args) -> Result<(), Error> {
    if args.common.print_capabilities {
        println!(
            "{}",
            Capabilities {
                device_type: "net",
                features: &[]
            }
            .to_json()
        );
        return Ok(());
    }
    vhost_device_common::logging::init();
    let config = Config::try_from(RawConfig {
        tap: args.tap,
        tap_fds: args.tap_fd,
        mac: args.mac,
        queue_pairs: args.queue_pairs,
        queue_size: args.queue_size,
        mtu: args.mtu,
        ip: args.ip,
    })
    .map_err(|e| Error::usage(e.to_string()))?;
    // The tap first: a tap error leaves no socket file behind, and a socket error closes
    // the tap again (a tap the daemon created disappears with it).
    let device = NetDevice::new(config).map_err(|e| Error::device("cannot set up the tap", e))?;
    let listener = SocketListener::open(&args.common)?;
    serve(Arc::new(device), listener, &args.common.sandbox())?;
    Ok(())
}
