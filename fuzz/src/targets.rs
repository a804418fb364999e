//! One function per fuzz target, so a crash input can be replayed from a test as well.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use vhost_device_common::GuestMemoryAtomic;
use vhost_user_backend::VhostUserBackend;
use virtio_queue::QueueT;
use vmm_sys_util::epoll::EventSet;

use crate::{memory, queue, split, vring};

/// A directory on tmpfs when there is one (`fdatasync` there costs nothing).
fn scratch_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vhost-fuzz")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("a temporary directory")
}

/// The flag bits that are acked feature bits (virtio's feature bits go up to 39).
pub const FEATURES: u64 = (1 << 40) - 1;

// ---- blk ------------------------------------------------------------------------------

/// Block: flags bit 0 read-only image, bit 1 io_uring engine, bit 2 EVENT_IDX, bit 3
/// writethrough, bit 4 `O_DIRECT`-style 4096-byte logical blocks. One queue (index 0) on a
/// 1 MiB image; the backend's `handle_event` parses, checks and executes every chain, then
/// `stop_vring` drains what is in flight, as `GET_VRING_BASE` does.
pub fn blk(data: &[u8]) {
    use vhost_device_blk::backend::BlkBackend;
    use vhost_device_blk::config::{Config, EngineKind};
    use vhost_device_blk::disk::Disk;

    struct Image {
        _dir: tempfile::TempDir,
        path: PathBuf,
    }
    static IMAGE: OnceLock<Image> = OnceLock::new();
    static DISKS: OnceLock<Vec<(Config, Arc<Disk>)>> = OnceLock::new();
    let image = IMAGE.get_or_init(|| {
        let dir = scratch_dir();
        let path = dir.path().join("disk.img");
        let f = std::fs::File::create(&path).expect("image");
        f.set_len(1 << 20).expect("image size");
        Image { _dir: dir, path }
    });
    let disks = DISKS.get_or_init(|| {
        (0..4u8)
            .map(|i| {
                let mut c = Config::new(&image.path);
                c.read_only = i & 1 != 0;
                c.logical_block_size = if i & 2 != 0 { 4096 } else { 512 };
                c.queue_size = crate::QUEUE_SIZE;
                c.engine = EngineKind::Sync;
                let disk = Arc::new(Disk::open(&c).expect("image opens"));
                (c, disk)
            })
            .collect()
    });

    let (flags, image_bytes) = split(data);
    let pick = usize::from(flags & 1 != 0) | (usize::from(flags & 0x10 != 0) << 1);
    let (config, disk) = &disks[pick];
    let mut config = config.clone();
    if flags & 2 != 0 {
        config.engine = EngineKind::IoUring;
    }
    disk.set_writeback(flags & 8 == 0);
    let backend = match BlkBackend::new(disk.clone(), &config) {
        Ok(b) => b,
        Err(_) => {
            config.engine = EngineKind::Sync;
            BlkBackend::new(disk.clone(), &config).expect("the sync engine always starts")
        }
    };
    let mem = GuestMemoryAtomic::new(memory(image_bytes));
    backend.set_event_idx(flags & 4 != 0);
    backend
        .update_memory(mem.clone())
        .expect("anonymous memory");
    let vrings = [vring(&mem, 0)];
    backend
        .handle_event(0, EventSet::IN, &vrings, 0)
        .expect("handle_event never fails");
    backend.stop_vring(0).expect("stop_vring never fails");
}

// ---- net ------------------------------------------------------------------------------

/// A sink that reads every byte of the frame (so the sanitizer checks each iovec) and
/// accepts it, or refuses it when `fail` is set.
struct Sink {
    fail: bool,
}

impl vhost_device_net::tx::FrameSink for Sink {
    unsafe fn write_frame(&self, iov: &[libc::iovec]) -> std::io::Result<usize> {
        let mut total = 0usize;
        let mut sum = 0u8;
        for v in iov {
            // SAFETY: the caller guarantees each iovec is valid for reads of its length
            // for the duration of this call.
            let bytes = unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len) };
            sum = bytes.iter().fold(sum, |a, &b| a.wrapping_add(b));
            total += v.iov_len;
        }
        std::hint::black_box(sum);
        if self.fail {
            Err(std::io::Error::from_raw_os_error(libc::EIO))
        } else {
            Ok(total)
        }
    }
}

/// Net TX: flags bits 0..40 are the acked features (VERSION_1, MRG_RXBUF, HOST_TSO4/6...),
/// bits 40..56 the MTU (0: none), bit 56 a tap that refuses the frame. Every chain on
/// queue 0 goes through `tx::send`: descriptor checks, header checks, size limits, the
/// `writev` iovecs.
pub fn net_tx(data: &[u8]) {
    use vhost_device_net::tx::{self, TxScratch};
    use vhost_device_net::virtio::Negotiated;

    let (flags, image) = split(data);
    let neg = Negotiated::from_features(flags & FEATURES);
    let mtu = u16::try_from((flags >> 40) & 0xffff).unwrap_or(0);
    let max_frame = tx::max_frame((mtu != 0).then_some(mtu));
    let sink = Sink {
        fail: flags & (1 << 56) != 0,
    };
    let mem = memory(image);
    let mut q = queue(0);
    let mut scratch = TxScratch::default();
    while let Some(chain) = q.pop_descriptor_chain(&mem) {
        let head = chain.head_index();
        let outcome = tx::send(chain, &neg, max_frame, &sink, &mut scratch);
        std::hint::black_box(&outcome);
        let _ = q.add_used(&mem, head, 0);
    }
}

// ---- vsock ----------------------------------------------------------------------------

/// Guest CID of the fuzzed device.
pub const VSOCK_CID: u64 = 3;
/// A host port with a listener, so a guest REQUEST to it connects.
pub const VSOCK_LISTENING_PORT: u32 = 1024;

/// Vsock: flags bits 0..40 the acked features (SEQPACKET is bit 1), bit 40 EVENT_IDX.
/// The TX queue (1) goes through the backend (header parsing, the muxer's handling of
/// each packet: connect, data, credit, shutdown, reset); the host side of any connection
/// the guest made to [`VSOCK_LISTENING_PORT`] is accepted and sends a few bytes, then the
/// muxer's event fills the RX queue (0) with what it has for the guest.
pub fn vsock_tx(data: &[u8]) {
    use std::io::Write;
    use vhost_device_vsock::backend::{VsockBackend, MUXER_EVENT, TX_QUEUE};
    use vhost_device_vsock::muxer::{Muxer, Settings};
    use vhost_device_vsock::sibling::{Inbox, Registry};

    struct Host {
        _dir: tempfile::TempDir,
        uds: PathBuf,
        listener: UnixListener,
    }
    static HOST: OnceLock<Host> = OnceLock::new();
    let host = HOST.get_or_init(|| {
        let dir = scratch_dir();
        let uds = dir.path().join("v.sock");
        let mut port_path = uds.clone().into_os_string();
        port_path.push(format!("_{VSOCK_LISTENING_PORT}"));
        let listener = UnixListener::bind(&port_path).expect("listener");
        listener.set_nonblocking(true).expect("nonblocking");
        Host {
            _dir: dir,
            uds,
            listener,
        }
    });

    let (flags, image) = split(data);
    let settings = Settings {
        cid: VSOCK_CID,
        uds_path: host.uds.clone(),
        buf_alloc: 64 * 1024,
    };
    let inbox = Arc::new(Inbox::new().expect("eventfd"));
    let muxer = Muxer::new(settings, None, inbox, Arc::new(Registry::default())).expect("epoll");
    let backend =
        VsockBackend::new(VSOCK_CID, usize::from(crate::QUEUE_SIZE), muxer).expect("timerfd");
    backend.acked_features(flags & FEATURES);
    backend.set_event_idx(flags & (1 << 40) != 0);
    let mem = GuestMemoryAtomic::new(memory(image));
    backend
        .update_memory(mem.clone())
        .expect("anonymous memory");
    let vrings = [vring(&mem, 0), vring(&mem, 1), vring(&mem, 2)];
    let _ = backend.handle_event(TX_QUEUE, EventSet::IN, &vrings, 0);
    let mut peers: Vec<UnixStream> = Vec::new();
    while let Ok((mut s, _)) = host.listener.accept() {
        let _ = s.write_all(b"host says hi");
        peers.push(s);
    }
    if !peers.is_empty() {
        let _ = backend.handle_event(MUXER_EVENT, EventSet::IN, &vrings, 0);
    }
}

// ---- console --------------------------------------------------------------------------

/// Console: two ports, flags bits 0..40 the acked features (MULTIPORT is bit 1), bit 40
/// EVENT_IDX, bits 48..56 and 56..64 the offset and size of a config-space read, and a
/// one-byte config-space write at that offset. All six queues are served by
/// one `handle_event` on the control TX queue (3): driver control messages
/// (DEVICE_READY, PORT_READY, PORT_OPEN and any nonsense), guest output on the TX queues,
/// and the device's control messages and input into the receive queues.
pub fn console_control(data: &[u8]) {
    use vhost_device_console::config::Endpoint;
    use vhost_device_console::port::Port;
    use vhost_device_console::{backend::ConsoleBackend, virtio};

    let (flags, image) = split(data);
    let ports: Vec<Arc<Port>> = (0..2u32)
        .map(|i| {
            Arc::new(Port::new(i, format!("p{i}"), Endpoint::Pty, 4096, None).expect("eventfds"))
        })
        .collect();
    // A host client typed something: the receive path has input to deliver.
    ports[0].push_input(b"ls\n");
    let backend = ConsoleBackend::new(ports);
    backend.acked_features(flags & FEATURES);
    backend.set_event_idx(flags & (1 << 40) != 0);
    let mem = GuestMemoryAtomic::new(memory(image));
    backend
        .update_memory(mem.clone())
        .expect("anonymous memory");
    let vrings: Vec<_> = (0..backend.num_queues()).map(|i| vring(&mem, i)).collect();
    let event = u16::try_from(virtio::CONTROL_TX_QUEUE).unwrap_or(3);
    let _ = backend.handle_event(event, EventSet::IN, &vrings, 0);
    let offset = ((flags >> 48) & 0xff) as u32;
    let size = (flags >> 56) as u32;
    std::hint::black_box(backend.get_config(offset, size));
    let _ = backend.set_config(offset, b"!");
    let _ = backend.handle_event(0, EventSet::IN, &vrings, 0);
}
