//! A virtio-mmio (version 2, virtio 1.x only) device whose device is a `VirtioBackend`,
//! the transport of aarch64 guests: the kernel finds each device through its FDT node.
//!
//! The same vhost-user frontend sits behind it as behind virtio-pci; only the doorbell and
//! the interrupt differ:
//! - Notifications: the driver writes the queue index to `QueueNotify` (0x50). Each queue
//!   has a KVM ioeventfd on that address with a datamatch on its index, so a kick reaches
//!   the daemon without a VM exit.
//! - Interrupts: one line per device, an edge-triggered SPI. One eventfd, bound to the SPI
//!   by irqfd, is every queue's call fd, so the daemon's completions reach the guest
//!   without the VMM. Since the VMM does not see those signals, `InterruptStatus` always
//!   reports "used buffer" (bit 0): the driver then scans its queues' used rings, which
//!   is what it does for a real used-buffer interrupt, and finds nothing new on a spurious
//!   one. "Configuration change" (bit 1) is never reported: the daemons do not send it.

// Register code: casts narrow register values to their widths on purpose.
#![allow(clippy::cast_possible_truncation)]

use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::BusDevice;
use crate::virtio_pci::common::{status, QueueState};
use crate::virtio_pci::{ActiveQueue, VirtioBackend};
use crate::vm_ops::VmOps;

/// Size of the register window.
pub const MMIO_SIZE: u64 = 0x200;
/// "virt" in little-endian.
const MAGIC: u32 = 0x7472_6976;
const VERSION: u32 = 2;
const VENDOR: u32 = 0x554d_4551;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Most queues a device may have here.
pub const MAX_QUEUES: u16 = 64;

/// Register offsets (virtio 1.2, 4.2.2).
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Failure to build the device.
#[derive(Debug, thiserror::Error)]
pub enum VirtioMmioError {
    /// Creating an eventfd failed.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The device asked for too many queues.
    #[error("{0} queues is more than the transport supports")]
    TooManyQueues(u16),
    /// Registering a notification or the interrupt failed.
    #[error("cannot register the device's {0} with KVM")]
    Kvm(&'static str, #[source] std::io::Error),
}

/// The virtio-mmio device.
pub struct VirtioMmioDevice {
    name: String,
    base: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u8,
    queues: Vec<QueueState>,
    ready: Vec<bool>,
    kicks: Vec<EventFd>,
    call: EventFd,
    vm: Arc<dyn VmOps>,
    backend: Box<dyn VirtioBackend>,
    active: bool,
}

impl std::fmt::Debug for VirtioMmioDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioMmioDevice")
            .field("name", &self.name)
            .field("base", &self.base)
            .finish()
    }
}

fn set_half(v: &mut u64, high: bool, d: u32) {
    if high {
        *v = (*v & 0xffff_ffff) | (u64::from(d) << 32);
    } else {
        *v = (*v & !0xffff_ffff) | u64::from(d);
    }
}

impl VirtioMmioDevice {
    /// A device for `backend` at MMIO `base`, its interrupt on `gsi` (the SPI's index).
    pub fn new(
        name: String,
        backend: Box<dyn VirtioBackend>,
        vm: Arc<dyn VmOps>,
        base: u64,
        gsi: u32,
    ) -> Result<Self, VirtioMmioError> {
        let nq = backend.num_queues();
        if nq == 0 || nq > MAX_QUEUES {
            return Err(VirtioMmioError::TooManyQueues(nq));
        }
        let kicks = (0..nq)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VirtioMmioError::EventFd)?;
        let call = EventFd::new(EFD_NONBLOCK).map_err(VirtioMmioError::EventFd)?;
        for (i, k) in kicks.iter().enumerate() {
            vm.register_ioevent_datamatch(k, base + reg::QUEUE_NOTIFY, i as u32)
                .map_err(|e| VirtioMmioError::Kvm("queue notification", e))?;
        }
        vm.register_irqfd(&call, gsi)
            .map_err(|e| VirtioMmioError::Kvm("interrupt", e))?;
        let max = backend.queue_max_size();
        Ok(Self {
            name,
            base,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            queues: (0..nq).map(|_| QueueState::new(max)).collect(),
            ready: vec![false; usize::from(nq)],
            kicks,
            call,
            vm,
            backend,
            active: false,
        })
    }

    /// The device's name (for logs).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn queue(&mut self) -> Option<&mut QueueState> {
        let i = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(i)
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => u32::from(self.backend.device_type()),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.backend.features() as u32,
                1 => (self.backend.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.queue().map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => {
                let i = usize::try_from(self.queue_sel).unwrap_or(usize::MAX);
                u32::from(self.ready.get(i).copied().unwrap_or(false))
            }
            // See the module doc: the irqfd bypasses us, so "used buffer" is always set.
            reg::INTERRUPT_STATUS => 1,
            reg::STATUS => u32::from(self.status),
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        // Queue and feature registers are frozen once the device runs (virtio 1.2, 4.2.2.2).
        let running = self.status & status::DRIVER_OK != 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES if !running => match self.driver_features_sel {
                0 => set_half(&mut self.driver_features, false, v),
                1 => set_half(&mut self.driver_features, true, v),
                _ => {}
            },
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM if !running => {
                if let Some(q) = self.queue() {
                    let n = u16::try_from(v).unwrap_or(0);
                    // A size the device cannot take is kept out; activation skips the queue.
                    q.size = if n == 0 || n > q.max_size || !n.is_power_of_two() {
                        0
                    } else {
                        n
                    };
                }
            }
            reg::QUEUE_READY if !running => {
                let i = usize::try_from(self.queue_sel).unwrap_or(usize::MAX);
                if let Some(r) = self.ready.get_mut(i) {
                    *r = v & 1 == 1;
                }
            }
            // Without an ioeventfd (a write of another width), kick from here.
            reg::QUEUE_NOTIFY => {
                if let Some(k) = usize::try_from(v).ok().and_then(|i| self.kicks.get(i)) {
                    let _ = k.write(1);
                }
            }
            reg::INTERRUPT_ACK => {}
            reg::STATUS => self.set_status(v as u8),
            o @ (reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH)
                if !running =>
            {
                let high = o & 4 != 0;
                if let Some(q) = self.queue() {
                    let field = match o & !4 {
                        reg::QUEUE_DESC_LOW => &mut q.desc,
                        reg::QUEUE_DRIVER_LOW => &mut q.avail,
                        _ => &mut q.used,
                    };
                    set_half(field, high, v);
                }
            }
            _ => {}
        }
    }

    fn set_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let was = self.status;
        self.status = v;
        if v & status::FEATURES_OK != 0
            && was & status::FEATURES_OK == 0
            && self.driver_features & VIRTIO_F_VERSION_1 == 0
        {
            log::error!(
                "{}: the driver did not accept VIRTIO_F_VERSION_1",
                self.name
            );
            self.status &= !status::FEATURES_OK;
            return;
        }
        if v & status::DRIVER_OK != 0 && was & status::DRIVER_OK == 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let features = self.driver_features & self.backend.features();
        let queues: Vec<ActiveQueue<'_>> = self
            .queues
            .iter()
            .enumerate()
            .filter(|(i, q)| self.ready.get(*i).copied().unwrap_or(false) && q.size > 0)
            .map(|(i, q)| ActiveQueue {
                index: i as u16,
                size: q.size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                kick: &self.kicks[i],
                call: &self.call,
            })
            .collect();
        let n = queues.len();
        match self.backend.activate(features, &queues) {
            Ok(()) => {
                self.active = true;
                log::info!("{}: started with {n} queue(s)", self.name);
            }
            Err(e) => {
                log::error!("{}: cannot start the device: {e}", self.name);
                self.status |= status::DEVICE_NEEDS_RESET;
            }
        }
    }

    fn reset(&mut self) {
        if self.active {
            self.backend.reset();
            self.active = false;
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueState::new(q.max_size);
        }
        self.ready.fill(false);
        for k in &self.kicks {
            let _ = k.read();
        }
    }
}

impl Drop for VirtioMmioDevice {
    fn drop(&mut self) {
        for (i, k) in self.kicks.iter().enumerate() {
            let _ =
                self.vm
                    .unregister_ioevent_datamatch(k, self.base + reg::QUEUE_NOTIFY, i as u32);
        }
    }
}

impl BusDevice for VirtioMmioDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= reg::CONFIG {
            self.backend.read_config(offset - reg::CONFIG, data);
            return;
        }
        // Registers are 32-bit and aligned (4.2.2.2); other accesses read as zero.
        if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.backend.write_config(offset - reg::CONFIG, data);
            return;
        }
        if let (Ok(b), 0) = (<[u8; 4]>::try_from(data), offset % 4) {
            self.write_reg(offset, u32::from_le_bytes(b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm_ops::FakeVmOps;
    use std::sync::Mutex;

    type Queue = (u16, u16, u64, u64, u64);

    #[derive(Default)]
    struct Log {
        activations: Vec<(u64, Vec<Queue>, bool)>,
        resets: usize,
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
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(&mut self, features: u64, queues: &[ActiveQueue<'_>]) -> Result<(), String> {
            let same_call = queues
                .windows(2)
                .all(|w| std::ptr::eq(w[0].call, w[1].call));
            let qs = queues
                .iter()
                .map(|q| (q.index, q.size, q.desc, q.avail, q.used))
                .collect();
            self.0
                .lock()
                .expect("lock")
                .activations
                .push((features, qs, same_call));
            Ok(())
        }
        fn reset(&mut self) {
            self.0.lock().expect("lock").resets += 1;
        }
    }

    const BASE: u64 = 0x0a00_0000;

    fn device() -> (VirtioMmioDevice, Arc<FakeVmOps>, Arc<Mutex<Log>>) {
        let vm = Arc::new(FakeVmOps::default());
        let log = Arc::new(Mutex::new(Log::default()));
        let d = VirtioMmioDevice::new(
            "blk0".into(),
            Box::new(FakeBackend(log.clone())),
            vm.clone(),
            BASE,
            16,
        )
        .expect("device");
        (d, vm, log)
    }

    fn r(d: &mut VirtioMmioDevice, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.read(BASE, off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(d: &mut VirtioMmioDevice, off: u64, v: u32) {
        d.write(BASE, off, &v.to_le_bytes());
    }

    #[test]
    fn identity_doorbells_and_interrupt() {
        let (mut d, vm, _) = device();
        assert_eq!(r(&mut d, reg::MAGIC), 0x7472_6976);
        assert_eq!(r(&mut d, reg::VERSION), 2);
        assert_eq!(r(&mut d, reg::DEVICE_ID), 2);
        assert_eq!(r(&mut d, reg::DEVICE_FEATURES), 1 << 9);
        w(&mut d, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut d, reg::DEVICE_FEATURES), 1);
        assert_eq!(
            *vm.datamatch.lock().expect("lock"),
            [(BASE + 0x50, 0), (BASE + 0x50, 1)]
        );
        assert_eq!(*vm.irqfds.lock().expect("lock"), [16]);
        assert_eq!(r(&mut d, reg::INTERRUPT_STATUS), 1);
        drop(d);
        assert!(vm.datamatch.lock().expect("lock").is_empty());
    }

    #[test]
    fn driver_sequence_activates_with_one_call_fd() {
        let (mut d, _, log) = device();
        w(
            &mut d,
            reg::STATUS,
            u32::from(status::ACKNOWLEDGE | status::DRIVER),
        );
        w(&mut d, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut d, reg::DRIVER_FEATURES, 1);
        w(&mut d, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut d, reg::DRIVER_FEATURES, 1 << 9);
        w(&mut d, reg::STATUS, 0x0b);
        assert_eq!(r(&mut d, reg::STATUS), 0x0b, "FEATURES_OK kept");
        for q in 0..2u32 {
            w(&mut d, reg::QUEUE_SEL, q);
            assert_eq!(r(&mut d, reg::QUEUE_NUM_MAX), 256);
            assert_eq!(r(&mut d, reg::QUEUE_READY), 0);
            w(&mut d, reg::QUEUE_NUM, 128);
            w(&mut d, reg::QUEUE_DESC_LOW, 0x1_0000 * (q + 1));
            w(&mut d, reg::QUEUE_DESC_HIGH, 1);
            w(&mut d, reg::QUEUE_DRIVER_LOW, 0x2_0000 * (q + 1));
            w(&mut d, reg::QUEUE_DEVICE_LOW, 0x3_0000 * (q + 1));
            w(&mut d, reg::QUEUE_READY, 1);
            assert_eq!(r(&mut d, reg::QUEUE_READY), 1);
        }
        w(&mut d, reg::STATUS, 0x0f);
        let acts = std::mem::take(&mut log.lock().expect("lock").activations);
        assert_eq!(
            acts,
            [(
                VIRTIO_F_VERSION_1 | (1 << 9),
                vec![
                    (0, 128, 0x1_0001_0000, 0x2_0000, 0x3_0000),
                    (1, 128, 0x1_0002_0000, 0x4_0000, 0x6_0000)
                ],
                true
            )]
        );
        // Queue registers are frozen while running.
        w(&mut d, reg::QUEUE_NUM, 16);
        // Config space goes to the backend; past-the-end reads zero.
        let mut b = [0u8; 2];
        d.read(BASE, reg::CONFIG + 1, &mut b);
        assert_eq!(b, [0x22, 0x33]);
        d.read(BASE, reg::CONFIG + 3, &mut b);
        assert_eq!(b, [0x44, 0]);
        w(&mut d, reg::STATUS, 0);
        assert_eq!(log.lock().expect("lock").resets, 1);
        assert_eq!(r(&mut d, reg::STATUS), 0);
        w(&mut d, reg::QUEUE_SEL, 0);
        assert_eq!(r(&mut d, reg::QUEUE_READY), 0);
    }

    #[test]
    fn hostile_driver_is_contained() {
        let (mut d, _, log) = device();
        // No VERSION_1: FEATURES_OK does not stick, nothing starts.
        w(&mut d, reg::DRIVER_FEATURES, 1 << 9);
        w(&mut d, reg::STATUS, 0x0b);
        assert_eq!(r(&mut d, reg::STATUS) & u32::from(status::FEATURES_OK), 0);
        // Bad queue sizes and selectors, odd widths and offsets: ignored.
        w(&mut d, reg::QUEUE_SEL, 7);
        w(&mut d, reg::QUEUE_NUM, 64);
        assert_eq!(r(&mut d, reg::QUEUE_NUM_MAX), 0);
        w(&mut d, reg::QUEUE_SEL, 0);
        w(&mut d, reg::QUEUE_NUM, 100);
        w(&mut d, reg::QUEUE_READY, 1);
        w(&mut d, reg::QUEUE_NOTIFY, 99);
        d.write(BASE, reg::STATUS, &[0x0f]);
        d.write(BASE, 0x71, &[1, 2, 3, 4]);
        let mut b = [0u8; 3];
        d.read(BASE, reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0, 0]);
        w(&mut d, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut d, reg::DRIVER_FEATURES, 1);
        w(&mut d, reg::STATUS, 0x0b);
        w(&mut d, reg::STATUS, 0x0f);
        // Queue 0's size 100 is not a power of two: it is left out.
        let acts = &log.lock().expect("lock").activations;
        assert_eq!(acts.len(), 1);
        assert!(acts[0].1.is_empty());
        // A notify without ioeventfd kicks the queue.
        w(&mut d, reg::QUEUE_NOTIFY, 1);
        assert_eq!(d.kicks[1].read().expect("kick"), 1);
    }
}
