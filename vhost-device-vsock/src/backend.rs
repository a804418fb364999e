//! The `VhostUserBackend` of one VM's vsock device: three queues (RX, TX, event) served by
//! one worker thread, plus the connection muxer's epoll set registered in that thread.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use log::warn;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use vhost_device_common::{queue, ExitEvents, GuestMemoryAtomic};

use crate::muxer::Muxer;
use crate::packet::RxBuffer;

/// Queue indices.
pub const RX_QUEUE: u16 = 0;
/// The TX queue.
pub const TX_QUEUE: u16 = 1;
/// The event queue (transport reset events; the device never sends any).
pub const EVENT_QUEUE: u16 = 2;
/// Number of queues.
pub const NUM_QUEUES: usize = 3;
/// The `handle_event` id of the muxer's epoll set (ids up to `NUM_QUEUES` are taken:
/// the queues and the exit event).
pub const MUXER_EVENT: u16 = 4;
/// `VIRTIO_VSOCK_F_SEQPACKET`.
pub const VIRTIO_VSOCK_F_SEQPACKET: u32 = 1;

struct Inner {
    muxer: Muxer,
    mem: Option<GuestMemoryAtomic>,
    event_idx: bool,
}

/// One VM's vsock backend; cheap to clone (vhost-user-backend wants `Clone`).
#[derive(Clone)]
pub struct VsockBackend {
    inner: Arc<Mutex<Inner>>,
    cid: u64,
    queue_size: usize,
    epoll_fd: i32,
}

impl std::fmt::Debug for VsockBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockBackend")
            .field("cid", &self.cid)
            .finish_non_exhaustive()
    }
}

impl VsockBackend {
    /// A backend around `muxer` for a guest with this CID.
    pub fn new(cid: u64, queue_size: usize, muxer: Muxer) -> Self {
        let epoll_fd = muxer.epoll_fd();
        VsockBackend {
            inner: Arc::new(Mutex::new(Inner {
                muxer,
                mem: None,
                event_idx: false,
            })),
            cid,
            queue_size,
            epoll_fd,
        }
    }

    /// The muxer's epoll fd, to register as [`MUXER_EVENT`] in the worker's epoll.
    pub fn muxer_fd(&self) -> i32 {
        self.epoll_fd
    }

    fn lock(&self) -> io::Result<MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| io::Error::other("vsock backend state poisoned"))
    }

    /// Closes every connection.
    pub fn reset(&self) {
        if let Ok(mut inner) = self.lock() {
            inner.muxer.reset();
        }
    }

    /// Open connections (for tests and logs).
    pub fn connections(&self) -> usize {
        self.lock().map(|i| i.muxer.connections()).unwrap_or(0)
    }
}

fn queue_ready(vring: &VringRwLock) -> bool {
    vring.get_ref().get_queue().ready()
}

impl Inner {
    /// Handles every TX chain; returns whether any was used (the caller notifies, after
    /// the RX packets the chains caused are out: the driver waits on those, not on TX).
    /// A credit update a chain makes due goes out at once, mid-batch, so the driver can
    /// send again while the rest of the batch is forwarded.
    fn process_tx(&mut self, tx: &VringRwLock, rx: &VringRwLock) -> io::Result<bool> {
        let Some(atomic) = &self.mem else {
            return Ok(false);
        };
        if !queue_ready(tx) {
            return Ok(false);
        }
        let mem = atomic.memory();
        let muxer = &mut self.muxer;
        let event_idx = self.event_idx;
        let mut used = false;
        let mut rx_failure = None;
        queue::drain(tx, &mem, event_idx, |chain| {
            let head = chain.head_index();
            let descs = chain
                .clone()
                .map(|d| (d.addr(), d.len(), d.is_write_only()));
            muxer.on_tx_chain(&mem, descs);
            if let Err(e) = tx.add_used(head, 0) {
                warn!("TX add_used failed: {e}");
            }
            used = true;
            if muxer.take_urgent() && rx_failure.is_none() {
                rx_failure = rx_pass(muxer, &mem, rx, event_idx).err();
            }
        })
        .map_err(|e| io::Error::other(format!("TX queue: {e}")))?;
        match rx_failure {
            Some(e) => Err(e),
            None => Ok(used),
        }
    }

    fn process_rx(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let Some(atomic) = &self.mem else {
            return Ok(());
        };
        let mem = atomic.memory();
        rx_pass(&mut self.muxer, &mem, vring, self.event_idx)
    }
}

/// Fills RX buffers with whatever the muxer has for the guest, and notifies.
fn rx_pass(
    muxer: &mut Muxer,
    mem: &queue::Memory,
    vring: &VringRwLock,
    event_idx: bool,
) -> io::Result<()> {
    if !queue_ready(vring) {
        return Ok(());
    }
    let mut used = false;
    while muxer.has_rx_work() || {
        muxer.refill_sibling();
        muxer.has_rx_work()
    } {
        let chain = vring
            .get_mut()
            .get_queue_mut()
            .pop_descriptor_chain(mem.clone());
        let Some(chain) = chain else {
            // Out of buffers: ask for a kick, and look again in case the driver added
            // some in between (EVENT_IDX, virtio 1.2, 2.7.10).
            if event_idx
                && vring
                    .enable_notification()
                    .map_err(|e| io::Error::other(format!("RX queue: {e}")))?
            {
                continue;
            }
            break;
        };
        let head = chain.head_index();
        let descs = chain
            .clone()
            .map(|d| (d.addr(), d.len(), d.is_write_only()));
        let len = match RxBuffer::parse(mem, descs) {
            Ok(buf) => match muxer.fill_rx(mem, &buf) {
                Some(len) => len,
                None => {
                    // Nothing could be sent after all: give the buffer back.
                    let mut guard = vring.get_mut();
                    let queue = guard.get_queue_mut();
                    queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                    break;
                }
            },
            Err(e) => {
                warn!("malformed RX chain returned unused: {e}");
                0
            }
        };
        if let Err(e) = vring.add_used(head, len) {
            warn!("RX add_used failed: {e}");
        }
        used = true;
    }
    if used {
        queue::notify(vring)?;
    }
    Ok(())
}

impl VhostUserBackend for VsockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_F_NOTIFY_ON_EMPTY)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_VSOCK_F_SEQPACKET)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        if let Ok(mut inner) = self.lock() {
            inner.muxer.seqpacket = features & (1 << VIRTIO_VSOCK_F_SEQPACKET) != 0;
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG
    }

    fn reset_device(&self) {
        self.reset();
    }

    fn set_event_idx(&self, enabled: bool) {
        if let Ok(mut inner) = self.lock() {
            inner.event_idx = enabled;
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // struct virtio_vsock_config { le64 guest_cid; }
        let space = self.cid.to_le_bytes();
        let size = (size as usize).min(256);
        let mut out: Vec<u8> = space
            .get(offset as usize..)
            .unwrap_or(&[])
            .iter()
            .copied()
            .take(size)
            .collect();
        out.resize(size, 0);
        out
    }

    fn update_memory(&self, mem: GuestMemoryAtomic) -> io::Result<()> {
        // A region past the end of its file would kill the daemon with SIGBUS.
        vhost_device_common::memory::refuse_unbacked(&mem)?;
        self.lock()?.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        ExitEvents::pair()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        let [rx, tx, ..] = vrings else {
            return Err(io::Error::other("vsock needs RX and TX queues"));
        };
        let mut inner = self.lock()?;
        match device_event {
            RX_QUEUE => inner.process_rx(rx)?,
            TX_QUEUE => {
                let used = inner.process_tx(tx, rx)?;
                inner.process_rx(rx)?;
                if used {
                    queue::notify(tx)?;
                }
            }
            EVENT_QUEUE => {}
            MUXER_EVENT => {
                inner.muxer.poll_host();
                inner.process_rx(rx)?;
            }
            other => warn!("unexpected event {other}"),
        }
        Ok(())
    }
}
