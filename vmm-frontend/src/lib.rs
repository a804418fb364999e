//! `vmm-frontend`: a small KVM VMM that boots a stock Linux kernel and attaches vhost-user
//! device daemons over virtio-pci.
//!
//! The module map follows the VM's parts: `memory` (memfd guest RAM), `arch` (layout, boot,
//! ACPI, vCPU registers), `vcpu` (threads and exit dispatch), `bus` (port and MMIO ranges),
//! `devices` (serial, i8042, ACPI power management), `pci` (bus 0, configuration space,
//! MSI-X), `virtio_pci` (the modern transport), `vhost_user` (the daemon behind each
//! function), `virtio_mmio` (the aarch64 transport: device-tree nodes, one SPI per
//! device), `vm_ops` (the KVM operations devices use) and `vmm` (assembly and run).
//!
//! On aarch64 the devices are virtio-mmio, not virtio-pci: see `arch::aarch64` for why.

#![warn(missing_docs)]

pub mod arch;
pub mod bus;
pub mod config;
pub mod devices;
pub mod memory;
pub mod net_ctrl;
pub mod pci;
pub mod vcpu;
pub mod vhost_user;
pub mod virtio_mmio;
pub mod virtio_pci;
pub mod vm_ops;
pub mod vmm;

pub use config::{Args, Config};
pub use devices::ExitReason;
pub use vmm::{run, VmmError};
