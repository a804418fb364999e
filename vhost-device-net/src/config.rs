//! The daemon's configuration, validated, without any command-line parsing: the binary
//! builds it from its flags, tests build it directly.

use std::net::Ipv4Addr;
use std::os::fd::RawFd;

use crate::tap::HostAddr;
use crate::virtio::{MAX_MTU, MIN_MTU};

/// The most queue pairs the daemon serves (each has a worker thread and a tap queue).
pub const MAX_QUEUE_PAIRS: u16 = 16;
/// The largest split virtqueue (virtio 1.2, 2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// The default queue size, as QEMU's virtio-net.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;

/// A mistake in the configuration, worded for the user.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Not six colon-separated hex bytes, or a multicast address.
    #[error("invalid MAC address {0:?}: expected six hex bytes like 52:54:00:12:34:56, unicast")]
    BadMac(String),
    /// Queue pairs out of range.
    #[error("--queue-pairs must be between 1 and {MAX_QUEUE_PAIRS}, got {0}")]
    BadQueuePairs(u32),
    /// Queue size not a power of two in range.
    #[error("--queue-size must be a power of two between 2 and {MAX_QUEUE_SIZE}, got {0}")]
    BadQueueSize(u32),
    /// MTU out of range.
    #[error("--mtu must be between {MIN_MTU} and {MAX_MTU}, got {0}")]
    BadMtu(u32),
    /// Not `A.B.C.D/N`.
    #[error("invalid --ip {0:?}: expected an IPv4 address with prefix, like 192.168.100.1/24")]
    BadIp(String),
    /// Neither or both of `--tap` and `--tap-fd`.
    #[error("give exactly one of --tap NAME or --tap-fd FD")]
    TapSource,
    /// `--tap-fd` count differs from the queue pairs.
    #[error(
        "--tap-fd was given {fds} times but --queue-pairs is {pairs}: give one tap queue per pair"
    )]
    TapFdCount {
        /// How many descriptors.
        fds: usize,
        /// How many pairs.
        pairs: u16,
    },
    /// `--ip` needs a tap the daemon can name.
    #[error("--ip and --mtu configure a tap by name: they need --tap")]
    HostConfigNeedsName,
}

/// Where the tap comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    /// A tap by name: attached if it exists, created otherwise.
    Name(String),
    /// Already opened tap queues, one per pair (e.g. from libvirt).
    Fds(Vec<RawFd>),
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The tap.
    pub tap: TapSource,
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// Queue pairs.
    pub queue_pairs: u16,
    /// The largest queue size.
    pub queue_size: u16,
    /// The MTU offered to the guest and set on the tap.
    pub mtu: Option<u16>,
    /// The host side's address, set on the tap with the link brought up.
    pub host_addr: Option<HostAddr>,
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with `-`), refusing multicast addresses.
pub fn parse_mac(text: &str) -> Result<[u8; 6], ConfigError> {
    let bad = || ConfigError::BadMac(text.to_string());
    let mut mac = [0u8; 6];
    let mut parts = text.split([':', '-']);
    for byte in &mut mac {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 {
        return Err(bad());
    }
    Ok(mac)
}

/// Formats a MAC address.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A random locally administered unicast MAC address, for when none is given.
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most `mac.len()` bytes into the live, writable `mac`.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if usize::try_from(n).ok() != Some(mac.len()) {
        // No entropy: derive from the process id and time, still locally administered.
        let seed = u64::from(std::process::id())
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() ^ u64::from(d.subsec_nanos()))
                .unwrap_or(0);
        mac.copy_from_slice(&seed.to_le_bytes()[..6]);
    }
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

/// Parses `A.B.C.D/N`.
pub fn parse_host_addr(text: &str) -> Result<HostAddr, ConfigError> {
    let bad = || ConfigError::BadIp(text.to_string());
    let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    if prefix > 32 {
        return Err(bad());
    }
    Ok(HostAddr { addr, prefix })
}

/// The raw values a user gave, before validation.
#[derive(Debug, Clone, Default)]
pub struct RawConfig {
    /// `--tap`.
    pub tap: Option<String>,
    /// `--tap-fd`, repeated.
    pub tap_fds: Vec<RawFd>,
    /// `--mac`.
    pub mac: Option<String>,
    /// `--queue-pairs`.
    pub queue_pairs: u32,
    /// `--queue-size`.
    pub queue_size: u32,
    /// `--mtu`.
    pub mtu: Option<u32>,
    /// `--ip`.
    pub ip: Option<String>,
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        let queue_pairs = u16::try_from(raw.queue_pairs)
            .ok()
            .filter(|p| (1..=MAX_QUEUE_PAIRS).contains(p))
            .ok_or(ConfigError::BadQueuePairs(raw.queue_pairs))?;
        let queue_size = u16::try_from(raw.queue_size)
            .ok()
            .filter(|s| s.is_power_of_two() && *s >= 2 && *s <= MAX_QUEUE_SIZE)
            .ok_or(ConfigError::BadQueueSize(raw.queue_size))?;
        let mtu = raw
            .mtu
            .map(|m| {
                u16::try_from(m)
                    .ok()
                    .filter(|m| (MIN_MTU..=MAX_MTU).contains(m))
                    .ok_or(ConfigError::BadMtu(m))
            })
            .transpose()?;
        let tap = match (raw.tap, raw.tap_fds.is_empty()) {
            (Some(name), true) => TapSource::Name(name),
            (None, false) => {
                if raw.tap_fds.len() != usize::from(queue_pairs) {
                    return Err(ConfigError::TapFdCount {
                        fds: raw.tap_fds.len(),
                        pairs: queue_pairs,
                    });
                }
                TapSource::Fds(raw.tap_fds)
            }
            _ => return Err(ConfigError::TapSource),
        };
        let host_addr = raw.ip.as_deref().map(parse_host_addr).transpose()?;
        if matches!(tap, TapSource::Fds(_)) && (host_addr.is_some() || mtu.is_some()) {
            return Err(ConfigError::HostConfigNeedsName);
        }
        let mac = match raw.mac {
            Some(text) => parse_mac(&text)?,
            None => random_mac(),
        };
        Ok(Config {
            tap,
            mac,
            queue_pairs,
            queue_size,
            mtu,
            host_addr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> RawConfig {
        RawConfig {
            tap: Some("vdn0".into()),
            queue_pairs: 1,
            queue_size: 256,
            ..RawConfig::default()
        }
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56"),
            Ok([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        assert_eq!(
            parse_mac("52-54-00-12-34-5f"),
            Ok([0x52, 0x54, 0, 0x12, 0x34, 0x5f])
        );
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "zz:54:00:12:34:56",
            "01:00:5e:00:00:01",
            "5:54:00:12:34:56",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        let r = random_mac();
        assert_eq!(r[0] & 0x03, 0x02, "locally administered unicast");
        assert_eq!(
            format_mac(&[0x52, 0x54, 0, 0xab, 0xcd, 0xef]),
            "52:54:00:ab:cd:ef"
        );
    }

    #[test]
    fn host_addrs() {
        assert_eq!(
            parse_host_addr("10.0.0.1/24"),
            Ok(HostAddr {
                addr: Ipv4Addr::new(10, 0, 0, 1),
                prefix: 24
            })
        );
        for bad in ["10.0.0.1", "10.0.0.1/33", "10.0.0/24", "x/24"] {
            assert!(parse_host_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn counts_are_validated() {
        let mut r = raw();
        r.queue_pairs = 0;
        assert_eq!(Config::try_from(r), Err(ConfigError::BadQueuePairs(0)));
        let mut r = raw();
        r.queue_pairs = 17;
        assert_eq!(Config::try_from(r), Err(ConfigError::BadQueuePairs(17)));
        let mut r = raw();
        r.queue_size = 100;
        assert_eq!(Config::try_from(r), Err(ConfigError::BadQueueSize(100)));
        let mut r = raw();
        r.queue_size = 65536;
        assert_eq!(Config::try_from(r), Err(ConfigError::BadQueueSize(65536)));
        let mut r = raw();
        r.mtu = Some(67);
        assert_eq!(Config::try_from(r), Err(ConfigError::BadMtu(67)));
        let mut r = raw();
        r.mtu = Some(9000);
        r.mac = Some("52:54:00:00:00:01".into());
        let c = Config::try_from(r).expect("valid");
        assert_eq!(c.mtu, Some(9000));
        assert_eq!(c.mac, [0x52, 0x54, 0, 0, 0, 1]);
    }

    #[test]
    fn tap_source_rules() {
        let mut r = raw();
        r.tap_fds = vec![3];
        assert_eq!(Config::try_from(r), Err(ConfigError::TapSource));
        let mut r = raw();
        r.tap = None;
        assert_eq!(Config::try_from(r), Err(ConfigError::TapSource));
        let mut r = raw();
        r.tap = None;
        r.tap_fds = vec![3, 4];
        assert_eq!(
            Config::try_from(r),
            Err(ConfigError::TapFdCount { fds: 2, pairs: 1 })
        );
        let mut r = raw();
        r.tap = None;
        r.tap_fds = vec![3];
        r.ip = Some("10.0.0.1/24".into());
        assert_eq!(Config::try_from(r), Err(ConfigError::HostConfigNeedsName));
    }
}
