//! x86_64: memory layout, kernel loading and boot parameters, ACPI tables, vCPU set-up, and
//! the VM-level set-up (in-kernel irqchip, PIT, TSS).

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod layout;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;

use crate::config::Config;
use crate::memory::GuestMemory;

/// Failure of the architecture set-up.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// A KVM VM ioctl failed.
    #[error("KVM {0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Loading the kernel or writing boot data failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// Writing the ACPI tables failed.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// vCPU set-up failed.
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
}

/// Guest RAM ranges for `memory` bytes.
pub fn ram_ranges(memory: u64) -> Vec<(u64, u64)> {
    layout::ram_ranges(memory)
}

/// The VM-wide state `setup_vm` returns (none on x86_64).
pub type ArchVm = ();

/// VM-wide set-up before vCPUs exist: TSS, identity map, irqchip, PIT.
pub fn setup_vm(vm: &VmFd) -> Result<ArchVm, ArchError> {
    vm.set_tss_address(usize::try_from(layout::KVM_TSS_ADDRESS).unwrap_or(usize::MAX))
        .map_err(|e| ArchError::Kvm("SET_TSS_ADDR", e))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
        .map_err(|e| ArchError::Kvm("SET_IDENTITY_MAP_ADDR", e))?;
    vm.create_irq_chip()
        .map_err(|e| ArchError::Kvm("CREATE_IRQCHIP", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| ArchError::Kvm("CREATE_PIT2", e))?;
    Ok(())
}

/// The fixed routes KVM sets up by default (GSI, chip, pin) that a custom routing table
/// must keep: GSIs 0-15 on both PICs and the IOAPIC, 16-23 on the IOAPIC.
pub fn legacy_routes() -> Vec<(u32, u32, u32)> {
    let mut r = Vec::new();
    for gsi in 0..layout::IOAPIC_PINS {
        r.push((gsi, kvm_bindings::KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let chip = if gsi < 8 {
                kvm_bindings::KVM_IRQCHIP_PIC_MASTER
            } else {
                kvm_bindings::KVM_IRQCHIP_PIC_SLAVE
            };
            r.push((gsi, chip, gsi % 8));
        }
    }
    r
}

/// First GSI free for MSI routes.
pub const FIRST_MSI_GSI: u32 = layout::IOAPIC_PINS;

/// Loads kernel, initramfs and command line, writes ACPI tables, zero page and page tables;
/// returns the kernel entry point.
pub fn load_guest(mem: &GuestMemory, config: &Config, _vm: &ArchVm) -> Result<u64, ArchError> {
    let kernel = boot::load_kernel(mem, &config.kernel)?;
    let initramfs = match &config.initramfs {
        Some(p) => Some(boot::load_initramfs(
            mem,
            p,
            kernel.kernel_end,
            boot::initrd_addr_max(kernel.setup_header.as_ref()),
        )?),
        None => None,
    };
    let cmdline_len = boot::load_cmdline(mem, &config.cmdline)?;
    let rsdp = acpi::write_tables(mem, config.cpus)?;
    let params = boot::boot_params(
        kernel.setup_header,
        cmdline_len,
        initramfs,
        &ram_ranges(config.memory),
        rsdp,
    );
    boot::write_boot_params(mem, &params)?;
    boot::write_page_tables_and_gdt(mem)?;
    Ok(kernel.entry)
}

/// PCI BAR window (start, size).
pub const PCI_MMIO: (u64, u64) = (layout::PCI_MMIO_START, layout::PCI_MMIO_SIZE);

/// Sets up vCPU `id` of `count` to start at `entry`.
pub fn configure_vcpu(
    kvm: &kvm_ioctls::Kvm,
    _vm: &VmFd,
    vcpu: &kvm_ioctls::VcpuFd,
    id: u8,
    count: u8,
    entry: u64,
) -> Result<(), ArchError> {
    Ok(cpu::configure(kvm, vcpu, id, count, entry)?)
}

/// After every vCPU exists, before any runs: nothing to do on x86_64.
pub fn finish_vcpus(_vm: &ArchVm) -> Result<(), ArchError> {
    Ok(())
}

/// Puts the legacy devices on the buses: COM1 (its IRQ an irqfd on GSI 4), the i8042 and
/// the ACPI power-management registers. Returns the serial device.
pub fn add_platform_devices(
    buses: &crate::vcpu::Buses,
    exit: &std::sync::Arc<crate::devices::ExitSignal>,
    serial_out: Box<dyn std::io::Write + Send>,
    ops: &dyn crate::vm_ops::VmOps,
) -> Result<
    std::sync::Arc<std::sync::Mutex<crate::devices::serial::SerialDevice>>,
    crate::vmm::VmmError,
> {
    use crate::devices::{acpi_pm::AcpiPm, i8042::I8042, serial::SerialDevice};
    use crate::vmm::VmmError;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    let irq = EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventFd)?;
    ops.register_irqfd(&irq, layout::COM1_IRQ)
        .map_err(VmmError::Irqfd)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(irq, serial_out)));
    buses
        .io
        .insert(serial.clone(), layout::COM1_PORT, 8)
        .map_err(VmmError::Bus)?;
    let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone())));
    buses
        .io
        .insert(i8042, layout::I8042_PORT, 5)
        .map_err(VmmError::Bus)?;
    let pm = AcpiPm::new(
        exit.clone(),
        acpi::S5_SLEEP_TYPE,
        acpi::RESET_REG_OFFSET,
        acpi::RESET_VALUE,
    );
    buses
        .io
        .insert(Arc::new(Mutex::new(pm)), layout::ACPI_PM_PORT, 2)
        .map_err(VmmError::Bus)?;
    Ok(serial)
}

/// The PCI configuration ports (base, length).
pub const PCI_CONFIG_PORTS: (u64, u64) = (layout::PCI_CONFIG_PORT, 8);
