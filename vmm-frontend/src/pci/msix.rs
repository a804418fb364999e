//! The MSI-X table and pending-bit array of one function, as plain data: the virtio-pci
//! device applies the resulting routes and masks to KVM.

/// Size of one table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Vector control bit 0: masked.
const CTRL_MASKED: u32 = 1;

/// One vector's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// One table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixEntry {
    /// Address low 32 bits.
    pub addr_lo: u32,
    /// Address high 32 bits.
    pub addr_hi: u32,
    /// Message data.
    pub data: u32,
    /// Vector control.
    pub control: u32,
}

impl Default for MsixEntry {
    fn default() -> Self {
        // Every vector starts masked (PCI spec 6.8.2.9).
        Self {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            control: CTRL_MASKED,
        }
    }
}

impl MsixEntry {
    /// Whether the vector is masked by its own control bit.
    pub fn masked(&self) -> bool {
        self.control & CTRL_MASKED != 0
    }

    /// The message it sends.
    pub fn message(&self) -> MsiMessage {
        MsiMessage {
            address: (u64::from(self.addr_hi) << 32) | u64::from(self.addr_lo),
            data: self.data,
        }
    }
}

/// The table plus the function-level enable and mask bits of the capability.
#[derive(Debug, Clone)]
pub struct MsixTable {
    entries: Vec<MsixEntry>,
    /// Message control bit 15.
    pub enabled: bool,
    /// Message control bit 14.
    pub function_masked: bool,
}

impl MsixTable {
    /// A table of `n` masked vectors.
    pub fn new(n: u16) -> Self {
        Self {
            entries: vec![MsixEntry::default(); usize::from(n)],
            enabled: false,
            function_masked: false,
        }
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if there are no vectors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entry `v`.
    pub fn entry(&self, v: usize) -> Option<&MsixEntry> {
        self.entries.get(v)
    }

    /// Whether vector `v` may deliver now: MSI-X enabled, function and vector unmasked.
    pub fn deliverable(&self, v: usize) -> bool {
        self.enabled && !self.function_masked && self.entries.get(v).is_some_and(|e| !e.masked())
    }

    /// Updates enable/mask from a message-control value; true if either changed.
    pub fn set_control(&mut self, control: u16) -> bool {
        let (en, fm) = (control & 0x8000 != 0, control & 0x4000 != 0);
        let changed = en != self.enabled || fm != self.function_masked;
        self.enabled = en;
        self.function_masked = fm;
        changed
    }

    /// Reads the table at `offset` (4- or 8-byte aligned accesses; anything else reads 0).
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let mut value = 0u64;
        for (i, chunk) in [0u64, 4].iter().take(data.len() / 4).enumerate() {
            if let Some(d) = self.dword(offset + chunk) {
                value |= u64::from(d) << (32 * i);
            }
        }
        if matches!(data.len(), 4 | 8) && offset % 4 == 0 {
            data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
        }
    }

    fn dword(&self, offset: u64) -> Option<u32> {
        let e = self
            .entries
            .get(usize::try_from(offset / ENTRY_SIZE).ok()?)?;
        Some(match offset % ENTRY_SIZE {
            0 => e.addr_lo,
            4 => e.addr_hi,
            8 => e.data,
            12 => e.control,
            _ => return None,
        })
    }

    /// Writes the table; returns the vector touched, if the access was valid.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<usize> {
        if !matches!(data.len(), 4 | 8) || offset % 4 != 0 {
            return None;
        }
        let v = usize::try_from(offset / ENTRY_SIZE).ok()?;
        for (i, chunk) in data.chunks(4).enumerate() {
            let d = u32::from_le_bytes(chunk.try_into().ok()?);
            let off = offset + 4 * i as u64;
            let e = self
                .entries
                .get_mut(usize::try_from(off / ENTRY_SIZE).ok()?)?;
            match off % ENTRY_SIZE {
                0 => e.addr_lo = d,
                4 => e.addr_hi = d,
                8 => e.data = d,
                _ => e.control = d & CTRL_MASKED,
            }
        }
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_masked_and_disabled() {
        let t = MsixTable::new(3);
        assert_eq!(t.len(), 3);
        assert!((0..3).all(|v| t.entry(v).is_some_and(MsixEntry::masked)));
        assert!(!t.deliverable(0));
    }

    #[test]
    fn program_and_unmask() {
        let mut t = MsixTable::new(2);
        assert_eq!(t.write(16, &0xfee0_1000u32.to_le_bytes()), Some(1));
        assert_eq!(t.write(20, &0u32.to_le_bytes()), Some(1));
        assert_eq!(t.write(24, &0x4041u32.to_le_bytes()), Some(1));
        assert_eq!(t.write(28, &0u32.to_le_bytes()), Some(1));
        assert_eq!(
            t.entry(1).map(MsixEntry::message),
            Some(MsiMessage {
                address: 0xfee0_1000,
                data: 0x4041
            })
        );
        assert!(!t.deliverable(1), "MSI-X not enabled yet");
        assert!(t.set_control(0x8000));
        assert!(t.deliverable(1));
        assert!(!t.deliverable(0), "vector 0 still masked");
        assert!(t.set_control(0xc000));
        assert!(!t.deliverable(1), "function mask");
        assert!(!t.set_control(0xc000));
        let mut b = [0u8; 8];
        t.read(16, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0xfee0_1000);
        let mut c = [0u8; 4];
        t.read(28, &mut c);
        assert_eq!(c, [0; 4]);
    }

    #[test]
    fn hostile_accesses_are_ignored() {
        let mut t = MsixTable::new(1);
        assert_eq!(t.write(16, &[0; 4]), None, "past the table");
        assert_eq!(t.write(2, &[0; 4]), None, "unaligned");
        assert_eq!(t.write(0, &[0; 2]), None, "odd size");
        assert_eq!(t.write(u64::MAX - 3, &[0; 4]), None);
        let mut b = [0xffu8; 4];
        t.read(u64::MAX - 3, &mut b);
        assert_eq!(b, [0; 4]);
        let mut one = [0xffu8; 1];
        t.read(0, &mut one);
        assert_eq!(one, [0]);
        // Reserved control bits do not stick.
        t.write(12, &u32::MAX.to_le_bytes());
        let mut c = [0u8; 4];
        t.read(12, &mut c);
        assert_eq!(u32::from_le_bytes(c), 1);
    }
}
