//! The synchronous engine: each job runs to completion in [`Engine::submit`].
//!
//! The system-call wrappers here are also what the io_uring engine falls back on to finish
//! a short transfer.

use std::os::fd::RawFd;
use std::sync::Arc;

use super::{fd_for, Done, Engine, IoVecs, Job, Op};
use crate::disk::Disk;

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// `preadv` until `iov` is full. Reading past the end of the image is an error (`EIO`).
pub(crate) fn read_all(fd: RawFd, mut offset: u64, iov: &mut IoVecs) -> Result<(), i32> {
    while !iov.is_empty() {
        let v = iov.as_slice();
        let count = i32::try_from(v.len()).map_err(|_| libc::EINVAL)?;
        let off = i64::try_from(offset).map_err(|_| libc::EINVAL)?;
        // SAFETY: `v` is a valid iovec array of `count` entries; each entry points into the
        // guest memory mapping that `iov` keeps alive, and covers only bytes inside it
        // (checked by `IoVecs::new`). The kernel writes at most those bytes.
        let n = unsafe { libc::preadv(fd, v.as_ptr(), count, off) };
        match n {
            n if n > 0 => {
                let n = n.unsigned_abs() as u64;
                iov.advance(n);
                offset += n;
            }
            0 => return Err(libc::EIO),
            _ if errno() == libc::EINTR => {}
            _ => return Err(errno()),
        }
    }
    Ok(())
}

/// `pwritev2` until all of `iov` is written; `RWF_DSYNC` with `dsync`.
pub(crate) fn write_all(
    fd: RawFd,
    mut offset: u64,
    iov: &mut IoVecs,
    dsync: bool,
) -> Result<(), i32> {
    let flags = if dsync { libc::RWF_DSYNC } else { 0 };
    while !iov.is_empty() {
        let v = iov.as_slice();
        let count = i32::try_from(v.len()).map_err(|_| libc::EINVAL)?;
        let off = i64::try_from(offset).map_err(|_| libc::EINVAL)?;
        // SAFETY: `v` is a valid iovec array of `count` entries pointing into the guest
        // memory mapping `iov` keeps alive; the kernel only reads those bytes.
        let n = unsafe { libc::pwritev2(fd, v.as_ptr(), count, off, flags) };
        match n {
            n if n > 0 => {
                let n = n.unsigned_abs() as u64;
                iov.advance(n);
                offset += n;
            }
            0 => return Err(libc::EIO),
            _ if errno() == libc::EINTR => {}
            _ => return Err(errno()),
        }
    }
    Ok(())
}

/// What a non-blocking attempt (`RWF_NOWAIT`) on a descriptor can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nowait {
    /// The file supports `RWF_NOWAIT`: try inline, hand to io_uring only what would block.
    Supported,
    /// The file does not (tmpfs, for one): io_uring would hand every request to a kernel
    /// worker thread; with data in memory a plain copy in the worker is cheaper.
    Unsupported,
}

/// Probes `fd` with a one-byte `RWF_NOWAIT` read at offset 0.
pub(crate) fn probe_nowait(fd: RawFd) -> Nowait {
    let mut byte = 0u8;
    let iov = libc::iovec {
        iov_base: std::ptr::addr_of_mut!(byte).cast(),
        iov_len: 1,
    };
    // SAFETY: one iovec pointing at `byte`, a live local of one byte; the kernel writes at
    // most that byte.
    let r = unsafe { libc::preadv2(fd, &iov, 1, 0, libc::RWF_NOWAIT) };
    if r < 0 && errno() == libc::EOPNOTSUPP {
        Nowait::Unsupported
    } else {
        Nowait::Supported
    }
}

/// One `RWF_NOWAIT` attempt: the bytes transferred without blocking (0 if it would block or
/// failed; the caller then takes the blocking path, which reports real errors).
pub(crate) fn try_nowait(fd: RawFd, offset: u64, iov: &IoVecs, write: bool) -> u64 {
    let v = iov.as_slice();
    let (Ok(count), Ok(off)) = (i32::try_from(v.len()), i64::try_from(offset)) else {
        return 0;
    };
    let n = if write {
        // SAFETY: `v` is a valid iovec array of `count` entries pointing into the guest
        // memory mapping `iov` keeps alive; the kernel only reads those bytes.
        unsafe { libc::pwritev2(fd, v.as_ptr(), count, off, libc::RWF_NOWAIT) }
    } else {
        // SAFETY: as above; the kernel writes only the bytes the iovecs cover, all inside
        // guest memory (checked by `IoVecs::new`).
        unsafe { libc::preadv2(fd, v.as_ptr(), count, off, libc::RWF_NOWAIT) }
    };
    u64::try_from(n).unwrap_or(0)
}

/// `fallocate(mode)` on each range; a filesystem that cannot zero a range in place gets
/// the zeroes written.
pub(crate) fn fallocate(fd: RawFd, mode: i32, ranges: &[(u64, u64)]) -> Result<(), i32> {
    for &(offset, len) in ranges {
        let off = i64::try_from(offset).map_err(|_| libc::EINVAL)?;
        let l = i64::try_from(len).map_err(|_| libc::EINVAL)?;
        if l == 0 {
            continue;
        }
        // SAFETY: fallocate only takes integers; `fd` is the image, open for the daemon's life.
        let r = unsafe { libc::fallocate(fd, mode, off, l) };
        if r != 0 {
            let e = errno();
            if e == libc::EOPNOTSUPP && mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
                write_zeroes(fd, offset, len)?;
            } else {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Writes zeroes over a range with plain writes (the fallback for `FALLOC_FL_ZERO_RANGE`).
fn write_zeroes(fd: RawFd, mut offset: u64, len: u64) -> Result<(), i32> {
    let zeros = vec![0u8; 1 << 20];
    let end = offset + len;
    while offset < end {
        let n = usize::try_from((end - offset).min(zeros.len() as u64)).unwrap_or(zeros.len());
        let off = i64::try_from(offset).map_err(|_| libc::EINVAL)?;
        // SAFETY: `zeros` is a live buffer of at least `n` bytes; the kernel only reads it.
        let w = unsafe { libc::pwrite(fd, zeros.as_ptr().cast(), n, off) };
        match w {
            w if w > 0 => offset += w.unsigned_abs() as u64,
            _ if errno() == libc::EINTR => {}
            _ => return Err(if w == 0 { libc::EIO } else { errno() }),
        }
    }
    Ok(())
}

/// `fdatasync`.
pub(crate) fn flush(fd: RawFd) -> Result<(), i32> {
    // SAFETY: fdatasync takes an integer descriptor, the image open for the daemon's life.
    if unsafe { libc::fdatasync(fd) } == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

/// Runs `op` on `fd` to completion.
pub(crate) fn run_on(fd: RawFd, op: &mut Op) -> Result<(), i32> {
    match op {
        Op::Read { offset, iov } => read_all(fd, *offset, iov),
        Op::Write { offset, iov, dsync } => write_all(fd, *offset, iov, *dsync),
        Op::Flush => flush(fd),
        Op::Fallocate { mode, ranges } => fallocate(fd, *mode, ranges),
    }
}

/// Whether an `EINVAL` from `O_DIRECT` I/O should be retried on the buffered descriptor:
/// the host device may need a larger alignment than the guest's block size.
pub(crate) fn retry_buffered(disk: &Disk, fd: RawFd, op: &Op, errno: i32) -> bool {
    errno == libc::EINVAL
        && disk.direct()
        && fd != disk.fd(false)
        && matches!(op, Op::Read { .. } | Op::Write { .. })
}

/// Runs `op` to completion (on the buffered descriptor if `O_DIRECT` refuses it).
pub(crate) fn execute(disk: &Disk, mut op: Op) -> Result<(), i32> {
    let fd = fd_for(disk, &op);
    match run_on(fd, &mut op) {
        Err(e) if retry_buffered(disk, fd, &op, e) => run_on(disk.fd(false), &mut op),
        r => r,
    }
}

/// The synchronous engine.
#[derive(Debug)]
pub struct Sync {
    disk: Arc<Disk>,
    done: Vec<Done>,
}

impl Sync {
    /// An engine for `disk`.
    pub fn new(disk: Arc<Disk>) -> Self {
        Sync {
            disk,
            done: Vec::new(),
        }
    }
}

impl Engine for Sync {
    fn submit(&mut self, job: Job) {
        let result = execute(&self.disk, job.op);
        self.done.push(Done {
            tag: job.tag,
            result,
        });
    }

    fn commit(&mut self) {}

    fn reap(&mut self, out: &mut Vec<Done>) {
        out.append(&mut self.done);
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn drain(&mut self, out: &mut Vec<Done>) {
        self.reap(out);
    }

    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    fn name(&self) -> &'static str {
        "sync"
    }
}
