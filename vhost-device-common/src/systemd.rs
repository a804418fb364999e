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
/// device and inode of the stream it gave us; we compare it with stderr's, since a child
/// that inherited the variable may have had stderr redirected elsewhere).
pub fn under_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&std::io::stderr()))
    else {
        return false;
    };
    stream_matches(&value, stat.st_dev, stat.st_ino)
}

/// Whether a `JOURNAL_STREAM` value (`DEVICE:INODE`, decimal) names this device and inode.
fn stream_matches(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.split_once(':') else {
        return false;
    };
    d.parse::<u64>().ok() == Some(dev) && i.parse::<u64>().ok() == Some(ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_name_stderr_exactly() {
        assert!(stream_matches("2049:1234", 2049, 1234));
        assert!(!stream_matches("2049:1235", 2049, 1234));
        assert!(!stream_matches("2048:1234", 2049, 1234));
        assert!(!stream_matches("2049", 2049, 1234));
        assert!(!stream_matches("x:y", 2049, 1234));
        assert!(!stream_matches("", 2049, 1234));
    }
}
