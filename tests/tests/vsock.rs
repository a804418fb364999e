//! vhost-device-vsock as a real process, driven over its vhost-user socket by the in-test
//! frontend playing the guest's virtio-vsock driver (RX, TX and event queues in memfd
//! memory), with host programs on the hybrid-vsock Unix sockets.
//!
//! The packet header is encoded here independently of the daemon's code (virtio 1.2,
//! 5.10.6), so a wire-format mistake in the daemon cannot hide behind a shared helper.

#![allow(clippy::cast_possible_truncation)] // test data patterns and small lengths

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::frontend::{Buf, Frontend, Options};
use e2e::process::wait_for_path;
use e2e::ChildGuard;
use vm_memory::GuestAddress;

const HDR: usize = 44;
const HOST: u64 = 2;
const STREAM: u16 = 1;
const SEQPACKET: u16 = 2;
const REQUEST: u16 = 1;
const RESPONSE: u16 = 2;
const RST: u16 = 3;
const SHUTDOWN: u16 = 4;
const RW: u16 = 5;
const CREDIT_UPDATE: u16 = 6;
const CREDIT_REQUEST: u16 = 7;
const EOM: u32 = 1;
const T: Duration = Duration::from_secs(5);
/// The guest's receive buffer as the test driver advertises it.
const GUEST_BUF: u32 = 256 * 1024;
const RX_BUF: u32 = 4096 + HDR as u32;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    ty: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Hdr {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HDR);
        b.extend_from_slice(&self.src_cid.to_le_bytes());
        b.extend_from_slice(&self.dst_cid.to_le_bytes());
        b.extend_from_slice(&self.src_port.to_le_bytes());
        b.extend_from_slice(&self.dst_port.to_le_bytes());
        b.extend_from_slice(&self.len.to_le_bytes());
        b.extend_from_slice(&self.ty.to_le_bytes());
        b.extend_from_slice(&self.op.to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&self.buf_alloc.to_le_bytes());
        b.extend_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().expect("2 bytes"));
        Hdr {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            ty: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// The daemon under test, killed on drop.
struct Daemon {
    _guard: ChildGuard,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn vsock_bin() -> PathBuf {
    e2e::bin_path("vhost-device-vsock")
}

/// Starts the daemon with `args`, where `{dir}` stands for a fresh temporary directory, and
/// waits for `wait_for` (relative to it) to appear.
fn start(args: &[&str], wait_for: &[&str]) -> Daemon {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 tempdir").to_string();
    let mut cmd = Command::new(vsock_bin());
    cmd.args(args.iter().map(|a| a.replace("{dir}", &d)));
    cmd.env("RUST_LOG", "warn").stdout(Stdio::null());
    let guard = ChildGuard::spawn("vhost-device-vsock", cmd).expect("start daemon");
    for w in wait_for {
        assert!(
            wait_for_path(&dir.path().join(w), T),
            "daemon did not create {w}"
        );
    }
    Daemon { _guard: guard, dir }
}

fn start_one(cid: u64, extra: &[&str]) -> Daemon {
    let cid = cid.to_string();
    let mut args = vec![
        "--guest-cid",
        &cid,
        "--socket-path",
        "{dir}/vhost.sock",
        "--uds-path",
        "{dir}/vm.vsock",
    ];
    args.extend_from_slice(extra);
    start(&args, &["vhost.sock", "vm.vsock"])
}

/// The test's virtio-vsock driver.
struct Guest {
    fe: Frontend,
    cid: u64,
    rx_addr: std::collections::HashMap<u16, GuestAddress>,
    tx_slots: Vec<GuestAddress>,
    tx_next: usize,
    /// Packets received and not yet taken by the test.
    inbox: VecDeque<(Hdr, Vec<u8>)>,
}

impl Guest {
    fn connect(sock: &Path, cid: u64) -> Self {
        let opts = Options::default()
            .queues(3)
            .queue_size(256)
            .mem_size(64 << 20);
        let fe = Frontend::connect(sock, opts).expect("vhost-user set-up");
        let mut g = Guest {
            fe,
            cid,
            rx_addr: std::collections::HashMap::new(),
            tx_slots: Vec::new(),
            tx_next: 0,
            inbox: VecDeque::new(),
        };
        for _ in 0..64 {
            let a = g.fe.memory().alloc(HDR + 64 * 1024);
            g.tx_slots.push(a);
        }
        for _ in 0..128 {
            let a = g.fe.memory().alloc(RX_BUF as usize);
            g.post_rx(a);
        }
        g.fe.queue(0).kick().expect("kick rx");
        g
    }

    fn post_rx(&mut self, addr: GuestAddress) {
        let q = self.fe.queue(0);
        let head = q.add(&[Buf::writable(addr, RX_BUF)]).expect("rx buffer");
        q.publish(head);
        self.rx_addr.insert(head, addr);
    }

    /// Sends a packet as one chain: header and payload in separate descriptors.
    fn send(&mut self, h: Hdr, payload: &[u8]) {
        assert!(payload.len() <= 64 * 1024);
        let slot = self.tx_slots[self.tx_next % self.tx_slots.len()];
        self.tx_next += 1;
        let mut h = h;
        h.len = u32::try_from(payload.len()).expect("small");
        self.fe.memory().write(slot, &h.encode());
        let mut bufs = vec![Buf::readable(slot, HDR as u32)];
        if !payload.is_empty() {
            let p = GuestAddress(slot.0 + HDR as u64);
            self.fe.memory().write(p, payload);
            bufs.push(Buf::readable(p, h.len));
        }
        self.send_chain(&bufs);
    }

    /// Submits a TX chain as given and waits for the device to use it.
    fn send_chain(&mut self, bufs: &[Buf]) {
        let q = self.fe.queue(1);
        q.submit(bufs).expect("tx submit");
        q.wait_used(T).expect("tx used");
    }

    fn hdr(&self, op: u16, local: u32, peer: u32) -> Hdr {
        Hdr {
            src_cid: self.cid,
            dst_cid: HOST,
            src_port: local,
            dst_port: peer,
            ty: STREAM,
            op,
            buf_alloc: GUEST_BUF,
            ..Hdr::default()
        }
    }

    /// Takes every packet the device has placed on the RX queue, recycling the buffers.
    fn collect(&mut self) {
        while let Some(u) = self.fe.queue(0).poll_used() {
            let addr = self.rx_addr.remove(&u.id).expect("known rx buffer");
            assert!(
                u.len as usize >= HDR,
                "RX used length {} shorter than a header",
                u.len
            );
            let raw = self.fe.memory().read(addr, u.len as usize);
            let h = Hdr::decode(&raw[..HDR]);
            assert_eq!(
                h.len as usize,
                raw.len() - HDR,
                "used length matches header len"
            );
            self.inbox.push_back((h, raw[HDR..].to_vec()));
            self.post_rx(addr);
            self.fe.queue(0).kick().expect("kick rx");
        }
    }

    /// Waits for the next packet.
    fn recv(&mut self, timeout: Duration) -> Option<(Hdr, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        loop {
            self.collect();
            if let Some(p) = self.inbox.pop_front() {
                return Some(p);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.fe
                .queue(0)
                .wait_call(left.min(Duration::from_millis(50)));
        }
    }

    /// Waits for the next packet with `op`, skipping credit updates.
    fn expect(&mut self, op: u16) -> (Hdr, Vec<u8>) {
        loop {
            let (h, p) = self
                .recv(T)
                .unwrap_or_else(|| panic!("no packet (waiting for op {op})"));
            if h.op == CREDIT_UPDATE && op != CREDIT_UPDATE {
                continue;
            }
            assert_eq!(h.op, op, "unexpected packet {h:?}");
            return (h, p);
        }
    }

    /// Asserts that nothing but credit updates arrives within `d`.
    fn expect_quiet(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        while let Some((h, _)) = self.recv(deadline.saturating_duration_since(Instant::now())) {
            assert_eq!(h.op, CREDIT_UPDATE, "unexpected packet {h:?}");
        }
    }

    /// Opens a connection from guest port `local` to host port `port` (a listener on
    /// `<uds>_<port>` must exist); returns the daemon's RESPONSE header.
    fn connect_to_host(&mut self, local: u32, port: u32) -> Hdr {
        let h = self.hdr(REQUEST, local, port);
        self.send(h, &[]);
        let (r, _) = self.expect(RESPONSE);
        assert_eq!(
            (r.src_cid, r.dst_cid, r.src_port, r.dst_port),
            (HOST, self.cid, port, local)
        );
        r
    }
}

fn accept(l: &UnixListener) -> UnixStream {
    l.set_nonblocking(false).expect("blocking");
    let (s, _) = l.accept().expect("accept");
    s.set_read_timeout(Some(T)).expect("timeout");
    s
}

fn read_exact_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).expect("host read");
    v
}

#[test]
fn config_space_holds_the_cid_and_features_are_offered() {
    let d = start_one(7, &[]);
    let mut g = Guest::connect(&d.path("vhost.sock"), 7);
    assert_eq!(
        g.fe.get_config(0, 8).expect("config"),
        7u64.to_le_bytes().to_vec()
    );
    // Out-of-range reads come back as zeros, not an error or a crash.
    assert_eq!(g.fe.get_config(6, 4).expect("config"), vec![0, 0, 0, 0]);
    let offered = g.fe.offered_features();
    assert_ne!(offered & (1 << 32), 0, "VERSION_1");
    assert_ne!(offered & (1 << 29), 0, "EVENT_IDX");
    assert_ne!(offered & (1 << 1), 0, "VIRTIO_VSOCK_F_SEQPACKET");
}

#[test]
fn guest_connects_to_host_listener_and_data_flows_both_ways() {
    let d = start_one(3, &[]);
    let listener = UnixListener::bind(d.path("vm.vsock_5000")).expect("host listener");
    let mut g = Guest::connect(&d.path("vhost.sock"), 3);
    let r = g.connect_to_host(1234, 5000);
    assert!(r.buf_alloc > 0, "the device advertises a receive buffer");
    let mut host = accept(&listener);

    g.send(g.hdr(RW, 1234, 5000), b"hello from the guest");
    assert_eq!(read_exact_n(&mut host, 20), b"hello from the guest");

    host.write_all(b"hello from the host").expect("host write");
    let (h, p) = g.expect(RW);
    assert_eq!((h.src_port, h.dst_port, h.ty), (5000, 1234, STREAM));
    assert_eq!(p, b"hello from the host");

    // The host closes: the guest hears SHUTDOWN (no more sends), then closes too.
    drop(host);
    let (h, _) = g.expect(SHUTDOWN);
    assert_ne!(h.flags & 2, 0, "SHUTDOWN_SEND");
    g.send(
        Hdr {
            flags: 3,
            ..g.hdr(SHUTDOWN, 1234, 5000)
        },
        &[],
    );
    g.expect(RST);
}

#[test]
fn guest_close_reaches_the_host_as_eof_after_the_data() {
    let d = start_one(3, &[]);
    let listener = UnixListener::bind(d.path("vm.vsock_6000")).expect("host listener");
    let mut g = Guest::connect(&d.path("vhost.sock"), 3);
    g.connect_to_host(1000, 6000);
    let mut host = accept(&listener);
    g.send(g.hdr(RW, 1000, 6000), b"last words");
    g.send(
        Hdr {
            flags: 3,
            ..g.hdr(SHUTDOWN, 1000, 6000)
        },
        &[],
    );
    g.expect(RST);
    let mut all = Vec::new();
    host.read_to_end(&mut all).expect("read to EOF");
    assert_eq!(all, b"last words");
}

#[test]
fn refused_port_gets_a_prompt_reset() {
    let d = start_one(3, &[]);
    let mut g = Guest::connect(&d.path("vhost.sock"), 3);
    let t0 = Instant::now();
    g.send(g.hdr(REQUEST, 4000, 9999), &[]);
    let (h, _) = g.expect(RST);
    assert_eq!(
        (h.src_cid, h.dst_cid, h.src_port, h.dst_port),
        (HOST, 3, 9999, 4000)
    );
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "reset took {:?}",
        t0.elapsed()
    );
}

#[test]
fn host_connects_with_connect_line_and_gets_ok() {
    let d = start_one(3, &[]);
    let mut g = Guest::connect(&d.path("vhost.sock"), 3);
    let mut host = UnixStream::connect(d.path("vm.vsock")).expect("connect uds");
    host.set_read_timeout(Some(T)).expect("timeout");
    host.write_all(b"CONNECT 1234\n").expect("write");
    let (req, _) = g.expect(REQUEST);
    assert_eq!(
        (req.src_cid, req.dst_cid, req.dst_port, req.ty),
        (HOST, 3, 1234, STREAM)
    );
    let local = req.src_port;
    g.send(g.hdr(RESPONSE, 1234, local), &[]);
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        host.read_exact(&mut byte).expect("OK line");
        line.push(byte[0]);
    }
    assert_eq!(
        String::from_utf8(line).expect("utf-8"),
        format!("OK {local}\n")
    );

    host.write_all(b"ping").expect("write");
    let (h, p) = g.expect(RW);
    assert_eq!((h.src_port, h.dst_port), (local, 1234));
    assert_eq!(p, b"ping");
    g.send(g.hdr(RW, 1234, local), b"pong");
    assert_eq!(read_exact_n(&mut host, 4), b"pong");
}

#[test]
fn host_connect_refused_by_guest_or_malformed_is_closed() {
    let d = start_one(3, &[]);
    let mut g = Guest::connect(&d.path("vhost.sock"), 3);
    let mut host = UnixStream::connect(d.path("vm.vsock")).expect("connect uds");
    host.set_read_timeout(Some(T)).expect("timeout");
    host.write_all(b"CONNECT 77\n").expect("write");
    let (req, _) = g.expect(REQUEST);
    g.send(g.hdr(RST, 77, req.src_port), &[]);
    let mut buf = [0u8; 16];
    assert_eq!(
        host.read(&mut buf).expect("EOF"),
        0,
        "closed after the guest refused"
    );

    let mut bad = UnixStream::connect(d.path("vm.vsock")).expect("connect uds");
    bad.set_read_timeout(Some(T)).expect("timeout");
    bad.write_all(b"HELLO there\n").expect("write");
    assert_eq!(
        bad.read(&mut buf).unwrap_or(0),
        0,
        "closed after a bad line"
    );
    g.expect_quiet(Duration::from_millis(200));
}

/// Guest to host with a host reader that stalls: the device must never take more than the
/// credit it gave, must keep every byte in order, and must tell the guest when space frees.
#[test]
fn guest_to_host_flow_control_with_a_stalled_reader() {
    let d = start_one(3, &["--tx-buffer-size", "65536"]);
    let listener = UnixListener::bind(d.path("vm.vsock_7000")).expect("host listener");
    let mut g = Guest::connect(&d.path("vhost.sock"), 3);
    let r = g.connect_to_host(1500, 7000);
    let mut host = accept(&listener);
    let buf_alloc = r.buf_alloc;
    let mut peer_fwd = r.fwd_cnt;
    let total: usize = 8 << 20;
    let data: Vec<u8> = (0..total).map(|i| (i * 7 + i / 4096) as u8).collect();
    let mut sent = 0usize;
    let mut tx_cnt: u32 = 0;
    let mut stalled_seen = false;
    let reader = std::thread::spawn(move || {
        // Stall first, so the device's buffer and the socket fill up.
        std::thread::sleep(Duration::from_millis(700));
        let mut got = Vec::with_capacity(total);
        let mut buf = vec![0u8; 65536];
        while got.len() < total {
            let n = host.read(&mut buf).expect("host read");
            assert!(n > 0, "unexpected EOF after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
        }
        got
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while sent < total {
        assert!(Instant::now() < deadline, "transfer stuck at {sent} bytes");
        let credit = buf_alloc - tx_cnt.wrapping_sub(peer_fwd);
        if credit == 0 {
            stalled_seen = true;
            if let Some((h, _)) = g.recv(Duration::from_millis(200)) {
                assert!(matches!(h.op, CREDIT_UPDATE | RW), "unexpected {h:?}");
                peer_fwd = h.fwd_cnt;
                assert!(tx_cnt.wrapping_sub(peer_fwd) <= buf_alloc);
            }
            continue;
        }
        let n = (credit as usize).min(16 * 1024).min(total - sent);
        g.send(g.hdr(RW, 1500, 7000), &data[sent..sent + n]);
        sent += n;
        tx_cnt = tx_cnt.wrapping_add(n as u32);
        g.collect();
        while let Some((h, _)) = g.inbox.pop_front() {
            // Once everything is through, the reader may already have closed.
            let done = sent == total && h.op == SHUTDOWN;
            assert!(h.op == CREDIT_UPDATE || done, "unexpected {h:?}");
            peer_fwd = h.fwd_cnt;
        }
    }
    let got = reader.join().expect("reader");
    assert!(
        stalled_seen,
        "the stalled reader never made the guest wait for credit"
    );
    assert!(got == data, "bytes lost, duplicated or reordered");
}

/// Host to guest: the device sends no more than the guest's credit and resumes on update.
#[test]
fn host_to_guest_respects_guest_credit() {
    let d = start_one(3, &[]);
    let listener = UnixListener::bind(d.path("vm.vsock_7100")).expect("host listener");
    let mut g = Guest::connect(&d.path("vhost.sock"), 3);
    let small = 16 * 1024u32;
    g.send(
        Hdr {
            buf_alloc: small,
            ..g.hdr(REQUEST, 1600, 7100)
        },
        &[],
    );
    g.expect(RESPONSE);
    let mut host = accept(&listener);
    let total = 1 << 20;
    let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
    let writer_data = data.clone();
    let writer = std::thread::spawn(move || {
        host.write_all(&writer_data).expect("host write");
        host
    });
    let mut got: Vec<u8> = Vec::new();
    let mut fwd: u32 = 0;
    while got.len() < total {
        let (_h, p) = g.expect(RW);
        got.extend_from_slice(&p);
        let unacked = got.len() as u32 - fwd;
        assert!(
            unacked <= small,
            "device sent {unacked} bytes beyond the guest's {small} credit"
        );
        if unacked == small {
            // Consumed: tell the device, as a driver does after the application reads.
            g.expect_quiet(Duration::from_millis(50));
            fwd = got.len() as u32;
            g.send(
                Hdr {
                    buf_alloc: small,
                    fwd_cnt: fwd,
                    ..g.hdr(CREDIT_UPDATE, 1600, 7100)
                },
                &[],
            );
        }
    }
    assert!(got == data, "bytes lost, duplicated or reordered");
    drop(writer.join().expect("writer"));
}

#[test]
fn credit_request_is_answered_and_excess_data_resets() {
    let d = start_one(3, &["--tx-buffer-size", "8192"]);
    let listener = UnixListener::bind(d.path("vm.vsock_7200")).expect("host listener");
    let mut g = Guest::connect(&d.path("vhost.sock"), 3);
    let r = g.connect_to_host(1700, 7200);
    assert_eq!(r.buf_alloc, 8192);
    let _host = accept(&listener);
    g.send(g.hdr(CREDIT_REQUEST, 1700, 7200), &[]);
    let (h, _) = g.expect(CREDIT_UPDATE);
    assert_eq!(h.buf_alloc, 8192);
    // A guest that ignores the credit: more than buf_alloc plus what the socket takes.
    let blob = vec![1u8; 60 * 1024];
    let mut reset = false;
    for _ in 0..64 {
        g.send(g.hdr(RW, 1700, 7200), &blob);
        g.collect();
        if g.inbox.iter().any(|(h, _)| h.op == RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "a guest exceeding its credit is reset");
}

#[test]
fn hostile_chains_and_headers_do_not_stop_the_device() {
    let d = start_one(3, &[]);
    let listener = UnixListener::bind(d.path("vm.vsock_8000")).expect("host listener");
    let mut g = Guest::connect(&d.path("vhost.sock"), 3);
    let slot = g.fe.memory().alloc(4096);
    let mem_end = GuestAddress(64 << 20);

    // Header split over two descriptors is fine: a REQUEST to a refused port gets RST.
    let h = g.hdr(REQUEST, 10, 9);
    g.fe.memory().write(slot, &h.encode());
    g.send_chain(&[
        Buf::readable(slot, 10),
        Buf::readable(GuestAddress(slot.0 + 10), 34),
    ]);
    g.expect(RST);

    // Too short for a header.
    g.send_chain(&[Buf::readable(slot, 20)]);
    // Writable descriptor in a TX chain.
    g.send_chain(&[Buf::writable(slot, 44)]);
    // Outside guest memory.
    g.send_chain(&[Buf::readable(mem_end, 44)]);
    g.send_chain(&[Buf::readable(GuestAddress(u64::MAX - 8), 44)]);
    // len larger than the chain carries, and larger than any packet.
    for len in [100u32, 1 << 20, u32::MAX] {
        let h = Hdr {
            len,
            ..g.hdr(RW, 10, 9)
        };
        g.fe.memory().write(slot, &h.encode());
        g.send_chain(&[
            Buf::readable(slot, 44),
            Buf::readable(GuestAddress(slot.0 + 44), 50),
        ]);
    }
    // Wrong source CID: dropped without an answer.
    let spoof = Hdr {
        src_cid: 99,
        ..g.hdr(REQUEST, 11, 8000)
    };
    g.send(spoof, &[]);
    // Unknown op, unknown type, data for no connection, a destination CID nobody has:
    // each gets RST.
    for h in [
        g.hdr(42, 12, 8000),
        Hdr {
            ty: 9,
            ..g.hdr(REQUEST, 13, 8000)
        },
        g.hdr(RW, 14, 8000),
        Hdr {
            dst_cid: 1234,
            ..g.hdr(REQUEST, 15, 8000)
        },
    ] {
        g.send(h, b"x");
        let (r, _) = g.expect(RST);
        assert_eq!((r.src_port, r.dst_port), (h.dst_port, h.src_port));
    }
    // An RST for nothing is not answered.
    g.send(g.hdr(RST, 16, 8000), &[]);
    g.expect_quiet(Duration::from_millis(200));

    // Still serving.
    g.connect_to_host(17, 8000);
    let mut host = accept(&listener);
    g.send(g.hdr(RW, 17, 8000), b"alive");
    assert_eq!(read_exact_n(&mut host, 5), b"alive");
}

#[test]
fn seqpacket_keeps_message_boundaries() {
    use nix::sys::socket::{
        bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    let d = start_one(3, &[]);
    let path = d.path("vm.vsock_9000");
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &UnixAddr::new(&path).expect("addr"),
    )
    .expect("bind");
    listen(&fd, Backlog::new(8).expect("backlog")).expect("listen");
    let listener = UnixListener::from(fd);
    let mut g = Guest::connect(&d.path("vhost.sock"), 3);
    g.send(
        Hdr {
            ty: SEQPACKET,
            ..g.hdr(REQUEST, 2000, 9000)
        },
        &[],
    );
    let (r, _) = g.expect(RESPONSE);
    assert_eq!(r.ty, SEQPACKET);
    let host = accept(&listener);

    // Guest message in two fragments, then a one-fragment message.
    let sq = Hdr {
        ty: SEQPACKET,
        ..g.hdr(RW, 2000, 9000)
    };
    g.send(sq, b"first half, ");
    g.send(Hdr { flags: EOM, ..sq }, b"second half");
    g.send(Hdr { flags: EOM, ..sq }, b"short");
    let mut buf = vec![0u8; 1024];
    let n = nix::sys::socket::recv(
        std::os::fd::AsRawFd::as_raw_fd(&host),
        &mut buf,
        nix::sys::socket::MsgFlags::empty(),
    )
    .expect("recv");
    assert_eq!(&buf[..n], b"first half, second half");
    let n = nix::sys::socket::recv(
        std::os::fd::AsRawFd::as_raw_fd(&host),
        &mut buf,
        nix::sys::socket::MsgFlags::empty(),
    )
    .expect("recv");
    assert_eq!(&buf[..n], b"short");

    // Host messages, one larger than an RX buffer: fragments with EOM on the last only.
    let big: Vec<u8> = (0..10_000).map(|i| (i % 13) as u8).collect();
    for m in [&b"one"[..], &big[..], &b"three"[..]] {
        nix::sys::socket::send(
            std::os::fd::AsRawFd::as_raw_fd(&host),
            m,
            nix::sys::socket::MsgFlags::empty(),
        )
        .expect("send");
    }
    let mut msgs = Vec::new();
    let mut cur = Vec::new();
    while msgs.len() < 3 {
        let (h, p) = g.expect(RW);
        assert_eq!(h.ty, SEQPACKET);
        cur.extend_from_slice(&p);
        if h.flags & EOM != 0 {
            msgs.push(std::mem::take(&mut cur));
        }
    }
    assert_eq!(msgs, vec![b"one".to_vec(), big, b"three".to_vec()]);
}

#[test]
fn sibling_vms_in_one_group_reach_each_other_by_cid() {
    let d = start(
        &[
            "--vm",
            "guest-cid=3,socket={dir}/a.sock,uds-path={dir}/a.vsock,groups=g1",
            "--vm",
            "guest-cid=4,socket={dir}/b.sock,uds-path={dir}/b.vsock,groups=g2+g1",
            "--vm",
            "guest-cid=5,socket={dir}/c.sock,uds-path={dir}/c.vsock,groups=g3",
        ],
        &["a.sock", "b.sock", "c.sock"],
    );
    let mut a = Guest::connect(&d.path("a.sock"), 3);
    let mut b = Guest::connect(&d.path("b.sock"), 4);
    let to_b = Hdr {
        dst_cid: 4,
        ..a.hdr(REQUEST, 3000, 80)
    };
    a.send(to_b, &[]);
    let (h, _) = b.expect(REQUEST);
    assert_eq!(
        (h.src_cid, h.dst_cid, h.src_port, h.dst_port),
        (3, 4, 3000, 80)
    );
    b.send(
        Hdr {
            dst_cid: 3,
            ..b.hdr(RESPONSE, 80, 3000)
        },
        &[],
    );
    a.expect(RESPONSE);
    let big: Vec<u8> = (0..20_000).map(|i| (i % 7) as u8).collect();
    a.send(
        Hdr {
            dst_cid: 4,
            ..a.hdr(RW, 3000, 80)
        },
        &big,
    );
    let mut got = Vec::new();
    while got.len() < big.len() {
        let (h, p) = b.expect(RW);
        assert_eq!(h.src_cid, 3);
        got.extend_from_slice(&p);
    }
    assert_eq!(
        got, big,
        "a packet larger than the receiver's buffers arrives in pieces, in order"
    );

    // CID 5 shares no group with CID 3: reset.
    a.send(
        Hdr {
            dst_cid: 5,
            ..a.hdr(REQUEST, 3001, 80)
        },
        &[],
    );
    a.expect(RST);
}

#[test]
fn frontend_reconnect_gets_a_working_device() {
    let d = start_one(3, &[]);
    let listener = UnixListener::bind(d.path("vm.vsock_5100")).expect("host listener");
    {
        let mut g = Guest::connect(&d.path("vhost.sock"), 3);
        g.connect_to_host(1, 5100);
        let _h = accept(&listener);
    }
    let mut g = Guest::connect(&d.path("vhost.sock"), 3);
    g.connect_to_host(2, 5100);
    let mut host = accept(&listener);
    g.send(g.hdr(RW, 2, 5100), b"again");
    assert_eq!(read_exact_n(&mut host, 5), b"again");
}

#[test]
fn many_concurrent_connections() {
    let d = start_one(3, &[]);
    let listener = UnixListener::bind(d.path("vm.vsock_5200")).expect("host listener");
    let mut g = Guest::connect(&d.path("vhost.sock"), 3);
    let n = 64u32;
    for i in 0..n {
        g.send(g.hdr(REQUEST, 10_000 + i, 5200), &[]);
    }
    let mut hosts = Vec::new();
    for _ in 0..n {
        hosts.push(accept(&listener));
    }
    let mut responses = 0;
    while responses < n {
        let (h, _) = g.expect(RESPONSE);
        assert_eq!(h.src_port, 5200);
        responses += 1;
    }
    for i in 0..n {
        g.send(
            g.hdr(RW, 10_000 + i, 5200),
            format!("conn {i:04}").as_bytes(),
        );
    }
    let mut seen: Vec<String> = hosts
        .iter_mut()
        .map(|h| String::from_utf8(read_exact_n(h, 9)).expect("utf-8"))
        .collect();
    seen.sort();
    let want: Vec<String> = (0..n).map(|i| format!("conn {i:04}")).collect();
    assert_eq!(seen, want);
}

fn run_expect_failure(args: &[&str], dir: &Path) -> String {
    let d = dir.to_str().expect("utf-8");
    let out = Command::new(vsock_bin())
        .args(args.iter().map(|a| a.replace("{dir}", d)))
        .output()
        .expect("run daemon");
    assert_eq!(out.status.code(), Some(1), "exit status for {args:?}");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    err
}

#[test]
fn user_mistakes_get_one_line_and_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = run_expect_failure(
        &[
            "--vm",
            "guest-cid=3,socket={dir}/a,uds-path={dir}/b",
            "--vm",
            "guest-cid=3,socket={dir}/c,uds-path={dir}/d",
        ],
        dir.path(),
    );
    assert!(
        e.contains("guest CID 3 is given to more than one VM"),
        "{e}"
    );
    let e = run_expect_failure(
        &[
            "--guest-cid",
            "2",
            "--socket-path",
            "{dir}/a",
            "--uds-path",
            "{dir}/b",
        ],
        dir.path(),
    );
    assert!(e.contains("reserved"), "{e}");

    // Paths in use by a running daemon.
    let d = start_one(3, &[]);
    let sock = d.path("vhost.sock");
    let uds = d.path("vm.vsock");
    let s = sock.to_str().expect("utf-8");
    let u = uds.to_str().expect("utf-8");
    let other_uds = dir.path().join("x.vsock");
    let e = run_expect_failure(
        &[
            "--guest-cid",
            "3",
            "--socket-path",
            s,
            "--uds-path",
            other_uds.to_str().expect("utf-8"),
        ],
        dir.path(),
    );
    assert!(e.contains("in use"), "{e}");
    let other_sock = dir.path().join("y.sock");
    let e = run_expect_failure(
        &[
            "--guest-cid",
            "3",
            "--socket-path",
            other_sock.to_str().expect("utf-8"),
            "--uds-path",
            u,
        ],
        dir.path(),
    );
    assert!(e.contains("in use"), "{e}");
}

#[test]
fn yaml_config_like_the_peer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display();
    let yaml = format!(
        "vms:\n  - guest_cid: 4\n    socket: {d}/v4.sock\n    uds_path: {d}/v4.vsock\n    tx_buffer_size: 32768\n    queue_size: 256\n    groups: group1+group2\n"
    );
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, yaml).expect("write yaml");
    let mut cmd = Command::new(vsock_bin());
    cmd.arg("--config").arg(&cfg).stdout(Stdio::null());
    let _guard = ChildGuard::spawn("vhost-device-vsock", cmd).expect("start");
    assert!(wait_for_path(&dir.path().join("v4.sock"), T));
    let mut g = Guest::connect(&dir.path().join("v4.sock"), 4);
    assert_eq!(
        g.fe.get_config(0, 8).expect("config"),
        4u64.to_le_bytes().to_vec()
    );
    g.send(g.hdr(REQUEST, 1, 2), &[]);
    let (r, _) = g.expect(RST);
    assert_eq!(r.dst_cid, 4);
}

/// The daemon's anonymous memory (its heap: buffers it keeps), in bytes. Guest memory is a
/// shared memfd mapping and counts as `RssShmem`, not here.
fn rss_anon(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("RssAnon in /proc/PID/status")
        * 1024
}

#[test]
fn host_peer_vanishing_mid_stream_resets_the_guest_and_memory_stays_bounded() {
    let d = start_one(3, &[]);
    let pid = d._guard.pid();
    let listener = UnixListener::bind(d.path("vm.vsock_7000")).expect("host listener");
    let mut g = Guest::connect(&d.path("vhost.sock"), 3);
    g.connect_to_host(1500, 7000);
    let mut host = accept(&listener);
    let chunk = vec![0x5a; 32 * 1024];
    g.send(g.hdr(RW, 1500, 7000), &chunk);
    assert_eq!(
        read_exact_n(&mut host, chunk.len()),
        chunk,
        "the stream flows"
    );
    let before = rss_anon(pid);

    // The host program goes away in the middle of the stream; the guest keeps sending
    // (8 MiB, paying no attention to credit): every chain is taken, nothing piles up.
    drop(host);
    let mut reset = false;
    for _ in 0..256 {
        g.send(g.hdr(RW, 1500, 7000), &chunk);
        g.collect();
        while let Some((h, _)) = g.inbox.pop_front() {
            let ours = (h.src_port, h.dst_port) == (7000, 1500);
            reset |= ours && (h.op == RST || (h.op == SHUTDOWN && h.flags == 3));
        }
    }
    let deadline = Instant::now() + T;
    while !reset && Instant::now() < deadline {
        if let Some((h, _)) = g.recv(Duration::from_millis(100)) {
            let ours = (h.src_port, h.dst_port) == (7000, 1500);
            reset |= ours && (h.op == RST || (h.op == SHUTDOWN && h.flags == 3));
        }
    }
    assert!(
        reset,
        "the guest is told the connection is gone (RST or full SHUTDOWN)"
    );
    let after = rss_anon(pid);
    assert!(
        after < before + 4 * 1024 * 1024,
        "the daemon buffered the dead peer's data: anonymous memory {before} -> {after} bytes"
    );

    // The daemon goes on: a new connection carries data both ways.
    let listener = UnixListener::bind(d.path("vm.vsock_7001")).expect("host listener");
    g.connect_to_host(1501, 7001);
    let mut host = accept(&listener);
    g.send(g.hdr(RW, 1501, 7001), b"still here");
    assert_eq!(read_exact_n(&mut host, 10), b"still here");
    host.write_all(b"and me").expect("host write");
    let (_, p) = g.expect(RW);
    assert_eq!(p, b"and me");
    println!(
        "vsock peer vanished: daemon anonymous memory {before} -> {after} bytes over 8 MiB sent"
    );
}
