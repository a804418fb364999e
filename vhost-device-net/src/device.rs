//! The net device as the shared daemon plumbing serves it: the tap queues are opened once
//! at start (so a missing permission or a busy tap is reported before anything listens) and
//! outlive frontend connections; every connection gets a fresh [`NetBackend`].

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use log::info;
use vhost_device_common::Device;
use vhost_user_backend::VringEpollHandler;
use vmm_sys_util::epoll::EventSet;

use crate::backend::{BackendConfig, NetBackend};
use crate::config::{format_mac, Config, TapSource};
use crate::tap::{configure_host, Tap, TapError};
use crate::virtio::HDR_LEN;

/// Why the device could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening or configuring the tap failed.
    #[error(transparent)]
    Tap(#[from] TapError),
}

/// The net device: its tap queues and configuration.
#[derive(Debug)]
pub struct NetDevice {
    config: Config,
    taps: Arc<Vec<Tap>>,
}

impl NetDevice {
    /// Opens (or creates) the tap queues and configures the host side.
    pub fn new(config: Config) -> Result<Self, Error> {
        let taps = match &config.tap {
            TapSource::Name(name) => {
                let multi = config.queue_pairs > 1;
                let taps = (0..config.queue_pairs)
                    .map(|_| Tap::open(name, multi))
                    .collect::<Result<Vec<_>, _>>()?;
                if config.host_addr.is_some() || config.mtu.is_some() {
                    configure_host(name, config.host_addr, config.mtu)?;
                }
                taps
            }
            TapSource::Fds(fds) => fds
                .iter()
                .map(|&fd| {
                    // SAFETY: the user handed this descriptor to the daemon with --tap-fd;
                    // the daemon owns it from here on and nothing else in the process uses
                    // it. An fd that is not open fails the TUNGETIFF check in `from_fd`.
                    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                    Tap::from_fd(owned)
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        for tap in &taps {
            tap.set_vnet_hdr_len(HDR_LEN)?;
            tap.set_offloads(0)?;
        }
        if let Some(tap) = taps.first() {
            info!(
                "tap {} with {} queue pair(s), guest MAC {}",
                tap.name(),
                config.queue_pairs,
                format_mac(&config.mac)
            );
        }
        Ok(NetDevice {
            config,
            taps: Arc::new(taps),
        })
    }

    /// The tap's interface name.
    pub fn tap_name(&self) -> &str {
        self.taps.first().map(Tap::name).unwrap_or("")
    }
}

impl Device for NetDevice {
    fn syscalls(&self) -> vhost_device_common::Syscalls {
        crate::seccomp::syscalls()
    }

    type Backend = NetBackend;

    fn name(&self) -> &str {
        "vhost-device-net"
    }

    fn backend(&self) -> Result<NetBackend, Box<dyn std::error::Error + Send + Sync>> {
        Ok(NetBackend::new(
            BackendConfig {
                mac: self.config.mac,
                queue_pairs: self.config.queue_pairs,
                queue_size: self.config.queue_size,
                mtu: self.config.mtu,
            },
            self.taps.clone(),
        ))
    }

    fn attach(
        &self,
        backend: &NetBackend,
        handlers: &[Arc<VringEpollHandler<NetBackend>>],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        for (tap, handler) in self.taps.iter().zip(handlers) {
            handler.register_listener(
                tap.raw_fd(),
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                backend.tap_event(),
            )?;
        }
        for (pair, fd, token) in backend.start_detached() {
            if let Some(handler) = handlers.get(pair) {
                handler.register_listener(fd, EventSet::IN, token)?;
            }
        }
        Ok(())
    }

    fn disconnected(&self, backend: &NetBackend) {
        info!("connection totals: {}", backend.stats().summary());
        if self.taps.len() > 1 {
            for tap in self.taps.iter() {
                // Back to the kernel's default, every queue attached, for the next frontend.
                let _ = tap.set_queue_attached(true);
            }
        }
    }
}
