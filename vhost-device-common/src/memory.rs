//! Guest memory from the frontend is untrusted too.
//!
//! vhost-user-backend maps each region the frontend sends (`SET_MEM_TABLE`,
//! `ADD_MEM_REGION`) from the file descriptor that comes with it, for the length the
//! frontend states, without checking that the file is that long. A region that reaches
//! past the end of its file maps fine and kills the daemon with `SIGBUS` at the first
//! access (vm-memory 0.18 declares `MappingPastEof` but never checks it). A backend's
//! `update_memory` calls [`refuse_unbacked`] first: a memory table with such a region is
//! replaced by an empty one (so no queue can reach it) and the frontend gets an error.
//!
//! A frontend that shrinks its file after the check can still cause a `SIGBUS`; QEMU,
//! Cloud Hypervisor and vmm-frontend never do.

use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};

use crate::{GuestMemory, GuestMemoryAtomic};

/// Checks that every file-backed region of `mem` lies within its file.
pub fn check_backing(mem: &GuestMemory) -> std::io::Result<()> {
    for region in mem.iter() {
        let Some(fo) = region.file_offset() else {
            continue;
        };
        let size = fo.file().metadata()?.len();
        let end = fo.start().checked_add(region.len());
        if end.is_none_or(|end| end > size) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "memory region at guest address {:#x}: {} bytes from offset {} of a {size}-byte file",
                    region.start_addr().0,
                    region.len(),
                    fo.start()
                ),
            ));
        }
    }
    Ok(())
}

/// For `VhostUserBackend::update_memory`: refuses a memory table whose regions are not
/// backed by their files, replacing it with an empty one so no queue can touch it.
pub fn refuse_unbacked(mem: &GuestMemoryAtomic) -> std::io::Result<()> {
    let checked = check_backing(&mem.memory());
    if let Err(e) = checked {
        log::error!("frontend sent bad guest memory, refused: {e}");
        if let Ok(guard) = mem.lock() {
            guard.replace(GuestMemory::new());
        }
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{FileOffset, GuestAddress};

    fn memory(file_len: u64, region_len: usize) -> GuestMemory {
        let file = tempfile::tempfile().expect("file");
        file.set_len(file_len).expect("size");
        GuestMemory::from_ranges_with_files([(
            GuestAddress(0),
            region_len,
            Some(FileOffset::new(file, 0)),
        )])
        .expect("mapping (not touched)")
    }

    #[test]
    fn a_region_past_the_end_of_its_file_is_refused() {
        assert!(check_backing(&memory(1 << 20, 1 << 20)).is_ok());
        let err = check_backing(&memory(1 << 20, 4 << 20)).expect_err("past EOF");
        assert!(
            err.to_string()
                .contains("4194304 bytes from offset 0 of a 1048576-byte file"),
            "{err}"
        );
        let anon = GuestMemory::from_ranges(&[(GuestAddress(0), 4096)]).expect("anonymous");
        assert!(
            check_backing(&anon).is_ok(),
            "anonymous memory has no file to check"
        );
    }

    #[test]
    fn refused_memory_is_replaced_by_an_empty_table() {
        let atomic = GuestMemoryAtomic::new(memory(4096, 1 << 20));
        assert!(refuse_unbacked(&atomic).is_err());
        assert_eq!(atomic.memory().num_regions(), 0);
        let good = GuestMemoryAtomic::new(memory(1 << 20, 1 << 20));
        assert!(refuse_unbacked(&good).is_ok());
        assert_eq!(good.memory().num_regions(), 1);
    }
}
