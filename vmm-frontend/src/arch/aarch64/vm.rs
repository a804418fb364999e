//! The KVM side of aarch64 (built for aarch64 hosts only): GIC, guest loading, vCPUs and
//! the platform and virtio-mmio devices.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V2,
    kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3, kvm_vcpu_init, KVM_ARM_VCPU_POWER_OFF,
    KVM_ARM_VCPU_PSCI_0_2, KVM_DEV_ARM_VGIC_CTRL_INIT, KVM_DEV_ARM_VGIC_GRP_ADDR,
    KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_GRP_NR_IRQS, KVM_VGIC_V2_ADDR_TYPE_CPU,
    KVM_VGIC_V2_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_DIST,
};
use kvm_ioctls::{DeviceFd, VcpuFd, VmFd};
use linux_loader::loader::{pe::PE, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use super::fdt::{self, FdtParams, GicVersion};
use super::layout;
use super::pl011::Pl011;
use crate::config::Config;
use crate::memory::GuestMemory;
use crate::vcpu::Buses;
use crate::virtio_mmio::VirtioMmioDevice;
use crate::virtio_pci::VirtioBackend;
use crate::vm_ops::VmOps;
use crate::vmm::VmmError;

/// `KVM_VGIC_V3_ADDR_TYPE_REDIST`.
const VGIC_V3_ADDR_TYPE_REDIST: u64 = 3;
/// `KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE`: a core register, by its offset
/// in `struct kvm_regs` in 32-bit words.
const CORE_REG: u64 = 0x6030_0000_0010_0000;
/// Offsets (in 32-bit words) of x0, pc and pstate in `struct user_pt_regs`.
const REG_X0: u64 = 0;
const REG_PC: u64 = 256 / 4;
const REG_PSTATE: u64 = 264 / 4;
/// EL1h with D, A, I and F masked: the state the arm64 boot protocol asks for.
const PSTATE_EL1H_MASKED: u64 = 0x3c5;

/// Failure of the architecture set-up.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// A KVM ioctl failed.
    #[error("KVM {0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// KVM has neither a GICv3 nor a GICv2 to offer.
    #[error("KVM cannot create an in-kernel GIC (GICv3: {v3}; GICv2: {v2})")]
    NoGic {
        /// Why GICv3 failed.
        v3: kvm_ioctls::Error,
        /// Why GICv2 failed.
        v2: kvm_ioctls::Error,
    },
    /// The kernel could not be read or loaded.
    #[error("cannot load the kernel {0} (an arm64 Image is needed)")]
    Kernel(String, #[source] linux_loader::loader::Error),
    /// A file could not be read.
    #[error("cannot read {0}")]
    Read(String, #[source] std::io::Error),
    /// The initramfs does not fit.
    #[error("the initramfs ({0} bytes) does not fit in guest memory above the kernel")]
    InitrdTooBig(u64),
    /// The device tree could not be built.
    #[error("cannot build the device tree: {0}")]
    Fdt(String),
    /// Writing to guest memory failed.
    #[error("cannot write the {0} to guest memory")]
    Memory(&'static str),
    /// Too many vCPUs for the GIC redistributor window.
    #[error("at most {max} vCPUs are supported on aarch64 (asked for {asked})")]
    TooManyCpus {
        /// The limit.
        max: u8,
        /// The request.
        asked: u8,
    },
    /// Too many devices for the virtio-mmio slots.
    #[error("at most {0} virtio devices are supported on aarch64")]
    TooManyDevices(usize),
}

/// The VM-wide state of aarch64: the in-kernel GIC.
#[derive(Debug)]
pub struct ArchVm {
    gic: DeviceFd,
    version: GicVersion,
}

fn set_attr(dev: &DeviceFd, group: u32, attr: u64, addr: u64) -> Result<(), kvm_ioctls::Error> {
    dev.set_device_attr(&kvm_device_attr {
        group,
        attr,
        addr,
        flags: 0,
    })
}

fn create_gic(vm: &VmFd, type_: u32) -> Result<DeviceFd, kvm_ioctls::Error> {
    let mut d = kvm_create_device {
        type_,
        fd: 0,
        flags: 0,
    };
    vm.create_device(&mut d)
}

/// The GIC's frames: (address type, address) for each region.
fn gic_regions(version: GicVersion) -> [(u64, u64); 2] {
    match version {
        GicVersion::V3 => [
            (u64::from(KVM_VGIC_V3_ADDR_TYPE_DIST), layout::GIC_DIST),
            (VGIC_V3_ADDR_TYPE_REDIST, layout::GIC_REDIST),
        ],
        GicVersion::V2 => [
            (u64::from(KVM_VGIC_V2_ADDR_TYPE_DIST), layout::GIC_DIST),
            (u64::from(KVM_VGIC_V2_ADDR_TYPE_CPU), layout::GIC_V2_CPU),
        ],
    }
}

/// VM-wide set-up before vCPUs exist: the in-kernel GICv3, or GICv2 when KVM has no v3.
pub fn setup_vm(vm: &VmFd) -> Result<ArchVm, ArchError> {
    let (gic, version) = match create_gic(vm, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3) {
        Ok(d) => (d, GicVersion::V3),
        Err(v3) => match create_gic(vm, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V2) {
            Ok(d) => {
                log::info!("KVM has no GICv3 ({v3}); using GICv2");
                (d, GicVersion::V2)
            }
            Err(v2) => return Err(ArchError::NoGic { v3, v2 }),
        },
    };
    for (kind, addr) in gic_regions(version) {
        set_attr(
            &gic,
            KVM_DEV_ARM_VGIC_GRP_ADDR,
            kind,
            std::ptr::addr_of!(addr) as u64,
        )
        .map_err(|e| ArchError::Kvm("VGIC address", e))?;
    }
    let nr_irqs: u32 = layout::GIC_NR_IRQS;
    set_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
        0,
        std::ptr::addr_of!(nr_irqs) as u64,
    )
    .map_err(|e| ArchError::Kvm("VGIC interrupt count", e))?;
    Ok(ArchVm { gic, version })
}

/// After every vCPU exists and before any runs: initialises the vGIC (KVM then accepts
/// irqfds).
pub fn finish_vcpus(arch: &ArchVm) -> Result<(), ArchError> {
    set_attr(
        &arch.gic,
        KVM_DEV_ARM_VGIC_GRP_CTRL,
        u64::from(KVM_DEV_ARM_VGIC_CTRL_INIT),
        0,
    )
    .map_err(|e| ArchError::Kvm("VGIC init", e))
}

/// Loads the kernel `Image` and the initramfs, writes the FDT; returns the entry point.
pub fn load_guest(mem: &GuestMemory, config: &Config, arch: &ArchVm) -> Result<u64, ArchError> {
    if config.cpus > layout::MAX_CPUS {
        return Err(ArchError::TooManyCpus {
            max: layout::MAX_CPUS,
            asked: config.cpus,
        });
    }
    let kpath = config.kernel.display().to_string();
    let mut kernel = File::open(&config.kernel).map_err(|e| ArchError::Read(kpath.clone(), e))?;
    let loaded = PE::load(
        mem,
        Some(GuestAddress(layout::KERNEL_BASE)),
        &mut kernel,
        None,
    )
    .map_err(|e| ArchError::Kernel(kpath, e))?;
    // The Image header's image_size (offset 16) covers the kernel's BSS too.
    let mut header = [0u8; 24];
    mem.read_slice(&mut header, loaded.kernel_load)
        .map_err(|_| ArchError::Memory("kernel"))?;
    let image_size = u64::from_le_bytes(header[16..24].try_into().unwrap_or([0; 8]));
    let kernel_end = loaded
        .kernel_end
        .max(loaded.kernel_load.0.saturating_add(image_size));

    let initrd = match &config.initramfs {
        Some(p) => {
            let body = std::fs::read(p).map_err(|e| ArchError::Read(p.display().to_string(), e))?;
            let len = body.len() as u64;
            let at = layout::initrd_addr(config.memory, kernel_end, len)
                .ok_or(ArchError::InitrdTooBig(len))?;
            mem.write_slice(&body, GuestAddress(at))
                .map_err(|_| ArchError::Memory("initramfs"))?;
            Some((at, len))
        }
        None => None,
    };
    let virtio = (0..config.devices.len())
        .map(|i| {
            layout::virtio_slot(i).ok_or(ArchError::TooManyDevices(layout::MAX_VIRTIO_DEVICES))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let blob = fdt::create(&FdtParams {
        cpus: config.cpus,
        memory: config.memory,
        cmdline: &config.cmdline,
        initrd,
        gic: arch.version,
        virtio,
    })
    .map_err(|e| ArchError::Fdt(e.to_string()))?;
    if blob.len() as u64 > layout::FDT_MAX_SIZE {
        return Err(ArchError::Fdt(format!("{} bytes is too large", blob.len())));
    }
    mem.write_slice(&blob, GuestAddress(layout::FDT_ADDR))
        .map_err(|_| ArchError::Memory("device tree"))?;
    Ok(loaded.kernel_load.0)
}

fn set_core_reg(vcpu: &VcpuFd, reg: u64, value: u64) -> Result<(), ArchError> {
    vcpu.set_one_reg(CORE_REG | reg, &value.to_le_bytes())
        .map(|_| ())
        .map_err(|e| ArchError::Kvm("SET_ONE_REG", e))
}

/// Sets up vCPU `id`: `KVM_ARM_VCPU_INIT` with the preferred target and PSCI 0.2; vCPU 0
/// starts at `entry` with x0 = the FDT, the others powered off until PSCI `CPU_ON`.
pub fn configure_vcpu(
    _kvm: &kvm_ioctls::Kvm,
    vm: &VmFd,
    vcpu: &VcpuFd,
    id: u8,
    _count: u8,
    entry: u64,
) -> Result<(), ArchError> {
    let mut kvi = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut kvi)
        .map_err(|e| ArchError::Kvm("ARM_PREFERRED_TARGET", e))?;
    kvi.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    if id > 0 {
        kvi.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
    }
    vcpu.vcpu_init(&kvi)
        .map_err(|e| ArchError::Kvm("ARM_VCPU_INIT", e))?;
    if id == 0 {
        set_core_reg(vcpu, REG_PSTATE, PSTATE_EL1H_MASKED)?;
        set_core_reg(vcpu, REG_PC, entry)?;
        set_core_reg(vcpu, REG_X0, layout::FDT_ADDR)?;
    }
    Ok(())
}

/// The PL011 console at [`layout::UART`], its interrupt an irqfd on SPI 1.
pub fn add_platform_devices(
    buses: &Buses,
    _exit: &Arc<crate::devices::ExitSignal>,
    serial_out: Box<dyn Write + Send>,
    ops: &dyn VmOps,
) -> Result<Arc<Mutex<Pl011>>, VmmError> {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let irq = EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventFd)?;
    ops.register_irqfd(&irq, layout::UART_SPI)
        .map_err(VmmError::Irqfd)?;
    let uart = Arc::new(Mutex::new(Pl011::new(irq, serial_out)));
    buses
        .mmio
        .insert(uart.clone(), layout::UART, layout::UART_SIZE)
        .map_err(VmmError::Bus)?;
    Ok(uart)
}

/// Puts virtio device `index` (`backend`) in its virtio-mmio slot; returns its address.
pub fn add_virtio_device(
    buses: &Buses,
    index: usize,
    name: &str,
    backend: Box<dyn VirtioBackend>,
    ops: Arc<dyn VmOps>,
) -> Result<u64, VmmError> {
    let (addr, spi) = layout::virtio_slot(index).ok_or(VmmError::Arch(
        ArchError::TooManyDevices(layout::MAX_VIRTIO_DEVICES),
    ))?;
    let dev = VirtioMmioDevice::new(name.to_string(), backend, ops, addr, spi)
        .map_err(|e| VmmError::VirtioMmio(name.to_string(), e))?;
    buses
        .mmio
        .insert(Arc::new(Mutex::new(dev)), addr, layout::VIRTIO_MMIO_SIZE)
        .map_err(VmmError::Bus)?;
    Ok(addr)
}
