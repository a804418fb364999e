//! vhost-device-vsock: parse the command line (and a TOML or the peer's YAML configuration
//! file), serve each VM's device.

use std::sync::Arc;

use vhost_device_common::capabilities::Capabilities;
use vhost_device_common::{logging, run_main, serve_many, Error, SocketListener};
use vhost_device_vsock::cli::Args;
use vhost_device_vsock::config::Config;
use vhost_device_vsock::device::VsockDevice;
use vhost_device_vsock::sibling::Registry;

fn run(args: Args) -> Result<(), Error> {
    if args.common.print_capabilities {
        println!(
            "{}",
            Capabilities {
                device_type: "vsock",
                features: &[]
            }
            .to_json()
        );
        return Ok(());
    }
    logging::init();
    let common = args.common.clone();
    let config = Config::try_from(args).map_err(|e| Error::device("invalid configuration", e))?;
    let registry = Arc::new(Registry::default());
    let mut devices = Vec::new();
    for vm in config.vms {
        let listener = match &vm.socket {
            Some(path) => SocketListener::bind(path)?,
            None => SocketListener::open(&common)?,
        };
        let device =
            VsockDevice::new(vm, registry.clone()).map_err(|e| Error::device("cannot start", e))?;
        devices.push((Arc::new(device), listener));
    }
    serve_many(devices, &common.sandbox())?;
    Ok(())
}

fn main() {
    // Command line, with `--config FILE.toml` merged under it (a `--config` file of another
    // name is the peer's YAML, which the daemon reads itself).
    let args = vhost_device_common::config::parse::<Args>();
    std::process::exit(run_main("vhost-device-vsock", || run(args)));
}
