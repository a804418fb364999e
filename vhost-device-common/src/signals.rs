//! Termination and reload signals, read synchronously from a `signalfd`.
//!
//! `SIGTERM`, `SIGINT` and `SIGHUP` are blocked in the calling thread before any other thread
//! starts (threads inherit the mask), so they are never delivered asynchronously and the
//! main thread reads them at a point where it can act on them safely.

use std::os::fd::{AsFd, BorrowedFd};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// What the daemon was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `SIGTERM` or `SIGINT`: finish and exit.
    Terminate(Signal),
    /// `SIGHUP`: re-read what can change (e.g. the image size).
    Reload,
}

/// The daemon's signal source.
#[derive(Debug)]
pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    /// Blocks the handled signals in this thread and opens a signalfd for them. Call it
    /// before spawning threads.
    pub fn block() -> std::io::Result<Self> {
        let mut set = SigSet::empty();
        set.add(Signal::SIGTERM);
        set.add(Signal::SIGINT);
        set.add(Signal::SIGHUP);
        set.thread_block().map_err(std::io::Error::from)?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .map_err(std::io::Error::from)?;
        Ok(Signals { fd })
    }

    /// Reads one pending signal, if any.
    pub fn read(&self) -> std::io::Result<Option<Request>> {
        match self.fd.read_signal() {
            Ok(Some(info)) => {
                let signal = i32::try_from(info.ssi_signo)
                    .ok()
                    .and_then(|n| Signal::try_from(n).ok());
                Ok(match signal {
                    Some(Signal::SIGHUP) => Some(Request::Reload),
                    Some(s) => Some(Request::Terminate(s)),
                    None => None,
                })
            }
            Ok(None) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl AsFd for Signals {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
