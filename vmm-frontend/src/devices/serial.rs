//! The 16550 UART on COM1 (`vm-superio`), its interrupt an eventfd bound to GSI 4 by irqfd.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// The serial interrupt: an eventfd KVM turns into IRQ 4.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The UART, writing the guest's output to `W`.
pub struct SerialDevice {
    inner: Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART that raises `irq` and writes to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            inner: Serial::new(IrqTrigger(irq), out),
        }
    }
}

/// A UART that takes the user's typing (the 16550 here, the PL011 on aarch64).
pub trait SerialInput: Send {
    /// Feeds bytes typed by the user to the guest; returns how many were taken.
    fn input(&mut self, bytes: &[u8]) -> usize;
}

impl SerialInput for SerialDevice {
    fn input(&mut self, bytes: &[u8]) -> usize {
        self.inner.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let v = u8::try_from(offset)
            .map(|o| self.inner.read(o))
            .unwrap_or(0xff);
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let (Ok(o), Some(&v)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        if let Err(e) = self.inner.write(o, v) {
            log::debug!("serial write: {e:?}");
        }
    }
}

/// Starts a thread that copies the VMM's stdin into the guest's serial input. It ends at
/// end of input; it is not joined (a blocked read of stdin cannot be interrupted).
pub fn spawn_stdin_reader(serial: Arc<Mutex<dyn SerialInput>>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("serial-stdin".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin();
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let mut rest = &buf[..n];
                        while !rest.is_empty() {
                            let taken = serial
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .input(rest);
                            rest = &rest[taken..];
                            if taken == 0 {
                                std::thread::sleep(std::time::Duration::from_millis(10));
                            }
                        }
                    }
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_interrupt() {
        let out = Shared::default();
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).expect("eventfd");
        let mut s = SerialDevice::new(irq.try_clone().expect("clone"), Box::new(out.clone()));
        s.write(0x3f8, 1, &[0x2]); // IER: THR empty interrupt
        for b in b"hi" {
            s.write(0x3f8, 0, &[*b]);
        }
        assert_eq!(&*out.0.lock().expect("lock"), b"hi");
        assert!(irq.read().expect("interrupt raised") >= 1);
        let mut lsr = [0u8; 1];
        s.read(0x3f8, 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
        assert_eq!(s.input(b"x"), 1);
        let mut rbr = [0u8; 1];
        s.read(0x3f8, 0, &mut rbr);
        assert_eq!(rbr, [b'x']);
    }
}
