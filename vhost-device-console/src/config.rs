//! The daemon's configuration, validated from the command line (see [`crate::cli`]) but
//! independent of it: tests and other programs build a [`Config`] directly.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;

/// The most ports a device offers: with the control pair, 2 * (31 + 1) = 64 queues, all
/// served by one worker thread (vhost-user-backend takes a 64-bit queue mask per thread).
pub const MAX_PORTS: u32 = 31;
/// Default history kept per port: 64 KiB.
pub const DEFAULT_HISTORY: usize = 64 * 1024;
/// Largest history accepted per port: 64 MiB.
pub const MAX_HISTORY: usize = 64 * 1024 * 1024;

/// Why a configuration is refused. Each message tells the user what to change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `--backend` is not one of the known forms.
    #[error("unknown backend {0:?}: use stdio, pty, tcp=ADDR:PORT or unix=PATH")]
    UnknownBackend(String),
    /// `tcp=` without a usable address.
    #[error("bad TCP address {0:?}: use tcp=ADDR:PORT, e.g. tcp=127.0.0.1:4321")]
    BadTcpAddress(String),
    /// `unix=` with an empty path.
    #[error("unix= needs a path, e.g. unix=/run/console.sock")]
    EmptyUnixPath,
    /// `--ports` out of range.
    #[error("--ports must be between 1 and {MAX_PORTS}, not {0}")]
    Ports(u32),
    /// stdio serves only one port.
    #[error("the stdio backend serves one port; use pty, tcp or unix for --ports {0}")]
    StdioMultiport(u32),
    /// TCP ports past 65535.
    #[error("tcp port {port} + {ports} ports goes past 65535: choose a lower port")]
    TcpPortRange {
        /// The first port.
        port: u16,
        /// How many ports were asked for.
        ports: u32,
    },
    /// `--history` too large.
    #[error("--history {0} is larger than the {MAX_HISTORY} bytes allowed")]
    History(usize),
    /// Port names given do not match the number of ports.
    #[error("--port-names gives {given} names for {ports} ports")]
    NameCount {
        /// Names given.
        given: usize,
        /// Ports configured.
        ports: u32,
    },
    /// A port name is empty, too long or has characters a guest path cannot hold.
    #[error("bad port name {0:?}: use 1 to 64 characters from a-z A-Z 0-9 . _ -")]
    BadName(String),
}

/// The kind of host endpoint the ports are bridged to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// The daemon's own stdin/stdout (one port).
    Stdio,
    /// A new pseudo-terminal per port; its path is logged.
    Pty,
    /// A TCP listener per port, on consecutive port numbers from this address.
    Tcp(SocketAddr),
    /// A Unix socket listener per port: the path itself for one port, `PATH.i` for several.
    Unix(PathBuf),
}

impl FromStr for Backend {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "stdio" {
            return Ok(Backend::Stdio);
        }
        if s == "pty" {
            return Ok(Backend::Pty);
        }
        if let Some(addr) = s.strip_prefix("tcp=") {
            let addr = addr
                .to_socket_addrs()
                .ok()
                .and_then(|mut it| it.next())
                .ok_or_else(|| ConfigError::BadTcpAddress(addr.to_string()))?;
            return Ok(Backend::Tcp(addr));
        }
        if let Some(path) = s.strip_prefix("unix=") {
            if path.is_empty() {
                return Err(ConfigError::EmptyUnixPath);
            }
            return Ok(Backend::Unix(PathBuf::from(path)));
        }
        Err(ConfigError::UnknownBackend(s.to_string()))
    }
}

/// The endpoint of one port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// stdin/stdout.
    Stdio,
    /// A new pty.
    Pty,
    /// Listen on this TCP address.
    Tcp(SocketAddr),
    /// Listen on this Unix socket path.
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Stdio => write!(f, "stdio"),
            Endpoint::Pty => write!(f, "pty"),
            Endpoint::Tcp(a) => write!(f, "tcp {a}"),
            Endpoint::Unix(p) => write!(f, "unix {}", p.display()),
        }
    }
}

/// One port of the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    /// The port's name, sent to the guest with `PORT_NAME` (multiport only).
    pub name: String,
    /// Where its bytes go.
    pub endpoint: Endpoint,
}

/// The whole daemon configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The ports, port 0 first (port 0 is the console, `hvc0` in a Linux guest).
    pub ports: Vec<PortConfig>,
    /// Bytes of guest output kept per port for the next client.
    pub history: usize,
    /// A file every byte the guest writes is appended to (all ports).
    pub log_file: Option<PathBuf>,
}

impl Config {
    /// Builds and validates a configuration.
    pub fn new(
        backend: Backend,
        ports: u32,
        history: usize,
        log_file: Option<PathBuf>,
        names: Option<Vec<String>>,
    ) -> Result<Self, ConfigError> {
        if ports == 0 || ports > MAX_PORTS {
            return Err(ConfigError::Ports(ports));
        }
        if history > MAX_HISTORY {
            return Err(ConfigError::History(history));
        }
        let names = match names {
            Some(names) => {
                if names.len() != ports as usize {
                    return Err(ConfigError::NameCount {
                        given: names.len(),
                        ports,
                    });
                }
                for name in &names {
                    let ok = !name.is_empty()
                        && name.len() <= 64
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
                    if !ok {
                        return Err(ConfigError::BadName(name.clone()));
                    }
                }
                names
            }
            None => (0..ports).map(|i| format!("console.{i}")).collect(),
        };
        let mut out = Vec::with_capacity(names.len());
        for (i, name) in (0..ports).zip(names) {
            let endpoint = match &backend {
                Backend::Stdio if ports > 1 => return Err(ConfigError::StdioMultiport(ports)),
                Backend::Stdio => Endpoint::Stdio,
                Backend::Pty => Endpoint::Pty,
                // Port 0 asks the kernel for a free port, for every console port alike.
                Backend::Tcp(addr) if addr.port() == 0 => Endpoint::Tcp(*addr),
                Backend::Tcp(addr) => {
                    let port = u16::try_from(u32::from(addr.port()) + i).map_err(|_| {
                        ConfigError::TcpPortRange {
                            port: addr.port(),
                            ports,
                        }
                    })?;
                    let mut addr = *addr;
                    addr.set_port(port);
                    Endpoint::Tcp(addr)
                }
                Backend::Unix(path) if ports == 1 => Endpoint::Unix(path.clone()),
                Backend::Unix(path) => {
                    let mut p = path.clone().into_os_string();
                    p.push(format!(".{i}"));
                    Endpoint::Unix(PathBuf::from(p))
                }
            };
            out.push(PortConfig { name, endpoint });
        }
        Ok(Config {
            ports: out,
            history,
            log_file,
        })
    }

    /// Whether the device offers MULTIPORT (more than one port).
    pub fn multiport(&self) -> bool {
        self.ports.len() > 1
    }

    /// The number of ports as the config space reports it.
    pub fn port_count(&self) -> u32 {
        u32::try_from(self.ports.len()).unwrap_or(MAX_PORTS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_backends() {
        assert_eq!("stdio".parse(), Ok(Backend::Stdio));
        assert_eq!("pty".parse(), Ok(Backend::Pty));
        assert_eq!(
            "tcp=127.0.0.1:4000".parse(),
            Ok(Backend::Tcp("127.0.0.1:4000".parse().unwrap()))
        );
        assert_eq!(
            "unix=/tmp/c.sock".parse(),
            Ok(Backend::Unix("/tmp/c.sock".into()))
        );
        assert_eq!(
            "tcp=nonsense".parse::<Backend>(),
            Err(ConfigError::BadTcpAddress("nonsense".into()))
        );
        assert_eq!("unix=".parse::<Backend>(), Err(ConfigError::EmptyUnixPath));
        assert_eq!(
            "serial".parse::<Backend>(),
            Err(ConfigError::UnknownBackend("serial".into()))
        );
    }

    #[test]
    fn each_port_gets_its_endpoint() {
        let c = Config::new("tcp=127.0.0.1:4000".parse().unwrap(), 3, 10, None, None).unwrap();
        let eps: Vec<_> = c.ports.iter().map(|p| p.endpoint.to_string()).collect();
        assert_eq!(
            eps,
            [
                "tcp 127.0.0.1:4000",
                "tcp 127.0.0.1:4001",
                "tcp 127.0.0.1:4002"
            ]
        );
        assert!(c.multiport());
        let c = Config::new("tcp=127.0.0.1:0".parse().unwrap(), 2, 10, None, None).unwrap();
        assert_eq!(
            c.ports[1].endpoint,
            Endpoint::Tcp("127.0.0.1:0".parse().unwrap())
        );
        let c = Config::new(Backend::Unix("/r/c".into()), 2, 10, None, None).unwrap();
        assert_eq!(c.ports[1].endpoint, Endpoint::Unix("/r/c.1".into()));
        assert_eq!(c.ports[1].name, "console.1");
        let c = Config::new(Backend::Unix("/r/c".into()), 1, 10, None, None).unwrap();
        assert_eq!(c.ports[0].endpoint, Endpoint::Unix("/r/c".into()));
        assert!(!c.multiport());
    }

    #[test]
    fn refuses_bad_combinations() {
        assert_eq!(
            Config::new(Backend::Stdio, 2, 0, None, None),
            Err(ConfigError::StdioMultiport(2))
        );
        assert_eq!(
            Config::new(Backend::Pty, 0, 0, None, None),
            Err(ConfigError::Ports(0))
        );
        assert_eq!(
            Config::new(Backend::Pty, MAX_PORTS + 1, 0, None, None),
            Err(ConfigError::Ports(MAX_PORTS + 1))
        );
        assert!(matches!(
            Config::new("tcp=127.0.0.1:65535".parse().unwrap(), 2, 0, None, None),
            Err(ConfigError::TcpPortRange { .. })
        ));
        assert_eq!(
            Config::new(Backend::Pty, 2, 0, None, Some(vec!["a".into()])),
            Err(ConfigError::NameCount { given: 1, ports: 2 })
        );
        assert_eq!(
            Config::new(Backend::Pty, 1, 0, None, Some(vec!["a/b".into()])),
            Err(ConfigError::BadName("a/b".into()))
        );
        assert_eq!(
            Config::new(Backend::Pty, 1, MAX_HISTORY + 1, None, None),
            Err(ConfigError::History(MAX_HISTORY + 1))
        );
    }
}
