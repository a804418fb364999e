//! An in-test vhost-user frontend: memfd guest memory, virtqueues a test drives by hand,
//! and the vhost-user control sequence, to exercise a daemon over its real socket.
//!
//! It plays the part QEMU or Cloud Hypervisor plays (the control plane) and the part the
//! guest driver plays (the split virtqueues), with nothing emulated in between, so a test
//! sees exactly what the daemon does with each descriptor chain.
//!
//! ```no_run
//! use std::time::Duration;
//! use e2e::frontend::{Buf, Frontend, Options};
//!
//! let mut fe = Frontend::connect("/tmp/blk.sock", Options::default()).expect("connect");
//! let config = fe.get_config(0, 8).expect("config");
//! let header = fe.memory().alloc(16);
//! let data = fe.memory().alloc(512);
//! let status = fe.memory().alloc(1);
//! let q = fe.queue(0);
//! q.submit(&[Buf::readable(header, 16), Buf::writable(data, 512), Buf::writable(status, 1)])
//!     .expect("submit");
//! let used = q.wait_used(Duration::from_secs(5)).expect("completion");
//! # let _ = (config, used);
//! ```
//!
//! The control sequence follows what Cloud Hypervisor's `setup_vhost_user` sends: owner,
//! features, protocol features, memory table, the backend request channel, every queue's
//! size first, then per queue its addresses, base, call and kick eventfds, and enable.
//! Each step is also reachable on its own through [`Frontend::vhost`], so a test can send a
//! hostile frontend's messages (bad ring addresses, queue sizes of zero) and see the reply.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{
    Frontend as VhostFrontend, FrontendReqHandler, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;

/// `VRING_DESC_F_NEXT`: the chain continues at `next`.
const DESC_F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`: the device writes this buffer.
const DESC_F_WRITE: u16 = 2;
/// `VRING_DESC_F_INDIRECT`: the buffer is a table of descriptors.
const DESC_F_INDIRECT: u16 = 4;

/// What went wrong while talking to a daemon.
#[derive(Debug)]
pub enum Error {
    /// A vhost-user message failed or the backend refused it.
    Vhost(&'static str, vhost::Error),
    /// Guest memory could not be created or accessed.
    Memory(String),
    /// A system call failed.
    Io(&'static str, std::io::Error),
    /// The daemon did not answer in time.
    Timeout(String),
    /// The test asked for something impossible (a queue larger than free descriptors, ...).
    Usage(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Vhost(what, e) => write!(f, "vhost-user {what}: {e}"),
            Error::Memory(m) => write!(f, "guest memory: {m}"),
            Error::Io(what, e) => write!(f, "{what}: {e}"),
            Error::Timeout(m) => write!(f, "timed out: {m}"),
            Error::Usage(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Vhost(_, e) => Some(e),
            Error::Io(_, e) => Some(e),
            _ => None,
        }
    }
}

/// Results of this module.
pub type Result<T> = std::result::Result<T, Error>;

fn msg_err(what: &'static str) -> impl FnOnce(vhost::Error) -> Error {
    move |e| Error::Vhost(what, e)
}

/// How [`Frontend::connect`] sets the device up.
#[derive(Debug, Clone)]
pub struct Options {
    /// Queues to set up (clamped to what the backend reports with `GET_QUEUE_NUM` under MQ).
    pub num_queues: usize,
    /// Size of every queue.
    pub queue_size: u16,
    /// Guest memory size in bytes (one region at guest address 0, memfd-backed, shared).
    pub mem_size: usize,
    /// Virtio features the driver is willing to ack; the acked set is this AND what the
    /// backend offers (plus `VHOST_USER_F_PROTOCOL_FEATURES` when offered).
    pub features: u64,
    /// Protocol features to ack, ANDed with what the backend offers.
    pub protocol_features: VhostUserProtocolFeatures,
    /// How long to keep retrying the connection while the daemon starts.
    pub connect_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            num_queues: 1,
            queue_size: 256,
            mem_size: 64 << 20,
            features: u64::MAX,
            protocol_features: VhostUserProtocolFeatures::all(),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl Options {
    /// Sets the number of queues.
    pub fn queues(mut self, n: usize) -> Self {
        self.num_queues = n;
        self
    }

    /// Sets the queue size.
    pub fn queue_size(mut self, n: u16) -> Self {
        self.queue_size = n;
        self
    }

    /// Sets the virtio features the driver acks (before ANDing with the offer).
    pub fn features(mut self, features: u64) -> Self {
        self.features = features;
        self
    }

    /// Sets the protocol features the frontend acks (before ANDing with the offer).
    pub fn protocol_features(mut self, features: VhostUserProtocolFeatures) -> Self {
        self.protocol_features = features;
        self
    }

    /// Sets the guest memory size.
    pub fn mem_size(mut self, bytes: usize) -> Self {
        self.mem_size = bytes;
        self
    }
}

/// Guest memory: one memfd-backed, shared region at guest address 0, plus a bump allocator
/// for rings and buffers. Clones share the same memory and allocator.
#[derive(Debug, Clone)]
pub struct Memory {
    mmap: GuestMemoryMmap<()>,
    next: Arc<AtomicU64>,
    size: u64,
}

impl Memory {
    /// Creates `size` bytes of memfd-backed guest memory.
    pub fn new(size: usize) -> Result<Self> {
        let fd = nix::sys::memfd::memfd_create(
            c"e2e-guest-mem",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .map_err(|e| Error::Io("memfd_create", e.into()))?;
        let file = File::from(fd);
        file.set_len(size as u64)
            .map_err(|e| Error::Io("sizing the memfd", e))?;
        let mmap = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| Error::Memory(e.to_string()))?;
        Ok(Memory {
            mmap,
            // Keep page 0 unused so a zero address in a test is always a bug that shows.
            next: Arc::new(AtomicU64::new(4096)),
            size: size as u64,
        })
    }

    /// The vm-memory view, to read and write guest memory with `Bytes`.
    pub fn mmap(&self) -> &GuestMemoryMmap<()> {
        &self.mmap
    }

    /// Size of guest memory in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Allocates `len` bytes aligned to 16, zeroed. Panics when guest memory is exhausted
    /// (a test sizing bug, not a daemon fault).
    pub fn alloc(&self, len: usize) -> GuestAddress {
        self.alloc_aligned(len, 16)
    }

    /// Allocates `len` bytes aligned to `align` (a power of two), zeroed.
    pub fn alloc_aligned(&self, len: usize, align: u64) -> GuestAddress {
        let len = len.max(1);
        let len64 = len as u64;
        let mut start = 0;
        self.next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |next| {
                start = next.next_multiple_of(align);
                Some(start + len64)
            })
            .ok();
        assert!(
            start + len64 <= self.size,
            "test guest memory exhausted: {len} bytes wanted, {} in total; raise Options::mem_size",
            self.size
        );
        let addr = GuestAddress(start);
        self.fill(addr, 0, len);
        addr
    }

    /// Allocates and fills a buffer with `data`.
    pub fn alloc_with(&self, data: &[u8]) -> GuestAddress {
        let addr = self.alloc(data.len());
        self.write(addr, data);
        addr
    }

    /// Writes `data` at `addr`. Panics on an address outside guest memory (a test bug).
    pub fn write(&self, addr: GuestAddress, data: &[u8]) {
        self.mmap
            .write_slice(data, addr)
            .unwrap_or_else(|e| panic!("test wrote outside guest memory at {addr:#x?}: {e}"));
    }

    /// Reads `len` bytes at `addr`.
    pub fn read(&self, addr: GuestAddress, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mmap
            .read_slice(&mut buf, addr)
            .unwrap_or_else(|e| panic!("test read outside guest memory at {addr:#x?}: {e}"));
        buf
    }

    /// Fills `len` bytes at `addr` with `byte`.
    pub fn fill(&self, addr: GuestAddress, byte: u8, len: usize) {
        self.write(addr, &vec![byte; len]);
    }

    /// The memory-table entries describing this memory to a backend.
    pub fn regions(&self) -> Result<Vec<VhostUserMemoryRegionInfo>> {
        self.mmap
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r).map_err(msg_err("memory region"))
            })
            .collect()
    }

    /// Translates a guest address into this process's address, as the vhost-user
    /// `SET_VRING_ADDR` message expects (frontend virtual addresses, not guest addresses).
    pub fn host_address(&self, addr: GuestAddress) -> Result<u64> {
        let region = self
            .mmap
            .find_region(addr)
            .ok_or_else(|| Error::Memory(format!("{addr:#x?} is outside guest memory")))?;
        Ok(region.as_ptr() as u64 + (addr.0 - region.start_addr().0))
    }
}

/// One buffer of a descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (`VRING_DESC_F_WRITE`).
    pub writable: bool,
}

impl Buf {
    /// A buffer the device reads (driver to device).
    pub fn readable(addr: GuestAddress, len: u32) -> Self {
        Buf {
            addr,
            len,
            writable: false,
        }
    }

    /// A buffer the device writes (device to driver).
    pub fn writable(addr: GuestAddress, len: u32) -> Self {
        Buf {
            addr,
            len,
            writable: true,
        }
    }
}

/// A used-ring entry: which chain the device completed and how many bytes it wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor index of the completed chain.
    pub id: u16,
    /// Bytes the device wrote into the chain's writable buffers.
    pub len: u32,
}

/// A split virtqueue driven by the test, in the role of the guest driver.
///
/// Layout in guest memory: descriptor table (16 bytes per entry), available ring
/// (`flags, idx, ring[size], used_event`), used ring (`flags, idx, ring[size], avail_event`).
/// With EVENT_IDX the driver asks to be notified of every used buffer (`used_event` is
/// kept at the last seen index); it always kicks, which a device must tolerate.
#[derive(Debug)]
pub struct Queue {
    index: usize,
    mem: Memory,
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    free: Vec<u16>,
    in_flight: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

impl Queue {
    fn new(index: usize, mem: &Memory, size: u16) -> Result<Self> {
        if size == 0 || !size.is_power_of_two() {
            return Err(Error::Usage(format!(
                "queue size {size} is not a power of two"
            )));
        }
        let n = usize::from(size);
        let desc = mem.alloc_aligned(16 * n, 16);
        let avail = mem.alloc_aligned(6 + 2 * n, 2);
        let used = mem.alloc_aligned(6 + 8 * n, 4);
        Ok(Queue {
            index,
            mem: mem.clone(),
            size,
            desc,
            avail,
            used,
            free: (0..size).rev().collect(),
            in_flight: HashMap::new(),
            avail_idx: 0,
            last_used: 0,
            kick: EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Io("kick eventfd", e))?,
            call: EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Io("call eventfd", e))?,
        })
    }

    /// The queue's index on the device.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Descriptors not in use by an outstanding chain.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Chains published and not yet seen in the used ring.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The ring addresses as `SET_VRING_ADDR` carries them (frontend virtual addresses).
    fn config_data(&self) -> Result<VringConfigData> {
        Ok(VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: self.mem.host_address(self.desc)?,
            used_ring_addr: self.mem.host_address(self.used)?,
            avail_ring_addr: self.mem.host_address(self.avail)?,
            log_addr: None,
        })
    }

    fn take_descriptors(&mut self, n: usize) -> Result<Vec<u16>> {
        if n == 0 {
            return Err(Error::Usage("a chain needs at least one buffer".into()));
        }
        if n > self.free.len() {
            return Err(Error::Usage(format!(
                "chain of {n} descriptors, only {} free on queue {}",
                self.free.len(),
                self.index
            )));
        }
        let at = self.free.len() - n;
        Ok(self.free.split_off(at).into_iter().rev().collect())
    }

    /// Writes descriptor `index` of the table as is: a test's way to build hostile chains
    /// (loops, addresses outside memory, wrong directions). Publish it with [`Queue::publish`].
    pub fn write_descriptor(&self, index: u16, desc: Descriptor) {
        let addr = self.desc.unchecked_add(16 * u64::from(index % self.size));
        self.mem
            .mmap
            .write_obj(desc, addr)
            .unwrap_or_else(|e| panic!("descriptor table outside guest memory: {e}"));
    }

    /// Takes `n` descriptors off the free list for a hand-written chain; they return to the
    /// free list when a used entry names `ids[0]` as its head.
    pub fn reserve(&mut self, n: usize) -> Result<Vec<u16>> {
        let ids = self.take_descriptors(n)?;
        self.in_flight.insert(ids[0], ids.clone());
        Ok(ids)
    }

    /// Writes `bufs` as a chain of descriptors and returns its head, without publishing it.
    pub fn add(&mut self, bufs: &[Buf]) -> Result<u16> {
        let ids = self.take_descriptors(bufs.len())?;
        for (i, buf) in bufs.iter().enumerate() {
            let mut flags = if buf.writable { DESC_F_WRITE } else { 0 };
            let next = ids.get(i + 1).copied().unwrap_or(0);
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            self.write_descriptor(ids[i], Descriptor::new(buf.addr.0, buf.len, flags, next));
        }
        let head = ids[0];
        self.in_flight.insert(head, ids);
        Ok(head)
    }

    /// Writes `bufs` into an indirect table in guest memory and one descriptor pointing at
    /// it (needs `VIRTIO_RING_F_INDIRECT_DESC`); returns the head, without publishing it.
    pub fn add_indirect(&mut self, bufs: &[Buf]) -> Result<u16> {
        let table = self.mem.alloc_aligned(16 * bufs.len(), 16);
        for (i, buf) in bufs.iter().enumerate() {
            let mut flags = if buf.writable { DESC_F_WRITE } else { 0 };
            let next = u16::try_from(i + 1).unwrap_or(0);
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            self.mem
                .mmap
                .write_obj(
                    Descriptor::new(buf.addr.0, buf.len, flags, next),
                    table.unchecked_add(16 * i as u64),
                )
                .unwrap_or_else(|e| panic!("indirect table outside guest memory: {e}"));
        }
        let ids = self.take_descriptors(1)?;
        let len = u32::try_from(16 * bufs.len())
            .map_err(|_| Error::Usage("indirect table too long".into()))?;
        self.write_descriptor(ids[0], Descriptor::new(table.0, len, DESC_F_INDIRECT, 0));
        self.in_flight.insert(ids[0], ids.clone());
        Ok(ids[0])
    }

    /// Makes the chain starting at `head` available to the device (does not kick).
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        let mmap = &self.mem.mmap;
        let ring = self.avail.unchecked_add(4 + 2 * slot);
        mmap.write_obj(head, ring)
            .unwrap_or_else(|e| panic!("avail ring outside guest memory: {e}"));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The ring entry must be visible before the index that publishes it (virtio 2.7.13).
        fence(Ordering::Release);
        mmap.write_obj(self.avail_idx, self.avail.unchecked_add(2))
            .unwrap_or_else(|e| panic!("avail ring outside guest memory: {e}"));
        fence(Ordering::SeqCst);
    }

    /// Notifies the device through the kick eventfd.
    pub fn kick(&self) -> Result<()> {
        self.kick
            .write(1)
            .map_err(|e| Error::Io("kicking the queue", e))
    }

    /// `add`, `publish` and `kick` in one: submits a request and returns its head.
    pub fn submit(&mut self, bufs: &[Buf]) -> Result<u16> {
        let head = self.add(bufs)?;
        self.publish(head);
        self.kick()?;
        Ok(head)
    }

    /// Puts `head` on the used ring as the device would (a test's way to play a daemon that
    /// completed a request and died before recording it elsewhere).
    pub fn write_used_as_device(&self, head: u16, len: u32) {
        let idx = self.used_idx();
        let slot = u64::from(idx % self.size);
        let mmap = &self.mem.mmap;
        mmap.write_obj(u32::from(head), self.used.unchecked_add(4 + 8 * slot))
            .and_then(|()| mmap.write_obj(len, self.used.unchecked_add(8 + 8 * slot)))
            .unwrap_or_else(|e| panic!("used ring outside guest memory: {e}"));
        fence(Ordering::Release);
        mmap.write_obj(idx.wrapping_add(1), self.used.unchecked_add(2))
            .unwrap_or_else(|e| panic!("used ring outside guest memory: {e}"));
    }

    /// The device's used index as it stands in guest memory.
    pub fn used_idx(&self) -> u16 {
        fence(Ordering::SeqCst);
        self.mem
            .mmap
            .read_obj::<u16>(self.used.unchecked_add(2))
            .unwrap_or_else(|e| panic!("used ring outside guest memory: {e}"))
    }

    /// Takes the next used entry if the device has produced one.
    pub fn poll_used(&mut self) -> Option<Used> {
        if self.used_idx() == self.last_used {
            return None;
        }
        fence(Ordering::Acquire);
        let slot = u64::from(self.last_used % self.size);
        let elem: VirtqUsedElem = self
            .mem
            .mmap
            .read_obj(self.used.unchecked_add(4 + 8 * slot))
            .unwrap_or_else(|e| panic!("used ring outside guest memory: {e}"));
        self.last_used = self.last_used.wrapping_add(1);
        // used_event: ask to be notified when the next entry is added (EVENT_IDX).
        let used_event = self.avail.unchecked_add(4 + 2 * u64::from(self.size));
        let _ = self.mem.mmap.write_obj(self.last_used, used_event);
        fence(Ordering::SeqCst);
        let id = u16::try_from(elem.id()).unwrap_or(u16::MAX);
        if let Some(ids) = self.in_flight.remove(&id) {
            self.free.extend(ids);
        }
        Some(Used {
            id,
            len: elem.len(),
        })
    }

    /// Waits up to `timeout` for the next used entry.
    pub fn wait_used(&mut self, timeout: Duration) -> Result<Used> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(used) = self.poll_used() {
                return Ok(used);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout(format!(
                    "no used buffer on queue {} within {timeout:?} ({} in flight)",
                    self.index,
                    self.in_flight.len()
                )));
            }
            self.wait_call(left.min(Duration::from_millis(100)));
        }
    }

    /// Waits for `n` used entries, in completion order.
    pub fn wait_used_n(&mut self, n: usize, timeout: Duration) -> Result<Vec<Used>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.wait_used(left) {
                Ok(u) => out.push(u),
                Err(Error::Timeout(_)) => {
                    return Err(Error::Timeout(format!(
                        "{} of {n} used buffers on queue {} within {timeout:?}",
                        out.len(),
                        self.index
                    )))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Waits up to `timeout` for the device to signal the call eventfd; consumes the signal.
    /// Returns whether it fired.
    pub fn wait_call(&self, timeout: Duration) -> bool {
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        // SAFETY: the descriptor belongs to `self.call`, which outlives this borrow: the
        // `BorrowedFd` is only used by the `poll` below, while `self` is borrowed.
        let fd = unsafe { BorrowedFd::borrow_raw(self.call.as_raw_fd()) };
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        let ready = matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0);
        if ready {
            let _ = self.call.read();
        }
        ready
    }

    /// The call eventfd (device to driver), e.g. to count interrupts.
    pub fn call_event(&self) -> &EventFd {
        &self.call
    }

    /// The kick eventfd (driver to device).
    pub fn kick_event(&self) -> &EventFd {
        &self.kick
    }
}

/// Counts `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` messages from the backend.
#[derive(Debug, Default)]
struct ConfigChanges {
    count: Mutex<usize>,
    changed: Condvar,
    requests: AtomicUsize,
}

impl VhostUserFrontendReqHandler for ConfigChanges {
    fn handle_config_change(&self) -> vhost::vhost_user::HandlerResult<u64> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut n) = self.count.lock() {
            *n += 1;
        }
        self.changed.notify_all();
        Ok(0)
    }
}

/// A connected, set-up vhost-user frontend with its guest memory and queues.
pub struct Frontend {
    vhost: VhostFrontend,
    mem: Memory,
    queues: Vec<Queue>,
    features: u64,
    offered_features: u64,
    protocol_features: VhostUserProtocolFeatures,
    config_changes: Arc<ConfigChanges>,
}

impl fmt::Debug for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frontend")
            .field("queues", &self.queues.len())
            .field("features", &format_args!("{:#x}", self.features))
            .field("protocol_features", &self.protocol_features)
            .finish_non_exhaustive()
    }
}

/// Connects to a Unix socket, retrying until `timeout` while the daemon starts.
pub fn connect_socket(path: &Path, timeout: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(Error::Io("connecting to the daemon socket", e)),
        }
    }
}

impl Frontend {
    /// Connects to the daemon at `path` and runs the whole set-up sequence.
    pub fn connect(path: impl AsRef<Path>, options: Options) -> Result<Self> {
        let stream = connect_socket(path.as_ref(), options.connect_timeout)?;
        let mut fe = Self::handshake(stream, &options)?;
        fe.setup_queues(options.num_queues, options.queue_size)?;
        Ok(fe)
    }

    /// Connects and negotiates (owner, features, protocol features, memory table, backend
    /// channel) without setting up queues; [`Frontend::setup_queues`] does the rest.
    pub fn connect_without_queues(path: impl AsRef<Path>, options: &Options) -> Result<Self> {
        let stream = connect_socket(path.as_ref(), options.connect_timeout)?;
        Self::handshake(stream, options)
    }

    fn handshake(stream: UnixStream, options: &Options) -> Result<Self> {
        Self::negotiate(stream, options, Memory::new(options.mem_size)?)
    }

    /// The handshake on `stream` with guest memory `mem` (new, or the memory of an earlier
    /// connection when reconnecting).
    fn negotiate(stream: UnixStream, options: &Options, mem: Memory) -> Result<Self> {
        let max_queues = u64::try_from(options.num_queues.max(1)).unwrap_or(1);
        let mut vhost = VhostFrontend::from_stream(stream, max_queues);
        vhost.set_owner().map_err(msg_err("SET_OWNER"))?;
        let offered = vhost.get_features().map_err(msg_err("GET_FEATURES"))?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let mut protocol_features = VhostUserProtocolFeatures::empty();
        if offered & protocol_bit != 0 {
            let offered_pf = vhost
                .get_protocol_features()
                .map_err(msg_err("GET_PROTOCOL_FEATURES"))?;
            protocol_features = offered_pf & options.protocol_features;
            vhost
                .set_protocol_features(protocol_features)
                .map_err(msg_err("SET_PROTOCOL_FEATURES"))?;
        }
        let features = (offered & options.features) | (offered & protocol_bit);
        vhost
            .set_features(features)
            .map_err(msg_err("SET_FEATURES"))?;
        if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            vhost.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
        }
        vhost
            .set_mem_table(&mem.regions()?)
            .map_err(msg_err("SET_MEM_TABLE"))?;

        let config_changes = Arc::new(ConfigChanges::default());
        if protocol_features.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            let mut handler = FrontendReqHandler::new(config_changes.clone())
                .map_err(|e| Error::Vhost("backend channel", e.into()))?;
            handler.set_reply_ack_flag(
                protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK),
            );
            let fd = handler.get_tx_raw_fd();
            vhost
                .set_backend_request_fd(&fd)
                .map_err(msg_err("SET_BACKEND_REQ_FD"))?;
            // Serve the backend's requests until it closes the channel (its connection ended).
            std::thread::Builder::new()
                .name("e2e-backend-req".into())
                .spawn(move || while handler.handle_request().is_ok() {})
                .map_err(|e| Error::Io("spawning the backend channel thread", e))?;
        }
        Ok(Frontend {
            vhost,
            mem,
            queues: Vec::new(),
            features,
            offered_features: offered,
            protocol_features,
            config_changes,
        })
    }

    /// Sets up `num` queues of `size` entries: every `SET_VRING_NUM` first, then per queue
    /// `SET_VRING_ADDR`, `SET_VRING_BASE` 0, `SET_VRING_CALL`, `SET_VRING_KICK` and (with
    /// protocol features) `SET_VRING_ENABLE` 1.
    pub fn setup_queues(&mut self, num: usize, size: u16) -> Result<()> {
        let mut num = num;
        if self
            .protocol_features
            .contains(VhostUserProtocolFeatures::MQ)
        {
            let max = self
                .vhost
                .get_queue_num()
                .map_err(msg_err("GET_QUEUE_NUM"))?;
            num = num.min(usize::try_from(max).unwrap_or(usize::MAX));
        }
        self.queues = (0..num)
            .map(|i| Queue::new(i, &self.mem, size))
            .collect::<Result<Vec<_>>>()?;
        self.start_queues()
    }

    /// Sends the ring set-up of every queue: `SET_VRING_NUM` for all, then each one's
    /// addresses, base (its used index: 0 for a new ring, where the device left off after a
    /// reconnect, as QEMU does), call and kick, and enables it.
    fn start_queues(&mut self) -> Result<()> {
        let queues = &self.queues;
        for q in queues {
            self.vhost
                .set_vring_num(q.index, q.size)
                .map_err(msg_err("SET_VRING_NUM"))?;
        }
        for q in queues {
            self.vhost
                .set_vring_addr(q.index, &q.config_data()?)
                .map_err(msg_err("SET_VRING_ADDR"))?;
            self.vhost
                .set_vring_base(q.index, q.used_idx())
                .map_err(msg_err("SET_VRING_BASE"))?;
            self.vhost
                .set_vring_call(q.index, &q.call)
                .map_err(msg_err("SET_VRING_CALL"))?;
            self.vhost
                .set_vring_kick(q.index, &q.kick)
                .map_err(msg_err("SET_VRING_KICK"))?;
            if self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
                self.vhost
                    .set_vring_enable(q.index, true)
                    .map_err(msg_err("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// `GET_INFLIGHT_FD`: asks the backend for an in-flight tracking buffer for `queues`
    /// queues of `size` entries; returns its description and file.
    pub fn get_inflight(&mut self, queues: u16, size: u16) -> Result<(VhostUserInflight, File)> {
        self.vhost
            .get_inflight_fd(&VhostUserInflight::new(0, 0, queues, size))
            .map_err(msg_err("GET_INFLIGHT_FD"))
    }

    /// `SET_INFLIGHT_FD`: hands the backend the tracking buffer of an earlier connection.
    pub fn set_inflight(&mut self, inflight: &VhostUserInflight, file: &File) -> Result<()> {
        self.vhost
            .set_inflight_fd(inflight, file.as_raw_fd())
            .map_err(msg_err("SET_INFLIGHT_FD"))
    }

    /// Reconnects to a (restarted) daemon at `path` the way QEMU's `reconnect=` does: the same
    /// guest memory and rings, the in-flight buffer (if any) handed back before the rings are
    /// set up, each ring's base at its used index.
    pub fn reconnect(
        &mut self,
        path: impl AsRef<Path>,
        options: &Options,
        inflight: Option<(&VhostUserInflight, &File)>,
    ) -> Result<()> {
        let stream = connect_socket(path.as_ref(), options.connect_timeout)?;
        let mut fresh = Self::negotiate(stream, options, self.mem.clone())?;
        fresh.queues = std::mem::take(&mut self.queues);
        *self = fresh;
        if let Some((msg, file)) = inflight {
            self.set_inflight(msg, file)?;
        }
        self.start_queues()
    }

    /// Stops queue `index` (`GET_VRING_BASE`) and returns the device's next available index.
    pub fn stop_queue(&mut self, index: usize) -> Result<u32> {
        self.vhost
            .get_vring_base(index)
            .map_err(msg_err("GET_VRING_BASE"))
    }

    /// Reads `size` bytes of the device config space at `offset` (`GET_CONFIG`).
    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>> {
        let buf = vec![0u8; size as usize];
        let (_, payload) = self
            .vhost
            .get_config(offset, size, VhostUserConfigFlags::WRITABLE, &buf)
            .map_err(msg_err("GET_CONFIG"))?;
        Ok(payload)
    }

    /// Writes the device config space at `offset` (`SET_CONFIG`).
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        self.vhost
            .set_config(offset, VhostUserConfigFlags::WRITABLE, data)
            .map_err(msg_err("SET_CONFIG"))
    }

    /// Queue `index`. Panics if it was not set up (a test bug).
    pub fn queue(&mut self, index: usize) -> &mut Queue {
        let n = self.queues.len();
        self.queues
            .get_mut(index)
            .unwrap_or_else(|| panic!("queue {index} not set up ({n} queues)"))
    }

    /// How many queues are set up.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Guest memory.
    pub fn memory(&self) -> &Memory {
        &self.mem
    }

    /// The virtio features acked (including `VHOST_USER_F_PROTOCOL_FEATURES` if offered).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The virtio features the backend offered.
    pub fn offered_features(&self) -> u64 {
        self.offered_features
    }

    /// The protocol features acked.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// Config-change notifications received on the backend request channel so far.
    pub fn config_changes(&self) -> usize {
        self.config_changes.count.lock().map(|n| *n).unwrap_or(0)
    }

    /// Waits until more than `seen` config-change notifications have arrived.
    pub fn wait_config_change(&self, seen: usize, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        let mut n = self
            .config_changes
            .count
            .lock()
            .map_err(|_| Error::Usage("config change counter poisoned".into()))?;
        while *n <= seen {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout(format!(
                    "no config-change notification within {timeout:?}"
                )));
            }
            n = self
                .config_changes
                .changed
                .wait_timeout(n, left)
                .map_err(|_| Error::Usage("config change counter poisoned".into()))?
                .0;
        }
        Ok(*n)
    }

    /// The underlying `vhost` crate frontend, to send any message by hand.
    pub fn vhost(&mut self) -> &mut VhostFrontend {
        &mut self.vhost
    }
}

/// Sends a memory table whose region claims more than its file holds (touching it past
/// the end would raise SIGBUS in the daemon), then tries to put a ring there, and reports
/// whether the daemon accepted all of it. A daemon that checks its memory table refuses the
/// table (an error reply with `REPLY_ACK`) or drops the connection; either way this returns
/// `false`.
pub fn daemon_accepts_a_region_past_its_file(socket: &Path) -> Result<bool> {
    let mut fe = Frontend::connect_without_queues(socket, &Options::default())?;
    let small = Memory::new(1 << 20)?;
    let mut regions = small.regions()?;
    regions[0].memory_size = 64 << 20;
    if fe.vhost().set_mem_table(&regions).is_err() {
        return Ok(false);
    }
    let far = VringConfigData {
        queue_max_size: 64,
        queue_size: 64,
        flags: 0,
        desc_table_addr: regions[0].userspace_addr + (32 << 20),
        used_ring_addr: regions[0].userspace_addr + (33 << 20),
        avail_ring_addr: regions[0].userspace_addr + (34 << 20),
        log_addr: None,
    };
    let accepted = fe.vhost().set_vring_num(0, 64).is_ok()
        && fe.vhost().set_vring_addr(0, &far).is_ok()
        // A message with a reply: fails if the daemon dropped the connection.
        && fe.vhost().get_features().is_ok();
    Ok(accepted)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use virtio_queue::{Queue as DeviceQueue, QueueOwnedT, QueueT};

    /// The driver side written here and virtio-queue's device side agree on the ring layout:
    /// a chain the test publishes pops out intact, and the device's used entry comes back.
    #[test]
    fn driver_and_device_agree_on_the_split_ring() {
        let mem = Memory::new(1 << 20).expect("memory");
        let mut q = Queue::new(0, &mem, 8).expect("queue");
        let mut dev = DeviceQueue::new(8).expect("device queue");
        dev.set_size(8);
        dev.set_desc_table_address(Some(q.desc.0 as u32), Some((q.desc.0 >> 32) as u32));
        dev.set_avail_ring_address(Some(q.avail.0 as u32), Some((q.avail.0 >> 32) as u32));
        dev.set_used_ring_address(Some(q.used.0 as u32), Some((q.used.0 >> 32) as u32));
        dev.set_ready(true);

        let out = mem.alloc_with(b"request");
        let inp = mem.alloc(64);
        for round in 0..20u32 {
            let head = q
                .submit(&[Buf::readable(out, 7), Buf::writable(inp, 64)])
                .expect("submit");
            let ind = q
                .add_indirect(&[Buf::readable(out, 3), Buf::writable(inp, 5)])
                .expect("indirect");
            q.publish(ind);

            let mut popped = Vec::new();
            for chain in dev.iter(mem.mmap()).expect("iter") {
                let head_index = chain.head_index();
                let descs: Vec<_> = chain.collect();
                popped.push((head_index, descs));
            }
            assert_eq!(popped.len(), 2, "round {round}");
            assert_eq!(popped[0].0, head);
            let d = &popped[0].1;
            assert_eq!(
                (d[0].addr(), d[0].len(), d[0].is_write_only()),
                (out, 7, false)
            );
            assert_eq!(
                (d[1].addr(), d[1].len(), d[1].is_write_only()),
                (inp, 64, true)
            );
            assert_eq!(popped[1].0, ind);
            let d = &popped[1].1;
            assert_eq!(d.len(), 2, "the indirect table is followed");
            assert_eq!(
                (d[1].addr(), d[1].len(), d[1].is_write_only()),
                (inp, 5, true)
            );

            dev.add_used(mem.mmap(), head, 10 + round)
                .expect("add_used");
            dev.add_used(mem.mmap(), ind, 1).expect("add_used");
            assert_eq!(
                q.poll_used(),
                Some(Used {
                    id: head,
                    len: 10 + round
                })
            );
            assert_eq!(q.poll_used(), Some(Used { id: ind, len: 1 }));
            assert_eq!(q.poll_used(), None);
            assert_eq!(
                q.free_descriptors(),
                8,
                "descriptors return to the free list"
            );
        }
    }

    #[test]
    fn wait_used_times_out_with_a_clear_message() {
        let mem = Memory::new(1 << 20).expect("memory");
        let mut q = Queue::new(3, &mem, 4).expect("queue");
        let err = q
            .wait_used(Duration::from_millis(50))
            .expect_err("nothing completes");
        assert!(err.to_string().contains("queue 3"), "{err}");
        assert!(
            Queue::new(0, &mem, 3).is_err(),
            "queue sizes are powers of two"
        );
    }

    #[test]
    fn host_address_translates_into_the_mapping() {
        let mem = Memory::new(1 << 20).expect("memory");
        let a = mem.alloc_with(b"xyz");
        let va = mem.host_address(a).expect("inside");
        let base = mem.host_address(GuestAddress(0)).expect("inside");
        assert_eq!(va - base, a.0);
        assert!(mem.host_address(GuestAddress(1 << 20)).is_err());
        assert_eq!(mem.regions().expect("regions").len(), 1);
    }
}
