//! aarch64: the memory map of the same device model behind an FDT, a GICv3 and a PL011.
//!
//! This compiles for `aarch64-unknown-linux-gnu` so the shared code stays portable; booting
//! is not implemented yet (a later issue): `load_guest` says so plainly.

use kvm_ioctls::VmFd;

use crate::config::Config;
use crate::memory::GuestMemory;

/// Start of RAM.
pub const RAM_START: u64 = 0x8000_0000;
/// PCI BAR window (start, size), below RAM.
pub const PCI_MMIO: (u64, u64) = (0x4000_0000, 0x2000_0000);
/// First GSI free for MSI routes (after the SPIs used by platform devices).
pub const FIRST_MSI_GSI: u32 = 32;

/// Failure of the architecture set-up.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// Not implemented on this architecture yet.
    #[error("booting on aarch64 is not implemented yet")]
    Unsupported,
}

/// Guest RAM ranges for `memory` bytes.
pub fn ram_ranges(memory: u64) -> Vec<(u64, u64)> {
    vec![(RAM_START, memory)]
}

/// VM-wide set-up.
pub fn setup_vm(_vm: &VmFd) -> Result<(), ArchError> {
    Err(ArchError::Unsupported)
}

/// Legacy interrupt routes to keep (none: the GIC's SPIs are routed on demand).
pub fn legacy_routes() -> Vec<(u32, u32, u32)> {
    Vec::new()
}

/// Loads the guest.
pub fn load_guest(_mem: &GuestMemory, _config: &Config) -> Result<u64, ArchError> {
    Err(ArchError::Unsupported)
}

/// Sets up a vCPU.
pub fn configure_vcpu(
    _kvm: &kvm_ioctls::Kvm,
    _vcpu: &kvm_ioctls::VcpuFd,
    _id: u8,
    _count: u8,
    _entry: u64,
) -> Result<(), ArchError> {
    Err(ArchError::Unsupported)
}

/// Platform devices (a PL011 and a GPIO power key on aarch64): not implemented yet.
pub fn add_platform_devices(
    _buses: &crate::vcpu::Buses,
    _exit: &std::sync::Arc<crate::devices::ExitSignal>,
    _serial_out: Box<dyn std::io::Write + Send>,
    _ops: &dyn crate::vm_ops::VmOps,
) -> Result<
    std::sync::Arc<std::sync::Mutex<crate::devices::serial::SerialDevice>>,
    crate::vmm::VmmError,
> {
    Err(crate::vmm::VmmError::Arch(ArchError::Unsupported))
}

/// PCI configuration is through ECAM on aarch64; no ports (base, length 0 = none).
pub const PCI_CONFIG_PORTS: (u64, u64) = (0, 0);
