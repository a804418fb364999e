//! The history ring: the last bytes the guest wrote on a port, replayed to the next client
//! that connects, so output written while nobody was attached is not lost.

use std::collections::VecDeque;

/// A byte ring of fixed capacity that keeps the newest bytes.
#[derive(Debug, Clone)]
pub struct History {
    bytes: VecDeque<u8>,
    capacity: usize,
}

impl History {
    /// An empty history keeping at most `capacity` bytes (0 keeps nothing).
    pub fn new(capacity: usize) -> Self {
        History {
            bytes: VecDeque::new(),
            capacity,
        }
    }

    /// Appends `data`, dropping the oldest bytes beyond the capacity.
    pub fn push(&mut self, data: &[u8]) {
        if self.capacity == 0 {
            return;
        }
        let data = if data.len() > self.capacity {
            &data[data.len() - self.capacity..]
        } else {
            data
        };
        let overflow = (self.bytes.len() + data.len()).saturating_sub(self.capacity);
        self.bytes.drain(..overflow);
        self.bytes.extend(data);
    }

    /// The kept bytes, oldest first.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.iter().copied().collect()
    }

    /// How many bytes are kept.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_bytes() {
        let mut h = History::new(8);
        h.push(b"hello");
        assert_eq!(h.snapshot(), b"hello");
        h.push(b" world");
        assert_eq!(h.snapshot(), b"lo world");
        assert_eq!(h.len(), 8);
        h.push(b"0123456789abcdef");
        assert_eq!(h.snapshot(), b"89abcdef");
        h.push(b"");
        assert_eq!(h.snapshot(), b"89abcdef");
    }

    #[test]
    fn zero_capacity_keeps_nothing() {
        let mut h = History::new(0);
        h.push(b"data");
        assert!(h.is_empty());
        assert_eq!(h.snapshot(), b"");
    }
}
