//! The command line: clap derive, doc comments as help, converted into a [`Config`].

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use vhost_device_common::cli::CommonArgs;

use crate::config::{self, Config, EngineKind};

/// Serve a raw disk image or block device to a virtual machine as a virtio-blk device over
/// vhost-user.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "vhost-device-blk",
    version,
    after_help = "Example:\n  vhost-device-blk --socket-path /run/vm1/disk.sock --image /var/lib/vm1/disk.raw --num-queues 2\n\n\
Then attach it in QEMU with\n  -chardev socket,id=disk,path=/run/vm1/disk.sock -device vhost-user-blk-pci,chardev=disk,num-queues=2\n\
(guest memory must be shared: -object memory-backend-memfd,id=mem,size=1G,share=on -machine memory-backend=mem).\n\
SIGHUP re-reads the image size and tells the guest when it grew."
)]
pub struct Args {
    /// The flags every daemon shares (socket, --fd, --print-capabilities).
    #[command(flatten)]
    pub common: CommonArgs,

    /// Raw disk image file or block device to serve (`--blk-file` is QEMU's name for it).
    #[arg(long, value_name = "PATH", visible_alias = "blk-file")]
    pub image: Option<PathBuf>,

    /// Serve the disk read-only: the guest sees a read-only device and writes fail.
    #[arg(long)]
    pub read_only: bool,

    /// Open the image with O_DIRECT, bypassing the host page cache.
    #[arg(long)]
    pub direct: bool,

    /// Number of request queues, each served by its own thread.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub num_queues: u16,

    /// Maximum number of entries per queue (a power of two).
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub queue_size: u16,

    /// Serial number the guest reads (/sys/block/vdX/serial), at most 20 bytes.
    #[arg(long, value_name = "ID", default_value = "")]
    pub serial: String,

    /// Logical block size the guest sees, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 512)]
    pub logical_block_size: u32,

    /// I/O engine: io-uring (many requests in flight per queue) or sync. Default: io-uring
    /// where the kernel allows it, sync otherwise.
    #[arg(long, value_enum)]
    pub engine: Option<Engine>,

    /// Start with the write cache in writethrough mode: each write is on stable storage
    /// before the guest sees it complete (the guest may switch to writeback).
    #[arg(long)]
    pub writethrough: bool,
}

/// `--engine` values.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Linux io_uring.
    IoUring,
    /// Synchronous system calls.
    Sync,
}

/// Why the command line does not make a configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No `--image`.
    #[error("no image to serve: pass --image PATH (a raw image file or a block device)")]
    NoImage,
    /// A value out of range.
    #[error(transparent)]
    Invalid(#[from] config::Error),
}

impl TryFrom<Args> for Config {
    type Error = Error;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        let image = args.image.ok_or(Error::NoImage)?;
        Config {
            image,
            read_only: args.read_only,
            direct: args.direct,
            num_queues: args.num_queues,
            queue_size: args.queue_size,
            serial: args.serial,
            logical_block_size: args.logical_block_size,
            engine: match args.engine {
                None => EngineKind::Auto,
                Some(Engine::IoUring) => EngineKind::IoUring,
                Some(Engine::Sync) => EngineKind::Sync,
            },
            writethrough: args.writethrough,
        }
        .validate()
        .map_err(Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let args =
            Args::try_parse_from(std::iter::once("vhost-device-blk").chain(args.iter().copied()))
                .map_err(|e| e.to_string())?;
        Config::try_from(args).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_fit_the_common_case() {
        let c = parse(&["--socket-path", "/s", "--image", "/i"]).expect("valid");
        assert_eq!(c, Config::new("/i"));
    }

    #[test]
    fn every_flag_reaches_the_config() {
        let c = parse(&[
            "--image",
            "/i",
            "--read-only",
            "--direct",
            "--num-queues",
            "4",
            "--queue-size",
            "128",
            "--serial",
            "disk-1",
            "--logical-block-size",
            "4096",
            "--engine",
            "sync",
            "--writethrough",
        ])
        .expect("valid");
        assert!(c.read_only && c.direct && c.writethrough);
        assert_eq!(
            (c.num_queues, c.queue_size, c.logical_block_size),
            (4, 128, 4096)
        );
        assert_eq!((c.serial.as_str(), c.engine), ("disk-1", EngineKind::Sync));
    }

    #[test]
    fn qemu_backend_convention_names_work() {
        let c = parse(&["--fd", "3", "--blk-file", "/i", "--read-only"]).expect("valid");
        assert_eq!((c.image.to_str(), c.read_only), (Some("/i"), true));
    }

    #[test]
    fn config_files_set_every_option() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("blk.toml");
        std::fs::write(
            &file,
            "socket-path = \"/s\"\nimage = \"/i\"\nnum-queues = 4\nread-only = true\n",
        )
        .expect("write");
        let args: Args = vhost_device_common::config::try_parse_from([
            "vhost-device-blk",
            "--config",
            file.to_str().expect("utf-8"),
            "--num-queues",
            "2",
        ])
        .expect("parses");
        let c = Config::try_from(args).expect("valid");
        assert_eq!(
            (c.num_queues, c.read_only),
            (2, true),
            "the command line wins"
        );
    }

    #[test]
    fn mistakes_say_what_to_do() {
        assert!(parse(&["--socket-path", "/s"])
            .expect_err("no image")
            .contains("--image PATH"));
        assert!(parse(&["--image", "/i", "--queue-size", "3"])
            .expect_err("bad size")
            .contains("power of two"));
        assert!(parse(&["--image", "/i", "--engine", "aio"]).is_err());
    }
}
