//! The command line (`Args`, clap) and the validated configuration (`Config`) the VMM runs.
//!
//! The library knows nothing of clap past this module: `Config` is built by
//! `TryFrom<Args>`, and every user mistake becomes one `ConfigError` line.

use std::path::PathBuf;

use clap::Parser;

/// Boot a Linux kernel under KVM and attach vhost-user device daemons over virtio-pci.
#[derive(Debug, Parser)]
#[command(name = "vmm-frontend", version)]
pub struct Args {
    /// Kernel to boot: a bzImage (e.g. /boot/vmlinuz-*) or an ELF vmlinux.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initramfs loaded next to the kernel.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u8,
    /// Guest memory size, in bytes or with a K, M or G suffix.
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    pub memory: String,
    /// A vhost-user block device: socket=PATH[,queues=N]. Repeat for several.
    #[arg(long, value_name = "socket=PATH[,queues=N]")]
    pub blk: Vec<String>,
    /// A vhost-user network device: socket=PATH[,queues=N][,mac=MAC]. Repeat for several.
    // The comment is `--help` text, where brackets mean "optional", not a rustdoc link.
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(long, value_name = "socket=PATH[,queues=N][,mac=MAC]")]
    pub net: Vec<String>,
    /// A vhost-user vsock device: socket=PATH,cid=N.
    #[arg(long, value_name = "socket=PATH,cid=N")]
    pub vsock: Option<String>,
    /// A vhost-user console device: socket=PATH. Repeat for several.
    #[arg(long, value_name = "socket=PATH")]
    pub console: Vec<String>,
    /// Where the 16550 serial console (ttyS0) goes: stdio, none or file=PATH.
    #[arg(long, value_name = "stdio|none|file=PATH", default_value = "stdio")]
    pub serial: String,
}

/// The command line used when `--cmdline` is not given.
#[cfg(not(target_arch = "aarch64"))]
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
/// The command line used when `--cmdline` is not given (the PL011 is ttyAMA0).
#[cfg(target_arch = "aarch64")]
pub const DEFAULT_CMDLINE: &str = "console=ttyAMA0 panic=-1";

/// Smallest guest memory accepted: below this the kernel cannot even unpack itself.
pub const MIN_MEMORY: u64 = 64 << 20;
/// Largest guest memory accepted.
pub const MAX_MEMORY: u64 = 64 << 30;
/// Largest number of vCPUs (the MADT's 8-bit APIC IDs, the IOAPIC ID is taken).
pub const MAX_CPUS: u8 = 254;
/// Largest number of queues (or queue pairs) a device may ask for.
pub const MAX_QUEUES: u16 = 64;

/// A user mistake on the command line, worded for the user.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--memory` could not be parsed or is out of range.
    #[error("--memory {0}: expected a size such as 512M or 2G, between 64M and 64G")]
    Memory(String),
    /// `--cpus` out of range.
    #[error("--cpus {0}: expected 1 to {MAX_CPUS}")]
    Cpus(u8),
    /// A device option is malformed.
    #[error("--{flag} {value}: {reason}")]
    Device {
        /// The flag (`blk`, `net`, ...).
        flag: &'static str,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--serial` is malformed.
    #[error("--serial {0}: expected stdio, none or file=PATH")]
    Serial(String),
}

/// The kind of a vhost-user device, which fixes its virtio device ID and queue layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// virtio-blk (device ID 2).
    Blk,
    /// virtio-net (device ID 1).
    Net,
    /// virtio-vsock (device ID 19).
    Vsock,
    /// virtio-console (device ID 3).
    Console,
}

impl DeviceKind {
    /// The command-line flag and short name of this kind.
    pub fn name(self) -> &'static str {
        match self {
            Self::Blk => "blk",
            Self::Net => "net",
            Self::Vsock => "vsock",
            Self::Console => "console",
        }
    }
}

/// One vhost-user device to attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Its kind.
    pub kind: DeviceKind,
    /// The daemon's listening socket.
    pub socket: PathBuf,
    /// Queues (blk) or queue pairs (net); 1 for the others.
    pub queues: u16,
    /// MAC address (net only).
    pub mac: Option<[u8; 6]>,
    /// Guest CID (vsock only).
    pub cid: Option<u64>,
}

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialMode {
    /// The VMM's stdin and stdout.
    Stdio,
    /// Discarded.
    None,
    /// Appended to a file.
    File(PathBuf),
}

/// The validated configuration of one VM.
#[derive(Debug, Clone)]
pub struct Config {
    /// Kernel image path.
    pub kernel: PathBuf,
    /// Initramfs path.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPU count.
    pub cpus: u8,
    /// Guest memory in bytes.
    pub memory: u64,
    /// Devices, in PCI slot order.
    pub devices: Vec<DeviceConfig>,
    /// Serial console destination.
    pub serial: SerialMode,
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        let memory = parse_size(&args.memory)
            .filter(|m| (MIN_MEMORY..=MAX_MEMORY).contains(m))
            .ok_or_else(|| ConfigError::Memory(args.memory.clone()))?;
        if args.cpus == 0 || args.cpus > MAX_CPUS {
            return Err(ConfigError::Cpus(args.cpus));
        }
        let mut devices = Vec::new();
        for v in &args.blk {
            devices.push(parse_device(DeviceKind::Blk, v)?);
        }
        for v in &args.net {
            devices.push(parse_device(DeviceKind::Net, v)?);
        }
        if let Some(v) = &args.vsock {
            devices.push(parse_device(DeviceKind::Vsock, v)?);
        }
        for v in &args.console {
            devices.push(parse_device(DeviceKind::Console, v)?);
        }
        let serial = match args.serial.as_str() {
            "stdio" => SerialMode::Stdio,
            "none" => SerialMode::None,
            s => match s.strip_prefix("file=") {
                Some(p) if !p.is_empty() => SerialMode::File(PathBuf::from(p)),
                _ => return Err(ConfigError::Serial(args.serial.clone())),
            },
        };
        Ok(Config {
            kernel: args.kernel,
            initramfs: args.initramfs,
            cmdline: args.cmdline,
            cpus: args.cpus,
            memory,
            devices,
            serial,
        })
    }
}

/// Parses `512M`, `2G`, `65536`, `64k` into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 10),
        (i, 'm' | 'M') => (&s[..i], 20),
        (i, 'g' | 'G') => (&s[..i], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1u64 << shift)
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn parse_device(kind: DeviceKind, value: &str) -> Result<DeviceConfig, ConfigError> {
    let err = |reason: &str| ConfigError::Device {
        flag: kind.name(),
        value: value.to_string(),
        reason: reason.to_string(),
    };
    let mut dev = DeviceConfig {
        kind,
        socket: PathBuf::new(),
        queues: 1,
        mac: None,
        cid: None,
    };
    for item in value.split(',') {
        let (key, val) = item
            .split_once('=')
            .ok_or_else(|| err(&format!("`{item}` is not key=value")))?;
        match (key, kind) {
            ("socket", _) if !val.is_empty() => dev.socket = PathBuf::from(val),
            ("queues", DeviceKind::Blk | DeviceKind::Net) => {
                dev.queues = val
                    .parse()
                    .ok()
                    .filter(|q| (1..=MAX_QUEUES).contains(q))
                    .ok_or_else(|| err(&format!("queues must be 1 to {MAX_QUEUES}")))?;
            }
            ("mac", DeviceKind::Net) => {
                dev.mac = Some(
                    parse_mac(val).ok_or_else(|| err("mac must look like 52:54:00:12:34:56"))?,
                );
            }
            ("cid", DeviceKind::Vsock) => {
                dev.cid = Some(
                    val.parse()
                        .ok()
                        .filter(|c| *c >= 3 && *c < u64::from(u32::MAX))
                        .ok_or_else(|| err("cid must be a number from 3 to 4294967294"))?,
                );
            }
            _ => return Err(err(&format!("unknown or empty option `{key}`"))),
        }
    }
    if dev.socket.as_os_str().is_empty() {
        return Err(err("socket=PATH is required"));
    }
    if kind == DeviceKind::Vsock && dev.cid.is_none() {
        return Err(err("cid=N is required"));
    }
    Ok(dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<Config, ConfigError> {
        let mut v = vec!["vmm-frontend", "--kernel", "/k"];
        v.extend_from_slice(extra);
        Config::try_from(Args::parse_from(v))
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("99999999999999G"), None);
    }

    #[test]
    fn defaults() {
        let c = args(&[]).expect("config");
        assert_eq!(c.memory, 512 << 20);
        assert_eq!(c.cpus, 1);
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        assert_eq!(c.serial, SerialMode::Stdio);
        assert!(c.devices.is_empty());
    }

    #[test]
    fn devices_parse_in_slot_order() {
        let c = args(&[
            "--console",
            "socket=/c",
            "--net",
            "socket=/n,queues=2,mac=52:54:00:ab:cd:ef",
            "--blk",
            "socket=/b",
            "--vsock",
            "socket=/v,cid=5",
        ])
        .expect("config");
        let kinds: Vec<_> = c.devices.iter().map(|d| d.kind).collect();
        assert_eq!(
            kinds,
            [
                DeviceKind::Blk,
                DeviceKind::Net,
                DeviceKind::Vsock,
                DeviceKind::Console
            ]
        );
        assert_eq!(c.devices[1].queues, 2);
        assert_eq!(c.devices[1].mac, Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
        assert_eq!(c.devices[2].cid, Some(5));
    }

    #[test]
    fn mistakes_are_one_line_errors() {
        for bad in [
            &["--blk", "queues=2"][..],
            &["--blk", "socket=/b,queues=0"],
            &["--blk", "socket=/b,mac=52:54:00:ab:cd:ef"],
            &["--net", "socket=/n,mac=zz"],
            &["--vsock", "socket=/v"],
            &["--vsock", "socket=/v,cid=2"],
            &["--memory", "1M"],
            &["--cpus", "0"],
            &["--serial", "tcp"],
        ] {
            let e = args(bad).expect_err("must fail").to_string();
            assert!(!e.contains('\n') && e.starts_with("--"), "{bad:?}: {e}");
        }
    }
}
