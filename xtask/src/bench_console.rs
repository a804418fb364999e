//! `cargo xtask bench console`: our vhost-device-console against rust-vmm's
//! vhost-device-console (crates.io, installed once into `target/peers`), on the same
//! synthetic frontend, one run, ratios printed.
//!
//! The in-test vhost-user frontend (`e2e::frontend`) plays the guest driver on the port's
//! queues (and, where the daemon offers MULTIPORT, does the control handshake first). The
//! host side is a TCP client, the one backend both daemons have. Measured:
//! - guest to host: MiB/s of 4 KiB transmit buffers (64 in flight) reaching the client, and
//!   the daemon's CPU time per MiB (from `/proc/<pid>/stat`);
//! - host to guest: MiB/s of client writes reaching 4 KiB receive buffers;
//! - round trip of a line: client writes a line, the guest receives it and writes it back,
//!   the client reads it; median and 99th percentile.
//!
//! The data is ASCII (the peer panics on guest output that is not UTF-8). A figure the peer
//! cannot produce (it returns a receive buffer more than once, so the used ring is corrupt)
//! is reported as failed, with the reason. Options: `--quick`, `--mib N`, `--lines N`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::frontend::{Buf, Frontend, Options};
use e2e::ChildGuard;

type Result<T> = std::result::Result<T, String>;

const PEER_VERSION: &str = "0.1.0";
const BUF: u32 = 4096;
const IN_FLIGHT: usize = 64;
const MULTIPORT: u64 = 1 << 1;
const TIMEOUT: Duration = Duration::from_secs(20);
/// ASCII payload: the peer panics on guest output that is not UTF-8.
const ALPHABET: &[u8; 26] = b"abcdefghijklmnopqrstuvwxyz";

/// Which daemon, and how to start it on a vhost-user socket and a TCP port.
#[derive(Debug, Clone)]
struct Subject {
    name: &'static str,
    binary: PathBuf,
    peer: bool,
}

/// Entry point for `cargo xtask bench console [options]`.
pub fn run(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let number = |flag: &str, default: usize| -> Result<usize> {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map(|v| v.parse().map_err(|_| format!("{flag} {v}: not a number")))
            .transpose()
            .map(|v| v.unwrap_or(default))
    };
    let mib = number("--mib", if quick { 8 } else { 64 })?;
    let lines = number("--lines", if quick { 200 } else { 2000 })?;
    let subjects = [
        Subject {
            name: "ours",
            binary: build_ours()?,
            peer: false,
        },
        Subject {
            name: "rust-vmm",
            binary: install_peer()?,
            peer: true,
        },
    ];
    let mut results = Vec::new();
    for s in &subjects {
        if args.iter().any(|a| a == &format!("--skip-{}", s.name)) {
            results.push(Figures {
                g2h: Err("skipped".into()),
                h2g: Err("skipped".into()),
                rtt: Err("skipped".into()),
            });
            continue;
        }
        eprintln!("bench console: {} ({})", s.name, s.binary.display());
        results.push(Figures {
            g2h: measure(s, |b| b.guest_to_host(mib)),
            h2g: measure(s, |b| b.host_to_guest(mib)),
            rtt: measure(s, |b| b.round_trips(lines)),
        });
    }
    report(&subjects, &results, mib, lines);
    Ok(())
}

fn workspace() -> PathBuf {
    e2e::paths::workspace_root()
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn build_ours() -> Result<PathBuf> {
    eprintln!("bench console: cargo build --release -p vhost-device-console");
    let status = cargo()
        .args(["build", "--release", "-p", "vhost-device-console"])
        .current_dir(workspace())
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err("building vhost-device-console failed".into());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace().join("target"), PathBuf::from);
    Ok(target.join("release").join("vhost-device-console"))
}

fn install_peer() -> Result<PathBuf> {
    let root = workspace().join("target").join("peers");
    let bin = root.join("bin").join("vhost-device-console");
    if bin.exists() {
        return Ok(bin);
    }
    eprintln!("bench console: cargo install vhost-device-console --version {PEER_VERSION} (once)");
    let status = cargo()
        .args([
            "install",
            "vhost-device-console",
            "--version",
            PEER_VERSION,
            "--root",
        ])
        .arg(&root)
        .status()
        .map_err(|e| format!("cannot run cargo install: {e}"))?;
    if !status.success() || !bin.exists() {
        return Err("installing the peer vhost-device-console failed".into());
    }
    Ok(bin)
}

/// A free TCP port on the loopback interface (bound and released).
fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free TCP port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("no free TCP port: {e}"))
}

/// One daemon with a frontend playing the guest and a TCP client playing the user.
struct Bench {
    daemon: ChildGuard,
    _dir: TempDir,
    fe: Frontend,
    client: TcpStream,
    /// Receive buffers the device holds, by head.
    rx: std::collections::HashMap<u16, Buf>,
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Bench {
    fn start(s: &Subject) -> Result<Bench> {
        let dir =
            std::env::temp_dir().join(format!("bench-console-{}-{}", std::process::id(), s.name));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let dir = TempDir(dir);
        let port = free_port()?;
        let sock = dir.0.join("vhost.sock");
        let mut cmd = Command::new(&s.binary);
        let vhost_sock = if s.peer {
            // The peer appends the connection number to the socket path.
            cmd.arg("--socket-path").arg(&sock).args([
                "--backend",
                "network",
                "--tcp-port",
                &port.to_string(),
            ]);
            dir.0.join("vhost.sock0")
        } else {
            cmd.arg("--socket-path").arg(&sock).args([
                "--backend",
                &format!("tcp=127.0.0.1:{port}"),
                "--history",
                "0",
            ]);
            sock
        };
        cmd.env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let daemon = ChildGuard::spawn(s.name, cmd).map_err(|e| e.to_string())?;
        if !e2e::process::wait_for_path(&vhost_sock, Duration::from_secs(10)) {
            return Err(format!(
                "{} did not create {}",
                s.name,
                vhost_sock.display()
            ));
        }
        let fe = connect(&vhost_sock)?;
        let client = connect_tcp(port)?;
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            eprintln!("bench console: {}: frontend and client connected", s.name);
        }
        let mut b = Bench {
            daemon,
            _dir: dir,
            fe,
            client,
            rx: std::collections::HashMap::new(),
        };
        b.handshake()?;
        b.sync()?;
        Ok(b)
    }

    /// Waits until guest output reaches the client: the client's connection is accepted
    /// asynchronously, and output before that would not reach it.
    fn sync(&mut self) -> Result<()> {
        let marker = b"@sync@\n";
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        self.client
            .set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| e.to_string())?;
        for _ in 0..25 {
            self.send(1, marker)?;
            loop {
                match self.client.read(&mut buf) {
                    Ok(0) => return Err("the daemon closed the client".into()),
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                    Err(_) => break,
                }
            }
            if seen.windows(marker.len()).any(|w| w == marker) {
                // Drain repeats still on the way.
                std::thread::sleep(Duration::from_millis(50));
                while let Ok(n) = self.client.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                }
                return self
                    .client
                    .set_read_timeout(Some(TIMEOUT))
                    .map_err(|e| e.to_string());
            }
        }
        Err("guest output never reached the TCP client".into())
    }

    /// With MULTIPORT: DEVICE_READY, PORT_READY 0, PORT_OPEN 0, as a Linux driver does.
    fn handshake(&mut self) -> Result<()> {
        if self.fe.features() & MULTIPORT == 0 {
            return Ok(());
        }
        for _ in 0..16 {
            let addr = self.fe.memory().alloc(BUF as usize);
            self.fe
                .queue(2)
                .submit(&[Buf::writable(addr, BUF)])
                .map_err(|e| e.to_string())?;
        }
        for (event, value) in [(0u16, 1u16), (3, 1), (6, 1)] {
            let mut msg = 0u32.to_le_bytes().to_vec();
            msg.extend_from_slice(&event.to_le_bytes());
            msg.extend_from_slice(&value.to_le_bytes());
            self.send(3, &msg)?;
        }
        // Let the control replies settle; they are not needed for the data path.
        std::thread::sleep(Duration::from_millis(100));
        Ok(())
    }

    fn send(&mut self, q: usize, data: &[u8]) -> Result<()> {
        let addr = self.fe.memory().alloc_with(data);
        let len = u32::try_from(data.len()).map_err(|e| e.to_string())?;
        self.fe
            .queue(q)
            .submit(&[Buf::readable(addr, len)])
            .map_err(|e| e.to_string())?;
        self.fe
            .queue(q)
            .wait_used(TIMEOUT)
            .map_err(|e| format!("queue {q}: {e}"))?;
        Ok(())
    }

    fn cpu(&self) -> Duration {
        crate::util::cpu_time(self.daemon.pid())
    }

    /// Guest output: 4 KiB transmit buffers, `IN_FLIGHT` at a time, read by the client.
    fn guest_to_host(&mut self, mib: usize) -> Result<Figure> {
        let total = mib << 20;
        let chunk: Vec<u8> = (0..BUF as usize).map(|i| ALPHABET[i % 26]).collect();
        let bufs: Vec<_> = (0..IN_FLIGHT)
            .map(|_| self.fe.memory().alloc_with(&chunk))
            .collect();
        let mut reader = self.client.try_clone().map_err(|e| e.to_string())?;
        let counter = std::thread::spawn(move || -> std::io::Result<usize> {
            let mut got = 0;
            let mut buf = vec![0u8; 1 << 16];
            while got < total {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            Ok(got)
        });
        let cpu0 = self.cpu();
        let start = Instant::now();
        let chains = total / BUF as usize;
        let mut submitted = 0;
        let mut done = 0;
        while done < chains {
            while submitted < chains && submitted - done < IN_FLIGHT {
                let addr = bufs[submitted % IN_FLIGHT];
                self.fe
                    .queue(1)
                    .submit(&[Buf::readable(addr, BUF)])
                    .map_err(|e| e.to_string())?;
                submitted += 1;
            }
            self.fe
                .queue(1)
                .wait_used(TIMEOUT)
                .map_err(|e| format!("transmit: {e}"))?;
            done += 1;
        }
        let got = counter
            .join()
            .map_err(|_| "client thread panicked".to_string())?
            .map_err(|e| format!("client read: {e}"))?;
        let secs = start.elapsed().as_secs_f64();
        if got != total {
            return Err(format!("client received {got} of {total} bytes"));
        }
        Ok(Figure::throughput(total, secs, self.cpu() - cpu0))
    }

    fn post_rx(&mut self, n: usize) -> Result<()> {
        for _ in 0..n {
            let buf = Buf::writable(self.fe.memory().alloc(BUF as usize), BUF);
            self.repost(buf)?;
        }
        Ok(())
    }

    fn repost(&mut self, buf: Buf) -> Result<()> {
        let head = self.fe.queue(0).submit(&[buf]).map_err(|e| e.to_string())?;
        self.rx.insert(head, buf);
        Ok(())
    }

    /// The next filled receive buffer's bytes, re-posted.
    fn recv(&mut self) -> Result<Vec<u8>> {
        let used = self
            .fe
            .queue(0)
            .wait_used(TIMEOUT)
            .map_err(|e| format!("receive: {e}"))?;
        let buf = self.rx.remove(&used.id).ok_or_else(|| {
            format!(
                "the device returned receive buffer {} that it did not hold (used ring corrupt)",
                used.id
            )
        })?;
        if used.len > BUF {
            return Err(format!(
                "the device wrote {} bytes into a {BUF}-byte buffer",
                used.len
            ));
        }
        let data = self.fe.memory().read(buf.addr, used.len as usize);
        self.repost(buf)?;
        Ok(data)
    }

    /// Host input: the client writes, 4 KiB receive buffers take it.
    fn host_to_guest(&mut self, mib: usize) -> Result<Figure> {
        let total = mib << 20;
        self.post_rx(IN_FLIGHT)?;
        let mut writer = self.client.try_clone().map_err(|e| e.to_string())?;
        let cpu0 = self.cpu();
        let start = Instant::now();
        let feeder = std::thread::spawn(move || -> std::io::Result<()> {
            let chunk: Vec<u8> = (0..1 << 16).map(|i| ALPHABET[i % 26]).collect();
            let mut sent = 0;
            while sent < total {
                let n = chunk.len().min(total - sent);
                writer.write_all(&chunk[..n])?;
                sent += n;
            }
            Ok(())
        });
        let mut got = 0;
        while got < total {
            got += self.recv()?.len();
        }
        let secs = start.elapsed().as_secs_f64();
        feeder
            .join()
            .map_err(|_| "client thread panicked".to_string())?
            .map_err(|e| format!("client write: {e}"))?;
        Ok(Figure::throughput(total, secs, self.cpu() - cpu0))
    }

    /// A line from the client to the guest and back, `lines` times.
    fn round_trips(&mut self, lines: usize) -> Result<Figure> {
        self.post_rx(IN_FLIGHT)?;
        self.client
            .set_nodelay(true)
            .map_err(|e| format!("TCP_NODELAY: {e}"))?;
        let mut samples = Vec::with_capacity(lines);
        let mut buf = [0u8; 256];
        for i in 0..lines {
            let line = format!("line {i:06}\n");
            let t = Instant::now();
            self.client
                .write_all(line.as_bytes())
                .map_err(|e| format!("client write: {e}"))?;
            let mut echoed = Vec::new();
            while echoed.len() < line.len() {
                echoed.extend(self.recv()?);
            }
            self.send(1, &echoed)?;
            let mut back = Vec::new();
            while back.len() < line.len() {
                let n = self
                    .client
                    .read(&mut buf)
                    .map_err(|e| format!("client read: {e}"))?;
                if n == 0 {
                    return Err("the daemon closed the client".into());
                }
                back.extend_from_slice(&buf[..n]);
            }
            samples.push(t.elapsed());
            if back != line.as_bytes() {
                return Err(format!(
                    "sent {line:?}, got back {:?}",
                    String::from_utf8_lossy(&back)
                ));
            }
        }
        samples.sort();
        let pick = |percent: usize| samples[(samples.len() - 1) * percent / 100];
        Ok(Figure::Latency {
            median: pick(50),
            p99: pick(99),
        })
    }
}

fn connect(sock: &Path) -> Result<Frontend> {
    // Four queues: the port's pair and, where MULTIPORT is offered, the control pair (the
    // frontend clamps to what the daemon has).
    // Queue size 128: the peer refuses 256.
    Frontend::connect(sock, Options::default().queues(4).queue_size(128))
        .map_err(|e| format!("vhost-user set-up: {e}"))
}

fn connect_tcp(port: u16) -> Result<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => {
                s.set_read_timeout(Some(TIMEOUT))
                    .map_err(|e| e.to_string())?;
                return Ok(s);
            }
            Err(e) if Instant::now() > deadline => {
                return Err(format!(
                    "cannot connect to the console's TCP port {port}: {e}"
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Starts a fresh daemon for one measurement (a failure in one does not spoil the next).
fn measure(s: &Subject, f: impl FnOnce(&mut Bench) -> Result<Figure>) -> Result<Figure> {
    let mut b = Bench::start(s)?;
    let r = f(&mut b);
    if let Err(e) = &r {
        eprintln!("bench console: {}: {e}", s.name);
    }
    r
}

/// One measured figure.
#[derive(Debug, Clone, Copy)]
enum Figure {
    Throughput { mibs: f64, cpu_ms_per_mib: f64 },
    Latency { median: Duration, p99: Duration },
}

impl Figure {
    fn throughput(bytes: usize, secs: f64, cpu: Duration) -> Figure {
        let mib = bytes as f64 / f64::from(1 << 20);
        Figure::Throughput {
            mibs: mib / secs.max(1e-9),
            cpu_ms_per_mib: cpu.as_secs_f64() * 1000.0 / mib.max(1e-9),
        }
    }
}

struct Figures {
    g2h: Result<Figure>,
    h2g: Result<Figure>,
    rtt: Result<Figure>,
}

fn show(f: &Result<Figure>) -> String {
    match f {
        Ok(Figure::Throughput {
            mibs,
            cpu_ms_per_mib,
        }) => format!("{mibs:9.1} MiB/s {cpu_ms_per_mib:7.2} ms CPU/MiB"),
        Ok(Figure::Latency { median, p99 }) => format!(
            "median {:7.1} us, p99 {:7.1} us",
            median.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        ),
        Err(e) => format!("failed: {e}"),
    }
}

fn ratio(ours: &Result<Figure>, peer: &Result<Figure>) -> String {
    match (ours, peer) {
        (Ok(Figure::Throughput { mibs: a, .. }), Ok(Figure::Throughput { mibs: b, .. })) => {
            format!("ours/peer throughput {:.2}x", a / b.max(1e-9))
        }
        (Ok(Figure::Latency { median: a, .. }), Ok(Figure::Latency { median: b, .. })) => {
            format!(
                "peer/ours median latency {:.2}x",
                b.as_secs_f64() / a.as_secs_f64().max(1e-12)
            )
        }
        _ => "no ratio (a run failed)".to_string(),
    }
}

fn report(subjects: &[Subject], results: &[Figures], mib: usize, lines: usize) {
    println!("console benchmark: synthetic frontend, TCP client on 127.0.0.1, {mib} MiB per direction, {lines} line round trips");
    for (s, r) in subjects.iter().zip(results) {
        println!("  {:9} guest->host {}", s.name, show(&r.g2h));
        println!("  {:9} host->guest {}", s.name, show(&r.h2g));
        println!("  {:9} line RTT    {}", s.name, show(&r.rtt));
    }
    if let [ours, peer] = results {
        println!("  guest->host: {}", ratio(&ours.g2h, &peer.g2h));
        println!("  host->guest: {}", ratio(&ours.h2g, &peer.h2g));
        println!("  line RTT:    {}", ratio(&ours.rtt, &peer.rtt));
        if peer.h2g.is_err() || peer.rtt.is_err() {
            println!(
                "  note: rust-vmm's daemon {PEER_VERSION} returns a receive buffer once per byte \
                 written into it (used entries of length 1, 2, 3, ...), so a driver that trusts \
                 the used ring reads garbage or runs out of buffers: its host->guest figures fail"
            );
        }
    }
}
