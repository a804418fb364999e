//! vhost-device-net as a real process in a test network namespace, driven over its socket
//! by the in-test frontend (which plays the guest driver on the queues): frames cross the
//! real tap to the namespace's kernel and back.

mod net_common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use e2e::frontend::{Buf, Frontend, Options};
use net_common::{
    arp_request, icmp_echo, netns_or_skip, run_daemon, Daemon, Netns, GUEST_MAC, GUEST_MAC_STR,
};
use vm_memory::GuestAddress;

const HDR: usize = 12;
const RX: usize = 0;
const TX: usize = 1;
const HOST_IP: [u8; 4] = [10, 77, 0, 1];
const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
const WAIT: Duration = Duration::from_secs(10);

/// The guest driver's side of one queue pair: posted RX buffers by head index.
struct Driver {
    fe: Frontend,
    rx_bufs: HashMap<u16, GuestAddress>,
    rx_size: u32,
}

impl Driver {
    fn new(fe: Frontend, rx_buffers: usize, rx_size: u32) -> Self {
        let mut d = Driver {
            fe,
            rx_bufs: HashMap::new(),
            rx_size,
        };
        for _ in 0..rx_buffers {
            let addr = d.fe.memory().alloc(rx_size as usize);
            d.post(addr);
        }
        d
    }

    fn post(&mut self, addr: GuestAddress) {
        let head = self
            .fe
            .queue(RX)
            .submit(&[Buf::writable(addr, self.rx_size)])
            .expect("post rx buffer");
        self.rx_bufs.insert(head, addr);
    }

    /// Sends `frame` behind a zeroed virtio-net header, header and frame in two descriptors.
    fn send(&mut self, frame: &[u8]) -> u32 {
        let hdr = self.fe.memory().alloc_with(&[0u8; HDR]);
        let body = self.fe.memory().alloc_with(frame);
        let len = u32::try_from(frame.len()).expect("frame size");
        self.send_chain(&[Buf::readable(hdr, 12), Buf::readable(body, len)])
    }

    /// Sends a raw TX chain and returns the used length.
    fn send_chain(&mut self, bufs: &[Buf]) -> u32 {
        let q = self.fe.queue(TX);
        q.submit(bufs).expect("submit tx");
        q.wait_used(WAIT).expect("tx completion").len
    }

    /// Receives one frame (header included, merged buffers joined) and reposts its buffers.
    /// Returns the frame and how many buffers it took.
    fn recv(&mut self, timeout: Duration) -> Option<(Vec<u8>, usize)> {
        let used = self.fe.queue(RX).wait_used(timeout).ok()?;
        let mut frame = self.take(used.id, used.len);
        if frame.len() < HDR {
            return Some((frame, 1));
        }
        let buffers = usize::from(u16::from_le_bytes([frame[10], frame[11]]));
        for _ in 1..buffers {
            let more = self.fe.queue(RX).wait_used(WAIT).expect("merged buffer");
            let part = self.take(more.id, more.len);
            frame.extend_from_slice(&part);
        }
        Some((frame, buffers))
    }

    fn take(&mut self, id: u16, len: u32) -> Vec<u8> {
        let addr = self
            .rx_bufs
            .remove(&id)
            .expect("used id is a posted buffer");
        let data = self.fe.memory().read(addr, len as usize);
        self.post(addr);
        data
    }

    /// Receives until `pred` matches a frame (the kernel may send others), or panics.
    fn recv_until(&mut self, what: &str, pred: impl Fn(&[u8]) -> bool) -> (Vec<u8>, usize) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some((frame, n)) = self.recv(deadline - Instant::now()) {
                if frame.len() > HDR && pred(&frame[HDR..]) {
                    return (frame, n);
                }
            }
        }
        panic!("no {what} received within {WAIT:?}");
    }

    /// ARP for the host and return its MAC.
    fn resolve_host(&mut self) -> [u8; 6] {
        assert_eq!(self.send(&arp_request(GUEST_MAC, GUEST_IP, HOST_IP)), 0);
        let (reply, _) = self.recv_until("ARP reply", |f| {
            f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2] && f[28..32] == HOST_IP
        });
        let f = &reply[HDR..];
        assert_eq!(&f[0..6], &GUEST_MAC, "reply addressed to the guest");
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&f[22..28]);
        mac
    }

    /// Pings the host with `payload` and returns the reply's payload and buffer count.
    fn ping(&mut self, host_mac: [u8; 6], id: u16, payload: &[u8]) -> (Vec<u8>, usize) {
        let req = icmp_echo(host_mac, GUEST_MAC, GUEST_IP, HOST_IP, id, payload);
        assert_eq!(self.send(&req), 0);
        let (reply, n) = self.recv_until("ICMP echo reply", |f| {
            f.len() > 42
                && f[12..14] == [8, 0]
                && f[23] == 1
                && f[34] == 0
                && f[38..40] == id.to_be_bytes()
        });
        (reply[HDR + 42..].to_vec(), n)
    }
}

fn daemon(ns: &Netns, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "--tap",
        "vdn0",
        "--ip",
        "10.77.0.1/24",
        "--mac",
        GUEST_MAC_STR,
    ];
    args.extend_from_slice(extra);
    Daemon::start(ns, &args)
}

fn connect(d: &Daemon, rx_buffers: usize, rx_size: u32) -> Driver {
    let fe = Frontend::connect(&d.socket, Options::default().queues(2)).expect("connect");
    Driver::new(fe, rx_buffers, rx_size)
}

#[test]
fn arp_and_ping_cross_the_tap_with_merged_rx_buffers() {
    let Some(ns) = netns_or_skip("net_frontend::arp_and_ping") else {
        return;
    };
    let d = daemon(&ns, &[]);
    // 512-byte buffers: a 1442-byte echo reply needs three of them.
    let mut drv = connect(&d, 64, 512);
    let host_mac = drv.resolve_host();
    let tap_mac = ns
        .sh("cat /sys/class/net/vdn0/address")
        .expect("tap address");
    let tap_mac = tap_mac.trim();
    let got = host_mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    assert_eq!(got, tap_mac, "ARP reply comes from the tap");

    let payload: Vec<u8> = (0..1400u32)
        .map(|i| u8::try_from(i * 13 % 251).unwrap_or(0))
        .collect();
    let (echo, buffers) = drv.ping(host_mac, 0x4242, &payload);
    assert_eq!(echo, payload, "echo payload comes back unchanged");
    assert_eq!(
        buffers, 3,
        "the reply is merged over three 512-byte buffers"
    );

    // Small frames take one buffer.
    let (echo, buffers) = drv.ping(host_mac, 0x4243, b"small");
    assert_eq!(echo, b"small");
    assert_eq!(buffers, 1);
    drop(drv);
    let log = d.wait_log("connection totals");
    assert!(log.contains("0 dropped"), "{log}");
}

#[test]
fn config_space_and_features_follow_the_command_line() {
    let Some(ns) = netns_or_skip("net_frontend::config_space") else {
        return;
    };
    let d = daemon(&ns, &["--queue-pairs", "2", "--mtu", "9000"]);
    let mut fe = Frontend::connect(&d.socket, Options::default().queues(4)).expect("connect");
    assert_eq!(fe.num_queues(), 4, "two pairs");
    let offered = fe.offered_features();
    for (bit, name) in [
        (3, "MTU"),
        (5, "MAC"),
        (15, "MRG_RXBUF"),
        (16, "STATUS"),
        (17, "CTRL_VQ"),
        (22, "MQ"),
        (0, "CSUM"),
        (7, "GUEST_TSO4"),
        (11, "HOST_TSO4"),
        (32, "VERSION_1"),
    ] {
        assert_ne!(offered & (1u64 << bit), 0, "{name} offered");
    }
    let cfg = fe.get_config(0, 12).expect("config");
    assert_eq!(&cfg[0..6], &GUEST_MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 2, "pairs");
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 9000, "mtu");
    // A read past the fields is zeros, not an error or garbage.
    assert_eq!(fe.get_config(200, 8).expect("config"), vec![0u8; 8]);
    let mtu = ns.sh("cat /sys/class/net/vdn0/mtu").expect("mtu");
    assert_eq!(mtu.trim(), "9000", "--mtu sets the tap's MTU too");
}

#[test]
fn malformed_chains_are_dropped_counted_and_serving_goes_on() {
    let Some(ns) = netns_or_skip("net_frontend::malformed_chains") else {
        return;
    };
    let d = daemon(&ns, &["--mtu", "1500"]);
    let fe = Frontend::connect(&d.socket, Options::default().queues(2)).expect("connect");
    // One hostile RX chain first (device-readable), then good ones.
    let mut drv = Driver::new(fe, 0, 2048);
    let bad_rx = drv.fe.memory().alloc(2048);
    drv.fe
        .queue(RX)
        .submit(&[Buf::readable(bad_rx, 2048)])
        .expect("bad rx");
    assert_eq!(drv.send(&arp_request(GUEST_MAC, GUEST_IP, HOST_IP)), 0);
    let used = drv
        .fe
        .queue(RX)
        .wait_used(WAIT)
        .expect("the bad rx chain is returned");
    assert_eq!(used.len, 0, "a readable RX descriptor gets nothing written");
    for _ in 0..16 {
        let addr = drv.fe.memory().alloc(2048);
        drv.post(addr);
    }

    let mem = drv.fe.memory().clone();
    let hdr = mem.alloc_with(&[0u8; HDR]);
    let body = mem.alloc(2000);
    // A device-writable descriptor in a TX chain.
    assert_eq!(
        drv.send_chain(&[Buf::readable(hdr, 12), Buf::writable(body, 100)]),
        0
    );
    // Shorter than the header.
    assert_eq!(drv.send_chain(&[Buf::readable(hdr, 8)]), 0);
    // Above MTU + Ethernet header, not GSO.
    assert_eq!(
        drv.send_chain(&[Buf::readable(hdr, 12), Buf::readable(body, 1600)]),
        0
    );
    // Outside guest memory.
    assert_eq!(
        drv.send_chain(&[Buf::readable(GuestAddress(1 << 40), 100)]),
        0
    );
    // An unknown GSO type.
    let bad_gso = mem.alloc_with(&[0, 0x7f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        drv.send_chain(&[Buf::readable(bad_gso, 12), Buf::readable(body, 100)]),
        0
    );

    // The device still works.
    let host_mac = drv.resolve_host();
    let (echo, _) = drv.ping(host_mac, 7, b"still here");
    assert_eq!(echo, b"still here");
    drop(drv);
    let log = d.wait_log("connection totals");
    assert!(log.contains("6 dropped"), "{log}");
    assert!(
        log.contains("malformed transmit chain from the guest: 2"),
        "{log}"
    );
    assert!(
        log.contains("chain shorter than the virtio-net header: 1"),
        "{log}"
    );
    assert!(log.contains("frame larger than the MTU: 1"), "{log}");
    assert!(
        log.contains("GSO type not offered or not negotiated: 1"),
        "{log}"
    );
    assert!(
        log.contains("malformed receive chain from the guest: 1"),
        "{log}"
    );
}

#[test]
fn a_second_frontend_is_served_after_the_first_leaves() {
    let Some(ns) = netns_or_skip("net_frontend::reconnect") else {
        return;
    };
    let d = daemon(&ns, &[]);
    for round in 0..3u16 {
        let mut drv = connect(&d, 32, 2048);
        let host_mac = drv.resolve_host();
        let (echo, _) = drv.ping(host_mac, round, b"again");
        assert_eq!(echo, b"again", "round {round}");
    }
    let log = d.wait_log("connection totals");
    assert_eq!(log.matches("frontend connected").count(), 3, "{log}");
}

/// One vhost-user message: header (request, flags, size) and payload.
fn message(stream: &mut std::os::unix::net::UnixStream, request: u32, flags: u32, payload: &[u8]) {
    let mut buf = Vec::new();
    buf.extend_from_slice(&request.to_le_bytes());
    buf.extend_from_slice(&(flags | 1).to_le_bytes());
    buf.extend_from_slice(&u32::try_from(payload.len()).expect("size").to_le_bytes());
    buf.extend_from_slice(payload);
    stream.write_all(&buf).expect("send message");
}

fn reply_u64(stream: &mut std::os::unix::net::UnixStream, request: u32) -> u64 {
    let mut hdr = [0u8; 12];
    stream
        .read_exact(&mut hdr)
        .unwrap_or_else(|e| panic!("reply to request {request}: {e}"));
    assert_eq!(
        u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]),
        request
    );
    let mut body = [0u8; 8];
    stream.read_exact(&mut body).expect("reply body");
    u64::from_le_bytes(body)
}

/// QEMU 7.2's `-netdev vhost-user` enables rings before it sends SET_FEATURES (that comes
/// only at the guest's DRIVER_OK). The unpatched vhost crates drop the connection there.
#[test]
fn rings_enabled_before_set_features_as_qemu_does() {
    let Some(ns) = netns_or_skip("net_frontend::qemu_order") else {
        return;
    };
    let d = daemon(&ns, &[]);
    let mut s = e2e::frontend::connect_socket(&d.socket, WAIT).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    const NEED_REPLY: u32 = 0x8;
    message(&mut s, 1, 0, &[]); // GET_FEATURES
    let features = reply_u64(&mut s, 1);
    assert_ne!(features & (1 << 30), 0, "PROTOCOL_FEATURES offered");
    message(&mut s, 15, 0, &[]); // GET_PROTOCOL_FEATURES
    let pf = reply_u64(&mut s, 15);
    let reply_ack = 1 << 3;
    let mq = 1 << 0;
    assert_ne!(pf & reply_ack, 0);
    message(&mut s, 16, 0, &(pf & (reply_ack | mq)).to_le_bytes()); // SET_PROTOCOL_FEATURES
    message(&mut s, 17, 0, &[]); // GET_QUEUE_NUM
    assert_eq!(reply_u64(&mut s, 17), 2);
    message(&mut s, 3, 0, &[]); // SET_OWNER
    for ring in 0u32..2 {
        let mut state = ring.to_le_bytes().to_vec();
        state.extend_from_slice(&1u32.to_le_bytes());
        message(&mut s, 18, NEED_REPLY, &state); // SET_VRING_ENABLE, before SET_FEATURES
        assert_eq!(
            reply_u64(&mut s, 18),
            0,
            "ring {ring} enabled before SET_FEATURES"
        );
    }
    message(
        &mut s,
        2,
        NEED_REPLY,
        &(features & ((1 << 32) | (1 << 30))).to_le_bytes(),
    );
    assert_eq!(reply_u64(&mut s, 2), 0, "SET_FEATURES after the enables");
    drop(s);
    let log = d.stop();
    assert!(!log.contains("inactive feature"), "{log}");
}

#[test]
fn user_mistakes_are_one_line_errors() {
    for (args, expect) in [
        (
            vec!["--tap", "t0", "--mac", "zz:00:00:00:00:01"],
            "invalid MAC address",
        ),
        (
            vec!["--tap", "t0", "--mac", "01:00:5e:00:00:01"],
            "invalid MAC address",
        ),
        (
            vec!["--tap", "t0", "--queue-pairs", "0"],
            "--queue-pairs must be between 1 and",
        ),
        (
            vec!["--tap", "t0", "--queue-size", "100"],
            "--queue-size must be a power of two",
        ),
        (vec!["--tap", "t0", "--mtu", "20"], "--mtu must be between"),
        (vec!["--tap", "t0", "--ip", "10.0.0.1"], "invalid --ip"),
        (vec![], "give exactly one of --tap NAME or --tap-fd FD"),
    ] {
        let mut all = vec!["--socket-path", "/nonexistent/vdn.sock"];
        all.extend_from_slice(&args);
        let out = run_daemon(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr}");
        assert!(stderr.starts_with("vhost-device-net: error: "), "{stderr}");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
    }
}

#[test]
fn a_busy_tap_is_reported() {
    let Some(ns) = netns_or_skip("net_frontend::busy_tap") else {
        return;
    };
    let first = Daemon::start(&ns, &["--tap", "vdnbusy"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("second.sock");
    let out = ns
        .command(e2e::bin_path("vhost-device-net").to_str().expect("path"))
        .arg("--socket-path")
        .arg(&sock)
        .args(["--tap", "vdnbusy"])
        .output()
        .expect("run second daemon");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("tap vdnbusy is busy"), "{stderr}");
    assert!(!sock.exists(), "no socket file left behind");
    drop(first);
}

/// A frame that arrives when the guest has too few RX buffers waits in the daemon until the
/// guest adds more; it is neither dropped nor truncated.
#[test]
fn a_frame_waits_for_rx_buffers_instead_of_being_lost() {
    let Some(ns) = netns_or_skip("net_frontend::rx_refill") else {
        return;
    };
    let d = daemon(&ns, &[]);
    let mut drv = connect(&d, 8, 2048);
    let host_mac = drv.resolve_host();
    // The ring is empty when the host's reply arrives.
    let mut rest = take_all_rx_buffers(&mut drv);
    let payload: Vec<u8> = (0..1400u32)
        .map(|i| u8::try_from(i % 199).unwrap_or(0))
        .collect();
    let req = icmp_echo(host_mac, GUEST_MAC, GUEST_IP, HOST_IP, 99, &payload);
    assert_eq!(drv.send(&req), 0);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        drv.fe.queue(RX).poll_used().is_none(),
        "nothing delivered while the ring is empty"
    );
    // One 512-byte buffer is not enough for the 1454-byte frame: still nothing.
    let a = rest.pop().expect("buffer");
    drv.rx_size = 512;
    drv.post(a);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        drv.fe.queue(RX).poll_used().is_none(),
        "a partial frame is never delivered"
    );
    // Two more: the waiting frame arrives whole, merged over the three.
    for addr in rest.drain(..2) {
        drv.post(addr);
    }
    let (reply, buffers) = drv.recv_until("the waiting echo reply", |f| {
        f.len() > 42 && f[12..14] == [8, 0] && f[34] == 0 && f[38..40] == 99u16.to_be_bytes()
    });
    assert_eq!(&reply[HDR + 42..], &payload[..]);
    assert_eq!(buffers, 3);
}

/// Empties the RX ring: pings the host until every posted buffer came back used, without
/// reposting them, and returns their addresses for reuse.
fn take_all_rx_buffers(drv: &mut Driver) -> Vec<GuestAddress> {
    let mut free = Vec::new();
    let posted = drv.rx_bufs.len();
    let host_mac = drv.resolve_host();
    for id in 0..u16::try_from(posted * 2).unwrap_or(u16::MAX) {
        if drv.rx_bufs.is_empty() {
            break;
        }
        let req = icmp_echo(host_mac, GUEST_MAC, GUEST_IP, HOST_IP, 1000 + id, b"x");
        assert_eq!(drv.send(&req), 0);
        if let Ok(used) = drv.fe.queue(RX).wait_used(WAIT) {
            if let Some(addr) = drv.rx_bufs.remove(&used.id) {
                free.push(addr);
            }
        }
    }
    assert!(drv.rx_bufs.is_empty(), "all RX buffers consumed");
    free
}

/// Opens tap `name` (creating it) inside `ns`, as a management tool would before handing
/// the descriptor to the daemon: from a thread that joins the namespace, so the test
/// process itself stays in its own.
fn open_tap_in(ns: &Netns, name: &str) -> std::os::fd::OwnedFd {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{}", ns.name);
    let name = name.to_string();
    std::thread::spawn(move || {
        let nsfile = std::fs::File::open(&path).expect("namespace file");
        // SAFETY: setns only reads the descriptor; CLONE_NEWNET moves this thread alone.
        let rc = unsafe { libc::setns(nsfile.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("open /dev/net/tun");
        let mut req = [0u8; 40];
        req[..name.len()].copy_from_slice(name.as_bytes());
        let flags =
            i16::try_from(libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR).expect("flags fit");
        req[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a 40-byte struct ifreq, which `req` is.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, req.as_mut_ptr()) };
        assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        std::os::fd::OwnedFd::from(tun)
    })
    .join()
    .expect("tap thread")
}

#[test]
fn an_inherited_tap_descriptor_is_served() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let Some(ns) = netns_or_skip("net_frontend::tap_fd") else {
        return;
    };
    let tap = open_tap_in(&ns, "vdnfd");
    ns.sh("ip addr add 10.77.0.1/24 dev vdnfd && ip link set vdnfd up")
        .expect("configure the tap");
    let raw = tap.as_raw_fd();
    let d = Daemon::start_with(&ns, &["--tap-fd", "3", "--mac", GUEST_MAC_STR], |cmd| {
        // SAFETY: runs in the child between fork and exec; dup2 is async-signal-safe and
        // only duplicates the tap descriptor onto 3 (clearing close-on-exec there).
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(raw, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    drop(tap);
    let mut drv = connect(&d, 16, 2048);
    let host_mac = drv.resolve_host();
    let (echo, _) = drv.ping(host_mac, 5, b"by fd");
    assert_eq!(echo, b"by fd");
    assert!(d.log().contains("tap vdnfd"), "{}", d.log());

    // A descriptor that is not a tap is refused with one line.
    let file = std::fs::File::open("/dev/null").expect("/dev/null");
    let raw = file.as_raw_fd();
    let mut cmd = std::process::Command::new(e2e::bin_path("vhost-device-net"));
    cmd.args(["--socket-path", "/nonexistent/x.sock", "--tap-fd", "3"]);
    // SAFETY: as above, dup2 between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not a tap device"), "{stderr}");
}

/// With two queue pairs offered and one used (a 1-vCPU guest), the unused pair's tap queue
/// is detached from the start (and attached only when the frontend starts its rings), so
/// the kernel steers every flow to the used pair and no frame is lost.
#[test]
fn an_unused_queue_pair_stops_receiving_from_the_tap() {
    let Some(ns) = netns_or_skip("net_frontend::unused_pair") else {
        return;
    };
    let d = daemon(&ns, &["--queue-pairs", "2"]);
    let mut drv = connect(&d, 32, 2048);
    assert_eq!(drv.fe.num_queues(), 2, "the driver uses pair 0 only");
    // Several flows (ICMP ids) make sure steering is exercised.
    // The first ARP request is answered on pair 0 (before the fix, the kernel could steer
    // the reply to pair 1's tap queue, attached and never read, and it was lost).
    let mut host_mac = None;
    for _ in 0..1 {
        assert_eq!(drv.send(&arp_request(GUEST_MAC, GUEST_IP, HOST_IP)), 0);
        if let Some((frame, _)) = drv.recv(Duration::from_secs(3)) {
            let f = &frame[HDR..];
            if f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2] {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&f[22..28]);
                host_mac = Some(mac);
                break;
            }
        }
    }
    let host_mac = host_mac.expect("ARP reply on pair 0");
    // Every flow's first reply reaches pair 0: none is steered to the unused pair.
    for id in 0..16u16 {
        let id = 300 + id;
        let answered = (0..1).any(|_| {
            let req = icmp_echo(host_mac, GUEST_MAC, GUEST_IP, HOST_IP, id, b"one pair");
            assert_eq!(drv.send(&req), 0);
            let deadline = Instant::now() + Duration::from_secs(3);
            while let Some((frame, _)) =
                drv.recv(deadline.saturating_duration_since(Instant::now()))
            {
                let f = &frame[HDR..];
                if f.len() > 42
                    && f[12..14] == [8, 0]
                    && f[23] == 1
                    && f[34] == 0
                    && f[38..40] == id.to_be_bytes()
                {
                    assert_eq!(&f[42..], b"one pair", "flow {id}");
                    return true;
                }
            }
            false
        });
        assert!(
            answered,
            "flow {id}: its first echo reply did not reach pair 0"
        );
    }
}

/// A memory region larger than the file behind it is refused (touching it would raise
/// SIGBUS in the daemon), and the next frontend is served.
#[test]
fn a_region_past_its_file_is_refused() {
    let Some(ns) = netns_or_skip("net_frontend::region_past_its_file") else {
        return;
    };
    let mut d = daemon(&ns, &[]);
    let accepted =
        e2e::frontend::daemon_accepts_a_region_past_its_file(&d.socket).expect("handshake");
    assert!(
        !accepted,
        "the daemon accepted a region past the end of its file"
    );
    assert!(d.guard.try_wait().is_none(), "the daemon died");
    let drv = connect(&d, 8, 2048);
    assert_ne!(drv.fe.features(), 0);
}

/// CPU time (user + system) the process `pid` has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

#[test]
fn a_tap_deleted_under_the_daemon_is_logged_and_nothing_crashes_or_spins() {
    let Some(ns) = netns_or_skip("net_frontend::tap_deleted") else {
        return;
    };
    let mut d = daemon(&ns, &[]);
    let mut drv = connect(&d, 32, 2048);
    let host_mac = drv.resolve_host();
    let (echo, _) = drv.ping(host_mac, 1, b"before");
    assert_eq!(echo, b"before");

    ns.sh("ip link del vdn0").expect("delete the tap");
    // The guest keeps sending: every frame is taken (and dropped), none hangs the queue.
    for i in 0..16u16 {
        drv.send(&icmp_echo(
            host_mac,
            GUEST_MAC,
            GUEST_IP,
            HOST_IP,
            100 + i,
            b"after",
        ));
    }
    // No busy loop on a dead descriptor: the daemon sleeps.
    let pid = d.guard.pid();
    let ticks = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - ticks;
    assert!(
        used < 30,
        "the daemon used {used} ticks of CPU in 1 s with its tap gone; log:\n{}",
        d.log()
    );
    let log = d.wait_log("vdn0");
    assert!(
        log.lines().any(|l| l.contains("tap") && l.contains("vdn0")),
        "the daemon names the tap in its log:\n{log}"
    );
    // Still alive (or ended cleanly, never by a signal), and logging one line per cause.
    match d.guard.try_wait() {
        None => {
            drop(drv);
            let log = d.wait_log("connection totals");
            assert!(log.contains("connection totals"), "{log}");
        }
        Some(status) => {
            use std::os::unix::process::ExitStatusExt;
            assert!(
                status.signal().is_none(),
                "the daemon died of a signal ({status}); log:\n{}",
                d.log()
            );
        }
    }
    println!(
        "tap deleted: daemon used {used} ticks in 1 s; log:\n{}",
        d.log()
    );
}
