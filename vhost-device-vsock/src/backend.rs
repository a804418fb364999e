//! The `VhostUserBackend` of one VM's vsock device: three queues (RX, TX, event) served by
//! one worker thread, plus the connection muxer's epoll set registered in that thread.
//!
//! Interrupts are what an emulated guest pays most for, so TX completions are signalled
//! lazily: the used entries are published at once (a driver that looks finds them), but the
//! TX interrupt goes out with the next RX interrupt (QEMU gives the queues one vector, so the
//! guest takes one interrupt for both), once [`TX_SIGNAL_BATCH`] completions wait, or when a
//! [`TX_SIGNAL_DELAY`] timer fires, whichever comes first. Linux's driver only frees the
//! packets of completed TX buffers; it never waits on them while it has ring space, which
//! the batch bound keeps.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use log::warn;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use vmm_sys_util::timerfd::TimerFd;

use vhost_device_common::{queue, ExitEvents, GuestMemoryAtomic};

use crate::muxer::Muxer;
use crate::packet::{RxBuffer, TxPacket};

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
/// The `handle_event` id of the timer that signals TX completions held back.
pub const TX_TIMER_EVENT: u16 = 5;
/// TX completions held back at most before the guest is interrupted for them.
pub const TX_SIGNAL_BATCH: usize = 32;
/// TX chains forwarded together (consecutive data of one connection in one writev(2)).
pub const TX_BATCH: usize = 32;
/// How long TX completions are held back at most.
pub const TX_SIGNAL_DELAY: Duration = Duration::from_millis(1);
/// `VIRTIO_VSOCK_F_SEQPACKET`.
pub const VIRTIO_VSOCK_F_SEQPACKET: u32 = 1;

struct Inner {
    muxer: Muxer,
    mem: Option<GuestMemoryAtomic>,
    event_idx: bool,
    /// TX chains put in the used ring whose interrupt is held back.
    tx_unsignalled: usize,
    /// Fires [`TX_SIGNAL_DELAY`] after completions were first held back.
    tx_timer: TimerFd,
    tx_timer_armed: bool,
}

/// One VM's vsock backend; cheap to clone (vhost-user-backend wants `Clone`).
#[derive(Clone)]
pub struct VsockBackend {
    inner: Arc<Mutex<Inner>>,
    cid: u64,
    queue_size: usize,
    epoll_fd: i32,
    timer_fd: i32,
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
    pub fn new(cid: u64, queue_size: usize, muxer: Muxer) -> io::Result<Self> {
        let epoll_fd = muxer.epoll_fd();
        let tx_timer = TimerFd::new()?;
        // Non-blocking: a timer read after the interrupt already went out finds nothing.
        nix::fcntl::fcntl(
            tx_timer.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        let timer_fd = tx_timer.as_raw_fd();
        Ok(VsockBackend {
            inner: Arc::new(Mutex::new(Inner {
                muxer,
                mem: None,
                event_idx: false,
                tx_unsignalled: 0,
                tx_timer,
                tx_timer_armed: false,
            })),
            cid,
            queue_size,
            epoll_fd,
            timer_fd,
        })
    }

    /// The muxer's epoll fd, to register as [`MUXER_EVENT`] in the worker's epoll.
    pub fn muxer_fd(&self) -> i32 {
        self.epoll_fd
    }

    /// The TX signal timer's fd, to register as [`TX_TIMER_EVENT`] in the worker's epoll.
    pub fn timer_fd(&self) -> i32 {
        self.timer_fd
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

/// Whether the driver has made more chains available than the device has taken.
fn more_available(vring: &VringRwLock, mem: &queue::Memory) -> bool {
    let guard = vring.get_ref();
    let queue = guard.get_queue();
    queue
        .avail_idx(&**mem, Ordering::Acquire)
        .is_ok_and(|idx| idx.0 != queue.next_avail())
}

impl Inner {
    /// Handles every TX chain. A credit update a chain makes due goes out at once,
    /// mid-batch, so the driver can send again while the rest of the batch is forwarded;
    /// the TX interrupt is held back (see the module doc).
    fn process_tx(&mut self, tx: &VringRwLock, rx: &VringRwLock) -> io::Result<()> {
        let Some(atomic) = &self.mem else {
            return Ok(());
        };
        if !queue_ready(tx) {
            return Ok(());
        }
        let mem = atomic.memory();
        let event_idx = self.event_idx;
        let mut rx_failure = None;
        let mut batch = Vec::with_capacity(TX_BATCH);
        let mut heads = Vec::with_capacity(TX_BATCH);
        queue::drain(tx, &mem, event_idx, |chain| {
            let head = chain.head_index();
            let descs = chain
                .clone()
                .map(|d| (d.addr(), d.len(), d.is_write_only()));
            batch.extend(self.muxer.parse_tx(&mem, descs));
            heads.push(head);
            // Forward as soon as the ring has nothing more right now: the credit update
            // then reaches the driver before notifications are re-enabled, so its next
            // packets are often found by the drain's re-check, without a kick.
            if heads.len() >= TX_BATCH || !more_available(tx, &mem) {
                self.tx_batch(&mem, &mut batch, &mut heads, tx, rx, &mut rx_failure);
            }
        })
        .map_err(|e| io::Error::other(format!("TX queue: {e}")))?;
        self.tx_batch(&mem, &mut batch, &mut heads, tx, rx, &mut rx_failure);
        if let Some(e) = rx_failure {
            return Err(e);
        }
        if self.tx_unsignalled >= TX_SIGNAL_BATCH {
            self.signal_tx(tx)?;
        } else if self.tx_unsignalled > 0 && !self.tx_timer_armed {
            self.tx_timer.reset(TX_SIGNAL_DELAY, None)?;
            self.tx_timer_armed = true;
        }
        Ok(())
    }

    /// Forwards a batch of TX packets, then gives their chains back. A credit update the
    /// batch made due goes out at once, so the driver can send again while the rest of the
    /// queue is forwarded.
    fn tx_batch(
        &mut self,
        mem: &queue::Memory,
        batch: &mut Vec<TxPacket>,
        heads: &mut Vec<u16>,
        tx: &VringRwLock,
        rx: &VringRwLock,
        rx_failure: &mut Option<io::Error>,
    ) {
        self.muxer.on_tx_packets(mem, batch);
        batch.clear();
        // Only now: the payloads were read out of these buffers above.
        for head in heads.drain(..) {
            if let Err(e) = tx.add_used(head, 0) {
                warn!("TX add_used failed: {e}");
            }
            self.tx_unsignalled += 1;
        }
        if self.muxer.take_urgent() && rx_failure.is_none() {
            *rx_failure = self.rx_pass(mem, rx, tx).err();
        }
    }

    fn process_rx(&mut self, rx: &VringRwLock, tx: &VringRwLock) -> io::Result<()> {
        let Some(atomic) = &self.mem else {
            return Ok(());
        };
        let mem = atomic.memory();
        self.rx_pass(&mem, rx, tx)
    }

    /// Interrupts the guest for the TX completions held back, if it asked for them.
    fn signal_tx(&mut self, tx: &VringRwLock) -> io::Result<()> {
        if std::mem::take(&mut self.tx_unsignalled) > 0 {
            queue::notify(tx)?;
        }
        Ok(())
    }

    /// The timer fired: whatever TX completions still wait are signalled now.
    fn tx_timer_fired(&mut self, tx: &VringRwLock) -> io::Result<()> {
        // Non-blocking: a timer whose expiry was already consumed reads EAGAIN.
        let _ = self.tx_timer.wait();
        self.tx_timer_armed = false;
        self.signal_tx(tx)
    }

    /// Fills RX buffers with whatever the muxer has for the guest, and notifies (with the
    /// TX completions held back riding along).
    fn rx_pass(
        &mut self,
        mem: &queue::Memory,
        rx: &VringRwLock,
        tx: &VringRwLock,
    ) -> io::Result<()> {
        if rx_fill(&mut self.muxer, mem, rx, self.event_idx)? {
            queue::notify(rx)?;
            self.signal_tx(tx)?;
        }
        Ok(())
    }
}

/// Fills RX buffers with whatever the muxer has for the guest; returns whether any was
/// used (the caller notifies).
fn rx_fill(
    muxer: &mut Muxer,
    mem: &queue::Memory,
    vring: &VringRwLock,
    event_idx: bool,
) -> io::Result<bool> {
    if !queue_ready(vring) {
        return Ok(false);
    }
    let mut used = false;
    // Whether the last pop came right after a re-check that found the ring non-empty.
    let mut rechecked = false;
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
            // some in between (EVENT_IDX, virtio 1.2, 2.7.10). Once only: a hostile
            // available index (more than a ring ahead) looks non-empty to the re-check
            // while popping returns nothing, and looping on it would spin forever.
            if event_idx
                && !rechecked
                && vring
                    .enable_notification()
                    .map_err(|e| io::Error::other(format!("RX queue: {e}")))?
            {
                rechecked = true;
                continue;
            }
            break;
        };
        rechecked = false;
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
    Ok(used)
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
            RX_QUEUE => inner.process_rx(rx, tx)?,
            TX_QUEUE => {
                inner.process_tx(tx, rx)?;
                inner.process_rx(rx, tx)?;
            }
            EVENT_QUEUE => {}
            MUXER_EVENT => {
                inner.muxer.poll_host();
                inner.process_rx(rx, tx)?;
            }
            TX_TIMER_EVENT => inner.tx_timer_fired(tx)?,
            other => warn!("unexpected event {other}"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::muxer::Settings;
    use crate::sibling::{Inbox, Registry};
    use vm_memory::{Bytes, GuestAddress};

    /// Found by the `vsock_tx` fuzz target: with EVENT_IDX, an RX available index more
    /// than a ring ahead made the RX fill loop spin forever (the re-check saw buffers,
    /// popping found none).
    #[test]
    fn hostile_rx_available_index_does_not_spin() {
        const QSIZE: u16 = 16;
        let dir = tempfile::tempdir().expect("temp dir");
        let settings = Settings {
            cid: 3,
            uds_path: dir.path().join("v.sock"),
            buf_alloc: 65536,
        };
        let inbox = Arc::new(Inbox::new().expect("eventfd"));
        let muxer =
            Muxer::new(settings, None, inbox, Arc::new(Registry::default())).expect("muxer");
        let backend = VsockBackend::new(3, usize::from(QSIZE), muxer).expect("backend");
        backend.set_event_idx(true);
        let mem = vhost_device_common::GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)])
            .expect("memory");
        // Queue i: descriptors at i * 0x400, available ring +0x100, used ring +0x200.
        // TX (1): one REQUEST to host port 9999, where nobody listens: the guest is owed a
        // reset, so the muxer has RX work.
        let mut hdr = [0u8; 44];
        hdr[0..8].copy_from_slice(&3u64.to_le_bytes());
        hdr[8..16].copy_from_slice(&2u64.to_le_bytes());
        hdr[16..20].copy_from_slice(&5000u32.to_le_bytes());
        hdr[20..24].copy_from_slice(&9999u32.to_le_bytes());
        hdr[28..30].copy_from_slice(&1u16.to_le_bytes()); // stream
        hdr[30..32].copy_from_slice(&1u16.to_le_bytes()); // REQUEST
        mem.write_slice(&hdr, GuestAddress(0x3000)).expect("header");
        let mut desc = [0u8; 16];
        desc[0..8].copy_from_slice(&0x3000u64.to_le_bytes());
        desc[8..12].copy_from_slice(&44u32.to_le_bytes());
        mem.write_slice(&desc, GuestAddress(0x400))
            .expect("descriptor");
        mem.write_obj(1u16, GuestAddress(0x502))
            .expect("TX avail idx");
        // RX (0): an available index 0x8000 ahead of the device's.
        mem.write_obj(0x8000u16, GuestAddress(0x102))
            .expect("RX avail idx");
        let atomic = GuestMemoryAtomic::new(mem);
        backend.update_memory(atomic.clone()).expect("memory");
        let vrings: Vec<VringRwLock> = (0..3u64)
            .map(|i| {
                let v = VringRwLock::new(atomic.clone(), QSIZE).expect("vring");
                v.set_queue_info(i * 0x400, i * 0x400 + 0x100, i * 0x400 + 0x200)
                    .expect("rings");
                v.set_queue_size(QSIZE);
                v.set_queue_event_idx(true);
                v.set_queue_ready(true);
                v.set_enabled(true);
                v
            })
            .collect();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = backend.handle_event(TX_QUEUE, EventSet::IN, &vrings, 0);
            let _ = done_tx.send(());
        });
        assert!(
            done_rx.recv_timeout(Duration::from_secs(10)).is_ok(),
            "handle_event spins on a hostile RX available index"
        );
    }
}
