//! Counters of what a connection moved and dropped, with rate-limited logging: each drop
//! cause is logged the first time and then at powers of two, never once per packet.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a packet was dropped, for counting and logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropCause {
    /// RX: a malformed chain from the guest.
    RxBadChain,
    /// RX: without merged buffers, a chain too small for the frame.
    RxTooLarge,
    /// RX: a frame shorter than the header.
    RxRunt,
    /// TX: a malformed chain (direction, address, descriptor count).
    TxBadChain,
    /// TX: shorter than the header.
    TxShortHeader,
    /// TX: above the MTU (or 64 KiB for GSO).
    TxTooLarge,
    /// TX: a GSO type not offered or not negotiated.
    TxBadGso,
    /// TX: the tap refused the frame.
    TxTapError,
}

impl DropCause {
    const ALL: [DropCause; 8] = [
        DropCause::RxBadChain,
        DropCause::RxTooLarge,
        DropCause::RxRunt,
        DropCause::TxBadChain,
        DropCause::TxShortHeader,
        DropCause::TxTooLarge,
        DropCause::TxBadGso,
        DropCause::TxTapError,
    ];

    fn describe(self) -> &'static str {
        match self {
            DropCause::RxBadChain => "rx: malformed receive chain from the guest",
            DropCause::RxTooLarge => "rx: frame larger than the guest's receive buffer",
            DropCause::RxRunt => "rx: frame shorter than the virtio-net header",
            DropCause::TxBadChain => "tx: malformed transmit chain from the guest",
            DropCause::TxShortHeader => "tx: chain shorter than the virtio-net header",
            DropCause::TxTooLarge => "tx: frame larger than the MTU",
            DropCause::TxBadGso => "tx: GSO type not offered or not negotiated",
            DropCause::TxTapError => "tx: the tap refused the frame",
        }
    }
}

/// Per-connection counters, shared by the workers.
#[derive(Debug, Default)]
pub struct Stats {
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes delivered to the guest, headers included.
    pub rx_bytes: AtomicU64,
    /// Frames sent to the tap.
    pub tx_frames: AtomicU64,
    /// Bytes sent to the tap, headers included.
    pub tx_bytes: AtomicU64,
    drops: [AtomicU64; 8],
    /// Frames received and sent per queue pair.
    pairs: Vec<[AtomicU64; 2]>,
}

impl Stats {
    /// Counters for a device with `pairs` queue pairs.
    pub fn new(pairs: usize) -> Self {
        Stats {
            pairs: (0..pairs)
                .map(|_| [AtomicU64::new(0), AtomicU64::new(0)])
                .collect(),
            ..Stats::default()
        }
    }

    /// Counts a frame delivered to the guest on `pair`.
    pub fn received(&self, pair: usize, bytes: usize) {
        self.rx_frames.fetch_add(1, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        if let Some(p) = self.pairs.get(pair) {
            p[0].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a frame sent to the tap from `pair`.
    pub fn sent(&self, pair: usize, bytes: usize) {
        self.tx_frames.fetch_add(1, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        if let Some(p) = self.pairs.get(pair) {
            p[1].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a dropped packet and logs the cause at the 1st, 2nd, 4th, 8th... time.
    pub fn dropped(&self, cause: DropCause, detail: &dyn std::fmt::Display) {
        let index = DropCause::ALL.iter().position(|&d| d == cause).unwrap_or(0);
        let n = self.drops[index].fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            log::warn!("{} ({detail}); {n} so far", cause.describe());
        }
    }

    /// How many packets were dropped for `cause`.
    pub fn drops(&self, cause: DropCause) -> u64 {
        let index = DropCause::ALL.iter().position(|&d| d == cause).unwrap_or(0);
        self.drops[index].load(Ordering::Relaxed)
    }

    /// All drops.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().map(|d| d.load(Ordering::Relaxed)).sum()
    }

    /// One line for the log when a connection ends.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "rx {} frames / {} bytes, tx {} frames / {} bytes, {} dropped",
            self.rx_frames.load(Ordering::Relaxed),
            self.rx_bytes.load(Ordering::Relaxed),
            self.tx_frames.load(Ordering::Relaxed),
            self.tx_bytes.load(Ordering::Relaxed),
            self.total_drops()
        );
        for (i, p) in self.pairs.iter().enumerate() {
            line.push_str(&format!(
                "; pair {i}: rx {} tx {}",
                p[0].load(Ordering::Relaxed),
                p[1].load(Ordering::Relaxed)
            ));
        }
        for cause in DropCause::ALL {
            let n = self.drops(cause);
            if n > 0 {
                line.push_str(&format!("; {}: {n}", cause.describe()));
            }
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_counted_per_cause() {
        let stats = Stats::new(2);
        stats.received(1, 100);
        stats.sent(0, 60);
        assert!(
            stats
                .summary()
                .contains("pair 0: rx 0 tx 1; pair 1: rx 1 tx 0"),
            "{}",
            stats.summary()
        );
        stats.dropped(DropCause::TxTooLarge, &"1600 bytes");
        stats.dropped(DropCause::TxTooLarge, &"1600 bytes");
        stats.dropped(DropCause::RxBadChain, &"x");
        assert_eq!(stats.drops(DropCause::TxTooLarge), 2);
        assert_eq!(stats.drops(DropCause::RxBadChain), 1);
        assert_eq!(stats.total_drops(), 3);
        assert!(stats.summary().contains("3 dropped"), "{}", stats.summary());
    }
}
