//! The x86_64 guest physical memory map.
//!
//! ```text
//! 0x0000_0500  GDT          0x0000_0520  IDT
//! 0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  boot stack (grows down)
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000 PD (identity map of the first GiB)
//! 0x0002_0000  kernel command line
//! 0x000e_0000  ACPI: RSDP, then XSDT, FADT, MADT, DSDT
//! 0x0010_0000  kernel (bzImage protected-mode part or ELF segments)
//! ...          initramfs, at the top of low RAM
//! 0xc000_0000  32-bit MMIO hole: PCI BARs (0xc000_0000..0xe000_0000), IOAPIC, LAPIC
//! 0x1_0000_0000  RAM above 4 GiB when the guest has more than 3 GiB
//! ```

/// GDT location.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT location.
pub const BOOT_IDT_START: u64 = 0x520;
/// Zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Top-level page table.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (512 x 2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line accepted.
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
/// End of the low RAM below the EBDA.
pub const EBDA_START: u64 = 0x9_fc00;
/// Where the ACPI tables start (inside the BIOS area Linux scans for the RSDP).
pub const ACPI_START: u64 = 0xe_0000;
/// End of the ACPI area.
pub const ACPI_END: u64 = 0x10_0000;
/// Where the kernel is loaded and high memory starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// Start of RAM above the hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// PCI BAR window (32-bit memory BARs).
pub const PCI_MMIO_START: u64 = 0xc000_0000;
/// Size of the PCI BAR window.
pub const PCI_MMIO_SIZE: u64 = 0x2000_0000;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (three pages) in the hole.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity map page, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// Number of IOAPIC pins, which are GSIs 0..24.
pub const IOAPIC_PINS: u32 = 24;
/// Serial port COM1 and its IRQ.
pub const COM1_PORT: u64 = 0x3f8;
/// IRQ of COM1.
pub const COM1_IRQ: u32 = 4;
/// i8042 command/status port.
pub const I8042_PORT: u64 = 0x60;
/// ACPI sleep control / status register and reset register (hardware-reduced ACPI).
pub const ACPI_PM_PORT: u64 = 0x600;
/// PCI configuration address/data ports.
pub const PCI_CONFIG_PORT: u64 = 0xcf8;

// The PCI window, the IOAPIC and the LAPIC all sit in the hole, below KVM's pages.
const _: () = assert!(PCI_MMIO_START >= MMIO_HOLE_START);
const _: () = assert!(PCI_MMIO_START + PCI_MMIO_SIZE <= IOAPIC_START);
const _: () = assert!(LAPIC_START < KVM_IDENTITY_MAP_ADDRESS);

/// The guest RAM ranges (address, size) for `memory` bytes, split around the MMIO hole.
pub fn ram_ranges(memory: u64) -> Vec<(u64, u64)> {
    if memory <= MMIO_HOLE_START {
        vec![(0, memory)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (HIGH_RAM_START, memory - MMIO_HOLE_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_hole() {
        assert_eq!(ram_ranges(512 << 20), [(0, 512 << 20)]);
        assert_eq!(ram_ranges(3 << 30), [(0, 3 << 30)]);
        assert_eq!(ram_ranges(4 << 30), [(0, 3 << 30), (4 << 30, 1 << 30)]);
    }
}
