//! A modern (virtio 1.x only) virtio-pci function whose device is a `VirtioBackend`.
//!
//! BAR 0 (32-bit memory, 32 KiB) holds every structure:
//!
//! ```text
//! 0x0000 common configuration      0x3000 notifications (queue i at 0x3000 + 4 i)
//! 0x1000 ISR status                0x4000 MSI-X table
//! 0x2000 device configuration      0x6000 MSI-X pending bits
//! ```
//!
//! Each queue's notification address is a KVM ioeventfd (the backend's kick fd) and each
//! MSI-X vector a KVM irqfd on an MSI route (the backend's call fd): once the driver sets
//! DRIVER_OK, no virtqueue traffic passes through the VMM. A masked vector has its irqfd
//! detached; its eventfd keeps counting, and KVM injects the pending interrupt when the
//! irqfd is attached again on unmask.

// Register and bit-field code: truncating casts here split or narrow register values to
// their architectural widths on purpose (every value is masked or range-checked first).
#![allow(clippy::cast_possible_truncation)]

pub mod common;

use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::BusDevice;
use crate::pci::config::{BarMove, PciConfig, PciId};
use crate::pci::msix::{MsiMessage, MsixTable};
use crate::pci::PciDevice;
use crate::vm_ops::VmOps;
use common::{status, CommonConfig, CommonEvent, COMMON_CFG_SIZE, NO_VECTOR};

/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
/// Offsets of the structures in BAR 0.
pub const COMMON_OFFSET: u64 = 0x0000;
/// ISR status.
pub const ISR_OFFSET: u64 = 0x1000;
/// Device-specific configuration.
pub const DEVICE_OFFSET: u64 = 0x2000;
/// Size of the device configuration window.
pub const DEVICE_SIZE: u64 = 0x1000;
/// Notification area.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Distance between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// MSI-X table.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// MSI-X pending-bit array.
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
/// Most queues a device may have (table and notify area sizes).
pub const MAX_QUEUES: u16 = 511;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// A virtio device model behind the transport.
pub trait VirtioBackend: Send {
    /// Virtio device ID.
    fn device_type(&self) -> u16;
    /// Number of queues the guest sees.
    fn num_queues(&self) -> u16;
    /// Largest queue size.
    fn queue_max_size(&self) -> u16;
    /// Features offered to the guest.
    fn features(&self) -> u64;
    /// Reads device configuration space (out-of-range bytes read as zero).
    fn read_config(&mut self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's `features` and enabled `queues`.
    fn activate(&mut self, features: u64, queues: &[ActiveQueue<'_>]) -> Result<(), String>;
    /// Stops the device (virtio reset).
    fn reset(&mut self);
    /// Hands the backend the way to raise the configuration-change interrupt (a backend
    /// that learns its configuration changed outside a guest access, e.g. a disk that grew).
    fn set_config_interrupt(&mut self, _irq: ConfigInterrupt) {}
}

/// Raises a device's configuration-change interrupt from any thread: writes the eventfd of
/// the MSI-X vector the driver chose for configuration changes (its irqfd delivers it).
#[derive(Debug, Clone)]
pub struct ConfigInterrupt {
    state: Arc<ConfigIrqState>,
}

#[derive(Debug)]
struct ConfigIrqState {
    /// Duplicates of the device's vector eventfds.
    events: Vec<EventFd>,
    /// `config_msix_vector` as the driver set it.
    vector: std::sync::atomic::AtomicU16,
}

impl ConfigInterrupt {
    fn new(vectors: &[Vector]) -> std::io::Result<Self> {
        Ok(ConfigInterrupt {
            state: Arc::new(ConfigIrqState {
                events: vectors
                    .iter()
                    .map(|v| v.event.try_clone())
                    .collect::<std::io::Result<_>>()?,
                vector: std::sync::atomic::AtomicU16::new(NO_VECTOR),
            }),
        })
    }

    fn set_vector(&self, vector: u16) {
        self.state
            .vector
            .store(vector, std::sync::atomic::Ordering::Release);
    }

    /// Signals the configuration change; false if the driver gave it no vector.
    pub fn trigger(&self) -> bool {
        let v = self.state.vector.load(std::sync::atomic::Ordering::Acquire);
        self.state
            .events
            .get(usize::from(v))
            .is_some_and(|e| e.write(1).is_ok())
    }
}

/// An enabled queue handed to `VirtioBackend::activate`.
#[derive(Debug)]
pub struct ActiveQueue<'a> {
    /// Queue index.
    pub index: u16,
    /// Queue size.
    pub size: u16,
    /// Descriptor table guest address.
    pub desc: u64,
    /// Available ring guest address.
    pub avail: u64,
    /// Used ring guest address.
    pub used: u64,
    /// The eventfd the guest's notification signals.
    pub kick: &'a EventFd,
    /// The eventfd that raises the queue's interrupt.
    pub call: &'a EventFd,
}

/// PCI class of a virtio device type.
pub fn pci_class(device_type: u16) -> u32 {
    match device_type {
        1 => 0x02_0000, // network controller
        2 => 0x01_8000, // other mass storage
        3 => 0x07_8000, // other communication
        _ => 0xff_0000, // unassigned
    }
}

struct Vector {
    gsi: u32,
    event: EventFd,
    attached: bool,
    route: Option<MsiMessage>,
}

/// Failure to build the function.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// Creating an eventfd failed.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// Out of GSIs.
    #[error("no free interrupt routes left")]
    NoGsi,
    /// The device asked for too many queues.
    #[error("{0} queues is more than the transport supports")]
    TooManyQueues(u16),
    /// Building configuration space failed.
    #[error("cannot build PCI configuration space")]
    Config(#[source] crate::pci::config::ConfigError),
    /// Registering a notification address failed.
    #[error("cannot register a queue notification address")]
    IoEvent(#[source] std::io::Error),
}

/// The virtio-pci function.
pub struct VirtioPciDevice {
    name: String,
    config: PciConfig,
    msix_cap: usize,
    msix: MsixTable,
    vectors: Vec<Vector>,
    common: CommonConfig,
    kicks: Vec<EventFd>,
    /// A call eventfd for queues the driver gave no vector.
    spare_call: EventFd,
    bar: u64,
    vm: Arc<dyn VmOps>,
    backend: Box<dyn VirtioBackend>,
    active: bool,
    config_irq: ConfigInterrupt,
}

impl std::fmt::Debug for VirtioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("name", &self.name)
            .field("bar", &self.bar)
            .finish()
    }
}

fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let len: u8 = if extra.is_some() { 20 } else { 16 };
    let mut c = vec![0x09, 0, len, cfg_type, 0, 0, 0, 0];
    c.extend_from_slice(&(offset as u32).to_le_bytes());
    c.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(x) = extra {
        c.extend_from_slice(&x.to_le_bytes());
    }
    c
}

impl VirtioPciDevice {
    /// A function for `backend`, its BAR 0 at `bar` (in the 32-bit window).
    pub fn new(
        name: String,
        mut backend: Box<dyn VirtioBackend>,
        vm: Arc<dyn VmOps>,
        bar: u32,
    ) -> Result<Self, VirtioPciError> {
        let nq = backend.num_queues();
        if nq == 0 || nq > MAX_QUEUES {
            return Err(VirtioPciError::TooManyQueues(nq));
        }
        let nvec = nq + 1;
        let dt = backend.device_type();
        let mut config = PciConfig::new(PciId {
            vendor: 0x1af4,
            device: 0x1040 + dt,
            class: pci_class(dt),
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        config
            .add_mem_bar(0, BAR_SIZE)
            .map_err(VirtioPciError::Config)?;
        config.set_bar_addr(0, bar);
        let mut msix_cap = vec![0x11, 0];
        msix_cap.extend_from_slice(&(nvec - 1).to_le_bytes());
        msix_cap.extend_from_slice(&(MSIX_TABLE_OFFSET as u32).to_le_bytes());
        msix_cap.extend_from_slice(&(MSIX_PBA_OFFSET as u32).to_le_bytes());
        let msix_off = config
            .add_capability(&msix_cap)
            .map_err(VirtioPciError::Config)?;
        config.set_writable_u16(msix_off + 2, 0xc000);
        for cap in [
            virtio_cap(1, COMMON_OFFSET, COMMON_CFG_SIZE, None),
            virtio_cap(3, ISR_OFFSET, 4, None),
            virtio_cap(4, DEVICE_OFFSET, DEVICE_SIZE, None),
            virtio_cap(
                2,
                NOTIFY_OFFSET,
                u64::from(nq) * u64::from(NOTIFY_MULTIPLIER),
                Some(NOTIFY_MULTIPLIER),
            ),
        ] {
            config
                .add_capability(&cap)
                .map_err(VirtioPciError::Config)?;
        }
        let mut vectors = Vec::with_capacity(usize::from(nvec));
        for _ in 0..nvec {
            let gsi = vm.allocate_gsi().ok_or(VirtioPciError::NoGsi)?;
            let event = EventFd::new(EFD_NONBLOCK).map_err(VirtioPciError::EventFd)?;
            vectors.push(Vector {
                gsi,
                event,
                attached: false,
                route: None,
            });
        }
        let kicks = (0..nq)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VirtioPciError::EventFd)?;
        let common = CommonConfig::new(backend.features(), nq, backend.queue_max_size(), nvec);
        let config_irq = ConfigInterrupt::new(&vectors).map_err(VirtioPciError::EventFd)?;
        backend.set_config_interrupt(config_irq.clone());
        let dev = Self {
            name,
            config,
            msix_cap: msix_off,
            msix: MsixTable::new(nvec),
            vectors,
            common,
            kicks,
            spare_call: EventFd::new(EFD_NONBLOCK).map_err(VirtioPciError::EventFd)?,
            bar: u64::from(bar),
            vm,
            backend,
            active: false,
            config_irq,
        };
        dev.register_ioevents(dev.bar)
            .map_err(VirtioPciError::IoEvent)?;
        Ok(dev)
    }

    /// The device's name (for logs).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// BAR 0's address and size.
    pub fn bar(&self) -> (u64, u64) {
        (self.bar, BAR_SIZE)
    }

    fn register_ioevents(&self, bar: u64) -> std::io::Result<()> {
        for (i, k) in self.kicks.iter().enumerate() {
            self.vm.register_ioevent(
                k,
                bar + NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_MULTIPLIER),
            )?;
        }
        Ok(())
    }

    fn unregister_ioevents(&self, bar: u64) {
        for (i, k) in self.kicks.iter().enumerate() {
            let addr = bar + NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_MULTIPLIER);
            if let Err(e) = self.vm.unregister_ioevent(k, addr) {
                log::warn!(
                    "{}: cannot unregister notify address {addr:#x}: {e}",
                    self.name
                );
            }
        }
    }

    /// Brings vector `v`'s route and irqfd in line with the MSI-X state.
    fn update_vector(&mut self, v: usize) {
        let deliver = self.msix.deliverable(v);
        let msg = self.msix.entry(v).map(crate::pci::msix::MsixEntry::message);
        let Some(vec) = self.vectors.get_mut(v) else {
            return;
        };
        let name = &self.name;
        if deliver {
            if vec.route != msg {
                if let Err(e) = self.vm.set_msi_route(vec.gsi, msg) {
                    log::warn!("{name}: cannot route MSI-X vector {v}: {e}");
                    return;
                }
                vec.route = msg;
            }
            if !vec.attached {
                match self.vm.register_irqfd(&vec.event, vec.gsi) {
                    Ok(()) => vec.attached = true,
                    Err(e) => log::warn!("{name}: cannot attach MSI-X vector {v}: {e}"),
                }
            }
        } else if vec.attached {
            match self.vm.unregister_irqfd(&vec.event, vec.gsi) {
                Ok(()) => vec.attached = false,
                Err(e) => log::warn!("{name}: cannot detach MSI-X vector {v}: {e}"),
            }
        }
    }

    fn update_all_vectors(&mut self) {
        for v in 0..self.vectors.len() {
            self.update_vector(v);
        }
    }

    fn activate(&mut self) {
        let queues: Vec<ActiveQueue<'_>> = self
            .common
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.enabled)
            .map(|(i, q)| ActiveQueue {
                index: i as u16,
                size: q.size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                kick: &self.kicks[i],
                call: self
                    .vectors
                    .get(usize::from(q.vector))
                    .filter(|_| q.vector != NO_VECTOR)
                    .map_or(&self.spare_call, |v| &v.event),
            })
            .collect();
        match self.backend.activate(self.common.driver_features, &queues) {
            Ok(()) => {
                self.active = true;
                log::info!("{}: started with {} queue(s)", self.name, queues.len());
            }
            Err(e) => {
                log::error!("{}: cannot start the device: {e}", self.name);
                self.common.status |= status::DEVICE_NEEDS_RESET;
            }
        }
    }

    fn reset(&mut self) {
        if self.active {
            self.backend.reset();
            self.active = false;
        }
        self.common.reset();
        // Drop stale kicks so a restarted backend does not see old notifications.
        for k in &self.kicks {
            let _ = k.read();
        }
    }

    fn notify(&self, offset: u64) {
        let q = offset / u64::from(NOTIFY_MULTIPLIER);
        if let Some(k) = usize::try_from(q).ok().and_then(|q| self.kicks.get(q)) {
            let _ = k.write(1);
        }
    }
}

impl BusDevice for VirtioPciDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o < ISR_OFFSET => self.common.read(o - COMMON_OFFSET, data),
            // MSI-X is always used, so the ISR has nothing to report.
            o if o < DEVICE_OFFSET => {}
            o if o < DEVICE_OFFSET + DEVICE_SIZE => {
                self.backend.read_config(o - DEVICE_OFFSET, data);
            }
            o if o < MSIX_TABLE_OFFSET => {}
            o if o < MSIX_PBA_OFFSET => self.msix.read(o - MSIX_TABLE_OFFSET, data),
            _ => {}
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match offset {
            o if o < ISR_OFFSET => match self.common.write(o - COMMON_OFFSET, data) {
                CommonEvent::None | CommonEvent::FeaturesOk => {
                    self.config_irq.set_vector(self.common.config_vector);
                }
                CommonEvent::Reset => {
                    self.reset();
                    self.config_irq.set_vector(self.common.config_vector);
                }
                CommonEvent::DriverOk => {
                    if self.common.driver_features & VIRTIO_F_VERSION_1 == 0 {
                        log::error!(
                            "{}: the driver did not accept VIRTIO_F_VERSION_1",
                            self.name
                        );
                        self.common.status |= status::DEVICE_NEEDS_RESET;
                    } else {
                        self.activate();
                    }
                }
            },
            o if o < DEVICE_OFFSET => {}
            o if o < DEVICE_OFFSET + DEVICE_SIZE => {
                self.backend.write_config(o - DEVICE_OFFSET, data);
            }
            o if o < MSIX_TABLE_OFFSET => self.notify(o - NOTIFY_OFFSET),
            o if o < MSIX_PBA_OFFSET => {
                if let Some(v) = self.msix.write(o - MSIX_TABLE_OFFSET, data) {
                    self.update_vector(v);
                }
            }
            _ => {}
        }
    }
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) -> Option<BarMove> {
        let moved = self.config.write(reg, offset, data);
        if reg == self.msix_cap / 4 {
            let control = self.config.word(self.msix_cap + 2);
            if self.msix.set_control(control) {
                self.update_all_vectors();
            }
        }
        if let Some(m) = moved {
            self.unregister_ioevents(m.old);
            if let Err(e) = self.register_ioevents(m.new) {
                log::error!(
                    "{}: cannot move notify addresses to {:#x}: {e}",
                    self.name,
                    m.new
                );
            }
            self.bar = m.new;
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm_ops::FakeVmOps;
    use std::sync::Mutex;

    /// (index, size, desc, avail, used) of an activated queue.
    type Queue = (u16, u16, u64, u64, u64);

    #[derive(Default)]
    struct Log {
        activations: Vec<(u64, Vec<Queue>)>,
        resets: usize,
        config_writes: Vec<(u64, Vec<u8>)>,
    }

    struct FakeBackend(Arc<Mutex<Log>>);

    impl VirtioBackend for FakeBackend {
        fn device_type(&self) -> u16 {
            2
        }
        fn num_queues(&self) -> u16 {
            2
        }
        fn queue_max_size(&self) -> u16 {
            256
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | (1 << 9)
        }
        fn read_config(&mut self, offset: u64, data: &mut [u8]) {
            let cfg = [0x11u8, 0x22, 0x33, 0x44];
            for (i, d) in data.iter_mut().enumerate() {
                *d = cfg.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.0
                .lock()
                .expect("lock")
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(&mut self, features: u64, queues: &[ActiveQueue<'_>]) -> Result<(), String> {
            let qs = queues
                .iter()
                .map(|q| (q.index, q.size, q.desc, q.avail, q.used))
                .collect();
            self.0
                .lock()
                .expect("lock")
                .activations
                .push((features, qs));
            Ok(())
        }
        fn reset(&mut self) {
            self.0.lock().expect("lock").resets += 1;
        }
    }

    fn device() -> (VirtioPciDevice, Arc<FakeVmOps>, Arc<Mutex<Log>>) {
        let vm = Arc::new(FakeVmOps::default());
        let log = Arc::new(Mutex::new(Log::default()));
        let d = VirtioPciDevice::new(
            "blk0".into(),
            Box::new(FakeBackend(log.clone())),
            vm.clone(),
            0xc000_0000,
        )
        .expect("device");
        (d, vm, log)
    }

    fn find_caps(d: &mut VirtioPciDevice) -> Vec<(u8, usize)> {
        let mut caps = Vec::new();
        let mut p = (d.config_read(13) & 0xff) as usize;
        while p != 0 && caps.len() < 16 {
            let r = d.config_read(p / 4);
            caps.push(((r & 0xff) as u8, p));
            p = ((r >> 8) & 0xff) as usize;
        }
        caps
    }

    #[test]
    fn identity_and_capabilities() {
        let (mut d, vm, _) = device();
        assert_eq!(d.config_read(0), 0x1042_1af4);
        assert_eq!(d.config_read(2) >> 8, 0x01_8000);
        assert_eq!(d.config_read(4), 0xc000_0000);
        let caps = find_caps(&mut d);
        let ids: Vec<u8> = caps.iter().map(|c| c.0).collect();
        assert_eq!(ids, [0x11, 0x09, 0x09, 0x09, 0x09]);
        // MSI-X: 3 vectors (2 queues + config), table and PBA in BAR 0.
        let m = caps[0].1;
        assert_eq!(d.config_read(m / 4) >> 16, 2);
        assert_eq!(d.config_read(m / 4 + 1), MSIX_TABLE_OFFSET as u32);
        assert_eq!(d.config_read(m / 4 + 2), MSIX_PBA_OFFSET as u32);
        // Virtio caps: type, bar, offset, length (and the notify multiplier).
        let vc: Vec<(u32, u32, u32)> = caps[1..]
            .iter()
            .map(|c| {
                (
                    d.config_read(c.1 / 4) >> 24,
                    d.config_read(c.1 / 4 + 2),
                    d.config_read(c.1 / 4 + 3),
                )
            })
            .collect();
        assert_eq!(
            vc,
            [
                (1, 0, 0x38),
                (3, 0x1000, 4),
                (4, 0x2000, 0x1000),
                (2, 0x3000, 8)
            ]
        );
        assert_eq!(d.config_read(caps[4].1 / 4 + 4), NOTIFY_MULTIPLIER);
        assert_eq!(
            *vm.ioevents.lock().expect("lock"),
            [0xc000_3000, 0xc000_3004]
        );
    }

    fn w(d: &mut VirtioPciDevice, off: u64, v: &[u8]) {
        d.write(0, off, v);
    }

    #[test]
    fn driver_sequence_activates_with_vectors() {
        let (mut d, vm, log) = device();
        // Enable MSI-X, program and unmask vector 1.
        let m = find_caps(&mut d)[0].1;
        d.config_write(m / 4, 2, &0x8000u16.to_le_bytes());
        w(
            &mut d,
            MSIX_TABLE_OFFSET + 16,
            &0xfee0_0000u32.to_le_bytes(),
        );
        w(&mut d, MSIX_TABLE_OFFSET + 24, &0x41u32.to_le_bytes());
        assert!(vm.irqfds.lock().expect("lock").is_empty(), "still masked");
        w(&mut d, MSIX_TABLE_OFFSET + 28, &0u32.to_le_bytes());
        let gsi1 = d.vectors[1].gsi;
        assert_eq!(*vm.irqfds.lock().expect("lock"), [gsi1]);
        assert_eq!(
            vm.routes.lock().expect("lock").get(&gsi1),
            Some(&MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            })
        );
        // Function mask detaches, unmask re-attaches.
        d.config_write(m / 4, 2, &0xc000u16.to_le_bytes());
        assert!(vm.irqfds.lock().expect("lock").is_empty());
        d.config_write(m / 4, 2, &0x8000u16.to_le_bytes());
        assert_eq!(*vm.irqfds.lock().expect("lock"), [gsi1]);

        w(&mut d, 0x14, &[status::ACKNOWLEDGE | status::DRIVER]);
        w(&mut d, 0x08, &1u32.to_le_bytes());
        w(&mut d, 0x0c, &1u32.to_le_bytes());
        w(&mut d, 0x14, &[0x0b]);
        w(&mut d, 0x16, &0u16.to_le_bytes());
        w(&mut d, 0x18, &128u16.to_le_bytes());
        w(&mut d, 0x1a, &1u16.to_le_bytes());
        w(&mut d, 0x20, &0x1_0000u32.to_le_bytes());
        w(&mut d, 0x28, &0x2_0000u32.to_le_bytes());
        w(&mut d, 0x30, &0x3_0000u32.to_le_bytes());
        w(&mut d, 0x1c, &1u16.to_le_bytes());
        w(&mut d, 0x14, &[0x0f]);
        let acts = log.lock().expect("lock").activations.clone();
        assert_eq!(
            acts,
            [(
                VIRTIO_F_VERSION_1,
                vec![(0, 128, 0x1_0000, 0x2_0000, 0x3_0000)]
            )]
        );
        // Device config reads go to the backend, past-the-end reads zero.
        let mut b = [0u8; 2];
        d.read(0, DEVICE_OFFSET + 1, &mut b);
        assert_eq!(b, [0x22, 0x33]);
        d.read(0, DEVICE_OFFSET + 3, &mut b);
        assert_eq!(b, [0x44, 0]);
        w(&mut d, DEVICE_OFFSET + 2, &[9]);
        assert_eq!(log.lock().expect("lock").config_writes, [(2, vec![9])]);
        // Reset stops the backend and clears the state.
        w(&mut d, 0x14, &[0]);
        assert_eq!(log.lock().expect("lock").resets, 1);
        let mut s = [0xffu8];
        d.read(0, 0x14, &mut s);
        assert_eq!(s, [0]);
    }

    #[test]
    fn driver_without_version_1_is_refused() {
        let (mut d, _, log) = device();
        w(&mut d, 0x0c, &(1u32 << 9).to_le_bytes());
        w(&mut d, 0x14, &[0x0b]);
        w(&mut d, 0x14, &[0x0f]);
        assert!(log.lock().expect("lock").activations.is_empty());
        let mut s = [0u8];
        d.read(0, 0x14, &mut s);
        assert_ne!(s[0] & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn bar_move_moves_notify_addresses() {
        let (mut d, vm, _) = device();
        let m = d
            .config_write(4, 0, &0xd000_0000u32.to_le_bytes())
            .expect("moved");
        assert_eq!(m.new, 0xd000_0000);
        assert_eq!(
            *vm.ioevents.lock().expect("lock"),
            [0xd000_3000, 0xd000_3004]
        );
        assert_eq!(d.bar(), (0xd000_0000, BAR_SIZE));
    }

    #[test]
    fn notify_write_without_ioeventfd_kicks() {
        let (mut d, _, _) = device();
        w(&mut d, NOTIFY_OFFSET + 4, &1u16.to_le_bytes());
        assert_eq!(d.kicks[1].read().expect("kick"), 1);
        // Out-of-range queue notifications are ignored.
        w(&mut d, NOTIFY_OFFSET + 0x800, &1u16.to_le_bytes());
        w(&mut d, u64::MAX, &[1]);
    }
}
