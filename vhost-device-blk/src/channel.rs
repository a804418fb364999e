//! Config-change notifications on the backend request channel
//! (`VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`), the way a frontend learns a disk was resized.
//!
//! The `vhost` crate (0.18) cannot send this message: its `Backend` leaves
//! `VhostUserFrontendReqHandler::handle_config_change` at the trait's `ENOSYS` default and
//! keeps its socket private. So when vhost-user-backend hands us the channel
//! (`set_backend_req_fd`), we find the same socket among the process's descriptors and keep
//! a duplicate of it to write the 12-byte message ourselves.
//!
//! The channel is recognised as the only Unix stream socket that has no local address (a
//! socketpair end, unlike the connection accepted on our listening path) and whose peer is
//! another process (unlike the socketpairs this daemon makes for itself). The message goes
//! without `NEED_REPLY`, so a frontend that does not answer (Cloud Hypervisor before its
//! PR #8206) cannot block the daemon, and is sent with `MSG_DONTWAIT`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use log::{debug, warn};
use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::socket::{getsockname, getsockopt, send, sockopt, MsgFlags, SockType, UnixAddr};

/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`.
const CONFIG_CHANGE_MSG: u32 = 2;
/// Header flags: protocol version 1, no reply wanted.
const VERSION_1: u32 = 0x1;

/// A duplicate of the backend request channel, for config-change notifications.
#[derive(Debug)]
pub struct ConfigNotifier {
    sock: OwnedFd,
}

/// Duplicates `fd` (close-on-exec) if it is open.
fn dup(fd: RawFd) -> Option<OwnedFd> {
    let new = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(0)).ok()?;
    // SAFETY: `new` was just returned by F_DUPFD_CLOEXEC: an open descriptor that nothing
    // else in the process owns, so the `OwnedFd` is its only owner and closes it once.
    Some(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Whether `fd` is an unnamed Unix stream socket connected to another process.
fn is_channel(fd: &OwnedFd, own_pid: i32) -> bool {
    if getsockopt(fd, sockopt::SockType).ok() != Some(SockType::Stream) {
        return false;
    }
    let Ok(addr) = getsockname::<UnixAddr>(fd.as_raw_fd()) else {
        return false;
    };
    if addr.path().is_some() || addr.as_abstract().is_some() {
        return false;
    }
    getsockopt(fd, sockopt::PeerCredentials)
        .is_ok_and(|cred| cred.pid() != own_pid && cred.pid() > 0)
}

impl ConfigNotifier {
    /// Finds the backend request channel the frontend just sent.
    pub fn find() -> Option<Self> {
        let own_pid = std::process::id().try_into().unwrap_or(-1);
        let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
            .ok()?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<RawFd>().ok())
            .collect();
        let mut found: Vec<(RawFd, OwnedFd)> = fds
            .into_iter()
            .filter_map(|fd| dup(fd).map(|d| (fd, d)))
            .filter(|(_, d)| is_channel(d, own_pid))
            .collect();
        // Duplicates made by this scan are unnamed sockets too; keep one per socket (the
        // lowest descriptor number, which is the original).
        found.sort_by_key(|(fd, _)| *fd);
        let mut inodes = Vec::new();
        found.retain(|(_, d)| {
            let ino = nix::sys::stat::fstat(d.as_raw_fd())
                .map(|s| s.st_ino)
                .unwrap_or(0);
            if inodes.contains(&ino) {
                false
            } else {
                inodes.push(ino);
                true
            }
        });
        if found.len() > 1 {
            warn!(
                "{} candidate backend request channels; using the newest descriptor",
                found.len()
            );
        }
        let (fd, sock) = found.pop()?;
        debug!("backend request channel is descriptor {fd}");
        Some(ConfigNotifier { sock })
    }

    /// Wraps a known channel socket (for tests).
    pub fn from_fd(sock: OwnedFd) -> Self {
        ConfigNotifier { sock }
    }

    /// Sends `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`.
    pub fn notify(&self) -> std::io::Result<()> {
        let mut msg = [0u8; 12];
        msg[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        msg[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
        // size (bytes 8..12) is 0: the message has no payload.
        let sent = send(
            self.sock.as_raw_fd(),
            &msg,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        )?;
        if sent != msg.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                "config-change message cut short",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn the_message_is_a_bare_header() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        ConfigNotifier::from_fd(OwnedFd::from(a))
            .notify()
            .expect("notify");
        let mut buf = [0u8; 12];
        b.read_exact(&mut buf).expect("read");
        assert_eq!(buf, [2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn own_socketpairs_are_not_taken_for_the_channel() {
        let (_a, _b) = UnixStream::pair().expect("pair");
        assert!(
            ConfigNotifier::find().is_none(),
            "a pair within this process is not a channel"
        );
    }
}
