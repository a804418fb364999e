//! The host side of each port: one thread per port that serves its endpoint (stdio, a pty,
//! a TCP or Unix listener) and moves bytes between the client and the port's buffers.
//!
//! One client at a time per port: a second client that connects to a TCP or Unix port is
//! told so in one line and disconnected; the first keeps the console. A client that
//! disconnects leaves the port ready for the next one, which gets the history first.

use std::io::{ErrorKind, Write};
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{info, warn};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::config::Endpoint;
use crate::port::Port;
use crate::terminal;

/// Largest read or write in one step.
const CHUNK: usize = 4096;
/// How often a pty without a client is checked for one, and a pty's size for changes.
const PTY_POLL_MS: u16 = 200;

/// Why a port's endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Binding the TCP or Unix listener failed.
    #[error("port {port}: cannot listen on {endpoint}")]
    Listen {
        /// Port number.
        port: u32,
        /// The endpoint.
        endpoint: Endpoint,
        /// What bind(2) said.
        #[source]
        source: std::io::Error,
    },
    /// The Unix socket path is in use by a live process or is not a socket.
    #[error("port {port}: {path} exists and is in use or not a socket: remove it or choose another unix= path")]
    PathInUse {
        /// Port number.
        port: u32,
        /// The path.
        path: PathBuf,
    },
    /// Opening a pty failed.
    #[error("port {port}: cannot open a pseudo-terminal")]
    Pty {
        /// Port number.
        port: u32,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// Putting stdin in raw mode or watching SIGWINCH failed.
    #[error("cannot set up the terminal on stdin")]
    Stdio(#[source] Errno),
    /// The thread could not start.
    #[error("port {port}: cannot start its thread")]
    Thread {
        /// Port number.
        port: u32,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// What a port's thread serves.
enum Source {
    Stdio { winch: Option<SignalFd> },
    Pty(terminal::Pty),
    Listener(OwnedFd),
}

/// Opens the endpoint of `port` (bind, open a pty, set up stdin) and starts its thread.
/// Returns a line describing where users connect, for the log.
pub fn start(port: Arc<Port>) -> Result<String, Error> {
    let id = port.id;
    let (source, place) = match &port.endpoint {
        Endpoint::Stdio => {
            let stdin = std::io::stdin();
            terminal::make_raw(stdin.as_fd()).map_err(Error::Stdio)?;
            let tty = nix::unistd::isatty(stdin.as_raw_fd()).unwrap_or(false)
                || nix::unistd::isatty(std::io::stdout().as_raw_fd()).unwrap_or(false);
            let winch = if tty {
                let mut set = SigSet::empty();
                set.add(Signal::SIGWINCH);
                // The daemon blocks SIGWINCH in every thread before starting any (see
                // `crate::run`), so it stays pending for this signalfd.
                Some(
                    SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
                        .map_err(Error::Stdio)?,
                )
            } else {
                None
            };
            (Source::Stdio { winch }, "stdio".to_string())
        }
        Endpoint::Pty => {
            let pty = terminal::open_pty().map_err(|source| Error::Pty { port: id, source })?;
            let place = format!("pty {}", pty.path.display());
            (Source::Pty(pty), place)
        }
        Endpoint::Tcp(addr) => {
            let l = TcpListener::bind(addr).map_err(|source| Error::Listen {
                port: id,
                endpoint: port.endpoint.clone(),
                source,
            })?;
            let place = match l.local_addr() {
                Ok(a) => format!("tcp {a}"),
                Err(_) => format!("tcp {addr}"),
            };
            let _ = l.set_nonblocking(true);
            (Source::Listener(l.into()), place)
        }
        Endpoint::Unix(path) => {
            let l = bind_unix(id, path)?;
            let _ = l.set_nonblocking(true);
            (
                Source::Listener(l.into()),
                format!("unix {}", path.display()),
            )
        }
    };
    let thread_port = port.clone();
    std::thread::Builder::new()
        .name(format!("console-port{id}"))
        .spawn(move || match source {
            Source::Stdio { winch } => serve_stdio(&thread_port, winch.as_ref()),
            Source::Pty(pty) => serve_pty(&thread_port, &pty.master),
            Source::Listener(l) => serve_listener(&thread_port, &l),
        })
        .map_err(|source| Error::Thread { port: id, source })?;
    Ok(format!("port {id} ({}): {place}", port.name))
}

/// Binds a Unix listener, replacing a stale socket file but never a live one.
fn bind_unix(id: u32, path: &Path) -> Result<UnixListener, Error> {
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == ErrorKind::AddrInUse => {
            let stale = std::fs::symlink_metadata(path)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false)
                && matches!(UnixStream::connect(path), Err(ref e) if e.kind() == ErrorKind::ConnectionRefused);
            if !stale {
                return Err(Error::PathInUse {
                    port: id,
                    path: path.to_owned(),
                });
            }
            let _ = std::fs::remove_file(path);
            UnixListener::bind(path).map_err(|source| Error::Listen {
                port: id,
                endpoint: Endpoint::Unix(path.to_owned()),
                source,
            })
        }
        Err(source) => Err(Error::Listen {
            port: id,
            endpoint: Endpoint::Unix(path.to_owned()),
            source,
        }),
    }
}

/// Empties an eventfd used as a wake-up.
fn drain_wake(port: &Port) {
    let _ = port.host_wake.read();
}

fn poll_fds(fds: &mut [PollFd<'_>], timeout: PollTimeout) {
    match poll(fds, timeout) {
        Ok(_) | Err(Errno::EINTR) => {}
        Err(e) => {
            // poll(2) fails only on bad arguments; do not spin if it ever does.
            warn!("poll failed: {e}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// What one read from the client gave.
enum ReadOutcome {
    Data,
    Nothing,
    Closed,
}

/// Reads what the port has room for from `fd` into the port.
fn read_client(port: &Port, fd: BorrowedFd<'_>) -> ReadOutcome {
    let room = port.input_room().min(CHUNK);
    if room == 0 {
        return ReadOutcome::Nothing;
    }
    let mut buf = [0u8; CHUNK];
    match nix::unistd::read(fd.as_raw_fd(), &mut buf[..room]) {
        Ok(0) => ReadOutcome::Closed,
        Ok(n) => {
            port.push_input(&buf[..n]);
            ReadOutcome::Data
        }
        Err(Errno::EAGAIN | Errno::EINTR) => ReadOutcome::Nothing,
        Err(_) => ReadOutcome::Closed,
    }
}

/// Writes pending output to `fd`; false when the client is gone.
fn write_client(port: &Port, fd: BorrowedFd<'_>) -> bool {
    let result = port.flush_output(|bytes| {
        let bytes = &bytes[..bytes.len().min(CHUNK)];
        match nix::unistd::write(fd, bytes) {
            Ok(n) => Ok(n),
            Err(Errno::EAGAIN | Errno::EINTR) => Ok(0),
            Err(e) => Err(e.into()),
        }
    });
    result.is_ok()
}

fn serve_listener(port: &Port, listener: &OwnedFd) {
    let mut client: Option<OwnedFd> = None;
    loop {
        let mut fds = vec![
            PollFd::new(port.host_wake.as_fd(), PollFlags::POLLIN),
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
        ];
        if let Some(c) = &client {
            // No POLLRDHUP: nix's `revents()` reads a flag it does not name as "no events"
            // (a busy loop); a peer's close shows as POLLIN with an end of file, or POLLHUP.
            let mut events = PollFlags::empty();
            if port.input_room() > 0 {
                events |= PollFlags::POLLIN;
            }
            if port.has_output() {
                events |= PollFlags::POLLOUT;
            }
            fds.push(PollFd::new(c.as_fd(), events));
        }
        poll_fds(&mut fds, PollTimeout::NONE);
        let ready = |i: usize| {
            fds.get(i)
                .and_then(|f| f.revents())
                .unwrap_or(PollFlags::empty())
        };
        let (listener_ready, client_ready) = (ready(1), ready(2));
        drop(fds);
        drain_wake(port);

        if let Some(c) = &client {
            let mut gone = false;
            if client_ready.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
            {
                // Read first: a client that sent a line and closed still gets it delivered.
                loop {
                    match read_client(port, c.as_fd()) {
                        ReadOutcome::Data => continue,
                        ReadOutcome::Nothing => {
                            // No room: the peer's close is seen once the guest reads.
                            gone = client_ready.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)
                                && port.input_room() > 0;
                            break;
                        }
                        ReadOutcome::Closed => {
                            gone = true;
                            break;
                        }
                    }
                }
            }
            if !gone && port.has_output() && !write_client(port, c.as_fd()) {
                gone = true;
            }
            if gone {
                client = None;
                port.detach();
                info!("port {}: client disconnected", port.id);
            }
        }

        if listener_ready.contains(PollFlags::POLLIN) {
            while let Some(new) = accept(listener) {
                if client.is_some() {
                    refuse(port, new);
                    continue;
                }
                let _ = terminal::set_nonblocking(new.as_fd());
                client = Some(new);
                port.attach();
                info!("port {}: client connected", port.id);
            }
        }
    }
}

/// Accepts one pending connection, if any.
fn accept(listener: &OwnedFd) -> Option<OwnedFd> {
    loop {
        match nix::sys::socket::accept4(
            listener.as_raw_fd(),
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        ) {
            Ok(fd) => {
                // SAFETY: accept4 just returned this descriptor; nothing else owns it.
                return Some(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) });
            }
            Err(Errno::EINTR | Errno::ECONNABORTED) => continue,
            Err(Errno::EAGAIN) => return None,
            Err(e) => {
                // Out of descriptors or memory: the listener stays readable, so do not spin.
                warn!("cannot accept a client: {e}");
                std::thread::sleep(std::time::Duration::from_millis(200));
                return None;
            }
        }
    }
}

/// Tells a second client the port is taken and closes it.
fn refuse(port: &Port, conn: OwnedFd) {
    let line = format!(
        "vhost-device-console: port {} ({}) already has a client; only one at a time\r\n",
        port.id, port.name
    );
    let mut file = std::fs::File::from(conn);
    let _ = file.write_all(line.as_bytes());
    warn!("port {}: refused a second client", port.id);
}

fn serve_stdio(port: &Port, winch: Option<&SignalFd>) {
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let mut stdin_open = true;
    if let Some(size) =
        terminal::window_size(stdout.as_fd()).or_else(|| terminal::window_size(stdin.as_fd()))
    {
        port.set_size(size.0, size.1);
    }
    port.attach();
    loop {
        let mut fds = vec![PollFd::new(port.host_wake.as_fd(), PollFlags::POLLIN)];
        let stdin_events = if stdin_open && port.input_room() > 0 {
            PollFlags::POLLIN
        } else {
            PollFlags::empty()
        };
        fds.push(PollFd::new(stdin.as_fd(), stdin_events));
        let stdout_events = if port.attached() && port.has_output() {
            PollFlags::POLLOUT
        } else {
            PollFlags::empty()
        };
        fds.push(PollFd::new(stdout.as_fd(), stdout_events));
        if let Some(w) = winch {
            fds.push(PollFd::new(w.as_fd(), PollFlags::POLLIN));
        }
        poll_fds(&mut fds, PollTimeout::NONE);
        let ready = |i: usize| {
            fds.get(i)
                .and_then(|f| f.revents())
                .unwrap_or(PollFlags::empty())
        };
        let (in_ready, out_ready, winch_ready) = (ready(1), ready(2), ready(3));
        drop(fds);
        drain_wake(port);

        if stdin_open && !in_ready.is_empty() {
            if let ReadOutcome::Closed = read_client(port, stdin.as_fd()) {
                info!("stdin closed: the guest console receives no more input");
                stdin_open = false;
            }
        }
        if out_ready.contains(PollFlags::POLLOUT) && !write_client(port, stdout.as_fd()) {
            warn!("stdout closed: guest output goes to the history and log only");
            port.detach();
        } else if out_ready.intersects(PollFlags::POLLERR | PollFlags::POLLHUP) {
            port.detach();
        }
        if !winch_ready.is_empty() {
            if let Some(w) = winch {
                while let Ok(Some(_)) = w.read_signal() {}
            }
            if let Some(size) = terminal::window_size(stdout.as_fd())
                .or_else(|| terminal::window_size(stdin.as_fd()))
            {
                port.set_size(size.0, size.1);
            }
        }
    }
}

/// Whether nobody has the pty's slave side open (the master reads as hung up).
fn pty_hung_up(master: &nix::pty::PtyMaster) -> bool {
    let mut fds = [PollFd::new(master.as_fd(), PollFlags::empty())];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLHUP))
}

fn serve_pty(port: &Port, master: &nix::pty::PtyMaster) {
    loop {
        if let Some((cols, rows)) = terminal::window_size(master.as_fd()) {
            if cols != 0 || rows != 0 {
                port.set_size(cols, rows);
            }
        }
        let attached = port.attached();
        let hung_up = pty_hung_up(master);
        if attached && hung_up {
            port.detach();
            info!("port {}: pty closed by its user", port.id);
        } else if !attached && !hung_up {
            port.attach();
            info!("port {}: pty opened by a user", port.id);
        }
        let mut fds = vec![PollFd::new(port.host_wake.as_fd(), PollFlags::POLLIN)];
        if !hung_up {
            let mut events = PollFlags::empty();
            if port.input_room() > 0 {
                events |= PollFlags::POLLIN;
            }
            if port.has_output() {
                events |= PollFlags::POLLOUT;
            }
            fds.push(PollFd::new(master.as_fd(), events));
        }
        poll_fds(&mut fds, PollTimeout::from(PTY_POLL_MS));
        let ready = fds
            .get(1)
            .and_then(|f| f.revents())
            .unwrap_or(PollFlags::empty());
        drop(fds);
        drain_wake(port);
        if ready.contains(PollFlags::POLLIN) {
            // EIO when the user closed the slave in between: the next turn sees the hang-up.
            let _ = read_client(port, master.as_fd());
        }
        if ready.contains(PollFlags::POLLOUT) {
            let _ = write_client(port, master.as_fd());
        }
    }
}
