//! The virtqueue drain loop every device needs, written once.
//!
//! With `VIRTIO_RING_F_EVENT_IDX` a device must re-check the available ring after it
//! re-enables notifications, or a buffer the driver added in between is never seen
//! (virtio 1.2, 2.7.10). Without it, one pass suffices.

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
    let mut count = 0;
    loop {
        if event_idx {
            vring.disable_notification()?;
        }
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            match chain {
                Some(chain) => {
                    count += 1;
                    handle(chain);
                }
                None => break,
            }
        }
        // A queue the frontend stopped (GET_VRING_BASE) pops nothing while its available
        // index may still be ahead: re-checking it would spin forever.
        if !event_idx || !vring.get_ref().get_queue().ready() || !vring.enable_notification()? {
            break;
        }
    }
    Ok(count)
}

/// Like [`drain`], for a device that cannot always take every chain (a console with no
/// more host input for its receive queue, or a full output buffer): `handle` returns
/// [`std::ops::ControlFlow::Break`] to stop after the chain it was given. The chains left in the ring
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
    F: FnMut(Chain) -> std::ops::ControlFlow<()>,
{
    let mut count = 0;
    loop {
        if event_idx {
            vring.disable_notification()?;
        }
        loop {
            // A statement of its own, so the vring lock is released before `handle` runs.
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { break };
            count += 1;
            if handle(chain).is_break() {
                return Ok(count);
            }
        }
        // A queue the frontend stopped (GET_VRING_BASE) pops nothing while its available
        // index may still be ahead: re-checking it would spin forever.
        if !event_idx || !vring.get_ref().get_queue().ready() || !vring.enable_notification()? {
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
