//! vhost-device-console as a real process, driven over its vhost-user socket by the in-test
//! frontend playing the guest driver, with the host side reached the way a user reaches it
//! (a TCP or Unix client, a pty, the daemon's stdin/stdout).
//!
//! Control messages are encoded here by hand from the virtio specification (5.3.6.2), not
//! with the daemon's own code, so a wrong encoding on either side fails the test.
#![allow(clippy::unwrap_used)] // a test fails by panicking, with the location of the failure
#![allow(clippy::cast_possible_truncation)] // byte patterns: `i % 251` fits a u8

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::frontend::{Buf, Frontend, Options};
use e2e::{bin_path, ChildGuard};
use vm_memory::GuestAddress;

const TIMEOUT: Duration = Duration::from_secs(10);
const RX_BUF: u32 = 4096;

// virtio-console control events (virtio 1.2, 5.3.6.2).
const DEVICE_READY: u16 = 0;
const DEVICE_ADD: u16 = 1;
const PORT_READY: u16 = 3;
const CONSOLE_PORT: u16 = 4;
const RESIZE: u16 = 5;
const PORT_OPEN: u16 = 6;
const PORT_NAME: u16 = 7;
const F_MULTIPORT: u64 = 1 << 1;

/// The daemon, its temporary directory and what it logs on stderr.
struct Daemon {
    child: ChildGuard,
    dir: tempfile::TempDir,
    sock: PathBuf,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    /// Starts the daemon with `args(dir)` after `--socket-path`.
    fn start(args: impl FnOnce(&Path) -> Vec<String>) -> Daemon {
        Self::start_with(args, |_| {})
    }

    fn start_with(
        args: impl FnOnce(&Path) -> Vec<String>,
        setup: impl FnOnce(&mut Command),
    ) -> Daemon {
        let dir = tempfile::tempdir().expect("temporary directory");
        let sock = dir.path().join("vhost.sock");
        let mut cmd = Command::new(bin_path("vhost-device-console"));
        cmd.arg("--socket-path").arg(&sock).args(args(dir.path()));
        cmd.env("RUST_LOG", "info").stderr(Stdio::piped());
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        setup(&mut cmd);
        let mut child = ChildGuard::spawn("vhost-device-console", cmd).expect("start the daemon");
        let stderr = child.child_mut().stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("daemon: {line}");
                if let Ok(mut l) = sink.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
        let daemon = Daemon {
            child,
            dir,
            sock,
            log,
        };
        daemon.wait_log("listening on");
        daemon
    }

    /// Waits for a log line containing `needle` and returns it.
    fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(line) = self
                .log
                .lock()
                .unwrap()
                .lines()
                .find(|l| l.contains(needle))
            {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?}; log:\n{}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How many log lines contain `needle`.
    fn count_log(&self, needle: &str) -> usize {
        self.log.lock().unwrap().matches(needle).count()
    }

    /// The text after `marker` on the line that has it, e.g. the pty path or TCP address.
    fn endpoint(&self, marker: &str) -> String {
        let line = self.wait_log(marker);
        let at = line.find(marker).expect("marker in line") + marker.len();
        line[at..].trim().to_string()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// The guest driver's side: the frontend plus receive buffers it keeps posted.
struct Driver {
    fe: Frontend,
    rx: HashMap<(usize, u16), GuestAddress>,
}

impl Driver {
    fn connect(sock: &Path, queues: usize) -> Driver {
        Self::connect_with(sock, Options::default().queues(queues))
    }

    fn connect_with(sock: &Path, options: Options) -> Driver {
        let fe = Frontend::connect(sock, options).expect("frontend set-up");
        Driver {
            fe,
            rx: HashMap::new(),
        }
    }

    fn post_rx(&mut self, q: usize, n: usize) {
        for _ in 0..n {
            let addr = self.fe.memory().alloc(RX_BUF as usize);
            self.repost(q, addr);
        }
    }

    fn repost(&mut self, q: usize, addr: GuestAddress) {
        let head = self
            .fe
            .queue(q)
            .submit(&[Buf::writable(addr, RX_BUF)])
            .expect("post a receive buffer");
        self.rx.insert((q, head), addr);
    }

    /// The next receive buffer the device filled, re-posted after reading it.
    fn recv(&mut self, q: usize, timeout: Duration) -> Option<Vec<u8>> {
        let used = self.fe.queue(q).wait_used(timeout).ok()?;
        let addr = self
            .rx
            .remove(&(q, used.id))
            .expect("used entry names a posted buffer");
        assert!(
            used.len <= RX_BUF,
            "device wrote {} bytes into a {RX_BUF}-byte buffer",
            used.len
        );
        let data = self.fe.memory().read(addr, used.len as usize);
        self.repost(q, addr);
        Some(data)
    }

    /// Receives until `want` has arrived; returns everything received.
    fn recv_until(&mut self, q: usize, want: &[u8]) -> Vec<u8> {
        let deadline = Instant::now() + TIMEOUT;
        let mut got = Vec::new();
        while !contains(&got, want) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(q, left) {
                Some(data) => got.extend(data),
                None => panic!(
                    "queue {q}: waited for {:?}, got {:?}",
                    String::from_utf8_lossy(want),
                    String::from_utf8_lossy(&got)
                ),
            }
        }
        got
    }

    /// Receives for `quiet`, expecting nothing.
    fn expect_nothing(&mut self, q: usize, quiet: Duration) {
        if let Some(data) = self.recv(q, quiet) {
            panic!(
                "queue {q}: expected nothing, got {:?}",
                String::from_utf8_lossy(&data)
            );
        }
    }

    /// Sends `data` on transmit queue `q` and waits for the device to take it.
    fn send(&mut self, q: usize, data: &[u8]) {
        let addr = self.fe.memory().alloc_with(data);
        let len = u32::try_from(data.len()).unwrap();
        self.fe
            .queue(q)
            .submit(&[Buf::readable(addr, len)])
            .expect("submit");
        self.fe
            .queue(q)
            .wait_used(TIMEOUT)
            .expect("the device takes the transmit buffer");
    }

    /// Sends a control message (on the control transmitq, queue 3).
    fn control(&mut self, id: u32, event: u16, value: u16) {
        self.send(3, &control(id, event, value));
    }

    /// The next control message from the device (control receiveq, queue 2).
    fn next_control(&mut self) -> (u32, u16, u16, Vec<u8>) {
        let msg = self
            .recv(2, TIMEOUT)
            .expect("a control message from the device");
        assert!(msg.len() >= 8, "control message of {} bytes", msg.len());
        let id = u32::from_le_bytes(msg[0..4].try_into().unwrap());
        let event = u16::from_le_bytes(msg[4..6].try_into().unwrap());
        let value = u16::from_le_bytes(msg[6..8].try_into().unwrap());
        (id, event, value, msg[8..].to_vec())
    }

    /// Control messages until one matches `event` for `id`; returns it (and asserts on
    /// the others only that they are well formed).
    fn control_until(&mut self, id: u32, event: u16) -> (u16, Vec<u8>) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let (i, e, v, rest) = self.next_control();
            if i == id && e == event {
                return (v, rest);
            }
            assert!(
                Instant::now() < deadline,
                "no control event {event} for port {id}"
            );
        }
    }
}

fn control(id: u32, event: u16, value: u16) -> Vec<u8> {
    let mut m = id.to_le_bytes().to_vec();
    m.extend_from_slice(&event.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

/// Reads from a client until `want` arrives; returns everything read.
fn read_until(client: &mut impl Read, want: &[u8]) -> Vec<u8> {
    let deadline = Instant::now() + TIMEOUT;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !contains(&got, want) {
        assert!(
            Instant::now() < deadline,
            "client waited for {:?}, got {:?}",
            String::from_utf8_lossy(want),
            String::from_utf8_lossy(&got)
        );
        match client.read(&mut buf) {
            Ok(0) => panic!(
                "client: end of stream while waiting for {:?}, got {:?}",
                String::from_utf8_lossy(want),
                String::from_utf8_lossy(&got)
            ),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("client read: {e}"),
        }
    }
    got
}

fn tcp_client(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to the console's TCP port");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s
}

fn unix_client(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).expect("connect to the console's Unix socket");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(ToString::to_string).collect()
}

#[test]
fn tcp_replays_history_carries_bytes_both_ways_and_takes_a_client_back() {
    let d = Daemon::start(|_| args(&["--backend", "tcp=127.0.0.1:0"]));
    let addr = d.endpoint("): tcp ");
    let mut drv = Driver::connect(&d.sock, 2);
    drv.post_rx(0, 8);

    // Written while nobody is attached: kept and replayed.
    drv.send(1, b"boot line 1\r\n");
    let mut c1 = tcp_client(&addr);
    read_until(&mut c1, b"boot line 1\r\n");

    c1.write_all(b"typed on the host\n").unwrap();
    drv.recv_until(0, b"typed on the host\n");
    drv.send(1, b"live output\n");
    read_until(&mut c1, b"live output\n");

    // A second client is told the port is taken, and the first keeps it.
    let mut c2 = tcp_client(&addr);
    let mut refusal = String::new();
    c2.set_read_timeout(Some(TIMEOUT)).unwrap();
    c2.read_to_string(&mut refusal).unwrap();
    assert!(refusal.contains("already has a client"), "{refusal:?}");
    drv.send(1, b"still mine\n");
    read_until(&mut c1, b"still mine\n");

    // The client leaves; output goes on; the next client gets it all back.
    drop(c1);
    d.wait_log("client disconnected");
    drv.send(1, b"while away\n");
    let mut c3 = tcp_client(&addr);
    let replay = read_until(&mut c3, b"while away\n");
    assert!(
        contains(&replay, b"boot line 1\r\n"),
        "{}",
        String::from_utf8_lossy(&replay)
    );
    assert!(contains(&replay, b"live output\n"));
    c3.write_all(b"back again\n").unwrap();
    drv.recv_until(0, b"back again\n");
}

#[test]
fn unix_socket_bytes_both_ways_and_a_limited_history() {
    let d = Daemon::start(|dir| {
        vec![
            "--backend".into(),
            format!("unix={}", dir.join("console.sock").display()),
            "--history".into(),
            "8".into(),
        ]
    });
    let path = d.path("console.sock");
    d.wait_log("): unix ");
    let mut drv = Driver::connect(&d.sock, 2);
    drv.post_rx(0, 4);
    drv.send(1, b"0123456789abcdef");
    let mut c = unix_client(&path);
    let got = read_until(&mut c, b"89abcdef");
    assert_eq!(
        got, b"89abcdef",
        "only the last --history bytes are replayed"
    );
    c.write_all(b"hello guest").unwrap();
    assert_eq!(drv.recv_until(0, b"hello guest"), b"hello guest");
    drv.send(1, b"hello host");
    read_until(&mut c, b"hello host");
}

#[test]
fn pty_carries_bytes_replays_history_and_notifies_resizes() {
    let d = Daemon::start(|_| args(&["--backend", "pty"]));
    let pty = d.endpoint("): pty ");
    let mut drv = Driver::connect(&d.sock, 2);
    drv.post_rx(0, 4);
    drv.send(1, b"before anyone looked\n");

    let mut slave = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&pty)
        .expect("open the pty");
    // Raw: no newline translation, the bytes arrive as the guest wrote them.
    let got = read_until(&mut slave, b"before anyone looked\n");
    assert_eq!(got, b"before anyone looked\n");
    slave.write_all(b"ls\r").unwrap();
    drv.recv_until(0, b"ls\r");
    drv.send(1, b"prompt$ ");
    read_until(&mut slave, b"prompt$ ");

    let seen = drv.fe.config_changes();
    set_window_size(&slave, 132, 43);
    // The frontend hears of it on the backend request channel (CONFIG_CHANGE_MSG) ...
    drv.fe
        .wait_config_change(seen, TIMEOUT)
        .expect("a config-change notification after the resize");
    // ... and reads the new size from the config space.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let cfg = drv.fe.get_config(0, 4).expect("GET_CONFIG");
        if cfg == [132, 0, 43, 0] {
            break;
        }
        assert!(Instant::now() < deadline, "config space size stays {cfg:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn set_window_size(tty: &File, cols: u16, rows: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one initialized `struct winsize` from the pointer, which
    // lives across the call; the descriptor is an open terminal.
    let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(tty), libc::TIOCSWINSZ, &ws) };
    assert_eq!(rc, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
}

#[test]
fn multiport_announces_names_tracks_open_and_close_and_survives_bad_messages() {
    let d = Daemon::start(|dir| {
        vec![
            "--backend".into(),
            format!("unix={}", dir.join("port").display()),
            "--ports".into(),
            "2".into(),
            "--port-names".into(),
            "org.test.console,org.test.agent".into(),
        ]
    });
    d.wait_log("port 1 (org.test.agent): unix");
    let mut drv = Driver::connect(&d.sock, 6);
    assert_ne!(
        drv.fe.features() & F_MULTIPORT,
        0,
        "MULTIPORT is offered and acked"
    );
    assert_eq!(
        drv.fe.get_config(4, 4).unwrap(),
        [2, 0, 0, 0],
        "max_nr_ports"
    );
    drv.post_rx(2, 16);
    drv.post_rx(0, 4);
    drv.post_rx(4, 4);

    // Hostile control traffic first: short, unknown, bogus port ids. No effect, no crash.
    drv.send(3, &[1, 2, 3]);
    drv.control(0, 0x55, 1);
    drv.control(99, PORT_READY, 1);
    drv.control(77, PORT_OPEN, 1);

    drv.control(0, DEVICE_READY, 1);
    let mut added = Vec::new();
    for _ in 0..2 {
        let (id, event, _, _) = drv.next_control();
        assert_eq!(event, DEVICE_ADD);
        added.push(id);
    }
    assert_eq!(added, [0, 1]);

    drv.control(0, PORT_READY, 1);
    assert_eq!(drv.next_control(), (0, CONSOLE_PORT, 1, vec![]));
    assert_eq!(
        drv.next_control(),
        (0, PORT_NAME, 1, b"org.test.console".to_vec())
    );
    assert_eq!(
        drv.next_control(),
        (0, PORT_OPEN, 0, vec![]),
        "no client on port 0 yet"
    );
    drv.control(1, PORT_READY, 1);
    assert_eq!(
        drv.next_control(),
        (1, PORT_NAME, 1, b"org.test.agent".to_vec())
    );
    assert_eq!(drv.next_control(), (1, PORT_OPEN, 0, vec![]));

    // A client attaches to port 1: the guest is told the host side opened.
    let mut c1 = unix_client(&d.path("port.1"));
    assert_eq!(drv.control_until(1, PORT_OPEN).0, 1);
    // The guest application has not opened port 1: input waits.
    c1.write_all(b"for the agent\n").unwrap();
    drv.expect_nothing(4, Duration::from_millis(300));
    drv.control(1, PORT_OPEN, 1);
    drv.recv_until(4, b"for the agent\n");
    drv.send(5, b"agent reply\n");
    read_until(&mut c1, b"agent reply\n");

    // Port 0 is the console: its bytes go its own way.
    let mut c0 = unix_client(&d.path("port.0"));
    assert_eq!(drv.control_until(0, PORT_OPEN).0, 1);
    drv.send(1, b"console output\n");
    read_until(&mut c0, b"console output\n");
    c0.write_all(b"console input\n").unwrap();
    drv.recv_until(0, b"console input\n");

    drop(c1);
    assert_eq!(
        drv.control_until(1, PORT_OPEN).0,
        0,
        "the guest learns the client left"
    );
    assert!(
        d.count_log("guest fault") >= 3,
        "bad control messages are reported"
    );
}

#[test]
fn multiport_pty_console_resize_reaches_the_guest_as_a_resize_message() {
    let d = Daemon::start(|_| args(&["--backend", "pty", "--ports", "2"]));
    let pty0 = d.endpoint("port 0 (console.0): pty ");
    let mut drv = Driver::connect(&d.sock, 6);
    drv.post_rx(2, 16);
    drv.control(0, DEVICE_READY, 1);
    drv.control(0, PORT_READY, 1);
    drv.control_until(0, CONSOLE_PORT);
    let tty = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&pty0)
        .unwrap();
    set_window_size(&tty, 100, 30);
    let (_, size) = drv.control_until(0, RESIZE);
    // struct virtio_console_resize { le16 rows; le16 cols; }
    assert_eq!(size, [30, 0, 100, 0]);
    assert_eq!(drv.fe.get_config(0, 4).unwrap(), [100, 0, 30, 0]);
}

#[test]
fn stdio_through_pipes() {
    let d = Daemon::start_with(
        |_| args(&["--backend", "stdio"]),
        |cmd| {
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        },
    );
    let mut d = d;
    let mut stdin = d.child.child_mut().stdin.take().unwrap();
    let mut stdout = d.child.child_mut().stdout.take().unwrap();
    let mut drv = Driver::connect(&d.sock, 2);
    drv.post_rx(0, 4);
    drv.send(1, b"to stdout\n");
    read_until(&mut stdout, b"to stdout\n");
    stdin.write_all(b"from stdin\n").unwrap();
    drv.recv_until(0, b"from stdin\n");
    drop(stdin);
    d.wait_log("stdin closed");
    drv.send(1, b"still serving\n");
    read_until(&mut stdout, b"still serving\n");
}

#[test]
fn stdio_terminal_is_raw_follows_sigwinch_and_is_restored_on_sigterm() {
    use nix::sys::termios::{tcgetattr, LocalFlags};
    let master =
        nix::pty::posix_openpt(nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NOCTTY).unwrap();
    nix::pty::grantpt(&master).unwrap();
    nix::pty::unlockpt(&master).unwrap();
    let path = nix::pty::ptsname_r(&master).unwrap();
    let tty = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&path)
        .unwrap();
    let before = tcgetattr(tty.as_fd()).unwrap();
    assert!(before
        .local_flags
        .contains(LocalFlags::ECHO | LocalFlags::ICANON));

    let (stdin, stdout) = (tty.try_clone().unwrap(), tty.try_clone().unwrap());
    let mut d = Daemon::start_with(
        |_| args(&["--backend", "stdio"]),
        move |cmd| {
            cmd.stdin(stdin).stdout(stdout);
        },
    );
    let raw = tcgetattr(tty.as_fd()).unwrap();
    assert!(
        !raw.local_flags
            .intersects(LocalFlags::ECHO | LocalFlags::ICANON),
        "the daemon puts its terminal in raw mode"
    );
    // SIGWINCH: the terminal's new size reaches the config space and the frontend.
    let mut drv = Driver::connect(&d.sock, 2);
    let seen = drv.fe.config_changes();
    set_window_size(&tty, 90, 20);
    d.child.signal(nix::sys::signal::Signal::SIGWINCH).unwrap();
    drv.fe
        .wait_config_change(seen, TIMEOUT)
        .expect("a config-change notification after SIGWINCH");
    assert_eq!(drv.fe.get_config(0, 4).unwrap(), [90, 0, 20, 0]);
    drop(drv);
    let status = d
        .child
        .terminate(TIMEOUT)
        .expect("the daemon exits on SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    let after = tcgetattr(tty.as_fd()).unwrap();
    assert_eq!(
        after.local_flags, before.local_flags,
        "terminal restored after SIGTERM"
    );
    assert_eq!(after.input_flags, before.input_flags);
    assert_eq!(after.output_flags, before.output_flags);
    drop(master);
}

#[test]
fn back_pressure_a_guest_that_does_not_read_stops_the_client_and_loses_nothing() {
    let d = Daemon::start(|dir| {
        vec![
            "--backend".into(),
            format!("unix={}", dir.join("c.sock").display()),
        ]
    });
    let mut drv = Driver::connect(&d.sock, 2);
    let c = unix_client(&d.path("c.sock"));
    // The client writes without end while the guest posts no receive buffer.
    let total: usize = 4 << 20;
    let pattern = |i: usize| (i % 251) as u8;
    let mut writer = c.try_clone().unwrap();
    writer.set_nonblocking(true).unwrap();
    let data: Vec<u8> = (0..total).map(pattern).collect();
    let mut written = 0;
    let mut stalls = 0;
    while written < total && stalls < 20 {
        match writer.write(&data[written..]) {
            Ok(n) => {
                written += n;
                stalls = 0;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                stalls += 1;
                std::thread::sleep(Duration::from_millis(25));
            }
            Err(e) => panic!("client write: {e}"),
        }
    }
    assert!(
        written < total,
        "the client wrote all {total} bytes to a guest that reads nothing: no back-pressure"
    );
    eprintln!("client stalled after {written} bytes with the guest not reading");

    // The guest starts reading: everything arrives, in order, and the client finishes.
    writer.set_nonblocking(false).unwrap();
    let rest = data[written..].to_vec();
    let finisher = std::thread::spawn(move || writer.write_all(&rest));
    drv.post_rx(0, 32);
    let mut got = Vec::with_capacity(total);
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < total {
        assert!(
            Instant::now() < deadline,
            "received {} of {total}",
            got.len()
        );
        if let Some(chunk) = drv.recv(0, TIMEOUT) {
            got.extend(chunk);
        }
    }
    finisher.join().unwrap().expect("client finishes writing");
    assert_eq!(got.len(), total);
    assert!(
        got.iter().enumerate().all(|(i, b)| *b == pattern(i)),
        "bytes in order"
    );
}

#[test]
fn back_pressure_a_client_that_does_not_read_holds_the_guest_output() {
    let d = Daemon::start(|dir| {
        vec![
            "--backend".into(),
            format!("unix={}", dir.join("c.sock").display()),
            "--history".into(),
            "0".into(),
        ]
    });
    let mut drv = Driver::connect(&d.sock, 2);
    let mut c = unix_client(&d.path("c.sock"));
    d.wait_log("client connected");
    // 64 KiB chains until the device stops taking them.
    let chunk: Vec<u8> = (0..65536).map(|i| (i % 253) as u8).collect();
    let addr = drv.fe.memory().alloc_with(&chunk);
    let mut sent = 0usize;
    loop {
        drv.fe
            .queue(1)
            .submit(&[Buf::readable(addr, 65536)])
            .unwrap();
        if drv
            .fe
            .queue(1)
            .wait_used(Duration::from_millis(500))
            .is_err()
        {
            break;
        }
        sent += 1;
        assert!(
            sent < 200,
            "the device took 12 MiB for a client that reads nothing"
        );
    }
    eprintln!("device held the transmit queue after {sent} chunks of 64 KiB");
    // The client reads: the held chain completes and every byte arrives in order.
    let mut got = Vec::new();
    let want = (sent + 1) * chunk.len();
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + TIMEOUT;
    while got.len() < want {
        assert!(Instant::now() < deadline, "read {} of {want}", got.len());
        match c.read(&mut buf) {
            Ok(0) => panic!("end of stream"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("{e}"),
        }
    }
    drv.fe
        .queue(1)
        .wait_used(TIMEOUT)
        .expect("the held chain completes");
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, b)| *b == (i % 65536 % 253) as u8));
}

#[test]
fn malformed_chains_are_completed_and_the_device_keeps_serving() {
    let d = Daemon::start(|dir| {
        vec![
            "--backend".into(),
            format!("unix={}", dir.join("c.sock").display()),
        ]
    });
    let mut drv = Driver::connect(&d.sock, 2);
    let mut c = unix_client(&d.path("c.sock"));
    let mem_end = GuestAddress(drv.fe.memory().size());
    let scratch = drv.fe.memory().alloc(64);

    // Transmit: a device-writable buffer, and a buffer past the end of guest memory.
    for bufs in [
        vec![Buf::writable(scratch, 64)],
        vec![Buf::readable(mem_end, 64)],
        vec![Buf::readable(GuestAddress(u64::MAX - 8), 64)],
    ] {
        drv.fe.queue(1).submit(&bufs).unwrap();
        let used = drv
            .fe
            .queue(1)
            .wait_used(TIMEOUT)
            .expect("bad chain completed");
        assert_eq!(used.len, 0);
    }
    // Receive: host input pending, a chain with nothing writable and one outside memory.
    c.write_all(b"after the faults").unwrap();
    d.wait_log("client connected");
    for bufs in [
        vec![Buf::readable(scratch, 64)],
        vec![Buf::writable(mem_end, 64)],
    ] {
        drv.fe.queue(0).submit(&bufs).unwrap();
        let used = drv
            .fe
            .queue(0)
            .wait_used(TIMEOUT)
            .expect("bad chain completed");
        assert_eq!(used.len, 0);
    }
    drv.post_rx(0, 2);
    assert_eq!(drv.recv_until(0, b"after the faults"), b"after the faults");
    drv.send(1, b"still here");
    read_until(&mut c, b"still here");
    // A write to the read-only part of the config space is ignored.
    drv.fe.set_config(0, &[1, 2, 3, 4]).unwrap();
    assert_eq!(drv.fe.get_config(0, 4).unwrap(), [0, 0, 0, 0]);
    assert!(d.count_log("guest fault") >= 3, "faults are reported");
}

#[test]
fn a_frontend_that_reconnects_finds_the_client_still_attached() {
    let d = Daemon::start(|dir| {
        vec![
            "--backend".into(),
            format!("unix={}", dir.join("c.sock").display()),
        ]
    });
    let mut c = unix_client(&d.path("c.sock"));
    {
        let mut drv = Driver::connect(&d.sock, 2);
        drv.send(1, b"first boot\n");
        read_until(&mut c, b"first boot\n");
    }
    d.wait_log("frontend disconnected");
    c.write_all(b"typed between VMs\n").unwrap();
    let mut drv = Driver::connect(&d.sock, 2);
    drv.post_rx(0, 4);
    drv.recv_until(0, b"typed between VMs\n");
    drv.send(1, b"second boot\n");
    read_until(&mut c, b"second boot\n");
    drop(drv);

    // Many more VMs come and go: nothing accumulates in the daemon.
    let pid = d.child.pid();
    let settled = |n: usize| {
        let deadline = Instant::now() + TIMEOUT;
        while d.count_log("frontend disconnected") < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // The connection's worker threads are joined right after that line.
        std::thread::sleep(Duration::from_millis(200));
        (fd_list(pid), thread_count(pid))
    };
    let before = settled(2);
    for i in 0..20 {
        let mut drv = Driver::connect(&d.sock, 2);
        let line = format!("boot {i}\n");
        drv.send(1, line.as_bytes());
        read_until(&mut c, line.as_bytes());
    }
    let after = settled(22);
    assert_eq!(
        after, before,
        "descriptors and threads after 20 more frontends"
    );
    assert_eq!(d.count_log("client disconnected"), 0);
}

#[test]
fn emergency_writes_and_the_log_file_get_every_byte_across_rotation() {
    let d = Daemon::start(|dir| {
        vec![
            "--backend".into(),
            format!("unix={}", dir.join("c.sock").display()),
            "--log-file".into(),
            dir.join("guest.log").display().to_string(),
        ]
    });
    let mut drv = Driver::connect(&d.sock, 2);
    // emerg_wr (offset 8) works before any queue traffic.
    drv.fe.set_config(8, &[b'!', 0, 0, 0]).unwrap();
    drv.send(1, b"logged line\n");
    let mut c = unix_client(&d.path("c.sock"));
    read_until(&mut c, b"!logged line\n");
    wait_file(&d.path("guest.log"), b"!logged line\n");

    // Log rotation: the file is moved away, SIGHUP reopens the path.
    std::fs::rename(d.path("guest.log"), d.path("guest.log.1")).unwrap();
    d.child.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    d.wait_log("log file");
    drv.send(1, b"after rotation\n");
    read_until(&mut c, b"after rotation\n");
    wait_file(&d.path("guest.log"), b"after rotation\n");
    assert_eq!(
        std::fs::read(d.path("guest.log.1")).unwrap(),
        b"!logged line\n"
    );
}

/// The open descriptors of process `pid`, as `N -> target` lines.
fn fd_list(pid: u32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| {
            let target = std::fs::read_link(e.path()).unwrap_or_default();
            format!(
                "{} -> {}",
                e.file_name().to_string_lossy(),
                target.display()
            )
        })
        .collect();
    v.sort();
    v
}

fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

/// Waits until the file at `path` holds exactly `want`.
fn wait_file(path: &Path, want: &[u8]) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let got = std::fs::read(path).unwrap_or_default();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} holds {:?}",
            path.display(),
            String::from_utf8_lossy(&got)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_user_mistake_is_one_line_and_exit_status_1() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vhost.sock");
    for (line, expect) in [
        (vec!["--backend", "serial"], "unknown backend"),
        (vec!["--backend", "stdio", "--ports", "2"], "one port"),
        (vec!["--ports", "2"], "--backend"),
        (
            vec!["--backend", "unix=/nonexistent/dir/c.sock"],
            "cannot listen on",
        ),
        (vec!["--backend", "tcp=127.0.0.1:99999"], "bad TCP address"),
    ] {
        let out = Command::new(bin_path("vhost-device-console"))
            .arg("--socket-path")
            .arg(&sock)
            .args(&line)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{line:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{line:?}: one line, got {err:?}");
        assert!(err.contains(expect), "{line:?}: {err}");
        assert!(!sock.exists(), "{line:?}: no socket file left behind");
    }
}

#[test]
fn indirect_chains_and_a_driver_without_event_idx() {
    const EVENT_IDX: u64 = 1 << 29;
    let d = Daemon::start(|dir| {
        vec![
            "--backend".into(),
            format!("unix={}", dir.join("c.sock").display()),
        ]
    });
    let mut drv = Driver::connect_with(&d.sock, Options::default().queues(2).features(!EVENT_IDX));
    assert_eq!(drv.fe.features() & EVENT_IDX, 0, "EVENT_IDX not acked");
    let mut c = unix_client(&d.path("c.sock"));
    d.wait_log("client connected");

    // Guest output in an indirect table of three readable buffers.
    let parts: Vec<_> = [&b"indirect "[..], b"chains ", b"work\n"]
        .iter()
        .map(|p| Buf::readable(drv.fe.memory().alloc_with(p), p.len() as u32))
        .collect();
    let head = drv.fe.queue(1).add_indirect(&parts).unwrap();
    drv.fe.queue(1).publish(head);
    drv.fe.queue(1).kick().unwrap();
    drv.fe
        .queue(1)
        .wait_used(TIMEOUT)
        .expect("indirect chain used");
    read_until(&mut c, b"indirect chains work\n");

    // Host input into an indirect table of two small writable buffers.
    let a = drv.fe.memory().alloc(4);
    let b = drv.fe.memory().alloc(4);
    let head = drv
        .fe
        .queue(0)
        .add_indirect(&[Buf::writable(a, 4), Buf::writable(b, 4)])
        .unwrap();
    drv.fe.queue(0).publish(head);
    drv.fe.queue(0).kick().unwrap();
    c.write_all(b"12345678").unwrap();
    let used = drv
        .fe
        .queue(0)
        .wait_used(TIMEOUT)
        .expect("indirect receive");
    assert_eq!(used.len, 8);
    assert_eq!(drv.fe.memory().read(a, 4), b"1234");
    assert_eq!(drv.fe.memory().read(b, 4), b"5678");

    // And plain chains, many of them, without EVENT_IDX.
    drv.post_rx(0, 8);
    let lines: Vec<String> = (0..50).map(|i| format!("line {i}\n")).collect();
    for l in &lines {
        c.write_all(l.as_bytes()).unwrap();
    }
    drv.recv_until(0, b"line 49\n");
    for l in &lines {
        drv.send(1, l.as_bytes());
    }
    read_until(&mut c, b"line 49\n");
}

/// The daemon's anonymous memory (its heap), in bytes; guest memory is a shared mapping.
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
fn a_client_that_stops_reading_back_pressures_the_guest_with_bounded_memory() {
    let d = Daemon::start(|dir| {
        vec![
            "--backend".into(),
            format!("unix={}", dir.join("console.sock").display()),
        ]
    });
    let path = d.path("console.sock");
    d.wait_log("): unix ");
    let mut drv = Driver::connect(&d.sock, 2);
    drv.post_rx(0, 4);
    // A client that connects and never reads.
    let stalled = unix_client(&path);
    std::thread::sleep(Duration::from_millis(200));
    let pid = d.child.pid();
    let before = rss_anon(pid);

    // The guest writes up to 32 MiB; the device must stop taking its buffers once the
    // client's buffer is full, rather than keep the output in memory.
    const CHUNK: u32 = 64 * 1024;
    let addr = drv.fe.memory().alloc_with(&vec![b'x'; CHUNK as usize]);
    let mut taken = 0u64;
    let mut stalled_at = None;
    for i in 0..512 {
        let q = drv.fe.queue(1);
        q.submit(&[Buf::readable(addr, CHUNK)]).expect("submit");
        if q.wait_used(Duration::from_secs(1)).is_err() {
            stalled_at = Some(i);
            break;
        }
        taken += u64::from(CHUNK);
    }
    assert!(
        stalled_at.is_some(),
        "32 MiB of output taken for a client that reads nothing"
    );
    let after = rss_anon(pid);
    assert!(
        taken < 4 << 20,
        "{taken} bytes taken before back-pressure (the client buffer is 256 KiB)"
    );
    assert!(
        after < before + (4 << 20),
        "daemon anonymous memory grew {before} -> {after} bytes"
    );

    // The client goes away: the waiting buffer is taken, and the daemon serves the next
    // client both ways.
    drop(stalled);
    drv.fe
        .queue(1)
        .wait_used(TIMEOUT)
        .expect("the stalled transmit buffer is taken once the client is gone");
    let mut c = unix_client(&path);
    drv.send(1, b"after the stall");
    read_until(&mut c, b"after the stall");
    c.write_all(b"typed").unwrap();
    assert_eq!(drv.recv_until(0, b"typed"), b"typed");
    println!(
        "console stalled client: {taken} bytes taken before back-pressure, daemon anonymous memory {before} -> {after} bytes"
    );
}
