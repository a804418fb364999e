//! Log set-up through the `log` facade and `env_logger`: `RUST_LOG`-style filtering
//! (default `info`), timestamps on a terminal, and syslog level prefixes (`<3>`) without
//! timestamps when stderr goes to the journal, which adds its own.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static INITIALIZED: AtomicBool = AtomicBool::new(false);

/// Initializes logging once; later calls do nothing.
pub fn init() {
    if INITIALIZED.swap(true, Ordering::SeqCst) {
        return;
    }
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if crate::systemd::under_journal() {
        builder.format(|buf, record| {
            writeln!(
                buf,
                "<{}>{}",
                journal_priority(record.level()),
                record.args()
            )
        });
    } else {
        builder.format_timestamp_millis().format_target(false);
    }
    let _ = builder.try_init();
}

/// The syslog priority the journal reads from a `<N>` line prefix (`sd-daemon(3)`).
pub fn journal_priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// Whether [`init`] has run.
pub fn is_initialized() -> bool {
    INITIALIZED.load(Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(journal_priority(log::Level::Error), 3); // LOG_ERR
        assert_eq!(journal_priority(log::Level::Warn), 4); // LOG_WARNING
        assert_eq!(journal_priority(log::Level::Info), 6); // LOG_INFO
        assert_eq!(journal_priority(log::Level::Debug), 7); // LOG_DEBUG
        assert_eq!(journal_priority(log::Level::Trace), 7);
    }
}
