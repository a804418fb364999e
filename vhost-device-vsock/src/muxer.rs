//! The connection multiplexer of one VM: host Unix sockets on one side, the guest's RX and
//! TX queues on the other.
//!
//! It owns an epoll set (registered once in the worker thread's epoll, so the worker wakes
//! for queue kicks and socket events alike) holding the `uds-path` listener, the sibling
//! inbox and every connection's host socket. Interest is level-triggered and kept exact:
//! a socket is polled for reading only while its data could go to the guest (it has credit
//! and is not already known readable), for writing only while data waits for it, and a
//! socket that hung up leaves the set. So no event fires that the muxer cannot act on.
//!
//! Packets for the guest are produced lazily: connections with something to say queue up
//! in `rx_ready`, and each RX buffer the guest offers is filled by the next one in turn.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use log::{debug, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::conn::{Connection, Filled, Kind, State};
use crate::packet::{self, op, Header, Memory, RxBuffer, TxPacket};
use crate::sibling::{Inbox, RawPacket, Registry};

const LISTENER: u64 = 0;
const INBOX: u64 = 1;
const FIRST_CONN: u64 = 2;
/// Control packets for unknown connections waiting for RX buffers; more are dropped.
const MAX_ORPHANS: usize = 1024;
/// Connections per VM; more host programs are turned away.
const MAX_CONNS: usize = 8192;
/// Host-side ports of host-initiated connections start here (as Firecracker's do).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// How long a guest `connect` may wait for a host listener with a full backlog.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Logs a guest fault the first time and then at every power of two occurrences.
#[derive(Debug, Default)]
pub struct Throttle(HashMap<&'static str, u64>);

impl Throttle {
    /// Counts `cause`; true when it should be logged.
    pub fn hit(&mut self, cause: &'static str) -> bool {
        let n = self.0.entry(cause).or_insert(0);
        *n += 1;
        n.is_power_of_two()
    }
}

/// Fixed settings of one VM's device.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The guest's CID.
    pub cid: u64,
    /// The hybrid-vsock path: host programs connect here; guest connections to port P go
    /// to `<uds_path>_P`.
    pub uds_path: PathBuf,
    /// The receive buffer advertised to the guest per connection (`buf_alloc`).
    pub buf_alloc: u32,
}

/// One VM's connections.
#[derive(Debug)]
pub struct Muxer {
    settings: Settings,
    epoll: Epoll,
    listener: Option<UnixListener>,
    inbox: Arc<Inbox>,
    registry: Arc<Registry>,
    conns: HashMap<u64, Connection>,
    /// `(host_port, guest_port)` to connection id.
    index: HashMap<(u32, u32), u64>,
    next_id: u64,
    next_local_port: u32,
    rx_ready: VecDeque<u64>,
    queued: HashSet<u64>,
    orphans: VecDeque<Header>,
    sibling_pkt: Option<(RawPacket, usize)>,
    /// Whether the guest acked `VIRTIO_VSOCK_F_SEQPACKET`.
    pub seqpacket: bool,
    /// A credit update became due while TX chains are handled: send it before the rest.
    urgent: bool,
    throttle: Throttle,
}

fn event_set(bits: u32) -> EventSet {
    EventSet::from_bits_truncate(bits)
}

/// Connects to a host listener at `path` with a socket of `kind`.
pub fn connect_unix(path: &Path, kind: Kind) -> io::Result<UnixStream> {
    use nix::sys::socket::{
        connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, UnixAddr,
    };
    let ty = match kind {
        Kind::Stream => SockType::Stream,
        Kind::SeqPacket => SockType::SeqPacket,
    };
    let fd: OwnedFd = socket(AddressFamily::Unix, ty, SockFlag::SOCK_CLOEXEC, None)?;
    // A blocking connect to a Unix listener waits only while its backlog is full; bound that.
    let tv = nix::sys::time::TimeVal::new(
        i64::try_from(CONNECT_TIMEOUT.as_secs()).unwrap_or(0),
        i64::from(CONNECT_TIMEOUT.subsec_micros()),
    );
    setsockopt(&fd, sockopt::SendTimeout, &tv)?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(true)?;
    Ok(stream)
}

impl Muxer {
    /// A muxer for one frontend connection. `listener` is the VM's `uds-path` listener
    /// (shared by the connections of the daemon's life), `inbox` its sibling inbox.
    pub fn new(
        settings: Settings,
        listener: Option<UnixListener>,
        inbox: Arc<Inbox>,
        registry: Arc<Registry>,
    ) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        if let Some(l) = &listener {
            l.set_nonblocking(true)?;
            epoll.ctl(
                ControlOperation::Add,
                l.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER),
            )?;
        }
        epoll.ctl(
            ControlOperation::Add,
            inbox.event().as_raw_fd(),
            EpollEvent::new(EventSet::IN, INBOX),
        )?;
        inbox.clear();
        Ok(Muxer {
            settings,
            epoll,
            listener,
            inbox,
            registry,
            conns: HashMap::new(),
            index: HashMap::new(),
            next_id: FIRST_CONN,
            next_local_port: FIRST_LOCAL_PORT,
            rx_ready: VecDeque::new(),
            queued: HashSet::new(),
            orphans: VecDeque::new(),
            sibling_pkt: None,
            seqpacket: false,
            urgent: false,
            throttle: Throttle::default(),
        })
    }

    /// The epoll set to register in the worker's epoll (readable when events wait).
    pub fn epoll_fd(&self) -> i32 {
        self.epoll.as_raw_fd()
    }

    /// How many connections are open.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Closes every connection (the guest was reset or the frontend went away).
    pub fn reset(&mut self) {
        for (_, conn) in self.conns.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.index.clear();
        self.rx_ready.clear();
        self.queued.clear();
        self.orphans.clear();
        self.sibling_pkt = None;
        self.inbox.clear();
    }

    fn fault(&mut self, cause: &'static str, hdr: &Header) {
        if self.throttle.hit(cause) {
            warn!(
                "cid {}: {cause}: dropped packet op {} type {} {}:{} -> {}:{} len {}",
                self.settings.cid,
                hdr.op,
                hdr.type_,
                hdr.src_cid,
                hdr.src_port,
                hdr.dst_cid,
                hdr.dst_port,
                hdr.len
            );
        }
    }

    fn orphan_rst(&mut self, hdr: &Header) {
        if hdr.op == op::RST {
            return;
        }
        if self.orphans.len() >= MAX_ORPHANS {
            if self.throttle.hit("too many pending resets") {
                warn!(
                    "cid {}: too many pending resets, dropping",
                    self.settings.cid
                );
            }
            return;
        }
        self.orphans.push_back(hdr.reply(op::RST));
    }

    fn schedule(&mut self, id: u64) {
        if self.queued.contains(&id) {
            return;
        }
        if self.conns.get(&id).is_some_and(Connection::has_rx_work) {
            self.queued.insert(id);
            self.rx_ready.push_back(id);
        }
    }

    /// Brings a connection's epoll interest in line with its state.
    fn update_interest(&mut self, id: u64) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let fd = conn.stream.as_raw_fd();
        let mut want = 0u32;
        if conn.wants_read() && !conn.readable {
            want |= EventSet::IN.bits();
        }
        if conn.wants_write() {
            want |= EventSet::OUT.bits();
        }
        let registered = conn.interest;
        let result = match (registered, conn.hung_up) {
            (Some(_), true) => {
                conn.interest = None;
                self.epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default())
            }
            (None, true) => Ok(()),
            (Some(bits), false) if bits == want => Ok(()),
            (Some(_), false) => {
                conn.interest = Some(want);
                self.epoll.ctl(
                    ControlOperation::Modify,
                    fd,
                    EpollEvent::new(event_set(want), id),
                )
            }
            (None, false) => {
                conn.interest = Some(want);
                self.epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(event_set(want), id),
                )
            }
        };
        if let Err(e) = result {
            warn!(
                "cid {}: epoll update for a connection failed: {e}",
                self.settings.cid
            );
        }
    }

    /// Removes a connection and closes its host socket; sends the guest an `RST` if it knew it.
    fn reset_conn(&mut self, id: u64, tell_guest: bool) {
        let Some(mut conn) = self.conns.remove(&id) else {
            return;
        };
        if conn.interest.is_some() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.index.remove(&(conn.host_port, conn.guest_port));
        let known = !matches!(conn.state, State::AwaitingConnect(_));
        if tell_guest && known && self.orphans.len() < MAX_ORPHANS {
            let hdr = conn.header(op::RST, 0, 0);
            self.orphans.push_back(hdr);
        }
        debug!(
            "cid {}: connection {}:{} closed",
            self.settings.cid, conn.host_port, conn.guest_port
        );
    }

    fn add_conn(&mut self, conn: Connection) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        if conn.host_port != 0 || conn.guest_port != 0 {
            self.index.insert((conn.host_port, conn.guest_port), id);
        }
        self.conns.insert(id, conn);
        id
    }

    fn alloc_local_port(&mut self, guest_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if self.next_local_port < FIRST_LOCAL_PORT {
                self.next_local_port = FIRST_LOCAL_PORT;
            }
            if !self.index.contains_key(&(port, guest_port)) {
                return port;
            }
        }
    }

    // ---- host side ----------------------------------------------------------------------

    /// Handles every pending host-side event.
    pub fn poll_host(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("cid {}: epoll_wait: {e}", self.settings.cid);
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    LISTENER => self.accept(),
                    INBOX => self.inbox.ack(),
                    id => self.conn_event(id, ev.event_set()),
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn accept(&mut self) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!(
                        "cid {}: accept on {}: {e}",
                        self.settings.cid,
                        self.settings.uds_path.display()
                    );
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNS {
                warn!(
                    "cid {}: too many connections, closing a new one",
                    self.settings.cid
                );
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let conn = Connection::new(
                stream,
                Kind::Stream,
                self.settings.cid,
                self.settings.buf_alloc,
                State::AwaitingConnect(Vec::new()),
            );
            let id = self.add_conn(conn);
            self.update_interest(id);
        }
    }

    fn conn_event(&mut self, id: u64, evset: EventSet) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if evset
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP)
        {
            conn.readable = true;
        }
        if evset.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            conn.hung_up = true;
        }
        if matches!(conn.state, State::AwaitingConnect(_)) {
            match conn.read_connect_line() {
                Ok(Some(port)) => {
                    let host_port = self.alloc_local_port(port);
                    let Some(conn) = self.conns.get_mut(&id) else {
                        return;
                    };
                    conn.host_port = host_port;
                    conn.guest_port = port;
                    conn.state = State::Connecting;
                    conn.owed.request = true;
                    conn.readable = false;
                    self.index.insert((host_port, port), id);
                }
                Ok(None) if conn.hung_up => return self.reset_conn(id, false),
                Ok(None) => {}
                Err(e) => {
                    debug!("cid {}: host connection refused: {e}", self.settings.cid);
                    return self.reset_conn(id, false);
                }
            }
        } else if (evset.contains(EventSet::OUT) || (conn.hung_up && conn.wants_write()))
            && !self.flush(id)
        {
            return;
        }
        self.schedule(id);
        self.update_interest(id);
    }

    /// Writes what waits for the host; false if the connection was reset.
    fn flush(&mut self, id: u64) -> bool {
        let Some(conn) = self.conns.get_mut(&id) else {
            return false;
        };
        match conn.flush_to_host() {
            Ok(_) => {
                if conn.credit_update_due() {
                    conn.owed.credit_update = true;
                }
                if conn.state == State::Closing && !conn.wants_write() {
                    self.reset_conn(id, true);
                    return false;
                }
                true
            }
            Err(e) => {
                debug!("cid {}: host write failed: {e}", self.settings.cid);
                self.reset_conn(id, true);
                false
            }
        }
    }

    // ---- guest TX -----------------------------------------------------------------------

    /// Handles one chain from the TX queue.
    pub fn on_tx_chain<I>(&mut self, mem: &Memory, descriptors: I)
    where
        I: IntoIterator<Item = (vm_memory::GuestAddress, u32, bool)>,
    {
        if let Some(pkt) = self.parse_tx(mem, descriptors) {
            self.on_tx(mem, &pkt);
        }
    }

    /// Parses one chain from the TX queue; a malformed one is logged and dropped.
    pub fn parse_tx<I>(&mut self, mem: &Memory, descriptors: I) -> Option<TxPacket>
    where
        I: IntoIterator<Item = (vm_memory::GuestAddress, u32, bool)>,
    {
        match TxPacket::parse(mem, descriptors) {
            Ok(pkt) => Some(pkt),
            Err(e) => {
                if self.throttle.hit("malformed TX chain") {
                    warn!("cid {}: malformed TX chain dropped: {e}", self.settings.cid);
                }
                None
            }
        }
    }

    /// Handles TX packets in order. A run of consecutive data packets of one established
    /// stream connection, all within the credit we gave, goes to the host socket with one
    /// writev(2): what the packets one at a time would do, with one system call.
    pub fn on_tx_packets(&mut self, mem: &Memory, pkts: &[TxPacket]) {
        let mut i = 0;
        while let Some(rest) = pkts.get(i..) {
            let Some(first) = rest.first() else { break };
            let run = self.stream_run(rest);
            if run >= 2 {
                self.on_tx_run(mem, &rest[..run]);
                i += run;
            } else {
                self.on_tx(mem, first);
                i += 1;
            }
        }
    }

    /// How many packets at the start of `pkts` form a run [`Muxer::on_tx_packets`] may
    /// write at once.
    fn stream_run(&self, pkts: &[TxPacket]) -> usize {
        let Some(first) = pkts.first() else { return 0 };
        let h = first.hdr;
        if h.op != op::RW
            || h.type_ != packet::TYPE_STREAM
            || h.src_cid != self.settings.cid
            || h.dst_cid != packet::HOST_CID
        {
            return 0;
        }
        let Some(conn) = self
            .index
            .get(&(h.dst_port, h.src_port))
            .and_then(|id| self.conns.get(id))
        else {
            return 0;
        };
        if conn.kind != Kind::Stream || conn.state != State::Established {
            return 0;
        }
        let mut room = (conn.buf_alloc() as usize).saturating_sub(conn.host_backlog());
        let mut n = 0;
        for p in pkts {
            let g = p.hdr;
            let len = g.len as usize;
            if g.op != h.op
                || g.type_ != h.type_
                || g.src_cid != h.src_cid
                || g.dst_cid != h.dst_cid
                || g.src_port != h.src_port
                || g.dst_port != h.dst_port
                || len > room
            {
                break;
            }
            room -= len;
            n += 1;
        }
        n
    }

    /// Handles a run that [`Muxer::stream_run`] found.
    fn on_tx_run(&mut self, mem: &Memory, pkts: &[TxPacket]) {
        let Some(first) = pkts.first() else { return };
        let h = first.hdr;
        let Some(&id) = self.index.get(&(h.dst_port, h.src_port)) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if let Some(last) = pkts.last() {
            conn.update_peer_credit(&last.hdr);
        }
        if let Err(e) = conn.stream_from_guest_run(mem, pkts) {
            self.data_failed(&e);
            return self.reset_conn(id, true);
        }
        if conn.credit_update_due() {
            conn.owed.credit_update = true;
            self.urgent = true;
        }
        self.schedule(id);
        self.update_interest(id);
    }

    fn data_failed(&mut self, e: &crate::conn::Error) {
        if matches!(e, crate::conn::Error::Io(_)) {
            debug!(
                "cid {}: host socket failed, connection reset: {e}",
                self.settings.cid
            );
        } else if self.throttle.hit("data refused") {
            warn!("cid {}: connection reset: {e}", self.settings.cid);
        }
    }

    fn on_tx(&mut self, mem: &Memory, pkt: &TxPacket) {
        let h = pkt.hdr;
        if h.src_cid != self.settings.cid {
            return self.fault("source CID is not the guest's", &h);
        }
        if h.dst_cid != packet::HOST_CID {
            return self.forward_to_sibling(mem, pkt);
        }
        let kind = match h.type_ {
            packet::TYPE_STREAM => Kind::Stream,
            packet::TYPE_SEQPACKET if self.seqpacket => Kind::SeqPacket,
            _ => {
                self.fault("unsupported socket type", &h);
                return self.orphan_rst(&h);
            }
        };
        let Some(&id) = self.index.get(&(h.dst_port, h.src_port)) else {
            match h.op {
                op::REQUEST => self.guest_connect(&h, kind),
                op::RST => {}
                _ => self.orphan_rst(&h),
            }
            return;
        };
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if conn.kind != kind {
            self.fault("socket type differs from the connection's", &h);
            return self.reset_conn(id, true);
        }
        conn.update_peer_credit(&h);
        match h.op {
            op::RESPONSE if conn.state == State::Connecting => {
                conn.state = State::Established;
                if conn.send_ok().is_err() {
                    return self.reset_conn(id, true);
                }
                conn.readable = true;
            }
            op::RW if conn.state == State::Established => {
                if let Err(e) = conn.from_guest(mem, pkt) {
                    self.data_failed(&e);
                    return self.reset_conn(id, true);
                }
                if conn.credit_update_due() {
                    conn.owed.credit_update = true;
                    self.urgent = true;
                }
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => {
                conn.owed.credit_update = true;
                self.urgent = true;
            }
            op::SHUTDOWN => {
                if conn.guest_shutdown(h.flags).is_err() {
                    return self.reset_conn(id, true);
                }
                let both = packet::SHUTDOWN_RCV | packet::SHUTDOWN_SEND;
                if conn.guest_shutdown & both == both {
                    if conn.wants_write() {
                        conn.state = State::Closing;
                    } else {
                        return self.reset_conn(id, true);
                    }
                }
            }
            op::RST => return self.reset_conn(id, false),
            _ => {
                self.fault("unexpected operation for the connection's state", &h);
                return self.reset_conn(id, true);
            }
        }
        self.schedule(id);
        self.update_interest(id);
    }

    fn guest_connect(&mut self, h: &Header, kind: Kind) {
        if self.conns.len() >= MAX_CONNS {
            return self.orphan_rst(h);
        }
        let mut path = self.settings.uds_path.clone().into_os_string();
        path.push(format!("_{}", h.dst_port));
        let path = PathBuf::from(path);
        match connect_unix(&path, kind) {
            Ok(stream) => {
                let mut conn = Connection::new(
                    stream,
                    kind,
                    self.settings.cid,
                    self.settings.buf_alloc,
                    State::Established,
                );
                conn.host_port = h.dst_port;
                conn.guest_port = h.src_port;
                conn.update_peer_credit(h);
                conn.owed.response = true;
                let id = self.add_conn(conn);
                self.schedule(id);
                self.update_interest(id);
            }
            Err(e) => {
                debug!(
                    "cid {}: guest connect to {} refused: {e}",
                    self.settings.cid,
                    path.display()
                );
                self.orphan_rst(h);
            }
        }
    }

    fn forward_to_sibling(&mut self, mem: &Memory, pkt: &TxPacket) {
        let h = pkt.hdr;
        let Some(inbox) = self.registry.route(self.settings.cid, h.dst_cid) else {
            self.fault("no such CID reachable", &h);
            return self.orphan_rst(&h);
        };
        let Ok(payload) = pkt.payload_to_vec(mem) else {
            return self.fault("payload outside guest memory", &h);
        };
        if inbox.push(RawPacket { hdr: h, payload }).is_err() {
            self.fault("sibling inbox full", &h);
            self.orphan_rst(&h);
        }
    }

    // ---- guest RX -----------------------------------------------------------------------

    /// Whether a credit update became due since the last call (clears it).
    pub fn take_urgent(&mut self) -> bool {
        std::mem::take(&mut self.urgent)
    }

    /// Whether a packet waits for an RX buffer.
    pub fn has_rx_work(&self) -> bool {
        !self.orphans.is_empty() || self.sibling_pkt.is_some() || !self.rx_ready.is_empty()
    }

    /// Pulls the next sibling packet out of the inbox, if none is in progress.
    pub fn refill_sibling(&mut self) {
        if self.sibling_pkt.is_none() {
            self.sibling_pkt = self.inbox.pop().map(|p| (p, 0));
        }
    }

    /// Fills `buf` with the next packet for the guest. Returns the bytes written (header
    /// included), or `None` if nothing could be sent (the buffer is untouched).
    pub fn fill_rx(&mut self, mem: &Memory, buf: &RxBuffer) -> Option<u32> {
        if let Some(hdr) = self.orphans.pop_front() {
            return match buf.write_header(mem, &hdr) {
                Ok(()) => Some(packet::HEADER_LEN_U32),
                Err(_) => Some(0),
            };
        }
        self.refill_sibling();
        if let Some(len) = self.fill_sibling(mem, buf) {
            return Some(len);
        }
        while let Some(id) = self.rx_ready.pop_front() {
            self.queued.remove(&id);
            let Some(conn) = self.conns.get_mut(&id) else {
                continue;
            };
            let filled = conn.fill(mem, buf);
            match filled {
                Ok(Filled::Packet(hdr)) => {
                    if hdr.op == op::RST {
                        self.reset_conn(id, false);
                    } else {
                        self.schedule(id);
                        self.update_interest(id);
                    }
                    return Some(packet::HEADER_LEN_U32 + hdr.len);
                }
                Ok(Filled::Nothing) => {
                    self.update_interest(id);
                }
                Err(e) => {
                    debug!("cid {}: connection failed: {e}", self.settings.cid);
                    self.reset_conn(id, true);
                    if let Some(hdr) = self.orphans.pop_front() {
                        return match buf.write_header(mem, &hdr) {
                            Ok(()) => Some(packet::HEADER_LEN_U32),
                            Err(_) => Some(0),
                        };
                    }
                }
            }
        }
        None
    }

    fn fill_sibling(&mut self, mem: &Memory, buf: &RxBuffer) -> Option<u32> {
        let (pkt, off) = self.sibling_pkt.as_mut()?;
        let left = pkt.payload.len().saturating_sub(*off);
        let n = left.min(buf.payload_capacity());
        let mut hdr = pkt.hdr;
        hdr.len = u32::try_from(n).unwrap_or(0);
        let last = *off + n >= pkt.payload.len();
        if !last && hdr.type_ == packet::TYPE_SEQPACKET {
            hdr.flags = 0;
        }
        let written = buf
            .write_payload(mem, &pkt.payload[*off..*off + n])
            .and_then(|_| buf.write_header(mem, &hdr));
        *off += n;
        if last {
            self.sibling_pkt = None;
        }
        match written {
            Ok(()) => Some(packet::HEADER_LEN_U32 + hdr.len),
            Err(_) => Some(0),
        }
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        self.reset();
    }
}

/// Creates the `uds-path` listener, refusing a path a live process serves and replacing a
/// stale socket file.
pub fn bind_uds(path: &Path) -> io::Result<UnixListener> {
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            use std::os::unix::fs::FileTypeExt;
            let meta = std::fs::symlink_metadata(path)?;
            if !meta.file_type().is_socket() {
                return Err(e);
            }
            match UnixStream::connect(path) {
                Err(c) if c.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path)?;
                    UnixListener::bind(path)
                }
                _ => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}
