//! The daemon's validated configuration, independent of how it was given (the library knows
//! nothing of clap: [`crate::cli::Args`] converts into it).

use std::path::PathBuf;

use crate::virtio::ID_BYTES;

/// Largest queue size a split virtqueue may have.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Most queues a device offers (one worker thread each).
pub const MAX_QUEUES: u16 = 64;

/// Which I/O engine executes requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring if the kernel allows it, else synchronous.
    Auto,
    /// io_uring, or fail at start.
    IoUring,
    /// Synchronous `preadv`/`pwritev2` in the worker thread.
    Sync,
}

/// Everything the device needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Raw image file or block device.
    pub image: PathBuf,
    /// Serve the device read-only (`VIRTIO_BLK_F_RO`).
    pub read_only: bool,
    /// Open the image with `O_DIRECT`, bypassing the host page cache.
    pub direct: bool,
    /// Number of request queues (one worker thread each).
    pub num_queues: u16,
    /// Maximum size of each queue.
    pub queue_size: u16,
    /// The serial `GET_ID` returns (at most 20 bytes).
    pub serial: String,
    /// Logical block size the guest sees: 512 or 4096.
    pub logical_block_size: u32,
    /// I/O engine.
    pub engine: EngineKind,
    /// Start in writethrough mode (every write durable before it completes); the guest may
    /// switch modes through the config space (`VIRTIO_BLK_F_CONFIG_WCE`).
    pub writethrough: bool,
}

/// A configuration value out of range; the message tells the user what is allowed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// `--num-queues` out of range.
    #[error("--num-queues {0} is out of range: use 1 to {MAX_QUEUES}")]
    NumQueues(u16),
    /// `--queue-size` not a power of two or out of range.
    #[error("--queue-size {0} is invalid: use a power of two from 2 to {MAX_QUEUE_SIZE}")]
    QueueSize(u16),
    /// `--serial` too long.
    #[error("--serial is {0} bytes long: at most {ID_BYTES} bytes fit the virtio-blk serial")]
    Serial(usize),
    /// `--logical-block-size` not supported.
    #[error("--logical-block-size {0} is not supported: use 512 or 4096")]
    BlockSize(u32),
}

impl Config {
    /// A configuration with the defaults for `image`.
    pub fn new(image: impl Into<PathBuf>) -> Self {
        Config {
            image: image.into(),
            read_only: false,
            direct: false,
            num_queues: 1,
            queue_size: 256,
            serial: String::new(),
            logical_block_size: 512,
            engine: EngineKind::Auto,
            writethrough: false,
        }
    }

    /// Checks every value; called by the conversions that build a `Config`.
    pub fn validate(self) -> Result<Self, Error> {
        if self.num_queues == 0 || self.num_queues > MAX_QUEUES {
            return Err(Error::NumQueues(self.num_queues));
        }
        if self.queue_size < 2
            || self.queue_size > MAX_QUEUE_SIZE
            || !self.queue_size.is_power_of_two()
        {
            return Err(Error::QueueSize(self.queue_size));
        }
        if self.serial.len() > ID_BYTES {
            return Err(Error::Serial(self.serial.len()));
        }
        if !matches!(self.logical_block_size, 512 | 4096) {
            return Err(Error::BlockSize(self.logical_block_size));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Config::new("/x").validate().map(|c| c.queue_size), Ok(256));
    }

    #[test]
    fn each_bad_value_names_its_flag() {
        let bad = |f: fn(&mut Config)| {
            let mut c = Config::new("/x");
            f(&mut c);
            c.validate().expect_err("invalid").to_string()
        };
        assert!(bad(|c| c.num_queues = 0).contains("--num-queues 0"));
        assert!(bad(|c| c.num_queues = 65).contains("--num-queues"));
        assert!(bad(|c| c.queue_size = 100).contains("power of two"));
        assert!(bad(|c| c.queue_size = 1).contains("--queue-size 1"));
        assert!(bad(|c| c.serial = "x".repeat(21)).contains("21 bytes"));
        assert!(bad(|c| c.logical_block_size = 1024).contains("512 or 4096"));
    }
}
