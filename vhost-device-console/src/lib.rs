//! vhost-device-console: a virtio-console device served over vhost-user, bridging each
//! guest port to a host endpoint (stdio, a pty, TCP or a Unix socket).
//!
//! - [`virtio`]: feature bits, config space, queue layout.
//! - [`control`]: MULTIPORT control messages.
//! - [`history`]: the output history replayed to late clients.
//! - [`port`]: a port's host-side buffers shared by the worker and the endpoint thread.
//! - [`endpoint`]: the endpoint threads (stdio, pty, TCP, Unix).
//! - [`terminal`]: raw mode, window sizes, ptys.
//! - [`backend`]: the `VhostUserBackend` serving the queues.
//! - [`device`]: the device `vhost_device_common::serve` runs.
//! - [`config`] and [`cli`]: configuration and the command line.

#![warn(missing_docs)]

pub mod backend;
pub mod cli;
pub mod config;
pub mod control;
pub mod device;
pub mod endpoint;
pub mod history;
pub mod port;
pub mod seccomp;
pub mod terminal;
pub mod virtio;

use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};
use vhost_device_common::capabilities::Capabilities;
use vhost_device_common::{serve, Device as _, Error, SocketListener};

pub use config::Config;

/// Runs the daemon for the parsed command line until `SIGTERM`/`SIGINT`.
pub fn run(args: cli::Args) -> Result<(), Error> {
    if args.common.print_capabilities {
        let caps = Capabilities {
            device_type: "console",
            features: &[],
        };
        // The one place the daemon writes to stdout on purpose, as QEMU's convention asks.
        println!("{}", caps.to_json());
        return Ok(());
    }
    vhost_device_common::logging::init();
    // Block the signals the daemon handles synchronously before any thread starts, so no
    // endpoint thread gets SIGTERM (which would end the process without restoring the
    // terminal) and SIGWINCH stays pending for the stdio port's signalfd.
    let mut set = SigSet::empty();
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGWINCH,
    ] {
        set.add(sig);
    }
    set.thread_block()
        .map_err(|e| Error::device("cannot block signals", std::io::Error::from(e)))?;

    let common = args.common.clone();
    let config = Config::try_from(args).map_err(|e| Error::usage(e.to_string()))?;
    let device = device::ConsoleDevice::start(&config)
        .map_err(|e| Error::usage(vhost_device_common::error_chain(&e)))?;
    let listener = match SocketListener::open(&common) {
        Ok(listener) => listener,
        Err(e) => {
            // Leave nothing behind: the terminal as it was, no socket files.
            device.shutdown();
            return Err(e.into());
        }
    };
    let device = Arc::new(device);
    let result = serve(device.clone(), listener, &common.sandbox());
    terminal::restore_all();
    result.map_err(Error::from)
}
