//! Talking to systemd: readiness and stopping notifications (`sd_notify`), and whether
//! stderr goes to the journal. All of it is a no-op without systemd.

use sd_notify::NotifyState;

/// Tells systemd (if it supervises this process) that the daemon accepts frontends now.
pub fn notify_ready(status: &str) {
    let _ = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd the daemon is shutting down.
pub fn notify_stopping() {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
}

/// Updates the one-line status `systemctl status` shows.
pub fn notify_status(status: &str) {
    let _ = sd_notify::notify(false, &[NotifyState::Status(status)]);
}

/// Whether stderr is connected to the journal (systemd sets `JOURNAL_STREAM` to the
/// device and inode of the stream it gave us; we compare it with stderr's).
pub fn under_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&std::io::stderr()))
    else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(stat.st_dev) && ino.parse::<u64>().ok() == Some(stat.st_ino)
}
