//! A virtio-blk request, parsed from a descriptor chain the guest wrote.
//!
//! The chain carries, in order (virtio 1.2, 5.2.6):
//!
//! ```text
//! struct virtio_blk_req {
//!     le32 type; le32 reserved; le64 sector;   // 16 bytes, device-readable
//!     u8 data[];                               // readable (OUT, DISCARD, WRITE_ZEROES)
//!                                              // or writable (IN, GET_ID)
//!     u8 status;                               // 1 byte, device-writable, last
//! };
//! ```
//!
//! Since `VIRTIO_F_VERSION_1` implies `VIRTIO_F_ANY_LAYOUT` (2.7.4.3), the driver may split
//! or merge those parts across descriptors in any way: the parser works on bytes, not on
//! descriptor positions. The header is the first 16 readable bytes, the status the last
//! writable byte, and the data what lies between. "The driver MUST place any
//! device-writable descriptor elements after any device-readable descriptor elements"
//! (2.7.4.2): a chain that breaks that rule is answered with `VIRTIO_BLK_S_IOERR`.
//!
//! Everything here is untrusted: every address range is checked against guest memory, every
//! length and sector against overflow and the image's capacity. A chain without a single
//! writable byte cannot receive a status; it is completed with a used length of 0.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::virtio::{
    request_type, status, DISCARD_SEGMENT_SIZE, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS,
    SECTOR_SHIFT, SECTOR_SIZE, WRITE_ZEROES_FLAG_UNMAP,
};
use crate::GuestMemory;

/// Size of the request header (`type`, `reserved`, `sector`).
pub const HEADER_SIZE: u64 = HEADER_LEN as u64;
const HEADER_LEN: usize = 16;
/// Most descriptors a chain may have (Linux's `IOV_MAX`, since data becomes one iovec each).
pub const MAX_DESCRIPTORS: usize = 1024;
/// Largest data length of one request: the used length is a `u32`.
pub const MAX_DATA_LEN: u64 = u32::MAX as u64 - 1;

/// A contiguous guest buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A range of a discard or write-zeroes request, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// Byte offset in the image.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What the request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Read `len` bytes from the image at byte `offset` into `data`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Guest buffers, device-writable.
        data: Vec<Segment>,
        /// Total length of `data`.
        len: u32,
    },
    /// Write `data` to the image at byte `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Guest buffers, device-readable.
        data: Vec<Segment>,
        /// Total length of `data`.
        len: u32,
    },
    /// Make completed writes durable.
    Flush,
    /// Write the serial into `data` (at most 20 bytes).
    GetId {
        /// Guest buffers, device-writable.
        data: Vec<Segment>,
    },
    /// Unmap ranges (punch holes).
    Discard(Vec<Range>),
    /// Zero ranges; `unmap` allows deallocating them.
    WriteZeroes {
        /// The ranges.
        ranges: Vec<Range>,
        /// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP` was set.
        unmap: bool,
    },
}

/// A parsed request: what to do and where its status byte goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: Kind,
    /// Guest address of the status byte.
    pub status: GuestAddress,
}

/// A guest fault in a request. Each maps to the status the device answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The chain has no device-writable byte for the status.
    #[error("descriptor chain has no writable status byte")]
    NoStatus,
    /// A readable descriptor after a writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// More descriptors than any request needs.
    #[error("descriptor chain longer than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    /// A buffer outside guest memory.
    #[error("descriptor buffer {addr:#x}+{len} is outside guest memory")]
    OutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// Fewer than 16 readable bytes.
    #[error("request header too short: {0} readable bytes")]
    HeaderTooShort(u64),
    /// The header could not be read (it was checked, so only a racing memory change).
    #[error("cannot read the request header")]
    HeaderUnreadable,
    /// An unknown request type.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// Data not a whole number of sectors.
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    /// Data longer than a request can be.
    #[error("data length {0} too large")]
    TooLong(u64),
    /// Sector arithmetic overflows.
    #[error("sector {0} out of range")]
    SectorOverflow(u64),
    /// The request reaches past the end of the image.
    #[error("request at byte {offset}+{len} beyond the capacity {capacity}")]
    BeyondCapacity {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Capacity in bytes.
        capacity: u64,
    },
    /// A write to a read-only device.
    #[error("write request to a read-only device")]
    ReadOnly,
    /// Discard / write-zeroes data not a whole number of segments.
    #[error("discard/write-zeroes data of {0} bytes is not a whole number of 16-byte segments")]
    BadSegmentData(u64),
    /// More segments than `max_discard_seg`.
    #[error("{0} discard/write-zeroes segments, more than the {MAX_DISCARD_SEGMENTS} advertised")]
    TooManySegments(u64),
    /// A segment longer than advertised.
    #[error("discard/write-zeroes segment of {0} sectors, more than advertised")]
    SegmentTooLong(u32),
    /// Flags the device does not support (unmap on discard, reserved bits).
    #[error("discard/write-zeroes flags {0:#x} not supported")]
    SegmentFlags(u32),
}

impl Error {
    /// The status this fault is answered with (5.2.6.1: `UNSUPP` for a request or flag the
    /// device does not support, `IOERR` for everything else).
    pub fn status(&self) -> u8 {
        match self {
            Error::Unsupported(_) | Error::SegmentFlags(_) => status::UNSUPP,
            _ => status::IOERR,
        }
    }
}

/// A chain that could not be parsed into a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Where the status byte goes, if the chain has one.
    pub status: Option<GuestAddress>,
    /// Why.
    pub error: Error,
}

/// Splits the first `n` bytes off `segs`. `None` if `segs` hold fewer bytes.
fn split_front(segs: &[Segment], n: u64) -> Option<(Vec<Segment>, Vec<Segment>)> {
    let mut front = Vec::new();
    let mut left = n;
    for (i, s) in segs.iter().enumerate() {
        if left == 0 {
            return Some((front, segs[i..].to_vec()));
        }
        let take = u64::from(s.len).min(left);
        // `take` <= s.len, so it fits a u32; `addr + take` was range-checked with the segment.
        let take32 = u32::try_from(take).ok()?;
        front.push(Segment {
            addr: s.addr,
            len: take32,
        });
        left -= take;
        if take32 < s.len {
            let mut rest = vec![Segment {
                addr: s.addr.checked_add(take)?,
                len: s.len - take32,
            }];
            rest.extend_from_slice(&segs[i + 1..]);
            return Some((front, rest));
        }
    }
    (left == 0).then_some((front, Vec::new()))
}

/// Splits the last byte off `segs`: (everything before, its address).
fn split_last_byte(segs: &[Segment]) -> Option<(Vec<Segment>, GuestAddress)> {
    let (last, before) = segs.split_last()?;
    let at = last.addr.checked_add(u64::from(last.len) - 1)?;
    let mut rest = before.to_vec();
    if last.len > 1 {
        rest.push(Segment {
            addr: last.addr,
            len: last.len - 1,
        });
    }
    Some((rest, at))
}

fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Copies the bytes `segs` cover into `out` (which has their total length).
fn read_bytes(mem: &GuestMemory, segs: &[Segment], out: &mut [u8]) -> Result<(), Error> {
    let mut at = 0usize;
    for s in segs {
        let end = at + s.len as usize;
        let dst = out.get_mut(at..end).ok_or(Error::HeaderUnreadable)?;
        mem.read_slice(dst, s.addr)
            .map_err(|_| Error::HeaderUnreadable)?;
        at = end;
    }
    Ok(())
}

/// Parses the chain into a [`Request`].
pub fn parse<M>(chain: DescriptorChain<M>) -> Result<Request, Rejected>
where
    M: Deref<Target = GuestMemory> + Clone,
{
    parse_descriptors(chain.memory(), chain.clone())
}

/// Parses the descriptors of one chain, read from `mem`, into a [`Request`] (for a chain
/// that was not popped from the ring just now: an in-flight request resubmitted).
pub fn parse_descriptors(
    mem: &GuestMemory,
    descriptors: impl IntoIterator<Item = Descriptor>,
) -> Result<Request, Rejected> {
    let mut readable = Vec::new();
    let mut writable: Vec<Segment> = Vec::new();
    let mut order_broken = false;
    let mut too_many = false;
    let mut outside = None;
    for (count, desc) in descriptors.into_iter().enumerate() {
        if count >= MAX_DESCRIPTORS {
            too_many = true;
            break;
        }
        let seg = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        if seg.len == 0 {
            continue;
        }
        if outside.is_none() && !mem.check_range(seg.addr, seg.len as usize) {
            outside = Some(Error::OutsideMemory {
                addr: seg.addr.raw_value(),
                len: seg.len,
            });
        }
        if desc.is_write_only() {
            writable.push(seg);
        } else {
            if !writable.is_empty() {
                order_broken = true;
            }
            readable.push(seg);
        }
    }
    // The status byte: the last writable byte, if it lies in guest memory.
    let last_byte = split_last_byte(&writable);
    let status = last_byte
        .as_ref()
        .map(|(_, at)| *at)
        .filter(|at| mem.check_range(*at, 1));
    let reject = |error| Rejected { status, error };
    if too_many {
        return Err(reject(Error::TooManyDescriptors));
    }
    if let Some(e) = outside {
        return Err(reject(e));
    }
    let (writable_data, status_addr) = last_byte.ok_or_else(|| reject(Error::NoStatus))?;
    if order_broken {
        return Err(reject(Error::ReadableAfterWritable));
    }
    let readable_len = total_len(&readable);
    let (header_segs, readable_data) = split_front(&readable, HEADER_SIZE)
        .ok_or_else(|| reject(Error::HeaderTooShort(readable_len)))?;
    let mut header = [0u8; HEADER_LEN];
    read_bytes(mem, &header_segs, &mut header).map_err(reject)?;
    let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
    let request_type = u32::from_le_bytes([t0, t1, t2, t3]);
    let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);

    let kind = match request_type {
        request_type::IN | request_type::OUT => {
            let data = if request_type == request_type::IN {
                writable_data
            } else {
                readable_data
            };
            let len = total_len(&data);
            if len % SECTOR_SIZE != 0 {
                return Err(reject(Error::UnalignedLength(len)));
            }
            let len = u32::try_from(len)
                .ok()
                .filter(|l| u64::from(*l) <= MAX_DATA_LEN)
                .ok_or_else(|| reject(Error::TooLong(len)))?;
            let offset = sector
                .checked_mul(SECTOR_SIZE)
                .filter(|o| o.checked_add(u64::from(len)).is_some())
                .ok_or_else(|| reject(Error::SectorOverflow(sector)))?;
            if request_type == request_type::IN {
                Kind::Read { offset, data, len }
            } else {
                Kind::Write { offset, data, len }
            }
        }
        request_type::FLUSH => Kind::Flush,
        request_type::GET_ID => Kind::GetId {
            data: writable_data,
        },
        request_type::DISCARD | request_type::WRITE_ZEROES => {
            let len = total_len(&readable_data);
            if len == 0 || len % DISCARD_SEGMENT_SIZE as u64 != 0 {
                return Err(reject(Error::BadSegmentData(len)));
            }
            let count = len / DISCARD_SEGMENT_SIZE as u64;
            if count > u64::from(MAX_DISCARD_SEGMENTS) {
                return Err(reject(Error::TooManySegments(count)));
            }
            // At most MAX_DISCARD_SEGMENTS segments: a small allocation.
            let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(0)];
            read_bytes(mem, &readable_data, &mut bytes).map_err(reject)?;
            let discard = request_type == request_type::DISCARD;
            let mut ranges = Vec::new();
            let mut unmap = false;
            for seg in bytes.chunks_exact(DISCARD_SEGMENT_SIZE) {
                let mut s = [0u8; 8];
                s.copy_from_slice(&seg[0..8]);
                let sector = u64::from_le_bytes(s);
                let num = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
                let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
                // Discard must not carry UNMAP (5.2.6.2); reserved bits must be zero.
                let allowed = if discard { 0 } else { WRITE_ZEROES_FLAG_UNMAP };
                if flags & !allowed != 0 {
                    return Err(reject(Error::SegmentFlags(flags)));
                }
                unmap |= flags & WRITE_ZEROES_FLAG_UNMAP != 0;
                if num > MAX_DISCARD_SECTORS {
                    return Err(reject(Error::SegmentTooLong(num)));
                }
                let offset = sector
                    .checked_mul(SECTOR_SIZE)
                    .ok_or_else(|| reject(Error::SectorOverflow(sector)))?;
                let len = u64::from(num) << SECTOR_SHIFT;
                offset
                    .checked_add(len)
                    .ok_or_else(|| reject(Error::SectorOverflow(sector)))?;
                ranges.push(Range { offset, len });
            }
            if discard {
                Kind::Discard(ranges)
            } else {
                Kind::WriteZeroes { ranges, unmap }
            }
        }
        other => return Err(reject(Error::Unsupported(other))),
    };
    Ok(Request {
        kind,
        status: status_addr,
    })
}

impl Request {
    /// Checks the request against the image: bounds and read-only. Parsing already made
    /// sure the arithmetic cannot overflow.
    pub fn check(&self, capacity: u64, read_only: bool) -> Result<(), Error> {
        let within = |offset: u64, len: u64| {
            if offset.saturating_add(len) > capacity {
                Err(Error::BeyondCapacity {
                    offset,
                    len,
                    capacity,
                })
            } else {
                Ok(())
            }
        };
        match &self.kind {
            Kind::Read { offset, len, .. } => within(*offset, u64::from(*len)),
            Kind::Write { offset, len, .. } => {
                if read_only {
                    return Err(Error::ReadOnly);
                }
                within(*offset, u64::from(*len))
            }
            Kind::Discard(ranges) | Kind::WriteZeroes { ranges, .. } => {
                if read_only {
                    return Err(Error::ReadOnly);
                }
                ranges.iter().try_for_each(|r| within(r.offset, r.len))
            }
            Kind::Flush | Kind::GetId { .. } => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const R: u16 = 0;
    const W: u16 = 2; // VRING_DESC_F_WRITE
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const MEM: usize = 0x100_0000;

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory")
    }

    fn header(mem: &GuestMemoryMmap<()>, at: u64, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).expect("header");
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn parse_chain(
        mem: &GuestMemoryMmap<()>,
        descs: &[RawDescriptor],
    ) -> Result<Request, Rejected> {
        let q = MockSplitQueue::new(mem, 16);
        let chain = q.build_desc_chain(descs).expect("chain");
        parse(chain)
    }

    fn rejected(r: Result<Request, Rejected>) -> Rejected {
        r.expect_err("must be rejected")
    }

    #[test]
    fn read_write_flush_get_id_parse() {
        let mem = memory();
        header(&mem, HDR, request_type::IN, 8);
        let r = parse_chain(
            &mem,
            &[desc(HDR, 16, R), desc(DATA, 1024, W), desc(STATUS, 1, W)],
        )
        .expect("read");
        assert_eq!(r.status, GuestAddress(STATUS));
        assert_eq!(
            r.kind,
            Kind::Read {
                offset: 4096,
                data: vec![Segment {
                    addr: GuestAddress(DATA),
                    len: 1024
                }],
                len: 1024
            }
        );
        header(&mem, HDR, request_type::OUT, 1);
        let r = parse_chain(
            &mem,
            &[desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 1, W)],
        )
        .expect("write");
        assert!(matches!(
            r.kind,
            Kind::Write {
                offset: 512,
                len: 512,
                ..
            }
        ));
        header(&mem, HDR, request_type::FLUSH, 0);
        let r = parse_chain(&mem, &[desc(HDR, 16, R), desc(STATUS, 1, W)]).expect("flush");
        assert_eq!(r.kind, Kind::Flush);
        header(&mem, HDR, request_type::GET_ID, 0);
        let r = parse_chain(
            &mem,
            &[desc(HDR, 16, R), desc(DATA, 20, W), desc(STATUS, 1, W)],
        )
        .expect("id");
        assert!(matches!(r.kind, Kind::GetId { ref data } if data.len() == 1 && data[0].len == 20));
    }

    #[test]
    fn any_layout_header_and_data_merged_status_merged() {
        let mem = memory();
        // Header and data in one readable descriptor, status at the end of a writable one.
        header(&mem, HDR, request_type::OUT, 2);
        let r =
            parse_chain(&mem, &[desc(HDR, 16 + 512, R), desc(STATUS, 1, W)]).expect("merged write");
        assert_eq!(
            r.kind,
            Kind::Write {
                offset: 1024,
                data: vec![Segment {
                    addr: GuestAddress(HDR + 16),
                    len: 512
                }],
                len: 512
            }
        );
        // Header split over two descriptors; read data and status in one writable descriptor.
        header(&mem, HDR, request_type::IN, 0);
        let r = parse_chain(
            &mem,
            &[desc(HDR, 10, R), desc(HDR + 10, 6, R), desc(DATA, 513, W)],
        )
        .expect("split");
        assert_eq!(r.status, GuestAddress(DATA + 512));
        assert!(matches!(r.kind, Kind::Read { len: 512, .. }));
    }

    #[test]
    fn malformed_chains_get_their_status() {
        let mem = memory();
        header(&mem, HDR, request_type::IN, 0);
        // No writable byte at all: nowhere to put a status.
        let e = rejected(parse_chain(&mem, &[desc(HDR, 16, R), desc(DATA, 512, R)]));
        assert_eq!((e.status, e.error), (None, Error::NoStatus));
        // Header too short.
        let e = rejected(parse_chain(&mem, &[desc(HDR, 8, R), desc(STATUS, 1, W)]));
        assert_eq!(e.error, Error::HeaderTooShort(8));
        assert_eq!(e.status, Some(GuestAddress(STATUS)));
        assert_eq!(e.error.status(), status::IOERR);
        // Readable after writable.
        let e = rejected(parse_chain(
            &mem,
            &[
                desc(HDR, 16, R),
                desc(DATA, 512, W),
                desc(DATA, 512, R),
                desc(STATUS, 1, W),
            ],
        ));
        assert_eq!(e.error, Error::ReadableAfterWritable);
        // Data buffer outside guest memory.
        let e = rejected(parse_chain(
            &mem,
            &[
                desc(HDR, 16, R),
                desc(MEM as u64 - 256, 512, W),
                desc(STATUS, 1, W),
            ],
        ));
        assert!(
            matches!(e.error, Error::OutsideMemory { .. }),
            "{:?}",
            e.error
        );
        assert_eq!(e.status, Some(GuestAddress(STATUS)));
        // Status outside guest memory: reject without a status address.
        let e = rejected(parse_chain(
            &mem,
            &[desc(HDR, 16, R), desc(u64::MAX - 1, 1, W)],
        ));
        assert!(matches!(e.error, Error::OutsideMemory { .. }));
        assert_eq!(e.status, None);
        // Header outside guest memory.
        let e = rejected(parse_chain(
            &mem,
            &[desc(MEM as u64, 16, R), desc(STATUS, 1, W)],
        ));
        assert!(matches!(e.error, Error::OutsideMemory { .. }));
        // Data not a sector multiple.
        let e = rejected(parse_chain(
            &mem,
            &[desc(HDR, 16, R), desc(DATA, 100, W), desc(STATUS, 1, W)],
        ));
        assert_eq!(e.error, Error::UnalignedLength(100));
        // Sector overflowing the byte offset.
        header(&mem, HDR, request_type::IN, u64::MAX / 256);
        let e = rejected(parse_chain(
            &mem,
            &[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)],
        ));
        assert!(matches!(e.error, Error::SectorOverflow(_)));
        // Unknown type: UNSUPP.
        header(&mem, HDR, 0x77, 0);
        let e = rejected(parse_chain(&mem, &[desc(HDR, 16, R), desc(STATUS, 1, W)]));
        assert_eq!(
            (e.error.clone(), e.error.status()),
            (Error::Unsupported(0x77), status::UNSUPP)
        );
    }

    #[test]
    fn looping_and_overlong_chains_end() {
        let mem = memory();
        header(&mem, HDR, request_type::IN, 0);
        // A descriptor whose `next` points to itself: virtio-queue's iterator stops after
        // the queue size, the parser sees a chain without status.
        let q = MockSplitQueue::new(&mem, 16);
        let looped = RawDescriptor::from(SplitDescriptor::new(HDR, 16, 1, 0));
        q.add_desc_chains(&[looped], 0).expect("add");
        let mut queue: virtio_queue::Queue = q.create_queue().expect("queue");
        use virtio_queue::QueueOwnedT;
        let chain = queue.iter(&mem).expect("iter").next().expect("chain");
        let e = rejected(parse(chain));
        assert_eq!(e.error, Error::NoStatus);
    }

    #[test]
    fn discard_and_write_zeroes() {
        let mem = memory();
        let seg = |sector: u64, num: u32, flags: u32| {
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&sector.to_le_bytes());
            b[8..12].copy_from_slice(&num.to_le_bytes());
            b[12..16].copy_from_slice(&flags.to_le_bytes());
            mem.write_slice(&b, GuestAddress(DATA)).expect("segment");
        };
        let chain = [desc(HDR, 16, R), desc(DATA, 16, R), desc(STATUS, 1, W)];
        header(&mem, HDR, request_type::DISCARD, 0);
        seg(8, 16, 0);
        let r = parse_chain(&mem, &chain).expect("discard");
        assert_eq!(
            r.kind,
            Kind::Discard(vec![Range {
                offset: 4096,
                len: 8192
            }])
        );
        seg(8, 16, WRITE_ZEROES_FLAG_UNMAP);
        let e = rejected(parse_chain(&mem, &chain));
        assert_eq!(e.error.status(), status::UNSUPP, "discard with UNMAP");
        header(&mem, HDR, request_type::WRITE_ZEROES, 0);
        let r = parse_chain(&mem, &chain).expect("write zeroes");
        assert!(matches!(r.kind, Kind::WriteZeroes { unmap: true, .. }));
        seg(8, 16, 0x80);
        assert_eq!(
            rejected(parse_chain(&mem, &chain)).error,
            Error::SegmentFlags(0x80)
        );
        seg(8, u32::MAX, 0);
        assert!(matches!(
            rejected(parse_chain(&mem, &chain)).error,
            Error::SegmentTooLong(_)
        ));
        seg(u64::MAX, 1, 0);
        assert!(matches!(
            rejected(parse_chain(&mem, &chain)).error,
            Error::SectorOverflow(_)
        ));
        let e = rejected(parse_chain(
            &mem,
            &[desc(HDR, 16, R), desc(DATA, 15, R), desc(STATUS, 1, W)],
        ));
        assert_eq!(e.error, Error::BadSegmentData(15));
        let e = rejected(parse_chain(
            &mem,
            &[desc(HDR, 16, R), desc(DATA, 32, R), desc(STATUS, 1, W)],
        ));
        assert_eq!(e.error, Error::TooManySegments(2));
        let e = rejected(parse_chain(&mem, &[desc(HDR, 16, R), desc(STATUS, 1, W)]));
        assert_eq!(e.error, Error::BadSegmentData(0));
    }

    #[test]
    fn check_bounds_and_read_only() {
        let read = |offset, len| Request {
            kind: Kind::Read {
                offset,
                data: vec![],
                len,
            },
            status: GuestAddress(0),
        };
        assert_eq!(read(0, 4096).check(4096, false), Ok(()));
        assert!(matches!(
            read(512, 4096).check(4096, false),
            Err(Error::BeyondCapacity { .. })
        ));
        assert!(matches!(read(4096, 0).check(4096, false), Ok(())));
        let write = Request {
            kind: Kind::Write {
                offset: 0,
                data: vec![],
                len: 512,
            },
            status: GuestAddress(0),
        };
        assert_eq!(write.check(4096, true), Err(Error::ReadOnly));
        let discard = Request {
            kind: Kind::Discard(vec![Range {
                offset: 4096,
                len: 512,
            }]),
            status: GuestAddress(0),
        };
        assert!(matches!(
            discard.check(4096, false),
            Err(Error::BeyondCapacity { .. })
        ));
        assert_eq!(discard.check(1 << 20, true), Err(Error::ReadOnly));
        let flush = Request {
            kind: Kind::Flush,
            status: GuestAddress(0),
        };
        assert_eq!(flush.check(0, true), Ok(()));
    }

    /// Random chains (addresses in and out of memory, random flags, lengths, headers):
    /// the parser never panics, and what it accepts only points into guest memory.
    #[test]
    #[allow(clippy::cast_possible_truncation)] // small random numbers, reduced by `%`
    fn random_chains_never_escape_guest_memory() {
        let mem = memory();
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let types = [
            request_type::IN,
            request_type::OUT,
            request_type::FLUSH,
            request_type::GET_ID,
            request_type::DISCARD,
            request_type::WRITE_ZEROES,
            0xdead,
        ];
        let (mut accepted, mut rejected) = (0, 0);
        for _ in 0..5000 {
            let t = types[(next() % types.len() as u64) as usize];
            header(&mem, HDR, t, next() % 4096);
            let seg = {
                let mut b = [0u8; 16];
                b[..8].copy_from_slice(&(next() % 8192).to_le_bytes());
                b[8..12].copy_from_slice(&((next() % 64) as u32).to_le_bytes());
                b[12..16].copy_from_slice(&((next() % 3) as u32).to_le_bytes());
                b
            };
            mem.write_slice(&seg, GuestAddress(DATA)).expect("segment");
            let n = 1 + next() % 6;
            let mut descs: Vec<RawDescriptor> = (0..n)
                .map(|i| {
                    let addr = match next() % 5 {
                        0 => next(),
                        1 => MEM as u64 - next() % 1024,
                        2 if i == 0 => HDR,
                        3 => STATUS,
                        _ => DATA + next() % 4096,
                    };
                    let len = match next() % 4 {
                        0 => (next() % 600) as u32,
                        1 => 16,
                        2 => 512 * (1 + (next() % 8) as u32),
                        _ => 1,
                    };
                    desc(addr, len, if next() % 2 == 0 { R } else { W })
                })
                .collect();
            // Half the chains get a plausible header and status around random data.
            if next() % 2 == 0 {
                descs.insert(0, desc(HDR, 16, R));
                descs.push(desc(STATUS, 1, W));
            }
            match parse_chain(&mem, &descs) {
                Ok(req) => {
                    accepted += 1;
                    assert!(mem.check_range(req.status, 1));
                    let data = match &req.kind {
                        Kind::Read { data, .. }
                        | Kind::Write { data, .. }
                        | Kind::GetId { data } => data.clone(),
                        _ => Vec::new(),
                    };
                    for s in data {
                        assert!(
                            mem.check_range(s.addr, s.len as usize),
                            "{s:?} escapes memory"
                        );
                    }
                    let _ = req.check(1 << 22, next() % 2 == 0);
                }
                Err(r) => {
                    rejected += 1;
                    if let Some(at) = r.status {
                        assert!(mem.check_range(at, 1));
                    }
                }
            }
        }
        assert!(
            accepted > 100 && rejected > 100,
            "{accepted} accepted, {rejected} rejected"
        );
    }

    #[test]
    fn split_helpers() {
        let s = |a: u64, l: u32| Segment {
            addr: GuestAddress(a),
            len: l,
        };
        let segs = [s(100, 10), s(200, 10)];
        let (f, r) = split_front(&segs, 15).expect("enough");
        assert_eq!(f, vec![s(100, 10), s(200, 5)]);
        assert_eq!(r, vec![s(205, 5)]);
        assert!(split_front(&segs, 21).is_none());
        assert_eq!(split_front(&segs, 20).expect("exact").1, vec![]);
        let (rest, last) = split_last_byte(&segs).expect("has bytes");
        assert_eq!(
            (rest, last),
            (vec![s(100, 10), s(200, 9)], GuestAddress(209))
        );
        assert!(split_last_byte(&[]).is_none());
    }
}
