//! In-flight request tracking in memory shared with the frontend
//! (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`), so a restarted daemon resubmits what its
//! predecessor had taken off the rings but not completed.
//!
//! The frontend asks for the buffer once (`GET_INFLIGHT_FD`), keeps it across reconnects,
//! and hands it to each new daemon (`SET_INFLIGHT_FD`) before the rings start. Its layout
//! for split rings is the one the vhost-user specification ("Inflight I/O tracking")
//! describes and libvhost-user uses, one region per queue:
//!
//! ```text
//! struct queue_region {                  // aligned to 64 bytes
//!     u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//!     struct { u8 inflight; u8 padding[5]; u16 next; u64 counter; } desc[desc_num];
//! };
//! ```
//!
//! A request is marked in flight with an increasing counter when it is taken off the
//! available ring; completing it records its head as `last_batch_head`, puts it on the used
//! ring, then clears the mark and records the used index. A daemon that died between the
//! used ring and the mark leaves `used_idx` behind the ring's: the new daemon then clears
//! `last_batch_head`'s mark. Every request still marked is resubmitted, oldest first, and
//! the ring's next available index is the used index plus their number.
//!
//! The frontend is not trusted: sizes and offsets are checked against the file before it is
//! mapped, and every access goes through `vm-memory`'s bounds-checked volatile slices.

use std::fs::File;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserInflight;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory};

/// Alignment of each queue's region.
const ALIGNMENT: u64 = 64;
/// Bytes of a queue region's header.
const HEADER: usize = 16;
/// Bytes of one descriptor's state.
const DESC_STATE: usize = 16;
/// `version` of a buffer in use; 0 means fresh (or reset by the frontend).
const VERSION: u16 = 1;

const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
const DESC_OFF_INFLIGHT: usize = 0;
const DESC_OFF_COUNTER: usize = 8;

/// Why a tracking buffer was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Queue count or size out of range.
    #[error("in-flight buffer for {num_queues} queues of {queue_size} is not what this device has ({max_queues} queues of at most {max_size})")]
    Shape {
        /// Queues asked for.
        num_queues: u16,
        /// Queue size asked for.
        queue_size: u16,
        /// Queues the device has.
        max_queues: u16,
        /// Largest queue size the device takes.
        max_size: u16,
    },
    /// The buffer is smaller than its queues need, or lies past the end of its file.
    #[error(
        "in-flight buffer of {size} bytes at offset {offset} does not fit its file or its queues"
    )]
    Size {
        /// Claimed size.
        size: u64,
        /// Claimed offset.
        offset: u64,
    },
    /// Creating, sizing or mapping the file failed.
    #[error("cannot set up the in-flight buffer")]
    Io(#[source] std::io::Error),
    /// Mapping failed.
    #[error("cannot map the in-flight buffer")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, e)
    }
}

/// Bytes one queue of `queue_size` entries takes (libvhost-user's formula, so buffers are
/// interchangeable with its back-ends).
pub fn queue_region_size(queue_size: u16) -> u64 {
    let raw = (DESC_STATE as u64) * u64::from(queue_size) + 2;
    raw.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// The mapped tracking buffer of one connection.
#[derive(Debug)]
pub struct Buffer {
    map: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
    /// Bytes of one queue's region.
    region: usize,
}

impl Buffer {
    fn check_shape(msg: &VhostUserInflight, max_queues: u16, max_size: u16) -> Result<(), Error> {
        if msg.num_queues == 0
            || msg.num_queues > max_queues
            || msg.queue_size == 0
            || msg.queue_size > max_size
        {
            return Err(Error::Shape {
                num_queues: msg.num_queues,
                queue_size: msg.queue_size,
                max_queues,
                max_size,
            });
        }
        Ok(())
    }

    fn needed(msg: &VhostUserInflight) -> u64 {
        u64::from(msg.num_queues) * queue_region_size(msg.queue_size)
    }

    /// A fresh, zeroed buffer for what `msg` asks (GET_INFLIGHT_FD): the buffer, the file to
    /// send and the reply describing it.
    pub fn create(
        msg: &VhostUserInflight,
        max_queues: u16,
        max_size: u16,
    ) -> Result<(Buffer, File, VhostUserInflight), Error> {
        Self::check_shape(msg, max_queues, max_size)?;
        let size = Self::needed(msg);
        let fd = nix::sys::memfd::memfd_create(
            c"vhost-device-blk-inflight",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .map_err(|e| Error::Io(e.into()))?;
        let file = File::from(fd);
        file.set_len(size).map_err(Error::Io)?;
        let reply = VhostUserInflight::new(size, 0, msg.num_queues, msg.queue_size);
        let mapped = file.try_clone().map_err(Error::Io)?;
        let buffer = Self::map(mapped, &reply)?;
        Ok((buffer, file, reply))
    }

    /// Maps the buffer the frontend kept (SET_INFLIGHT_FD), after checking it fits its file.
    pub fn open(
        file: File,
        msg: &VhostUserInflight,
        max_queues: u16,
        max_size: u16,
    ) -> Result<Buffer, Error> {
        Self::check_shape(msg, max_queues, max_size)?;
        let bad = || Error::Size {
            size: msg.mmap_size,
            offset: msg.mmap_offset,
        };
        let file_len = file.metadata().map_err(Error::Io)?.len();
        let end = msg.mmap_offset.checked_add(msg.mmap_size).ok_or_else(bad)?;
        if msg.mmap_size < Self::needed(msg) || end > file_len {
            return Err(bad());
        }
        Self::map(file, msg)
    }

    fn map(file: File, msg: &VhostUserInflight) -> Result<Buffer, Error> {
        let too_big = || Error::Size {
            size: msg.mmap_size,
            offset: msg.mmap_offset,
        };
        let size = usize::try_from(Self::needed(msg)).map_err(|_| too_big())?;
        let region = usize::try_from(queue_region_size(msg.queue_size)).map_err(|_| too_big())?;
        let map = MmapRegion::from_file(FileOffset::new(file, msg.mmap_offset), size)
            .map_err(Error::Map)?;
        Ok(Buffer {
            map,
            num_queues: msg.num_queues,
            queue_size: msg.queue_size,
            region,
        })
    }

    /// The tracker of queue `queue`, if the buffer covers it.
    pub fn queue(self: &Arc<Self>, queue: u16) -> Option<QueueLog> {
        (queue < self.num_queues).then(|| QueueLog {
            buffer: self.clone(),
            // queue < num_queues: inside the mapping, whose size fits a usize.
            base: usize::from(queue) * self.region,
            size: self.queue_size,
            counter: 0,
        })
    }
}

/// The in-flight log of one queue.
#[derive(Debug)]
pub struct QueueLog {
    buffer: Arc<Buffer>,
    base: usize,
    size: u16,
    counter: u64,
}

/// What a new daemon finds in a queue's log when the ring starts.
#[derive(Debug, PartialEq, Eq)]
pub struct Recovered {
    /// Heads to resubmit, oldest first.
    pub heads: Vec<u16>,
    /// Where the ring's next available index must be.
    pub next_avail: u16,
}

impl QueueLog {
    fn write<T: vm_memory::ByteValued>(&self, value: T, offset: usize) {
        // Offsets are inside the queue's region by construction; a failure would only
        // mean a smaller mapping than checked, and then the write is skipped.
        let _ = self
            .buffer
            .map
            .as_volatile_slice()
            .write_obj(value, self.base + offset);
    }

    fn read<T: vm_memory::ByteValued + Default>(&self, offset: usize) -> T {
        self.buffer
            .map
            .as_volatile_slice()
            .read_obj(self.base + offset)
            .unwrap_or_default()
    }

    fn desc(head: u16) -> usize {
        HEADER + usize::from(head) * DESC_STATE
    }

    /// Whether `head` names a descriptor of this queue.
    fn valid(&self, head: u16) -> bool {
        head < self.size
    }

    /// Reads what the previous daemon left, given the ring's used index now, and prepares
    /// the log for this one. A fresh buffer has nothing to resubmit.
    pub fn recover(&mut self, used_idx: u16) -> Recovered {
        if self.read::<u16>(OFF_VERSION) != VERSION {
            // Fresh, or reset by the frontend: start clean.
            let _ = self
                .buffer
                .map
                .get_slice(self.base, self.buffer.region)
                .map(|s| s.write_slice(&vec![0u8; s.len()], 0));
            self.write(VERSION, OFF_VERSION);
            self.write(self.size, OFF_DESC_NUM);
            self.write(used_idx, OFF_USED_IDX);
            fence(Ordering::SeqCst);
            return Recovered {
                heads: Vec::new(),
                next_avail: used_idx,
            };
        }
        if self.read::<u16>(OFF_USED_IDX) != used_idx {
            // The last completion reached the used ring but not the log.
            let last: u16 = self.read(OFF_LAST_BATCH_HEAD);
            if self.valid(last) {
                self.write(0u8, Self::desc(last) + DESC_OFF_INFLIGHT);
            }
            fence(Ordering::SeqCst);
            self.write(used_idx, OFF_USED_IDX);
        }
        let mut marked: Vec<(u64, u16)> = (0..self.size)
            .filter(|&h| self.read::<u8>(Self::desc(h) + DESC_OFF_INFLIGHT) == 1)
            .map(|h| (self.read::<u64>(Self::desc(h) + DESC_OFF_COUNTER), h))
            .collect();
        marked.sort_unstable();
        self.counter = marked.last().map_or(0, |(c, _)| *c);
        // At most `size` (a u16) heads are marked.
        let inuse = u16::try_from(marked.len()).unwrap_or(u16::MAX);
        Recovered {
            heads: marked.into_iter().map(|(_, h)| h).collect(),
            next_avail: used_idx.wrapping_add(inuse),
        }
    }

    /// Marks `head` in flight (taken off the available ring).
    pub fn begin(&mut self, head: u16) {
        if !self.valid(head) {
            return;
        }
        self.counter += 1;
        self.write(self.counter, Self::desc(head) + DESC_OFF_COUNTER);
        fence(Ordering::SeqCst);
        self.write(1u8, Self::desc(head) + DESC_OFF_INFLIGHT);
    }

    /// Before `head` goes to the used ring.
    pub fn completing(&self, head: u16) {
        if self.valid(head) {
            self.write(head, OFF_LAST_BATCH_HEAD);
            fence(Ordering::SeqCst);
        }
    }

    /// After `head` went to the used ring, which now has index `used_idx`.
    pub fn completed(&self, head: u16, used_idx: u16) {
        if !self.valid(head) {
            return;
        }
        fence(Ordering::SeqCst);
        self.write(0u8, Self::desc(head) + DESC_OFF_INFLIGHT);
        fence(Ordering::SeqCst);
        self.write(used_idx, OFF_USED_IDX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(queues: u16, size: u16) -> VhostUserInflight {
        VhostUserInflight::new(0, 0, queues, size)
    }

    #[test]
    fn region_sizes_match_libvhost_user() {
        assert_eq!(queue_region_size(256), 4160);
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(1), 64);
        // The 16-byte header always fits in the padding the formula leaves.
        for qs in 1..=1024u16 {
            assert!(queue_region_size(qs) >= 16 * u64::from(qs) + 16, "{qs}");
        }
    }

    #[test]
    fn shapes_and_sizes_are_checked() {
        assert!(matches!(
            Buffer::create(&msg(3, 128), 2, 256),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            Buffer::create(&msg(1, 512), 2, 256),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            Buffer::create(&msg(0, 128), 2, 256),
            Err(Error::Shape { .. })
        ));
        let (_, file, reply) = Buffer::create(&msg(2, 128), 2, 256).expect("create");
        assert_eq!((reply.mmap_size, reply.mmap_offset), (2 * 2112, 0));
        // Claims past the end of the file, too small, overflowing: refused before mapping.
        for (size, offset) in [(reply.mmap_size, 64), (100, 0), (u64::MAX, 2)] {
            let m = VhostUserInflight::new(size, offset, 2, 128);
            let f = file.try_clone().expect("clone");
            assert!(
                matches!(Buffer::open(f, &m, 2, 256), Err(Error::Size { .. })),
                "{size} {offset}"
            );
        }
        Buffer::open(file, &reply, 2, 256).expect("the reply's own description fits");
    }

    /// A daemon that takes requests and completes some, then "dies"; the next one finds
    /// exactly the unfinished ones, oldest first.
    #[test]
    fn a_new_daemon_finds_what_the_old_one_left() {
        let (first, file, reply) = Buffer::create(&msg(2, 8), 2, 8).expect("create");
        let first = Arc::new(first);
        let mut q = first.queue(1).expect("queue 1");
        assert!(first.queue(2).is_none());
        let fresh = q.recover(0);
        assert_eq!(
            fresh,
            Recovered {
                heads: vec![],
                next_avail: 0
            }
        );
        for head in [5, 2, 7, 0] {
            q.begin(head);
        }
        // 2 completes, then 0; used index 2.
        q.completing(2);
        q.completed(2, 1);
        q.completing(0);
        q.completed(0, 2);
        // 7 reaches the used ring (index 3) but the daemon dies before clearing its mark.
        q.completing(7);
        drop(q);
        drop(first);

        let second = Arc::new(Buffer::open(file, &reply, 2, 8).expect("open"));
        let mut q = second.queue(1).expect("queue 1");
        let found = q.recover(3);
        assert_eq!(
            found,
            Recovered {
                heads: vec![5],
                next_avail: 4
            }
        );
        // Queue 0 was never used: nothing to do there.
        let mut q0 = second.queue(0).expect("queue 0");
        assert_eq!(q0.recover(0).heads, Vec::<u16>::new());
        // Counters continue past the old ones, so order survives a second restart.
        q.begin(3);
        let again = q.recover(3);
        assert_eq!(again.heads, vec![5, 3]);
    }

    #[test]
    fn hostile_heads_are_ignored() {
        let (b, _, _) = Buffer::create(&msg(1, 4), 1, 4).expect("create");
        let b = Arc::new(b);
        let mut q = b.queue(0).expect("queue");
        q.recover(0);
        q.begin(4);
        q.begin(u16::MAX);
        q.completing(9);
        q.completed(9, 1);
        assert_eq!(q.recover(0).heads, Vec::<u16>::new());
    }
}
