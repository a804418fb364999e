//! A type-0 PCI configuration space: identity registers, 32-bit memory BARs, a capability
//! list, and a per-bit write mask so the guest can change only what it may.

// Register and bit-field code: truncating casts here split or narrow register values to
// their architectural widths on purpose (every value is masked or range-checked first).
#![allow(clippy::cast_possible_truncation)]

/// Number of 32-bit registers in the (legacy, 256-byte) configuration space.
pub const NUM_REGS: usize = 64;
/// Number of BARs in a type-0 header.
pub const NUM_BARS: usize = 6;
/// First byte available for capabilities.
pub const CAP_START: usize = 0x40;
const COMMAND_REG: usize = 1;
const BAR0_REG: usize = 4;
const CAP_PTR_REG: usize = 13;
const INTERRUPT_REG: usize = 15;
/// Status bit 4: a capability list is present.
const STATUS_CAP_LIST: u32 = 1 << 20;
/// Command bits a guest may set: I/O, memory, bus master, INTx disable.
const COMMAND_WRITABLE: u32 = 0x0407;

/// A BAR whose guest-programmed address changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMove {
    /// BAR index.
    pub index: usize,
    /// Previous base address.
    pub old: u64,
    /// New base address.
    pub new: u64,
    /// Size of the BAR.
    pub len: u64,
}

/// Identity of a PCI function.
#[derive(Debug, Clone, Copy)]
pub struct PciId {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code, subclass, programming interface (24 bits).
    pub class: u32,
    /// Revision.
    pub revision: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// The configuration space of one function.
#[derive(Debug, Clone)]
pub struct PciConfig {
    regs: [u32; NUM_REGS],
    wmask: [u32; NUM_REGS],
    bar_sizes: [u64; NUM_BARS],
    /// Where each BAR is decoded: the last address programmed that was not a sizing probe.
    bar_addrs: [u64; NUM_BARS],
    last_cap: Option<usize>,
    next_cap: usize,
}

/// Why a capability could not be added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// No room left in the 256-byte space.
    #[error("PCI capability of {0} bytes does not fit in configuration space")]
    NoRoom(usize),
    /// BAR size not a power of two of at least 16 bytes, or index out of range.
    #[error("invalid BAR {0} of {1:#x} bytes")]
    InvalidBar(usize, u64),
}

impl PciConfig {
    /// A type-0 header with `id`.
    pub fn new(id: PciId) -> Self {
        let mut regs = [0u32; NUM_REGS];
        regs[0] = u32::from(id.vendor) | (u32::from(id.device) << 16);
        regs[2] = (id.class << 8) | u32::from(id.revision);
        regs[11] = u32::from(id.subsystem_vendor) | (u32::from(id.subsystem) << 16);
        let mut wmask = [0u32; NUM_REGS];
        wmask[COMMAND_REG] = COMMAND_WRITABLE;
        // Interrupt line (byte 0 of register 15) is scratch for the OS; pin stays 0.
        wmask[INTERRUPT_REG] = 0xff;
        Self {
            regs,
            wmask,
            bar_sizes: [0; NUM_BARS],
            bar_addrs: [0; NUM_BARS],
            last_cap: None,
            next_cap: CAP_START,
        }
    }

    /// Declares BAR `index` as a 32-bit non-prefetchable memory BAR of `size` bytes.
    pub fn add_mem_bar(&mut self, index: usize, size: u64) -> Result<(), ConfigError> {
        let size32 = u32::try_from(size).map_err(|_| ConfigError::InvalidBar(index, size))?;
        if index >= NUM_BARS || !size32.is_power_of_two() || size32 < 16 {
            return Err(ConfigError::InvalidBar(index, size));
        }
        self.bar_sizes[index] = size;
        self.wmask[BAR0_REG + index] = !(size32 - 1);
        Ok(())
    }

    /// Sets BAR `index`'s base address (as firmware would).
    pub fn set_bar_addr(&mut self, index: usize, addr: u32) {
        if let Some(reg) = self.regs.get_mut(BAR0_REG + index) {
            *reg = addr & self.wmask[BAR0_REG + index];
            self.bar_addrs[index] = u64::from(*reg);
        }
    }

    /// BAR `index`'s base address.
    pub fn bar_addr(&self, index: usize) -> u64 {
        self.regs
            .get(BAR0_REG + index)
            .map_or(0, |r| u64::from(r & !0xf))
    }

    /// Whether memory decoding is enabled in the command register.
    pub fn memory_enabled(&self) -> bool {
        self.regs[COMMAND_REG] & 0x2 != 0
    }

    /// Appends a capability (its first byte the ID; the next pointer is filled in) and
    /// returns its offset.
    pub fn add_capability(&mut self, data: &[u8]) -> Result<usize, ConfigError> {
        let offset = self.next_cap;
        let len = data.len().max(2);
        let end = (offset + len + 3) & !3;
        if end > NUM_REGS * 4 {
            return Err(ConfigError::NoRoom(data.len()));
        }
        for (i, b) in data.iter().enumerate() {
            self.set_byte(offset + i, if i == 1 { 0 } else { *b });
        }
        match self.last_cap {
            Some(prev) => self.set_byte(prev + 1, offset as u8),
            None => {
                self.regs[CAP_PTR_REG] = offset as u32;
                self.regs[COMMAND_REG] |= STATUS_CAP_LIST;
            }
        }
        self.last_cap = Some(offset);
        self.next_cap = end;
        Ok(offset)
    }

    /// Lets the guest write the bits of `mask` in the 16-bit word at byte `offset`.
    pub fn set_writable_u16(&mut self, offset: usize, mask: u16) {
        let (reg, shift) = (offset / 4, (offset % 4) * 8);
        if let Some(w) = self.wmask.get_mut(reg) {
            *w |= u32::from(mask) << shift;
        }
    }

    fn set_byte(&mut self, offset: usize, v: u8) {
        let (reg, shift) = (offset / 4, (offset % 4) * 8);
        if let Some(r) = self.regs.get_mut(reg) {
            *r = (*r & !(0xff << shift)) | (u32::from(v) << shift);
        }
    }

    /// Reads byte `offset`.
    pub fn byte(&self, offset: usize) -> u8 {
        self.regs
            .get(offset / 4)
            .map_or(0xff, |r| (r >> ((offset % 4) * 8)) as u8)
    }

    /// Reads the 16-bit word at `offset`.
    pub fn word(&self, offset: usize) -> u16 {
        u16::from(self.byte(offset)) | (u16::from(self.byte(offset + 1)) << 8)
    }

    /// Reads register `reg`; all ones past the end.
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(u32::MAX)
    }

    /// Writes `data` at byte `offset` of register `reg`, through the write mask; returns the
    /// BAR that moved, if any. A write of all ones (BAR sizing) is not a move.
    pub fn write(&mut self, reg: usize, offset: usize, data: &[u8]) -> Option<BarMove> {
        if reg >= NUM_REGS || offset + data.len() > 4 {
            return None;
        }
        let old = self.regs[reg];
        let mut value = old;
        let mut mask = 0u32;
        for (i, b) in data.iter().enumerate() {
            let shift = (offset + i) * 8;
            value = (value & !(0xff << shift)) | (u32::from(*b) << shift);
            mask |= 0xff << shift;
        }
        let w = self.wmask[reg] & mask;
        self.regs[reg] = (old & !w) | (value & w);
        let bar = reg.checked_sub(BAR0_REG).filter(|i| *i < NUM_BARS)?;
        let (len, new, at) = (
            self.bar_sizes[bar],
            u64::from(self.regs[reg]),
            self.bar_addrs[bar],
        );
        // All ones reads back the size mask: a sizing probe, not a move.
        let sizing = self.regs[reg] == self.wmask[reg];
        if len == 0 || sizing || new == 0 || new == at {
            return None;
        }
        self.bar_addrs[bar] = new;
        Some(BarMove {
            index: bar,
            old: at,
            new,
            len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PciConfig {
        PciConfig::new(PciId {
            vendor: 0x1af4,
            device: 0x1042,
            class: 0x018000,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        })
    }

    #[test]
    fn identity_is_read_only() {
        let mut c = cfg();
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        assert_eq!(c.read_reg(2), 0x0180_0001);
        assert_eq!(c.read_reg(11), 0x0040_1af4);
        c.write(0, 0, &[0, 0, 0, 0]);
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        assert_eq!(c.read_reg(64), u32::MAX);
        c.write(1, 0, &[0xff, 0xff]);
        assert_eq!(c.read_reg(1) & 0xffff, 0x0407);
        assert!(c.memory_enabled());
    }

    #[test]
    fn bar_sizing_and_moving() {
        let mut c = cfg();
        c.add_mem_bar(0, 0x8000).expect("bar");
        c.set_bar_addr(0, 0xc000_0000);
        assert_eq!(c.bar_addr(0), 0xc000_0000);
        // Sizing: all ones reads back the size mask, and is not a move.
        assert_eq!(c.write(4, 0, &[0xff; 4]), None);
        assert_eq!(c.read_reg(4), 0xffff_8000);
        // Restoring the old value is not a move either: the BAR never left.
        assert_eq!(c.write(4, 0, &0xc000_0000u32.to_le_bytes()), None);
        assert_eq!(c.bar_addr(0), 0xc000_0000);
        let m = c.write(4, 0, &0xc001_0000u32.to_le_bytes()).expect("move");
        assert_eq!(
            m,
            BarMove {
                index: 0,
                old: 0xc000_0000,
                new: 0xc001_0000,
                len: 0x8000
            }
        );
        // An unaligned address is masked; an unimplemented BAR stays zero.
        c.write(4, 0, &0xc001_1234u32.to_le_bytes());
        assert_eq!(c.bar_addr(0), 0xc001_0000);
        assert_eq!(c.write(5, 0, &[0xff; 4]), None);
        assert_eq!(c.read_reg(5), 0);
        assert!(c.add_mem_bar(1, 0x3000).is_err());
        assert!(c.add_mem_bar(6, 0x1000).is_err());
        assert!(c.add_mem_bar(1, 1 << 33).is_err());
    }

    #[test]
    fn capability_chain() {
        let mut c = cfg();
        let a = c
            .add_capability(&[0x11, 0xee, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0])
            .expect("cap");
        let b = c.add_capability(&[0x09, 0, 16, 1]).expect("cap");
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x4c);
        assert_eq!(c.byte(0x34), 0x40);
        assert_ne!(c.read_reg(1) & STATUS_CAP_LIST, 0);
        assert_eq!(c.byte(0x41), 0x4c, "first links to second");
        assert_eq!(c.byte(0x4d), 0, "last ends the list");
        assert_eq!(c.word(0x42), 0x0201);
        // Read-only unless made writable.
        c.write(0x40 / 4, 2, &[0xff, 0xff]);
        assert_eq!(c.word(0x42), 0x0201);
        c.set_writable_u16(0x42, 0xc000);
        c.write(0x40 / 4, 2, &[0xff, 0xff]);
        assert_eq!(c.word(0x42), 0xc201);
        assert!(c.add_capability(&[0u8; 200]).is_err());
    }
}
