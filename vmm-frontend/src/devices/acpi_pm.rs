//! The hardware-reduced ACPI sleep control/status register and reset register.
//!
//! Linux powers off by writing `(SLP_TYP << 2) | SLP_EN` to the sleep control register, with
//! `SLP_TYP` from the DSDT's `\_S5_`; it resets by writing `RESET_VALUE` to the reset register.

use std::sync::Arc;

use super::{ExitReason, ExitSignal};
use crate::bus::BusDevice;

/// `SLP_EN`, bit 5 of the sleep control register.
const SLP_EN: u8 = 1 << 5;
/// Where `SLP_TYP` lives in the sleep control register.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// The registers: offset 0 sleep control/status, offset `reset_offset` reset.
#[derive(Debug)]
pub struct AcpiPm {
    exit: Arc<ExitSignal>,
    s5_type: u8,
    reset_offset: u64,
    reset_value: u8,
}

impl AcpiPm {
    /// Registers that end the VM on S5 (`s5_type`) and on `reset_value` at `reset_offset`.
    pub fn new(exit: Arc<ExitSignal>, s5_type: u8, reset_offset: u64, reset_value: u8) -> Self {
        Self {
            exit,
            s5_type,
            reset_offset,
            reset_value,
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // Sleep status: never asleep (WAK_STS clear is fine for S5, which never returns).
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if offset == 0 && v & SLP_EN != 0 {
            let typ = (v >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
            if typ == self.s5_type {
                self.exit.request(ExitReason::PowerOff);
            } else {
                log::warn!("guest asked for ACPI sleep type {typ}, which is not supported");
            }
        } else if offset == self.reset_offset && v == self.reset_value {
            self.exit.request(ExitReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off() {
        let exit = Arc::new(ExitSignal::new().expect("signal"));
        let mut pm = AcpiPm::new(exit.clone(), 5, 1, 1);
        pm.write(0x600, 0, &[(3 << 2) | SLP_EN]); // S3: refused
        pm.write(0x600, 0, &[5 << 2]); // no SLP_EN
        assert!(!exit.is_requested());
        pm.write(0x600, 0, &[(5 << 2) | SLP_EN]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn reset_register_resets() {
        let exit = Arc::new(ExitSignal::new().expect("signal"));
        let mut pm = AcpiPm::new(exit.clone(), 5, 1, 1);
        pm.write(0x600, 1, &[0]);
        pm.write(0x600, 1, &[]);
        assert!(!exit.is_requested());
        pm.write(0x600, 1, &[1]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }
}
