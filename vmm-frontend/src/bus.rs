//! Port-I/O and MMIO buses: address ranges mapped to devices.
//!
//! A vCPU exit is dispatched by looking the address up, cloning the device's `Arc` and
//! releasing the bus lock before locking the device, so a device may move its own ranges
//! (a PCI BAR being reprogrammed) without deadlocking against another vCPU.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device on a bus. `offset` is relative to the start of the range it was inserted with.
pub trait BusDevice: Send {
    /// Handles a read of `data.len()` bytes at `offset` into the range starting at `base`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Handles a write of `data` at `offset` into the range starting at `base`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// A shared, lockable bus device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Why an insertion was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Start of the range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// The range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// Start of the range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping address ranges, each served by a device.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges = self.ranges.read().map(|r| r.len()).unwrap_or(0);
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `[base, base + len)` to `device`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let mut ranges = self
            .ranges
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = ranges.range(..end).next_back();
        if let Some((b, e)) = before {
            if b.saturating_add(e.len) > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Removes the range that starts at `base`; true if there was one.
    pub fn remove(&self, base: u64) -> bool {
        self.ranges
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&base)
            .is_some()
    }

    /// The device covering `addr`, with its range start.
    pub fn resolve(&self, addr: u64) -> Option<(u64, SharedDevice)> {
        let ranges = self
            .ranges
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (base, entry) = ranges.range(..=addr).next_back()?;
        (addr - base < entry.len).then(|| (*base, Arc::clone(&entry.device)))
    }

    /// Dispatches a read; false (and `data` filled with ones) if nothing is mapped there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((base, dev)) => {
                dev.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .read(base, addr - base, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; false if nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((base, dev)) => {
                dev.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Records the accesses it gets and answers reads with its offset.
    #[derive(Default)]
    pub struct Recorder {
        pub writes: Vec<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset.to_le_bytes()[0]);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.writes.push((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x100, 0x10).expect("insert");
        assert_eq!(
            bus.insert(dev.clone(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(dev.clone(), 0xf8, 9),
            Err(BusError::Overlap { base: 0xf8, len: 9 })
        );
        bus.insert(dev.clone(), 0x110, 1).expect("adjacent");
        assert!(bus.insert(dev.clone(), u64::MAX, 2).is_err());
        let mut b = [0u8; 2];
        assert!(bus.read(0x105, &mut b));
        assert_eq!(b, [5, 5]);
        assert!(!bus.read(0x111, &mut b));
        assert_eq!(b, [0xff, 0xff]);
        assert!(bus.write(0x10f, &[1]));
        assert!(!bus.write(0xff, &[1]));
        assert_eq!(
            dev.lock().expect("lock").writes,
            vec![(0x100, 0xf, vec![1])]
        );
        assert!(bus.remove(0x100));
        assert!(!bus.write(0x10f, &[1]));
    }
}
