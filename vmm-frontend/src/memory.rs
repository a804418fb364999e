//! Guest memory: one memfd, mapped `MAP_SHARED`, so every vhost-user daemon can map it too.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// The guest memory type of this VMM.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Failure to create guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create failed.
    #[error("cannot create the guest memory file (memfd)")]
    Memfd(#[source] std::io::Error),
    /// Sizing the memfd failed.
    #[error("cannot size the guest memory file to {0} bytes")]
    Truncate(u64, #[source] std::io::Error),
    /// A region does not fit this process' address space.
    #[error("guest memory region of {0} bytes is too large for this host")]
    TooLarge(u64),
    /// Mapping failed.
    #[error("cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

fn memfd(name: &str) -> Result<File, MemoryError> {
    let name = CString::new(name).map_err(|e| MemoryError::Memfd(e.into()))?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call; the flags are
    // plain constants. The call creates a new descriptor and touches no memory of ours.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: memfd_create just returned this descriptor to us and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Creates guest memory for `ranges` (guest address, size), all backed by one memfd at
/// consecutive offsets.
pub fn create(ranges: &[(GuestAddress, u64)]) -> Result<GuestMemory, MemoryError> {
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    let file = memfd("vmm-frontend-guest-ram")?;
    file.set_len(total)
        .map_err(|e| MemoryError::Truncate(total, e))?;
    let mut offset = 0u64;
    let mut regions = Vec::with_capacity(ranges.len());
    for &(addr, size) in ranges {
        let len = usize::try_from(size).map_err(|_| MemoryError::TooLarge(size))?;
        let file = file.try_clone().map_err(MemoryError::Memfd)?;
        regions.push((addr, len, Some(FileOffset::new(file, offset))));
        offset += size;
    }
    GuestMemoryMmap::from_ranges_with_files(regions).map_err(MemoryError::Map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn regions_share_one_file() {
        let mem = create(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 32), 1 << 20)])
            .expect("memory");
        mem.write_obj(0xabcd_u32, GuestAddress((1 << 32) + 8))
            .expect("write");
        let offsets: Vec<u64> = mem
            .iter()
            .map(|r| r.file_offset().expect("file backed").start())
            .collect();
        assert_eq!(offsets, [0, 1 << 20]);
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress((1 << 32) + 8))
                .expect("read"),
            0xabcd
        );
    }
}
