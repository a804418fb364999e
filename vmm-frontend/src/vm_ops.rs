//! The few KVM VM operations devices need (ioeventfds, MSI routes, irqfds), behind a trait
//! so device logic is tested against a recording fake instead of `/dev/kvm`.

// Register and bit-field code: truncating casts here split or narrow register values to
// their architectural widths on purpose (every value is masked or range-checked first).
#![allow(clippy::cast_possible_truncation)]

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::pci::msix::MsiMessage;

/// VM-level operations a device performs.
pub trait VmOps: Send + Sync {
    /// Makes guest writes to MMIO `addr` signal `fd` without a VM exit.
    fn register_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()>;
    /// Undoes `register_ioevent`.
    fn unregister_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()>;
    /// Makes guest 32-bit writes of `value` to MMIO `addr` signal `fd` without a VM exit
    /// (virtio-mmio's one `QueueNotify` register, one queue index per eventfd).
    fn register_ioevent_datamatch(&self, fd: &EventFd, addr: u64, value: u32) -> io::Result<()>;
    /// Undoes `register_ioevent_datamatch`.
    fn unregister_ioevent_datamatch(&self, fd: &EventFd, addr: u64, value: u32) -> io::Result<()>;
    /// A fresh GSI for an MSI route, or None when they ran out.
    fn allocate_gsi(&self) -> Option<u32>;
    /// Sets (or with None removes) the MSI route of `gsi`.
    fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()>;
    /// Makes a signal on `fd` inject `gsi`.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
    /// Undoes `register_irqfd`.
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
}

/// A routing table entry we keep to rebuild the full table on every change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// An interrupt controller pin: (chip, pin).
    Irqchip(u32, u32),
    /// An MSI message.
    Msi(MsiMessage),
}

/// `VmOps` on a KVM VM, with the GSI routing table it owns.
#[derive(Debug)]
pub struct KvmVmOps {
    vm: Arc<VmFd>,
    routes: Mutex<BTreeMap<u32, Vec<Route>>>,
    next_gsi: AtomicU32,
}

fn kvm_err(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

impl KvmVmOps {
    /// Wraps `vm`; `legacy` are the fixed irqchip routes (GSI, chip, pin) that the routing
    /// table must keep, and MSI GSIs are allocated from `first_msi_gsi`.
    pub fn new(vm: Arc<VmFd>, legacy: &[(u32, u32, u32)], first_msi_gsi: u32) -> Self {
        let mut routes: BTreeMap<u32, Vec<Route>> = BTreeMap::new();
        for &(gsi, chip, pin) in legacy {
            routes
                .entry(gsi)
                .or_default()
                .push(Route::Irqchip(chip, pin));
        }
        Self {
            vm,
            routes: Mutex::new(routes),
            next_gsi: AtomicU32::new(first_msi_gsi),
        }
    }

    /// The VM.
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    fn commit(&self, routes: &BTreeMap<u32, Vec<Route>>) -> io::Result<()> {
        let entries: Vec<kvm_bindings::kvm_irq_routing_entry> = routes
            .iter()
            .flat_map(|(gsi, rs)| rs.iter().map(move |r| to_kvm(*gsi, *r)))
            .collect();
        let table = kvm_bindings::KvmIrqRouting::from_entries(&entries)
            .map_err(|_| io::Error::other("too many GSI routes"))?;
        self.vm.set_gsi_routing(&table).map_err(kvm_err)
    }

    /// Installs the initial (legacy) routing table.
    pub fn commit_initial(&self) -> io::Result<()> {
        let routes = self
            .routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.commit(&routes)
    }
}

fn to_kvm(gsi: u32, r: Route) -> kvm_bindings::kvm_irq_routing_entry {
    let mut e = kvm_bindings::kvm_irq_routing_entry {
        gsi,
        ..Default::default()
    };
    match r {
        Route::Irqchip(chip, pin) => {
            e.type_ = kvm_bindings::KVM_IRQ_ROUTING_IRQCHIP;
            e.u.irqchip = kvm_bindings::kvm_irq_routing_irqchip { irqchip: chip, pin };
        }
        Route::Msi(m) => {
            e.type_ = kvm_bindings::KVM_IRQ_ROUTING_MSI;
            e.u.msi = kvm_bindings::kvm_irq_routing_msi {
                address_lo: m.address as u32,
                address_hi: (m.address >> 32) as u32,
                data: m.data,
                ..Default::default()
            };
        }
    }
    e
}

impl VmOps for KvmVmOps {
    fn register_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        self.vm
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(kvm_err)
    }

    fn unregister_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        self.vm
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(kvm_err)
    }

    fn register_ioevent_datamatch(&self, fd: &EventFd, addr: u64, value: u32) -> io::Result<()> {
        self.vm
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), value)
            .map_err(kvm_err)
    }

    fn unregister_ioevent_datamatch(&self, fd: &EventFd, addr: u64, value: u32) -> io::Result<()> {
        self.vm
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), value)
            .map_err(kvm_err)
    }

    fn allocate_gsi(&self) -> Option<u32> {
        let gsi = self.next_gsi.fetch_add(1, Ordering::Relaxed);
        (gsi < 4096).then_some(gsi)
    }

    fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
        let mut routes = self
            .routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match msg {
            Some(m) => routes.insert(gsi, vec![Route::Msi(m)]),
            None => routes.remove(&gsi),
        };
        self.commit(&routes)
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.vm.register_irqfd(fd, gsi).map_err(kvm_err)
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.vm.unregister_irqfd(fd, gsi).map_err(kvm_err)
    }
}

/// A `VmOps` that records what it is asked, for tests.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct FakeVmOps {
    /// Registered ioeventfd addresses.
    pub ioevents: Mutex<Vec<u64>>,
    /// Current MSI routes.
    pub routes: Mutex<BTreeMap<u32, MsiMessage>>,
    /// GSIs with an irqfd.
    pub irqfds: Mutex<Vec<u32>>,
    /// Registered (address, datamatch) ioeventfds.
    pub datamatch: Mutex<Vec<(u64, u32)>>,
    next: AtomicU32,
}

#[cfg(test)]
impl VmOps for FakeVmOps {
    fn register_ioevent(&self, _fd: &EventFd, addr: u64) -> io::Result<()> {
        self.ioevents.lock().expect("lock").push(addr);
        Ok(())
    }
    fn unregister_ioevent(&self, _fd: &EventFd, addr: u64) -> io::Result<()> {
        self.ioevents.lock().expect("lock").retain(|a| *a != addr);
        Ok(())
    }
    fn register_ioevent_datamatch(&self, _fd: &EventFd, addr: u64, value: u32) -> io::Result<()> {
        self.datamatch.lock().expect("lock").push((addr, value));
        Ok(())
    }
    fn unregister_ioevent_datamatch(&self, _fd: &EventFd, addr: u64, value: u32) -> io::Result<()> {
        self.datamatch
            .lock()
            .expect("lock")
            .retain(|e| *e != (addr, value));
        Ok(())
    }
    fn allocate_gsi(&self) -> Option<u32> {
        Some(24 + self.next.fetch_add(1, Ordering::Relaxed))
    }
    fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
        let mut r = self.routes.lock().expect("lock");
        match msg {
            Some(m) => r.insert(gsi, m),
            None => r.remove(&gsi),
        };
        Ok(())
    }
    fn register_irqfd(&self, _fd: &EventFd, gsi: u32) -> io::Result<()> {
        let mut v = self.irqfds.lock().expect("lock");
        if v.contains(&gsi) {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        v.push(gsi);
        Ok(())
    }
    fn unregister_irqfd(&self, _fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.irqfds.lock().expect("lock").retain(|g| *g != gsi);
        Ok(())
    }
}
