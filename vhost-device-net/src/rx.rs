//! Receive: one frame read from the tap is copied into the guest's RX chains.
//!
//! Chain shape (virtio 1.2, 5.1.6.3 and 5.1.6.4): every RX chain is made of device-writable
//! descriptors only. Without `VIRTIO_NET_F_MRG_RXBUF` one chain must hold the header and the
//! whole frame; with it, a frame may spread over several chains and the device writes how
//! many in the header's `num_buffers`, which must be at most what it uses.
//!
//! The frame is placed in two passes: first the chains it needs are popped and checked
//! (capacity, direction), then it is written. If the ring runs out of chains before the frame
//! fits, the chains are given back (the available index is rewound) and the frame waits for
//! the guest to refill: nothing is lost to that race. A chain with a device-readable
//! descriptor, no room at all, or an address outside guest memory drops the frame; every
//! chain taken for it is completed with length 0, which drivers treat as an error and recycle.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::virtio::{Negotiated, HDR_LEN, NUM_BUFFERS_OFFSET};

/// What happened to a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// The frame is in the guest, in this many chains.
    Delivered {
        /// How many chains hold it.
        buffers: usize,
    },
    /// Not enough chains yet: the frame must wait for the guest to add buffers. `seen` is
    /// the driver's available index the device saw: a buffer added beyond it is news.
    NoBuffers {
        /// The available index when the ring ran dry.
        seen: u16,
    },
    /// The frame was dropped.
    Dropped(RxDrop),
}

/// Why a frame was dropped on the way to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxDrop {
    /// Without merged buffers the first chain is smaller than the frame.
    TooLarge,
    /// A chain was malformed: readable descriptor, no room, or outside guest memory.
    BadChain,
    /// The frame is shorter than the header (the tap never does this).
    Runt,
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    chain: usize,
    addr: GuestAddress,
    len: usize,
}

/// Reusable space for placing frames, one per worker: no allocation per frame.
#[derive(Debug, Default)]
pub struct RxScratch {
    segments: Vec<Segment>,
    /// Head index and bytes written, per chain taken.
    chains: Vec<(u16, u32)>,
}

/// Places `frame` (virtio-net header first, as read from the tap) into the guest's RX chains
/// of `queue`, and adds them to the used ring. `frame` is modified: `num_buffers` is set.
///
/// Returns an error only when the queue itself fails (its used ring is not writable).
pub fn deliver<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    frame: &mut [u8],
    neg: &Negotiated,
    scratch: &mut RxScratch,
) -> Result<RxOutcome, virtio_queue::Error> {
    if frame.len() < neg.hdr_len {
        return Ok(RxOutcome::Dropped(RxDrop::Runt));
    }
    scratch.segments.clear();
    scratch.chains.clear();
    let start = queue.next_avail();
    let mut capacity = 0usize;
    let mut bad = false;
    while capacity < frame.len() {
        if !neg.mergeable && !scratch.chains.is_empty() {
            // One chain only, and it is too small.
            queue.set_next_avail(start);
            return Ok(RxOutcome::Dropped(RxDrop::TooLarge));
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            let seen = queue.next_avail();
            queue.set_next_avail(start);
            return Ok(RxOutcome::NoBuffers { seen });
        };
        let index = scratch.chains.len();
        scratch.chains.push((chain.head_index(), 0));
        let mut chain_capacity = 0usize;
        for desc in chain {
            let len = desc.len() as usize;
            if !desc.is_write_only() || !mem.check_range(desc.addr(), len, Permissions::Write) {
                bad = true;
                break;
            }
            if len == 0 {
                continue;
            }
            scratch.segments.push(Segment {
                chain: index,
                addr: desc.addr(),
                len,
            });
            chain_capacity += len;
        }
        if chain_capacity == 0 {
            bad = true;
        }
        if bad {
            break;
        }
        capacity += chain_capacity;
    }
    if bad {
        return complete_empty(queue, mem, scratch).map(|()| RxOutcome::Dropped(RxDrop::BadChain));
    }

    if neg.hdr_len == HDR_LEN {
        // At most the queue size (<= 32768) chains: fits a u16.
        let count = u16::try_from(scratch.chains.len()).unwrap_or(u16::MAX);
        frame[NUM_BUFFERS_OFFSET..HDR_LEN].copy_from_slice(&count.to_le_bytes());
    }
    let mut offset = 0usize;
    for seg in &scratch.segments {
        if offset == frame.len() {
            break;
        }
        let n = seg.len.min(frame.len() - offset);
        if mem
            .write_slice(&frame[offset..offset + n], seg.addr)
            .is_err()
        {
            return complete_empty(queue, mem, scratch)
                .map(|()| RxOutcome::Dropped(RxDrop::BadChain));
        }
        if let Some(entry) = scratch.chains.get_mut(seg.chain) {
            // n <= a descriptor's u32 length.
            entry.1 += u32::try_from(n).unwrap_or(u32::MAX);
        }
        offset += n;
    }
    for &(head, len) in &scratch.chains {
        queue.add_used(mem, head, len)?;
    }
    Ok(RxOutcome::Delivered {
        buffers: scratch.chains.len(),
    })
}

fn complete_empty<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    scratch: &RxScratch,
) -> Result<(), virtio_queue::Error> {
    for &(head, _) in &scratch.chains {
        queue.add_used(mem, head, 0)?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // Small test constants.
mod tests {
    use super::*;
    use crate::virtio::{device_features, LEGACY_HDR_LEN};
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).expect("memory")
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    fn neg(mergeable: bool) -> Negotiated {
        let mut n = Negotiated::from_features(device_features(1, None));
        n.mergeable = mergeable;
        n
    }

    fn frame(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    fn used(
        mem: &GuestMemoryMmap<()>,
        q: &MockSplitQueue<GuestMemoryMmap<()>>,
        i: u64,
    ) -> (u32, u32) {
        let base = q.used_addr().0 + 4 + 8 * i;
        let id: u32 = mem.read_obj(GuestAddress(base)).expect("id");
        let len: u32 = mem.read_obj(GuestAddress(base + 4)).expect("len");
        (id, len)
    }

    fn used_idx(mem: &GuestMemoryMmap<()>, q: &MockSplitQueue<GuestMemoryMmap<()>>) -> u16 {
        mem.read_obj(GuestAddress(q.used_addr().0 + 2))
            .expect("idx")
    }

    #[test]
    fn frame_fits_one_chain() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(0x10_0000, 2048, W)], 0)
            .expect("chain");
        let mut q: Queue = vq.create_queue().expect("queue");
        let mut f = frame(1000);
        let out = deliver(&mut q, &mem, &mut f, &neg(true), &mut RxScratch::default()).expect("ok");
        assert_eq!(out, RxOutcome::Delivered { buffers: 1 });
        let mut got = vec![0u8; 1000];
        mem.read_slice(&mut got, GuestAddress(0x10_0000))
            .expect("read");
        assert_eq!(&got[..10], &f[..10]);
        assert_eq!(&got[10..12], &[1, 0], "num_buffers");
        assert_eq!(&got[12..], &f[12..]);
        assert_eq!(used(&mem, &vq, 0), (0, 1000));
    }

    #[test]
    fn frame_merged_over_three_chains() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(
            &[
                desc(0x10_0000, 1500, W),
                desc(0x11_0000, 1500, W),
                desc(0x12_0000, 1500, W),
                desc(0x13_0000, 1500, W),
            ],
            0,
        )
        .expect("chains");
        let mut q: Queue = vq.create_queue().expect("queue");
        let mut f = frame(4000);
        let out = deliver(&mut q, &mem, &mut f, &neg(true), &mut RxScratch::default()).expect("ok");
        assert_eq!(out, RxOutcome::Delivered { buffers: 3 });
        assert_eq!(used_idx(&mem, &vq), 3);
        assert_eq!(used(&mem, &vq, 0), (0, 1500));
        assert_eq!(used(&mem, &vq, 1), (1, 1500));
        assert_eq!(used(&mem, &vq, 2), (2, 1000));
        let mut hdr = [0u8; HDR_LEN];
        mem.read_slice(&mut hdr, GuestAddress(0x10_0000))
            .expect("read");
        assert_eq!(&hdr[10..12], &[3, 0]);
        let mut tail = vec![0u8; 1000];
        mem.read_slice(&mut tail, GuestAddress(0x12_0000))
            .expect("read");
        assert_eq!(&tail[..], &f[3000..]);
        assert_eq!(q.next_avail(), 3, "the fourth chain stays available");
    }

    #[test]
    fn too_few_chains_rewinds_and_waits() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(0x10_0000, 1500, W)], 0)
            .expect("chain");
        let mut q: Queue = vq.create_queue().expect("queue");
        let mut f = frame(3000);
        let out = deliver(&mut q, &mem, &mut f, &neg(true), &mut RxScratch::default()).expect("ok");
        assert_eq!(out, RxOutcome::NoBuffers { seen: 1 });
        assert_eq!(q.next_avail(), 0, "chain given back");
        assert_eq!(used_idx(&mem, &vq), 0);
        // The guest refills: the same frame now goes through.
        vq.add_desc_chains(&[desc(0x11_0000, 1500, W), desc(0x12_0000, 1500, W)], 1)
            .expect("refill");
        let out = deliver(&mut q, &mem, &mut f, &neg(true), &mut RxScratch::default()).expect("ok");
        assert_eq!(out, RxOutcome::Delivered { buffers: 2 });
    }

    #[test]
    fn without_merging_a_small_chain_drops_the_frame_but_keeps_the_chain() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(0x10_0000, 1500, W), desc(0x11_0000, 1500, W)], 0)
            .expect("chains");
        let mut q: Queue = vq.create_queue().expect("queue");
        let mut f = frame(3000);
        let out =
            deliver(&mut q, &mem, &mut f, &neg(false), &mut RxScratch::default()).expect("ok");
        assert_eq!(out, RxOutcome::Dropped(RxDrop::TooLarge));
        assert_eq!(q.next_avail(), 0);
        let mut small = frame(100);
        let out = deliver(
            &mut q,
            &mem,
            &mut small,
            &neg(false),
            &mut RxScratch::default(),
        )
        .expect("ok");
        assert_eq!(out, RxOutcome::Delivered { buffers: 1 });
    }

    #[test]
    fn header_split_over_descriptors() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let chain = [desc(0x10_0000, 4, W | 1), desc(0x10_1000, 4096, W)];
        let mut raw = Vec::new();
        for (i, d) in chain.iter().enumerate() {
            let d = Descriptor::from(*d);
            raw.push(RawDescriptor::from(Descriptor::new(
                d.addr().0,
                d.len(),
                d.flags(),
                i as u16 + 1,
            )));
        }
        vq.add_desc_chains(&raw, 0).expect("chain");
        let mut q: Queue = vq.create_queue().expect("queue");
        let mut f = frame(200);
        let out = deliver(&mut q, &mem, &mut f, &neg(true), &mut RxScratch::default()).expect("ok");
        assert_eq!(out, RxOutcome::Delivered { buffers: 1 });
        let mut rest = vec![0u8; 196];
        mem.read_slice(&mut rest, GuestAddress(0x10_1000))
            .expect("read");
        assert_eq!(
            &rest[6..8],
            &[1, 0],
            "num_buffers lands in the second descriptor"
        );
        assert_eq!(&rest[8..], &f[12..]);
        assert_eq!(used(&mem, &vq, 0), (0, 200));
    }

    #[test]
    fn readable_descriptor_drops_frame_and_completes_chain_empty() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(0x10_0000, 2048, 0)], 0)
            .expect("chain");
        let mut q: Queue = vq.create_queue().expect("queue");
        let mut f = frame(100);
        let out = deliver(&mut q, &mem, &mut f, &neg(true), &mut RxScratch::default()).expect("ok");
        assert_eq!(out, RxOutcome::Dropped(RxDrop::BadChain));
        assert_eq!(used(&mem, &vq, 0), (0, 0));
        assert_eq!(q.next_avail(), 1);
    }

    #[test]
    fn address_outside_memory_drops_frame() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(0x1f_ff00, 4096, W), desc(0x10_0000, 0, W)], 0)
            .expect("chains");
        let mut q: Queue = vq.create_queue().expect("queue");
        let mut f = frame(100);
        let out = deliver(&mut q, &mem, &mut f, &neg(true), &mut RxScratch::default()).expect("ok");
        assert_eq!(out, RxOutcome::Dropped(RxDrop::BadChain));
        // A chain with no room at all is malformed too.
        let out = deliver(&mut q, &mem, &mut f, &neg(true), &mut RxScratch::default()).expect("ok");
        assert_eq!(out, RxOutcome::Dropped(RxDrop::BadChain));
        assert_eq!(used_idx(&mem, &vq), 2);
    }

    #[test]
    fn runt_frame_is_dropped() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().expect("queue");
        let mut f = frame(LEGACY_HDR_LEN);
        let out = deliver(&mut q, &mem, &mut f, &neg(true), &mut RxScratch::default()).expect("ok");
        assert_eq!(out, RxOutcome::Dropped(RxDrop::Runt));
    }
}
