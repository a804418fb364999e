//! The image the device serves: a raw file or a block device, opened once for the daemon's
//! life and shared by every connection and worker.
//!
//! What can change while running lives in atomics: the capacity (the image may grow, see
//! [`Disk::refresh_capacity`]), the guest's write-cache mode, and whether writes since the
//! last flush may still be in the host's volatile cache.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use log::{info, warn};

use crate::config::Config;
use crate::virtio::ID_BYTES;

/// Why the image cannot be served. Every message names the image and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image does not exist.
    #[error("image {0} does not exist: create it (e.g. truncate -s 1G {0}) or fix --image")]
    Missing(PathBuf),
    /// No permission to open it.
    #[error("no permission to open image {path} {mode}: fix its permissions or pass --read-only")]
    Permission {
        /// The image.
        path: PathBuf,
        /// `for reading` or `for reading and writing`.
        mode: &'static str,
    },
    /// The filesystem refuses `O_DIRECT`.
    #[error("image {0} cannot be opened with O_DIRECT (tmpfs, for one, does not support it): drop --direct")]
    Direct(PathBuf),
    /// Neither a regular file nor a block device.
    #[error("image {0} is neither a regular file nor a block device")]
    NotAnImage(PathBuf),
    /// Its size is not a whole number of logical blocks.
    #[error("image {path} is {size} bytes, not a multiple of the {block_size}-byte logical block size: resize it (truncate -s) or change --logical-block-size")]
    Unaligned {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The logical block size.
        block_size: u32,
    },
    /// Any other failure to open or size the image.
    #[error("cannot open image {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// An open image.
#[derive(Debug)]
pub struct Disk {
    path: PathBuf,
    file: File,
    /// A second descriptor without `O_DIRECT`, for requests whose buffers are not aligned
    /// for direct I/O (the kernel keeps the page cache coherent between the two).
    buffered: Option<File>,
    block_device: bool,
    read_only: bool,
    block_size: u32,
    capacity: AtomicU64,
    writeback: AtomicBool,
    dirty: AtomicBool,
    serial: [u8; ID_BYTES],
}

fn open(path: &Path, read_only: bool, direct: bool) -> Result<File, Error> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(!read_only);
    if direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    opts.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::Missing(path.to_owned()),
        std::io::ErrorKind::PermissionDenied => Error::Permission {
            path: path.to_owned(),
            mode: if read_only {
                "for reading"
            } else {
                "for reading and writing"
            },
        },
        _ if e.raw_os_error() == Some(libc::EISDIR) => Error::NotAnImage(path.to_owned()),
        _ if direct && e.raw_os_error() == Some(libc::EINVAL) => Error::Direct(path.to_owned()),
        _ => Error::Open {
            path: path.to_owned(),
            source: e,
        },
    })
}

impl Disk {
    /// Opens the image `config` names and checks its size.
    pub fn open(config: &Config) -> Result<Self, Error> {
        let path = &config.image;
        let file = open(path, config.read_only, config.direct)?;
        let meta = file.metadata().map_err(|source| Error::Open {
            path: path.clone(),
            source,
        })?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.is_file() {
            return Err(Error::NotAnImage(path.clone()));
        }
        let buffered = if config.direct {
            Some(open(path, config.read_only, false)?)
        } else {
            None
        };
        let mut serial = [0u8; ID_BYTES];
        let n = config.serial.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&config.serial.as_bytes()[..n]);
        let disk = Disk {
            path: path.clone(),
            file,
            buffered,
            block_device,
            read_only: config.read_only,
            block_size: config.logical_block_size,
            capacity: AtomicU64::new(0),
            writeback: AtomicBool::new(!config.writethrough),
            dirty: AtomicBool::new(false),
            serial,
        };
        let size = disk.current_size().map_err(|source| Error::Open {
            path: path.clone(),
            source,
        })?;
        if size % u64::from(disk.block_size) != 0 {
            return Err(Error::Unaligned {
                path: path.clone(),
                size,
                block_size: disk.block_size,
            });
        }
        disk.capacity.store(size, Ordering::Release);
        Ok(disk)
    }

    fn current_size(&self) -> std::io::Result<u64> {
        if self.block_device {
            // The size of a block device is where its end is; the shared file offset this
            // moves is never used (all I/O is positioned).
            (&self.file).seek(SeekFrom::End(0))
        } else {
            Ok(self.file.metadata()?.len())
        }
    }

    /// Re-reads the image size. Returns the new capacity in bytes if it changed. A size
    /// that is not a multiple of the block size is rounded down (the tail is not served).
    pub fn refresh_capacity(&self) -> Option<u64> {
        let size = match self.current_size() {
            Ok(size) => size,
            Err(e) => {
                warn!("cannot re-read the size of {}: {e}", self.path.display());
                return None;
            }
        };
        let size = size - size % u64::from(self.block_size);
        let old = self.capacity.swap(size, Ordering::AcqRel);
        (old != size).then(|| {
            info!(
                "image {} is now {size} bytes (was {old})",
                self.path.display()
            );
            size
        })
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the device is read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Logical block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The serial, zero padded.
    pub fn serial(&self) -> &[u8; ID_BYTES] {
        &self.serial
    }

    /// The descriptor for I/O; `aligned` says whether the request may use `O_DIRECT`.
    pub fn fd(&self, aligned: bool) -> RawFd {
        match (&self.buffered, aligned) {
            (Some(buffered), false) => buffered.as_raw_fd(),
            _ => self.file.as_raw_fd(),
        }
    }

    /// Whether the image is open with `O_DIRECT`.
    pub fn direct(&self) -> bool {
        self.buffered.is_some()
    }

    /// Whether the guest's write cache is in writeback mode.
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    /// Sets the write-cache mode (the guest's `SET_CONFIG` of `writeback`).
    pub fn set_writeback(&self, on: bool) {
        self.writeback.store(on, Ordering::Relaxed);
    }

    /// Records that data reached the host's volatile cache.
    pub fn mark_dirty(&self) {
        // Read first: in the common case the flag is already set and the cache line stays shared.
        if !self.dirty.load(Ordering::Relaxed) {
            self.dirty.store(true, Ordering::Release);
        }
    }

    /// Whether a FLUSH has anything to do, and if so forget the dirty state (the flush that
    /// follows covers everything completed up to now). In writethrough mode every flush syncs.
    pub fn take_dirty(&self) -> bool {
        let dirty = self.dirty.swap(false, Ordering::AcqRel);
        dirty || !self.writeback()
    }

    /// Makes every completed write durable (`fdatasync`); used at shutdown.
    pub fn sync(&self) -> std::io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.dirty.store(false, Ordering::Release);
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(len: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        f.as_file().set_len(len).expect("size");
        f
    }

    #[test]
    fn opens_and_sizes_a_file() {
        let f = image(1 << 20);
        let mut c = Config::new(f.path());
        c.serial = "abc".into();
        let d = Disk::open(&c).expect("open");
        assert_eq!(d.capacity(), 1 << 20);
        assert_eq!(&d.serial()[..4], b"abc\0");
        assert_eq!(d.refresh_capacity(), None);
        f.as_file().set_len(2 << 20).expect("grow");
        assert_eq!(d.refresh_capacity(), Some(2 << 20));
        f.as_file()
            .set_len((3 << 20) + 100)
            .expect("grow unaligned");
        assert_eq!(
            d.refresh_capacity(),
            Some(3 << 20),
            "rounded down to blocks"
        );
    }

    #[test]
    fn errors_name_the_image_and_the_fix() {
        let missing = Disk::open(&Config::new("/nonexistent/x.img")).expect_err("missing");
        assert!(missing.to_string().contains("does not exist"), "{missing}");
        let f = image(4096 + 512);
        let mut c = Config::new(f.path());
        c.logical_block_size = 4096;
        let e = Disk::open(&c).expect_err("unaligned");
        assert!(
            e.to_string().contains("not a multiple of the 4096-byte"),
            "{e}"
        );
        let e = Disk::open(&Config::new("/")).expect_err("a directory");
        assert!(e.to_string().contains("neither a regular file"), "{e}");
    }

    #[test]
    fn flush_is_skipped_only_in_writeback_without_dirty_data() {
        let f = image(4096);
        let d = Disk::open(&Config::new(f.path())).expect("open");
        assert!(!d.take_dirty());
        d.mark_dirty();
        assert!(d.take_dirty());
        assert!(!d.take_dirty());
        d.set_writeback(false);
        assert!(d.take_dirty(), "writethrough always syncs");
    }
}
