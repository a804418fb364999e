//! The `VhostUserBackend`: ties the virtqueues to the request parser and the I/O engine.
//!
//! One worker thread per queue (`queues_per_thread`), each with its own engine, so the hot
//! path takes no lock another thread wants (each worker's state sits behind a mutex that
//! only its thread takes while serving; the control thread takes it to swap memory or
//! stop the queue). A kick drains the queue: every chain is parsed, checked and handed to
//! the engine, then the batch is submitted at once. Completions (at once for the sync
//! engine, via the engine's eventfd for io_uring) write the status byte, go to the used
//! ring, and the guest is notified once per batch (EVENT_IDX respected).
//!
//! Guest faults are data: a bad chain gets its error status and the worker keeps serving.
//! `handle_event` returns `Err` (which ends vhost-user-backend's worker loop) never.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use log::{debug, error, warn};
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_device_common::queue::{self, Chain};
use vhost_device_common::{ExitEvents, GuestMemoryAtomic};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::Config;
use crate::disk::Disk;
use crate::engine::{self, Done, Engine, IoVecs, Job, Op, Tag};
use crate::inflight::{self, QueueLog};
use crate::ratelimit;
use crate::request::{self, Kind, Rejected, Request};
use crate::virtio::{features, status, BlkConfig, ID_BYTES};
use crate::GuestMemory;

/// The vring type of this backend.
pub type Vring = VringRwLock<GuestMemoryAtomic>;

/// Why a backend could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The I/O engine could not start (io_uring refused, eventfd limit, ...).
    #[error("cannot start the {engine} engine for queue {queue}")]
    Engine {
        /// Engine name.
        engine: &'static str,
        /// Queue.
        queue: u16,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The worker's wake-up eventfd could not be made.
    #[error("cannot create an eventfd for queue {queue}")]
    Wake {
        /// Queue.
        queue: u16,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A request ready for the used ring.
#[derive(Debug, Clone, Copy)]
struct Completion {
    head: u16,
    /// Where the status byte goes; `None` for a chain without one.
    status_addr: Option<GuestAddress>,
    status: u8,
    used_len: u32,
}

/// One worker thread's state.
struct Worker {
    queue: u16,
    engine: Box<dyn Engine>,
    mem: Option<GuestMemoryAtomic>,
    vring: Option<Vring>,
    /// Finished jobs reaped from the engine.
    done: Vec<Done>,
    /// Requests answered, waiting for the used ring.
    ready: Vec<Completion>,
    /// Requests taken off this queue since the connection started.
    requests: u64,
    /// The queue's in-flight log, when the frontend shares one.
    log: Option<QueueLog>,
    /// A log arrived: recover from it (resubmit what it holds) before serving the ring.
    recover: bool,
    /// Raised when the ring starts with a log to recover, to run that in the worker.
    wake: EventFd,
    /// Data bytes of requests started since completions were last published.
    unpublished: u64,
}

struct Inner {
    disk: Arc<Disk>,
    num_queues: u16,
    queue_size: u16,
    features: u64,
    workers: Vec<Mutex<Worker>>,
    event_idx: AtomicBool,
    backend_req: Mutex<Option<Backend>>,
}

/// Event ids on a worker's epoll past the queue's own (0) and vhost-user-backend's exit
/// event (`num_queues`).
const COMPLETION_EVENT: u16 = 1;
/// Data started in one pass over the ring after which finished requests are published
/// without waiting for the end of the pass.
const EARLY_PUBLISH_BYTES: u64 = 128 * 1024;
const WAKE_EVENT: u16 = 2;

/// The virtio-blk backend of one frontend connection.
#[derive(Clone)]
pub struct BlkBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for BlkBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkBackend")
            .field("image", &self.inner.disk.path())
            .field("num_queues", &self.inner.num_queues)
            .finish_non_exhaustive()
    }
}

/// The features offered for `config`.
pub fn offered_features(config: &Config) -> u64 {
    let mut f = features::VERSION_1
        | features::EVENT_IDX
        | features::INDIRECT_DESC
        | features::SEG_MAX
        | features::BLK_SIZE
        | features::FLUSH
        | features::TOPOLOGY
        | features::CONFIG_WCE
        | features::MQ
        | vhost::vhost_user::message::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if config.read_only {
        f |= features::RO;
    } else {
        f |= features::DISCARD | features::WRITE_ZEROES;
    }
    f
}

impl BlkBackend {
    /// A backend serving `disk` as `config` says, with one engine per queue.
    pub fn new(disk: Arc<Disk>, config: &Config) -> Result<Self, Error> {
        let workers = (0..config.num_queues)
            .map(|queue| {
                let engine =
                    engine::create(config.engine, &disk, config.queue_size).map_err(|source| {
                        Error::Engine {
                            engine: match config.engine {
                                crate::config::EngineKind::Sync => "sync",
                                _ => "io_uring",
                            },
                            queue,
                            source,
                        }
                    })?;
                let wake =
                    EventFd::new(EFD_NONBLOCK).map_err(|source| Error::Wake { queue, source })?;
                Ok(Mutex::new(Worker {
                    queue,
                    engine,
                    mem: None,
                    vring: None,
                    done: Vec::new(),
                    ready: Vec::new(),
                    requests: 0,
                    log: None,
                    recover: false,
                    wake,
                    unpublished: 0,
                }))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(BlkBackend {
            inner: Arc::new(Inner {
                disk,
                num_queues: config.num_queues,
                queue_size: config.queue_size,
                features: offered_features(config),
                workers,
                event_idx: AtomicBool::new(false),
                backend_req: Mutex::new(None),
            }),
        })
    }

    /// Whether `other` is a clone of this backend (the same connection).
    pub fn is_same(&self, other: &BlkBackend) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Requests taken off each queue so far.
    pub fn requests_per_queue(&self) -> Vec<u64> {
        (0..self.inner.workers.len())
            .map(|i| self.worker(i).map_or(0, |w| w.requests))
            .collect()
    }

    /// The name of the engine serving the queues.
    pub fn engine_name(&self) -> &'static str {
        self.worker(0).map_or("none", |w| w.engine.name())
    }

    /// The eventfds each worker's epoll must watch besides its queue: (thread index, fd,
    /// epoll data value). The engine's completions, and the wake-up for recovering
    /// in-flight requests.
    pub fn worker_fds(&self) -> Vec<(usize, std::os::fd::RawFd, u64)> {
        use std::os::fd::AsRawFd;
        let base = u64::from(self.inner.num_queues);
        (0..self.inner.workers.len())
            .filter_map(|i| self.worker(i).map(|w| (i, w)))
            .flat_map(|(i, w)| {
                let completion = w
                    .engine
                    .completion_fd()
                    .map(|fd| (i, fd, base + u64::from(COMPLETION_EVENT)));
                let wake = (i, w.wake.as_raw_fd(), base + u64::from(WAKE_EVENT));
                completion.into_iter().chain(std::iter::once(wake))
            })
            .collect()
    }

    /// Shares `buffer` as the in-flight log of every queue; each recovers from it when its
    /// ring starts.
    fn use_inflight(&self, buffer: inflight::Buffer) {
        let buffer = Arc::new(buffer);
        for i in 0..self.inner.workers.len() {
            if let Some(mut w) = self.worker(i) {
                w.log = u16::try_from(i).ok().and_then(|q| buffer.queue(q));
                w.recover = w.log.is_some();
            }
        }
    }

    fn worker(&self, index: usize) -> Option<MutexGuard<'_, Worker>> {
        self.inner.workers.get(index).and_then(|w| {
            w.lock()
                .map_err(|_| error!("worker {index} state poisoned"))
                .ok()
        })
    }

    /// The config space as the driver sees it now (capacity re-read from the image).
    pub fn config_space(&self) -> BlkConfig {
        let disk = &self.inner.disk;
        disk.refresh_capacity();
        BlkConfig {
            capacity: disk.capacity() / crate::virtio::SECTOR_SIZE,
            seg_max: u32::from(self.inner.queue_size.saturating_sub(2)).clamp(1, 1022),
            blk_size: disk.block_size(),
            num_queues: self.inner.num_queues,
            writeback: disk.writeback(),
            discard: !disk.read_only(),
        }
    }

    /// Tells the frontend the config space changed (`VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`
    /// on the backend request channel; `vhost` 0.18 needs the workspace's patch for it, see
    /// `third_party/README.md`). The message is sent from a thread of its own: with
    /// `REPLY_ACK` the frontend's answer is awaited, and a frontend that never answers
    /// (Cloud Hypervisor before its PR #8206) must not stall the caller (the signal loop).
    /// Returns whether a channel was there to send on.
    pub fn notify_config_change(&self) -> bool {
        let channel = self.inner.backend_req.lock().ok().and_then(|g| g.clone());
        let Some(channel) = channel else {
            warn!("the frontend set up no backend request channel: it is not told the disk size changed");
            return false;
        };
        let sent = std::thread::Builder::new()
            .name("blk-config-change".into())
            .spawn(move || match channel.handle_config_change() {
                Ok(_) => debug!("config-change notification acknowledged"),
                Err(e) => warn!("config-change notification failed: {e}"),
            });
        if let Err(e) = sent {
            warn!("cannot start the config-change notification: {e}");
            return false;
        }
        true
    }
}

impl Worker {
    /// Turns a chain into a job for the engine, or completes it at once.
    fn start(&mut self, disk: &Disk, mem: &Arc<GuestMemory>, chain: Chain) {
        let head = chain.head_index();
        self.begin(disk, mem, head, request::parse(chain));
    }

    /// Finds what the previous daemon left in the in-flight log, points the ring past it and
    /// resubmits it, oldest first.
    fn recover(&mut self, disk: &Disk, mem: &Arc<GuestMemory>, vring: &Vring) {
        self.recover = false;
        let Some(log) = self.log.as_mut() else {
            return;
        };
        let (table, size, used) = {
            let state = vring.get_ref();
            let q = state.get_queue();
            (q.desc_table(), q.size(), q.next_used())
        };
        let found = log.recover(used);
        vring.set_queue_next_avail(found.next_avail);
        if !found.heads.is_empty() {
            log::info!(
                "queue {}: resubmitting {} request(s) left in flight by the previous daemon",
                self.queue,
                found.heads.len()
            );
        }
        for head in found.heads {
            let descriptors = queue::Descriptors::new(mem, GuestAddress(table), size, head);
            let parsed = request::parse_descriptors(mem, descriptors);
            self.begin(disk, mem, head, parsed);
        }
    }

    /// Starts the request parsed from the chain at `head`.
    fn begin(
        &mut self,
        disk: &Disk,
        mem: &Arc<GuestMemory>,
        head: u16,
        parsed: Result<Request, Rejected>,
    ) {
        self.requests += 1;
        if let Some(log) = self.log.as_mut() {
            log.begin(head);
        }
        let req = match parsed {
            Ok(req) => req,
            Err(rejected) => {
                ratelimit::guest_fault(self.queue, &rejected.error);
                self.complete_now(head, rejected.status, rejected.error.status(), 1);
                return;
            }
        };
        if let Err(e) = req.check(disk.capacity(), disk.read_only()) {
            ratelimit::guest_fault(self.queue, &e);
            self.complete_now(head, Some(req.status), e.status(), 1);
            return;
        }
        let tag = |used_len, writes| Tag {
            head,
            status: req.status,
            used_len,
            writes,
        };
        let align = if disk.direct() {
            u64::from(disk.block_size())
        } else {
            1
        };
        let job = match req.kind {
            Kind::Read { offset, data, len } => match IoVecs::new(mem, &data, align) {
                Ok(iov) => {
                    self.unpublished += iov.len();
                    Job {
                        tag: tag(len + 1, false),
                        op: Op::Read { offset, iov },
                    }
                }
                Err(e) => return self.fail(tag(1, false), &e),
            },
            Kind::Write { offset, data, .. } => match IoVecs::new(mem, &data, align) {
                Ok(iov) => {
                    self.unpublished += iov.len();
                    let dsync = !disk.writeback();
                    Job {
                        tag: tag(1, !dsync),
                        op: Op::Write { offset, iov, dsync },
                    }
                }
                Err(e) => return self.fail(tag(1, false), &e),
            },
            Kind::Flush => {
                if !disk.take_dirty() {
                    return self.complete_now(head, Some(req.status), status::OK, 1);
                }
                Job {
                    tag: tag(1, false),
                    op: Op::Flush,
                }
            }
            Kind::GetId { data } => {
                let written = write_serial(mem, disk.serial(), &data);
                return self.complete_now(head, Some(req.status), status::OK, written + 1);
            }
            Kind::Discard(ranges) => Job {
                tag: tag(1, true),
                op: Op::Fallocate {
                    mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    ranges: ranges.iter().map(|r| (r.offset, r.len)).collect(),
                },
            },
            Kind::WriteZeroes { ranges, unmap } => Job {
                tag: tag(1, true),
                op: Op::Fallocate {
                    mode: if unmap {
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                    } else {
                        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                    },
                    ranges: ranges.iter().map(|r| (r.offset, r.len)).collect(),
                },
            },
        };
        self.engine.submit(job);
    }

    fn fail(&mut self, tag: Tag, cause: &engine::IoVecError) {
        ratelimit::guest_fault(self.queue, cause);
        self.complete_now(tag.head, Some(tag.status), status::IOERR, 1);
    }

    fn complete_now(
        &mut self,
        head: u16,
        status_addr: Option<GuestAddress>,
        status: u8,
        used_len: u32,
    ) {
        self.ready.push(Completion {
            head,
            status_addr,
            status,
            used_len,
        });
    }

    /// Turns the engine's finished jobs into completions.
    fn collect(&mut self, disk: &Disk) {
        self.engine.reap(&mut self.done);
        for done in self.done.drain(..) {
            let (status, used_len) = match done.result {
                Ok(()) => {
                    if done.tag.writes {
                        disk.mark_dirty();
                    }
                    (status::OK, done.tag.used_len)
                }
                Err(errno) => {
                    let e = std::io::Error::from_raw_os_error(errno);
                    if ratelimit::allow(&e.kind()).is_some() {
                        warn!(
                            "queue {}: I/O error on {}: {e}",
                            self.queue,
                            disk.path().display()
                        );
                    }
                    (status::IOERR, 1)
                }
            };
            self.ready.push(Completion {
                head: done.tag.head,
                status_addr: Some(done.tag.status),
                status,
                used_len,
            });
        }
    }

    /// Writes the status of every finished request, puts them on the used ring and
    /// notifies the guest once. Returns how many completed.
    fn finish(&mut self, disk: &Disk, mem: &GuestMemory) -> usize {
        self.unpublished = 0;
        self.collect(disk);
        let Some(vring) = self.vring.clone() else {
            return 0;
        };
        let n = self.ready.len();
        for c in self.ready.drain(..) {
            let used_len = match c.status_addr {
                Some(addr) => {
                    // The address was checked to be in guest memory when the chain was
                    // parsed; a frontend that shrank memory since only loses this status.
                    if let Err(e) = mem.write_obj(c.status, addr) {
                        debug!("queue {}: status byte unwritable: {e}", self.queue);
                    }
                    c.used_len
                }
                // No status byte: the chain is returned with nothing written.
                None => 0,
            };
            if let Some(log) = &self.log {
                log.completing(c.head);
            }
            if let Err(e) = vring.add_used(c.head, used_len) {
                error!("queue {}: cannot add to the used ring: {e}", self.queue);
            }
            if let Some(log) = &self.log {
                log.completed(c.head, vring.get_ref().get_queue().next_used());
            }
        }
        if n > 0 {
            if let Err(e) = queue::notify(&vring) {
                warn!("queue {}: cannot notify the guest: {e}", self.queue);
            }
        }
        n
    }
}

/// Copies the serial into the GET_ID buffers; returns the bytes written.
fn write_serial(mem: &GuestMemory, serial: &[u8; ID_BYTES], data: &[request::Segment]) -> u32 {
    let mut written = 0usize;
    for seg in data {
        let Some(src) = serial.get(written..) else {
            break;
        };
        let n = src.len().min(seg.len as usize);
        if n == 0 || mem.write_slice(&src[..n], seg.addr).is_err() {
            break;
        }
        written += n;
    }
    u32::try_from(written).unwrap_or(0)
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.inner.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.inner.queue_size)
    }

    fn features(&self) -> u64 {
        self.inner.features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn get_inflight_fd(
        &self,
        msg: &VhostUserInflight,
    ) -> std::io::Result<(VhostUserInflight, std::fs::File)> {
        let (buffer, file, reply) =
            inflight::Buffer::create(msg, self.inner.num_queues, self.inner.queue_size)?;
        self.use_inflight(buffer);
        Ok((reply, file))
    }

    fn set_inflight_fd(&self, msg: &VhostUserInflight, file: std::fs::File) -> std::io::Result<()> {
        let buffer =
            inflight::Buffer::open(file, msg, self.inner.num_queues, self.inner.queue_size)?;
        log::info!(
            "the frontend shares an in-flight buffer ({} queue(s) of {})",
            msg.num_queues,
            msg.queue_size
        );
        self.use_inflight(buffer);
        Ok(())
    }

    fn queue_started(&self, queue_index: u16) {
        if let Some(w) = self.worker(usize::from(queue_index)) {
            if w.recover {
                if let Err(e) = w.wake.write(1) {
                    error!("queue {queue_index}: cannot wake the worker: {e}");
                }
            }
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config_space().read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> std::io::Result<()> {
        if let Some(writeback) = crate::virtio::written_writeback(offset, buf) {
            debug!(
                "guest set the write cache to {}",
                if writeback {
                    "writeback"
                } else {
                    "writethrough"
                }
            );
            self.inner.disk.set_writeback(writeback);
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic) -> std::io::Result<()> {
        // A region past the end of its file would kill the daemon with SIGBUS.
        vhost_device_common::memory::refuse_unbacked(&mem)?;
        for i in 0..self.inner.workers.len() {
            if let Some(mut w) = self.worker(i) {
                w.mem = Some(mem.clone());
            }
        }
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        if let Ok(mut slot) = self.inner.backend_req.lock() {
            *slot = Some(backend);
        }
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.inner.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        ExitEvents::pair()
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        // GET_VRING_BASE: finish what is in flight before the frontend takes the ring back.
        let Some(mut w) = usize::try_from(queue_index)
            .ok()
            .and_then(|i| self.worker(i))
        else {
            return Ok(());
        };
        let w = &mut *w;
        w.engine.drain(&mut w.done);
        if let Some(mem) = w.mem.as_ref().map(GuestAddressSpace::memory) {
            w.finish(&self.inner.disk, &mem);
        }
        w.done.clear();
        w.ready.clear();
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> std::io::Result<()> {
        let Some(mut w) = self.worker(thread_id) else {
            return Ok(());
        };
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        if w.vring.is_none() {
            w.vring = Some(vring.clone());
        }
        let Some(mem) = w.mem.as_ref().map(GuestAddressSpace::memory) else {
            warn!("queue {}: kicked before the memory table was set", w.queue);
            return Ok(());
        };
        let disk = &self.inner.disk;
        let base = self.inner.num_queues;
        if device_event == base.wrapping_add(WAKE_EVENT) {
            let _ = w.wake.read();
        }
        if w.recover && vring.get_ref().get_queue().ready() {
            let arc = mem.clone().into_inner();
            w.recover(disk, &arc, vring);
            w.engine.commit();
        }
        if device_event == 0 {
            let event_idx = self.inner.event_idx.load(Ordering::Acquire);
            let arc = mem.clone().into_inner();
            let w = &mut *w;
            let drained = queue::drain(vring, &mem, event_idx, |chain| {
                w.start(disk, &arc, chain);
                // Large transfers done in the worker are handed back at once, so the driver
                // refills the ring while the worker copies the next ones, instead of the two
                // taking turns a whole batch at a time.
                if w.unpublished >= EARLY_PUBLISH_BYTES {
                    w.finish(disk, &mem);
                }
            });
            if let Err(e) = drained {
                // The ring itself is broken (e.g. an available index past the queue size):
                // nothing to answer; the guest must reset the device.
                if ratelimit::allow(&e).is_some() {
                    error!("queue {}: cannot read the available ring: {e}", w.queue);
                }
            }
            w.engine.commit();
        }
        // Completions: the engine's eventfd fired, or the sync engine finished at once.
        w.finish(disk, &mem);
        Ok(())
    }
}
