//! The daemon: one open image, a fresh [`BlkBackend`] per frontend connection, served by
//! vhost-device-common's accept loop.
//!
//! The image outlives connections (it is opened once), so a frontend that reconnects sees
//! the same disk. `SIGHUP` re-reads the image size and, if it changed, tells the connected
//! frontend through the backend request channel; `SIGTERM` makes every completed write
//! durable before the process exits.

use std::sync::{Arc, Mutex};

use log::{info, warn};
use vhost_device_common::capabilities::{device_type, Capabilities};
use vhost_device_common::{serve, Device, SocketListener};
use vhost_user_backend::VringEpollHandler;
use vmm_sys_util::epoll::EventSet;

use crate::backend::BlkBackend;
use crate::cli::Args;
use crate::config::Config;
use crate::disk::Disk;

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command line does not make a configuration.
    #[error(transparent)]
    Cli(#[from] crate::cli::Error),
    /// The image cannot be served.
    #[error(transparent)]
    Disk(#[from] crate::disk::Error),
    /// No backend could be made for the first connection.
    #[error(transparent)]
    Backend(#[from] crate::backend::Error),
    /// The shared plumbing failed (listening socket, signals, serving).
    #[error(transparent)]
    Common(#[from] vhost_device_common::Error),
}

/// The block device: what outlives a connection.
#[derive(Debug)]
pub struct BlkDevice {
    config: Config,
    disk: Arc<Disk>,
    current: Mutex<Option<BlkBackend>>,
}

impl BlkDevice {
    /// Opens the image `config` names.
    pub fn new(config: Config) -> Result<Self, Error> {
        let disk = Arc::new(Disk::open(&config)?);
        Ok(BlkDevice {
            config,
            disk,
            current: Mutex::new(None),
        })
    }

    /// The open image.
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }
}

impl Device for BlkDevice {
    fn syscalls(&self) -> vhost_device_common::Syscalls {
        crate::seccomp::syscalls()
    }

    type Backend = BlkBackend;

    fn name(&self) -> &str {
        "vhost-device-blk"
    }

    fn backend(&self) -> Result<BlkBackend, Box<dyn std::error::Error + Send + Sync>> {
        let backend = BlkBackend::new(self.disk.clone(), &self.config)?;
        if let Ok(mut current) = self.current.lock() {
            *current = Some(backend.clone());
        }
        Ok(backend)
    }

    fn attach(
        &self,
        backend: &BlkBackend,
        handlers: &[Arc<VringEpollHandler<BlkBackend>>],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        // Each worker's io_uring completions and in-flight recovery wake that worker's epoll.
        for (thread, fd, event) in backend.worker_fds() {
            let handler = handlers
                .get(thread)
                .ok_or_else(|| format!("no worker thread {thread} for its eventfd"))?;
            handler
                .register_listener(fd, EventSet::IN, event)
                .map_err(|e| format!("cannot watch an eventfd of worker {thread}: {e}"))?;
        }
        Ok(())
    }

    fn disconnected(&self, backend: &BlkBackend) {
        info!("requests per queue: {:?}", backend.requests_per_queue());
        if let Ok(mut current) = self.current.lock() {
            if current.as_ref().is_some_and(|c| c.is_same(backend)) {
                *current = None;
            }
        }
    }

    fn reload(&self) {
        match self.disk.refresh_capacity() {
            Some(bytes) => {
                let backend = self.current.lock().ok().and_then(|c| c.clone());
                match backend {
                    Some(b) if b.notify_config_change() => {
                        info!("told the frontend the disk is now {bytes} bytes");
                    }
                    Some(_) => {}
                    None => info!("disk is now {bytes} bytes; no frontend connected"),
                }
            }
            None => info!(
                "SIGHUP: image size unchanged ({} bytes)",
                self.disk.capacity()
            ),
        }
    }

    fn shutdown(&self) {
        if let Err(e) = self.disk.sync() {
            warn!("cannot sync {} at exit: {e}", self.disk.path().display());
        }
    }
}

/// The daemon's body: parse, open, listen, serve until SIGTERM.
pub fn run(args: Args) -> Result<(), Error> {
    if args.common.print_capabilities {
        Capabilities {
            device_type: device_type::BLOCK,
            features: vhost_device_common::capabilities::qemu_features(device_type::BLOCK),
        }
        .print();
        return Ok(());
    }
    vhost_device_common::logging::init();
    let listener_args = args.common.clone();
    let config = Config::try_from(args)?;
    let device = BlkDevice::new(config)?;
    // Make the first backend now, so an engine that cannot start is reported at once.
    let probe = BlkBackend::new(device.disk.clone(), &device.config)?;
    info!(
        "serving {} ({} bytes, {}{} engine, {} queue(s))",
        device.disk.path().display(),
        device.disk.capacity(),
        if device.config.read_only {
            "read-only, "
        } else {
            ""
        },
        probe.engine_name(),
        device.config.num_queues
    );
    drop(probe);
    let listener =
        SocketListener::open(&listener_args).map_err(vhost_device_common::Error::from)?;
    serve(Arc::new(device), listener, &listener_args.sandbox())
        .map_err(vhost_device_common::Error::from)?;
    Ok(())
}
