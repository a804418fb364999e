//! Serving frontends, one connection after the other, until `SIGTERM`.
//!
//! The main thread waits for signals; a serving thread accepts a frontend on the listening
//! socket, runs a `VhostUserDaemon` with a fresh backend for it, and when the frontend goes
//! away stops that connection's worker threads and accepts the next one on the same socket.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use log::{error, info, warn};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vhost::vhost_user::Error as VhostUserError;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringEpollHandler};

use crate::listener::{Origin, SocketListener};
use crate::sandbox::{Sandbox, Syscalls};
use crate::signals::{Request, Signals};
use crate::{systemd, GuestMemory, GuestMemoryAtomic};

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The signal set-up failed.
    #[error("cannot set up signal handling")]
    Signals(#[source] std::io::Error),
    /// The serving thread could not start.
    #[error("cannot start the serving thread")]
    Thread(#[source] std::io::Error),
    /// The daemon could not confine itself (`--user`, `--seccomp`).
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::Error),
    /// The device could not make a backend for a new connection.
    #[error("{0}")]
    Backend(String),
    /// Accepting on the listening socket failed for good.
    #[error("cannot accept frontends: {0}")]
    Accept(String),
}

/// A device served by [`serve`]: it makes one backend per frontend connection and shares
/// whatever outlives a connection (an open image, a tap) between them.
pub trait Device: Send + Sync + 'static {
    /// The backend vhost-user-backend drives for one connection.
    type Backend: VhostUserBackend<Bitmap = ()> + Clone + Send + Sync + 'static;

    /// A short name for threads and logs, e.g. `vhost-device-blk`.
    fn name(&self) -> &str;

    /// A fresh backend for the next frontend. Its `exit_event` must return an event per
    /// worker thread (see [`crate::ExitEvents`]), so the connection can be torn down.
    fn backend(&self) -> Result<Self::Backend, Box<dyn std::error::Error + Send + Sync>>;

    /// The daemon for a new connection exists and its worker threads' epoll handlers are
    /// ready (one per entry of `queues_per_thread`, in that order). A device that waits on
    /// its own file descriptors (a tap, a listening socket) registers them here with
    /// `VringEpollHandler::register_listener`. An error refuses this connection.
    fn attach(
        &self,
        _backend: &Self::Backend,
        _handlers: &[Arc<VringEpollHandler<Self::Backend>>],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(())
    }

    /// The frontend of `backend` went away; its worker threads have been joined.
    fn disconnected(&self, _backend: &Self::Backend) {}

    /// The system calls this device makes while serving, beyond
    /// [`crate::sandbox::common_syscalls`]: its seccomp allow-list.
    fn syscalls(&self) -> Syscalls {
        Syscalls::new()
    }

    /// `SIGHUP`: re-read what can change while running.
    fn reload(&self) {}

    /// `SIGTERM`/`SIGINT`: the process is about to exit; make acknowledged data durable.
    fn shutdown(&self) {}
}

/// Serves frontends on `listener` until `SIGTERM` or `SIGINT`.
///
/// Blocks the handled signals first, so call it before the daemon starts any thread. Then
/// enters `sandbox` (drops to `--user`, installs the seccomp filter with the device's
/// [`Device::syscalls`]) before the first serving thread starts: open every file and socket
/// the device needs before calling it.
/// Reports readiness to systemd once it accepts connections, and `STOPPING=1` on the way out.
pub fn serve<D: Device>(
    device: Arc<D>,
    listener: SocketListener,
    sandbox: &Sandbox,
) -> Result<(), Error>
where
    <D::Backend as VhostUserBackend>::Vring: Clone + Send + Sync,
{
    serve_many(vec![(device, listener)], sandbox)
}

/// Serves several devices, each on its own listening socket, in one process until `SIGTERM`
/// or `SIGINT` (e.g. one vsock device per VM). Each pair gets its own accept thread; the
/// first that fails for good ends the daemon. Readiness is reported once all listen;
/// `reload` and `shutdown` reach every device.
///
/// Blocks the handled signals first, so call it before the daemon starts any thread; enters
/// `sandbox` as [`serve`] does.
pub fn serve_many<D: Device>(
    devices: Vec<(Arc<D>, SocketListener)>,
    sandbox: &Sandbox,
) -> Result<(), Error>
where
    <D::Backend as VhostUserBackend>::Vring: Clone + Send + Sync,
{
    let signals = Signals::block().map_err(Error::Signals)?;
    // A serving thread writes a byte here when it fails for good, to wake the main thread.
    let (failed, failed_writer) = std::os::unix::net::UnixStream::pair().map_err(Error::Signals)?;
    failed.set_nonblocking(true).map_err(Error::Signals)?;
    let failure: Arc<Mutex<Option<Error>>> = Arc::new(Mutex::new(None));
    let origins: Vec<Origin> = devices
        .iter()
        .map(|(_, listener)| listener.origin().clone())
        .collect();
    let remove_socket_files = || {
        for origin in &origins {
            if let Origin::Path(path) = origin {
                let _ = std::fs::remove_file(path);
            }
        }
    };
    // Everything is open: confine the process before the first serving thread starts, so
    // every worker thread is born under the filter.
    let syscalls = devices.iter().fold(Syscalls::new(), |all, (device, _)| {
        all.merge(&device.syscalls())
    });
    let name = devices.first().map_or("", |(device, _)| device.name());
    if let Err(e) = sandbox.enter(name, &syscalls) {
        remove_socket_files();
        return Err(e.into());
    }
    let mut served = Vec::new();

    for (device, listener) in devices {
        let where_ = listener.describe();
        let thread_device = device.clone();
        let mut thread_failed = failed_writer.try_clone().map_err(Error::Signals)?;
        let thread_failure = failure.clone();
        std::thread::Builder::new()
            .name(format!("{}-accept", device.name()))
            .spawn(move || {
                let err = accept_loop(&*thread_device, listener);
                if let Ok(mut slot) = thread_failure.lock() {
                    slot.get_or_insert(err);
                }
                let _ = thread_failed.write_all(&[1]);
            })
            .map_err(Error::Thread)?;
        info!("{}: listening on {where_}", device.name());
        served.push((device, where_));
    }
    let status = match served.as_slice() {
        [] => return Err(Error::Accept("no socket to serve".into())),
        [(_, where_)] => format!("listening on {where_}"),
        more => format!("listening on {} sockets", more.len()),
    };
    systemd::notify_ready(&status);

    let result = loop {
        let mut fds = [
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(failed.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => break Err(Error::Signals(e.into())),
        }
        if (&failed).read(&mut [0u8]).is_ok() {
            let err = failure
                .lock()
                .ok()
                .and_then(|mut slot| slot.take())
                .unwrap_or_else(|| Error::Accept("the serving thread ended".into()));
            break Err(err);
        }
        match signals.read() {
            Ok(Some(Request::Reload)) => {
                info!("SIGHUP: reloading");
                for (device, _) in &served {
                    device.reload();
                }
            }
            Ok(Some(Request::Terminate(sig))) => {
                info!("{sig}: shutting down");
                break Ok(());
            }
            Ok(None) => {}
            Err(e) => break Err(Error::Signals(e)),
        }
    };
    systemd::notify_stopping();
    for (device, _) in &served {
        device.shutdown();
    }
    remove_socket_files();
    result
}

/// Accepts frontends one after the other; returns only on a failure that ends the daemon.
fn accept_loop<D: Device>(device: &D, mut listener: SocketListener) -> Error
where
    <D::Backend as VhostUserBackend>::Vring: Clone + Send + Sync,
{
    loop {
        let backend = match device.backend() {
            Ok(b) => b,
            Err(e) => return Error::Backend(e.to_string()),
        };
        let memory = GuestMemoryAtomic::new(GuestMemory::new());
        let mut daemon =
            match VhostUserDaemon::new(device.name().to_string(), backend.clone(), memory) {
                Ok(d) => d,
                Err(e) => return Error::Backend(e.to_string()),
            };
        if let Err(e) = device.attach(&backend, &daemon.get_epoll_handlers()) {
            return Error::Backend(e.to_string());
        }
        if let Err(e) = daemon.start(listener.listener_mut()) {
            // A frontend that connects and vanishes before the first message is not a reason
            // to stop serving; a broken listening socket is.
            let text = e.to_string();
            if matches!(
                e,
                vhost_user_backend::Error::CreateBackendListener(VhostUserError::SocketError(ref io))
                    if io.kind() != std::io::ErrorKind::ConnectionAborted
            ) {
                return Error::Accept(text);
            }
            warn!("frontend connection failed: {text}");
            stop_workers(&daemon);
            continue;
        }
        info!("frontend connected");
        match daemon.wait() {
            Ok(()) => info!("frontend disconnected"),
            Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => info!("frontend disconnected"),
            Err(e) => error!("frontend connection ended: {e}; waiting for the next frontend"),
        }
        stop_workers(&daemon);
        drop(daemon);
        device.disconnected(&backend);
    }
}

fn stop_workers<T>(daemon: &VhostUserDaemon<T>)
where
    T: VhostUserBackend<Bitmap = ()> + Clone + 'static,
    T::Vring: Clone + Send + Sync,
{
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
}
