//! The aarch64 guest physical memory map (QEMU `virt`-like low devices, RAM at 2 GiB).
//!
//! ```text
//! 0x0800_0000  GIC distributor (64 KiB)
//! 0x0801_0000  GICv2 CPU interface (8 KiB; GICv2 fallback only)
//! 0x080a_0000  GICv3 redistributors (128 KiB per vCPU, up to 0x0900_0000)
//! 0x0900_0000  PL011 UART (4 KiB), SPI 1
//! 0x0a00_0000  virtio-mmio devices, 512 bytes each, device i on SPI 16 + i
//! 0x8000_0000  RAM: FDT (2 MiB), then the kernel Image (2 MiB aligned), initramfs at the top
//! ```

/// GIC distributor.
pub const GIC_DIST: u64 = 0x0800_0000;
/// Size of the distributor.
pub const GIC_DIST_SIZE: u64 = 0x1_0000;
/// GICv2 CPU interface.
pub const GIC_V2_CPU: u64 = 0x0801_0000;
/// Size of the GICv2 CPU interface.
pub const GIC_V2_CPU_SIZE: u64 = 0x2000;
/// First GICv3 redistributor.
pub const GIC_REDIST: u64 = 0x080a_0000;
/// One vCPU's redistributor frames (RD and SGI).
pub const GIC_REDIST_SIZE: u64 = 0x2_0000;
/// Most vCPUs whose redistributors fit below the UART.
pub const MAX_CPUS: u8 = 123;
/// Interrupt lines the vGIC has (32 private, the rest SPIs).
pub const GIC_NR_IRQS: u32 = 128;
/// Shared peripheral interrupts.
pub const GIC_NR_SPIS: u32 = GIC_NR_IRQS - 32;

/// PL011 UART.
pub const UART: u64 = 0x0900_0000;
/// Size of the UART's registers.
pub const UART_SIZE: u64 = 0x1000;
/// The UART's SPI.
pub const UART_SPI: u32 = 1;

/// First virtio-mmio device.
pub const VIRTIO_MMIO_BASE: u64 = 0x0a00_0000;
/// Size of one virtio-mmio device.
pub const VIRTIO_MMIO_SIZE: u64 = 0x200;
/// SPI of virtio-mmio device 0.
pub const VIRTIO_SPI_BASE: u32 = 16;
/// Most virtio-mmio devices (their SPIs stay below `GIC_NR_SPIS`).
pub const MAX_VIRTIO_DEVICES: usize = 64;

/// Start of RAM.
pub const RAM_START: u64 = 0x8000_0000;
/// The FDT, at the start of RAM.
pub const FDT_ADDR: u64 = RAM_START;
/// Room for the FDT.
pub const FDT_MAX_SIZE: u64 = 0x20_0000;
/// The kernel's 2 MiB-aligned base (it runs at base + the Image's `text_offset`).
pub const KERNEL_BASE: u64 = RAM_START + FDT_MAX_SIZE;

/// Guest RAM ranges for `memory` bytes: one range at [`RAM_START`].
pub fn ram_ranges(memory: u64) -> Vec<(u64, u64)> {
    vec![(RAM_START, memory)]
}

/// The MMIO address and SPI of virtio-mmio device `i`, or None past the last slot.
pub fn virtio_slot(i: usize) -> Option<(u64, u32)> {
    if i >= MAX_VIRTIO_DEVICES {
        return None;
    }
    let n = u32::try_from(i).ok()?;
    Some((
        VIRTIO_MMIO_BASE + u64::from(n) * VIRTIO_MMIO_SIZE,
        VIRTIO_SPI_BASE + n,
    ))
}

/// The MPIDR KVM gives vCPU `id` (Aff0 = id % 16, Aff1 = id / 16), the `reg` of its FDT
/// node.
pub fn mpidr(id: u8) -> u64 {
    u64::from(id & 0xf) | (u64::from(id >> 4) << 8)
}

/// Where the initramfs of `len` bytes goes: page aligned at the top of RAM, or None if it
/// would reach below `kernel_end`.
pub fn initrd_addr(memory: u64, kernel_end: u64, len: u64) -> Option<u64> {
    let top = RAM_START.checked_add(memory)?;
    let start = top.checked_sub(len)? & !0xfff;
    (start >= kernel_end.max(RAM_START)).then_some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    const _: () = {
        assert!(GIC_DIST + GIC_DIST_SIZE <= GIC_V2_CPU);
        assert!(GIC_V2_CPU + GIC_V2_CPU_SIZE <= GIC_REDIST);
        assert!(GIC_REDIST + MAX_CPUS as u64 * GIC_REDIST_SIZE <= UART);
        assert!(GIC_REDIST + (MAX_CPUS as u64 + 1) * GIC_REDIST_SIZE > UART);
        assert!(UART + UART_SIZE <= VIRTIO_MMIO_BASE);
        assert!(
            KERNEL_BASE % 0x20_0000 == 0,
            "the arm64 boot protocol wants 2 MiB"
        );
    };

    #[test]
    fn regions_do_not_overlap() {
        let (last, spi) = virtio_slot(MAX_VIRTIO_DEVICES - 1).expect("last slot");
        assert!(last + VIRTIO_MMIO_SIZE <= RAM_START);
        assert!(spi < GIC_NR_SPIS);
        assert!(virtio_slot(MAX_VIRTIO_DEVICES).is_none());
        assert_eq!(
            KERNEL_BASE % 0x20_0000,
            0,
            "the arm64 boot protocol wants 2 MiB"
        );
        assert_eq!(MAX_CPUS, 123);
    }

    #[test]
    fn slots_mpidr_and_initrd() {
        assert_eq!(virtio_slot(0), Some((0x0a00_0000, 16)));
        assert_eq!(virtio_slot(2), Some((0x0a00_0400, 18)));
        assert_eq!(mpidr(1), 1);
        assert_eq!(mpidr(17), 0x101);
        assert_eq!(
            initrd_addr(512 << 20, KERNEL_BASE + (30 << 20), 0x1800),
            Some(RAM_START + (512 << 20) - 0x2000)
        );
        assert_eq!(
            initrd_addr(64 << 20, KERNEL_BASE + (60 << 20), 8 << 20),
            None
        );
        assert_eq!(initrd_addr(1 << 20, 0, 2 << 20), None);
    }
}
