//! Legacy platform devices: the 16550 serial console, the i8042 reset line and the ACPI
//! power-management registers; and the `ExitSignal` through which they end the VM.

pub mod acpi_pm;
pub mod i8042;
pub mod serial;

use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest rebooted (i8042 reset, ACPI reset register, triple fault).
    Reset,
    /// A vCPU failed; the message says how.
    Error(String),
}

/// Set once by whoever ends the VM (a device, a vCPU); the main thread waits on it.
#[derive(Debug)]
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    event: EventFd,
}

impl ExitSignal {
    /// A new, unset signal.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless a reason was already recorded, and wakes the waiter.
    pub fn request(&self, reason: ExitReason) {
        let mut r = self
            .reason
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if r.is_none() {
            log::debug!("VM exit requested: {reason:?}");
            *r = Some(reason);
        }
        drop(r);
        if let Err(e) = self.event.write(1) {
            log::error!("cannot signal VM exit: {e}");
        }
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// True once a reason is recorded.
    pub fn is_requested(&self) -> bool {
        self.reason().is_some()
    }

    /// The eventfd written on every request.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitSignal::new().expect("signal");
        assert!(!s.is_requested());
        s.request(ExitReason::PowerOff);
        s.request(ExitReason::Reset);
        assert_eq!(s.reason(), Some(ExitReason::PowerOff));
        assert_eq!(s.event().read().expect("event"), 2);
    }
}
