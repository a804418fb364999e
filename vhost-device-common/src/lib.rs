//! Plumbing that every vhost-user device daemon of this workspace shares.
//!
//! A daemon is a device model (its `VhostUserBackend`) plus the same few chores: find the
//! listening socket (a `--socket-path`, an inherited `--fd`, or a socket passed by systemd),
//! tell systemd when it is ready, log in a way that suits a terminal or the journal, serve one
//! frontend after the other on the same listening socket, end cleanly on `SIGTERM`, and turn a
//! user's mistake into one line on stderr. Those chores live here, once.
//!
//! The device crates use it like this:
//!
//! ```no_run
//! # use vhost_device_common::{cli::CommonArgs, run_main, Error};
//! # fn serve_device(_: &CommonArgs) -> Result<(), Error> { Ok(()) }
//! # let args = CommonArgs::default();
//! std::process::exit(run_main("vhost-device-x", || serve_device(&args)));
//! ```

#![warn(missing_docs)]

pub mod capabilities;
pub mod cli;
pub mod config;
pub mod exit;
pub mod listener;
pub mod logging;
pub mod memory;
pub mod queue;
pub mod sandbox;
pub mod serve;
pub mod signals;
pub mod systemd;

use std::fmt::Write as _;

pub use exit::ExitEvents;
pub use listener::SocketListener;
pub use sandbox::{Sandbox, SeccompMode, Syscalls};
pub use serve::{serve, serve_many, Device};

/// The memory type every daemon maps the guest into.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;
/// The atomic wrapper vhost-user-backend hands to backends.
pub type GuestMemoryAtomic = vm_memory::GuestMemoryAtomic<GuestMemory>;

/// A failure that ends a daemon; `run_main` prints it as one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A mistake in how the daemon was started: the message says what to do.
    #[error("{0}")]
    Usage(String),
    /// Finding or binding the listening socket failed.
    #[error(transparent)]
    Listener(#[from] listener::Error),
    /// Setting up signal handling failed.
    #[error("cannot set up signal handling")]
    Signals(#[source] std::io::Error),
    /// Serving frontends failed.
    #[error(transparent)]
    Serve(#[from] serve::Error),
    /// A device-specific failure, already worded for the user.
    #[error("{message}")]
    Device {
        /// What went wrong, for the user.
        message: String,
        /// The cause, printed after the message.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl Error {
    /// A device error with a cause.
    pub fn device(
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Device {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// A usage error: the message tells the user what to do.
    pub fn usage(message: impl Into<String>) -> Self {
        Error::Usage(message.into())
    }
}

/// Formats an error and its chain of causes as one line: `a: b: c`.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // Transparent wrappers repeat their source's text: print it once.
        if !line.ends_with(&text) {
            let _ = write!(line, ": {text}");
        }
        source = cause.source();
    }
    line
}

/// Runs a daemon's body and turns its result into the process exit status.
///
/// An error is printed as one line, `NAME: error: ...`, to stderr (and logged, so it reaches
/// the journal under systemd); the exit status is then 1. Never a backtrace.
pub fn run_main<E>(name: &str, body: impl FnOnce() -> Result<(), E>) -> i32
where
    E: std::error::Error + 'static,
{
    match body() {
        Ok(()) => 0,
        Err(err) => {
            let line = error_chain(&err);
            if logging::is_initialized() && systemd::under_journal() {
                log::error!("{line}");
            } else {
                eprintln!("{name}: error: {line}");
            }
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_joins_causes_without_repeating() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err = Error::device("cannot open image /x.img", io);
        assert_eq!(error_chain(&err), "cannot open image /x.img: no such file");
    }
}
