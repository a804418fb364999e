//! The command line, parsed with clap and turned into a [`Config`] by `TryFrom`.

use std::path::PathBuf;

use clap::Parser;
use vhost_device_common::cli::CommonArgs;

use crate::config::{Backend, Config, ConfigError, DEFAULT_HISTORY};

/// vhost-user virtio-console daemon: the guest's consoles on stdio, a pty, TCP or a Unix
/// socket.
#[derive(Parser, Debug, Clone)]
#[command(name = "vhost-device-console", version)]
pub struct Args {
    /// The flags every daemon shares (socket, --fd, --print-capabilities).
    #[command(flatten)]
    pub common: CommonArgs,

    /// Host endpoint of the ports: stdio, pty, tcp=ADDR:PORT or unix=PATH. With several
    /// ports, port i listens on TCP port PORT+i (each on a free port for PORT 0) or on
    /// PATH.i, or gets a pty of its own. Where to connect is logged at start.
    #[arg(long, value_name = "BACKEND")]
    pub backend: Option<String>,

    /// Number of ports. More than one offers MULTIPORT: port 0 is the console (hvc0 in a
    /// Linux guest), the others are named ports (/dev/vport*).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub ports: u32,

    /// Bytes of guest output kept per port and replayed to the next client that connects.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_HISTORY)]
    pub history: usize,

    /// Append everything the guest writes (all ports) to this file.
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,

    /// Comma-separated names of the ports, sent to the guest (default console.0, console.1,
    /// ...); a Linux guest links /dev/virtio-ports/NAME to the port.
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    pub port_names: Option<Vec<String>>,
}

/// Why the command line was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// `--backend` is missing.
    #[error("no --backend given: use --backend stdio, pty, tcp=ADDR:PORT or unix=PATH")]
    NoBackend,
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl TryFrom<Args> for Config {
    type Error = ArgsError;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        let backend: Backend = args
            .backend
            .as_deref()
            .ok_or(ArgsError::NoBackend)?
            .parse()?;
        Ok(Config::new(
            backend,
            args.ports,
            args.history,
            args.log_file,
            args.port_names,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &[&str]) -> Result<Config, ArgsError> {
        let args = Args::try_parse_from(
            std::iter::once("vhost-device-console").chain(line.iter().copied()),
        )
        .expect("clap accepts the line");
        Config::try_from(args)
    }

    #[test]
    fn builds_a_config() {
        let c = parse(&[
            "--socket-path",
            "/s",
            "--backend",
            "pty",
            "--ports",
            "2",
            "--port-names",
            "a,b",
        ])
        .unwrap();
        assert_eq!(c.ports.len(), 2);
        assert_eq!(c.ports[1].name, "b");
        assert_eq!(c.history, DEFAULT_HISTORY);
    }

    #[test]
    fn says_what_is_missing() {
        let err = parse(&["--socket-path", "/s"]).unwrap_err();
        assert!(err.to_string().contains("--backend"), "{err}");
        let err = parse(&["--backend", "stdio", "--ports", "3"]).unwrap_err();
        assert!(err.to_string().contains("one port"), "{err}");
    }
}
