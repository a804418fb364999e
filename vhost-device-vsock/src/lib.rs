//! vhost-user virtio-vsock device with hybrid vsock over Unix sockets, the convention of
//! Firecracker and rust-vmm's vhost-device-vsock:
//!
//! - a host program connects to `uds-path`, writes `CONNECT <port>\n`, reads
//!   `OK <local-port>\n` and then talks to the guest listening on `port`;
//! - a guest connecting to (CID 2, port P) reaches the host program listening on
//!   `<uds-path>_P`, or gets a reset if none listens.
//!
//! Modules: [`packet`] (header and descriptor-chain parsing), [`conn`] (one connection's
//! state and credit flow control), [`muxer`] (one VM's connections over epoll),
//! [`sibling`] (VM to VM), [`backend`] (the `VhostUserBackend`), [`device`] (per-VM
//! resources for `vhost_device_common::serve`), [`config`] and [`cli`].

#![warn(missing_docs)]

pub mod backend;
pub mod cli;
pub mod config;
pub mod conn;
pub mod device;
pub mod muxer;
pub mod packet;
pub mod seccomp;
pub mod sibling;
