//! The virtio-console device as the specification defines it (virtio 1.2, 5.3): feature
//! bits, the configuration space, and which virtqueue belongs to which port.
//!
//! Queue layout (5.3.2): queue 0 and 1 are port 0's receiveq and transmitq. With
//! `VIRTIO_CONSOLE_F_MULTIPORT`, queues 2 and 3 are the control receiveq and transmitq,
//! and port `n >= 1` owns queues `2 + 2n` (receiveq) and `3 + 2n` (transmitq).

use vm_memory::ByteValued;

/// The console size in the config space is valid (`cols`, `rows`).
pub const VIRTIO_CONSOLE_F_SIZE: u64 = 0;
/// Several ports and a control queue pair.
pub const VIRTIO_CONSOLE_F_MULTIPORT: u64 = 1;
/// The driver may write a character to `emerg_wr` in the config space.
pub const VIRTIO_CONSOLE_F_EMERG_WRITE: u64 = 2;

/// Offset of `emerg_wr` in [`ConsoleConfig`].
pub const EMERG_WR_OFFSET: u32 = 8;

/// `struct virtio_console_config` (5.3.4), little endian.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[repr(C, packed)]
pub struct ConsoleConfig {
    /// Columns of port 0's console.
    pub cols: u16,
    /// Rows of port 0's console.
    pub rows: u16,
    /// How many ports the device may have (valid with MULTIPORT).
    pub max_nr_ports: u32,
    /// Emergency write register (valid with EMERG_WRITE).
    pub emerg_wr: u32,
}

// SAFETY: `ConsoleConfig` is `repr(C, packed)` with only integer fields, so it has no
// padding and every byte pattern is a valid value.
unsafe impl ByteValued for ConsoleConfig {}

impl ConsoleConfig {
    /// The config space for a console of `cols` x `rows` with `ports` ports.
    pub fn new(cols: u16, rows: u16, ports: u32) -> Self {
        ConsoleConfig {
            cols: cols.to_le(),
            rows: rows.to_le(),
            max_nr_ports: ports.to_le(),
            emerg_wr: 0,
        }
    }

    /// `size` bytes of the config space from `offset`, as a frontend asks for them. Bytes
    /// beyond the structure read as zero, so hostile numbers never index out of bounds.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.as_slice();
        let size = usize::try_from(size).unwrap_or(0).min(4096);
        let mut out = vec![0u8; size];
        if let Some(tail) = usize::try_from(offset).ok().and_then(|o| bytes.get(o..)) {
            let n = tail.len().min(size);
            out[..n].copy_from_slice(&tail[..n]);
        }
        out
    }
}

/// Which queue does what, for a device with `ports` ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRole {
    /// A port's receiveq: host to guest.
    Receive(u32),
    /// A port's transmitq: guest to host.
    Transmit(u32),
    /// The control receiveq: device to driver control messages.
    ControlReceive,
    /// The control transmitq: driver to device control messages.
    ControlTransmit,
}

/// The number of queues a device with `ports` ports offers: 2 for a single port (no
/// MULTIPORT), otherwise two per port plus the control pair.
pub fn num_queues(ports: u32) -> usize {
    if ports <= 1 {
        2
    } else {
        usize::try_from(ports)
            .unwrap_or(0)
            .saturating_add(1)
            .saturating_mul(2)
    }
}

/// What queue `index` is for.
pub fn queue_role(index: usize) -> QueueRole {
    match index {
        0 => QueueRole::Receive(0),
        1 => QueueRole::Transmit(0),
        2 => QueueRole::ControlReceive,
        3 => QueueRole::ControlTransmit,
        n => {
            let port = u32::try_from(n / 2 - 1).unwrap_or(u32::MAX);
            if n % 2 == 0 {
                QueueRole::Receive(port)
            } else {
                QueueRole::Transmit(port)
            }
        }
    }
}

/// The receiveq index of `port`.
pub fn rx_queue(port: u32) -> usize {
    let port = usize::try_from(port).unwrap_or(usize::MAX / 4);
    if port == 0 {
        0
    } else {
        2 + 2 * port
    }
}

/// The transmitq index of `port`.
pub fn tx_queue(port: u32) -> usize {
    rx_queue(port) + 1
}

/// The control receiveq index.
pub const CONTROL_RX_QUEUE: usize = 2;
/// The control transmitq index.
pub const CONTROL_TX_QUEUE: usize = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_layout_follows_the_spec() {
        assert_eq!(num_queues(1), 2);
        assert_eq!(num_queues(2), 6);
        assert_eq!(num_queues(4), 10);
        assert_eq!(queue_role(0), QueueRole::Receive(0));
        assert_eq!(queue_role(1), QueueRole::Transmit(0));
        assert_eq!(queue_role(2), QueueRole::ControlReceive);
        assert_eq!(queue_role(3), QueueRole::ControlTransmit);
        assert_eq!(queue_role(4), QueueRole::Receive(1));
        assert_eq!(queue_role(5), QueueRole::Transmit(1));
        assert_eq!(queue_role(9), QueueRole::Transmit(3));
        for port in 0..8 {
            assert_eq!(queue_role(rx_queue(port)), QueueRole::Receive(port));
            assert_eq!(queue_role(tx_queue(port)), QueueRole::Transmit(port));
        }
    }

    #[test]
    fn config_reads_are_bounded_and_zero_filled() {
        let cfg = ConsoleConfig::new(80, 25, 2);
        assert_eq!(cfg.read(0, 12), vec![80, 0, 25, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(cfg.read(2, 2), vec![25, 0]);
        assert_eq!(cfg.read(10, 4), vec![0, 0, 0, 0]);
        assert_eq!(cfg.read(u32::MAX, 4), vec![0, 0, 0, 0]);
        assert_eq!(cfg.read(0, u32::MAX).len(), 4096);
    }
}
