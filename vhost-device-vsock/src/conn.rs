//! One vsock connection between a guest socket and a host Unix socket, with the credit
//! based flow control of virtio 1.2, 5.10.6.3.
//!
//! Two directions, each bounded:
//! - guest to host: the guest may have at most `buf_alloc - (rx_cnt - fwd_cnt)` bytes in
//!   flight towards us. What the host socket does not take at once waits in `to_host`
//!   (never more than `buf_alloc` bytes); `fwd_cnt` counts the bytes handed to the host
//!   socket and goes back to the guest in every header and in `CREDIT_UPDATE`s.
//! - host to guest: we send at most `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)` bytes the
//!   guest has not consumed; with no credit left the host socket is simply not read, so
//!   the host writer blocks in its own socket buffer.
//!
//! For SEQPACKET the host socket is a Unix `SOCK_SEQPACKET` socket, a guest message is
//! gathered from its fragments up to the one with `EOM` and then sent in one `send`, and a
//! host message is cut into fragments with `EOM` (and `EOR`) on the last.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use vm_memory::{ReadVolatile, VolatileMemoryError, WriteVolatile};

/// The I/O error inside a volatile-memory I/O failure.
fn io_error(e: VolatileMemoryError) -> io::Error {
    match e {
        VolatileMemoryError::IOError(e) => e,
        other => io::Error::other(other),
    }
}

use crate::packet::{self, Header, Memory, RxBuffer, TxPacket};

/// Why a connection must be reset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The guest sent more than the credit we gave it.
    #[error("guest exceeded its credit ({in_flight} bytes in flight, {buf_alloc} allowed)")]
    CreditExceeded {
        /// Bytes received and not yet forwarded, including this packet.
        in_flight: u32,
        /// The buffer we advertised.
        buf_alloc: u32,
    },
    /// Reading the packet out of guest memory failed.
    #[error("bad packet")]
    Packet(#[from] packet::Error),
    /// The host socket failed.
    #[error("host socket")]
    Io(#[source] io::Error),
}

/// The socket type of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `SOCK_STREAM`.
    Stream,
    /// `SOCK_SEQPACKET`.
    SeqPacket,
}

impl Kind {
    /// The header `type` value.
    pub fn wire(self) -> u16 {
        match self {
            Kind::Stream => packet::TYPE_STREAM,
            Kind::SeqPacket => packet::TYPE_SEQPACKET,
        }
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// A host program connected to the `uds-path` listener and has not yet sent its whole
    /// `CONNECT <port>\n` line (gathered here).
    AwaitingConnect(Vec<u8>),
    /// We sent the guest a `REQUEST` and wait for its `RESPONSE` or `RST`.
    Connecting,
    /// Data flows.
    Established,
    /// The guest closed both directions; what is buffered for the host is flushed, then
    /// the connection goes.
    Closing,
}

/// Control packets owed to the guest, sent as RX buffers become available.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Owed {
    /// A `REQUEST` (host-initiated connection).
    pub request: bool,
    /// A `RESPONSE` (guest-initiated connection accepted).
    pub response: bool,
    /// A `CREDIT_UPDATE`.
    pub credit_update: bool,
    /// A `SHUTDOWN` with these flags (0: none owed).
    pub shutdown: u32,
    /// An `RST`; the connection ends once it is sent.
    pub rst: bool,
}

/// What filling one RX buffer from the host side produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// A packet of this header was written; add the buffer to the used ring.
    Packet(Header),
    /// Nothing to send now; the buffer was not touched.
    Nothing,
}

/// A connection between a guest port and a host Unix socket.
#[derive(Debug)]
pub struct Connection {
    /// The host side.
    pub stream: UnixStream,
    /// Stream or seqpacket.
    pub kind: Kind,
    /// The guest's CID.
    pub guest_cid: u64,
    /// The port on the host side (CID 2).
    pub host_port: u32,
    /// The port on the guest side.
    pub guest_port: u32,
    /// Life cycle.
    pub state: State,
    /// Control packets owed to the guest.
    pub owed: Owed,
    /// The host socket reported readable and has not yet returned `EAGAIN`.
    pub readable: bool,
    /// The host socket hung up or failed (epoll `HUP`/`ERR`).
    pub hung_up: bool,
    /// The host side sent EOF (`read` returned 0).
    pub host_eof: bool,
    /// The epoll events the host socket is registered for (`None`: not registered).
    pub interest: Option<u32>,
    /// `SHUTDOWN` flags the guest sent.
    pub guest_shutdown: u32,
    /// We shut down the host socket's write side.
    host_write_shut: bool,
    /// Bytes the host program sent after its `CONNECT` line, sent to the guest first.
    early: Vec<u8>,

    // Guest to host.
    buf_alloc: u32,
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    reported_fwd_cnt: Wrapping<u32>,
    to_host: VecDeque<u8>,
    msgs: VecDeque<Vec<u8>>,
    partial_msg: Vec<u8>,

    // Host to guest.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    tx_cnt: Wrapping<u32>,
    stage: Vec<u8>,
    stage_off: usize,
    stage_eor: bool,
}

/// The most iovecs one writev(2) takes (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;
/// How large a host SEQPACKET message we accept (longer ones are truncated by the kernel).
const MAX_SEQ_MSG: usize = 256 * 1024;
/// The longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;

/// Parses a hybrid-vsock `CONNECT <port>` line (without its newline).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let port = text.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

impl Connection {
    /// A connection whose host side is `stream`.
    pub fn new(
        stream: UnixStream,
        kind: Kind,
        guest_cid: u64,
        buf_alloc: u32,
        state: State,
    ) -> Self {
        Connection {
            stream,
            kind,
            guest_cid,
            host_port: 0,
            guest_port: 0,
            state,
            owed: Owed::default(),
            readable: false,
            hung_up: false,
            host_eof: false,
            interest: None,
            guest_shutdown: 0,
            host_write_shut: false,
            early: Vec::new(),
            buf_alloc,
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            reported_fwd_cnt: Wrapping(0),
            to_host: VecDeque::new(),
            msgs: VecDeque::new(),
            partial_msg: Vec::new(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            stage: Vec::new(),
            stage_off: 0,
            stage_eor: false,
        }
    }

    /// A header from the host side of this connection to the guest.
    pub fn header(&mut self, op: u16, len: u32, flags: u32) -> Header {
        self.reported_fwd_cnt = self.fwd_cnt;
        Header {
            src_cid: packet::HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.host_port,
            dst_port: self.guest_port,
            len,
            type_: self.kind.wire(),
            op,
            flags,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Takes the credit information of a packet from the guest.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Bytes the guest can still take from us.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The receive buffer we advertise to the guest.
    pub fn buf_alloc(&self) -> u32 {
        self.buf_alloc
    }

    /// Bytes received from the guest and not yet handed to the host socket.
    pub fn host_backlog(&self) -> usize {
        (self.rx_cnt - self.fwd_cnt).0 as usize
    }

    /// Whether anything waits to be written to the host socket.
    pub fn wants_write(&self) -> bool {
        !self.to_host.is_empty() || !self.msgs.is_empty()
    }

    /// Whether the host socket should be read now (data could go to the guest).
    pub fn wants_read(&self) -> bool {
        match self.state {
            State::AwaitingConnect(_) => true,
            State::Established => {
                !self.host_eof
                    && self.guest_shutdown & packet::SHUTDOWN_RCV == 0
                    && self.peer_credit() > 0
            }
            State::Connecting | State::Closing => false,
        }
    }

    /// Whether this connection has a packet for the guest right now.
    pub fn has_rx_work(&self) -> bool {
        let o = &self.owed;
        o.request
            || o.response
            || o.credit_update
            || o.shutdown != 0
            || o.rst
            || (self.state == State::Established
                && (self.readable
                    || self.hung_up
                    || !self.early.is_empty()
                    || self.stage_off < self.stage.len())
                && self.wants_read())
    }

    /// Reads the host program's `CONNECT <port>\n` line. Returns the port once the line is
    /// complete, `Ok(None)` while it is incomplete, and an error for a bad line or a host
    /// program that went away.
    pub fn read_connect_line(&mut self) -> io::Result<Option<u32>> {
        let State::AwaitingConnect(line) = &mut self.state else {
            return Ok(None);
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let room = MAX_CONNECT_LINE - line.len();
        let n = match io::Read::read(&mut self.stream, &mut buf[..room]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.readable = false;
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        line.extend_from_slice(&buf[..n]);
        let Some(nl) = line.iter().position(|&b| b == b'\n') else {
            if line.len() >= MAX_CONNECT_LINE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "CONNECT line too long",
                ));
            }
            return Ok(None);
        };
        let port = parse_connect_line(&line[..nl])
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "expected CONNECT <port>"))?;
        self.early = line[nl + 1..].to_vec();
        Ok(Some(port))
    }

    /// Tells the host program the connection is up (`OK <port>\n`).
    pub fn send_ok(&mut self) -> io::Result<()> {
        let line = format!("OK {}\n", self.host_port);
        // A fresh socket has room for a few bytes; a short write means the program is gone.
        match self.stream.write(line.as_bytes()) {
            Ok(n) if n == line.len() => Ok(()),
            Ok(_) => Err(io::ErrorKind::WriteZero.into()),
            Err(e) => Err(e),
        }
    }

    /// Takes the payload of a guest `RW` packet: hands what the host socket takes at once
    /// to it and keeps the rest (within the credit we gave).
    pub fn from_guest(&mut self, mem: &Memory, pkt: &TxPacket) -> Result<(), Error> {
        let len = pkt.hdr.len;
        let in_flight = (self.rx_cnt - self.fwd_cnt).0.saturating_add(len);
        if in_flight > self.buf_alloc {
            return Err(Error::CreditExceeded {
                in_flight,
                buf_alloc: self.buf_alloc,
            });
        }
        self.rx_cnt += Wrapping(len);
        match self.kind {
            Kind::Stream => self.stream_from_guest(mem, pkt),
            Kind::SeqPacket => {
                // Bounded by the credit check above: at most buf_alloc bytes are held.
                let msg = &mut self.partial_msg;
                pkt.for_each_payload_slice::<packet::Error>(mem, |s| {
                    let start = msg.len();
                    msg.resize(start + s.len(), 0);
                    s.copy_to(&mut msg[start..]);
                    Ok(true)
                })?;
                if pkt.hdr.flags & packet::SEQ_EOM != 0 {
                    self.msgs.push_back(std::mem::take(&mut self.partial_msg));
                    self.flush_to_host()?;
                }
                Ok(())
            }
        }
    }

    fn stream_from_guest(&mut self, mem: &Memory, pkt: &TxPacket) -> Result<(), Error> {
        let stream = &mut self.stream;
        let to_host = &mut self.to_host;
        let mut written = 0u32;
        let mut blocked = !to_host.is_empty() || self.host_write_shut;
        let mut failure = None;
        pkt.for_each_payload_slice::<packet::Error>(mem, |s| {
            let mut rest = s;
            if !blocked {
                match stream.write_volatile(&rest).map_err(io_error) {
                    Ok(n) => {
                        // n <= rest.len(), as write(2) promises.
                        written = written.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
                        if n < rest.len() {
                            blocked = true;
                        }
                        rest = rest.offset(n.min(rest.len())).map_err(|e| {
                            packet::Error::Memory(vm_memory::GuestMemoryError::from(e))
                        })?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => blocked = true,
                    Err(e) => {
                        failure = Some(e);
                        return Ok(false);
                    }
                }
            }
            if !rest.is_empty() {
                let mut chunk = vec![0u8; rest.len()];
                rest.copy_to(&mut chunk[..]);
                to_host.extend(chunk);
            }
            Ok(true)
        })?;
        if let Some(e) = failure {
            return Err(Error::Io(e));
        }
        self.fwd_cnt += Wrapping(written);
        Ok(())
    }

    /// Takes the payloads of consecutive guest `RW` packets of this stream connection with
    /// one writev(2) over their guest memory slices, keeping what the socket does not take
    /// (within the credit we gave). The caller checked that the connection is an
    /// established stream.
    pub fn stream_from_guest_run(&mut self, mem: &Memory, pkts: &[TxPacket]) -> Result<(), Error> {
        let total = pkts.iter().fold(0u32, |a, p| a.saturating_add(p.hdr.len));
        let in_flight = (self.rx_cnt - self.fwd_cnt).0.saturating_add(total);
        if in_flight > self.buf_alloc {
            return Err(Error::CreditExceeded {
                in_flight,
                buf_alloc: self.buf_alloc,
            });
        }
        self.rx_cnt += Wrapping(total);
        let mut written = 0usize;
        if self.to_host.is_empty() && !self.host_write_shut {
            let mut iov: Vec<libc::iovec> = Vec::with_capacity(pkts.len() * 2);
            for pkt in pkts {
                pkt.for_each_payload_slice::<packet::Error>(mem, |s| {
                    iov.push(libc::iovec {
                        iov_base: s.ptr_guard().as_ptr().cast::<libc::c_void>().cast_mut(),
                        iov_len: s.len(),
                    });
                    Ok(true)
                })?;
            }
            let count = iov.len().min(IOV_MAX);
            // SAFETY: every iovec describes a slice of `mem` that `for_each_payload_slice`
            // checked lies inside a mapped guest memory region; `mem` is borrowed for this
            // whole function, so the mappings stay in place while writev(2) reads them, and
            // writev only reads. A guest changing the bytes meanwhile changes only the data
            // sent, never memory safety.
            let n = unsafe {
                libc::writev(
                    self.stream.as_raw_fd(),
                    iov.as_ptr(),
                    libc::c_int::try_from(count).unwrap_or(0),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::WouldBlock {
                    return Err(Error::Io(e));
                }
            } else {
                written = usize::try_from(n).unwrap_or(0);
            }
        }
        // What the socket did not take waits in `to_host` (bounded by the credit check).
        let mut skip = written;
        for pkt in pkts {
            let to_host = &mut self.to_host;
            pkt.for_each_payload_slice::<packet::Error>(mem, |s| {
                if skip >= s.len() {
                    skip -= s.len();
                    return Ok(true);
                }
                let rest = s
                    .offset(skip)
                    .map_err(|e| packet::Error::Memory(vm_memory::GuestMemoryError::from(e)))?;
                skip = 0;
                let mut chunk = vec![0u8; rest.len()];
                rest.copy_to(&mut chunk[..]);
                to_host.extend(chunk);
                Ok(true)
            })?;
        }
        self.fwd_cnt += Wrapping(u32::try_from(written).unwrap_or(u32::MAX));
        Ok(())
    }

    /// Writes what waits for the host socket. Returns whether anything was written.
    pub fn flush_to_host(&mut self) -> Result<bool, Error> {
        let mut progress = false;
        match self.kind {
            Kind::Stream => {
                while !self.to_host.is_empty() {
                    let (a, _) = self.to_host.as_slices();
                    match self.stream.write(a) {
                        Ok(0) => break,
                        Ok(n) => {
                            self.to_host.drain(..n);
                            self.fwd_cnt += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
                            progress = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(Error::Io(e)),
                    }
                }
            }
            Kind::SeqPacket => {
                while let Some(msg) = self.msgs.front() {
                    match self.stream.write(msg) {
                        Ok(_) => {
                            let len = u32::try_from(msg.len()).unwrap_or(u32::MAX);
                            self.msgs.pop_front();
                            self.fwd_cnt += Wrapping(len);
                            progress = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(Error::Io(e)),
                    }
                }
            }
        }
        if !self.wants_write()
            && self.guest_shutdown & packet::SHUTDOWN_SEND != 0
            && !self.host_write_shut
        {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(progress)
    }

    /// Whether the guest should hear about freed buffer space now: it believes at least
    /// three quarters of our buffer are in use and some of that has been forwarded since it
    /// last heard. A guest out of credit (it believes all is in use) thus always hears as
    /// soon as anything moves, and a guest with room to spare is not interrupted (an
    /// emulated guest pays dearly for every interrupt).
    pub fn credit_update_due(&self) -> bool {
        let unreported = (self.fwd_cnt - self.reported_fwd_cnt).0;
        let believed_in_use = (self.rx_cnt - self.reported_fwd_cnt).0;
        unreported > 0 && believed_in_use >= self.buf_alloc - self.buf_alloc / 4
    }

    /// The guest shut down `flags`.
    pub fn guest_shutdown(&mut self, flags: u32) -> Result<(), Error> {
        self.guest_shutdown |= flags & (packet::SHUTDOWN_RCV | packet::SHUTDOWN_SEND);
        self.flush_to_host()?;
        Ok(())
    }

    /// Fills one RX buffer with this connection's next packet for the guest.
    pub fn fill(&mut self, mem: &Memory, buf: &RxBuffer) -> Result<Filled, Error> {
        let hdr = if self.owed.rst {
            self.header(packet::op::RST, 0, 0)
        } else if self.owed.request {
            self.owed.request = false;
            self.header(packet::op::REQUEST, 0, 0)
        } else if self.owed.response {
            self.owed.response = false;
            self.header(packet::op::RESPONSE, 0, 0)
        } else if let Some(hdr) = self.fill_data(mem, buf)? {
            self.owed.credit_update = false;
            hdr
        } else if self.owed.credit_update {
            self.owed.credit_update = false;
            self.header(packet::op::CREDIT_UPDATE, 0, 0)
        } else if self.owed.shutdown != 0 {
            let flags = std::mem::take(&mut self.owed.shutdown);
            self.header(packet::op::SHUTDOWN, 0, flags)
        } else {
            return Ok(Filled::Nothing);
        };
        buf.write_header(mem, &hdr)?;
        Ok(Filled::Packet(hdr))
    }

    /// Moves host data into `buf`'s payload. `None` when there is none to move now.
    fn fill_data(&mut self, mem: &Memory, buf: &RxBuffer) -> Result<Option<Header>, Error> {
        if self.state != State::Established || !self.wants_read() {
            return Ok(None);
        }
        // Only read a socket that epoll reported (a credit update would otherwise cost a
        // read(2) that returns EAGAIN, once per packet of a guest->host stream).
        let staged = !self.early.is_empty() || self.stage_off < self.stage.len();
        if !staged && !self.readable && !self.hung_up {
            return Ok(None);
        }
        let room = buf.payload_capacity().min(self.peer_credit() as usize);
        if room == 0 {
            return Ok(None);
        }
        if !self.early.is_empty() {
            let n = buf.write_payload(mem, &self.early[..self.early.len().min(room)])?;
            self.early.drain(..n);
            return Ok(Some(self.data_header(n, 0)));
        }
        match self.kind {
            Kind::Stream => self.fill_stream(mem, buf, room),
            Kind::SeqPacket => self.fill_seqpacket(mem, buf, room),
        }
    }

    fn data_header(&mut self, n: usize, flags: u32) -> Header {
        let len = u32::try_from(n).unwrap_or(u32::MAX);
        self.tx_cnt += Wrapping(len);
        self.header(packet::op::RW, len, flags)
    }

    fn fill_stream(
        &mut self,
        mem: &Memory,
        buf: &RxBuffer,
        room: usize,
    ) -> Result<Option<Header>, Error> {
        let stream = &mut self.stream;
        let mut total = 0usize;
        let mut result: io::Result<()> = Ok(());
        let mut eof = false;
        buf.for_each_payload_slice::<packet::Error>(mem, room, |mut s| {
            match stream.read_volatile(&mut s).map_err(io_error) {
                Ok(0) => {
                    eof = true;
                    Ok(false)
                }
                Ok(n) => {
                    total += n;
                    Ok(n == s.len())
                }
                Err(e) => {
                    result = Err(e);
                    Ok(false)
                }
            }
        })?;
        if total > 0 {
            return Ok(Some(self.data_header(total, 0)));
        }
        self.host_side_ended(result, eof)
    }

    /// The host side gave no data: `EAGAIN`, EOF or an error.
    fn host_side_ended(
        &mut self,
        result: io::Result<()>,
        eof: bool,
    ) -> Result<Option<Header>, Error> {
        match result {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.readable = false;
                self.hung_up = false;
                Ok(None)
            }
            Err(e) => Err(Error::Io(e)),
            Ok(()) if eof => {
                self.host_eof = true;
                self.readable = false;
                Ok(Some(self.header(
                    packet::op::SHUTDOWN,
                    0,
                    packet::SHUTDOWN_SEND,
                )))
            }
            Ok(()) => {
                self.readable = false;
                Ok(None)
            }
        }
    }

    fn fill_seqpacket(
        &mut self,
        mem: &Memory,
        buf: &RxBuffer,
        room: usize,
    ) -> Result<Option<Header>, Error> {
        if self.stage_off >= self.stage.len() {
            // Receive the next whole message.
            self.stage.resize(MAX_SEQ_MSG, 0);
            let flags = nix::sys::socket::MsgFlags::MSG_DONTWAIT;
            let fd = self.stream.as_raw_fd();
            match nix::sys::socket::recv(fd, &mut self.stage, flags) {
                Ok(0) => {
                    self.stage = Vec::new();
                    self.stage_off = 0;
                    return self.host_side_ended(Ok(()), true);
                }
                Ok(n) => {
                    self.stage.truncate(n);
                    self.stage_off = 0;
                    self.stage_eor = true;
                }
                Err(e) => {
                    self.stage = Vec::new();
                    self.stage_off = 0;
                    return self.host_side_ended(Err(io::Error::from(e)), false);
                }
            }
        }
        let left = self.stage.len() - self.stage_off;
        let n = buf.write_payload(
            mem,
            &self.stage[self.stage_off..self.stage_off + left.min(room)],
        )?;
        self.stage_off += n;
        let flags = if self.stage_off >= self.stage.len() {
            let mut f = packet::SEQ_EOM;
            if std::mem::take(&mut self.stage_eor) {
                f |= packet::SEQ_EOR;
            }
            // Give the staging memory back: idle connections hold none.
            self.stage = Vec::new();
            self.stage_off = 0;
            f
        } else {
            0
        };
        Ok(Some(self.data_header(n, flags)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(buf_alloc: u32) -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        a.set_nonblocking(true).expect("nonblocking");
        let mut c = Connection::new(a, Kind::Stream, 3, buf_alloc, State::Established);
        c.host_port = 5000;
        c.guest_port = 1000;
        (c, b)
    }

    /// A TX packet of `payload` at `at` in `mem`, split over two payload descriptors.
    fn tx_packet(mem: &Memory, at: u64, payload: &[u8]) -> TxPacket {
        use vm_memory::{Bytes, GuestAddress};
        let len = u32::try_from(payload.len()).expect("len");
        let hdr = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1000,
            dst_port: 5000,
            len,
            type_: packet::TYPE_STREAM,
            op: packet::op::RW,
            buf_alloc: 65536,
            ..Header::default()
        };
        mem.write_slice(&hdr.to_bytes(), GuestAddress(at))
            .expect("header");
        let half = payload.len() / 2;
        let a = at + 0x100;
        let b = at + 0x100 + payload.len() as u64 + 0x40;
        mem.write_slice(&payload[..half], GuestAddress(a))
            .expect("payload");
        mem.write_slice(&payload[half..], GuestAddress(b))
            .expect("payload");
        let descs = [
            (GuestAddress(at), packet::HEADER_LEN_U32, false),
            (GuestAddress(a), u32::try_from(half).expect("len"), false),
            (
                GuestAddress(b),
                u32::try_from(payload.len() - half).expect("len"),
                false,
            ),
        ];
        TxPacket::parse(mem, descs).expect("packet")
    }

    #[test]
    fn a_run_of_packets_goes_out_in_order_and_back_pressure_keeps_the_rest() {
        use std::io::Read;
        let mem = Memory::from_ranges(&[(vm_memory::GuestAddress(0), 8 << 20)]).expect("mem");
        let (mut c, mut host) = conn(1 << 20);
        // Shrink the socket's buffer so a run does not fit at once.
        nix::sys::socket::setsockopt(&c.stream, nix::sys::socket::sockopt::SndBuf, &4096)
            .expect("sndbuf");
        let payloads: Vec<Vec<u8>> = (0..6u8)
            .map(|i| {
                (0..40_000u32)
                    .map(|j| (j % 251) as u8 ^ i.wrapping_mul(37))
                    .collect()
            })
            .collect();
        let pkts: Vec<TxPacket> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| tx_packet(&mem, (i as u64) << 20, p))
            .collect();
        c.stream_from_guest_run(&mem, &pkts[..3])
            .expect("first run");
        assert!(c.wants_write(), "a 4 KiB socket buffer cannot take 120 KB");
        assert_eq!(
            c.host_backlog(),
            c.to_host.len(),
            "credit counts exactly what waits"
        );
        // A run behind a backlog is queued whole, after it.
        c.stream_from_guest_run(&mem, &pkts[3..])
            .expect("second run");
        let want: Vec<u8> = payloads.concat();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        host.set_nonblocking(true).expect("nonblocking");
        while got.len() < want.len() {
            c.flush_to_host().expect("flush");
            match host.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("read: {e}"),
            }
        }
        assert_eq!(got, want, "every byte once, in order");
        assert_eq!(c.host_backlog(), 0);
        assert_eq!(c.fwd_cnt.0 as usize, want.len());
        // More than the credit we gave is refused.
        let mut small = conn(50_000).0;
        assert!(matches!(
            small.stream_from_guest_run(&mem, &pkts[..2]),
            Err(Error::CreditExceeded { .. })
        ));
    }

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 1234"), Some(1234));
        assert_eq!(parse_connect_line(b"CONNECT 1234\r"), Some(1234));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect_line(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect_line(b"CONNECT"), None);
        assert_eq!(parse_connect_line(b"connect 1"), None);
        assert_eq!(parse_connect_line(b"CONNECT -1"), None);
        assert_eq!(parse_connect_line(&[0xff, 0xfe]), None);
    }

    #[test]
    fn connect_line_in_pieces_keeps_early_data() {
        let (a, mut b) = UnixStream::pair().expect("socketpair");
        a.set_nonblocking(true).expect("nonblocking");
        let mut c = Connection::new(a, Kind::Stream, 3, 4096, State::AwaitingConnect(Vec::new()));
        b.write_all(b"CONN").expect("write");
        assert_eq!(c.read_connect_line().expect("partial"), None);
        b.write_all(b"ECT 77\nhi").expect("write");
        assert_eq!(c.read_connect_line().expect("complete"), Some(77));
        assert_eq!(c.early, b"hi");

        let (a, mut b) = UnixStream::pair().expect("socketpair");
        a.set_nonblocking(true).expect("nonblocking");
        let mut c = Connection::new(a, Kind::Stream, 3, 4096, State::AwaitingConnect(Vec::new()));
        b.write_all(&[b'x'; 40]).expect("write");
        assert!(
            c.read_connect_line().is_err(),
            "a line without newline is bounded"
        );
    }

    #[test]
    fn peer_credit_follows_the_guest_headers() {
        let (mut c, _b) = conn(65536);
        assert_eq!(
            c.peer_credit(),
            0,
            "no credit before the guest says anything"
        );
        let mut h = Header {
            buf_alloc: 1000,
            fwd_cnt: 0,
            ..Header::default()
        };
        c.update_peer_credit(&h);
        assert_eq!(c.peer_credit(), 1000);
        c.tx_cnt = Wrapping(600);
        assert_eq!(c.peer_credit(), 400);
        h.fwd_cnt = 600;
        c.update_peer_credit(&h);
        assert_eq!(c.peer_credit(), 1000);
        // Counters wrap.
        c.tx_cnt = Wrapping(5);
        h.fwd_cnt = u32::MAX - 10;
        c.update_peer_credit(&h);
        assert_eq!(c.peer_credit(), 1000 - 16);
        // A guest shrinking its buffer below what is in flight gives zero, not a wrap.
        h.buf_alloc = 3;
        c.update_peer_credit(&h);
        assert_eq!(c.peer_credit(), 0);
        assert!(!c.wants_read());
    }

    #[test]
    fn credit_updates_are_due_only_when_the_guest_runs_low() {
        let (mut c, _b) = conn(1000);
        assert!(!c.credit_update_due());
        c.rx_cnt = Wrapping(700);
        c.fwd_cnt = Wrapping(700);
        assert!(
            !c.credit_update_due(),
            "the guest still believes 300 bytes are free"
        );
        c.rx_cnt = Wrapping(750);
        c.fwd_cnt = Wrapping(750);
        assert!(c.credit_update_due());
        let h = c.header(packet::op::CREDIT_UPDATE, 0, 0);
        assert_eq!((h.fwd_cnt, h.buf_alloc), (750, 1000));
        assert!(!c.credit_update_due(), "reported");
        // Everything in use but nothing forwarded: nothing to report yet.
        c.rx_cnt = Wrapping(1750);
        assert!(!c.credit_update_due());
        c.fwd_cnt = Wrapping(751);
        assert!(c.credit_update_due());
    }
}
