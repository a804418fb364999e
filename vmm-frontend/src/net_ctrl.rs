//! The virtio-net control virtqueue, served by the VMM for a vhost-user net daemon with
//! several queue pairs.
//!
//! A guest driver only uses several rx/tx pairs when the device offers `VIRTIO_NET_F_MQ`,
//! which needs `VIRTIO_NET_F_CTRL_VQ`: the driver picks how many pairs to use with the
//! control command `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`. vhost-user net daemons serve the data
//! queues only; as in QEMU and Cloud Hypervisor the frontend serves the control queue (the
//! last queue, index 2N) and turns the pair count into `VHOST_USER_SET_VRING_ENABLE` on the
//! daemon's rings: pairs `0..n` enabled, the rest disabled. Until the driver sends the
//! command, only the first pair is used (virtio 1.2, 5.1.6.5.5).
//!
//! A command is one descriptor chain (virtio 1.2, 5.1.6.5): device-readable
//! `u8 class, u8 command, data...`, then a device-writable `u8 ack` (`VIRTIO_NET_OK` = 0 or
//! `VIRTIO_NET_ERR` = 1). The other classes (RX mode, MAC table, VLAN filter, announce)
//! are answered the way QEMU answers them for a vhost-user peer: a well-formed command is
//! acknowledged (the daemon filters nothing, so every packet keeps being delivered), a
//! malformed or unknown one gets `VIRTIO_NET_ERR`. The chain comes from the guest: every
//! length is bounded, every address goes through `vm-memory`, and a bad chain gets
//! `VIRTIO_NET_ERR` (or length 0 when it has no room for the ack), never a panic.
//!
//! The queue's notification address is a KVM ioeventfd like every other queue's; a thread
//! of the VMM waits on it and raises the queue's MSI-X irqfd when it completes commands.

use std::os::fd::AsRawFd;
use std::thread::JoinHandle;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// `VIRTIO_NET_F_CTRL_VQ`.
pub const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
/// `VIRTIO_NET_F_MQ`.
pub const VIRTIO_NET_F_MQ: u64 = 1 << 22;
/// `VIRTIO_RING_F_EVENT_IDX`.
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// `VIRTIO_NET_OK`.
pub const OK: u8 = 0;
/// `VIRTIO_NET_ERR`.
pub const ERR: u8 = 1;

const CLASS_RX: u8 = 0;
const CLASS_MAC: u8 = 1;
const CLASS_VLAN: u8 = 2;
const CLASS_ANNOUNCE: u8 = 3;
const CLASS_MQ: u8 = 4;
/// `VIRTIO_NET_CTRL_MAC_TABLE_SET`.
const MAC_TABLE_SET: u8 = 0;
/// `VIRTIO_NET_CTRL_MAC_ADDR_SET`.
const MAC_ADDR_SET: u8 = 1;
/// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`.
const MQ_VQ_PAIRS_SET: u8 = 0;
/// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX`.
const VQ_PAIRS_MAX: u16 = 0x8000;

/// Longest command accepted (class, command and data): a MAC table of a few hundred
/// entries. Longer chains are answered `VIRTIO_NET_ERR` without being read.
const MAX_COMMAND: usize = 8192;
/// Largest split ring (the transport offers less).
const MAX_QUEUE_SIZE: u16 = 32768;

/// The queues the guest sees for a net device: one pair, or `pairs` pairs and the control
/// queue when the command line asks for several and the daemon serves them (it reports
/// its queue count through `GET_QUEUE_NUM`, which needs the MQ protocol feature and thus
/// `SET_VRING_ENABLE`). Returns (guest queues, pairs).
pub fn layout(cli_pairs: u16, daemon_queues: Option<u64>) -> (u16, u16) {
    let daemon_pairs = daemon_queues.map_or(1, |q| u16::try_from(q / 2).unwrap_or(u16::MAX));
    let pairs = cli_pairs.min(daemon_pairs).max(1);
    if pairs > 1 {
        (2 * pairs + 1, pairs)
    } else {
        (2, 1)
    }
}

/// Overwrites `max_virtqueue_pairs` (le16 at offset 8 of the net configuration) in a
/// configuration read of `data` at `offset`, whatever the daemon said.
pub fn patch_config(offset: u64, data: &mut [u8], pairs: u16) {
    for (i, b) in pairs.to_le_bytes().into_iter().enumerate() {
        let at = (8 + i as u64).checked_sub(offset);
        if let Some(d) = at
            .and_then(|a| usize::try_from(a).ok())
            .and_then(|a| data.get_mut(a))
        {
            *d = b;
        }
    }
}

/// Executes one command (`class, command, data`) and returns the ack. `set_pairs` applies a
/// pair count and says whether it worked.
pub fn command(cmd: &[u8], max_pairs: u16, set_pairs: &mut dyn FnMut(u16) -> bool) -> u8 {
    let [class, code, data @ ..] = cmd else {
        return ERR;
    };
    let ok = |good: bool| if good { OK } else { ERR };
    match (*class, *code) {
        (CLASS_MQ, MQ_VQ_PAIRS_SET) => {
            let Ok(raw) = <[u8; 2]>::try_from(data) else {
                return ERR;
            };
            let n = u16::from_le_bytes(raw);
            if n == 0 || n > max_pairs || n > VQ_PAIRS_MAX {
                return ERR;
            }
            ok(set_pairs(n))
        }
        // PROMISC, ALLMULTI, ALLUNI, NOMULTI, NOUNI, NOBCAST: one u8 on/off.
        (CLASS_RX, 0..=5) => ok(data.len() == 1),
        (CLASS_MAC, MAC_TABLE_SET) => ok(mac_table_ok(data)),
        (CLASS_MAC, MAC_ADDR_SET) => ok(data.len() == 6),
        // ADD, DEL: one le16 VLAN id.
        (CLASS_VLAN, 0 | 1) => ok(data.len() == 2),
        // ACK: no data.
        (CLASS_ANNOUNCE, 0) => ok(data.is_empty()),
        _ => ERR,
    }
}

/// Two tables (unicast, multicast), each `le32 entries` then `entries` 6-byte MACs, and
/// nothing after.
fn mac_table_ok(data: &[u8]) -> bool {
    let mut rest = data;
    for _ in 0..2 {
        let Some((n, tail)) = rest.split_first_chunk::<4>() else {
            return false;
        };
        let len = usize::try_from(u32::from_le_bytes(*n))
            .ok()
            .and_then(|n| n.checked_mul(6));
        match len.and_then(|l| tail.get(l..)) {
            Some(t) => rest = t,
            None => return false,
        }
    }
    rest.is_empty()
}

/// Serves one chain; returns the used length (1 when the ack was written).
fn serve_chain<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    max_pairs: u16,
    set_pairs: &mut dyn FnMut(u16) -> bool,
) -> u32 {
    let mut cmd = Vec::new();
    let mut ack: Option<GuestAddress> = None;
    let mut bad = false;
    for d in chain {
        if d.is_write_only() {
            if ack.is_none() && d.len() >= 1 {
                ack = Some(d.addr());
            }
            continue;
        }
        // A readable descriptor after the ack: not the chain the spec describes.
        bad |= ack.is_some();
        let len = usize::try_from(d.len()).unwrap_or(usize::MAX);
        let start = cmd.len();
        match start.checked_add(len).filter(|&end| end <= MAX_COMMAND) {
            Some(end) if !bad => {
                cmd.resize(end, 0);
                bad |= mem.read_slice(&mut cmd[start..], d.addr()).is_err();
            }
            _ => bad = true,
        }
    }
    let Some(ack) = ack else {
        log::warn!("net control queue: a command without room for its ack");
        return 0;
    };
    let status = if bad {
        ERR
    } else {
        command(&cmd, max_pairs, set_pairs)
    };
    if status == ERR {
        log::debug!(
            "net control queue: command {:?} refused",
            cmd.get(..2).unwrap_or(&[])
        );
    }
    match mem.write_obj(status, ack) {
        Ok(()) => 1,
        Err(_) => 0,
    }
}

/// Serves every command the guest queued; returns whether the guest wants an interrupt.
pub fn process<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    max_pairs: u16,
    set_pairs: &mut dyn FnMut(u16) -> bool,
) -> Result<bool, virtio_queue::Error> {
    let mut used_any = false;
    loop {
        queue.disable_notification(mem)?;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = serve_chain(mem, chain, max_pairs, set_pairs);
            queue.add_used(mem, head, len)?;
            used_any = true;
        }
        if !queue.enable_notification(mem)? {
            break;
        }
    }
    Ok(used_any && queue.needs_notification(mem)?)
}

/// Where the driver put the control queue.
#[derive(Debug, Clone, Copy)]
pub struct Ring {
    /// Queue size.
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
}

/// Builds a `virtio-queue` queue on the driver's ring, refusing a size that is not a power
/// of two and a ring outside guest memory.
pub fn make_queue<M: GuestMemory>(mem: &M, ring: Ring, features: u64) -> Result<Queue, String> {
    let bad = |e: virtio_queue::Error| format!("the control queue: {e}");
    let mut q = Queue::new(MAX_QUEUE_SIZE).map_err(bad)?;
    q.try_set_size(ring.size).map_err(bad)?;
    q.try_set_desc_table_address(GuestAddress(ring.desc))
        .map_err(bad)?;
    q.try_set_avail_ring_address(GuestAddress(ring.avail))
        .map_err(bad)?;
    q.try_set_used_ring_address(GuestAddress(ring.used))
        .map_err(bad)?;
    q.set_event_idx(features & VIRTIO_RING_F_EVENT_IDX != 0);
    q.set_ready(true);
    if !q.is_valid(mem) {
        return Err("the control queue's rings are not in guest memory".into());
    }
    Ok(q)
}

/// The thread that serves a started control queue.
pub struct CtrlQueue {
    exit: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for CtrlQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CtrlQueue").finish_non_exhaustive()
    }
}

impl CtrlQueue {
    /// Starts serving `queue`: commands arrive through `kick`, completions are signalled
    /// on `call`, pair counts go to `set_pairs`.
    pub fn spawn<M>(
        mem: M,
        mut queue: Queue,
        kick: EventFd,
        call: EventFd,
        max_pairs: u16,
        mut set_pairs: Box<dyn FnMut(u16) -> bool + Send>,
    ) -> Result<Self, String>
    where
        M: GuestMemory + Send + 'static,
    {
        let exit = EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        let exit2 = exit
            .try_clone()
            .map_err(|e| format!("dup of an eventfd: {e}"))?;
        let thread = std::thread::Builder::new()
            .name("net-ctrl".into())
            .spawn(move || {
                while wait(&kick, &exit2) {
                    let _ = kick.read();
                    match process(&mut queue, &mem, max_pairs, &mut *set_pairs) {
                        Ok(true) => {
                            let _ = call.write(1);
                        }
                        Ok(false) => {}
                        Err(e) => {
                            log::error!("net control queue: {e}; no longer served");
                            return;
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start the control queue thread: {e}"))?;
        Ok(Self {
            exit,
            thread: Some(thread),
        })
    }
}

/// Starts serving the control queue the driver set up as `q`, with the `features` it acked.
pub fn start(
    mem: crate::memory::GuestMemory,
    q: &crate::virtio_pci::ActiveQueue<'_>,
    features: u64,
    max_pairs: u16,
    set_pairs: Box<dyn FnMut(u16) -> bool + Send>,
) -> Result<CtrlQueue, String> {
    let ring = Ring {
        size: q.size,
        desc: q.desc,
        avail: q.avail,
        used: q.used,
    };
    let queue = make_queue(&mem, ring, features).map_err(|e| format!("the control queue: {e}"))?;
    let dup = |fd: &EventFd| {
        fd.try_clone()
            .map_err(|e| format!("dup of an eventfd: {e}"))
    };
    CtrlQueue::spawn(mem, queue, dup(q.kick)?, dup(q.call)?, max_pairs, set_pairs)
}

/// Waits for `kick` or `exit`; true for a kick.
fn wait(kick: &EventFd, exit: &EventFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: kick.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: exit.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd that lives across the call, and its
        // length is passed; both descriptors are owned by eventfds alive for the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::error!(
                "net control queue: poll: {}",
                std::io::Error::last_os_error()
            );
            return false;
        }
        if fds[1].revents != 0 {
            return false;
        }
        if fds[0].revents != 0 {
            return true;
        }
    }
}

impl Drop for CtrlQueue {
    fn drop(&mut self) {
        let _ = self.exit.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
// Test rings are a few entries long.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const W: u16 = 2; // VRING_DESC_F_WRITE

    fn mq(n: u16) -> Vec<u8> {
        let mut c = vec![CLASS_MQ, MQ_VQ_PAIRS_SET];
        c.extend_from_slice(&n.to_le_bytes());
        c
    }

    #[test]
    fn pairs_set_within_bounds() {
        let mut got = Vec::new();
        let mut set = |n| {
            got.push(n);
            true
        };
        assert_eq!(command(&mq(2), 4, &mut set), OK);
        assert_eq!(command(&mq(4), 4, &mut set), OK);
        assert_eq!(command(&mq(1), 4, &mut set), OK);
        assert_eq!(command(&mq(0), 4, &mut set), ERR);
        assert_eq!(command(&mq(5), 4, &mut set), ERR);
        assert_eq!(command(&mq(u16::MAX), u16::MAX, &mut set), ERR);
        // Short and long payloads.
        assert_eq!(command(&[CLASS_MQ, MQ_VQ_PAIRS_SET, 2], 4, &mut set), ERR);
        assert_eq!(
            command(&[CLASS_MQ, MQ_VQ_PAIRS_SET, 2, 0, 0], 4, &mut set),
            ERR
        );
        // RSS and hash config are not offered.
        assert_eq!(command(&[CLASS_MQ, 1, 0, 0], 4, &mut set), ERR);
        assert_eq!(got, [2, 4, 1]);
        assert_eq!(command(&mq(2), 4, &mut |_| false), ERR, "daemon refused");
    }

    #[test]
    fn other_classes_as_qemu_answers_them() {
        let mut set = |_| panic!("no pair change");
        assert_eq!(command(&[CLASS_RX, 0, 1], 2, &mut set), OK);
        assert_eq!(command(&[CLASS_RX, 5, 0], 2, &mut set), OK);
        assert_eq!(command(&[CLASS_RX, 6, 0], 2, &mut set), ERR);
        assert_eq!(command(&[CLASS_RX, 0], 2, &mut set), ERR);
        assert_eq!(
            command(&[CLASS_MAC, MAC_ADDR_SET, 1, 2, 3, 4, 5, 6], 2, &mut set),
            OK
        );
        assert_eq!(
            command(&[CLASS_MAC, MAC_ADDR_SET, 1, 2, 3], 2, &mut set),
            ERR
        );
        let mut table = vec![CLASS_MAC, MAC_TABLE_SET];
        table.extend_from_slice(&1u32.to_le_bytes());
        table.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
        table.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(command(&table, 2, &mut set), OK);
        table.push(0);
        assert_eq!(command(&table, 2, &mut set), ERR, "trailing byte");
        let mut huge = vec![CLASS_MAC, MAC_TABLE_SET];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(command(&huge, 2, &mut set), ERR, "count past the data");
        assert_eq!(command(&[CLASS_VLAN, 0, 5, 0], 2, &mut set), OK);
        assert_eq!(command(&[CLASS_VLAN, 1, 5], 2, &mut set), ERR);
        assert_eq!(command(&[CLASS_ANNOUNCE, 0], 2, &mut set), OK);
        assert_eq!(command(&[5, 0, 0, 0, 0, 0, 0, 0, 0], 2, &mut set), ERR);
        assert_eq!(command(&[], 2, &mut set), ERR);
        assert_eq!(command(&[CLASS_MQ], 2, &mut set), ERR);
    }

    #[test]
    fn layouts_and_config() {
        assert_eq!(layout(1, Some(8)), (2, 1));
        assert_eq!(layout(2, Some(4)), (5, 2));
        assert_eq!(layout(4, Some(4)), (5, 2), "capped by the daemon");
        assert_eq!(layout(4, None), (2, 1), "no GET_QUEUE_NUM");
        assert_eq!(layout(2, Some(3)), (2, 1));
        assert_eq!(layout(64, Some(u64::MAX)), (129, 64));
        let mut cfg = [0xaau8; 10];
        patch_config(0, &mut cfg, 3);
        assert_eq!(cfg[8..], [3, 0]);
        let mut two = [0xaau8; 2];
        patch_config(9, &mut two, 0x0102);
        assert_eq!(two, [1, 0xaa]);
        patch_config(u64::MAX, &mut two, 7);
        assert_eq!(two, [1, 0xaa]);
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// Puts `chains` in a mock queue and serves them; returns the acks (or `None` for a used
    /// length 0) in order, and the pair counts applied.
    fn serve(
        mem: &GuestMemoryMmap,
        chains: &[Vec<(Vec<u8>, u16, u32)>],
    ) -> (Vec<Option<u8>>, Vec<u16>) {
        let vq = MockSplitQueue::new(mem, 16);
        let mut next = 0x10_0000u64;
        let mut offset = 0u16;
        let mut acks: Vec<Option<u64>> = Vec::new();
        for chain in chains {
            let mut raw = Vec::new();
            let mut ack = None;
            let n = chain.len() as u16;
            for (i, (bytes, flags, len)) in chain.iter().enumerate() {
                mem.write_slice(bytes, GuestAddress(next)).expect("write");
                let more = if (i as u16) + 1 < n { 1 } else { 0 };
                let d = Descriptor::new(next, *len, flags | more, offset + i as u16 + 1);
                raw.push(RawDescriptor::from(d));
                if flags & W != 0 && ack.is_none() {
                    ack = Some(next);
                }
                next += 0x1000;
            }
            acks.push(ack);
            vq.add_desc_chains(&raw, offset).expect("chain");
            offset += n;
        }
        let mut q: Queue = vq.create_queue().expect("queue");
        let mut pairs = Vec::new();
        let notify = process(&mut q, mem, 2, &mut |n| {
            pairs.push(n);
            true
        })
        .expect("process");
        assert!(notify || chains.is_empty());
        let mut out = Vec::new();
        for (i, ack) in acks.iter().enumerate() {
            let elem = vq.used().ring().ref_at(i).expect("used").load();
            out.push(match (elem.len(), ack) {
                (1, Some(a)) => Some(mem.read_obj::<u8>(GuestAddress(*a)).expect("ack")),
                _ => None,
            });
        }
        assert_eq!(vq.used().idx().load(), chains.len() as u16);
        (out, pairs)
    }

    #[test]
    fn queues_the_driver_cannot_have() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem");
        let ring = |size, desc| Ring {
            size,
            desc,
            avail: 0x2000,
            used: 0x3000,
        };
        assert!(make_queue(&mem, ring(64, 0x1000), 0).is_ok());
        assert!(make_queue(&mem, ring(0, 0x1000), 0).is_err());
        assert!(make_queue(&mem, ring(63, 0x1000), 0).is_err());
        assert!(make_queue(&mem, ring(64, 1 << 40), 0).is_err());
    }

    #[test]
    fn chains_from_a_hostile_guest() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).expect("mem");
        let hdr = |c: &[u8]| (c.to_vec(), 0, c.len() as u32);
        let ack = || (vec![0xff], W, 1);
        let (acks, pairs) = serve(
            &mem,
            &[
                // The Linux shape: header, data, ack in three descriptors.
                vec![hdr(&[CLASS_MQ, 0]), hdr(&2u16.to_le_bytes()), ack()],
                // Everything in one readable descriptor.
                vec![hdr(&mq(1)), ack()],
                // More pairs than the device has.
                vec![hdr(&mq(3)), ack()],
                // A readable length past the command limit.
                vec![(mq(2), 0, 1 << 20), ack()],
                // A readable descriptor after the ack.
                vec![hdr(&[CLASS_MQ, 0]), ack(), hdr(&2u16.to_le_bytes())],
            ],
        );
        assert_eq!(acks, [Some(OK), Some(OK), Some(ERR), Some(ERR), Some(ERR)]);
        assert_eq!(pairs, [2, 1]);
        // No room for the ack: completed with length 0, nothing applied.
        let (acks, pairs) = serve(&mem, &[vec![hdr(&mq(2))]]);
        assert_eq!((acks, pairs), (vec![None], vec![]));
        // A buffer outside guest memory.
        let vq = MockSplitQueue::new(&mem, 4);
        vq.add_desc_chains(&[desc(1 << 40, 4, 1, 1), desc(0x10_0000, 1, W, 0)], 0)
            .expect("chain");
        let mut q: Queue = vq.create_queue().expect("queue");
        process(&mut q, &mem, 2, &mut |_| panic!("not applied")).expect("process");
        let st: u8 = mem.read_obj(GuestAddress(0x10_0000)).expect("ack");
        assert_eq!(st, ERR);
    }
}
