//! The i8042 keyboard controller, only as far as a guest uses it to reset the machine
//! (`reboot=k`: command 0xFE on port 0x64).

use std::sync::Arc;

use super::{ExitReason, ExitSignal};
use crate::bus::BusDevice;

/// Command port offset from 0x60.
const COMMAND_OFFSET: u64 = 4;
/// "Pulse the reset line".
const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 at ports 0x60..0x65.
#[derive(Debug)]
pub struct I8042 {
    exit: Arc<ExitSignal>,
}

impl I8042 {
    /// An i8042 that ends the VM on reset.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty; data: nothing.
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.exit.request(ExitReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_the_vm() {
        let exit = Arc::new(ExitSignal::new().expect("signal"));
        let mut d = I8042::new(exit.clone());
        d.write(0x60, 0, &[CMD_RESET_CPU]);
        d.write(0x60, 4, &[0xd1]);
        assert!(!exit.is_requested());
        let mut b = [0xffu8];
        d.read(0x60, 4, &mut b);
        assert_eq!(b, [0]);
        d.write(0x60, 4, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }
}
