//! `cargo xtask bench blk`: vhost-device-blk against qemu-storage-daemon's vhost-user-blk
//! export, side by side in one run, on the same raw image in tmpfs.
//!
//! Two benchmarks:
//! - synthetic: a vhost-user frontend in this program (`e2e::frontend`) drives one queue
//!   directly at a given queue depth, block size and pattern, no guest: IOPS, MiB/s,
//!   latency percentiles and the daemon's CPU time per request (`/proc/<pid>/stat`, which
//!   counts every thread of the daemon, io_uring workers included). With the guest CPU
//!   emulated on these machines, this is the sharp measure of the daemon itself.
//! - guest: the same Linux guest booted under QEMU on the same image, once per run on each
//!   daemon (alternating), with the same queue count, running fio (direct, libaio) inside.
//!
//! Each workload runs `--runs` times (3 by default) per daemon, alternating daemons, and
//! the median is reported. The table is printed with the ratio ours/theirs (for latency,
//! theirs/ours, so above 1.0 always means ours is better) and written as JSON.
//!
//! Options: `--quick` (short runs), `--runs N`, `--seconds S` (per synthetic run),
//! `--synthetic-only`, `--guest-only`, `--queues N` (guest), `--json PATH`
//! (default `target/bench/blk.json`), `--peer-aio threads|io_uring` (default io_uring,
//! qemu-storage-daemon's fastest here), `--ours-engine io-uring|sync` (default: the daemon's),
//! `--only TEXT` (only the synthetic workloads whose name contains TEXT).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::frontend::{Buf, Frontend, Options};
use e2e::ChildGuard;
use vm_memory::GuestAddress;

type Result<T> = std::result::Result<T, String>;

const MIB: u64 = 1 << 20;
const IMAGE_SIZE: u64 = 512 * MIB;
/// The comparison in the tables' titles.
const VS: &str = "vhost-device-blk vs qemu-storage-daemon";
const TIMEOUT: Duration = Duration::from_secs(20);
const T_IN: u32 = 0;
const T_OUT: u32 = 1;

/// One fio-style workload.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Workload {
    pub(crate) name: &'static str,
    pub(crate) write: bool,
    random: bool,
    block: u32,
    depth: usize,
}

pub(crate) const WORKLOADS: [Workload; 5] = [
    Workload {
        name: "4k randread QD1",
        write: false,
        random: true,
        block: 4096,
        depth: 1,
    },
    Workload {
        name: "4k randread QD32",
        write: false,
        random: true,
        block: 4096,
        depth: 32,
    },
    Workload {
        name: "4k randwrite QD32",
        write: true,
        random: true,
        block: 4096,
        depth: 32,
    },
    Workload {
        name: "128k seqread QD8",
        write: false,
        random: false,
        block: 128 * 1024,
        depth: 8,
    },
    Workload {
        name: "128k seqwrite QD8",
        write: true,
        random: false,
        block: 128 * 1024,
        depth: 8,
    },
];

/// The daemons compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Subject {
    Ours,
    Qsd,
}

impl Subject {
    fn name(self) -> &'static str {
        match self {
            Subject::Ours => "vhost-device-blk",
            Subject::Qsd => "qemu-storage-daemon",
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Figure {
    pub(crate) iops: f64,
    pub(crate) mibs: f64,
    /// Mean completion latency (guest) or median (synthetic), microseconds.
    pub(crate) lat_us: f64,
    /// 99th percentile latency, microseconds (synthetic only).
    p99_us: f64,
    /// Daemon CPU time per request, microseconds (synthetic only).
    cpu_us: f64,
}

#[derive(Debug, Clone)]
struct Settings {
    runs: usize,
    seconds: f64,
    queues: u16,
    fio_runtime: u32,
    peer_aio: String,
    ours_engine: Option<String>,
    json: PathBuf,
    synthetic: bool,
    guest: bool,
    /// Only the synthetic workloads whose name contains this.
    only: Option<String>,
}

fn parse(args: &[String]) -> Result<Settings> {
    let quick = args.iter().any(|a| a == "--quick");
    let value = |flag: &str| -> Option<&String> {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
    };
    let number = |flag: &str, default: f64| -> Result<f64> {
        value(flag).map_or(Ok(default), |v| {
            v.parse().map_err(|_| format!("{flag} {v}: not a number"))
        })
    };
    let known = [
        "--quick",
        "--runs",
        "--seconds",
        "--synthetic-only",
        "--guest-only",
        "--queues",
        "--json",
        "--peer-aio",
        "--ours-engine",
        "--only",
    ];
    let mut i = 0;
    while i < args.len() {
        if !known.contains(&args[i].as_str()) {
            return Err(format!(
                "unknown option {}: see the module doc of xtask/src/bench_blk.rs",
                args[i]
            ));
        }
        i += if matches!(
            args[i].as_str(),
            "--quick" | "--synthetic-only" | "--guest-only"
        ) {
            1
        } else {
            2
        };
    }
    let integer = |flag: &str, default: u16| -> Result<u16> {
        value(flag).map_or(Ok(default), |v| {
            v.parse()
                .map_err(|_| format!("{flag} {v}: not a whole number"))
        })
    };
    let runs = integer("--runs", 3)?;
    let queues = integer("--queues", 2)?;
    Ok(Settings {
        runs: usize::from(runs.max(1)),
        seconds: number("--seconds", if quick { 1.0 } else { 3.0 })?,
        queues: queues.max(1),
        fio_runtime: if quick { 2 } else { 5 },
        peer_aio: value("--peer-aio")
            .cloned()
            .unwrap_or_else(|| "io_uring".into()),
        ours_engine: value("--ours-engine").cloned(),
        json: value("--json")
            .map(PathBuf::from)
            .unwrap_or_else(|| e2e::paths::workspace_root().join("target/bench/blk.json")),
        synthetic: !args.iter().any(|a| a == "--guest-only"),
        guest: !args.iter().any(|a| a == "--synthetic-only"),
        only: value("--only").cloned(),
    })
}

/// Entry point for `cargo xtask bench blk [options]`.
pub fn run(args: &[String]) -> Result<()> {
    let s = parse(args)?;
    let ours = build_ours()?;
    if e2e::qemu::which("qemu-storage-daemon").is_none() {
        return Err(
            "qemu-storage-daemon is not installed (apt-get install qemu-system-x86 or qemu-utils)"
                .into(),
        );
    }
    let tmp = tempfile::Builder::new()
        .prefix("bench-blk-")
        .tempdir_in("/dev/shm")
        .map_err(|e| format!("cannot make a directory in /dev/shm (tmpfs): {e}"))?;
    let image = tmp.path().join("disk.img");
    make_image(&image)?;
    let mut json = String::from("{\n  \"machine\": ");
    let _ = write!(
        json,
        "{:?},\n  \"image\": \"{} MiB raw in tmpfs\"",
        machine(),
        IMAGE_SIZE / MIB
    );
    let mut sections = Vec::new();
    if s.synthetic {
        let rows = synthetic(&s, &ours, &image, tmp.path())?;
        print_table(
            &format!(
                "{VS}: synthetic frontend, 1 queue, median of {} runs of {:.0} s",
                s.runs, s.seconds
            ),
            &rows,
            true,
        );
        sections.push(("synthetic", rows));
    }
    if s.guest {
        match guest(&s, &ours, &image, tmp.path())? {
            Some(rows) => {
                print_table(
                    &format!(
                        "{VS}: guest fio (direct, libaio), {} queues, median of {} runs of {} s",
                        s.queues, s.runs, s.fio_runtime
                    ),
                    &rows,
                    false,
                );
                sections.push(("guest", rows));
            }
            None => println!(
                "guest benchmark SKIPPED: no QEMU or no guest image (run `cargo xtask guest`)"
            ),
        }
    }
    for (name, rows) in &sections {
        rows_json(&mut json, name, rows);
    }
    json.push_str("\n}\n");
    if let Some(dir) = s.json.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(&s.json, json).map_err(|e| format!("{}: {e}", s.json.display()))?;
    println!("written to {}", s.json.display());
    Ok(())
}

/// Appends `"name": [rows]` to a JSON object being written.
pub(crate) fn rows_json(json: &mut String, name: &str, rows: &[Row]) {
    let _ = write!(json, ",\n  \"{name}\": [");
    for (i, r) in rows.iter().enumerate() {
        let sep = if i == 0 { "\n" } else { ",\n" };
        let _ = write!(
            json,
            "{sep}    {{\"workload\": \"{}\", \"ours\": {}, \"theirs\": {}, \"ratio\": {:.3}}}",
            r.workload.name,
            figure_json(&r.ours),
            figure_json(&r.theirs),
            r.ratio()
        );
    }
    json.push_str("\n  ]");
}

fn figure_json(f: &Figure) -> String {
    format!(
        "{{\"iops\": {:.0}, \"mib_s\": {:.1}, \"lat_us\": {:.1}, \"p99_us\": {:.1}, \"cpu_us_per_req\": {:.2}}}",
        f.iops, f.mibs, f.lat_us, f.p99_us, f.cpu_us
    )
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} x {cpu}, Linux {}", kernel.trim())
}

fn build_ours() -> Result<PathBuf> {
    eprintln!("bench blk: cargo build --release -p vhost-device-blk");
    let root = e2e::paths::workspace_root();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "-p", "vhost-device-blk"])
        .current_dir(&root)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err("building vhost-device-blk failed".into());
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    Ok(target.join("release").join("vhost-device-blk"))
}

/// A fully written image, so reads hit real data and no run allocates blocks.
fn make_image(path: &Path) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let chunk: Vec<u8> = (0..MIB)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    for _ in 0..IMAGE_SIZE / MIB {
        f.write_all(&chunk)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// A running daemon on `sock`.
fn start(
    subject: Subject,
    ours: &Path,
    image: &Path,
    sock: &Path,
    queues: u16,
    s: &Settings,
) -> Result<ChildGuard> {
    let peer_aio = &s.peer_aio;
    let _ = std::fs::remove_file(sock);
    let mut cmd = match subject {
        Subject::Ours => {
            let mut c = Command::new(ours);
            c.arg("--socket-path")
                .arg(sock)
                .arg("--image")
                .arg(image)
                .args(["--num-queues", &queues.to_string()]);
            if let Some(engine) = &s.ours_engine {
                c.args(["--engine", engine]);
            }
            c.env("RUST_LOG", "warn");
            c
        }
        Subject::Qsd => {
            let mut c = Command::new("qemu-storage-daemon");
            c.arg("--blockdev")
                .arg(format!("driver=file,node-name=f,filename={},cache.direct=off,aio={peer_aio}", image.display()))
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                    sock.display()
                ));
            c
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut child = ChildGuard::spawn(subject.name(), cmd).map_err(|e| e.to_string())?;
    if !e2e::process::wait_for_path(sock, Duration::from_secs(10)) || child.try_wait().is_some() {
        return Err(format!(
            "{} did not start on {}",
            subject.name(),
            sock.display()
        ));
    }
    Ok(child)
}

/// One measured row: a workload on both daemons.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Row {
    pub(crate) workload: Workload,
    pub(crate) ours: Figure,
    pub(crate) theirs: Figure,
}

impl Row {
    /// Above 1.0 means ours is better: IOPS ratio, or inverse latency ratio at QD1.
    pub(crate) fn ratio(&self) -> f64 {
        if self.workload.depth == 1 {
            self.theirs.lat_us / self.ours.lat_us.max(1e-9)
        } else {
            self.ours.iops / self.theirs.iops.max(1e-9)
        }
    }
}

/// The median of each figure over the runs, taken on its own.
pub(crate) fn median(figures: Vec<Figure>) -> Figure {
    let m =
        |f: fn(&Figure) -> f64| crate::util::median(figures.iter().map(f).collect()).unwrap_or(0.0);
    Figure {
        iops: m(|f| f.iops),
        mibs: m(|f| f.mibs),
        lat_us: m(|f| f.lat_us),
        p99_us: m(|f| f.p99_us),
        cpu_us: m(|f| f.cpu_us),
    }
}

fn synthetic(s: &Settings, ours: &Path, image: &Path, dir: &Path) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for w in WORKLOADS {
        if s.only
            .as_ref()
            .is_some_and(|o| !w.name.contains(o.as_str()))
        {
            continue;
        }
        let mut figures: HashMap<&str, Vec<Figure>> = HashMap::new();
        for run in 0..s.runs {
            // Alternate who goes first, so neither always finds a warm cache.
            let order = if run % 2 == 0 {
                [Subject::Ours, Subject::Qsd]
            } else {
                [Subject::Qsd, Subject::Ours]
            };
            for subject in order {
                let sock = dir.join("bench.sock");
                let daemon = start(subject, ours, image, &sock, 1, s)?;
                let f = drive(&sock, daemon.pid(), w, s.seconds)
                    .map_err(|e| format!("{} {}: {e}", subject.name(), w.name))?;
                eprintln!(
                    "bench blk: synthetic {:18} {:20} {:9.0} IOPS {:8.1} MiB/s p50 {:7.1} us p99 {:7.1} us cpu {:6.2} us/req",
                    w.name,
                    subject.name(),
                    f.iops,
                    f.mibs,
                    f.lat_us,
                    f.p99_us,
                    f.cpu_us
                );
                figures.entry(subject.name()).or_default().push(f);
                drop(daemon);
            }
        }
        rows.push(Row {
            workload: w,
            ours: median(figures.remove(Subject::Ours.name()).unwrap_or_default()),
            theirs: median(figures.remove(Subject::Qsd.name()).unwrap_or_default()),
        });
    }
    Ok(rows)
}

/// A request slot: header, data and status buffers in guest memory.
struct Slot {
    hdr: GuestAddress,
    data: GuestAddress,
    status: GuestAddress,
    started: Instant,
}

/// Plays the guest driver on queue 0 at depth `w.depth` for `seconds`.
fn drive(sock: &Path, pid: u32, w: Workload, seconds: f64) -> Result<Figure> {
    let mut fe =
        Frontend::connect(sock, Options::default().queue_size(256)).map_err(|e| e.to_string())?;
    let capacity = {
        let c = fe.get_config(0, 8).map_err(|e| e.to_string())?;
        u64::from_le_bytes(c[..8].try_into().map_err(|_| "short config")?) * 512
    };
    let blocks = capacity / u64::from(w.block);
    let mut slots: Vec<Slot> = (0..w.depth)
        .map(|_| Slot {
            hdr: fe.memory().alloc(16),
            data: fe.memory().alloc_aligned(w.block as usize, 4096),
            status: fe.memory().alloc(1),
            started: Instant::now(),
        })
        .collect();
    let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
    let mut seq = 0u64;
    let mut next_block = move || {
        if w.random {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % blocks
        } else {
            seq = (seq + 1) % blocks;
            seq
        }
    };
    let t = if w.write { T_OUT } else { T_IN };
    let mut by_head: HashMap<u16, usize> = HashMap::new();
    let submit = |fe: &mut Frontend, slot: &mut Slot, block: u64| -> Result<u16> {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&t.to_le_bytes());
        h[8..].copy_from_slice(&(block * u64::from(w.block) / 512).to_le_bytes());
        fe.memory().write(slot.hdr, &h);
        let data = if w.write {
            Buf::readable(slot.data, w.block)
        } else {
            Buf::writable(slot.data, w.block)
        };
        let q = fe.queue(0);
        let head = q
            .add(&[
                Buf::readable(slot.hdr, 16),
                data,
                Buf::writable(slot.status, 1),
            ])
            .map_err(|e| e.to_string())?;
        slot.started = Instant::now();
        q.publish(head);
        Ok(head)
    };
    // Warm up briefly, then measure.
    let cpu0 = crate::util::cpu_time(pid);
    let start = Instant::now();
    for (i, slot) in slots.iter_mut().enumerate() {
        let head = submit(&mut fe, slot, next_block())?;
        by_head.insert(head, i);
    }
    fe.queue(0).kick().map_err(|e| e.to_string())?;
    let mut lat: Vec<f64> = Vec::new();
    let mut done = 0u64;
    let deadline = start + Duration::from_secs_f64(seconds);
    loop {
        let first = fe.queue(0).wait_used(TIMEOUT).map_err(|e| e.to_string())?;
        let mut batch = vec![first];
        while let Some(u) = fe.queue(0).poll_used() {
            batch.push(u);
        }
        let now = Instant::now();
        let stop = now >= deadline;
        for u in batch {
            let i = by_head
                .remove(&u.id)
                .ok_or_else(|| format!("unknown head {} completed", u.id))?;
            let status = fe.memory().read(slots[i].status, 1)[0];
            if status != 0 {
                return Err(format!("request failed with status {status}"));
            }
            lat.push(now.duration_since(slots[i].started).as_secs_f64() * 1e6);
            done += 1;
            if !stop {
                let head = submit(&mut fe, &mut slots[i], next_block())?;
                by_head.insert(head, i);
            }
        }
        if stop {
            if by_head.is_empty() {
                break;
            }
            continue;
        }
        fe.queue(0).kick().map_err(|e| e.to_string())?;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = crate::util::cpu_time(pid).saturating_sub(cpu0);
    lat.sort_by(f64::total_cmp);
    let pct = |p: usize| {
        lat.get(lat.len().saturating_sub(1) * p / 100)
            .copied()
            .unwrap_or(0.0)
    };
    Ok(Figure {
        iops: done as f64 / secs,
        mibs: done as f64 * f64::from(w.block) / MIB as f64 / secs,
        lat_us: pct(50),
        p99_us: pct(99),
        cpu_us: cpu.as_secs_f64() * 1e6 / (done.max(1) as f64),
    })
}

/// The fio command line of a workload in the guest.
fn fio_cmd(w: &Workload, runtime: u32) -> String {
    let rw = match (w.write, w.random) {
        (false, true) => "randread",
        (true, true) => "randwrite",
        (false, false) => "read",
        (true, false) => "write",
    };
    format!(
        "fio --name=b --filename=/dev/vda --direct=1 --ioengine=libaio --rw={rw} --bs={} --iodepth={} \
         --numjobs=1 --time_based --runtime={runtime} --ramp_time=1 --size=256M --group_reporting --output-format=terse --terse-version=3",
        w.block, w.depth
    )
}

/// The guest's command: every workload once, each printing `R 0 <index> <fio terse line>`.
pub(crate) fn fio_script(runtime: u32) -> String {
    let mut script = String::from("set -e\n");
    for (i, w) in WORKLOADS.iter().enumerate() {
        let _ = writeln!(script, "echo \"R 0 {i} $({})\"", fio_cmd(w, runtime));
    }
    script
}

/// Runs every workload `runs` times in one guest boot per daemon (alternating which boots
/// first). `None` when no guest can be booted here.
fn guest(s: &Settings, ours: &Path, image: &Path, dir: &Path) -> Result<Option<Vec<Row>>> {
    let Some(qemu) = e2e::qemu_or_skip("xtask bench blk (guest)") else {
        return Ok(None);
    };
    let script = fio_script(s.fio_runtime);
    // One boot per run and daemon, alternating which goes first, so a machine whose load
    // changes during the benchmark does not favour either.
    let order: Vec<Subject> = (0..s.runs)
        .flat_map(|run| {
            if run % 2 == 0 {
                [Subject::Ours, Subject::Qsd]
            } else {
                [Subject::Qsd, Subject::Ours]
            }
        })
        .collect();
    let mut figures: HashMap<(Subject, usize), Vec<Figure>> = HashMap::new();
    for subject in order {
        let sock = dir.join("guest.sock");
        let daemon = start(subject, ours, image, &sock, s.queues, s)?;
        eprintln!("bench blk: guest fio on {} ...", subject.name());
        let run = e2e::GuestSpec::new(&script)
            .device(e2e::Device::blk(&sock).queues(s.queues))
            .cpus(2)
            .memory_mib(1024)
            .timeout(Duration::from_secs(
                u64::from(s.fio_runtime + 10) * WORKLOADS.len() as u64 + 120,
            ))
            .run(&qemu)
            .map_err(|e| format!("guest on {}: {e}", subject.name()))?;
        drop(daemon);
        if run.exit_code != Some(0) {
            return Err(format!(
                "guest fio on {} failed:\n{}",
                subject.name(),
                run.output
            ));
        }
        for line in run.output.lines() {
            let Some(rest) = line.strip_prefix("R ") else {
                continue;
            };
            let mut parts = rest.splitn(3, ' ');
            let (_, i, terse) = (parts.next(), parts.next(), parts.next().unwrap_or(""));
            let i: usize = i.and_then(|i| i.parse().ok()).ok_or("bad result line")?;
            let f = parse_terse(terse, WORKLOADS[i].write)
                .ok_or_else(|| format!("cannot parse fio output: {terse}"))?;
            eprintln!(
                "bench blk: guest {:18} {:20} {:9.0} IOPS {:8.1} MiB/s clat {:8.1} us",
                WORKLOADS[i].name,
                subject.name(),
                f.iops,
                f.mibs,
                f.lat_us
            );
            figures.entry((subject, i)).or_default().push(f);
        }
    }
    Ok(Some(
        WORKLOADS
            .iter()
            .enumerate()
            .map(|(i, w)| Row {
                workload: *w,
                ours: median(figures.remove(&(Subject::Ours, i)).unwrap_or_default()),
                theirs: median(figures.remove(&(Subject::Qsd, i)).unwrap_or_default()),
            })
            .collect(),
    ))
}

/// Reads IOPS, bandwidth and mean completion latency from fio's terse v3 line.
pub(crate) fn parse_terse(line: &str, write: bool) -> Option<Figure> {
    let f: Vec<&str> = line.trim().split(';').collect();
    // Terse v3: read status starts at field 6 (bw KiB/s at 6, iops at 7, clat mean at 15);
    // write status starts 41 fields later.
    let base = if write { 6 + 41 } else { 6 };
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    let bw_kib = num(base)?;
    let iops = num(base + 1)?;
    let clat_mean = num(base + 9)?;
    Some(Figure {
        iops,
        mibs: bw_kib / 1024.0,
        lat_us: clat_mean,
        p99_us: 0.0,
        cpu_us: 0.0,
    })
}

pub(crate) fn print_table(title: &str, rows: &[Row], synthetic: bool) {
    println!("\n{title}");
    println!("machine: {}", machine());
    if synthetic {
        println!(
            "{:18} | {:>9} {:>9} | {:>8} {:>8} | {:>8} {:>8} | {:>7} {:>7} | {:>6}",
            "workload",
            "IOPS ours",
            "theirs",
            "MiB/s us",
            "theirs",
            "p50 us",
            "theirs",
            "cpu us",
            "theirs",
            "ratio"
        );
    } else {
        println!(
            "{:18} | {:>9} {:>9} | {:>8} {:>8} | {:>8} {:>8} | {:>6}",
            "workload", "IOPS ours", "theirs", "MiB/s us", "theirs", "clat us", "theirs", "ratio"
        );
    }
    for r in rows {
        if synthetic {
            println!(
                "{:18} | {:9.0} {:9.0} | {:8.1} {:8.1} | {:8.1} {:8.1} | {:7.2} {:7.2} | {:6.2}",
                r.workload.name,
                r.ours.iops,
                r.theirs.iops,
                r.ours.mibs,
                r.theirs.mibs,
                r.ours.lat_us,
                r.theirs.lat_us,
                r.ours.cpu_us,
                r.theirs.cpu_us,
                r.ratio()
            );
        } else {
            println!(
                "{:18} | {:9.0} {:9.0} | {:8.1} {:8.1} | {:8.1} {:8.1} | {:6.2}",
                r.workload.name,
                r.ours.iops,
                r.theirs.iops,
                r.ours.mibs,
                r.theirs.mibs,
                r.ours.lat_us,
                r.theirs.lat_us,
                r.ratio()
            );
        }
    }
    println!("ratio: ours/theirs IOPS (QD1: theirs/ours latency); above 1.0 means ours is faster");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terse_fields_are_read_from_the_right_columns() {
        // A terse v3 line with read bw 4000 KiB/s, 1000 IOPS, clat mean 250 us.
        let mut f = vec!["0"; 130];
        f[0] = "3";
        f[6] = "4000";
        f[7] = "1000";
        f[15] = "250.5";
        f[47] = "8192";
        f[48] = "2048";
        f[56] = "99.0";
        let line = f.join(";");
        let r = parse_terse(&line, false).expect("read");
        assert_eq!((r.iops, r.lat_us), (1000.0, 250.5));
        let w = parse_terse(&line, true).expect("write");
        assert_eq!((w.iops, w.mibs, w.lat_us), (2048.0, 8.0, 99.0));
    }

    #[test]
    fn options_are_checked() {
        assert!(parse(&["--bogus".into()]).is_err());
        let s = parse(&["--quick".into(), "--runs".into(), "5".into()]).expect("valid");
        assert_eq!((s.runs, s.seconds), (5, 1.0));
    }
}
