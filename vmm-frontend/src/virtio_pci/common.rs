//! The virtio-pci common configuration structure (virtio 1.2, 4.1.4.3): feature windows,
//! device status, and the per-queue registers selected by `queue_select`.

// Register and bit-field code: truncating casts here split or narrow register values to
// their architectural widths on purpose (every value is masked or range-checked first).
#![allow(clippy::cast_possible_truncation)]

/// `queue_msix_vector` / `config_msix_vector` value meaning "no vector".
pub const NO_VECTOR: u16 = 0xffff;
/// Size of the structure we expose (up to `queue_device`).
pub const COMMON_CFG_SIZE: u64 = 0x38;

/// Device status bits.
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation done.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up.
    pub const FAILED: u8 = 0x80;
}

/// One queue's driver-programmed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueState {
    /// Largest size the device accepts.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// Its MSI-X vector.
    pub vector: u16,
    /// Whether the driver enabled it.
    pub enabled: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available (driver) ring address.
    pub avail: u64,
    /// Used (device) ring address.
    pub used: u64,
}

impl QueueState {
    /// A fresh queue of at most `max_size` entries.
    pub fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            vector: NO_VECTOR,
            enabled: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

/// What a write to the common configuration asks of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommonEvent {
    /// Nothing beyond the register change.
    None,
    /// The driver wrote 0 to the status: reset.
    Reset,
    /// The driver set FEATURES_OK: check the acked features.
    FeaturesOk,
    /// The driver set DRIVER_OK: start the device.
    DriverOk,
}

/// The common configuration state.
#[derive(Debug, Clone)]
pub struct CommonConfig {
    /// Features the device offers.
    pub device_features: u64,
    /// Features the driver acked.
    pub driver_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    /// Device status.
    pub status: u8,
    /// Config MSI-X vector.
    pub config_vector: u16,
    queue_select: u16,
    /// Queues.
    pub queues: Vec<QueueState>,
    num_vectors: u16,
}

fn set_half(v: &mut u64, high: bool, d: u32) {
    if high {
        *v = (*v & 0xffff_ffff) | (u64::from(d) << 32);
    } else {
        *v = (*v & !0xffff_ffff) | u64::from(d);
    }
}

impl CommonConfig {
    /// State for a device offering `features`, with `num_queues` queues of `queue_max`
    /// entries and `num_vectors` MSI-X vectors.
    pub fn new(features: u64, num_queues: u16, queue_max: u16, num_vectors: u16) -> Self {
        Self {
            device_features: features,
            driver_features: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            status: 0,
            config_vector: NO_VECTOR,
            queue_select: 0,
            queues: (0..num_queues)
                .map(|_| QueueState::new(queue_max))
                .collect(),
            num_vectors,
        }
    }

    /// Back to the state after power-on (status 0).
    pub fn reset(&mut self) {
        let max = self.queues.first().map_or(0, |q| q.max_size);
        let n = self.queues.len();
        *self = Self::new(self.device_features, n as u16, max, self.num_vectors);
    }

    fn selected(&self) -> Option<&QueueState> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn image(&self) -> [u8; COMMON_CFG_SIZE as usize] {
        let mut b = [0u8; COMMON_CFG_SIZE as usize];
        let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(0x00, &self.device_feature_select.to_le_bytes());
        let df = match self.device_feature_select {
            0 => self.device_features as u32,
            1 => (self.device_features >> 32) as u32,
            _ => 0,
        };
        put(0x04, &df.to_le_bytes());
        put(0x08, &self.driver_feature_select.to_le_bytes());
        let drf = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        put(0x0c, &drf.to_le_bytes());
        put(0x10, &self.config_vector.to_le_bytes());
        put(0x12, &(self.queues.len() as u16).to_le_bytes());
        put(0x14, &[self.status]);
        put(0x15, &[0]);
        put(0x16, &self.queue_select.to_le_bytes());
        if let Some(q) = self.selected() {
            put(0x18, &q.size.to_le_bytes());
            put(0x1a, &q.vector.to_le_bytes());
            put(0x1c, &u16::from(q.enabled).to_le_bytes());
            put(0x1e, &self.queue_select.to_le_bytes());
            put(0x20, &q.desc.to_le_bytes());
            put(0x28, &q.avail.to_le_bytes());
            put(0x30, &q.used.to_le_bytes());
        }
        b
    }

    /// Reads `data.len()` bytes at `offset`; zeros past the structure.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let img = self.image();
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| img.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Writes `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> CommonEvent {
        let mut raw = [0u8; 8];
        let n = data.len().min(8);
        raw[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(raw);
        let (v16, v32) = (v as u16, v as u32);
        let live = self.status & status::DRIVER_OK != 0;
        let nvec = self.num_vectors;
        let vector = |x: u16| if x < nvec { x } else { NO_VECTOR };
        match offset {
            0x00 => self.device_feature_select = v32,
            0x08 => self.driver_feature_select = v32,
            0x0c if self.status & status::FEATURES_OK == 0 => match self.driver_feature_select {
                0 => set_half(&mut self.driver_features, false, v32),
                1 => set_half(&mut self.driver_features, true, v32),
                _ => {}
            },
            0x10 => self.config_vector = vector(v16),
            0x14 => return self.write_status(v as u8),
            0x16 => self.queue_select = v16,
            _ if live => {}
            _ => {
                let Some(q) = self.queues.get_mut(usize::from(self.queue_select)) else {
                    return CommonEvent::None;
                };
                match offset {
                    0x18 if v16 != 0 && v16 <= q.max_size && v16.is_power_of_two() => q.size = v16,
                    0x1a => q.vector = vector(v16),
                    0x1c => q.enabled = v16 == 1,
                    0x20 => set_half(&mut q.desc, false, v32),
                    0x24 => set_half(&mut q.desc, true, v32),
                    0x28 => set_half(&mut q.avail, false, v32),
                    0x2c => set_half(&mut q.avail, true, v32),
                    0x30 => set_half(&mut q.used, false, v32),
                    0x34 => set_half(&mut q.used, true, v32),
                    _ => {}
                }
                if n == 8 && matches!(offset, 0x20 | 0x28 | 0x30) {
                    let hi = (v >> 32) as u32;
                    match offset {
                        0x20 => set_half(&mut q.desc, true, hi),
                        0x28 => set_half(&mut q.avail, true, hi),
                        _ => set_half(&mut q.used, true, hi),
                    }
                }
            }
        }
        CommonEvent::None
    }

    fn write_status(&mut self, new: u8) -> CommonEvent {
        if new == 0 {
            return CommonEvent::Reset;
        }
        let old = self.status;
        // Status bits are only ever set by the driver, never cleared (except by reset).
        let mut s = old | new;
        let mut event = CommonEvent::None;
        if s & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            if self.driver_features & !self.device_features != 0 {
                // Acked something we did not offer: refuse FEATURES_OK.
                s &= !status::FEATURES_OK;
            } else {
                event = CommonEvent::FeaturesOk;
            }
        }
        if s & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            if s & status::FEATURES_OK == 0 {
                s &= !status::DRIVER_OK;
            } else {
                event = CommonEvent::DriverOk;
            }
        }
        self.status = s;
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w32(c: &mut CommonConfig, off: u64, v: u32) -> CommonEvent {
        c.write(off, &v.to_le_bytes())
    }
    fn r32(c: &CommonConfig, off: u64) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn r16(c: &CommonConfig, off: u64) -> u16 {
        let mut b = [0u8; 2];
        c.read(off, &mut b);
        u16::from_le_bytes(b)
    }

    #[test]
    fn feature_windows() {
        let mut c = CommonConfig::new(0x1_0000_0203, 2, 256, 3);
        assert_eq!(r32(&c, 0x04), 0x203);
        w32(&mut c, 0x00, 1);
        assert_eq!(r32(&c, 0x04), 1);
        w32(&mut c, 0x00, 7);
        assert_eq!(r32(&c, 0x04), 0);
        w32(&mut c, 0x08, 1);
        w32(&mut c, 0x0c, 1);
        w32(&mut c, 0x08, 0);
        w32(&mut c, 0x0c, 0x200);
        assert_eq!(c.driver_features, 0x1_0000_0200);
        assert_eq!(r16(&c, 0x12), 2);
    }

    #[test]
    fn queue_programming_and_vectors() {
        let mut c = CommonConfig::new(1 << 32, 2, 256, 3);
        c.write(0x16, &1u16.to_le_bytes());
        assert_eq!(r16(&c, 0x18), 256);
        assert_eq!(r16(&c, 0x1e), 1, "notify offset is the queue index");
        c.write(0x18, &128u16.to_le_bytes());
        c.write(0x18, &100u16.to_le_bytes()); // not a power of two: ignored
        c.write(0x18, &512u16.to_le_bytes()); // above max: ignored
        c.write(0x1a, &2u16.to_le_bytes());
        w32(&mut c, 0x20, 0x1000);
        w32(&mut c, 0x24, 0x1);
        c.write(0x28, &0x2_0000_2000u64.to_le_bytes());
        w32(&mut c, 0x30, 0x3000);
        c.write(0x1c, &1u16.to_le_bytes());
        let q = c.queues[1];
        assert_eq!((q.size, q.vector, q.enabled), (128, 2, true));
        assert_eq!(
            (q.desc, q.avail, q.used),
            (0x1_0000_1000, 0x2_0000_2000, 0x3000)
        );
        c.write(0x1a, &3u16.to_le_bytes());
        assert_eq!(r16(&c, 0x1a), NO_VECTOR, "vector 3 does not exist");
        c.write(0x10, &0u16.to_le_bytes());
        assert_eq!(r16(&c, 0x10), 0);
        // A selector past the queues reads zeros and writes nothing.
        c.write(0x16, &9u16.to_le_bytes());
        assert_eq!(r16(&c, 0x18), 0);
        c.write(0x1c, &1u16.to_le_bytes());
        let mut past = [0xffu8; 4];
        c.read(0x100, &mut past);
        assert_eq!(past, [0; 4]);
        c.read(u64::MAX, &mut past);
        assert_eq!(past, [0; 4]);
    }

    #[test]
    fn status_sequence_and_reset() {
        let mut c = CommonConfig::new((1 << 32) | 1, 1, 256, 2);
        assert_eq!(
            c.write(0x14, &[status::ACKNOWLEDGE | status::DRIVER]),
            CommonEvent::None
        );
        w32(&mut c, 0x08, 1);
        w32(&mut c, 0x0c, 1);
        assert_eq!(
            c.write(
                0x14,
                &[status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK]
            ),
            CommonEvent::FeaturesOk
        );
        // Features are frozen after FEATURES_OK.
        w32(&mut c, 0x0c, 3);
        assert_eq!(c.driver_features, 1 << 32);
        assert_eq!(c.write(0x14, &[0x0f]), CommonEvent::DriverOk);
        // Queue registers are frozen while live.
        c.write(0x18, &64u16.to_le_bytes());
        assert_eq!(c.queues[0].size, 256);
        assert_eq!(c.write(0x14, &[0]), CommonEvent::Reset);
        c.reset();
        assert_eq!((c.status, c.driver_features), (0, 0));
    }

    #[test]
    fn unoffered_features_refuse_features_ok() {
        let mut c = CommonConfig::new(1 << 32, 1, 256, 2);
        w32(&mut c, 0x0c, 0x4); // bit 2, not offered
        assert_eq!(c.write(0x14, &[0x0b]), CommonEvent::None);
        assert_eq!(c.status & status::FEATURES_OK, 0);
        assert_eq!(
            c.write(0x14, &[0x0f]),
            CommonEvent::None,
            "no DRIVER_OK without FEATURES_OK"
        );
        assert_eq!(c.status & status::DRIVER_OK, 0);
    }
}
