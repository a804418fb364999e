//! Logging guest faults without letting a guest flood the log: each cause (an error type
//! and its variant) is logged at most once per interval, with a count of what was skipped.

use std::any::TypeId;
use std::collections::HashMap;
use std::fmt::Display;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::mem::discriminant;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How often one cause may be logged.
pub const INTERVAL: Duration = Duration::from_secs(10);

type Seen = HashMap<(TypeId, u64), (Instant, u64)>;

fn seen() -> &'static Mutex<Seen> {
    static SEEN: OnceLock<Mutex<Seen>> = OnceLock::new();
    SEEN.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Whether `cause` may be logged now; `Some(n)` with the number of times it was suppressed
/// since it was last logged. The map's size is bounded by the number of enum variants.
pub fn allow<E: 'static>(cause: &E) -> Option<u64> {
    let mut h = DefaultHasher::new();
    discriminant(cause).hash(&mut h);
    let key = (TypeId::of::<E>(), h.finish());
    let now = Instant::now();
    let mut map = seen().lock().ok()?;
    match map.get_mut(&key) {
        Some((last, skipped)) if now.duration_since(*last) < INTERVAL => {
            *skipped += 1;
            None
        }
        Some((last, skipped)) => {
            let n = *skipped;
            *last = now;
            *skipped = 0;
            Some(n)
        }
        None => {
            map.insert(key, (now, 0));
            Some(0)
        }
    }
}

/// Logs a guest fault as a warning, rate-limited per cause.
pub fn guest_fault<E: Display + 'static>(queue: u16, cause: &E) {
    if let Some(skipped) = allow(cause) {
        if skipped > 0 {
            log::warn!("queue {queue}: bad request: {cause} (and {skipped} more like it)");
        } else {
            log::warn!("queue {queue}: bad request: {cause}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    enum Cause {
        A(#[allow(dead_code)] u32),
        B,
    }

    #[test]
    fn one_log_per_cause_per_interval() {
        assert_eq!(allow(&Cause::A(1)), Some(0));
        assert_eq!(allow(&Cause::A(2)), None, "same variant, other value");
        assert_eq!(allow(&Cause::B), Some(0), "another variant");
        assert_eq!(allow(&Cause::B), None);
    }
}
