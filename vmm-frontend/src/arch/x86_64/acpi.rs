//! Hardware-reduced ACPI tables: RSDP, XSDT, FADT (sleep control and reset registers),
//! MADT (every vCPU's local APIC and the IOAPIC) and a DSDT with `\_S5_` and the PCI host
//! bridge whose `_CRS` lists the configuration ports and the BAR window, and COM1 (with
//! hardware-reduced ACPI, Linux has no legacy IRQs: the UART's IRQ 4 must come from ACPI).
//!
//! Linux finds the RSDP through `boot_params.acpi_rsdp_addr` (and the BIOS-area scan); with
//! the PCI root in the DSDT it scans bus 0 through the 0xCF8/0xCFC ports, and a write of
//! `SLP_TYP=5 | SLP_EN` to the sleep control register is its power-off.

use acpi_tables::aml::{self, AddressSpace, AddressSpaceCacheable};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use super::layout::*;
use crate::memory::GuestMemory;

const OEM_ID: [u8; 6] = *b"VMMFE ";
const OEM_TABLE: [u8; 8] = *b"VMMFRONT";

/// The value written to the reset register to reset the machine.
pub const RESET_VALUE: u8 = 1;
/// The sleep type of S5 (soft off) in the DSDT's `\_S5_` package.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Offset of the reset register from `ACPI_PM_PORT`.
pub const RESET_REG_OFFSET: u64 = 1;

/// Failure to place the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit below 1 MiB.
    #[error("ACPI tables ({0} bytes) do not fit in the BIOS area")]
    TooLarge(usize),
    /// Writing them failed.
    #[error("cannot write ACPI tables to guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT: `\_S5_` and the PCI root bridge `PCI0`.
pub fn dsdt() -> Vec<u8> {
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    let s5_type = S5_SLEEP_TYPE;
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&s5_type]));
    let hid = aml::EISAName::new("PNP0A03");
    let zero = 0u8;
    let bus = AddressSpace::<u16>::new_bus_number(0, 0);
    let cfg_ports = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = AddressSpace::<u16>::new_io(0, 0xcf7, None);
    let io_high = AddressSpace::<u16>::new_io(0xd00, 0xffff, None);
    let mmio_end = u32::try_from(PCI_MMIO_START + PCI_MMIO_SIZE - 1).unwrap_or(u32::MAX);
    let mmio_start = u32::try_from(PCI_MMIO_START).unwrap_or(0);
    let mmio = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        mmio_start,
        mmio_end,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &cfg_ports, &io_low, &io_high, &mmio]);
    let hid_name = aml::Name::new("_HID".into(), &hid);
    let adr = aml::Name::new("_ADR".into(), &zero);
    let seg = aml::Name::new("_SEG".into(), &zero);
    let uid = aml::Name::new("_UID".into(), &zero);
    let bbn = aml::Name::new("_BBN".into(), &zero);
    let crs_name = aml::Name::new("_CRS".into(), &crs);
    let pci0 = aml::Device::new(
        "_SB_.PCI0".into(),
        vec![&hid_name, &adr, &seg, &uid, &bbn, &crs_name],
    );
    // COM1: hardware-reduced ACPI means no legacy PIC and no legacy IRQs in Linux, so the
    // UART's IRQ must come from an ACPI device for the 8250 driver to get interrupts.
    let com_hid = aml::EISAName::new("PNP0501");
    let com_hid_name = aml::Name::new("_HID".into(), &com_hid);
    let com_uid = aml::Name::new("_UID".into(), &zero);
    let com_port = u16::try_from(COM1_PORT).unwrap_or(0x3f8);
    let com_io = aml::IO::new(com_port, com_port, 1, 8);
    let com_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com_crs = aml::ResourceTemplate::new(vec![&com_io, &com_irq]);
    let com_crs_name = aml::Name::new("_CRS".into(), &com_crs);
    let com1 = aml::Device::new(
        "_SB_.COM1".into(),
        vec![&com_hid_name, &com_uid, &com_crs_name],
    );
    s5.to_aml_bytes(&mut sdt);
    pci0.to_aml_bytes(&mut sdt);
    com1.to_aml_bytes(&mut sdt);
    sdt.update_checksum();
    sdt.as_slice().to_vec()
}

/// The FADT: hardware-reduced, with the sleep control/status and reset registers.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    let port = |off: u64| {
        GAS::new(
            GasSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            ACPI_PM_PORT + off,
        )
    };
    f.sleep_control_reg = port(0);
    f.sleep_status_reg = port(0);
    f.reset_reg = port(RESET_REG_OFFSET);
    f.reset_value = RESET_VALUE;
    // IAPC_BOOT_ARCH: no VGA, no CMOS RTC probing (bits 2 and 5).
    f.iapc_boot_arch = ((1u16 << 2) | (1u16 << 5)).into();
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"VMMFRONT").into();
    bytes(&f.finalize())
}

/// The MADT: one local APIC per vCPU (APIC ID = index) and the IOAPIC.
pub fn madt(cpus: u8) -> Vec<u8> {
    let lapic = u32::try_from(LAPIC_START).unwrap_or(0);
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE,
        1,
        LocalInterruptController::Address(lapic),
    );
    for id in 0..cpus {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    let ioapic_id = cpus;
    m.add_structure(IoApic::new(
        ioapic_id,
        u32::try_from(IOAPIC_START).unwrap_or(0),
        0,
    ));
    let mut b = bytes(&m);
    // Flags (offset 40): PCAT_COMPAT, the dual 8259 is there (KVM's in-kernel PIC). Without
    // it Linux assumes no legacy IRQs, and ISA IRQs such as COM1's 4 are never mapped to
    // their IOAPIC pins.
    b[MADT_FLAGS_OFFSET] |= MADT_PCAT_COMPAT;
    b[CHECKSUM_OFFSET] = 0;
    b[CHECKSUM_OFFSET] = 0u8.wrapping_sub(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)));
    b
}

const MADT_FLAGS_OFFSET: usize = 40;
const MADT_PCAT_COMPAT: u8 = 1;
const CHECKSUM_OFFSET: usize = 9;

/// Builds every table and writes them at `ACPI_START`; returns the RSDP address.
pub fn write_tables(mem: &GuestMemory, cpus: u8) -> Result<u64, AcpiError> {
    let align = |x: u64| (x + 15) & !15;
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    let dsdt = dsdt();
    // The XSDT lists two tables: FADT and MADT.
    let dsdt_addr = align(xsdt_addr + 36 + 2 * 8);
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(cpus);
    let end = madt_addr + madt.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge(
            usize::try_from(end - ACPI_START).unwrap_or(usize::MAX),
        ));
    }
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    for (data, addr) in [
        (bytes(&rsdp), rsdp_addr),
        (bytes(&xsdt), xsdt_addr),
        (dsdt, dsdt_addr),
        (fadt, fadt_addr),
        (madt, madt_addr),
    ] {
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(AcpiError::Memory)?;
    }
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn table_at(mem: &GuestMemory, addr: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).expect("len");
        let mut v = vec![0u8; len as usize];
        mem.read_slice(&mut v, GuestAddress(addr)).expect("table");
        v
    }

    #[test]
    fn tables_checksum_and_link() {
        let mem = crate::memory::create(&[(GuestAddress(0), 2 << 20)]).expect("mem");
        let rsdp = write_tables(&mem, 2).expect("tables");
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, GuestAddress(rsdp)).expect("rsdp");
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(&r), 0);
        let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().expect("8"));
        let xsdt = table_at(&mem, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(sum(&xsdt), 0);
        let fadt_addr = u64::from_le_bytes(xsdt[36..44].try_into().expect("8"));
        let madt_addr = u64::from_le_bytes(xsdt[44..52].try_into().expect("8"));
        let fadt = table_at(&mem, fadt_addr);
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(sum(&fadt), 0);
        // Flags at 112: hardware-reduced (bit 20) and reset register supported (bit 10).
        let flags = u32::from_le_bytes(fadt[112..116].try_into().expect("4"));
        assert_ne!(flags & (1 << 20), 0);
        assert_ne!(flags & (1 << 10), 0);
        // SLEEP_CONTROL_REG at 244: system I/O, port ACPI_PM_PORT.
        assert_eq!(fadt[244], 1);
        assert_eq!(
            u64::from_le_bytes(fadt[248..256].try_into().expect("8")),
            ACPI_PM_PORT
        );
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().expect("8"));
        let dsdt = table_at(&mem, dsdt_addr);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(sum(&dsdt), 0);
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        assert!(dsdt.windows(4).any(|w| w == b"PCI0"));
        assert!(dsdt.windows(4).any(|w| w == b"COM1"));
        let madt = table_at(&mem, madt_addr);
        assert_eq!(&madt[..4], b"APIC");
        assert_eq!(sum(&madt), 0);
        // Header 44 bytes, two 8-byte local APICs, one 12-byte IOAPIC.
        assert_eq!(madt.len(), 44 + 2 * 8 + 12);
        assert_eq!(madt[MADT_FLAGS_OFFSET] & MADT_PCAT_COMPAT, 1);
        assert_eq!((madt[44], madt[47], madt[52], madt[55]), (0, 0, 0, 1));
        assert_eq!(madt[60], 1);
        assert!(mem.last_addr().0 > ACPI_END);
    }

    #[test]
    fn many_cpus_still_fit() {
        let mem = crate::memory::create(&[(GuestAddress(0), 2 << 20)]).expect("mem");
        write_tables(&mem, crate::config::MAX_CPUS).expect("254 vCPUs fit");
    }
}
