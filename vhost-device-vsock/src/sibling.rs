//! Sibling VMs: devices served by one daemon that share a group name can reach each other
//! by CID. A packet for a sibling is copied into the sibling's inbox and its muxer is woken
//! through an eventfd; flow control stays end to end between the two guests (the headers
//! pass unchanged), the inbox only bounds what a misbehaving guest can queue.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::packet::Header;

/// Most packets an inbox holds; beyond it, packets are refused.
const MAX_PACKETS: usize = 4096;
/// Most payload bytes an inbox holds.
const MAX_BYTES: usize = 16 << 20;

/// A packet between two guests, copied out of the sender's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawPacket {
    /// The header as the sending guest wrote it.
    pub hdr: Header,
    /// Its payload (`hdr.len` bytes).
    pub payload: Vec<u8>,
}

/// Packets waiting for one VM's RX queue.
#[derive(Debug)]
pub struct Inbox {
    queue: Mutex<(VecDeque<RawPacket>, usize)>,
    event: EventFd,
}

impl Inbox {
    /// An empty inbox.
    pub fn new() -> std::io::Result<Self> {
        Ok(Inbox {
            queue: Mutex::new((VecDeque::new(), 0)),
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Queues a packet and wakes the receiver; gives the packet back if the inbox is full.
    pub fn push(&self, pkt: RawPacket) -> Result<(), RawPacket> {
        let Ok(mut q) = self.queue.lock() else {
            return Err(pkt);
        };
        if q.0.len() >= MAX_PACKETS || q.1 + pkt.payload.len() > MAX_BYTES {
            return Err(pkt);
        }
        q.1 += pkt.payload.len();
        q.0.push_back(pkt);
        drop(q);
        let _ = self.event.write(1);
        Ok(())
    }

    /// Takes the oldest packet.
    pub fn pop(&self) -> Option<RawPacket> {
        let mut q = self.queue.lock().ok()?;
        let pkt = q.0.pop_front()?;
        q.1 -= pkt.payload.len();
        Some(pkt)
    }

    /// Drops everything queued (the receiving guest was reset).
    pub fn clear(&self) {
        if let Ok(mut q) = self.queue.lock() {
            q.0.clear();
            q.1 = 0;
        }
    }

    /// The eventfd that becomes readable when packets arrive.
    pub fn event(&self) -> &EventFd {
        &self.event
    }

    /// Consumes the wake-up.
    pub fn ack(&self) {
        let _ = self.event.read();
    }
}

#[derive(Debug)]
struct Entry {
    groups: Vec<String>,
    inbox: Arc<Inbox>,
}

/// All VMs of the daemon, by CID.
#[derive(Debug, Default)]
pub struct Registry {
    vms: Mutex<HashMap<u64, Entry>>,
}

impl Registry {
    /// Adds a VM; `false` if its CID is taken.
    pub fn register(&self, cid: u64, groups: &[String], inbox: Arc<Inbox>) -> bool {
        let Ok(mut vms) = self.vms.lock() else {
            return false;
        };
        if vms.contains_key(&cid) {
            return false;
        }
        vms.insert(
            cid,
            Entry {
                groups: groups.to_vec(),
                inbox,
            },
        );
        true
    }

    /// The inbox of `to` if `from` and `to` share a group.
    pub fn route(&self, from: u64, to: u64) -> Option<Arc<Inbox>> {
        if from == to {
            return None;
        }
        let vms = self.vms.lock().ok()?;
        let src = vms.get(&from)?;
        let dst = vms.get(&to)?;
        src.groups
            .iter()
            .any(|g| dst.groups.contains(g))
            .then(|| dst.inbox.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(len: usize) -> RawPacket {
        RawPacket {
            hdr: Header::default(),
            payload: vec![7; len],
        }
    }

    #[test]
    fn routes_only_within_a_shared_group() {
        let reg = Registry::default();
        let a = Arc::new(Inbox::new().expect("eventfd"));
        let b = Arc::new(Inbox::new().expect("eventfd"));
        let c = Arc::new(Inbox::new().expect("eventfd"));
        assert!(reg.register(3, &["g1".into()], a));
        assert!(reg.register(4, &["g2".into(), "g1".into()], b));
        assert!(reg.register(5, &["g3".into()], c));
        assert!(!reg.register(5, &["g1".into()], Arc::new(Inbox::new().expect("eventfd"))));
        assert!(reg.route(3, 4).is_some());
        assert!(reg.route(4, 3).is_some());
        assert!(reg.route(3, 5).is_none());
        assert!(reg.route(3, 3).is_none());
        assert!(reg.route(3, 9).is_none());
    }

    #[test]
    fn inbox_is_bounded_and_fifo() {
        let inbox = Inbox::new().expect("eventfd");
        for i in 0..MAX_PACKETS {
            let mut p = pkt(1);
            p.hdr.src_port = u32::try_from(i).expect("small");
            assert!(inbox.push(p).is_ok());
        }
        assert!(inbox.push(pkt(1)).is_err(), "a full inbox refuses");
        assert_eq!(inbox.pop().map(|p| p.hdr.src_port), Some(0));
        assert_eq!(inbox.pop().map(|p| p.hdr.src_port), Some(1));
        inbox.clear();
        assert!(inbox.pop().is_none());
        assert!(inbox.push(pkt(MAX_BYTES + 1)).is_err(), "byte bound");
    }
}
