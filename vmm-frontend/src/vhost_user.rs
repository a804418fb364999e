//! A vhost-user daemon as the `VirtioBackend` of a virtio-pci function.
//!
//! At start: connect, `SET_OWNER`, `GET_FEATURES`, protocol features (MQ, CONFIG) and
//! `GET_QUEUE_NUM`. At DRIVER_OK, in the order Cloud Hypervisor's `setup_vhost_user` uses:
//! `SET_FEATURES` (the driver's acks), `SET_MEM_TABLE` (the memfd regions), then for each
//! enabled queue `SET_VRING_NUM`/`ADDR`/`BASE`/`CALL`/`KICK` and `SET_VRING_ENABLE`. Ring
//! addresses are sent as this process' virtual addresses, as the protocol wants. At reset:
//! `SET_VRING_ENABLE(0)` and `GET_VRING_BASE` on every started queue, which stops it.
//! Device configuration space goes through `GET_CONFIG`/`SET_CONFIG`.
//!
//! Reconnection: a daemon that hangs up is reported, and the VMM's main thread
//! ([`Reconnector`]) connects to its socket again every second. A restarted daemon gets the
//! same negotiation and, if the guest had started the device, the same features, memory
//! table and rings, each ring's base at the used index in guest memory (what QEMU does
//! after a back-end crash); the guest's kicks and interrupts go through the same eventfds.
//! A block daemon that offers `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` is given an in-flight
//! buffer when the device starts and gets it back after a restart, so it resubmits the
//! requests its predecessor had taken; the other devices process their rings in order, so
//! restarting from the used index redoes exactly what was not completed. After the replay
//! every ring is kicked and its interrupt raised once (the dead daemon may have swallowed
//! a kick or left used entries unsignalled), and a vsock guest gets a transport reset event
//! on the event queue the frontend serves, so it closes the connections the new daemon
//! does not know.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{DeviceConfig, DeviceKind};
use crate::memory::GuestMemory;
use crate::virtio_pci::{ActiveQueue, ConfigInterrupt, VirtioBackend};

/// `VHOST_USER_F_PROTOCOL_FEATURES`.
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;
/// Transport feature bits we pass through: INDIRECT_DESC, EVENT_IDX, VERSION_1.
const TRANSPORT_FEATURES: u64 = (1 << 28) | (1 << 29) | (1 << 32);
/// Queue size offered to the guest.
pub const QUEUE_SIZE: u16 = 256;

/// Failure to attach a daemon.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The socket could not be connected.
    #[error("cannot connect to the {kind} daemon at {socket} (is it running?)")]
    Connect {
        /// Device kind.
        kind: &'static str,
        /// Socket path.
        socket: String,
        /// Cause.
        #[source]
        source: vhost::Error,
    },
    /// A control message failed.
    #[error("{kind} daemon at {socket}: {step} failed")]
    Protocol {
        /// Device kind.
        kind: &'static str,
        /// Socket path.
        socket: String,
        /// The message.
        step: &'static str,
        /// Cause.
        #[source]
        source: vhost::Error,
    },
    /// The daemon lacks a feature we need.
    #[error("{kind} daemon at {socket} does not offer VIRTIO_F_VERSION_1")]
    NoVersion1 {
        /// Device kind.
        kind: &'static str,
        /// Socket path.
        socket: String,
    },
}

/// Device-specific features we can offer for `kind` (bits 0..24).
fn device_feature_mask(kind: DeviceKind, queues: u16) -> u64 {
    match kind {
        // Everything but the control-queue family: the daemon serves no control queue.
        // With several pairs the VMM serves it and offers CTRL_VQ and MQ itself.
        DeviceKind::Net => {
            let ctrl = (1 << 2)
                | (1 << 17)
                | (1 << 18)
                | (1 << 19)
                | (1 << 20)
                | (1 << 21)
                | (1 << 22)
                | (1 << 23);
            let _ = queues;
            0xff_ffff & !ctrl
        }
        _ => 0xff_ffff,
    }
}

/// Queues the guest sees for `kind`, given the CLI's count and what the daemon serves.
fn guest_queues(kind: DeviceKind, cli_queues: u16, daemon_queues: Option<u64>) -> u16 {
    let cap =
        |n: u16| daemon_queues.map_or(n, |d| n.min(u16::try_from(d).unwrap_or(u16::MAX)).max(1));
    match kind {
        DeviceKind::Blk => cap(cli_queues),
        // One rx/tx pair, or N pairs and the control queue the VMM serves.
        DeviceKind::Net => crate::net_ctrl::layout(cli_queues, daemon_queues).0,
        // rx, tx and the event queue (the event queue stays with the frontend, as in QEMU).
        DeviceKind::Vsock => 3,
        DeviceKind::Console => {
            daemon_queues.map_or(2, |d| u16::try_from(d).unwrap_or(2).clamp(2, 64))
        }
    }
}

/// Queues handed to the daemon (the vsock event queue is not).
fn daemon_queue_count(kind: DeviceKind, guest: u16) -> u16 {
    match kind {
        DeviceKind::Vsock => 2,
        // Not the net control queue.
        DeviceKind::Net if guest > 2 => guest - 1,
        _ => guest,
    }
}

/// A ring the guest started, kept to set it up again on a restarted daemon.
#[derive(Debug)]
struct Ring {
    index: usize,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    call: EventFd,
}

/// What the guest started: the features it acked and its rings.
#[derive(Debug)]
struct Running {
    acked: u64,
    rings: Vec<Ring>,
    /// The vsock event queue, which the frontend serves: after a restart it tells the
    /// guest that the transport was reset.
    vsock_event: Option<Ring>,
}

/// Serves the daemon's requests on the backend channel (`SET_BACKEND_REQ_FD`): a
/// configuration change (a disk that grew, a console resized) raises the device's
/// configuration interrupt.
#[derive(Debug, Default)]
struct BackendRequests {
    irq: Mutex<Option<ConfigInterrupt>>,
}

impl VhostUserFrontendReqHandler for BackendRequests {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        let irq = self
            .irq
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match irq {
            Some(irq) if irq.trigger() => log::info!("the daemon reports a configuration change"),
            _ => log::warn!(
                "the daemon reports a configuration change the driver has no interrupt for"
            ),
        }
        Ok(0)
    }
}

/// What one daemon connection negotiated before the guest runs.
struct Negotiated {
    frontend: Frontend,
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    daemon_queues: Option<u64>,
}

/// The connection to one daemon, shared by the device (vCPU threads) and its
/// [`Reconnector`] (the main thread).
struct Conn {
    kind: DeviceKind,
    socket: String,
    path: std::path::PathBuf,
    frontend: Frontend,
    mem: GuestMemory,
    backend_features: u64,
    guest_features: u64,
    protocol: VhostUserProtocolFeatures,
    daemon_queues: u16,
    running: Option<Running>,
    inflight: Option<(VhostUserInflight, File)>,
    local_config: Option<Vec<u8>>,
    requests: Arc<BackendRequests>,
    broken: bool,
    /// Rings below this index are enabled (net: 2 x the pairs the guest chose).
    enabled_rings: usize,
}

/// One attached daemon.
pub struct VhostUserDevice {
    conn: Arc<Mutex<Conn>>,
    kind: DeviceKind,
    queues: u16,
    guest_features: u64,
    /// Net queue pairs (several: the VMM serves the control queue).
    net_pairs: u16,
    ctrl: Option<crate::net_ctrl::CtrlQueue>,
}

impl std::fmt::Debug for VhostUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// Protocol features the frontend uses when the daemon offers them.
fn wanted_protocol(kind: DeviceKind) -> VhostUserProtocolFeatures {
    let mut p = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::BACKEND_REQ;
    if kind == DeviceKind::Blk {
        p |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    }
    p
}

/// Connects to the daemon at `path` and negotiates owner, features and protocol features,
/// and opens the backend channel (served by a thread of its own, which ends with the
/// connection) when the daemon has one.
fn negotiate(
    kind: DeviceKind,
    path: &std::path::Path,
    socket: &str,
    requests: &Arc<BackendRequests>,
) -> Result<Negotiated, VhostUserError> {
    let name = kind.name();
    let perr = |step: &'static str| {
        let socket = socket.to_string();
        move |source| VhostUserError::Protocol {
            kind: name,
            socket,
            step,
            source,
        }
    };
    let mut frontend = Frontend::connect(path, 64).map_err(|source| VhostUserError::Connect {
        kind: name,
        socket: socket.to_string(),
        source,
    })?;
    frontend.set_owner().map_err(perr("SET_OWNER"))?;
    let backend_features = frontend.get_features().map_err(perr("GET_FEATURES"))?;
    if backend_features & (1 << 32) == 0 {
        return Err(VhostUserError::NoVersion1 {
            kind: name,
            socket: socket.to_string(),
        });
    }
    let mut protocol = VhostUserProtocolFeatures::empty();
    let mut daemon_queues = None;
    if backend_features & PROTOCOL_FEATURES_BIT != 0 {
        let offered = frontend
            .get_protocol_features()
            .map_err(perr("GET_PROTOCOL_FEATURES"))?;
        protocol = offered & wanted_protocol(kind);
        frontend
            .set_protocol_features(protocol)
            .map_err(perr("SET_PROTOCOL_FEATURES"))?;
        if protocol.contains(VhostUserProtocolFeatures::MQ) {
            daemon_queues = Some(frontend.get_queue_num().map_err(perr("GET_QUEUE_NUM"))?);
        }
        if protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            let mut channel = FrontendReqHandler::new(requests.clone())
                .map_err(|e| perr("creating the backend channel")(e.into()))?;
            frontend
                .set_backend_request_fd(&channel.get_tx_raw_fd())
                .map_err(perr("SET_BACKEND_REQ_FD"))?;
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-backend-req"))
                .spawn(move || while channel.handle_request().is_ok() {});
            if let Err(e) = spawned {
                log::warn!("{name} daemon at {socket}: no backend channel thread: {e}");
            }
        }
    }
    Ok(Negotiated {
        frontend,
        backend_features,
        protocol,
        daemon_queues,
    })
}

/// Locks a connection; a vCPU thread that panicked while holding it leaves it usable.
fn lock(conn: &Mutex<Conn>) -> MutexGuard<'_, Conn> {
    conn.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl VhostUserDevice {
    /// Connects to the daemon of `cfg` and negotiates what can be before the guest runs.
    pub fn connect(cfg: &DeviceConfig, mem: GuestMemory) -> Result<Self, VhostUserError> {
        let kind = cfg.kind.name();
        let socket = cfg.socket.display().to_string();
        let requests = Arc::new(BackendRequests::default());
        let Negotiated {
            frontend,
            backend_features,
            protocol,
            daemon_queues,
        } = negotiate(cfg.kind, &cfg.socket, &socket, &requests)?;
        let queues = guest_queues(cfg.kind, cfg.queues, daemon_queues);
        let mut guest_features =
            backend_features & (device_feature_mask(cfg.kind, cfg.queues) | TRANSPORT_FEATURES);
        let net_pairs = match cfg.kind {
            DeviceKind::Net => crate::net_ctrl::layout(cfg.queues, daemon_queues).1,
            _ => 1,
        };
        if net_pairs > 1 {
            guest_features |=
                crate::net_ctrl::VIRTIO_NET_F_CTRL_VQ | crate::net_ctrl::VIRTIO_NET_F_MQ;
        }
        if cfg.kind == DeviceKind::Net && cfg.queues > net_pairs {
            log::warn!(
                "net daemon at {socket}: {net_pairs} queue pair(s), not {} (the daemon serves {daemon_queues:?} queues)",
                cfg.queues
            );
        }
        if cfg.kind == DeviceKind::Blk && queues == 1 {
            guest_features &= !(1 << 12); // VIRTIO_BLK_F_MQ
        }
        let has_config = protocol.contains(VhostUserProtocolFeatures::CONFIG);
        let local_config = local_config(cfg, has_config);
        if let (DeviceKind::Net, Some(_)) = (cfg.kind, &local_config) {
            guest_features |= 1 << 5 | 1 << 16; // VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS
        }
        log::info!(
            "{kind} daemon at {socket}: features {backend_features:#x}, protocol {:#x}, {queues} queue(s)",
            protocol.bits()
        );
        let conn = Conn {
            kind: cfg.kind,
            socket,
            path: cfg.socket.clone(),
            frontend,
            mem,
            backend_features,
            guest_features,
            protocol,
            daemon_queues: daemon_queue_count(cfg.kind, queues),
            running: None,
            inflight: None,
            local_config,
            requests,
            broken: false,
            enabled_rings: usize::MAX,
        };
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            kind: cfg.kind,
            queues,
            guest_features,
            net_pairs,
            ctrl: None,
        })
    }

    /// The handle the main thread uses to watch the daemon and reconnect to it.
    pub fn reconnector(&self) -> Reconnector {
        Reconnector {
            conn: self.conn.clone(),
        }
    }
}

/// Watches one daemon's connection and connects again when it went away.
#[derive(Clone)]
pub struct Reconnector {
    conn: Arc<Mutex<Conn>>,
}

impl std::fmt::Debug for Reconnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconnector").finish_non_exhaustive()
    }
}

impl Reconnector {
    /// The socket's descriptor, to watch for the daemon hanging up.
    pub fn raw_fd(&self) -> RawFd {
        lock(&self.conn).frontend.as_raw_fd()
    }

    /// Marks the daemon gone: the device answers the guest locally until it is back.
    pub fn disconnected(&self) {
        lock(&self.conn).broken = true;
    }

    /// Connects to the daemon's socket again and replays what the guest had set up.
    /// Returns the new socket's descriptor.
    pub fn reconnect(&self) -> Result<RawFd, String> {
        let mut c = lock(&self.conn);
        let n = negotiate(c.kind, &c.path.clone(), &c.socket, &c.requests.clone())
            .map_err(|e| e.to_string())?;
        // What the guest may have acked of the old daemon's offer must be there again.
        let needed = c.backend_features & c.guest_features;
        if n.backend_features & needed != needed || n.protocol & c.protocol != c.protocol {
            return Err(format!(
                "the restarted daemon offers features {:#x} (protocol {:#x}), not all of \
                 {:#x} (protocol {:#x}) the guest uses",
                n.backend_features,
                n.protocol.bits(),
                needed,
                c.protocol.bits()
            ));
        }
        c.frontend = n.frontend;
        c.backend_features = n.backend_features;
        c.replay()?;
        c.broken = false;
        // The dead daemon may have read a kick it never acted on, or published used
        // entries it never signalled; with EVENT_IDX the guest would then wait for ever
        // (it kicks only when its avail index crosses the event the dead daemon left). So
        // kick every ring once, and interrupt the guest once: both are spurious at worst.
        for r in c.running.iter().flat_map(|r| &r.rings) {
            let _ = r.kick.write(1);
            let _ = r.call.write(1);
        }
        // The restarted vsock daemon knows none of the guest's connections: tell the guest,
        // which then closes them with ECONNRESET (as after a migration) instead of leaving
        // them hanging, and frees their ports for new connections.
        if let Some(ev) = c.running.as_ref().and_then(|r| r.vsock_event.as_ref()) {
            match push_transport_reset(&c.mem, ev) {
                Ok(true) => log::info!("{}: sent the guest a vsock transport reset", c.socket),
                Ok(false) => log::warn!(
                    "{}: the guest has no event buffer: no vsock transport reset sent",
                    c.socket
                ),
                Err(err) => log::warn!("{}: vsock transport reset: {err}", c.socket),
            }
        }
        Ok(c.frontend.as_raw_fd())
    }
}

impl Conn {
    fn mem_regions(&self) -> Result<Vec<VhostUserMemoryRegionInfo>, vhost::Error> {
        self.mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect()
    }

    fn host_addr(&self, gpa: u64) -> Result<u64, String> {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|_| format!("ring address {gpa:#x} is outside guest memory"))
    }

    fn start(&mut self, features: u64, queues: &[ActiveQueue<'_>]) -> Result<(), String> {
        let mut acked = features & self.backend_features;
        if self.backend_features & PROTOCOL_FEATURES_BIT != 0 {
            acked |= PROTOCOL_FEATURES_BIT;
        }
        let ring = |q: &ActiveQueue<'_>| -> Result<Ring, String> {
            let dup = |fd: &EventFd| {
                fd.try_clone()
                    .map_err(|e| format!("dup of an eventfd: {e}"))
            };
            Ok(Ring {
                index: usize::from(q.index),
                size: q.size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                kick: dup(q.kick)?,
                call: dup(q.call)?,
            })
        };
        let rings = queues
            .iter()
            .filter(|q| q.index < self.daemon_queues)
            .map(ring)
            .collect::<Result<Vec<_>, String>>()?;
        let vsock_event = match queues.iter().find(|q| q.index == VSOCK_EVENT_QUEUE) {
            Some(q) if self.kind == DeviceKind::Vsock => Some(ring(q)?),
            _ => None,
        };
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
            && self.inflight.is_none()
        {
            let ask = VhostUserInflight::new(0, 0, self.daemon_queues, QUEUE_SIZE);
            let got = self
                .frontend
                .get_inflight_fd(&ask)
                .map_err(|err| format!("GET_INFLIGHT_FD: {err}"))?;
            self.inflight = Some(got);
        }
        self.running = Some(Running {
            acked,
            rings,
            vsock_event,
        });
        self.replay()
    }

    /// Sends the guest's device set-up to the daemon: in-flight buffer, features, memory
    /// table, then every ring, based at the used index the guest memory holds now (0 for a
    /// fresh ring).
    fn replay(&mut self) -> Result<(), String> {
        let e = |step: &'static str| move |err: vhost::Error| format!("{step}: {err}");
        let Some(running) = &self.running else {
            return Ok(());
        };
        if let Some((msg, file)) = &self.inflight {
            self.frontend
                .set_inflight_fd(msg, file.as_raw_fd())
                .map_err(e("SET_INFLIGHT_FD"))?;
        }
        self.frontend
            .set_features(running.acked)
            .map_err(e("SET_FEATURES"))?;
        let regions = self.mem_regions().map_err(e("memory regions"))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(e("SET_MEM_TABLE"))?;
        for r in &running.rings {
            let ring = VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: r.size,
                flags: 0,
                desc_table_addr: self.host_addr(r.desc)?,
                used_ring_addr: self.host_addr(r.used)?,
                avail_ring_addr: self.host_addr(r.avail)?,
                log_addr: None,
            };
            let base: u16 = self
                .mem
                .read_obj(GuestAddress(r.used).unchecked_add(2))
                .map_err(|err| format!("reading the used index: {err}"))?;
            let i = r.index;
            self.frontend
                .set_vring_num(i, r.size)
                .map_err(e("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(i, &ring)
                .map_err(e("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(i, base)
                .map_err(e("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(i, &r.call)
                .map_err(e("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(i, &r.kick)
                .map_err(e("SET_VRING_KICK"))?;
            if running.acked & PROTOCOL_FEATURES_BIT != 0 {
                self.frontend
                    .set_vring_enable(i, i < self.enabled_rings)
                    .map_err(e("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    fn report(&mut self, what: &str, err: &dyn std::fmt::Display) {
        if !self.broken {
            log::error!(
                "{} daemon at {}: {what}: {err}",
                self.kind.name(),
                self.socket
            );
        }
        self.broken = true;
    }
}

/// The vsock event queue's index (rx, tx, event).
const VSOCK_EVENT_QUEUE: u16 = 2;
/// `VIRTQ_DESC_F_WRITE`.
const DESC_F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT`.
const DESC_F_INDIRECT: u16 = 4;

/// Puts a `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` event (`le32 id = 0`) in the next buffer
/// of the vsock event queue `ring` and interrupts the guest. The frontend is the only
/// producer of that queue's used ring, so its used index is also the next available entry
/// to take. Returns `Ok(false)` when the guest has posted no buffer. The ring is guest
/// memory: every index and address is checked, and a bad buffer is an error, not a crash.
fn push_transport_reset(mem: &GuestMemory, ring: &Ring) -> Result<bool, String> {
    let rd = |a: u64| -> Result<u16, String> {
        mem.read_obj(GuestAddress(a))
            .map_err(|e| format!("reading the event ring: {e}"))
    };
    if ring.size == 0 {
        return Ok(false);
    }
    let used_idx = rd(ring.used.wrapping_add(2))?;
    let avail_idx = rd(ring.avail.wrapping_add(2))?;
    if avail_idx == used_idx {
        return Ok(false);
    }
    let slot = u64::from(used_idx % ring.size);
    let head = rd(ring.avail.wrapping_add(4 + 2 * slot))?;
    if head >= ring.size {
        return Err(format!(
            "descriptor {head} is past the ring of {}",
            ring.size
        ));
    }
    let desc = ring.desc.wrapping_add(16 * u64::from(head));
    let addr: u64 = mem
        .read_obj(GuestAddress(desc))
        .map_err(|e| format!("reading descriptor {head}: {e}"))?;
    let len: u32 = mem
        .read_obj(GuestAddress(desc.wrapping_add(8)))
        .map_err(|e| format!("reading descriptor {head}: {e}"))?;
    let flags = rd(desc.wrapping_add(12))?;
    if flags & DESC_F_WRITE == 0 || flags & DESC_F_INDIRECT != 0 || len < 4 {
        return Err(format!(
            "descriptor {head} (flags {flags:#x}, {len} bytes) cannot take an event"
        ));
    }
    mem.write_obj(0u32, GuestAddress(addr))
        .map_err(|e| format!("writing the event: {e}"))?;
    let elem = ring.used.wrapping_add(4 + 8 * slot);
    mem.write_obj(u32::from(head), GuestAddress(elem))
        .and_then(|()| mem.write_obj(4u32, GuestAddress(elem.wrapping_add(4))))
        .map_err(|e| format!("writing the used ring: {e}"))?;
    // The element must be visible before the index that publishes it.
    std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
    mem.write_obj(
        used_idx.wrapping_add(1),
        GuestAddress(ring.used.wrapping_add(2)),
    )
    .map_err(|e| format!("writing the used index: {e}"))?;
    ring.call
        .write(1)
        .map_err(|e| format!("interrupting the guest: {e}"))?;
    Ok(true)
}

/// Configuration space the frontend serves itself: net when a MAC is given or the daemon
/// has no CONFIG, vsock when the daemon has no CONFIG.
fn local_config(cfg: &DeviceConfig, daemon_has_config: bool) -> Option<Vec<u8>> {
    match cfg.kind {
        DeviceKind::Net if cfg.mac.is_some() || !daemon_has_config => {
            let mac = cfg.mac.unwrap_or([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
            let mut c = mac.to_vec();
            c.extend_from_slice(&1u16.to_le_bytes()); // status: link up
            c.extend_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
            Some(c)
        }
        DeviceKind::Vsock if !daemon_has_config => {
            Some(cfg.cid.unwrap_or(3).to_le_bytes().to_vec())
        }
        _ => None,
    }
}

impl Conn {
    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(c) = &self.local_config {
            for (i, d) in data.iter_mut().enumerate() {
                let idx = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
                *d = idx.and_then(|o| c.get(o)).copied().unwrap_or(0);
            }
            return;
        }
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) || self.broken {
            return;
        }
        let (Ok(off), Ok(len)) = (u32::try_from(offset), u32::try_from(data.len())) else {
            return;
        };
        let zeros = vec![0u8; data.len()];
        match self
            .frontend
            .get_config(off, len, VhostUserConfigFlags::WRITABLE, &zeros)
        {
            Ok((_, payload)) => {
                let n = payload.len().min(data.len());
                data[..n].copy_from_slice(&payload[..n]);
            }
            Err(vhost::Error::VhostUserProtocol(
                vhost::vhost_user::Error::BackendInternalError,
            )) => {
                // Past the end of the daemon's config space: zeros, as a device would.
            }
            Err(err) => self.report("GET_CONFIG", &err),
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if self.local_config.is_some() || !self.protocol.contains(VhostUserProtocolFeatures::CONFIG)
        {
            return;
        }
        let Ok(off) = u32::try_from(offset) else {
            return;
        };
        if let Err(err) = self
            .frontend
            .set_config(off, VhostUserConfigFlags::WRITABLE, data)
        {
            self.report("SET_CONFIG", &err);
        }
    }

    fn reset(&mut self) {
        // A reset device starts afresh: QEMU drops the in-flight buffer too.
        self.inflight = None;
        let started: Vec<usize> = self
            .running
            .take()
            .map(|r| r.rings.iter().map(|ring| ring.index).collect())
            .unwrap_or_default();
        if self.broken {
            return;
        }
        let has_enable = self.backend_features & PROTOCOL_FEATURES_BIT != 0;
        for i in started {
            if has_enable {
                if let Err(err) = self.frontend.set_vring_enable(i, false) {
                    self.report("SET_VRING_ENABLE", &err);
                    return;
                }
            }
            if let Err(err) = self.frontend.get_vring_base(i) {
                self.report("GET_VRING_BASE", &err);
                return;
            }
        }
    }
}

impl VirtioBackend for VhostUserDevice {
    fn device_type(&self) -> u16 {
        match self.kind {
            DeviceKind::Net => 1,
            DeviceKind::Blk => 2,
            DeviceKind::Console => 3,
            DeviceKind::Vsock => 19,
        }
    }

    fn num_queues(&self) -> u16 {
        self.queues
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.guest_features
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.conn).read_config(offset, data);
        if self.net_pairs > 1 {
            crate::net_ctrl::patch_config(offset, data, self.net_pairs);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        lock(&self.conn).write_config(offset, data);
    }

    fn activate(&mut self, features: u64, queues: &[ActiveQueue<'_>]) -> Result<(), String> {
        self.ctrl = None;
        let mut c = lock(&self.conn);
        // With several pairs, only the first is used until the driver asks for more.
        c.enabled_rings = if self.net_pairs > 1 { 2 } else { usize::MAX };
        let r = c.start(features, queues);
        if let Err(e) = &r {
            c.report("starting the device", e);
        }
        let mem = c.mem.clone();
        drop(c);
        // Only a net device with several pairs has a control queue (the VMM's): the queue
        // at that index on another device (a console's control queue) is the daemon's.
        let ctrl_index = self.net_pairs.saturating_mul(2);
        let ctrl_queue = queues
            .iter()
            .find(|q| self.kind == DeviceKind::Net && self.net_pairs > 1 && q.index == ctrl_index);
        if let (Ok(()), Some(q)) = (&r, ctrl_queue) {
            let conn = self.conn.clone();
            let set_pairs = Box::new(move |n| lock(&conn).set_pairs(n));
            self.ctrl = Some(crate::net_ctrl::start(
                mem,
                q,
                features,
                self.net_pairs,
                set_pairs,
            )?);
        }
        r
    }

    fn reset(&mut self) {
        // Stops the control queue's thread first: it takes the connection's lock.
        self.ctrl = None;
        lock(&self.conn).reset();
    }

    fn set_config_interrupt(&mut self, irq: ConfigInterrupt) {
        let requests = lock(&self.conn).requests.clone();
        *requests
            .irq
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(irq);
    }
}

impl Conn {
    /// The guest's `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`: enables the first `pairs` pairs of
    /// the daemon's rings and disables the others. The set is remembered, so a restarted
    /// daemon gets the same from `replay`; a daemon that is gone gets it then.
    fn set_pairs(&mut self, pairs: u16) -> bool {
        self.enabled_rings = 2 * usize::from(pairs);
        if self.broken {
            return true;
        }
        let started: Vec<usize> = self
            .running
            .iter()
            .flat_map(|r| &r.rings)
            .map(|r| r.index)
            .collect();
        for i in started {
            if let Err(err) = self.frontend.set_vring_enable(i, i < self.enabled_rings) {
                self.report("SET_VRING_ENABLE", &err);
                return true;
            }
        }
        log::info!("{}: the guest uses {pairs} queue pair(s)", self.socket);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn dev(kind: DeviceKind, mac: Option<[u8; 6]>) -> DeviceConfig {
        DeviceConfig {
            kind,
            socket: PathBuf::from("/s"),
            queues: 1,
            mac,
            cid: Some(7),
        }
    }

    #[test]
    fn queue_layouts() {
        assert_eq!(guest_queues(DeviceKind::Blk, 4, Some(2)), 2);
        assert_eq!(guest_queues(DeviceKind::Blk, 2, None), 2);
        assert_eq!(guest_queues(DeviceKind::Blk, 2, Some(0)), 1);
        assert_eq!(guest_queues(DeviceKind::Net, 1, Some(3)), 2);
        assert_eq!(
            guest_queues(DeviceKind::Net, 2, Some(4)),
            5,
            "2 pairs and control"
        );
        assert_eq!(
            daemon_queue_count(DeviceKind::Net, 5),
            4,
            "not the control queue"
        );
        assert_eq!(daemon_queue_count(DeviceKind::Net, 2), 2);
        assert_eq!(guest_queues(DeviceKind::Vsock, 1, Some(2)), 3);
        assert_eq!(daemon_queue_count(DeviceKind::Vsock, 3), 2);
        assert_eq!(guest_queues(DeviceKind::Console, 1, Some(6)), 6);
        assert_eq!(guest_queues(DeviceKind::Console, 1, None), 2);
        assert_eq!(guest_queues(DeviceKind::Console, 1, Some(u64::MAX)), 2);
    }

    #[test]
    fn net_masks_control_queue_features() {
        let m = device_feature_mask(DeviceKind::Net, 1);
        assert_eq!(m & (1 << 17), 0, "CTRL_VQ");
        assert_eq!(m & (1 << 22), 0, "MQ");
        assert_ne!(m & (1 << 5), 0, "MAC");
        assert_ne!(m & 1, 0, "CSUM");
    }

    #[test]
    fn local_configs() {
        let c = local_config(&dev(DeviceKind::Net, Some([1, 2, 3, 4, 5, 6])), true).expect("net");
        assert_eq!(c, [1, 2, 3, 4, 5, 6, 1, 0, 1, 0]);
        assert!(local_config(&dev(DeviceKind::Net, None), true).is_none());
        assert_eq!(
            local_config(&dev(DeviceKind::Vsock, None), false).expect("vsock"),
            7u64.to_le_bytes()
        );
        assert!(local_config(&dev(DeviceKind::Vsock, None), true).is_none());
        assert!(local_config(&dev(DeviceKind::Blk, None), false).is_none());
    }

    fn event_ring(mem: &GuestMemory, flags: u16, head: u16) -> Ring {
        let ring = Ring {
            index: 2,
            size: 4,
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
            kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            call: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        };
        mem.write_obj(0x4000u64, GuestAddress(0x1000))
            .expect("addr");
        mem.write_obj(8u32, GuestAddress(0x1008)).expect("len");
        mem.write_obj(flags, GuestAddress(0x100c)).expect("flags");
        mem.write_obj(head, GuestAddress(0x2004)).expect("ring[0]");
        mem.write_obj(1u16, GuestAddress(0x2002))
            .expect("avail idx");
        mem.write_obj(u64::MAX, GuestAddress(0x4000))
            .expect("buffer");
        ring
    }

    #[test]
    fn transport_reset_fills_the_next_event_buffer() {
        let mem = crate::memory::create(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let ring = event_ring(&mem, DESC_F_WRITE, 0);
        assert_eq!(push_transport_reset(&mem, &ring), Ok(true));
        let event: u32 = mem.read_obj(GuestAddress(0x4000)).expect("event");
        assert_eq!(event, 0, "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");
        let used_idx: u16 = mem.read_obj(GuestAddress(0x3002)).expect("used idx");
        let id: u32 = mem.read_obj(GuestAddress(0x3004)).expect("id");
        let len: u32 = mem.read_obj(GuestAddress(0x3008)).expect("len");
        assert_eq!((used_idx, id, len), (1, 0, 4));
        assert_eq!(ring.call.read().expect("interrupt"), 1);
        // No buffer left: nothing written, no interrupt.
        assert_eq!(push_transport_reset(&mem, &ring), Ok(false));
        assert!(ring.call.read().is_err());
    }

    #[test]
    fn transport_reset_refuses_bad_buffers() {
        let mem = crate::memory::create(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        for (flags, head) in [
            (0, 0),
            (DESC_F_WRITE | DESC_F_INDIRECT, 0),
            (DESC_F_WRITE, 4),
        ] {
            let ring = event_ring(&mem, flags, head);
            assert!(
                push_transport_reset(&mem, &ring).is_err(),
                "{flags:#x} {head}"
            );
            let used_idx: u16 = mem.read_obj(GuestAddress(0x3002)).expect("used idx");
            assert_eq!(used_idx, 0);
        }
        // A buffer outside guest memory.
        let ring = event_ring(&mem, DESC_F_WRITE, 0);
        mem.write_obj(1u64 << 40, GuestAddress(0x1000))
            .expect("addr");
        assert!(push_transport_reset(&mem, &ring).is_err());
    }

    #[test]
    fn missing_daemon_names_the_socket() {
        let mem = crate::memory::create(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let cfg = DeviceConfig {
            kind: DeviceKind::Blk,
            socket: PathBuf::from("/nonexistent/blk.sock"),
            queues: 1,
            mac: None,
            cid: None,
        };
        let err = VhostUserDevice::connect(&cfg, mem).expect_err("no daemon");
        let s = err.to_string();
        assert!(
            s.contains("/nonexistent/blk.sock") && s.contains("blk"),
            "{s}"
        );
    }
}
