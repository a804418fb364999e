//! Terminals: raw mode that is always restored, window sizes, and new pseudo-terminals.
//! The only `unsafe` of the crate (two `ioctl`s) is here.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::PathBuf;
use std::sync::Mutex;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt, PtyMaster};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};

/// Terminals put in raw mode, with the settings to restore.
static SAVED: Mutex<Vec<(RawFd, Termios)>> = Mutex::new(Vec::new());

/// Puts the terminal on `fd` in raw mode and remembers how it was, for [`restore_all`].
/// Does nothing (and succeeds) if `fd` is not a terminal. `fd` must stay open for the rest
/// of the process's life: the daemon calls it for stdin only.
pub(crate) fn make_raw(fd: BorrowedFd<'_>) -> nix::Result<()> {
    if !nix::unistd::isatty(fd.as_raw_fd()).unwrap_or(false) {
        return Ok(());
    }
    let saved = tcgetattr(fd)?;
    let mut raw = saved.clone();
    cfmakeraw(&mut raw);
    tcsetattr(fd, SetArg::TCSANOW, &raw)?;
    if let Ok(mut list) = SAVED.lock() {
        list.push((fd.as_raw_fd(), saved));
    }
    Ok(())
}

/// Restores every terminal the daemon put in raw mode (on exit, also after `SIGTERM`).
pub fn restore_all() {
    let Ok(mut list) = SAVED.lock() else { return };
    for (fd, termios) in list.drain(..) {
        // SAFETY: `make_raw`, the only writer of SAVED, is crate-private and called for
        // stdin alone, which stays open for the whole life of the process; borrowing it for
        // the duration of this call is sound.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        if let Err(e) = tcsetattr(fd, SetArg::TCSANOW, &termios) {
            log::warn!("cannot restore the terminal settings: {e}");
        }
    }
}

/// The window size of the terminal on `fd` as (columns, rows), if it is one.
pub fn window_size(fd: BorrowedFd<'_>) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `struct winsize` to the pointer, which points to a
    // properly aligned, writable `libc::winsize` that lives across the call; `fd` is open.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0).then_some((ws.ws_col, ws.ws_row))
}

/// Sets the window size of the terminal on `fd` (tests use it to resize a pty).
pub fn set_window_size(fd: BorrowedFd<'_>, cols: u16, rows: u16) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `struct winsize` from the pointer, which points to an
    // initialized `libc::winsize` that lives across the call; `fd` is open.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A new pseudo-terminal: the master side the daemon serves, the slave path a user opens.
#[derive(Debug)]
pub struct Pty {
    /// The master side, non-blocking.
    pub master: PtyMaster,
    /// The slave device, e.g. `/dev/pts/3`.
    pub path: PathBuf,
}

/// Opens a new pty whose slave side is raw (no echo, no line editing, no newline
/// translation), so the guest's bytes reach the user unchanged.
pub fn open_pty() -> nix::Result<Pty> {
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let path = PathBuf::from(ptsname_r(&master)?);
    // Open the slave once to make it raw; closing it again puts the master in the hung-up
    // state that tells the endpoint thread nobody is attached yet.
    let slave = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&path)
        .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let mut termios = tcgetattr(slave.as_fd())?;
    cfmakeraw(&mut termios);
    tcsetattr(slave.as_fd(), SetArg::TCSANOW, &termios)?;
    drop(slave);
    set_nonblocking(master.as_fd())?;
    Ok(Pty { master, path })
}

/// Sets `O_NONBLOCK` on `fd`.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> nix::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

use std::os::unix::fs::OpenOptionsExt as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_pty_is_raw_and_sized() {
        let pty = open_pty().expect("open a pty");
        assert!(pty.path.starts_with("/dev/pts"));
        let slave = File::options()
            .read(true)
            .write(true)
            .open(&pty.path)
            .unwrap();
        let t = tcgetattr(slave.as_fd()).unwrap();
        assert!(!t.local_flags.contains(nix::sys::termios::LocalFlags::ECHO));
        set_window_size(slave.as_fd(), 132, 43).unwrap();
        assert_eq!(window_size(pty.master.as_fd()), Some((132, 43)));
    }

    #[test]
    fn raw_mode_is_a_no_op_off_a_terminal() {
        let f = File::open("/dev/null").unwrap();
        make_raw(f.as_fd()).unwrap();
        assert_eq!(window_size(f.as_fd()), None);
    }
}
