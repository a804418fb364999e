//! The virtqueue drain loop every device needs, written once.
//!
//! With `VIRTIO_RING_F_EVENT_IDX` a device must re-check the available ring after it
//! re-enables notifications, or a buffer the driver added in between is never seen
//! (virtio 1.2, 2.7.10). Without it, one pass suffices.

use std::ops::ControlFlow;

use vhost_user_backend::VringT;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

/// The guest memory view chains are read through.
pub type Memory = vm_memory::GuestMemoryLoadGuard<crate::GuestMemory>;

/// A descriptor chain popped from a queue.
pub type Chain = DescriptorChain<Memory>;

/// Pops every available chain and hands it to `handle`, looping with notifications
/// re-enabled under EVENT_IDX until the ring stays empty. `handle` runs without the vring
/// lock held, so it may call `add_used` itself. Returns how many chains were handled.
pub fn drain<V, F>(
    vring: &V,
    mem: &Memory,
    event_idx: bool,
    mut handle: F,
) -> Result<usize, virtio_queue::Error>
where
    V: VringT<crate::GuestMemoryAtomic>,
    F: FnMut(Chain),
{
    drain_until(vring, mem, event_idx, |chain| {
        handle(chain);
        ControlFlow::Continue(())
    })
}

/// Like [`drain`], for a device that cannot always take every chain (a console with no
/// more host input for its receive queue, or a full output buffer): `handle` returns
/// [`ControlFlow::Break`] to stop after the chain it was given. The chains left in the ring
/// stay there with no notification armed for them, so the device must call again on its own
/// wake-up (new input, room again). Check whether there is anything to do before calling.
pub fn drain_until<V, F>(
    vring: &V,
    mem: &Memory,
    event_idx: bool,
    mut handle: F,
) -> Result<usize, virtio_queue::Error>
where
    V: VringT<crate::GuestMemoryAtomic>,
    F: FnMut(Chain) -> ControlFlow<()>,
{
    let mut count = 0;
    let mut pass = 0;
    loop {
        if event_idx {
            vring.disable_notification()?;
        }
        let mut popped = 0;
        loop {
            // A statement of its own, so the vring lock is released before `handle` runs.
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { break };
            count += 1;
            popped += 1;
            if handle(chain).is_break() {
                return Ok(count);
            }
        }
        // Stop re-checking when a re-check popped nothing: a queue the frontend stopped
        // (GET_VRING_BASE), or a hostile available index beyond the ring, pops nothing
        // while the index still looks ahead, and looping on it would spin forever.
        let stuck = pass > 0 && popped == 0;
        pass += 1;
        if !event_idx
            || stuck
            || !vring.get_ref().get_queue().ready()
            || !vring.enable_notification()?
        {
            break;
        }
    }
    Ok(count)
}

/// Signals the guest if the driver asked to be told about used buffers.
pub fn notify<V>(vring: &V) -> std::io::Result<()>
where
    V: VringT<crate::GuestMemoryAtomic>,
{
    if vring.needs_notification().unwrap_or(true) {
        vring.signal_used_queue()?;
    }
    Ok(())
}

/// The descriptors of the chain whose head is `head`, read from the descriptor table at
/// `table` of a ring of `size` entries, the way `DescriptorChain` reads a chain popped from
/// the available ring (which can only be made from there). For a device that resumes
/// chains it took from the ring earlier (in-flight requests a restarted daemon resubmits).
///
/// The same guards as `DescriptorChain`: at most `size` descriptors (or the indirect
/// table's length) so a looping chain ends, one level of indirection, an indirect table a
/// multiple of 16 bytes, at most 4 GiB in all; a descriptor that cannot be read ends it.
#[derive(Debug, Clone)]
pub struct Descriptors<'a> {
    mem: &'a crate::GuestMemory,
    table: GuestAddress,
    size: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    bytes: u32,
}

impl<'a> Descriptors<'a> {
    /// The chain at `head`.
    pub fn new(mem: &'a crate::GuestMemory, table: GuestAddress, size: u16, head: u16) -> Self {
        Descriptors {
            mem,
            table,
            size,
            next: head,
            ttl: size,
            indirect: false,
            bytes: 0,
        }
    }
}

impl Iterator for Descriptors<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        const DESC_SIZE: u64 = size_of::<Descriptor>() as u64;
        if self.ttl == 0 || self.next >= self.size {
            return None;
        }
        let at = self.table.checked_add(u64::from(self.next) * DESC_SIZE)?;
        let desc: Descriptor = self.mem.read_obj(at).ok()?;
        if desc.refers_to_indirect_table() {
            let entries = u64::from(desc.len()) / DESC_SIZE;
            if self.indirect || u64::from(desc.len()) % DESC_SIZE != 0 {
                return None;
            }
            self.table = desc.addr();
            self.size = u16::try_from(entries).ok()?;
            self.next = 0;
            self.ttl = self.size;
            self.indirect = true;
            return self.next();
        }
        self.bytes = self.bytes.checked_add(desc.len())?;
        if desc.has_next() {
            self.next = desc.next();
            self.ttl -= 1;
        } else {
            self.ttl = 0;
        }
        Some(desc)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use vhost_user_backend::{VringRwLock, VringT};
    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

    use super::*;

    fn vring(
        mem: &crate::GuestMemoryAtomic,
        event_idx: bool,
    ) -> VringRwLock<crate::GuestMemoryAtomic> {
        let vring = VringRwLock::new(mem.clone(), 16).unwrap();
        vring.set_queue_size(16);
        vring.set_queue_info(0x1000, 0x2000, 0x3000).unwrap();
        vring.set_queue_event_idx(event_idx);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        vring
    }

    /// A guest that publishes an available index far beyond what the ring holds must not
    /// make the drain loop spin: it returns with nothing handled.
    #[test]
    fn a_hostile_available_index_does_not_spin() {
        let mem = GuestMemoryAtomic::new(
            crate::GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap(),
        );
        for event_idx in [true, false] {
            let vring = vring(&mem, event_idx);
            // avail ring: flags, idx = 1000 (the ring has 16 entries), ring entries 0.
            mem.memory()
                .write_obj(1000u16, GuestAddress(0x2002))
                .unwrap();
            let (tx, rx) = mpsc::channel();
            let guest = mem.clone();
            std::thread::spawn(move || {
                let m = guest.memory();
                let n = drain(&vring, &m, event_idx, |_| {}).map_err(|e| e.to_string());
                let _ = tx.send(n);
            });
            let result = rx
                .recv_timeout(Duration::from_secs(5))
                .expect("drain returned instead of spinning");
            assert!(matches!(result, Ok(0) | Err(_)), "{result:?}");
        }
    }

    /// The walker reads the same descriptors as the chain popped from the ring, direct and
    /// indirect, and ends loops.
    #[test]
    fn descriptors_match_the_popped_chain() {
        // The flag values fit a u16 (virtio 1.2, 2.7.5).
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        const INDIRECT: u16 = 4;
        use virtio_queue::desc::split::Descriptor as SplitDesc;
        use virtio_queue::desc::RawDescriptor;
        use virtio_queue::mock::MockSplitQueue;

        let mem = crate::GuestMemory::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap();
        let q = MockSplitQueue::new(&mem, 16);
        let descs = [
            RawDescriptor::from(SplitDesc::new(0x8000, 16, NEXT, 1)),
            RawDescriptor::from(SplitDesc::new(0x9000, 512, NEXT | WRITE, 2)),
            RawDescriptor::from(SplitDesc::new(0xa000, 1, WRITE, 0)),
        ];
        let chain = q.build_desc_chain(&descs).unwrap();
        let head = chain.head_index();
        let table = GuestAddress(q.desc_table_addr().0);
        let walked: Vec<_> = Descriptors::new(&mem, table, 16, head)
            .map(|d| (d.addr(), d.len(), d.flags()))
            .collect();
        let popped: Vec<_> = chain.map(|d| (d.addr(), d.len(), d.flags())).collect();
        assert_eq!(walked, popped);
        assert_eq!(walked.len(), 3);

        // An indirect table at 0x10000 with two entries, referenced from descriptor 5.
        mem.write_obj(SplitDesc::new(0xb000, 16, NEXT, 1), GuestAddress(0x10000))
            .unwrap();
        mem.write_obj(SplitDesc::new(0xc000, 1, WRITE, 0), GuestAddress(0x10010))
            .unwrap();
        mem.write_obj(
            SplitDesc::new(0x10000, 32, INDIRECT, 0),
            table.unchecked_add(5 * 16),
        )
        .unwrap();
        let indirect: Vec<_> = Descriptors::new(&mem, table, 16, 5)
            .map(|d| d.addr().0)
            .collect();
        assert_eq!(indirect, vec![0xb000, 0xc000]);

        // A loop (7 -> 8 -> 7) ends after the ring's size; a head past the ring yields nothing.
        mem.write_obj(
            SplitDesc::new(0xd000, 1, NEXT, 8),
            table.unchecked_add(7 * 16),
        )
        .unwrap();
        mem.write_obj(
            SplitDesc::new(0xd000, 1, NEXT, 7),
            table.unchecked_add(8 * 16),
        )
        .unwrap();
        assert_eq!(Descriptors::new(&mem, table, 16, 7).count(), 16);
        assert_eq!(Descriptors::new(&mem, table, 16, 16).count(), 0);
    }
}
