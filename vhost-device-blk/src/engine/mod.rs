//! Executing requests against the image: one trait, two engines.
//!
//! - [`uring::Uring`]: an io_uring per worker thread. Requests from one kick are queued and
//!   submitted with one `io_uring_enter`; completions raise an eventfd that the worker's
//!   epoll watches, so many requests are in flight at once and the guest's queue depth is
//!   the depth the host sees.
//! - [`sync::Sync`]: `preadv`/`pwritev2`/`fdatasync`/`fallocate` in the worker thread, one
//!   request at a time: the fallback where io_uring is not allowed.
//!
//! Data moves directly between the image and guest memory: a request's buffers become an
//! iovec array pointing into the mapping of guest memory, and the job keeps that mapping
//! alive (it holds a reference to the memory) until the kernel is done with it.

pub mod sync;
pub mod uring;

use std::os::fd::RawFd;
use std::sync::Arc;

use vm_memory::GuestMemoryBackend;

use crate::disk::Disk;
use crate::request::Segment;
use crate::GuestMemory;

/// What a completion needs to know to finish the request on its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    /// Head descriptor of the chain.
    pub head: u16,
    /// Guest address of the status byte.
    pub status: vm_memory::GuestAddress,
    /// Bytes written into the chain on success (data and status).
    pub used_len: u32,
    /// Whether success leaves data in the host's volatile cache (a FLUSH must sync).
    pub writes: bool,
}

/// Guest buffers as an iovec array pointing into the guest memory mapping.
#[derive(Debug)]
pub struct IoVecs {
    iov: Vec<libc::iovec>,
    len: u64,
    aligned: bool,
    /// Keeps the mapping the iovecs point into alive.
    _mem: Arc<GuestMemory>,
}

// SAFETY: the pointers in `iov` point into the guest memory mapping that `_mem` keeps alive
// (mmap'd regions are only unmapped when the last `Arc` to them drops); they are plain
// addresses, valid from any thread, and only the kernel dereferences them.
unsafe impl Send for IoVecs {}

/// Why guest buffers could not become iovecs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IoVecError {
    /// A buffer is not (or no longer) inside guest memory.
    #[error("buffer {0:#x} is outside guest memory")]
    OutsideMemory(u64),
    /// More pieces than `IOV_MAX`.
    #[error("more than {0} buffer pieces")]
    TooMany(usize),
}

/// `IOV_MAX` on Linux.
pub const IOV_MAX: usize = 1024;

impl IoVecs {
    /// Translates `segs` to host iovecs. `align` is the alignment `O_DIRECT` needs; the
    /// result records whether every piece meets it.
    pub fn new(mem: &Arc<GuestMemory>, segs: &[Segment], align: u64) -> Result<Self, IoVecError> {
        let mut iov = Vec::with_capacity(segs.len());
        let mut len = 0u64;
        let mut aligned = true;
        for seg in segs {
            for slice in mem.get_slices(seg.addr, seg.len as usize) {
                let slice = slice.map_err(|_| IoVecError::OutsideMemory(seg.addr.0))?;
                if iov.len() == IOV_MAX {
                    return Err(IoVecError::TooMany(IOV_MAX));
                }
                let base = slice.ptr_guard_mut().as_ptr();
                aligned &= (base as u64) % align == 0 && (slice.len() as u64) % align == 0;
                len += slice.len() as u64;
                iov.push(libc::iovec {
                    iov_base: base.cast(),
                    iov_len: slice.len(),
                });
            }
        }
        Ok(IoVecs {
            iov,
            len,
            aligned,
            _mem: mem.clone(),
        })
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `O_DIRECT` may be used.
    pub fn aligned(&self) -> bool {
        self.aligned
    }

    /// The iovec array.
    pub fn as_slice(&self) -> &[libc::iovec] {
        &self.iov
    }

    /// Drops the first `n` bytes (after a short transfer).
    pub fn advance(&mut self, mut n: u64) {
        let mut skip = 0;
        for v in &mut self.iov {
            if n == 0 {
                break;
            }
            let take = (v.iov_len as u64).min(n);
            // take <= iov_len, which is a usize.
            let take_usize = usize::try_from(take).unwrap_or(v.iov_len);
            v.iov_base = v.iov_base.wrapping_byte_add(take_usize);
            v.iov_len -= take_usize;
            n -= take;
            self.len -= take;
            if v.iov_len == 0 {
                skip += 1;
            }
        }
        self.iov.drain(..skip);
    }
}

/// An operation on the image.
#[derive(Debug)]
pub enum Op {
    /// Read into guest buffers.
    Read {
        /// Byte offset in the image.
        offset: u64,
        /// Destination.
        iov: IoVecs,
    },
    /// Write from guest buffers; `dsync` makes it durable before completion (writethrough).
    Write {
        /// Byte offset in the image.
        offset: u64,
        /// Source.
        iov: IoVecs,
        /// `RWF_DSYNC`.
        dsync: bool,
    },
    /// `fdatasync`.
    Flush,
    /// `fallocate` with `mode` on each range (discard, write zeroes).
    Fallocate {
        /// `FALLOC_FL_*` flags.
        mode: i32,
        /// (offset, length) in bytes.
        ranges: Vec<(u64, u64)>,
    },
}

/// A request handed to an engine.
#[derive(Debug)]
pub struct Job {
    /// How to complete it.
    pub tag: Tag,
    /// What to do.
    pub op: Op,
}

/// A finished job.
#[derive(Debug, PartialEq, Eq)]
pub struct Done {
    /// The job's tag.
    pub tag: Tag,
    /// Success, or the errno it failed with.
    pub result: Result<(), i32>,
}

/// An I/O engine serving one worker thread.
pub trait Engine: Send {
    /// Accepts a job. An engine may run it at once (and report it from [`Engine::reap`]) or
    /// queue it until [`Engine::commit`].
    fn submit(&mut self, job: Job);

    /// Hands queued jobs to the kernel (one system call for the batch).
    fn commit(&mut self);

    /// Moves finished jobs into `out`.
    fn reap(&mut self, out: &mut Vec<Done>);

    /// Jobs accepted and not yet reaped.
    fn in_flight(&self) -> usize;

    /// Blocks until every accepted job has finished, moving them into `out`.
    fn drain(&mut self, out: &mut Vec<Done>);

    /// An eventfd that becomes readable when jobs finish, for the worker's epoll.
    fn completion_fd(&self) -> Option<RawFd>;

    /// The engine's name for logs.
    fn name(&self) -> &'static str;
}

/// Which descriptor of `disk` an operation uses (the buffered one when buffers are not
/// aligned for `O_DIRECT`).
pub(crate) fn fd_for(disk: &Disk, op: &Op) -> RawFd {
    match op {
        Op::Read { iov, .. } | Op::Write { iov, .. } => disk.fd(iov.aligned()),
        Op::Flush | Op::Fallocate { .. } => disk.fd(true),
    }
}

/// Creates the engine `kind` asks for, sized for queues of `queue_size` entries.
pub fn create(
    kind: crate::config::EngineKind,
    disk: &Arc<Disk>,
    queue_size: u16,
) -> Result<Box<dyn Engine>, std::io::Error> {
    use crate::config::EngineKind;
    match kind {
        EngineKind::Sync => Ok(Box::new(sync::Sync::new(disk.clone()))),
        EngineKind::IoUring => Ok(Box::new(uring::Uring::new(disk.clone(), queue_size)?)),
        EngineKind::Auto => match uring::Uring::new(disk.clone(), queue_size) {
            Ok(u) => Ok(Box::new(u)),
            Err(e) => {
                log::warn!("io_uring unavailable ({e}); using the synchronous engine");
                Ok(Box::new(sync::Sync::new(disk.clone())))
            }
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    pub(crate) fn memory() -> Arc<GuestMemory> {
        Arc::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), 1 << 20),
                (GuestAddress(1 << 20), 1 << 20),
            ])
            .expect("memory"),
        )
    }

    #[test]
    fn iovecs_span_regions_and_check_bounds() {
        let mem = memory();
        let seg = |a: u64, l: u32| Segment {
            addr: GuestAddress(a),
            len: l,
        };
        let v = IoVecs::new(&mem, &[seg((1 << 20) - 512, 1024)], 512).expect("spans two regions");
        assert_eq!((v.as_slice().len(), v.len(), v.aligned()), (2, 1024, true));
        let v = IoVecs::new(&mem, &[seg(100, 512)], 512).expect("in memory");
        assert!(!v.aligned());
        assert_eq!(
            IoVecs::new(&mem, &[seg((2 << 20) - 100, 512)], 512).expect_err("past the end"),
            IoVecError::OutsideMemory((2 << 20) - 100)
        );
        let many: Vec<_> = (0..1025).map(|i| seg(i * 16, 8)).collect();
        assert_eq!(
            IoVecs::new(&mem, &many, 1).expect_err("too many"),
            IoVecError::TooMany(IOV_MAX)
        );
    }

    #[test]
    fn advance_skips_consumed_bytes() {
        let mem = memory();
        mem.write_slice(&[1, 2, 3, 4, 5, 6], GuestAddress(0))
            .expect("write");
        let seg = |a: u64, l: u32| Segment {
            addr: GuestAddress(a),
            len: l,
        };
        let mut v = IoVecs::new(&mem, &[seg(0, 2), seg(2, 4)], 1).expect("iov");
        v.advance(3);
        assert_eq!((v.as_slice().len(), v.len()), (1, 3));
        // SAFETY: the iovec points into `mem`, alive for this test, at byte 3 of 6.
        let first = unsafe { *v.as_slice()[0].iov_base.cast::<u8>() };
        assert_eq!(first, 4);
    }
}
