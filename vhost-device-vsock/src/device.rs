//! One VM's device as `vhost_device_common::serve` drives it: the `uds-path` listener and
//! the sibling inbox live as long as the daemon; each frontend connection gets a fresh
//! backend and muxer.

use std::os::unix::net::UnixListener;
use std::sync::Arc;

use vhost_device_common::Device;
use vhost_user_backend::VringEpollHandler;
use vmm_sys_util::epoll::EventSet;

use crate::backend::{VsockBackend, MUXER_EVENT, TX_TIMER_EVENT};
use crate::config::VmConfig;
use crate::muxer::{self, Muxer, Settings};
use crate::sibling::{Inbox, Registry};

/// Why a VM's device cannot start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The uds path is served by a live process.
    #[error("uds path {0} is in use by a running process: stop it or choose another uds-path")]
    UdsInUse(std::path::PathBuf),
    /// Binding the uds path failed otherwise.
    #[error("cannot listen on uds path {path}")]
    Uds {
        /// The path.
        path: std::path::PathBuf,
        /// What bind said.
        #[source]
        source: std::io::Error,
    },
    /// An eventfd could not be made.
    #[error("cannot create the sibling inbox")]
    Inbox(#[source] std::io::Error),
    /// Two VMs with one CID.
    #[error("guest CID {0} is given to more than one VM")]
    DuplicateCid(u64),
}

/// One VM's vsock device.
#[derive(Debug)]
pub struct VsockDevice {
    config: VmConfig,
    name: String,
    listener: UnixListener,
    inbox: Arc<Inbox>,
    registry: Arc<Registry>,
}

impl VsockDevice {
    /// Binds the VM's `uds-path` and joins the sibling registry.
    pub fn new(config: VmConfig, registry: Arc<Registry>) -> Result<Self, Error> {
        let listener = muxer::bind_uds(&config.uds_path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AddrInUse {
                Error::UdsInUse(config.uds_path.clone())
            } else {
                Error::Uds {
                    path: config.uds_path.clone(),
                    source,
                }
            }
        })?;
        let inbox = Arc::new(Inbox::new().map_err(Error::Inbox)?);
        if !registry.register(config.guest_cid, &config.groups, inbox.clone()) {
            return Err(Error::DuplicateCid(config.guest_cid));
        }
        Ok(VsockDevice {
            name: format!("vhost-device-vsock-cid{}", config.guest_cid),
            config,
            listener,
            inbox,
            registry,
        })
    }

    /// The VM's configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config.uds_path);
    }
}

impl Device for VsockDevice {
    fn syscalls(&self) -> vhost_device_common::Syscalls {
        crate::seccomp::syscalls()
    }

    type Backend = VsockBackend;

    fn name(&self) -> &str {
        &self.name
    }

    fn backend(&self) -> Result<VsockBackend, Box<dyn std::error::Error + Send + Sync>> {
        let settings = Settings {
            cid: self.config.guest_cid,
            uds_path: self.config.uds_path.clone(),
            buf_alloc: self.config.tx_buffer_size,
        };
        let muxer = Muxer::new(
            settings,
            Some(self.listener.try_clone()?),
            self.inbox.clone(),
            self.registry.clone(),
        )?;
        Ok(VsockBackend::new(
            self.config.guest_cid,
            self.config.queue_size,
            muxer,
        )?)
    }

    fn attach(
        &self,
        backend: &VsockBackend,
        handlers: &[Arc<VringEpollHandler<VsockBackend>>],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let handler = handlers.first().ok_or("no worker thread")?;
        handler.register_listener(backend.muxer_fd(), EventSet::IN, u64::from(MUXER_EVENT))?;
        handler.register_listener(backend.timer_fd(), EventSet::IN, u64::from(TX_TIMER_EVENT))?;
        Ok(())
    }

    fn disconnected(&self, backend: &VsockBackend) {
        backend.reset();
    }

    fn shutdown(&self) {
        let _ = std::fs::remove_file(&self.config.uds_path);
    }
}
