//! The virtqueue drain loop every device needs, written once.
//!
//! With `VIRTIO_RING_F_EVENT_IDX` a device must re-check the available ring after it
//! re-enables notifications, or a buffer the driver added in between is never seen
//! (virtio 1.2, 2.7.10). Without it, one pass suffices.

use std::ops::ControlFlow;

use vhost_user_backend::VringT;
use virtio_queue::{DescriptorChain, QueueT};

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
}
