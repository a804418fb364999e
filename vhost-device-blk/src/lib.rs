//! vhost-device-blk: a virtio-blk device served over vhost-user.
//!
//! - [`virtio`]: the specification's feature bits, request types, statuses, config space.
//! - [`request`]: a descriptor chain parsed into a typed [`request::Request`].
//! - [`disk`]: the image file or block device.
//! - [`engine`]: executing requests: io_uring (many in flight) or synchronous.
//! - [`backend`]: the `VhostUserBackend` wiring queues, parser and engine.
//! - [`device`]: the daemon around it (connections, resize on SIGHUP, clean exit).
//! - [`config`] and [`cli`]: the configuration and the command line that builds it.

#![warn(missing_docs)]

pub mod backend;
pub mod cli;
pub mod config;
pub mod device;
pub mod disk;
pub mod engine;
pub mod inflight;
pub mod ratelimit;
pub mod request;
pub mod seccomp;
pub mod virtio;

pub use device::run;

/// The guest memory type (vm-memory's mmap backend, no dirty bitmap).
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;
