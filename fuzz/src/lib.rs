//! Shared harness of the fuzz targets: guest memory and virtqueues built from the input.
//!
//! Every target reads its input the same way:
//!
//! ```text
//! bytes 0..8    flags, little endian: what the target negotiates (acked features, engine,
//!               EVENT_IDX, ...); each target documents its bits
//! bytes 8..     the guest memory image, copied to guest address 0 (the rest is zeroes)
//! ```
//!
//! Guest memory is [`MEM_SIZE`] bytes in two adjacent regions (so buffers can straddle a
//! region boundary); everything above is outside guest memory. Queue `i` has its
//! descriptor table at `i * 0x400`, its available ring at `+0x100` and its used ring at
//! `+0x200`, [`QUEUE_SIZE`] entries: the descriptors, the available ring (its index
//! included) and every buffer come from the input, so chains can be too short, loop, point
//! outside memory or carry any length. The targets hand the queues to the daemons' real
//! code (the `VhostUserBackend` of blk, vsock and console; the TX path of net).
//!
//! [`Builder`] writes inputs in this layout: the seed corpora come from it
//! (`examples/seed.rs`).

pub mod targets;

use vhost_device_common::{GuestMemory, GuestMemoryAtomic};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Entries per queue.
pub const QUEUE_SIZE: u16 = 16;
/// Bytes of guest memory.
pub const MEM_SIZE: usize = 0x1_0000;
/// Where [`Builder`] starts placing buffers (above the rings of up to 8 queues).
pub const DATA_START: u64 = 0x2000;
/// `VRING_DESC_F_NEXT`.
const F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
const F_WRITE: u16 = 2;

/// The flags word and the memory image of an input.
pub fn split(data: &[u8]) -> (u64, &[u8]) {
    let mut flags = [0u8; 8];
    let n = data.len().min(8);
    flags[..n].copy_from_slice(&data[..n]);
    (u64::from_le_bytes(flags), data.get(8..).unwrap_or(&[]))
}

/// Guest memory holding `image` at address 0.
pub fn memory(image: &[u8]) -> GuestMemory {
    let half = MEM_SIZE / 2;
    let mem =
        GuestMemory::from_ranges(&[(GuestAddress(0), half), (GuestAddress(half as u64), half)])
            .expect("anonymous guest memory");
    let image = &image[..image.len().min(MEM_SIZE)];
    mem.write_slice(image, GuestAddress(0))
        .expect("image fits guest memory");
    mem
}

/// Descriptor table, available ring and used ring addresses of queue `index`.
pub fn rings(index: usize) -> (u64, u64, u64) {
    let base = index as u64 * 0x400;
    (base, base + 0x100, base + 0x200)
}

/// Queue `index` as a vhost-user-backend vring, ready and enabled.
pub fn vring(mem: &GuestMemoryAtomic, index: usize) -> VringRwLock<GuestMemoryAtomic> {
    let v = VringRwLock::new(mem.clone(), QUEUE_SIZE).expect("queue size is valid");
    let (d, a, u) = rings(index);
    v.set_queue_info(d, a, u).expect("aligned ring addresses");
    v.set_queue_size(QUEUE_SIZE);
    v.set_queue_ready(true);
    v.set_enabled(true);
    v
}

/// Queue `index` as a bare `virtio_queue::Queue`, ready.
pub fn queue(index: usize) -> Queue {
    let mut q = Queue::new(QUEUE_SIZE).expect("queue size is valid");
    let (d, a, u) = rings(index);
    q.set_size(QUEUE_SIZE);
    q.try_set_desc_table_address(GuestAddress(d))
        .expect("aligned descriptor table");
    q.try_set_avail_ring_address(GuestAddress(a))
        .expect("aligned available ring");
    q.try_set_used_ring_address(GuestAddress(u))
        .expect("aligned used ring");
    q.set_ready(true);
    q
}

/// Writes well-formed inputs: chains on queues, buffers in the data area.
#[derive(Debug, Clone)]
pub struct Builder {
    flags: u64,
    image: Vec<u8>,
    next_data: u64,
    /// Per queue: next free descriptor, chains published.
    queues: Vec<(u16, u16)>,
}

impl Builder {
    /// An input with `flags` and no chains.
    pub fn new(flags: u64) -> Self {
        Builder {
            flags,
            image: vec![0; MEM_SIZE],
            next_data: DATA_START,
            queues: vec![(0, 0); 8],
        }
    }

    /// Places `bytes` in the data area (16-byte aligned); returns their guest address.
    pub fn data(&mut self, bytes: &[u8]) -> u64 {
        let at = self.next_data;
        self.put(at, bytes);
        self.next_data = (at + bytes.len() as u64 + 15) & !15;
        at
    }

    /// Reserves `len` zero bytes for the device to write into.
    pub fn space(&mut self, len: usize) -> u64 {
        self.data(&vec![0; len])
    }

    fn put(&mut self, at: u64, bytes: &[u8]) {
        let at = at as usize;
        self.image[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// Publishes a chain of `(address, length, device-writable)` descriptors on `queue`.
    pub fn chain(&mut self, queue: usize, descs: &[(u64, u32, bool)]) -> &mut Self {
        let (table, avail, _) = rings(queue);
        let (first, published) = self.queues[queue];
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let index = first + i as u16;
            let last = i + 1 == descs.len();
            let mut flags = if write { F_WRITE } else { 0 };
            let mut next = 0;
            if !last {
                flags |= F_NEXT;
                next = index + 1;
            }
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            self.put(table + u64::from(index) * 16, &d);
        }
        let slot = avail + 4 + u64::from(published % QUEUE_SIZE) * 2;
        self.put(slot, &first.to_le_bytes());
        self.put(avail + 2, &(published + 1).to_le_bytes());
        self.queues[queue] = (first + descs.len() as u16, published + 1);
        self
    }

    /// The input: flags, then the image without its trailing zeroes.
    pub fn finish(&self) -> Vec<u8> {
        let end = self
            .image
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |i| i + 1);
        let mut out = self.flags.to_le_bytes().to_vec();
        out.extend_from_slice(&self.image[..end]);
        out
    }
}
