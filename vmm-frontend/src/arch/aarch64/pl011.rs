//! A PL011 UART, as much of it as Linux's `amba-pl011` driver uses for a console.
//!
//! Transmit never blocks: the FIFO always reads empty (`FR.TXFE`, never `TXFF`), so the
//! driver writes every byte from its `start_tx` path without waiting for an interrupt.
//! Received bytes wait in a 64-byte FIFO; the interrupt (an irqfd on SPI 1, declared
//! edge-triggered in the FDT) is pulsed when a source the driver unmasked becomes active.
//! The AMBA bus probes the device by its PrimeCell ID registers at 0xfe0-0xffc.

use std::collections::VecDeque;
use std::io::Write;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::devices::serial::SerialInput;

const DR: u64 = 0x000;
const RSR: u64 = 0x004;
const FR: u64 = 0x018;
const ILPR: u64 = 0x020;
const IBRD: u64 = 0x024;
const FBRD: u64 = 0x028;
const LCR_H: u64 = 0x02c;
const CR: u64 = 0x030;
const IFLS: u64 = 0x034;
const IMSC: u64 = 0x038;
const RIS: u64 = 0x03c;
const MIS: u64 = 0x040;
const ICR: u64 = 0x044;
const DMACR: u64 = 0x048;
const ID: u64 = 0xfe0;

const FR_RXFE: u32 = 1 << 4;
const FR_TXFE: u32 = 1 << 7;
const FR_RXFF: u32 = 1 << 6;
/// Receive and receive-timeout interrupts.
const INT_RX: u32 = (1 << 4) | (1 << 6);
/// Transmit interrupt (the FIFO is always below its level).
const INT_TX: u32 = 1 << 5;
const FIFO_SIZE: usize = 64;
/// PeriphID0-3 (PL011 r1p5) then CellID0-3.
const IDS: [u8; 8] = [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1];

/// The UART.
pub struct Pl011 {
    out: Box<dyn Write + Send>,
    irq: EventFd,
    rx: VecDeque<u8>,
    imsc: u32,
    regs: [u32; 7],
}

impl std::fmt::Debug for Pl011 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pl011")
            .field("rx", &self.rx.len())
            .field("imsc", &self.imsc)
            .finish_non_exhaustive()
    }
}

/// Index of a plain read/write register in `Pl011::regs`.
fn plain(offset: u64) -> Option<usize> {
    [ILPR, IBRD, FBRD, LCR_H, CR, IFLS, DMACR]
        .iter()
        .position(|&r| r == offset)
}

impl Pl011 {
    /// A UART raising `irq`, writing the guest's output to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            out,
            irq,
            rx: VecDeque::new(),
            imsc: 0,
            // CR: UART, TX and RX enabled, as after firmware.
            regs: [0, 0, 0, 0, 0x301, 0x12, 0],
        }
    }

    fn raw_status(&self) -> u32 {
        let rx = if self.rx.is_empty() { 0 } else { INT_RX };
        rx | INT_TX
    }

    fn pulse(&self) {
        if let Err(e) = self.irq.write(1) {
            log::debug!("pl011 interrupt: {e}");
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            DR => self.rx.pop_front().map_or(0, u32::from),
            RSR => 0,
            FR => {
                let mut fr = FR_TXFE;
                if self.rx.is_empty() {
                    fr |= FR_RXFE;
                }
                if self.rx.len() >= FIFO_SIZE {
                    fr |= FR_RXFF;
                }
                fr
            }
            IMSC => self.imsc,
            RIS => self.raw_status(),
            MIS => self.raw_status() & self.imsc,
            o if (ID..ID + 0x20).contains(&o) => IDS
                .get(usize::try_from((o - ID) / 4).unwrap_or(usize::MAX))
                .copied()
                .map_or(0, u32::from),
            o => plain(o)
                .and_then(|i| self.regs.get(i))
                .copied()
                .unwrap_or(0),
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            DR => {
                let _ = self.out.write_all(&[v.to_le_bytes()[0]]);
                let _ = self.out.flush();
            }
            IMSC => {
                let newly = v & !self.imsc;
                self.imsc = v & 0x7ff;
                if newly & self.raw_status() != 0 {
                    self.pulse();
                }
            }
            // Interrupts clear themselves when their cause goes (FIFO drained).
            ICR | RSR => {}
            o => {
                if let Some(r) = plain(o).and_then(|i| self.regs.get_mut(i)) {
                    *r = v;
                }
            }
        }
    }
}

impl SerialInput for Pl011 {
    fn input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(FIFO_SIZE - self.rx.len().min(FIFO_SIZE));
        self.rx.extend(&bytes[..n]);
        if n > 0 && self.imsc & INT_RX != 0 {
            self.pulse();
        }
        n
    }
}

impl BusDevice for Pl011 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let v = self.read_reg(offset & !3).to_le_bytes();
        data.fill(0);
        let n = data.len().min(4);
        data[..n].copy_from_slice(&v[..n]);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        self.write_reg(offset & !3, u32::from_le_bytes(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

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

    fn r(u: &mut Pl011, off: u64) -> u32 {
        let mut d = [0u8; 4];
        u.read(0, off, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn ids_output_and_flags() {
        let out = Shared::default();
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).expect("eventfd");
        let mut u = Pl011::new(irq, Box::new(out.clone()));
        let ids: Vec<u32> = (0..8).map(|i| r(&mut u, 0xfe0 + 4 * i)).collect();
        assert_eq!(ids, [0x11, 0x10, 0x14, 0, 0x0d, 0xf0, 0x05, 0xb1]);
        for b in b"ok\n" {
            u.write(0, DR, &[*b, 0, 0, 0]);
        }
        assert_eq!(&*out.0.lock().expect("lock"), b"ok\n");
        assert_eq!(r(&mut u, FR), FR_TXFE | FR_RXFE);
        u.write(0, IBRD, &13u32.to_le_bytes());
        assert_eq!(r(&mut u, IBRD), 13);
        // Out-of-range and odd offsets read as zero, never panic.
        assert_eq!(r(&mut u, 0xffc_0000), 0);
        let mut one = [0xffu8];
        u.read(0, 0x7ff, &mut one);
        u.write(0, u64::MAX, &[1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn input_raises_the_unmasked_interrupt() {
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).expect("eventfd");
        let mut u = Pl011::new(irq.try_clone().expect("clone"), Box::new(std::io::sink()));
        assert_eq!(u.input(b"ab"), 2);
        assert!(irq.read().is_err(), "masked: no interrupt");
        u.write(0, IMSC, &INT_RX.to_le_bytes());
        assert_eq!(irq.read().expect("pending RX raises on unmask"), 1);
        assert_eq!(r(&mut u, MIS), INT_RX);
        assert_eq!(r(&mut u, DR), u32::from(b'a'));
        assert_eq!(r(&mut u, DR), u32::from(b'b'));
        assert_eq!(r(&mut u, FR) & FR_RXFE, FR_RXFE);
        assert_eq!(r(&mut u, MIS), 0);
        assert_eq!(u.input(&[b'x'; 100]), FIFO_SIZE);
        assert_eq!(u.input(b"y"), 0, "full FIFO takes nothing");
        assert_eq!(r(&mut u, FR) & FR_RXFF, FR_RXFF);
    }
}
