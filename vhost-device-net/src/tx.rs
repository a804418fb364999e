//! Transmit: one TX chain is one frame, written to the tap straight from guest memory.
//!
//! Chain shape (virtio 1.2, 5.1.6.2): device-readable descriptors only, holding the
//! virtio-net header and then the frame, split anywhere. The header is checked (a GSO type
//! the device offers and the guest acked; a size within the MTU, or 64 KiB for GSO) and
//! then passed to the tap unchanged with the frame in one `writev` over the descriptors'
//! host mappings: no copy. A chain that breaks a rule is dropped, completed with length 0,
//! and counted; the queue keeps going.

use std::io;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::virtio::{Header, Negotiated, ETH_HLEN_VLAN, LEGACY_HDR_LEN, MAX_GSO_FRAME};

/// The most buffers one `writev` takes (Linux's `UIO_MAXIOV`).
pub const MAX_IOVECS: usize = 1024;

/// Where transmitted frames go: the tap, or a test's recorder.
pub trait FrameSink {
    /// Writes one frame given as buffers.
    ///
    /// # Safety
    ///
    /// Every `iovec` must be valid for reads of its length for the duration of the call.
    unsafe fn write_frame(&self, iov: &[libc::iovec]) -> io::Result<usize>;
}

impl FrameSink for crate::tap::Tap {
    unsafe fn write_frame(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: our caller upholds the same contract `Tap::writev` asks for.
        unsafe { self.writev(iov) }
    }
}

/// What happened to a TX chain.
#[derive(Debug)]
pub enum TxOutcome {
    /// The frame (header included) of this many bytes went to the tap.
    Sent(usize),
    /// The frame was dropped.
    Dropped(TxDrop),
}

/// Why a TX chain was dropped.
#[derive(Debug)]
pub enum TxDrop {
    /// A device-writable descriptor in a TX chain.
    WriteOnlyDescriptor,
    /// A descriptor outside guest memory.
    BadAddress,
    /// More descriptors than one `writev` takes.
    TooManyDescriptors,
    /// Shorter than the virtio-net header.
    ShortHeader,
    /// Larger than the MTU (or 64 KiB for a GSO frame).
    TooLarge,
    /// A GSO type the device does not offer, or GSO the guest did not negotiate.
    BadGso,
    /// The tap refused the frame.
    Tap(io::Error),
}

/// Reusable space for one worker's TX path.
#[derive(Debug, Default)]
pub struct TxScratch {
    segments: Vec<(GuestAddress, usize)>,
    iovecs: Vec<libc::iovec>,
}

// SAFETY: the raw pointers in `iovecs` are only meaningful during one `send` call, which
// rebuilds them; between calls they are stale values never dereferenced, so moving the
// scratch space to another thread is harmless.
unsafe impl Send for TxScratch {}

/// Sends the frame in `chain` to `sink`. `max_frame` is the largest non-GSO frame after the
/// header (MTU plus an Ethernet header with a VLAN tag).
pub fn send<M, S>(
    chain: DescriptorChain<M>,
    neg: &Negotiated,
    max_frame: usize,
    sink: &S,
    scratch: &mut TxScratch,
) -> TxOutcome
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
    S: FrameSink,
{
    // The chain is consumed by iterating it; a clone (a cheap guard clone) keeps the memory.
    let keep = chain.clone();
    let mem: &M::Target = keep.memory();
    scratch.segments.clear();
    scratch.iovecs.clear();
    let mut total = 0usize;
    for desc in chain {
        if desc.is_write_only() {
            return TxOutcome::Dropped(TxDrop::WriteOnlyDescriptor);
        }
        let len = desc.len() as usize;
        if !mem.check_range(desc.addr(), len, Permissions::Read) {
            return TxOutcome::Dropped(TxDrop::BadAddress);
        }
        if len == 0 {
            continue;
        }
        if scratch.segments.len() == MAX_IOVECS {
            return TxOutcome::Dropped(TxDrop::TooManyDescriptors);
        }
        scratch.segments.push((desc.addr(), len));
        total += len;
    }
    if total < neg.hdr_len {
        return TxOutcome::Dropped(TxDrop::ShortHeader);
    }
    let mut hdr = [0u8; LEGACY_HDR_LEN];
    let mut filled = 0;
    for &(addr, len) in &scratch.segments {
        if filled == hdr.len() {
            break;
        }
        let n = len.min(hdr.len() - filled);
        if mem.read_slice(&mut hdr[filled..filled + n], addr).is_err() {
            return TxOutcome::Dropped(TxDrop::BadAddress);
        }
        filled += n;
    }
    let header = Header::parse(&hdr);
    let frame = total - neg.hdr_len;
    if header.is_gso() {
        if !neg.host_tso || !header.gso_supported() {
            return TxOutcome::Dropped(TxDrop::BadGso);
        }
        if frame > MAX_GSO_FRAME {
            return TxOutcome::Dropped(TxDrop::TooLarge);
        }
    } else if !header.gso_supported() {
        return TxOutcome::Dropped(TxDrop::BadGso);
    } else if frame > max_frame {
        return TxOutcome::Dropped(TxDrop::TooLarge);
    }

    for &(addr, len) in &scratch.segments {
        // A descriptor inside one region maps to one host range; one that crosses regions
        // (possible, the ranges were checked) comes as one slice per region.
        let Ok(slices) = mem.get_slices(addr, len, Permissions::Read) else {
            return TxOutcome::Dropped(TxDrop::BadAddress);
        };
        for slice in slices {
            let Ok(slice) = slice else {
                return TxOutcome::Dropped(TxDrop::BadAddress);
            };
            if scratch.iovecs.len() == MAX_IOVECS {
                return TxOutcome::Dropped(TxDrop::TooManyDescriptors);
            }
            scratch.iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard().as_ptr().cast_mut().cast(),
                iov_len: slice.len(),
            });
        }
    }
    // SAFETY: every iovec points into a guest memory region of `mem` that `get_slices`
    // checked to hold `iov_len` bytes; `mem` (a clone of the chain's memory guard) keeps the
    // mappings alive until this call returns. The guest may change the bytes meanwhile, which
    // only changes the frame: the kernel validates the header it reads.
    match unsafe { sink.write_frame(&scratch.iovecs) } {
        Ok(_) => TxOutcome::Sent(total),
        Err(e) => TxOutcome::Dropped(TxDrop::Tap(e)),
    }
}

/// The largest non-GSO frame after the header for an MTU (or any size up to 64 KiB).
pub fn max_frame(mtu: Option<u16>) -> usize {
    match mtu {
        Some(mtu) => usize::from(mtu) + ETH_HLEN_VLAN,
        None => MAX_GSO_FRAME,
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // Small test constants.
mod tests {
    use super::*;
    use crate::virtio::{device_features, gso, HDR_LEN};
    use std::cell::RefCell;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    #[derive(Default)]
    struct Recorder {
        frames: RefCell<Vec<Vec<u8>>>,
    }

    impl FrameSink for Recorder {
        unsafe fn write_frame(&self, iov: &[libc::iovec]) -> io::Result<usize> {
            let mut out = Vec::new();
            for v in iov {
                // SAFETY: the caller guarantees each iovec is readable for its length.
                let part =
                    unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
                out.extend_from_slice(part);
            }
            let n = out.len();
            self.frames.borrow_mut().push(out);
            Ok(n)
        }
    }

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x10_0000), 0x10_0000),
        ])
        .expect("memory")
    }

    fn neg() -> Negotiated {
        Negotiated::from_features(device_features(1, None))
    }

    fn chain_of(descs: &[(u64, u32, u16)]) -> Vec<RawDescriptor> {
        descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let next = if i + 1 < descs.len() {
                    VRING_DESC_F_NEXT as u16
                } else {
                    0
                };
                RawDescriptor::from(Descriptor::new(addr, len, flags | next, i as u16 + 1))
            })
            .collect()
    }

    fn run(
        mem: &GuestMemoryMmap<()>,
        descs: &[(u64, u32, u16)],
        max: usize,
    ) -> (TxOutcome, Vec<Vec<u8>>) {
        let vq = MockSplitQueue::new(mem, 16);
        let chain = vq
            .build_multiple_desc_chains(&chain_of(descs))
            .expect("chain");
        let sink = Recorder::default();
        let out = send(chain, &neg(), max, &sink, &mut TxScratch::default());
        (out, sink.frames.into_inner())
    }

    fn put(mem: &GuestMemoryMmap<()>, addr: u64, bytes: &[u8]) {
        mem.write_slice(bytes, GuestAddress(addr)).expect("write");
    }

    #[test]
    fn header_and_frame_pass_through_unchanged() {
        let mem = memory();
        let hdr = [1u8, 0, 0, 0, 0, 0, 34, 0, 16, 0, 0, 0];
        put(&mem, 0x8_0000, &hdr);
        let payload: Vec<u8> = (0..1400u32).map(|i| i as u8).collect();
        put(&mem, 0x9_0000, &payload);
        let (out, frames) = run(
            &mem,
            &[(0x8_0000, 12, 0), (0x9_0000, 1400, 0)],
            max_frame(None),
        );
        assert!(matches!(out, TxOutcome::Sent(1412)), "{out:?}");
        assert_eq!(frames.len(), 1);
        assert_eq!(&frames[0][..12], &hdr);
        assert_eq!(&frames[0][12..], &payload[..]);
    }

    #[test]
    fn descriptor_across_regions_is_split_not_refused() {
        let mem = memory();
        let mut bytes: Vec<u8> = (0..512u32).map(|i| (i * 7) as u8).collect();
        bytes[1] = gso::NONE;
        put(&mem, 0x10_0000 - 256, &bytes);
        let (out, frames) = run(&mem, &[(0x10_0000 - 256, 512, 0)], max_frame(None));
        assert!(matches!(out, TxOutcome::Sent(512)), "{out:?}");
        assert_eq!(frames[0], bytes);
    }

    #[test]
    fn malformed_chains_are_dropped() {
        let mem = memory();
        let (out, frames) = run(
            &mem,
            &[(0x8_0000, 100, VRING_DESC_F_WRITE as u16)],
            max_frame(None),
        );
        assert!(
            matches!(out, TxOutcome::Dropped(TxDrop::WriteOnlyDescriptor)),
            "{out:?}"
        );
        assert!(frames.is_empty());
        let (out, _) = run(&mem, &[(0x1f_ff00, 0x1000, 0)], max_frame(None));
        assert!(
            matches!(out, TxOutcome::Dropped(TxDrop::BadAddress)),
            "{out:?}"
        );
        let (out, _) = run(
            &mem,
            &[(0x8_0000, (HDR_LEN - 1) as u32, 0)],
            max_frame(None),
        );
        assert!(
            matches!(out, TxOutcome::Dropped(TxDrop::ShortHeader)),
            "{out:?}"
        );
    }

    #[test]
    fn oversized_frames_are_dropped() {
        let mem = memory();
        put(&mem, 0x8_0000, &[0u8; 12]);
        let (out, _) = run(
            &mem,
            &[(0x8_0000, 12, 0), (0x9_0000, 1519, 0)],
            max_frame(Some(1500)),
        );
        assert!(
            matches!(out, TxOutcome::Dropped(TxDrop::TooLarge)),
            "{out:?}"
        );
        let (out, _) = run(
            &mem,
            &[(0x8_0000, 12, 0), (0x9_0000, 1518, 0)],
            max_frame(Some(1500)),
        );
        assert!(matches!(out, TxOutcome::Sent(1530)), "{out:?}");
        // GSO frames may exceed the MTU, up to 64 KiB.
        put(
            &mem,
            0x8_0000,
            &[0, gso::TCPV4, 54, 0, 0xa8, 5, 34, 0, 16, 0, 0, 0],
        );
        let (out, _) = run(
            &mem,
            &[(0x8_0000, 12, 0), (0x9_0000, 60000, 0)],
            max_frame(Some(1500)),
        );
        assert!(matches!(out, TxOutcome::Sent(_)), "{out:?}");
        let (out, _) = run(
            &mem,
            &[(0x8_0000, 12, 0), (0x9_0000, 70000, 0)],
            max_frame(Some(1500)),
        );
        assert!(
            matches!(out, TxOutcome::Dropped(TxDrop::TooLarge)),
            "{out:?}"
        );
    }

    #[test]
    fn unknown_or_unacked_gso_is_dropped() {
        let mem = memory();
        put(&mem, 0x8_0000, &[0, gso::UDP, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let (out, _) = run(
            &mem,
            &[(0x8_0000, 12, 0), (0x9_0000, 100, 0)],
            max_frame(None),
        );
        assert!(matches!(out, TxOutcome::Dropped(TxDrop::BadGso)), "{out:?}");
        put(
            &mem,
            0x8_0000,
            &[0, gso::TCPV6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        );
        let vq = MockSplitQueue::new(&mem, 16);
        let chain = vq
            .build_multiple_desc_chains(&chain_of(&[(0x8_0000, 12, 0), (0x9_0000, 100, 0)]))
            .expect("chain");
        let mut no_tso = neg();
        no_tso.host_tso = false;
        let out = send(
            chain,
            &no_tso,
            max_frame(None),
            &Recorder::default(),
            &mut TxScratch::default(),
        );
        assert!(matches!(out, TxOutcome::Dropped(TxDrop::BadGso)), "{out:?}");
    }
}
