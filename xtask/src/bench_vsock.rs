//! `cargo xtask bench vsock`: our vhost-device-vsock against rust-vmm's vhost-device-vsock
//! 0.3 (crates.io), same workload, one run, ratio printed.
//!
//! Two set-ups:
//! - synthetic: a vhost-user frontend in this process plays the guest driver on the queues
//!   (4 KiB RX buffers and 64 KiB TX packets, as Linux 6.1's virtio-vsock uses them), so no
//!   emulated CPU is in the way. Reports throughput each way, the daemon's CPU time per
//!   MiB (from `/proc/<pid>/stat`), and connections per second.
//! - guest: the test guest under QEMU (TCG here) with `socat` in the guest; host-side
//!   timing of stream throughput each way (guest->host also with 64 KiB writes) and of
//!   connections per second, and, timed in the guest, the guest's own ceiling for the
//!   guest->host pipeline (`dd | socat` into `/dev/null`, no vsock in it).
//!
//! Both daemons are started with the same arguments (`--guest-cid`, the vhost-user socket,
//! `--uds-path`), each with its own default `--tx-buffer-size` (ours 256 KiB, the peer's
//! 64 KiB: what a user who swaps one for the other gets), or both with
//! `VSOCK_BENCH_TX_BUFFER` bytes. `VSOCK_BENCH_TX_PKT` sets the synthetic driver's TX packet
//! size (default 64 KiB); `VSOCK_BENCH_LOG=DIR` keeps the daemons' debug logs;
//! `VSOCK_BENCH_WRAP="valgrind --tool=callgrind"` starts our daemon under that command (to
//! profile it: instruction counts are steady where wall time on a shared machine is not).
//! Options: `--quick` (smaller sizes, one round), `--synthetic-only`, `--guest-only`,
//! `--ours-only` (no peer: for profiling), `--mib N` (synthetic transfer size). Each
//! figure is the median of three rounds that alternate which daemon goes first.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::frontend::{Buf, Frontend, Options};
use e2e::ChildGuard;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vm_memory::GuestAddress;

const HDR: usize = 44;
const HDR_U32: u32 = 44;
const RX_PAYLOAD: u32 = 4096;
const TX_PKT: usize = 64 * 1024;

/// The synthetic driver's TX packet size: 64 KiB (Linux's largest), or
/// `VSOCK_BENCH_TX_PKT` bytes to mimic an application's smaller writes.
fn tx_pkt() -> usize {
    std::env::var("VSOCK_BENCH_TX_PKT")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(TX_PKT, |n: usize| n.clamp(1, TX_PKT))
}
const GUEST_BUF_ALLOC: u32 = 256 * 1024;
const CID: u64 = 3;
const PEER_VERSION: &str = "0.3.0";

type Result<T> = std::result::Result<T, String>;

/// Which daemon.
#[derive(Debug, Clone)]
struct Subject {
    name: &'static str,
    binary: PathBuf,
    socket_flag: &'static str,
}

/// Entry point for `cargo xtask bench vsock [options]`.
pub fn run(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let synthetic = !args.iter().any(|a| a == "--guest-only");
    let guest = !args.iter().any(|a| a == "--synthetic-only");
    let mib: usize = args
        .iter()
        .position(|a| a == "--mib")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().map_err(|_| format!("--mib {v}: not a number")))
        .transpose()?
        .unwrap_or(if quick { 64 } else { 512 });

    let ours = Subject {
        name: "ours",
        binary: build_ours()?,
        socket_flag: "--socket-path",
    };
    let peer = Subject {
        name: "vhost-device-vsock 0.3",
        binary: install_peer()?,
        socket_flag: "--socket",
    };
    let rounds = if quick { 1 } else { 3 };
    if args.iter().any(|a| a == "--ours-only") {
        let conns = if quick { 200 } else { 1000 };
        eprintln!(
            "bench vsock: ours only, synthetic frontend, {mib} MiB per direction, \
             one daemon per workload (guest->host, host->guest, connections)"
        );
        let d = Running::start(&ours)?;
        let (g2h, g2h_cpu) = synthetic_g2h(&d, mib)?;
        d.stop();
        let d = Running::start(&ours)?;
        let (h2g, h2g_cpu) = synthetic_h2g(&d, mib)?;
        d.stop();
        let d = Running::start(&ours)?;
        let conns_per_s = synthetic_conns(&d, conns)?;
        d.stop();
        eprintln!(
            "  ours: guest->host {g2h:.1} MiB/s ({g2h_cpu:.2} ms CPU/MiB), host->guest \
             {h2g:.1} MiB/s ({h2g_cpu:.2} ms CPU/MiB), {conns_per_s:.0} conn/s"
        );
        return Ok(());
    }
    if synthetic {
        let conns = if quick { 200 } else { 1000 };
        eprintln!(
            "bench vsock: synthetic frontend, {mib} MiB per direction, {conns} connections, \
             {rounds} round(s), alternating order, medians"
        );
        let (a, b) = rounds_of(rounds, &ours, &peer, |s| synthetic_round(s, mib, conns))?;
        print_table("synthetic frontend (no guest CPU)", &ours, &a, &peer, &b);
    }
    if guest {
        let Some(qemu) = e2e::qemu_or_skip("bench vsock (guest)") else {
            return Ok(());
        };
        let g_mib = if quick { 16 } else { 64 };
        let conns = if quick { 20 } else { 50 };
        eprintln!(
            "bench vsock: guest under {}, {g_mib} MiB per direction, {conns} connections, \
             {rounds} round(s), alternating order, medians",
            qemu_describe(&qemu)
        );
        let (a, b) = rounds_of(rounds, &ours, &peer, |s| {
            guest_suite(&qemu, s, g_mib, conns)
        })?;
        print_table("guest under QEMU, socat in the guest", &ours, &a, &peer, &b);
    }
    Ok(())
}

fn qemu_describe(q: &e2e::Qemu) -> String {
    e2e::Launcher::describe(q)
}

fn workspace() -> PathBuf {
    e2e::paths::workspace_root()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

fn build_ours() -> Result<PathBuf> {
    eprintln!("bench vsock: cargo build --release -p vhost-device-vsock");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "-p", "vhost-device-vsock"])
        .current_dir(workspace())
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err("building vhost-device-vsock failed".into());
    }
    Ok(target_dir().join("release").join("vhost-device-vsock"))
}

fn install_peer() -> Result<PathBuf> {
    let root = workspace().join("target").join("peers");
    let bin = root.join("bin").join("vhost-device-vsock");
    if bin.exists() {
        return Ok(bin);
    }
    eprintln!("bench vsock: cargo install vhost-device-vsock --version {PEER_VERSION} (once)");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "install",
            "vhost-device-vsock",
            "--version",
            PEER_VERSION,
            "--root",
        ])
        .arg(&root)
        .status()
        .map_err(|e| format!("cannot run cargo install: {e}"))?;
    if !status.success() || !bin.exists() {
        return Err("installing the peer vhost-device-vsock failed".into());
    }
    Ok(bin)
}

/// A daemon under test in its own directory.
struct Running {
    guard: ChildGuard,
    dir: tempfile::TempDir,
}

impl Running {
    fn start(s: &Subject) -> Result<Self> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let sock = dir.path().join("vhost.sock");
        let wrap = std::env::var("VSOCK_BENCH_WRAP").unwrap_or_default();
        let mut wrap = wrap.split_whitespace();
        let mut cmd = match wrap.next() {
            Some(program) if s.name == "ours" => {
                let mut c = Command::new(program);
                c.args(wrap).arg(&s.binary);
                c
            }
            _ => Command::new(&s.binary),
        };
        cmd.args(["--guest-cid", "3", s.socket_flag])
            .arg(&sock)
            .arg("--uds-path")
            .arg(dir.path().join("vm.vsock"))
            .stdout(Stdio::null());
        if let Ok(bytes) = std::env::var("VSOCK_BENCH_TX_BUFFER") {
            cmd.arg("--tx-buffer-size").arg(bytes);
        }
        // VSOCK_BENCH_LOG=DIR keeps each daemon's debug log there, for diagnosis.
        match std::env::var_os("VSOCK_BENCH_LOG") {
            Some(log_dir) => {
                let file = std::fs::File::create(PathBuf::from(log_dir).join(format!(
                    "{}-{}.log",
                    s.name,
                    std::process::id()
                )))
                .map_err(|e| e.to_string())?;
                cmd.env("RUST_LOG", "debug").stderr(file);
            }
            None => {
                cmd.env("RUST_LOG", "error").stderr(Stdio::null());
            }
        }
        let guard = ChildGuard::spawn(s.name, cmd).map_err(|e| e.to_string())?;
        if !e2e::process::wait_for_path(&sock, Duration::from_secs(10)) {
            return Err(format!("{} did not create its socket", s.name));
        }
        Ok(Running { guard, dir })
    }

    fn sock(&self) -> PathBuf {
        self.dir.path().join("vhost.sock")
    }

    fn port(&self, p: u32) -> PathBuf {
        self.dir.path().join(format!("vm.vsock_{p}"))
    }

    fn uds(&self) -> PathBuf {
        self.dir.path().join("vm.vsock")
    }

    /// Stops the daemon with SIGTERM (so a profiler it runs under writes its output).
    fn stop(mut self) {
        self.guard.terminate(Duration::from_secs(10));
    }

    /// User plus system CPU time of the daemon so far.
    fn cpu(&self) -> Duration {
        crate::util::cpu_time(self.guard.pid())
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    g2h_mibs: f64,
    g2h_cpu_ms_per_mib: f64,
    h2g_mibs: f64,
    h2g_cpu_ms_per_mib: f64,
    conns_per_s: f64,
    /// Guest->host with the guest writing 64 KiB at a time (`socat -b 65536`) instead of
    /// socat's 8 KiB (real guest only).
    g2h_64k_mibs: f64,
    /// The guest's own ceiling for the guest->host workload: the same `dd | socat`
    /// pipeline writing to `/dev/null` instead of a vsock socket (real guest only).
    guest_ceiling_mibs: f64,
}

fn print_table(title: &str, a: &Subject, fa: &Figures, b: &Subject, fb: &Figures) {
    let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::NAN };
    let buffers = std::env::var("VSOCK_BENCH_TX_BUFFER").map_or_else(
        |_| "each daemon's default tx-buffer-size (ours 262144, the peer's 65536)".to_string(),
        |b| format!("tx-buffer-size {b} for both"),
    );
    println!("\n== vsock: {title}; {buffers} ==");
    println!("{:<34} {:>14} {:>24} {:>8}", "", a.name, b.name, "ratio");
    let rows = [
        (
            "guest->host MiB/s",
            fa.g2h_mibs,
            fb.g2h_mibs,
            ratio(fa.g2h_mibs, fb.g2h_mibs),
        ),
        (
            "guest->host MiB/s, 64 KiB writes",
            fa.g2h_64k_mibs,
            fb.g2h_64k_mibs,
            ratio(fa.g2h_64k_mibs, fb.g2h_64k_mibs),
        ),
        (
            "host->guest MiB/s",
            fa.h2g_mibs,
            fb.h2g_mibs,
            ratio(fa.h2g_mibs, fb.h2g_mibs),
        ),
        (
            "connections/s",
            fa.conns_per_s,
            fb.conns_per_s,
            ratio(fa.conns_per_s, fb.conns_per_s),
        ),
        (
            "daemon CPU ms/MiB guest->host",
            fa.g2h_cpu_ms_per_mib,
            fb.g2h_cpu_ms_per_mib,
            ratio(fb.g2h_cpu_ms_per_mib, fa.g2h_cpu_ms_per_mib),
        ),
        (
            "daemon CPU ms/MiB host->guest",
            fa.h2g_cpu_ms_per_mib,
            fb.h2g_cpu_ms_per_mib,
            ratio(fb.h2g_cpu_ms_per_mib, fa.h2g_cpu_ms_per_mib),
        ),
    ];
    for (name, x, y, r) in rows {
        if x == 0.0 && y == 0.0 {
            continue;
        }
        println!("{name:<34} {x:>14.2} {y:>24.2} {r:>7.2}x");
    }
    if fa.guest_ceiling_mibs > 0.0 && fb.guest_ceiling_mibs > 0.0 {
        let pct = |x: f64, c: f64| 100.0 * x / c;
        println!(
            "{:<34} {:>14.2} {:>24.2}   (guest->host as % of it: ours {:.0}%, peer {:.0}%)",
            "guest ceiling, dd|socat >/dev/null",
            fa.guest_ceiling_mibs,
            fb.guest_ceiling_mibs,
            pct(fa.g2h_mibs, fa.guest_ceiling_mibs),
            pct(fb.g2h_mibs, fb.guest_ceiling_mibs),
        );
    }
    println!("(ratio: ours/peer for rates, peer/ours for CPU per MiB; higher is better for ours)");
}

// ---- synthetic frontend ---------------------------------------------------------------------

fn hdr(op: u16, src_port: u32, dst_port: u32, len: u32, flags: u32, fwd_cnt: u32) -> [u8; HDR] {
    let mut b = [0u8; HDR];
    b[0..8].copy_from_slice(&CID.to_le_bytes());
    b[8..16].copy_from_slice(&2u64.to_le_bytes());
    b[16..20].copy_from_slice(&src_port.to_le_bytes());
    b[20..24].copy_from_slice(&dst_port.to_le_bytes());
    b[24..28].copy_from_slice(&len.to_le_bytes());
    b[28..30].copy_from_slice(&1u16.to_le_bytes());
    b[30..32].copy_from_slice(&op.to_le_bytes());
    b[32..36].copy_from_slice(&flags.to_le_bytes());
    b[36..40].copy_from_slice(&GUEST_BUF_ALLOC.to_le_bytes());
    b[40..44].copy_from_slice(&fwd_cnt.to_le_bytes());
    b
}

/// The fields of a received header the driver needs: (op, len, buf_alloc, fwd_cnt, src_port).
fn parse(b: &[u8]) -> (u16, u32, u32, u32, u32) {
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    (
        u16::from_le_bytes([b[30], b[31]]),
        u32_at(24),
        u32_at(36),
        u32_at(40),
        u32_at(16),
    )
}

/// The synthetic guest driver.
struct Driver {
    fe: Frontend,
    rx: std::collections::HashMap<u16, GuestAddress>,
    tx_free: Vec<GuestAddress>,
    tx_busy: std::collections::HashMap<u16, GuestAddress>,
    ctrl: GuestAddress,
    calls: [i32; 2],
    /// Packets taken while waiting for something else, handed out by the next `take_rx`.
    pending: Vec<(u16, u32, u32, u32, u32)>,
}

impl Driver {
    fn connect(sock: &Path) -> Result<Self> {
        let opts = Options::default()
            .queues(3)
            .queue_size(256)
            .mem_size(128 << 20);
        let fe = Frontend::connect(sock, opts).map_err(|e| format!("vhost-user set-up: {e}"))?;
        let mut d = Driver {
            fe,
            rx: std::collections::HashMap::new(),
            tx_free: Vec::new(),
            tx_busy: std::collections::HashMap::new(),
            ctrl: GuestAddress(0),
            calls: [0; 2],
            pending: Vec::new(),
        };
        d.calls = [
            d.fe.queue(0).call_event().as_raw_fd(),
            d.fe.queue(1).call_event().as_raw_fd(),
        ];
        d.ctrl = d.fe.memory().alloc(HDR * 64);
        for _ in 0..120 {
            let a = d.fe.memory().alloc(HDR + TX_PKT);
            d.fe.memory()
                .fill(GuestAddress(a.0 + HDR as u64), 0x5a, TX_PKT);
            d.tx_free.push(a);
        }
        for _ in 0..256 {
            let a = d.fe.memory().alloc(HDR + RX_PAYLOAD as usize);
            d.post_rx(a)?;
        }
        d.fe.queue(0).kick().map_err(|e| e.to_string())?;
        Ok(d)
    }

    fn post_rx(&mut self, a: GuestAddress) -> Result<()> {
        let q = self.fe.queue(0);
        let head = q
            .add(&[Buf::writable(a, HDR_U32 + RX_PAYLOAD)])
            .map_err(|e| e.to_string())?;
        q.publish(head);
        self.rx.insert(head, a);
        Ok(())
    }

    /// Sends a control packet (no payload) and waits for the device to take it.
    fn control(&mut self, h: [u8; HDR]) -> Result<()> {
        let a = self.ctrl;
        self.fe.memory().write(a, &h);
        let q = self.fe.queue(1);
        q.submit(&[Buf::readable(a, HDR_U32)])
            .map_err(|e| e.to_string())?;
        q.wait_used(Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Queues a data packet of `len` bytes from a free TX slot; false if none is free.
    fn data(&mut self, h: [u8; HDR], len: u32) -> Result<bool> {
        let Some(a) = self.tx_free.pop() else {
            return Ok(false);
        };
        self.fe.memory().write(a, &h);
        let q = self.fe.queue(1);
        let head = q
            .add(&[
                Buf::readable(a, HDR_U32),
                Buf::readable(GuestAddress(a.0 + HDR as u64), len),
            ])
            .map_err(|e| e.to_string())?;
        q.publish(head);
        self.tx_busy.insert(head, a);
        Ok(true)
    }

    fn reclaim_tx(&mut self) {
        while let Some(u) = self.fe.queue(1).poll_used() {
            if let Some(a) = self.tx_busy.remove(&u.id) {
                self.tx_free.push(a);
            }
        }
    }

    /// Takes received packets' headers (payload left in place), re-posting the buffers.
    fn take_rx(&mut self, out: &mut Vec<(u16, u32, u32, u32, u32)>) -> Result<()> {
        out.append(&mut self.pending);
        let mut any = false;
        while let Some(u) = self.fe.queue(0).poll_used() {
            let Some(a) = self.rx.remove(&u.id) else {
                continue;
            };
            let raw = self.fe.memory().read(a, HDR);
            out.push(parse(&raw));
            self.post_rx(a)?;
            any = true;
        }
        if any {
            self.fe.queue(0).kick().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Waits until the device signals either queue (or a short timeout).
    fn wait(&self, timeout: Duration) {
        let [q0, q1] = self.calls;
        // SAFETY: both fds belong to call eventfds owned by `self.fe`, which outlives this
        // call; they are only polled and read here.
        let (b0, b1) = unsafe { (BorrowedFd::borrow_raw(q0), BorrowedFd::borrow_raw(q1)) };
        let mut fds = [
            PollFd::new(b0, PollFlags::POLLIN),
            PollFd::new(b1, PollFlags::POLLIN),
        ];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let _ = poll(&mut fds, PollTimeout::from(ms));
        let mut b = [0u8; 8];
        for fd in [b0, b1] {
            // Consume the signal; the eventfd is non-blocking.
            let _ = nix::unistd::read(fd.as_raw_fd(), &mut b);
        }
    }

    /// Opens a guest-initiated connection to host port `port` from `local`; returns the
    /// device's buf_alloc.
    fn open(&mut self, local: u32, port: u32) -> Result<(u32, u32)> {
        self.control(hdr(1, local, port, 0, 0, 0))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        loop {
            self.take_rx(&mut got)?;
            if let Some(i) = got.iter().position(|p| p.0 == 2 || p.0 == 3) {
                let (op, _, buf_alloc, fwd, _) = got.remove(i);
                if op != 2 {
                    return Err(format!("connection to port {port} refused"));
                }
                // Data may follow the RESPONSE in the same batch: keep it for the caller.
                self.pending = got;
                return Ok((buf_alloc, fwd));
            }
            if Instant::now() > deadline {
                return Err("no RESPONSE".into());
            }
            self.wait(Duration::from_millis(20));
        }
    }
}

/// Runs `round` for both subjects `rounds` times, alternating who goes first, and returns
/// the medians of each figure.
fn rounds_of(
    rounds: usize,
    a: &Subject,
    b: &Subject,
    mut round: impl FnMut(&Subject) -> Result<Figures>,
) -> Result<(Figures, Figures)> {
    let mut fa = Vec::new();
    let mut fb = Vec::new();
    // A round that fails (on a loaded machine the peer has refused connections) is run
    // once more, saying so.
    let mut once = |s: &Subject| {
        round(s).or_else(|e| {
            eprintln!("  {}: round failed ({e}); running it again", s.name);
            round(s)
        })
    };
    for r in 0..rounds {
        if r % 2 == 0 {
            fa.push(once(a)?);
            fb.push(once(b)?);
        } else {
            fb.push(once(b)?);
            fa.push(once(a)?);
        }
    }
    Ok((median(&fa), median(&fb)))
}

fn median(all: &[Figures]) -> Figures {
    let m =
        |f: fn(&Figures) -> f64| crate::util::median(all.iter().map(f).collect()).unwrap_or(0.0);
    Figures {
        g2h_mibs: m(|f| f.g2h_mibs),
        g2h_cpu_ms_per_mib: m(|f| f.g2h_cpu_ms_per_mib),
        h2g_mibs: m(|f| f.h2g_mibs),
        h2g_cpu_ms_per_mib: m(|f| f.h2g_cpu_ms_per_mib),
        conns_per_s: m(|f| f.conns_per_s),
        g2h_64k_mibs: m(|f| f.g2h_64k_mibs),
        guest_ceiling_mibs: m(|f| f.guest_ceiling_mibs),
    }
}

fn synthetic_round(s: &Subject, mib: usize, conns: usize) -> Result<Figures> {
    let named = |e: String| format!("{}: {e}", s.name);
    let d = Running::start(s)?;
    let (g2h_mibs, g2h_cpu_ms_per_mib) = synthetic_g2h(&d, mib).map_err(named)?;
    let (h2g_mibs, h2g_cpu_ms_per_mib) = synthetic_h2g(&d, mib).map_err(named)?;
    drop(d);
    let d = Running::start(s)?;
    let conns_per_s = synthetic_conns(&d, conns).map_err(named)?;
    let f = Figures {
        g2h_mibs,
        g2h_cpu_ms_per_mib,
        h2g_mibs,
        h2g_cpu_ms_per_mib,
        conns_per_s,
        ..Figures::default()
    };
    eprintln!(
        "  {}: guest->host {:.1} MiB/s ({:.2} ms CPU/MiB), host->guest {:.1} MiB/s ({:.2} ms CPU/MiB), {:.0} conn/s",
        s.name, f.g2h_mibs, f.g2h_cpu_ms_per_mib, f.h2g_mibs, f.h2g_cpu_ms_per_mib, f.conns_per_s
    );
    Ok(f)
}

fn synthetic_g2h(d: &Running, mib: usize) -> Result<(f64, f64)> {
    let total = mib << 20;
    let listener = UnixListener::bind(d.port(5000)).map_err(|e| e.to_string())?;
    let reader = std::thread::spawn(move || -> std::io::Result<(usize, Instant)> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0;
        while got < total {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        Ok((got, Instant::now()))
    });
    let mut drv = Driver::connect(&d.sock())?;
    let (buf_alloc, mut fwd) = drv.open(1000, 5000)?;
    let cpu0 = d.cpu();
    let t0 = Instant::now();
    let mut sent: usize = 0;
    let mut tx_cnt: u32 = 0;
    let mut rx = Vec::new();
    while sent < total {
        drv.reclaim_tx();
        rx.clear();
        drv.take_rx(&mut rx)?;
        for &(op, _, _, f, _) in &rx {
            if op == 3 {
                return Err("connection reset during guest->host transfer".into());
            }
            fwd = f;
        }
        let mut queued = false;
        loop {
            let credit = buf_alloc.saturating_sub(tx_cnt.wrapping_sub(fwd)) as usize;
            let n = credit.min(tx_pkt()).min(total - sent);
            if n == 0 {
                break;
            }
            let len = u32::try_from(n).unwrap_or(0);
            if !drv.data(hdr(5, 1000, 5000, len, 0, 0), len)? {
                break;
            }
            sent += n;
            tx_cnt = tx_cnt.wrapping_add(len);
            queued = true;
        }
        if queued {
            drv.fe.queue(1).kick().map_err(|e| e.to_string())?;
        } else {
            drv.wait(Duration::from_millis(5));
        }
        if t0.elapsed() > Duration::from_secs(300) {
            return Err("guest->host transfer stuck".into());
        }
    }
    let (got, t1) = reader
        .join()
        .map_err(|_| "reader panicked".to_string())?
        .map_err(|e| e.to_string())?;
    let cpu = d.cpu().saturating_sub(cpu0);
    if got != total {
        return Err(format!("host received {got} of {total} bytes"));
    }
    let secs = t1.duration_since(t0).as_secs_f64();
    Ok((mib as f64 / secs, cpu.as_secs_f64() * 1000.0 / mib as f64))
}

fn synthetic_h2g(d: &Running, mib: usize) -> Result<(f64, f64)> {
    let total = mib << 20;
    let listener = UnixListener::bind(d.port(6000)).map_err(|e| e.to_string())?;
    // The writer keeps its socket open until the driver has everything, so the figure is
    // throughput only, whatever a daemon does at EOF.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let buf = vec![0xa5u8; 256 * 1024];
        let mut left = total;
        while left > 0 {
            let n = left.min(buf.len());
            s.write_all(&buf[..n])?;
            left -= n;
        }
        let _ = done_rx.recv_timeout(Duration::from_secs(300));
        Ok(())
    });
    let mut drv = Driver::connect(&d.sock())?;
    drv.open(2000, 6000)?;
    let cpu0 = d.cpu();
    let t0 = Instant::now();
    let mut got: usize = 0;
    let mut consumed_unreported: u32 = 0;
    let mut ops = std::collections::BTreeMap::new();
    let mut fwd: u32 = 0;
    let mut rx = Vec::new();
    while got < total {
        rx.clear();
        drv.take_rx(&mut rx)?;
        for &(op, len, _, _, _) in &rx {
            *ops.entry(op).or_insert(0usize) += 1;
            match op {
                5 => {
                    got += len as usize;
                    consumed_unreported += len;
                    fwd = fwd.wrapping_add(len);
                }
                3 => return Err("connection reset during host->guest transfer".into()),
                _ => {}
            }
        }
        if consumed_unreported >= GUEST_BUF_ALLOC / 2 {
            drv.reclaim_tx();
            drv.control(hdr(6, 2000, 6000, 0, 0, fwd))?;
            consumed_unreported = 0;
        }
        if rx.is_empty() {
            drv.wait(Duration::from_millis(5));
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = done_tx.send(());
            let q = drv.fe.queue(0);
            return Err(format!(
                "host->guest transfer stuck at {got} of {total} bytes (RX used idx {}, {} in flight, {} free, ops {ops:?})",
                q.used_idx(), q.in_flight(), q.free_descriptors()
            ));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = d.cpu().saturating_sub(cpu0);
    let _ = done_tx.send(());
    writer
        .join()
        .map_err(|_| "writer panicked".to_string())?
        .map_err(|e| e.to_string())?;
    Ok((mib as f64 / secs, cpu.as_secs_f64() * 1000.0 / mib as f64))
}

fn synthetic_conns(d: &Running, n: usize) -> Result<f64> {
    let listener = UnixListener::bind(d.port(7000)).map_err(|e| e.to_string())?;
    let acceptor = std::thread::spawn(move || {
        let mut kept = Vec::new();
        while let Ok((s, _)) = listener.accept() {
            kept.push(s);
            if kept.len() == n {
                break;
            }
        }
        kept.len()
    });
    let mut drv = Driver::connect(&d.sock())?;
    let t0 = Instant::now();
    for i in 0..n {
        let local = 30_000 + u32::try_from(i).unwrap_or(0);
        drv.open(local, 7000)?;
        drv.control(hdr(4, local, 7000, 0, 3, 0))?;
        // Wait for the RST that completes the close.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut rx = Vec::new();
        loop {
            drv.take_rx(&mut rx)?;
            if rx.iter().any(|p| p.0 == 3 && p.4 == 7000) {
                break;
            }
            if Instant::now() > deadline {
                return Err("no RST after close".into());
            }
            drv.wait(Duration::from_millis(20));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let accepted = acceptor
        .join()
        .map_err(|_| "acceptor panicked".to_string())?;
    if accepted != n {
        return Err(format!("host accepted {accepted} of {n} connections"));
    }
    Ok(n as f64 / secs)
}

// ---- real guest ---------------------------------------------------------------------------

fn guest_suite(qemu: &e2e::Qemu, s: &Subject, mib: usize, conns: usize) -> Result<Figures> {
    let d = Running::start(s)?;
    let total = mib << 20;
    // guest->host: first to last byte, timed on the host.
    let g2h_thread = receive_one(UnixListener::bind(d.port(5000)).map_err(|e| e.to_string())?);
    let g2h_64k_thread = receive_one(UnixListener::bind(d.port(5003)).map_err(|e| e.to_string())?);
    // host->guest: from OK to the guest's "done" connection on port 5002.
    let done = UnixListener::bind(d.port(5002)).map_err(|e| e.to_string())?;
    let uds = d.uds();
    let h2g_thread = std::thread::spawn(move || -> Option<Duration> {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut s = loop {
            if Instant::now() > deadline {
                return None;
            }
            if let Some(s) = hybrid_connect(&uds, 6000) {
                break s;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let t0 = Instant::now();
        let buf = vec![0x3cu8; 256 * 1024];
        let mut left = total;
        while left > 0 {
            let n = left.min(buf.len());
            s.write_all(&buf[..n]).ok()?;
            left -= n;
        }
        drop(s);
        let _ = done.accept().ok()?;
        Some(t0.elapsed())
    });
    // connections: accept times of `conns` connections on port 5001.
    let c = UnixListener::bind(d.port(5001)).map_err(|e| e.to_string())?;
    let c_thread = std::thread::spawn(move || -> Option<(usize, Duration)> {
        let mut first = None;
        let mut n = 0;
        let mut last = Duration::ZERO;
        while n < conns {
            let (s, _) = c.accept().ok()?;
            drop(s);
            let t = *first.get_or_insert_with(Instant::now);
            last = t.elapsed();
            n += 1;
        }
        Some((n, last))
    });
    // The ceiling first: the same pipeline with no vsock in it, timed in the guest
    // (/proc/uptime, 10 ms resolution, plenty for transfers of a second or more).
    let script = format!(
        "t0=$(cut -d' ' -f1 /proc/uptime)\n\
         dd if=/dev/zero bs=1M count={mib} 2>/dev/null | socat -u - /dev/null\n\
         t1=$(cut -d' ' -f1 /proc/uptime)\n\
         echo BENCH-CEILING $t0 $t1\n\
         dd if=/dev/zero bs=1M count={mib} 2>/dev/null | socat -u - VSOCK-CONNECT:2:5000\n\
         dd if=/dev/zero bs=1M count={mib} 2>/dev/null | socat -b 65536 -u - VSOCK-CONNECT:2:5003\n\
         socat -u VSOCK-LISTEN:6000 - | wc -c\n\
         socat -u /dev/null VSOCK-CONNECT:2:5002\n\
         i=0; while [ $i -lt {conns} ]; do socat -u /dev/null VSOCK-CONNECT:2:5001; i=$((i+1)); done\n\
         echo bench-done\n"
    );
    let cpu0 = d.cpu();
    let run = e2e::GuestSpec::new(&script)
        .device(e2e::Device::vsock(&d.sock(), CID))
        .cpus(2)
        .memory_mib(1024)
        .timeout(Duration::from_secs(600))
        .run(qemu)
        .map_err(|e| format!("{}: guest run failed: {e}", s.name))?;
    let cpu = d.cpu().saturating_sub(cpu0);
    if run.exit_code != Some(0) || !run.output.contains("bench-done") {
        return Err(format!(
            "{}: guest workload failed:\n{}",
            s.name, run.output
        ));
    }
    eprintln!(
        "  {}: daemon CPU {:.2} s over the guest run ({:.1} s)",
        s.name,
        cpu.as_secs_f64(),
        run.duration.as_secs_f64()
    );
    let mut g2h_times = [Duration::ZERO; 2];
    for (thread, time) in [g2h_thread, g2h_64k_thread].into_iter().zip(&mut g2h_times) {
        let (bytes, t) = thread
            .join()
            .ok()
            .flatten()
            .ok_or("guest->host transfer failed")?;
        if bytes != total {
            return Err(format!(
                "{}: host received {bytes} of {total} bytes",
                s.name
            ));
        }
        *time = t;
    }
    let [g2h_time, g2h_64k_time] = g2h_times;
    let h2g_time = h2g_thread
        .join()
        .ok()
        .flatten()
        .ok_or("host->guest transfer failed")?;
    let (n, span) = c_thread.join().ok().flatten().ok_or("connections failed")?;
    let ceiling_secs = run
        .output
        .lines()
        .find_map(|l| {
            let rest = l.trim().strip_prefix("BENCH-CEILING ")?;
            let mut it = rest.split_whitespace().map(str::parse::<f64>);
            let (t0, t1) = (it.next()?.ok()?, it.next()?.ok()?);
            Some(t1 - t0)
        })
        .ok_or_else(|| format!("{}: the guest printed no BENCH-CEILING line", s.name))?;
    let f = Figures {
        guest_ceiling_mibs: mib as f64 / ceiling_secs.max(0.01),
        g2h_mibs: mib as f64 / g2h_time.as_secs_f64(),
        g2h_64k_mibs: mib as f64 / g2h_64k_time.as_secs_f64(),
        h2g_mibs: mib as f64 / h2g_time.as_secs_f64(),
        conns_per_s: (n.saturating_sub(1)) as f64 / span.as_secs_f64().max(1e-9),
        ..Figures::default()
    };
    eprintln!(
        "  {}: guest->host {:.1} MiB/s ({:.1} with 64 KiB writes; the guest alone {:.1}), \
         host->guest {:.1} MiB/s, {:.1} conn/s",
        s.name, f.g2h_mibs, f.g2h_64k_mibs, f.guest_ceiling_mibs, f.h2g_mibs, f.conns_per_s
    );
    Ok(f)
}

/// Accepts one connection on `listener` and reads it to the end: the bytes received and
/// the time from the first to the last.
fn receive_one(listener: UnixListener) -> std::thread::JoinHandle<Option<(usize, Duration)>> {
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().ok()?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0;
        let mut t0 = None;
        loop {
            let n = s.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            t0.get_or_insert_with(Instant::now);
            got += n;
        }
        Some((got, t0?.elapsed()))
    })
}

/// The hybrid-vsock handshake: `CONNECT port`, then `OK ...`.
fn hybrid_connect(uds: &Path, port: u32) -> Option<UnixStream> {
    let mut s = UnixStream::connect(uds).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).ok()?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).ok()? == 1 {
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    line.starts_with(b"OK ").then_some(s)
}
