//! The `VhostUserBackend` of the net device: one worker thread per queue pair, each serving
//! its RX and TX queues and its own tap queue.
//!
//! Queue `2i` is pair `i`'s RX queue, `2i + 1` its TX queue (virtio 1.2, 5.1.2). The worker
//! of pair `i` waits on both queues' kick events and, edge-triggered, on tap queue `i`. A
//! worker's state (its frame buffer, a frame waiting for RX buffers) sits behind a mutex only
//! that worker takes, so the hot path never contends.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use log::{debug, error, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_device_common::{queue, ExitEvents, GuestMemoryAtomic};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::rx::{self, RxDrop, RxOutcome, RxScratch};
use crate::stats::{DropCause, Stats};
use crate::tap::Tap;
use crate::tx::{self, TxDrop, TxOutcome, TxScratch};
use crate::virtio::{
    device_features, Negotiated, NetConfigSpace, HDR_LEN, MAX_GSO_FRAME, STATUS_LINK_UP,
};

/// The vring type the backend serves.
pub type Vring = VringRwLock<GuestMemoryAtomic>;

/// The size of a worker's frame buffer: the largest GSO frame and its header.
const FRAME_BUFFER: usize = HDR_LEN + MAX_GSO_FRAME;

/// What the backend is built from.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// Queue pairs, one tap queue each.
    pub queue_pairs: u16,
    /// The largest queue size the frontend may set.
    pub queue_size: u16,
    /// The MTU offered with `VIRTIO_NET_F_MTU`.
    pub mtu: Option<u16>,
}

#[derive(Debug)]
struct Worker {
    frame: Vec<u8>,
    /// Bytes of a frame read from the tap that waits for RX buffers (0: none).
    pending: usize,
    rx: RxScratch,
    tx: TxScratch,
    /// Whether this pair's tap queue is attached (multi-queue taps only).
    attached: Option<bool>,
}

/// The epoll token of a worker's wake-up eventfd, past the tap's.
const WAKE_AFTER_TAP: u64 = 1;

#[derive(Debug)]
struct Inner {
    config: BackendConfig,
    taps: Arc<Vec<Tap>>,
    features: u64,
    acked: AtomicU64,
    event_idx: AtomicBool,
    memory: RwLock<Option<GuestMemoryAtomic>>,
    workers: Vec<Mutex<Worker>>,
    /// Per pair: raised when one of its rings starts, so the worker attaches its tap queue
    /// (`None` if the eventfd could not be made: the queue is then attached on the pair's
    /// first kick).
    wakes: Vec<Option<EventFd>>,
    stats: Stats,
}

/// The net device's backend for one frontend connection.
#[derive(Debug, Clone)]
pub struct NetBackend {
    inner: Arc<Inner>,
}

impl NetBackend {
    /// A backend serving `taps` (one per queue pair).
    pub fn new(config: BackendConfig, taps: Arc<Vec<Tap>>) -> Self {
        let workers = (0..config.queue_pairs)
            .map(|_| {
                Mutex::new(Worker {
                    frame: vec![0u8; FRAME_BUFFER],
                    pending: 0,
                    rx: RxScratch::default(),
                    tx: TxScratch::default(),
                    // TUNSETIFF attached every queue.
                    attached: Some(true),
                })
            })
            .collect();
        let stats = Stats::new(usize::from(config.queue_pairs));
        let config_pairs = config.queue_pairs;
        NetBackend {
            inner: Arc::new(Inner {
                features: device_features(config.queue_pairs, config.mtu),
                config,
                taps,
                acked: AtomicU64::new(0),
                event_idx: AtomicBool::new(false),
                memory: RwLock::new(None),
                workers,
                wakes: (0..config_pairs)
                    .map(|_| EventFd::new(EFD_NONBLOCK).ok())
                    .collect(),
                stats,
            }),
        }
    }

    /// The epoll token of the tap in every worker: past the queues and the exit event.
    pub fn tap_event(&self) -> u64 {
        self.num_queues() as u64 + 1
    }

    /// Detaches the tap queues of every pair but the first until the frontend starts them,
    /// so the kernel steers no frame to a queue nobody reads (it would be lost); returns the
    /// wake-up eventfds to watch, with their worker and epoll token.
    pub fn start_detached(&self) -> Vec<(usize, std::os::fd::RawFd, u64)> {
        use std::os::fd::AsRawFd;
        if self.inner.taps.len() < 2 {
            return Vec::new();
        }
        let mut fds = Vec::new();
        for (pair, (tap, wake)) in self.inner.taps.iter().zip(&self.inner.wakes).enumerate() {
            let Some(wake) = wake else { continue };
            fds.push((pair, wake.as_raw_fd(), self.tap_event() + WAKE_AFTER_TAP));
            if pair == 0 {
                continue;
            }
            if let (Ok(()), Some(Ok(mut w))) = (
                tap.set_queue_attached(false),
                self.inner.workers.get(pair).map(Mutex::lock),
            ) {
                w.attached = Some(false);
            }
        }
        fds
    }

    /// This connection's counters.
    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    fn negotiated(&self) -> Negotiated {
        Negotiated::from_features(self.inner.acked.load(Ordering::Acquire))
    }

    fn memory(&self) -> Option<queue::Memory> {
        let guard = self.inner.memory.read().ok()?;
        guard.as_ref().map(GuestAddressSpace::memory)
    }

    /// Attaches or detaches the pair's tap queue to match whether the frontend enabled it,
    /// so the kernel steers no flow to a queue nobody reads.
    fn sync_attached(&self, pair: usize, worker: &mut Worker, vrings: &[Vring]) {
        if self.inner.taps.len() < 2 {
            return;
        }
        let enabled = vrings.iter().all(|v| {
            let state = v.get_ref();
            state.is_enabled() && state.get_queue().ready()
        });
        if worker.attached == Some(enabled) {
            return;
        }
        if let Some(tap) = self.inner.taps.get(pair) {
            match tap.set_queue_attached(enabled) {
                Ok(()) => {
                    debug!(
                        "queue pair {pair}: tap queue {}",
                        if enabled { "attached" } else { "detached" }
                    );
                    worker.attached = Some(enabled);
                }
                Err(e) => {
                    warn!(
                        "queue pair {pair}: {}",
                        vhost_device_common::error_chain(&e)
                    );
                    worker.attached = Some(enabled);
                }
            }
        }
    }

    /// Moves frames from the tap into the RX queue until the tap is empty or the guest has
    /// no more buffers (then the frame waits in `worker.pending`).
    fn process_rx(
        &self,
        pair: usize,
        tap: &Tap,
        vring: &Vring,
        mem: &queue::Memory,
        worker: &mut Worker,
    ) {
        {
            let state = vring.get_ref();
            if !state.is_enabled() || !state.get_queue().ready() {
                return;
            }
        }
        let neg = self.negotiated();
        let event_idx = self.inner.event_idx.load(Ordering::Relaxed);
        let stats = &self.inner.stats;
        let mut delivered = false;
        // The available index of the last attempt that ran out of buffers: running out again
        // at the same index after the driver announced more means its ring is broken (an
        // available index beyond the queue size), and retrying would spin.
        let mut last_seen = None;
        loop {
            if worker.pending == 0 {
                match tap.read(&mut worker.frame) {
                    Ok(n) => worker.pending = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        error!("reading tap {}: {e}", tap.name());
                        break;
                    }
                }
                if worker.pending == 0 {
                    break;
                }
            }
            let len = worker.pending;
            let outcome = {
                let mut state = vring.get_mut();
                rx::deliver(
                    state.get_queue_mut(),
                    &**mem,
                    &mut worker.frame[..len],
                    &neg,
                    &mut worker.rx,
                )
            };
            match outcome {
                Ok(RxOutcome::Delivered { .. }) => {
                    stats.received(pair, len);
                    worker.pending = 0;
                    last_seen = None;
                    // Tell a driver that waits at once, not when the tap runs dry or the
                    // ring is full: with a host sending without pause that is a whole ring
                    // later, and the guest would idle while we fill it, then we while it
                    // drains it. With EVENT_IDX a driver that is polling asked for nothing,
                    // so this costs it no interrupt.
                    self.notify_rx(vring);
                }
                Ok(RxOutcome::Dropped(cause)) => {
                    let cause = match cause {
                        RxDrop::BadChain => DropCause::RxBadChain,
                        RxDrop::TooLarge => DropCause::RxTooLarge,
                        RxDrop::Runt => DropCause::RxRunt,
                    };
                    stats.dropped(cause, &format_args!("{len} bytes"));
                    worker.pending = 0;
                    delivered = true;
                }
                Ok(RxOutcome::NoBuffers { seen }) => {
                    if last_seen == Some(seen) {
                        stats.dropped(
                            DropCause::RxBadChain,
                            &format_args!("available index {seen} stuck"),
                        );
                        break;
                    }
                    last_seen = Some(seen);
                    if !event_idx || !self.rearm_rx(vring, mem, seen) {
                        break;
                    }
                }
                Err(e) => {
                    error!("rx queue failed: {e}");
                    break;
                }
            }
        }
        if delivered {
            self.notify_rx(vring);
        }
    }

    fn notify_rx(&self, vring: &Vring) {
        if let Err(e) = queue::notify(vring) {
            error!("cannot signal the rx queue: {e}");
        }
    }

    /// Out of RX buffers with EVENT_IDX: asks the guest to kick once it adds a buffer
    /// beyond `seen`, the available index the failed attempt saw (`avail_event` = `seen`),
    /// then says whether it already has (a buffer added before `avail_event` was written
    /// would bring no kick). The device's own position stays where the frame must retry.
    fn rearm_rx(&self, vring: &Vring, mem: &queue::Memory, seen: u16) -> bool {
        let mut state = vring.get_mut();
        let q = state.get_queue_mut();
        let start = q.next_avail();
        q.set_next_avail(seen);
        // Writes avail_event = seen, fences, and compares the driver's index with `seen`.
        let more = q.enable_notification(&**mem).unwrap_or(false);
        q.set_next_avail(start);
        more
    }

    /// Sends every available TX chain to the tap.
    fn process_tx(
        &self,
        pair: usize,
        tap: &Tap,
        vring: &Vring,
        mem: &queue::Memory,
        worker: &mut Worker,
    ) {
        let neg = self.negotiated();
        let max_frame = tx::max_frame(self.inner.config.mtu);
        let event_idx = self.inner.event_idx.load(Ordering::Relaxed);
        let stats = &self.inner.stats;
        let scratch = &mut worker.tx;
        let result = queue::drain(vring, mem, event_idx, |chain| {
            let head = chain.head_index();
            match tx::send(chain, &neg, max_frame, tap, scratch) {
                TxOutcome::Sent(n) => {
                    stats.sent(pair, n);
                }
                TxOutcome::Dropped(drop) => {
                    let cause = match drop {
                        TxDrop::WriteOnlyDescriptor
                        | TxDrop::BadAddress
                        | TxDrop::TooManyDescriptors => DropCause::TxBadChain,
                        TxDrop::ShortHeader => DropCause::TxShortHeader,
                        TxDrop::TooLarge => DropCause::TxTooLarge,
                        TxDrop::BadGso => DropCause::TxBadGso,
                        TxDrop::Tap(_) => DropCause::TxTapError,
                    };
                    stats.dropped(cause, &format_args!("{drop:?}"));
                }
            }
            if let Err(e) = vring.add_used(head, 0) {
                error!("tx queue: cannot return a chain: {e}");
            }
            // As on RX: a driver that stopped its queue for want of buffers hears as soon
            // as it asked to (EVENT_IDX: after the share of its chains it chose), not after
            // every chain it added meanwhile has been sent.
            if let Err(e) = queue::notify(vring) {
                error!("cannot signal the tx queue: {e}");
            }
        });
        match result {
            Ok(0) => {}
            Ok(_) => {
                if let Err(e) = queue::notify(vring) {
                    error!("cannot signal the tx queue: {e}");
                }
            }
            Err(e) => error!("tx queue failed: {e}"),
        }
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.inner.config.queue_pairs) * 2
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.inner.config.queue_size)
    }

    fn features(&self) -> u64 {
        self.inner.features
    }

    fn acked_features(&self, features: u64) {
        self.inner.acked.store(features, Ordering::Release);
        let neg = Negotiated::from_features(features);
        for tap in self.inner.taps.iter() {
            if let Err(e) = tap.set_vnet_hdr_len(neg.hdr_len) {
                error!("{}", vhost_device_common::error_chain(&e));
            }
            if let Err(e) = tap.set_offloads(neg.tap_offloads()) {
                error!("{}", vhost_device_common::error_chain(&e));
            }
        }
        debug!(
            "features acked: {features:#x}, tap offloads {:#x}",
            neg.tap_offloads()
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // CONFIG serves GET_CONFIG (MAC, status, pairs, MTU) to frontends that ask, like
        // vmm-frontend; QEMU's netdev does not and only warns that it will not use it.
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        NetConfigSpace {
            mac: self.inner.config.mac,
            status: STATUS_LINK_UP,
            max_virtqueue_pairs: self.inner.config.queue_pairs,
            mtu: self.inner.config.mtu.unwrap_or(0),
        }
        .read(offset, size)
    }

    fn update_memory(&self, mem: GuestMemoryAtomic) -> io::Result<()> {
        // A region past the end of its file would kill the daemon with SIGBUS.
        vhost_device_common::memory::refuse_unbacked(&mem)?;
        let mut slot = self
            .inner
            .memory
            .write()
            .map_err(|_| io::Error::other("memory lock poisoned"))?;
        *slot = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.inner.config.queue_pairs)
            .map(|i| 0b11u64 << (2 * i))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        ExitEvents::pair()
    }

    fn queue_started(&self, queue_index: u16) {
        // The worker checks (and attaches) its pair's tap queue on any event.
        if let Some(Some(wake)) = self.inner.wakes.get(usize::from(queue_index / 2)) {
            let _ = wake.write(1);
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let Some(mem) = self.memory() else {
            return Ok(());
        };
        let (Some(tap), Some(worker), [rxq, txq, ..]) = (
            self.inner.taps.get(thread_id),
            self.inner.workers.get(thread_id),
            vrings,
        ) else {
            return Ok(());
        };
        let Ok(mut worker) = worker.lock() else {
            return Err(io::Error::other("worker state poisoned"));
        };
        self.sync_attached(thread_id, &mut worker, vrings);
        match u64::from(device_event) {
            e if e == self.tap_event() + WAKE_AFTER_TAP => {
                if let Some(Some(wake)) = self.inner.wakes.get(thread_id) {
                    let _ = wake.read();
                }
            }
            0 => self.process_rx(thread_id, tap, rxq, &mem, &mut worker),
            1 => self.process_tx(thread_id, tap, txq, &mem, &mut worker),
            e if e == self.tap_event() => self.process_rx(thread_id, tap, rxq, &mem, &mut worker),
            e => debug!("unexpected event {e} on worker {thread_id}"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn backend() -> NetBackend {
        NetBackend::new(
            BackendConfig {
                mac: [0x52, 0x54, 0, 0, 0, 1],
                queue_pairs: 1,
                queue_size: 16,
                mtu: None,
            },
            Arc::new(Vec::new()),
        )
    }

    fn writable(addr: u64) -> RawDescriptor {
        let flags = u16::try_from(VRING_DESC_F_WRITE).unwrap_or(0);
        RawDescriptor::from(Descriptor::new(addr, 512, flags, 0))
    }

    /// Out of RX buffers under EVENT_IDX, the device must ask for a kick on the *next*
    /// buffer the driver adds (`avail_event` = the driver's current index), even though it
    /// rewound its own position to retry the chains it could not use yet.
    #[test]
    fn rearm_asks_for_a_kick_on_the_next_buffer() {
        let mmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20_0000)])
            .unwrap_or_else(|e| panic!("memory: {e}"));
        let atomic = GuestMemoryAtomic::new(mmap);
        let mem = atomic.memory();
        let vq = MockSplitQueue::new(&*mem, 16);
        vq.add_desc_chains(&[writable(0x10_0000), writable(0x11_0000)], 0)
            .unwrap_or_else(|e| panic!("chains: {e:?}"));
        let vring = Vring::new(atomic.clone(), 16).unwrap_or_else(|e| panic!("vring: {e}"));
        vring.set_queue_size(16);
        vring
            .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
            .unwrap_or_else(|e| panic!("queue info: {e}"));
        vring.set_queue_event_idx(true);
        vring.set_queue_ready(true);
        vring.set_enabled(true);

        let b = backend();
        // Two chains are available but the device could use none (the frame needs more).
        assert!(
            !b.rearm_rx(&vring, &mem, 2),
            "no buffer beyond the two seen"
        );
        let avail_event_addr = GuestAddress(vq.used_addr().0 + 4 + 8 * 16);
        let avail_event: u16 = mem.read_obj(avail_event_addr).unwrap_or(0xffff);
        assert_eq!(avail_event, 2, "kick when the driver adds the third");
        assert_eq!(
            vring.queue_next_avail(),
            0,
            "the two chains stay to be retried"
        );

        // The driver adds one more after the device looked but before it re-armed (so the
        // driver saw the old avail_event and did not kick): re-arming must report it.
        vq.add_desc_chains(&[writable(0x12_0000)], 2)
            .unwrap_or_else(|e| panic!("chain: {e:?}"));
        assert!(b.rearm_rx(&vring, &mem, 2), "the third buffer is news");
        assert_eq!(vring.queue_next_avail(), 0);
    }
}
