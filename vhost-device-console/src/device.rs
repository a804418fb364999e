//! The console device as `vhost_device_common::serve` runs it: the ports and their endpoint
//! threads live as long as the daemon, and every frontend connection gets a fresh
//! [`ConsoleBackend`] over the same ports.

use std::sync::Arc;

use log::info;
use vhost_user_backend::VringEpollHandler;
use vmm_sys_util::epoll::EventSet;

use vhost_device_common::Device;

use crate::backend::ConsoleBackend;
use crate::config::{Config, Endpoint};
use crate::endpoint;
use crate::port::{LogFile, Port};
use crate::terminal;

/// Why the device could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The log file cannot be opened for appending.
    #[error("cannot open log file {path}")]
    LogFile {
        /// The path.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An eventfd could not be made.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A port's endpoint could not be set up.
    #[error(transparent)]
    Endpoint(#[from] endpoint::Error),
}

/// The console device: its ports and where they are served.
#[derive(Debug)]
pub struct ConsoleDevice {
    ports: Vec<Arc<Port>>,
    log: Option<Arc<LogFile>>,
}

impl ConsoleDevice {
    /// Opens every port's endpoint (binds listeners, opens ptys, makes stdin raw) and
    /// starts their threads. Each port's "where to connect" line is logged.
    pub fn start(config: &Config) -> Result<Self, Error> {
        let log = match &config.log_file {
            Some(path) => Some(Arc::new(LogFile::open(path).map_err(|source| {
                Error::LogFile {
                    path: path.clone(),
                    source,
                }
            })?)),
            None => None,
        };
        let mut ports = Vec::with_capacity(config.ports.len());
        for (id, pc) in (0u32..).zip(&config.ports) {
            let port = Port::new(
                id,
                pc.name.clone(),
                pc.endpoint.clone(),
                config.history,
                log.clone(),
            )
            .map_err(Error::EventFd)?;
            ports.push(Arc::new(port));
        }
        let device = ConsoleDevice { ports, log };
        for port in &device.ports {
            let line = endpoint::start(port.clone())?;
            info!("{line}");
        }
        Ok(device)
    }

    /// The ports.
    pub fn ports(&self) -> &[Arc<Port>] {
        &self.ports
    }
}

impl Device for ConsoleDevice {
    fn syscalls(&self) -> vhost_device_common::Syscalls {
        crate::seccomp::syscalls()
    }

    type Backend = ConsoleBackend;

    fn name(&self) -> &str {
        "vhost-device-console"
    }

    fn backend(&self) -> Result<Self::Backend, Box<dyn std::error::Error + Send + Sync>> {
        Ok(ConsoleBackend::new(self.ports.clone()))
    }

    fn attach(
        &self,
        backend: &Self::Backend,
        handlers: &[Arc<VringEpollHandler<Self::Backend>>],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let handler = handlers
            .first()
            .ok_or("vhost-user-backend started no worker thread")?;
        for (index, port) in backend.ports().iter().enumerate() {
            handler.register_listener(
                std::os::fd::AsRawFd::as_raw_fd(&port.guest_wake),
                EventSet::IN,
                backend.wake_event_id(index),
            )?;
        }
        Ok(())
    }

    /// `SIGHUP`: reopen the log file (log rotation).
    fn reload(&self) {
        if let Some(log) = &self.log {
            log.reopen();
        }
    }

    fn shutdown(&self) {
        terminal::restore_all();
        for port in &self.ports {
            if let Endpoint::Unix(path) = &port.endpoint {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

impl Drop for ConsoleDevice {
    fn drop(&mut self) {
        terminal::restore_all();
    }
}
