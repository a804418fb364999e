//! The virtio-blk device as the specification defines it (virtio 1.2, section 5.2): feature
//! bits, request types and status codes, and the configuration space layout.
//!
//! The config space is built as little-endian bytes at the offsets the specification gives,
//! and read with the frontend's offset and size clamped into it (the rest reads as zeros),
//! so no frontend-provided number ever indexes out of bounds.

use virtio_bindings::virtio_blk as spec;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Sector size of the virtio-blk protocol: request sectors are always 512 bytes.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Length of the serial the `GET_ID` request returns (`VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = spec::VIRTIO_BLK_ID_BYTES as usize;
/// Largest discard / write-zeroes request in sectors (QEMU's `BDRV_REQUEST_MAX_SECTORS`).
pub const MAX_DISCARD_SECTORS: u32 = (i32::MAX as u32) >> SECTOR_SHIFT;
/// Segments per discard / write-zeroes request.
pub const MAX_DISCARD_SEGMENTS: u32 = 1;
/// Size of one discard / write-zeroes segment (`struct virtio_blk_discard_write_zeroes`).
pub const DISCARD_SEGMENT_SIZE: usize = 16;
/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// Request types (`virtio_blk_req.type`).
pub mod request_type {
    use super::spec;
    /// Read.
    pub const IN: u32 = spec::VIRTIO_BLK_T_IN;
    /// Write.
    pub const OUT: u32 = spec::VIRTIO_BLK_T_OUT;
    /// Flush the volatile write cache.
    pub const FLUSH: u32 = spec::VIRTIO_BLK_T_FLUSH;
    /// Device serial.
    pub const GET_ID: u32 = spec::VIRTIO_BLK_T_GET_ID;
    /// Discard (unmap) ranges.
    pub const DISCARD: u32 = spec::VIRTIO_BLK_T_DISCARD;
    /// Write zeroes to ranges.
    pub const WRITE_ZEROES: u32 = spec::VIRTIO_BLK_T_WRITE_ZEROES;
}

/// Request status codes, the last byte the device writes.
pub mod status {
    /// Success (`VIRTIO_BLK_S_OK`).
    pub const OK: u8 = 0;
    /// Device or driver error (`VIRTIO_BLK_S_IOERR`).
    pub const IOERR: u8 = 1;
    /// Request unsupported by this device (`VIRTIO_BLK_S_UNSUPP`).
    pub const UNSUPP: u8 = 2;
}

/// Feature bits this device can offer.
pub mod features {
    use super::*;
    /// `VIRTIO_F_VERSION_1`.
    pub const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
    /// `VIRTIO_RING_F_EVENT_IDX`.
    pub const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
    /// `VIRTIO_RING_F_INDIRECT_DESC`.
    pub const INDIRECT_DESC: u64 = 1 << VIRTIO_RING_F_INDIRECT_DESC;
    /// `VIRTIO_BLK_F_SEG_MAX`.
    pub const SEG_MAX: u64 = 1 << spec::VIRTIO_BLK_F_SEG_MAX;
    /// `VIRTIO_BLK_F_RO`.
    pub const RO: u64 = 1 << spec::VIRTIO_BLK_F_RO;
    /// `VIRTIO_BLK_F_BLK_SIZE`.
    pub const BLK_SIZE: u64 = 1 << spec::VIRTIO_BLK_F_BLK_SIZE;
    /// `VIRTIO_BLK_F_FLUSH`.
    pub const FLUSH: u64 = 1 << spec::VIRTIO_BLK_F_FLUSH;
    /// `VIRTIO_BLK_F_TOPOLOGY`.
    pub const TOPOLOGY: u64 = 1 << spec::VIRTIO_BLK_F_TOPOLOGY;
    /// `VIRTIO_BLK_F_CONFIG_WCE`.
    pub const CONFIG_WCE: u64 = 1 << spec::VIRTIO_BLK_F_CONFIG_WCE;
    /// `VIRTIO_BLK_F_MQ`.
    pub const MQ: u64 = 1 << spec::VIRTIO_BLK_F_MQ;
    /// `VIRTIO_BLK_F_DISCARD`.
    pub const DISCARD: u64 = 1 << spec::VIRTIO_BLK_F_DISCARD;
    /// `VIRTIO_BLK_F_WRITE_ZEROES`.
    pub const WRITE_ZEROES: u64 = 1 << spec::VIRTIO_BLK_F_WRITE_ZEROES;
}

/// Offsets of the config space fields this device serves (`struct virtio_blk_config`).
mod offset {
    pub const CAPACITY: usize = 0;
    pub const SEG_MAX: usize = 12;
    pub const BLK_SIZE: usize = 20;
    pub const PHYSICAL_BLOCK_EXP: usize = 24;
    pub const MIN_IO_SIZE: usize = 26;
    pub const WRITEBACK: usize = 32;
    pub const NUM_QUEUES: usize = 34;
    pub const MAX_DISCARD_SECTORS: usize = 36;
    pub const MAX_DISCARD_SEG: usize = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
}

/// Size of the config space served: up to and including `write_zeroes_may_unmap` and its
/// padding (secure erase, zoned fields are not offered).
pub const CONFIG_SIZE: usize = 60;

/// The values of the config space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Maximum data segments per request.
    pub seg_max: u32,
    /// Logical block size in bytes.
    pub blk_size: u32,
    /// Queues.
    pub num_queues: u16,
    /// Whether the write cache is in writeback mode (1) or writethrough (0).
    pub writeback: bool,
    /// Whether discard and write-zeroes limits are advertised.
    pub discard: bool,
}

impl BlkConfig {
    /// The config space as the driver reads it.
    pub fn to_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        let mut put = |at: usize, bytes: &[u8]| b[at..at + bytes.len()].copy_from_slice(bytes);
        put(offset::CAPACITY, &self.capacity.to_le_bytes());
        put(offset::SEG_MAX, &self.seg_max.to_le_bytes());
        put(offset::BLK_SIZE, &self.blk_size.to_le_bytes());
        // Topology: the physical block is the logical block; minimum I/O is one block.
        put(offset::PHYSICAL_BLOCK_EXP, &[0]);
        put(offset::MIN_IO_SIZE, &1u16.to_le_bytes());
        put(offset::WRITEBACK, &[u8::from(self.writeback)]);
        put(offset::NUM_QUEUES, &self.num_queues.to_le_bytes());
        if self.discard {
            let alignment = self.blk_size >> SECTOR_SHIFT;
            put(
                offset::MAX_DISCARD_SECTORS,
                &MAX_DISCARD_SECTORS.to_le_bytes(),
            );
            put(offset::MAX_DISCARD_SEG, &MAX_DISCARD_SEGMENTS.to_le_bytes());
            put(offset::DISCARD_SECTOR_ALIGNMENT, &alignment.to_le_bytes());
            put(
                offset::MAX_WRITE_ZEROES_SECTORS,
                &MAX_DISCARD_SECTORS.to_le_bytes(),
            );
            put(
                offset::MAX_WRITE_ZEROES_SEG,
                &MAX_DISCARD_SEGMENTS.to_le_bytes(),
            );
            put(offset::WRITE_ZEROES_MAY_UNMAP, &[1]);
        }
        b
    }

    /// `size` bytes of the config space from `offset`, zeros past its end (Firecracker's
    /// `read_config` rule): a frontend's numbers never index out of bounds.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        // vhost-user limits a config message to 256 bytes; stay far below any allocation risk.
        let size = (size as usize).min(4096);
        let bytes = self.to_bytes();
        let mut out = vec![0u8; size];
        if let Some(src) = bytes.get(offset as usize..) {
            let n = src.len().min(size);
            out[..n].copy_from_slice(&src[..n]);
        }
        out
    }
}

/// Where a `SET_CONFIG` write lands: the only writable field is `writeback` (CONFIG_WCE).
/// Returns the new writeback value if the write covers that byte.
pub fn written_writeback(offset: u32, data: &[u8]) -> Option<bool> {
    let at = (offset::WRITEBACK as u64).checked_sub(u64::from(offset))?;
    let byte = data.get(usize::try_from(at).ok()?)?;
    Some(*byte != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BlkConfig {
        BlkConfig {
            capacity: 2048,
            seg_max: 254,
            blk_size: 4096,
            num_queues: 2,
            writeback: true,
            discard: true,
        }
    }

    #[test]
    fn layout_matches_the_specification() {
        let b = config().to_bytes();
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().expect("8")), 2048);
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().expect("4")), 254);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().expect("4")), 4096);
        assert_eq!(b[32], 1, "writeback");
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().expect("2")), 2);
        assert_eq!(u32::from_le_bytes(b[40..44].try_into().expect("4")), 1);
        assert_eq!(
            u32::from_le_bytes(b[44..48].try_into().expect("4")),
            8,
            "alignment in sectors"
        );
        assert_eq!(b[56], 1, "write zeroes may unmap");
        // The layout agrees with the C struct's size up to the unused padding.
        assert_eq!(
            std::mem::offset_of!(spec::virtio_blk_config, write_zeroes_may_unmap),
            56
        );
        assert_eq!(
            std::mem::offset_of!(spec::virtio_blk_config, num_queues),
            34
        );
    }

    #[test]
    fn statuses_match_the_bindings() {
        assert_eq!(u32::from(status::OK), spec::VIRTIO_BLK_S_OK);
        assert_eq!(u32::from(status::IOERR), spec::VIRTIO_BLK_S_IOERR);
        assert_eq!(u32::from(status::UNSUPP), spec::VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn reads_are_clamped_and_zero_filled() {
        let c = config();
        assert_eq!(c.read(0, 8), 2048u64.to_le_bytes());
        assert_eq!(c.read(58, 4), vec![0, 0, 0, 0], "past the end reads zeros");
        assert_eq!(c.read(u32::MAX, 16), vec![0; 16]);
        assert_eq!(c.read(0, u32::MAX).len(), 4096, "no unbounded allocation");
        assert_eq!(c.read(34, 2), 2u16.to_le_bytes());
    }

    #[test]
    fn only_the_writeback_byte_is_writable() {
        assert_eq!(written_writeback(32, &[0]), Some(false));
        assert_eq!(written_writeback(30, &[9, 9, 1]), Some(true));
        assert_eq!(written_writeback(33, &[1]), None);
        assert_eq!(written_writeback(0, &[1; 8]), None);
        assert_eq!(written_writeback(u32::MAX, &[1]), None);
    }
}
