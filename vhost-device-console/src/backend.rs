//! The `VhostUserBackend`: serves the guest's queues for one frontend connection.
//!
//! All queues are served by one worker thread (a console moves little data, and the control
//! queue touches every port). Any event (a queue kick or a port's wake-up) runs one pass over
//! the device: control messages from the driver, host open/close and resize events, guest
//! output of every port, host input for every port the guest may receive on, and queued
//! control messages to the driver. Guest faults (bad chains, unknown control messages, bogus
//! port ids) are logged once per cause and per connection, and the device keeps serving.

use std::collections::{HashSet, VecDeque};
use std::io::{Read, Write};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex, MutexGuard};

use log::{info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use vhost_device_common::queue::{self, Chain, Memory};
use vhost_device_common::{ExitEvents, GuestMemoryAtomic};

use crate::control::{self, DriverMessage};
use crate::port::Port;
use crate::virtio::{self, ConsoleConfig};

/// The vring type served.
pub type Vring = VringRwLock<GuestMemoryAtomic>;

/// Largest queue size offered.
pub const QUEUE_SIZE: usize = 256;
/// Guest output read from one transmit chain at most; the rest is skipped (a guest fault).
pub const MAX_CHAIN_OUTPUT: usize = 1024 * 1024;
/// Control messages queued for the driver at most.
pub const MAX_PENDING_CONTROL: usize = 1024;
/// Bytes of a driver control message read at most (the header is 8).
const MAX_CONTROL_READ: usize = 64;

/// Per-port state of the guest side, for one connection.
#[derive(Debug, Default, Clone, Copy)]
struct GuestPort {
    /// The driver sent PORT_READY for it.
    ready: bool,
    /// The guest application has the port open (PORT_OPEN from the driver).
    open: bool,
    /// The last host open state told to the driver.
    host_open_sent: Option<bool>,
    /// The size generation last told to the driver (RESIZE).
    size_sent: u64,
}

/// What belongs to one frontend connection.
#[derive(Default)]
struct Connection {
    mem: Option<GuestMemoryAtomic>,
    event_idx: bool,
    acked: u64,
    device_ready: bool,
    ports: Vec<GuestPort>,
    control_out: VecDeque<Vec<u8>>,
    faults_logged: HashSet<&'static str>,
    /// The backend request channel, for config-change notifications.
    backend_req: Option<Backend>,
    /// Port 0's size generation the frontend last heard of through that channel.
    config_generation: u64,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("event_idx", &self.event_idx)
            .field("acked", &format_args!("{:#x}", self.acked))
            .field("device_ready", &self.device_ready)
            .field("ports", &self.ports)
            .field("control_out", &self.control_out.len())
            .field("backend_req", &self.backend_req.is_some())
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Logs a guest fault the first time its cause is seen on this connection.
    fn fault(&mut self, cause: &'static str, detail: &dyn std::fmt::Display) {
        if self.faults_logged.insert(cause) {
            warn!("guest fault: {cause}: {detail} (further ones of this kind are not logged)");
        }
    }

    fn queue_control(&mut self, msg: Vec<u8>) {
        if self.control_out.len() >= MAX_PENDING_CONTROL {
            self.fault("control queue not read", &"dropping a control message");
            return;
        }
        self.control_out.push_back(msg);
    }

    /// Forgets the guest side: the driver (re)initializes the device.
    fn reset(&mut self, ports: usize) {
        self.device_ready = false;
        self.ports = vec![GuestPort::default(); ports];
        self.control_out.clear();
    }
}

#[derive(Debug)]
struct Inner {
    ports: Vec<Arc<Port>>,
    multiport: bool,
    num_queues: usize,
    conn: Mutex<Connection>,
    notifier: Arc<ConfigNotifier>,
}

/// Sends config-change notifications off the worker thread. With `REPLY_ACK` the sender
/// waits for the frontend's answer, and a frontend that never answers (Cloud Hypervisor did
/// not, before its fix) must not stall the queues; so one helper thread at a time sends, and
/// changes that come in meanwhile are folded into one more notification.
#[derive(Debug, Default)]
struct ConfigNotifier {
    /// (a thread is sending, another change came in since it started)
    state: Mutex<(bool, bool)>,
}

impl ConfigNotifier {
    fn notify(self: &Arc<Self>, channel: Backend) {
        {
            let mut state = self
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if state.0 {
                state.1 = true;
                return;
            }
            *state = (true, false);
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("console-config".into())
            .spawn(move || loop {
                if let Err(e) = channel.handle_config_change() {
                    warn!("the frontend refused a config-change notification: {e}");
                }
                let mut state = me
                    .state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if state.1 {
                    state.1 = false;
                } else {
                    state.0 = false;
                    return;
                }
            });
        if let Err(e) = spawned {
            warn!("cannot start a thread for a config-change notification: {e}");
            *self
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = (false, false);
        }
    }
}

/// The console backend of one frontend connection; cheap to clone.
#[derive(Debug, Clone)]
pub struct ConsoleBackend {
    inner: Arc<Inner>,
}

impl ConsoleBackend {
    /// A backend serving `ports` (MULTIPORT is offered with more than one).
    pub fn new(ports: Vec<Arc<Port>>) -> Self {
        let count = u32::try_from(ports.len()).unwrap_or(u32::MAX);
        let mut conn = Connection::default();
        conn.reset(ports.len());
        ConsoleBackend {
            inner: Arc::new(Inner {
                multiport: ports.len() > 1,
                num_queues: virtio::num_queues(count),
                ports,
                conn: Mutex::new(conn),
                notifier: Arc::default(),
            }),
        }
    }

    /// The ports served.
    pub fn ports(&self) -> &[Arc<Port>] {
        &self.inner.ports
    }

    /// The custom epoll event id of `port`'s wake-up (queue ids and the exit event come
    /// first, as vhost-user-backend reserves them).
    pub fn wake_event_id(&self, port: usize) -> u64 {
        (self.inner.num_queues + 1 + port) as u64
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.inner
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One pass over the device (see the module documentation).
    fn pump(&self, vrings: &[Vring]) -> std::io::Result<()> {
        self.notify_config_change();
        let mut conn = self.conn();
        let Some(atomic) = conn.mem.clone() else {
            return Ok(());
        };
        let mem = atomic.memory();
        let event_idx = conn.event_idx;
        let multiport =
            self.inner.multiport && conn.acked & (1 << virtio::VIRTIO_CONSOLE_F_MULTIPORT) != 0;
        if multiport {
            if let Some(vring) = vrings.get(virtio::CONTROL_TX_QUEUE) {
                self.control_tx(&mut conn, vring, &mem, event_idx)?;
            }
            self.host_events(&mut conn);
        }
        let active = if multiport { self.inner.ports.len() } else { 1 };
        for (index, port) in self.inner.ports.iter().enumerate().take(active) {
            let id = port.id;
            if let Some(vring) = vrings.get(virtio::tx_queue(id)) {
                transmit(&mut conn, port, vring, &mem, event_idx)?;
            }
            let deliver = !multiport
                || conn
                    .ports
                    .get(index)
                    .is_some_and(|g| g.ready && (index == 0 || g.open));
            if deliver {
                if let Some(vring) = vrings.get(virtio::rx_queue(id)) {
                    receive(&mut conn, port, vring, &mem, event_idx)?;
                }
            }
        }
        if multiport {
            if let Some(vring) = vrings.get(virtio::CONTROL_RX_QUEUE) {
                control_rx(&mut conn, vring, &mem, event_idx)?;
            }
        }
        Ok(())
    }

    /// Tells the frontend that port 0's size (in the config space) changed, through the
    /// backend request channel, without holding the connection lock while it answers.
    fn notify_config_change(&self) {
        let Some(generation) = self.inner.ports.first().map(|p| p.lock().size_generation) else {
            return;
        };
        let channel = {
            let mut conn = self.conn();
            if conn.config_generation == generation {
                return;
            }
            conn.config_generation = generation;
            conn.backend_req.clone()
        };
        let Some(channel) = channel else { return };
        self.inner.notifier.notify(channel);
    }

    /// Reads the driver's control messages.
    fn control_tx(
        &self,
        conn: &mut Connection,
        vring: &Vring,
        mem: &Memory,
        event_idx: bool,
    ) -> std::io::Result<()> {
        if !enabled(vring) {
            return Ok(());
        }
        let mut messages = Vec::new();
        let mut faults = Vec::new();
        let count = queue::drain(vring, mem, event_idx, |chain: Chain| {
            let head = chain.head_index();
            match chain.reader(&**mem) {
                Ok(reader) => {
                    let mut bytes = Vec::with_capacity(control::HEADER_LEN);
                    match reader.take(MAX_CONTROL_READ as u64).read_to_end(&mut bytes) {
                        Ok(_) => messages.push(bytes),
                        Err(e) => faults.push(("unreadable control message", e.to_string())),
                    }
                }
                Err(e) => faults.push(("bad control chain", e.to_string())),
            }
            if let Err(e) = vring.add_used(head, 0) {
                faults.push(("cannot return a control buffer", e.to_string()));
            }
        })
        .map_err(std::io::Error::other)?;
        for (cause, detail) in faults {
            conn.fault(cause, &detail);
        }
        for bytes in messages {
            match control::parse(&bytes) {
                Ok(msg) => self.driver_message(conn, msg),
                Err(e) => conn.fault("bad control message", &e),
            }
        }
        if count > 0 {
            queue::notify(vring)?;
        }
        Ok(())
    }

    fn driver_message(&self, conn: &mut Connection, msg: DriverMessage) {
        let ports = &self.inner.ports;
        match msg {
            DriverMessage::DeviceReady(true) => {
                if conn.device_ready {
                    return;
                }
                conn.device_ready = true;
                for port in ports {
                    conn.queue_control(control::port_add(port.id));
                }
            }
            DriverMessage::DeviceReady(false) => {
                warn!("the guest driver failed to set the console device up");
            }
            DriverMessage::PortReady(id, ready) => {
                let Some(port) = ports.get(id as usize) else {
                    conn.fault("PORT_READY for a port that does not exist", &id);
                    return;
                };
                if !ready {
                    warn!("the guest driver failed to set port {id} up");
                    return;
                }
                let (attached, size, generation) = {
                    let s = port.lock();
                    (s.attached, s.size, s.size_generation)
                };
                if id == 0 {
                    conn.queue_control(control::console_port(0));
                    if let Some((cols, rows)) = size {
                        conn.queue_control(control::resize(0, cols, rows));
                    }
                }
                conn.queue_control(control::port_name(id, &port.name));
                conn.queue_control(control::port_open(id, attached));
                if let Some(g) = conn.ports.get_mut(id as usize) {
                    g.ready = true;
                    g.host_open_sent = Some(attached);
                    g.size_sent = generation;
                }
                info!("guest set port {id} ({}) up", port.name);
            }
            DriverMessage::PortOpen(id, open) => match conn.ports.get_mut(id as usize) {
                Some(g) => {
                    if g.open != open {
                        info!("guest {} port {id}", if open { "opened" } else { "closed" });
                    }
                    g.open = open;
                }
                None => conn.fault("PORT_OPEN for a port that does not exist", &id),
            },
        }
    }

    /// Tells the driver about clients that came or went and consoles that were resized.
    fn host_events(&self, conn: &mut Connection) {
        for (index, port) in self.inner.ports.iter().enumerate() {
            let Some(g) = conn.ports.get(index).copied() else {
                continue;
            };
            if !g.ready {
                continue;
            }
            let (attached, size, generation) = {
                let s = port.lock();
                (s.attached, s.size, s.size_generation)
            };
            if g.host_open_sent != Some(attached) {
                conn.queue_control(control::port_open(port.id, attached));
            }
            let resize = index == 0 && generation != g.size_sent;
            if let (true, Some((cols, rows))) = (resize, size) {
                conn.queue_control(control::resize(0, cols, rows));
            }
            if let Some(g) = conn.ports.get_mut(index) {
                g.host_open_sent = Some(attached);
                g.size_sent = generation;
            }
        }
    }
}

/// Whether the frontend enabled `vring` (a disabled ring must not be touched).
fn enabled(vring: &Vring) -> bool {
    vring.get_ref().is_enabled()
}

/// Guest output: transmit chains to the port, while it has room.
fn transmit(
    conn: &mut Connection,
    port: &Port,
    vring: &Vring,
    mem: &Memory,
    event_idx: bool,
) -> std::io::Result<()> {
    if !enabled(vring) || !port.output_room() {
        return Ok(());
    }
    let mut faults = Vec::new();
    let mut dropped = 0usize;
    let count = queue::drain_until(vring, mem, event_idx, |chain: Chain| {
        let head = chain.head_index();
        match chain.reader(&**mem) {
            Ok(reader) => {
                if reader.available_bytes() > MAX_CHAIN_OUTPUT {
                    faults.push((
                        "transmit chain too long",
                        reader.available_bytes().to_string(),
                    ));
                }
                let mut reader = reader.take(MAX_CHAIN_OUTPUT as u64);
                let mut buf = [0u8; 4096];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => dropped += port.guest_output(&buf[..n]),
                        Err(e) => {
                            faults.push(("unreadable transmit buffer", e.to_string()));
                            break;
                        }
                    }
                }
            }
            Err(e) => faults.push(("bad transmit chain", e.to_string())),
        }
        if let Err(e) = vring.add_used(head, 0) {
            faults.push(("cannot return a transmit buffer", e.to_string()));
        }
        if port.output_room() {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    })
    .map_err(std::io::Error::other)?;
    for (cause, detail) in faults {
        conn.fault(cause, &detail);
    }
    if dropped > 0 {
        warn!("port {}: client too slow, {dropped} bytes of output dropped for it (kept in the history)", port.id);
    }
    if count > 0 {
        queue::notify(vring)?;
    }
    Ok(())
}

/// Host input: the port's buffered input into receive chains.
fn receive(
    conn: &mut Connection,
    port: &Port,
    vring: &Vring,
    mem: &Memory,
    event_idx: bool,
) -> std::io::Result<()> {
    if !enabled(vring) || !port.has_input() {
        return Ok(());
    }
    let mut faults = Vec::new();
    let count = queue::drain_until(vring, mem, event_idx, |chain: Chain| {
        let head = chain.head_index();
        let written = match chain.writer(&**mem) {
            Ok(mut writer) => {
                let room = writer.available_bytes();
                if room == 0 {
                    faults.push(("receive chain without writable buffers", head.to_string()));
                }
                port.take_input(room, |bytes| writer.write(bytes).unwrap_or(0))
            }
            Err(e) => {
                faults.push(("bad receive chain", e.to_string()));
                0
            }
        };
        let written = u32::try_from(written).unwrap_or(u32::MAX);
        if let Err(e) = vring.add_used(head, written) {
            faults.push(("cannot return a receive buffer", e.to_string()));
        }
        if port.has_input() {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    })
    .map_err(std::io::Error::other)?;
    for (cause, detail) in faults {
        conn.fault(cause, &detail);
    }
    if count > 0 {
        queue::notify(vring)?;
    }
    Ok(())
}

/// Queued control messages into the control receive queue.
fn control_rx(
    conn: &mut Connection,
    vring: &Vring,
    mem: &Memory,
    event_idx: bool,
) -> std::io::Result<()> {
    if !enabled(vring) || conn.control_out.is_empty() {
        return Ok(());
    }
    let mut faults = Vec::new();
    let pending = &mut conn.control_out;
    let count = queue::drain_until(vring, mem, event_idx, |chain: Chain| {
        let head = chain.head_index();
        let mut written = 0;
        if let Some(msg) = pending.pop_front() {
            match chain.writer(&**mem) {
                Ok(mut writer) if writer.available_bytes() >= msg.len() => {
                    match writer.write_all(&msg) {
                        Ok(()) => written = msg.len(),
                        Err(e) => faults.push(("unwritable control buffer", e.to_string())),
                    }
                }
                Ok(writer) => faults.push((
                    "control buffer too small",
                    format!(
                        "{} bytes for a {}-byte message",
                        writer.available_bytes(),
                        msg.len()
                    ),
                )),
                Err(e) => faults.push(("bad control receive chain", e.to_string())),
            }
        }
        if let Err(e) = vring.add_used(head, u32::try_from(written).unwrap_or(0)) {
            faults.push(("cannot return a control buffer", e.to_string()));
        }
        if pending.is_empty() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .map_err(std::io::Error::other)?;
    for (cause, detail) in faults {
        conn.fault(cause, &detail);
    }
    if count > 0 {
        queue::notify(vring)?;
    }
    Ok(())
}

impl VhostUserBackend for ConsoleBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.inner.num_queues
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut f = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << virtio::VIRTIO_CONSOLE_F_SIZE)
            | (1 << virtio::VIRTIO_CONSOLE_F_EMERG_WRITE)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.inner.multiport {
            f |= 1 << virtio::VIRTIO_CONSOLE_F_MULTIPORT;
        }
        f
    }

    fn acked_features(&self, features: u64) {
        let mut conn = self.conn();
        conn.acked = features;
        // SET_FEATURES starts every driver initialization: forget the previous one.
        conn.reset(self.inner.ports.len());
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        let generation = self
            .inner
            .ports
            .first()
            .map_or(0, |p| p.lock().size_generation);
        let mut conn = self.conn();
        conn.backend_req = Some(backend);
        // Only changes from now on are news to this frontend.
        conn.config_generation = generation;
    }

    fn reset_device(&self) {
        self.conn().reset(self.inner.ports.len());
    }

    fn set_event_idx(&self, enabled: bool) {
        self.conn().event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let (cols, rows) = self
            .inner
            .ports
            .first()
            .and_then(|p| p.lock().size)
            .unwrap_or((0, 0));
        let ports = if self.inner.multiport {
            u32::try_from(self.inner.ports.len()).unwrap_or(0)
        } else {
            1
        };
        ConsoleConfig::new(cols, rows, ports).read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> std::io::Result<()> {
        // Only emerg_wr is writable: a character for port 0, even before queues exist.
        let at = virtio::EMERG_WR_OFFSET
            .checked_sub(offset)
            .and_then(|i| buf.get(i as usize));
        match (at, self.inner.ports.first()) {
            (Some(&byte), Some(port)) => {
                port.guest_output(&[byte]);
            }
            _ => self
                .conn()
                .fault("write to a read-only config field", &offset),
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic) -> std::io::Result<()> {
        // A region past the end of its file would kill the daemon with SIGBUS.
        vhost_device_common::memory::refuse_unbacked(&mem)?;
        self.conn().mem = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let n = self.inner.num_queues;
        vec![if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        ExitEvents::pair()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        let event = usize::from(device_event);
        if let Some(port) = event
            .checked_sub(self.inner.num_queues + 1)
            .and_then(|i| self.inner.ports.get(i))
        {
            let _ = port.guest_wake.read();
        }
        // An error here is a broken queue (rings outside guest memory, a bogus index). It is
        // not returned: vhost-user-backend would end the worker and with it every other port.
        if let Err(e) = self.pump(vrings) {
            self.conn().fault("queue failure", &e);
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // small test indices and lengths
mod tests {
    use super::*;
    use crate::config::Endpoint;
    use vhost_device_common::GuestMemory;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    const WRITE: u16 = 2; // VRING_DESC_F_WRITE
    const QSIZE: u16 = 16;
    const DATA: u64 = 0x10_0000;

    /// A backend over `ports` ports with every queue set up in mock guest memory.
    struct Bench {
        backend: ConsoleBackend,
        mem: GuestMemory,
        vrings: Vec<Vring>,
        /// Per queue: descriptor table, available ring, used ring addresses.
        rings: Vec<(u64, u64, u64)>,
        next_data: u64,
    }

    impl Bench {
        fn new(ports: u32, features: u64) -> Self {
            let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
            let atomic = GuestMemoryAtomic::new(mem.clone());
            let ports: Vec<Arc<Port>> = (0..ports)
                .map(|i| {
                    Arc::new(Port::new(i, format!("p{i}"), Endpoint::Pty, 1024, None).unwrap())
                })
                .collect();
            let backend = ConsoleBackend::new(ports);
            backend.acked_features(features);
            backend.update_memory(atomic.clone()).unwrap();
            let mut vrings = Vec::new();
            let mut rings = Vec::new();
            for i in 0..backend.num_queues() {
                // The mock lays the rings out (and zeroes them) once; the test then drives
                // them through guest memory like a driver.
                let q = MockSplitQueue::create(&mem, GuestAddress(0x1000 * i as u64), QSIZE);
                let addrs = (q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0);
                let v = Vring::new(atomic.clone(), QSIZE).unwrap();
                v.set_queue_info(addrs.0, addrs.1, addrs.2).unwrap();
                v.set_queue_size(QSIZE);
                v.set_queue_ready(true);
                v.set_enabled(true);
                vrings.push(v);
                rings.push(addrs);
            }
            Bench {
                backend,
                mem,
                vrings,
                rings,
                next_data: DATA,
            }
        }

        /// A buffer with `data` in guest memory.
        fn buffer(&mut self, data: &[u8]) -> u64 {
            let addr = self.next_data;
            self.mem.write_slice(data, GuestAddress(addr)).unwrap();
            self.next_data += 0x1000;
            addr
        }

        /// Publishes one chain of `(addr, len, flags)` on queue `q` at descriptor `offset`.
        fn chain(&self, q: usize, offset: u16, descs: &[(u64, u32, u16)]) {
            let (desc, avail, _) = self.rings[q];
            let n = descs.len() as u16;
            for (i, &(addr, len, flags)) in (0u16..).zip(descs) {
                let (flags, next) = if i + 1 < n {
                    (flags | 1, offset + i + 1)
                } else {
                    (flags, 0)
                };
                let at = GuestAddress(desc + 16 * u64::from(offset + i));
                self.mem.write_obj(addr, at).unwrap();
                self.mem.write_obj(len, at.unchecked_add(8)).unwrap();
                self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
                self.mem.write_obj(next, at.unchecked_add(14)).unwrap();
            }
            let idx: u16 = self.mem.read_obj(GuestAddress(avail + 2)).unwrap();
            let slot = GuestAddress(avail + 4 + 2 * u64::from(idx % QSIZE));
            self.mem.write_obj(offset, slot).unwrap();
            self.mem
                .write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
                .unwrap();
        }

        fn kick(&self, q: usize) {
            self.backend
                .handle_event(q as u16, EventSet::IN, &self.vrings, 0)
                .unwrap();
        }

        /// The used entries of queue `q` as (head, len).
        fn used(&self, q: usize) -> Vec<(u32, u32)> {
            let (_, _, used) = self.rings[q];
            let n: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
            (0..u64::from(n))
                .map(|i| {
                    let at = GuestAddress(used + 4 + 8 * i);
                    let id: u32 = self.mem.read_obj(at).unwrap();
                    let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
                    (id, len)
                })
                .collect()
        }

        fn port(&self, i: usize) -> &Arc<Port> {
            &self.backend.ports()[i]
        }
    }

    const VERSION_1: u64 = 1 << 32;

    #[test]
    fn guest_output_reaches_the_history_and_malformed_chains_are_completed() {
        let mut b = Bench::new(1, VERSION_1);
        let hello = b.buffer(b"hello ");
        let world = b.buffer(b"world");
        // A good chain of two readable buffers.
        b.chain(1, 0, &[(hello, 6, 0), (world, 5, 0)]);
        // Only a device-writable buffer: nothing to read.
        b.chain(1, 2, &[(hello, 6, WRITE)]);
        // A buffer past the end of guest memory.
        b.chain(1, 3, &[(0x40_0000, 16, 0)]);
        // A buffer whose end overflows the address space.
        b.chain(1, 4, &[(u64::MAX - 4, 16, 0)]);
        b.kick(1);
        assert_eq!(b.used(1), vec![(0, 0), (2, 0), (3, 0), (4, 0)]);
        assert_eq!(b.port(0).lock().history.snapshot(), b"hello world");
        // Still serving.
        let more = b.buffer(b"!");
        b.chain(1, 5, &[(more, 1, 0)]);
        b.kick(1);
        assert_eq!(b.port(0).lock().history.snapshot(), b"hello world!");
    }

    #[test]
    fn host_input_fills_receive_chains_and_waits_for_more() {
        let mut b = Bench::new(1, VERSION_1);
        b.port(0).push_input(b"abcde");
        let r1 = b.buffer(&[0; 3]);
        let r2 = b.buffer(&[0; 8]);
        // A receive chain with nothing writable gets 0 bytes and the input stays.
        b.chain(0, 0, &[(r1, 3, 0)]);
        b.chain(0, 1, &[(r1, 3, WRITE)]);
        b.kick(0);
        assert_eq!(b.used(0), vec![(0, 0), (1, 3)]);
        let mut got = [0u8; 3];
        b.mem.read_slice(&mut got, GuestAddress(r1)).unwrap();
        assert_eq!(&got, b"abc");
        // No more buffers: the rest waits in the port.
        assert!(b.port(0).has_input());
        b.chain(0, 2, &[(r2, 8, WRITE)]);
        b.kick(0);
        assert_eq!(b.used(0).last(), Some(&(2, 2)));
        let mut got = [0u8; 2];
        b.mem.read_slice(&mut got, GuestAddress(r2)).unwrap();
        assert_eq!(&got, b"de");
        // Buffers without input stay available for later.
        b.chain(0, 3, &[(r2, 8, WRITE)]);
        b.kick(0);
        assert_eq!(b.used(0).len(), 3);
        b.port(0).push_input(b"z");
        b.backend
            .handle_event(
                b.backend.wake_event_id(0) as u16,
                EventSet::IN,
                &b.vrings,
                0,
            )
            .unwrap();
        assert_eq!(b.used(0).last(), Some(&(3, 1)));
    }

    fn control_msg(id: u32, event: u16, value: u16) -> Vec<u8> {
        control::encode(id, event, value, &[])
    }

    #[test]
    fn control_queue_follows_the_driver_and_ignores_nonsense() {
        let features = VERSION_1 | (1 << virtio::VIRTIO_CONSOLE_F_MULTIPORT);
        let mut b = Bench::new(2, features);
        let mut offset = 0;
        let mut send = |b: &mut Bench, bytes: &[u8]| {
            let addr = b.buffer(bytes);
            b.chain(3, offset, &[(addr, bytes.len() as u32, 0)]);
            offset += 1;
            b.kick(3);
        };
        // Nonsense first: too short, unknown event, device-only event, bogus port ids.
        send(&mut b, &[1, 2, 3]);
        send(&mut b, &control_msg(0, 0x77, 1));
        send(&mut b, &control_msg(0, control::PORT_NAME, 1));
        send(&mut b, &control_msg(42, control::PORT_READY, 1));
        send(&mut b, &control_msg(u32::MAX, control::PORT_OPEN, 1));
        assert_eq!(b.used(3).len(), 5, "every control buffer is returned");
        assert!(b.backend.conn().control_out.is_empty());

        send(&mut b, &control_msg(0, control::DEVICE_READY, 1));
        send(&mut b, &control_msg(1, control::PORT_READY, 1));
        // The driver posts control receive buffers: the queued messages come out in order,
        // and a buffer too small for a message is returned empty.
        let small = b.buffer(&[0; 4]);
        b.chain(2, 0, &[(small, 4, WRITE)]);
        let mut bufs = Vec::new();
        for i in 1..6u16 {
            let addr = b.buffer(&[0; 64]);
            b.chain(2, i, &[(addr, 64, WRITE)]);
            bufs.push(addr);
        }
        b.kick(2);
        let used = b.used(2);
        assert_eq!(used[0], (0, 0));
        let msgs: Vec<Vec<u8>> = used[1..]
            .iter()
            .zip(&bufs)
            .map(|(&(_, len), &addr)| {
                let mut m = vec![0u8; len as usize];
                b.mem.read_slice(&mut m, GuestAddress(addr)).unwrap();
                m
            })
            .collect();
        // The first PORT_ADD went into the buffer that was too small and is lost (a guest
        // fault); the rest follow in order.
        assert_eq!(
            msgs,
            vec![
                control::port_add(1),
                control::port_name(1, "p1"),
                control::port_open(1, false),
            ]
        );
    }

    #[test]
    fn config_space_reads_sizes_and_emergency_writes_reach_port_0() {
        let b = Bench::new(2, VERSION_1);
        assert_eq!(
            b.backend.get_config(0, 12),
            vec![0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]
        );
        b.port(0).set_size(80, 25);
        assert_eq!(b.backend.get_config(0, 4), vec![80, 0, 25, 0]);
        assert_eq!(b.backend.get_config(100, 2), vec![0, 0]);
        b.backend.set_config(8, &[b'x', 0, 0, 0]).unwrap();
        b.backend.set_config(0, &[9, 9]).unwrap();
        b.backend.set_config(u32::MAX, &[9]).unwrap();
        assert_eq!(b.port(0).lock().history.snapshot(), b"x");
        assert_eq!(b.backend.get_config(0, 4), vec![80, 0, 25, 0]);
    }

    /// Deterministic pseudo-random numbers (xorshift64).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn random_descriptor_tables_never_panic_and_every_queue_keeps_serving() {
        let features = VERSION_1 | (1 << virtio::VIRTIO_CONSOLE_F_MULTIPORT);
        let b = Bench::new(2, features);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..2000u32 {
            let q = rng.below(b.vrings.len() as u64) as usize;
            // A whole random descriptor table: addresses anywhere (rings, data, past the end
            // of memory, overflowing), any length, any flags (indirect too), any next.
            let (desc, avail, _) = b.rings[q];
            for i in 0..u64::from(QSIZE) {
                let addr = match rng.below(4) {
                    0 => DATA + rng.below(0x10_0000),
                    1 => rng.below(0x40_0000 + 0x1000),
                    2 => u64::MAX - rng.below(0x1000),
                    _ => rng.below(0x8000),
                };
                let at = GuestAddress(desc + 16 * i);
                b.mem.write_obj(addr, at).unwrap();
                b.mem
                    .write_obj(rng.next() as u32 >> rng.below(32), at.unchecked_add(8))
                    .unwrap();
                b.mem
                    .write_obj(rng.below(8) as u16, at.unchecked_add(12))
                    .unwrap();
                b.mem
                    .write_obj(rng.below(u64::from(QSIZE) + 2) as u16, at.unchecked_add(14))
                    .unwrap();
            }
            // Publish a few heads (sometimes bogus ones) and kick.
            let idx: u16 = b.mem.read_obj(GuestAddress(avail + 2)).unwrap();
            let n = rng.below(4) as u16;
            for k in 0..n {
                let slot = GuestAddress(avail + 4 + 2 * u64::from((idx + k) % QSIZE));
                b.mem
                    .write_obj(rng.below(u64::from(QSIZE) + 4) as u16, slot)
                    .unwrap();
            }
            b.mem
                .write_obj(idx.wrapping_add(n), GuestAddress(avail + 2))
                .unwrap();
            if rng.below(3) == 0 {
                b.port(rng.below(2) as usize)
                    .push_input(b"input while fuzzing");
            }
            b.kick(q);
            b.backend
                .handle_event(
                    b.backend.wake_event_id(1) as u16,
                    EventSet::IN,
                    &b.vrings,
                    0,
                )
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
        // The device completed chains all along, bad ones included.
        let completed: usize = (0..b.vrings.len()).map(|q| b.used(q).len()).sum();
        assert!(completed > 500, "only {completed} chains completed");
        // Guest output went to the history ring only (bounded by its capacity).
        for port in b.backend.ports() {
            assert!(port.lock().history.len() <= 1024);
        }
    }

    #[test]
    fn offers_multiport_only_with_several_ports() {
        let one = Bench::new(1, VERSION_1);
        let two = Bench::new(2, VERSION_1);
        let mp = 1 << virtio::VIRTIO_CONSOLE_F_MULTIPORT;
        assert_eq!(one.backend.features() & mp, 0);
        assert_ne!(two.backend.features() & mp, 0);
        assert_eq!(one.backend.num_queues(), 2);
        assert_eq!(two.backend.num_queues(), 6);
        assert_eq!(two.backend.queues_per_thread(), vec![0b11_1111]);
    }
}
