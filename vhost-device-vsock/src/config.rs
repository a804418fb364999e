//! The daemon's configuration: one entry per VM, validated. Built from the command line
//! (see [`crate::cli`]) or from the peer's YAML file format; knows nothing of clap.
//!
//! ```yaml
//! vms:
//!   - guest_cid: 4
//!     socket: /tmp/vhost4.socket
//!     uds_path: /tmp/vm4.vsock
//!     tx_buffer_size: 65536
//!     queue_size: 1024
//!     groups: group1+group2
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The CID the peer assumes when none is given.
pub const DEFAULT_GUEST_CID: u64 = 3;
/// The default per-connection buffer (`buf_alloc`): 256 KiB, as Linux's own vsock sockets
/// and Firecracker's device use. The peer's 64 KiB is one packet of the largest size, so a
/// guest-to-host stream waits a whole credit round trip for every 64 KiB packet (2.5 times
/// slower in `cargo xtask bench vsock`). Memory is only held while a host reader falls
/// behind: what its socket does not take, up to this much per connection.
pub const DEFAULT_TX_BUFFER_SIZE: u32 = 256 * 1024;
/// The peer's default queue size.
pub const DEFAULT_QUEUE_SIZE: usize = 1024;
/// The group every VM is in unless told otherwise.
pub const DEFAULT_GROUP: &str = "default";

/// A configuration mistake, worded for the user.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `--vm` entry is malformed.
    #[error("--vm {entry}: {reason}")]
    VmArg {
        /// The entry as given.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A required value is missing.
    #[error("missing {0}")]
    Missing(&'static str),
    /// A CID the guest cannot have.
    #[error("guest CID {0} is invalid: CIDs 0-2 are reserved (2 is the host) and CIDs are 32-bit; use 3 or above")]
    BadCid(u64),
    /// Two VMs with one CID.
    #[error("guest CID {0} is given to more than one VM")]
    DuplicateCid(u64),
    /// Two VMs with one path.
    #[error("{what} {path} is given to more than one VM")]
    DuplicatePath {
        /// Which option.
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// A value out of range.
    #[error("{0}")]
    Range(String),
    /// The YAML file cannot be read.
    #[error("cannot read configuration file {path}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The YAML file is malformed.
    #[error("configuration file {path} is not valid")]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: serde_yaml::Error,
    },
    /// Forwarding to the host's AF_VSOCK is not available.
    #[error("forward-cid/forward-listen (forwarding to the host's AF_VSOCK) are not supported; use uds-path")]
    ForwardUnsupported,
}

/// One VM's device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// The guest's CID.
    pub guest_cid: u64,
    /// The vhost-user socket; `None` for the single-VM form served on `--fd` or a socket
    /// passed by systemd.
    pub socket: Option<PathBuf>,
    /// The hybrid-vsock path.
    pub uds_path: PathBuf,
    /// Per-connection buffer advertised to the guest (`buf_alloc`).
    pub tx_buffer_size: u32,
    /// Largest virtqueue size accepted.
    pub queue_size: usize,
    /// Sibling groups.
    pub groups: Vec<String>,
}

/// The whole daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// One entry per VM, each served on its own vhost-user socket.
    pub vms: Vec<VmConfig>,
}

/// Splits `a+b+c` into group names.
pub fn parse_groups(s: &str) -> Vec<String> {
    s.trim()
        .split('+')
        .filter(|g| !g.is_empty())
        .map(String::from)
        .collect()
}

/// Values of one VM before defaults and validation.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmParams {
    /// `guest_cid`.
    #[serde(alias = "guest-cid")]
    pub guest_cid: Option<u64>,
    /// `socket`.
    #[serde(alias = "socket-path", alias = "socket_path")]
    pub socket: Option<PathBuf>,
    /// `uds_path`.
    #[serde(alias = "uds-path")]
    pub uds_path: Option<PathBuf>,
    /// `tx_buffer_size`.
    #[serde(alias = "tx-buffer-size")]
    pub tx_buffer_size: Option<u32>,
    /// `queue_size`.
    #[serde(alias = "queue-size")]
    pub queue_size: Option<usize>,
    /// `groups`, `+`-separated.
    pub groups: Option<String>,
    /// The peer's `forward_cid` (refused here).
    #[serde(alias = "forward-cid")]
    pub forward_cid: Option<u32>,
    /// The peer's `forward_listen` (refused here).
    #[serde(alias = "forward-listen")]
    pub forward_listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    vms: Vec<VmParams>,
}

impl VmParams {
    /// Parses a `--vm key=value,...` entry (keys with `-` or `_`, as the peer accepts).
    pub fn from_vm_arg(entry: &str) -> Result<Self, Error> {
        let bad = |reason: String| Error::VmArg {
            entry: entry.to_string(),
            reason,
        };
        let mut p = VmParams::default();
        for pair in entry.trim().split(',').filter(|s| !s.is_empty()) {
            let (key, val) = pair
                .split_once('=')
                .ok_or_else(|| bad(format!("`{pair}` is not key=value")))?;
            let num = |what: &str| bad(format!("{what} `{val}` is not a number"));
            match key.replace('_', "-").as_str() {
                "guest-cid" => p.guest_cid = Some(val.parse().map_err(|_| num("guest-cid"))?),
                "socket" | "socket-path" => p.socket = Some(PathBuf::from(val)),
                "uds-path" => p.uds_path = Some(PathBuf::from(val)),
                "tx-buffer-size" => p.tx_buffer_size = Some(val.parse().map_err(|_| num("tx-buffer-size"))?),
                "queue-size" => p.queue_size = Some(val.parse().map_err(|_| num("queue-size"))?),
                "groups" => p.groups = Some(val.to_string()),
                "forward-cid" => return Err(Error::ForwardUnsupported),
                "forward-listen" => return Err(Error::ForwardUnsupported),
                _ => {
                    return Err(bad(format!(
                        "unknown key `{key}` (allowed: guest-cid, socket, uds-path, tx-buffer-size, queue-size, groups)"
                    )))
                }
            }
        }
        Ok(p)
    }

    /// Applies defaults and checks the values. `socket_required` is false only for the
    /// single-VM form, which may be served on `--fd` or a systemd socket.
    pub fn finish(self, socket_required: bool) -> Result<VmConfig, Error> {
        if self.forward_cid.is_some() || self.forward_listen.is_some() {
            return Err(Error::ForwardUnsupported);
        }
        let guest_cid = self.guest_cid.unwrap_or(DEFAULT_GUEST_CID);
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(Error::BadCid(guest_cid));
        }
        if socket_required && self.socket.is_none() {
            return Err(Error::Missing("socket (the vhost-user socket path)"));
        }
        let uds_path = self
            .uds_path
            .ok_or(Error::Missing("uds-path (the hybrid vsock socket path)"))?;
        let tx_buffer_size = self.tx_buffer_size.unwrap_or(DEFAULT_TX_BUFFER_SIZE);
        if !(4096..=(1 << 30)).contains(&tx_buffer_size) {
            return Err(Error::Range(format!(
                "tx-buffer-size {tx_buffer_size} is out of range: use 4096 to 1073741824 bytes"
            )));
        }
        let queue_size = self.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE);
        if !queue_size.is_power_of_two() || queue_size > 32768 {
            return Err(Error::Range(format!(
                "queue-size {queue_size} must be a power of two from 1 to 32768"
            )));
        }
        let groups = self
            .groups
            .as_deref()
            .map_or_else(|| vec![DEFAULT_GROUP.to_string()], parse_groups);
        Ok(VmConfig {
            guest_cid,
            socket: self.socket,
            uds_path,
            tx_buffer_size,
            queue_size,
            groups,
        })
    }
}

impl Config {
    /// Validates a set of VMs: unique CIDs and paths.
    pub fn new(vms: Vec<VmConfig>) -> Result<Self, Error> {
        if vms.is_empty() {
            return Err(Error::Missing(
                "a VM: give --uds-path and --socket-path, --vm or --config",
            ));
        }
        let mut cids = HashSet::new();
        let mut paths: HashSet<&Path> = HashSet::new();
        for vm in &vms {
            if !cids.insert(vm.guest_cid) {
                return Err(Error::DuplicateCid(vm.guest_cid));
            }
            if let Some(s) = &vm.socket {
                if !paths.insert(s) {
                    return Err(Error::DuplicatePath {
                        what: "socket",
                        path: s.clone(),
                    });
                }
            }
            if !paths.insert(&vm.uds_path) {
                return Err(Error::DuplicatePath {
                    what: "uds-path",
                    path: vm.uds_path.clone(),
                });
            }
        }
        Ok(Config { vms })
    }

    /// Parses the peer's YAML configuration text.
    pub fn from_yaml(text: &str, path: &Path) -> Result<Self, Error> {
        let file: File = serde_yaml::from_str(text).map_err(|source| Error::ParseFile {
            path: path.to_owned(),
            source,
        })?;
        let vms = file
            .vms
            .into_iter()
            .map(|p| p.finish(true))
            .collect::<Result<Vec<_>, _>>()?;
        Config::new(vms)
    }

    /// Reads and parses a YAML configuration file.
    pub fn from_yaml_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_arg_accepts_both_spellings_and_defaults() {
        let p = VmParams::from_vm_arg(
            "guest_cid=4,socket=/s,uds-path=/u,tx-buffer-size=32768,queue_size=256,groups=a+b",
        )
        .expect("valid");
        let vm = p.finish(true).expect("valid");
        assert_eq!(vm.guest_cid, 4);
        assert_eq!(vm.socket.as_deref(), Some(Path::new("/s")));
        assert_eq!(vm.uds_path, PathBuf::from("/u"));
        assert_eq!(vm.tx_buffer_size, 32768);
        assert_eq!(vm.queue_size, 256);
        assert_eq!(vm.groups, vec!["a".to_string(), "b".to_string()]);

        let vm = VmParams::from_vm_arg("socket=/s,uds-path=/u")
            .expect("valid")
            .finish(true)
            .expect("valid");
        assert_eq!(vm.guest_cid, DEFAULT_GUEST_CID);
        assert_eq!(vm.tx_buffer_size, DEFAULT_TX_BUFFER_SIZE);
        assert_eq!(vm.queue_size, DEFAULT_QUEUE_SIZE);
        assert_eq!(vm.groups, vec![DEFAULT_GROUP.to_string()]);
    }

    #[test]
    fn vm_arg_errors_name_the_problem() {
        let e = VmParams::from_vm_arg("guest-cid=x,socket=/s").expect_err("bad number");
        assert!(
            e.to_string().contains("guest-cid `x` is not a number"),
            "{e}"
        );
        let e = VmParams::from_vm_arg("colour=red").expect_err("bad key");
        assert!(e.to_string().contains("unknown key `colour`"), "{e}");
        let e = VmParams::from_vm_arg("socket").expect_err("no =");
        assert!(e.to_string().contains("not key=value"), "{e}");
        let e = VmParams::from_vm_arg("socket=/s")
            .expect("parses")
            .finish(true)
            .expect_err("no uds");
        assert!(e.to_string().contains("uds-path"), "{e}");
        let e = VmParams::from_vm_arg("uds-path=/u")
            .expect("parses")
            .finish(true)
            .expect_err("no socket");
        assert!(e.to_string().contains("socket"), "{e}");
    }

    #[test]
    fn reserved_and_oversized_cids_are_refused() {
        for cid in [0u64, 1, 2, u64::from(u32::MAX), 1 << 40] {
            let p = VmParams {
                guest_cid: Some(cid),
                socket: Some("/s".into()),
                uds_path: Some("/u".into()),
                ..VmParams::default()
            };
            assert!(matches!(p.finish(true), Err(Error::BadCid(c)) if c == cid));
        }
    }

    #[test]
    fn duplicates_are_refused() {
        let vm = |cid: u64, s: &str, u: &str| {
            VmParams::from_vm_arg(&format!("guest-cid={cid},socket={s},uds-path={u}"))
                .and_then(|p| p.finish(true))
                .expect("valid")
        };
        let e = Config::new(vec![vm(3, "/a", "/b"), vm(3, "/c", "/d")]).expect_err("dup cid");
        assert_eq!(e.to_string(), "guest CID 3 is given to more than one VM");
        let e = Config::new(vec![vm(3, "/a", "/b"), vm(4, "/a", "/d")]).expect_err("dup socket");
        assert!(e.to_string().contains("socket /a"), "{e}");
        let e = Config::new(vec![vm(3, "/a", "/b"), vm(4, "/c", "/b")]).expect_err("dup uds");
        assert!(e.to_string().contains("uds-path /b"), "{e}");
        assert!(Config::new(vec![vm(3, "/a", "/b"), vm(4, "/c", "/d")]).is_ok());
    }

    #[test]
    fn yaml_like_the_peer() {
        let text = "vms:\n  - guest_cid: 4\n    socket: /tmp/vhost4.socket\n    uds_path: /tmp/vm4.vsock\n    tx_buffer_size: 32768\n    queue_size: 256\n    groups: group1+group2\n  - socket: /tmp/vhost5.socket\n    uds_path: /tmp/vm5.vsock\n";
        let c = Config::from_yaml(text, Path::new("c.yaml")).expect("valid");
        assert_eq!(c.vms.len(), 2);
        assert_eq!(c.vms[0].guest_cid, 4);
        assert_eq!(
            c.vms[0].groups,
            vec!["group1".to_string(), "group2".to_string()]
        );
        assert_eq!(c.vms[1].guest_cid, 3);
        assert_eq!(c.vms[1].queue_size, DEFAULT_QUEUE_SIZE);

        let e = Config::from_yaml(
            "vms:\n  - socket: /s\n    uds_path: /u\n    colour: red\n",
            Path::new("c.yaml"),
        )
        .expect_err("unknown field");
        let chain = vhost_device_common::error_chain(&e);
        assert!(chain.contains("colour"), "{chain}");
    }
}
