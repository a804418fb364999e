//! A port's host side, shared by the worker thread that serves the guest's queues and the
//! port's endpoint thread that serves the host client. It outlives frontend connections:
//! the history, the client and input not yet read by the guest stay when a VMM reconnects.
//!
//! Bytes flow through two bounded buffers. Guest output goes to the history (always), the
//! log file (if any) and, while a client is attached, to `to_client`; the worker stops taking
//! transmit buffers while `to_client` is full, so a slow client slows the guest down instead
//! of growing memory. Host input goes to `to_guest`; the endpoint thread stops reading the
//! client while it is full, so a guest that does not read stops the client (back-pressure).
//! Each side wakes the other through an eventfd.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::config::Endpoint;
use crate::history::History;

/// Host input buffered for the guest before the endpoint thread stops reading the client.
pub const INPUT_LIMIT: usize = 64 * 1024;
/// Guest output buffered for the client before the worker stops taking transmit buffers.
pub const OUTPUT_LIMIT: usize = 256 * 1024;
/// Hard bound of the client buffer: one more transmit chain may overshoot `OUTPUT_LIMIT`,
/// bytes past this bound are dropped for the client (they stay in the history and log).
pub const OUTPUT_HARD_LIMIT: usize = OUTPUT_LIMIT + 1024 * 1024;

/// The host-side state of a port.
#[derive(Debug)]
pub struct PortState {
    /// The last bytes the guest wrote.
    pub history: History,
    /// Guest output not yet written to the client.
    pub to_client: VecDeque<u8>,
    /// Host input not yet given to the guest.
    pub to_guest: VecDeque<u8>,
    /// Whether a client is attached (always for stdio).
    pub attached: bool,
    /// The terminal size, columns and rows, when the endpoint has one.
    pub size: Option<(u16, u16)>,
    /// Bumped on every resize, so each connection notices changes it has not sent.
    pub size_generation: u64,
}

/// One port: its configuration, shared state and wake-up events.
#[derive(Debug)]
pub struct Port {
    /// Port number, 0 is the console.
    pub id: u32,
    /// The name sent to the guest.
    pub name: String,
    /// Where the port's bytes go.
    pub endpoint: Endpoint,
    state: Mutex<PortState>,
    /// Wakes the worker: input arrived, output room, attach/detach, resize.
    pub guest_wake: EventFd,
    /// Wakes the endpoint thread: output arrived, input room.
    pub host_wake: EventFd,
    log: Option<Arc<LogFile>>,
}

/// The `--log-file`, shared by all ports.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    file: Mutex<File>,
    failed: AtomicBool,
}

impl LogFile {
    /// Opens `path` for appending, creating it if needed.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Ok(LogFile {
            path: path.to_owned(),
            file: Mutex::new(Self::open_file(path)?),
            failed: AtomicBool::new(false),
        })
    }

    fn open_file(path: &Path) -> std::io::Result<File> {
        File::options().create(true).append(true).open(path)
    }

    /// Opens the path again (`SIGHUP`, after logrotate moved the file away); on failure
    /// the old file stays in use.
    pub fn reopen(&self) {
        match Self::open_file(&self.path) {
            Ok(new) => {
                if let Ok(mut f) = self.file.lock() {
                    *f = new;
                }
                self.failed.store(false, Ordering::Relaxed);
                log::info!("log file {} reopened", self.path.display());
            }
            Err(e) => log::error!("cannot reopen log file {}: {e}", self.path.display()),
        }
    }

    fn append(&self, data: &[u8]) {
        let result = match self.file.lock() {
            Ok(mut f) => f.write_all(data),
            Err(_) => return,
        };
        if let Err(e) = result {
            if !self.failed.swap(true, Ordering::Relaxed) {
                log::error!("cannot append guest output to the log file: {e}");
            }
        }
    }
}

impl Port {
    /// A port with an empty history of `history` bytes.
    pub fn new(
        id: u32,
        name: String,
        endpoint: Endpoint,
        history: usize,
        log: Option<Arc<LogFile>>,
    ) -> std::io::Result<Self> {
        Ok(Port {
            id,
            name,
            endpoint,
            state: Mutex::new(PortState {
                history: History::new(history),
                to_client: VecDeque::new(),
                to_guest: VecDeque::new(),
                attached: false,
                size: None,
                size_generation: 0,
            }),
            guest_wake: EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?,
            host_wake: EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?,
            log,
        })
    }

    /// The state, also after a thread panicked while holding it (the buffers stay usable).
    pub fn lock(&self) -> MutexGuard<'_, PortState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wake_guest(&self) {
        let _ = self.guest_wake.write(1);
    }

    fn wake_host(&self) {
        let _ = self.host_wake.write(1);
    }

    // ---- The worker's side ----

    /// Whether the worker may take another transmit buffer.
    pub fn output_room(&self) -> bool {
        let s = self.lock();
        !s.attached || s.to_client.len() < OUTPUT_LIMIT
    }

    /// Records bytes the guest wrote. Returns how many were dropped for the client because
    /// its buffer hit the hard bound (they are still in the history and the log).
    pub fn guest_output(&self, data: &[u8]) -> usize {
        if data.is_empty() {
            return 0;
        }
        if let Some(log) = &self.log {
            log.append(data);
        }
        let mut s = self.lock();
        s.history.push(data);
        if !s.attached {
            return 0;
        }
        let room = OUTPUT_HARD_LIMIT.saturating_sub(s.to_client.len());
        let take = data.len().min(room);
        s.to_client.extend(&data[..take]);
        drop(s);
        self.wake_host();
        data.len() - take
    }

    /// Whether host input waits for the guest.
    pub fn has_input(&self) -> bool {
        !self.lock().to_guest.is_empty()
    }

    /// Gives at most `max` bytes of host input to `write`, which returns how many it took.
    pub fn take_input(&self, max: usize, write: impl FnOnce(&[u8]) -> usize) -> usize {
        let mut s = self.lock();
        let n = s.to_guest.len().min(max);
        if n == 0 {
            return 0;
        }
        let bytes: Vec<u8> = s.to_guest.iter().take(n).copied().collect();
        let taken = write(&bytes).min(n);
        s.to_guest.drain(..taken);
        drop(s);
        if taken > 0 {
            self.wake_host();
        }
        taken
    }

    // ---- The endpoint thread's side ----

    /// A client attached: it gets the history first, then live output.
    pub fn attach(&self) {
        let mut s = self.lock();
        s.attached = true;
        s.to_client = s.history.snapshot().into();
        drop(s);
        self.wake_guest();
        self.wake_host();
    }

    /// The client went away.
    pub fn detach(&self) {
        let mut s = self.lock();
        s.attached = false;
        s.to_client.clear();
        drop(s);
        self.wake_guest();
    }

    /// Whether a client is attached.
    pub fn attached(&self) -> bool {
        self.lock().attached
    }

    /// How many more bytes of host input may be buffered.
    pub fn input_room(&self) -> usize {
        INPUT_LIMIT.saturating_sub(self.lock().to_guest.len())
    }

    /// Buffers host input for the guest.
    pub fn push_input(&self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.lock().to_guest.extend(data);
        self.wake_guest();
    }

    /// Whether output waits for the client.
    pub fn has_output(&self) -> bool {
        !self.lock().to_client.is_empty()
    }

    /// Writes pending output with `write` (which returns how many bytes it wrote, or an
    /// error); wakes the worker when room opens up again.
    pub fn flush_output(
        &self,
        write: impl FnOnce(&[u8]) -> std::io::Result<usize>,
    ) -> std::io::Result<usize> {
        let mut s = self.lock();
        let was_full = s.to_client.len() >= OUTPUT_LIMIT;
        let (front, _) = s.to_client.as_slices();
        if front.is_empty() {
            return Ok(0);
        }
        let n = write(front)?.min(front.len());
        s.to_client.drain(..n);
        let now_room = s.to_client.len() < OUTPUT_LIMIT;
        drop(s);
        if was_full && now_room {
            self.wake_guest();
        }
        Ok(n)
    }

    /// Records the terminal size; wakes the worker if it changed.
    pub fn set_size(&self, cols: u16, rows: u16) {
        let mut s = self.lock();
        if s.size == Some((cols, rows)) {
            return;
        }
        s.size = Some((cols, rows));
        s.size_generation += 1;
        drop(s);
        self.wake_guest();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(history: usize) -> Port {
        Port::new(0, "p".into(), Endpoint::Pty, history, None).unwrap()
    }

    #[test]
    fn output_without_client_goes_to_history_only() {
        let p = port(16);
        assert!(p.output_room());
        assert_eq!(p.guest_output(b"early bytes"), 0);
        assert!(!p.has_output());
        p.attach();
        // The new client gets the history first.
        let mut got = Vec::new();
        p.flush_output(|b| {
            got.extend_from_slice(b);
            Ok(b.len())
        })
        .unwrap();
        assert_eq!(got, b"early bytes");
        p.guest_output(b"+live");
        p.flush_output(|b| {
            got.extend_from_slice(b);
            Ok(b.len())
        })
        .unwrap();
        assert_eq!(got, b"early bytes+live");
    }

    #[test]
    fn a_slow_client_stops_the_guest_and_drops_past_the_hard_bound() {
        let p = port(0);
        p.attach();
        let chunk = vec![b'x'; OUTPUT_LIMIT];
        assert_eq!(p.guest_output(&chunk), 0);
        assert!(!p.output_room());
        let big = vec![b'y'; OUTPUT_HARD_LIMIT];
        assert_eq!(p.guest_output(&big), OUTPUT_LIMIT);
        // Draining wakes the worker once room is back.
        while p.guest_wake.read().is_ok() {}
        while p.has_output() {
            p.flush_output(|b| Ok(b.len().min(100_000))).unwrap();
        }
        assert!(p.output_room());
        assert!(p.guest_wake.read().is_ok());
    }

    #[test]
    fn input_is_bounded_and_taken_partially() {
        let p = port(0);
        assert_eq!(p.input_room(), INPUT_LIMIT);
        p.push_input(b"hello");
        assert_eq!(p.input_room(), INPUT_LIMIT - 5);
        let mut got = Vec::new();
        assert_eq!(
            p.take_input(3, |b| {
                got.extend_from_slice(b);
                b.len()
            }),
            3
        );
        assert_eq!(got, b"hel");
        assert_eq!(p.take_input(100, <[u8]>::len), 2);
        assert!(!p.has_input());
    }

    #[test]
    fn detach_drops_pending_client_output_and_resize_is_noticed_once() {
        let p = port(8);
        p.attach();
        p.guest_output(b"abc");
        p.detach();
        assert!(!p.has_output());
        p.set_size(80, 24);
        p.set_size(80, 24);
        assert_eq!(p.lock().size_generation, 1);
        p.set_size(100, 30);
        assert_eq!(p.lock().size, Some((100, 30)));
        assert_eq!(p.lock().size_generation, 2);
    }
}
