//! Exit events for vhost-user-backend's worker threads.
//!
//! vhost-user-backend ends a worker thread's event loop when the event a backend returns
//! from `exit_event` fires. [`crate::serve()`] fires them all after each frontend disconnects,
//! so every connection's workers are joined and nothing leaks from one connection to the next.

use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Makes exit events for a backend's `exit_event(thread_index)`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ExitEvents;

impl ExitEvents {
    /// A fresh exit event pair for one worker thread; `None` only if the kernel refuses an
    /// eventfd (then the worker cannot be stopped, which vhost-user-backend tolerates).
    pub fn pair() -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                log::error!("cannot create an exit event for a worker thread: {e}");
                None
            }
        }
    }
}
