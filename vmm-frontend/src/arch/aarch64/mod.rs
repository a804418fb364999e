//! aarch64: the same device model behind an FDT, an in-kernel GIC and a PL011.
//!
//! - `layout`: the guest physical map; `fdt`: the device tree; `pl011`: the console UART.
//!   These are plain code, built and unit-tested on every host.
//! - `vm` (aarch64 hosts only): the in-kernel GICv3 (GICv2 when KVM has no GICv3
//!   emulation) through `KVM_CREATE_DEVICE`, kernel `Image` loading with `linux-loader`'s
//!   PE/arm64 loader, and vCPU set-up with `KVM_ARM_VCPU_INIT` (preferred target, PSCI
//!   0.2+; secondary vCPUs start powered off and come up through PSCI `CPU_ON`, which KVM
//!   serves itself). PSCI `SYSTEM_OFF`/`SYSTEM_RESET` arrive as `KVM_EXIT_SYSTEM_EVENT`,
//!   which the shared vCPU loop turns into a clean end of the VM.
//!
//! Transport: virtio-mmio nodes in the FDT, not virtio-pci behind ECAM. The arm64 kernel
//! finds virtio-mmio devices through the device tree (Debian's `virtio_mmio` module probes
//! `virtio,mmio` nodes; only the x86 *command-line* devices are compiled out), so no PCI
//! host bridge, ECAM window, BAR allocation or GIC ITS (MSI) emulation is needed: each
//! device is one 512-byte register window, one ioeventfd per queue (datamatch on the queue
//! index) and one edge-triggered SPI through an irqfd. The vhost-user frontend behind it
//! is the x86 one, unchanged (see `crate::virtio_mmio`).

pub mod fdt;
pub mod layout;
pub mod pl011;
#[cfg(target_arch = "aarch64")]
mod vm;

#[cfg(target_arch = "aarch64")]
pub use vm::*;

/// Start of RAM.
pub const RAM_START: u64 = layout::RAM_START;

/// Guest RAM ranges for `memory` bytes.
pub fn ram_ranges(memory: u64) -> Vec<(u64, u64)> {
    layout::ram_ranges(memory)
}

/// The fixed routes (GSI, chip, pin) the routing table keeps: GSI n is SPI n, for every
/// SPI (the UART's and the virtio-mmio devices' irqfds use them).
pub fn legacy_routes() -> Vec<(u32, u32, u32)> {
    (0..layout::GIC_NR_SPIS).map(|spi| (spi, 0, spi)).collect()
}

/// First GSI past the SPI routes (no MSI routes are used on aarch64).
pub const FIRST_MSI_GSI: u32 = layout::GIC_NR_SPIS;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spi_is_routed_to_itself() {
        let r = legacy_routes();
        assert_eq!(r.len(), 96);
        assert!(r.iter().all(|&(gsi, chip, pin)| gsi == pin && chip == 0));
        assert!(r.iter().any(|&(g, _, _)| g == layout::UART_SPI));
    }
}
