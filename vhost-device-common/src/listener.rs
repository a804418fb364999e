//! The listening socket a daemon serves frontends on.
//!
//! It comes from one of three places, in this order: `--fd` (an inherited listening
//! socket, libvirt's way), `--socket-path` (bound here), or the single socket systemd
//! passes with `LISTEN_FDS`/`LISTEN_PID` (socket activation). The same listening socket
//! serves every frontend connection for the daemon's whole life: it is never unlinked and
//! re-created between connections, so a reconnecting frontend cannot race the daemon.

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::sys::socket::{getsockopt, sockopt};
use vhost::vhost_user::Listener;

use crate::cli::CommonArgs;

/// Why no listening socket could be had. Every message tells the user what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Neither a path, an fd nor systemd gave a socket.
    #[error("no socket to listen on: pass --socket-path PATH (or --fd FD, or start under systemd socket activation)")]
    NoSocket,
    /// The path is served by a running process.
    #[error(
        "socket path {0} is in use by a running process: stop it or choose another --socket-path"
    )]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("{0} exists and is not a socket: remove it or choose another --socket-path")]
    NotASocket(PathBuf),
    /// The directory of the path does not exist.
    #[error("cannot create socket {0}: its directory does not exist; create it or choose another --socket-path")]
    NoDirectory(PathBuf),
    /// No permission to create the socket.
    #[error("cannot create socket {0}: permission denied; choose a --socket-path in a directory you may write to")]
    Permission(PathBuf),
    /// Any other failure to bind.
    #[error("cannot listen on {path}")]
    Bind {
        /// The path given.
        path: PathBuf,
        /// What bind(2) said.
        #[source]
        source: std::io::Error,
    },
    /// The inherited file descriptor is not a listening Unix stream socket.
    #[error("file descriptor {0} is not a listening Unix socket: pass a socket in listening state with --fd")]
    BadFd(RawFd),
    /// systemd passed a number of sockets other than one.
    #[error(
        "systemd passed {0} sockets; the unit's .socket must declare exactly one ListenStream="
    )]
    SystemdCount(usize),
    /// Reading `LISTEN_FDS` failed.
    #[error("cannot read the sockets systemd passed")]
    Systemd(#[source] std::io::Error),
}

/// Where the listening socket came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Bound here at this path (removed again when the daemon exits).
    Path(PathBuf),
    /// Inherited with `--fd`.
    Fd(RawFd),
    /// Passed by systemd socket activation.
    Systemd,
}

/// A listening Unix socket for vhost-user frontends.
pub struct SocketListener {
    listener: Listener,
    origin: Origin,
}

impl std::fmt::Debug for SocketListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketListener")
            .field("fd", &self.listener.as_raw_fd())
            .field("origin", &self.origin)
            .finish()
    }
}

impl SocketListener {
    /// Finds the listening socket the way the command line and the environment say.
    ///
    /// A `--socket-path` naming the very socket systemd passed (the same configuration file
    /// used with and without socket activation) takes systemd's socket instead of failing
    /// on a path that is in use.
    pub fn open(args: &CommonArgs) -> Result<Self, Error> {
        if let Some(fd) = args.fd {
            return Self::from_fd(fd);
        }
        let fds: Vec<RawFd> = sd_notify::listen_fds().map_err(Error::Systemd)?.collect();
        if let Some(path) = &args.socket_path {
            if let [fd] = fds.as_slice() {
                if bound_path(*fd).is_some_and(|bound| same_socket(&bound, path)) {
                    return Self::from_systemd(*fd);
                }
            }
            return Self::bind(path);
        }
        match fds.as_slice() {
            [] => Err(Error::NoSocket),
            [fd] => Self::from_systemd(*fd),
            more => Err(Error::SystemdCount(more.len())),
        }
    }

    fn from_systemd(fd: RawFd) -> Result<Self, Error> {
        let mut listener = Self::from_fd(fd)?;
        listener.origin = Origin::Systemd;
        Ok(listener)
    }

    /// Binds a new listening socket at `path`, replacing a stale socket file that nobody
    /// serves any more but never one that a live process listens on.
    pub fn bind(path: &Path) -> Result<Self, Error> {
        let listener = match UnixListener::bind(path) {
            Ok(listener) => listener,
            Err(e) if e.kind() == ErrorKind::AddrInUse => {
                let meta = std::fs::symlink_metadata(path).map_err(|source| Error::Bind {
                    path: path.to_owned(),
                    source,
                })?;
                if !meta.file_type().is_socket() {
                    return Err(Error::NotASocket(path.to_owned()));
                }
                match UnixStream::connect(path) {
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                        // A stale socket left by a process that is gone.
                        std::fs::remove_file(path).map_err(|source| Error::Bind {
                            path: path.to_owned(),
                            source,
                        })?;
                        UnixListener::bind(path).map_err(|e| bind_error(path, e))?
                    }
                    _ => return Err(Error::InUse(path.to_owned())),
                }
            }
            Err(e) => return Err(bind_error(path, e)),
        };
        Ok(SocketListener {
            listener: Listener::from(listener),
            origin: Origin::Path(path.to_owned()),
        })
    }

    /// Takes an inherited listening socket.
    pub fn from_fd(fd: RawFd) -> Result<Self, Error> {
        if fd < 0 || nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
            return Err(Error::BadFd(fd));
        }
        // SAFETY: the fd is open (F_GETFD succeeded above) and was handed to this process to
        // own (by `--fd` or `LISTEN_FDS`); nothing else in the process refers to it, so taking
        // ownership here is sound.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let listening = getsockopt(&owned, sockopt::AcceptConn).unwrap_or(false);
        let unix_stream = matches!(
            getsockopt(&owned, sockopt::SockType),
            Ok(nix::sys::socket::SockType::Stream)
        ) && nix::sys::socket::getsockname::<nix::sys::socket::UnixAddr>(fd)
            .is_ok();
        if !listening || !unix_stream {
            // Hand the descriptor back untouched: it is not ours to close.
            std::mem::forget(owned);
            return Err(Error::BadFd(fd));
        }
        // Do not leak the socket into programs this daemon might start.
        let _ = nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        Ok(SocketListener {
            listener: Listener::from(UnixListener::from(owned)),
            origin: Origin::Fd(fd),
        })
    }

    /// Where the socket came from.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// The vhost crate's listener, for `VhostUserDaemon::start`.
    pub fn listener_mut(&mut self) -> &mut Listener {
        &mut self.listener
    }

    /// A name for the socket in log lines.
    pub fn describe(&self) -> String {
        match &self.origin {
            Origin::Path(p) => p.display().to_string(),
            Origin::Fd(fd) => format!("inherited fd {fd}"),
            Origin::Systemd => "socket from systemd".to_string(),
        }
    }
}

impl AsRawFd for SocketListener {
    fn as_raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }
}

impl Drop for SocketListener {
    fn drop(&mut self) {
        if let Origin::Path(path) = &self.origin {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The filesystem path a socket is bound to, if any.
fn bound_path(fd: RawFd) -> Option<PathBuf> {
    nix::sys::socket::getsockname::<nix::sys::socket::UnixAddr>(fd)
        .ok()
        .and_then(|addr| addr.path().map(Path::to_path_buf))
}

/// Whether two paths name the same socket file.
fn same_socket(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

fn bind_error(path: &Path, source: std::io::Error) -> Error {
    match source.kind() {
        ErrorKind::PermissionDenied => Error::Permission(path.to_owned()),
        ErrorKind::NotFound => Error::NoDirectory(path.to_owned()),
        ErrorKind::AddrInUse => Error::InUse(path.to_owned()),
        _ => Error::Bind {
            path: path.to_owned(),
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_and_removes_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let l = SocketListener::bind(&path).unwrap();
        assert!(path.exists());
        drop(l);
        assert!(!path.exists());
    }

    #[test]
    fn refuses_a_live_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let _live = UnixListener::bind(&path).unwrap();
        let err = SocketListener::bind(&path).unwrap_err();
        assert!(matches!(err, Error::InUse(_)), "{err}");
        assert!(err.to_string().contains("in use"));
    }

    #[test]
    fn replaces_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        SocketListener::bind(&path).unwrap();
    }

    #[test]
    fn refuses_a_regular_file_and_a_missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            SocketListener::bind(&file).unwrap_err(),
            Error::NotASocket(_)
        ));
        assert!(matches!(
            SocketListener::bind(&dir.path().join("no/such/dir.sock")).unwrap_err(),
            Error::NoDirectory(_)
        ));
    }

    #[test]
    fn recognizes_the_same_socket_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let l = UnixListener::bind(&path).unwrap();
        let bound = bound_path(l.as_raw_fd()).unwrap();
        assert!(same_socket(&bound, &path));
        assert!(same_socket(&bound, &dir.path().join(".").join("s.sock")));
        assert!(!same_socket(&bound, &dir.path().join("other.sock")));
    }

    #[test]
    fn takes_an_inherited_listening_fd_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        let l = UnixListener::bind(dir.path().join("s")).unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(l);
        let s = SocketListener::from_fd(fd).unwrap();
        assert_eq!(s.origin(), &Origin::Fd(fd));
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(
            SocketListener::from_fd(f.as_raw_fd()).unwrap_err(),
            Error::BadFd(_)
        ));
        assert!(matches!(
            SocketListener::from_fd(9999).unwrap_err(),
            Error::BadFd(9999)
        ));
    }
}
