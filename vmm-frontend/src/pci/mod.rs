//! PCI bus 0 behind the 0xCF8 (address) / 0xCFC (data) configuration ports.
//!
//! Slot 0 is a host bridge (so Linux's configuration-mechanism sanity check passes); the
//! virtio devices take slots 1 and up, one function each. When the guest moves a BAR, the
//! root moves the device's range on the MMIO bus.

// Register and bit-field code: truncating casts here split or narrow register values to
// their architectural widths on purpose (every value is masked or range-checked first).
#![allow(clippy::cast_possible_truncation)]

pub mod config;
pub mod msix;

use std::sync::{Arc, Mutex};

use crate::bus::{Bus, BusDevice, SharedDevice};
use config::{BarMove, PciConfig, PciId};

/// Number of device slots on bus 0.
pub const NUM_SLOTS: usize = 32;

/// A PCI function as the root sees it.
pub trait PciDevice: Send {
    /// Reads configuration register `reg` (a 32-bit index).
    fn config_read(&mut self, reg: usize) -> u32;
    /// Writes `data` at byte `offset` of register `reg`; returns the BAR that moved, if any.
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) -> Option<BarMove>;
}

/// The host bridge at 00:00.0.
#[derive(Debug)]
pub struct HostBridge {
    config: PciConfig,
}

impl HostBridge {
    /// An Intel-vendor host bridge (class 06.00).
    pub fn new() -> Self {
        Self {
            config: PciConfig::new(PciId {
                vendor: 0x8086,
                device: 0x0d57,
                class: 0x06_0000,
                revision: 0,
                subsystem_vendor: 0,
                subsystem: 0,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) -> Option<BarMove> {
        self.config.write(reg, offset, data)
    }
}

struct Slot {
    device: Arc<Mutex<dyn PciDevice>>,
    mmio: Option<SharedDevice>,
}

/// Why a device could not be added.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// All 32 slots are taken.
    #[error("no free PCI slot (at most {} devices)", NUM_SLOTS - 1)]
    NoSlot,
    /// Its BAR could not be mapped.
    #[error("cannot map a BAR")]
    Bus(#[source] crate::bus::BusError),
}

/// The configuration-port device: bus 0 and its slots.
pub struct PciRoot {
    address: u32,
    slots: Vec<Option<Slot>>,
    mmio_bus: Arc<Bus>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let used = self.slots.iter().filter(|s| s.is_some()).count();
        f.debug_struct("PciRoot")
            .field("slots_used", &used)
            .finish()
    }
}

impl PciRoot {
    /// Bus 0 with the host bridge in slot 0; BARs are mapped on `mmio_bus`.
    pub fn new(mmio_bus: Arc<Bus>) -> Self {
        let mut slots: Vec<Option<Slot>> = (0..NUM_SLOTS).map(|_| None).collect();
        slots[0] = Some(Slot {
            device: Arc::new(Mutex::new(HostBridge::new())),
            mmio: None,
        });
        Self {
            address: 0,
            slots,
            mmio_bus,
        }
    }

    /// Puts `device` in the next free slot, its BARs `(base, len)` mapped to `mmio`;
    /// returns the slot number.
    pub fn add(
        &mut self,
        device: Arc<Mutex<dyn PciDevice>>,
        mmio: SharedDevice,
        bars: &[(u64, u64)],
    ) -> Result<usize, PciError> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciError::NoSlot)?;
        for &(base, len) in bars {
            self.mmio_bus
                .insert(Arc::clone(&mmio), base, len)
                .map_err(PciError::Bus)?;
        }
        self.slots[slot] = Some(Slot {
            device,
            mmio: Some(mmio),
        });
        Ok(slot)
    }

    /// The (slot, register) the address register selects, if it selects a present function
    /// on bus 0.
    fn target(&self) -> Option<(usize, usize)> {
        let a = self.address;
        let enabled = a & 0x8000_0000 != 0;
        let bus = (a >> 16) & 0xff;
        let slot = ((a >> 11) & 0x1f) as usize;
        let function = (a >> 8) & 0x7;
        let reg = ((a >> 2) & 0x3f) as usize;
        (enabled && bus == 0 && function == 0 && self.slots[slot].is_some()).then_some((slot, reg))
    }

    fn move_bar(&self, mmio: &SharedDevice, m: BarMove) {
        if m.old != 0 {
            self.mmio_bus.remove(m.old);
        }
        if let Err(e) = self.mmio_bus.insert(Arc::clone(mmio), m.new, m.len) {
            log::warn!("guest moved a BAR to {:#x}: {e}", m.new);
        }
    }
}

impl BusDevice for PciRoot {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
            return;
        }
        let byte = offset.wrapping_sub(4);
        let Some((slot, reg)) = self.target().filter(|_| byte < 4) else {
            data.fill(0xff);
            return;
        };
        let Some(s) = &self.slots[slot] else { return };
        let v = s
            .device
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .config_read(reg);
        let bytes = v.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(byte as usize + i).copied().unwrap_or(0xff);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            let mut b = [0u8; 4];
            b.copy_from_slice(data);
            self.address = u32::from_le_bytes(b);
            return;
        }
        let byte = offset.wrapping_sub(4);
        let Some((slot, reg)) = self.target().filter(|_| byte < 4) else {
            return;
        };
        let Some(s) = &self.slots[slot] else { return };
        let moved = s
            .device
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .config_write(reg, byte as usize, data);
        if let (Some(m), Some(mmio)) = (moved, &s.mmio) {
            self.move_bar(mmio, m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::tests::Recorder;

    fn cf8(root: &mut PciRoot, slot: u32, reg: u32) {
        root.write(
            0xcf8,
            0,
            &(0x8000_0000 | (slot << 11) | (reg << 2)).to_le_bytes(),
        );
    }

    fn read32(root: &mut PciRoot, slot: u32, reg: u32) -> u32 {
        cf8(root, slot, reg);
        let mut b = [0u8; 4];
        root.read(0xcf8, 4, &mut b);
        u32::from_le_bytes(b)
    }

    struct Dev(PciConfig);
    impl PciDevice for Dev {
        fn config_read(&mut self, reg: usize) -> u32 {
            self.0.read_reg(reg)
        }
        fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) -> Option<BarMove> {
            self.0.write(reg, offset, data)
        }
    }

    #[test]
    fn scan_finds_host_bridge_and_device() {
        let bus = Arc::new(Bus::new());
        let mut root = PciRoot::new(bus.clone());
        // Linux's type-1 probe: the address register reads back.
        root.write(0xcf8, 3, &[1]);
        root.write(0xcf8, 0, &0x8000_0000u32.to_le_bytes());
        let mut b = [0u8; 4];
        root.read(0xcf8, 0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0000);
        assert_eq!(read32(&mut root, 0, 0), 0x0d57_8086);
        assert_eq!(read32(&mut root, 0, 2) >> 8, 0x06_0000);
        assert_eq!(read32(&mut root, 1, 0), u32::MAX, "empty slot");

        let mut cfg = PciConfig::new(PciId {
            vendor: 0x1af4,
            device: 0x1042,
            class: 0x018000,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        cfg.add_mem_bar(0, 0x1000).expect("bar");
        cfg.set_bar_addr(0, 0xc000_0000);
        let rec = Arc::new(Mutex::new(Recorder::default()));
        let slot = root
            .add(
                Arc::new(Mutex::new(Dev(cfg))),
                rec.clone(),
                &[(0xc000_0000, 0x1000)],
            )
            .expect("add");
        assert_eq!(slot, 1);
        assert_eq!(read32(&mut root, 1, 0), 0x1042_1af4);
        // Byte and word reads at an offset into the data port.
        cf8(&mut root, 1, 0);
        let mut w = [0u8; 2];
        root.read(0xcf8, 6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1042);
        // Function 1 does not exist.
        root.write(
            0xcf8,
            0,
            &(0x8000_0000u32 | (1 << 11) | (1 << 8)).to_le_bytes(),
        );
        root.read(0xcf8, 4, &mut b);
        assert_eq!(b, [0xff; 4]);

        // Moving the BAR moves the MMIO range.
        assert!(bus.resolve(0xc000_0000).is_some());
        cf8(&mut root, 1, 4);
        root.write(0xcf8, 4, &0xd000_0000u32.to_le_bytes());
        assert!(bus.resolve(0xc000_0000).is_none());
        assert!(bus.write(0xd000_0010, &[1]));
        assert_eq!(
            rec.lock().expect("lock").writes,
            vec![(0xd000_0000, 0x10, vec![1])]
        );
    }
}
