//! A vhost-user virtio-net device backed by a Linux tap.
//!
//! - [`virtio`]: feature bits, config space, the packet header.
//! - [`tap`]: the tap device (create or attach, offloads, header size, multi-queue).
//! - [`rx`] and [`tx`]: placing frames into the guest's chains and sending them from there.
//! - [`backend`]: the `VhostUserBackend`, one worker per queue pair.
//! - [`device`]: the device served by `vhost-device-common` (taps outlive connections).
//! - [`config`]: the validated configuration; [`cli`]: the command line and `run`.

#![warn(missing_docs)]

pub mod backend;
pub mod cli;
pub mod config;
pub mod device;
pub mod rx;
pub mod seccomp;
pub mod stats;
pub mod tap;
pub mod tx;
pub mod virtio;

pub use config::{Config, ConfigError, RawConfig};
pub use device::NetDevice;
