//! The virtio-vsock packet header and the parsing of packets out of descriptor chains.
//!
//! A packet is a 44-byte little-endian header followed by `len` bytes of payload (virtio 1.2,
//! 5.10.6). On the TX queue the driver places header and payload in device-readable
//! descriptors, split across descriptors in any way it likes; on the RX queue the driver
//! offers device-writable buffers the device fills with a header and as much payload as fits.
//!
//! Everything here is read from guest memory and so is hostile: descriptors may be of the
//! wrong direction, too short, point outside guest memory, or declare a payload longer than
//! the chain carries or longer than any packet may be. Each such chain is refused with a
//! precise [`Error`] and never read or written outside guest memory (all accesses go
//! through `vm-memory`).

use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileSlice};

/// The guest memory type packets are read from.
pub type Memory = vhost_device_common::GuestMemory;

/// Size of the packet header on the wire.
pub const HEADER_LEN: usize = 44;
/// [`HEADER_LEN`] as a used-ring length.
pub const HEADER_LEN_U32: u32 = 44;
/// The largest payload a TX packet may carry (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// The host's well-known CID.
pub const HOST_CID: u64 = 2;

/// `type`: connection-oriented stream.
pub const TYPE_STREAM: u16 = 1;
/// `type`: connection-oriented, message-boundary preserving (`VIRTIO_VSOCK_F_SEQPACKET`).
pub const TYPE_SEQPACKET: u16 = 2;

/// `op` values.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset (refused, aborted or closed).
    pub const RST: u16 = 3;
    /// One or both directions shut down; flags say which.
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// The sender's receive buffer state changed.
    pub const CREDIT_UPDATE: u16 = 6;
    /// The sender asks for a `CREDIT_UPDATE`.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `flags` of a `SHUTDOWN`: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// `flags` of a `SHUTDOWN`: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;
/// `flags` of a SEQPACKET `RW`: last fragment of a message.
pub const SEQ_EOM: u32 = 1;
/// `flags` of a SEQPACKET `RW`: last fragment of a record (`MSG_EOR`).
pub const SEQ_EOR: u32 = 2;

/// Why a descriptor chain is not a usable packet.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A TX chain has a device-writable descriptor.
    #[error("unexpected device-writable descriptor in a TX chain")]
    UnexpectedWriteOnlyDescriptor,
    /// An RX chain has a device-readable descriptor.
    #[error("unexpected device-readable descriptor in an RX chain")]
    UnexpectedReadOnlyDescriptor,
    /// The chain is shorter than a packet header.
    #[error("descriptor chain too short for a packet header ({0} bytes)")]
    DescriptorChainTooShort(usize),
    /// The header declares more payload than a packet may carry.
    #[error("packet length {0} exceeds the maximum payload")]
    PayloadTooLong(u32),
    /// The header declares more payload than the chain carries.
    #[error("packet declares {declared} payload bytes but the chain carries {available}")]
    PayloadTooShort {
        /// `len` from the header.
        declared: u32,
        /// What the descriptors hold after the header.
        available: usize,
    },
    /// A descriptor points outside guest memory.
    #[error("descriptor outside guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// The packet header, decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (`TYPE_STREAM`, `TYPE_SEQPACKET`).
    pub type_: u16,
    /// Operation (see [`op`]).
    pub op: u16,
    /// Operation-specific flags.
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, modulo 2^32.
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes a header from its wire form.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Self {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the header in its wire form.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The header of a reply to `self`: addresses swapped, same type, no payload.
    pub fn reply(&self, op: u16) -> Self {
        Header {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            len: 0,
            type_: self.type_,
            op,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }
}

/// A guest memory range of one descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    addr: GuestAddress,
    len: usize,
}

/// The memory ranges of a chain, after skipping `skip` bytes, limited to `limit` bytes.
fn segments_after(segs: &[Segment], skip: usize, limit: usize) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut skip = skip;
    let mut left = limit;
    for s in segs {
        if left == 0 {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let len = (s.len - skip).min(left);
        // Cannot overflow: the descriptor was checked to lie inside guest memory.
        out.push(Segment {
            addr: GuestAddress(s.addr.0.wrapping_add(skip as u64)),
            len,
        });
        left -= len;
        skip = 0;
    }
    out
}

/// Checks that every segment lies in guest memory.
fn check_segments(mem: &Memory, segs: &[Segment]) -> Result<(), Error> {
    for s in segs {
        for slice in mem.get_slices(s.addr, s.len) {
            slice.map_err(Error::Memory)?;
        }
    }
    Ok(())
}

/// Copies `buf.len()` bytes from the start of the segments into `buf`.
fn read_prefix(mem: &Memory, segs: &[Segment], buf: &mut [u8]) -> Result<(), Error> {
    let mut done = 0;
    for s in segments_after(segs, 0, buf.len()) {
        for slice in mem.get_slices(s.addr, s.len) {
            let slice = slice.map_err(Error::Memory)?;
            let n = slice.copy_to(&mut buf[done..]);
            done += n;
        }
    }
    Ok(())
}

/// Iterates over the guest memory slices of `segs`, in order.
fn for_each_slice<E>(
    mem: &Memory,
    segs: &[Segment],
    mut f: impl FnMut(VolatileSlice<'_, ()>) -> Result<bool, E>,
) -> Result<(), E>
where
    E: From<Error>,
{
    for s in segs {
        for slice in mem.get_slices(s.addr, s.len) {
            let slice = slice.map_err(Error::Memory)?;
            if !f(slice)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// A packet the driver placed on the TX queue: its header and where its payload lies.
#[derive(Debug, Clone)]
pub struct TxPacket {
    /// The decoded header.
    pub hdr: Header,
    payload: Vec<Segment>,
}

impl TxPacket {
    /// Parses a TX chain given as `(address, length, write_only)` descriptors.
    pub fn parse<I>(mem: &Memory, descriptors: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = (GuestAddress, u32, bool)>,
    {
        let mut segs = Vec::new();
        let mut total: usize = 0;
        for (addr, len, write_only) in descriptors {
            if write_only {
                return Err(Error::UnexpectedWriteOnlyDescriptor);
            }
            let len = len as usize;
            segs.push(Segment { addr, len });
            total = total.saturating_add(len);
            // Nothing beyond the largest packet is ever read: stop collecting.
            if total >= HEADER_LEN + MAX_PAYLOAD {
                break;
            }
        }
        if total < HEADER_LEN {
            return Err(Error::DescriptorChainTooShort(total));
        }
        check_segments(mem, &segs)?;
        let mut raw = [0u8; HEADER_LEN];
        read_prefix(mem, &segs, &mut raw)?;
        let hdr = Header::from_bytes(&raw);
        let declared = hdr.len as usize;
        if declared > MAX_PAYLOAD {
            return Err(Error::PayloadTooLong(hdr.len));
        }
        let available = total - HEADER_LEN;
        if declared > available {
            return Err(Error::PayloadTooShort {
                declared: hdr.len,
                available,
            });
        }
        let payload = segments_after(&segs, HEADER_LEN, declared);
        Ok(TxPacket { hdr, payload })
    }

    /// The payload length (`hdr.len`, checked against the chain).
    pub fn payload_len(&self) -> usize {
        self.hdr.len as usize
    }

    /// Calls `f` with each guest memory slice of the payload, in order, while it returns
    /// `Ok(true)`.
    pub fn for_each_payload_slice<E: From<Error>>(
        &self,
        mem: &Memory,
        f: impl FnMut(VolatileSlice<'_, ()>) -> Result<bool, E>,
    ) -> Result<(), E> {
        for_each_slice(mem, &self.payload, f)
    }

    /// Copies the payload out of guest memory.
    pub fn payload_to_vec(&self, mem: &Memory) -> Result<Vec<u8>, Error> {
        let mut out = vec![0u8; self.payload_len()];
        let mut done = 0;
        self.for_each_payload_slice::<Error>(mem, |s| {
            done += s.copy_to(&mut out[done..]);
            Ok(true)
        })?;
        Ok(out)
    }
}

/// A buffer the driver offered on the RX queue.
#[derive(Debug, Clone)]
pub struct RxBuffer {
    segs: Vec<Segment>,
    capacity: usize,
}

impl RxBuffer {
    /// Parses an RX chain given as `(address, length, write_only)` descriptors.
    pub fn parse<I>(mem: &Memory, descriptors: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = (GuestAddress, u32, bool)>,
    {
        let mut segs = Vec::new();
        let mut total: usize = 0;
        for (addr, len, write_only) in descriptors {
            if !write_only {
                return Err(Error::UnexpectedReadOnlyDescriptor);
            }
            let len = len as usize;
            segs.push(Segment { addr, len });
            total = total.saturating_add(len);
            if total >= HEADER_LEN + MAX_PAYLOAD {
                break;
            }
        }
        if total < HEADER_LEN {
            return Err(Error::DescriptorChainTooShort(total));
        }
        check_segments(mem, &segs)?;
        Ok(RxBuffer {
            segs,
            capacity: (total - HEADER_LEN).min(MAX_PAYLOAD),
        })
    }

    /// How many payload bytes fit after the header.
    pub fn payload_capacity(&self) -> usize {
        self.capacity
    }

    /// Writes the header at the start of the buffer.
    pub fn write_header(&self, mem: &Memory, hdr: &Header) -> Result<(), Error> {
        let raw = hdr.to_bytes();
        let mut done = 0;
        for s in segments_after(&self.segs, 0, HEADER_LEN) {
            for slice in mem.get_slices(s.addr, s.len) {
                let slice = slice.map_err(Error::Memory)?;
                let n = slice.len().min(HEADER_LEN - done);
                slice.copy_from(&raw[done..done + n]);
                done += n;
            }
        }
        Ok(())
    }

    /// Calls `f` with each guest memory slice of the payload area (at most `limit` bytes),
    /// in order, while it returns `Ok(true)`.
    pub fn for_each_payload_slice<E: From<Error>>(
        &self,
        mem: &Memory,
        limit: usize,
        f: impl FnMut(VolatileSlice<'_, ()>) -> Result<bool, E>,
    ) -> Result<(), E> {
        let segs = segments_after(&self.segs, HEADER_LEN, limit.min(self.capacity));
        for_each_slice(mem, &segs, f)
    }

    /// Copies `data` (at most the capacity) into the payload area; returns the bytes copied.
    pub fn write_payload(&self, mem: &Memory, data: &[u8]) -> Result<usize, Error> {
        let mut done = 0;
        self.for_each_payload_slice::<Error>(mem, data.len(), |s| {
            let n = s.len().min(data.len() - done);
            s.copy_from(&data[done..done + n]);
            done += n;
            Ok(done < data.len())
        })?;
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    fn memory() -> Memory {
        Memory::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory")
    }

    fn header(len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1000,
            dst_port: 5000,
            len,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips_in_little_endian() {
        let h = header(5);
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[30..32], &op::RW.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
        let r = h.reply(op::RST);
        assert_eq!(
            (r.src_cid, r.dst_cid, r.src_port, r.dst_port, r.op),
            (2, 3, 5000, 1000, op::RST)
        );
    }

    #[test]
    fn header_and_payload_split_anyhow() {
        let mem = memory();
        let raw = header(6).to_bytes();
        // Header in two pieces; the second descriptor also carries the first payload bytes.
        mem.write_slice(&raw[..10], GuestAddress(0x100))
            .expect("write");
        mem.write_slice(&raw[10..], GuestAddress(0x200))
            .expect("write");
        mem.write_slice(b"ab", GuestAddress(0x200 + 34))
            .expect("write");
        mem.write_slice(b"cdef", GuestAddress(0x400))
            .expect("write");
        let descs = [
            (GuestAddress(0x100), 10, false),
            (GuestAddress(0x200), 36, false),
            (GuestAddress(0x400), 100, false),
        ];
        let pkt = TxPacket::parse(&mem, descs).expect("valid packet");
        assert_eq!(pkt.hdr, header(6));
        assert_eq!(pkt.payload_to_vec(&mem).expect("payload"), b"abcdef");
    }

    #[test]
    fn malformed_tx_chains_are_refused() {
        let mem = memory();
        mem.write_slice(&header(8).to_bytes(), GuestAddress(0x100))
            .expect("write");
        let a = GuestAddress(0x100);
        assert!(matches!(
            TxPacket::parse(&mem, [(a, 44, true)]),
            Err(Error::UnexpectedWriteOnlyDescriptor)
        ));
        assert!(matches!(
            TxPacket::parse(&mem, [(a, 43, false)]),
            Err(Error::DescriptorChainTooShort(43))
        ));
        assert!(matches!(
            TxPacket::parse(&mem, Vec::new()),
            Err(Error::DescriptorChainTooShort(0))
        ));
        assert!(matches!(
            TxPacket::parse(&mem, [(GuestAddress((1 << 20) - 20), 44, false)]),
            Err(Error::Memory(_))
        ));
        assert!(matches!(
            TxPacket::parse(&mem, [(GuestAddress(u64::MAX - 10), 44, false)]),
            Err(Error::Memory(_))
        ));
        // Declares 8 bytes, carries 4.
        assert!(matches!(
            TxPacket::parse(&mem, [(a, 48, false)]),
            Err(Error::PayloadTooShort {
                declared: 8,
                available: 4
            })
        ));
        mem.write_slice(&header(u32::MAX).to_bytes(), a)
            .expect("write");
        assert!(matches!(
            TxPacket::parse(&mem, [(a, u32::MAX, false)]),
            Err(Error::PayloadTooLong(u32::MAX)) | Err(Error::Memory(_))
        ));
        mem.write_slice(&header(70_000).to_bytes(), a)
            .expect("write");
        assert!(matches!(
            TxPacket::parse(&mem, [(a, 44 + 70_000, false)]),
            Err(Error::PayloadTooLong(70_000))
        ));
    }

    #[test]
    fn many_tiny_descriptors_stop_at_the_largest_packet() {
        let mem = memory();
        // A driver offering a huge chain: collection stops once a maximal packet is covered.
        let descs = (0..100_000u64).map(|i| (GuestAddress(i % 1000), 1u32, false));
        let pkt = TxPacket::parse(&mem, descs).expect("zeros are a valid header");
        assert_eq!(pkt.payload_len(), 0);
    }

    #[test]
    fn random_chains_never_panic_or_escape_memory() {
        let mem = memory();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..20_000u32 {
            // Sometimes a plausible header with a random length in guest memory.
            let mut h = header(u32::try_from(next() % 70_000).unwrap_or(0));
            h.op = u16::try_from(next() % 9).unwrap_or(0);
            mem.write_slice(&h.to_bytes(), GuestAddress(0))
                .expect("write");
            let n = usize::try_from(next() % 6).unwrap_or(0);
            let descs: Vec<(GuestAddress, u32, bool)> = (0..n)
                .map(|i| {
                    let addr = match next() % 4 {
                        0 => 0,
                        1 => next() % (1 << 20),
                        2 => (1 << 20) - next() % 64,
                        _ => next(),
                    };
                    let len = match next() % 3 {
                        0 => u32::try_from(next() % 128).unwrap_or(0),
                        1 => u32::try_from(next() % 100_000).unwrap_or(0),
                        _ => u32::try_from(next() >> 32).unwrap_or(0),
                    };
                    let write_only = round % 2 == 0 && i > 0 && next() % 2 == 0;
                    (GuestAddress(addr), len, write_only)
                })
                .collect();
            if let Ok(pkt) = TxPacket::parse(&mem, descs.clone()) {
                assert!(pkt.payload_len() <= MAX_PAYLOAD);
                assert_eq!(
                    pkt.payload_to_vec(&mem).expect("checked").len(),
                    pkt.payload_len()
                );
            }
            let rx: Vec<_> = descs.iter().map(|&(a, l, _)| (a, l, true)).collect();
            if let Ok(buf) = RxBuffer::parse(&mem, rx) {
                assert!(buf.payload_capacity() <= MAX_PAYLOAD);
                buf.write_header(&mem, &h).expect("checked");
                let data = vec![0xabu8; buf.payload_capacity() + 10];
                assert_eq!(
                    buf.write_payload(&mem, &data).expect("checked"),
                    buf.payload_capacity()
                );
            }
        }
    }

    #[test]
    fn rx_buffers_take_header_and_payload_across_descriptors() {
        let mem = memory();
        let descs = [
            (GuestAddress(0x1000), 20, true),
            (GuestAddress(0x2000), 100, true),
        ];
        let buf = RxBuffer::parse(&mem, descs).expect("valid buffer");
        assert_eq!(buf.payload_capacity(), 76);
        let h = header(3);
        buf.write_header(&mem, &h).expect("header");
        assert_eq!(buf.write_payload(&mem, b"xyz").expect("payload"), 3);
        let mut raw = [0u8; HEADER_LEN];
        mem.read_slice(&mut raw[..20], GuestAddress(0x1000))
            .expect("read");
        mem.read_slice(&mut raw[20..], GuestAddress(0x2000))
            .expect("read");
        assert_eq!(Header::from_bytes(&raw), h);
        let mut p = [0u8; 3];
        mem.read_slice(&mut p, GuestAddress(0x2000 + 24))
            .expect("read");
        assert_eq!(&p, b"xyz");
        // Never more than the capacity.
        assert_eq!(buf.write_payload(&mem, &[1u8; 200]).expect("payload"), 76);
    }

    #[test]
    fn malformed_rx_buffers_are_refused() {
        let mem = memory();
        assert!(matches!(
            RxBuffer::parse(&mem, [(GuestAddress(0), 100, false)]),
            Err(Error::UnexpectedReadOnlyDescriptor)
        ));
        assert!(matches!(
            RxBuffer::parse(&mem, [(GuestAddress(0), 40, true)]),
            Err(Error::DescriptorChainTooShort(40))
        ));
        assert!(matches!(
            RxBuffer::parse(&mem, [(GuestAddress(1 << 20), 100, true)]),
            Err(Error::Memory(_))
        ));
    }
}
